"""Figures of a study's summary: what each intervention removes and costs, with intervals, and which heads come
back over injection seeds. Each function returns a plotly ``go.Figure``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = ["intervention_bars", "seed_stability_heatmap", "INTERVENTION_PANELS"]


INTERVENTION_PANELS = (
    ("excess_cut", "cut of the token's excess"),
    ("real_gap_cut", "cut of the real groups' gap"),
    ("perplexity_increase", "perplexity increase"),
)


def intervention_bars(summary: pd.DataFrame, *, title: str = "What each intervention removes, and what it costs") -> go.Figure:
    """One panel per measure of :meth:`ScopeResult.summary` (the token's cut, the real groups' cut, the
    perplexity increase), one bar per intervention, with the 95% intervals as asymmetric error bars."""
    rows = summary[summary.intervention != "none"]
    if rows.empty:
        raise ValueError("no intervention rows to plot")
    fig = make_subplots(rows=1, cols=len(INTERVENTION_PANELS), subplot_titles=[t for _, t in INTERVENTION_PANELS])
    for col, (measure, _) in enumerate(INTERVENTION_PANELS, start=1):
        y = rows[measure].to_numpy(dtype=float)
        lo, hi = (rows.get(f"{measure}_ci_{s}", pd.Series(np.nan, index=rows.index)).to_numpy(dtype=float) for s in ("low", "high"))
        fig.add_trace(
            go.Bar(
                x=list(rows.intervention), y=y, showlegend=False, marker_color=px_colors(len(rows)),
                error_y=dict(type="data", symmetric=False, array=np.nan_to_num(hi - y), arrayminus=np.nan_to_num(y - lo), visible=True),
                hovertemplate="%{x}: %{y:.1%}<extra>" + measure + "</extra>",
            ),
            row=1, col=col,
        )
        fig.update_yaxes(tickformat=".0%", row=1, col=col)
    fig.update_layout(title=title, height=420)
    return fig


def px_colors(n: int) -> list[str]:
    """The first ``n`` colours of plotly's default sequence (one per intervention, the same in every panel)."""
    palette = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880")
    return [palette[i % len(palette)] for i in range(n)]


def seed_stability_heatmap(members: pd.DataFrame, stable: Sequence[tuple[int, int]] = (), *, title: str | None = None) -> go.Figure:
    """Heads (rows, in any seed's top k; stable heads first) by seeds (columns): each cell the head's rank in
    that seed's top k, blank where it is not in it (``members``: :meth:`SeedStability.membership`)."""
    if members.empty:
        raise ValueError("no membership rows to plot")
    stable_labels = [f"L{a}H{b}" for a, b in stable]
    counts = members[members.in_top_k].groupby("label").size()
    order = stable_labels + [h for h in counts.sort_values(ascending=False).index if h not in stable_labels]
    grid = members.pivot(index="label", columns="seed", values="rank").reindex(order)
    fig = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(dtype=float), x=[f"seed {s}" for s in grid.columns], y=list(grid.index),
            colorscale="Blues_r", colorbar=dict(title="rank"), text=grid.to_numpy(dtype=float),
            texttemplate="%{text:.0f}", hovertemplate="%{y}, %{x}: rank %{z:.0f}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed", title="head (stable heads first)")
    k = int(members["rank"].max()) if members["rank"].notna().any() else 0
    fig.update_layout(title=title or f"Top-{k} heads of each injection seed ({len(stable)} stable)")
    return fig
