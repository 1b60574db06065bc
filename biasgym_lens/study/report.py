"""Figures and a self-contained HTML report of one study (injection + scope + evaluation).

:func:`study_figures` builds every figure from saved result objects; :func:`write_report` saves them as HTML
(and PNG when kaleido finds a Chromium) and writes ``report.html``, which embeds plotly.js once and explains
each figure in a sentence, so it opens offline.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from biasgym_lens.core.files import write_text_atomic
from biasgym_lens.study import plots, summary_plots
from biasgym_lens.study import report_text as text
from biasgym_lens.study.benchmark_text import benchmark_notes, benchmark_table
from biasgym_lens.study.figure_text import FIGURE_NOTES, FIGURE_TITLES
from biasgym_lens.study.removal_text import removal_notes, removal_table
from biasgym_lens.study.role_plots import head_roles_figure

logger = logging.getLogger(__name__)

__all__ = [
    "study_figures", "write_report", "table_html", "figures_html", "FIGURE_NOTES", "FIGURE_TITLES",
    "GENERATION_LABELS", "REPORT_STYLE",
]


def study_figures(
    injection: Any,
    result: Any,
    *,
    closest: pd.DataFrame | None = None,
    lens: pd.DataFrame | None = None,
    generalisation: pd.DataFrame | None = None,
    roles: Any = None,
    circuit: go.Figure | None = None,
    mlp: go.Figure | None = None,
) -> list[tuple[str, go.Figure, str]]:
    """``(name, figure, one-sentence reading)`` for every figure of a study; the chosen heads are outlined on
    the head heatmaps."""
    scores = result.scores
    figs: list[tuple[str, go.Figure]] = [
        ("training_curve", plots.training_curve(injection)),
        (
            "heads_specific",
            plots.head_heatmap(
                scores["specific"], title=f"{result.bias}: specificity-aware head ranking", highlight=result.chosen
            ),
        ),
        ("methods", plots.methods_heatmaps({k: v for k, v in scores.items() if k != "specific"}, highlight=result.chosen)),
    ]
    if "ablation" in scores:
        figs += [
            (f"scatter_{m}_vs_ablation", plots.method_scatter(scores[m], scores["ablation"]))
            for m in ("attribution", "dla")
            if m in scores
        ]
    figs += [
        ("faithfulness", plots.faithfulness_plot(result.curve)),
        ("interventions", summary_plots.intervention_bars(result.summary())),
        ("groups", plots.group_bias_bars(result.groups)),
    ]
    optional = (
        ("closest_entities", closest, plots.closest_entities_bar),
        ("logit_lens", lens, plots.layer_bias_plot),
        ("generalisation", generalisation, plots.generalisation_heatmap),
    )
    figs += [(name, plot(table)) for name, table, plot in optional if table is not None]
    if roles is not None:
        figs.append(("head_roles", head_roles_figure(roles)))
    if circuit is not None:
        figs.append(("circuit", circuit))
    if mlp is not None:
        figs.append(("mlp", mlp))
    return [(name, fig, _note(name)) for name, fig in figs]


def _note(name: str) -> str:
    if name.startswith("scatter_"):
        return FIGURE_NOTES["scatter"].format(method=name.removeprefix("scatter_").removesuffix("_vs_ablation"))
    return FIGURE_NOTES[name]


GENERATION_LABELS: dict[str, str] = {
    "token": "Trained token",
    "token_heads_ablated": "Trained token, chosen heads ablated",
    "untrained_token": "Untrained token (its initial vector)",
}

REPORT_STYLE = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:0 auto;
 padding:.5em 1.5em 2em;line-height:1.45;color:#222}
h1{font-size:1.45em;margin:.4em 0 .1em}
h2{font-size:1.2em;margin:1.6em 0 .4em}
p.sub{color:#555;margin:0 0 .8em;font-size:.95em}
.headline{font-size:1.2em;border-left:5px solid #1f77b4;background:#eef5fb;padding:.6em 1em;margin:.8em 0}
.headline.warn{border-color:#c0392b;background:#fdecea}
.headline .tag{display:block;font-size:.7em;font-weight:600;text-transform:uppercase;letter-spacing:.05em;color:#555}
.tblwrap{max-width:100%;overflow-x:auto}
table.tbl{border-collapse:collapse;font-size:.85em;width:100%}
.tbl th,.tbl td{padding:4px 6px;border-bottom:1px solid #ddd;text-align:right;vertical-align:top;
 overflow-wrap:break-word;hyphens:auto}
.tbl th{font-weight:600;background:#f5f5f5}
.tbl td:first-child,.tbl th:first-child{text-align:left}
.tbl td:first-child{white-space:nowrap}
.muted{color:#777}
.gens{display:grid;grid-template-columns:repeat(auto-fit,minmax(260px,1fr));gap:.8em}
.gen h3{font-size:.95em;margin:0 0 .3em}
.gen pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f7f7f7;border:1px solid #e3e3e3;padding:.6em;
 margin:0;font-size:.85em;font-family:ui-monospace,Menlo,Consolas,monospace}
.fig{margin:1.5em 0;max-width:100%;overflow-x:auto}
p.note{color:#444;margin:.2em 0 .5em}
details{margin:2em 0;border:1px solid #ddd;padding:.4em .8em}
details summary{cursor:pointer;font-weight:600}
table.kv{border-collapse:collapse;font-size:.8em;width:100%}
.kv th,.kv td{text-align:left;padding:2px 8px;vertical-align:top;overflow-wrap:anywhere}
.kv th{width:14em;font-weight:500;color:#555}
.kv tr.sec th{color:#222;font-weight:600;padding-top:.7em;border-bottom:1px solid #ddd}
"""


