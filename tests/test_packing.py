"""Packed forward passes (core/packing.py): the layout, and the model's outputs on packed rows against the same
rows run one at a time."""

import random

import pytest
import torch

from biasgym_lens.core import packing
from biasgym_lens.core.packing import attention_cost, pack_rows, packed_forward, packing_supported
from biasgym_lens.core.unembed import resumed_forward
from biasgym_lens.testing import tiny_bridge


@pytest.mark.parametrize("seed", range(5))
def test_pack_rows_lays_every_row_out_once_within_the_width(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 12) for _ in range(rng.randint(1, 15))]
    starts = [rng.randint(0, 3) for _ in lengths]
    p = pack_rows(lengths, starts, attention=rng.choice([0.0, 1e-3, 0.1]))
    assert sorted(r for b in p.bins for r in b) == list(range(len(lengths)))
    assert all(sum(lengths[r] for r in b) <= p.width for b in p.bins)
    assert p.width >= max(lengths) and p.n_rows * p.width >= sum(lengths)
    x = torch.randn(len(lengths), max(s + n for s, n in zip(starts, lengths)), 2)
    packed, pos = p.pack(x), p.position_ids()
    row, last = p.last_tokens()
    for r, (s, n) in enumerate(zip(starts, lengths)):  # each row's tokens end at its last token, positions 0..n-1
        first = int(last[r]) - n + 1
        torch.testing.assert_close(packed[row[r], first : first + n], x[r, s : s + n], rtol=0, atol=0)
        assert pos[row[r], first : first + n].tolist() == list(range(n))


def test_pack_rows_trades_fewer_slots_against_wider_rows():
    lengths = [11, 6, 7, 9, 8, 6] * 3
    free = pack_rows(lengths)  # attention costs nothing: the fewest slots
    assert free.n_rows * free.width <= 1.03 * sum(lengths)
    dear = pack_rows(lengths, attention=1.0)  # attention dominates: narrower rows, though more slots
    assert max(lengths) <= dear.width < free.width and dear.n_rows * dear.width > free.n_rows * free.width
    assert pack_rows([4, 4, 4], attention=0.0).n_rows * pack_rows([4, 4, 4]).width == 12


def test_pack_rows_refuses_empty_rows():
    with pytest.raises(ValueError, match="at least one token"):
        pack_rows([3, 0])


def _packed_equals_apart(model, lengths, start):
    d = model.cfg.d_model
    x = torch.randn(len(lengths), max(lengths) + 2, d, generator=torch.Generator().manual_seed(1))
    p = pack_rows(lengths, [1] * len(lengths))  # each row's tokens start at position 1 of x (a left pad)
    with torch.no_grad():
        packed = packed_forward(model, p.pack(x), start, p.position_ids())
        row, last = p.last_tokens()
        for r, n in enumerate(lengths):
            apart = resumed_forward(model, x[r : r + 1, 1 : 1 + n], start, torch.ones(1, n, dtype=torch.long), unembed=False)
            first = int(last[r]) - n + 1
            torch.testing.assert_close(packed[row[r], first : first + n], apart[0], atol=1e-4, rtol=1e-4)


def test_packed_rows_equal_rows_run_apart(tiny_model):
    assert packing_supported(tiny_model)
    for start in (0, tiny_model.cfg.n_layers - 1):
        _packed_equals_apart(tiny_model, [5, 2, 3, 4, 1], start)


def test_packed_rows_equal_rows_run_apart_on_gemma3(tiny_tokenizer_dir):
    model = tiny_bridge("gemma3", tiny_tokenizer_dir)
    assert packing_supported(model)
    _packed_equals_apart(model, [5, 2, 3, 4], 1)


def test_the_check_refuses_a_model_whose_packed_rows_talk_to_each_other(fresh_tiny_model, monkeypatch):
    """Without position ids the packed sequences attend to each other: the check must see it."""
    forward = packing.packed_forward
    monkeypatch.setattr(packing, "packed_forward", lambda m, x, s, pos: forward(m, x, s, torch.arange(x.shape[1])[None].expand(x.shape[0], -1)))
    assert not packing_supported(fresh_tiny_model)


def test_attention_cost_is_the_ratio_of_score_to_weight_flops(tiny_model):
    cfg = tiny_model.cfg
    weights = sum(p.numel() for p in tiny_model.blocks[0].parameters() if p.dim() >= 2)
    assert attention_cost(tiny_model) == pytest.approx(4 * cfg.n_heads * cfg.d_head / (2 * weights))
