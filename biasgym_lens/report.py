"""Figures and a self-contained HTML report of one study (injection + scope + evaluation).

:func:`study_figures` builds every figure from saved result objects; :func:`write_report` saves them as HTML
(and PNG when kaleido finds a Chromium) and writes ``report.html``, which embeds plotly.js once and explains
each figure in a sentence, so it opens offline.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from biasgym_lens import plots
from biasgym_lens.artifacts import write_text_atomic

logger = logging.getLogger(__name__)

__all__ = ["study_figures", "write_report"]


def study_figures(
    injection: Any,
    result: Any,
    *,
    closest: pd.DataFrame | None = None,
    lens: pd.DataFrame | None = None,
    generalisation: pd.DataFrame | None = None,
) -> list[tuple[str, go.Figure, str]]:
    """``(name, figure, one-sentence explanation)`` for every figure of a study."""
    figs: list[tuple[str, go.Figure, str]] = [
        (
            "training_curve",
            plots.training_curve(injection),
            "Training loss of the injected token's embedding per step, and its bias logit difference (and excess "
            "over control groups) on the selection probes after each epoch; the dotted line marks the kept epoch.",
        ),
        (
            "heads_specific",
            plots.head_heatmap(result.scores["specific"], title=f"{result.bias}: specificity-aware head ranking"),
            "Each head's estimated contribution to the token's excess over control groups, minus its estimated "
            "damage to neutral text; red heads carry the bias, the chosen heads are the top of this ranking.",
        ),
        (
            "methods",
            plots.methods_heatmaps({k: v for k, v in result.scores.items() if k != "specific"}),
            "The same heads scored four ways: direct logit attribution, attention from the answer to the token, "
            "attribution patching, and exact single-head ablation.",
        ),
    ]
    if "ablation" in result.scores:
        for m in ("attribution", "dla"):
            if m in result.scores:
                figs.append(
                    (
                        f"scatter_{m}_vs_ablation",
                        plots.method_scatter(result.scores[m], result.scores["ablation"]),
                        f"Each dot is a head: its {m} score against its exact ablation effect; the title gives their "
                        "rank correlation.",
                    )
                )
    figs += [
        (
            "faithfulness",
            plots.faithfulness_plot(result.curve),
            "Token excess and neutral-text perplexity increase (on the curve's few passages) after ablating the top "
            "k heads of the ranking, against k random heads (grey band); the dashed line is the capability budget. "
            "The chosen k is the lowest-excess point within it whose cost the final passages confirm.",
        ),
        (
            "groups",
            plots.group_bias_bars(result.groups),
            "Bias logit difference on held-out probes for the injected token, the real groups and the control "
            "groups, with no intervention and under each intervention.",
        ),
    ]
    if closest is not None:
        figs.append(
            (
                "closest_entities",
                plots.closest_entities_bar(closest),
                "Countries whose embedding is closest to the trained vector, beside the same ranking for a vector "
                "trained on another bias: when both agree, the ranking says little about this bias.",
            )
        )
    if lens is not None:
        figs.append(
            (
                "logit_lens",
                plots.layer_bias_plot(lens),
                "The bias logit difference read from the residual stream after each layer (through the final norm): "
                "where in depth the token's bias appears.",
            )
        )
    if generalisation is not None:
        figs.append(
            (
                "generalisation",
                plots.generalisation_heatmap(generalisation),
                "Cut of each bias's token excess when ablating heads found on another bias.",
            )
        )
    return figs


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0, classes="tbl")


def write_report(
    out: str | Path,
    figures: list[tuple[str, go.Figure, str]],
    *,
    title: str,
    summary: pd.DataFrame,
    facts: dict[str, Any],
    images: Sequence[str] = ("png",),
) -> Path:
    """Write each figure (HTML, and ``images`` formats when possible) under ``out/figures``, and ``out/report.html``.

    Static export failures (no Chromium for kaleido) are logged once and the HTML report is still complete.
    """
    out = Path(out)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    try:
        plots.save_figures({name: fig for name, fig, _ in figures}, fig_dir, images=images, include_plotlyjs="cdn")
    except plots.PngExportError as e:
        logger.warning("%s; continuing without static images", e)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
        ".tbl td,.tbl th{padding:2px 8px;text-align:right}.fig{margin:2em 0}p.note{color:#444}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Summary</h2>",
        _table(summary),
        "<h2>Settings and provenance</h2><pre>" + html.escape(json.dumps(facts, indent=1, default=str)) + "</pre>",
    ]
    for i, (name, fig, note) in enumerate(figures):
        div = fig.to_html(full_html=False, include_plotlyjs=(i == 0), div_id=f"fig-{name}")
        parts.append(f"<div class='fig'><h2>{html.escape(name.replace('_', ' '))}</h2>")
        parts.append(f"<p class='note'>{html.escape(note)}</p>{div}</div>")
    parts.append("</body></html>")
    return write_text_atomic(out / "report.html", "\n".join(parts))
