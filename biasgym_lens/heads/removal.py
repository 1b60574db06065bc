"""Which way of changing the responsible heads removes the most bias within the capability budget?

Zeroing a head removes everything it writes, so the budget stops it where the heads that carry the bias also
carry what the model needs. :func:`compare_removals` compares, for a finished study, five kinds of change on
one protocol (the study's splits, ks, curve passages, budget and budget check):

- ``zero``: the heads' output set to 0 (the study's own intervention);
- ``mean``: set to each head's mean output over the curve's neutral passages;
- ``scale``: multiplied by a factor ``s`` (``scales``), the paper's steering by a factor;
- ``project``: the component along each head's bias direction removed
  (:func:`~biasgym_lens.heads.head_edits.edit_heads`; directions from the select probes);
- ``head_steer``: ``alpha`` times each head's bias direction subtracted (``head_alphas``).

``zero`` and ``mean`` remove the whole output and follow the study's ranking, which already dropped the heads
the model cannot lose; the kinds that keep most of the output follow the heads' effect on the bias
(attribution patching on the select probes), since their cost is measured along the curve anyway.

The steps, in order: the curve (:func:`removal_curve`: for every setting, a kind with one parameter, and every
k, the token's excess on the tune probes and the cost on the curve's passages); each kind's choice
(:func:`choose_removals`: its settings within the budget, least excess first, confirmed on the tune passages);
then, only after every choice, the test split: none, the study's steering baseline, each kind's choice and as
many random heads changed the same way (:func:`~biasgym_lens.heads.steps.measure_all`), with intervals and
paired tests against random heads and steering.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from biasgym_lens.core.checks import check_choice, check_real
from biasgym_lens.core.protocols import Model
from biasgym_lens.core.provenance import Provenance, check_same_model
from biasgym_lens.evaluation.capability_records import CapabilitySet
from biasgym_lens.evaluation.intervals import bias_intervals, paired_comparisons
from biasgym_lens.heads.head_edits import edit_heads, head_directions
from biasgym_lens.heads.interventions import Head, ablate_heads, first_layer, head_means
from biasgym_lens.heads.probes import ProbeSet, build_probe_set
from biasgym_lens.heads.removal_result import RemovalComparison
from biasgym_lens.heads.scope_benchmarks import rebuild_interventions
from biasgym_lens.heads.scope_interventions import random_heads
from biasgym_lens.heads.scope_records import Intervention
from biasgym_lens.heads.scope_result import ScopeResult
from biasgym_lens.heads.selection import curve_baseline, curve_row, first_within_budget, point_measures
from biasgym_lens.heads.steps import TestSet, TuneBudget, curve_capability, measure_all
from biasgym_lens.heads.transfer import measure_groups

logger = logging.getLogger(__name__)

__all__ = [
    "REMOVAL_KINDS",
    "HEAD_ORDER",
    "RemovalComparison",
    "compare_removals",
    "removal_curve",
    "study_zero_curve",
    "choose_removals",
]

REMOVAL_KINDS = ("zero", "mean", "scale", "project", "head_steer")
HEAD_ORDER = {"zero": "ranking", "mean": "ranking", "scale": "effect", "project": "effect", "head_steer": "effect"}
"""The head order each kind follows: the study's ``ranking`` or the heads' ``effect`` on the bias."""

Setting = tuple[str, float]  # (kind, parameter: the scale or the multiplier; NaN for the others)
Maker = Callable[[list[Head]], Callable[[], Any]]  # heads -> a factory of the context manager that changes them


def _settings(kinds: Sequence[str], scales: Sequence[float], head_alphas: Sequence[float]) -> list[Setting]:
    out: list[Setting] = []
    for kind in kinds:
        params = {"scale": scales, "head_steer": head_alphas}.get(kind, (math.nan,))
        out += [(kind, float(p)) for p in params]
    return out


def _makers(model: Model, means: Any, directions: torch.Tensor) -> dict[str, Callable[[float], Maker]]:
    """kind -> (param -> (heads -> context manager factory))."""
    return {
        "zero": lambda p: lambda hs: lambda: ablate_heads(model, hs, kind="zero"),
        "mean": lambda p: lambda hs: lambda: ablate_heads(model, hs, kind="mean", reference=means),
        "scale": lambda p: lambda hs: lambda: ablate_heads(model, hs, kind="scale", scale=p),
        "project": lambda p: lambda hs: lambda: edit_heads(model, hs, directions, mode="project"),
        "head_steer": lambda p: lambda hs: lambda: edit_heads(model, hs, directions, mode="subtract", alpha=p),
    }


def removal_curve(
    model: Model,
    ps: ProbeSet,
    cap: CapabilitySet,
    settings: Sequence[Setting],
    orders: dict[str, list[Head]],
    make: Callable[[Setting], Maker],
    ks: Sequence[int],
    *,
    progress: bool = False,
) -> pd.DataFrame:
    """For every setting and every k: the first k heads of the setting's kind's order (:data:`HEAD_ORDER`)
    changed that way; the token's excess on ``ps`` and the loss on ``cap`` (run with the injection applied).
    Each point resumes at its first changed layer (see :func:`~biasgym_lens.heads.selection.point_measures`)."""
    cap, (base_excess, _, base_loss), probe_resid = curve_baseline(model, ps, cap)
    rows = []
    bar = tqdm(total=len(settings) * len(ks), desc="removal curve", disable=not progress, leave=False)
    for setting in settings:
        order = HEAD_ORDER[setting[0]]
        for k in ks:
            heads = list(orders[order][:k])
            measures = point_measures(model, ps, cap, make(setting)(heads), first_layer(heads), probe_resid)
            row = curve_row(k, "top", 0, measures, base_excess, base_loss)
            rows.append({"kind": setting[0], "param": setting[1], "order": order, "heads": _heads_text(heads), **row})
            bar.update(1)
    bar.close()
    return pd.DataFrame(rows).drop(columns=["selection", "draw"])


def study_zero_curve(result: ScopeResult, ks: Sequence[int]) -> pd.DataFrame:
    """The ``zero`` rows of the removal curve from the study's own faithfulness curve (its ``top`` rows: the
    same ranking, probes, passages and ks), which :func:`removal_curve` would compute again."""
    top = result.curve.table
    top = top[(top.selection == "top") & top.k.isin(list(ks))].drop(columns=["selection", "draw"])
    heads = [_heads_text(result.curve.heads[: int(k)]) for k in top.k]
    return top.assign(kind="zero", param=math.nan, order=HEAD_ORDER["zero"], heads=heads)[
        ["kind", "param", "order", "heads", *top.columns]
    ].reset_index(drop=True)


def choose_removals(
    curve: pd.DataFrame,
    tune_cost: Callable[[str, float, int], tuple[float, float]],
    budget: float,
    budget_on: str,
    *,
    conservative: bool = True,
) -> tuple[dict[str, tuple[float, int]], pd.DataFrame]:
    """Each kind's choice: among its curve points within ``budget`` on the curve's passages, least excess first
    (then fewer heads), the first whose cost on the tune passages holds the budget (its upper 95% end with
    ``conservative``; see :func:`~biasgym_lens.heads.selection.first_within_budget`).

    Returns:
        ``({kind: (param, k)}, checks)``; ``k == 0`` where nothing held.
    """
    col = f"{budget_on}_increase"
    chosen: dict[str, tuple[float, int]] = {}
    checks: list[dict[str, Any]] = []
    for kind, rows in curve.groupby("kind", sort=False):
        fitting = rows[rows[col] <= budget].sort_values(["excess", "k", "param"])
        point = {i: (float(r.param), int(r.k), float(getattr(r, col))) for i, r in enumerate(fitting.itertuples(index=False), 1)}
        pick, tried = first_within_budget(  # candidates are 1-based row numbers: 0 means none held
            list(point), lambda i, kind=kind, point=point: tune_cost(kind, *point[i][:2]), lambda i, point=point: point[i][2],
            budget,
            conservative=conservative,
        )
        chosen[str(kind)] = point[pick][:2] if pick else (math.nan, 0)
        for t in tried:
            param, k, _ = point[t.pop("candidate")]
            checks.append({"kind": kind, "param": param, "k": k, **t})
    cols = ["kind", "param", "k", "curve_cost", "tune_cost", "tune_cost_high"]
    return chosen, pd.DataFrame(checks, columns=cols)


def compare_removals(
    model: Model,
    injection: Any,
    result: ScopeResult,
    *,
    kinds: Sequence[str] = REMOVAL_KINDS,
    scales: Sequence[float] = (0.5,),
    head_alphas: Sequence[float] = (1.0, 2.0),
    progress: bool = True,
) -> RemovalComparison:
    """Compare the kinds of head change (:data:`REMOVAL_KINDS`) on a finished study's protocol: the same probe
    splits, ks, passages, budget and budget check as ``result``'s, the test split measured only after every
    choice.

    Args:
        model: The model the study ran on.
        injection: The study's injection.
        result: Its :class:`ScopeResult` (with its decisions and the attribution scores).
        kinds: The kinds to compare, each once.
        scales: The factors tried by ``scale`` (in [0, 1)).
        head_alphas: The multipliers tried by ``head_steer`` (positive).
        progress: Show a progress bar.

    Raises:
        ValueError: an unknown or repeated kind, a factor out of range, a result of another model, bias or
            token, or one saved without its decisions or attribution scores.
    """
    kinds, scales, head_alphas = _check_args(kinds, scales, head_alphas)
    config = _check_result(model, injection, result)
    plan, curve = _tune_curve(model, injection, result, config, kinds, scales, head_alphas, progress)
    chosen, checks = _choose(model, plan, curve)
    choices, summary, comparisons = _test(model, injection, plan, chosen)
    return RemovalComparison(
        injection.bias, injection.token, curve, checks, choices, summary, comparisons,
        {"kinds": list(kinds), "scales": list(scales), "head_alphas": list(head_alphas), "budget": config.budget,
         "budget_on": config.budget_on, "budget_check": config.budget_check, "ks": plan.ks, "seed": config.seed},
        Provenance.of(model),
    )


@dataclass(eq=False)
class _Plan:
    """What the steps of one comparison share: the study's settings, the two head orders, the ks, each kind's
    maker and the study's steering baseline."""

    config: Any
    orders: dict[str, list[Head]]
    ks: list[int]
    makers: dict[str, Callable[[float], Maker]]
    steering: Intervention
    starts: set[int]
    """Every layer an intervention of the comparison may start at (the tune and test passes resume from them)."""

    def heads(self, kind: str, k: int) -> list[Head]:
        """The first ``k`` heads of the order ``kind`` follows."""
        return list(self.orders[HEAD_ORDER[kind]][:k])

    def intervention(self, name: str, kind: str, param: float, heads: list[Head]) -> Intervention:
        """``heads`` changed the way of ``kind`` with ``param`` (no heads: no change)."""
        return Intervention(name, self.makers[kind](param)(heads), first_layer(heads)) if heads else Intervention(name)


