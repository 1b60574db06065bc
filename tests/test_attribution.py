"""Head scores: DLA closes, attribution patching matches exact ablation, the batched scan equals the loop."""

from __future__ import annotations

import pytest
import torch

from biasgym_lens.core.hooks import active_hooks
from biasgym_lens.core.unembed import suffix_answer_logits, suffix_supported
from biasgym_lens.heads.decomposition import (
    attention_scores,
    component_hook_names,
    dla_scores,
    final_norm_direction,
    has_post_norms,
    residual_components,
)
from biasgym_lens.heads.head_scores import HeadScores, score_heads, spearman
from biasgym_lens.heads.interventions import ablate_heads
from biasgym_lens.heads.patching import ablation_scores, attribution_scores
from biasgym_lens.heads.probes import build_probe_set
from biasgym_lens.injection.catalogue import load_bias
from biasgym_lens.injection.metrics import logit_diff
from biasgym_lens.injection.training import inject

FAST = dict(epochs=1, batch_size=4, max_texts=4, lr=5e-2, progress=False, select_best=False)


@pytest.fixture
def injected(tiny_model):
    inj = inject(tiny_model, "late", **FAST)
    return tiny_model, inj


def _probe_set(model, inj, **kw):
    return build_probe_set(model, load_bias("late"), inj.token, controls=["Japan", "Germany"], max_probes=6, **kw)


def _closure(model, inj):
    with inj.apply(model):
        ps = _probe_set(model, inj)
        batch = ps.batch
        names = component_hook_names(model)
        logits, cache = model.run_with_cache(
            batch.input_ids, attention_mask=batch.attention_mask, names_filter=lambda n: n in names
        )
        rows, pos = torch.arange(len(batch)), ps.answer_positions
        comps = residual_components(model, cache, rows, pos)
        total = sum(comps.values())
        resid = cache["ln_final.hook_in"][rows, pos].float()
        torch.testing.assert_close(total, resid, atol=1e-4, rtol=1e-4)
        u, const = final_norm_direction(model, ps)
        scale = cache["ln_final.hook_scale"][rows, pos].float()
        contribution = {k: (v @ u) / scale[:, 0] for k, v in comps.items()}
        predicted = sum(contribution.values()) + const
        actual_rows = logit_diff(logits[rows, pos], ps.keywords)
        torch.testing.assert_close(predicted, actual_rows, atol=1e-4, rtol=1e-4)
        dla = dla_scores(model, ps, "token")
        heads = torch.stack([contribution[f"L{layer}H{h}"][: ps.n_probes] for layer in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)], -1)
        torch.testing.assert_close(dla.reshape(ps.n_probes, -1), heads, atol=1e-5, rtol=1e-5)


def test_dla_closure_raw_mode(injected):
    _closure(*injected)


def test_dla_closure_compatibility_mode(fresh_tiny_model):
    inj = inject(fresh_tiny_model, "late", **FAST)
    fresh_tiny_model.enable_compatibility_mode(disable_warnings=True)
    inj = type(inj)(**{**inj.__dict__, "provenance": type(inj.provenance).of(fresh_tiny_model)})
    _closure(fresh_tiny_model, inj)


@pytest.fixture(scope="module")
def tiny_gemma3(tiny_tokenizer_dir):
    from biasgym_lens.testing import tiny_bridge

    return tiny_bridge("gemma3", tiny_tokenizer_dir)


def test_dla_closure_with_gemma3_post_norms(tiny_gemma3):
    """Post-attention norms: each head's share of the normalised attention output closes the sum."""
    assert has_post_norms(tiny_gemma3)
    _closure(tiny_gemma3, inject(tiny_gemma3, "late", **FAST))


def test_dla_closure_with_gemma3_post_norms_compatibility_mode(tiny_tokenizer_dir):
    from biasgym_lens.testing import tiny_bridge

    model = tiny_bridge("gemma3", tiny_tokenizer_dir)
    inj = inject(model, "late", **FAST)
    model.enable_compatibility_mode(disable_warnings=True)
    inj = type(inj)(**{**inj.__dict__, "provenance": type(inj.provenance).of(model)})
    _closure(model, inj)


def test_attention_scores_are_probabilities_to_the_token(injected):
    model, inj = injected
    with inj.apply(model):
        ps = _probe_set(model, inj)
        att = attention_scores(model, ps)
        _, cache = model.run_with_cache(ps.batch.input_ids[:1], attention_mask=ps.batch.attention_mask[:1])
    q, k = ps.answer_positions[0], ps.token_positions[0]
    assert att.shape == (6, model.cfg.n_layers, model.cfg.n_heads)
    assert ((att >= 0) & (att <= 1)).all()
    assert att[0, 1, 2].item() == pytest.approx(cache["blocks.1.attn.hook_pattern"][0, 2, q, k].item(), abs=1e-6)


