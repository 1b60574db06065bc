"""MLP layer and neuron scores: against forward-only finite differences, a hand-written zeroing loop and the
down projection's algebra; bad inputs; no hook left; and a short run on the real bundled model."""

from __future__ import annotations

import time

import pytest
import torch

from biasgym_lens.core.checks import InputTypeError
from biasgym_lens.core.hooks import active_hooks, hooked
from biasgym_lens.heads import mlps
from biasgym_lens.heads.head_scores import score_heads, spearman
from biasgym_lens.heads.mlps import (
    MlpScores,
    NeuronScores,
    mlp_ablation,
    mlp_attribution,
    mlp_scores,
    neuron_attribution,
    neuron_scores,
)
from biasgym_lens.heads.patching import acts_and_grads, probe_totals
from biasgym_lens.heads.probes import ProbeSet, build_probe_set
from biasgym_lens.injection.catalogue import load_bias
from biasgym_lens.injection.training import inject

FAST = dict(epochs=1, batch_size=4, max_texts=4, lr=5e-2, progress=False, select_best=False)
CONTROLS = ["Japan", "Germany"]


@pytest.fixture
def injected(tiny_model):
    return tiny_model, inject(tiny_model, "late", **FAST)


def _probe_set(model, inj):
    return build_probe_set(model, load_bias("late"), inj.token, controls=CONTROLS, max_probes=6)


def _metric(model, ps, hooks=()):
    """The metric per probe from one plain full forward pass (no resuming, no answer-only unembedding)."""
    with torch.no_grad(), hooked(model, fwd_hooks=list(hooks)):
        return ps.metric_per_probe(model(ps.batch.input_ids, attention_mask=ps.batch.attention_mask))


def _scale(factor, unit=None):
    def hook(x, hook):
        if unit is None:
            return x * factor
        x = x.clone()
        x[..., unit] *= factor
        return x

    return hook


def _central_difference(model, ps, name, eps, unit=None):
    """d metric / d alpha at alpha = 1 of scaling the activation at ``name`` (or one unit of it) by alpha, from
    forward passes only: the first-order term of ``metric(clean) - metric(activation zeroed)``."""
    up = _metric(model, ps, [(name, _scale(1 + eps, unit))])
    down = _metric(model, ps, [(name, _scale(1 - eps, unit))])
    return (up - down) / (2 * eps)


def test_layer_attribution_is_the_forward_only_derivative_of_scaling_the_mlp_output(injected):
    model, inj = injected
    with inj.apply(model):
        ps = _probe_set(model, inj)
        attr = mlp_attribution(model, ps)
        assert attr.shape == (ps.n_probes, model.cfg.n_layers)
        for layer in range(model.cfg.n_layers):
            fd = _central_difference(model, ps, f"blocks.{layer}.hook_mlp_out", 1e-2)
            torch.testing.assert_close(attr[:, layer], fd, atol=2e-5, rtol=1e-3)
    assert active_hooks(model) == []


