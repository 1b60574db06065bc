"""The named steps of BiasScope, each a function with typed inputs and outputs (see :func:`biasgym_lens.heads.biasscope.scope`).

0. :func:`resolve_config`, :func:`check_inputs` - the settings, checked against the model and the injection.
1. :func:`score_all` - the four head scores (plus attribution patching, which the ranking needs).
2. :func:`curve_capability`, :func:`rank_candidates` - effect minus damage; the leading candidates' damage
   measured exactly.
3. :func:`curve_and_direction` - the faithfulness curve on the evaluation probes and the steering direction.
4. :func:`resume_starts`, :func:`choose_heads`, :func:`choose_alpha` - the decisions under the capability budget.
5. :func:`measure_all` - bias and capability under every :class:`~biasgym_lens.heads.scope_records.Intervention`.

The decisions are recorded in a :class:`~biasgym_lens.heads.scope_records.ScopeDecisions`, a typed record that
saves itself.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd

from biasgym_lens.core.checks import InputTypeError
from biasgym_lens.evaluation.capability import (
    Capability,
    CapabilitySet,
    capability_set,
    measure_capability,
    neutral_loss,
)
from biasgym_lens.heads.head_scores import HeadScores, score_heads
from biasgym_lens.heads.interventions import Head, ablate_heads, first_layer, head_means, steer
from biasgym_lens.heads.probes import build_probe_set
from biasgym_lens.heads.scope_config import ScopeConfig
from biasgym_lens.heads.scope_records import BudgetCheck, CandidateDamage, Intervention, Ranking
from biasgym_lens.heads.selection import (
    FaithfulnessCurve,
    damage_scores,
    faithfulness_curve,
    first_within_budget,
    measured_damage,
    relative_increase,
    specific_scores,
)
from biasgym_lens.heads.steering import bias_direction
from biasgym_lens.heads.transfer import NO_REAL_GROUPS

logger = logging.getLogger(__name__)

__all__ = [
    "DEBIAS_PREFIX",
    "resolve_config",
    "check_inputs",
    "score_all",
    "curve_capability",
    "rank_candidates",
    "curve_and_direction",
    "resume_starts",
    "choose_heads",
    "choose_alpha",
    "FinalMeasures",
    "measure_all",
    "random_heads",
    "heads_intervention",
    "steering_intervention",
]

DEBIAS_PREFIX = "Treat every nationality the same and do not rely on stereotypes. "


def resolve_config(config: Any, settings: Mapping[str, Any]) -> ScopeConfig:
    """Step 0a: ``config``, or a :class:`ScopeConfig` of ``settings``; settings given beside a config replace
    its fields.

    Raises:
        InputTypeError: ``config`` is neither None nor a :class:`ScopeConfig`.
    """
    if config is None:
        return ScopeConfig(**settings)
    if not isinstance(config, ScopeConfig):
        raise InputTypeError(f"config must be a ScopeConfig, got {type(config).__name__}")
    return replace(config, **settings) if settings else config


def check_inputs(model: Any, injection: Any, config: ScopeConfig) -> None:
    """Step 0b: the injection was trained in ``model`` and the steering layer is one of its layers; a warning
    when the bias names no real groups (the transfer to them is then skipped).

    Raises:
        ValueError: an injection from another model, a steering layer beyond the model's.
    """
    injection.check_model(model)
    L = model.cfg.n_layers
    if config.steer_layer is not None and config.steer_layer >= L:
        raise ValueError(f"steer_layer must be a layer of this model (0..{L - 1}), got {config.steer_layer}")
    if not injection.spec.real_groups:
        logger.warning(NO_REAL_GROUPS, injection.bias)


def score_all(model: Any, injection: Any, config: ScopeConfig, *, progress: bool) -> dict[str, HeadScores]:
    """Step 1: every method of ``config.methods`` (and attribution patching, which the ranking needs)."""
    spec = injection.spec
    scores: dict[str, HeadScores] = {}
    for method in config.methods:
        logger.info("[%s] scoring heads: %s", spec.name, method)
        kw: dict[str, Any] = {"max_probes": config.score_probes}
        if method == "ablation":
            kw = dict(
                max_probes=config.ablation_probes, controls=list(spec.control_groups[: config.ablation_controls]),
                heads_per_pass=config.heads_per_pass, progress=progress,
            )
        scores[method] = score_heads(model, injection, method, **kw)
    if "attribution" not in scores:
        scores["attribution"] = score_heads(model, injection, "attribution", max_probes=config.score_probes)
    return scores


def curve_capability(model: Any, config: ScopeConfig) -> CapabilitySet:
    """Step 2a: the curve's neutral passages (no multiple choice). The clean residual entering every layer is
    kept once, so the damage checks, the curve and the steering checks resume at their first changed layer
    instead of recomputing the layers before it."""
    L = model.cfg.n_layers
    return capability_set(model, max_passages=config.curve_passages, mc_items=[], resume_layers=range(1, L))


def rank_candidates(
    model: Any, injection: Any, scores: Mapping[str, HeadScores], cap_curve: CapabilitySet, config: ScopeConfig
) -> Ranking:
    """Step 2b: rank heads by effect minus estimated damage; measure the leading candidates' damage exactly.

    The first-order damage estimate misses heads the model cannot lose (zeroing is no small change): the
    leading candidates' cost is measured exactly, those that alone break the budget are dropped, and the rest
    are ranked by effect minus measured damage. Mean ablation estimates against each head's mean output.
    """
    L, H = model.cfg.n_layers, model.cfg.n_heads
    logger.info("[%s] estimating each head's damage to neutral text", injection.bias)
    reference = head_means(model, cap_curve.neutral[0]) if config.kind == "mean" else None
    damage = damage_scores(model, cap_curve, baseline=reference)
    effect = scores["attribution"]
    if reference is not None:
        effect = score_heads(model, injection, "attribution", max_probes=config.score_probes, baseline=reference)
    specific = specific_scores(effect, damage, config.damage_weight)
    ranked = specific.top(min(max(config.ks), L * H))
    if not config.damage_candidates:
        return Ranking(specific, ranked, (), damage, reference)
    logger.info("[%s] measuring the leading candidates' damage exactly", injection.bias)
    pool = specific.top(min(config.damage_candidates, L * H))
    base_loss, exact = measured_damage(model, cap_curve, pool, kind=config.kind, reference=reference)
    own = {h: relative_increase(base_loss + d, base_loss, config.budget_on) for h, d in exact.items()}
    fitting = [h for h in pool if own[h] <= config.budget]
    fitting.sort(key=lambda h: -(float(effect.scores[h]) - config.damage_weight * max(exact[h], 0.0)))
    measured = tuple(CandidateDamage(h[0], h[1], exact[h], own[h]) for h in pool)
    return Ranking(specific, (fitting or pool)[: max(config.ks)], measured, damage, reference)


def curve_and_direction(
    model: Any, injection: Any, ranking: Ranking, cap_curve: CapabilitySet, config: ScopeConfig, *, progress: bool
) -> tuple[FaithfulnessCurve, Any, int]:
    """Step 3: the faithfulness curve along the ranking, and the steering direction at the steering layer.

    Returns:
        ``(curve, direction, layer)``.
    """
    spec = injection.spec
    logger.info("[%s] faithfulness curve", spec.name)
    L = model.cfg.n_layers
    layer = config.steer_layer if config.steer_layer is not None else (2 * L) // 3
    with injection.apply(model):
        controls = None if config.curve_controls is None else list(spec.control_groups[: config.curve_controls])
        ps_eval = build_probe_set(
            model, spec, injection.token, probes="eval", controls=controls, max_probes=config.curve_probes
        )
        curve = faithfulness_curve(
            model, ps_eval, ranking.ranked, cap_curve, ks=config.ks, random_draws=config.random_draws,
            kind=config.kind, budget=config.budget, budget_on=config.budget_on, seed=config.seed,
            reference=ranking.reference, progress=progress,
        )
        ps_select = build_probe_set(model, spec, injection.token, probes="select", max_probes=config.score_probes)
        direction = bias_direction(model, ps_select, layer)
    return curve, direction, layer


def random_heads(model: Any, k: int, seed: int) -> list[Head]:
    """``k`` (at least one) heads drawn uniformly without replacement, seeded (``seed + 1``)."""
    all_heads = [(a, b) for a in range(model.cfg.n_layers) for b in range(model.cfg.n_heads)]
    return random.Random(seed + 1).sample(all_heads, max(1, k))


def resume_starts(model: Any, curve: FaithfulnessCurve, layer: int, seed: int) -> set[int]:
    """Step 4 (before the choices): the first changed layer of every intervention the final measures may run
    (the heads of each curve candidate, as many random heads, steering after ``layer``), whose clean residuals
    :meth:`FinalMeasures.prepare` keeps once."""
    starts = {first_layer(list(curve.heads[:k])) for k in curve.candidates()} | {layer}
    return starts | {first_layer(random_heads(model, k, seed)) for k in (0, *curve.candidates())}


@dataclass
class FinalMeasures:
    """The final passages and multiple-choice items, their unmodified capability, and what was measured."""

    cap: CapabilitySet
    base: Capability
    budget_on: str
    measured: dict[str, Capability]

    @classmethod
    def prepare(cls, model: Any, config: ScopeConfig, starts: set[int]) -> FinalMeasures:
        cap = capability_set(
            model, max_passages=config.final_passages, max_mc_items=config.mc_items,
            resume_layers=sorted(x for x in starts if x),
        )
        return cls(cap, measure_capability(model, cap), config.budget_on, {})

    def cost(self, c: Capability) -> float:
        return c.relative_to(self.base)[f"{self.budget_on}_increase"]

    def loss_only(self, model: Any, iv: Intervention) -> Capability:
        """Neutral loss and KL under ``iv`` (no multiple choice): what a budget check needs."""
        return measure_capability(model, self.cap, iv.make, with_mc=False, start=iv.first_layer)


def heads_intervention(model: Any, name: str, heads: Sequence[Head], config: ScopeConfig, reference: Any) -> Intervention:
    """Ablating ``heads`` the way the study ablates (``config.kind``)."""
    hs = list(heads)
    if not hs:
        return Intervention(name)
    return Intervention(name, lambda: ablate_heads(model, hs, kind=config.kind, reference=reference), first_layer(hs))


def steering_intervention(model: Any, direction: Any, layer: int, alpha: float) -> Intervention:
    """Subtracting ``alpha`` times the bias direction after ``layer`` (no change for ``alpha == 0``)."""
    if not alpha:
        return Intervention("steering", None, layer)
    return Intervention("steering", lambda: steer(model, direction, layer, -alpha), layer)


def choose_heads(
    model: Any, curve: FaithfulnessCurve, final: FinalMeasures, config: ScopeConfig, reference: Any
) -> tuple[list[Head], tuple[BudgetCheck, ...]]:
    """Step 4a: the first curve candidate (lowest excess within budget on the curve's passages) whose cost also
    holds the budget on the final passages; the next candidate when the curve was optimistic."""
    curve_costs = curve.table[curve.table.selection == "top"].set_index("k")[f"{config.budget_on}_increase"]
    by_k: dict[int, Capability] = {}

    def final_cost(k: int) -> float:
        by_k[k] = final.loss_only(model, heads_intervention(model, "heads", curve.heads[:k], config, reference))
        return final.cost(by_k[k])

    k, checks = first_within_budget(curve.candidates(), final_cost, lambda k: curve_costs[k], config.budget)
    if k:
        final.measured["heads"] = by_k[k]
    return list(curve.heads[:k]), tuple(BudgetCheck(**c) for c in checks)


def choose_alpha(
    model: Any, direction: Any, layer: int, cap_curve: CapabilitySet, curve: FaithfulnessCurve, final: FinalMeasures,
    config: ScopeConfig,
) -> tuple[float, tuple[BudgetCheck, ...]]:
    """Step 4b: the largest steering multiplier within budget on the curve's passages, confirmed on the final
    passages (else the next smaller one)."""
    alpha_cost = {
        a: relative_increase(
            neutral_loss(model, cap_curve, steering_intervention(model, direction, layer, a).make, start=layer),
            curve.baseline_loss, config.budget_on,
        )
        for a in config.steer_alphas
    }
    by_alpha: dict[float, Capability] = {}

    def final_cost(a: float) -> float:
        by_alpha[a] = final.loss_only(model, steering_intervention(model, direction, layer, a))
        return final.cost(by_alpha[a])

    fitting = sorted((a for a, c in alpha_cost.items() if c <= config.budget), reverse=True)
    alpha, checks = first_within_budget(fitting, final_cost, alpha_cost.__getitem__, config.budget)
    if alpha:
        final.measured["steering"] = by_alpha[alpha]
    return float(alpha), tuple(BudgetCheck(**c) for c in checks)


def measure_all(
    model: Any,
    injection: Any,
    interventions: Sequence[Intervention],
    final: FinalMeasures,
    measure_groups: Callable[..., pd.DataFrame],
    config: ScopeConfig,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Step 5: bias per group and capability under each intervention.

    Returns:
        ``(groups, capability)``, long tables with an ``intervention`` column.
    """
    tables, caps = [], []
    for iv in interventions:
        logger.info("[%s] measuring: %s", injection.bias, iv.name)
        tables.append(
            measure_groups(
                model, injection.spec, injection, iv.make, max_probes=config.final_probes, prefix=iv.prefix, label=iv.name
            )
        )
        c = _capability(model, iv, final)
        caps.append({"intervention": iv.name, **c.to_dict(), **c.relative_to(final.base)})
    return pd.concat(tables, ignore_index=True), pd.DataFrame(caps)


def _capability(model: Any, iv: Intervention, final: FinalMeasures) -> Capability:
    if iv.make is None:  # the unmodified model (a prefix changes only the bias prompts, not the neutral text)
        return final.base
    if iv.name in final.measured:  # loss and KL measured while choosing: add the multiple-choice accuracy
        mc = measure_capability(model, final.cap, iv.make, with_neutral=False, start=iv.first_layer).mc_accuracy
        return replace(final.measured[iv.name], mc_accuracy=mc)
    return measure_capability(model, final.cap, iv.make, start=iv.first_layer)
