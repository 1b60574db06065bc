"""The unmodified model's next-token distributions on the KL passages, kept for every later KL measurement.

They are kept as log-probabilities while those fit in :data:`REFERENCE_MAX_FLOATS`; beyond that (a large
vocabulary: Gemma 3's 262k tokens on the 16 default KL passages would take about 2 GB) as the final normalised
residual at the same positions, which is unembedded again, a passage at a time, when it is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from biasgym_lens.core.protocols import Model
from biasgym_lens.core.tokens import Batch
from biasgym_lens.core.unembed import suffix_supported, unembed_at

__all__ = ["REFERENCE_MAX_FLOATS", "FinalRows", "reference_fits", "real_logp", "real_final", "reference_rows"]

REFERENCE_MAX_FLOATS = 2**27
"""The most reference log-probabilities kept as such (512 MB of float32); more are kept as final residuals."""


@dataclass(frozen=True)
class FinalRows:
    """The final normalised residual at the real positions of one KL batch, rows in order."""

    final: Float[Tensor, "n d_model"]


def reference_fits(model: Model, batches: tuple[Batch, ...]) -> bool:
    """Whether the log-probabilities at every real position of ``batches`` fit in :data:`REFERENCE_MAX_FLOATS`
    (always, for a model whose logits are not the plain unembedding of the final residual)."""
    n_real = sum(int(b.attention_mask.sum()) for b in batches)
    return n_real * int(model.W_U.shape[-1]) <= REFERENCE_MAX_FLOATS or not suffix_supported(model)


def real_logp(logits: Float[Tensor, "rows pos d_vocab"], batch: Batch) -> Float[Tensor, "n d_vocab"]:
    """Log-probabilities at the real positions of a batch, rows in order."""
    return torch.cat([logits[r][batch.attention_mask[r].bool()].float().log_softmax(-1) for r in range(len(batch))])


def real_final(final: Float[Tensor, "rows pos d_model"], batch: Batch) -> FinalRows:
    """The final normalised residual at the real positions of a batch, rows in order."""
    return FinalRows(final[batch.attention_mask.bool()].detach())


def reference_rows(model: Model, ref: Tensor | FinalRows, start: int, n: int) -> Float[Tensor, "n d_vocab"]:
    """The reference log-probabilities of rows ``start .. start + n`` of one KL batch, kept or made again."""
    if isinstance(ref, FinalRows):
        rows = ref.final[start : start + n]
        return unembed_at(model, rows[None], torch.zeros(n, dtype=torch.long), torch.arange(n)).log_softmax(-1)
    return ref[start : start + n]
