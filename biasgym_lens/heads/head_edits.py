"""Edits of attention heads that remove only the bias direction, as context managers.

Zero ablation removes everything a head writes; these keep what it writes apart from the bias. Each head's
*bias direction* is the mean of its output (``hook_z``, ``[d_head]``) at the answer position over the token
probes minus its mean over the control groups' probes (:func:`head_directions`, on the select split with the
injection applied). :func:`edit_heads` then, at every position,

- ``"project"``: removes the component of the head's output along that direction,
  ``z <- z - (z . u) u`` with ``u = d / |d|``;
- ``"subtract"``: subtracts ``alpha`` times the direction, ``z <- z - alpha d`` (per-head additive steering).

Hooks live only inside the ``with`` block (removed on exit, also when the body raises), and are
position-independent, so a KV-cached generation under them equals the uncached one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from biasgym_lens.core.checks import InputTypeError, check_choice, check_real
from biasgym_lens.core.hooks import hooked
from biasgym_lens.core.protocols import Model
from biasgym_lens.core.unembed import cached_activations
from biasgym_lens.heads.interventions import Head, heads_by_layer, validate_heads
from biasgym_lens.heads.probes import ProbeSet

__all__ = ["EDIT_MODES", "head_directions", "edit_heads"]

EDIT_MODES = ("project", "subtract")


@torch.no_grad()
def head_directions(model: Model, ps: ProbeSet) -> Float[Tensor, "n_layers n_heads d_head"]:
    """Every head's bias direction: its mean ``hook_z`` at the answer position over the token rows minus the
    mean over the control rows of ``ps`` (run it with the injection applied).

    Raises:
        ValueError: the probe set has no control rows.
    """
    if not ps.controls:
        raise ValueError("a head's bias direction needs control groups to contrast with")
    L = model.cfg.n_layers
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(L)]
    cache = cached_activations(model, ps.batch.input_ids, ps.batch.attention_mask, names)
    rows = torch.arange(len(ps.batch))
    z = torch.stack([cache[n][rows, ps.answer_positions].float() for n in names], dim=1)  # [rows, L, H, d_head]
    n = ps.n_probes
    return (z[:n].mean(0) - z[n:].mean(0)).cpu()


def _check_directions(model: Model, directions: Any) -> Tensor:
    shape = (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
    if not isinstance(directions, Tensor):
        raise InputTypeError(f"directions must be a tensor of shape {shape} (see head_directions), got {type(directions).__name__}")
    if tuple(directions.shape) != shape:
        raise ValueError(f"directions must have shape {shape} (n_layers, n_heads, d_head), got {tuple(directions.shape)}")
    if not torch.isfinite(directions).all():
        raise ValueError("directions hold non-finite values")
    return directions


def _edit_hook(idx: Tensor, dirs: Tensor, mode: str, alpha: float) -> Any:
    """The ``hook_z`` hook of one layer: its heads ``idx`` edited along ``dirs`` (``[len(idx), d_head]``)."""
    unit = dirs / dirs.norm(dim=-1, keepdim=True)

    def hook(z: Tensor, hook: Any) -> Tensor:
        i = idx.to(z.device)
        part = z[:, :, i].float()
        if mode == "project":
            u = unit.to(z.device)
            part = part - (part * u).sum(-1, keepdim=True) * u
        else:
            part = part - alpha * dirs.to(z.device)
        z = z.clone()
        z[:, :, i] = part.to(z.dtype)
        return z

    return hook


@contextlib.contextmanager
def edit_heads(
    model: Model,
    heads: list[Head],
    directions: Float[Tensor, "n_layers n_heads d_head"],
    *,
    mode: str = "project",
    alpha: float = 1.0,
) -> Iterator[Any]:
    """Within the block, remove the bias direction from ``heads``' outputs (``mode="project"``) or subtract
    ``alpha`` times it (``mode="subtract"``).

    Args:
        model: A bridge.
        heads: ``(layer, head)`` pairs (a repeated head is edited once).
        directions: Every head's direction (:func:`head_directions`).
        mode: ``"project"`` or ``"subtract"``.
        alpha: The multiplier of ``"subtract"`` (ignored by ``"project"``).

    Raises:
        InputTypeError: directions that are not a tensor, a non-number alpha.
        ValueError: an unknown mode, heads out of range, directions of the wrong shape or not finite, a zero
            direction to project on.
    """
    check_choice(mode, "mode", EDIT_MODES)
    alpha = check_real(alpha, "alpha")
    directions = _check_directions(model, directions)
    by_layer = heads_by_layer(validate_heads(model, heads))
    hooks = []
    for layer, hs in by_layer.items():
        dirs = directions[layer, hs].float()
        if mode == "project" and bool((dirs.norm(dim=-1) == 0).any()):
            raise ValueError(f"a head of layer {layer} among {hs} has a zero bias direction: nothing to project on")
        hooks.append((f"blocks.{layer}.attn.hook_z", _edit_hook(torch.tensor(hs), dirs, mode, alpha)))
    with hooked(model, fwd_hooks=hooks):
        yield model

