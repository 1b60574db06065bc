"""Edge attribution patching: the graph, the scores against exact path patching, the Circuit and its figure."""

from __future__ import annotations

import pytest
import torch

from biasgym_lens.core.checks import InputTypeError
from biasgym_lens.core.hooks import active_hooks
from biasgym_lens.heads.circuits import Circuit, circuit
from biasgym_lens.heads.edge_check import check_edges
from biasgym_lens.heads.edge_graph import EdgeGraph, edge_graph
from biasgym_lens.heads.edges import edge_attribution_scores
from biasgym_lens.heads.head_scores import spearman
from biasgym_lens.heads.norm_vjp import (
    closed_form_projected,
    closed_form_vjp,
    norm_form,
    norm_scale,
    norm_vjp,
    projection_weights,
)
from biasgym_lens.heads.path_patching import path_patching_scores
from biasgym_lens.heads.probes import build_probe_set
from biasgym_lens.injection.catalogue import load_bias
from biasgym_lens.injection.training import inject
from biasgym_lens.study.circuit_plots import NEGATIVE, POSITIVE, circuit_figure

FAST = dict(epochs=1, batch_size=4, max_texts=4, lr=5e-2, progress=False, select_best=False)


@pytest.fixture
def injected(tiny_model):
    return tiny_model, inject(tiny_model, "late", **FAST)


def _probe_set(model, inj, n=6):
    return build_probe_set(model, load_bias("late"), inj.token, controls=["Japan", "Germany"], max_probes=n)


def _all_edges(graph):
    ups, downs = graph.upstream, graph.downstream
    return [(ups[i], downs[j]) for i, j in graph.valid().nonzero().tolist()]


def _clean(model):
    assert active_hooks(model) == []
    assert not model.cfg.use_split_qkv_input


# ------------------------------------------------------------------------------------------------ the graph


def _reads(up: str, down: str, n_layers: int, parallel: bool) -> bool:
    """Whether ``up`` writes before ``down`` reads, from the names alone (independent of EdgeGraph's indices)."""
    node = down.split(".")[0]
    up_layer = -1 if up == "embed" else int(up[1:].split("H")[0]) if up.startswith("L") else int(up[3:])
    if node == "logits":
        return True
    down_layer = int(node[1:].split("H")[0]) if node.startswith("L") else int(node[3:])
    if node.startswith("MLP") and up.startswith("L") and not parallel:
        return up_layer <= down_layer
    return up_layer < down_layer


@pytest.mark.parametrize("parallel", [False, True])
def test_the_graph_has_an_edge_where_a_node_writes_before_another_reads(parallel):
    g = EdgeGraph(3, 2, parallel)
    assert len(g.upstream) == g.n_upstream == 1 + 3 * 3 and len(g.downstream) == g.n_downstream == 3 * 7 + 1
    expected = torch.tensor([[_reads(u, d, 3, parallel) for d in g.downstream] for u in g.upstream])
    assert torch.equal(g.valid(), expected)
    assert g.edge("L0H1", "L2H1.v") == (g.upstream.index("L0H1"), g.downstream.index("L2H1.v"))
    with pytest.raises(ValueError, match="L0H1 -> L0H0.q is not an edge"):
        g.edge("L0H1", "L0H0.q")
    with pytest.raises(ValueError, match="'L7H0'"):
        g.edge("L7H0", "logits")
    with pytest.raises(ValueError, match="'L1H0.x'"):
        g.edge("embed", "L1H0.x")


# ------------------------------------------------------------------------------ scores against path patching


