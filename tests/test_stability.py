"""Head stability over seeds, against counts written out by hand."""

from __future__ import annotations

import random

import pytest

from biasgym_lens.heads.stability import membership, stable_heads, topk_overlap


def _random_rankings(seed: int, n_seeds: int = 5, n: int = 12) -> dict[int, list[tuple[int, int]]]:
    rng = random.Random(seed)
    heads = [(a, b) for a in range(6) for b in range(4)]
    return {s: rng.sample(heads, n) for s in range(n_seeds)}


@pytest.mark.parametrize("seed", range(5))
def test_stable_heads_are_those_in_most_top_k_lists(seed):
    rankings, k = _random_rankings(seed), 4
    counts: dict[tuple[int, int], int] = {}
    for r in rankings.values():
        for h in r[:k]:
            counts[h] = counts.get(h, 0) + 1
    majority = {h for h, c in counts.items() if c > len(rankings) / 2}
    got = stable_heads(rankings, k)
    if len(majority) <= k:
        assert set(got) == majority
    else:
        assert len(got) == k and set(got) <= majority
    assert all(counts[a] >= counts[b] for a, b in zip(got, got[1:]))  # most frequent first
    assert set(stable_heads(rankings, k, min_share=0.0)) <= set(counts)


def test_overlap_and_membership_by_hand():
    rankings = {0: [(1, 0), (2, 1), (3, 3)], 7: [(2, 1), (1, 0), (0, 2)]}
    ov = topk_overlap(rankings, k=2)
    assert ov.to_dict("records") == [{"seed_a": 0, "seed_b": 7, "k": 2, "shared": 2, "overlap": 1.0}]
    assert topk_overlap(rankings, k=3)["shared"].item() == 2
    m = membership(rankings, k=3).set_index(["seed", "label"])
    assert m.loc[(7, "L1H0"), "rank"] == 2 and not m.loc[(0, "L0H2"), "in_top_k"]
    assert len(m) == 2 * 4  # four distinct heads over the two top-3 lists


def test_identical_seeds_are_perfectly_stable_and_bad_settings_are_errors():
    same = {s: [(5, 1), (2, 2), (7, 0)] for s in range(3)}
    assert stable_heads(same, 3) == [(5, 1), (2, 2), (7, 0)]
    assert set(topk_overlap(same, 3)["overlap"]) == {1.0}
    with pytest.raises(ValueError, match="at least one seed"):
        stable_heads({}, 3)
    with pytest.raises(ValueError, match="min_share"):
        stable_heads(same, 3, min_share=1.0)


def test_scope_seeds_on_a_tiny_model(_tiny_models):
    """Two seeds, each injected and scoped: the stable heads follow from the per-seed rankings, and each seed's
    row is that seed's own summary."""
    from biasgym_lens import ScopeConfig, scope_seeds
    from biasgym_lens.core.hooks import active_hooks
    from biasgym_lens.study.summary_plots import seed_stability_heatmap

    model = _tiny_models["llama"]
    cfg = ScopeConfig(
        methods=("attribution",), ks=(1, 2), random_draws=1, curve_passages=2, tune_passages=3, final_passages=2,
        mc_items=2, steer_alphas=(0.5,), curve_controls=1, damage_candidates=4,
    )
    st = scope_seeds(model, "late", seeds=(3, 5), scope_config=cfg, epochs=1, batch_size=4, max_texts=4, max_probes=4)
    assert set(st.results) == {3, 5} and [r.config.seed for r in st.results.values()] == [3, 5]
    assert st.k == max(1, *(len(r.chosen) for r in st.results.values()))
    assert st.stable == stable_heads(st.rankings, st.k)
    per_seed = st.to_dataframe()
    for seed, res in st.results.items():
        row = per_seed.set_index("seed").loc[seed]
        heads = res.summary().set_index("intervention").loc["heads"]
        assert row.excess_cut == heads.excess_cut and row.n_chosen == len(res.chosen)
    assert len(st.overlap()) == 1 and set(st.membership().seed) == {3, 5}
    fig = seed_stability_heatmap(st.membership(), st.stable)
    assert list(fig.data[0].x) == ["seed 3", "seed 5"]
    assert active_hooks(model) == []
    with pytest.raises(ValueError, match="view must be one of"):
        st.to_dataframe("nope")
