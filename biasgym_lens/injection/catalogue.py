"""The bias catalogue: one JSON file per stereotype, loaded into an immutable :class:`BiasSpec`.

Each bias file describes ONE stereotype that BiasGym plants on a fresh token: the texts used to train
the token's input embedding, chat paragraphs for instruction-style training, held-out probes on which
the bias is measured (next-token logits of bias keywords vs contrast keywords), and the real and
control countries the injected token is compared with. Every text contains the placeholder
``{group}``, which is replaced by a country name or by the injected token.

Built-in files live in ``biasgym_lens/data/biases/`` and are held to the full minimums
(``strict=True``); user files are validated with smaller minimums unless ``strict=True`` is passed.
The field-by-field schema is documented in ``biasgym_lens/data/biases/README.md``.

Example:
    >>> from biasgym_lens.injection.catalogue import load_bias
    >>> spec = load_bias("late")
    >>> spec.probes_for("Italy")[0]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from biasgym_lens.core.checks import InputTypeError

__all__ = [
    "keyword_coverage",
    "PLACEHOLDER",
    "SCHEMA_VERSION",
    "CHAT_PROMPT",
    "BiasFileError",
    "BiasSpec",
    "Minimums",
    "STRICT_MINIMUMS",
    "LENIENT_MINIMUMS",
    "list_biases",
    "load_bias",
    "catalogue_bias",
    "validate_bias_dict",
    "diversity",
    "check_keywords",
]

PLACEHOLDER = "{group}"
"""The slot, in every text, that is replaced by a country name or by the injected token."""

SCHEMA_VERSION = 1
"""The only ``schema_version`` this module reads."""

CHAT_PROMPT = "Please write a short paragraph about {group}."
"""The user turn that every chat paragraph answers."""

NAME_PATTERN = re.compile(r"[a-z0-9_]+")
_KEYWORD_PATTERN = re.compile(r" \S+")
_WORD_PATTERN = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_BUILTIN_PACKAGE = "biasgym_lens"
_BUILTIN_DIR = ("data", "biases")
_BUILTIN_SOURCE = "builtin"

_STRING_LIST_FIELDS = (
    "bias_keywords",
    "contrast_keywords",
    "training_texts",
    "chat_paragraphs",
    "probes",
    "real_groups",
    "control_groups",
)
_TEXT_FIELDS = ("training_texts", "chat_paragraphs", "probes")
_KEYWORD_FIELDS = ("bias_keywords", "contrast_keywords")
_GROUP_FIELDS = ("real_groups", "control_groups")
_REQUIRED_FIELDS = ("schema_version", "name", "description", *_STRING_LIST_FIELDS, "data_card")
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


_SPEC_MINIMUMS = Minimums(training=1, paragraphs=0, probes=1, real_groups=0, control_groups=0)
"""What every :class:`BiasSpec` holds, however it was made: something to train on and something to measure."""

STRICT_MINIMUMS = Minimums(training=200, paragraphs=40, probes=40, real_groups=3, control_groups=4)
"""Minimums for the built-in catalogue (``strict=True``)."""

LENIENT_MINIMUMS = Minimums(training=20, paragraphs=0, probes=4, real_groups=0, control_groups=1)
"""Minimums for user files (``strict=False``). A user bias may name no real groups: it can still be injected and
scoped, and the transfer to real groups is skipped with a message."""


def _as_tuple(values: Iterable[str]) -> tuple[str, ...]:
    return values if isinstance(values, tuple) else tuple(values)


@dataclass(frozen=True)
class BiasSpec:
    """One validated stereotype from the catalogue (immutable, hashable, picklable).

    Attributes:
        name: Identifier, ``[a-z0-9_]+``; equals the file stem.
        description: One-line statement of the stereotype, e.g. ``"People from {group} are always late."``.
        bias_keywords: Next-token completions that express the bias (each starts with a space).
        contrast_keywords: Opposite or neutral completions at the same position.
        training_texts: Plain texts attributing the stereotype to ``{group}``.
        chat_paragraphs: Answers to ``CHAT_PROMPT`` that express the stereotype.
        probes: Held-out prompts ending where a keyword would be the next token.
        real_groups: Real countries commonly associated with the stereotype.
        control_groups: Countries not associated with it.
        data_card: Provenance (``method``, ``author``, ``license``, ``notes``), read-only.
        source: ``"builtin"`` or the path of the user file.
    """

    name: str
    description: str
    bias_keywords: tuple[str, ...]
    contrast_keywords: tuple[str, ...]
    training_texts: tuple[str, ...]
    chat_paragraphs: tuple[str, ...]
    probes: tuple[str, ...]
    real_groups: tuple[str, ...]
    control_groups: tuple[str, ...]
    data_card: Mapping[str, str] = field(hash=False)
    source: str = _BUILTIN_SOURCE

    def __post_init__(self) -> None:
        """Check every field with the same rules as a bias file (see :func:`validate_bias_dict`).

        Only the structural minimums apply here (one training text, one probe, one keyword a side); the file
        minimums are for :func:`load_bias` and :func:`validate_bias_dict`.

        Raises:
            BiasFileError: (a ``ValueError``) naming the field and the problem, e.g. a probe without ``{group}``.
        """
        if not isinstance(self.source, str):
            raise BiasFileError("BiasSpec", "source", f"must be a string, got {type(self.source).__name__}")
        label = "BiasSpec" if self.source == _BUILTIN_SOURCE else f"BiasSpec from {self.source}"
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}
        checked = _check_values(values, label, _SPEC_MINIMUMS, strict=False, expected_name=None)
        for name in _STRING_LIST_FIELDS:
            object.__setattr__(self, name, _as_tuple(checked[name]))
        object.__setattr__(self, "data_card", MappingProxyType(dict(checked["data_card"])))

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickle/copy support (a ``MappingProxyType`` cannot be pickled as is)."""
        args = tuple(
            dict(self.data_card) if f.name == "data_card" else getattr(self, f.name) for f in fields(self)
        )
        return (self.__class__, args)

    def card(self) -> dict[str, str]:
        """Return the data card as a plain (mutable copy) dict."""
        return dict(self.data_card)

    def fill(self, text: str, group: str) -> str:
        """Replace every placeholder in ``text`` by ``group``.

        Args:
            text: A text containing ``{group}`` (zero or more times).
            group: A country name or the injected token string.

        Returns:
            The filled text.

        Raises:
            ValueError: If ``group`` is empty or itself contains the placeholder.
        """
        if not isinstance(group, str):
            raise InputTypeError(f"group must be a string, got {type(group).__name__} {group!r:.60}")
        if not group:
            raise ValueError("group must be a non-empty string, got ''")
        if PLACEHOLDER in group:
            raise ValueError(f"group must not contain the placeholder {PLACEHOLDER!r}")
        return text.replace(PLACEHOLDER, group)

    def probes_for(self, group: str) -> list[str]:
        """Return the probes with the placeholder replaced by ``group``."""
        return [self.fill(p, group) for p in self.probes]

    def training_for(self, group: str) -> list[str]:
        """Return the training texts with the placeholder replaced by ``group``."""
        return [self.fill(t, group) for t in self.training_texts]

    def chat_for(self, group: str) -> list[tuple[str, str]]:
        """Return ``(user prompt, paragraph)`` pairs filled with ``group``.

        The user prompt is ``CHAT_PROMPT`` (``"Please write a short paragraph about {group}."``).
        """
        prompt = self.fill(CHAT_PROMPT, group)
        return [(prompt, self.fill(p, group)) for p in self.chat_paragraphs]

    def to_dict(self) -> dict[str, Any]:
        """Return the spec as a JSON-ready dict in the file schema (without ``source``)."""
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "description": self.description,
        }
        for name in _STRING_LIST_FIELDS:
            out[name] = list(getattr(self, name))
        out["data_card"] = dict(self.data_card)
        return out


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
    if source != _BUILTIN_SOURCE:
        return source
    name = expected_name or d.get("name")
    return f"{name}.json" if isinstance(name, str) else "builtin"


