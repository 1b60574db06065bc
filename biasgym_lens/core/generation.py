"""Text generation under the project's hooks: greedy or seeded sampling, with an exact KV cache.

Why the bridge's own cached generation is wrong (TransformerLens 4.3 with transformers 5.x): transformers
renamed the cache argument that a decoder layer hands to its attention module from ``past_key_values`` to
``cache``. TransformerLens's attention bridges, which replace the attention modules, still look only for
``past_key_values`` (or ``layer_past``), so they never see the cache: nothing is written to it, each cached
decoding step attends to the new token alone, and since the cache stays empty Hugging Face also counts
positions from 0 again. That is why ``bridge.generate(use_past_kv_cache=True)`` and ``hf_model.generate()``
after booting produce garbage. :func:`kv_cache_routing` hands the cache to the attention bridges under the name
they read (a forward pre-hook on each, removed on exit); a cached step then equals a full forward pass up to
float rounding (tested), under any hook.

:func:`generate` decodes a batch of prompts in one stream: the prompts are left-padded, the attention mask
covers padding, and the bridge derives position ids from the mask (in the cached path, the mask spans the
cached prefix and the new token). With ``use_cache=True`` only the new token runs through the model at each
step; ``use_cache=False`` runs the whole sequence each step (the reference; same loop, same tokens).

Hooks see only the new token's position in a cached step. Interventions that act at every position (head
ablation at ``hook_z``, steering at ``hook_resid_post``, injected token vectors at ``hook_embed``) are exact;
``steer(positions=...)`` reads :func:`biasgym_lens.core.hooks.position_offset`, which the decoder sets to the length
of the cached prefix, so it steers the same absolute columns as without the cache. Hooks of your own that index
absolute positions must do the same, or run with ``use_cache=False``. Resample ablation draws its replacement
per forward pass, so its draws differ between the two paths (each is a valid resampling).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from biasgym_lens.core.hooks import positions_from
from biasgym_lens.core.models import model_info
from biasgym_lens.core.protocols import Model
from biasgym_lens.core.tokens import check_context, tokenize
from biasgym_lens.core.unembed import skipping_layers, suffix_supported, unembed_at

__all__ = ["GenerationResult", "GenerationSettings", "Intervention", "generate", "kv_cache_routing"]

Intervention = Callable[[], AbstractContextManager[Any]] | None
"""A zero-argument callable returning a context manager (e.g. ``lambda: ablate_heads(model, heads)``), or None."""


@dataclass(frozen=True)
class GenerationSettings:
    """How a :class:`GenerationResult` was produced."""

    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop_at_eos: bool
    use_cache: bool
    model: str


@dataclass(frozen=True)
class GenerationResult:
    """Generated continuations of several prompts.

    Attributes:
        prompts: The prompts, in order.
        texts: Each continuation decoded without special tokens (the prompt not included).
        token_ids: Each continuation's token ids (ends with the EOS id when it stopped there).
        stopped: Whether each row stopped at EOS (else it ran to ``max_new_tokens``).
        settings: The decoding settings.
    """

    prompts: tuple[str, ...]
    texts: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]
    stopped: tuple[bool, ...]
    settings: GenerationSettings

    def __len__(self) -> int:
        return len(self.prompts)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per prompt: ``row, prompt, text, n_tokens, stopped`` and the settings."""
        rows = [
            {"row": i, "prompt": p, "text": t, "n_tokens": len(ids), "stopped": s, **asdict(self.settings)}
            for i, (p, t, ids, s) in enumerate(zip(self.prompts, self.texts, self.token_ids, self.stopped))
        ]
        return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ KV cache
def _attention_modules(model: Model) -> list[torch.nn.Module]:
    blocks = getattr(model, "blocks", None)
    mods = [getattr(b, "attn", None) for b in blocks] if blocks is not None else []
    if not mods or any(not isinstance(m, torch.nn.Module) for m in mods):
        raise ValueError(
            f"{type(model).__name__} has no blocks[i].attn attention bridges; generate with use_cache=False"
        )
    return mods


