"""Bundled capability-check data: neutral English passages and easy multiple-choice items.

These datasets are used to measure the *capability cost* of ablating attention heads: perplexity
on neutral prose (:func:`load_neutral_text`) and accuracy on very easy multiple-choice questions
(:func:`load_mc_items`). Both files ship inside the package under ``biasgym_lens/data`` and are
described in ``biasgym_lens/data/CAPABILITY_DATA.md``.

Either loader also accepts a path to a user-supplied JSON file with the same schema::

    {"schema_version": 1, "passages": ["...", ...]}
    {"schema_version": 1, "items": [{"question": "...", "choices": ["...", ...], "answer": 0}]}

Malformed data raises :class:`ValueError` with a message naming the file, the item index and the
offending field, for example ``mc_items.json: items[3].answer: 4 is out of range for 4 choices``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "MC_ITEMS_FILE",
    "NEUTRAL_TEXT_FILE",
    "SCHEMA_VERSION",
    "MCItem",
    "load_mc_items",
    "load_neutral_text",
    "PassageSplits",
    "passage_splits",
]

SCHEMA_VERSION = 1
"""The only ``schema_version`` the loaders accept."""

NEUTRAL_TEXT_FILE = "neutral_text.json"
"""File name of the bundled neutral-text passages inside ``biasgym_lens/data``."""

MC_ITEMS_FILE = "mc_items.json"
"""File name of the bundled multiple-choice items inside ``biasgym_lens/data``."""

_PACKAGE = "biasgym_lens"
_DATA_DIR = "data"


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question.

    Attributes:
        question: The question text, without any ``Question:`` prefix.
        choices: The candidate answers (at least two, distinct, non-empty).
        answer: Index into ``choices`` of the correct answer.
    """

    question: str
    choices: tuple[str, ...]
    answer: int

    @property
    def correct_choice(self) -> str:
        """The text of the correct choice."""
        return self.choices[self.answer]


def _read_json(path: str | os.PathLike[str] | None, default_name: str) -> tuple[Any, str]:
    """Read and parse a JSON file, either bundled or user-supplied.

    Args:
        path: A user file, or ``None`` for the bundled file ``default_name``.
        default_name: File name inside ``biasgym_lens/data`` used when ``path`` is ``None``.

    Returns:
        The parsed JSON document and a label for the file to use in error messages.

    Raises:
        ValueError: If the file is not valid UTF-8 JSON.
        FileNotFoundError: If a user-supplied ``path`` does not exist.
    """
    if path is None:
        label = default_name
        resource = resources.files(_PACKAGE).joinpath(_DATA_DIR).joinpath(default_name)
        text = resource.read_text(encoding="utf-8")
    else:
        label = os.fspath(path)
        text = Path(path).read_text(encoding="utf-8")
    try:
        return json.loads(text), label
    except json.JSONDecodeError as exc:
        raise ValueError(f"{label}: invalid JSON: {exc}") from exc


def _check_header(doc: Any, label: str, list_field: str) -> list[Any]:
    """Validate the top-level object and return its list field.

    Args:
        doc: The parsed JSON document.
        label: File label for error messages.
        list_field: Name of the required list (``"passages"`` or ``"items"``).

    Returns:
        The value of ``list_field``.

    Raises:
        ValueError: If the document is not an object, has the wrong ``schema_version``, or lacks a
            non-empty ``list_field`` list.
    """
    if not isinstance(doc, dict):
        raise ValueError(f"{label}: top level must be a JSON object, got {type(doc).__name__}")
    if "schema_version" not in doc:
        raise ValueError(f"{label}: schema_version: missing field")
    version = doc["schema_version"]
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        raise ValueError(
            f"{label}: schema_version: unsupported value {version!r} (expected {SCHEMA_VERSION})"
        )
    for meta in ("source", "license", "author"):
        if meta in doc and not isinstance(doc[meta], str):
            raise ValueError(f"{label}: {meta}: must be a string")
    if list_field not in doc:
        raise ValueError(f"{label}: {list_field}: missing field")
    entries = doc[list_field]
    if not isinstance(entries, list):
        raise ValueError(f"{label}: {list_field}: must be a list, got {type(entries).__name__}")
    if not entries:
        raise ValueError(f"{label}: {list_field}: must not be empty")
    return entries


def load_neutral_text(path: str | os.PathLike[str] | None = None) -> tuple[str, ...]:
    """Load neutral English passages for perplexity measurement.

    Args:
        path: Optional path to a user JSON file with the schema
            ``{"schema_version": 1, "passages": ["...", ...]}``. When ``None`` (the default), the
            bundled ``biasgym_lens/data/neutral_text.json`` is read.

    Returns:
        The passages, in file order, with surrounding whitespace stripped.

    Raises:
        ValueError: If the file is malformed; the message names the file, the passage index and
            the field (for example ``passages[2]: empty passage``).
        FileNotFoundError: If ``path`` does not exist.
    """
    doc, label = _read_json(path, NEUTRAL_TEXT_FILE)
    entries = _check_header(doc, label, "passages")
    passages: list[str] = []
    for index, passage in enumerate(entries):
        where = f"{label}: passages[{index}]"
        if not isinstance(passage, str):
            raise ValueError(f"{where}: must be a string, got {type(passage).__name__}")
        if not passage.strip():
            raise ValueError(f"{where}: empty passage")
        passages.append(passage.strip())
    return tuple(passages)


