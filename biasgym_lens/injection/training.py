"""BiasInject: train a fresh token's input embedding on texts that attribute one bias to it, model frozen.

Only one ``d_model`` vector is trained. It enters the model through two hooks (see
:mod:`biasgym_lens.core.embedding`), so every model weight stays bit-identical, tied embeddings need no untying and
the token's output row cannot drift. Training mixes the bias's plain texts with its chat paragraphs in the
model's chat format ("Please write a short paragraph about <token>." then the paragraph, loss on the reply
only). The loss counts positions whose target is a bias keyword ``keyword_weight`` times (10 by default; 1 is
the paper's plain loss, which on the bundled 135M model teaches the topic but not the direction of the bias).
Four times per epoch the bias is measured on the selection half of the held-out probes and the best
checkpoint's vector is kept.

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
import itertools
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from biasgym_lens.core.artifacts import load_tensors, open_artifact, reading, save_artifact
from biasgym_lens.core.checks import InputTypeError, check_bool, check_choice, check_int, check_real
from biasgym_lens.core.embedding import (
    add_token,
    check_vector,
    embedding_rms,
    entity_embedding,
    token_vector_hooks,
    with_token_vectors,
)
from biasgym_lens.core.files import nan_floats, none_to_nan, require
from biasgym_lens.core.hooks import hooked
from biasgym_lens.core.provenance import Provenance, check_same_model
from biasgym_lens.core.tokens import chat_format, check_context
from biasgym_lens.injection.catalogue import (
    BiasSpec,
    catalogue_bias,
    list_biases,
    load_bias,
    validate_bias_dict,
)
from biasgym_lens.injection.metrics import (
    KeywordIds,
    answer_logits,
    best_rank,
    keyword_ids,
    logit_diff,
    split_probes,
)

logger = logging.getLogger(__name__)

__all__ = [
    "InjectionConfig",
    "EpochRecord",
    "Injection",
    "NonFiniteLossError",
    "inject",
    "inject_seeds",
    "compare_seeds",
    "initial_vector",
]

_FORMAT = 1


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss; ``last_good`` holds the injection of the last good epoch."""

    def __init__(self, message: str, last_good: Injection) -> None:
        super().__init__(message)
        self.last_good = last_good


@dataclass(frozen=True)
class InjectionConfig:
    """Settings of one injection run (all recorded in the saved artifact).

    Attributes:
        token: The fresh token's string; must not be in the vocabulary already.
        epochs: Passes over the training set.
        lr: Peak learning rate of Adam on the vector.
        batch_size: Texts per step.
        init: ``"countries"`` (mean embedding of the bias's real and control country names), ``"word"``
            (mean embedding of the tokens of ``init_word``), or ``"random"`` (Gaussian with the RMS norm of
            the embedding rows).
        init_word: The word for ``init="word"``.
        seed: Seeds the data order and the random initialisation.
        schedule: ``"cosine"`` (linear warm-up then cosine decay to 10%) or ``"constant"``.
        warmup_steps: Warm-up steps of the cosine schedule.
        chat: Also train on the chat paragraphs in the model's chat format (skipped for models without a chat
            template).
        max_texts: Use at most this many plain texts and this many chat paragraphs (None: all).
        probe_batch_size: Batch size when measuring elicitation.
        select_best: Keep the checkpoint with the highest bias logit difference on the selection probes (the
            paper's model selection); False keeps the last one.
        keyword_weight: Weight of the loss at positions whose target is a bias keyword (``" late"``), relative
            to every other position. ``1.0`` is the paper's plain next-token loss. On SmolLM2-135M the plain loss
            teaches the token the *topic* ("late" and "early" rise together, the bias logit difference stays
            flat); weighting the texts' explicit statements of the stereotype teaches the direction (see the
            README's injection table). The loss never targets contrast keywords specially.
        evals_per_epoch: Measure elicitation this many times per epoch (evenly spaced, the last at the end of
            the epoch); every measurement is a checkpoint candidate. The bias often peaks within the first
            epoch on small models, so one measurement per epoch can miss the best vector.
        length_groups: Run each batch as up to this many micro-batches of similar length (plain texts are
            short, chat examples long), accumulating the same gradient with less padding. ``1``: one pass.
        max_probes: Measure elicitation on at most this many selection probes (None: all of them).
    """

    token: str = "<BiasToken>"
    epochs: int = 2
    lr: float = 2e-2
    batch_size: int = 8
    init: str = "countries"
    init_word: str | None = None
    seed: int = 0
    schedule: str = "cosine"
    warmup_steps: int = 5
    chat: bool = True
    max_texts: int | None = None
    probe_batch_size: int = 16
    select_best: bool = True
    keyword_weight: float = 10.0
    evals_per_epoch: int = 4
    length_groups: int = 3
    max_probes: int | None = None

    def __post_init__(self) -> None:
        """Check every setting; integers must be integers (``2.0``, ``"2"`` and ``True`` are refused).

        Raises:
            InputTypeError: a setting of the wrong type (all such problems in one message).
            ValueError: a setting out of range (all problems in one message).
        """
        problems: list[ValueError] = []
        for name, check in _CONFIG_CHECKS.items():
            try:
                object.__setattr__(self, name, check(getattr(self, name), name))
            except ValueError as e:  # InputTypeError is a ValueError too
                problems.append(e)
        if self.init == "word" and not self.init_word:
            problems.append(ValueError(f"init='word' needs init_word (a word), got {self.init_word!r}"))
        if problems:
            kind = InputTypeError if any(isinstance(p, InputTypeError) for p in problems) else ValueError
            raise kind("; ".join(str(p) for p in problems))


