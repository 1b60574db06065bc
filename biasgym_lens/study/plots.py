"""Plotly figures of injections, head scores and interventions.

Every function is pure: it takes result objects (or tensors/DataFrames) and returns a ``go.Figure``; nothing is
shown and no global template is changed. Signed quantities use a diverging scale centred at zero, layer 0 at
the top of every heatmap. :func:`save_figure` / :func:`save_figures` (from :mod:`biasgym_lens.study.figure_files`) write
HTML that opens offline and PNG/SVG when kaleido finds a Chromium.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from torch import Tensor

from biasgym_lens.study.figure_files import (
    IMAGE_FORMATS,
    PLOTLYJS_FILE,
    PngExportError,
    save_figure,
    save_figures,
)

__all__ = [
    "head_heatmap",
    "methods_heatmaps",
    "method_scatter",
    "attention_pattern",
    "training_curve",
    "closest_entities_bar",
    "faithfulness_plot",
    "group_bias_bars",
    "generalisation_heatmap",
    "layer_bias_plot",
    "save_figure",
    "save_figures",
    "IMAGE_FORMATS",
    "PLOTLYJS_FILE",
    "PngExportError",
]

_DIVERGING = "RdBu_r"


def _grid(values: Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(values.detach().cpu().float() if isinstance(values, Tensor) else values, dtype=float)


def _heatmap_trace(z: np.ndarray, *, signed: bool, name: str, showscale: bool = True, **kw: Any) -> go.Heatmap:
    L, H = z.shape
    zmax = float(np.nanmax(np.abs(z))) if z.size and np.isfinite(z).any() else 1.0
    zmax = zmax or 1.0
    text = [[f"L{layer}H{h}" for h in range(H)] for layer in range(L)]
    return go.Heatmap(
        z=z,
        x=list(range(H)),
        y=list(range(L)),
        text=text,
        colorscale=_DIVERGING if signed else "Viridis",
        zmid=0.0 if signed else None,
        zmin=-zmax if signed else None,
        zmax=zmax if signed else None,
        hovertemplate="layer %{y}, head %{x}<br>" + name + " %{z:.4f}<extra></extra>",
        showscale=showscale,
        colorbar={"title": {"text": name}},
        **kw,
    )


def _check_heads(heads: Sequence[tuple[int, int]], n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    out = []
    for head in heads:
        layer, h = (int(v) for v in head)
        if not (0 <= layer < n_layers and 0 <= h < n_heads):
            raise ValueError(
                f"highlighted head L{layer}H{h} is outside the grid; valid: layers 0-{n_layers - 1}, "
                f"heads 0-{n_heads - 1}"
            )
        out.append((layer, h))
    return out


def _outline_heads(fig: go.Figure, heads: Sequence[tuple[int, int]], *, row: int | None = None, col: int | None = None) -> None:
    """Draw a black rectangle around each head's cell and its rank (1 = first) in the cell."""
    for rank, (layer, h) in enumerate(heads, start=1):
        fig.add_shape(
            type="rect", x0=h - 0.5, x1=h + 0.5, y0=layer - 0.5, y1=layer + 0.5, name=f"L{layer}H{h}",
            line={"color": "black", "width": 2.5}, fillcolor="rgba(0,0,0,0)", row=row, col=col,
        )
        fig.add_annotation(
            x=h, y=layer, text=f"<b>{rank}</b>", showarrow=False, font={"size": 10, "color": "black"},
            bgcolor="rgba(255,255,255,0.85)", borderpad=1, name=f"L{layer}H{h}", row=row, col=col,
        )


def _integer_ticks(fig: go.Figure, n_layers: int, n_heads: int) -> None:
    """Whole-number layer and head ticks (outlines would otherwise add ticks at half-cells)."""
    fig.update_xaxes(tick0=0, dtick=1 if n_heads <= 16 else 2)
    fig.update_yaxes(tick0=0, dtick=1 if n_layers <= 24 else 2)


