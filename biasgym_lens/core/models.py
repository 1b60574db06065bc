"""Load hooked TransformerLens models: the bundled offline models, Hub ids and local folders.

Every loader returns a :class:`transformer_lens.model_bridge.TransformerBridge` (TransformerLens 4.x has no
``HookedTransformer``) in raw-weight mode, with its tokenizer attached and these conventions fixed:

* ``cfg.default_prepend_bos`` follows what the model's own tokenizer does (SmolLM2-Instruct: no BOS;
  Gemma: ``<bos>``), so ``biasgym_lens.core.tokens.tokenize`` gives exactly the ids Hugging Face would.
* the tokenizer pads on the right; every forward pass in this package passes an explicit attention mask.
* ``hf_model.config.architectures`` is set, so TransformerLens picks the right adapter.

The bundled models, their GGUF conversion and their verified cache are in :mod:`biasgym_lens.core.bundled_models`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from biasgym_lens.core.bundled_models import BUNDLED_MODELS, ModelLoadError, bundled_folder
from biasgym_lens.core.protocols import Model

__all__ = [
    "LoadInfo",
    "load_model",
    "load_hf",
    "model_info",
    "resolve_device",
    "resolve_dtype",
]

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
        return "bundled", str(bundled_folder(m)), m.official_name
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


def model_info(model: Model) -> LoadInfo:
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
