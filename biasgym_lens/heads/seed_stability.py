"""BiasScope over several injection seeds: does the same circuit come back?

:func:`scope_seeds` injects one bias once per seed (see :func:`~biasgym_lens.injection.seeds.inject_seeds`) and
scopes each injection with the same settings (the random baselines seeded alike). :class:`SeedStability`
holds every seed's result, the top-``k`` overlap between seeds, and the heads in the top ``k`` of most seeds
(:func:`~biasgym_lens.heads.stability.stable_heads`), as the paper keeps the heads that stay in the top k
over five runs. Each seed's numbers are its own test-split measures, with their intervals.

:func:`measure_heads` measures any head set the way :func:`~biasgym_lens.heads.biasscope.scope` measures its
chosen heads (same ablation kind, test probes, test passages and items, paired intervals), and
:meth:`SeedStability.stable_measures` does so for the stable heads on every seed's test split. The stable set is
chosen from the seeds' rankings and chosen counts alone, which no test probe or passage shaped (the ranking uses
the select probes and the curve's passages, the count the tune probes and passages), so measuring it on each
seed's test split is as honest as the measure of that seed's own chosen heads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd

from biasgym_lens.core.protocols import Model
from biasgym_lens.heads.biasscope import scope
from biasgym_lens.heads.interventions import Head, head_means, validate_heads
from biasgym_lens.heads.scope_config import ScopeConfig
from biasgym_lens.heads.scope_records import Intervention
from biasgym_lens.heads.scope_result import SUMMARY_COSTS, ScopeResult
from biasgym_lens.heads.stability import membership, stable_heads, topk_overlap
from biasgym_lens.heads.steps import TestSet, curve_capability, heads_intervention, measure_all
from biasgym_lens.heads.transfer import measure_groups
from biasgym_lens.injection.seeds import inject_seeds
from biasgym_lens.injection.spec import BiasSpec

__all__ = ["SeedStability", "scope_seeds", "measure_heads"]

PER_SEED_MEASURES = ("excess_cut", "real_gap_cut", "perplexity_increase")


@dataclass(frozen=True)
class SeedStability:
    """What :func:`scope_seeds` found.

    Attributes:
        bias: The bias.
        results: Seed -> its :class:`~biasgym_lens.heads.scope_result.ScopeResult`.
        k: The top-``k`` compared across seeds (default: the most heads any seed chose).
        stable: Heads in the top ``k`` of more than ``min_share`` of the seeds, most frequent first.
        min_share: The share of seeds a stable head must exceed.
    """

    bias: str
    results: dict[int, ScopeResult]
    k: int
    stable: list[Head]
    min_share: float = 0.5

    @classmethod
    def from_results(
        cls, bias: str, results: Mapping[int, ScopeResult], *, k: int | None = None, min_share: float = 0.5
    ) -> SeedStability:
        """Compare the scope results of several seeds.

        Args:
            bias: The bias.
            results: Seed -> its result.
            k: Top-``k`` compared across seeds (default: the most heads any seed chose, at least 1).
            min_share: A stable head is in the top ``k`` of more than this share of the seeds.

        Raises:
            ValueError: no results, or ``min_share`` outside ``[0, 1)``.
        """
        if not results:
            raise ValueError("SeedStability needs the scope result of at least one seed")
        k = k if k is not None else max(1, *(len(r.chosen) for r in results.values()))
        rankings = {s: list(r.curve.heads) for s, r in results.items()}
        return cls(bias, dict(results), k, stable_heads(rankings, k, min_share=min_share), min_share)

    @property
    def rankings(self) -> dict[int, list[Head]]:
        """Seed -> the head ranking its faithfulness curve followed."""
        return {s: list(r.curve.heads) for s, r in self.results.items()}

    def per_seed(self) -> pd.DataFrame:
        """One row per seed: the chosen heads and the chosen heads' cut of the token's excess, cut of the real
        groups' gap and perplexity increase on that seed's test split, each with its 95% interval."""
        rows = []
        for seed, res in self.results.items():
            heads = res.summary().set_index("intervention").loc["heads"]
            cells = {f"{m}{end}": heads[f"{m}{end}"] for m in PER_SEED_MEASURES for end in ("", "_ci_low", "_ci_high")}
            chosen = " ".join(f"L{a}H{b}" for a, b in res.chosen)
            rows.append({"seed": seed, "n_chosen": len(res.chosen), "chosen": chosen, **cells})
        return pd.DataFrame(rows)

    def overlap(self) -> pd.DataFrame:
        """Top-``k`` overlap of every pair of seeds (see :func:`~biasgym_lens.heads.stability.topk_overlap`)."""
        return topk_overlap(self.rankings, self.k)

    def membership(self) -> pd.DataFrame:
        """Which heads are in which seed's top ``k``, at what rank."""
        return membership(self.rankings, self.k)

    def stable_table(self) -> pd.DataFrame:
        """The stable heads, most frequent first: ``rank, layer, head, label, n_seeds`` (seeds whose top ``k``
        holds it), ``share`` (of the seeds) and ``mean_rank`` (over those seeds)."""
        members = self.membership()
        members = members[members.in_top_k]
        rows = []
        for i, (a, b) in enumerate(self.stable, start=1):
            ranks = members[(members["layer"] == a) & (members["head"] == b)]["rank"]
            rows.append({
                "rank": i, "layer": a, "head": b, "label": f"L{a}H{b}", "n_seeds": len(ranks),
                "share": len(ranks) / len(self.results), "mean_rank": float(ranks.mean()),
            })
        return pd.DataFrame(rows, columns=["rank", "layer", "head", "label", "n_seeds", "share", "mean_rank"])

    def stable_measures(self, model: Model, injections: Mapping[int, Any]) -> pd.DataFrame:
        """The stable heads ablated on every seed's test split (see :func:`measure_heads`): one row per seed,
        ``seed, heads, n_heads`` and the :meth:`ScopeResult.summary` columns of that ablation (token excess and
        its cut, real-group gap and its cut, loss and perplexity increase, KL, MC accuracy, each with its 95%
        interval, and ``within_budget``). Empty when no head is stable.

        Args:
            model: The model the seeds were injected in.
            injections: Seed -> its injection (every seed of :attr:`results`).

        Raises:
            ValueError: a seed without its injection.
        """
        missing = [s for s in self.results if s not in injections]
        if missing:
            raise ValueError(f"stable_measures needs the injection of every seed; missing: {missing}")
        label = " ".join(f"L{a}H{b}" for a, b in self.stable)
        rows = []
        for seed, res in self.results.items():
            if not self.stable:
                break
            summary = measure_heads(model, injections[seed], res, self.stable).set_index("intervention")
            rows.append({"seed": seed, "heads": label, "n_heads": len(self.stable), **summary.loc["stable_heads"]})
        columns = ["seed", "heads", "n_heads", *_summary_columns()]
        return pd.DataFrame(rows, columns=columns)

    def to_dataframe(self, view: str = "per_seed") -> pd.DataFrame:
        """``"per_seed"``, ``"overlap"``, ``"membership"`` or ``"stable"``."""
        views = {"per_seed": self.per_seed, "overlap": self.overlap, "membership": self.membership, "stable": self.stable_table}
        if view not in views:
            raise ValueError(f"view must be one of {sorted(views)}, got {view!r}")
        return views[view]()


