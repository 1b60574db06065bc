"""Uncertainty for the study's numbers: seeded percentile bootstrap intervals and paired tests.

Every function here is pure (NumPy in, floats out) and seeded, so an interval is reproducible bit for bit.
Resampling is over the *units* given (probes, items, paragraphs, seeds); a statistic of several aligned
arrays (a ratio, a difference) resamples the same units in all of them, which keeps their pairing.

Examples:
    >>> import numpy as np
    >>> lo, hi = bootstrap_ci(np.array([1.0, 2.0, 3.0, 4.0]), seed=0)
    >>> lo < 2.5 < hi
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "bootstrap_ci", "bootstrap_stat", "paired_difference", "paired_test", "DEFAULT_RESAMPLES"]

DEFAULT_RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval."""

    value: float
    ci_low: float
    ci_high: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """``{prefix: value, prefix_ci_low: ..., prefix_ci_high: ...}`` (no prefix: ``value``, ``ci_low``, ...)."""
        if not prefix:
            return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high}
        return {prefix: self.value, f"{prefix}_ci_low": self.ci_low, f"{prefix}_ci_high": self.ci_high}


def _check(arrays: Sequence[np.ndarray], level: float, n_resamples: int) -> int:
    if not arrays:
        raise ValueError("bootstrap needs at least one array")
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"arrays to resample together must have one length, got {[len(a) for a in arrays]}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive int, got {n_resamples!r}")
    return n


def bootstrap_stat(
    stat: Callable[..., float],
    *arrays: np.ndarray | Sequence[float | int],
    level: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """``stat(*arrays)`` with a percentile bootstrap interval, resampling the units of all arrays together.

    Args:
        stat: A function of the arrays (each 1-D over the same units) returning a float.
        arrays: Aligned per-unit values.
        level: Coverage of the interval.
        n_resamples: Bootstrap resamples.
        seed: Seed of the resampling.

    Returns:
        The statistic on the full data and its interval. With fewer than two units, or a statistic that is
        not finite on the data, the interval is ``nan``.
    """
    arrs = [np.asarray(a, dtype=np.float64) for a in arrays]
    n = _check(arrs, level, n_resamples)
    value = float(stat(*arrs)) if n else float("nan")
    if n < 2 or not np.isfinite(value):
        return Interval(value, float("nan"), float("nan"))
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    draws = np.array([stat(*(a[i] for a in arrs)) for i in idx], dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    if len(draws) < n_resamples // 2:
        return Interval(value, float("nan"), float("nan"))
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(draws, [tail, 100 - tail])
    return Interval(value, float(lo), float(hi))


def bootstrap_ci(
    values: np.ndarray | Sequence[float | int], *, level: float = 0.95, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``: ``(low, high)``."""
    iv = bootstrap_stat(np.mean, values, level=level, n_resamples=n_resamples, seed=seed)
    return iv.ci_low, iv.ci_high


def paired_difference(
    stat: Callable[..., float],
    a: Sequence[np.ndarray | Sequence[float | int]],
    b: Sequence[np.ndarray | Sequence[float | int]],
    *,
    level: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """``stat(*a) - stat(*b)`` on the same units, with a paired percentile bootstrap interval.

    Each resample draws one set of units and recomputes the statistic on those units in ``a`` and in ``b``,
    so what the two share (the same items, scored twice) cancels in the difference.

    Args:
        stat: A function of aligned 1-D arrays returning a float (a metric of items, say).
        a: The arrays of the first condition (one per argument of ``stat``).
        b: The same arrays of the second condition, unit for unit.
        level, n_resamples, seed: As :func:`bootstrap_stat` (the same draws: ``seed`` gives the same units).

    Returns:
        The difference on all units and its interval (NaN as :func:`bootstrap_stat` says).

    Raises:
        ValueError: ``a`` and ``b`` hold different numbers of arrays, or arrays of different lengths.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"a and b must hold the same number (at least one) of arrays, got {len(a)} and {len(b)}")
    k = len(a)

    def diff(*arrays: np.ndarray) -> float:
        return float(stat(*arrays[:k])) - float(stat(*arrays[k:]))

    return bootstrap_stat(diff, *a, *b, level=level, n_resamples=n_resamples, seed=seed)


def paired_test(
    a: np.ndarray | Sequence[float | int],
    b: np.ndarray | Sequence[float | int],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, float]:
    """Is the mean of ``a`` larger than the mean of ``b`` on the same units? A paired sign-flip test.

    Under the null hypothesis that the paired differences are symmetric around zero, each difference's sign
    is exchangeable; the p-value is the share of random sign flips whose mean difference is at least the
    observed one (one-sided, with the observed assignment counted).

    Returns:
        ``mean_diff`` (mean of ``a - b``), its bootstrap ``ci_low``/``ci_high``, ``p_value`` and ``n``.
    """
    x = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    iv = bootstrap_stat(np.mean, x, n_resamples=n_resamples, seed=seed)
    if len(x) < 2:
        return {"mean_diff": iv.value, "ci_low": iv.ci_low, "ci_high": iv.ci_high, "p_value": float("nan"), "n": len(x)}
    signs = np.random.default_rng(seed + 1).choice([-1.0, 1.0], size=(n_resamples, len(x)))
    flipped = (signs * x).mean(axis=1)
    p = (1 + np.sum(flipped >= x.mean() - 1e-12)) / (n_resamples + 1)
    return {"mean_diff": iv.value, "ci_low": iv.ci_low, "ci_high": iv.ci_high, "p_value": float(p), "n": len(x)}
