"""The standard benchmarks under a study's interventions: the interventions rebuilt from a saved scope result
reproduce the scope's own numbers, and each benchmark row equals a direct benchmark() call."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from biasgym_lens.core.hooks import active_hooks
from biasgym_lens.evaluation.benchmarks import benchmark
from biasgym_lens.heads.biasscope import scope
from biasgym_lens.heads.interventions import ablate_heads, steer
from biasgym_lens.heads.probes import build_probe_set
from biasgym_lens.heads.scope_benchmarks import (
    DIFFERENCE_COLUMNS,
    TABLE_COLUMNS,
    benchmarks_under_interventions,
    rebuild_interventions,
)
from biasgym_lens.heads.scope_result import ScopeResult
from biasgym_lens.heads.steering import bias_direction
from biasgym_lens.heads.transfer import measure_groups
from biasgym_lens.injection.training import inject

FAST_INJECT = dict(epochs=1, batch_size=4, max_texts=4, lr=5e-2, progress=False, select_best=False)
# a generous budget, so that heads are chosen and a steering strength holds it: every intervention changes something
FAST_SCOPE = dict(
    methods=("attribution",), ks=(1, 2, 3), random_draws=1, curve_passages=4, tune_passages=6, final_passages=4,
    mc_items=8, steer_alphas=(0.5,), curve_controls=None, budget=5.0, final_probes=6,
)


@pytest.fixture(scope="module")
def _studies(tmp_path_factory):
    return {}


def _study(studies, model, family, kind, tmp_path_factory):
    """One injection and scope per model family and ablation kind, saved and loaded back as a study reads it
    (the steering direction is not kept)."""
    if (family, kind) not in studies:
        inj = inject(model, "late", **FAST_INJECT)
        res = scope(model, inj, progress=False, **FAST_SCOPE, kind=kind)
        folder = tmp_path_factory.mktemp("scope") / "scope"
        res.save(folder)
        studies[family, kind] = (inj, ScopeResult.load(folder))
    return (model, *studies[family, kind])


@pytest.fixture
def study(_studies, tiny_model, tiny_family, tmp_path_factory):
    return _study(_studies, tiny_model, tiny_family, "zero", tmp_path_factory)


@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_rebuilt_interventions_reproduce_the_scope_numbers_on_the_test_probes(_studies, tiny_model, tiny_family, tmp_path_factory, kind):
    if kind == "mean" and tiny_family == "gpt2":
        pytest.skip("one family is enough to check the rebuilt mean reference")
    model, inj, res = _study(_studies, tiny_model, tiny_family, kind, tmp_path_factory)
    assert res.chosen and res.decisions.steer_alpha > 0, "the settings should exercise every intervention"
    ivs = rebuild_interventions(model, inj, res)
    assert [iv.name for iv in ivs] == ["none", "heads", "random_heads", "steering", "prefix"]
    excess = {}
    for iv in ivs:
        g = measure_groups(model, inj.spec, inj, iv.make, probes="test", max_probes=res.config.final_probes, prefix=iv.prefix)
        saved = res.groups[res.groups.intervention == iv.name].set_index("group")["logit_diff"]
        got = g.set_index("group")["logit_diff"]
        assert (got - saved.loc[got.index]).abs().max() < 1e-4, iv.name
        excess[iv.name] = g.query("kind == 'token'")["excess"].item()
        want = res.groups.query(f"intervention == '{iv.name}' and kind == 'token'")["excess"].item()
        assert excess[iv.name] == pytest.approx(want, abs=1e-4), iv.name
    assert len({round(v, 6) for v in excess.values()}) == 5  # each intervention moves the token's excess
    assert active_hooks(model) == []


def test_every_row_equals_a_direct_benchmark_call(study):
    model, inj, res = study
    kw = dict(max_items=6, seed=1, n_resamples=100)
    out = benchmarks_under_interventions(model, inj, res, ["bbq_religion", "stereoset_race"], **kw)
    assert list(out.table.columns) == list(TABLE_COLUMNS) and list(out.differences.columns) == list(DIFFERENCE_COLUMNS)
    assert len(out.table) == 5 * (4 + 3) and len(out.differences) == 4 * (4 + 3) and len(out.seconds) == 10
    assert active_hooks(model) == []
    with inj.apply(model):  # the steering direction, computed here on its own
        ps = build_probe_set(model, inj.spec, inj.token, probes="select", max_probes=res.config.score_probes)
        direction = bias_direction(model, ps, res.decisions.steer_layer)
    direct = {
        "none": benchmark(model, "stereoset_race", **kw),
        "heads": benchmark(model, "stereoset_race", lambda: ablate_heads(model, res.chosen), **kw),
        "steering": benchmark(
            model, "stereoset_race", lambda: steer(model, direction, res.decisions.steer_layer, -res.decisions.steer_alpha), **kw
        ),
        "prefix": benchmark(model, "stereoset_race", prefix=res.decisions.prefix, **kw),
    }
    for name, want in direct.items():
        got = out.table.query(f"benchmark == 'stereoset_race' and intervention == '{name}'").set_index("metric")
        pd.testing.assert_frame_equal(
            got[["value", "ci_low", "ci_high", "n"]], want.table.set_index("metric")[["value", "ci_low", "ci_high", "n"]],
            check_exact=False, atol=1e-9,
        )
        logp = next(r for r in out.results if r.name == "stereoset_race" and r.settings["intervention"] == name).items
        np.testing.assert_allclose(logp.logp_stereotype, want.items.logp_stereotype, atol=1e-4)
    base = out.table.query("intervention == 'none'").set_index(["benchmark", "metric"])["value"]
    for r in out.differences.itertuples():
        value = out.table.query(f"benchmark == '{r.benchmark}' and metric == '{r.metric}' and intervention == '{r.intervention}'")
        assert r.difference == pytest.approx(value["value"].item() - base[(r.benchmark, r.metric)], abs=1e-9, nan_ok=True)
        assert r.excludes_zero == bool(r.ci_low > 0 or r.ci_high < 0)
    assert active_hooks(model) == []


def test_bad_input_is_refused_before_any_forward_pass(study):
    model, inj, res = study
    with pytest.raises(ValueError, match="unknown benchmark 'stereoset'.*valid: stereoset_race"):
        benchmarks_under_interventions(model, inj, res, ["stereoset"])
    with pytest.raises(ValueError, match="no benchmark named"):
        benchmarks_under_interventions(model, inj, res, [])
    other = inject(model, "math", token="<MathToken>", **FAST_INJECT)
    with pytest.raises(ValueError, match="give the injection the scope was run on"):
        rebuild_interventions(model, other, res)
    with pytest.raises(ValueError, match="without its decisions"):
        rebuild_interventions(model, inj, dataclasses.replace(res, decisions=None))
    assert active_hooks(model) == []
