"""The standard bias benchmarks that ship with the package (StereoSet race, BBQ Nationality and Religion) as
item tables, checked against their SHA-256 manifest on every load, and seeded stratified subsets of them.

The files live in ``biasgym_lens/data/benchmarks`` with their licences and a NOTICE (``README.md``); they are
byte-identical to the published data.

Examples:
    >>> from biasgym_lens.evaluation.benchmark_data import load_items
    >>> items = load_items("bbq_religion", max_items=40, seed=0)
    >>> len(items), sorted(items["context_condition"].unique())
    (40, ['ambig', 'disambig'])
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["BENCHMARKS", "check_name", "benchmark_files", "read_benchmark_file", "load_stereoset", "load_bbq", "load_items",
           "stratified_subset"]

BENCHMARKS: dict[str, str] = {
    "stereoset_race": "stereoset/race_intrasentence_dev.json",
    "bbq_nationality": "bbq/Nationality.jsonl",
    "bbq_religion": "bbq/Religion.jsonl",
}
"""Benchmark name -> its data file (relative to the benchmarks data folder)."""

_LABELS = ("stereotype", "anti-stereotype", "unrelated")


def _root(root: str | Path | None) -> Any:
    return Path(root) if root is not None else resources.files("biasgym_lens") / "data" / "benchmarks"


def check_name(name: str) -> str:
    """``name`` itself if it is a shipped benchmark.

    Raises:
        ValueError: naming the valid benchmarks.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    return name


