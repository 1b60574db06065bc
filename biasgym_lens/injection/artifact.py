"""The result of BiasInject: the :class:`Injection` artifact (a trained vector, its training curve and provenance).

An injection is applied to a model through hooks (:meth:`Injection.apply`, :meth:`Injection.apply_permanently`),
so every model weight stays bit-identical; it is saved to and loaded from an atomic, checksummed folder
(``injection.safetensors`` and ``injection.json``, see :mod:`biasgym_lens.core.artifacts`).

Examples:
    >>> from biasgym_lens.injection.artifact import Injection
    >>> inj = Injection.load("runs/late", model)                # doctest: +SKIP
    >>> with inj.apply(model):                                  # doctest: +SKIP
    ...     ...  # "<BiasToken>" now carries the bias
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
from jaxtyping import Float
from safetensors.torch import save_file
from torch import Tensor

from biasgym_lens.core.artifacts import load_tensors, open_artifact, reading, save_artifact
from biasgym_lens.core.embedding import add_token, check_vector, token_vector_hooks, with_token_vectors
from biasgym_lens.core.files import nan_floats, none_to_nan, require
from biasgym_lens.core.protocols import Model
from biasgym_lens.core.provenance import Provenance, check_same_model
from biasgym_lens.injection.catalogue import catalogue_bias
from biasgym_lens.injection.config import InjectionConfig, check_token
from biasgym_lens.injection.spec import BiasSpec, validate_bias_dict

__all__ = ["EpochRecord", "Injection"]

_FORMAT = 1
_META_KEYS = ("token", "bias", "config", "curve", "step_losses", "best_epoch", "control_logit_diff", "provenance")


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
    def check_model(self, model: Model) -> None:
        """Raise ``ValueError`` if ``model`` is not the model this vector was trained in."""
        check_same_model(self.provenance, model, f"injection {self.bias!r}")

    @contextlib.contextmanager
    def apply(self, model: Model) -> Iterator[int]:
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

    def apply_permanently(self, model: Model) -> int:
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
        return replace(self, token=check_token(token, "token"))

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

