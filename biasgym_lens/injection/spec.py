"""A validated bias: :class:`BiasSpec`, immutable, built from a bias file or in code under the same checks.

Example:
    >>> from biasgym_lens.injection.catalogue import load_bias
    >>> spec = load_bias("late")
    >>> spec.probes_for("Italy")[0]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from biasgym_lens.core.checks import InputTypeError
from biasgym_lens.injection.schema import (
    BUILTIN_SOURCE,
    CHAT_PROMPT,
    PLACEHOLDER,
    SCHEMA_VERSION,
    STRING_LIST_FIELDS,
    BiasFileError,
    Minimums,
    check_bias_dict,
    check_values,
)

__all__ = ["BiasSpec", "validate_bias_dict"]

_SPEC_MINIMUMS = Minimums(training=1, paragraphs=0, probes=1, real_groups=0, control_groups=0)
"""What every :class:`BiasSpec` holds, however it was made: something to train on and something to measure."""


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
    source: str = BUILTIN_SOURCE

    def __post_init__(self) -> None:
        """Check every field with the same rules as a bias file (see :func:`validate_bias_dict`).

        Only the structural minimums apply here (one training text, one probe, one keyword a side); the file
        minimums are for :func:`~biasgym_lens.injection.catalogue.load_bias` and :func:`validate_bias_dict`.

        Raises:
            BiasFileError: (a ``ValueError``) naming the field and the problem, e.g. a probe without ``{group}``.
        """
        if not isinstance(self.source, str):
            raise BiasFileError("BiasSpec", "source", f"must be a string, got {type(self.source).__name__}")
        label = "BiasSpec" if self.source == BUILTIN_SOURCE else f"BiasSpec from {self.source}"
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}
        checked = check_values(values, label, _SPEC_MINIMUMS, strict=False, expected_name=None)
        for name in STRING_LIST_FIELDS:
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
        for name in STRING_LIST_FIELDS:
            out[name] = list(getattr(self, name))
        out["data_card"] = dict(self.data_card)
        return out


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
        strict: Apply the built-in minimums (:data:`~biasgym_lens.injection.schema.STRICT_MINIMUMS`) and
            require a full data card; otherwise :data:`~biasgym_lens.injection.schema.LENIENT_MINIMUMS`.
        expected_name: If given, ``name`` must equal it (the file stem).

    Returns:
        The validated spec.

    Raises:
        BiasFileError: On the first problem found; the message names the source and the field.
    """
    return BiasSpec(source=source, **check_bias_dict(d, source, strict=strict, expected_name=expected_name))
