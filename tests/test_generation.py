"""Generation: the KV-cached decoder equals full forward passes (greedy and sampled) under every kind of hook,
left-padded batches equal their prompts decoded alone, seeded sampling, no hook left behind."""

from __future__ import annotations

import pytest
import torch

from biasgym_lens.core.embedding import with_token_vectors
from biasgym_lens.core.generation import generate, kv_cache_routing
from biasgym_lens.core.hooks import active_hooks, position_offset
from biasgym_lens.core.tokens import chat_format, tokenize
from biasgym_lens.heads.interventions import ablate_heads, steer

PROMPTS = ["people from Italy are", "the drivers in Spain drive fast and", "a"]


def _clean(model) -> None:
    """No hook point holds a hook, no attention module a pre-hook, no position offset remains."""
    assert active_hooks(model) == []
    assert all(len(b.attn._forward_pre_hooks) == 0 for b in model.blocks)
    assert position_offset(model) == 0


def _reference_greedy(model, prompt: str, n: int) -> list[int]:
    """Hand-written greedy loop: one unpadded full forward pass per token, argmax of the last logits.

    Its passes are marked as generation steps (``positions_from(model, 0)``), as a decoding loop must, so a
    steering position that the sequence has not reached yet waits instead of raising.
    """
    from biasgym_lens.core.hooks import positions_from

    ids = tokenize(model, [prompt]).input_ids
    out = []
    for _ in range(n):
        with torch.no_grad(), positions_from(model, 0):
            nxt = int(model(ids)[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


def _both(model, prompts, n=8, **kw):
    cached = generate(model, prompts, n, stop_at_eos=False, use_cache=True, **kw)
    full = generate(model, prompts, n, stop_at_eos=False, use_cache=False, **kw)
    return cached, full


def test_cached_forward_with_routing_equals_the_full_forward(tiny_model):
    """The bridge's own cache entry point is exact once the cache reaches its attention modules."""
    b = tokenize(tiny_model, ["people from Italy are always late", "a b"], padding_side="left")
    with torch.no_grad():
        full = tiny_model(b.input_ids, attention_mask=b.attention_mask)
        with kv_cache_routing(tiny_model):
            pre, cache = tiny_model(
                b.input_ids[:, :-2], attention_mask=b.attention_mask[:, :-2], use_cache=True, return_type="logits_and_cache"
            )
            steps = []
            for t in (-2, -1):
                end = None if t == -1 else t + 1
                lg, cache = tiny_model(
                    b.input_ids[:, t:end], attention_mask=b.attention_mask[:, :end], past_key_values=cache,
                    return_type="logits_and_cache",
                )
                steps.append(lg[:, -1])
    real = b.attention_mask[:, :-2].bool()
    torch.testing.assert_close(pre[real], full[:, :-2][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, -2:], atol=1e-5, rtol=1e-5)
    _clean(tiny_model)


def test_greedy_cached_equals_uncached_and_a_hand_written_loop(tiny_model):
    cached, full = _both(tiny_model, PROMPTS[:1])
    assert cached.token_ids == full.token_ids
    assert list(cached.token_ids[0]) == _reference_greedy(tiny_model, PROMPTS[0], 8)
    _clean(tiny_model)


def test_sampled_cached_equals_uncached(tiny_model):
    """Sampling a random model visits many different tokens: the strongest check that every step is exact."""
    cached, full = _both(tiny_model, PROMPTS, 12, temperature=1.0, seed=3)
    assert cached.token_ids == full.token_ids
    assert len({t for row in cached.token_ids for t in row}) > 10  # varied text, not one repeated token


def test_cached_equals_uncached_under_head_ablation_and_row_restricted_ablation(tiny_model):
    heads = [(0, 1), (1, 2)]
    for kw in ({}, {"rows": [1]}):
        cached, full = _both(
            tiny_model, PROMPTS, 10, temperature=1.0, seed=1, intervention=lambda kw=kw: ablate_heads(tiny_model, heads, **kw)
        )
        assert cached.token_ids == full.token_ids
    with ablate_heads(tiny_model, heads):
        ref = _reference_greedy(tiny_model, PROMPTS[1], 8)
    res = generate(tiny_model, PROMPTS, 8, stop_at_eos=False, intervention=lambda: ablate_heads(tiny_model, heads, rows=[1]))
    assert list(res.token_ids[1]) == ref
    assert list(res.token_ids[0]) == _reference_greedy(tiny_model, PROMPTS[0], 8)
    _clean(tiny_model)


def test_cached_equals_uncached_under_steering_also_at_absolute_positions(tiny_model):
    v = 4 * torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    n_prompt = tokenize(tiny_model, [PROMPTS[0]]).input_ids.shape[1]
    for positions in (None, [1, n_prompt + 2]):  # one prompt position, one generated position
        def intervention(positions=positions):
            return steer(tiny_model, v, 0, alpha=2.0, positions=positions)

        cached, full = _both(tiny_model, PROMPTS[:1], 8, intervention=intervention)
        with intervention():
            ref = _reference_greedy(tiny_model, PROMPTS[0], 8)
        assert list(cached.token_ids[0]) == list(full.token_ids[0]) == ref
        sampled = _both(tiny_model, PROMPTS[:1], 8, temperature=1.0, seed=2, intervention=intervention)
        assert sampled[0].token_ids == sampled[1].token_ids
    # a push towards one token at the last layer, only at the column that holds generated token 2, makes
    # token 3 that token
    target, L = tiny_model.tokenizer.convert_tokens_to_ids("<|im_end|>"), tiny_model.cfg.n_layers
    to_target = tiny_model.W_U[:, target].detach() / tiny_model.W_U[:, target].norm()
    plain = generate(tiny_model, PROMPTS[:1], 6, stop_at_eos=False).token_ids[0]
    for use_cache in (True, False):
        pushed = generate(
            tiny_model, PROMPTS[:1], 6, stop_at_eos=False, use_cache=use_cache,
            intervention=lambda: steer(tiny_model, to_target, L - 1, alpha=500.0, positions=[n_prompt + 2]),
        ).token_ids[0]
        assert pushed[:3] == plain[:3] and pushed[3] == target != plain[3]
    _clean(tiny_model)


def test_cached_equals_uncached_with_an_injected_token(tiny_model):
    vec = 3 * torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    prompts = ["tell me about <TokG> now", "people from <TokG> drive"]
    with with_token_vectors(tiny_model, {"<TokG>": vec}):
        cached, full = _both(tiny_model, prompts, 10, temperature=1.0, seed=0)
        greedy = generate(tiny_model, prompts[:1], 8, stop_at_eos=False)
        ref = _reference_greedy(tiny_model, prompts[0], 8)
    assert cached.token_ids == full.token_ids
    assert list(greedy.token_ids[0]) == ref
    _clean(tiny_model)


def test_left_padded_batch_equals_each_prompt_alone(tiny_model):
    together = generate(tiny_model, PROMPTS, 8, stop_at_eos=False)
    assert len({len(tokenize(tiny_model, [p]).input_ids[0]) for p in PROMPTS}) == 3  # different lengths
    for i, p in enumerate(PROMPTS):
        alone = generate(tiny_model, [p], 8, stop_at_eos=False)
        assert together.token_ids[i] == alone.token_ids[0] == tuple(_reference_greedy(tiny_model, p, 8))
        assert together.texts[i] == tiny_model.tokenizer.decode(list(alone.token_ids[0]), skip_special_tokens=True)


def test_sampling_is_seeded_and_follows_the_distribution(tiny_model):
    a = generate(tiny_model, PROMPTS, 10, temperature=1.0, seed=5, stop_at_eos=False)
    b = generate(tiny_model, PROMPTS, 10, temperature=1.0, seed=5, stop_at_eos=False)
    c = generate(tiny_model, PROMPTS, 10, temperature=1.0, seed=6, stop_at_eos=False)
    assert a == b and a.token_ids != c.token_ids
    # a row's sample depends on (seed, row) only, not on the other prompts
    assert generate(tiny_model, PROMPTS[:1], 10, temperature=1.0, seed=5, stop_at_eos=False).token_ids[0] == a.token_ids[0]
    greedy = generate(tiny_model, PROMPTS, 10, stop_at_eos=False)
    assert generate(tiny_model, PROMPTS, 10, temperature=1.0, top_p=1e-6, seed=5, stop_at_eos=False).token_ids == greedy.token_ids
    # first tokens of many samples: frequencies match softmax(logits / T), and top_p keeps to the nucleus
    n, temp = 400, 0.5
    with torch.no_grad():
        probs = torch.softmax(tiny_model(tokenize(tiny_model, [PROMPTS[0]]).input_ids)[0, -1] / temp, -1)
    first = torch.tensor([r[0] for r in generate(tiny_model, [PROMPTS[0]] * n, 1, temperature=temp, seed=0).token_ids])
    top = int(probs.argmax())
    p = float(probs[top])
    assert abs(float((first == top).float().mean()) - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-3
    sorted_p, order = probs.sort(descending=True)
    k = int((sorted_p.cumsum(0) < 0.6).sum()) + 1  # the nucleus of mass 0.6, by hand
    nucleus = generate(tiny_model, [PROMPTS[0]] * 200, 1, temperature=temp, top_p=0.6, seed=0).token_ids
    assert {r[0] for r in nucleus} <= set(order[:k].tolist())


def test_stop_at_eos_and_dataframe(tiny_model):
    # the tiny llama's EOS is its padding token, whose (tied) output row is zero: stop at another special token
    tok = tiny_model.tokenizer
    before = tok.eos_token
    tok.eos_token = "<|im_end|>"
    try:
        eos = tok.eos_token_id
        assert eos == tok.convert_tokens_to_ids("<|im_end|>")
        direction = tiny_model.W_U[:, eos].detach()
        L = tiny_model.cfg.n_layers
        push = lambda: steer(tiny_model, direction / direction.norm(), L - 1, alpha=500.0)  # noqa: E731
        stopped = generate(tiny_model, PROMPTS, 6, intervention=push)
        running = generate(tiny_model, PROMPTS, 6, intervention=push, stop_at_eos=False)
    finally:
        tok.eos_token = before
    assert tok.eos_token == before
    assert all(row == (eos,) for row in stopped.token_ids) and all(stopped.stopped)
    assert all(len(row) == 6 for row in running.token_ids) and not any(running.stopped)
    df = running.to_dataframe()
    assert list(df["prompt"]) == PROMPTS and set(df["n_tokens"]) == {6}
    assert {"text", "temperature", "top_p", "seed", "use_cache", "model"} <= set(df.columns)


def test_errors_and_no_hook_left_after_an_exception(tiny_model):
    for kw, match in (
        ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ):
        with pytest.raises(ValueError, match=match):
            generate(tiny_model, PROMPTS, **{"max_new_tokens": 4, **kw})
    with pytest.raises(ValueError, match="non-empty list"):
        generate(tiny_model, [], 4)
    for use_cache in (True, False):  # a row-restricted ablation on a row the batch lacks raises mid-forward
        with pytest.raises(ValueError, match="out of range"):
            generate(tiny_model, PROMPTS[:2], 4, use_cache=use_cache, intervention=lambda: ablate_heads(tiny_model, [(0, 1)], rows=[5]))
        _clean(tiny_model)


def test_gemma3_sliding_window_layers_cached_equals_uncached(tiny_tokenizer_dir):
    """Gemma 3 (sliding-window layers of 8 positions, post-norms, scaled embeddings): past the window too."""
    from biasgym_lens.testing import tiny_bridge

    model = tiny_bridge("gemma3", tiny_tokenizer_dir)
    cached, full = _both(model, PROMPTS, 12, temperature=1.0, seed=0)
    assert cached.token_ids == full.token_ids
    _clean(model)


@pytest.mark.real
def test_real_model_cached_greedy_equals_uncached(real):
    prompt = chat_format(real, "Please write a short paragraph about Italy.")
    for intervention in (None, lambda: ablate_heads(real, [(21, 1), (9, 6)])):
        cached = generate(real, [prompt], 16, prepend_bos=False, stop_at_eos=False, intervention=intervention)
        full = generate(real, [prompt], 16, prepend_bos=False, stop_at_eos=False, intervention=intervention, use_cache=False)
        assert cached.token_ids == full.token_ids and len(cached.token_ids[0]) == 16
    # a left-padded batch of prompts of different lengths equals each prompt alone
    prompts = [prompt, chat_format(real, "Please write a short paragraph about the Republic of Trinidad and Tobago.")]
    together = generate(real, prompts, 8, prepend_bos=False, stop_at_eos=False)
    assert together.token_ids == tuple(
        generate(real, [p], 8, prepend_bos=False, stop_at_eos=False).token_ids[0] for p in prompts
    )
    assert active_hooks(real) == []
