"""Forward passes that skip work the caller does not need: resume at a layer, unembed only some positions.

The bridge calls every block wrapper in order; :func:`skipping_layers` swaps the wrapped modules of the first
blocks and of the unembedding for pass-throughs (hooks on the wrappers still fire), so a forward pass returns
the final normalised residual and the caller unembeds only the rows it needs with :func:`unembed_at`.
:func:`logits_at` does that for a batch; models where this is not exact (logit soft-capping, non-bridge
models) fall back to a plain forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from biasgym_lens.core.protocols import Model

__all__ = [
    "suffix_supported", "skipping_layers", "unembed_at", "logits_at", "resumed_forward", "forward_keeping",
    "clean_residuals", "suffix_answer_logits", "unembed_columns", "cached_activations",
]


class _PassThrough(torch.nn.Module):
    """Stands in for a skipped decoder layer (returns its hidden states) or for the unembedding."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


def suffix_supported(model: Model) -> bool:
    """Whether :func:`suffix_answer_logits` can run on this model (TransformerLens bridge of a decoder-only LM
    whose logits are the plain unembedding of the final residual: no logit soft-capping)."""
    blocks = getattr(model, "blocks", None)
    unembed = getattr(model, "unembed", None)
    hf_cfg = getattr(getattr(model, "original_model", None), "config", None)
    text_cfg = getattr(hf_cfg, "text_config", None) or hf_cfg
    return (
        blocks is not None
        and len(blocks) > 0
        and all("_original_component" in b._modules for b in blocks)
        and "_original_component" in getattr(unembed, "_modules", {})
        and not getattr(text_cfg, "final_logit_softcapping", None)
        and not (getattr(model.cfg, "output_logits_soft_cap", 0) or 0) > 0
    )


@contextlib.contextmanager
def skipping_layers(model: Model, n_blocks: int, *, unembed: bool = False) -> Iterator[None]:
    """Within the block, decoder layers ``0..n_blocks-1`` and (unless ``unembed``) the unembedding are
    pass-throughs.

    The bridge still calls the wrappers (hooks on them fire) but no skipped layer computes; without ``unembed``
    the model returns the final normalised residual instead of logits. Everything is restored on exit, also on
    exceptions.
    """
    # ``original_component`` is a read-only view of the wrapper's ``_original_component`` submodule.
    key = "_original_component"
    modules = list(model.blocks)[:n_blocks] + ([] if unembed else [model.unembed])
    swapped = [(m, m._modules[key]) for m in modules]
    try:
        for module, _ in swapped:
            module._modules[key] = _PassThrough()
        yield
    finally:
        for module, original in swapped:
            module._modules[key] = original


def unembed_at(model: Model, final: Tensor, rows: Tensor, pos: Tensor) -> Float[Tensor, "n d_vocab"]:
    """Logits (fp32) of the final normalised residual ``[rows, pos, d_model]`` at the pairs ``(rows[i], pos[i])``
    (the output of a forward pass inside ``skipping_layers(model, 0)``)."""
    logits = final[rows.to(final.device), pos.to(final.device)].float() @ model.W_U.float()
    b_u = getattr(model, "b_U", None)
    return logits + b_u.float() if b_u is not None else logits


def unembed_columns(
    model: Model, final: Tensor, rows: Tensor, pos: Tensor, columns: Tensor
) -> Float[Tensor, "n n_columns"]:
    """The logits (fp32) of only the vocabulary ``columns`` at the pairs ``(rows[i], pos[i])`` of the final
    normalised residual: :func:`unembed_at`'s values in those columns, at a fraction of its cost when a metric
    reads a few tokens."""
    cols = columns.to(model.W_U.device)
    logits = final[rows.to(final.device), pos.to(final.device)].float() @ model.W_U[:, cols].float()
    b_u = getattr(model, "b_U", None)
    return logits + b_u[cols].float() if b_u is not None else logits


