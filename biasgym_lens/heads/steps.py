"""The named steps of BiasScope, each a function with typed inputs and outputs (see :func:`biasgym_lens.heads.biasscope.scope`).

0. :func:`resolve_config`, :func:`check_inputs` - the settings, checked against the model and the injection.
1. :func:`score_all` - the four head scores (plus attribution patching, which the ranking needs).
2. :func:`curve_capability`, :func:`rank_candidates` - effect minus damage; the leading candidates' damage
   measured exactly.
3. :func:`curve_and_direction` - the faithfulness curve on the tune probes and the steering direction (from the
   select probes).
4. :func:`resume_starts`, :class:`TuneBudget`, :func:`choose_heads`, :func:`choose_alpha` - the decisions under
   the capability budget, confirmed on the tune passages.
5. :class:`TestSet`, :func:`measure_all` - bias (test probes) and capability (test passages and multiple-choice
   items) under every :class:`~biasgym_lens.heads.scope_records.Intervention`, after every choice is made.

The interventions themselves (the chosen or random heads, steering, the prefix) are built in
:mod:`biasgym_lens.heads.scope_interventions`, which also rebuilds them for a saved study.

The probe splits are those of :func:`~biasgym_lens.injection.metrics.split_probes`; no step before 5 reads a
test probe or a test passage (``tests/test_protocol.py`` checks it).

The decisions are recorded in a :class:`~biasgym_lens.heads.scope_records.ScopeDecisions`, a typed record that
saves itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd

from biasgym_lens.core.checks import InputTypeError
from biasgym_lens.core.protocols import Model
from biasgym_lens.evaluation.capability import (
    capability_set,
    measure_capability,
    neutral_loss,
)
from biasgym_lens.evaluation.capability_data import PassageSplits, load_neutral_text, passage_splits
from biasgym_lens.evaluation.capability_records import Capability, CapabilitySet
from biasgym_lens.heads.head_scores import HeadScores, score_heads
from biasgym_lens.heads.interventions import Head, first_layer
from biasgym_lens.heads.probes import build_probe_set
from biasgym_lens.heads.scope_config import ScopeConfig
from biasgym_lens.heads.scope_interventions import (
    heads_intervention,
    mean_reference,
    random_heads,
    steering_direction,
    steering_intervention,
)
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
from biasgym_lens.heads.transfer import NO_REAL_GROUPS, per_probe_table

logger = logging.getLogger(__name__)

__all__ = [
    "study_passages",
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
    "TuneBudget",
    "TestSet",
    "measure_all",
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


def check_inputs(model: Model, injection: Any, config: ScopeConfig) -> None:
    """Step 0b: the injection was trained in ``model`` and the steering layer is one of its layers; a warning
    when the bias names no real groups (the transfer to them is then skipped).

    Raises:
        ValueError: an injection from another model, a steering layer beyond the model's, no neutral passage
            left for the test split after the tune passages.
    """
    injection.check_model(model)
    L = model.cfg.n_layers
    if config.steer_layer is not None and config.steer_layer >= L:
        raise ValueError(f"steer_layer must be a layer of this model (0..{L - 1}), got {config.steer_layer}")
    n_passages = len(load_neutral_text())
    if config.tune_passages >= n_passages:
        raise ValueError(
            f"tune_passages must leave neutral passages for the test split: got {config.tune_passages}, the "
            f"shipped text has {n_passages} (valid: 1..{n_passages - 1})"
        )
    if not injection.spec.real_groups:
        logger.warning(NO_REAL_GROUPS, injection.bias)


def score_all(model: Model, injection: Any, config: ScopeConfig, *, progress: bool) -> dict[str, HeadScores]:
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


def study_passages(config: ScopeConfig, n_passages: int) -> PassageSplits:
    """The neutral passages of each use under ``config`` (:func:`~biasgym_lens.evaluation.capability_data.passage_splits`:
    curve, tune and test, each spread over the file)."""
    return passage_splits(n_passages, curve=config.curve_passages, tune=config.tune_passages, test=config.final_passages)


def curve_capability(model: Model, config: ScopeConfig) -> CapabilitySet:
    """Step 2a: the curve's neutral passages (no multiple choice). The clean residual entering every layer is
    kept once, so the damage checks, the curve and the steering checks resume at their first changed layer
    instead of recomputing the layers before it."""
    L = model.cfg.n_layers
    passages = load_neutral_text()
    curve = [passages[i] for i in study_passages(config, len(passages)).curve]
    return capability_set(model, passages=curve, mc_items=[], resume_layers=range(1, L))


def rank_candidates(
    model: Model, injection: Any, scores: Mapping[str, HeadScores], cap_curve: CapabilitySet, config: ScopeConfig
) -> Ranking:
    """Step 2b: rank heads by effect minus estimated damage; measure the leading candidates' damage exactly.

    The first-order damage estimate misses heads the model cannot lose (zeroing is no small change): the
    leading candidates' cost is measured exactly, those that alone break the budget are dropped, and the rest
    are ranked by effect minus measured damage. Mean ablation estimates against each head's mean output.
    """
    L, H = model.cfg.n_layers, model.cfg.n_heads
    logger.info("[%s] estimating each head's damage to neutral text", injection.bias)
    reference = mean_reference(model, cap_curve, config)
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
    model: Model, injection: Any, ranking: Ranking, cap_curve: CapabilitySet, config: ScopeConfig, *, progress: bool
) -> tuple[FaithfulnessCurve, Any, int]:
    """Step 3: the faithfulness curve along the ranking, and the steering direction at the steering layer
    (:func:`~biasgym_lens.heads.scope_interventions.steering_direction`).

    Returns:
        ``(curve, direction, layer)``.
    """
    spec = injection.spec
    logger.info("[%s] faithfulness curve", spec.name)
    with injection.apply(model):
        controls = None if config.curve_controls is None else list(spec.control_groups[: config.curve_controls])
        ps_tune = build_probe_set(
            model, spec, injection.token, probes="tune", controls=controls, max_probes=config.curve_probes
        )
        curve = faithfulness_curve(
            model, ps_tune, ranking.ranked, cap_curve, ks=config.ks, random_draws=config.random_draws,
            kind=config.kind, budget=config.budget, budget_on=config.budget_on, seed=config.seed,
            reference=ranking.reference, progress=progress,
        )
    direction, layer = steering_direction(model, injection, config)
    return curve, direction, layer


def resume_starts(model: Model, curve: FaithfulnessCurve, layer: int, seed: int) -> set[int]:
    """Step 4 (before the choices): the first changed layer of every intervention the budget checks and the
    final measures may run (the heads of each curve candidate, as many random heads, steering after ``layer``),
    whose clean residuals :meth:`TuneBudget.prepare` and :meth:`TestSet.prepare` keep once."""
    starts = {first_layer(list(curve.heads[:k])) for k in curve.candidates()} | {layer}
    return starts | {first_layer(random_heads(model, k, seed)) for k in (0, *curve.candidates())}


@dataclass
class TuneBudget:
    """The tune passages (``tune_passages`` neutral passages spread over the file, the curve's among them; see
    :func:`study_passages`) and the unmodified model's loss on them: a chosen number of heads or steering multiplier must hold the budget here."""

    cap: CapabilitySet
    base: Capability
    budget_on: str

    @classmethod
    def prepare(cls, model: Model, config: ScopeConfig, starts: set[int]) -> TuneBudget:
        text = load_neutral_text()
        passages = [text[i] for i in study_passages(config, len(text)).tune]
        cap = capability_set(model, passages=passages, mc_items=[], resume_layers=sorted(x for x in starts if x))
        return cls(cap, measure_capability(model, cap, with_mc=False), config.budget_on)

    def cost(self, model: Model, iv: Intervention) -> tuple[float, float]:
        """The relative increase of the budget's measure under ``iv`` (no multiple choice), and the upper end
        of its paired 95% bootstrap interval over the tune passages."""
        c = measure_capability(model, self.cap, iv.make, with_mc=False, start=iv.first_layer)
        key = f"{self.budget_on}_increase"
        return c.relative_to(self.base)[key], c.intervals(self.base)[f"{key}_ci_high"]


