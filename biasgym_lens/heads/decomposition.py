"""Scores read off one cached forward pass: direct logit attribution and attention to the injected token.

Direct logit attribution splits the final residual stream into additive pieces (:func:`residual_components`)
and projects each head's piece through the final norm, with its cached scale held fixed, on the bias keyword
direction (:func:`final_norm_direction`). Scores are a head's contribution to the metric (see
:mod:`biasgym_lens.heads.head_scores`).
"""

from __future__ import annotations

from typing import Any

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from biasgym_lens.core.protocols import Model
from biasgym_lens.core.unembed import cached_activations
from biasgym_lens.heads.probes import ProbeSet

__all__ = [
    "dla_scores",
    "attention_scores",
    "final_norm_direction",
    "final_norm_kind",
    "residual_components",
    "component_hook_names",
    "has_post_norms",
    "head_gain",
    "norm_gain",
]


def final_norm_kind(model: Model) -> str:
    """``"rms"`` for an RMSNorm model, ``"ln"`` for LayerNorm (from ``cfg.normalization_type``)."""
    nt = str(getattr(model.cfg, "normalization_type", "LN") or "LN").upper()
    return "rms" if nt.startswith("RMS") else "ln"


def norm_gain(model: Model, norm: Any) -> Tensor | None:
    """The gain of a norm module in raw weights (``1 + w`` for Gemma's offset RMSNorm); ``None`` without one."""
    comp = getattr(norm, "original_component", None)
    w = getattr(comp, "weight", None)
    if w is None:
        return None
    w = w.detach().float()
    return 1.0 + w if getattr(model.cfg, "rmsnorm_uses_offset", False) else w


def final_norm_direction(model: Model, ps: ProbeSet) -> tuple[Tensor, Tensor]:
    """Direction ``u`` with ``logit_diff = (P x / scale) . u + const`` for the final residual ``x``.

    ``P`` centres for LayerNorm (identity for RMSNorm). In raw mode the final norm's gain is folded into ``u``;
    in compatibility mode TransformerLens has already folded it into ``W_U``.

    Returns:
        ``(u, const)``: ``[d_model]`` direction (already centred for LayerNorm) and the constant term (final-norm
        bias and unembedding bias).
    """
    W_U = model.W_U.detach().float()
    b, c = ps.keywords.tensors(W_U.device)
    d = W_U[:, b].mean(-1) - W_U[:, c].mean(-1)
    const = torch.zeros((), device=W_U.device)
    b_U = getattr(model, "b_U", None)
    if b_U is not None:
        const = const + b_U.detach().float()[b].mean() - b_U.detach().float()[c].mean()
    if not getattr(model, "_weights_processed", False):
        g = norm_gain(model, model.ln_final)
        beta = getattr(getattr(model.ln_final, "original_component", None), "bias", None)
        if beta is not None:
            const = const + beta.detach().float() @ d
        if g is not None:
            d = d * g
    if final_norm_kind(model) == "ln":
        d = d - d.mean()
    return d, const


def has_post_norms(model: Model) -> bool:
    """Whether attention outputs are normalised again before entering the residual stream (Gemma 2/3)."""
    return any(hasattr(block, "ln1_post") for block in model.blocks)


