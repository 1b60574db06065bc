"""Packed forward passes: rows of unequal length side by side in one sequence, without padding.

A packed row holds several sequences back to back, and its position ids restart at 0 where each one begins.
Given position ids and no attention mask (and no cache), transformers builds the causal mask of packed
sequences: each token attends only to its own sequence, at its own positions. So a batch of short rows of
unequal length runs as a few rows of one width, with neither padding nor cross-talk between sequences.
:func:`packing_supported` checks that on the model itself once (two sequences apart and packed must give the
same outputs); where it does not hold, callers run padded passes instead.

Examples:
    >>> p = pack_rows([5, 3, 2, 4])
    >>> p.width, [list(b) for b in p.bins]
    (7, [[0, 2], [3, 1]])
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from biasgym_lens.core.protocols import Model
from biasgym_lens.core.unembed import skipping_layers, suffix_supported

__all__ = ["Packing", "pack_rows", "packed_forward", "packing_supported", "attention_cost", "MAX_WIDTH_FACTOR"]

MAX_WIDTH_FACTOR = 8
"""The widest packed row :func:`pack_rows` tries, in multiples of the longest source row."""

_SUPPORTED: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Packing:
    """Where each source row's tokens sit in a packed batch.

    Attributes:
        bins: The source rows of each packed row, in the order they are laid out.
        width: Tokens per packed row.
        lengths: Tokens taken from each source row (its first ``lengths[r]`` real tokens).
        starts: Position of each source row's first real token in the source batch (0 for right padding).
    """

    bins: tuple[tuple[int, ...], ...]
    width: int
    lengths: tuple[int, ...]
    starts: tuple[int, ...]

    @property
    def n_rows(self) -> int:
        """Packed rows."""
        return len(self.bins)

    def slots(self) -> tuple[list[int], list[int]]:
        """Packed row and offset of each source row's first token (the layout every other method reads)."""
        row, offset = [0] * len(self.lengths), [0] * len(self.lengths)
        for b, members in enumerate(self.bins):
            at = 0
            for r in members:
                row[r], offset[r] = b, at
                at += self.lengths[r]
        return row, offset

    def pack(self, x: Float[Tensor, "rows pos d"]) -> Float[Tensor, "packed width d"]:
        """The source rows' tokens laid out in the packed rows (zeros after the last sequence of a row)."""
        out = x.new_zeros(self.n_rows, self.width, *x.shape[2:])
        for r, (b, at) in enumerate(zip(*self.slots())):
            n, s = self.lengths[r], self.starts[r]
            out[b, at : at + n] = x[r, s : s + n]
        return out

    def position_ids(self, device: Any = None) -> Int[Tensor, "packed width"]:
        """Positions restarting at 0 at each sequence; the unused tail of a row counts as one more sequence."""
        pos = torch.empty(self.n_rows, self.width, dtype=torch.long)
        end = [0] * self.n_rows  # where each packed row's last sequence ends
        for r, (b, at) in enumerate(zip(*self.slots())):
            pos[b, at : at + self.lengths[r]] = torch.arange(self.lengths[r])
            end[b] = max(end[b], at + self.lengths[r])
        for b, at in enumerate(end):
            pos[b, at:] = torch.arange(self.width - at)
        return pos.to(device) if device is not None else pos

    def last_tokens(self) -> tuple[Int[Tensor, " rows"], Int[Tensor, " rows"]]:
        """``(packed row, position)`` of each source row's last packed token."""
        row, offset = self.slots()
        return torch.tensor(row), torch.tensor(offset) + torch.tensor(self.lengths) - 1


def _first_fit_decreasing(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Rows into as few bins of ``width`` tokens as first-fit decreasing finds (longest rows first)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for r in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        b = next((i for i, free in enumerate(room) if free >= lengths[r]), None)
        if b is None:
            bins.append([])
            room.append(width)
            b = len(bins) - 1
        bins[b].append(r)
        room[b] -= lengths[r]
    return bins


def pack_rows(lengths: Sequence[int], starts: Sequence[int] | None = None, *, attention: float = 0.0) -> Packing:
    """Pack rows of these lengths into rows of one width, the width that costs least.

    A packed batch of ``n`` rows of width ``w`` costs ``n * w * (1 + attention * w)`` token-layers: every slot
    runs the position-wise weights, and each token's attention scores grow with the row it sits in (a packed
    row's attention is computed in full, then masked). ``attention`` is :func:`attention_cost` of the model; 0
    packs into the fewest slots. Widths from the longest row to the sum of all are tried, with first-fit
    decreasing for each, up to :data:`MAX_WIDTH_FACTOR` times the longest row; ties go to the narrower width.
    """
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"every row needs at least one token, got lengths {lengths}")
    best: tuple[float, int, list[list[int]]] | None = None
    for width in range(max(lengths), min(sum(lengths), MAX_WIDTH_FACTOR * max(lengths)) + 1):
        bins = _first_fit_decreasing(lengths, width)
        used = max(sum(lengths[r] for r in b) for b in bins)  # the widest row actually filled
        cost = len(bins) * used * (1.0 + attention * used)
        if best is None or cost < best[0] - 1e-9:
            best = (cost, used, bins)
        if len(bins) == 1:
            break
    assert best is not None
    starts = [0] * len(lengths) if starts is None else [int(s) for s in starts]
    return Packing(tuple(tuple(b) for b in best[2]), best[1], tuple(lengths), tuple(starts))


def attention_cost(model: Model) -> float:
    """Attention-score FLOPs per token and per unit of row width, over a block's position-wise FLOPs per token
    (``4 * n_heads * d_head`` against twice the block's weights): the ``attention`` of :func:`pack_rows`."""
    per_token = 2 * sum(p.numel() for p in model.blocks[0].parameters() if p.dim() >= 2)
    return 4 * int(model.cfg.n_heads) * int(model.cfg.d_head) / max(per_token, 1)


def packed_forward(
    model: Model, resid: Float[Tensor, "packed width d_model"], start: int, position_ids: Tensor
) -> Float[Tensor, "packed width d_model"]:
    """The final normalised residual of a forward pass resumed at block ``start`` on packed rows (hooks on
    blocks ``>= start`` apply). Exact only where :func:`packing_supported`."""
    with skipping_layers(model, start):
        return model(resid, start_at_layer=start, position_ids=position_ids.to(resid.device), use_cache=False)


@torch.no_grad()
def packing_supported(model: Model) -> bool:
    """Whether packed passes of this model equal separate ones: checked once per model on two random sequences
    (3 and 2 tokens) through every block, and remembered."""
    known = _SUPPORTED.get(model)
    if known is not None:
        return known
    ok = False
    if suffix_supported(model):
        ok = _packs_exactly(model)
    _SUPPORTED[model] = ok
    return ok


def _packs_exactly(model: Model) -> bool:
    d, device = int(model.cfg.d_model), model.W_E.device
    dtype = model.W_E.dtype
    x = torch.randn(2, 3, d, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    p = pack_rows([3, 2])
    try:
        with skipping_layers(model, 0):
            apart = [model(x[r : r + 1, :n], start_at_layer=0).float() for r, n in enumerate(p.lengths)]
        packed = packed_forward(model, p.pack(x), 0, p.position_ids()).float()
    except (TypeError, ValueError, RuntimeError, NotImplementedError):  # a model that takes no position ids
        return False
    got = [packed[b, at : at + n] for b, at, n in zip(*p.slots(), p.lengths)]
    scale = max(float(a.abs().max()) for a in apart) + 1e-6
    return all(torch.allclose(g, a[0], rtol=0.0, atol=1e-2 * scale) for g, a in zip(got, apart))