def test_edge_scores_are_the_first_order_of_exact_path_patching_on_every_edge(injected):
    """Removing ``eps`` times the upstream output from one input alone, the central difference of the exact
    effect divided by ``eps`` is the attribution score, probe by probe (the first-order term is the score);
    full removal ranks the edges like the scores do."""
    model, inj = injected
    with inj.apply(model):
        ps = _probe_set(model, inj, n=4)
        scores = edge_attribution_scores(model, ps)
        graph = edge_graph(model)
        assert torch.equal(~scores.isnan().any(0), graph.valid())
        edges = _all_edges(graph)
        eps = 1e-2
        plus = path_patching_scores(model, ps, edges, scale=eps)
        minus = path_patching_scores(model, ps, edges, scale=-eps)
        full = path_patching_scores(model, ps, edges)
    ups, downs = graph.upstream, graph.downstream
    att = torch.stack([scores[:, ups.index(u), downs.index(d)] for u, d in edges], 1)
    finite = (plus - minus) / (2 * eps)
    assert att.abs().max() > 1e-4  # the check is not vacuous
    assert (finite - att).abs().max() < 0.02 * att.abs().max(), (finite - att).abs().max()
    assert spearman(full.mean(0), att.mean(0)) > 0.8
    _clean(model)


def test_the_scores_into_a_norm_sum_to_zero(tiny_tokenizer_dir):
    """An RMSNorm input with a negligible epsilon is scale-invariant, so ``grad . input = 0``; without biases (Llama) an
    input is exactly the sum of its upstream outputs, so every input's edge scores sum to zero."""
    from biasgym_lens.testing import tiny_bridge

    model = tiny_bridge("llama", tiny_tokenizer_dir)
    inj = inject(model, "late", **FAST)
    for module in model.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 1e-12
    model.cfg.eps = 1e-12
    with inj.apply(model):
        scores = edge_attribution_scores(model, _probe_set(model, inj, n=3))
    total = scores.nansum(1)  # [probe, downstream]
    biggest = scores.nan_to_num().abs().amax(1)  # [probe, downstream]: the largest single edge into each input
    assert (biggest[:, -1] > 1e-3).all()
    assert (total.abs() <= 1e-4 * biggest.amax(1, keepdim=True)).all(), total.abs().amax(1) / biggest.amax(1)
    _clean(model)


@pytest.mark.parametrize("compat", [False, True], ids=["raw", "compat"])
def test_the_closed_form_norm_jacobian_is_autograds(tiny_tokenizer_dir, tiny_family, compat):
    from biasgym_lens.testing import tiny_bridge

    model = tiny_bridge(tiny_family, tiny_tokenizer_dir)
    if compat:
        model.enable_compatibility_mode(disable_warnings=True)
    ln = model.blocks[1].ln1
    x = (3.0 * torch.randn(2, 5, model.cfg.d_model) + 0.5).requires_grad_(True)
    vectors = torch.randn(7, 2, 5, model.cfg.d_model)
    exact, ok = norm_vjp(model, ln, x, ln(x), vectors)
    assert ok and norm_form(model, ln)[0] == ("ln" if tiny_family == "gpt2" else "rms")
    torch.testing.assert_close(closed_form_vjp(*norm_form(model, ln), x, vectors), exact, atol=1e-5, rtol=1e-4)
    one = torch.autograd.grad(ln(x), x, vectors[3])[0]  # one product, no batching
    torch.testing.assert_close(exact[3], one, atol=1e-6, rtol=1e-5)


def test_the_closed_form_written_in_place_is_autograds_product_of_the_projections(tiny_tokenizer_dir, tiny_family):
    """Edge attribution's fast path: head-space gradients projected by their weights and taken through the norm
    straight into a buffer equal autograd's vector-Jacobian products of the projected vectors."""
    from biasgym_lens.testing import tiny_bridge

    model = tiny_bridge(tiny_family, tiny_tokenizer_dir)
    ln, d = model.blocks[1].ln1, model.cfg.d_model
    x = (3.0 * torch.randn(2, 5, d) + 0.5).requires_grad_(True)
    W, g = torch.randn(6, d, 4), torch.randn(2, 5, 6, 4)
    exact, ok = norm_vjp(model, ln, x, ln(x), torch.einsum("rpce,cde->crpd", g, W))
    kind, gain, eps = norm_form(model, ln)
    r, chat = norm_scale(kind, eps, x)
    out = torch.full((6, 2, 5, d), float("nan"))
    got = closed_form_projected(projection_weights(kind, gain, W), g * r[..., None], chat, out)
    assert got is out and ok
    torch.testing.assert_close(out, exact, atol=1e-5, rtol=1e-4)