def head_heatmap(
    scores: Any,
    *,
    title: str | None = None,
    signed: bool | None = None,
    highlight: Sequence[tuple[int, int]] | None = None,
) -> go.Figure:
    """Layer x head heatmap of a :class:`~biasgym_lens.heads.head_scores.HeadScores` (or a ``[L, H]`` array).

    Diverging scale centred at 0 for signed scores, sequential for attention; hover shows layer, head, value.

    Args:
        scores: A ``HeadScores`` or a ``[n_layers, n_heads]`` array.
        title: Figure title (default: bias, method and metric).
        signed: Diverging scale (default: every method but attention).
        highlight: ``(layer, head)`` pairs (e.g. the chosen heads) outlined with a black rectangle and numbered
            in the given order.

    Raises:
        ValueError: a highlighted head outside the grid.
    """
    if hasattr(scores, "scores"):
        z = _grid(scores.scores)
        name = scores.method
        if signed is None:
            signed = scores.method != "attention"
        title = title or f"{scores.bias}: head scores ({scores.method}, metric {scores.metric})"
    else:
        z = _grid(scores)
        name = "score"
        signed = True if signed is None else signed
    heads = _check_heads(highlight or (), *z.shape)
    fig = go.Figure(_heatmap_trace(z, signed=signed, name=name))
    _outline_heads(fig, heads)
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer", height=max(320, 18 * z.shape[0] + 120))
    fig.update_yaxes(autorange="reversed")
    _integer_ticks(fig, *z.shape)
    return fig


def methods_heatmaps(
    scores: Mapping[str, Any],
    *,
    title: str = "Head scores by method",
    highlight: Sequence[tuple[int, int]] | None = None,
) -> go.Figure:
    """Side-by-side heatmaps of several methods' head scores (each with its own colour range).

    Args:
        scores: Method name -> ``HeadScores`` (or ``[n_layers, n_heads]`` array).
        title: Figure title.
        highlight: ``(layer, head)`` pairs outlined and numbered in every panel (as in :func:`head_heatmap`).
    """
    names = list(scores)
    if not names:
        raise ValueError("no scores to plot")
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, shared_yaxes=True)
    for i, name in enumerate(names, start=1):
        s = scores[name]
        z = _grid(s.scores if hasattr(s, "scores") else s)
        signed = getattr(s, "method", name) != "attention"
        trace = _heatmap_trace(z, signed=signed, name=name, showscale=False)
        fig.add_trace(trace, row=1, col=i)
        _outline_heads(fig, _check_heads(highlight or (), *z.shape), row=1, col=i)
        fig.update_xaxes(title_text="head", row=1, col=i)
    fig.update_yaxes(title_text="layer", autorange="reversed", row=1, col=1)
    _integer_ticks(fig, *z.shape)
    fig.update_layout(title=title, height=max(360, 18 * z.shape[0] + 140), width=max(700, 260 * len(names)))
    return fig


def method_scatter(a: Any, b: Any, *, title: str | None = None) -> go.Figure:
    """Scatter of two methods' scores over heads, with their Spearman correlation in the title."""
    from biasgym_lens.heads.head_scores import spearman

    xa, xb = _grid(a.scores).ravel(), _grid(b.scores).ravel()
    H = a.n_heads
    labels = [f"L{i // H}H{i % H}" for i in range(xa.size)]
    rho = spearman(xa, xb)
    fig = go.Figure(
        go.Scatter(
            x=xa, y=xb, mode="markers", text=labels, marker={"size": 6, "opacity": 0.7},
            hovertemplate="%{text}<br>" + a.method + " %{x:.4f}<br>" + b.method + " %{y:.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title or f"{a.method} vs {b.method} (Spearman {rho:.2f})",
        xaxis_title=f"{a.method} score",
        yaxis_title=f"{b.method} score",
    )
    return fig


def attention_pattern(pattern: Tensor | np.ndarray, tokens: Sequence[str], *, title: str = "Attention pattern") -> go.Figure:
    """One head's attention on one prompt: queries (rows) x keys (columns) with token labels on both axes."""
    z = _grid(pattern)
    if z.shape != (len(tokens), len(tokens)):
        raise ValueError(f"pattern has shape {z.shape}, expected ({len(tokens)}, {len(tokens)}) for the tokens")
    labels = [f"{i}:{t}" for i, t in enumerate(tokens)]
    fig = go.Figure(
        go.Heatmap(
            z=z, x=labels, y=labels, colorscale="Blues", zmin=0, zmax=1,
            hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.3f}<extra></extra>",
            colorbar={"title": {"text": "attention"}},
        )
    )
    fig.update_layout(title=title, xaxis_title="key (attended-to token)", yaxis_title="query token")
    fig.update_yaxes(autorange="reversed")
    return fig


