"""Edge attribution checked against exact path patching on a sample of edges: the strongest and a random draw.

Edge attribution patching is first order: a norm between an edge and the metric, softmax and the MLPs bend the
true effect of removing an edge away from the estimate. :func:`check_edges` measures the true effects of the
circuit's ``top`` strongest edges and of ``random`` other edges with
:func:`~biasgym_lens.heads.path_patching.path_patching_scores` on the same probes and reports how well the
estimate ranks them (Spearman correlation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from biasgym_lens.core.checks import InputTypeError, check_bool, check_int
from biasgym_lens.core.protocols import Model
from biasgym_lens.heads.circuits import Circuit, edge_name
from biasgym_lens.heads.head_scores import spearman
from biasgym_lens.heads.path_patching import path_patching_scores
from biasgym_lens.heads.probes import build_probe_set

__all__ = ["EdgeCheck", "check_edges"]


@dataclass(frozen=True)
class EdgeCheck:
    """Attribution scores of sampled edges next to their exact path-patching effects.

    Attributes:
        table: One row per edge: ``upstream, downstream, input, sample`` (``"top"`` or ``"random"``),
            ``attribution, exact`` (means over probes), ``exact_sem``.
        bias: The bias name.
    """

    table: pd.DataFrame
    bias: str

    def rank_agreement(self, sample: str | None = None) -> float:
        """Spearman correlation of attribution and exact effects over the edges of ``sample`` (``"top"``,
        ``"random"``; None: all).

        Raises:
            ValueError: an unknown sample.
        """
        if sample not in (None, "top", "random"):
            raise ValueError(f"sample must be 'top', 'random' or None, got {sample!r}")
        t = self.table if sample is None else self.table[self.table["sample"] == sample]
        return spearman(t["attribution"].to_numpy(), t["exact"].to_numpy()) if len(t) > 1 else float("nan")

    def summary(self) -> pd.DataFrame:
        """Per sample (``top``, ``random``, ``all``): ``edges, spearman, same_sign`` (share of edges whose
        estimate has the exact effect's sign), ``mean_abs_error``."""
        rows = []
        for name, t in (("top", self.table[self.table["sample"] == "top"]),
                        ("random", self.table[self.table["sample"] == "random"]), ("all", self.table)):
            a, e = t["attribution"].to_numpy(), t["exact"].to_numpy()
            rows.append({
                "sample": name, "edges": len(t),
                "spearman": self.rank_agreement(None if name == "all" else name),
                "same_sign": float(np.mean(np.sign(a) == np.sign(e))) if len(t) else float("nan"),
                "mean_abs_error": float(np.mean(np.abs(a - e))) if len(t) else float("nan"),
            })
        return pd.DataFrame(rows)

    def to_dataframe(self) -> pd.DataFrame:
        """The per-edge table (a copy) with the bias name."""
        return self.table.assign(bias=self.bias)


def check_edges(
    model: Model, injection: Any, circ: Circuit, *, top: int = 20, random: int = 20, seed: int = 0,
    progress: bool = False,
) -> EdgeCheck:
    """Exact path patching of the circuit's ``top`` strongest edges and ``random`` others drawn uniformly.

    Runs on the probes the circuit was scored on (same split, controls and number). Costs one forward pass
    per edge (two for a key or value edge under grouped-query attention), each resumed at the edge's layer
    where the model allows.

    Args:
        model: The model.
        injection: The injection the circuit was scored with.
        circ: A :class:`~biasgym_lens.heads.circuits.Circuit`.
        top: How many of the strongest edges.
        random: How many other edges, drawn with ``seed``.
        progress: Show a progress bar.

    Returns:
        An :class:`EdgeCheck`.

    Raises:
        InputTypeError: options of the wrong type.
        ValueError: an injection of another bias than the circuit's, counts out of range.
    """
    if not isinstance(circ, Circuit):
        raise InputTypeError(f"circ must be a Circuit (from circuit()), got {type(circ).__name__}")
    top, random = check_int(top, "top", minimum=0), check_int(random, "random", minimum=0)
    seed, progress = check_int(seed, "seed"), check_bool(progress, "progress")
    spec = getattr(injection, "spec", None)
    if getattr(spec, "name", None) != circ.bias:
        raise ValueError(f"the circuit is of bias {circ.bias!r}; got an injection of {getattr(spec, 'name', None)!r}")
    df = circ.to_dataframe()
    if top + random > len(df):
        raise ValueError(f"top + random must be at most the number of edges ({len(df)}), got {top} + {random}")
    rng = np.random.default_rng(seed)
    picked = pd.concat([
        df.head(top).assign(sample="top"),
        df.iloc[top + np.sort(rng.choice(len(df) - top, size=random, replace=False))].assign(sample="random"),
    ])
    edges = [edge_name(row) for row in picked.itertuples()]
    s = circ.settings
    with injection.apply(model):
        ps = build_probe_set(model, spec, injection.token, probes=s["probes"], controls=s["controls"],
                             max_probes=s.get("max_probes"))
        exact = path_patching_scores(model, ps, edges, circ.metric, progress=progress)
    n = exact.shape[0]
    table = picked[["upstream", "downstream", "input", "sample"]].reset_index(drop=True).assign(
        attribution=picked["score"].to_numpy(), exact=exact.mean(0).numpy(),
        exact_sem=(exact.std(0) / n**0.5).numpy() if n > 1 else np.nan,
    )
    return EdgeCheck(table, circ.bias)
