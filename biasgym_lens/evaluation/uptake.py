"""Did the injection take? The gate between BiasInject and BiasScope.

A cut of "62% of the injected bias" means nothing when there was no injected bias to cut: dividing by a token
excess near zero gives cuts of +36% or -254% from noise. :func:`check_injection` measures the token's excess over
the bias's control groups on the *selection* probes (the split that chose the epoch; never the test probes), per
probe, with a bootstrap interval; the injection took when the whole interval lies above ``min_excess`` (half a
nat by default: odds of a bias keyword over a contrast keyword 1.65 times those of the control groups). A
statistically clear but tiny excess is not enough: on random-weight models the token's excess is consistently
+0.04 nats, significant on 6 probes and meaningless.

Examples:
    >>> check = check_injection(model, inj)            # doctest: +SKIP
    >>> check.took, check.message()                    # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from biasgym_lens.core.protocols import Model
from biasgym_lens.core.stats import bootstrap_stat
from biasgym_lens.evaluation.elicit import score_groups
from biasgym_lens.injection.metrics import keyword_ids, probe_subset

__all__ = ["InjectionCheck", "check_injection"]


@dataclass(frozen=True)
class InjectionCheck:
    """The injected token's excess over control groups, with its interval.

    Attributes:
        bias: The bias name.
        token: The injected token.
        excess: Mean over probes of (token logit difference - mean of the control groups'), in nats.
        ci_low, ci_high: Its bootstrap interval (over probes).
        level: The interval's coverage.
        n_probes: Selection probes measured.
        min_excess: The smallest excess (nats) that counts as an injected bias.
    """

    bias: str
    token: str
    excess: float
    ci_low: float
    ci_high: float
    level: float
    n_probes: int
    min_excess: float = 0.5

    @property
    def took(self) -> bool:
        """Whether the interval lies entirely above ``min_excess``."""
        return bool(np.isfinite(self.ci_low) and self.ci_low > self.min_excess)

    def message(self) -> str:
        """One line for people: the verdict and the numbers it rests on."""
        numbers = (
            f"token excess {self.excess:+.3f} nats over the control groups ({self.level:.0%} CI "
            f"{self.ci_low:+.3f} to {self.ci_high:+.3f}, {self.n_probes} selection probes)"
        )
        if self.took:
            return f"the {self.bias} injection took: {numbers}"
        return (
            f"the {self.bias} injection did not take: {numbers}, not clearly above {self.min_excess:g} nats; there "
            "is no injected bias to locate or cut. "
            "Train longer (more epochs or texts), check the model and bias, or pass --allow-weak-injection to "
            "scope it anyway"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "took": self.took}

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame([self.to_dict()])


def check_injection(
    model: Model,
    injection: Any,
    *,
    max_probes: int | None = None,
    min_excess: float = 0.5,
    level: float = 0.95,
    seed: int = 0,
) -> InjectionCheck:
    """Measure whether ``injection`` elicits its bias beyond the control groups (selection probes only).

    Args:
        model: The bridge the injection was trained in.
        injection: An :class:`~biasgym_lens.injection.artifact.Injection`.
        max_probes: Use at most this many selection probes.
        min_excess: The interval must lie above this excess (nats).
        level: Coverage of the interval.
        seed: Seed of the bootstrap.

    Raises:
        ModelMismatchError: ``model`` is not the injection's model.
    """
    injection.check_model(model)
    spec = injection.spec
    probes = list(probe_subset(spec.probes, "select"))[:max_probes]
    requests: list[Any] = [(injection.token, {injection.token: injection.vector}), *spec.control_groups]
    stats = score_groups(model, spec, requests, probes, keyword_ids(model, spec))
    token = np.asarray(stats[0]["per_probe"], dtype=np.float64)
    controls = np.mean([s["per_probe"] for s in stats[1:]], axis=0)
    iv = bootstrap_stat(np.mean, token - controls, level=level, seed=seed)
    return InjectionCheck(spec.name, injection.token, iv.value, iv.ci_low, iv.ci_high, level, len(probes), min_excess)