def _tune_curve(
    model: Model, injection: Any, result: ScopeResult, config: Any, kinds: Sequence[str],
    scales: Sequence[float], head_alphas: Sequence[float], progress: bool,
) -> tuple[_Plan, pd.DataFrame]:
    """The plan and the curve of every setting on the tune probes and the curve's passages (the study's own
    zero-ablation points reused when it ablated by zeroing)."""
    orders = {"ranking": list(result.decisions.ranked), "effect": result.scores["attribution"].top(len(result.decisions.ranked))}
    ks = sorted(k for k in config.ks if k <= len(result.decisions.ranked))
    cap_curve = curve_capability(model, config)
    means = head_means(model, cap_curve.neutral[0]) if "mean" in kinds else None
    reuse = "zero" in kinds and config.kind == "zero"  # the study's own curve already holds these points
    settings = _settings([k for k in kinds if not (reuse and k == "zero")], scales, head_alphas)
    with injection.apply(model):
        directions = head_directions(model, _probes(model, injection, config, "select"))
        makers = _makers(model, means, directions)
        curve = removal_curve(
            model, _probes(model, injection, config, "tune"), cap_curve, settings, orders,
            lambda s: makers[s[0]](s[1]), ks, progress=progress,
        )
    if reuse:
        curve = pd.concat([study_zero_curve(result, ks), curve], ignore_index=True)
    steering = next(iv for iv in rebuild_interventions(model, injection, result) if iv.name == "steering")
    starts = {first_layer(orders[o][:k]) for o in orders for k in ks}
    starts |= {first_layer(random_heads(model, k, config.seed)) for k in ks} | {steering.first_layer}
    return _Plan(config, orders, ks, makers, steering, starts), curve


