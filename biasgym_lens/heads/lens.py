"""Logit lens for the bias: the bias logit difference read from the residual stream after every layer."""

from __future__ import annotations

import pandas as pd
import torch

from biasgym_lens.core.protocols import Model
from biasgym_lens.core.unembed import cached_activations
from biasgym_lens.heads.decomposition import final_norm_direction, final_norm_kind
from biasgym_lens.heads.probes import ProbeSet

__all__ = ["layer_logit_diff"]


def _eps(model: Model) -> float:
    comp = getattr(model.ln_final, "original_component", None)
    for name in ("eps", "variance_epsilon"):
        v = getattr(comp, name, None)
        if v is not None:
            return float(v)
    return float(getattr(model.cfg, "eps", 1e-5))


@torch.no_grad()
def layer_logit_diff(model: Model, ps: ProbeSet) -> pd.DataFrame:
    """Bias logit difference of the residual stream after each layer, through the final norm and unembedding.

    Layer ``-1`` is the embedding; the value after the last layer equals the model's own logit difference.

    Returns:
        Long table ``layer, group, logit_diff`` with ``group`` the token and each control group (mean over
        probes).
    """
    L = model.cfg.n_layers
    names = {"hook_embed"} | {f"blocks.{layer}.hook_resid_post" for layer in range(L)}
    if any("pos_embed" in n for n in model.hook_dict):
        names.add("hook_pos_embed")
    batch = ps.batch
    cache = cached_activations(model, batch.input_ids, batch.attention_mask, names)
    rows, pos = torch.arange(len(batch)), ps.answer_positions
    u, const = final_norm_direction(model, ps)
    eps, centre = _eps(model), final_norm_kind(model) == "ln"
    stages = [("hook_embed", -1)] + [(f"blocks.{layer}.hook_resid_post", layer) for layer in range(L)]
    out = []
    groups = [ps.token] + list(ps.controls)
    n = ps.n_probes
    for name, layer in stages:
        x = cache[name][rows, pos].float()
        if name == "hook_embed" and "hook_pos_embed" in cache:
            x = x + cache["hook_pos_embed"][rows, pos].float()
        if centre:
            x = x - x.mean(-1, keepdim=True)
        x = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        ld = x @ u + const
        for i, g in enumerate(groups):
            out.append({"layer": layer, "group": g, "logit_diff": float(ld[i * n : (i + 1) * n].mean())})
    return pd.DataFrame(out)