def test_exact_ablation_equals_a_hand_written_zeroing_loop(injected):
    """The resumed, answer-only scan equals one plain full forward pass per layer with ``run_with_hooks``."""
    model, inj = injected
    with inj.apply(model):
        ps = _probe_set(model, inj)
        exact = mlp_ablation(model, ps)
        b = ps.batch
        with torch.no_grad():
            clean = ps.metric_per_probe(model(b.input_ids, attention_mask=b.attention_mask))
            for layer in range(model.cfg.n_layers):
                logits = model.run_with_hooks(
                    b.input_ids, attention_mask=b.attention_mask,
                    fwd_hooks=[(f"blocks.{layer}.mlp.hook_out", lambda x, hook: torch.zeros_like(x))],
                )
                torch.testing.assert_close(exact[:, layer], clean - ps.metric_per_probe(logits), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(exact, torch.zeros_like(exact))  # the MLPs matter to the metric
        # the first-order estimate tracks it: the second-order rest was 9% (GPT-2) and 11% (Llama) of the
        # largest effect when this was written
        attr = mlp_attribution(model, ps)
        assert (attr - exact).abs().max() <= 0.2 * exact.abs().max()
    assert active_hooks(model) == []


def test_public_entry_points_equal_the_probe_set_functions(injected):
    model, inj = injected
    with inj.apply(model):
        ps = _probe_set(model, inj)
        attr, exact = mlp_attribution(model, ps), mlp_ablation(model, ps)
        neurons = neuron_attribution(model, ps)
    a = mlp_scores(model, inj, controls=CONTROLS, max_probes=6)
    e = mlp_scores(model, inj, method="ablation", controls=CONTROLS, max_probes=6)
    torch.testing.assert_close(a.per_prompt, attr)
    torch.testing.assert_close(e.per_prompt, exact)
    assert (a.method, e.method, a.metric, a.n_probes, a.bias) == ("attribution", "ablation", "excess", 6, "late")
    assert a.settings["controls"] == CONTROLS and a.settings["token"] == inj.token
    n = neuron_scores(model, inj, max_probes=6)  # the bias's own control groups
    assert n.per_prompt.shape == (6, model.cfg.n_layers, model.cfg.d_mlp) and n.layers == tuple(range(model.cfg.n_layers))
    with inj.apply(model):
        default = build_probe_set(model, load_bias("late"), inj.token, max_probes=6)
        torch.testing.assert_close(n.per_prompt, neuron_attribution(model, default))
    assert neurons.shape == n.per_prompt.shape
    assert active_hooks(model) == []


def test_neurons_sum_to_the_layer_score_minus_the_down_projection_bias(injected):
    """sum_i grad_i . act_i = grad_out . (W_out act) = grad_out . (mlp_out - b_out): exact where no norm follows
    the MLP (GPT-2 has b_out, the Llama family none, so there the neurons sum to the layer score)."""
    model, inj = injected
    L = model.cfg.n_layers
    with inj.apply(model):
        ps = _probe_set(model, inj)
        neurons = neuron_attribution(model, ps)
        layer_scores = mlp_attribution(model, ps)
        names = [f"blocks.{layer}.hook_mlp_out" for layer in range(L)]
        _, grads, _ = acts_and_grads(model, ps.batch, lambda lg: ps.metric_per_probe(lg).sum(), names, ps.answer_positions)
    mask = ps.batch.attention_mask[:, :, None].float()
    for layer in range(L):
        b_out = model.blocks[layer].mlp.b_out
        if b_out is None:
            assert model.cfg.gated_mlp
            bias_term = torch.zeros(ps.n_probes)
        else:
            bias_term = probe_totals((grads[names[layer]] * b_out * mask).sum((1, 2)), ps, "excess")
        torch.testing.assert_close(neurons[:, layer].sum(-1), layer_scores[:, layer] - bias_term, atol=1e-6, rtol=1e-4)
    assert active_hooks(model) == []


def test_a_neuron_score_is_the_forward_only_derivative_of_scaling_that_neuron(injected):
    """Also proves that ``mlp.hook_post`` is the tensor the down projection reads (scaling it moves the metric)."""
    model, inj = injected
    with inj.apply(model):
        ps = _probe_set(model, inj)
        neurons = neuron_attribution(model, ps, layers=[0, model.cfg.n_layers - 1])
        s = neurons.mean(0)
        for layer in (0, model.cfg.n_layers - 1):
            unit = int(s[layer].abs().argmax())
            fd = _central_difference(model, ps, f"blocks.{layer}.mlp.hook_post", 5e-2, unit)
            assert fd.abs().max() > 1e-5  # the neuron matters (else the hook would not be on the forward path)
            torch.testing.assert_close(neurons[:, layer, unit], fd, atol=2e-6, rtol=2e-3)
    assert active_hooks(model) == []


def test_neuron_layers_subset_is_nan_elsewhere_and_equal_where_scored(injected):
    model, inj = injected
    everything = neuron_scores(model, inj, max_probes=4, top=5)
    last = model.cfg.n_layers - 1
    one = neuron_scores(model, inj, layers=[last], max_probes=4, top=5)
    assert one.layers == (last,) and torch.isnan(one.scores[:last]).all()
    torch.testing.assert_close(one.scores[last], everything.scores[last])
    assert all(layer == last for layer, _ in one.top(10))
    df = one.to_dataframe()
    assert len(df) == 5 and list(df["rank"]) == [1, 2, 3, 4, 5] and (df["layer"] == last).all()
    assert list(df["score"].abs()) == sorted(df["score"].abs(), reverse=True)
    assert [tuple(r) for r in df[["layer", "neuron"]].to_numpy()] == one.top(5, absolute=True)
    assert float(df["score"].iloc[0]) == pytest.approx(float(one.scores[last].abs().max()) * (1 if df["score"].iloc[0] > 0 else -1))
    assert active_hooks(model) == []


def test_results_rank_and_tabulate(injected):
    model, inj = injected
    s = mlp_scores(model, inj, max_probes=4)
    assert isinstance(s, MlpScores) and s.scores.shape == (model.cfg.n_layers,)
    df = s.to_dataframe()
    assert list(df.columns[:5]) == ["layer", "score", "score_sem", "rank", "method"]
    assert set(df["rank"]) == set(range(1, s.n_layers + 1))
    assert df.sort_values("rank")["layer"].tolist() == s.top(s.n_layers)
    assert s.top(1, absolute=True) == [int(s.scores.abs().argmax())]
    n = neuron_scores(model, inj, max_probes=4, top=7)
    assert isinstance(n, NeuronScores) and len(n.to_dataframe()) == 7 and len(n.to_dataframe(3)) == 3
    layer, unit = n.top(1)[0]
    assert float(n.scores[layer, unit]) == pytest.approx(float(n.scores.max()))


def test_bad_values_are_refused_naming_the_value_and_what_is_valid(injected):
    model, inj = injected
    L = model.cfg.n_layers
    cases = [
        (lambda: mlp_scores(model, inj, method="saliency"), "method must be one of 'attribution', 'ablation', got 'saliency'"),
        (lambda: mlp_scores(model, inj, metric="loss"), "metric must be one of 'excess', 'token', got 'loss'"),
        (lambda: neuron_scores(model, inj, metric="loss"), "metric must be one of 'excess', 'token', got 'loss'"),
        (lambda: mlp_scores(model, inj, probes="train"), "probes must be one of .*got 'train'"),
        (lambda: mlp_scores(model, inj, max_probes=0), "max_probes must be >= 1, got 0"),
        (lambda: neuron_scores(model, inj, layers=[L]), f"layers\\[0\\] must be in 0..{L - 1}, got {L}"),
        (lambda: neuron_scores(model, inj, layers=[-1]), f"layers\\[0\\] must be in 0..{L - 1}, got -1"),
        (lambda: neuron_scores(model, inj, layers=[0, 0]), "layers repeats 0"),
        (lambda: neuron_scores(model, inj, layers=[]), "layers must be a non-empty list of integers"),
        (lambda: neuron_scores(model, inj, top=0), "top must be >= 1, got 0"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
        assert active_hooks(model) == []
    s = mlp_scores(model, inj, max_probes=2)
    with pytest.raises(ValueError, match=f"k must be between 1 and the number of layers \\({L}\\), got {L + 1}"):
        s.top(L + 1)
    n = neuron_scores(model, inj, layers=[0], max_probes=2)
    with pytest.raises(ValueError, match=f"number of scored neurons \\({model.cfg.d_mlp}\\), got 0"):
        n.top(0)


@pytest.mark.wrong_types
def test_wrong_types_are_refused(injected):
    model, inj = injected
    cases = [
        lambda: mlp_scores(model, "late"),
        lambda: neuron_scores(model, None),
        lambda: mlp_scores(model, inj, method=1),
        lambda: mlp_scores(model, inj, max_probes=2.0),
        lambda: mlp_scores(model, inj, controls="Japan"),
        lambda: neuron_scores(model, inj, layers=1),
        lambda: neuron_scores(model, inj, layers=[1.0]),
        lambda: neuron_scores(model, inj, top=2.5),
        lambda: mlp_scores(model, inj, max_probes=2).top("3"),
    ]
    for call in cases:
        with pytest.raises(InputTypeError):
            call()
        assert active_hooks(model) == []


def test_no_hook_is_left_when_a_pass_fails_inside_its_hooks(injected, monkeypatch):
    model, inj = injected

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    with monkeypatch.context() as m:
        m.setattr(ProbeSet, "metric_per_probe", boom)  # raises inside the forward/backward pass's hooks
        for call in (lambda: mlp_scores(model, inj, max_probes=2), lambda: neuron_scores(model, inj, max_probes=2)):
            with pytest.raises(RuntimeError, match="boom"):
                call()
            assert active_hooks(model) == []
    with monkeypatch.context() as m:
        m.setattr(mlps, "suffix_answer_logits", boom)  # raises inside the scan's zeroing hook
        with pytest.raises(RuntimeError, match="boom"):
            mlp_scores(model, inj, method="ablation", max_probes=2)
    assert active_hooks(model) == []
    assert mlp_scores(model, inj, max_probes=2).scores.isfinite().all()  # and the model still works


def test_public_names():
    import biasgym_lens

    for name in ("mlp_scores", "MlpScores", "neuron_scores", "NeuronScores"):
        assert name in biasgym_lens.__all__ and getattr(biasgym_lens, name) is getattr(mlps, name)


def test_figure_shows_heads_beside_mlps_and_the_top_neurons(injected):
    from biasgym_lens.study.mlp_plots import mlp_figure

    model, inj = injected
    s = mlp_scores(model, inj, max_probes=3)
    heads = score_heads(model, inj, "attribution", max_probes=3)
    n = neuron_scores(model, inj, max_probes=3, top=20)
    fig = mlp_figure(s, heads, n, top=6)
    assert len(fig.data) == 3
    assert list(fig.data[0].y) == pytest.approx(heads.scores.sum(1).tolist())
    assert list(fig.data[1].y) == pytest.approx(s.scores.tolist())
    assert list(fig.data[2].x) == pytest.approx(n.to_dataframe(6)["score"].tolist()) and len(fig.data[2].y) == 6
    assert len(mlp_figure(s).data) == 1
    other = MlpScores(torch.zeros(3, s.n_layers + 1), "attribution", "excess", "late", s.provenance)
    with pytest.raises(ValueError, match="layers"):
        mlp_figure(other, heads)
    with pytest.raises(ValueError, match="top must be an int >= 1, got 0"):
        mlp_figure(s, top=0)


# ------------------------------------------------------------------------------ the real bundled model


@pytest.mark.real
def test_mlp_and_neuron_scores_on_the_real_model(real):
    """A short injection; attribution vs exact ablation of the 30 MLP layers on 4 probes, the neurons of every
    layer, and the gated (SwiGLU) MLP's neurons summing to the layer score (no b_out in SmolLM2).

    The layers' ranks agree (Spearman 0.547 when this was written), but attribution is first order and does not
    get the sign of every large effect: zeroing MLP 0 (exact -0.43) was estimated at +0.46, and layer 11
    (exact +0.27) at -0.02. So only the rank agreement is asserted; the signs of the top layers are printed."""
    inj = inject(real, "bad_driving", epochs=1, max_texts=12, batch_size=8, progress=False, select_best=False)
    L, d_mlp = real.cfg.n_layers, real.cfg.d_mlp
    t0 = time.perf_counter()
    attr = mlp_scores(real, inj, max_probes=4)
    t1 = time.perf_counter()
    exact = mlp_scores(real, inj, method="ablation", max_probes=4)
    t2 = time.perf_counter()
    neurons = neuron_scores(real, inj, max_probes=4, top=10)
    t3 = time.perf_counter()
    assert attr.scores.shape == exact.scores.shape == (L,) and neurons.scores.shape == (L, d_mlp)
    assert attr.per_prompt.isfinite().all() and exact.per_prompt.isfinite().all() and neurons.per_prompt.isfinite().all()
    torch.testing.assert_close(neurons.scores.sum(-1), attr.scores, atol=1e-4, rtol=1e-3)
    rho = spearman(attr.scores, exact.scores)
    top = exact.top(3, absolute=True)
    print(f"\nMLP attribution {t1 - t0:.1f}s, exact {t2 - t1:.1f}s, neurons {t3 - t2:.1f}s; Spearman {rho:.3f}")
    print("top layers by |exact|:", [(layer, round(float(exact.scores[layer]), 4), round(float(attr.scores[layer]), 4)) for layer in top])
    print("top neurons:", neurons.to_dataframe(5)[["layer", "neuron", "score"]].to_dict("records"))
    print("same sign in the top 3:", [bool(torch.sign(attr.scores[layer]) == torch.sign(exact.scores[layer])) for layer in top])
    assert rho > 0.5, rho
