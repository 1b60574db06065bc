"""The scope() pipeline on a tiny model: shapes, consistency between its tables, save/load."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from biasgym_lens.core.hooks import active_hooks
from biasgym_lens.evaluation.capability import capability_set, measure_capability
from biasgym_lens.evaluation.capability_data import load_neutral_text
from biasgym_lens.heads.biasscope import scope
from biasgym_lens.heads.interventions import ablate_heads
from biasgym_lens.heads.scope_config import ScopeConfig
from biasgym_lens.heads.scope_result import ScopeResult
from biasgym_lens.injection.training import inject

FAST_INJECT = dict(epochs=1, batch_size=4, max_texts=4, lr=5e-2, progress=False, select_best=False)
FAST_SCOPE = dict(
    ablation_probes=4, ablation_controls=1, ks=(1, 2, 3), random_draws=2, curve_passages=4, tune_passages=6,
    final_passages=4, mc_items=8, steer_alphas=(0.5,), curve_controls=None,
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
    # the curve's k=0 baseline is the token's excess on the tune probes; the 'none' row's is on the test probes
    from biasgym_lens.heads.transfer import measure_groups

    for split, value in (("tune", res.curve.baseline_excess), ("test", res.groups.query("intervention == 'none' and kind == 'token'")["excess"].item())):
        direct = measure_groups(model, inj.spec, inj, probes=split).query("kind == 'token'")["excess"].item()
        assert value == pytest.approx(direct, abs=1e-4), split
    # the curve's perplexity column follows from its loss column
    top = res.curve.table.query("selection == 'top'")
    expected = (top.neutral_loss - res.curve.baseline_loss).map(math.exp) - 1
    assert (top.perplexity_increase - expected).abs().max() < 1e-9
    # chosen: the first curve candidate (lowest excess within budget) whose cost on the tune passages holds
    checks, budget = res.extra["budget_checks"], res.config.budget
    assert [c["candidate"] for c in checks] == res.curve.candidates()[: len(checks)]
    # the decisive number is the upper end of the cost's 95% interval over the tune passages (budget_check="upper")
    assert res.config.budget_check == "upper"
    assert all(c["tune_cost_high"] >= c["tune_cost"] for c in checks)
    assert all(c["tune_cost_high"] > budget for c in checks[:-1])
    heads_row = summary[summary.intervention == "heads"].iloc[0]
    passages = load_neutral_text()
    # tune: 6 of the 70 passages spread over the file (i * 70 // 6); test: the first 4 of the others (by hand)
    tune_cap = capability_set(model, passages=[passages[i] for i in (0, 11, 23, 35, 46, 58)], mc_items=[])
    test_cap = capability_set(model, passages=[passages[i] for i in (1, 2, 3, 4)], max_mc_items=8)
    if res.chosen:
        assert checks[-1]["tune_cost_high"] <= budget and len(res.chosen) == checks[-1]["candidate"]
        assert res.chosen == list(res.curve.heads[: len(res.chosen)])
        # the decisive check is the cost on the tune passages, the reported one that on the test passages
        base, hit = (measure_capability(model, tune_cap, iv, with_mc=False) for iv in (None, lambda: ablate_heads(model, res.chosen)))
        assert checks[-1]["tune_cost"] == pytest.approx(hit.relative_to(base)["perplexity_increase"], rel=1e-4, abs=1e-7)
        high = hit.intervals(base)["perplexity_increase_ci_high"]
        assert checks[-1]["tune_cost_high"] == pytest.approx(high, rel=1e-4, abs=1e-7)
        base, hit = (measure_capability(model, test_cap, iv) for iv in (None, lambda: ablate_heads(model, res.chosen)))
        assert heads_row.perplexity_increase == pytest.approx(hit.relative_to(base)["perplexity_increase"], rel=1e-4, abs=1e-7)
        assert heads_row.mc_accuracy == pytest.approx(hit.mc_accuracy)
    else:
        assert all(c["tune_cost_high"] > budget for c in checks) and heads_row.excess_cut == pytest.approx(0.0)
    steer_checks = res.extra["steering_checks"]
    if res.extra["steer_alpha"]:
        assert steer_checks[-1]["candidate"] == res.extra["steer_alpha"] and steer_checks[-1]["tune_cost_high"] <= budget
    assert all(c["tune_cost_high"] > budget for c in steer_checks[: len(steer_checks) - bool(res.extra["steer_alpha"])])
    assert active_hooks(model) == []


def test_scope_result_round_trips(result, tmp_path):
    _, _, res = result
    res.save(tmp_path / "scope")
    back = ScopeResult.load(tmp_path / "scope")
    assert back.chosen == res.chosen and back.config == res.config
    assert back.decisions == res.decisions and back.decisions.budget_checks  # typed decisions survive the round trip
    assert torch.equal(back.damage, res.damage)
    assert set(back.scores) == set(res.scores)
    assert torch.equal(back.scores["ablation"].per_prompt, res.scores["ablation"].per_prompt)
    for view in ("summary", "groups", "capability", "curve", "scores", "agreement"):
        assert len(back.to_dataframe(view)) == len(res.to_dataframe(view))
    with pytest.raises(ValueError, match="view must be one of"):
        res.to_dataframe("nope")


def test_scope_result_refuses_to_replace_a_user_folder(result, tmp_path):
    from biasgym_lens.core.files import ArtifactError

    _, _, res = result
    (tmp_path / "scope").mkdir()
    (tmp_path / "scope" / "data.csv").write_text("a,b\n")
    with pytest.raises(ArtifactError, match="refusing to replace"):
        res.save(tmp_path / "scope")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scope"]
    assert [p.name for p in (tmp_path / "scope").iterdir()] == ["data.csv"]


def test_scope_config_validation():
    with pytest.raises(ValueError, match="unknown methods"):
        ScopeConfig(methods=("dla", "gradcam"))
    with pytest.raises(ValueError, match="kind must be 'zero' or 'mean'"):
        ScopeConfig(kind="resample")


def test_scope_with_mean_ablation_uses_the_neutral_mean(tiny_model):
    """kind='mean': the chosen heads' measured cost is that of mean ablation over the curve's passages."""
    from biasgym_lens.evaluation.capability import capability_set, measure_capability
    from biasgym_lens.heads.interventions import ablate_heads

    inj = inject(tiny_model, "late", **FAST_INJECT)
    res = scope(tiny_model, inj, progress=False, **{**FAST_SCOPE, "kind": "mean", "methods": ("attribution",)})
    heads = res.chosen
    assert heads, "the tiny model's heads cost little: the budget admits some"
    text = load_neutral_text()
    cap = capability_set(tiny_model, passages=[text[i] for i in (1, 2, 3, 4)], max_mc_items=0)  # the test passages
    curve = [text[i] for i in (0, 11, 35, 46)]  # 4 of the 6 tune passages (0, 11, 23, 35, 46, 58), spread
    ref = capability_set(tiny_model, passages=curve, mc_items=[]).neutral[0]
    mean_loss = measure_capability(tiny_model, cap, lambda: ablate_heads(tiny_model, heads, kind="mean", reference=ref), with_mc=False).neutral_loss
    assert res.capability.query("intervention == 'heads'")["neutral_loss"].item() == pytest.approx(mean_loss, rel=1e-5)
    assert active_hooks(tiny_model) == []


def test_generalisation_matrix_diagonal_matches_a_direct_measurement(tiny_model):
    from biasgym_lens.heads.interventions import ablate_heads
    from biasgym_lens.heads.transfer import generalisation_matrix, generalisation_table, measure_groups
    from biasgym_lens.injection.catalogue import load_bias

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
    # one table measures both targets; the matrices are its pivots
    table = generalisation_table(tiny_model, {"late": inj_a, "math": inj_b}, heads)
    assert len(table) == 4 and set(table.heads_of) == {"late", "math"}
    assert generalisation_matrix(tiny_model, {"late": inj_a, "math": inj_b}, heads, table=table).equals(m)
    real_from_table = generalisation_matrix(tiny_model, {"late": inj_a, "math": inj_b}, heads, target="real", table=table)
    pd.testing.assert_frame_equal(real_from_table, real, atol=1e-5, rtol=1e-4)
    row = table.query("heads_of == 'late' and measured_on == 'math'").iloc[0]
    assert row.token_excess_clean == pytest.approx(clean, abs=1e-6) and row.token_excess == pytest.approx(abl, abs=1e-6)
    # the cut's interval, by hand: resample the math test probes, paired, with core.stats' seeded generator
    per = {
        lab: measure_groups(tiny_model, spec, inj_b, iv, keep_per_probe=True)
        for lab, iv in (("none", None), ("heads", lambda: ablate_heads(tiny_model, heads["late"])))
    }

    def token_gap(df):
        ctrl = np.mean(np.stack(df.query("kind == 'control'")["per_probe"].to_list()), axis=0)
        return np.asarray(df.query("kind == 'token'")["per_probe"].item()) - ctrl

    a, b = token_gap(per["heads"]), token_gap(per["none"])
    from biasgym_lens.core.stats import DEFAULT_RESAMPLES

    idx = np.random.default_rng(0).integers(0, len(a), size=(DEFAULT_RESAMPLES, len(a)))
    draws = 1 - a[idx].mean(1) / b[idx].mean(1)
    assert row.token_cut_ci_low == pytest.approx(np.percentile(draws, 2.5), abs=1e-6)
    assert row.token_cut_ci_high == pytest.approx(np.percentile(draws, 97.5), abs=1e-6)
    assert row.token_cut_ci_low <= row.token_cut <= row.token_cut_ci_high
    assert active_hooks(tiny_model) == []


def test_stable_heads_counts_top_k_membership_across_runs(result):
    """Heads in the top k of every run (or of a fraction of runs), against a count done by hand."""
    from dataclasses import replace as dc_replace

    from biasgym_lens.heads.selection import stable_heads

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


def test_budget_selection_falls_back_when_the_curve_was_optimistic():
    """Candidates in order of excess within the budget; a k whose final cost breaks it is skipped."""
    import pandas as pd

    from biasgym_lens.heads.selection import budget_candidates, first_within_budget, pick_k

    table = pd.DataFrame(
        {
            "k": [1, 2, 4, 8, 2],
            "selection": ["top", "top", "top", "top", "random"],
            "excess": [3.0, 2.0, 1.0, 0.5, 0.1],
            "loss_increase": [0.001, 0.004, 0.010, 0.04, 0.0],
            "perplexity_increase": [0.003, 0.012, 0.030, 0.127, 0.0],  # base loss 3 nats
        }
    )
    assert budget_candidates(table, 0.05) == [4, 2, 1]  # k=8 costs 12.7% perplexity; random rows never count
    assert pick_k(table, 0.05) == 4 and pick_k(table, 0.05, "loss") == 8 and pick_k(table, 0.001) == 0
    # the tune passages say k=4 costs 7%; k=2 costs 4%, but its interval reaches 6%
    tune = {4: (0.07, 0.08), 2: (0.04, 0.06), 1: (0.01, 0.02)}
    k, checks = first_within_budget([4, 2, 1], tune.__getitem__, lambda k: 0.0, 0.05)
    assert k == 1 and [c["candidate"] for c in checks] == [4, 2, 1]
    assert [c["tune_cost_high"] for c in checks] == [0.08, 0.06, 0.02]
    k, checks = first_within_budget([4, 2, 1], tune.__getitem__, lambda k: 0.0, 0.05, conservative=False)
    assert k == 2 and [c["candidate"] for c in checks] == [4, 2]
    assert first_within_budget([4], tune.__getitem__, lambda k: 0.0, 0.05) == (0, [checks[0]])
    with pytest.raises(ValueError, match="perplexity, loss"):
        pick_k(table, 0.05, "kl")
    with pytest.raises(ValueError, match="budget_on"):
        ScopeConfig(budget_on="accuracy")
    with pytest.raises(ValueError, match="budget_check must be one of 'upper', 'point', got 'lower'"):
        ScopeConfig(budget_check="lower")


def test_a_user_bias_without_real_groups_skips_the_transfer(tiny_model, tmp_path, caplog):
    """A user bias file may name no real groups: inject and scope still run, the transfer is skipped with a
    message, and the bias travels with the saved injection (no need to find the file again)."""
    import json

    from biasgym_lens.heads.transfer import generalisation_matrix
    from biasgym_lens.injection.artifact import Injection
    from biasgym_lens.injection.catalogue import load_bias

    data = load_bias("late").to_dict()
    data.update(name="late_noreal", real_groups=[])
    path = tmp_path / "late_noreal.json"
    path.write_text(json.dumps(data))
    spec = load_bias(path)
    inj = inject(tiny_model, spec, **FAST_INJECT)
    assert inj.source == spec and inject(tiny_model, "late", **FAST_INJECT).source is None
    back = Injection.load(inj.save(tmp_path / "inj"), tiny_model)
    assert back.spec == spec
    with caplog.at_level("WARNING", logger="biasgym_lens"):
        res = scope(tiny_model, back, progress=False, **FAST_SCOPE)
        m = generalisation_matrix(tiny_model, {"late_noreal": back}, {"late_noreal": [(0, 1)]}, target="real")
    assert caplog.text.count("names no real groups") == 2
    summary = res.summary()
    assert summary.real_group_gap.isna().all() and summary.token_excess.notna().all()
    assert not (res.groups.kind == "real").any()
    assert list(m.columns) == [] and list(m.index) == ["late_noreal"]


def test_groups_that_tokenize_differently_are_scored_at_their_own_answer_position(tiny_model):
    """Group names of 1 to several tokens share a padded batch; each row equals the text run alone."""
    from biasgym_lens.core.tokens import tokenize
    from biasgym_lens.evaluation.elicit import group_scores
    from biasgym_lens.injection.catalogue import load_bias
    from biasgym_lens.injection.metrics import keyword_ids, logit_diff

    spec = load_bias("late")
    kw = keyword_ids(tiny_model, spec)
    probes = list(spec.probes[:4])
    groups = ["Japan", "the United Kingdom", "Côte d'Ivoire"]
    n_tokens = {g: len(tiny_model.tokenizer.encode(g, add_special_tokens=False)) for g in groups}
    assert len(set(n_tokens.values())) > 1, n_tokens
    for g in groups:
        got = group_scores(tiny_model, spec, g, probes, kw, batch_size=4)["per_probe"]
        alone = []
        for text in (spec.fill(p, g) for p in probes):
            b = tokenize(tiny_model, [text])
            with torch.no_grad():
                alone.append(logit_diff(tiny_model(b.input_ids)[:, -1].float(), kw))
        torch.testing.assert_close(torch.as_tensor(got).float(), torch.cat(alone), atol=1e-4, rtol=1e-4)


def test_resumed_faithfulness_curve_equals_full_passes(tiny_model, monkeypatch):
    """Each curve point resumes at its earliest ablated layer; the plain full passes give the same table."""
    from biasgym_lens.evaluation import capability
    from biasgym_lens.evaluation.capability import capability_set
    from biasgym_lens.heads import selection
    from biasgym_lens.heads.probes import build_probe_set
    from biasgym_lens.injection.catalogue import load_bias

    inj = inject(tiny_model, "late", **FAST_INJECT)
    cap = capability_set(tiny_model, max_passages=5, batch_size=2)
    L = tiny_model.cfg.n_layers
    ranked = [(L - 1, 0), (1, 2), (0, 1), (L - 1, 3)]
    with inj.apply(tiny_model):
        ps = build_probe_set(tiny_model, load_bias("late"), inj.token, probes="eval", max_probes=5)
        fast = selection.faithfulness_curve(tiny_model, ps, ranked, cap, ks=(1, 2, 3, 4), random_draws=2, seed=3)
        monkeypatch.setattr(selection, "suffix_supported", lambda model: False)
        monkeypatch.setattr(capability, "suffix_supported", lambda model: False)
        slow = selection.faithfulness_curve(tiny_model, ps, ranked, cap, ks=(1, 2, 3, 4), random_draws=2, seed=3)
    cols = ["excess", "token_logit_diff", "neutral_loss", "perplexity_increase"]
    assert (fast.table[cols] - slow.table[cols]).abs().max().max() < 1e-4
    assert fast.table["excess"].nunique() > 3  # the points differ: the ablations did something
    assert active_hooks(tiny_model) == []


def test_measured_damage_equals_full_passes(tiny_model):
    """The resumed single-head passes give each head's neutral-loss increase of a full ablated pass."""
    from biasgym_lens.evaluation.capability import capability_set, neutral_loss
    from biasgym_lens.heads.interventions import ablate_heads
    from biasgym_lens.heads.selection import measured_damage

    cap = capability_set(tiny_model, max_passages=5, batch_size=2)
    heads = [(0, 1), (1, 0), (tiny_model.cfg.n_layers - 1, 3)]
    base, damage = measured_damage(tiny_model, cap, heads)
    assert base == pytest.approx(neutral_loss(tiny_model, cap), rel=1e-6)
    for h in heads:
        full = neutral_loss(tiny_model, cap, lambda h=h: ablate_heads(tiny_model, [h])) - base
        assert damage[h] == pytest.approx(full, abs=1e-5)
    assert len({round(v, 6) for v in damage.values()}) == 3
    assert active_hooks(tiny_model) == []


