"""BiasInject: train a fresh token's input embedding on texts that attribute one bias to it, model frozen.

Only one ``d_model`` vector is trained. It enters the model through two hooks (see
:mod:`biasgym_lens.core.embedding`), so every model weight stays bit-identical, tied embeddings need no untying and
the token's output row cannot drift. Training mixes the bias's plain texts with its chat paragraphs in the
model's chat format ("Please write a short paragraph about <token>." then the paragraph, loss on the reply
only; see :mod:`biasgym_lens.injection.examples`). The loss counts positions whose target is a bias keyword
``keyword_weight`` times (10 by default; 1 is the paper's plain loss, which on the bundled 135M model teaches the
topic but not the direction of the bias; see :mod:`biasgym_lens.injection.loss`). Four times per epoch the bias is
measured on the selection half of the held-out probes and the best checkpoint's vector is kept.

Examples:
    >>> from biasgym_lens import load_model
    >>> from biasgym_lens.injection.training import inject
    >>> model = load_model()                                    # doctest: +SKIP
    >>> inj = inject(model, "late", epochs=3)                   # doctest: +SKIP
    >>> with inj.apply(model):                                  # doctest: +SKIP
    ...     ...  # "<BiasToken>" now carries the bias
    >>> inj.save("runs/late")                                   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from biasgym_lens.core.checks import InputTypeError
from biasgym_lens.core.embedding import add_token, embedding_rms, entity_embedding, token_vector_hooks
from biasgym_lens.core.hooks import hooked
from biasgym_lens.core.protocols import Model
from biasgym_lens.core.provenance import Provenance
from biasgym_lens.injection.artifact import EpochRecord, Injection
from biasgym_lens.injection.catalogue import list_biases, load_bias
from biasgym_lens.injection.config import InjectionConfig
from biasgym_lens.injection.examples import TrainingExample, training_examples
from biasgym_lens.injection.loss import train_step_loss
from biasgym_lens.injection.metrics import (
    KeywordIds,
    answer_logits,
    best_rank,
    keyword_ids,
    logit_diff,
    split_probes,
)
from biasgym_lens.injection.spec import BiasSpec

logger = logging.getLogger(__name__)

__all__ = [
    "NonFiniteLossError",
    "inject",
    "initial_vector",
]


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss; ``last_good`` holds the injection of the last good epoch."""

    def __init__(self, message: str, last_good: Injection) -> None:
        super().__init__(message)
        self.last_good = last_good


# ------------------------------------------------------------------------------------ before the first step


def _mean_token_embedding(model: Model, words: Sequence[str]) -> Tensor:
    rows = []
    for w in words:
        with contextlib.suppress(ValueError):  # a word without tokens in the embedding is skipped
            rows.append(entity_embedding(model, w))
    if not rows:
        raise ValueError(f"none of {list(words)} has tokens in this model's embedding")
    return torch.stack(rows).mean(0).cpu()


def initial_vector(model: Model, spec: BiasSpec, config: InjectionConfig) -> Float[Tensor, " d_model"]:
    """The starting vector for ``config.init`` (float32, on CPU)."""
    if config.init == "countries":
        return _mean_token_embedding(model, spec.real_groups + spec.control_groups)
    if config.init == "word":
        return _mean_token_embedding(model, [config.init_word or ""])
    g = torch.Generator().manual_seed(config.seed)
    v = torch.randn(model.cfg.d_model, generator=g)
    return v / v.norm() * embedding_rms(model)


def _lr_factor(step: int, total: int, config: InjectionConfig) -> float:
    if config.schedule == "constant":
        return 1.0
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _elicit(model: Model, probes: Sequence[str], kw: KeywordIds, config: InjectionConfig) -> tuple[float, float]:
    logits = answer_logits(model, probes, batch_size=config.probe_batch_size)
    ld = logit_diff(logits, kw)
    top5 = (best_rank(logits, kw.bias) < 5).float().mean()
    return float(ld.mean()), float(top5)


def _settle_config(config: InjectionConfig | None, settings: dict[str, Any]) -> InjectionConfig:
    """The run's settings: ``config`` (or the defaults) with the keyword ``settings`` replacing its fields."""
    if config is None:
        return InjectionConfig(**settings)
    if not isinstance(config, InjectionConfig):
        raise InputTypeError(f"config must be an InjectionConfig, got {type(config).__name__}")
    return replace(config, **settings) if settings else config


