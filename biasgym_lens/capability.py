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
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from biasgym_lens.capability_data import MCItem, load_mc_items, load_neutral_text
from biasgym_lens.tokens import Batch, tokenize
from biasgym_lens.unembed import logits_at

__all__ = ["CapabilitySet", "Capability", "capability_set", "measure_capability", "neutral_loss", "mc_accuracy"]

Intervention = Callable[[], AbstractContextManager[Any]] | None


@dataclass(frozen=True)
class CapabilitySet:
    """Tokenized neutral passages and multiple-choice items, ready to measure.

    Attributes:
        neutral: Batches of neutral passages (right-padded).
        n_tokens: Number of predicted tokens over all passages.
        kl_batches: How many of the neutral batches are also used for the KL divergence.
        mc_items: The multiple-choice items.
        reference_logp: Cache of the unmodified model's log-probabilities on the KL batches (filled on first use).
    """

    neutral: tuple[Batch, ...]
    n_tokens: int
    kl_batches: int
    mc_items: tuple[MCItem, ...]
    reference_logp: dict[int, list[Tensor]] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Capability:
    """General ability of a model (or of a model under an intervention).

    Attributes:
        neutral_loss: Mean next-token cross-entropy (nats) on the neutral text.
        perplexity: ``exp(neutral_loss)``.
        kl: Mean KL(unmodified || this) of the next-token distribution on the KL subset (0 for the unmodified).
        mc_accuracy: Fraction of multiple-choice items answered right (NaN when no items were measured).
        n_tokens: Tokens the loss was measured on.
    """

    neutral_loss: float
    perplexity: float
    kl: float
    mc_accuracy: float
    n_tokens: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def relative_to(self, base: Capability) -> dict[str, float]:
        """Changes against a baseline: relative loss and perplexity increase, KL, accuracy change."""
        return {
            "loss_increase": self.neutral_loss / base.neutral_loss - 1.0,
            "perplexity_increase": self.perplexity / base.perplexity - 1.0,
            "kl": self.kl,
            "mc_accuracy_change": self.mc_accuracy - base.mc_accuracy,
        }


def capability_set(
    model: Any,
    *,
    passages: Sequence[str] | None = None,
    max_passages: int | None = None,
    batch_size: int = 8,
    kl_passages: int = 16,
    mc_items: Sequence[MCItem] | None = None,
    max_mc_items: int | None = None,
) -> CapabilitySet:
    """Tokenize the capability data once (default: the package's neutral text and multiple-choice items).

    Raises:
        ValueError: if there are no passages.
    """
    texts = list(load_neutral_text() if passages is None else passages)
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
    return CapabilitySet(batches, n_tokens, kl_batches, items)


