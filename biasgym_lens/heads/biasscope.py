"""The BiasScope pipeline: score heads, choose them under a capability budget, intervene, and measure.

:func:`scope` runs, for one injection, the named steps of :mod:`biasgym_lens.heads.steps`: the four head scores
(and their agreement), a specificity-aware ranking (attribution-patching effect on the token's excess minus
estimated neutral-loss damage), the faithfulness curve with random-head baselines, the chosen heads, and the bias
and capability under each intervention: nothing, the chosen heads, as many random heads, subtracting the steering
direction, and a debiasing instruction prefix. Its settings are a
:class:`~biasgym_lens.heads.scope_config.ScopeConfig`; a :class:`~biasgym_lens.heads.scope_result.ScopeResult`
holds everything the plots and the report need and saves itself.
"""

from __future__ import annotations

import logging
from typing import Any

from biasgym_lens.core.protocols import Model
from biasgym_lens.core.provenance import Provenance
from biasgym_lens.heads.scope_config import ScopeConfig
from biasgym_lens.heads.scope_interventions import random_heads, study_interventions
from biasgym_lens.heads.scope_records import ScopeDecisions
from biasgym_lens.heads.scope_result import ScopeResult
from biasgym_lens.heads.steps import (
    DEBIAS_PREFIX,
    TestSet,
    TuneBudget,
    check_inputs,
    choose_alpha,
    choose_heads,
    curve_and_direction,
    curve_capability,
    measure_all,
    rank_candidates,
    resolve_config,
    resume_starts,
    score_all,
)
from biasgym_lens.heads.transfer import measure_groups

logger = logging.getLogger(__name__)

__all__ = ["scope"]


def scope(
    model: Model, injection: Any, config: ScopeConfig | None = None, *, progress: bool = True, **settings: Any
) -> ScopeResult:
    """Find the heads that carry an injected bias, remove them, and measure what changes.

    The steps are the functions of :mod:`biasgym_lens.heads.steps`, in order.

    Args:
        model: The model the injection was trained in (raw weights).
        injection: A trained :class:`~biasgym_lens.injection.artifact.Injection`.
        config: Settings, or pass them as keywords (see :class:`ScopeConfig`).
        progress: Show progress bars.

    Returns:
        A :class:`ScopeResult`.
    """
    config = resolve_config(config, settings)
    check_inputs(model, injection, config)
    scores = score_all(model, injection, config, progress=progress)
    cap_curve = curve_capability(model, config)
    ranking = rank_candidates(model, injection, scores, cap_curve, config)
    scores["specific"] = ranking.specific
    curve, direction, layer = curve_and_direction(model, injection, ranking, cap_curve, config, progress=progress)
    logger.info("[%s] final measures under each intervention", injection.bias)
    starts = resume_starts(model, curve, layer, config.seed)
    tune = TuneBudget.prepare(model, config, starts)
    chosen, budget_checks = choose_heads(model, curve, tune, config, ranking.reference)
    alpha, steering_checks = choose_alpha(model, direction, layer, cap_curve, curve, tune, config)
    baseline_heads = random_heads(model, len(chosen), config.seed)
    interventions = study_interventions(
        model, chosen, baseline_heads, (direction, layer, alpha), DEBIAS_PREFIX, config, ranking.reference
    )
    test = TestSet.prepare(model, config, starts)  # only now: no choice above saw a test probe or passage
    groups, capability, probe_values = measure_all(model, injection, interventions, test, measure_groups, config)
    decisions = ScopeDecisions(
        tuple(ranking.ranked), ranking.candidate_damage, budget_checks, steering_checks, tuple(baseline_heads), layer,
        alpha, DEBIAS_PREFIX,
    )
    return ScopeResult(
        injection.bias, injection.token, scores, ranking.damage, curve, chosen, groups, capability, config,
        Provenance.of(model), decisions, probe_values,
    )