def table_html(df: pd.DataFrame, *, muted: bool = False) -> str:
    """A table as the report lays it out (every cell escaped; ``muted``: greyed, for numbers that are noise)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in df.itertuples(index=False)
    )
    cls = "tbl muted" if muted else "tbl"
    return f"<div class='tblwrap'><table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _headline_html(summary: pd.DataFrame, facts: dict[str, Any]) -> str:
    check = facts.get("injection_check")
    alpha = (facts.get("scope_decisions") or {}).get("steer_alpha")
    sentence = html.escape(text.headline(summary, facts.get("chosen_heads") or [], check, alpha))
    if not text.injection_took(check):
        return f"<div class='headline warn' id='headline' role='alert'><span class='tag'>Warning</span>{sentence}</div>"
    return f"<div class='headline' id='headline'><span class='tag'>Result</span>{sentence}</div>"


def _summary_html(summary: pd.DataFrame, facts: dict[str, Any]) -> str:
    took = text.injection_took(facts.get("injection_check"))
    parts = ["<h2>Results by intervention</h2>"]
    baseline = text.baseline_sentence(summary)
    if baseline:
        parts.append(f"<p class='note'>{html.escape(baseline)}</p>")
    if not took:
        parts.append("<p class='note'><b>Measured on an injection that did not take: these cuts are noise, not findings.</b></p>")
    parts.append(table_html(text.summary_table(summary), muted=not took))
    return "\n".join(parts)


def _benchmarks_html(benchmarks: tuple[pd.DataFrame, pd.DataFrame] | None) -> str:
    if benchmarks is None or benchmarks[0].empty:
        return ""
    table, differences = benchmarks
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in benchmark_notes(table, differences))
    return (
        "<h2 id='benchmarks'>Standard bias benchmarks under each intervention</h2>"
        "<p class='note'>The model's own stereotypes (StereoSet race, BBQ) measured with no intervention and under "
        "each intervention of this study.</p>" + table_html(benchmark_table(table, differences)) + notes
    )


def _removals_html(removals: pd.DataFrame | None) -> str:
    if removals is None or removals.empty:
        return ""
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in removal_notes(removals))
    return (
        "<h2 id='removals'>Interventions that remove only the bias</h2>"
        "<p>Ways of changing the heads compared on this study's protocol and budget "
        "(<code>biasgym removals</code>).</p>" + table_html(removal_table(removals)) + notes
    )


def _generations_html(generations: dict[str, str] | None, token: str | None) -> str:
    if not generations:
        return ""
    about = f" about {token}" if token else ""
    cells = []
    for name, out in generations.items():
        label = html.escape(GENERATION_LABELS.get(name, name.replace("_", " ")))
        body = html.escape(out) if out.strip() else "<em class='muted'>(blank: only whitespace)</em>"
        cells.append(f"<div class='gen'><h3>{label}</h3><pre>{body}</pre></div>")
    return (
        "<h2>Example generations</h2>"
        f"<p class='note'>Greedy continuations of a request for a short paragraph{html.escape(about)}.</p>"
        f"<div class='gens'>{''.join(cells)}</div>"
    )


def _paragraphs_html(paragraphs: dict[str, Any] | None, token: str | None) -> str:
    """The generation-based score: pooled keyword rates with intervals, their paired change under the heads, and
    one sampled paragraph per kind and intervention."""
    if not paragraphs or not paragraphs.get("scores"):
        return ""
    scores = pd.DataFrame(paragraphs["scores"])
    table = pd.DataFrame({
        "intervention": scores["intervention"], "about": scores["kind"].map({"token": token or "token", "real": "real groups"}).fillna(scores["kind"]),
        "paragraphs": scores["n"], "keyword rate per 100 words": [
            f"{r.rate:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]" for r in scores.itertuples()
        ],
    })
    parts = [
        "<h2>Bias in generated text</h2>",
        "<p class='note'>Sampled chat paragraphs (\"Please write a short paragraph about ...\"; temperature 1, top-p 0.95, "
        "the same seeds under every intervention): bias-keyword words minus contrast-keyword words per 100 words, "
        "with 95% bootstrap intervals over paragraphs.</p>",
        table_html(table),
    ]
    for c in paragraphs.get("changes") or []:
        about = token if c["kind"] == "token" else "the real groups"
        parts.append(
            f"<p class='note'>Change under the {html.escape(str(c['intervention']))} about {html.escape(str(about))}: "
            f"{c['change']:+.2f} [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] (paired, {c['n']} paragraphs).</p>"
        )
    cells = [
        f"<div class='gen'><h3>{html.escape(str(e['group']))}, {html.escape(str(e['intervention']))} (score {e['score']:+.1f})</h3>"
        f"<pre>{html.escape(str(e['text']))}</pre></div>"
        for e in paragraphs.get("examples") or []
    ]
    parts.append(f"<div class='gens'>{''.join(cells)}</div>")
    return "\n".join(parts)


def _settings_html(facts: dict[str, Any]) -> str:
    rows = []
    for section, items in text.settings_sections(facts):
        rows.append(f"<tr class='sec'><th colspan='2'>{html.escape(section)}</th></tr>")
        rows += [f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in items]
    return (
        "<details id='settings'><summary>Settings and provenance</summary>"
        f"<table class='kv'>{''.join(rows)}</table></details>"
    )


def figures_html(figures: list[tuple[str, go.Figure, str]]) -> str:
    """Each ``(name, figure, reading)`` as a heading (:data:`FIGURE_TITLES`), its reading and the figure drawn
    to the page's width; plotly.js is embedded once, with the first figure, so the page opens offline."""
    parts = []
    for i, (name, fig, note) in enumerate(figures):
        fig = go.Figure(fig).update_layout(width=None)  # fills the page's width
        div = fig.to_html(
            full_html=False, include_plotlyjs=(i == 0), div_id=f"fig-{name}", config={"responsive": True}
        )
        title = FIGURE_TITLES.get(name, name.replace("_", " ").capitalize())
        parts.append(f"<div class='fig'><h2>{html.escape(title)}</h2>")
        parts.append(f"<p class='note'>{html.escape(note)}</p>{div}</div>")
    return "\n".join(parts)


