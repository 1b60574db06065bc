"""The result of :func:`~biasgym_lens.heads.biasscope.scope`: :class:`ScopeResult`, its tidy views and its
artifact folder (JSON, CSV and safetensors, checksummed; see :mod:`biasgym_lens.core.artifacts`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from biasgym_lens.core.artifacts import load_tensors, open_artifact, reading, save_artifact
from biasgym_lens.core.files import none_to_nan, read_csv, require
from biasgym_lens.core.provenance import Provenance
from biasgym_lens.evaluation.intervals import COMPARISON_COLUMNS, bias_intervals, paired_comparisons
from biasgym_lens.heads.head_scores import HeadScores
from biasgym_lens.heads.interventions import Head
from biasgym_lens.heads.scope_config import ScopeConfig
from biasgym_lens.heads.scope_records import ScopeDecisions
from biasgym_lens.heads.selection import FaithfulnessCurve

__all__ = ["ScopeResult"]

_FORMAT = 2


@dataclass(frozen=True, eq=False)
class ScopeResult:
    """Everything :func:`scope` measured for one injection.

    Attributes:
        bias: The bias name.
        token: The injected token.
        scores: Method name -> :class:`HeadScores` (including ``"specific"``: attribution effect minus estimated
            damage; its leading heads, re-ranked by measured damage, are ``curve.heads``, the ranking used).
        damage: ``[n_layers, n_heads]`` estimated neutral-loss increase per head.
        curve: The faithfulness curve.
        chosen: The heads chosen under the budget.
        groups: Bias per group (token, real, control) under each intervention (long table).
        capability: Capability under each intervention.
        config: The settings.
        provenance: The model.
        decisions: What was chosen, and the checks each choice rests on.
        probe_values: Every group's logit difference on every test probe under each intervention (the units of
            the bias intervals; None for results saved before they were kept).
    """

    bias: str
    token: str
    scores: dict[str, HeadScores]
    damage: torch.Tensor
    curve: FaithfulnessCurve
    chosen: list[Head]
    groups: pd.DataFrame
    capability: pd.DataFrame
    config: ScopeConfig
    provenance: Provenance
    decisions: ScopeDecisions | None = None
    probe_values: pd.DataFrame | None = None

    @property
    def extra(self) -> dict[str, Any]:
        """The decisions as a plain dict (the name earlier versions used); prefer :attr:`decisions`."""
        return self.decisions.to_dict() if self.decisions is not None else {}

    def agreement(self, reference: str = "ablation") -> pd.DataFrame:
        """Spearman correlation and top-10 overlap of every method with ``reference``."""
        if reference not in self.scores:
            return pd.DataFrame(columns=["method", "reference", "spearman", "top10_overlap"])
        ref = self.scores[reference]
        rows = [
            {"method": m, "reference": reference, "spearman": s.agreement(ref), "top10_overlap": s.top_overlap(ref)}
            for m, s in self.scores.items()
            if m != reference
        ]
        return pd.DataFrame(rows)

    def summary(self) -> pd.DataFrame:
        """One row per intervention: token excess and its cut, real-group gap and its cut (test probes), cost on
        the test passages and items (relative increase of the neutral-text loss and of its perplexity, KL, MC
        accuracy) and whether that cost is within the budget. Every number has its 95% bootstrap interval in
        ``{name}_ci_low`` / ``{name}_ci_high``: over the probes (paired with the unmodified model for the
        cuts) and over the passages and items (paired for the increases); NaN for results saved without them."""
        g = self.groups
        base = g[(g.intervention == "none") & (g.kind == "token")]["excess"].item()
        base_real = g[(g.intervention == "none") & (g.kind == "real")]["excess"].mean()
        rows = []
        for name, sub in g.groupby("intervention", sort=False):
            tok = sub[sub.kind == "token"]["excess"].item()
            real = sub[sub.kind == "real"]["excess"].mean()
            cap = self.capability[self.capability.intervention == name]
            rows.append(
                {
                    "intervention": name,
                    "token_excess": tok,
                    "excess_cut": 1 - tok / base if base else float("nan"),
                    "real_group_gap": real,
                    "real_gap_cut": 1 - real / base_real if base_real else float("nan"),
                    **{m: cap[m].item() if len(cap) else float("nan") for m in SUMMARY_COSTS},
                }
            )
        out = _with_intervals(pd.DataFrame(rows), self._intervals())
        out["within_budget"] = out[f"{self.config.budget_on}_increase"] <= self.config.budget
        return out

    def _intervals(self) -> pd.DataFrame:
        """``intervention`` and every ``*_ci_low`` / ``*_ci_high`` column the saved measurements allow."""
        cap = self.capability.filter(regex=r"^intervention$|_ci_(low|high)$")
        if self.probe_values is None or self.probe_values.empty:
            return cap
        bias = bias_intervals(self.probe_values, seed=self.config.seed).filter(regex=r"^intervention$|_ci_(low|high)$")
        return bias.merge(cap, on="intervention", how="outer")

    def comparisons(self) -> pd.DataFrame:
        """Paired tests on the test probes of the chosen heads against random heads, steering and no
        intervention (see :func:`~biasgym_lens.evaluation.intervals.paired_comparisons`); empty for results
        saved without per-probe values."""
        if self.probe_values is None:
            return pd.DataFrame(columns=list(COMPARISON_COLUMNS))
        return paired_comparisons(self.probe_values, seed=self.config.seed)

    def to_dataframe(self, view: str = "summary") -> pd.DataFrame:
        """A tidy view: ``"summary"``, ``"groups"``, ``"capability"``, ``"curve"``, ``"scores"``, ``"agreement"``,
        ``"comparisons"``, ``"probe_values"``."""
        views: dict[str, Callable[[], pd.DataFrame]] = {
            "summary": self.summary,
            "groups": lambda: self.groups.copy(),
            "capability": lambda: self.capability.copy(),
            "curve": self.curve.to_dataframe,
            "scores": lambda: pd.concat([s.to_dataframe() for s in self.scores.values()], ignore_index=True),
            "agreement": self.agreement,
            "comparisons": self.comparisons,
            "probe_values": lambda: self.probe_values.copy() if self.probe_values is not None else pd.DataFrame(),
        }
        if view not in views:
            raise ValueError(f"view must be one of {sorted(views)}, got {view!r}")
        return views[view]()

    def save(self, path: str | Path) -> Path:
        """Write the result into folder ``path`` (JSON, CSV and safetensors), atomically (see
        :mod:`biasgym_lens.core.artifacts`: only new paths, empty folders and earlier scope results are replaced)."""
        from safetensors.torch import save_file

        meta = {
            "format": _FORMAT,
            "bias": self.bias,
            "token": self.token,
            "chosen": [list(h) for h in self.chosen],
            "config": asdict(self.config),
            "provenance": self.provenance.to_dict(),
            "curve": {
                "baseline_excess": self.curve.baseline_excess,
                "baseline_loss": self.curve.baseline_loss,
                "heads": [list(h) for h in self.curve.heads],
                "budget": self.curve.budget,
                "budget_on": self.curve.budget_on,
                "settings": self.curve.settings,
            },
            "decisions": self.decisions.to_dict() if self.decisions is not None else None,
        }

        def write(folder: Path) -> dict[str, Any]:
            self.groups.to_csv(folder / "groups.csv", index=False)
            self.capability.to_csv(folder / "capability.csv", index=False)
            self.curve.table.to_csv(folder / "curve.csv", index=False)
            if self.probe_values is not None:
                self.probe_values.to_csv(folder / "probe_values.csv", index=False)
            save_file({"damage": self.damage.detach().cpu().contiguous()}, str(folder / "damage.safetensors"))
            for name, s in self.scores.items():
                s.save(folder / "scores" / name)
            return meta

        return save_artifact(path, "scope", "scope.json", write, legacy=_SCOPE_FILES)

    @classmethod
    def load(cls, path: str | Path) -> ScopeResult:
        """Read a result saved with :meth:`save` (every file's checksum is checked).

        Raises:
            ArtifactError: missing, damaged or malformed files (naming the file).
        """
        folder, meta = open_artifact(path, "scope", "scope.json", version=_FORMAT)
        where = folder / "scope.json"
        with reading(where, "scope metadata"):
            require(meta, ("bias", "token", "chosen", "config", "provenance", "curve"), where)
            c = require(meta["curve"], ("baseline_excess", "baseline_loss", "heads", "budget", "settings", "budget_on"), where)
            cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
            curve = FaithfulnessCurve(
                read_csv(folder / "curve.csv", "faithfulness curve"), none_to_nan(c["baseline_excess"]), none_to_nan(c["baseline_loss"]),
                tuple(_head(h) for h in c["heads"]), c["budget"], c["settings"], c["budget_on"],
            )
            prov = Provenance.from_dict(meta["provenance"])
            scores_dir = folder / "scores"
            scores = {p.name: HeadScores.load(p) for p in sorted(scores_dir.iterdir()) if p.is_dir()} if scores_dir.is_dir() else {}
            damage = load_tensors(folder / "damage.safetensors", {"damage": (prov.n_layers, prov.n_heads)})["damage"]
            return cls(
                bias=str(meta["bias"]), token=str(meta["token"]), scores=scores, damage=damage, curve=curve,
                chosen=[_head(h) for h in meta["chosen"]],
                groups=read_csv(folder / "groups.csv", "group table", ("intervention", "kind", "excess")),
                capability=read_csv(folder / "capability.csv", "capability table", ("intervention",)),
                config=ScopeConfig(**cfg), provenance=prov, decisions=_decisions(meta),
                probe_values=_optional_csv(folder / "probe_values.csv", "per-probe values"),
            )


def _decisions(meta: dict[str, Any]) -> ScopeDecisions | None:
    held = meta.get("decisions", meta.get("extra"))  # "extra": results saved before decisions were typed
    return ScopeDecisions.from_dict(held) if held else None


_SCOPE_FILES = ("groups.csv", "capability.csv", "curve.csv", "damage.safetensors", "scores", "probe_values.csv")

SUMMARY_COSTS = ("loss_increase", "perplexity_increase", "kl", "mc_accuracy")
"""The capability columns of :meth:`ScopeResult.summary`."""


def _optional_csv(path: Path, what: str) -> pd.DataFrame | None:
    return read_csv(path, what) if path.is_file() else None


def _with_intervals(table: pd.DataFrame, intervals: pd.DataFrame) -> pd.DataFrame:
    """``table`` with each value column followed by its ``_ci_low`` / ``_ci_high`` (NaN where not measured)."""
    merged = table.merge(intervals, on="intervention", how="left")
    order = ["intervention"]
    for col in table.columns[1:]:
        order += [col, f"{col}_ci_low", f"{col}_ci_high"]
        for side in ("low", "high"):
            if f"{col}_ci_{side}" not in merged:
                merged[f"{col}_ci_{side}"] = float("nan")
    return merged[order]


def _head(h: Any) -> Head:
    if not (isinstance(h, list) and len(h) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in h)):
        raise ValueError(f"a head must be a [layer, head] pair of integers, got {h!r}")
    return (h[0], h[1])
