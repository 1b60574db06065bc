"""The cost of an intervention to general ability: neutral-text loss and perplexity, KL divergence to the
unmodified model, and accuracy on easy multiple-choice questions (all data ship with the package).

An intervention is passed as a zero-argument callable that returns a context manager, e.g.
``lambda: ablate_heads(model, heads)``; ``None`` means the unmodified model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

import torch
from torch import Tensor

from biasgym_lens.core.checks import InputTypeError, check_bool, check_int, check_int_list, check_str_list
from biasgym_lens.core.protocols import Model
from biasgym_lens.core.tokens import Batch, tokenize
from biasgym_lens.core.unembed import (
    forward_keeping,
    logits_at,
    resumed_forward,
    skipping_layers,
    suffix_supported,
    unembed_at,
)
from biasgym_lens.evaluation.capability_data import MCItem, load_mc_items, load_neutral_text
from biasgym_lens.evaluation.capability_records import Capability, CapabilitySet
from biasgym_lens.evaluation.kl_reference import (
    FinalRows,
    real_final,
    real_logp,
    reference_fits,
    reference_rows,
)

__all__ = [
    "capability_set", "with_resume_layers", "measure_capability", "neutral_loss",
    "mc_accuracy",
]

Intervention = Callable[[], AbstractContextManager[Any]] | None


def capability_set(
    model: Model,
    *,
    passages: Sequence[str] | None = None,
    max_passages: int | None = None,
    batch_size: int = 8,
    kl_passages: int = 16,
    mc_items: Sequence[MCItem] | None = None,
    max_mc_items: int | None = None,
    resume_layers: Sequence[int] = (),
) -> CapabilitySet:
    """Tokenize the capability data once (default: the package's neutral text and multiple-choice items).

    Args:
        resume_layers: Layers at which later measurements may resume (see :class:`CapabilitySet`); each clean
            residual kept costs ``tokens x d_model`` floats.

    Raises:
        ValueError: if there are no passages, or a resume layer is not a layer of the model.
    """
    n_layers = model.cfg.n_layers
    resume_layers = check_int_list(resume_layers, "resume_layers", nonempty=False)
    bad = [layer for layer in resume_layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"resume_layers {bad} are not layers of this model (valid: 0..{n_layers - 1})")
    max_passages = check_int(max_passages, "max_passages", minimum=1, none_ok=True)
    max_mc_items = check_int(max_mc_items, "max_mc_items", minimum=0, none_ok=True)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    kl_passages = check_int(kl_passages, "kl_passages", minimum=0)
    texts = list(load_neutral_text() if passages is None else check_str_list(passages, "passages", nonempty=False))
    if max_passages is not None:
        texts = texts[:max_passages]
    if not texts:
        raise ValueError("no neutral passages to measure the capability cost on (empty evaluation set)")
    batches = tuple(tokenize(model, texts[i : i + batch_size]) for i in range(0, len(texts), batch_size))
    n_tokens = int(sum((b.attention_mask[:, 1:].sum()) for b in batches))
    items = tuple(load_mc_items() if mc_items is None else mc_items)
    if max_mc_items is not None:
        items = items[:max_mc_items]
    kl_batches = min(len(batches), max(0, math.ceil(kl_passages / batch_size)))
    return CapabilitySet(batches, n_tokens, kl_batches, items, tuple(sorted({int(x) for x in resume_layers})))


def with_resume_layers(cap: CapabilitySet, layers: Sequence[int]) -> CapabilitySet:
    """``cap`` itself if it already caches the clean residual at every one of ``layers``, else a copy that
    does (with empty caches)."""
    wanted = tuple(sorted({*cap.resume_layers, *(int(x) for x in layers)}))
    if wanted == cap.resume_layers:
        return cap
    return CapabilitySet(cap.neutral, cap.n_tokens, cap.kl_batches, cap.mc_items, wanted)


def _row_nll(logits: Tensor, batch: Batch) -> tuple[list[float], list[int]]:
    """Each row's summed next-token loss over its real positions and their number, one row at a time (no
    batch-sized log-softmax copy)."""
    sums, counts = [], []
    for r in range(logits.shape[0]):
        real = batch.attention_mask[r, 1:].bool()
        logp = logits[r, :-1][real].float().log_softmax(-1)
        sums.append(float(-logp.gather(-1, batch.input_ids[r, 1:][real, None]).sum()))
        counts.append(int(real.sum()))
    return sums, counts


def _row_kl(model: Model, ref: Tensor | FinalRows | None, logits: Tensor, batch: Batch) -> tuple[list[float], list[int]]:
    """Each row's summed KL(ref || model) over its real positions and their number, one row at a time (``ref``
    None: the unmodified model itself, KL 0)."""
    sums, counts, offset = [], [], 0
    for r in range(logits.shape[0]):
        real = batch.attention_mask[r].bool()
        n = int(real.sum())
        if ref is None:
            sums.append(0.0)
        else:
            new = logits[r][real].float().log_softmax(-1)
            old = reference_rows(model, ref, offset, n)
            sums.append(float((old.exp() * (old - new)).sum()))
        counts.append(n)
        offset += n
    return sums, counts


def _reference_logp(model: Model, cap: CapabilitySet) -> list[Tensor | FinalRows]:
    """The unmodified model's next-token log-probabilities on the KL batches (real positions only; as final
    residuals where they would not fit, see :mod:`~biasgym_lens.evaluation.kl_reference`), computed on first
    use (or kept from the unmodified neutral pass) and reused for every later intervention."""
    key = id(model)
    if key not in cap.reference_logp:
        batches = cap.neutral[: cap.kl_batches]
        if reference_fits(model, batches):
            ref: list[Tensor | FinalRows] = [real_logp(model(b.input_ids, attention_mask=b.attention_mask), b) for b in batches]
        else:
            ref = [real_final(_run(model, b.input_ids, b.attention_mask, (), 0, None, final_only=True)[0], b) for b in batches]
        cap.reference_logp[key] = ref
    return cap.reference_logp[key]


def _resume_layer(model: Model, cap: CapabilitySet, part: str, start: int) -> int:
    """The latest cached layer at or before ``start`` (0: no usable cache, run full passes)."""
    if start <= 0 or part not in cap.clean.get(id(model), {}) or not suffix_supported(model):
        return 0
    return max((layer for layer in cap.resume_layers if 0 < layer <= start), default=0)


def _capture_layers(model: Model, cap: CapabilitySet, part: str) -> tuple[int, ...]:
    """Layers whose clean input residual the unmodified pass should keep (none once cached or when unusable)."""
    if part in cap.clean.get(id(model), {}) or not suffix_supported(model):
        return ()
    return cap.resume_layers


def _run(model: Model, ids: Tensor, mask: Tensor, keep: Sequence[int], resume: int, resid: dict[int, Tensor] | None,
         *, final_only: bool) -> tuple[Tensor, dict[int, Tensor]]:
    """One forward pass: full, resumed at block ``resume`` from ``resid[resume]``, or keeping the residuals
    entering ``keep``. Returns the logits (or, with ``final_only``, the final normalised residual) and the kept
    residuals by layer."""
    if resume:
        return resumed_forward(model, resid[resume], resume, mask, unembed=not final_only), {}  # type: ignore[index]
    if keep:
        return forward_keeping(model, ids, mask, keep, unembed=not final_only)
    with skipping_layers(model, 0) if final_only else contextlib.nullcontext():
        return model(ids, attention_mask=mask), {}


class NeutralPass(NamedTuple):
    """One pass over the neutral passages: mean loss and KL, and their per-passage sums and token counts."""

    loss: float
    kl: float
    nll: tuple[float, ...] = ()
    tokens: tuple[int, ...] = ()
    kl_sums: tuple[float, ...] = ()
    kl_tokens: tuple[int, ...] = ()


@torch.no_grad()
def _neutral_pass(
    model: Model, cap: CapabilitySet, intervention: Intervention, with_kl: bool, start: int = 0
) -> NeutralPass:
    """Mean next-token loss on the neutral passages and mean KL(unmodified || intervened) on the KL batches,
    in one pass of the intervened model (the unmodified pass is cached in ``cap``), with each passage's summed
    loss and KL and their token counts."""
    store = cap.clean.setdefault(id(model), {})
    if intervention is None:
        keep, resume = _capture_layers(model, cap, "neutral"), 0
        keep_ref = (
            with_kl and id(model) not in cap.reference_logp and cap.kl_batches > 0
            and reference_fits(model, cap.neutral[: cap.kl_batches])  # else made apart, as final residuals
        )
        ref: list[Tensor | FinalRows] = []
    else:
        keep, resume = (), _resume_layer(model, cap, "neutral", start)
        keep_ref = False
        ref = _reference_logp(model, cap) if with_kl and cap.kl_batches else []
    sums: list[float] = []
    counts: list[int] = []
    kl_sums: list[float] = []
    kl_counts: list[int] = []
    kept, new_ref = [], []
    cached = store.get("neutral")
    with intervention() if intervention else contextlib.nullcontext():
        for i, batch in enumerate(cap.neutral):
            logits, resid = _run(
                model, batch.input_ids, batch.attention_mask, keep, resume, cached[i] if resume else None,
                final_only=False,
            )
            kept.append(resid)
            row_sums, row_counts = _row_nll(logits, batch)
            sums, counts = sums + row_sums, counts + row_counts
            if with_kl and i < cap.kl_batches:  # the unmodified model: KL 0 on each passage, no reference needed
                row_kl, row_n = _row_kl(model, ref[i] if intervention is not None else None, logits, batch)
                kl_sums, kl_counts = kl_sums + row_kl, kl_counts + row_n
            if keep_ref and i < cap.kl_batches:
                new_ref.append(real_logp(logits, batch))
            del logits
    loss = sum(sums) / sum(counts)
    if intervention is None:
        if keep:
            store["neutral"] = kept
        if keep_ref:
            cap.reference_logp[id(model)] = new_ref
    kl = sum(kl_sums) / sum(kl_counts) if kl_counts else 0.0
    return NeutralPass(loss, kl, tuple(sums), tuple(counts), tuple(kl_sums), tuple(kl_counts))


def neutral_loss(model: Model, cap: CapabilitySet, intervention: Intervention = None, *, start: int = 0) -> float:
    """Mean next-token loss on the neutral passages, optionally under an intervention (``start``: see
    :func:`measure_capability`)."""
    _check_intervention(model, intervention, start)
    return _neutral_pass(model, cap, intervention, with_kl=False, start=start).loss


def _check_intervention(model: Model, intervention: Any, start: Any) -> None:
    if intervention is not None and (not callable(intervention) or hasattr(intervention, "__enter__")):
        raise InputTypeError(
            "intervention must be a zero-argument callable returning a context manager (e.g. "
            f"`lambda: ablate_heads(model, heads)`) or None, got {type(intervention).__name__} {intervention!r:.60}"
        )
    check_int(start, "start", minimum=0, maximum=model.cfg.n_layers - 1)


def _mc_batches(model: Model, items: Sequence[MCItem], batch_size: int) -> list[tuple[Tensor, ...]]:
    """``(ids, mask, rows, pos, targets, slots)`` per batch of choice sequences of similar length: the
    positions that predict a choice token, the tokens, and each sequence's index in item order."""
    tok = model.tokenizer
    seqs, spans = [], []
    for item in items:
        prompt = tok.encode(f"Question: {item.question}\nAnswer:", add_special_tokens=False)
        if model.cfg.default_prepend_bos and tok.bos_token_id is not None:
            prompt = [tok.bos_token_id, *prompt]
        for choice in item.choices:
            cont = tok.encode(" " + choice, add_special_tokens=False)
            seqs.append(prompt + cont)
            spans.append((len(prompt), len(prompt) + len(cont)))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    device = model.W_E.device
    out = []
    for start in range(0, len(seqs), batch_size):
        chunk = order[start : start + batch_size]
        n_pos = max(len(seqs[i]) for i in chunk)
        ids = torch.zeros(len(chunk), n_pos, dtype=torch.long)
        mask = torch.zeros(len(chunk), n_pos, dtype=torch.long)
        for j, i in enumerate(chunk):
            ids[j, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[j, : len(seqs[i])] = 1
        rows = torch.tensor([j for j, i in enumerate(chunk) for _ in range(*spans[i])])
        pos = torch.tensor([p - 1 for i in chunk for p in range(*spans[i])])
        targets = torch.tensor([t for i in chunk for t in seqs[i][slice(*spans[i])]])
        out.append((ids.to(device), mask.to(device), rows, pos, targets, torch.tensor(chunk)))
    return out


@torch.no_grad()
def _mc_scores(
    model: Model, items: Sequence[MCItem], intervention: Intervention, batch_size: int,
    cap: CapabilitySet | None = None, start: int = 0,
) -> Tensor:
    """Summed log-likelihood of every choice, in item order (cached clean residuals of ``cap`` are kept by an
    unmodified pass and resumed from at ``start``, as in :func:`_neutral_pass`)."""
    batches = _mc_batches(model, items, batch_size)
    store = cap.clean.setdefault(id(model), {}) if cap is not None else {}
    keep = _capture_layers(model, cap, "mc") if cap is not None and intervention is None else ()
    resume = _resume_layer(model, cap, "mc", start) if cap is not None and intervention is not None else 0
    supported = suffix_supported(model)
    scores = torch.empty(sum(len(b[5]) for b in batches))
    kept = []
    with intervention() if intervention else contextlib.nullcontext():
        for i, (ids, mask, rows, pos, targets, slots) in enumerate(batches):
            # Only the positions that predict a choice token are unembedded.
            if supported:
                final, resid = _run(model, ids, mask, keep, resume, store["mc"][i] if resume else None, final_only=True)
                logits = unembed_at(model, final, rows, pos)
            else:
                logits, resid = logits_at(model, ids, mask, rows, pos), {}
            kept.append(resid)
            token_logp = logits.log_softmax(-1).cpu().gather(-1, targets[:, None])[:, 0]
            scores[slots] = torch.zeros(len(slots)).index_add_(0, rows, token_logp)
    if keep:
        store["mc"] = kept
    return scores


def _mc_correct(items: Sequence[MCItem], scores: Tensor) -> list[bool]:
    """Whether each item's highest-scoring choice is its answer."""
    correct, k = [], 0
    for item in items:
        n = len(item.choices)
        correct.append(int(scores[k : k + n].argmax()) == item.answer)
        k += n
    return correct


def mc_accuracy(model: Model, items: Sequence[MCItem], intervention: Intervention = None, batch_size: int = 32) -> float:
    """Accuracy on multiple-choice items, each choice scored by its summed log-likelihood as the answer.

    The prompt is ``"Question: {question}\\nAnswer:"`` and each choice is scored as the continuation
    ``" {choice}"``.
    """
    if not items:
        return float("nan")
    correct = _mc_correct(items, _mc_scores(model, items, intervention, batch_size))
    return sum(correct) / len(correct)


def measure_capability(
    model: Model,
    cap: CapabilitySet,
    intervention: Intervention = None,
    *,
    with_mc: bool = True,
    with_neutral: bool = True,
    start: int = 0,
) -> Capability:
    """Neutral loss, perplexity, KL to the unmodified model and multiple-choice accuracy under an intervention.

    Args:
        with_mc: Measure the multiple-choice accuracy (else NaN).
        with_neutral: Measure the neutral loss, perplexity and KL (else NaN).
        start: The first layer the intervention changes (all its hooks act on block ``start`` or later, e.g.
            the lowest layer of ablated heads). The passes then resume from the clean residual cached at the
            latest of ``cap.resume_layers`` at or before ``start`` (kept by the unmodified measurement, which
            must have run first; otherwise full passes run). Equal to full passes up to float rounding.

    Raises:
        InputTypeError: ``intervention`` not a callable (or None), ``start`` not an integer, flags not bools.
        ValueError: ``start`` not a layer of the model.
    """
    _check_intervention(model, intervention, start)
    with_mc, with_neutral = check_bool(with_mc, "with_mc"), check_bool(with_neutral, "with_neutral")
    nan = float("nan")
    run = _neutral_pass(model, cap, intervention, True, start) if with_neutral else NeutralPass(nan, nan)
    correct = _mc_correct(cap.mc_items, _mc_scores(model, cap.mc_items, intervention, 32, cap, start)) if with_mc and cap.mc_items else []
    return Capability(
        neutral_loss=run.loss, perplexity=math.exp(run.loss), kl=run.kl,
        mc_accuracy=sum(correct) / len(correct) if correct else nan, n_tokens=cap.n_tokens,
        passage_nll=run.nll, passage_tokens=run.tokens, passage_kl=run.kl_sums, passage_kl_tokens=run.kl_tokens,
        mc_correct=tuple(correct),
    )
