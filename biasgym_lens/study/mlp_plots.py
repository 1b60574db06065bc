"""The attention-versus-MLP figure: per layer, the MLP's score beside the sum of its heads' scores (see
:mod:`biasgym_lens.heads.mlps`), and optionally the strongest MLP neurons."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from biasgym_lens.heads.head_scores import HeadScores
from biasgym_lens.heads.mlps import MlpScores, NeuronScores

__all__ = ["mlp_figure"]

_ATTENTION, _MLP = "#1f77b4", "#ff7f0e"


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
    if heads is not None and heads.n_layers != mlp.n_layers:
        raise ValueError(f"heads have {heads.n_layers} layers but the MLP scores {mlp.n_layers}; use one model's scores")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be an int >= 1, got {top!r}")
    layers = np.arange(mlp.n_layers)
    cols = 2 if neurons is not None else 1
    titles = ["per layer: attention heads (sum) vs MLP"] + (["strongest MLP neurons"] if neurons is not None else [])
    fig = make_subplots(rows=1, cols=cols, subplot_titles=titles, column_widths=[0.65, 0.35] if cols == 2 else None)
    if heads is not None:
        fig.add_trace(go.Bar(x=layers, y=heads.scores.sum(1).numpy(), name=f"heads, summed ({heads.method})",
                             marker_color=_ATTENTION, hovertemplate="L%{x}: %{y:.4f}<extra>heads</extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=layers, y=mlp.scores.numpy(), name=f"MLP ({mlp.method})", marker_color=_MLP,
                         hovertemplate="L%{x}: %{y:.4f}<extra>MLP</extra>"), row=1, col=1)
    fig.update_xaxes(title_text="layer", dtick=1 if mlp.n_layers <= 32 else None, row=1, col=1)
    fig.update_yaxes(title_text=f"contribution to the {mlp.metric} (nats)", zeroline=True, row=1, col=1)
    if neurons is not None:
        df = neurons.to_dataframe(min(top, len(neurons.layers) * neurons.scores.shape[1]))
        colours = np.where(df["score"] >= 0, "#d62728", "#1f77b4")
        fig.add_trace(go.Bar(x=df["score"], y=[f"L{a}N{b}" for a, b in zip(df["layer"], df["neuron"])],
                             orientation="h", marker_color=colours, showlegend=False,
                             hovertemplate="%{y}: %{x:.4f}<extra>neuron</extra>"), row=1, col=2)
        fig.update_yaxes(autorange="reversed", row=1, col=2)
        fig.update_xaxes(title_text="attribution (nats)", row=1, col=2)
    fig.update_layout(barmode="group", height=420, width=1100 if neurons is not None else 800,
                      title=f"Does the {mlp.bias!r} bias live outside attention? ({mlp.metric}, {mlp.n_probes} probes)")
    return fig