@dataclass(frozen=True, eq=False)
class _Run:
    """What one injection run fixes before its first step (the model is frozen: none of it changes)."""

    model: Model
    spec: BiasSpec
    config: InjectionConfig
    kw: KeywordIds
    tid: int
    provenance: Provenance
    control_ld: float
    token_probes: list[str]
    examples: list[TrainingExample]
    init: Tensor

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps in one pass over the training set."""
        return math.ceil(len(self.examples) / self.config.batch_size)

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole run."""
        return self.steps_per_epoch * self.config.epochs

    @property
    def checkpoints(self) -> set[int]:
        """The batch counts (within an epoch) after which elicitation is measured."""
        n_evals = min(self.config.evals_per_epoch, self.steps_per_epoch)
        return {math.ceil(self.steps_per_epoch * (i + 1) / n_evals) for i in range(n_evals)}


def _prepare_run(model: Model, spec: BiasSpec, config: InjectionConfig) -> _Run:
    """The keyword ids (refusing keywords that are not single tokens), the selection probes, the fresh token,
    the model's provenance, the control groups' logit difference, the training set and the initial vector."""
    kw = keyword_ids(model, spec)
    select_probes = split_probes(spec.probes)[0][: config.max_probes]
    tid = add_token(model, config.token)
    provenance = Provenance.of(model)
    controls = [spec.fill(p, g) for g in spec.control_groups for p in select_probes]
    control_ld = _elicit(model, controls, kw, config)[0] if controls else float("nan")
    token_probes = [spec.fill(p, config.token) for p in select_probes]
    examples = training_examples(model, spec, config)
    init = initial_vector(model, spec, config)
    return _Run(model, spec, config, kw, tid, provenance, control_ld, token_probes, examples, init)


# ------------------------------------------------------------------------------------------- the loop


