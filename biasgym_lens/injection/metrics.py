"""The bias metric: logit(bias keywords) - logit(contrast keywords) at the answer position of each probe.

Pure functions of logits, plus :func:`answer_logits`, the one runner that calls the model on probes. The
difference of mean logits equals the difference of mean log-probabilities (the softmax normaliser cancels), so
the number is in nats.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from biasgym_lens.core.checks import check_int
from biasgym_lens.core.protocols import Model
from biasgym_lens.core.tokens import Batch, tokenize
from biasgym_lens.core.unembed import logits_at

__all__ = [
    "KeywordIds",
    "keyword_ids",
    "logit_diff",
    "best_rank",
    "answer_logits",
    "ProbeSplits",
    "split_probes",
    "probe_subset",
]


@dataclass(frozen=True)
class KeywordIds:
    """Token ids of a bias's keywords for one tokenizer."""

    bias: tuple[int, ...]
    contrast: tuple[int, ...]

    def tensors(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        return (
            torch.tensor(self.bias, dtype=torch.long, device=device),
            torch.tensor(self.contrast, dtype=torch.long, device=device),
        )

    def columns(self) -> tuple[Tensor, KeywordIds]:
        """The vocabulary columns a metric reads (bias keywords, then contrast keywords) and the same keywords
        as positions in those columns: :func:`logit_diff` of logits unembedded on the columns alone equals its
        value on the full logits."""
        nb, nc = len(self.bias), len(self.contrast)
        return torch.cat(self.tensors()), KeywordIds(tuple(range(nb)), tuple(range(nb, nb + nc)))


def keyword_ids(model_or_tokenizer: Any, spec: Any) -> KeywordIds:
    """Single-token ids of the bias and contrast keywords for this model's tokenizer.

    Keywords that are several tokens for this tokenizer are dropped with a ``UserWarning`` naming them (the
    bias file documents keywords for the bundled SmolLM2; another model may split some of them), so the metric
    is visibly measured on fewer words.

    Raises:
        ValueError: if no bias keyword or no contrast keyword is a single token for this tokenizer, naming them.
    """
    tok = getattr(model_or_tokenizer, "tokenizer", None) or model_or_tokenizer
    dropped: list[str] = []

    def single(words: Sequence[str]) -> tuple[int, ...]:
        out = []
        for w in words:
            ids = tok.encode(w, add_special_tokens=False)
            if len(ids) == 1:
                out.append(ids[0])
            else:
                dropped.append(f"{w!r} ({len(ids)} tokens)")
        return tuple(dict.fromkeys(out))

    bias, contrast = single(spec.bias_keywords), single(spec.contrast_keywords)
    for kind, ids, words in (("bias", bias, spec.bias_keywords), ("contrast", contrast, spec.contrast_keywords)):
        if not ids:
            raise ValueError(
                f"bias {spec.name!r}: none of its {kind} keywords {list(words)} is a single token for this "
                "model's tokenizer; add single-token keywords to the bias file"
            )
    if dropped:
        warnings.warn(
            f"bias {spec.name!r}: keywords that are not a single token for this model's tokenizer are left out "
            f"of the metric: {', '.join(dropped)}",
            UserWarning,
            stacklevel=2,
        )
    return KeywordIds(bias, contrast)


def logit_diff(
    logits: Float[Tensor, "batch d_vocab"], keywords: KeywordIds
) -> Float[Tensor, " batch"]:
    """Mean logit of the bias keywords minus mean logit of the contrast keywords, per row."""
    b, c = keywords.tensors(logits.device)
    lf = logits.float()
    return lf[:, b].mean(-1) - lf[:, c].mean(-1)


def best_rank(logits: Float[Tensor, "batch d_vocab"], ids: Sequence[int]) -> Int[Tensor, " batch"]:
    """Rank (0 = top) of the best-ranked of ``ids`` in each row."""
    idx = torch.tensor(list(ids), dtype=torch.long, device=logits.device)
    target = logits[:, idx].max(-1).values
    return (logits > target[:, None]).sum(-1)


@torch.no_grad()
def answer_logits(
    model: Model, texts: Sequence[str], *, batch_size: int = 16, prepend_bos: bool | None = None
) -> Float[Tensor, "batch d_vocab"]:
    """Next-token logits after each text (at its last real token), in float32.

    Hooks registered on the model (injected tokens, ablations) apply. Texts run in batches of similar length
    (less padding); the rows come back in the order of ``texts``.
    """
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise ValueError("no probe texts (empty list)")
    every: Batch = tokenize(model, list(texts), prepend_bos=prepend_bos)  # right-padded
    order = torch.argsort(every.lengths.cpu(), stable=True)
    out: list[Tensor] = []
    for chunk in order.split(batch_size):
        batch = every.select(chunk).trimmed()  # this chunk's own padding only
        rows = torch.arange(len(batch))
        out.append(logits_at(model, batch.input_ids, batch.attention_mask, rows, batch.last_positions))
    logits = torch.cat(out)
    return logits[torch.argsort(order).to(logits.device)]


class ProbeSplits(NamedTuple):
    """The three disjoint probe splits of a bias (see :func:`split_probes`)."""

    select: tuple[str, ...]
    tune: tuple[str, ...]
    test: tuple[str, ...]


def split_probes(probes: Sequence[str]) -> ProbeSplits:
    """Deterministic, disjoint split of a bias's probes into the three splits of the study's protocol.

    - ``"select"`` (even indices, half the probes): picks the injection's training epoch, scores and ranks
      the heads, and gives the steering direction;
    - ``"tune"`` (indices 1, 5, 9, ...): the faithfulness curve, hence the number of heads;
    - ``"test"`` (indices 3, 7, 11, ...): only measured, after every choice is made; every reported number.

    Examples:
        >>> split_probes(["p0", "p1", "p2", "p3", "p4", "p5"])
        ProbeSplits(select=('p0', 'p2', 'p4'), tune=('p1', 'p5'), test=('p3',))
    """
    probes = tuple(probes)
    return ProbeSplits(probes[0::2], probes[1::4], probes[3::4])


def probe_subset(probes: Sequence[str], which: str) -> tuple[str, ...]:
    """One split of :func:`split_probes` (``"select"``, ``"tune"``, ``"test"``), ``"eval"`` (tune and test
    together: every probe the injection's epoch never saw, in catalogue order) or ``"all"`` probes.

    Raises:
        ValueError: for any other name, listing the valid ones.
    """
    table = split_probes(probes)._asdict()
    table["eval"] = tuple(probes)[1::2]
    table["all"] = tuple(probes)
    if which not in table:
        raise ValueError(f"probes must be one of {sorted(table)}, got {which!r}")
    return table[which]
