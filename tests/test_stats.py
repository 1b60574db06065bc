"""Bootstrap intervals and the paired test, against independent computations."""

from __future__ import annotations

import numpy as np
import pytest

from biasgym_lens.core.stats import bootstrap_ci, bootstrap_stat, paired_test


def test_bootstrap_matches_a_hand_written_loop():
    rng = np.random.default_rng(3)
    x = rng.normal(size=25)
    lo, hi = bootstrap_ci(x, n_resamples=500, seed=7)
    idx = np.random.default_rng(7).integers(0, 25, size=(500, 25))
    means = np.sort([x[i].mean() for i in idx])
    assert lo == pytest.approx(np.percentile(means, 2.5))
    assert hi == pytest.approx(np.percentile(means, 97.5))


def test_interval_covers_the_mean_and_shrinks_with_more_data():
    rng = np.random.default_rng(0)
    small, large = rng.normal(1.0, 1.0, 20), rng.normal(1.0, 1.0, 2000)
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_l < 1.0 < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 4
    # normal-theory width for n=2000: 2 * 1.96 / sqrt(2000) ~ 0.088
    assert (hi_l - lo_l) == pytest.approx(2 * 1.96 * large.std() / np.sqrt(2000), rel=0.15)


def test_paired_statistic_resamples_units_together():
    base = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    after = base * 0.5
    iv = bootstrap_stat(lambda a, b: 1 - b.mean() / a.mean(), base, after)
    assert iv.value == pytest.approx(0.5)
    assert iv.ci_low == pytest.approx(0.5) and iv.ci_high == pytest.approx(0.5)  # perfectly paired: no spread


def test_degenerate_inputs_give_nan_intervals_and_bad_settings_raise():
    iv = bootstrap_stat(np.mean, [1.0])
    assert iv.value == 1.0 and np.isnan(iv.ci_low) and np.isnan(iv.ci_high)
    with pytest.raises(ValueError, match="one length"):
        bootstrap_stat(lambda a, b: 0.0, [1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1, 2, 3], level=1.5)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci([1, 2, 3], n_resamples=0)


def test_paired_test_detects_a_shift_and_not_noise():
    rng = np.random.default_rng(1)
    a = rng.normal(size=40)
    assert paired_test(a + 1.0, a)["p_value"] < 0.01
    noise = paired_test(a + rng.normal(scale=0.01, size=40), a)
    assert noise["p_value"] > 0.01
    assert paired_test(a, a + 1.0)["p_value"] > 0.9


def test_paired_difference_matches_a_hand_written_paired_bootstrap():
    from biasgym_lens.core.stats import paired_difference

    rng = np.random.default_rng(4)
    n = 40
    base_c = rng.integers(0, 2, n).astype(float)  # two aligned arrays per condition: a ratio-like statistic
    base_u = np.ones(n)
    cut_c = np.where(rng.random(n) < 0.2, 1 - base_c, base_c)  # the same items, a few answers changed
    cut_u = base_u.copy()
    cut_u[:5] = 0.0

    def stat(c, u):
        return float(np.sum(c * u) / np.sum(u))

    iv = paired_difference(stat, (cut_c, cut_u), (base_c, base_u), n_resamples=400, seed=9)
    assert iv.value == pytest.approx(stat(cut_c, cut_u) - stat(base_c, base_u))
    draws = [  # the same items drawn for both conditions
        stat(cut_c[idx], cut_u[idx]) - stat(base_c[idx], base_u[idx])
        for idx in np.random.default_rng(9).integers(0, n, size=(400, n))
    ]
    assert iv.ci_low == pytest.approx(np.percentile(draws, 2.5))
    assert iv.ci_high == pytest.approx(np.percentile(draws, 97.5))
    # pairing matters: resampling the two conditions independently gives a much wider interval
    g = np.random.default_rng(1)
    unpaired = [
        stat(cut_c[i], cut_u[i]) - stat(base_c[j], base_u[j])
        for i, j in zip(g.integers(0, n, (400, n)), g.integers(0, n, (400, n)))
    ]
    assert (iv.ci_high - iv.ci_low) < 0.6 * (np.percentile(unpaired, 97.5) - np.percentile(unpaired, 2.5))
    with pytest.raises(ValueError, match="same number"):
        paired_difference(stat, (cut_c, cut_u), (base_c,))
    with pytest.raises(ValueError, match="one length"):
        paired_difference(np.mean, (cut_c,), (base_c[:-1],))
