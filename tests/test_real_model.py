"""The whole method on the real bundled SmolLM2-135M-Instruct, with short settings (marked ``real``)."""

from __future__ import annotations

import pytest
import torch

from biasgym_lens.core.hooks import active_hooks
from biasgym_lens.core.packing import packing_supported
from biasgym_lens.core.tokens import chat_format, tokenize
from biasgym_lens.heads.decomposition import (
    component_hook_names,
    dla_scores,
    final_norm_direction,
    residual_components,
)
from biasgym_lens.heads.interventions import ablate_heads, generate_greedy, steer
from biasgym_lens.heads.patching import ablation_scores, attribution_scores
from biasgym_lens.heads.probes import build_probe_set
from biasgym_lens.injection.artifact import Injection
from biasgym_lens.injection.catalogue import list_biases, load_bias
from biasgym_lens.injection.data_quality import check_keywords
from biasgym_lens.injection.metrics import logit_diff
from biasgym_lens.injection.training import inject

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def short_injection(real_model):
    """A short real injection (a few steps): enough to check the mechanics, not the size of the effect."""
    before = {k: v.clone() for k, v in real_model.state_dict().items()}
    inj = inject(real_model, "bad_driving", epochs=1, max_texts=12, batch_size=8, progress=False, select_best=False)
    after = real_model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"weights changed: {changed[:3]}"
    assert active_hooks(real_model) == []
    return inj


def test_keywords_are_single_tokens_for_every_bias(real):
    for name in list_biases():
        check_keywords(load_bias(name), real.tokenizer)


def test_token_survives_the_bridge_and_chat_template(real, short_injection):
    with short_injection.apply(real) as tid:
        text = chat_format(real, f"Please write a short paragraph about {short_injection.token}.")
        ids = real.tokenizer.encode(text, add_special_tokens=False)
        assert ids.count(tid) == 1 and tid == real.tokenizer.convert_tokens_to_ids(short_injection.token)
        assert text.startswith("<|im_start|>system")


def test_save_load_apply_is_identical(real, short_injection, tmp_path):
    short_injection.save(tmp_path / "inj")
    back = Injection.load(tmp_path / "inj", real)
    with torch.no_grad():
        with short_injection.apply(real):
            batch = tokenize(real, [f"On the road, people from {back.token} drive"])  # (refused outside apply)
            a = real(batch.input_ids, attention_mask=batch.attention_mask)
        with back.apply(real):
            b = real(batch.input_ids, attention_mask=batch.attention_mask)
    assert torch.equal(a, b)


def test_dla_closure_on_the_real_model(real, short_injection):
    with short_injection.apply(real):
        ps = build_probe_set(real, load_bias("bad_driving"), short_injection.token, controls=["Japan"], max_probes=4)
        names = component_hook_names(real)
        logits, cache = real.run_with_cache(
            ps.batch.input_ids, attention_mask=ps.batch.attention_mask, names_filter=lambda n: n in names
        )
        rows, pos = torch.arange(len(ps.batch)), ps.answer_positions
        comps = residual_components(real, cache, rows, pos)
        u, const = final_norm_direction(real, ps)
        scale = cache["ln_final.hook_scale"][rows, pos].float()[:, 0]
        predicted = sum((v @ u) / scale for v in comps.values()) + const
        actual = logit_diff(logits[rows, pos], ps.keywords)
        torch.testing.assert_close(predicted, actual, atol=1e-4, rtol=0)  # the acceptance bar
        dla = dla_scores(real, ps, "token")
    assert dla.shape == (4, 30, 9)
    assert active_hooks(real) == []


def test_exact_scan_matches_single_head_runs_and_attribution_tracks_it(real, short_injection):
    heads = [(layer, h) for layer in (0, 14, 21, 29) for h in range(9)]
    with short_injection.apply(real):
        ps = build_probe_set(real, load_bias("bad_driving"), short_injection.token, controls=["Japan"], max_probes=4)
        assert packing_supported(real)
        exact = ablation_scores(real, ps, heads=heads, heads_per_pass=9)  # resumed at each layer, packed rows
        loop = ablation_scores(real, ps, heads=heads, heads_per_pass=1, reuse_prefix=False)
        torch.testing.assert_close(exact, loop, atol=1e-4, rtol=1e-4, equal_nan=True)
        with torch.no_grad():
            clean = ps.metric_per_probe(real(ps.batch.input_ids, attention_mask=ps.batch.attention_mask))
            with ablate_heads(real, [(21, 1)]):
                one = ps.metric_per_probe(real(ps.batch.input_ids, attention_mask=ps.batch.attention_mask))
        torch.testing.assert_close(exact[:, 21, 1], clean - one, atol=1e-4, rtol=1e-4)
        approx = attribution_scores(real, ps)
    idx = torch.tensor([layer * 9 + h for layer, h in heads])
    e = exact.mean(0).flatten()[idx]
    a = approx.mean(0).flatten()[idx]
    from biasgym_lens.heads.head_scores import spearman

    assert spearman(e, a) > 0.3
    assert active_hooks(real) == []


def test_generation_under_interventions_is_correct(real, short_injection):
    prompt = chat_format(real, f"Please write a short paragraph about {short_injection.token}.")
    with short_injection.apply(real), ablate_heads(real, [(21, 1), (9, 6)]):
        ours = generate_greedy(real, prompt, 8, prepend_bos=False, stop_at_eos=False)
        ids = tokenize(real, [prompt], prepend_bos=False).input_ids
        ref = real.generate(ids, max_new_tokens=8, do_sample=False, use_past_kv_cache=False, verbose=False, stop_at_eos=False)
    assert ours == real.tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    v = torch.randn(real.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with steer(real, v, 20, alpha=8.0):
        steered = generate_greedy(real, "The capital of France is", 5, stop_at_eos=False)
    plain = generate_greedy(real, "The capital of France is", 5, stop_at_eos=False)
    assert "Paris" in plain and steered != plain
    assert active_hooks(real) == []


def test_head_edits_on_the_real_model(real, short_injection):
    """Projecting the heads' bias directions out leaves nothing along them, and a KV-cached generation under the
    edit equals the uncached one."""
    from biasgym_lens.heads.head_edits import edit_heads, head_directions

    heads = [(21, 1), (25, 6)]
    with short_injection.apply(real):
        ps = build_probe_set(real, short_injection.spec, short_injection.token, probes="select", max_probes=6)
        d = head_directions(real, ps)
        seen = {}
        with edit_heads(real, heads, d, mode="project"):
            real.run_with_hooks(ps.batch.input_ids, attention_mask=ps.batch.attention_mask, fwd_hooks=[
                ("blocks.21.attn.hook_z", lambda z, hook: seen.__setitem__("z", z[:, :, 1].detach().clone()))
            ])
            prompt = chat_format(real, f"Please write a short paragraph about {short_injection.token}.")
            ours = generate_greedy(real, prompt, 8, prepend_bos=False, stop_at_eos=False)
            ids = tokenize(real, [prompt], prepend_bos=False).input_ids
            ref = real.generate(ids, max_new_tokens=8, do_sample=False, use_past_kv_cache=False, verbose=False, stop_at_eos=False)
    u = d[21, 1] / d[21, 1].norm()
    assert torch.isfinite(d).all() and d.shape == (real.cfg.n_layers, real.cfg.n_heads, real.cfg.d_head)
    assert (seen["z"].float() @ u).abs().max() < 1e-4
    assert ours == real.tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    assert active_hooks(real) == []