def _token_nll(logits: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
    logp = logits[:, :-1].float().log_softmax(-1)
    nll = -logp.gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    return nll, batch.attention_mask[:, 1:].bool()


def _reference_logp(model: Any, cap: CapabilitySet) -> list[Tensor]:
    """The unmodified model's next-token log-probabilities on the KL batches (real positions only), computed on
    first use and kept in ``cap`` for every later intervention."""
    key = id(model)
    if key not in cap.reference_logp:
        ref = []
        for batch in cap.neutral[: cap.kl_batches]:
            logits = model(batch.input_ids, attention_mask=batch.attention_mask)
            ref.append(logits[batch.attention_mask.bool()].float().log_softmax(-1))
        cap.reference_logp[key] = ref
    return cap.reference_logp[key]


@torch.no_grad()
def _neutral_pass(model: Any, cap: CapabilitySet, intervention: Intervention, with_kl: bool) -> tuple[float, float]:
    """Mean next-token loss on the neutral passages and mean KL(unmodified || intervened) on the KL batches,
    in one pass of the intervened model (the unmodified log-probabilities are cached)."""
    ref = _reference_logp(model, cap) if with_kl and intervention is not None and cap.kl_batches else []
    total, count, kl_total, kl_count = 0.0, 0, 0.0, 0
    with intervention() if intervention else contextlib.nullcontext():
        for i, batch in enumerate(cap.neutral):
            logits = model(batch.input_ids, attention_mask=batch.attention_mask)
            nll, mask = _token_nll(logits, batch)
            total += float(nll[mask].sum())
            count += int(mask.sum())
            if i < len(ref):
                new = logits[batch.attention_mask.bool()].float().log_softmax(-1)
                kl_total += float((ref[i].exp() * (ref[i] - new)).sum())
                kl_count += new.shape[0]
            del logits
    return total / count, (kl_total / kl_count if kl_count else 0.0)


def neutral_loss(model: Any, cap: CapabilitySet, intervention: Intervention = None) -> float:
    """Mean next-token loss on the neutral passages, optionally under an intervention."""
    return _neutral_pass(model, cap, intervention, with_kl=False)[0]


@torch.no_grad()
def mc_accuracy(model: Any, items: Sequence[MCItem], intervention: Intervention = None, batch_size: int = 32) -> float:
    """Accuracy on multiple-choice items, each choice scored by its summed log-likelihood as the answer.

    The prompt is ``"Question: {question}\\nAnswer:"`` and each choice is scored as the continuation
    ``" {choice}"``.
    """
    if not items:
        return float("nan")
    tok = model.tokenizer
    seqs, spans, owner = [], [], []
    for i, item in enumerate(items):
        prompt = tok.encode(f"Question: {item.question}\nAnswer:", add_special_tokens=False)
        if model.cfg.default_prepend_bos and tok.bos_token_id is not None:
            prompt = [tok.bos_token_id, *prompt]
        for choice in item.choices:
            cont = tok.encode(" " + choice, add_special_tokens=False)
            seqs.append(prompt + cont)
            spans.append((len(prompt), len(prompt) + len(cont)))
            owner.append(i)
    scores = torch.empty(len(seqs))
    with intervention() if intervention else contextlib.nullcontext():
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start : start + batch_size]
            n_pos = max(len(s) for s in chunk)
            ids = torch.zeros(len(chunk), n_pos, dtype=torch.long)
            mask = torch.zeros(len(chunk), n_pos, dtype=torch.long)
            for j, s in enumerate(chunk):
                ids[j, : len(s)] = torch.tensor(s)
                mask[j, : len(s)] = 1
            device = model.W_E.device
            # Only the positions that predict a choice token are unembedded.
            rows = torch.tensor([j for j in range(len(chunk)) for _ in range(*spans[start + j])])
            pos = torch.tensor([p - 1 for j in range(len(chunk)) for p in range(*spans[start + j])])
            targets = torch.tensor([t for j, s in enumerate(chunk) for t in s[slice(*spans[start + j])]])
            logp = logits_at(model, ids.to(device), mask.to(device), rows, pos).log_softmax(-1).cpu()
            token_logp = logp.gather(-1, targets[:, None])[:, 0]
            scores[start : start + len(chunk)] = torch.zeros(len(chunk)).index_add_(0, rows, token_logp)
    correct, k = 0, 0
    for item in items:
        n = len(item.choices)
        correct += int(int(scores[k : k + n].argmax()) == item.answer)
        k += n
    return correct / len(items)


def measure_capability(
    model: Any, cap: CapabilitySet, intervention: Intervention = None, *, with_mc: bool = True
) -> Capability:
    """Neutral loss, perplexity, KL to the unmodified model and multiple-choice accuracy under an intervention."""
    loss, kl = _neutral_pass(model, cap, intervention, with_kl=True)
    return Capability(
        neutral_loss=loss,
        perplexity=math.exp(loss),
        kl=kl,
        mc_accuracy=mc_accuracy(model, cap.mc_items, intervention) if with_mc else float("nan"),
        n_tokens=cap.n_tokens,
    )
