"""The ``generation`` section of ``benchmarks/run.py``: KV-cached decoding vs one full forward pass per token.

A batch of chat prompts of different lengths (left-padded, one stream) is continued greedily with
:func:`biasgym_lens.core.generation.generate` with and without the KV cache, and with the tools a user would
otherwise reach for: Hugging Face's ``generate(use_cache=False)`` on the booted model and TransformerLens's
``bridge.generate(use_past_kv_cache=False)``. Tokens are compared row by row up to each row's first EOS.
The cached modes of those tools are shown as a failure mode (they ignore the cache after wrapping), and
Hugging Face's cached ``generate`` once more inside :func:`biasgym_lens.core.generation.kv_cache_routing`.
"""

from __future__ import annotations

import time
import warnings

import torch

from biasgym_lens.core.generation import generate, kv_cache_routing
from biasgym_lens.core.tokens import chat_format, tokenize
from biasgym_lens.injection.catalogue import list_biases, load_bias
from biasgym_lens.injection.schema import CHAT_PROMPT


def _countries(n: int) -> list[str]:
    seen: list[str] = []
    for name in list_biases():
        spec = load_bias(name)
        for g in (*spec.real_groups, *spec.control_groups):
            if g not in seen:
                seen.append(g)
    return seen[:n]


def _upto_eos(rows, eos: int) -> list[tuple[int, ...]]:
    out = []
    for row in rows:
        row = [int(t) for t in row]
        out.append(tuple(row[: row.index(eos) + 1] if eos in row else row))
    return out


def _agreement(ours: list[tuple[int, ...]], other: list[tuple[int, ...]]) -> str:
    """Rows identical, and tokens equal before the first difference (share of our tokens)."""
    same_rows = sum(a == b for a, b in zip(ours, other))
    prefix = 0
    for a, b in zip(ours, other):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        prefix += k
    total = sum(len(a) for a in ours)
    return f"{same_rows}/{len(ours)} rows identical, {prefix}/{total} tokens before the first difference"


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_generation(model, repeats: int, line, n_prompts: int = 16, n_new: int = 64) -> None:
    """Print times, speed-ups (with ``line(name, ratio, target)``) and token agreement (module docstring)."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' past_key_values rename notice
    prompts = [chat_format(model, CHAT_PROMPT.format(group=g)) for g in _countries(n_prompts)]
    batch = tokenize(model, prompts, padding_side="left", prepend_bos=False)
    lengths = batch.attention_mask.sum(-1)
    eos = model.tokenizer.eos_token_id
    hf = model.original_model
    kw = dict(prepend_bos=False, stop_at_eos=True)
    print(f"generation: {len(prompts)} chat prompts of {int(lengths.min())}-{int(lengths.max())} tokens "
          f"(left-padded, one stream), {n_new} new tokens, greedy, rows stop at EOS")
    generate(model, prompts[:2], 2, **kw)  # warm-up
    times = []
    for _ in range(repeats):
        cached, t = _timed(lambda: generate(model, prompts, n_new, **kw))
        times.append(t)
    t_cached = sorted(times)[len(times) // 2]
    full, t_full = _timed(lambda: generate(model, prompts, n_new, use_cache=False, **kw))
    ours = _upto_eos(cached.token_ids, eos)
    n_tok = sum(len(r) for r in ours)
    print(f"  ours, KV cache            {t_cached:7.1f} s  ({n_tok} tokens, {n_tok / t_cached:.1f} tokens/s)")
    print(f"  ours, full forward/token  {t_full:7.1f} s  agreement with the cached run: "
          f"{_agreement(ours, _upto_eos(full.token_ids, eos))}")
    gen_kw = dict(attention_mask=batch.attention_mask, max_new_tokens=n_new, do_sample=False,
                  pad_token_id=model.tokenizer.pad_token_id, eos_token_id=eos)
    n_in = batch.input_ids.shape[1]
    with torch.no_grad():
        hf_full, t_hf = _timed(lambda: hf.generate(batch.input_ids, use_cache=False, **gen_kw))
    print(f"  HF generate(use_cache=False)       {t_hf:7.1f} s  vs ours cached: "
          f"{_agreement(ours, _upto_eos(hf_full[:, n_in:].tolist(), eos))}")
    tl_full, t_tl = _timed(lambda: model.generate(
        batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=n_new, do_sample=False,
        use_past_kv_cache=False, stop_at_eos=True, verbose=False, return_type="tokens"))
    print(f"  bridge.generate(use_past_kv_cache=False) {t_tl:7.1f} s  vs ours cached: "
          f"{_agreement(ours, _upto_eos(tl_full[:, n_in:].tolist(), eos))}")
    line("ours: KV cache vs one full forward per token", t_full / t_cached, ">= 5x")
    line("HF generate(use_cache=False) vs ours with KV cache", t_hf / t_cached, "> 1")
    line("bridge.generate(use_past_kv_cache=False) vs ours with KV cache", t_tl / t_cached, "> 1")
    _failure_modes(model, batch, ours, gen_kw, eos, t_cached)


def _failure_modes(model, batch, ours, gen_kw, eos, t_cached) -> None:
    """The tools' cached modes after booting (broken), and HF's cached generate with the cache routed."""
    hf, n_in = model.original_model, batch.input_ids.shape[1]
    with torch.no_grad():
        hf_broken = hf.generate(batch.input_ids, use_cache=True, **gen_kw)[:, n_in:].tolist()
    tl_broken = model.generate(
        batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=gen_kw["max_new_tokens"],
        do_sample=False, use_past_kv_cache=True, stop_at_eos=True, verbose=False, return_type="tokens",
    )[:, n_in:].tolist()
    with torch.no_grad(), kv_cache_routing(model):
        hf_fixed, t_fixed = _timed(lambda: hf.generate(batch.input_ids, use_cache=True, **gen_kw))
    decode = lambda ids: model.tokenizer.decode(list(ids)[:24], skip_special_tokens=True)  # noqa: E731
    print("  failure mode, the cached tools after booting (first 24 tokens of row 0):")
    print(f"    ours:                                 {decode(ours[0])!r}")
    print(f"    HF generate(use_cache=True):          {decode(hf_broken[0])!r}  "
          f"[{_agreement(ours, _upto_eos(hf_broken, eos))}]")
    print(f"    bridge.generate(use_past_kv_cache=True): {decode(tl_broken[0])!r}  "
          f"[{_agreement(ours, _upto_eos(tl_broken, eos))}]")
    print(f"    HF generate(use_cache=True) inside kv_cache_routing: {t_fixed:.1f} s, "
          f"{_agreement(ours, _upto_eos(hf_fixed[:, n_in:].tolist(), eos))}")
