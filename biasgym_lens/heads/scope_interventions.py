"""How a BiasScope run builds the interventions it compares: the chosen heads and as many random heads
(ablated the study's way), steering against the bias direction, and a debiasing prefix.

:func:`~biasgym_lens.heads.biasscope.scope` and :mod:`biasgym_lens.heads.scope_benchmarks` (which rebuilds a saved
study's interventions) both build them here, so the same settings give the same interventions.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from jaxtyping import Float
from torch import Tensor

from biasgym_lens.core.protocols import Model
from biasgym_lens.evaluation.capability_records import CapabilitySet
from biasgym_lens.heads.interventions import Head, ablate_heads, first_layer, head_means, steer
from biasgym_lens.heads.probes import build_probe_set
from biasgym_lens.heads.scope_config import ScopeConfig
from biasgym_lens.heads.scope_records import Intervention
from biasgym_lens.heads.steering import bias_direction

__all__ = [
    "random_heads",
    "heads_intervention",
    "steering_intervention",
    "steering_direction",
    "mean_reference",
    "study_interventions",
]


def random_heads(model: Model, k: int, seed: int) -> list[Head]:
    """``k`` (at least one) heads drawn uniformly without replacement, seeded (``seed + 1``)."""
    all_heads = [(a, b) for a in range(model.cfg.n_layers) for b in range(model.cfg.n_heads)]
    return random.Random(seed + 1).sample(all_heads, max(1, k))


def heads_intervention(
    model: Model, name: str, heads: Sequence[Head], config: ScopeConfig, reference: Any
) -> Intervention:
    """Ablating ``heads`` the way the study ablates (``config.kind``)."""
    hs = list(heads)
    if not hs:
        return Intervention(name)
    return Intervention(
        name, lambda: ablate_heads(model, hs, kind=config.kind, reference=reference), first_layer(hs)
    )


def steering_intervention(model: Model, direction: Any, layer: int, alpha: float) -> Intervention:
    """Subtracting ``alpha`` times the bias direction after ``layer`` (no change for ``alpha == 0``)."""
    if not alpha:
        return Intervention("steering", None, layer)
    return Intervention("steering", lambda: steer(model, direction, layer, -alpha), layer)


def steering_direction(
    model: Model, injection: Any, config: ScopeConfig
) -> tuple[Float[Tensor, " d_model"], int]:
    """The bias direction (:func:`~biasgym_lens.heads.steering.bias_direction`) on the select probes
    (``config.score_probes`` of them), with the injection applied, after the steering layer (``config.steer_layer``,
    default two thirds of the depth). Deterministic: the same injection, config and model give the same vector.

    Returns:
        ``(direction, layer)``.
    """
    layer = config.steer_layer if config.steer_layer is not None else (2 * model.cfg.n_layers) // 3
    with injection.apply(model):
        ps_select = build_probe_set(
            model, injection.spec, injection.token, probes="select", max_probes=config.score_probes
        )
        return bias_direction(model, ps_select, layer), layer


def mean_reference(model: Model, cap_curve: CapabilitySet, config: ScopeConfig) -> dict[int, Any] | None:
    """What mean ablation replaces a head's output with: each head's mean output over the curve's first
    passage batch (``config.kind == "mean"``); None for zero ablation."""
    return head_means(model, cap_curve.neutral[0]) if config.kind == "mean" else None


def study_interventions(
    model: Model,
    chosen: Sequence[Head],
    baseline_heads: Sequence[Head],
    steering: tuple[Any, int, float],
    prefix: str,
    config: ScopeConfig,
    reference: Any,
) -> list[Intervention]:
    """The five interventions of a study, in order: ``none``, ``heads`` (the chosen heads, ablated the study's
    way), ``random_heads`` (as many random heads), ``steering`` (``(direction, layer, alpha)``) and
    ``prefix`` (the debiasing text before every bias prompt)."""
    direction, layer, alpha = steering
    return [
        Intervention("none"),
        heads_intervention(model, "heads", chosen, config, reference),
        heads_intervention(model, "random_heads", baseline_heads, config, reference),
        steering_intervention(model, direction, layer, alpha),
        Intervention("prefix", prefix=prefix),
    ]
