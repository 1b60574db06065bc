"""The anchors benchmark (benchmarks/anchors.py, anchor_step.py) on the tiny models: every anchor runs, and where
the project and the other tools do the same work their numbers agree."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import anchor_step  # noqa: E402
import anchors  # noqa: E402

from biasgym_lens.core.hooks import active_hooks  # noqa: E402


@pytest.fixture(scope="module")
def _setups():
    return {}


@pytest.fixture
def probed(tiny_model, tiny_family, _setups):
    """The tiny model, a quick injection and its probe set (built once per family)."""
    if tiny_family not in _setups:
        _setups[tiny_family] = anchors.setup(tiny_model, n_probes=2, n_controls=1)
    return (tiny_model, *_setups[tiny_family])


def test_scan_anchor_three_ways_agree_and_the_scan_runs_above_its_floor(probed, capsys):
    model, inj, ps = probed
    heads = [(layer, h) for layer in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    r = anchors.scan_anchor(model, inj, ps, heads)
    assert set(r["diff"]) == {("tl", "project"), ("loop", "project"), ("tl", "loop")}
    assert all(d < 1e-5 for d in r["diff"].values()), r["diff"]
    assert 1.0 <= r["flops_over_floor"] < r["loop_flops_over_floor"]
    assert "TL activation-patching sweep vs project" in capsys.readouterr().out
    assert active_hooks(model) == []


def test_attribution_anchor_tl_ways_agree_with_the_project(probed):
    model, inj, ps = probed
    r = anchors.attribution_anchor(model, inj, ps, repeats=1)
    for name, (rho, diff) in r["agreement"].items():
        assert rho > 0.999 and diff < 1e-5, (name, rho, diff)
    assert r["shipped"]  # the as-shipped call's outcome is reported
    assert active_hooks(model) == []


def test_dla_anchor_agrees_once_the_gain_is_folded(probed):
    model, inj, ps = probed
    r = anchors.dla_anchor(model, inj, ps, repeats=1)
    rho, rel = r["folded"]
    assert rho > 0.999 and rel < 1e-4
    assert r["raw"][1] > 1e-3  # the tiny models' final norm has a random gain: the unfolded way is off


def test_step_anchor_loss_curves_agree(tiny_model):
    r = anchor_step.step_anchor(tiny_model, repeats=1)
    assert r["loss_diff"]["plain"] < 1e-5 and r["loss_diff"]["same"] < 1e-5
    assert r["loss_diff"]["user"] > r["loss_diff"]["same"]
    assert r["drifted"] > 0 and r["memory"] is None
    assert all(t > 0 for t in r["times"])
    project, hf = r["batches"]["first_losses"]  # the same vector on the same batch: one loss, two ways
    assert project == pytest.approx(hf, rel=1e-5)
    real, padded = r["batches"]["tokens"]
    assert 0 < real < padded and all(t > 0 for t in r["batches"]["times"])
    assert active_hooks(tiny_model) == []


def test_spread_keeps_every_layer():
    every = [(layer, h) for layer in range(4) for h in range(3)]
    assert anchors.spread(every, 0) == every
    assert {layer for layer, _ in anchors.spread(every, 4)} == {0, 1, 2, 3}
