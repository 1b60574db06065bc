"""Interventions: exact effects on tiny models, no hooks left behind, correct generation under hooks."""

from __future__ import annotations

import pytest
import torch

from biasgym_lens.core.hooks import active_hooks
from biasgym_lens.core.tokens import tokenize
from biasgym_lens.heads.interventions import ablate_heads, generate_greedy, reference_z, steer

TEXTS = ["people from Italy are always late", "the drivers in Spain drive fast"]


def _run(model, batch, names):
    return model.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask, names_filter=lambda n: n in names)


def test_zero_ablating_a_whole_layer_leaves_only_the_output_bias(tiny_model):
    L0 = [(0, h) for h in range(tiny_model.cfg.n_heads)]
    batch = tokenize(tiny_model, TEXTS)
    with ablate_heads(tiny_model, L0):
        _, cache = _run(tiny_model, batch, {"blocks.0.attn.hook_out"})
    out = cache["blocks.0.attn.hook_out"]
    b_O = getattr(tiny_model.blocks[0].attn, "b_O", None)
    expected = torch.zeros_like(out) if b_O is None else b_O.detach().expand_as(out)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert active_hooks(tiny_model) == []


def test_scale_one_is_identity_and_scale_two_doubles_the_head(tiny_model):
    batch = tokenize(tiny_model, TEXTS)
    _, clean = _run(tiny_model, batch, {"blocks.1.attn.hook_z"})
    with ablate_heads(tiny_model, [(1, 2)], kind="scale", scale=1.0):
        _, same = _run(tiny_model, batch, {"blocks.1.attn.hook_z"})
    with ablate_heads(tiny_model, [(1, 2)], kind="scale", scale=2.0):
        _, doubled = _run(tiny_model, batch, {"blocks.1.attn.hook_z"})
    z0, z2 = clean["blocks.1.attn.hook_z"], doubled["blocks.1.attn.hook_z"]
    torch.testing.assert_close(same["blocks.1.attn.hook_z"], z0)
    torch.testing.assert_close(z2[:, :, 2], 2 * z0[:, :, 2])
    torch.testing.assert_close(z2[:, :, [0, 1, 3]], z0[:, :, [0, 1, 3]])


def test_mean_and_resample_use_the_reference_set(tiny_model):
    ref_texts = ["water boils at one hundred degrees", "the sun is a star"]
    ref = reference_z(tiny_model, ref_texts, [1])[1]
    batch = tokenize(tiny_model, TEXTS)
    with ablate_heads(tiny_model, [(1, 0)], kind="mean", reference=ref_texts):
        _, c = _run(tiny_model, batch, {"blocks.1.attn.hook_z"})
    z = c["blocks.1.attn.hook_z"][:, :, 0]
    torch.testing.assert_close(z, ref.mean(0)[0].expand_as(z))
    from biasgym_lens.heads.interventions import head_means

    means = head_means(tiny_model, ref_texts)  # precomputed means: the same ablation without rerunning the set
    with ablate_heads(tiny_model, [(1, 0)], kind="mean", reference=means):
        _, c2 = _run(tiny_model, batch, {"blocks.1.attn.hook_z"})
    torch.testing.assert_close(c2["blocks.1.attn.hook_z"], c["blocks.1.attn.hook_z"])
    with pytest.raises(ValueError, match="only serve kind='mean'"):
        with ablate_heads(tiny_model, [(1, 0)], kind="resample", reference=means):
            pass
    with ablate_heads(tiny_model, [(1, 0)], kind="resample", reference=ref_texts, seed=1):
        _, c = _run(tiny_model, batch, {"blocks.1.attn.hook_z"})
    got = c["blocks.1.attn.hook_z"][:, :, 0].reshape(-1, ref.shape[-1])
    pool = ref[:, 0]
    assert all((pool - row).abs().max(-1).values.min() < 1e-6 for row in got), "each value comes from the pool"
    with pytest.raises(ValueError, match="reference set for mean/resample ablation is empty"):
        with ablate_heads(tiny_model, [(1, 0)], kind="mean", reference=[]):
            pass
    with pytest.raises(ValueError, match="needs a reference set"):
        with ablate_heads(tiny_model, [(1, 0)], kind="mean"):
            pass


@pytest.mark.wrong_types
def test_bad_heads_and_kinds(tiny_model):
    L, H = tiny_model.cfg.n_layers, tiny_model.cfg.n_heads
    with pytest.raises(ValueError, match=f"out of range: layers 0..{L - 1}, heads 0..{H - 1}"):
        with ablate_heads(tiny_model, [(L, 0)]):
            pass
    with pytest.raises(ValueError, match="kind must be one of"):
        with ablate_heads(tiny_model, [(0, 0)], kind="noise"):
            pass
    with pytest.raises(ValueError, match="pair"):
        with ablate_heads(tiny_model, [3]):
            pass
    assert active_hooks(tiny_model) == []


def test_hooks_are_removed_when_the_body_raises(tiny_model):
    with pytest.raises(KeyError):
        with ablate_heads(tiny_model, [(0, 1)]), steer(tiny_model, torch.zeros(tiny_model.cfg.d_model), 0):
            assert len(active_hooks(tiny_model)) == 2
            raise KeyError("x")
    assert active_hooks(tiny_model) == []


