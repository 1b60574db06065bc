"""Intervals of the bias measures over probes, and paired tests between interventions.

Pure functions over a long table of per-probe logit differences (``intervention, group, kind, probe,
logit_diff``; kinds ``token``, ``real``, ``control``), as :func:`~biasgym_lens.heads.steps.measure_all` writes
it. On each probe, the token's excess is its logit difference minus the control groups' mean there, and the
real groups' gap is their mean minus the controls' mean; averaged over the probes these equal the group
table's ``excess`` columns. Resampling the probes, the same probes are drawn for every intervention compared
(a paired bootstrap), so a cut's interval reflects the probes' spread, not noise between unpaired draws.

Examples:
    >>> import pandas as pd
    >>> rows = [(iv, g, k, p, v) for iv, shift in (("none", 0.0), ("heads", -1.0))
    ...         for g, k, base in (("<T>", "token", 3.0), ("Italy", "real", 1.0), ("Chile", "control", 0.0))
    ...         for p, v in enumerate([base, base + 1.0])
    ...         for v in [v + (shift if k != "control" else 0.0)]]
    >>> table = pd.DataFrame(rows, columns=["intervention", "group", "kind", "probe", "logit_diff"])
    >>> round(float(bias_intervals(table).set_index("intervention").loc["heads", "excess_cut"]), 3)
    0.333
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from biasgym_lens.core.stats import bootstrap_stat, paired_test

__all__ = ["per_probe_gaps", "bias_intervals", "paired_comparisons", "COMPARISONS", "COMPARISON_COLUMNS"]

COMPARISON_COLUMNS = ("a", "b", "measure", "mean_diff", "ci_low", "ci_high", "p_value", "n")

COMPARISONS: tuple[tuple[str, str], ...] = (("heads", "random_heads"), ("heads", "steering"), ("heads", "none"))
"""The default pairs of :func:`paired_comparisons`: the chosen heads against each baseline."""


def per_probe_gaps(values: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Intervention x probe table of the token's excess (``kind="token"``) or the real groups' mean gap
    (``kind="real"``) over the control groups' mean on each probe (NaN where a kind is absent)."""
    if kind not in ("token", "real"):
        raise ValueError(f"kind must be 'token' or 'real', got {kind!r}")
    means = values.groupby(["intervention", "kind", "probe"], sort=False)["logit_diff"].mean().unstack("kind")
    if kind not in means or "control" not in means:
        return pd.DataFrame(index=means.index.get_level_values(0).unique(), dtype=float)
    gaps = (means[kind] - means["control"]).unstack("probe")
    return gaps.loc[list(dict.fromkeys(values["intervention"]))]


def _cut(a: np.ndarray, b: np.ndarray) -> float:
    return float(1.0 - a.mean() / b.mean()) if b.mean() else float("nan")


def _measure(gaps: pd.DataFrame, name: str, cut_name: str, seed: int, level: float) -> pd.DataFrame:
    rows = []
    base = gaps.loc["none"].to_numpy(dtype=float) if "none" in gaps.index else None
    for iv, row in gaps.iterrows():
        x = row.to_numpy(dtype=float)
        mean = bootstrap_stat(np.mean, x, seed=seed, level=level).as_dict(name)
        cut = bootstrap_stat(_cut, x, base, seed=seed, level=level).as_dict(cut_name) if base is not None else {}
        rows.append({"intervention": iv, **mean, **cut})
    return pd.DataFrame(rows)


def bias_intervals(values: pd.DataFrame, *, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Per intervention: ``token_excess``, ``excess_cut`` (against ``"none"``), ``real_group_gap`` and
    ``real_gap_cut``, each with its paired percentile bootstrap ``_ci_low`` / ``_ci_high`` over the probes."""
    token = _measure(per_probe_gaps(values, "token"), "token_excess", "excess_cut", seed, level)
    real = _measure(per_probe_gaps(values, "real"), "real_group_gap", "real_gap_cut", seed, level)
    if real.empty:
        return token
    return token.merge(real, on="intervention", how="outer") if not token.empty else real


def paired_comparisons(
    values: pd.DataFrame, pairs: Sequence[tuple[str, str]] = COMPARISONS, *, seed: int = 0
) -> pd.DataFrame:
    """Does intervention ``a`` leave less bias than ``b`` on the same probes? For each pair present and each
    measure (the token's excess, the real groups' gap): ``mean_diff`` (mean of ``b - a`` over the probes:
    positive when ``a`` removes more), its bootstrap interval and a one-sided paired sign-flip ``p_value``."""
    rows = []
    for kind, measure in (("token", "token_excess"), ("real", "real_group_gap")):
        gaps = per_probe_gaps(values, kind)
        for a, b in pairs:
            if a in gaps.index and b in gaps.index:
                test = paired_test(gaps.loc[b].to_numpy(dtype=float), gaps.loc[a].to_numpy(dtype=float), seed=seed)
                rows.append({"a": a, "b": b, "measure": measure, **test})
    return pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))