def test_batched_ablation_scan_equals_loop_and_single_head_runs(injected):
    model, inj = injected
    with inj.apply(model):
        ps = _probe_set(model, inj)
        loop = ablation_scores(model, ps, heads_per_pass=1, reuse_prefix=False)
        batched = ablation_scores(model, ps, heads_per_pass=5, reuse_prefix=False)
        resumed = ablation_scores(model, ps, heads_per_pass=5, reuse_prefix=True)
        assert suffix_supported(model) and not torch.isnan(loop).any()
        torch.testing.assert_close(batched, loop, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(resumed, loop, atol=1e-4, rtol=1e-4)
        # independent check of one head with the public intervention
        with torch.no_grad():
            clean = ps.metric_per_probe(model(ps.batch.input_ids, attention_mask=ps.batch.attention_mask))
            with ablate_heads(model, [(1, 3)]):
                abl = ps.metric_per_probe(model(ps.batch.input_ids, attention_mask=ps.batch.attention_mask))
        torch.testing.assert_close(loop[:, 1, 3], clean - abl, atol=1e-5, rtol=1e-5)
    assert active_hooks(model) == []


def test_attribution_patching_tracks_exact_ablation(injected):
    model, inj = injected
    with inj.apply(model):
        ps = _probe_set(model, inj)
        exact = ablation_scores(model, ps, heads_per_pass=8).mean(0)
        approx = attribution_scores(model, ps, "excess", "zero").mean(0)
    rho = spearman(exact, approx)
    assert rho > 0.6, rho
    assert active_hooks(model) == []


def test_counterfactual_attribution_needs_aligned_groups(injected):
    model, inj = injected
    with inj.apply(model):
        ps = build_probe_set(model, load_bias("late"), inj.token, controls=["Saudi Arabia and Liechtenstein"], max_probes=4)
        with pytest.raises(ValueError, match="same length"):
            attribution_scores(model, ps, ablation="counterfactual")


def test_head_scores_api(injected, tmp_path):
    model, inj = injected
    s = score_heads(model, inj, "dla", max_probes=6)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    assert s.scores.shape == (L, H)
    top = s.top(3)
    flat = s.scores.flatten()
    assert [s.scores[layer, h].item() for layer, h in top] == sorted(flat.tolist(), reverse=True)[:3]
    df = s.to_dataframe()
    assert len(df) == L * H and set(df["rank"]) == set(range(1, L * H + 1))
    s.save(tmp_path / "s")
    back = HeadScores.load(tmp_path / "s")
    assert torch.equal(back.per_prompt, s.per_prompt) and back.method == "dla"
    assert back.agreement(s) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="between 1 and the number of heads"):
        s.top(L * H + 1)
    with pytest.raises(ValueError, match="method must be one of"):
        score_heads(model, inj, "saliency")
    for method in ("attention", "attribution", "ablation"):
        assert score_heads(model, inj, method, max_probes=4).per_prompt.shape == (4, L, H)
    assert active_hooks(model) == []


def test_spearman_known_values():
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([10.0, 20, 30])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1.0)


def test_resumed_suffix_pass_equals_the_full_forward_pass(injected):
    """Skipping the blocks before l (from the cached residual) and unembedding only the answer rows is exact,
    with and without a hook on a later block, and leaves the model whole afterwards."""
    model, inj = injected
    with inj.apply(model):
        ps = _probe_set(model, inj)
        b = ps.batch
        rows = torch.arange(len(b))
        with torch.no_grad():
            logits, cache = model.run_with_cache(b.input_ids, attention_mask=b.attention_mask)
            for start in range(model.cfg.n_layers):
                got = suffix_answer_logits(model, cache[f"blocks.{start}.hook_in"], start, b.attention_mask, ps.answer_positions)
                torch.testing.assert_close(got, logits[rows, ps.answer_positions], atol=1e-4, rtol=1e-4)
            last = model.cfg.n_layers - 1
            with ablate_heads(model, [(last, 0)]):
                full = model(b.input_ids, attention_mask=b.attention_mask)[rows, ps.answer_positions]
                got = suffix_answer_logits(model, cache[f"blocks.{last}.hook_in"], last, b.attention_mask, ps.answer_positions)
            torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)
            assert not torch.allclose(full, logits[rows, ps.answer_positions])  # the ablation did something
            again = model(b.input_ids, attention_mask=b.attention_mask)
        torch.testing.assert_close(again, logits)  # every layer and the unembedding are back
    assert active_hooks(model) == []


