"""Choosing the responsible heads: specificity-aware scores, stability across seeds, and the faithfulness
curve with a random-heads baseline and a capability budget.

The strongest heads by raw ablation effect are often the ones through which the model reads the injected
embedding at all (layers 0-1); removing them breaks the model. :func:`specific_scores` subtracts each head's
estimated damage to neutral text, and :func:`faithfulness_curve` measures, for the top 1, 2, ... k heads, the
token's excess over the control groups and the neutral-text loss, beside k random heads.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from biasgym_lens.core.protocols import Model
from biasgym_lens.core.tokens import Batch
from biasgym_lens.core.unembed import clean_residuals, logits_at, suffix_answer_logits, suffix_supported
from biasgym_lens.evaluation.capability import neutral_loss, with_resume_layers
from biasgym_lens.evaluation.capability_records import CapabilitySet
from biasgym_lens.heads.head_scores import HeadScores
from biasgym_lens.heads.interventions import Head, ablate_heads, first_layer
from biasgym_lens.heads.patching import z_and_grads
from biasgym_lens.heads.probes import ProbeSet

__all__ = [
    "damage_scores",
    "measured_damage",
    "specific_scores",
    "stable_heads",
    "FaithfulnessCurve",
    "faithfulness_curve",
    "point_measures",
    "curve_baseline",
    "curve_row",
    "pick_k",
    "budget_candidates",
    "first_within_budget",
    "relative_increase",
    "BUDGET_MEASURES",
    "BUDGET_CHECKS",
]


def damage_scores(
    model: Model, cap: CapabilitySet, *, max_batches: int = 2, baseline: dict[int, Tensor] | None = None
) -> Tensor:
    """Attribution-patching estimate of how much zero-ablating each head raises the neutral-text loss (with
    ``baseline``, layer -> ``[n_heads, d_head]``: replacing each head's output by it, e.g. mean ablation).

    Returns:
        ``[n_layers, n_heads]`` estimated increase of the mean next-token loss (nats).
    """
    L, H = model.cfg.n_layers, model.cfg.n_heads
    total = torch.zeros(L, H)
    batches = cap.neutral[:max_batches]
    for batch in batches:
        n_predicted = batch.attention_mask[:, 1:].sum()
        # One passage at a time (the backward pass's saved activations grow with the tokens); the batch's mean
        # loss is the sum of each passage's summed loss over the batch's token count, so the estimate is the same.
        for row in range(len(batch)):
            real = batch.attention_mask[row].bool()
            one = Batch(batch.input_ids[row : row + 1, real], batch.attention_mask[row : row + 1, real])

            def loss_fn(logits: Tensor, one: Batch = one, n: Tensor = n_predicted) -> Tensor:
                logp = logits[:, :-1].float().log_softmax(-1)
                nll = -logp.gather(-1, one.input_ids[:, 1:, None])[..., 0]
                return nll.sum() / n

            acts, grads, _ = z_and_grads(model, one, loss_fn)
            for layer in range(L):
                # loss(ablated) - loss(clean) ~ grad . (baseline - z), baseline 0 for zero ablation
                z = acts[layer] if baseline is None else acts[layer] - baseline[layer].to(acts[layer].device)
                total[layer] += -(grads[layer] * z).float().sum((0, 1, 3)).cpu()
    return total / len(batches)


@torch.no_grad()
def measured_damage(
    model: Model, cap: CapabilitySet, heads: Sequence[Head], *, kind: str = "zero", reference: Any = None
) -> tuple[float, dict[Head, float]]:
    """Exact neutral-text loss increase (nats) of ablating each head alone, and the clean loss.

    Each pass resumes at the head's layer from the clean residual stream kept in ``cap`` by the clean pass
    (equal to a full pass up to float rounding), so measuring a few candidates costs a fraction of as many
    full passes.
    """
    cap = with_resume_layers(cap, [h[0] for h in heads if h[0] > 0])
    base = neutral_loss(model, cap)
    out: dict[Head, float] = {}
    for head in heads:
        loss = neutral_loss(model, cap, lambda h=head: ablate_heads(model, [h], kind=kind, reference=reference), start=head[0])
        out[tuple(head)] = loss - base
    return base, out


def specific_scores(scores: HeadScores, damage: Tensor, weight: float = 1.0) -> HeadScores:
    """Bias effect minus ``weight`` x estimated loss increase per head (both in nats).

    Returns:
        A copy of ``scores`` with the adjusted values (``method`` gets a ``+specific`` suffix).
    """
    if damage.shape != scores.scores.shape:
        raise ValueError(f"damage has shape {tuple(damage.shape)}, scores {tuple(scores.scores.shape)}")
    adjusted = scores.per_prompt - weight * damage[None].clamp(min=0.0)
    settings = {**scores.settings, "damage_weight": weight}
    return scores.with_scores(adjusted, method=scores.method + "+specific", settings=settings)


def stable_heads(runs: Sequence[HeadScores], k: int, min_fraction: float = 1.0) -> list[Head]:
    """Heads that are in the top ``k`` of at least ``min_fraction`` of the runs (e.g. seeds), most stable first."""
    if not runs:
        raise ValueError("no runs given")
    counts = Counter(h for r in runs for h in r.top(k))
    need = min_fraction * len(runs)
    mean = torch.stack([r.scores for r in runs]).mean(0)
    keep = [h for h, c in counts.items() if c >= need - 1e-9]
    return sorted(keep, key=lambda h: (-counts[h], -float(mean[h])))


@dataclass(frozen=True)
class FaithfulnessCurve:
    """Bias and capability after ablating the top-k heads, for several k, beside k random heads.

    Attributes:
        table: Long table with ``k, selection ("top"|"random"), draw, excess, token_logit_diff,
            neutral_loss, loss_increase, perplexity_increase, excess_cut``.
        baseline_excess: The token's excess with nothing ablated.
        baseline_loss: Neutral loss with nothing ablated.
        heads: The ranked heads the curve ablates (first k of them at point k).
        budget: The allowed relative increase used by :meth:`chosen_k`.
        budget_on: What the budget limits: ``"perplexity"`` or ``"loss"`` of the neutral text.
    """

    table: pd.DataFrame
    baseline_excess: float
    baseline_loss: float
    heads: tuple[Head, ...]
    budget: float = 0.05
    settings: dict[str, Any] = field(default_factory=dict)
    budget_on: str = "perplexity"

    def to_dataframe(self) -> pd.DataFrame:
        return self.table.copy()

    def chosen_k(self) -> int:
        """The k with the lowest excess among points within the budget (0 if none is)."""
        return pick_k(self.table, self.budget, self.budget_on)

    def chosen_heads(self) -> list[Head]:
        return list(self.heads[: self.chosen_k()])

    def candidates(self) -> list[int]:
        """Every k within the budget, lowest excess first (the fallbacks if the chosen k fails a check)."""
        return budget_candidates(self.table, self.budget, self.budget_on)


BUDGET_MEASURES = ("perplexity", "loss")
BUDGET_CHECKS = ("upper", "point")  # what must hold the budget on the tune passages (ScopeConfig.budget_check)


def _cost_column(on: str) -> str:
    if on not in BUDGET_MEASURES:
        raise ValueError(f"the budget applies to one of {', '.join(BUDGET_MEASURES)}, got {on!r}")
    return f"{on}_increase"


def budget_candidates(table: pd.DataFrame, budget: float = 0.05, on: str = "perplexity") -> list[int]:
    """The k of the ``"top"`` rows whose relative ``on`` increase is within ``budget``, lowest excess first."""
    col = _cost_column(on)
    top = table[(table["selection"] == "top") & (table[col] <= budget)]
    return [int(k) for k in top.sort_values(["excess", "k"])["k"]]


def relative_increase(loss: float, base_loss: float, on: str = "perplexity") -> float:
    """Relative increase of the perplexity (``exp(loss - base) - 1``) or of the loss (``loss / base - 1``)."""
    _cost_column(on)
    return math.exp(loss - base_loss) - 1.0 if on == "perplexity" else loss / base_loss - 1.0


def first_within_budget(
    candidates: Sequence[Any],
    tune_cost: Callable[[Any], tuple[float, float]],
    curve_cost: Callable[[Any], float],
    budget: float,
    *,
    conservative: bool = True,
) -> tuple[Any, list[dict[str, Any]]]:
    """The first candidate (a number of heads, a steering multiplier) whose cost on the tune passages is
    within ``budget`` (0 if none is), and every check made.

    The curve estimates each candidate's cost on a few passages; this confirms it on the tune passages,
    falling back to the next candidate when the estimate was optimistic. ``tune_cost`` returns the cost and
    the upper end of its 95% interval over the tune passages; with ``conservative`` (the default) that upper
    end must be within the budget, so a candidate whose cost only happens to fall under the budget on these
    passages is not taken.
    """
    checks: list[dict[str, Any]] = []
    for cand in candidates:
        cost, high = (float(x) for x in tune_cost(cand))
        checks.append({"candidate": cand, "curve_cost": float(curve_cost(cand)), "tune_cost": cost, "tune_cost_high": high})
        if (high if conservative else cost) <= budget:
            return cand, checks
    return 0, checks


def pick_k(table: pd.DataFrame, budget: float = 0.05, on: str = "perplexity") -> int:
    """The k of the ``"top"`` rows with the lowest excess whose relative neutral-text perplexity (or loss,
    ``on="loss"``) increase is within ``budget``; 0 if none is."""
    found = budget_candidates(table, budget, on)
    return found[0] if found else 0


@torch.no_grad()
def _excess(model: Model, ps: ProbeSet) -> tuple[float, float]:
    rows = torch.arange(len(ps.batch))
    logits = logits_at(model, ps.batch.input_ids, ps.batch.attention_mask, rows, ps.answer_positions)
    return float(ps.metric_per_probe(logits, "excess").mean()), float(ps.metric_per_probe(logits, "token").mean())


@torch.no_grad()
def _resumed_excess(model: Model, ps: ProbeSet, probe_resid: list[Tensor], start: int) -> tuple[float, float]:
    """:func:`_excess` of a pass resumed at block ``start`` from the probes' clean residual entering it."""
    b = ps.batch
    last = suffix_answer_logits(model, probe_resid[start], start, b.attention_mask, ps.answer_positions)
    return float(ps.metric_per_probe(last, "excess").mean()), float(ps.metric_per_probe(last, "token").mean())


def _curve_heads(
    ranked_heads: Sequence[Head], all_heads: list[Head], k: int, random_draws: int, rng: random.Random
) -> Iterator[tuple[list[Head], str, int]]:
    """The head sets of point ``k``: the first ``k`` ranked heads, then ``random_draws`` random sets of ``k``
    (drawn from ``rng`` only when reached), as ``(heads, selection, draw)``."""
    yield list(ranked_heads[:k]), "top", 0
    for d in range(random_draws):
        yield rng.sample(all_heads, k), "random", d


def curve_baseline(
    model: Model, ps: ProbeSet, cap: CapabilitySet
) -> tuple[CapabilitySet, tuple[float, float, float], list[Tensor] | None]:
    """What a curve's points resume from: ``cap`` keeping the clean residual entering every layer, the
    unmodified ``(excess, token logit difference, neutral loss)``, and the probes' clean residuals (None where
    resuming is not supported). Each point then resumes at its earliest changed layer (the layers before it are
    unchanged); equal to full passes up to float rounding (tested)."""
    cap = with_resume_layers(cap, range(1, model.cfg.n_layers))
    base_excess, base_token = _excess(model, ps)
    probe_resid = None
    if suffix_supported(model):
        with torch.no_grad():
            probe_resid = clean_residuals(model, ps.batch.input_ids, ps.batch.attention_mask)
    return cap, (base_excess, base_token, neutral_loss(model, cap)), probe_resid


def point_measures(
    model: Model, ps: ProbeSet, cap: CapabilitySet, make: Callable[[], Any], start: int,
    probe_resid: list[Tensor] | None,
) -> tuple[float, float, float]:
    """``(excess, token logit difference, neutral loss)`` under the intervention ``make()`` (a context manager
    factory) whose first changed layer is ``start``; both passes resume there from the clean residual (the
    probes' only where ``probe_resid`` is kept)."""
    resume = probe_resid is not None and start > 0
    with make():
        ex, tok = _resumed_excess(model, ps, probe_resid, start) if resume else _excess(model, ps)
    return ex, tok, neutral_loss(model, cap, make, start=start)


def _ablated_measures(
    model: Model, ps: ProbeSet, cap: CapabilitySet, heads: list[Head], kind: str, reference: Any,
    probe_resid: list[Tensor] | None,
) -> tuple[float, float, float]:
    """:func:`point_measures` with ``heads`` ablated the ``kind`` way."""
    return point_measures(
        model, ps, cap, lambda: ablate_heads(model, heads, kind=kind, reference=reference), first_layer(heads),
        probe_resid,
    )


def curve_row(
    k: int, selection: str, draw: int, measures: tuple[float, float, float], base_excess: float, base_loss: float
) -> dict[str, Any]:
    """One row of the curve's table."""
    ex, tok, loss = measures
    return {
        "k": k,
        "selection": selection,
        "draw": draw,
        "excess": ex,
        "token_logit_diff": tok,
        "neutral_loss": loss,
        "loss_increase": relative_increase(loss, base_loss, "loss"),
        "perplexity_increase": relative_increase(loss, base_loss, "perplexity"),
        "excess_cut": 1.0 - ex / base_excess if base_excess != 0 else float("nan"),
    }


def faithfulness_curve(
    model: Model,
    ps: ProbeSet,
    ranked_heads: Sequence[Head],
    cap: CapabilitySet,
    *,
    ks: Sequence[int] = (1, 2, 3, 5, 8, 12, 16, 20),
    random_draws: int = 3,
    kind: str = "zero",
    budget: float = 0.05,
    budget_on: str = "perplexity",
    seed: int = 0,
    reference: Any = None,
    progress: bool = False,
) -> FaithfulnessCurve:
    """Ablate the first k of ``ranked_heads`` for each k, and k random heads ``random_draws`` times.

    Args:
        model: The model, with the injection applied (``with injection.apply(model):``).
        ps: Probe set (token + control rows) on which the excess is measured (the study uses the tune probes).
        ranked_heads: Heads in selection order.
        cap: Capability data for the neutral-text loss.
        ks: Numbers of heads (values above ``len(ranked_heads)`` are dropped).
        random_draws: Random head sets per k (the baseline band).
        kind: Ablation kind (see :func:`~biasgym_lens.heads.interventions.ablate_heads`).
        budget: Allowed relative increase of the neutral-text perplexity (or loss) for
            :meth:`FaithfulnessCurve.chosen_k`.
        budget_on: ``"perplexity"`` (default) or ``"loss"``.
    """
    _cost_column(budget_on)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    all_heads = [(layer, h) for layer in range(L) for h in range(H)]
    ks = sorted({int(k) for k in ks if 1 <= int(k) <= len(ranked_heads)})
    if not ks:
        raise ValueError(f"no usable k in {list(ks)} for {len(ranked_heads)} ranked heads")
    cap, (base_excess, base_token, base_loss), probe_resid = curve_baseline(model, ps, cap)
    rng = random.Random(seed)
    rows = []
    bar = tqdm(total=len(ks) * (1 + random_draws), desc="faithfulness curve", disable=not progress, leave=False)
    for k in ks:
        for heads, selection, draw in _curve_heads(ranked_heads, all_heads, k, random_draws, rng):
            measures = _ablated_measures(model, ps, cap, heads, kind, reference, probe_resid)
            rows.append(curve_row(k, selection, draw, measures, base_excess, base_loss))
            bar.update(1)
    bar.close()
    table = pd.DataFrame(rows)
    return FaithfulnessCurve(
        table, base_excess, base_loss, tuple(ranked_heads[: max(ks)]), budget,
        {"kind": kind, "random_draws": random_draws, "seed": seed, "base_token_logit_diff": base_token},
        budget_on,
    )
