"""What produced a result: model identity (with a fingerprint of its embedding), package versions, time.

Saved artifacts carry a :class:`Provenance`; loading an artifact into a different model is refused by
comparing fingerprints. The same weights in another precision (an injection trained on the float32 model used
on the bfloat16 one) have another exact fingerprint; they are recognised by a *sketch* of the embedding (the
norms of 16 slices of ``W_E``, equal to a few parts in a thousand across float32/bfloat16/float16) and accepted
with a warning that names the change.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from biasgym_lens._version import __version__
from biasgym_lens.core.models import model_info
from biasgym_lens.core.protocols import Model

__all__ = ["Provenance", "ModelMismatchError", "fingerprint", "weights_sketch", "package_versions", "check_same_model"]

_PACKAGES = ("torch", "transformers", "transformer-lens", "biasgym-lens")
_SKETCH_SLICES = 16
SKETCH_RTOL = 5e-3
"""Relative tolerance of :func:`weights_sketch` when the model's dtype differs from the artifact's."""


def _embedding_summary(model: Model, name: str, compute: Any) -> Any:
    """``compute(W_E)`` cached on the model until ``W_E`` is replaced or edited in place."""
    live = model.W_E
    key = (live.data_ptr(), live._version, tuple(live.shape))
    cache = getattr(model, "_biasgym_embedding_summaries", None)
    if cache is None or cache[0] != key:
        cache = (key, {})
        object.__setattr__(model, "_biasgym_embedding_summaries", cache)
    if name not in cache[1]:
        cache[1][name] = compute(live.detach())
    return cache[1][name]


def fingerprint(model: Model) -> str:
    """SHA-256 (first 16 hex digits) of the embedding matrix and the model's shape.

    Two models with the same fingerprint have the same vocabulary embeddings and dimensions; it is cheap
    (one pass over ``W_E``, cached until ``W_E`` changes) and independent of device and of raw/compatibility mode.
    """

    def digest(live: torch.Tensor) -> str:
        W = live.to("cpu", torch.float32).contiguous()
        h = hashlib.sha256()
        h.update(f"{model.cfg.n_layers}/{model.cfg.n_heads}/{model.cfg.d_model}/{tuple(W.shape)}".encode())
        h.update(W.numpy().tobytes())
        return h.hexdigest()[:16]

    return _embedding_summary(model, "fingerprint", digest)


def weights_sketch(model: Model) -> tuple[float, ...]:
    """Norms of ``W_E`` in 16 contiguous slices of its rows (float64): a precision-tolerant identity of the
    embedding, for recognising the same weights loaded in another dtype (cached like :func:`fingerprint`)."""

    def norms(W: torch.Tensor) -> tuple[float, ...]:
        return tuple(float(part.to("cpu", torch.float64).norm()) for part in torch.tensor_split(W, _SKETCH_SLICES, dim=0))

    return _embedding_summary(model, "sketch", norms)


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that determine the numbers."""
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = __version__ if name == "biasgym-lens" else "not installed"
    return out


@dataclass(frozen=True)
class Provenance:
    """Identity of the model and software that produced a result.

    Attributes:
        model_name: Name given to ``load_model`` (or the bridge's own name).
        official_name: Hugging Face id of the weights, when known.
        fingerprint: :func:`fingerprint` of the model.
        d_model, n_layers, n_heads: The model's shape.
        weights: ``"raw"`` or ``"compat"`` (TransformerLens compatibility mode: folded/centred weights).
        versions: Package versions.
        created: UTC time stamp.
        dtype: The weights' dtype (``"float32"``, ``"bfloat16"``, ...).
        sketch: :func:`weights_sketch` of the model.
    """

    model_name: str
    official_name: str
    fingerprint: str
    d_model: int
    n_layers: int
    n_heads: int
    weights: str
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    dtype: str = ""
    sketch: tuple[float, ...] = ()

    @classmethod
    def of(cls, model: Model) -> Provenance:
        info = model_info(model)
        return cls(
            model_name=info.name,
            official_name=info.official_name,
            fingerprint=fingerprint(model),
            d_model=int(model.cfg.d_model),
            n_layers=int(model.cfg.n_layers),
            n_heads=int(model.cfg.n_heads),
            weights="compat" if getattr(model, "_weights_processed", False) else "raw",
            versions=package_versions(),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            dtype=str(model.W_E.dtype).removeprefix("torch."),
            sketch=weights_sketch(model),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Provenance:
        return cls(**{**d, "sketch": tuple(d.get("sketch", ()))})


class ModelMismatchError(ValueError):
    """An artifact is used with a model other than the one it was made with."""


def check_same_model(prov: Provenance, model: Model, what: str) -> None:
    """Raise a clear error when ``model`` is not the model ``prov`` was made with.

    Raises:
        ModelMismatchError: naming both models and their fingerprints.
    """
    fp = fingerprint(model)
    if fp == prov.fingerprint and int(model.cfg.d_model) == prov.d_model:
        return
    dtype = str(model.W_E.dtype).removeprefix("torch.")
    if prov.sketch and dtype != prov.dtype and _same_weights_other_precision(prov, model):
        warnings.warn(
            f"{what} was made with the {prov.dtype} weights of {prov.model_name!r}; this model holds them in "
            f"{dtype}: numbers will differ by rounding",
            stacklevel=3,
        )
        return
    other = model_info(model)
    raise ModelMismatchError(
        f"{what} was made with model {prov.model_name!r} (fingerprint {prov.fingerprint}, d_model "
        f"{prov.d_model}); this model is {other.name!r} (fingerprint {fp}, d_model {model.cfg.d_model}). "
        "Load the model it was made with."
    )


def _same_weights_other_precision(prov: Provenance, model: Model) -> bool:
    shape = (int(model.cfg.d_model), int(model.cfg.n_layers), int(model.cfg.n_heads))
    if shape != (prov.d_model, prov.n_layers, prov.n_heads):
        return False
    mine = weights_sketch(model)
    return len(mine) == len(prov.sketch) and all(
        abs(a - b) <= SKETCH_RTOL * max(abs(b), 1e-12) for a, b in zip(mine, prov.sketch)
    )