def test_raw_and_compatibility_mode_give_the_same_edge_scores(tiny_tokenizer_dir, monkeypatch):
    """Folded norm gains (tiny Llama: no biases to move) change the weights, not the edges; in both modes the
    closed-form norm Jacobian passes its check on layer 0 and serves the other layers."""
    from biasgym_lens.heads import edges as edges_module
    from biasgym_lens.testing import tiny_bridge

    checks = []

    def spy(*args, **kwargs):
        out = norm_vjp(*args, **kwargs)
        checks.append(out[1])
        return out

    monkeypatch.setattr(edges_module, "norm_vjp", spy)
    model = tiny_bridge("llama", tiny_tokenizer_dir)
    inj = inject(model, "late", **FAST)
    with inj.apply(model):
        raw = edge_attribution_scores(model, _probe_set(model, inj, n=3))
    model.enable_compatibility_mode(disable_warnings=True)
    inj = type(inj)(**{**inj.__dict__, "provenance": type(inj.provenance).of(model)})
    with inj.apply(model):
        compat = edge_attribution_scores(model, _probe_set(model, inj, n=3))
    scale = raw.nan_to_num().abs().max()
    torch.testing.assert_close(compat / scale, raw / scale, atol=1e-4, rtol=0, equal_nan=True)
    assert checks == [True, True]  # one check per pass (layer 0), passed; layer 1 used the closed form
    _clean(model)


def test_chunks_give_the_scores_of_one_pass(injected):
    model, inj = injected
    with inj.apply(model):
        ps = _probe_set(model, inj, n=4)
        one = edge_attribution_scores(model, ps, "token", max_tokens=None)
        chunked = edge_attribution_scores(model, ps, "token", max_tokens=8)
    assert len(ps.length_chunks(8)) == 4
    torch.testing.assert_close(chunked, one, atol=1e-6, rtol=1e-5, equal_nan=True)
    _clean(model)


def test_edges_batched_in_one_pass_equal_one_pass_each(injected):
    """Several edges per pass (the probe rows repeated, one patch per copy) give each edge's own pass."""
    model, inj = injected
    g = edge_graph(model)
    edges = _all_edges(g)[::5]
    assert {d.split(".")[-1] for _, d in edges} >= {"q", "k", "v", "logits"}
    with inj.apply(model):
        ps = _probe_set(model, inj, n=3)
        batched = path_patching_scores(model, ps, edges, edges_per_pass=7)
        single = path_patching_scores(model, ps, edges, edges_per_pass=1)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)
    _clean(model)


def test_path_patching_refuses_what_is_not_an_edge(injected):
    model, inj = injected
    with inj.apply(model):
        ps = _probe_set(model, inj, n=2)
        with pytest.raises(ValueError, match="L1H0 -> L0H0.q is not an edge"):
            path_patching_scores(model, ps, [("L1H0", "L0H0.q")])
        with pytest.raises(ValueError, match="'L9H0'"):
            path_patching_scores(model, ps, [("L9H0", "logits")])
        with pytest.raises(ValueError, match="got 0"):
            path_patching_scores(model, ps, [("embed", "logits")], edges_per_pass=0)
        with pytest.raises(ValueError, match="'nope'"):
            edge_attribution_scores(model, ps, "nope")
    _clean(model)


def test_post_norm_models_are_refused(tiny_tokenizer_dir):
    from biasgym_lens.testing import tiny_bridge

    model = tiny_bridge("gemma3", tiny_tokenizer_dir)
    inj = inject(model, "late", **FAST)
    with pytest.raises(NotImplementedError, match="post-attention norms"):
        circuit(model, inj, max_probes=2)
    _clean(model)


# ------------------------------------------------------------------------------------- the Circuit, the check