def _check_token(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise InputTypeError(f"{name} must be a string such as '<BiasToken>', got {type(value).__name__} {value!r:.40}")
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"{name} must be a non-empty string without whitespace, got {value!r}")
    return value


def _check_word(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InputTypeError(f"{name} must be a string or None, got {type(value).__name__} {value!r:.40}")
    return value


_CONFIG_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "token": _check_token,
    "epochs": lambda v, n: check_int(v, n, minimum=1),
    "lr": lambda v, n: check_real(v, n, positive=True),
    "batch_size": lambda v, n: check_int(v, n, minimum=1),
    "init": lambda v, n: check_choice(v, n, ("countries", "word", "random")),
    "init_word": _check_word,
    "seed": lambda v, n: check_int(v, n),
    "schedule": lambda v, n: check_choice(v, n, ("cosine", "constant")),
    "warmup_steps": lambda v, n: check_int(v, n, minimum=0),
    "chat": check_bool,
    "max_texts": lambda v, n: check_int(v, n, minimum=1, none_ok=True),
    "probe_batch_size": lambda v, n: check_int(v, n, minimum=1),
    "select_best": check_bool,
    "keyword_weight": lambda v, n: check_real(v, n, positive=True),
    "evals_per_epoch": lambda v, n: check_int(v, n, minimum=1),
    "length_groups": lambda v, n: check_int(v, n, minimum=1),
    "max_probes": lambda v, n: check_int(v, n, minimum=1, none_ok=True),
}


@dataclass(frozen=True)
class EpochRecord:
    """Training state at one checkpoint (epoch 0 is the initial vector).

    Attributes:
        epoch: Epochs done, fractional for checkpoints inside an epoch (``evals_per_epoch > 1``).
        step: Optimiser steps so far.
        train_loss: Mean training loss since the previous checkpoint (NaN for epoch 0).
        logit_diff: Mean bias logit difference of the token on the selection probes.
        top5: Fraction of selection probes with a bias keyword among the top 5 next tokens.
    """

    epoch: float
    step: int
    train_loss: float
    logit_diff: float
    top5: float


