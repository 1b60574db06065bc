"""Capability cost: loss, KL and multiple-choice accuracy against direct computations and known properties."""

from __future__ import annotations

import math

import pytest
import torch

from biasgym_lens.core.hooks import active_hooks
from biasgym_lens.core.tokens import tokenize
from biasgym_lens.evaluation.capability import capability_set, mc_accuracy, measure_capability, neutral_loss
from biasgym_lens.evaluation.capability_data import MCItem
from biasgym_lens.heads.interventions import ablate_heads


def test_neutral_loss_matches_a_direct_computation(tiny_model):
    passages = ["the sun is a star and the moon is not", "water boils at one hundred degrees"]
    cap = capability_set(tiny_model, passages=passages, batch_size=1)
    total, count = 0.0, 0
    for p in passages:
        b = tokenize(tiny_model, [p])
        with torch.no_grad():
            logp = tiny_model(b.input_ids).log_softmax(-1)[0, :-1]
        nll = -logp.gather(-1, b.input_ids[0, 1:, None])
        total += nll.sum().item()
        count += nll.numel()
    assert neutral_loss(tiny_model, cap) == pytest.approx(total / count, rel=1e-5)
    assert cap.n_tokens == count


def test_unmodified_model_has_zero_kl_and_damage_raises_loss(tiny_model):
    cap = capability_set(tiny_model, max_passages=6, batch_size=3, kl_passages=3, max_mc_items=8)
    base = measure_capability(tiny_model, cap, with_mc=False)
    assert base.kl == 0.0 and math.isclose(base.perplexity, math.exp(base.neutral_loss))
    every_head = [(layer, h) for layer in range(tiny_model.cfg.n_layers) for h in range(tiny_model.cfg.n_heads)]
    hit = measure_capability(tiny_model, cap, lambda: ablate_heads(tiny_model, every_head), with_mc=False)
    assert hit.kl > 0.0
    noop = measure_capability(tiny_model, cap, lambda: ablate_heads(tiny_model, [(0, 0)], kind="scale", scale=1.0), with_mc=False)
    assert noop.kl == pytest.approx(0.0, abs=1e-6) and noop.neutral_loss == pytest.approx(base.neutral_loss, rel=1e-6)
    assert active_hooks(tiny_model) == []


def test_mc_accuracy_scores_the_likeliest_choice(tiny_model):
    """On a random model, accuracy equals the fraction of items whose answer is the argmax choice (computed here)."""
    items = [MCItem("What is two plus two?", ("four", "five"), 0), MCItem("Which is a colour?", ("dog", "red"), 1)]
    acc = mc_accuracy(tiny_model, items)
    expected = 0
    for it in items:
        scores = []
        for ch in it.choices:
            prompt = tiny_model.tokenizer.encode(f"Question: {it.question}\nAnswer:", add_special_tokens=False)
            cont = tiny_model.tokenizer.encode(" " + ch, add_special_tokens=False)
            ids = torch.tensor([prompt + cont])
            with torch.no_grad():
                logp = tiny_model(ids).log_softmax(-1)[0]
            scores.append(sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(cont)))
        expected += int(max(range(len(scores)), key=scores.__getitem__) == it.answer)
    assert acc == pytest.approx(expected / len(items))


def test_empty_evaluation_set_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="empty evaluation set"):
        capability_set(tiny_model, passages=[])


@pytest.mark.real
def test_real_model_perplexity_is_sane_and_layer_ablation_raises_it(real):
    cap = capability_set(real, max_passages=8, kl_passages=4, max_mc_items=40)
    base = measure_capability(real, cap)
    assert 3.0 < base.perplexity < 40.0, base
    assert base.mc_accuracy > 0.4, base  # easy 4-way items: chance is 0.25
    layer = [(0, h) for h in range(real.cfg.n_heads)]  # the first layer: how the model reads its input
    hit = measure_capability(real, cap, lambda: ablate_heads(real, layer), with_mc=False)
    assert hit.perplexity > base.perplexity * 1.01 and hit.kl > 0.0