def test_circuit_tables(injected):
    model, inj = injected
    circ = circuit(model, inj, top_edges=5, heads=[(1, 2)], max_probes=4)
    assert isinstance(circ, Circuit) and circ.settings["n_probes"] == 4
    df = circ.to_dataframe()
    assert len(df) == int(circ.graph.valid().sum())
    assert (df["score"].abs().diff().dropna() <= 0).all() and df["in_circuit"].sum() == 5
    row = df.iloc[0]
    i, j = circ.graph.edge(*circ.top(1)[0])
    assert row["score"] == pytest.approx(float(circ.per_prompt[:, i, j].mean()))
    assert set(df["input"]) == {"q", "k", "v", "mlp", "logits"}
    down = [f"{d}.{i}" if i in "qkv" else d for d, i in zip(df["downstream"], df["input"])]
    assert all(_reads(u, d, model.cfg.n_layers, False) for u, d in zip(df["upstream"], down))
    nodes = circ.nodes()
    assert nodes.set_index("node").loc["L1H2", "chosen"] and nodes["chosen"].sum() == 1
    touched = set(circ.edges()["upstream"]) | set(circ.edges()["downstream"])
    assert set(nodes[nodes.in_circuit].node) == touched
    _clean(model)


@pytest.mark.wrong_types
def test_circuit_refuses_bad_options(injected):
    model, inj = injected
    with pytest.raises(ValueError, match="got 0"):
        circuit(model, inj, top_edges=0)
    with pytest.raises(InputTypeError, match="2.0"):
        circuit(model, inj, top_edges=2.0)
    with pytest.raises(ValueError, match="'xyz'"):
        circuit(model, inj, metric="xyz")
    with pytest.raises(ValueError, match="L9H0|9"):
        circuit(model, inj, heads=[(9, 0)])
    with pytest.raises(InputTypeError, match="'late'|str"):
        circuit(model, "late")
    _clean(model)


def test_check_edges_measures_the_top_and_a_random_sample(injected):
    model, inj = injected
    circ = circuit(model, inj, top_edges=10, max_probes=4)
    check = check_edges(model, inj, circ, top=6, random=6, seed=1)
    t = check.to_dataframe()
    assert list(t["sample"]) == ["top"] * 6 + ["random"] * 6
    assert len(set(zip(t.upstream, t.downstream, t.input))) == 12
    with inj.apply(model):  # the exact column is path patching of those edges on the circuit's probes
        ps = build_probe_set(model, load_bias("late"), inj.token, max_probes=4)
        names = circ.top(6)
        exact = path_patching_scores(model, ps, names).mean(0)
    torch.testing.assert_close(torch.tensor(t["exact"][:6].to_numpy()), exact, atol=1e-5, rtol=1e-4)
    summary = check.summary().set_index("sample")
    assert list(summary["edges"]) == [6, 6, 12]
    assert summary.loc["all", "spearman"] > 0.5
    with pytest.raises(ValueError, match="at most"):
        check_edges(model, inj, circ, top=10**6)
    _clean(model)


# ----------------------------------------------------------------------------------------------- the figure


def test_circuit_figure_draws_the_strongest_edges(injected):
    model, inj = injected
    circ = circuit(model, inj, top_edges=6, heads=[(1, 0)], max_probes=3)
    fig = circuit_figure(circ)
    lines = [t for t in fig.data if t.mode == "lines" and t.x[0] is not None]
    edges = circ.edges()
    assert len(lines) == 6
    widths = [t.line.width for t in lines]
    assert widths == sorted(widths, reverse=True) and widths[0] == pytest.approx(9.0)
    assert [t.line.color for t in lines] == [POSITIVE if s > 0 else NEGATIVE for s in edges["score"]]
    dashes = {"q": "solid", "k": "dash", "v": "dot", "mlp": "solid", "logits": "solid"}
    assert [t.line.dash for t in lines] == [dashes[i] for i in edges["input"]]
    chosen = next(t for t in fig.data if t.name == "chosen heads")
    assert list(chosen.text) == ["L1H0"] and list(chosen.y) == [2.0]  # row 0 is the embedding
    assert fig.layout.yaxis.autorange == "reversed"
    assert len([t for t in circuit_figure(circ, top_edges=2).data if t.mode == "lines" and t.x[0] is not None]) == 2
    _clean(model)