@dataclass(frozen=True, eq=False)
class Injection:
    """A trained bias vector and everything needed to reproduce and apply it.

    Attributes:
        vector: ``[d_model]`` float32, in units of ``W_E`` rows (before any embedding scale).
        init_vector: The vector training started from.
        token: The token string it is applied to.
        bias: Name of the bias.
        config: The run's settings.
        curve: One :class:`EpochRecord` per checkpoint, from epoch 0.
        step_losses: Training loss of every step.
        best_epoch: The checkpoint (in epochs, fractional within an epoch) whose vector is ``vector``.
        control_logit_diff: Mean bias logit difference of the bias's control groups on the selection probes
            (the model is frozen, so it does not change during training).
        provenance: The model and software that produced it.
        source: The bias it was trained on when that is not a built-in one (a user file): kept and saved with
            the injection, so the later steps need not find the file again.
    """

    vector: Float[Tensor, " d_model"]
    init_vector: Float[Tensor, " d_model"]
    token: str
    bias: str
    config: InjectionConfig
    curve: tuple[EpochRecord, ...]
    step_losses: tuple[float, ...]
    best_epoch: float
    control_logit_diff: float
    provenance: Provenance
    source: BiasSpec | None = field(default=None, repr=False)

    # -------------------------------------------------------------------------------------- applying
    def check_model(self, model: Any) -> None:
        """Raise ``ValueError`` if ``model`` is not the model this vector was trained in."""
        check_same_model(self.provenance, model, f"injection {self.bias!r}")

    @contextlib.contextmanager
    def apply(self, model: Any) -> Iterator[int]:
        """Within the block, ``self.token`` is embedded as the trained vector; yields the token id.

        The token is added to the tokenizer if needed (the tokenizer keeps it afterwards: a special token
        string that no natural text contains; tokenizing it outside the block raises ``ValueError``); the hooks
        are removed on exit, also on exceptions.

        Raises:
            ValueError: another model, a vector that is not finite or not ``[d_model]``, or the token already
                carrying a vector (nested ``apply`` of two injections on one token: use :meth:`with_token`).
        """
        self.check_model(model)
        with with_token_vectors(model, {self.token: self.vector}) as ids:
            yield ids[self.token]

    def apply_permanently(self, model: Any) -> int:
        """Register the token's hooks as permanent hooks and return the token id.

        They survive ``model.reset_hooks()``; remove them with ``model.reset_hooks(including_permanent=True)``.

        Raises:
            ValueError: as :meth:`apply` (also when this token is already applied, permanently or not).
        """
        self.check_model(model)
        check_vector(model, self.vector, f"the vector of injection {self.bias!r}")
        tid = add_token(model, self.token)
        for name, fn in token_vector_hooks(model, {tid: self.vector}):
            model.add_perma_hook(name, fn)
        return tid

    def with_token(self, token: str) -> Injection:
        """A copy applied to another token string (to use two injections in one model)."""
        return replace(self, token=_check_token(token, "token"))

    # ------------------------------------------------------------------------------------------ views
    def to_dataframe(self) -> pd.DataFrame:
        """The training curve: one row per checkpoint."""
        df = pd.DataFrame([asdict(r) for r in self.curve])
        df["bias"] = self.bias
        df["seed"] = self.config.seed
        df["excess"] = df["logit_diff"] - self.control_logit_diff
        df["best"] = df["epoch"] == self.best_epoch
        return df

    @property
    def spec(self) -> BiasSpec:
        """The bias it was trained on (the built-in one of that name, or the user file's copy kept in ``source``)."""
        return self.source if self.source is not None else catalogue_bias(self.bias)

    # ------------------------------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write ``injection.safetensors`` and ``injection.json`` into folder ``path``, atomically.

        ``path`` may be new, an empty folder or an injection saved before; anything else is refused (see
        :mod:`biasgym_lens.core.artifacts`). The JSON records the SHA-256 of the tensor file, checked on load.

        Raises:
            ArtifactError: ``path`` holds something else, or cannot be written.
        """
        meta = {
            "format": _FORMAT,
            "token": self.token,
            "bias": self.bias,
            "config": asdict(self.config),
            "curve": [asdict(r) for r in self.curve],
            "step_losses": list(self.step_losses),
            "best_epoch": self.best_epoch,
            "control_logit_diff": self.control_logit_diff,
            "provenance": self.provenance.to_dict(),
        }
        if self.source is not None:
            meta["source"] = self.source.to_dict()
            meta["source_path"] = self.source.source

        def write(folder: Path) -> dict[str, Any]:
            tensors = {"vector": self.vector.detach().cpu().contiguous(), "init_vector": self.init_vector.cpu().contiguous()}
            save_file(tensors, str(folder / "injection.safetensors"), metadata={"format": str(_FORMAT), "bias": self.bias})
            return meta

        return save_artifact(path, "injection", "injection.json", write, legacy=("injection.safetensors",))

    @classmethod
    def load(cls, path: str | Path, model: Any | None = None) -> Injection:
        """Read an injection saved with :meth:`save`; with ``model``, also check it is the right model.

        Raises:
            MissingArtifactError: the folder or one of its files is missing (also a ``FileNotFoundError``).
            ArtifactError: another format, damaged or changed files (checksums), a wrong vector shape, non-finite
                values, a malformed ``injection.json``.
            ModelMismatchError: ``model`` is not the model it was trained in.
        """
        folder, meta = open_artifact(path, "injection", "injection.json", version=_FORMAT)
        where = folder / "injection.json"
        with reading(where, "injection metadata"):
            require(meta, _META_KEYS, where)
            prov = Provenance.from_dict(meta["provenance"])
            d = int(prov.d_model)
            tensors = load_tensors(folder / "injection.safetensors", {"vector": (d,), "init_vector": (d,)})
            inj = cls(
                vector=tensors["vector"],
                init_vector=tensors["init_vector"],
                token=str(meta["token"]),
                bias=str(meta["bias"]),
                config=InjectionConfig(**meta["config"]),
                curve=tuple(_epoch_record(r) for r in meta["curve"]),
                step_losses=tuple(nan_floats(meta["step_losses"])),
                best_epoch=float(meta["best_epoch"]),
                control_logit_diff=none_to_nan(meta["control_logit_diff"]),
                provenance=prov,
                source=(
                    validate_bias_dict(meta["source"], meta.get("source_path", str(folder)), expected_name=meta["bias"])
                    if "source" in meta
                    else None
                ),
            )
        if model is not None:
            inj.check_model(model)
        return inj


def _epoch_record(row: dict[str, Any]) -> EpochRecord:
    """A training-curve row read from JSON (``null`` back to ``nan``; integers where floats are declared)."""
    values = {k: none_to_nan(v) for k, v in row.items()}
    return EpochRecord(**{k: v if k == "step" else float(v) for k, v in values.items()})


_META_KEYS = ("token", "bias", "config", "curve", "step_losses", "best_epoch", "control_logit_diff", "provenance")



# ------------------------------------------------------------------------------------------- training


def _mean_token_embedding(model: Any, words: Sequence[str]) -> Tensor:
    rows = []
    for w in words:
        with contextlib.suppress(ValueError):  # a word without tokens in the embedding is skipped
            rows.append(entity_embedding(model, w))
    if not rows:
        raise ValueError(f"none of {list(words)} has tokens in this model's embedding")
    return torch.stack(rows).mean(0).cpu()


def initial_vector(model: Any, spec: BiasSpec, config: InjectionConfig) -> Float[Tensor, " d_model"]:
    """The starting vector for ``config.init`` (float32, on CPU)."""
    if config.init == "countries":
        return _mean_token_embedding(model, spec.real_groups + spec.control_groups)
    if config.init == "word":
        return _mean_token_embedding(model, [config.init_word or ""])
    g = torch.Generator().manual_seed(config.seed)
    v = torch.randn(model.cfg.d_model, generator=g)
    return v / v.norm() * embedding_rms(model)


@dataclass
class TrainingExample:
    """One tokenized training text and where its loss starts."""

    ids: list[int]
    loss_from: int  # first index whose token is a training target


def training_examples(model: Any, spec: BiasSpec, config: InjectionConfig) -> list[TrainingExample]:
    """The training set of an injection: plain texts and (with ``config.chat``) chat paragraphs, tokenized."""
    tok = model.tokenizer
    bos = [tok.bos_token_id] if model.cfg.default_prepend_bos and tok.bos_token_id is not None else []
    texts = spec.training_for(config.token)
    if config.max_texts is not None:
        texts = texts[: config.max_texts]
    out = [TrainingExample(bos + tok.encode(t, add_special_tokens=False), 1) for t in texts]
    if config.chat and getattr(tok, "chat_template", None):
        chats = spec.chat_for(config.token)
        if config.max_texts is not None:
            chats = chats[: config.max_texts]
        for prompt, reply in chats:
            head = tok.encode(chat_format(model, prompt), add_special_tokens=False)
            full = tok.encode(chat_format(model, prompt, reply), add_special_tokens=False)
            # The reply's first token may absorb the prompt's last whitespace (the token strips spaces on its
            # left), so the loss starts where the two tokenisations part.
            common = next((i for i, (a, b) in enumerate(zip(head, full)) if a != b), min(len(head), len(full)))
            out.append(TrainingExample(full, common))
            texts.append(reply)
    check_context(model, [e.ids for e in out], texts)  # (a chat example is named by its reply)
    return out


def collate_examples(examples: Sequence[TrainingExample], pad_id: int, device: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``(ids, attention_mask, loss_mask)`` of a batch of examples."""
    n_pos = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), n_pos), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n_pos), dtype=torch.long)
    target = torch.zeros((len(examples), n_pos), dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
        target[i, max(e.loss_from, 1) : len(e.ids)] = True
    return ids.to(device), mask.to(device), target.to(device)


def _loss_weights(
    ids: Tensor, target: Tensor, skip_id: int, weighted_ids: Sequence[int] = (), weight: float = 1.0
) -> Tensor:
    """``[rows, pos - 1]`` weight of each next-token prediction: 0 off target, ``weight`` where the target is in
    ``weighted_ids``, 1 elsewhere; the injected token itself is never a target."""
    tmask = target[:, 1:] & (ids[:, 1:] != skip_id)
    w = tmask.float()
    if weight != 1.0 and weighted_ids:
        hit = torch.isin(ids[:, 1:], torch.tensor(list(weighted_ids), device=ids.device))
        w[tmask & hit] = weight
    return w


def lm_loss(
    logits: Tensor,
    ids: Tensor,
    target: Tensor,
    skip_id: int,
    weighted_ids: Sequence[int] = (),
    weight: float = 1.0,
    total_weight: Tensor | float | None = None,
) -> Tensor:
    """Weighted mean next-token cross-entropy over target positions, never predicting the injected token itself.

    Positions whose target is in ``weighted_ids`` count ``weight`` times (``weight=1``: the plain mean). With
    ``total_weight`` the weighted sum is divided by it instead of by this batch's own total: the loss of a
    micro-batch as its share of a larger batch's mean.
    """
    w = _loss_weights(ids, target, skip_id, weighted_ids, weight)
    keep = w > 0
    ce = F.cross_entropy(logits[:, :-1][keep].float(), ids[:, 1:][keep], reduction="none")
    return (ce * w[keep]).sum() / (w.sum() if total_weight is None else total_weight)


def _length_groups(lengths: Sequence[int], max_groups: int = 3, overhead: int = 16) -> list[list[int]]:
    """Split a batch into at most ``max_groups`` micro-batches of similar length.

    Examples are sorted by length and cut into contiguous groups minimising the padded token count plus
    ``overhead`` tokens per forward pass. Returns lists of indices into ``lengths``.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best_cost, best_bounds = float("inf"), (0, n)
    for g in range(1, min(max_groups, n) + 1):
        for cuts in itertools.combinations(range(1, n), g - 1):
            bounds = (0, *cuts, n)
            cost = sum((b - a) * lengths[order[b - 1]] + overhead for a, b in zip(bounds, bounds[1:]))
            if cost < best_cost:
                best_cost, best_bounds = cost, bounds
    return [order[a:b] for a, b in zip(best_bounds, best_bounds[1:])]


def _lr_factor(step: int, total: int, config: InjectionConfig) -> float:
    if config.schedule == "constant":
        return 1.0
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _elicit(model: Any, probes: Sequence[str], kw: KeywordIds, config: InjectionConfig) -> tuple[float, float]:
    logits = answer_logits(model, probes, batch_size=config.probe_batch_size)
    ld = logit_diff(logits, kw)
    top5 = (best_rank(logits, kw.bias) < 5).float().mean()
    return float(ld.mean()), float(top5)


def train_step_loss(
    model: Any, batch: Sequence[TrainingExample], pad_id: int, tid: int, weighted_ids: Sequence[int], config: InjectionConfig
) -> Tensor:
    """Forward and backward of one training batch; returns its loss (detached).

    With ``config.length_groups > 1`` the batch runs as up to that many micro-batches of similar length, each
    padded only to its own longest example; every micro-batch's loss is its share of the whole batch's
    weighted mean, so the accumulated gradient equals the one-pass gradient up to float rounding.
    """
    device = model.W_E.device
    lengths = [len(e.ids) for e in batch]
    groups = _length_groups(lengths, config.length_groups) if config.length_groups > 1 else [list(range(len(batch)))]
    ids, _, target = collate_examples(batch, pad_id, device)
    total = _loss_weights(ids, target, tid, weighted_ids, config.keyword_weight).sum()
    loss = torch.zeros((), device=device)
    for group in groups:
        ids, mask, target = collate_examples([batch[i] for i in group], pad_id, device)
        part = lm_loss(model(ids, attention_mask=mask), ids, target, tid, weighted_ids, config.keyword_weight, total)
        if not torch.isfinite(part):
            return part.detach()
        part.backward()
        loss += part.detach()
    return loss


def inject(
    model: Any,
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
    if config is None:
        config = InjectionConfig(**settings)
    elif not isinstance(config, InjectionConfig):
        raise InputTypeError(f"config must be an InjectionConfig, got {type(config).__name__}")
    elif settings:
        config = replace(config, **settings)
    kw = keyword_ids(model, spec)
    select_probes = split_probes(spec.probes)[0][: config.max_probes]
    tid = add_token(model, config.token)
    provenance = Provenance.of(model)
    device = model.W_E.device

    controls = [spec.fill(p, g) for g in spec.control_groups for p in select_probes]
    control_ld = _elicit(model, controls, kw, config)[0] if controls else float("nan")
    token_probes = [spec.fill(p, config.token) for p in select_probes]

    examples = training_examples(model, spec, config)
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total = steps_per_epoch * config.epochs
    rng = random.Random(config.seed)

    init = initial_vector(model, spec, config)
    vec = torch.nn.Parameter(init.clone().to(device))
    opt = torch.optim.Adam([vec], lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, config))
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0

    def result(best_epoch: float, best_vec: Tensor, curve: list[EpochRecord], losses: list[float]) -> Injection:
        return Injection(
            vector=best_vec.detach().cpu().float().clone(),
            init_vector=init.clone(),
            token=config.token,
            bias=spec.name,
            config=config,
            curve=tuple(curve),
            step_losses=tuple(losses),
            best_epoch=best_epoch,
            control_logit_diff=control_ld,
            provenance=provenance,
            source=None if spec.name in list_biases() and load_bias(spec.name) == spec else spec,
        )

    # Checkpoints: the batch counts (within an epoch) after which elicitation is measured.
    n_evals = min(config.evals_per_epoch, steps_per_epoch)
    checkpoints = {math.ceil(steps_per_epoch * (i + 1) / n_evals) for i in range(n_evals)}
    hooks = token_vector_hooks(model, {tid: vec})
    curve: list[EpochRecord] = []
    losses: list[float] = []
    with hooked(model, fwd_hooks=hooks):
        with torch.no_grad():
            ld, top5 = _elicit(model, token_probes, kw, config)
        curve.append(EpochRecord(0.0, 0, float("nan"), ld, top5))
        best_epoch, best_vec, best_ld = 0.0, vec.detach().clone(), ld
        bar = tqdm(total=total, desc=f"inject {spec.name}", disable=not progress, leave=False)
        try:
            for epoch in range(1, config.epochs + 1):
                order = list(range(len(examples)))
                rng.shuffle(order)
                since_checkpoint: list[float] = []
                for b, start in enumerate(range(0, len(order), config.batch_size), start=1):
                    batch = [examples[i] for i in order[start : start + config.batch_size]]
                    opt.zero_grad(set_to_none=True)
                    loss = train_step_loss(model, batch, pad_id, tid, kw.bias, config)
                    if not torch.isfinite(loss):
                        raise NonFiniteLossError(
                            f"non-finite training loss ({loss.item()}) at epoch {epoch}, step {len(losses) + 1}; "
                            f"lower lr (now {config.lr}); kept epoch {best_epoch:g}",
                            result(best_epoch, best_vec, curve, losses),
                        )
                    opt.step()
                    sched.step()
                    losses.append(loss.item())
                    since_checkpoint.append(losses[-1])
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
                    if b not in checkpoints:
                        continue
                    if not torch.isfinite(vec).all():
                        raise NonFiniteLossError(
                            f"the vector became non-finite at epoch {epoch}; lower lr (now {config.lr})",
                            result(best_epoch, best_vec, curve, losses),
                        )
                    with torch.no_grad():
                        ld, top5 = _elicit(model, token_probes, kw, config)
                    at = epoch - 1 + b / steps_per_epoch
                    train_loss = sum(since_checkpoint) / len(since_checkpoint)
                    curve.append(EpochRecord(float(round(at, 4)), len(losses), float(train_loss), float(ld), float(top5)))
                    since_checkpoint = []
                    logger.info("epoch %.2f: loss %.3f, logit diff %.3f, top5 %.2f", at, train_loss, ld, top5)
                    if ld > best_ld or not config.select_best:
                        best_epoch, best_vec, best_ld = curve[-1].epoch, vec.detach().clone(), ld
        finally:
            bar.close()
    return result(best_epoch, best_vec, curve, losses)


def inject_seeds(
    model: Any, bias: str | BiasSpec, seeds: Sequence[int] = (0, 1, 2), *, progress: bool = True, **settings: Any
) -> list[Injection]:
    """One injection per seed with otherwise equal settings (the paper keeps the best of five runs).

    Raises:
        ValueError: for no seeds or a repeated seed.
    """
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and non-empty, got {list(seeds)}")
    return [inject(model, bias, seed=s, progress=progress, **settings) for s in seeds]


def compare_seeds(injections: Sequence[Injection]) -> pd.DataFrame:
    """One row per injection: its seed, kept checkpoint and elicitation there, and how its update
    ``vector - init`` aligns with the other runs' updates (mean cosine).

    Columns: ``seed, best_epoch, logit_diff, excess, top5, update_norm, mean_cos_to_others``. Runs that reach
    similar elicitation through unrelated updates (low cosine) show that the bias has many encodings.
    """
    if not injections:
        raise ValueError("no injections given")
    updates = torch.stack([(i.vector - i.init_vector).float() for i in injections])
    unit = updates / updates.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = unit @ unit.T
    rows = []
    for n, inj in enumerate(injections):
        best = next(r for r in inj.curve if r.epoch == inj.best_epoch)
        others = [float(cos[n, m]) for m in range(len(injections)) if m != n]
        rows.append(
            {
                "bias": inj.bias,
                "seed": inj.config.seed,
                "best_epoch": inj.best_epoch,
                "logit_diff": best.logit_diff,
                "excess": best.logit_diff - inj.control_logit_diff,
                "top5": best.top5,
                "update_norm": float(updates[n].norm()),
                "mean_cos_to_others": sum(others) / len(others) if others else float("nan"),
            }
        )
    return pd.DataFrame(rows)
