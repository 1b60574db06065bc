"""Plots on real result objects (traces, titles, no NaN) and the logit lens against the model's own logits."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from biasgym_lens.evaluation.elicit import closest_entities
from biasgym_lens.heads.biasscope import scope
from biasgym_lens.heads.lens import layer_logit_diff
from biasgym_lens.heads.probes import build_probe_set
from biasgym_lens.injection.catalogue import load_bias
from biasgym_lens.injection.metrics import logit_diff
from biasgym_lens.injection.training import inject
from biasgym_lens.study import figure_files, plots

FAST_INJECT = dict(epochs=1, batch_size=4, max_texts=4, lr=5e-2, progress=False, select_best=False)
FAST_SCOPE = dict(
    ablation_probes=3, ablation_controls=1, ks=(1, 2), random_draws=2, curve_passages=3, tune_passages=4, final_passages=3,
    mc_items=4, steer_alphas=(0.5,), methods=("dla", "attention", "attribution", "ablation"),
)


@pytest.fixture(scope="module")
def objects(_tiny_models):
    model = _tiny_models["llama"]
    inj = inject(model, "late", **FAST_INJECT)
    other = inject(model, "math", **FAST_INJECT)
    res = scope(model, inj, progress=False, **FAST_SCOPE)
    return model, inj, other, res


def _no_nan(fig: go.Figure) -> None:
    for tr in fig.data:
        for attr in ("x", "y", "z"):
            v = getattr(tr, attr, None)
            if v is not None:
                arr = np.asarray(v, dtype=object).ravel()
                nums = [float(a) for a in arr if isinstance(a, (int, float, np.floating))]
                assert not any(np.isnan(nums)), f"NaN in {tr.type}.{attr}"


def test_every_plot_on_real_results(objects):
    model, inj, other, res = objects
    figs = {
        "heatmap": plots.head_heatmap(res.scores["dla"]),
        "methods": plots.methods_heatmaps({k: v for k, v in res.scores.items() if k != "specific"}),
        "scatter": plots.method_scatter(res.scores["attribution"], res.scores["ablation"]),
        "training": plots.training_curve(inj),
        "entities": plots.closest_entities_bar(closest_entities(inj, model, control=other)),
        "curve": plots.faithfulness_plot(res.curve),
        "groups": plots.group_bias_bars(res.groups),
    }
    assert figs["heatmap"].data[0].type == "heatmap" and figs["heatmap"].data[0].zmid == 0
    assert figs["heatmap"].layout.xaxis.title.text == "head" and figs["heatmap"].layout.yaxis.title.text == "layer"
    assert len(figs["methods"].data) == 4
    assert "Spearman" in figs["scatter"].layout.title.text
    assert len(figs["scatter"].data[0].x) == model.cfg.n_layers * model.cfg.n_heads
    assert len(figs["training"].data) == 3
    assert len(figs["entities"].data) == 2
    assert len(figs["groups"].data) == res.groups.intervention.nunique()
    assert {tr.name for tr in figs["curve"].data} >= {"chosen ranking", "random heads (min-max)"}
    for name, fig in figs.items():
        assert fig.layout.title.text, name
        if name != "training":  # the epoch-0 training loss is NaN by design and not plotted
            _no_nan(fig)


def test_attention_pattern_and_generalisation(objects):
    model, inj, _, _ = objects
    with inj.apply(model):
        ps = build_probe_set(model, load_bias("late"), inj.token, controls=[], max_probes=1)
        _, cache = model.run_with_cache(ps.batch.input_ids, names_filter=lambda n: n == "blocks.1.attn.hook_pattern")
    pat = cache["blocks.1.attn.hook_pattern"][0, 0]
    toks = [model.tokenizer.decode([int(t)]) for t in ps.batch.input_ids[0]]
    fig = plots.attention_pattern(pat, toks)
    assert list(fig.data[0].x)[0].startswith("0:") and fig.data[0].zmax == 1
    with pytest.raises(ValueError, match="expected"):
        plots.attention_pattern(pat, toks[:-1])
    import pandas as pd

    m = pd.DataFrame([[0.5, 0.1], [0.2, float("nan")]], index=["late", "math"], columns=["late", "math"])
    g = plots.generalisation_heatmap(m)
    assert g.data[0].text[1][1] == ""


def test_logit_lens_last_layer_equals_model_logits(objects):
    model, inj, _, _ = objects
    with inj.apply(model):
        ps = build_probe_set(model, load_bias("late"), inj.token, controls=["Japan"], max_probes=4)
        df = layer_logit_diff(model, ps)
        with torch.no_grad():
            logits = model(ps.batch.input_ids, attention_mask=ps.batch.attention_mask)
    last = logits[torch.arange(len(ps.batch)), ps.answer_positions]
    ld = logit_diff(last, ps.keywords)
    final = df[df.layer == model.cfg.n_layers - 1].set_index("group")["logit_diff"]
    assert final[inj.token] == pytest.approx(float(ld[:4].mean()), abs=1e-4)
    assert final["Japan"] == pytest.approx(float(ld[4:].mean()), abs=1e-4)
    assert set(df.layer) == set(range(-1, model.cfg.n_layers))
    fig = plots.layer_bias_plot(df)
    assert len(fig.data) == 2


def test_save_figure_html_offline_and_png_error(tmp_path, monkeypatch, objects):
    _, _, _, res = objects
    fig = plots.head_heatmap(res.scores["dla"])
    html = plots.save_figure(fig, tmp_path / "fig", images=())[0]
    text = html.read_text()
    assert 'src="https://cdn.plot.ly' not in text and len(text) > 1_000_000  # plotly.js embedded: works offline

    def fail(*a, **k):
        raise RuntimeError("no browser")

    monkeypatch.setattr(figure_files, "kaleido_write", fail)
    with pytest.raises(plots.PngExportError, match="apt-get install chromium"):
        plots.save_figure(fig, tmp_path / "fig2", images=("svg",))
    assert (tmp_path / "fig2.html").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "fig.html", "fig2.html"
    ]  # no half-written image left
    with pytest.raises(ValueError, match="'jpg'.*valid"):
        plots.save_figure(fig, tmp_path / "fig3", images=("jpg",))


@pytest.mark.skipif(
    not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")),
    reason="static export needs a Chromium (Debian: apt-get install chromium)",
)
def test_png_and_svg_export_through_kaleido(tmp_path, objects):
    import xml.etree.ElementTree as ET

    _, _, _, res = objects
    fig = plots.head_heatmap(res.scores["dla"])
    paths = plots.save_figure(fig, tmp_path / "heads", images=("png", "svg"))
    assert [p.suffix for p in paths] == [".html", ".png", ".svg"]
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    root = ET.parse(paths[2]).getroot()
    assert root.tag.endswith("svg") and "layer" in paths[2].read_text()  # axis title drawn as text
    # several figures in one kaleido session: each file is its own figure
    two = plots.save_figures({"dla": fig, "attention": plots.head_heatmap(res.scores["attention"])}, tmp_path / "many")
    assert [p.name for p in two] == ["dla.html", "attention.html", "dla.png", "attention.png"]
    assert two[2].read_bytes() != two[3].read_bytes() and all(p.stat().st_size > 1000 for p in two[2:])
    assert not list((tmp_path / "many").glob("*.tmp*"))


def test_head_heatmap_outlines_the_highlighted_heads():
    z = np.arange(12, dtype=float).reshape(3, 4) - 5
    heads = [(2, 1), (0, 3)]
    fig = plots.head_heatmap(z, highlight=heads)
    rects = [s for s in fig.layout.shapes if s.type == "rect"]
    # one rectangle per head, exactly around its cell (x = head, y = layer, cells of width 1)
    assert [(s.x0, s.x1, s.y0, s.y1) for s in rects] == [(h - 0.5, h + 0.5, ly - 0.5, ly + 0.5) for ly, h in heads]
    assert [s.name for s in rects] == ["L2H1", "L0H3"]
    notes = [(a.x, a.y, a.text) for a in fig.layout.annotations]
    assert notes == [(1, 2, "<b>1</b>"), (3, 0, "<b>2</b>")]  # numbered in the given (ranking) order
    assert not plots.head_heatmap(z).layout.shapes  # nothing drawn without highlight
    with pytest.raises(ValueError, match="L3H0.*layers 0-2, heads 0-3"):
        plots.head_heatmap(z, highlight=[(3, 0)])
    panels = plots.methods_heatmaps({"a": z, "b": -z}, highlight=heads)
    by_panel = {}
    for s in panels.layout.shapes:
        by_panel.setdefault(s.xref, []).append((s.x0, s.y0))
    assert by_panel == {"x": [(0.5, 1.5), (2.5, -0.5)], "x2": [(0.5, 1.5), (2.5, -0.5)]}


def _colour(trace) -> str:
    """The RGB of a trace as drawn (its fill for a band, else its line), without the alpha."""
    c = trace.fillcolor if trace.fill else trace.line.color
    assert c, f"trace {trace.name} has no explicit colour (it would depend on its position)"
    if "(" not in c:
        return c
    return ",".join(n.strip() for n in c[c.index("(") + 1 : c.index(")")].split(",")[:3])


def test_faithfulness_legend_matches_the_colours_in_both_panels():
    from types import SimpleNamespace

    import pandas as pd

    rows = [("top", k, 1.0 - 0.2 * k, 0.01 * k) for k in (1, 2, 4)]
    rows += [("random", k, 1.0 - 0.01 * k * d, 0.005 * k * d) for k in (1, 2, 4) for d in (1, 2)]
    table = pd.DataFrame(rows, columns=["selection", "k", "excess", "perplexity_increase"])
    curve = SimpleNamespace(table=table, budget_on="perplexity", baseline_excess=1.0, budget=0.05, chosen_k=lambda: 2)
    fig = plots.faithfulness_plot(curve)
    names = {tr.name for tr in fig.data}
    assert names == {"chosen ranking", "random heads (min-max)", "random heads (mean)"}
    for name in names:
        traces = [tr for tr in fig.data if tr.name == name]
        assert sorted(tr.xaxis for tr in traces) == ["x", "x2"], name  # drawn in both panels
        assert sum(bool(tr.showlegend) for tr in traces) == 1, name  # one legend entry
        assert len({_colour(tr) for tr in traces}) == 1, name  # the same colour in both panels
        assert len({tr.legendgroup for tr in traces}) == 1, name  # its legend entry toggles both panels
    top = next(tr for tr in fig.data if tr.name == "chosen ranking")
    rnd = next(tr for tr in fig.data if tr.name == "random heads (mean)")
    assert _colour(top) != _colour(rnd)
    band = next(tr for tr in fig.data if tr.name == "random heads (min-max)" and tr.xaxis == "x")
    # the band runs along the maximum over draws and back along the minimum (draws: 1 - 0.01 k d, d = 1, 2)
    assert band.mode == "lines" and list(band.x) == [1, 2, 4, 4, 2, 1]
    assert np.allclose(band.y, [0.99, 0.98, 0.96, 0.92, 0.96, 0.98])


def test_save_figures_can_share_one_plotly_bundle(tmp_path):
    from plotly.offline import get_plotlyjs

    figs = {"a": go.Figure(go.Bar(y=[1])), "b": go.Figure(go.Bar(y=[2]))}
    paths = plots.save_figures(figs, tmp_path, images=(), include_plotlyjs="directory")
    assert [p.name for p in paths] == ["plotly.min.js", "a.html", "b.html"]
    assert (tmp_path / "plotly.min.js").read_text() == get_plotlyjs()
    for p in paths[1:]:
        text = p.read_text()
        assert 'src="plotly.min.js"' in text and len(text) < 100_000
    (tmp_path / "plotly.min.js").write_text("stale")  # another plotly version's bundle is replaced
    plots.save_figures(figs, tmp_path, images=(), include_plotlyjs="directory")
    assert (tmp_path / "plotly.min.js").read_text() == get_plotlyjs()


def test_intervention_bars_draw_the_summary_intervals():
    from biasgym_lens.study.summary_plots import intervention_bars

    summary = pd.DataFrame(
        {
            "intervention": ["none", "heads", "random_heads"],
            "excess_cut": [0.0, 0.6, -0.01], "excess_cut_ci_low": [0.0, 0.5, -0.1], "excess_cut_ci_high": [0.0, 0.7, 0.05],
            "real_gap_cut": [0.0, 0.3, 0.0], "perplexity_increase": [0.0, 0.014, 0.002],
        }
    )
    fig = intervention_bars(summary)
    assert len(fig.data) == 3 and list(fig.data[0].x) == ["heads", "random_heads"]  # "none" is the reference
    bar = fig.data[0]
    assert list(bar.error_y.array) == pytest.approx([0.1, 0.06]) and list(bar.error_y.arrayminus) == pytest.approx([0.1, 0.09])
    assert list(fig.data[1].error_y.array) == [0.0, 0.0]  # no interval columns: no bars drawn
    with pytest.raises(ValueError, match="no intervention rows"):
        intervention_bars(summary.iloc[:1])
