"""Tests for the bundled capability data and its loaders (no model needed)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from biasgym_lens.evaluation.capability_data import MCItem, load_mc_items, load_neutral_text

# Words tied to the stereotype topics used elsewhere in the project (punctuality, maths ability,
# spicy food, driving style, alcohol, loudness, stinginess, rudeness). The neutral text must not
# contain them, so that capability perplexity is not entangled with the planted biases.
# Each pattern is matched at a word start, case-insensitively ("cloud" does not hit "loud").
STEREOTYPE_PATTERNS = (
    "late",
    "punctual",
    "spic",
    "chil+i",
    "curry",
    "reckless",
    "driv",
    "drunk",
    "alcohol",
    "beer",
    "wine",
    "liquor",
    "stingy",
    "miser",
    "cheap",
    "rude",
    "impolite",
    "loud",
    "noisy",
    "math",
)
_STEREOTYPE_RE = re.compile(r"\b(?:" + "|".join(STEREOTYPE_PATTERNS) + r")", re.IGNORECASE)


def _write(tmp_path: Path, name: str, doc: Any) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def _good_item(**overrides: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "question": "What color is grass?",
        "choices": ["Green", "Blue", "Red", "Pink"],
        "answer": 0,
    }
    item.update(overrides)
    return item


# --- bundled neutral text -------------------------------------------------------------------


def test_neutral_text_loads_with_enough_material() -> None:
    passages = load_neutral_text()
    assert isinstance(passages, tuple)
    assert len(passages) >= 60
    assert all(isinstance(p, str) and p for p in passages)
    assert sum(len(p.split()) for p in passages) >= 6000


def test_neutral_passage_lengths_and_uniqueness() -> None:
    passages = load_neutral_text()
    for index, passage in enumerate(passages):
        assert 60 <= len(passage.split()) <= 150, f"passage {index} has {len(passage.split())} words"
    assert len(set(passages)) == len(passages)


def test_neutral_text_avoids_stereotype_topic_words() -> None:
    hits = [
        (index, match.group(0))
        for index, passage in enumerate(load_neutral_text())
        for match in _STEREOTYPE_RE.finditer(passage)
    ]
    assert hits == []
    # The literal substrings from the project brief, too.
    text = " ".join(load_neutral_text()).lower()
    for word in (" late", "punctual", "spicy", "reckless", "drunk", "stingy", "rude", " loud"):
        assert word not in text, word


def test_stereotype_pattern_matches_words_but_not_cloud() -> None:
    assert _STEREOTYPE_RE.search("The bus was late.")
    assert _STEREOTYPE_RE.search("A LOUD noise")
    assert not _STEREOTYPE_RE.search("Clouds gather over the plate of chocolate.")


# --- bundled multiple-choice items ----------------------------------------------------------


def test_mc_items_load() -> None:
    items = load_mc_items()
    assert isinstance(items, tuple)
    assert len(items) >= 120
    for item in items:
        assert isinstance(item, MCItem)
        assert len(item.choices) == 4
        assert 0 <= item.answer < 4
        assert item.correct_choice == item.choices[item.answer]
        assert all(1 <= len(choice.split()) <= 4 for choice in item.choices)
        assert len({c.casefold() for c in item.choices}) == 4


def test_mc_answer_positions_are_spread() -> None:
    items = load_mc_items()
    counts = Counter(item.answer for item in items)
    for position in range(4):
        share = counts[position] / len(items)
        assert 0.15 <= share <= 0.35, f"position {position}: {share:.2%}"


def test_mc_no_duplicate_questions() -> None:
    questions = [item.question.casefold() for item in load_mc_items()]
    assert len(questions) == len(set(questions))


def test_mc_item_is_frozen() -> None:
    item = load_mc_items()[0]
    with pytest.raises(AttributeError):
        item.answer = 1  # type: ignore[misc]


def test_bundled_files_carry_metadata() -> None:
    data_dir = Path(__file__).resolve().parents[1] / "biasgym_lens" / "data"
    for name in ("neutral_text.json", "mc_items.json"):
        doc = json.loads((data_dir / name).read_text(encoding="utf-8"))
        assert doc["schema_version"] == 1
        assert doc["license"] == "CC0-1.0"
        assert doc["source"] and doc["author"]


# --- user files -----------------------------------------------------------------------------


def test_user_files_load(tmp_path: Path) -> None:
    text_path = _write(tmp_path, "text.json", {"schema_version": 1, "passages": ["  One passage.  ", "Two."]})
    assert load_neutral_text(text_path) == ("One passage.", "Two.")
    mc_path = _write(tmp_path, "mc.json", {"schema_version": 1, "items": [_good_item(answer=2)]})
    assert load_mc_items(str(mc_path)) == (
        MCItem("What color is grass?", ("Green", "Blue", "Red", "Pink"), 2),
    )


@pytest.mark.parametrize(
    ("item", "pattern"),
    [
        ({"choices": ["A", "B"], "answer": 0}, r"items\[1\]\.question: missing field"),
        (_good_item(answer=4), r"items\[1\]\.answer: 4 is out of range"),
        (_good_item(answer=-1), r"items\[1\]\.answer: -1 is out of range"),
        (_good_item(answer="0"), r"items\[1\]\.answer: must be an integer"),
        (_good_item(answer=True), r"items\[1\]\.answer: must be an integer"),
        (_good_item(choices=[]), r"items\[1\]\.choices: need at least 2"),
        (_good_item(choices=["Green", "  "]), r"items\[1\]\.choices\[1\]: empty choice"),
        (_good_item(choices=["Green", "Blue", "green"]), r"items\[1\]\.choices\[2\]: duplicate choice"),
        (_good_item(question=""), r"items\[1\]\.question: must be a non-empty string"),
        ({"question": "Q?", "choices": ["A", "B"]}, r"items\[1\]\.answer: missing field"),
        ("not an object", r"items\[1\]: must be a JSON object"),
    ],
)
def test_malformed_mc_item_names_file_index_and_field(tmp_path: Path, item: Any, pattern: str) -> None:
    path = _write(tmp_path, "bad_mc.json", {"schema_version": 1, "items": [_good_item(), item]})
    with pytest.raises(ValueError, match=pattern) as excinfo:
        load_mc_items(path)
    assert "bad_mc.json" in str(excinfo.value)


@pytest.mark.parametrize(
    ("passages", "pattern"),
    [
        (["Fine.", ""], r"passages\[1\]: empty passage"),
        (["Fine.", "   \n"], r"passages\[1\]: empty passage"),
        (["Fine.", 3], r"passages\[1\]: must be a string"),
    ],
)
def test_malformed_passage_names_file_and_index(tmp_path: Path, passages: list[Any], pattern: str) -> None:
    path = _write(tmp_path, "bad_text.json", {"schema_version": 1, "passages": passages})
    with pytest.raises(ValueError, match=pattern) as excinfo:
        load_neutral_text(path)
    assert "bad_text.json" in str(excinfo.value)


@pytest.mark.parametrize(
    ("doc", "pattern"),
    [
        ({"schema_version": 1}, r"passages: missing field"),
        ({"passages": ["x"]}, r"schema_version: missing field"),
        ({"schema_version": 2, "passages": ["x"]}, r"schema_version: unsupported value 2"),
        ({"schema_version": 1, "passages": "x"}, r"passages: must be a list"),
        ({"schema_version": 1, "passages": []}, r"passages: must not be empty"),
        (["x"], r"top level must be a JSON object"),
    ],
)
def test_malformed_text_header(tmp_path: Path, doc: Any, pattern: str) -> None:
    path = _write(tmp_path, "bad_header.json", doc)
    with pytest.raises(ValueError, match=pattern) as excinfo:
        load_neutral_text(path)
    assert "bad_header.json" in str(excinfo.value)


def test_mc_missing_items_field(tmp_path: Path) -> None:
    path = _write(tmp_path, "no_items.json", {"schema_version": 1, "passages": ["x"]})
    with pytest.raises(ValueError, match=r"no_items\.json: items: missing field"):
        load_mc_items(path)


def test_invalid_json_names_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.json: invalid JSON"):
        load_mc_items(path)
