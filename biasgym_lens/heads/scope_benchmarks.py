"""The standard bias benchmarks (StereoSet race, BBQ Nationality, BBQ Religion) under every intervention of a
study: does removing the heads of an injected bias change the model's real-world stereotypes?

:func:`rebuild_interventions` rebuilds the five interventions of a saved :class:`ScopeResult` (nothing, the
chosen heads, as many random heads, steering, the debiasing prefix) the way
:func:`~biasgym_lens.heads.biasscope.scope` built them (:mod:`biasgym_lens.heads.scope_interventions`): the
steering direction, which the scope folder does not keep, is computed again from the injection's select probes,
and mean ablation's reference from the curve's passages; both are deterministic. The model runs without the
injected token (no benchmark text contains it).

:func:`benchmarks_under_interventions` scores each benchmark under each intervention on the same items
(:func:`~biasgym_lens.evaluation.benchmarks.benchmark`) and compares each intervention with ``none`` by a paired
bootstrap (:meth:`~biasgym_lens.evaluation.benchmarks.BenchmarkResult.difference`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from biasgym_lens.core.protocols import Model
from biasgym_lens.core.provenance import check_same_model
from biasgym_lens.core.stats import DEFAULT_RESAMPLES
from biasgym_lens.evaluation.benchmark_data import check_name
from biasgym_lens.evaluation.benchmarks import BENCHMARK_NAMES, BenchmarkResult, benchmark
from biasgym_lens.heads.scope_interventions import mean_reference, steering_direction, study_interventions
from biasgym_lens.heads.scope_records import Intervention, ScopeDecisions
from biasgym_lens.heads.scope_result import ScopeResult
from biasgym_lens.heads.steps import curve_capability

logger = logging.getLogger(__name__)

__all__ = [
    "TABLE_COLUMNS",
    "DIFFERENCE_COLUMNS",
    "InterventionBenchmarks",
    "rebuild_interventions",
    "benchmarks_under_interventions",
]

TABLE_COLUMNS = ("benchmark", "metric", "intervention", "value", "ci_low", "ci_high", "n", "n_items")
"""The columns of :attr:`InterventionBenchmarks.table` (``n``: the items a metric counts, ``n_items``: all scored)."""

DIFFERENCE_COLUMNS = (
    "benchmark",
    "metric",
    "intervention",
    "difference",
    "ci_low",
    "ci_high",
    "excludes_zero",
    "n",
    "n_items",
)
"""The columns of :attr:`InterventionBenchmarks.differences`."""


@dataclass(frozen=True, eq=False)
class InterventionBenchmarks:
    """Benchmarks measured under each intervention of a study.

    Attributes:
        table: One row per benchmark, metric and intervention: the value and its 95% bootstrap interval
            (:data:`TABLE_COLUMNS`).
        differences: One row per benchmark, metric and intervention other than ``none``: the metric minus its
            value with no intervention, a paired 95% bootstrap interval (the same items resampled in both) and
            whether that interval excludes 0 (:data:`DIFFERENCE_COLUMNS`).
        seconds: ``benchmark, intervention, seconds``: wall time of each run's forward passes.
        settings: ``names``, ``max_items``, ``seed``, ``score``, ``batch_size``, ``n_resamples`` and
            ``interventions`` (what each one is: heads, steering layer and strength, prefix).
        results: Every run, per-item log-probabilities included.
    """

    table: pd.DataFrame
    differences: pd.DataFrame
    seconds: pd.DataFrame
    settings: dict[str, Any]
    results: tuple[BenchmarkResult, ...]

    def to_dataframe(self, view: str = "table") -> pd.DataFrame:
        """``"table"``, ``"differences"`` or ``"seconds"``.

        Raises:
            ValueError: another view.
        """
        views = {"table": self.table, "differences": self.differences, "seconds": self.seconds}
        if view not in views:
            raise ValueError(f"view must be one of {sorted(views)}, got {view!r}")
        return views[view].copy()

    @classmethod
    def of(cls, results: Sequence[BenchmarkResult], settings: dict[str, Any]) -> InterventionBenchmarks:
        """Tables from the runs: ``none`` must be among the runs of each benchmark (the base of the differences)."""
        rows, diffs, seconds = [], [], []
        base = {r.name: r for r in results if r.settings["intervention"] == "none"}
        for r in results:
            label, n_items = r.settings["intervention"], r.settings["n_items"]
            rows.append(r.to_dataframe().assign(n_items=n_items))
            seconds.append({"benchmark": r.name, "intervention": label, "seconds": r.seconds})
            if label != "none":
                d = r.difference(base[r.name]).assign(intervention=label, n_items=n_items)
                diffs.append(d.assign(excludes_zero=(d.ci_low > 0) | (d.ci_high < 0)))
        table = pd.concat(rows, ignore_index=True)[list(TABLE_COLUMNS)]
        differences = (
            pd.concat(diffs, ignore_index=True)[list(DIFFERENCE_COLUMNS)]
            if diffs
            else pd.DataFrame(columns=list(DIFFERENCE_COLUMNS))
        )
        return cls(table, differences, pd.DataFrame(seconds), settings, tuple(results))


def _decisions(model: Model, injection: Any, result: ScopeResult) -> ScopeDecisions:
    injection.check_model(model)
    check_same_model(result.provenance, model, f"the scope result of {result.bias!r}")
    if (result.bias, result.token) != (injection.bias, injection.token):
        raise ValueError(
            f"the scope result is of {result.bias!r} ({result.token}), the injection of {injection.bias!r} "
            f"({injection.token}): give the injection the scope was run on"
        )
    if result.decisions is None:
        raise ValueError(
            "this scope result was saved without its decisions (an earlier version): run scope again"
        )
    return result.decisions


def rebuild_interventions(model: Model, injection: Any, result: ScopeResult) -> list[Intervention]:
    """The five interventions of a saved scope result, built as :func:`~biasgym_lens.heads.biasscope.scope`
    built them: ``none``, ``heads`` (``result.chosen``, ablated as ``result.config.kind`` says, against the
    same mean reference), ``random_heads`` (``decisions.random_heads``), ``steering`` (subtracting
    ``decisions.steer_alpha`` times the bias direction, recomputed from the select probes, after
    ``decisions.steer_layer``) and ``prefix`` (``decisions.prefix``).

    Args:
        model: The model the injection was trained in and the scope ran on.
        injection: The study's :class:`~biasgym_lens.injection.artifact.Injection`.
        result: Its :class:`ScopeResult` (e.g. ``ScopeResult.load(out / "scope")``).

    Returns:
        The interventions, in that order.

    Raises:
        ValueError: another model, an injection of another bias or token, a result without its decisions,
            or a steering layer that differs from the one the scope recorded.
    """
    decisions = _decisions(model, injection, result)
    config = result.config
    reference = (
        mean_reference(model, curve_capability(model, config), config) if config.kind == "mean" else None
    )
    direction, layer = None, decisions.steer_layer
    if decisions.steer_alpha:
        direction, layer = steering_direction(model, injection, config)
        if layer != decisions.steer_layer:
            raise ValueError(
                f"the steering layer is {layer} for this model and config, the scope recorded {decisions.steer_layer}"
            )
    steering = (direction, layer, float(decisions.steer_alpha))
    return study_interventions(
        model, result.chosen, decisions.random_heads, steering, decisions.prefix, config, reference
    )


def _describe(result: ScopeResult) -> dict[str, Any]:
    d = result.decisions
    assert d is not None  # checked by _decisions
    return {
        "none": "the unmodified model",
        "heads": {"heads": [list(h) for h in result.chosen], "kind": result.config.kind},
        "random_heads": {"heads": [list(h) for h in d.random_heads], "kind": result.config.kind},
        "steering": {"layer": d.steer_layer, "alpha": d.steer_alpha},
        "prefix": {"prefix": d.prefix},
    }


def _names(names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(names, str):
        names = [names]
    out = tuple(dict.fromkeys(check_name(n) for n in names))
    if not out:
        raise ValueError(f"no benchmark named; valid: {', '.join(BENCHMARK_NAMES)}")
    return out


def benchmarks_under_interventions(
    model: Model,
    injection: Any,
    result: ScopeResult,
    names: Sequence[str] = BENCHMARK_NAMES,
    *,
    max_items: int | None = None,
    seed: int = 0,
    score: str = "sum",
    batch_size: int = 32,
    n_resamples: int = DEFAULT_RESAMPLES,
) -> InterventionBenchmarks:
    """Each benchmark under each intervention of a study, on the same items, with paired differences from
    ``none``.

    Args:
        model: The model of the study (raw weights; the injected token is not applied).
        injection: The study's injection.
        result: Its scope result (see :func:`rebuild_interventions`).
        names: Benchmarks among ``stereoset_race``, ``bbq_nationality``, ``bbq_religion`` (each once).
        max_items: A seeded stratified subset of this many items per benchmark (the same under every
            intervention); None: all items.
        seed: Seed of the subset and of the bootstrap.
        score: ``"sum"`` or ``"mean"`` log-probabilities (see :func:`~biasgym_lens.evaluation.benchmarks.benchmark`).
        batch_size: Sequences per forward pass.
        n_resamples: Bootstrap resamples of every interval.

    Returns:
        The tables (:class:`InterventionBenchmarks`).

    Raises:
        ValueError: an unknown benchmark name (the valid ones are listed), none named, or what
            :func:`rebuild_interventions` and :func:`~biasgym_lens.evaluation.benchmarks.benchmark` refuse.
    """
    names = _names(names)
    interventions = rebuild_interventions(model, injection, result)
    runs = []
    for name in names:
        for iv in interventions:
            logger.info("[%s] %s under %s", result.bias, name, iv.name)
            runs.append(
                benchmark(
                    model,
                    name,
                    iv.make,
                    max_items=max_items,
                    seed=seed,
                    batch_size=batch_size,
                    score=score,
                    label=iv.name,
                    n_resamples=n_resamples,
                    prefix=iv.prefix or None,
                )
            )
    settings = {
        "names": list(names),
        "max_items": max_items,
        "seed": seed,
        "score": score,
        "batch_size": batch_size,
        "n_resamples": n_resamples,
        "interventions": _describe(result),
    }
    return InterventionBenchmarks.of(runs, settings)