@dataclass
class TestSet:
    """The test split of the capability data: the neutral passages that are not tune passages and the
    multiple-choice items, with the unmodified model's capability on them. Only measured, after every choice: every reported
    cost comes from here."""

    cap: CapabilitySet
    base: Capability

    @classmethod
    def prepare(cls, model: Model, config: ScopeConfig, starts: set[int]) -> TestSet:
        text = load_neutral_text()
        passages = [text[i] for i in study_passages(config, len(text)).test]
        cap = capability_set(
            model, passages=passages, max_mc_items=config.mc_items, resume_layers=sorted(x for x in starts if x)
        )
        return cls(cap, measure_capability(model, cap))

    def measure(self, model: Model, iv: Intervention) -> Capability:
        """Loss, perplexity, KL and accuracy under ``iv`` (the unmodified model's for no hooks: a prefix changes
        only the bias prompts, not the neutral text)."""
        if iv.make is None:
            return self.base
        return measure_capability(model, self.cap, iv.make, start=iv.first_layer)


def choose_heads(
    model: Model, curve: FaithfulnessCurve, tune: TuneBudget, config: ScopeConfig, reference: Any
) -> tuple[list[Head], tuple[BudgetCheck, ...]]:
    """Step 4a: the first curve candidate (lowest excess within budget on the curve's passages) whose cost also
    holds the budget on the tune passages; the next candidate when the curve was optimistic."""
    curve_costs = curve.table[curve.table.selection == "top"].set_index("k")[f"{config.budget_on}_increase"]

    def tune_cost(k: int) -> tuple[float, float]:
        return tune.cost(model, heads_intervention(model, "heads", curve.heads[:k], config, reference))

    k, checks = first_within_budget(
        curve.candidates(), tune_cost, lambda k: curve_costs[k], config.budget,
        conservative=config.budget_check == "upper",
    )
    return list(curve.heads[:k]), tuple(BudgetCheck(**c) for c in checks)


