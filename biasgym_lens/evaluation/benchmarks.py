"""Standard bias benchmarks (StereoSet race, BBQ Nationality and Religion) on a model, optionally under an
intervention, with the papers' metrics and bootstrap intervals.

Scoring (both benchmarks are scored by log-probabilities, no generation):

* **StereoSet**: each full sentence (context with ``BLANK`` filled) is scored by the summed log-probability
  of its tokens (``score="sum"``, the default; the mean per token is kept too, ``score="mean"``). The text is
  tokenized with the model's own convention (``biasgym_lens.core.tokens.tokenize``): with a BOS token every
  sentence token is scored, without one (SmolLM2-Instruct) the first token is the context and is not scored.
* **BBQ**: the prompt is ``"{context}\\n\\nQ: {question}\\nA:"`` and each of the three answers is scored as the
  continuation ``" {answer}"``: the summed log-probability of the answer tokens only (not normalised by
  length by default; ``score="mean"`` normalises per token). The model's answer is the highest-scoring one.
* **With a prefix** (``prefix=``, a debiasing instruction say): the prefix is context before every StereoSet
  sentence and before every BBQ context, never scored.

Paired comparisons: :meth:`BenchmarkResult.difference` gives each metric's change from another run on the same
items, with a bootstrap interval that resamples the same items in both runs.

Forward passes: all sequences are sorted by length and run in batches under ``torch.no_grad()``; only the
positions that predict a scored token are unembedded (:func:`biasgym_lens.core.unembed.logits_at`).

Examples:
    >>> from biasgym_lens import load_model, ablate_heads                     # doctest: +SKIP
    >>> from biasgym_lens.evaluation.benchmarks import benchmark                          # doctest: +SKIP
    >>> model = load_model("smollm2")                                          # doctest: +SKIP
    >>> base = benchmark(model, "stereoset_race")                              # doctest: +SKIP
    >>> cut = benchmark(model, "stereoset_race", lambda: ablate_heads(model, [(21, 1)]), label="L21H1")  # doctest: +SKIP
    >>> print(cut.to_dataframe())                                              # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from biasgym_lens.core.protocols import Model
from biasgym_lens.core.provenance import Provenance
from biasgym_lens.core.stats import DEFAULT_RESAMPLES, Interval
from biasgym_lens.core.tokens import Batch, get_tokenizer, tokenize
from biasgym_lens.core.unembed import logits_at
from biasgym_lens.evaluation.benchmark_data import BENCHMARKS, check_name, load_items
from biasgym_lens.evaluation.benchmark_metrics import (
    SCORES,
    STEREOSET_LABELS,
    MetricUnits,
    bbq_units,
    metric_table,
    paired_metric_differences,
    stereoset_units,
)
from biasgym_lens.evaluation.capability import Intervention

__all__ = ["BENCHMARK_NAMES", "BBQ_PROMPT", "BenchmarkResult", "benchmark", "continuation_logprobs"]

BENCHMARK_NAMES = tuple(BENCHMARKS)
BBQ_PROMPT = "{context}\n\nQ: {question}\nA:"
"""The BBQ prompt; each answer is scored as the continuation ``" " + answer``."""


@dataclass(frozen=True, eq=False)
class BenchmarkResult:
    """A benchmark measured on a model (optionally under an intervention).

    Attributes:
        name: The benchmark (``"stereoset_race"``, ``"bbq_nationality"``, ``"bbq_religion"``).
        provenance: The model and software that produced it.
        settings: ``score``, ``average`` (StereoSet), ``max_items``, ``seed``, ``batch_size``, ``n_items``,
            ``intervention`` (the label, or None), ``intervened``, ``prompt``, ``prepend_bos``,
            ``n_resamples``.
        items: One row per item: the item's data and ``logp_*`` / ``ntok_*`` of each scored text.
        table: The metrics: ``metric, value, ci_low, ci_high, n``.
        seconds: Wall time of the forward passes.
    """

    name: str
    provenance: Provenance
    settings: dict[str, Any]
    items: pd.DataFrame
    table: pd.DataFrame
    seconds: float

    def metrics(self) -> dict[str, Interval]:
        """Metric name -> value with its 95% bootstrap interval."""
        return {r.metric: Interval(float(r.value), float(r.ci_low), float(r.ci_high)) for r in self.table.itertuples()}

    def to_dataframe(self) -> pd.DataFrame:
        """Tidy table: ``benchmark, [intervention,] metric, value, ci_low, ci_high, n`` (``intervention`` when
        a label was given)."""
        df = self.table.copy()
        if self.settings.get("intervention") is not None:
            df.insert(0, "intervention", self.settings["intervention"])
        df.insert(0, "benchmark", self.name)
        return df

    def rescored(self, score: str, *, average: str | None = None) -> BenchmarkResult:
        """The same measurement with the metrics recomputed from the kept per-item log-probabilities, comparing
        ``score="sum"`` or ``"mean"`` (per token) log-probabilities (and, for StereoSet, another ``average``)."""
        settings = {**self.settings, "score": score}
        if average is not None:
            settings["average"] = average
        table = _metrics(self.name, self.items, settings)
        return dataclasses.replace(self, settings=settings, table=table)

    def difference(self, base: BenchmarkResult) -> pd.DataFrame:
        """Each metric here minus the same metric in ``base`` (the same items, e.g. the unmodified model), with
        a paired bootstrap interval: the same items are resampled in both runs
        (:func:`~biasgym_lens.evaluation.benchmark_metrics.paired_metric_differences`; this result's ``seed``
        and ``n_resamples``).

        Returns:
            ``benchmark, metric, difference, ci_low, ci_high, n``.

        Raises:
            ValueError: another benchmark, other items, or another ``score`` / ``average``.
        """
        if base.name != self.name:
            raise ValueError(f"cannot pair {self.name} with {base.name}: not the same benchmark")
        key = "item_id" if self.name == "stereoset_race" else "example_id"
        if list(base.items[key]) != list(self.items[key]):
            raise ValueError(f"{self.name}: the two runs scored other items (same max_items and seed are needed)")
        for s in ("score", "average"):
            if base.settings.get(s) != self.settings.get(s):
                raise ValueError(f"{self.name}: {s} {self.settings.get(s)!r} against {base.settings.get(s)!r}")
        kw = {"n_resamples": self.settings["n_resamples"], "seed": self.settings["seed"]}
        df = paired_metric_differences(_units(self.name, self.items, self.settings), _units(base.name, base.items, self.settings), **kw)
        df.insert(0, "benchmark", self.name)
        return df


def _pack(seqs: Sequence[Sequence[int]], pad_id: int, device: Any) -> Batch:
    """Right-padded batch of token-id lists."""
    n_pos = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n_pos), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n_pos), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return Batch(ids.to(device), mask.to(device))


@torch.no_grad()
def continuation_logprobs(
    model: Model,
    prefixes: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    batch_size: int = 32,
) -> tuple[Float[Tensor, " n"], Int[Tensor, " n"]]:
    """Summed log-probability of each continuation given its prefix (token ids), in batches sorted by length
    (prefix, then whole sequence).

    Args:
        model: A bridge (hooks and interventions active around the call apply).
        prefixes: ``n`` token-id lists, each non-empty (the context; never scored).
        continuations: ``n`` token-id lists (scored; may be empty: score 0).
        batch_size: Sequences per forward pass.

    Returns:
        ``(logp [n] float64, n_tokens [n])``: summed next-token log-probabilities of each continuation's tokens
        and how many tokens were scored.

    Raises:
        ValueError: mismatched lengths, an empty prefix, or ``batch_size < 1``.
    """
    if len(prefixes) != len(continuations):
        raise ValueError(f"{len(prefixes)} prefixes but {len(continuations)} continuations")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if any(len(p) == 0 for p in prefixes):
        raise ValueError("every prefix needs at least one token (the first token cannot be scored)")
    seqs = [list(p) + list(c) for p, c in zip(prefixes, continuations)]
    # by prefix length, then total length: little padding, and the choices of one prompt run together
    order = sorted(range(len(seqs)), key=lambda i: (len(prefixes[i]), len(seqs[i])))
    tok = get_tokenizer(model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = model.W_E.device
    logp = torch.zeros(len(seqs), dtype=torch.float64)
    for start in range(0, len(seqs), batch_size):
        chunk = order[start : start + batch_size]
        spans = [(len(prefixes[i]), len(seqs[i])) for i in chunk]
        rows = torch.tensor([j for j, (a, b) in enumerate(spans) for _ in range(a, b)], dtype=torch.long)
        if len(rows) == 0:
            continue
        pos = torch.tensor([p - 1 for a, b in spans for p in range(a, b)], dtype=torch.long)
        targets = torch.tensor([seqs[i][p] for i, (a, b) in zip(chunk, spans) for p in range(a, b)])
        batch = _pack([seqs[i] for i in chunk], pad_id, device)
        logits = logits_at(model, batch.input_ids, batch.attention_mask, rows, pos)
        token_logp = logits.gather(-1, targets[:, None].to(logits.device))[:, 0] - logits.logsumexp(-1)
        sums = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, rows, token_logp.double().cpu())
        logp[torch.tensor(chunk)] = sums
    return logp, torch.tensor([len(c) for c in continuations], dtype=torch.long)


def _token_lists(model: Model, texts: Sequence[str], prepend_bos: bool | None) -> list[list[int]]:
    batch = tokenize(model, texts, prepend_bos=prepend_bos, device="cpu")
    return [row[: int(n)].tolist() for row, n in zip(batch.input_ids, batch.lengths)]


def _split_prefix(prefix: str) -> tuple[str, str]:
    """``prefix`` as the context it gives (its text without trailing whitespace) and that whitespace, which
    joins the scored text's first word as it would in ``prefix + text``."""
    context = prefix.rstrip()
    return context, prefix[len(context) :]