def scope_seeds(
    model: Model,
    bias: str | BiasSpec,
    seeds: Sequence[int] = (0, 1, 2),
    *,
    scope_config: ScopeConfig | None = None,
    k: int | None = None,
    min_share: float = 0.5,
    progress: bool = False,
    **inject_settings: Any,
) -> SeedStability:
    """Inject ``bias`` once per seed, scope every injection, and compare the heads found.

    Args:
        seeds: Distinct injection seeds (each scope's random baselines use the same seed).
        scope_config: Settings of every scope (default :class:`ScopeConfig`); its seed is replaced per run.
        k: Top-``k`` compared across seeds (default: the most heads any seed chose, at least 1).
        min_share: A stable head is in the top ``k`` of more than this share of the seeds.
        inject_settings: Settings of every injection (see :class:`~biasgym_lens.injection.config.InjectionConfig`).

    Raises:
        ValueError: for no seeds or a repeated seed (see :func:`~biasgym_lens.injection.seeds.inject_seeds`).
    """
    config = scope_config if scope_config is not None else ScopeConfig()
    injections = inject_seeds(model, bias, seeds, progress=progress, **inject_settings)
    results = {s: scope(model, inj, replace(config, seed=s), progress=progress) for s, inj in zip(seeds, injections)}
    return SeedStability.from_results(injections[0].bias, results, k=k, min_share=min_share)


def measure_heads(
    model: Model, injection: Any, result: ScopeResult, heads: Sequence[Head], *, label: str = "stable_heads"
) -> pd.DataFrame:
    """Ablate ``heads`` and measure the bias and the capability on the test split of ``result``'s scope, the
    way :func:`~biasgym_lens.heads.biasscope.scope` measures its chosen heads: the same ablation kind
    (``result.config.kind``; for ``"mean"``, each head's mean over the curve's passages), the same test probes,
    test passages and multiple-choice items, and the unmodified model measured beside it for the paired intervals.

    Choose ``heads`` without the test split (as the stable heads over seeds are chosen), or the measure is no
    longer a held-out one.

    Args:
        model: The model ``injection`` was trained in.
        injection: The injection ``result`` scoped.
        result: That scope's result (its settings fix the test split).
        heads: The heads to ablate (at least one).
        label: The ablation's ``intervention`` name.

    Returns:
        :meth:`ScopeResult.summary` rows ``"none"`` and ``label``: token excess and its cut, real-group gap and
        its cut, loss and perplexity increase, KL, MC accuracy, each with its 95% interval, ``within_budget``.

    Raises:
        ValueError: no heads, a head outside the model, an injection from another model or of another bias
            or token than ``result``.
    """
    heads = validate_heads(model, heads)
    if not heads:
        raise ValueError("measure_heads needs at least one head to ablate, got none")
    injection.check_model(model)
    if (injection.bias, injection.token) != (result.bias, result.token):
        raise ValueError(
            f"the injection ({injection.bias}, {injection.token}) is not the one the result scoped "
            f"({result.bias}, {result.token})"
        )
    config = result.config
    reference = head_means(model, curve_capability(model, config).neutral[0]) if config.kind == "mean" else None
    ablation = heads_intervention(model, label, heads, config, reference)
    test = TestSet.prepare(model, config, {ablation.first_layer})
    groups, capability, values = measure_all(
        model, injection, [Intervention("none"), ablation], test, measure_groups, config
    )
    return replace(result, groups=groups, capability=capability, probe_values=values).summary()


def _summary_columns() -> list[str]:
    names = ["token_excess", "excess_cut", "real_group_gap", "real_gap_cut", *SUMMARY_COSTS]
    return [f"{n}{end}" for n in names for end in ("", "_ci_low", "_ci_high")] + ["within_budget"]