def test_score_heads_bad_input(_tiny_models):
    """Probes without the placeholder and an injection from another model are refused, with nothing left."""
    gpt2, llama = _tiny_models["gpt2"], _tiny_models["llama"]
    inj = inject(gpt2, "late", **FAST)
    with pytest.raises(ValueError, match="was made with model 'tiny-gpt2'"):
        score_heads(llama, inj, "dla")
    with inj.apply(gpt2):
        with pytest.raises(ValueError, match="contains no \\{group\\} placeholder"):
            build_probe_set(gpt2, load_bias("late"), inj.token, probes=["People from Spain always arrive"])
    assert active_hooks(gpt2) == [] and active_hooks(llama) == []


def test_logits_at_equals_the_full_forward_pass(injected, tiny_gemma3):
    """Unembedding only the asked positions gives the model's own logits there (GPT-2/Llama and Gemma 3)."""
    from biasgym_lens.core.tokens import tokenize
    from biasgym_lens.core.unembed import logits_at, suffix_supported

    for model in (injected[0], tiny_gemma3):
        assert suffix_supported(model)
        b = tokenize(model, ["the cat sat on the mat", "a dog", "people from Italy are"])
        rows, pos = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 5, 1, 3])
        with torch.no_grad():
            full = model(b.input_ids, attention_mask=b.attention_mask)
            got = logits_at(model, b.input_ids, b.attention_mask, rows, pos)
            torch.testing.assert_close(got, full[rows, pos].float(), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(model(b.input_ids, attention_mask=b.attention_mask), full)  # unembedding back
        assert active_hooks(model) == []


def test_cached_activations_are_run_with_caches_without_the_logits(injected, tiny_gemma3):
    """The hook values equal run_with_cache's, bit for bit, and the unembedding makes no vocabulary-sized
    logits (its output hook sees the final residual)."""
    from biasgym_lens.core.hooks import hooked
    from biasgym_lens.core.tokens import tokenize
    from biasgym_lens.core.unembed import cached_activations

    names = ["blocks.0.attn.hook_z", "blocks.1.hook_resid_post", "ln_final.hook_scale"]
    for model in (injected[0], tiny_gemma3):
        b = tokenize(model, ["the cat sat on the mat", "a dog"])
        widths: list[int] = []
        with torch.no_grad():
            _, ref = model.run_with_cache(b.input_ids, attention_mask=b.attention_mask, names_filter=names.__contains__)
            with hooked(model, fwd_hooks=[("unembed.hook_out", lambda x, hook, seen=widths: seen.append(x.shape[-1]))]):
                got = cached_activations(model, b.input_ids, b.attention_mask, names)
        assert widths == [model.cfg.d_model]
        for n in names:
            torch.testing.assert_close(got[n], ref[n], rtol=0, atol=0)
        assert active_hooks(model) == []


def test_length_chunks_group_probes_by_length_and_cut_only_padding(injected):
    """Every probe once; a chunk's probes are no longer than the next chunk's; each chunk is its probes' rows cut
    to their longest row, with the same metric as in the whole set."""
    model, inj = injected
    with inj.apply(model):
        ps = _probe_set(model, inj)
        rows_per_probe = 1 + len(ps.controls)
        budget = 2 * rows_per_probe * ps.batch.input_ids.shape[1]
        chunks = ps.length_chunks(budget)
        assert sorted(i for idx, _ in chunks for i in idx) == list(range(ps.n_probes))
        assert len(chunks) > 1
        length = ps.batch.attention_mask.sum(1).view(rows_per_probe, ps.n_probes).max(0).values
        for (idx, _), (nxt, _) in zip(chunks, chunks[1:]):
            assert int(length[idx].max()) <= int(length[nxt].min())
        for idx, chunk in chunks:
            width = chunk.batch.input_ids.shape[1]
            assert width == int(length[idx].max())
            assert len(idx) == 1 or chunk.batch.input_ids.numel() <= budget
            whole = ps.subset(idx)
            assert torch.equal(chunk.batch.input_ids, whole.batch.input_ids[:, :width])
            assert int(whole.batch.attention_mask[:, width:].sum()) == 0  # only padding was cut
            with torch.no_grad():
                got = chunk.metric_per_probe(model(chunk.batch.input_ids, attention_mask=chunk.batch.attention_mask))
                ref = whole.metric_per_probe(model(whole.batch.input_ids, attention_mask=whole.batch.attention_mask))
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert active_hooks(model) == []


def test_chunked_attribution_equals_one_pass(injected):
    """Chunks of probes (bounded backward memory) give the one-pass scores; a probe subset keeps its metric."""
    model, inj = injected
    with inj.apply(model):
        ps = _probe_set(model, inj)
        chunks = ps.chunks(max_tokens=2 * (1 + len(ps.controls)) * ps.batch.input_ids.shape[1])
        assert len(chunks) > 1 and sum(c.n_probes for c in chunks) == ps.n_probes
        whole = attribution_scores(model, ps, max_tokens=None)
        chunked = attribution_scores(model, ps, max_tokens=1)  # one probe per chunk
        torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-4)
        with torch.no_grad():
            full = ps.metric_per_probe(model(ps.batch.input_ids, attention_mask=ps.batch.attention_mask))
            sub = ps.subset([2, 0])
            part = sub.metric_per_probe(model(sub.batch.input_ids, attention_mask=sub.batch.attention_mask))
        torch.testing.assert_close(part, full[[2, 0]], atol=1e-5, rtol=1e-5)
    assert active_hooks(model) == []


