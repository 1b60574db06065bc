"""Stability of the head choice over injection seeds (BiasGym keeps the heads that stay in the top k).

Pure functions over each seed's head ranking: which heads are in each seed's top ``k``, how much the top
``k`` of two seeds overlap, and the heads that are in the top ``k`` of most seeds.

Examples:
    >>> rankings = {0: [(21, 1), (25, 6), (23, 1)], 1: [(21, 1), (23, 1), (4, 2)], 2: [(21, 1), (25, 6), (9, 0)]}
    >>> stable_heads(rankings, k=3)
    [(21, 1), (25, 6), (23, 1)]
    >>> float(topk_overlap(rankings, k=3).query("seed_a == 0 and seed_b == 1")["overlap"].item())
    0.6666666666666666
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import pandas as pd

from biasgym_lens.core.checks import check_int

__all__ = ["membership", "topk_overlap", "stable_heads"]

Head = tuple[int, int]


def _top(ranking: Sequence[Head], k: int) -> list[Head]:
    return [(int(a), int(b)) for a, b in list(ranking)[:k]]


def membership(rankings: Mapping[int, Sequence[Head]], k: int) -> pd.DataFrame:
    """One row per (seed, head) of any seed's top ``k``: ``seed, layer, head, label, rank`` (1-based; NaN when
    the head is not in that seed's top ``k``) and ``in_top_k``."""
    k = check_int(k, "k", minimum=1)
    heads = sorted({h for r in rankings.values() for h in _top(r, k)})
    rows = []
    for seed, ranking in rankings.items():
        rank = {h: i + 1 for i, h in enumerate(_top(ranking, k))}
        for h in heads:
            rows.append({"seed": seed, "layer": h[0], "head": h[1], "label": f"L{h[0]}H{h[1]}",
                         "rank": rank.get(h, float("nan")), "in_top_k": h in rank})
    return pd.DataFrame(rows, columns=["seed", "layer", "head", "label", "rank", "in_top_k"])


def topk_overlap(rankings: Mapping[int, Sequence[Head]], k: int) -> pd.DataFrame:
    """Every pair of seeds: ``seed_a, seed_b, k, shared`` (heads in both top ``k``) and ``overlap``
    (``shared / k``; 1 means the same heads)."""
    k = check_int(k, "k", minimum=1)
    rows = []
    for a, b in itertools.combinations(sorted(rankings), 2):
        shared = len(set(_top(rankings[a], k)) & set(_top(rankings[b], k)))
        rows.append({"seed_a": a, "seed_b": b, "k": k, "shared": shared, "overlap": shared / k})
    return pd.DataFrame(rows, columns=["seed_a", "seed_b", "k", "shared", "overlap"])


def stable_heads(rankings: Mapping[int, Sequence[Head]], k: int, *, min_share: float = 0.5) -> list[Head]:
    """Heads in the top ``k`` of more than ``min_share`` of the seeds, most frequent first (ties: better mean
    rank over the seeds that rank it, then layer and head), at most ``k``.

    Raises:
        ValueError: no rankings, or ``min_share`` outside ``[0, 1)``.
    """
    k = check_int(k, "k", minimum=1)
    if not rankings:
        raise ValueError("stable_heads needs the rankings of at least one seed")
    if not 0 <= min_share < 1:
        raise ValueError(f"min_share must be in [0, 1), got {min_share!r}")
    table = membership(rankings, k)
    table = table[table.in_top_k]
    stats = table.groupby(["layer", "head"])["rank"].agg(["count", "mean"]).reset_index()
    stats = stats[stats["count"] > min_share * len(rankings)]
    stats = stats.sort_values(["count", "mean", "layer", "head"], ascending=[False, True, True, True])
    return [(int(a), int(b)) for a, b in zip(stats["layer"], stats["head"])][:k]
