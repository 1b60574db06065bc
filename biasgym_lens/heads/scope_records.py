"""The typed records of a BiasScope run: the interventions measured, the ranking, and the decisions with the
checks each rests on (:class:`ScopeDecisions`, saved with the :class:`~biasgym_lens.heads.scope_result.ScopeResult`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any

from biasgym_lens.heads.head_scores import HeadScores
from biasgym_lens.heads.interventions import Head

__all__ = ["Intervention", "CandidateDamage", "BudgetCheck", "ScopeDecisions", "Ranking"]


@dataclass(frozen=True)
class Intervention:
    """A named change of the model, measured in the final step.

    Attributes:
        name: ``"none"``, ``"heads"``, ``"random_heads"``, ``"steering"``, ``"prefix"``, ...
        make: Returns the context manager that applies it (``None``: the unmodified model).
        first_layer: The first layer it changes (passes resume from the clean residual entering it).
        prefix: Text put before every bias probe (changes the prompts only, not the model).
    """

    name: str
    make: Callable[[], AbstractContextManager[Any]] | None = None
    first_layer: int = 0
    prefix: str = ""


@dataclass(frozen=True)
class CandidateDamage:
    """A leading candidate head's exactly measured damage to the neutral text."""

    layer: int
    head: int
    loss_increase: float
    cost: float


@dataclass(frozen=True)
class BudgetCheck:
    """One candidate (a number of heads, a steering multiplier) checked against the budget."""

    candidate: int | float  # a number of heads or a steering multiplier
    curve_cost: float  # on the curve's passages
    tune_cost: float  # on the tune passages
    tune_cost_high: float = math.nan  # upper end of its 95% interval: the check that decides (NaN: not recorded)


@dataclass(frozen=True)
class ScopeDecisions:
    """What :func:`~biasgym_lens.heads.biasscope.scope` chose, and the checks each choice rests on.

    Attributes:
        ranked: The head ranking the curve follows (best first).
        candidate_damage: The leading candidates' measured damage.
        budget_checks: The numbers of heads tried on the tune passages, in order, until one held the budget.
        steering_checks: Likewise for the steering multipliers.
        random_heads: The random heads of the baseline.
        steer_layer: Layer of the steering baseline.
        steer_alpha: The multiplier used (0: none held the budget).
        prefix: The debiasing prefix of the prompt baseline.
    """

    ranked: tuple[Head, ...]
    candidate_damage: tuple[CandidateDamage, ...]
    budget_checks: tuple[BudgetCheck, ...]
    steering_checks: tuple[BudgetCheck, ...]
    random_heads: tuple[Head, ...]
    steer_layer: int
    steer_alpha: float
    prefix: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ScopeDecisions:
        """From :meth:`to_dict` output, or from the ``extra`` dict of results saved by earlier versions."""
        def damage(row: Any) -> CandidateDamage:
            return CandidateDamage(**row) if isinstance(row, Mapping) else CandidateDamage(*row)

        def checks(rows: Sequence[Mapping[str, Any]]) -> tuple[BudgetCheck, ...]:
            return tuple(
                BudgetCheck(
                    r["candidate"], r["curve_cost"], r.get("tune_cost", r.get("final_cost")),
                    r.get("tune_cost_high", math.nan),
                )
                for r in rows
            )

        return cls(
            ranked=tuple(tuple(h) for h in d["ranked"]),  # type: ignore[misc]
            candidate_damage=tuple(damage(r) for r in d["candidate_damage"]),
            budget_checks=checks(d["budget_checks"]),
            steering_checks=checks(d["steering_checks"]),
            random_heads=tuple(tuple(h) for h in d["random_heads"]),  # type: ignore[misc]
            steer_layer=int(d["steer_layer"]),
            steer_alpha=float(d["steer_alpha"]),
            prefix=str(d["prefix"]),
        )


@dataclass(frozen=True)
class Ranking:
    """The output of :func:`~biasgym_lens.heads.steps.rank_candidates`."""

    specific: HeadScores
    ranked: list[Head]
    candidate_damage: tuple[CandidateDamage, ...]
    damage: Any
    reference: dict[int, Any] | None