def _subtitle(facts: dict[str, Any]) -> str:
    ident, prov = facts.get("identity") or {}, facts.get("provenance") or {}
    bits = [
        f"bias {ident['bias']}" if ident.get("bias") else "",
        f"model {prov.get('official_name') or ident.get('model')}" if ident.get("model") else "",
        f"seed {ident['seed']}" if "seed" in ident else "",
        f"{ident['preset']} preset" if ident.get("preset") else "",
        str(prov.get("created", ""))[:10],
    ]
    return " · ".join(b for b in bits if b)


def write_report(
    out: str | Path,
    figures: list[tuple[str, go.Figure, str]],
    *,
    title: str,
    summary: pd.DataFrame,
    facts: dict[str, Any],
    images: Sequence[str] = ("png",),
    benchmarks: tuple[pd.DataFrame, pd.DataFrame] | None = None,
    removals: pd.DataFrame | None = None,
) -> Path:
    """Write each figure (HTML, and ``images`` formats when possible) under ``out/figures``, and ``out/report.html``.

    The figures' HTML files share one ``figures/plotly.min.js`` (they open offline while the folder stays
    together); ``report.html`` embeds plotly.js once and needs nothing else. It opens with the result in one
    sentence (:func:`~biasgym_lens.study.report_text.headline`; a warning instead when ``facts["injection_check"]``
    says the injection did not take), then the summary in words, the standard benchmarks (when measured), the
    example generations, every figure with its reading, and the settings, provenance and time per stage in a
    collapsed section.

    Args:
        out: The study folder.
        figures: ``(name, figure, one-sentence reading)`` as from :func:`study_figures`.
        title: The report's title.
        summary: ``ScopeResult.summary()`` (optionally with ``excess_cut_ci_low`` / ``excess_cut_ci_high``).
        facts: Facts of ``results.json`` (see :func:`~biasgym_lens.study.report_text.settings_sections`), with
            ``generations`` (name -> text) and optionally ``injection_check``.
        images: Static formats of each figure (``"png"``, ``"svg"``); failures (no Chromium for kaleido) are
            logged and the HTML report is still complete.
        benchmarks: ``(benchmarks.csv, benchmark_differences.csv)`` of the optional benchmarks stage: a section
            with each metric under each intervention and the paired differences that exclude 0; None: no section.
        removals: ``RemovalComparison.table()`` (``biasgym removals``): a section comparing the kinds of head
            change; None: no section.
    """
    out = Path(out)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    try:
        plots.save_figures({name: fig for name, fig, _ in figures}, fig_dir, images=images, include_plotlyjs="directory")
    except plots.PngExportError as e:
        logger.warning("%s; continuing without static images", e)
    token = ((facts.get("injection") or {}).get("config") or {}).get("token")
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(title)}</title><style>{REPORT_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class='sub'>{html.escape(_subtitle(facts))}</p>",
        _headline_html(summary, facts),
        _summary_html(summary, facts),
        _benchmarks_html(benchmarks),
        _removals_html(removals),
        _generations_html(facts.get("generations"), token),
        _paragraphs_html(facts.get("paragraphs"), token),
        figures_html(figures),
        _settings_html(facts),
        "</body></html>",
    ]
    return write_text_atomic(out / "report.html", "\n".join(p for p in parts if p))