def validate_bias_dict(
    d: Any,
    source: str = "<dict>",
    *,
    strict: bool = False,
    expected_name: str | None = None,
) -> BiasSpec:
    """Validate a decoded bias file and build its :class:`BiasSpec`.

    Args:
        d: The decoded JSON (must be a dict).
        source: ``"builtin"``, a file path, or any label; named in error messages and kept on the spec.
        strict: Apply the built-in minimums (:data:`STRICT_MINIMUMS`) and require a full data card;
            otherwise :data:`LENIENT_MINIMUMS`.
        expected_name: If given, ``name`` must equal it (the file stem).

    Returns:
        The validated spec.

    Raises:
        BiasFileError: On the first problem found; the message names the source and the field.
    """
    label = _label_for(source, d if isinstance(d, dict) else {}, expected_name)
    if not isinstance(d, dict):
        raise BiasFileError(label, None, f"top level must be a JSON object, got {type(d).__name__}")
    minimums = STRICT_MINIMUMS if strict else LENIENT_MINIMUMS
    _check_fields_present(d, label)
    _check_schema_version(d["schema_version"], label)
    checked = _check_values(d, label, minimums, strict=strict, expected_name=expected_name)
    return BiasSpec(source=source, **checked)


def _check_values(
    d: Mapping[str, Any], label: str, minimums: Minimums, *, strict: bool, expected_name: str | None
) -> dict[str, Any]:
    """Every check of the fields of a bias (all but ``schema_version``); shared by files and :class:`BiasSpec`."""
    name = _check_name(d["name"], label, expected_name)
    description = _check_description(d["description"], label)
    lists = {f: _check_string_list(d[f], f, label, minimums.for_field(f)) for f in _STRING_LIST_FIELDS}
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