def choose_alpha(
    model: Model, direction: Any, layer: int, cap_curve: CapabilitySet, curve: FaithfulnessCurve, tune: TuneBudget,
    config: ScopeConfig,
) -> tuple[float, tuple[BudgetCheck, ...]]:
    """Step 4b: the largest steering multiplier within budget on the curve's passages, confirmed on the tune
    passages (else the next smaller one)."""
    alpha_cost = {
        a: relative_increase(
            neutral_loss(model, cap_curve, steering_intervention(model, direction, layer, a).make, start=layer),
            curve.baseline_loss, config.budget_on,
        )
        for a in config.steer_alphas
    }

    def tune_cost(a: float) -> tuple[float, float]:
        return tune.cost(model, steering_intervention(model, direction, layer, a))

    fitting = sorted((a for a, c in alpha_cost.items() if c <= config.budget), reverse=True)
    alpha, checks = first_within_budget(
        fitting, tune_cost, alpha_cost.__getitem__, config.budget, conservative=config.budget_check == "upper"
    )
    return float(alpha), tuple(BudgetCheck(**c) for c in checks)


def measure_all(
    model: Model,
    injection: Any,
    interventions: Sequence[Intervention],
    test: TestSet,
    measure_groups: Callable[..., pd.DataFrame],
    config: ScopeConfig,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Step 5: bias per group on the test probes and capability on the test passages and items, under each
    intervention, with paired bootstrap intervals of the capability changes.

    Returns:
        ``(groups, capability, probe_values)``: long tables with an ``intervention`` column; ``probe_values``
        holds every group's logit difference on every test probe (the units of the bias intervals).
    """
    tables, caps, values = [], [], []
    for iv in interventions:
        logger.info("[%s] measuring: %s", injection.bias, iv.name)
        df = measure_groups(
            model, injection.spec, injection, iv.make, probes="test", max_probes=config.final_probes, prefix=iv.prefix,
            label=iv.name, keep_per_probe=True,
        )
        values.append(per_probe_table(df))
        tables.append(df.drop(columns="per_probe"))
        c = test.measure(model, iv)
        caps.append({"intervention": iv.name, **c.to_dict(), **c.relative_to(test.base), **c.intervals(test.base, seed=config.seed)})
    return pd.concat(tables, ignore_index=True), pd.DataFrame(caps), pd.concat(values, ignore_index=True)
