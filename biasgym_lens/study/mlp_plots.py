"""The attention-versus-MLP figure: per layer, the MLP's score beside the sum of its heads' scores (see
:mod:`biasgym_lens.heads.mlps`), and optionally the strongest MLP neurons."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from biasgym_lens.heads.head_scores import HeadScores
from biasgym_lens.heads.mlps import MlpScores, NeuronScores

__all__ = ["mlp_figure", "mlp_layers_table", "mlp_tables_figure"]

_ATTENTION, _MLP = "#1f77b4", "#ff7f0e"


def mlp_layers_table(mlp: MlpScores, heads: HeadScores | None = None) -> pd.DataFrame:
    """Per layer: ``layer``, the MLP's score (``mlp``) and, with ``heads``, the sum of that layer's head scores
    (``heads``); ``mlp_method``, ``heads_method``, ``metric``, ``n_probes`` and ``bias`` on every row.

    Raises:
        ValueError: ``heads`` from a model with another number of layers.
    """
    if heads is not None and heads.n_layers != mlp.n_layers:
        raise ValueError(f"heads have {heads.n_layers} layers but the MLP scores {mlp.n_layers}; use one model's scores")
    table = pd.DataFrame({"layer": np.arange(mlp.n_layers), "mlp": mlp.scores.numpy()})
    if heads is not None:
        table["heads"] = heads.scores.sum(1).numpy()
    return table.assign(mlp_method=mlp.method, heads_method=heads.method if heads is not None else "",
                        metric=mlp.metric, n_probes=mlp.n_probes, bias=mlp.bias)


def mlp_figure(
    mlp: MlpScores, heads: HeadScores | None = None, neurons: NeuronScores | None = None, *, top: int = 15
) -> go.Figure:
    """Bars per layer: the MLP's score and (with ``heads``) the sum of that layer's head scores, so a reader
    sees whether the bias lives in attention or in the MLPs; with ``neurons`` a second panel shows the ``top``
    neurons by ``|score|`` (signed bars, largest at the top).

    All scores share one sign convention (contribution to the metric, positive = pushes the bias up).

    Raises:
        ValueError: ``heads`` from a model with another number of layers, or ``top < 1``.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be an int >= 1, got {top!r}")
    table = mlp_layers_table(mlp, heads)
    top_neurons = neurons.to_dataframe(min(top, len(neurons.layers) * neurons.scores.shape[1])) if neurons is not None else None
    return mlp_tables_figure(table, top_neurons)


def mlp_tables_figure(layers: pd.DataFrame, neurons: pd.DataFrame | None = None) -> go.Figure:
    """:func:`mlp_figure` from its tables (:func:`mlp_layers_table`, ``NeuronScores.to_dataframe()``), as a
    study folder keeps them."""
    first = layers.iloc[0]
    n_layers, metric = len(layers), str(first["metric"])
    cols = 2 if neurons is not None and len(neurons) else 1
    titles = ["per layer: attention heads (sum) vs MLP"] + (["strongest MLP neurons"] if cols == 2 else [])
    fig = make_subplots(rows=1, cols=cols, subplot_titles=titles, column_widths=[0.65, 0.35] if cols == 2 else None)
    if "heads" in layers:
        fig.add_trace(go.Bar(x=layers["layer"], y=layers["heads"], name=f"heads, summed ({first['heads_method']})",
                             marker_color=_ATTENTION, hovertemplate="L%{x}: %{y:.4f}<extra>heads</extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=layers["layer"], y=layers["mlp"], name=f"MLP ({first['mlp_method']})", marker_color=_MLP,
                         hovertemplate="L%{x}: %{y:.4f}<extra>MLP</extra>"), row=1, col=1)
    fig.update_xaxes(title_text="layer", dtick=1 if n_layers <= 32 else None, row=1, col=1)
    fig.update_yaxes(title_text=f"contribution to the {metric} (nats)", zeroline=True, row=1, col=1)
    if cols == 2:
        colours = np.where(neurons["score"] >= 0, "#d62728", "#1f77b4")
        fig.add_trace(go.Bar(x=neurons["score"], y=[f"L{a}N{b}" for a, b in zip(neurons["layer"], neurons["neuron"])],
                             orientation="h", marker_color=colours, showlegend=False,
                             hovertemplate="%{y}: %{x:.4f}<extra>neuron</extra>"), row=1, col=2)
        fig.update_yaxes(autorange="reversed", row=1, col=2)
        fig.update_xaxes(title_text="attribution (nats)", row=1, col=2)
    fig.update_layout(barmode="group", height=420, width=1100 if cols == 2 else 800,
                      title=f"Does the {first['bias']!r} bias live outside attention? ({metric}, {int(first['n_probes'])} probes)")
    return fig