def _route_cache(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
        return args, {**kwargs, "past_key_values": kwargs["cache"]}
    return None


@contextlib.contextmanager
def kv_cache_routing(model: Model) -> Iterator[Any]:
    """Within the block, the bridge's attention modules receive the layer cache under the name they read.

    A forward pre-hook on every ``blocks[i].attn`` copies the ``cache=`` keyword (transformers 5.x) to
    ``past_key_values=`` (what TransformerLens 4.3's attention bridges read); a no-op where the names already
    agree. Removed on exit, also on exceptions. Inside the block ``model(ids, past_key_values=...)`` and the
    Hugging Face model's own ``generate()`` use the cache correctly.

    Raises:
        ValueError: for a model without ``blocks[i].attn`` modules.
    """
    handles = [m.register_forward_pre_hook(_route_cache, with_kwargs=True) for m in _attention_modules(model)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def _cache_keyword(model: Model) -> str:
    hf = getattr(model, "original_model", None)
    params = inspect.signature(hf.forward).parameters if hf is not None else {}
    return "cache" if "cache" in params else "past_key_values"


class _FullSteps:
    """Next-token logits from one full forward pass over the whole sequence (no cache)."""

    def __init__(self, model: Model) -> None:
        self.model = model

    def __call__(self, ids: Tensor, mask: Tensor) -> Tensor:
        with positions_from(self.model, 0):  # marks the pass as a generation step (see hooks.decoding)
            return _last_logits(self.model, ids, mask, {})[0]


class _CachedSteps:
    """Next-token logits with a KV cache: each call runs only the columns not yet in the cache."""

    def __init__(self, model: Model) -> None:
        self.model, self.cache, self.seen = model, None, 0
        self.keyword = _cache_keyword(model)

    def __call__(self, ids: Tensor, mask: Tensor) -> Tensor:
        extra = {"use_cache": True} if self.cache is None else {"use_cache": True, self.keyword: self.cache}
        with positions_from(self.model, self.seen):
            logits, cache = _last_logits(self.model, ids[:, self.seen :], mask, extra)
        n_cached = cache.get_seq_length() if cache is not None else 0
        if n_cached != ids.shape[1]:
            raise RuntimeError(
                f"the KV cache holds {n_cached} positions after a step over {ids.shape[1]}: this model's attention "
                "does not fill the cache; generate with use_cache=False"
            )
        self.cache, self.seen = cache, ids.shape[1]
        return logits


def _last_logits(model: Model, ids: Tensor, mask: Tensor, extra: dict[str, Any]) -> tuple[Tensor, Any]:
    """Logits (fp32) at the last column of ``ids`` and the model's cache; ``mask`` may be longer than ``ids``
    (it then also covers the cached prefix). The unembedding runs on the last column only where exact."""
    n = ids.shape[0]
    kw = {"attention_mask": mask, **extra}
    if "use_cache" in extra:
        kw["return_type"] = "logits_and_cache"
    suffix = suffix_supported(model)
    with skipping_layers(model, 0) if suffix else contextlib.nullcontext():
        out = model(ids, **kw)
    final, cache = out if "use_cache" in extra else (out, None)
    if suffix:
        return unembed_at(model, final, torch.arange(n), torch.full((n,), ids.shape[1] - 1)), cache
    return final[:, -1].float(), cache


# ------------------------------------------------------------------------------------------------ sampling
def _row_generators(seed: int, n: int) -> list[torch.Generator]:
    """One generator per row, seeded from ``(seed, row)``: a row's sample does not depend on the other rows."""
    seeds = [int(np.random.SeedSequence([seed, r]).generate_state(1)[0]) for r in range(n)]
    return [torch.Generator().manual_seed(s) for s in seeds]


def _nucleus(probs: Float[Tensor, "batch d_vocab"], top_p: float) -> Float[Tensor, "batch d_vocab"]:
    """Zero every token outside the smallest set of most probable tokens whose mass reaches ``top_p``."""
    sorted_p, order = probs.sort(-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each one
    sorted_p = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))  # the top token always stays
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


def _choose(
    logits: Float[Tensor, "batch d_vocab"], temperature: float, top_p: float, gens: Sequence[torch.Generator]
) -> Int[Tensor, " batch"]:
    if temperature == 0:
        return logits.argmax(-1).cpu()
    probs = torch.softmax(logits.float().cpu() / temperature, -1)
    if top_p < 1:
        probs = _nucleus(probs, top_p)
    return torch.stack([torch.multinomial(probs[r], 1, generator=g)[0] for r, g in enumerate(gens)])


# ------------------------------------------------------------------------------------------------ decoding
def _check_settings(prompts: Sequence[str], max_new_tokens: int, temperature: float, top_p: float) -> None:
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r:.80}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not (np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def _decode(
    model: Model, ids: Tensor, mask: Tensor, steps: Callable[[Tensor, Tensor], Tensor],
    pick: Callable[[Tensor], Tensor], max_new_tokens: int, eos: int | None,
) -> tuple[list[list[int]], list[bool]]:
    """The one decoding loop: ``steps`` gives next-token logits, ``pick`` chooses; rows stop at ``eos``."""
    n = ids.shape[0]
    new: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    for _ in range(max_new_tokens):
        nxt = pick(steps(ids, mask))
        for r in range(n):
            if not done[r]:
                new[r].append(int(nxt[r]))
                done[r] = eos is not None and int(nxt[r]) == eos
        if all(done):
            break
        ids = torch.cat([ids, nxt[:, None].to(ids.device, ids.dtype)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return new, done


@torch.no_grad()
def generate(
    model: Model,
    prompts: str | Sequence[str],
    max_new_tokens: int = 40,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_at_eos: bool = True,
    intervention: Intervention = None,
    use_cache: bool = True,
    prepend_bos: bool | None = None,
) -> GenerationResult:
    """Continue several prompts in one batch stream, greedy or sampled, under any hooks.

    Args:
        model: A bridge.
        prompts: One prompt or several (any lengths: they are left-padded and masked). Chat-formatted prompts
            (:func:`biasgym_lens.core.tokens.chat_format`) carry their own start tokens: pass ``prepend_bos=False``.
        max_new_tokens: Tokens to generate per prompt (fewer when a row stops at EOS).
        temperature: 0 is greedy (argmax); above 0, logits are divided by it and sampled.
        top_p: Nucleus sampling: sample among the most probable tokens whose mass reaches ``top_p``.
        seed: Seeds the sampling; row ``r`` uses a generator seeded from ``(seed, r)``, so the same seed gives
            the same texts and a row's text does not depend on the other prompts of the batch.
        stop_at_eos: Stop a row at the tokenizer's EOS token.
        intervention: A zero-argument callable returning a context manager (e.g.
            ``lambda: ablate_heads(model, heads)``) entered around the whole generation; row-restricted
            ablations (``ablate_heads(rows=...)``) index the prompts in order. Hooks already registered
            (``with inj.apply(model):``) apply too.
        use_cache: Decode with a KV cache (each step runs one token); False runs the whole sequence each step.
        prepend_bos: Prepend BOS; default the model's convention.

    Returns:
        A :class:`GenerationResult` (``.texts``, ``.token_ids``, ``.to_dataframe()``).

    Raises:
        ValueError: bad settings (names the value and the valid range).
        RuntimeError: with ``use_cache=True``, when the model's attention does not fill the cache.

    Examples:
        >>> res = generate(model, ["The capital of France is"], 8)               # doctest: +SKIP
        >>> res = generate(model, prompts, 48, temperature=1.0, top_p=0.9, seed=1,  # doctest: +SKIP
        ...                intervention=lambda: ablate_heads(model, [(21, 1)]))
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    _check_settings(prompts, max_new_tokens, temperature, top_p)
    batch = tokenize(model, prompts, padding_side="left", prepend_bos=prepend_bos)
    check_context(model, [row[m.bool()].tolist() for row, m in zip(batch.input_ids, batch.attention_mask)], prompts,
                  reserve=max_new_tokens)
    gens = _row_generators(seed, len(prompts)) if temperature > 0 else []
    eos = model.tokenizer.eos_token_id if stop_at_eos else None
    steps = _CachedSteps(model) if use_cache else _FullSteps(model)
    with contextlib.ExitStack() as stack:
        if use_cache:
            stack.enter_context(kv_cache_routing(model))
        if intervention is not None:
            stack.enter_context(intervention())
        new, done = _decode(
            model, batch.input_ids, batch.attention_mask, steps,
            lambda logits: _choose(logits, temperature, top_p, gens), max_new_tokens, eos,
        )
    settings = GenerationSettings(
        max_new_tokens, float(temperature), float(top_p), int(seed), bool(stop_at_eos), bool(use_cache),
        model_info(model).name,
    )
    texts = tuple(model.tokenizer.decode(row, skip_special_tokens=True) for row in new)
    return GenerationResult(tuple(prompts), texts, tuple(tuple(r) for r in new), tuple(done), settings)