def component_hook_names(model: Model) -> set[str]:
    """The cache entries :func:`residual_components` and :func:`dla_scores` read."""
    names = {"hook_embed", "hook_pos_embed", "ln_final.hook_in", "ln_final.hook_scale"}
    for layer in range(model.cfg.n_layers):
        names |= {f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.mlp.hook_out"}
        if has_post_norms(model):
            names |= {f"blocks.{layer}.ln1_post.hook_scale", f"blocks.{layer}.ln2_post.hook_out"}
    return names


def head_gain(model: Model, cache: Any, layer: int, rows: Tensor, pos: Tensor) -> Tensor | None:
    """``[rows, d_model]`` factor that maps a head's ``z @ W_O`` to its share of the residual stream.

    ``None`` for pre-norm blocks. With a post-attention RMSNorm the attention output ``a = sum_h a_h`` enters
    as ``g * a / s(a)``; holding the cached scale ``s`` fixed, head ``h`` contributes ``g * a_h / s``, and
    these shares sum exactly to the normalised output (the attention output has no bias in these models).
    """
    if not has_post_norms(model):
        return None
    norm = model.blocks[layer].ln1_post
    g = norm_gain(model, norm)
    s = cache[f"blocks.{layer}.ln1_post.hook_scale"][rows, pos].float()  # [rows, 1]
    return (g[None, :] if g is not None else 1.0) / s


def residual_components(model: Model, cache: Any, rows: Tensor, pos: Tensor) -> dict[str, Tensor]:
    """Every additive piece of the final residual stream at ``(rows, pos)``: ``[rows, d_model]`` each.

    Keys: ``embed``, ``pos_embed`` (learned positions only), ``L{l}H{h}`` for each head (``hook_z @ W_O``),
    ``b_O{l}`` (attention output bias), ``mlp{l}``. Their sum equals ``ln_final.hook_in``. In post-norm
    blocks (Gemma 2/3) a head's piece is its share of the normalised attention output, with the cached norm
    scale held fixed (see :func:`head_gain`), and ``mlp{l}`` is the normalised MLP output. ``cache`` needs
    :func:`component_hook_names`.
    """
    out = {"embed": cache["hook_embed"][rows, pos].float()}
    if "hook_pos_embed" in cache:
        out["pos_embed"] = cache["hook_pos_embed"][rows, pos].float()
    W_O = model.W_O.detach().float()
    post = has_post_norms(model)
    for layer in range(model.cfg.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"][rows, pos].float()
        heads = einops.einsum(z, W_O[layer], "row head d_head, head d_head d_model -> row head d_model")
        gain = head_gain(model, cache, layer, rows, pos)
        if gain is not None:
            heads = heads * gain[:, None, :]
        for h in range(model.cfg.n_heads):
            out[f"L{layer}H{h}"] = heads[:, h]
        attn_b = getattr(model.blocks[layer].attn, "b_O", None)
        if attn_b is not None:
            if post and bool((attn_b != 0).any()):
                raise NotImplementedError("post-norm blocks with an attention output bias are not supported")
            out[f"b_O{layer}"] = attn_b.detach().float().expand_as(heads[:, 0])
        mlp = f"blocks.{layer}.ln2_post.hook_out" if post else f"blocks.{layer}.mlp.hook_out"
        out[f"mlp{layer}"] = cache[mlp][rows, pos].float()
    return out


# ---------------------------------------------------------------------------------------------- methods


@torch.no_grad()
def dla_scores(model: Model, ps: ProbeSet, metric: str = "excess") -> Float[Tensor, "prompt n_layers n_heads"]:
    """Direct logit attribution of each head to the metric, from one cached pass.

    A head's score is its output at the answer position, through the final norm with the cached scale held
    fixed, dotted with the keyword direction. Correct in raw and compatibility mode, with any padding, and with
    post-attention norms (Gemma 2/3: the head's share of the normalised attention output, see
    :func:`residual_components`); the scores and the other components sum to the logit difference.
    """
    L = model.cfg.n_layers
    names = {f"blocks.{layer}.attn.hook_z" for layer in range(L)} | {"ln_final.hook_scale"}
    if has_post_norms(model):
        names |= {f"blocks.{layer}.ln1_post.hook_scale" for layer in range(L)}
    batch = ps.batch
    cache = cached_activations(model, batch.input_ids, batch.attention_mask, names)
    rows = torch.arange(len(batch))
    pos = ps.answer_positions
    u, _ = final_norm_direction(model, ps)
    scale = cache["ln_final.hook_scale"][rows, pos].float()  # [rows, 1]
    W_O = model.W_O.detach().float()
    per_layer = []
    for layer in range(L):
        z = cache[f"blocks.{layer}.attn.hook_z"][rows, pos].float()
        gain = head_gain(model, cache, layer, rows, pos)
        if gain is None:  # project W_O on the direction first: [H, d_head]
            w = einops.einsum(W_O[layer], u, "head d_head d_model, d_model -> head d_head")
            per_layer.append(einops.einsum(z, w, "row head d_head, head d_head -> row head"))
        else:  # the direction differs per row through the post-norm scale
            direction = gain * u[None, :]
            per_layer.append(einops.einsum(z, W_O[layer], direction, "row head d_head, head d_head d_model, row d_model -> row head"))
    per_row = torch.stack(per_layer, dim=1) / scale[:, :, None]
    return ps.per_probe(per_row, metric).cpu()


@torch.no_grad()
def attention_scores(model: Model, ps: ProbeSet) -> Float[Tensor, "prompt n_layers n_heads"]:
    """Attention probability from each token probe's answer position to the injected token, per head."""
    n = ps.n_probes
    batch = ps.batch.select(range(n))
    L = model.cfg.n_layers
    names = {f"blocks.{layer}.attn.hook_pattern" for layer in range(L)}
    cache = cached_activations(model, batch.input_ids, batch.attention_mask, names)
    rows = torch.arange(n)
    q, k = ps.answer_positions[:n], ps.token_positions
    return torch.stack(
        [cache[f"blocks.{layer}.attn.hook_pattern"][rows, :, q, k].float() for layer in range(L)], dim=1
    ).cpu()