def training_curve(injection: Any, *, title: str | None = None) -> go.Figure:
    """Loss per step and bias logit difference / excess per epoch of an injection (two panels)."""
    df = injection.to_dataframe()
    fig = make_subplots(rows=1, cols=2, subplot_titles=("training loss", "elicitation on selection probes"))
    steps = list(range(1, len(injection.step_losses) + 1))
    fig.add_trace(go.Scatter(x=steps, y=list(injection.step_losses), mode="lines", name="loss per step"), row=1, col=1)
    fig.add_trace(go.Scatter(x=df["epoch"], y=df["logit_diff"], mode="lines+markers", name="token logit diff"), row=1, col=2)
    fig.add_trace(go.Scatter(x=df["epoch"], y=df["excess"], mode="lines+markers", name="excess over controls"), row=1, col=2)
    fig.add_vline(x=injection.best_epoch, line_dash="dot", row=1, col=2)
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_xaxes(title_text="epoch", row=1, col=2)
    fig.update_yaxes(title_text="cross-entropy (nats)", row=1, col=1)
    fig.update_yaxes(title_text="logit diff (nats)", row=1, col=2)
    fig.update_layout(title=title or f"Injection of '{injection.bias}' (best epoch {injection.best_epoch:g})")
    return fig


def closest_entities_bar(df: pd.DataFrame, *, top: int = 12, title: str = "Closest real entities") -> go.Figure:
    """Bars of cosine similarity to the trained vector (and to the control injection's, when present)."""
    d = df.sort_values("cos_vector", ascending=False).head(top)
    fig = go.Figure(go.Bar(x=d["entity"], y=d["cos_vector"], name="this bias"))
    if "control_cos_vector" in d:
        fig.add_trace(go.Bar(x=d["entity"], y=d["control_cos_vector"], name="control injection"))
    fig.update_layout(title=title, xaxis_title="entity", yaxis_title="cosine similarity", barmode="group")
    return fig


_CHOSEN_COLOUR = "#1f77b4"
_RANDOM_COLOUR = "rgb(120,120,120)"


def faithfulness_plot(curve: Any, *, title: str | None = None) -> go.Figure:
    """Excess and the budgeted neutral-text cost (perplexity or loss increase) against the number of ablated
    heads; random heads as a min-max band with their mean.

    Each selection has one colour in both panels and one legend entry (``legendgroup``: clicking it hides the
    selection in both panels).
    """
    t = curve.table
    on = getattr(curve, "budget_on", "loss")
    cost = f"{on}_increase"
    top = t[t.selection == "top"].sort_values("k")
    rnd = t[t.selection == "random"].groupby("k").agg(
        lo=("excess", "min"), hi=("excess", "max"), mean=("excess", "mean"),
        cost_lo=(cost, "min"), cost_hi=(cost, "max"), cost_mean=(cost, "mean"),
    ).reset_index()
    fig = make_subplots(rows=1, cols=2, subplot_titles=("token excess over controls", f"neutral-text {on} increase"))
    panels = (("excess", "lo", "hi", "mean"), (cost, "cost_lo", "cost_hi", "cost_mean"))
    for col, (y, lo, hi, mean) in enumerate(panels, start=1):
        first = col == 1
        ks = list(rnd["k"])
        fig.add_trace(
            go.Scatter(
                x=ks + ks[::-1], y=list(rnd[hi]) + list(rnd[lo])[::-1], fill="toself", mode="lines", line={"width": 0},
                fillcolor="rgba(120,120,120,0.25)", name="random heads (min-max)", legendgroup="random",
                showlegend=first, hoverinfo="skip",
            ),
            row=1, col=col,
        )
        fig.add_trace(
            go.Scatter(
                x=ks, y=rnd[mean], mode="lines", line={"color": _RANDOM_COLOUR, "dash": "dot"},
                name="random heads (mean)", legendgroup="random", showlegend=first,
            ),
            row=1, col=col,
        )
        fig.add_trace(
            go.Scatter(
                x=top["k"], y=top[y], mode="lines+markers", line={"color": _CHOSEN_COLOUR},
                marker={"color": _CHOSEN_COLOUR}, name="chosen ranking", legendgroup="top", showlegend=first,
            ),
            row=1, col=col,
        )
        fig.update_xaxes(title_text="heads ablated (k)", tickvals=sorted(set(t["k"])), row=1, col=col)
    fig.add_hline(y=curve.baseline_excess, line_dash="dot", annotation_text="no intervention", row=1, col=1)
    fig.add_hline(y=curve.budget, line_dash="dash", line_color="red", annotation_text="budget", row=1, col=2)
    fig.update_yaxes(title_text="excess (nats)", row=1, col=1)
    fig.update_yaxes(title_text=f"relative {on} increase", tickformat=".1%", row=1, col=2)
    fig.update_layout(
        title=title or f"Faithfulness curve (best k on the curve = {curve.chosen_k()}, {on} budget {curve.budget:.0%})",
        legend={"orientation": "h", "yanchor": "top", "y": -0.2, "xanchor": "left", "x": 0},
    )
    return fig