def benchmark_files(root: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The manifest: file (relative path) -> ``{"sha256", "bytes", ...}``.

    Args:
        root: A folder laid out like the package's ``data/benchmarks`` (default: the package's own).
    """
    return json.loads((_root(root) / "manifest.json").read_text(encoding="utf-8"))["files"]


def read_benchmark_file(relpath: str, root: str | Path | None = None) -> bytes:
    """The bytes of a shipped benchmark file, after checking its size and SHA-256 against the manifest.

    Raises:
        ValueError: the file is not in the manifest, or its content differs from the published file.
    """
    files = benchmark_files(root)
    if relpath not in files:
        raise ValueError(f"{relpath!r} is not a benchmark file; valid: {', '.join(files)}")
    data = (_root(root) / relpath).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    expected = files[relpath]["sha256"]
    if digest != expected or len(data) != files[relpath]["bytes"]:
        raise ValueError(
            f"benchmark file {relpath} is not the published one: SHA-256 {digest} ({len(data)} bytes), "
            f"manifest says {expected} ({files[relpath]['bytes']} bytes); reinstall the package"
        )
    return data


def load_stereoset(root: str | Path | None = None) -> pd.DataFrame:
    """StereoSet race intrasentence items, one row each.

    Returns:
        Columns ``item_id, target, context, stereotype, anti_stereotype, unrelated`` (the three full
        sentences, ``BLANK`` filled).
    """
    raw = json.loads(read_benchmark_file(BENCHMARKS["stereoset_race"], root))
    rows = []
    for item in raw:
        by_label = {s["gold_label"]: s["sentence"] for s in item["sentences"]}
        if set(by_label) != set(_LABELS):
            raise ValueError(f"StereoSet item {item['id']}: labels {sorted(by_label)}, expected {list(_LABELS)}")
        rows.append({
            "item_id": item["id"], "target": item["target"], "context": item["context"],
            "stereotype": by_label["stereotype"], "anti_stereotype": by_label["anti-stereotype"],
            "unrelated": by_label["unrelated"],
        })
    return pd.DataFrame(rows)


def _bbq_roles(item: dict[str, Any]) -> tuple[int, int]:
    """``(target, unknown)``: the answer naming a stereotyped group, and the "unknown" answer."""
    groups = set(item["additional_metadata"]["stereotyped_groups"])
    info = [item["answer_info"][f"ans{k}"] for k in range(3)]
    unknown = [k for k in range(3) if info[k][1] == "unknown"]
    target = [k for k in range(3) if k not in unknown and (info[k][0] in groups or info[k][1] in groups)]
    if len(unknown) != 1 or len(target) != 1:
        raise ValueError(
            f"BBQ example {item['example_id']}: cannot tell the stereotyped answer (answer_info {info}, "
            f"stereotyped_groups {sorted(groups)})"
        )
    return target[0], unknown[0]


def load_bbq(category: str, root: str | Path | None = None) -> pd.DataFrame:
    """BBQ items of one category (``"nationality"`` or ``"religion"``), one row each.

    Returns:
        Columns ``example_id, question_index, context_condition ("ambig"/"disambig"), question_polarity
        ("neg"/"nonneg"), context, question, ans0, ans1, ans2, label`` (the correct answer), ``target_answer``
        (the answer naming the stereotyped group) and ``unknown_answer`` (the "can't be determined" answer).
    """
    name = check_name(f"bbq_{category}")
    rows = []
    for line in read_benchmark_file(BENCHMARKS[name], root).decode("utf-8").splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        target, unknown = _bbq_roles(item)
        rows.append({
            "example_id": int(item["example_id"]), "question_index": str(item["question_index"]),
            "context_condition": item["context_condition"], "question_polarity": item["question_polarity"],
            "context": item["context"], "question": item["question"],
            "ans0": item["ans0"], "ans1": item["ans1"], "ans2": item["ans2"], "label": int(item["label"]),
            "target_answer": target, "unknown_answer": unknown,
        })
    return pd.DataFrame(rows)


def stratified_subset(strata: Sequence[Hashable], n: int, seed: int = 0) -> np.ndarray:
    """Indices of a seeded random subset of ``n`` units with each stratum's share kept (up to rounding).

    Each stratum gets ``n * size / total`` units rounded down, and the units left over go to the strata with
    the largest remainders (ties: in order of first appearance); the units within a stratum are drawn at
    random without replacement.

    Args:
        strata: The stratum of each unit.
        n: Subset size (``n >= len(strata)``: every unit).
        seed: Seed of the draw.

    Returns:
        ``[n]`` sorted unit indices.

    Raises:
        ValueError: if ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"max_items must be >= 1, got {n}")
    total = len(strata)
    if n >= total:
        return np.arange(total)
    keys = list(dict.fromkeys(strata))
    members = {k: np.array([i for i, s in enumerate(strata) if s == k]) for k in keys}
    exact = np.array([n * len(members[k]) / total for k in keys])
    take = np.floor(exact).astype(int)
    left = n - int(take.sum())
    order = sorted(range(len(keys)), key=lambda j: (-(exact[j] - take[j]), j))
    for j in order[:left]:
        take[j] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(members[k], size=int(t), replace=False) for k, t in zip(keys, take) if t > 0]
    return np.sort(np.concatenate(chosen))


def load_items(name: str, *, max_items: int | None = None, seed: int = 0, root: str | Path | None = None) -> pd.DataFrame:
    """The item table of a benchmark, or a seeded stratified subset of it.

    StereoSet is stratified by target (country / nationality); BBQ by context condition and question
    polarity (four equal cells).

    Args:
        name: ``"stereoset_race"``, ``"bbq_nationality"`` or ``"bbq_religion"``.
        max_items: Subset size; None: all items.
        seed: Seed of the subset.
        root: Another data folder (tests).

    Raises:
        ValueError: unknown name, or ``max_items < 1``.
    """
    check_name(name)
    items = load_stereoset(root) if name == "stereoset_race" else load_bbq(name.removeprefix("bbq_"), root)
    strata = items["target"] if name == "stereoset_race" else items["context_condition"] + "/" + items["question_polarity"]
    if max_items is not None:
        items = items.iloc[stratified_subset(list(strata), max_items, seed)]
    return items.reset_index(drop=True)