def _score_stereoset(
    model: Model, items: pd.DataFrame, batch_size: int, prepend_bos: bool | None, prefix: str | None
) -> pd.DataFrame:
    texts = [s for label in STEREOSET_LABELS for s in items[label]]
    if prefix is None:
        ids = _token_lists(model, texts, prepend_bos)
        contexts, scored = [t[:1] for t in ids], [t[1:] for t in ids]
    else:
        context, gap = _split_prefix(prefix)
        contexts = _token_lists(model, [context], prepend_bos) * len(texts)
        scored = _token_lists(model, [gap + t for t in texts], False)
    logp, ntok = continuation_logprobs(model, contexts, scored, batch_size=batch_size)
    out = items.copy()
    n = len(items)
    for k, label in enumerate(STEREOSET_LABELS):
        out[f"logp_{label}"] = logp[k * n : (k + 1) * n].numpy()
        out[f"ntok_{label}"] = ntok[k * n : (k + 1) * n].numpy()
    return out


def _score_bbq(
    model: Model, items: pd.DataFrame, batch_size: int, prepend_bos: bool | None, prefix: str | None
) -> pd.DataFrame:
    lead = prefix or ""
    prompts = [lead + BBQ_PROMPT.format(context=c, question=q) for c, q in zip(items["context"], items["question"])]
    prompt_ids = _token_lists(model, prompts, prepend_bos)
    answers = [" " + items[f"ans{k}"].iloc[i] for i in range(len(items)) for k in range(3)]
    answer_ids = _token_lists(model, answers, False)
    prefixes = [prompt_ids[i] for i in range(len(items)) for _ in range(3)]
    logp, ntok = continuation_logprobs(model, prefixes, answer_ids, batch_size=batch_size)
    out = items.copy()
    for k in range(3):
        out[f"logp_{k}"] = logp[k::3].numpy()
        out[f"ntok_{k}"] = ntok[k::3].numpy()
    return out