@pytest.mark.parametrize("kept", ["logp", "final"])
def test_kl_from_the_cached_reference_matches_a_direct_computation(tiny_model, kept, monkeypatch):
    """KL(unmodified || ablated) per real position, computed here with two plain forward passes; the reference
    kept as log-probabilities, or (too many to keep) as final residuals unembedded again when read."""
    from biasgym_lens.evaluation import kl_reference

    if kept == "final":
        monkeypatch.setattr(kl_reference, "REFERENCE_MAX_FLOATS", 0)
    passages = ["the sun is a star and the moon is not", "water boils at one hundred degrees", "a cat sat"]
    cap = capability_set(tiny_model, passages=passages, batch_size=2, kl_passages=2)
    heads = [(0, 0), (1, 1)]
    b = cap.neutral[0]
    with torch.no_grad():
        ref = tiny_model(b.input_ids, attention_mask=b.attention_mask).log_softmax(-1)
        with ablate_heads(tiny_model, heads):
            new = tiny_model(b.input_ids, attention_mask=b.attention_mask).log_softmax(-1)
    mask = b.attention_mask.bool()
    expected = float((ref.exp() * (ref - new)).sum(-1)[mask].mean())
    neutral_loss(tiny_model, cap)
    assert cap.reference_logp == {}  # a loss-only pass keeps no reference distribution
    first = measure_capability(tiny_model, cap, lambda: ablate_heads(tiny_model, heads), with_mc=False)
    assert first.kl == pytest.approx(expected, rel=1e-4)
    assert len(cap.reference_logp) == 1  # the unmodified pass is cached ...
    (stored,) = cap.reference_logp.values()
    width = stored[0].final.shape[-1] if kept == "final" else stored[0].shape[-1]
    assert width == (tiny_model.cfg.d_model if kept == "final" else tiny_model.W_U.shape[-1])
    again = measure_capability(tiny_model, cap, lambda: ablate_heads(tiny_model, heads), with_mc=False)
    assert again.kl == pytest.approx(first.kl, rel=1e-6)  # ... and reused
    assert active_hooks(tiny_model) == []


@pytest.mark.parametrize("what", ["heads", "steering"])
def test_resumed_capability_equals_full_passes(tiny_model, what):
    """Measuring from the clean residual kept at a resume layer gives the loss, KL and every multiple-choice
    score of full forward passes under the same intervention."""
    from biasgym_lens.evaluation import capability
    from biasgym_lens.heads.interventions import steer

    L = tiny_model.cfg.n_layers
    items = [MCItem("What is two plus two?", ("four", "five", "six"), 0), MCItem("Which is a colour?", ("dog", "red"), 1)]
    passages = ["the sun is a star and the moon is not", "water boils at one hundred degrees", "a cat sat"]
    cap = capability_set(tiny_model, passages=passages, batch_size=2, kl_passages=2, mc_items=items, resume_layers=[1])
    if what == "heads":
        def intervention():
            return ablate_heads(tiny_model, [(1, 0), (L - 1, 2)])
    else:
        vec = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(0))

        def intervention():
            return steer(tiny_model, vec, 1, 2.0)
    base = measure_capability(tiny_model, cap)  # keeps the clean residuals
    assert set(cap.clean[id(tiny_model)]) == {"neutral", "mc"}
    calls = []  # layer 0's computation, which a resumed pass skips
    handle = tiny_model.blocks[0]._modules["_original_component"].register_forward_hook(lambda *a: calls.append(1))
    try:
        resumed = measure_capability(tiny_model, cap, intervention, start=1)
    finally:
        handle.remove()
    assert calls == []
    fresh = capability_set(tiny_model, passages=passages, batch_size=2, kl_passages=2, mc_items=items)
    full = measure_capability(tiny_model, fresh, intervention)
    assert resumed.neutral_loss == pytest.approx(full.neutral_loss, rel=1e-5)
    assert resumed.kl == pytest.approx(full.kl, rel=1e-4, abs=1e-7)
    assert resumed.kl > 0 and resumed.neutral_loss != pytest.approx(base.neutral_loss, rel=1e-6)
    assert resumed.mc_accuracy == full.mc_accuracy
    torch.testing.assert_close(
        capability._mc_scores(tiny_model, items, intervention, 32, cap, start=1),
        capability._mc_scores(tiny_model, items, intervention, 32), atol=1e-4, rtol=1e-4,
    )
    assert active_hooks(tiny_model) == []


