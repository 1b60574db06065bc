"""Vector-Jacobian products through a pre-attention norm for many vectors at once.

Edge attribution maps every head input's gradient (with respect to the norm's output) back to the residual
stream through the norm's Jacobian at each position. Autograd does that for any norm (:func:`autograd_vjp`);
for LayerNorm and RMSNorm the closed form (:func:`closed_form_vjp`) does it in a few passes over the vectors
instead of a batched backward through the norm's graph. :func:`norm_vjp` uses the closed form only after
checking it against autograd on the same input, and autograd otherwise.
"""

from __future__ import annotations

from typing import Any

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from biasgym_lens.core.protocols import Model

__all__ = [
    "autograd_vjp", "closed_form_vjp", "closed_form_finish", "closed_form_projected", "projection_weights", "norm_form",
    "norm_scale", "norm_vjp",
]


def autograd_vjp(
    x: Float[Tensor, "*batch d_model"], y: Float[Tensor, "*batch d_model"], vectors: Float[Tensor, "n *batch d_model"]
) -> Float[Tensor, "n *batch d_model"]:
    """``J^T v`` for each of ``vectors``, with ``y = norm(x)`` computed with autograd (graph kept)."""
    (out,) = torch.autograd.grad(y, x, grad_outputs=vectors.to(y.dtype), retain_graph=True, is_grads_batched=True)
    return out.float()


def norm_form(model: Model, norm: Any) -> tuple[str, Tensor, float] | None:
    """``(kind, gain, eps)`` of a norm module with a known closed form (``kind`` ``"ln"`` or ``"rms"``, the
    effective gain ``[d_model]``), or None. Read from the bridge component's wrapped module."""
    module = getattr(norm, "original_component", None)
    weight = getattr(module, "weight", None)
    eps = getattr(module, "eps", None)
    if eps is None:
        eps = getattr(module, "variance_epsilon", None)
    nt = str(getattr(model.cfg, "normalization_type", "") or "").upper()
    if weight is None or eps is None or nt not in ("LN", "RMS"):
        return None
    gain = weight.detach().float()
    if nt == "RMS" and getattr(model.cfg, "rmsnorm_uses_offset", False):
        gain = 1.0 + gain
    return ("ln" if nt == "LN" else "rms"), gain, float(eps)


def norm_scale(kind: str, eps: float, x: Float[Tensor, "*batch d_model"]) -> tuple[Tensor, Tensor]:
    """``(r, chat)`` of a norm at ``x``: ``r = 1 / sqrt(mean(c^2) + eps)`` ``[*batch, 1]`` and the normalised input
    ``chat = c * r`` with ``c = x - mean(x)`` (``"ln"``) or ``c = x`` (``"rms"``)."""
    x = x.detach().float()
    c = x - x.mean(-1, keepdim=True) if kind == "ln" else x
    r = torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)
    return r, c * r


def closed_form_finish(kind: str, w: Float[Tensor, "n *batch d_model"], chat: Tensor) -> Float[Tensor, "n *batch d_model"]:
    """``J^T v`` from ``w = r * gain * v``: ``w - mean(w) - chat * mean(w * chat)`` (no ``mean(w)`` for RMSNorm),
    the Jacobian of ``y = gain * chat (+ bias)``."""
    dot = torch.einsum("n...d,...d->n...", w, chat)[..., None] / w.shape[-1]
    if kind == "ln":
        w = w - w.mean(-1, keepdim=True)
    return torch.addcmul(w, chat, dot, value=-1.0)


def projection_weights(kind: str, gain: Float[Tensor, " d_model"], weights: Float[Tensor, "c d_model d_head"]) -> Tensor:
    """The weights of :func:`closed_form_projected`: each input's ``W`` scaled by the norm's gain along
    ``d_model``, and for LayerNorm centred along it (so the product is already ``w - mean(w)``)."""
    scaled = weights * gain[:, None]
    return scaled - scaled.mean(1, keepdim=True) if kind == "ln" else scaled


def closed_form_projected(
    weights: Float[Tensor, "c d_model d_head"], g: Float[Tensor, "rows pos c d_head"], chat: Float[Tensor, "rows pos d_model"],
    out: Float[Tensor, "c rows pos d_model"],
) -> Float[Tensor, "c rows pos d_model"]:
    """``J^T (W g)`` of each of ``c`` head inputs through a LayerNorm or RMSNorm, written into ``out``.

    ``weights`` are :func:`projection_weights`, ``g`` the head-space gradients times the norm's ``r`` and
    ``chat`` its normalised input (:func:`norm_scale`). The same values as :func:`closed_form_finish` of the
    projected vectors, in three passes over ``out`` instead of six and without a temporary of its size: the
    projection is written in place, and the ``chat`` term is subtracted in place."""
    c, d = weights.shape[0], weights.shape[1]
    flat = out.view(c, -1, d)
    torch.bmm(einops.rearrange(g, "r p c e -> c (r p) e"), weights.transpose(1, 2), out=flat)
    dot = torch.einsum("c...d,...d->c...", out, chat)[..., None] / d
    return out.addcmul_(chat, dot, value=-1.0)


def closed_form_vjp(
    kind: str, gain: Float[Tensor, " d_model"], eps: float, x: Float[Tensor, "*batch d_model"],
    vectors: Float[Tensor, "n *batch d_model"],
) -> Float[Tensor, "n *batch d_model"]:
    """``J^T v`` of ``y = gain * chat + bias`` (see :func:`norm_scale`) for each of ``vectors``."""
    r, chat = norm_scale(kind, eps, x)
    return closed_form_finish(kind, vectors.float() * (gain * r), chat)


def norm_vjp(
    model: Model, norm: Any, x: Tensor, y: Tensor, vectors: Tensor, *, trust: bool | None = None
) -> tuple[Float[Tensor, "n *batch d_model"], bool]:
    """``J^T v`` through ``norm`` at ``x`` (``y = norm(x)`` with its graph) for each of ``vectors``.

    Args:
        trust: Whether the closed form is known to match this model (True), known not to (False), or not yet
            checked (None: it is checked here against autograd on these vectors).

    Returns:
        The products and whether the closed form matches (pass it as ``trust`` next time).
    """
    form = norm_form(model, norm) if trust is not False else None
    if form is None:
        return autograd_vjp(x, y, vectors), False
    closed = closed_form_vjp(*form, x, vectors)
    if trust:
        return closed, True
    exact = autograd_vjp(x, y, vectors)
    ok = bool(torch.allclose(closed, exact, rtol=1e-3, atol=1e-5 * float(exact.abs().max()) + 1e-12))
    return exact, ok
