"""The records of the capability measures: the tokenized data they run on (:class:`CapabilitySet`) and what they
measured (:class:`Capability`, with its per-passage and per-item values and their bootstrap intervals)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from biasgym_lens.core.stats import bootstrap_stat
from biasgym_lens.core.tokens import Batch
from biasgym_lens.evaluation.capability_data import MCItem
from biasgym_lens.evaluation.kl_reference import FinalRows

__all__ = ["CapabilitySet", "Capability"]


@dataclass(frozen=True)
class CapabilitySet:
    """Tokenized neutral passages and multiple-choice items, ready to measure.

    The first measurement without an intervention keeps, in the set, the model's log-probabilities on the KL
    batches and the residual stream entering each of ``resume_layers``; later measurements reuse them. Take
    that first measurement with no hooks acting on the neutral text, and build a new set after changing the
    model's weights.

    Attributes:
        neutral: Batches of neutral passages (right-padded).
        n_tokens: Number of predicted tokens over all passages.
        kl_batches: How many of the neutral batches are also used for the KL divergence.
        mc_items: The multiple-choice items.
        resume_layers: Layers whose clean input residual is cached, so that an intervention that changes only
            layer ``start`` onwards resumes there (``start=`` of :func:`measure_capability`).
        reference_logp: Cache: model id -> the unmodified model's log-probabilities on the KL batches, one
            tensor per batch (or, too many to keep, a :class:`~biasgym_lens.evaluation.kl_reference.FinalRows`).
        clean: Cache: model id -> the unmodified pass's residuals (``"neutral"``, ``"mc"``: per batch, layer ->
            tensor).
    """

    neutral: tuple[Batch, ...]
    n_tokens: int
    kl_batches: int
    mc_items: tuple[MCItem, ...]
    resume_layers: tuple[int, ...] = ()
    reference_logp: dict[int, list[Tensor | FinalRows]] = field(default_factory=dict, compare=False, repr=False)
    clean: dict[int, dict[str, Any]] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Capability:
    """General ability of a model (or of a model under an intervention).

    Attributes:
        neutral_loss: Mean next-token cross-entropy (nats) on the neutral text.
        perplexity: ``exp(neutral_loss)``.
        kl: Mean KL(unmodified || this) of the next-token distribution on the KL subset (0 for the unmodified).
        mc_accuracy: Fraction of multiple-choice items answered right (NaN when no items were measured).
        n_tokens: Tokens the loss was measured on.
        passage_nll: Summed next-token loss of each passage (the units of the loss's interval).
        passage_tokens: Predicted tokens of each passage.
        passage_kl: Summed KL of each passage of the KL subset; ``passage_kl_tokens``: its positions.
        mc_correct: Whether each multiple-choice item was answered right (the units of the accuracy's interval).
    """

    neutral_loss: float
    perplexity: float
    kl: float
    mc_accuracy: float
    n_tokens: int
    passage_nll: tuple[float, ...] = field(default=(), repr=False)
    passage_tokens: tuple[int, ...] = field(default=(), repr=False)
    passage_kl: tuple[float, ...] = field(default=(), repr=False)
    passage_kl_tokens: tuple[int, ...] = field(default=(), repr=False)
    mc_correct: tuple[bool, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, float]:
        """The summary numbers (not the per-passage and per-item values)."""
        return {k: getattr(self, k) for k in ("neutral_loss", "perplexity", "kl", "mc_accuracy", "n_tokens")}

    def relative_to(self, base: Capability) -> dict[str, float]:
        """Changes against a baseline: relative loss and perplexity increase, KL, accuracy change."""
        return {
            "loss_increase": self.neutral_loss / base.neutral_loss - 1.0,
            "perplexity_increase": self.perplexity / base.perplexity - 1.0,
            "kl": self.kl,
            "mc_accuracy_change": self.mc_accuracy - base.mc_accuracy,
        }

    def intervals(self, base: Capability, *, level: float = 0.95, seed: int = 0) -> dict[str, float]:
        """Percentile bootstrap intervals of every number of :meth:`relative_to` and of the accuracy itself.

        The changes are paired: the same passages (loss and perplexity increase) and the same items (accuracy
        change) are resampled in both measurements; the KL resamples the passages of the KL subset.

        Returns:
            ``{name}_ci_low`` and ``{name}_ci_high`` for ``loss_increase``, ``perplexity_increase``, ``kl``,
            ``mc_accuracy`` and ``mc_accuracy_change`` (NaN where the per-unit values are missing or do not pair).
        """
        nll, base_nll, tokens = (np.asarray(x, dtype=np.float64) for x in (self.passage_nll, base.passage_nll, self.passage_tokens))
        correct, base_correct = (np.asarray(x, dtype=np.float64) for x in (self.mc_correct, base.mc_correct))
        paired = len(nll) == len(base_nll) > 0
        items = len(correct) == len(base_correct) > 0
        stats: dict[str, tuple[Callable[..., float], tuple[np.ndarray, ...], bool]] = {
            "loss_increase": (lambda a, b, n: a.sum() / b.sum() - 1.0, (nll, base_nll, tokens), paired),
            "perplexity_increase": (lambda a, b, n: np.exp((a.sum() - b.sum()) / n.sum()) - 1.0, (nll, base_nll, tokens), paired),
            "kl": (lambda s, n: s.sum() / n.sum(), tuple(np.asarray(x, dtype=np.float64) for x in (self.passage_kl, self.passage_kl_tokens)), len(self.passage_kl) > 0),
            "mc_accuracy": (np.mean, (correct,), len(correct) > 0),
            "mc_accuracy_change": (lambda a, b: (a - b).mean(), (correct, base_correct), items),
        }
        out: dict[str, float] = {}
        for name, (stat, arrays, ok) in stats.items():
            iv = bootstrap_stat(stat, *arrays, level=level, seed=seed) if ok else None
            out[f"{name}_ci_low"] = iv.ci_low if iv else math.nan
            out[f"{name}_ci_high"] = iv.ci_high if iv else math.nan
        return out