def logits_at(model: Model, input_ids: Tensor, attention_mask: Tensor, rows: Tensor, pos: Tensor) -> Float[Tensor, "n d_vocab"]:
    """Next-token logits (fp32) at the pairs ``(rows[i], pos[i])`` of a forward pass; the unembedding runs on
    those positions only where :func:`suffix_supported` (equal to the full pass up to float rounding)."""
    if suffix_supported(model):
        with skipping_layers(model, 0):
            final = model(input_ids, attention_mask=attention_mask)
        return unembed_at(model, final, rows, pos)
    logits = model(input_ids, attention_mask=attention_mask)
    return logits[rows.to(logits.device), pos.to(logits.device)].float()


def resumed_forward(model: Model, resid_pre: Tensor, start: int, attention_mask: Tensor, *, unembed: bool = True) -> Tensor:
    """A forward pass resumed at block ``start`` from the residual stream entering it: blocks before ``start``
    are not recomputed, hooks on later blocks apply. Returns the logits, or with ``unembed=False`` the final
    normalised residual (unembed the rows needed with :func:`unembed_at`). Needs :func:`suffix_supported`."""
    with skipping_layers(model, start, unembed=unembed):
        return model(resid_pre, start_at_layer=start, attention_mask=attention_mask)


def suffix_answer_logits(
    model: Model, resid_pre: Float[Tensor, "rows pos d_model"], start: int, attention_mask: Tensor, answer_pos: Tensor
) -> Float[Tensor, "rows d_vocab"]:
    """Next-token logits at ``answer_pos`` of a forward pass resumed at block ``start`` from ``resid_pre``.

    Blocks before ``start`` are skipped (not recomputed) and the unembedding runs only at the answer positions,
    so a pass that changes layer ``start`` onwards costs ``(n_layers - start) / n_layers`` of the layers and no
    full-vocabulary unembedding of every position. Hooks on blocks ``>= start`` apply. Exact: equal to the
    model's own logits up to float rounding (tested against full forward passes).
    """
    final = resumed_forward(model, resid_pre, start, attention_mask, unembed=False)
    return unembed_at(model, final, torch.arange(final.shape[0]), answer_pos)


def forward_keeping(
    model: Model, input_ids: Tensor, attention_mask: Tensor, layers: Sequence[int], *, unembed: bool = True
) -> tuple[Tensor, dict[int, Tensor]]:
    """One forward pass that also returns the residual stream entering each of ``layers``
    (``blocks.{l}.hook_in``, by layer): the logits, or with ``unembed=False`` the final normalised residual."""
    names = {f"blocks.{layer}.hook_in": int(layer) for layer in layers}
    with contextlib.nullcontext() if unembed else skipping_layers(model, 0):
        out, cache = model.run_with_cache(input_ids, attention_mask=attention_mask, names_filter=lambda n: n in names)
    return out, {layer: cache[name] for name, layer in names.items()}


def cached_activations(model: Model, input_ids: Tensor, attention_mask: Tensor, names: Collection[str]) -> Any:
    """``run_with_cache`` for the hook values ``names`` alone: where :func:`suffix_supported` the unembedding is a
    pass-through, so no ``[rows, pos, d_vocab]`` logits are made (2 GB for 154 probe rows of Gemma 3's 262k
    vocabulary). Hooks inside the unembedding do not fire there. Returns the cache."""
    wanted = set(names)
    with skipping_layers(model, 0) if suffix_supported(model) else contextlib.nullcontext():
        _, cache = model.run_with_cache(input_ids, attention_mask=attention_mask, names_filter=lambda n: n in wanted)
    return cache


def clean_residuals(model: Model, input_ids: Tensor, attention_mask: Tensor) -> list[Tensor]:
    """The residual stream entering every block (``blocks.{l}.hook_in``) of one clean forward pass."""
    layers = range(model.cfg.n_layers)
    kept = forward_keeping(model, input_ids, attention_mask, layers)[1]
    return [kept[layer] for layer in layers]