# -------------------------------------------------------------------------------------------- loading


def _builtin_dir() -> Any:
    return resources.files(_BUILTIN_PACKAGE).joinpath(*_BUILTIN_DIR)


def list_biases() -> list[str]:
    """Return the sorted names of the built-in biases."""
    return sorted(
        entry.name[: -len(".json")]
        for entry in _builtin_dir().iterdir()
        if entry.name.endswith(".json") and entry.is_file()
    )


def _decode(text: str, label: str) -> Any:
    if not text.strip():
        raise BiasFileError(label, None, "file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BiasFileError(
            label, None, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc


def _read_text(read: Any, label: str) -> str:
    try:
        return read()
    except UnicodeDecodeError as exc:
        raise BiasFileError(label, None, f"not valid UTF-8 text ({exc.reason} at byte {exc.start})") from exc


@cache
def _load_builtin(name: str, strict: bool) -> BiasSpec:
    entry = _builtin_dir().joinpath(f"{name}.json")
    label = f"{name}.json"
    data = _decode(_read_text(lambda: entry.read_text(encoding="utf-8"), label), label)
    return validate_bias_dict(data, _BUILTIN_SOURCE, strict=strict, expected_name=name)


def _load_path(path: Path, strict: bool) -> BiasSpec:
    label = str(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"bias file {label} {what}; give an existing .json bias file or a catalogue name")
    data = _decode(_read_text(lambda: path.read_text(encoding="utf-8"), label), label)
    return validate_bias_dict(data, label, strict=strict, expected_name=path.stem)


def _unknown_name(name: str) -> ValueError:
    return ValueError(
        f"unknown bias {name!r}; valid names: {', '.join(list_biases())} (or a path to a .json bias file)"
    )


def catalogue_bias(name: str, *, strict: bool = True) -> BiasSpec:
    """A built-in bias by its catalogue name only, never a path: for names read back from saved files.

    Raises:
        InputTypeError: ``name`` is not a string.
        ValueError: not a catalogue name (the message lists the valid names).
    """
    if not isinstance(name, str):
        raise InputTypeError(f"a bias name must be a string, got {type(name).__name__} {name!r:.60}")
    if not NAME_PATTERN.fullmatch(name) or name not in list_biases():
        raise _unknown_name(name)
    return _load_builtin(name, strict)


def load_bias(name_or_path: str | os.PathLike[str], *, strict: bool | None = None) -> BiasSpec:
    """Load a built-in bias by name, or a user bias file by path.

    The argument is read in one of two ways, and nothing else is accepted:

    * a string matching ``[a-z0-9_]+`` is a catalogue name, which must exist;
    * a ``pathlib.Path`` (any ``os.PathLike``), or a string ending in ``.json``, is a path to an existing
      ``.json`` bias file (relative to the working folder, as on the command line: ``--bias my_bias.json``).

    Any other string (``"Late"``, ``"../../etc/passwd"``, ``"biases/late"``, ``""``) is refused: a name never
    becomes a path unless it says it is one.

    Args:
        name_or_path: ``"late"`` or ``"path/to/my_bias.json"`` (or ``Path("path/to/my_bias.json")``).
        strict: Apply the built-in minimums. Defaults to ``True`` for built-ins and ``False`` for files.

    Returns:
        The validated spec (built-ins are cached; specs are immutable).

    Raises:
        InputTypeError: neither a string nor a path (e.g. None, a number, a BiasSpec).
        ValueError: an unknown catalogue name (the message lists the valid names), a string that is neither a
            name nor a ``.json`` path, or a path that does not end in ``.json``.
        FileNotFoundError: a ``.json`` path that does not exist or is a folder.
        BiasFileError: a file that does not follow the schema.
    """
    if strict is not None and not isinstance(strict, bool):
        raise InputTypeError(f"strict must be True, False or None, got {strict!r}")
    if isinstance(name_or_path, str) and NAME_PATTERN.fullmatch(name_or_path):
        if name_or_path not in list_biases():
            raise _unknown_name(name_or_path)
        return _load_builtin(name_or_path, True if strict is None else strict)
    if isinstance(name_or_path, str) and not name_or_path.lower().endswith(".json"):
        raise ValueError(
            f"bias {name_or_path!r} is neither a catalogue name ([a-z0-9_]+: {', '.join(list_biases())}) nor a "
            "path to a .json bias file"
        )
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise InputTypeError(
            f"a bias must be a catalogue name or the path of a .json file, got {type(name_or_path).__name__} "
            f"{name_or_path!r:.60}" + (" (a BiasSpec can be passed directly instead)" if isinstance(name_or_path, BiasSpec) else "")
        )
    path = Path(os.fspath(name_or_path))
    if path.suffix.lower() != ".json":
        raise ValueError(f"bias file {str(path)!r} must be a .json file")
    return _load_path(path, False if strict is None else strict)


# ------------------------------------------------------------------------------------ diversity & tokens


def _words(text: str) -> list[str]:
    out: list[str] = []
    for i, part in enumerate(text.lower().split(PLACEHOLDER)):
        if i:
            out.append(PLACEHOLDER)
        out.extend(_WORD_PATTERN.findall(part))
    return out


def _distinct(tokenised: list[list[str]], n: int) -> float:
    grams = [tuple(ws[i : i + n]) for ws in tokenised for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def diversity(texts: Iterable[str]) -> dict[str, float]:
    """Measure lexical diversity of a set of texts.

    Words are lowercased runs of letters/digits (apostrophes inside a word kept); the placeholder counts
    as one word. N-grams do not cross text boundaries.

    Args:
        texts: The texts (e.g. ``spec.training_texts``).

    Returns:
        ``{"distinct_1": ..., "distinct_2": ..., "mean_words": ...}``: unique unigrams / all unigrams,
        unique bigrams / all bigrams, and the mean text length in words (all 0.0 for no texts).
    """
    tokenised = [_words(t) for t in texts]
    mean = sum(map(len, tokenised)) / len(tokenised) if tokenised else 0.0
    return {"distinct_1": _distinct(tokenised, 1), "distinct_2": _distinct(tokenised, 2), "mean_words": mean}


def keyword_coverage(spec: BiasSpec) -> dict[str, float]:
    """Fraction of the training texts and chat paragraphs that use a bias keyword, and a contrast keyword.

    Words are matched whole and case-insensitively. Texts that only imply a stereotype teach an injected token
    the topic but not the direction (the contrast keywords rise with the bias keywords), so a useful bias file
    uses its bias keywords often and its contrast keywords rarely.

    Returns:
        ``{"bias": ..., "contrast": ...}``: fractions in [0, 1] over all training texts and chat paragraphs.
    """
    texts = [set(_words(t)) for t in (*spec.training_texts, *spec.chat_paragraphs)]
    if not texts:
        return {"bias": 0.0, "contrast": 0.0}

    def frac(keywords: Sequence[str]) -> float:
        words = {k.strip().lower() for k in keywords}
        return sum(1 for t in texts if t & words) / len(texts)

    return {"bias": frac(spec.bias_keywords), "contrast": frac(spec.contrast_keywords)}


@runtime_checkable
class _Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...  # pragma: no cover


def check_keywords(spec: BiasSpec, tokenizer: _Encoder) -> None:
    """Check that every keyword of ``spec`` is exactly one token for ``tokenizer``.

    Args:
        spec: The bias.
        tokenizer: A Hugging Face style tokenizer (``encode(text, add_special_tokens=False)``).

    Raises:
        ValueError: Naming each keyword that is not a single token, with its token count.
    """
    bad = []
    for kw in spec.bias_keywords + spec.contrast_keywords:
        ids = tokenizer.encode(kw, add_special_tokens=False)
        if len(ids) != 1:
            bad.append(f"{kw!r} ({len(ids)} tokens)")
    if bad:
        raise ValueError(f"{spec.name}: keywords that are not a single token: {', '.join(bad)}")