def _choose(model: Model, plan: _Plan, curve: pd.DataFrame) -> tuple[dict[str, tuple[float, int]], pd.DataFrame]:
    """Each kind's setting and k within the budget (:func:`choose_removals`), its cost confirmed on the tune
    passages."""
    config = plan.config
    tune = TuneBudget.prepare(model, config, plan.starts)
    return choose_removals(
        curve, lambda kind, p, k: tune.cost(model, plan.intervention(kind, kind, p, plan.heads(kind, k))),
        config.budget, config.budget_on, conservative=config.budget_check == "upper",
    )


def _test(
    model: Model, injection: Any, plan: _Plan, chosen: dict[str, tuple[float, int]]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Only now, every choice made: none, steering, each kind's choice and as many random heads changed the same
    way, measured on the test split. Returns the choices, the summary with intervals and the paired tests."""
    config = plan.config
    interventions = [Intervention("none"), plan.steering]
    choice_rows = []
    for kind, (param, k) in chosen.items():
        picked, baseline = plan.heads(kind, k), random_heads(model, k, config.seed) if k else []
        choice_rows.append({"kind": kind, "param": param, "k": k, "heads": _heads_text(picked), "random_heads": _heads_text(baseline)})
        if k:
            interventions += [plan.intervention(kind, kind, param, picked), plan.intervention(f"{kind}_random", kind, param, baseline)]
    test = TestSet.prepare(model, config, plan.starts)
    _, capability, values = measure_all(model, injection, interventions, test, measure_groups, config)
    pairs = [(k, other) for k, (_, n) in chosen.items() if n for other in (f"{k}_random", "steering")]
    return pd.DataFrame(choice_rows), _summary(capability, values, config.seed), paired_comparisons(values, pairs, seed=config.seed)


def _check_args(kinds: Sequence[str], scales: Sequence[float], alphas: Sequence[float]) -> tuple[tuple[str, ...], tuple[float, ...], tuple[float, ...]]:
    kinds = tuple(check_choice(k, "kind", REMOVAL_KINDS) for k in kinds)
    if not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must name each of {', '.join(REMOVAL_KINDS)} at most once, got {list(kinds)}")
    scales = tuple(check_real(s, "scale", minimum=0.0) for s in scales)
    if any(s >= 1 for s in scales) or ("scale" in kinds and not scales):
        raise ValueError(f"scales must be factors in [0, 1), at least one, got {list(scales)}")
    alphas = tuple(check_real(a, "head_alpha", positive=True) for a in alphas)
    if "head_steer" in kinds and not alphas:
        raise ValueError("head_alphas must hold at least one positive multiplier")
    return kinds, scales, alphas


def _check_result(model: Model, injection: Any, result: ScopeResult) -> Any:
    if not isinstance(result, ScopeResult):
        raise TypeError(f"result must be a ScopeResult, got {type(result).__name__}")
    if (result.bias, result.token) != (injection.bias, injection.token):
        raise ValueError(f"the result is of {result.bias!r} ({result.token}), the injection of {injection.bias!r} ({injection.token})")
    if result.decisions is None or "attribution" not in result.scores:
        raise ValueError("the result lacks its decisions or its attribution scores (saved by an older version); run scope again")
    check_same_model(result.provenance, model, "the scope result")
    return result.config


def _probes(model: Model, injection: Any, config: Any, split: str) -> ProbeSet:
    """The select probes (as the study scores heads) or the tune probes (as its curve runs on them)."""
    spec = injection.spec
    if split == "select":
        return build_probe_set(model, spec, injection.token, probes="select", max_probes=config.score_probes)
    controls = None if config.curve_controls is None else list(spec.control_groups[: config.curve_controls])
    return build_probe_set(model, spec, injection.token, probes="tune", controls=controls, max_probes=config.curve_probes)


def _summary(capability: pd.DataFrame, values: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Per intervention: the bias measures and their intervals (test probes) beside the capability ones."""
    bias = bias_intervals(values, seed=seed)
    return bias.merge(capability, on="intervention", how="left")


def _heads_text(heads: Sequence[Head]) -> str:
    return " ".join(f"L{layer}H{head}" for layer, head in heads)
