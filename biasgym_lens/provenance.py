"""What produced a result: model identity (with a fingerprint of its embedding), package versions, time.

Saved artifacts carry a :class:`Provenance`; loading an artifact into a different model is refused by
comparing fingerprints.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from biasgym_lens._version import __version__
from biasgym_lens.models import model_info

__all__ = ["Provenance", "fingerprint", "package_versions", "atomic_dir", "check_same_model", "read_artifact", "write_text_atomic"]

_PACKAGES = ("torch", "transformers", "transformer-lens", "biasgym-lens")


def fingerprint(model: Any) -> str:
    """SHA-256 (first 16 hex digits) of the embedding matrix and the model's shape.

    Two models with the same fingerprint have the same vocabulary embeddings and dimensions; it is cheap
    (one pass over ``W_E``) and independent of device and of raw/compatibility mode.
    """
    live = model.W_E
    key = (live.data_ptr(), live._version, tuple(live.shape))
    cached = getattr(model, "_biasgym_fingerprint", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    W = live.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256()
    h.update(f"{model.cfg.n_layers}/{model.cfg.n_heads}/{model.cfg.d_model}/{tuple(W.shape)}".encode())
    h.update(W.numpy().tobytes())
    fp = h.hexdigest()[:16]
    object.__setattr__(model, "_biasgym_fingerprint", (key, fp))  # recomputed if W_E is replaced or edited
    return fp


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

    @classmethod
    def of(cls, model: Any) -> Provenance:
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
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Provenance:
        return cls(**d)


def check_same_model(prov: Provenance, model: Any, what: str) -> None:
    """Raise a clear error when ``model`` is not the model ``prov`` was made with.

    Raises:
        ValueError: naming both models and their fingerprints.
    """
    fp = fingerprint(model)
    if fp != prov.fingerprint or int(model.cfg.d_model) != prov.d_model:
        other = model_info(model)
        raise ValueError(
            f"{what} was made with model {prov.model_name!r} (fingerprint {prov.fingerprint}, d_model "
            f"{prov.d_model}); this model is {other.name!r} (fingerprint {fp}, d_model {model.cfg.d_model}). "
            "Load the model it was made with."
        )


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write a text file through a temporary sibling and a rename, so readers never see half a file."""
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(final)
    return final


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Write a folder atomically: yields a temporary sibling folder that replaces ``path`` on success.

    On an exception the temporary folder is removed and an existing ``path`` is left untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_artifact(
    path: str | os.PathLike[str], kind: str, meta_file: str, *, files: tuple[str, ...] = (), version: int
) -> tuple[Path, dict[str, Any]]:
    """Open a folder written by a result's ``save()``: check its files, read its JSON, check its format.

    Args:
        path: The folder.
        kind: What it holds, for messages (``"injection"``, ``"scope"``, ...).
        meta_file: The JSON file with the metadata (it carries ``"format"``).
        files: Other files that must be there.
        version: The format this version of the package reads.

    Returns:
        ``(folder, metadata)``.

    Raises:
        FileNotFoundError: a file is missing (not such a folder).
        ValueError: another format.
    """
    folder = Path(path)
    article = "an" if kind[0] in "aeiou" else "a"
    for name in (meta_file, *files):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: not {article} {kind} folder written by save()")
    meta = json.loads((folder / meta_file).read_text())
    if meta.get("format") != version:
        raise ValueError(f"{folder}: {kind} format {meta.get('format')!r}, this version reads {version}")
    return folder, meta
