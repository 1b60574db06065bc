"""The result of :func:`~biasgym_lens.heads.removal.compare_removals`: the curve, the checks, each kind's choice
and the test-split measures, with a one-row-per-kind table, saved as a checksummed ``removals`` artifact."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from biasgym_lens.core.artifacts import open_artifact, reading, save_artifact
from biasgym_lens.core.checks import check_choice
from biasgym_lens.core.files import read_csv, require
from biasgym_lens.core.provenance import Provenance

__all__ = ["RemovalComparison"]

_FORMAT = 1
_TABLES = ("curve", "checks", "choices", "summary", "comparisons")


@dataclass(frozen=True, eq=False)
class RemovalComparison:
    """The kinds of head change compared on one study's protocol (:func:`~biasgym_lens.heads.removal.compare_removals`).

    Attributes:
        bias: The bias name.
        token: The injected token.
        curve: ``kind, param, order, k, heads, excess, token_logit_diff, neutral_loss, loss_increase,
            perplexity_increase, excess_cut``: the tune probes and the curve's passages.
        checks: ``kind, param, k, curve_cost, tune_cost, tune_cost_high``: the settings tried on the tune
            passages, in order, until one held the budget.
        choices: ``kind, param, k, heads, random_heads``: each kind's choice (``k == 0``: nothing held).
        summary: One row per measured intervention (``none``, ``steering``, each kind and ``{kind}_random``):
            the token's excess and its cut, the real groups' gap and its cut (test probes), the cost on the test
            passages and items, each with ``_ci_low`` / ``_ci_high``.
        comparisons: Paired sign-flip tests on the test probes of each kind against its random heads and
            against steering (:func:`~biasgym_lens.evaluation.intervals.paired_comparisons`).
        settings: ``kinds, scales, head_alphas, budget, budget_on, budget_check, ks, seed``.
        provenance: The model.
    """

    bias: str
    token: str
    curve: pd.DataFrame
    checks: pd.DataFrame
    choices: pd.DataFrame
    summary: pd.DataFrame
    comparisons: pd.DataFrame
    settings: dict[str, Any]
    provenance: Provenance

    def table(self) -> pd.DataFrame:
        """One row per kind: its choice, the test-split cut and cost with intervals, its random heads' and the
        steering baseline's cut, and whether it beats each (one-sided paired test, p < 0.05, on the token's
        excess)."""
        s = self.summary.set_index("intervention")
        comp = self.comparisons[self.comparisons.measure == "token_excess"].set_index(["a", "b"])
        cost = f"{self.settings['budget_on']}_increase"
        rows = []
        for ch in self.choices.itertuples(index=False):
            row: dict[str, Any] = {"bias": self.bias, "kind": ch.kind, "param": ch.param, "k": ch.k, "heads": ch.heads}
            measured = ch.kind in s.index
            for col in ("excess_cut", "excess_cut_ci_low", "excess_cut_ci_high", cost, f"{cost}_ci_low", f"{cost}_ci_high",
                        "real_gap_cut", "real_gap_cut_ci_low", "real_gap_cut_ci_high"):
                row[col] = s.loc[ch.kind, col] if measured and col in s.columns else math.nan
            for other, name in ((f"{ch.kind}_random", "random"), ("steering", "steering")):
                row[f"{name}_cut"] = s.loc[other, "excess_cut"] if other in s.index else math.nan
                p = comp.loc[(ch.kind, other), "p_value"] if (ch.kind, other) in comp.index else math.nan
                row[f"p_vs_{name}"] = p
                row[f"beats_{name}"] = bool(p < 0.05)
            row["within_budget"] = bool(measured and row[cost] <= self.settings["budget"])
            row["budget_on"] = self.settings["budget_on"]
            rows.append(row)
        return pd.DataFrame(rows)

    def to_dataframe(self, view: str = "table") -> pd.DataFrame:
        """``"table"`` (one row per kind) or one of ``"curve"``, ``"checks"``, ``"choices"``, ``"summary"``,
        ``"comparisons"``."""
        check_choice(view, "view", ("table", *_TABLES))
        return self.table() if view == "table" else getattr(self, view).copy()

    def save(self, path: str | Path) -> Path:
        """Write the comparison into folder ``path`` (CSV and JSON, atomically; only new paths, empty folders and
        earlier comparisons are replaced)."""
        meta = {"format": _FORMAT, "bias": self.bias, "token": self.token, "settings": self.settings,
                "provenance": self.provenance.to_dict()}

        def write(folder: Path) -> dict[str, Any]:
            for name in _TABLES:
                getattr(self, name).to_csv(folder / f"{name}.csv", index=False)
            self.table().to_csv(folder / "table.csv", index=False)
            return meta

        return save_artifact(path, "removals", "removals.json", write)

    @classmethod
    def load(cls, path: str | Path) -> RemovalComparison:
        """Read a comparison saved with :meth:`save` (checksums checked).

        Raises:
            ArtifactError: missing, damaged or malformed files.
        """
        folder, meta = open_artifact(path, "removals", "removals.json", version=_FORMAT)
        with reading(folder / "removals.json", "removal comparison"):
            require(meta, ("bias", "token", "settings", "provenance"), folder / "removals.json")
            tables = {name: read_csv(folder / f"{name}.csv", name) for name in _TABLES}
            return cls(str(meta["bias"]), str(meta["token"]), **tables, settings=dict(meta["settings"]),
                       provenance=Provenance.from_dict(meta["provenance"]))