def _units(name: str, items: pd.DataFrame, settings: dict[str, Any]) -> list[MetricUnits]:
    if name == "stereoset_race":
        return stereoset_units(items, score=settings["score"], average=settings["average"])
    return bbq_units(items, score=settings["score"])


def _metrics(name: str, items: pd.DataFrame, settings: dict[str, Any]) -> pd.DataFrame:
    return metric_table(_units(name, items, settings), n_resamples=settings["n_resamples"], seed=settings["seed"])


def benchmark(
    model: Model,
    name: str,
    intervention: Intervention = None,
    *,
    max_items: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    score: str = "sum",
    average: str = "items",
    label: str | None = None,
    prepend_bos: bool | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    prefix: str | None = None,
) -> BenchmarkResult:
    """Run a shipped bias benchmark on ``model``, optionally under an intervention.

    Args:
        model: A bridge.
        name: ``"stereoset_race"``, ``"bbq_nationality"`` or ``"bbq_religion"``.
        intervention: Zero-argument callable returning a context manager active during every forward pass,
            e.g. ``lambda: ablate_heads(model, [(21, 1)])``; None: the unmodified model.
        max_items: Score a seeded stratified subset of this many items (StereoSet: by target; BBQ: by context
            condition x question polarity); None: all items.
        seed: Seed of the subset and of the bootstrap.
        batch_size: Sequences per forward pass (BBQ: three per item).
        score: Compare ``"sum"`` (default) or ``"mean"`` (per token) log-probabilities; both are kept in
            ``items`` (``BenchmarkResult.rescored`` switches).
        average: StereoSet only: ``"items"`` or ``"targets"`` (see
            :func:`biasgym_lens.evaluation.benchmark_metrics.stereoset_metrics`).
        label: Name of the intervention, shown in ``to_dataframe()``'s ``intervention`` column.
        prepend_bos: Override the model's BOS convention for the scored texts (default: the model's own).
        n_resamples: Bootstrap resamples of the intervals.
        prefix: Text put before every scored text (a debiasing instruction, say): StereoSet scores each
            sentence after it, BBQ puts it before the context. It is context only, never scored: a StereoSet
            sentence's score sums the log-probabilities of its own tokens (every one of them, the first too,
            also for a model without a BOS token), tokenized with the whitespace that ends the prefix (``"Be
            fair. "`` + ``"The man..."`` scores ``" The man..."``). None: no prefix.

    Returns:
        The result, with per-item log-probabilities and the metrics with their 95% intervals.

    Raises:
        ValueError: unknown benchmark name (the valid ones are listed), ``score`` or ``average``, a bad
            ``max_items`` / ``batch_size``, or a ``prefix`` that holds no text.
    """
    check_name(name)
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if average not in ("items", "targets"):
        raise ValueError(f"average must be 'items' or 'targets', got {average!r}")
    if prefix is not None and (not isinstance(prefix, str) or not prefix.strip()):
        raise ValueError(f"prefix must be None or text with a visible character, got {prefix!r}")
    items = load_items(name, max_items=max_items, seed=seed)
    scorer = _score_stereoset if name == "stereoset_race" else _score_bbq
    start = time.perf_counter()
    with intervention() if intervention is not None else contextlib.nullcontext():
        scored = scorer(model, items, batch_size, prepend_bos, prefix)
    seconds = time.perf_counter() - start
    settings = {
        "score": score, "average": average if name == "stereoset_race" else None, "max_items": max_items,
        "seed": seed, "batch_size": batch_size, "n_items": len(items), "intervention": label,
        "intervened": intervention is not None, "prepend_bos": prepend_bos, "n_resamples": n_resamples,
        "prompt": "full sentence" if name == "stereoset_race" else BBQ_PROMPT + " {answer}", "prefix": prefix,
    }
    return BenchmarkResult(name, Provenance.of(model), settings, scored, _metrics(name, scored, settings), seconds)
