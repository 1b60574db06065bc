"""The circuit graph: layers top to bottom, heads and MLPs as nodes, the strongest edges drawn between them.

Rows: the embedding at the top, then layer 0, 1, ..., and the logits at the bottom. In a layer row the heads sit
at ``x = 0 .. n_heads - 1`` and the MLP to their right. An edge runs from the bottom of its upstream node to
the top of its downstream node; into a head it lands left of centre for the query, at the centre for the key and
right of centre for the value (and is drawn solid, dashed, dotted). Width grows with ``|score|``; red pushes the
bias up, blue pushes it down (the diverging scale of the other plots). Chosen heads are gold with a black rim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from biasgym_lens.core.checks import InputTypeError, check_int
from biasgym_lens.core.protocols import Model
from biasgym_lens.heads.circuits import Circuit, circuit

__all__ = ["circuit_figure", "circuit_graph_figure", "study_circuit_figure"]

POSITIVE, NEGATIVE = "#d62728", "#1f77b4"
_DASH = {"q": "solid", "k": "dash", "v": "dot", "mlp": "solid", "logits": "solid"}
_LAND = {"q": -0.25, "k": 0.0, "v": 0.25, "mlp": 0.0, "logits": 0.0}
_NAMES = {"q": "query", "k": "key", "v": "value"}
_MAX_WIDTH = 9.0


def _position(kind: str, layer: int, head: int, n_heads: int) -> tuple[float, float]:
    """``(x, y)`` of a node: y is the row (0 = embedding, layer + 1, n_layers + 1 = logits)."""
    if kind == "head":
        return float(head), float(layer + 1)
    if kind == "mlp":
        return n_heads + 0.5, float(layer + 1)
    return (n_heads - 1) / 2, float(layer + 1)  # embed (layer -1), logits (layer n_layers)


def _curve(x0: float, y0: float, x1: float, y1: float, n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """A cubic Bezier that leaves ``(x0, y0)`` straight down and arrives at ``(x1, y1)`` straight down."""
    t = np.linspace(0.0, 1.0, n)
    dy = (y1 - y0) / 2
    xs = (1 - t) ** 3 * x0 + 3 * (1 - t) ** 2 * t * x0 + 3 * (1 - t) * t**2 * x1 + t**3 * x1
    ys = (1 - t) ** 3 * y0 + 3 * (1 - t) ** 2 * t * (y0 + dy) + 3 * (1 - t) * t**2 * (y1 - dy) + t**3 * y1
    return xs, ys


def _edge_traces(edges: pd.DataFrame, n_heads: int) -> list[go.Scatter]:
    """One line per edge, width by ``|score|`` and colour by sign, with its numbers on hover."""
    biggest = float(edges["score"].abs().max()) or 1.0
    traces = []
    for row in edges.itertuples():
        x0, y0 = _position(row.upstream_kind, row.upstream_layer, row.upstream_head, n_heads)
        x1, y1 = _position(row.downstream_kind, row.downstream_layer, row.downstream_head, n_heads)
        xs, ys = _curve(x0, y0 + 0.12, x1 + _LAND[row.input], y1 - 0.12)
        into = f"{row.downstream} ({_NAMES.get(row.input, row.input)})"
        traces.append(go.Scatter(
            x=xs, y=ys, mode="lines", showlegend=False, opacity=0.8,
            line={"color": POSITIVE if row.score > 0 else NEGATIVE, "dash": _DASH[row.input],
                  "width": 1.0 + (_MAX_WIDTH - 1.0) * abs(row.score) / biggest},
            hovertemplate=f"{row.upstream} → {into}<br>score {row.score:+.4g} (rank {row.rank})<extra></extra>",
        ))
    return traces


def _node_traces(nodes: pd.DataFrame, n_heads: int) -> list[go.Scatter]:
    """Every node as a small grey dot; nodes of the circuit larger and labelled; chosen heads gold."""
    xy = np.array([_position(r.kind, r.layer, r.head, n_heads) for r in nodes.itertuples()])
    nodes = nodes.assign(x=xy[:, 0], y=xy[:, 1])
    groups = [
        ("other nodes", nodes[~nodes.in_circuit & ~nodes.chosen], 5, "#cccccc", "#cccccc", False),
        ("in the circuit", nodes[nodes.in_circuit & ~nodes.chosen], 11, "#555555", "#555555", True),
        ("chosen heads", nodes[nodes.chosen], 15, "gold", "black", True),
    ]
    traces = []
    for name, sub, size, fill, rim, label in groups:
        traces.append(go.Scatter(
            x=sub.x, y=sub.y, mode="markers+text" if label else "markers", name=name,
            text=sub.node if label else None, textposition="middle right", textfont={"size": 10},
            marker={"size": size, "color": fill, "line": {"color": rim, "width": 2 if rim == "black" else 0}},
            hovertext=[f"{r.node}<br>circuit edges out {r.score_out:+.4g}, in {r.score_in:+.4g}" for r in sub.itertuples()],
            hovertemplate="%{hovertext}<extra></extra>",
        ))
    return traces


def _legend_traces() -> list[go.Scatter]:
    """Legend entries for the colours and the dashes (no data)."""
    out = [
        go.Scatter(x=[None], y=[None], mode="lines", name="pushes the bias up", line={"color": POSITIVE, "width": 4}),
        go.Scatter(x=[None], y=[None], mode="lines", name="pushes the bias down", line={"color": NEGATIVE, "width": 4}),
    ]
    for kind in "qkv":
        out.append(go.Scatter(x=[None], y=[None], mode="lines", name=f"into the {_NAMES[kind]}",
                              line={"color": "#555555", "dash": _DASH[kind], "width": 2}))
    return out


def circuit_figure(circ: Circuit, *, top_edges: int | None = None, title: str | None = None) -> go.Figure:
    """The circuit graph of the strongest edges.

    Args:
        circ: A :class:`~biasgym_lens.heads.circuits.Circuit`.
        top_edges: How many edges to draw (default: the circuit's ``top_edges``).
        title: Figure title (default names the bias and the number of edges).

    Returns:
        A ``go.Figure`` (layer 0 at the top, the logits at the bottom).

    Raises:
        InputTypeError: ``circ`` not a Circuit, ``top_edges`` not an integer.
        ValueError: ``top_edges`` < 1.
    """
    if not isinstance(circ, Circuit):
        raise InputTypeError(f"circ must be a Circuit (from circuit()), got {type(circ).__name__}")
    k = circ.top_edges if top_edges is None else check_int(top_edges, "top_edges", minimum=1)
    circ = replace(circ, top_edges=k)
    g = circ.graph
    title = title or f"{circ.bias}: the {k} strongest edges ({circ.metric} metric)"
    return circuit_graph_figure(circ.edges(), circ.nodes(), n_layers=g.n_layers, n_heads=g.n_heads, title=title)


def circuit_graph_figure(edges: pd.DataFrame, nodes: pd.DataFrame, *, n_layers: int, n_heads: int, title: str) -> go.Figure:
    """The circuit graph from saved tables: ``edges`` (rows of :meth:`Circuit.to_dataframe`, all of them drawn)
    and ``nodes`` (:meth:`Circuit.nodes`), as a study folder keeps them.

    Raises:
        ValueError: no edges.
    """
    if edges.empty:
        raise ValueError("no edges to draw")
    fig = go.Figure(_edge_traces(edges, n_heads) + _node_traces(nodes, n_heads) + _legend_traces())
    rows = ["embed"] + [f"layer {layer}" for layer in range(n_layers)] + ["logits"]
    step = max(1, len(rows) // 32)
    fig.update_layout(
        title=title, height=260 + 26 * len(rows), width=260 + 70 * (n_heads + 2), plot_bgcolor="white",
        xaxis={"tickvals": [*range(n_heads), n_heads + 0.5], "ticktext": [*(f"H{h}" for h in range(n_heads)), "MLP"],
               "showgrid": False, "zeroline": False, "range": [-0.8, n_heads + 2.2], "side": "top"},
        yaxis={"tickvals": list(range(0, len(rows), step)), "ticktext": rows[::step], "autorange": "reversed",
               "showgrid": True, "gridcolor": "#f0f0f0", "zeroline": False},
        legend={"orientation": "h", "y": -0.04, "yanchor": "top"}, margin={"l": 70, "r": 20, "t": 60, "b": 40},
    )
    return fig


def study_circuit_figure(
    model: Model, injection: Any, heads: Sequence[tuple[int, int]] = (), *, top_edges: int = 30,
    probes: str = "select", max_probes: int | None = None, title: str | None = None,
) -> go.Figure:
    """The circuit figure of a study: edge attribution on the injection's probes, the chosen heads highlighted.

    Args:
        model: The model the injection was trained in.
        injection: The study's :class:`~biasgym_lens.injection.artifact.Injection`.
        heads: The study's chosen heads (``ScopeResult.chosen``).
        top_edges: How many edges to draw.
        probes: Probe split (``"select"``, as for the head scores).
        max_probes: Use at most this many probes.
        title: Figure title.

    Returns:
        The figure of :func:`circuit_figure`.

    Raises:
        The errors of :func:`~biasgym_lens.heads.circuits.circuit`.
    """
    circ = circuit(model, injection, top_edges, heads=heads, probes=probes, max_probes=max_probes)
    return circuit_figure(circ, title=title)
