"""Interventions that remove only the bias: the head edits against hand computations, and the comparison of the
kinds of head change on a study's protocol (its zero kind must reproduce the study's own choice and numbers)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from biasgym_lens.core.checks import InputTypeError
from biasgym_lens.core.hooks import active_hooks
from biasgym_lens.heads.biasscope import scope
from biasgym_lens.heads.head_edits import edit_heads, head_directions
from biasgym_lens.heads.probes import build_probe_set
from biasgym_lens.heads.removal import REMOVAL_KINDS, RemovalComparison, choose_removals, compare_removals
from biasgym_lens.injection.training import inject

TEXTS = ["The weather today is", "A short note about trains"]


def _z(model, layer, fwd_hooks=()):
    """``hook_z`` of ``layer`` as the rest of the model sees it (a hook added after ``fwd_hooks``)."""
    seen = {}

    def grab(z, hook):
        seen["z"] = z.detach().clone()

    toks = model.to_tokens(TEXTS[0])
    model.run_with_hooks(toks, fwd_hooks=[*fwd_hooks, (f"blocks.{layer}.attn.hook_z", grab)])
    return seen["z"]


def _directions(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head, generator=g)


@pytest.mark.parametrize("mode", ["project", "subtract"])
def test_edit_heads_changes_only_the_named_heads_as_computed_by_hand(tiny_model, mode):
    d = _directions(tiny_model)
    layer, head, other = 1, 1, 0
    clean = _z(tiny_model, layer)
    with edit_heads(tiny_model, [(layer, head)], d, mode=mode, alpha=0.7):
        edited = _z(tiny_model, layer)
    assert not active_hooks(tiny_model)
    zh, v = clean[0, :, head], d[layer, head]
    if mode == "project":
        u = v / v.norm()
        expected = zh - (zh @ u)[:, None] * u[None]
        assert torch.allclose(edited[0, :, head] @ u, torch.zeros(zh.shape[0]), atol=1e-5)  # nothing left along u
    else:
        expected = zh - 0.7 * v
    assert torch.allclose(edited[0, :, head], expected, atol=1e-5)
    assert torch.equal(edited[0, :, other], clean[0, :, other])


def test_a_repeated_head_is_edited_once(tiny_model):
    d = _directions(tiny_model, 2)
    with edit_heads(tiny_model, [(1, 0)], d, mode="subtract", alpha=0.5):
        once = _z(tiny_model, 1)
    with edit_heads(tiny_model, [(1, 0), (1, 0)], d, mode="subtract", alpha=0.5):
        listed_twice = _z(tiny_model, 1)
    assert torch.equal(once, listed_twice)
    assert not torch.equal(once, _z(tiny_model, 1))  # the edit does change the head


def test_projecting_twice_is_projecting_once(tiny_model):
    d = _directions(tiny_model, 1)
    with edit_heads(tiny_model, [(0, 0)], d):
        once = tiny_model(tiny_model.to_tokens(TEXTS[1]))
    with edit_heads(tiny_model, [(0, 0)], d), edit_heads(tiny_model, [(0, 0)], d):
        twice = tiny_model(tiny_model.to_tokens(TEXTS[1]))
    assert torch.allclose(once, twice, atol=1e-5)


def test_edit_heads_refuses_bad_input_and_leaves_no_hook(tiny_model):
    d = _directions(tiny_model)
    with pytest.raises(ValueError, match="mode"):
        with edit_heads(tiny_model, [(0, 0)], d, mode="rotate"):
            pass
    with pytest.raises(ValueError, match=r"shape"):
        with edit_heads(tiny_model, [(0, 0)], d[:1]):
            pass
    zero = d.clone()
    zero[0, 0] = 0
    with pytest.raises(ValueError, match="zero bias direction"):
        with edit_heads(tiny_model, [(0, 0)], zero):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with edit_heads(tiny_model, [(99, 0)], d):
            pass
    with pytest.raises(RuntimeError, match="body"):
        with edit_heads(tiny_model, [(0, 0)], d):
            raise RuntimeError("body")
    assert not active_hooks(tiny_model)


@pytest.mark.wrong_types
def test_edit_heads_refuses_directions_that_are_not_a_tensor(tiny_model):
    with pytest.raises(InputTypeError, match="tensor"):
        with edit_heads(tiny_model, [(0, 0)], _directions(tiny_model).tolist()):
            pass
    assert not active_hooks(tiny_model)


def test_head_directions_are_token_minus_control_means_of_single_row_passes(tiny_model):
    inj = inject(tiny_model, "late", epochs=1, batch_size=4, max_texts=4, lr=5e-2, progress=False, select_best=False)
    with inj.apply(tiny_model):
        ps = build_probe_set(tiny_model, inj.spec, inj.token, probes="select", controls=inj.spec.control_groups[:2], max_probes=3)
        d = head_directions(tiny_model, ps)
        # one row at a time, without padding, straight from the cache
        rows = []
        for i in range(len(ps.batch)):
            n_real = int(ps.batch.attention_mask[i].sum())
            ids = ps.batch.input_ids[i : i + 1, :n_real]
            _, cache = tiny_model.run_with_cache(ids)
            rows.append(torch.stack([cache[f"blocks.{layer}.attn.hook_z"][0, int(ps.answer_positions[i])] for layer in range(tiny_model.cfg.n_layers)]))
    z = torch.stack(rows).float()
    n = ps.n_probes
    assert torch.allclose(d, z[:n].mean(0) - z[n:].mean(0), atol=1e-5)


def test_choose_removals_takes_the_least_excess_that_holds_on_the_tune_passages():
    curve = pd.DataFrame(
        [  # kind, param, k, excess, perplexity_increase
            ("zero", math.nan, 1, 0.8, 0.01), ("zero", math.nan, 2, 0.3, 0.04), ("zero", math.nan, 3, 0.1, 0.09),
            ("scale", 0.5, 1, 0.9, 0.00), ("scale", 0.5, 2, 0.5, 0.02), ("scale", 0.25, 2, 0.4, 0.03),
            ("project", math.nan, 1, 0.7, 0.08),
        ],
        columns=["kind", "param", "k", "excess", "perplexity_increase"],
    )
    tune = {("zero", 2): (0.045, 0.06), ("zero", 1): (0.01, 0.02), ("scale", 2): (0.03, 0.04)}
    calls = []

    def tune_cost(kind, param, k):
        calls.append((kind, param, k))
        return tune[kind, k]

    chosen, checks = choose_removals(curve, tune_cost, 0.05, "perplexity")
    # zero: k=3 breaks the budget on the curve; k=2 holds its point but not its upper end; k=1 holds
    assert chosen["zero"][1] == 1 and math.isnan(chosen["zero"][0])
    assert chosen["scale"] == (0.25, 2)  # least excess among (0.5, 2), (0.25, 2), (0.5, 1)
    assert chosen["project"][1] == 0 and math.isnan(chosen["project"][0])  # nothing within the budget
    assert [c[0] for c in calls] == ["zero", "zero", "scale"]
    assert list(checks.k) == [2, 1, 2]
    point, _ = choose_removals(curve, tune_cost, 0.05, "perplexity", conservative=False)
    assert point["zero"][1] == 2


FAST_INJECT = dict(epochs=1, batch_size=4, max_texts=4, lr=5e-2, progress=False, select_best=False)
FAST_SCOPE = dict(
    methods=("attribution",), ks=(1, 2, 3), random_draws=1, curve_passages=4, tune_passages=6, final_passages=4,
    mc_items=8, steer_alphas=(0.5,), curve_controls=None, budget=5.0, final_probes=6,
)


@pytest.fixture(scope="module")
def _compared():
    return {}


@pytest.fixture
def compared(_compared, tiny_model, tiny_family, tmp_path):
    if tiny_family not in _compared:
        inj = inject(tiny_model, "late", **FAST_INJECT)
        res = scope(tiny_model, inj, progress=False, **FAST_SCOPE)
        rc = compare_removals(tiny_model, inj, res, scales=(0.5,), head_alphas=(1.0,), progress=False)
        _compared[tiny_family] = (inj, res, rc)
    return (tiny_model, *_compared[tiny_family])


def test_the_zero_kind_reproduces_the_study(compared):
    model, inj, res, rc = compared
    assert not active_hooks(model)
    zero = rc.choices.set_index("kind").loc["zero"]
    assert zero.k == len(res.chosen)
    assert zero.heads == " ".join(f"L{a}H{b}" for a, b in res.chosen)
    study = res.summary().set_index("intervention")
    mine = rc.summary.set_index("intervention")
    for col in ("excess_cut", "excess_cut_ci_low", "excess_cut_ci_high", "perplexity_increase", "mc_accuracy"):
        assert mine.loc["zero", col] == pytest.approx(study.loc["heads", col], rel=1e-6, abs=1e-9), col
        assert mine.loc["steering", col] == pytest.approx(study.loc["steering", col], rel=1e-4, abs=1e-5), col
    if len(res.chosen) == len(res.decisions.random_heads):
        assert mine.loc["zero_random", "excess_cut"] == pytest.approx(study.loc["random_heads", "excess_cut"], rel=1e-4, abs=1e-5)


def test_the_table_has_a_row_per_kind_with_intervals_and_tests(compared, tmp_path):
    model, inj, res, rc = compared
    table = rc.table()
    assert list(table.kind) == list(REMOVAL_KINDS)
    for col in ("excess_cut_ci_low", "excess_cut_ci_high", "perplexity_increase_ci_high", "p_vs_random", "p_vs_steering"):
        assert col in table
    chosen = table[table.k > 0]
    assert (chosen.excess_cut_ci_low <= chosen.excess_cut + 1e-12).all()
    assert (chosen.excess_cut <= chosen.excess_cut_ci_high + 1e-12).all()
    # the curve holds every setting at every k, in the order each kind follows
    assert len(rc.curve) == len(rc.curve[["kind", "param"]].drop_duplicates()) * len(rc.settings["ks"])
    rc.save(tmp_path / "removals")
    back = RemovalComparison.load(tmp_path / "removals")
    pd.testing.assert_frame_equal(back.table(), table, check_dtype=False)
    with pytest.raises(Exception, match="removals|artifact|replace"):
        res.save(tmp_path / "removals")  # another kind of artifact does not replace it


def test_compare_removals_refuses_bad_settings(compared):
    model, inj, res, _ = compared
    with pytest.raises(ValueError, match="kind"):
        compare_removals(model, inj, res, kinds=("zero", "rotate"), progress=False)
    with pytest.raises(ValueError, match="scales"):
        compare_removals(model, inj, res, kinds=("scale",), scales=(1.5,), progress=False)
    other = inject(model, "rude", **FAST_INJECT)
    with pytest.raises(ValueError, match="rude|late"):
        compare_removals(model, other, res, progress=False)
    assert not active_hooks(model)


def test_the_study_curve_holds_what_the_removal_curve_computes_for_zero(compared):
    from biasgym_lens.heads.interventions import ablate_heads
    from biasgym_lens.heads.removal import _probes, removal_curve, study_zero_curve
    from biasgym_lens.heads.steps import curve_capability

    model, inj, res, rc = compared
    ks = rc.settings["ks"]
    with inj.apply(model):
        computed = removal_curve(
            model, _probes(model, inj, res.config, "tune"), curve_capability(model, res.config), [("zero", math.nan)],
            {"ranking": list(res.decisions.ranked)}, lambda s: lambda hs: lambda: ablate_heads(model, hs), ks,
        )
    reused = study_zero_curve(res, ks)
    assert list(computed.columns) == list(reused.columns)
    pd.testing.assert_frame_equal(computed, reused, rtol=1e-5, atol=1e-7, check_dtype=False)
    pd.testing.assert_frame_equal(rc.curve[rc.curve.kind == "zero"].reset_index(drop=True), reused, check_dtype=False)
