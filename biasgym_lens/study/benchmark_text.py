"""Words and numbers of the report's benchmark section: StereoSet and BBQ under each intervention of a study.

Pure functions of the tables the ``benchmarks`` stage writes (:mod:`biasgym_lens.study.benchmark_stage`):
``benchmarks.csv`` (``benchmark, metric, intervention, value, ci_low, ci_high, n, n_items``) and
``benchmark_differences.csv`` (``..., difference, ci_low, ci_high, excludes_zero, ...``). StereoSet's scores
show on their 0-100 scale, BBQ's accuracies as percentages and its bias scores on their -1 to 1 scale.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import pandas as pd

from biasgym_lens.study.report_text import INTERVENTION_NAMES, MINUS, MISSING

__all__ = ["BENCHMARK_WORDS", "METRIC_WORDS", "benchmark_table", "benchmark_notes"]

BENCHMARK_WORDS = {"stereoset_race": "StereoSet race", "bbq_nationality": "BBQ Nationality", "bbq_religion": "BBQ Religion"}
"""Benchmark name -> the words the report uses."""

METRIC_WORDS = {
    "ss": "SS (ideal 50)",
    "lms": "LMS (ideal 100)",
    "icat": "ICAT (ideal 100)",
    "accuracy_ambig": "Accuracy, ambiguous contexts",
    "accuracy_disambig": "Accuracy, disambiguated contexts",
    "s_dis": "Bias score s_DIS (ideal 0)",
    "s_amb": "Bias score s_AMB (ideal 0)",
}
"""Metric name -> the words the report uses."""

MARK = "*"
"""Follows a value whose paired difference from no intervention has a 95% interval that excludes 0."""


def _number(v: Any, metric: str, *, signed: bool = False) -> str:
    """One number of ``metric`` on its report scale (accuracy x 100)."""
    if not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        return MISSING
    v = float(v) * (100 if metric.startswith("accuracy") else 1)
    digits = 2 if metric.startswith("s_") else 1
    text = f"{v:{'+' if signed else ''}.{digits}f}"
    return text.replace("-", MINUS)


def _cell(value: Any, low: Any, high: Any, metric: str, *, signed: bool = False) -> str:
    unit = "%" if metric.startswith("accuracy") and not signed else ""
    main = _number(value, metric, signed=signed) + (unit if _number(value, metric) != MISSING else "")
    if MISSING in (_number(low, metric), _number(high, metric)):
        return main
    return f"{main} [{_number(low, metric)}, {_number(high, metric)}]"


def _order(values: pd.Series) -> list[str]:
    return list(dict.fromkeys(values))


def benchmark_table(table: pd.DataFrame, differences: pd.DataFrame) -> pd.DataFrame:
    """One row per benchmark and metric, one column per intervention: ``value [ci_low, ci_high]``, followed by
    :data:`MARK` where the paired difference from no intervention excludes 0.

    Args:
        table: ``benchmarks.csv`` as read.
        differences: ``benchmark_differences.csv`` as read.

    Returns:
        A table of strings with the names in words.
    """
    marked = {
        (r.benchmark, r.metric, r.intervention) for r in differences.itertuples() if str(r.excludes_zero) == "True"
    }
    columns = _order(table["intervention"])
    rows = []
    for (bench, metric), sub in table.groupby(["benchmark", "metric"], sort=False):
        by_iv = sub.set_index("intervention")
        row = {"Benchmark": BENCHMARK_WORDS.get(bench, bench), "Metric": METRIC_WORDS.get(metric, metric)}
        for iv in columns:
            if iv not in by_iv.index:
                row[INTERVENTION_NAMES.get(iv, iv)] = MISSING
                continue
            r = by_iv.loc[iv]
            mark = f" {MARK}" if (bench, metric, iv) in marked else ""
            row[INTERVENTION_NAMES.get(iv, iv)] = _cell(r["value"], r["ci_low"], r["ci_high"], metric) + mark
        rows.append(row)
    return pd.DataFrame(rows)


def benchmark_notes(table: pd.DataFrame, differences: pd.DataFrame) -> list[str]:
    """Sentences under the table: what a cell holds, and every paired difference whose interval excludes 0
    (or that none does)."""
    items = ", ".join(
        f"{BENCHMARK_WORDS.get(b, b)} {int(n)}" for b, n in table.groupby("benchmark", sort=False)["n_items"].first().items()
    )
    notes = [
        f"Each cell: the metric and its 95% bootstrap interval over the items ({items}; the same items under "
        "every intervention). Accuracies in percent; a difference below is in the metric's own units "
        "(percentage points for an accuracy)."
    ]
    hits = differences[differences["excludes_zero"].astype(str) == "True"]
    if hits.empty:
        notes.append(f"No paired difference from no intervention excludes 0 ({len(differences)} compared).")
        return notes
    listed = "; ".join(
        f"{INTERVENTION_NAMES.get(r.intervention, r.intervention)}, {BENCHMARK_WORDS.get(r.benchmark, r.benchmark)} "
        f"{METRIC_WORDS.get(r.metric, r.metric).split(' (')[0]}: "
        f"{_cell(r.difference, r.ci_low, r.ci_high, r.metric, signed=True)}"
        for r in hits.itertuples()
    )
    notes.append(
        f"{MARK} Paired differences from no intervention (the same items resampled under both) whose 95% "
        f"interval excludes 0, {len(hits)} of {len(differences)}: {listed}."
    )
    return notes