def test_capability_set_rejects_resume_layers_outside_the_model(tiny_model):
    with pytest.raises(ValueError, match=r"resume_layers \[99\].*valid: 0\.\.1"):
        capability_set(tiny_model, passages=["a cat sat"], resume_layers=[1, 99])


def test_capability_intervals_resample_passages_and_items_in_pairs(tiny_model):
    """The per-passage losses add up to the mean loss; the intervals match a hand-written paired bootstrap
    (same seed, same resampled passages in both measurements) and contain the point estimate."""
    import numpy as np

    cap = capability_set(tiny_model, max_passages=10, batch_size=4, max_mc_items=12)
    base = measure_capability(tiny_model, cap)
    hit = measure_capability(tiny_model, cap, lambda: ablate_heads(tiny_model, [(1, 0), (1, 1)]))
    assert len(hit.passage_nll) == 10 and sum(hit.passage_tokens) == cap.n_tokens
    assert sum(hit.passage_nll) / sum(hit.passage_tokens) == pytest.approx(hit.neutral_loss, rel=1e-9)
    assert sum(hit.mc_correct) / len(hit.mc_correct) == hit.mc_accuracy
    ci = hit.intervals(base, seed=3)
    a, b, n = (np.array(x, dtype=float) for x in (hit.passage_nll, base.passage_nll, base.passage_tokens))
    idx = np.random.default_rng(3).integers(0, 10, size=(2000, 10))
    draws = [np.exp((a[i].sum() - b[i].sum()) / n[i].sum()) - 1 for i in idx]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    assert (ci["perplexity_increase_ci_low"], ci["perplexity_increase_ci_high"]) == pytest.approx((lo, hi), rel=1e-9)
    ppl = hit.relative_to(base)["perplexity_increase"]
    assert ci["perplexity_increase_ci_low"] <= ppl <= ci["perplexity_increase_ci_high"]
    mc = hit.relative_to(base)["mc_accuracy_change"]
    assert ci["mc_accuracy_change_ci_low"] <= mc <= ci["mc_accuracy_change_ci_high"]
    same = base.intervals(base)  # no change: zero-width intervals at zero
    assert {v for k, v in same.items() if not k.startswith("mc_accuracy_ci")} == {0.0}
    acc = np.array(base.mc_correct, dtype=float)  # the accuracy's own interval, by hand
    boot = [acc[i].mean() for i in np.random.default_rng(0).integers(0, len(acc), size=(2000, len(acc)))]
    assert (same["mc_accuracy_ci_low"], same["mc_accuracy_ci_high"]) == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])))
    kl = np.array(hit.passage_kl) / np.array(hit.passage_kl_tokens)
    assert len(kl) == min(16, 10) and sum(hit.passage_kl) / sum(hit.passage_kl_tokens) == pytest.approx(hit.kl, rel=1e-9)
    assert ci["kl_ci_low"] <= hit.kl <= ci["kl_ci_high"]
    unpaired = hit.intervals(measure_capability(tiny_model, cap, with_mc=False, with_neutral=False))
    assert all(math.isnan(v) for k, v in unpaired.items() if "increase" in k or "change" in k)
