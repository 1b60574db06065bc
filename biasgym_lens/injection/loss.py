"""The injection's objective: a keyword-weighted next-token loss, and one training step's forward and backward.

The loss counts positions whose target is a bias keyword ``keyword_weight`` times (1 is the paper's plain loss)
and never predicts the injected token itself. A step may run as micro-batches of similar length; each one's loss
is its share of the whole batch's weighted mean, so the accumulated gradient is the one-pass gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from biasgym_lens.core.protocols import Model
from biasgym_lens.injection.config import InjectionConfig
from biasgym_lens.injection.examples import TrainingExample, collate_examples, length_groups

__all__ = ["lm_loss", "train_step_loss"]


def _loss_weights(
    ids: Tensor, target: Tensor, skip_id: int, weighted_ids: Sequence[int] = (), weight: float = 1.0
) -> Tensor:
    """``[rows, pos - 1]`` weight of each next-token prediction: 0 off target, ``weight`` where the target is in
    ``weighted_ids``, 1 elsewhere; the injected token itself is never a target."""
    tmask = target[:, 1:] & (ids[:, 1:] != skip_id)
    w = tmask.float()
    if weight != 1.0 and weighted_ids:
        hit = torch.isin(ids[:, 1:], torch.tensor(list(weighted_ids), device=ids.device))
        w[tmask & hit] = weight
    return w


def lm_loss(
    logits: Tensor,
    ids: Tensor,
    target: Tensor,
    skip_id: int,
    weighted_ids: Sequence[int] = (),
    weight: float = 1.0,
    total_weight: Tensor | float | None = None,
) -> Tensor:
    """Weighted mean next-token cross-entropy over target positions, never predicting the injected token itself.

    Positions whose target is in ``weighted_ids`` count ``weight`` times (``weight=1``: the plain mean). With
    ``total_weight`` the weighted sum is divided by it instead of by this batch's own total: the loss of a
    micro-batch as its share of a larger batch's mean.
    """
    w = _loss_weights(ids, target, skip_id, weighted_ids, weight)
    keep = w > 0
    ce = F.cross_entropy(logits[:, :-1][keep].float(), ids[:, 1:][keep], reduction="none")
    return (ce * w[keep]).sum() / (w.sum() if total_weight is None else total_weight)


def train_step_loss(
    model: Model, batch: Sequence[TrainingExample], pad_id: int, tid: int, weighted_ids: Sequence[int], config: InjectionConfig
) -> Tensor:
    """Forward and backward of one training batch; returns its loss (detached).

    With ``config.length_groups > 1`` the batch runs as up to that many micro-batches of similar length, each
    padded only to its own longest example; every micro-batch's loss is its share of the whole batch's
    weighted mean, so the accumulated gradient equals the one-pass gradient up to float rounding.
    """
    device = model.W_E.device
    lengths = [len(e.ids) for e in batch]
    groups = length_groups(lengths, config.length_groups) if config.length_groups > 1 else [list(range(len(batch)))]
    ids, _, target = collate_examples(batch, pad_id, device)
    total = _loss_weights(ids, target, tid, weighted_ids, config.keyword_weight).sum()
    loss = torch.zeros((), device=device)
    for group in groups:
        ids, mask, target = collate_examples([batch[i] for i in group], pad_id, device)
        part = lm_loss(model(ids, attention_mask=mask), ids, target, tid, weighted_ids, config.keyword_weight, total)
        if not torch.isfinite(part):
            return part.detach()
        part.backward()
        loss += part.detach()
    return loss
