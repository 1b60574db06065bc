"""The settings of :func:`~biasgym_lens.heads.biasscope.scope`: :class:`ScopeConfig` and the check of each
setting (a wrong type raises ``InputTypeError``, a value out of range ``ValueError``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from biasgym_lens.core.checks import InputTypeError, check_choice, check_int, check_int_list, check_real
from biasgym_lens.heads.head_scores import METHODS
from biasgym_lens.heads.selection import BUDGET_CHECKS, BUDGET_MEASURES

__all__ = ["ScopeConfig"]


@dataclass(frozen=True)
class ScopeConfig:
    """Settings of :func:`scope` (defaults finish in minutes on the bundled model on 2 CPU cores).

    Attributes:
        methods: Head-scoring methods to run.
        score_probes: Selection probes for DLA, attention and attribution patching (None: all).
        ablation_probes: Probes for the exact ablation scan (it costs one pass per ``heads_per_pass`` heads).
        ablation_controls: Control groups in the exact scan.
        heads_per_pass: Heads ablated per forward pass in the exact scan (None: all heads of a layer).
        damage_weight: Weight of the estimated neutral-loss damage in the specific score.
        damage_candidates: How many leading heads of the specific score get their damage measured exactly (one
            resumed pass each on the curve's passages); those that alone exceed the budget are dropped and the
            rest ranked by effect minus measured damage. 0: rank by the specific score alone.
        ks: Points of the faithfulness curve.
        random_draws: Random head sets per point.
        budget: Allowed relative increase of the neutral-text cost measure (``budget_on``) for the chosen heads
            and the steering baseline. The curve's few passages pick the candidates; the chosen k must also
            stay within the budget on the ``tune_passages`` (else the next candidate is taken).
        budget_on: ``"perplexity"`` (default) or ``"loss"`` of the neutral text.
        budget_check: What must hold the budget on the tune passages: ``"upper"`` (default), the upper end of
            the cost's paired 95% bootstrap interval over those passages, so that a cost just under the budget
            on 24 passages is not taken for one under it everywhere; ``"point"``, the cost itself.
        kind: Ablation kind for the curve, the chosen and the random heads: ``"zero"`` (default) or ``"mean"``
            (each head's mean output over the curve's neutral passages; the ranking's attribution and damage
            estimates then use those means too). The four reported head scores estimate zero ablation.
        curve_passages: Neutral passages (among the tune ones) of the damage estimates and the curve (fast).
        tune_passages: Neutral passages, spread evenly over the file's topics, on which the chosen k and the
            steering multiplier must hold the budget (the curve's among them). Every choice sees only these;
            see :func:`~biasgym_lens.evaluation.capability_data.passage_splits`.
        final_passages: Neutral passages (the ones that are not tune passages) on which the reported cost is
            measured, never seen by a choice (None: all of them).
        curve_probes: Tune-split probes used by the curve (None: all; see
            :func:`~biasgym_lens.injection.metrics.split_probes`).
        curve_controls: Control groups used by the curve (None: all); the final measures use all of them.
        mc_items: Multiple-choice items in the final measures.
        final_probes: Test-split probes per group in the final measures (None: all; fewer only for smoke tests).
        steer_layer: Layer of the steering baseline (default: two thirds of the depth).
        steer_alphas: Multipliers tried for subtracting the bias direction: the largest within the budget on the
            curve's passages, confirmed on the tune passages (else the next smaller one), is used.
        seed: Seeds the random baselines.
    """

    methods: tuple[str, ...] = ("dla", "attention", "attribution", "ablation")
    score_probes: int | None = None
    ablation_probes: int = 6
    ablation_controls: int = 2
    heads_per_pass: int | None = None
    damage_weight: float = 1.0
    damage_candidates: int = 16
    ks: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    random_draws: int = 2
    budget: float = 0.05
    budget_on: str = "perplexity"
    budget_check: str = "upper"
    kind: str = "zero"
    curve_passages: int = 8
    curve_probes: int | None = None
    curve_controls: int | None = 3
    tune_passages: int = 24
    final_passages: int | None = None
    mc_items: int = 137
    final_probes: int | None = None
    steer_layer: int | None = None
    steer_alphas: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    seed: int = 0

    def __post_init__(self) -> None:
        """Check every setting; counts must be integers (``2.0``, ``"2"`` and ``True`` are refused); lists
        (``ks``, ``steer_alphas``, ``methods``) are stored as tuples.

        Raises:
            InputTypeError: a setting of the wrong type (the first one found).
            ValueError: a setting out of range (the first one found).
        """
        for name, check in _SCOPE_CHECKS.items():
            object.__setattr__(self, name, check(getattr(self, name), name))
        if not 0 <= self.budget < 10:
            raise ValueError(f"budget must be a relative increase in [0, 10), got {self.budget}")
        if self.curve_passages > self.tune_passages:
            raise ValueError(
                f"curve_passages ({self.curve_passages}) must be at most tune_passages ({self.tune_passages}): the "
                "curve's passages are the first tune passages"
            )


def _check_methods(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise InputTypeError(f"{name} must be a tuple of method names ({', '.join(METHODS)}), got {value!r}")
    bad = [m for m in value if m not in METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; valid: {', '.join(METHODS)}")
    if len(set(value)) != len(value):
        raise ValueError(f"{name} repeats a method: {list(value)}")
    return tuple(value)


def _check_alphas(value: Any, name: str) -> tuple[float, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise InputTypeError(f"{name} must be a non-empty tuple of positive numbers, got {value!r}")
    return tuple(check_real(a, f"{name}[{i}]", positive=True) for i, a in enumerate(value))


def _check_kind(value: Any, name: str) -> str:
    if value not in ("zero", "mean"):
        kind = InputTypeError if not isinstance(value, str) else ValueError
        raise kind(f"{name} must be 'zero' or 'mean', got {value!r}")
    return value


def _count(minimum: int, none_ok: bool = False) -> Callable[[Any, str], Any]:
    return lambda v, n: check_int(v, n, minimum=minimum, none_ok=none_ok)


_SCOPE_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "methods": _check_methods,
    "score_probes": _count(1, none_ok=True),
    "ablation_probes": _count(1),
    "ablation_controls": _count(1),
    "heads_per_pass": _count(1, none_ok=True),
    "damage_weight": lambda v, n: check_real(v, n, minimum=0.0),
    "damage_candidates": _count(0),
    "ks": lambda v, n: tuple(check_int_list(v, n, minimum=1, unique=True)),
    "random_draws": _count(1),
    "budget": lambda v, n: check_real(v, n, minimum=0.0),
    "budget_on": lambda v, n: check_choice(v, n, BUDGET_MEASURES),
    "budget_check": lambda v, n: check_choice(v, n, BUDGET_CHECKS),
    "kind": lambda v, n: _check_kind(v, n),
    "curve_passages": _count(1),
    "curve_probes": _count(1, none_ok=True),
    "curve_controls": _count(1, none_ok=True),
    "tune_passages": _count(1),
    "final_passages": _count(1, none_ok=True),
    "mc_items": _count(0),
    "final_probes": _count(1, none_ok=True),
    "steer_layer": _count(0, none_ok=True),
    "steer_alphas": _check_alphas,
    "seed": lambda v, n: check_int(v, n),
}