def group_bias_bars(groups: pd.DataFrame, *, title: str = "Bias per group under each intervention") -> go.Figure:
    """Grouped bars: the bias logit difference of each group (token, real, control) per intervention, with its
    standard error over the probes as error bars (when the table has ``logit_diff_sem``)."""
    if groups.empty:
        raise ValueError("no group rows to plot")
    fig = go.Figure()
    for name, sub in groups.groupby("intervention", sort=False):
        sem = sub["logit_diff_sem"] if "logit_diff_sem" in sub else None
        fig.add_trace(
            go.Bar(
                x=[f"{g} ({k})" for g, k in zip(sub["group"], sub["kind"])], y=sub["logit_diff"], name=str(name),
                error_y=dict(type="data", array=sem, visible=True) if sem is not None else None,
                hovertemplate="%{x}<br>logit diff %{y:.3f}<extra>" + str(name) + "</extra>",
            )
        )
    fig.update_layout(title=title, xaxis_title="group", yaxis_title="bias logit difference (nats)", barmode="group")
    return fig


def generalisation_heatmap(matrix: pd.DataFrame, *, title: str = "Heads of bias A measured on bias B") -> go.Figure:
    """Heatmap of a generalisation matrix (rows: bias the heads were found on; columns: bias measured)."""
    z = matrix.to_numpy(dtype=float)
    finite = z[np.isfinite(z)]
    zmax = float(np.abs(finite).max()) if finite.size else 1.0
    fig = go.Figure(
        go.Heatmap(
            z=z, x=list(matrix.columns), y=list(matrix.index), colorscale=_DIVERGING, zmid=0, zmin=-zmax, zmax=zmax,
            text=[[("" if not math.isfinite(v) else f"{v:.2f}") for v in row] for row in z], texttemplate="%{text}",
            hovertemplate="heads of %{y}<br>measured on %{x}<br>%{z:.3f}<extra></extra>",
            colorbar={"title": {"text": "excess cut"}},
        )
    )
    fig.update_layout(title=title, xaxis_title="bias measured", yaxis_title="heads found on")
    fig.update_yaxes(autorange="reversed")
    return fig


def layer_bias_plot(per_layer: pd.DataFrame, *, title: str = "Bias logit difference by layer (logit lens)") -> go.Figure:
    """Lines of the logit-lens bias logit difference after each layer, one per group."""
    fig = go.Figure()
    for group, sub in per_layer.groupby("group", sort=False):
        fig.add_trace(go.Scatter(x=sub["layer"], y=sub["logit_diff"], mode="lines+markers", name=str(group)))
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="logit diff through the final norm (nats)")
    return fig