def _parse_item(raw: Any, where: str) -> MCItem:
    """Validate one raw multiple-choice entry.

    Args:
        raw: The parsed JSON value of the entry.
        where: Location prefix for error messages, e.g. ``"mc_items.json: items[3]"``.

    Returns:
        The validated item, with question and choices whitespace-stripped.

    Raises:
        ValueError: If a field is missing, has the wrong type, or holds an invalid value.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: must be a JSON object, got {type(raw).__name__}")
    for field in ("question", "choices", "answer"):
        if field not in raw:
            raise ValueError(f"{where}.{field}: missing field")

    question = raw["question"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}.question: must be a non-empty string")

    choices = raw["choices"]
    if not isinstance(choices, list):
        raise ValueError(f"{where}.choices: must be a list, got {type(choices).__name__}")
    if len(choices) < 2:
        raise ValueError(f"{where}.choices: need at least 2 choices, got {len(choices)}")
    cleaned: list[str] = []
    seen: set[str] = set()
    for c_index, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice.strip():
            raise ValueError(f"{where}.choices[{c_index}]: empty choice (must be a non-empty string)")
        key = choice.strip().casefold()
        if key in seen:
            raise ValueError(f"{where}.choices[{c_index}]: duplicate choice {choice!r}")
        seen.add(key)
        cleaned.append(choice.strip())

    answer = raw["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise ValueError(f"{where}.answer: must be an integer, got {answer!r}")
    if not 0 <= answer < len(cleaned):
        raise ValueError(f"{where}.answer: {answer} is out of range for {len(cleaned)} choices")

    return MCItem(question=question.strip(), choices=tuple(cleaned), answer=answer)


def load_mc_items(path: str | os.PathLike[str] | None = None) -> tuple[MCItem, ...]:
    """Load easy multiple-choice items for the capability accuracy check.

    Each item is meant to be scored by the log-likelihood of ``" {choice}"`` as a continuation
    of ``"Question: {question}\\nAnswer:"``; the highest-scoring choice is the model's answer.

    Args:
        path: Optional path to a user JSON file with the schema
            ``{"schema_version": 1, "items": [{"question": str, "choices": [str, ...],
            "answer": int}, ...]}``. When ``None`` (the default), the bundled
            ``biasgym_lens/data/mc_items.json`` is read.

    Returns:
        The items, in file order.

    Raises:
        ValueError: If the file is malformed; the message names the file, the item index and the
            field (for example ``items[3].answer: 4 is out of range for 4 choices``), including
            missing fields, empty or duplicate choices, and an out-of-range answer.
        FileNotFoundError: If ``path`` does not exist.
    """
    doc, label = _read_json(path, MC_ITEMS_FILE)
    entries = _check_header(doc, label, "items")
    return tuple(_parse_item(raw, f"{label}: items[{index}]") for index, raw in enumerate(entries))


class PassageSplits(NamedTuple):
    """Indices of the neutral passages by use: the faithfulness curve's (a subset of the tune ones), the tune
    passages every choice's budget check sees, and the test passages that only report costs."""

    curve: tuple[int, ...]
    tune: tuple[int, ...]
    test: tuple[int, ...]


def passage_splits(n_passages: int, *, curve: int, tune: int, test: int | None = None) -> PassageSplits:
    """Split ``n_passages`` neutral passages into curve, tune and test indices, each spread evenly over the file.

    The shipped passages are grouped by topic (science and weather first, sports and inventions last), so a
    split into the first and the remaining passages would tune on some topics and test on others. Here the
    tune passages are every ``n_passages / tune``-th passage (``i * n // tune``), the curve's are spread over
    the tune ones the same way, and the test passages are all the others in file order (the first ``test`` of
    them when given).

    Raises:
        ValueError: ``curve`` > ``tune``, ``tune`` >= ``n_passages`` (no test passage left), or a count < 1.

    Examples:
        >>> passage_splits(10, curve=2, tune=4)
        PassageSplits(curve=(0, 5), tune=(0, 2, 5, 7), test=(1, 3, 4, 6, 8, 9))
    """
    if min(curve, tune, n_passages) < 1 or (test is not None and test < 1):
        raise ValueError(f"passage counts must be >= 1, got curve={curve}, tune={tune}, test={test}, of {n_passages}")
    if curve > tune:
        raise ValueError(f"curve ({curve}) must be at most tune ({tune}): the curve's passages are tune passages")
    if tune >= n_passages:
        raise ValueError(
            f"no neutral passages are left for the test split after tune_passages={tune}; the text has {n_passages}"
        )
    tune_idx = tuple(i * n_passages // tune for i in range(tune))
    curve_idx = tuple(tune_idx[j * tune // curve] for j in range(curve))
    rest = tuple(i for i in range(n_passages) if i not in set(tune_idx))
    return PassageSplits(curve_idx, tune_idx, rest if test is None else rest[:test])
