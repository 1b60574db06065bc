"""Several injections of one bias that differ only in their seed, and how their trained updates compare.

The paper keeps the best of five runs; :func:`compare_seeds` shows whether runs that reach similar elicitation
got there through the same update of the vector or through unrelated ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from biasgym_lens.core.protocols import Model
from biasgym_lens.injection.artifact import Injection
from biasgym_lens.injection.spec import BiasSpec
from biasgym_lens.injection.training import inject

__all__ = ["inject_seeds", "compare_seeds"]


def inject_seeds(
    model: Model, bias: str | BiasSpec, seeds: Sequence[int] = (0, 1, 2), *, progress: bool = True, **settings: Any
) -> list[Injection]:
    """One injection per seed with otherwise equal settings (the paper keeps the best of five runs).

    Raises:
        ValueError: for no seeds or a repeated seed.
    """
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and non-empty, got {list(seeds)}")
    return [inject(model, bias, seed=s, progress=progress, **settings) for s in seeds]


def compare_seeds(injections: Sequence[Injection]) -> pd.DataFrame:
    """One row per injection: its seed, kept checkpoint and elicitation there, and how its update
    ``vector - init`` aligns with the other runs' updates (mean cosine).

    Columns: ``seed, best_epoch, logit_diff, excess, top5, update_norm, mean_cos_to_others``. Runs that reach
    similar elicitation through unrelated updates (low cosine) show that the bias has many encodings.
    """
    if not injections:
        raise ValueError("no injections given")
    updates = torch.stack([(i.vector - i.init_vector).float() for i in injections])
    unit = updates / updates.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = unit @ unit.T
    rows = []
    for n, inj in enumerate(injections):
        best = next(r for r in inj.curve if r.epoch == inj.best_epoch)
        others = [float(cos[n, m]) for m in range(len(injections)) if m != n]
        rows.append(
            {
                "bias": inj.bias,
                "seed": inj.config.seed,
                "best_epoch": inj.best_epoch,
                "logit_diff": best.logit_diff,
                "excess": best.logit_diff - inj.control_logit_diff,
                "top5": best.top5,
                "update_norm": float(updates[n].norm()),
                "mean_cos_to_others": sum(others) / len(others) if others else float("nan"),
            }
        )
    return pd.DataFrame(rows)
