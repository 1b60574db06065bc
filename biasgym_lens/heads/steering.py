"""Steering directions built from an injection (difference of means, CAA-style)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from biasgym_lens.core.protocols import Model
from biasgym_lens.core.unembed import cached_activations
from biasgym_lens.heads.probes import ProbeSet

__all__ = ["bias_direction"]


@torch.no_grad()
def bias_direction(model: Model, ps: ProbeSet, layer: int) -> Float[Tensor, " d_model"]:
    """Mean residual stream after ``layer`` at the answer position: token probes minus control probes.

    Run it with the injection applied. Subtracting it (``steer(model, v, layer, alpha=-1)``) moves the token's
    answer-position state towards the control groups'.

    Raises:
        ValueError: if the probe set has no control rows or the layer is out of range.
    """
    if not ps.controls:
        raise ValueError("a bias direction needs control groups to contrast with")
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer {layer} out of range 0..{model.cfg.n_layers - 1}")
    name = f"blocks.{layer}.hook_resid_post"
    batch = ps.batch
    cache = cached_activations(model, batch.input_ids, batch.attention_mask, [name])
    rows = torch.arange(len(batch))
    x = cache[name][rows, ps.answer_positions].float()
    n = ps.n_probes
    return (x[:n].mean(0) - x[n:].mean(0)).cpu()