def test_damage_scores_equal_the_whole_batch_estimate(tiny_model):
    """Passage-by-passage backward passes sum to the whole-batch attribution estimate of the loss increase."""
    from biasgym_lens.evaluation.capability import capability_set
    from biasgym_lens.heads.patching import z_and_grads
    from biasgym_lens.heads.selection import damage_scores

    passages = ["the sun is a star and the moon is not", "water boils", "a cat sat on the mat today"]
    cap = capability_set(tiny_model, passages=passages, batch_size=3)
    b = cap.neutral[0]

    def loss_fn(logits):
        nll = -logits[:, :-1].log_softmax(-1).gather(-1, b.input_ids[:, 1:, None])[..., 0]
        return nll[b.attention_mask[:, 1:].bool()].mean()

    acts, grads, _ = z_and_grads(tiny_model, b, loss_fn)
    mask = b.attention_mask[:, :, None, None].float()
    expected = torch.stack([-(grads[i] * acts[i] * mask).sum((0, 1, 3)) for i in range(tiny_model.cfg.n_layers)])
    torch.testing.assert_close(damage_scores(tiny_model, cap), expected, atol=1e-5, rtol=1e-4)


def test_attribution_against_head_means_is_the_finite_difference_toward_the_means(injected):
    """With a baseline (mean ablation), a head's score is the first-order effect of moving its output toward the
    baseline: checked by nudging one head a small step toward its mean in a real forward pass."""
    from biasgym_lens.core.hooks import hooked
    from biasgym_lens.heads.interventions import head_means

    model, inj = injected
    means = head_means(model, ["the sun is a star and the moon is not", "water boils at one hundred degrees"])
    zeros = {layer: torch.zeros_like(m) for layer, m in means.items()}
    eps = 1e-3
    with inj.apply(model):
        ps = _probe_set(model, inj)
        plain = attribution_scores(model, ps, "token")
        torch.testing.assert_close(attribution_scores(model, ps, "token", baseline=zeros), plain)
        scores = attribution_scores(model, ps, "token", baseline=means)
        with torch.no_grad():
            clean = ps.metric_per_probe(model(ps.batch.input_ids, attention_mask=ps.batch.attention_mask), "token")
            for layer, head in [(0, 1), (model.cfg.n_layers - 1, 2)]:

                def nudge(z, hook, layer=layer, head=head):
                    z = z.clone()
                    z[:, :, head] += eps * (means[layer][head] - z[:, :, head])
                    return z

                with hooked(model, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", nudge)]):
                    moved = ps.metric_per_probe(model(ps.batch.input_ids, attention_mask=ps.batch.attention_mask), "token")
                torch.testing.assert_close((clean - moved) / eps, scores[:, layer, head], atol=2e-3, rtol=2e-2)
    assert active_hooks(model) == []


def test_the_resumed_scan_packed_equals_length_groups_and_one_padded_pass(injected, monkeypatch):
    """The resumed passes run on packed rows (no padding); where packing is refused, rows of different lengths
    run in separate, shorter passes; both equal one padded pass, all unembedding only the keyword columns."""
    from biasgym_lens.heads import patching

    model, inj = injected
    with inj.apply(model):
        ps = _probe_set(model, inj)
        assert patching.packing_supported(model)
        packed = ablation_scores(model, ps, reuse_prefix=True)
        monkeypatch.setattr(patching, "packing_supported", lambda m: False)
        lengths = (ps.batch.last_positions + 1).tolist()
        groups = patching.length_partition(lengths, overhead=patching.SCAN_PASS_OVERHEAD)
        assert len(set(lengths)) > 1 and len(groups) > 1  # really split
        grouped = ablation_scores(model, ps, reuse_prefix=True)
        monkeypatch.setattr(patching, "SCAN_PASS_OVERHEAD", 10**9)  # one group: a single padded pass
        one_pass = ablation_scores(model, ps, reuse_prefix=True)
    torch.testing.assert_close(grouped, one_pass, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed, one_pass, atol=1e-5, rtol=1e-5)
    assert active_hooks(model) == []