def test_steering_moves_the_final_residual_by_alpha_v(tiny_model):
    L = tiny_model.cfg.n_layers
    v = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    batch = tokenize(tiny_model, TEXTS)
    name = f"blocks.{L - 1}.hook_resid_post"
    _, clean = _run(tiny_model, batch, {name})
    with steer(tiny_model, v, L - 1, alpha=3.0):
        _, steered = _run(tiny_model, batch, {name})
    torch.testing.assert_close(steered[name] - clean[name], (3.0 * v).expand_as(clean[name]), atol=1e-5, rtol=1e-5)
    with steer(tiny_model, v, L - 1, alpha=3.0, positions=[0]):
        _, first = _run(tiny_model, batch, {name})
    torch.testing.assert_close(first[name][:, 1:], clean[name][:, 1:])
    with pytest.raises(ValueError, match="expected"):
        with steer(tiny_model, torch.zeros(7), 0):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with steer(tiny_model, v, L):
            pass


def test_generation_under_hooks_equals_manual_greedy_decoding(tiny_model):
    """Compare the package's generator, the bridge's own uncached generate(), and a hand-written loop."""
    text = "people from Italy are"
    with ablate_heads(tiny_model, [(0, 1), (1, 2)]):
        ours = generate_greedy(tiny_model, text, max_new_tokens=6, stop_at_eos=False)
        ids = tokenize(tiny_model, [text]).input_ids
        manual = []
        for _ in range(6):
            with torch.no_grad():
                nxt = int(tiny_model(ids)[0, -1].argmax())
            manual.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        bridge = tiny_model.generate(
            tokenize(tiny_model, [text]).input_ids, max_new_tokens=6, do_sample=False, use_past_kv_cache=False,
            verbose=False, stop_at_eos=False,
        )
    assert ours == tiny_model.tokenizer.decode(manual, skip_special_tokens=True)
    assert bridge[0, -6:].tolist() == manual
    plain = generate_greedy(tiny_model, text, max_new_tokens=6, stop_at_eos=False)
    assert active_hooks(tiny_model) == []
    assert isinstance(plain, str)


def test_row_restricted_ablation_and_batched_generation_equal_one_run_per_variant(tiny_model):
    """``ablate_heads(rows=[1])`` ablates only batch row 1; a batched greedy generation whose rows carry
    different interventions (token vectors, a row-restricted ablation) equals one generation per variant."""
    from biasgym_lens.core.embedding import with_token_vectors

    heads = [(0, 1), (1, 2)]
    b = tokenize(tiny_model, ["people from Italy are", "people from Spain are"])
    with torch.no_grad():
        with ablate_heads(tiny_model, heads, rows=[1]):
            mixed = tiny_model(b.input_ids, attention_mask=b.attention_mask)
        plain = tiny_model(b.input_ids[:1], attention_mask=b.attention_mask[:1])
        with ablate_heads(tiny_model, heads):
            ablated = tiny_model(b.input_ids[1:], attention_mask=b.attention_mask[1:])
    torch.testing.assert_close(mixed[:1], plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1:], ablated, atol=1e-5, rtol=1e-5)
    assert (mixed[1] - plain[0]).abs().max() > 1e-3  # (same length rows; the ablation did act on row 1)

    gen = torch.Generator().manual_seed(0)
    trained, untrained = (3 * torch.randn(tiny_model.cfg.d_model, generator=gen) for _ in range(2))
    prompts = ["tell me about <TokA> now", "tell me about <TokA> now", "tell me about <TokB> now"]
    with with_token_vectors(tiny_model, {"<TokA>": trained, "<TokB>": untrained}):
        with ablate_heads(tiny_model, heads, rows=[1]):
            together = generate_greedy(tiny_model, prompts, max_new_tokens=6, stop_at_eos=False)
        alone = [generate_greedy(tiny_model, prompts[0], max_new_tokens=6, stop_at_eos=False)]
        with ablate_heads(tiny_model, heads):
            alone.append(generate_greedy(tiny_model, prompts[1], max_new_tokens=6, stop_at_eos=False))
        alone.append(generate_greedy(tiny_model, prompts[2], max_new_tokens=6, stop_at_eos=False))
    assert together == alone
    # a random tiny model's greedy text can coincide across variants: check that the rows' first-step logits
    # differ, so each row did carry its own intervention
    with torch.no_grad(), with_token_vectors(tiny_model, {"<TokA>": trained, "<TokB>": untrained}):
        b = tokenize(tiny_model, prompts)  # (inside: outside the block the added tokens have no embedding)
        with ablate_heads(tiny_model, heads, rows=[1]):
            first = tiny_model(b.input_ids, attention_mask=b.attention_mask)[:, -1]
    assert (first[0] - first[1]).abs().max() > 1e-3 and (first[0] - first[2]).abs().max() > 1e-3
    # texts of different lengths run as one left-padded batch: the same as one generation each
    assert generate_greedy(tiny_model, ["a", "people from Italy are"], 3, stop_at_eos=False) == [
        generate_greedy(tiny_model, t, 3, stop_at_eos=False) for t in ["a", "people from Italy are"]
    ]
    with pytest.raises(ValueError, match="rows must be"):
        with ablate_heads(tiny_model, heads, rows=[]):
            pass
    assert active_hooks(tiny_model) == []
