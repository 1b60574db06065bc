"""The scope() pipeline on a tiny model: shapes, consistency between its tables, save/load."""

from __future__ import annotations

import math

import pytest
import torch

from biasgym_lens.hooks import active_hooks
from biasgym_lens.inject import inject
from biasgym_lens.study import ScopeConfig, ScopeResult, scope

FAST_INJECT = dict(epochs=1, batch_size=4, max_texts=4, lr=5e-2, progress=False, select_best=False)
FAST_SCOPE = dict(
    ablation_probes=4, ablation_controls=1, ks=(1, 2, 3), random_draws=2, curve_passages=4, final_passages=4,
    mc_items=8, steer_alphas=(0.5,), curve_controls=None,
)


@pytest.fixture
def result(tiny_model):
    inj = inject(tiny_model, "late", **FAST_INJECT)
    return tiny_model, inj, scope(tiny_model, inj, progress=False, **FAST_SCOPE)


def test_scope_tables_are_consistent(result):
    model, inj, res = result
    assert set(res.scores) == {"dla", "attention", "attribution", "ablation", "specific"}
    assert res.damage.shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert set(res.groups.intervention) == {"none", "heads", "random_heads", "steering", "prefix"}
    summary = res.summary()
    none = summary[summary.intervention == "none"].iloc[0]
    assert none.excess_cut == pytest.approx(0.0, abs=1e-9) and none.loss_increase == pytest.approx(0.0)
    # perplexity is exp(loss): its relative increase follows from the loss increase and the base loss
    base_loss = res.capability.query("intervention == 'none'")["neutral_loss"].item()
    for row in summary.itertuples():
        expected = math.exp(base_loss * row.loss_increase) - 1
        assert row.perplexity_increase == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # the curve's k=0 baseline is the same measurement as the 'none' row's token excess
    assert res.curve.baseline_excess == pytest.approx(
        res.groups.query("intervention == 'none' and kind == 'token'")["excess"].item(), abs=1e-4
    )
    assert len(res.chosen) == res.curve.chosen_k()
    if res.chosen:
        row = res.curve.table.query(f"selection == 'top' and k == {len(res.chosen)}").iloc[0]
        assert row.loss_increase <= res.config.budget
    assert active_hooks(model) == []


def test_scope_result_round_trips(result, tmp_path):
    _, _, res = result
    res.save(tmp_path / "scope")
    back = ScopeResult.load(tmp_path / "scope")
    assert back.chosen == res.chosen and back.config == res.config
    assert torch.equal(back.damage, res.damage)
    assert set(back.scores) == set(res.scores)
    assert torch.equal(back.scores["ablation"].per_prompt, res.scores["ablation"].per_prompt)
    for view in ("summary", "groups", "capability", "curve", "scores", "agreement"):
        assert len(back.to_dataframe(view)) == len(res.to_dataframe(view))
    with pytest.raises(ValueError, match="view must be one of"):
        res.to_dataframe("nope")


def test_scope_config_validation():
    with pytest.raises(ValueError, match="unknown methods"):
        ScopeConfig(methods=("dla", "gradcam"))


def test_generalisation_matrix_diagonal_matches_a_direct_measurement(tiny_model):
    from biasgym_lens.catalogue import load_bias
    from biasgym_lens.interventions import ablate_heads
    from biasgym_lens.study import generalisation_matrix, measure_groups

    inj_a = inject(tiny_model, "late", **FAST_INJECT)
    inj_b = inject(tiny_model, "math", token="<MathToken>", **FAST_INJECT)
    heads = {"late": [(0, 1), (1, 2)], "math": [(1, 0)]}
    m = generalisation_matrix(tiny_model, {"late": inj_a, "math": inj_b}, heads)
    assert list(m.index) == ["late", "math"] and list(m.columns) == ["late", "math"]
    spec = load_bias("math")
    clean = measure_groups(tiny_model, spec, inj_b).query("kind == 'token'")["excess"].item()
    abl = measure_groups(tiny_model, spec, inj_b, lambda: ablate_heads(tiny_model, heads["late"])).query("kind == 'token'")["excess"].item()
    assert m.loc["late", "math"] == pytest.approx(1 - abl / clean, rel=1e-4, abs=1e-6)
    real = generalisation_matrix(tiny_model, {}, heads, target="real")
    assert list(real.columns) == ["late", "math"]
    assert active_hooks(tiny_model) == []


def test_stable_heads_counts_top_k_membership_across_runs(result):
    """Heads in the top k of every run (or of a fraction of runs), against a count done by hand."""
    from dataclasses import replace as dc_replace

    from biasgym_lens.selection import stable_heads

    base = result[2].scores["attribution"]
    L, H = base.n_layers, base.n_heads
    grids = []
    for top in ([(0, 1), (1, 2), (1, 0)], [(0, 1), (1, 2), (0, 3)], [(0, 1), (1, 3), (1, 0)]):
        g = torch.zeros(1, L, H)
        for rank, (layer, h) in enumerate(top):
            g[0, layer, h] = 10.0 - rank
        grids.append(dc_replace(base, per_prompt=g))
    assert stable_heads(grids, k=3) == [(0, 1)]
    # in at least 2 of 3 runs: (0, 1) three times, then (1, 2) and (1, 0) twice, ordered by mean score
    assert stable_heads(grids, k=3, min_fraction=2 / 3) == [(0, 1), (1, 2), (1, 0)]
    with pytest.raises(ValueError, match="no runs"):
        stable_heads([], k=3)