def test_summary_has_an_interval_for_every_number_and_the_per_probe_values_add_up(result, tmp_path):
    import numpy as np

    from biasgym_lens.evaluation.intervals import per_probe_gaps

    model, inj, res = result
    s = res.summary()
    values = [c for c in s.columns if c not in ("intervention", "within_budget") and "_ci_" not in c]
    assert values == ["token_excess", "excess_cut", "real_group_gap", "real_gap_cut", "loss_increase",
                      "perplexity_increase", "kl", "mc_accuracy"]
    assert all(f"{v}_ci_low" in s and f"{v}_ci_high" in s for v in values)
    measured = s[s.intervention != "none"]
    assert measured[[f"{v}_ci_low" for v in values]].notna().all().all()
    none = s.set_index("intervention").loc["none"]
    assert none.excess_cut_ci_low == none.excess_cut_ci_high == 0.0  # paired with itself: no spread
    # the per-probe values are the group table's numbers, probe by probe
    tok = per_probe_gaps(res.probe_values, "token").mean(axis=1)
    table = res.groups.query("kind == 'token'").set_index("intervention")["excess"]
    assert np.allclose(tok.loc[table.index], table, atol=1e-5)
    assert (s.token_excess_ci_low <= s.token_excess + 1e-9).all() and (s.token_excess <= s.token_excess_ci_high + 1e-9).all()
    comp = res.comparisons()
    assert {("heads", "random_heads"), ("heads", "steering")} <= set(zip(comp.a, comp.b))
    assert comp.p_value.between(0, 1).all()
    # saved and loaded, the intervals are the same
    res.save(tmp_path / "scope")
    again = ScopeResult.load(tmp_path / "scope")
    pd.testing.assert_frame_equal(again.summary(), s, check_exact=False, rtol=1e-9)


def test_passage_splits_spread_over_the_file_and_stay_disjoint():
    """Tune passages every n/tune-th (the file is grouped by topic), the curve's among them, test the rest."""
    from biasgym_lens.evaluation.capability_data import passage_splits

    sp = passage_splits(70, curve=8, tune=24)
    assert sp.tune == (0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35, 37, 40, 43, 46, 49, 52, 55, 58, 61, 64, 67)
    assert sp.curve == (0, 8, 17, 26, 35, 43, 52, 61) and set(sp.curve) <= set(sp.tune)
    assert len(sp.test) == 46 and not set(sp.test) & set(sp.tune) and set(sp.test) | set(sp.tune) == set(range(70))
    assert passage_splits(70, curve=8, tune=24, test=5).test == (1, 3, 4, 6, 7)
    with pytest.raises(ValueError, match="no neutral passages are left for the test split after tune_passages=70"):
        passage_splits(70, curve=8, tune=70)
    with pytest.raises(ValueError, match=r"curve \(9\) must be at most tune \(8\)"):
        passage_splits(70, curve=9, tune=8)
