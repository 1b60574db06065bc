"""The head-role figure: one row of panels per head (see :mod:`biasgym_lens.heads.roles`)."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from biasgym_lens.heads.roles import ATTENTION_TARGETS, HeadRoles

__all__ = ["head_roles_figure"]

_PANELS = ("attention from the answer position", "direct effect on the keywords (nats)", "tokens it promotes most")


def head_roles_figure(roles: HeadRoles, *, top: int = 6) -> go.Figure:
    """One row per head: where it attends from the answer position (share per target, one bar group per
    group), its direct effect on the bias and contrast keywords (per group), and the tokens its direct effect
    promotes most for the injected token.

    Raises:
        ValueError: ``roles`` describes no head.
    """
    if not roles.heads:
        raise ValueError("roles describes no head")
    heads = [f"L{a}H{b}" for a, b in roles.heads]
    titles = [f"{h}: {p}" for h in heads for p in _PANELS]
    fig = make_subplots(rows=len(heads), cols=3, subplot_titles=titles, horizontal_spacing=0.08)
    groups = list(dict.fromkeys(roles.effects["group"]))
    colours = dict(zip(groups, ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")))
    for row, head in enumerate(heads, start=1):
        att = roles.attention[roles.attention["head"] == head]
        eff = roles.effects[roles.effects["head"] == head]
        for g in groups:
            a = att[att["group"] == g].set_index("target").reindex(list(ATTENTION_TARGETS))
            fig.add_trace(go.Bar(x=list(ATTENTION_TARGETS), y=a["prob"], name=g, legendgroup=g, showlegend=row == 1,
                                 marker_color=colours.get(g)), row=row, col=1)
            e = eff[eff["group"] == g].iloc[0]
            fig.add_trace(go.Bar(x=["bias keywords", "contrast keywords", "difference"],
                                 y=[e["bias_logit"], e["contrast_logit"], e["logit_diff"]], name=g, legendgroup=g,
                                 showlegend=False, marker_color=colours.get(g)), row=row, col=2)
        p = roles.promoted
        mine = p[(p["head"] == head) & (p["direction"] == "promoted") & (p["kind"] == "token")].nsmallest(top, "rank")
        fig.add_trace(go.Bar(x=mine["logit"], y=[repr(t) for t in mine["token"]], orientation="h", showlegend=False,
                             marker_color=colours.get(groups[0])), row=row, col=3)
        fig.update_yaxes(autorange="reversed", row=row, col=3)
    fig.update_layout(barmode="group", height=260 * len(heads) + 80, width=1100,
                      title=f"What the chosen heads do ({roles.bias}): token vs real groups")
    return fig
