"""The schema of a bias file: its fields, their minimum sizes, and the checks every bias passes.

A bias file describes ONE stereotype that BiasGym plants on a fresh token: the texts used to train the token's
input embedding, chat paragraphs for instruction-style training, held-out probes on which the bias is measured
(next-token logits of bias keywords vs contrast keywords), and the real and control countries the injected token
is compared with. Every text contains the placeholder ``{group}``, which is replaced by a country name or by the
injected token. The same checks apply to a file (:func:`check_bias_dict`) and to a
:class:`~biasgym_lens.injection.spec.BiasSpec` made in code (:func:`check_values`); the first problem found
raises a :class:`BiasFileError` naming the source and the field. The field-by-field schema is documented in
``biasgym_lens/data/biases/README.md``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PLACEHOLDER",
    "SCHEMA_VERSION",
    "CHAT_PROMPT",
    "NAME_PATTERN",
    "BUILTIN_SOURCE",
    "STRING_LIST_FIELDS",
    "BiasFileError",
    "Minimums",
    "STRICT_MINIMUMS",
    "LENIENT_MINIMUMS",
    "check_bias_dict",
    "check_values",
]

PLACEHOLDER = "{group}"
"""The slot, in every text, that is replaced by a country name or by the injected token."""

SCHEMA_VERSION = 1
"""The only ``schema_version`` this module reads."""

CHAT_PROMPT = "Please write a short paragraph about {group}."
"""The user turn that every chat paragraph answers."""

NAME_PATTERN = re.compile(r"[a-z0-9_]+")
"""A bias's name, which is also its catalogue name and its file's stem."""

_KEYWORD_PATTERN = re.compile(r" \S+")

BUILTIN_SOURCE = "builtin"
"""The ``source`` of a built-in bias (a user bias's ``source`` is the path of its file)."""

STRING_LIST_FIELDS = (
    "bias_keywords",
    "contrast_keywords",
    "training_texts",
    "chat_paragraphs",
    "probes",
    "real_groups",
    "control_groups",
)
"""The fields that hold lists of strings, in file order."""
_TEXT_FIELDS = ("training_texts", "chat_paragraphs", "probes")
_KEYWORD_FIELDS = ("bias_keywords", "contrast_keywords")
_GROUP_FIELDS = ("real_groups", "control_groups")
_REQUIRED_FIELDS = ("schema_version", "name", "description", *STRING_LIST_FIELDS, "data_card")
_STRICT_CARD_KEYS = ("method", "author", "license", "notes")


class BiasFileError(ValueError):
    """A bias file (or dict) that does not follow the schema.

    The message reads ``"<file>: field '<field>': <problem>"`` (or ``"<file>: <problem>"`` when the
    problem is not tied to one field, such as a JSON syntax error).

    Attributes:
        source: The file name or path (or ``"<dict>"``) the problem was found in.
        field: The offending top-level field, or ``None``.
        problem: What is wrong, in words.
    """

    def __init__(self, source: str, field: str | None, problem: str) -> None:
        self.source = source
        self.field = field
        self.problem = problem
        where = f"{source}: field '{field}'" if field is not None else source
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Minimums:
    """Smallest allowed sizes of the list fields.

    Attributes:
        training: Minimum number of ``training_texts``.
        paragraphs: Minimum number of ``chat_paragraphs``.
        probes: Minimum number of ``probes``.
        real_groups: Minimum number of ``real_groups``.
        control_groups: Minimum number of ``control_groups``.
        keywords: Minimum number of keywords on each side.
    """

    training: int
    paragraphs: int
    probes: int
    real_groups: int
    control_groups: int
    keywords: int = 1

    def for_field(self, name: str) -> int:
        """Return the minimum item count for a list field of the schema.

        Args:
            name: A list field name, e.g. ``"probes"``.

        Returns:
            The minimum number of items.
        """
        return {
            "training_texts": self.training,
            "chat_paragraphs": self.paragraphs,
            "probes": self.probes,
            "real_groups": self.real_groups,
            "control_groups": self.control_groups,
            "bias_keywords": self.keywords,
            "contrast_keywords": self.keywords,
        }[name]



STRICT_MINIMUMS = Minimums(training=200, paragraphs=40, probes=40, real_groups=3, control_groups=4)
"""Minimums for the built-in catalogue (``strict=True``)."""

LENIENT_MINIMUMS = Minimums(training=20, paragraphs=0, probes=4, real_groups=0, control_groups=1)
"""Minimums for user files (``strict=False``). A user bias may name no real groups: it can still be injected and
scoped, and the transfer to real groups is skipped with a message."""


# --------------------------------------------------------------------------------------------- validation


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def _check_fields_present(d: Mapping[str, Any], label: str) -> None:
    missing = [f for f in _REQUIRED_FIELDS if f not in d]
    if missing:
        raise BiasFileError(label, missing[0], f"missing required field(s): {', '.join(missing)}")
    extra = sorted(str(k) for k in d if k not in _REQUIRED_FIELDS)
    if extra:
        raise BiasFileError(label, extra[0], f"unknown field(s): {', '.join(extra)}")


def _check_schema_version(value: Any, label: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BiasFileError(label, "schema_version", f"must be the integer {SCHEMA_VERSION}, got {value!r}")
    if value != SCHEMA_VERSION:
        raise BiasFileError(
            label, "schema_version", f"unsupported version {value}, expected {SCHEMA_VERSION}"
        )


def _check_name(value: Any, label: str, expected: str | None) -> str:
    if not isinstance(value, str):
        raise BiasFileError(label, "name", f"must be a string, got {type(value).__name__}")
    if not NAME_PATTERN.fullmatch(value):
        raise BiasFileError(label, "name", f"{value!r} must match [a-z0-9_]+")
    if expected is not None and value != expected:
        raise BiasFileError(label, "name", f"{value!r} must equal the file stem {expected!r}")
    return value


def _check_description(value: Any, label: str) -> str:
    if not isinstance(value, str):
        raise BiasFileError(label, "description", f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BiasFileError(label, "description", "must not be empty")
    if _control_char(value) is not None:
        raise BiasFileError(label, "description", f"must be a single line without control characters, got {value!r:.80}")
    return value


def _check_string_list(value: Any, name: str, label: str, minimum: int) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise BiasFileError(label, name, f"must be a list of strings, got {type(value).__name__} {value!r:.60}")
    seen: dict[str, int] = {}
    exact = name in _KEYWORD_FIELDS
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise BiasFileError(label, name, f"item {i} must be a string, got {type(item).__name__}")
        if not item.strip():
            raise BiasFileError(label, name, f"item {i} is an empty string")
        key = item if exact else _normalise(item)
        if key in seen:
            raise BiasFileError(label, name, f"item {i} duplicates item {seen[key]}: {item!r}")
        seen[key] = i
    if len(value) < minimum:
        raise BiasFileError(label, name, f"needs at least {minimum} items, got {len(value)}")
    return tuple(value)


def _check_keywords(values: tuple[str, ...], name: str, label: str) -> None:
    for i, kw in enumerate(values):
        if not _KEYWORD_PATTERN.fullmatch(kw) or _control_char(kw) is not None:
            raise BiasFileError(
                label, name, f"item {i} {kw!r} must be one space followed by a word without whitespace"
            )


def _check_placeholders(values: tuple[str, ...], name: str, label: str) -> None:
    for i, text in enumerate(values):
        if PLACEHOLDER not in text:
            raise BiasFileError(label, name, f"item {i} lacks the placeholder {PLACEHOLDER}: {text[:60]!r}")


def _control_char(text: str) -> str | None:
    """The first control character (newline, tab, escape, NUL, line separator...) in ``text``, or None."""
    return next((c for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)


def _check_groups(values: tuple[str, ...], name: str, label: str) -> None:
    for i, group in enumerate(values):
        bad = _control_char(group)
        if bad is not None:
            raise BiasFileError(
                label, name, f"item {i} {group!r} contains the control character {bad!r}; a group is one plain line"
            )
        if PLACEHOLDER in group or group != group.strip():
            raise BiasFileError(label, name, f"item {i} {group!r} must be a plain country name")


def _check_probes(probes: tuple[str, ...], others: Sequence[str], label: str) -> None:
    corpus = [_normalise(t) for t in others]
    for i, probe in enumerate(probes):
        if probe != probe.rstrip():
            raise BiasFileError(label, "probes", f"item {i} ends in whitespace: {probe[-30:]!r}")
        key = _normalise(probe)
        for text in corpus:
            if key in text:
                raise BiasFileError(
                    label, "probes", f"item {i} appears in the training texts or chat paragraphs: {probe!r}"
                )


def _check_disjoint(a: tuple[str, ...], b: tuple[str, ...], name: str, label: str) -> None:
    common = sorted({x.strip().casefold() for x in a} & {x.strip().casefold() for x in b})
    if common:
        raise BiasFileError(label, name, f"overlaps with the other side: {', '.join(map(repr, common))}")


def _check_card(value: Any, label: str, strict: bool) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise BiasFileError(label, "data_card", f"must be an object, got {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(item, str):
            raise BiasFileError(label, "data_card", f"value of {key!r} must be a string")
    if strict:
        missing = [k for k in _STRICT_CARD_KEYS if not str(value.get(k, "")).strip()]
        if missing:
            raise BiasFileError(label, "data_card", f"missing or empty key(s): {', '.join(missing)}")
    return dict(value)


def _label_for(source: str, d: Mapping[str, Any], expected_name: str | None) -> str:
    if source != BUILTIN_SOURCE:
        return source
    name = expected_name or d.get("name")
    return f"{name}.json" if isinstance(name, str) else "builtin"


def check_bias_dict(
    d: Any, source: str = "<dict>", *, strict: bool = False, expected_name: str | None = None
) -> dict[str, Any]:
    """Check a decoded bias file; return its checked fields (the arguments of ``BiasSpec`` but ``source``).

    Args:
        d: The decoded JSON (must be a dict).
        source: ``"builtin"``, a file path, or any label; named in error messages.
        strict: Apply the built-in minimums (:data:`STRICT_MINIMUMS`) and require a full data card;
            otherwise :data:`LENIENT_MINIMUMS`.
        expected_name: If given, ``name`` must equal it (the file stem).

    Raises:
        BiasFileError: On the first problem found; the message names the source and the field.
    """
    label = _label_for(source, d if isinstance(d, dict) else {}, expected_name)
    if not isinstance(d, dict):
        raise BiasFileError(label, None, f"top level must be a JSON object, got {type(d).__name__}")
    minimums = STRICT_MINIMUMS if strict else LENIENT_MINIMUMS
    _check_fields_present(d, label)
    _check_schema_version(d["schema_version"], label)
    return check_values(d, label, minimums, strict=strict, expected_name=expected_name)


def check_values(
    d: Mapping[str, Any], label: str, minimums: Minimums, *, strict: bool, expected_name: str | None
) -> dict[str, Any]:
    """Every check of the fields of a bias (all but ``schema_version``); shared by files and ``BiasSpec``.

    Args:
        d: The fields, by name (``schema_version`` and ``source`` are not read).
        label: Names the bias in error messages.
        minimums: The smallest allowed sizes of the list fields.
        strict: Require a full data card.
        expected_name: If given, ``name`` must equal it.

    Returns:
        The checked fields: ``name``, ``description``, ``data_card`` (a dict) and the list fields (tuples).

    Raises:
        BiasFileError: On the first problem found.
    """
    name = _check_name(d["name"], label, expected_name)
    description = _check_description(d["description"], label)
    lists = {f: _check_string_list(d[f], f, label, minimums.for_field(f)) for f in STRING_LIST_FIELDS}
    for f in _KEYWORD_FIELDS:
        _check_keywords(lists[f], f, label)
    for f in _TEXT_FIELDS:
        _check_placeholders(lists[f], f, label)
    for f in _GROUP_FIELDS:
        _check_groups(lists[f], f, label)
    _check_probes(lists["probes"], lists["training_texts"] + lists["chat_paragraphs"], label)
    _check_disjoint(lists["bias_keywords"], lists["contrast_keywords"], "contrast_keywords", label)
    _check_disjoint(lists["real_groups"], lists["control_groups"], "control_groups", label)
    card = _check_card(d["data_card"], label, strict)
    return {"name": name, "description": description, "data_card": card, **lists}
