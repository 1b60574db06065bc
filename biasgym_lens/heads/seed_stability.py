"""BiasScope over several injection seeds: does the same circuit come back?

:func:`scope_seeds` injects one bias once per seed (see :func:`~biasgym_lens.injection.seeds.inject_seeds`) and
scopes each injection with the same settings (the random baselines seeded alike). :class:`SeedStability`
holds every seed's result, the top-``k`` overlap between seeds, and the heads in the top ``k`` of most seeds
(:func:`~biasgym_lens.heads.stability.stable_heads`), as the paper keeps the heads that stay in the top k
over five runs. Each seed's numbers are its own test-split measures, with their intervals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd

from biasgym_lens.core.protocols import Model
from biasgym_lens.heads.biasscope import scope
from biasgym_lens.heads.interventions import Head
from biasgym_lens.heads.scope_config import ScopeConfig
from biasgym_lens.heads.scope_result import ScopeResult
from biasgym_lens.heads.stability import membership, stable_heads, topk_overlap
from biasgym_lens.injection.seeds import inject_seeds
from biasgym_lens.injection.spec import BiasSpec

__all__ = ["SeedStability", "scope_seeds"]

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

    def to_dataframe(self, view: str = "per_seed") -> pd.DataFrame:
        """``"per_seed"``, ``"overlap"`` or ``"membership"``."""
        views = {"per_seed": self.per_seed, "overlap": self.overlap, "membership": self.membership}
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
    k = k if k is not None else max(1, *(len(r.chosen) for r in results.values()))
    rankings = {s: list(r.curve.heads) for s, r in results.items()}
    return SeedStability(injections[0].bias, results, k, stable_heads(rankings, k, min_share=min_share), min_share)