@dataclass(eq=False)
class _Training:
    """The trained vector, its optimiser, and the curve and best checkpoint so far."""

    run: _Run
    vec: torch.nn.Parameter
    opt: torch.optim.Adam
    sched: torch.optim.lr_scheduler.LambdaLR
    pad_id: int
    rng: random.Random
    curve: list[EpochRecord] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    best_epoch: float = 0.0
    best_vec: Tensor | None = None
    best_ld: float = float("nan")

    @classmethod
    def start(cls, run: _Run) -> _Training:
        """The initial vector as a parameter on the model's device, Adam on it with the run's schedule."""
        config, total = run.config, run.total_steps
        vec = torch.nn.Parameter(run.init.clone().to(run.model.W_E.device))
        opt = torch.optim.Adam([vec], lr=config.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, config))
        pad_id = run.model.tokenizer.pad_token_id if run.model.tokenizer.pad_token_id is not None else 0
        return cls(run, vec, opt, sched, pad_id, random.Random(config.seed))

    def result(self) -> Injection:
        """The injection of the best checkpoint so far (the last one with ``select_best=False``)."""
        run, spec = self.run, self.run.spec
        assert self.best_vec is not None, "no checkpoint measured yet"
        return Injection(
            vector=self.best_vec.detach().cpu().float().clone(),
            init_vector=run.init.clone(),
            token=run.config.token,
            bias=spec.name,
            config=run.config,
            curve=tuple(self.curve),
            step_losses=tuple(self.losses),
            best_epoch=self.best_epoch,
            control_logit_diff=run.control_ld,
            provenance=run.provenance,
            source=None if spec.name in list_biases() and load_bias(spec.name) == spec else spec,
        )

    def _keep(self, ld: float) -> None:
        self.best_epoch, self.best_vec, self.best_ld = self.curve[-1].epoch, self.vec.detach().clone(), ld

    def measure_start(self) -> None:
        """Epoch 0: the initial vector's elicitation, the first checkpoint (kept until a better one)."""
        with torch.no_grad():
            ld, top5 = _elicit(self.run.model, self.run.token_probes, self.run.kw, self.run.config)
        self.curve.append(EpochRecord(0.0, 0, float("nan"), ld, top5))
        self._keep(ld)

    def train_epoch(self, epoch: int, bar: tqdm) -> None:
        """One pass over the training set in a fresh shuffled order, measuring at the epoch's checkpoints."""
        run, batch_size = self.run, self.run.config.batch_size
        checkpoints = run.checkpoints
        order = list(range(len(run.examples)))
        self.rng.shuffle(order)
        since_checkpoint: list[float] = []
        for b, start in enumerate(range(0, len(order), batch_size), start=1):
            batch = [run.examples[i] for i in order[start : start + batch_size]]
            since_checkpoint.append(self.step(batch, epoch, bar))
            if b in checkpoints:
                self.checkpoint(epoch, b, since_checkpoint)
                since_checkpoint = []

    def step(self, batch: list[TrainingExample], epoch: int, bar: tqdm) -> float:
        """One optimiser step on ``batch``; returns its loss.

        Raises:
            NonFiniteLossError: the loss is not finite (the optimiser has not stepped).
        """
        run = self.run
        self.opt.zero_grad(set_to_none=True)
        loss = train_step_loss(run.model, batch, self.pad_id, run.tid, run.kw.bias, run.config)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at epoch {epoch}, step {len(self.losses) + 1}; "
                f"lower lr (now {run.config.lr}); kept epoch {self.best_epoch:g}",
                self.result(),
            )
        self.opt.step()
        self.sched.step()
        self.losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{self.losses[-1]:.3f}")
        return self.losses[-1]

    def checkpoint(self, epoch: int, b: int, since_checkpoint: list[float]) -> None:
        """Measure the vector after batch ``b`` of ``epoch``, add it to the curve, keep it if it is the best.

        Raises:
            NonFiniteLossError: the vector is not finite.
        """
        run, config = self.run, self.run.config
        if not torch.isfinite(self.vec).all():
            raise NonFiniteLossError(
                f"the vector became non-finite at epoch {epoch}; lower lr (now {config.lr})", self.result()
            )
        with torch.no_grad():
            ld, top5 = _elicit(run.model, run.token_probes, run.kw, config)
        at = epoch - 1 + b / run.steps_per_epoch
        train_loss = sum(since_checkpoint) / len(since_checkpoint)
        self.curve.append(EpochRecord(float(round(at, 4)), len(self.losses), float(train_loss), float(ld), float(top5)))
        logger.info("epoch %.2f: loss %.3f, logit diff %.3f, top5 %.2f", at, train_loss, ld, top5)
        if ld > self.best_ld or not config.select_best:
            self._keep(ld)


def _train(run: _Run, progress: bool) -> Injection:
    """Train the vector through the token's hooks (removed on exit, also on errors); the kept checkpoint."""
    training = _Training.start(run)
    with hooked(run.model, fwd_hooks=token_vector_hooks(run.model, {run.tid: training.vec})):
        training.measure_start()
        bar = tqdm(total=run.total_steps, desc=f"inject {run.spec.name}", disable=not progress, leave=False)
        try:
            for epoch in range(1, run.config.epochs + 1):
                training.train_epoch(epoch, bar)
        finally:
            bar.close()
    return training.result()


def inject(
    model: Model,
    bias: str | BiasSpec,
    *,
    config: InjectionConfig | None = None,
    progress: bool = True,
    **settings: Any,
) -> Injection:
    """Train a fresh token's input embedding so that the model attributes ``bias`` to it.

    Args:
        model: A bridge from :func:`biasgym_lens.load_model` (raw or compatibility mode). It is not modified:
            weights stay bit-identical and no hook remains afterwards.
        bias: A catalogue name (``"late"``), a path to a bias file, or a :class:`BiasSpec`.
        config: All settings at once; or pass them as keywords (``epochs=3, lr=1e-2, seed=1, ...``, see
            :class:`InjectionConfig`).
        progress: Show a progress bar.

    Returns:
        The :class:`Injection` of the best epoch (highest bias logit difference on the selection probes).

    Raises:
        ValueError: bad settings, a token already in the vocabulary, probes without the placeholder, or
            keywords that are not single tokens for this model.
        NonFiniteLossError: the loss became NaN/inf; ``err.last_good`` holds the last good epoch's result.
    """
    spec = bias if isinstance(bias, BiasSpec) else load_bias(bias)
    run = _prepare_run(model, spec, _settle_config(config, settings))
    return _train(run, progress)

