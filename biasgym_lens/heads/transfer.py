"""Bias per group under an intervention, and its transfer across biases: the heads found on one bias ablated
while measuring every other (:func:`generalisation_table`, :func:`generalisation_matrix`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import pandas as pd

from biasgym_lens.core.protocols import Model
from biasgym_lens.evaluation.elicit import GroupRequest, score_groups
from biasgym_lens.evaluation.intervals import bias_intervals
from biasgym_lens.heads.interventions import Head, ablate_heads
from biasgym_lens.injection.catalogue import BiasSpec, load_bias
from biasgym_lens.injection.metrics import keyword_ids, probe_subset

logger = logging.getLogger(__name__)

__all__ = ["measure_groups", "per_probe_table", "INTERVAL_COLUMNS", "generalisation_table", "generalisation_matrix", "NO_REAL_GROUPS"]

INTERVAL_COLUMNS = ("token_cut_ci_low", "token_cut_ci_high", "real_cut_ci_low", "real_cut_ci_high")
"""The 95% paired bootstrap intervals (over the measured bias's test probes) that generalisation_table adds."""

NO_REAL_GROUPS = "bias %r names no real groups: the transfer to real groups is skipped (its columns are NaN)"


def measure_groups(
    model: Model,
    spec: BiasSpec,
    injection: Any | None,
    intervention: Callable[[], Any] | None = None,
    *,
    probes: str = "test",
    max_probes: int | None = None,
    prefix: str = "",
    label: str = "none",
    keep_per_probe: bool = False,
) -> pd.DataFrame:
    """Bias logit difference for the token (if any), the real groups and the control groups, under an
    intervention, with each group's excess over the control mean (on at most ``max_probes`` probes of the
    split ``probes``; ``keep_per_probe`` keeps each group's per-probe values in a ``per_probe`` column)."""
    kw = keyword_ids(model, spec)
    texts = [prefix + t for t in probe_subset(spec.probes, probes)[:max_probes]]
    kinds: list[tuple[str, str]] = []
    requests: list[GroupRequest] = []
    if injection is not None:
        kinds.append((injection.token, "token"))
        requests.append((injection.token, {injection.token: injection.vector}))
    for kind, groups in (("real", spec.real_groups), ("control", spec.control_groups)):
        kinds += [(g, kind) for g in groups]
        requests += [(g, None) for g in groups]
    with intervention() if intervention else contextlib.nullcontext():
        stats = score_groups(model, spec, requests, texts, kw)
    rows = [{"group": g, "kind": kind, **st} for (g, kind), st in zip(kinds, stats)]
    df = pd.DataFrame(rows)
    if not keep_per_probe:
        df = df.drop(columns=["per_probe"])
    df["excess"] = df["logit_diff"] - df.loc[df.kind == "control", "logit_diff"].mean()
    df.insert(0, "intervention", label)
    df.insert(1, "bias", spec.name)
    return df


def per_probe_table(groups: pd.DataFrame) -> pd.DataFrame:
    """A group table with a ``per_probe`` column as a long table ``intervention, group, kind, probe,
    logit_diff`` (``probe``: index within the measured probes)."""
    rows = [
        {"intervention": r.intervention, "group": r.group, "kind": r.kind, "probe": i, "logit_diff": float(v)}
        for r in groups.itertuples(index=False)
        for i, v in enumerate(r.per_probe)
    ]
    return pd.DataFrame(rows, columns=["intervention", "group", "kind", "probe", "logit_diff"])


def generalisation_table(
    model: Model,
    injections: dict[str, Any],
    heads: dict[str, list[Head]],
    *,
    biases: list[str] | None = None,
    kind: str = "zero",
) -> pd.DataFrame:
    """Every bias measured with the heads found on every bias ablated: one row per (heads of, measured on).

    Each measurement gives both the injected token's excess (when ``measured_on`` has an injection) and the real
    groups' mean gap over the controls (when it names real groups; no token needed, so biases that were never
    injected can be measured too).

    Args:
        injections: bias name -> its injection.
        heads: bias name -> heads found for it.
        biases: The biases to measure on (default: those of ``injections`` and ``heads``).

    Returns:
        Columns ``heads_of, measured_on, n_heads, token_excess_clean, token_excess, token_cut, real_gap_clean,
        real_gap, real_cut`` and the cuts' paired 95% bootstrap intervals over the measured bias's test probes
        (:data:`INTERVAL_COLUMNS`); a cut is ``1 - ablated / clean`` (NaN without heads, without a token or real
        groups, or when the clean value is 0).
    """
    columns = biases if biases is not None else list(dict.fromkeys([*injections, *heads]))
    nan = float("nan")

    def spec_of(bias: str) -> BiasSpec:
        return injections[bias].spec if bias in injections else load_bias(bias)

    def measure(bias: str, intervention: Callable[[], Any] | None, label: str) -> pd.DataFrame:
        return measure_groups(model, spec_of(bias), injections.get(bias), intervention, label=label, keep_per_probe=True)

    def excesses(df: pd.DataFrame, bias: str) -> tuple[float, float]:
        token = float(df[df.kind == "token"]["excess"].mean()) if bias in injections else nan
        real = float(df[df.kind == "real"]["excess"].mean()) if spec_of(bias).real_groups else nan
        return token, real

    def intervals(clean_df: pd.DataFrame, ablated_df: pd.DataFrame) -> dict[str, float]:
        row = bias_intervals(per_probe_table(pd.concat([clean_df, ablated_df], ignore_index=True))).set_index("intervention")
        return {
            f"{ours}_ci_{end}": float(row.loc["heads"].get(f"{theirs}_ci_{end}", nan))
            for ours, theirs in (("token_cut", "excess_cut"), ("real_cut", "real_gap_cut")) for end in ("low", "high")
        }

    def cut(ablated: float, clean: float) -> float:
        return 1.0 - ablated / clean if clean == clean and clean != 0 else nan

    for b in columns:
        if not spec_of(b).real_groups:
            logger.warning(NO_REAL_GROUPS, b)
    clean_dfs = {b: measure(b, None, "none") for b in columns}
    clean = {b: excesses(df, b) for b, df in clean_dfs.items()}
    rows = []
    for a, hs in heads.items():
        for b in columns:
            ablated_df = measure(b, lambda hs=hs: ablate_heads(model, hs, kind=kind), "heads") if hs else None
            ablated = excesses(ablated_df, b) if ablated_df is not None else (nan, nan)
            cis = intervals(clean_dfs[b], ablated_df) if ablated_df is not None else {}
            rows.append(
                {
                    "heads_of": a, "measured_on": b, "n_heads": len(hs),
                    "token_excess_clean": clean[b][0], "token_excess": ablated[0], "token_cut": cut(ablated[0], clean[b][0]),
                    "real_gap_clean": clean[b][1], "real_gap": ablated[1], "real_cut": cut(ablated[1], clean[b][1]),
                    **{k: cis.get(k, nan) for k in INTERVAL_COLUMNS},
                }
            )
    return pd.DataFrame(rows)


def generalisation_matrix(
    model: Model,
    injections: dict[str, Any],
    heads: dict[str, list[Head]],
    *,
    kind: str = "zero",
    target: str = "token",
    table: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Cut of each bias's excess when ablating the heads found on each bias (rows: heads of, columns: measured on).

    Args:
        injections: bias name -> its injection (applied when ``target="token"``).
        heads: bias name -> heads found for it.
        target: ``"token"`` (the injected token's excess) or ``"real"`` (the real groups' mean gap over the
            controls, no token needed: biases that were never injected can be measured this way).
        table: A :func:`generalisation_table` already measured (then nothing is run again).

    Returns:
        A square-ish DataFrame of relative cuts ``1 - excess_ablated / excess_clean`` (NaN when there are no
        heads or the clean excess is 0). With ``target="real"`` a bias that names no real groups gets no column
        (a warning says so).
    """
    if target not in ("token", "real"):
        raise ValueError(f"target must be 'token' or 'real', got {target!r}")
    if target == "token":
        columns = list(injections)
    else:
        columns = []
        for b in dict.fromkeys([*injections, *heads]):
            spec = injections[b].spec if b in injections else load_bias(b)
            if spec.real_groups:
                columns.append(b)
            elif table is None:
                logger.warning(NO_REAL_GROUPS, b)
    if table is None:
        table = generalisation_table(model, injections, heads, biases=columns, kind=kind)
    out = pd.DataFrame(index=list(heads), columns=columns, dtype=float)
    for row in table.itertuples():
        if row.measured_on in columns and row.heads_of in out.index:
            out.loc[row.heads_of, row.measured_on] = getattr(row, f"{target}_cut")
    return out
