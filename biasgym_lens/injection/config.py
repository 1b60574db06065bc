"""The settings of one injection run (:class:`InjectionConfig`) and their validation.

Every setting is checked when the config is made, so a bad value fails before any model work; all of them are
recorded in the saved :class:`~biasgym_lens.injection.artifact.Injection`.

Examples:
    >>> from biasgym_lens.injection.config import InjectionConfig
    >>> InjectionConfig(epochs=3, lr=1e-2).epochs
    3
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from biasgym_lens.core.checks import InputTypeError, check_bool, check_choice, check_int, check_real

__all__ = ["InjectionConfig", "check_token"]


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


def check_token(value: Any, name: str) -> str:
    """Return ``value`` if it can be a fresh token's string: a non-empty string without whitespace.

    Args:
        value: The candidate token string.
        name: The setting's name, for the error message.

    Raises:
        InputTypeError: ``value`` is not a string.
        ValueError: ``value`` is empty or contains whitespace.
    """
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
    "token": check_token,
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
