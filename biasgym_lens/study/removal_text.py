"""Words and numbers of the report's section on interventions that remove only the bias.

A pure function of :meth:`~biasgym_lens.heads.removal.RemovalComparison.table` (``removals/table.csv`` of a
study folder, written by ``biasgym removals --out STUDY``): one row per kind of head change with its choice, its
cut of the token's excess on the test probes and its cost on the test passages, each with its 95% interval, and
whether it beats as many random heads changed the same way and the steering baseline.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from biasgym_lens.study.report_text import MISSING, interval, percent

__all__ = ["KIND_WORDS", "read_removals", "removal_table", "removal_notes"]

KIND_WORDS = {
    "zero": "Zero the heads",
    "mean": "Mean-ablate the heads",
    "scale": "Scale the heads by {param:g}",
    "project": "Project the bias direction out of the heads",
    "head_steer": "Subtract {param:g} x each head's bias direction",
}
"""Kind -> the words the report uses (``{param}``: the factor or multiplier chosen)."""


def _kind(row: Any) -> str:
    words = KIND_WORDS.get(row.kind, row.kind)
    param = row.param if isinstance(row.param, (int, float)) and not math.isnan(row.param) else None
    return words.format(param=param) if param is not None else words


def _with_ci(v: Any, low: Any, high: Any, digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return MISSING
    return f"{percent(v, digits=digits)} [{interval(low, high, digits=digits)}]"


def _yes(flag: Any, k: int) -> str:
    return MISSING if not k else ("yes" if str(flag) == "True" else "no")


def removal_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per kind: ``Intervention, Heads, Cut [95% CI], Cost [95% CI], Random heads, Steering, Beats
    random, Beats steering`` as strings (``–`` where no setting held the budget); the cost is the increase the
    budget limits (the table's ``budget_on``)."""
    budget_on = str(table["budget_on"].iloc[0]) if len(table) else "perplexity"
    cost = f"{budget_on}_increase"
    rows = []
    for r in table.itertuples(index=False):
        k = int(r.k)
        rows.append({
            "Intervention": _kind(r),
            "Heads": r.heads if k and isinstance(r.heads, str) else "none within the budget",
            "Cut of the token's excess": _with_ci(r.excess_cut, r.excess_cut_ci_low, r.excess_cut_ci_high) if k else MISSING,
            f"{budget_on.capitalize()} increase": (
                _with_ci(getattr(r, cost), getattr(r, f"{cost}_ci_low"), getattr(r, f"{cost}_ci_high"), 1) if k else MISSING
            ),
            "Random heads, same change": percent(r.random_cut) if k else MISSING,
            "Steering": percent(r.steering_cut),
            "Beats random": _yes(r.beats_random, k),
            "Beats steering": _yes(r.beats_steering, k),
        })
    return pd.DataFrame(rows)


def removal_notes(table: pd.DataFrame) -> list[str]:
    """What a row holds, and which kind cut the most within the budget."""
    notes = [
        "Each kind is chosen on the study's tune probes and passages (its setting and number of heads, least "
        "excess within the budget, the upper end of the cost's interval checked); every number here is on the "
        "test probes and passages. Beats: one-sided paired sign-flip test on the test probes, p < 0.05."
    ]
    held = table[table.k > 0]
    if held.empty:
        notes.append("No kind of change held the budget.")
        return notes
    best = held.loc[held.excess_cut.idxmax()]
    notes.append(f"Largest cut within the budget: {_kind(best)} ({best.heads}), {percent(best.excess_cut)}.")
    return notes


def read_removals(out: Path) -> pd.DataFrame | None:
    """The table of ``out/removals`` (checksums checked), or None when the study has none."""
    from biasgym_lens.heads.removal import RemovalComparison

    if not (out / "removals" / "removals.json").is_file():
        return None
    return RemovalComparison.load(out / "removals").table()
