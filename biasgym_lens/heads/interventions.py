"""Interventions as context managers: ablate or scale attention heads, add a steering direction.

Every function here registers hooks only inside a ``with`` block; they are removed on exit, also when the body
raises. Heads are addressed per *query* head at ``blocks.L.attn.hook_z`` (``[batch, pos, n_heads, d_head]``),
so a single head can be ablated under grouped-query attention. Generation under an intervention uses
:func:`biasgym_lens.core.generation.generate` (greedy or sampled, with a KV cache that is exact under these hooks);
:func:`generate_greedy` is its greedy shortcut returning plain strings.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from biasgym_lens.core.checks import (
    InputTypeError,
    check_bool,
    check_choice,
    check_int,
    check_int_list,
    check_real,
    check_str_list,
    is_int,
)
from biasgym_lens.core.embedding import check_vector
from biasgym_lens.core.generation import generate
from biasgym_lens.core.hooks import HookSpec, decoding, hooked, position_offset
from biasgym_lens.core.protocols import Model
from biasgym_lens.core.tokens import Batch, tokenize
from biasgym_lens.core.unembed import cached_activations

__all__ = [
    "Head",
    "validate_heads",
    "first_layer",
    "heads_by_layer",
    "ablate_heads",
    "head_ablation_hooks",
    "reference_z",
    "head_means",
    "steer",
    "generate_greedy",
]

Head = tuple[int, int]
_KINDS = ("zero", "mean", "resample", "scale")


def _is_pair(pair: Any) -> bool:
    if isinstance(pair, (np.ndarray, torch.Tensor)):
        return pair.ndim == 1 and pair.shape[0] == 2
    return isinstance(pair, Sequence) and not isinstance(pair, (str, bytes)) and len(pair) == 2


def validate_heads(model: Model, heads: Sequence[Head]) -> list[Head]:
    """Check ``(layer, head)`` pairs against the model; returns them as a list of int tuples.

    A head is a pair (tuple, list or 1-d array of length 2) of integers: Python, NumPy or 0-dimensional torch
    integers. Floats (even ``2.0``), bools, strings and triples are refused, never rounded or truncated. A pair
    given twice is kept once (ablating a head twice is ablating it once), in the order first given.

    Raises:
        InputTypeError: ``heads`` is not a list of pairs, or a pair holds something other than two integers.
        ValueError: a pair out of range (the message gives the valid ranges).
    """
    L, H = model.cfg.n_layers, model.cfg.n_heads
    if isinstance(heads, (str, bytes, Mapping)) or not isinstance(heads, Iterable):
        raise InputTypeError(f"heads must be a list of (layer, head) pairs, got {heads!r}")
    out: list[Head] = []
    for pair in heads:
        if not _is_pair(pair):
            raise InputTypeError(
                f"a head must be a (layer, head) pair of integers, got {pair!r}; e.g. heads=[(21, 1), (9, 6)]"
            )
        if not (is_int(pair[0]) and is_int(pair[1])):
            raise InputTypeError(f"a head must be a (layer, head) pair of integers, got {pair!r}")
        layer, head = int(pair[0]), int(pair[1])
        if not (0 <= layer < L and 0 <= head < H):
            raise ValueError(f"head {pair!r} is out of range: layers 0..{L - 1}, heads 0..{H - 1}")
        if (layer, head) not in out:
            out.append((layer, head))
    return out


@torch.no_grad()
def reference_z(model: Model, reference: Sequence[str] | Batch, layers: Sequence[int]) -> dict[int, Tensor]:
    """``hook_z`` of a reference set at its real positions: layer -> ``[n_real_positions, n_heads, d_head]``.

    Raises:
        ValueError: for an empty reference set.
    """
    if isinstance(reference, Batch):
        batch = reference
    else:
        if not isinstance(reference, (str, bytes)) and isinstance(reference, Sequence) and len(reference) == 0:
            raise ValueError(f"the reference set for mean/resample ablation is empty (got {reference!r})")
        batch = tokenize(model, check_str_list(reference, "reference"))
    names = {f"blocks.{layer}.attn.hook_z" for layer in layers}
    cache = cached_activations(model, batch.input_ids, batch.attention_mask, names)
    real = batch.attention_mask.bool()
    return {layer: cache[f"blocks.{layer}.attn.hook_z"][real].float() for layer in layers}


def head_means(model: Model, reference: Sequence[str] | Batch) -> dict[int, Tensor]:
    """Each head's mean output (``hook_z``) over the reference set's real positions: layer -> ``[n_heads, d_head]``."""
    return {layer: z.mean(0) for layer, z in reference_z(model, reference, range(model.cfg.n_layers)).items()}


def head_ablation_hooks(
    model: Model,
    heads: Sequence[Head],
    *,
    kind: str = "zero",
    scale: float = 0.0,
    reference: Sequence[str] | Batch | Mapping[int, Tensor] | None = None,
    seed: int = 0,
    rows: Sequence[int] | None = None,
) -> list[HookSpec]:
    """The hooks behind :func:`ablate_heads` (one per affected layer), for use with ``run_with_hooks``."""
    check_choice(kind, "kind", _KINDS)
    scale = check_real(scale, "scale")
    seed = check_int(seed, "seed")
    if rows is not None:
        rows = check_int_list(rows, "rows", minimum=0)
    by_layer = heads_by_layer(validate_heads(model, heads))
    ref, means = _reference_outputs(model, kind, reference, list(by_layer))
    gen = torch.Generator().manual_seed(seed)
    return [
        (f"blocks.{layer}.attn.hook_z", _ablation_hook(layer, hs, kind, scale, means, ref, gen, rows))
        for layer, hs in by_layer.items()
    ]


def heads_by_layer(heads: Sequence[Head]) -> dict[int, list[int]]:
    """Layer -> its heads (each once, a repeated head dropped), layers in the order first met."""
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, head in heads:
        if head not in by_layer[layer]:
            by_layer[layer].append(head)
    return by_layer


def _reference_outputs(
    model: Model, kind: str, reference: Sequence[str] | Batch | Mapping[int, Tensor] | None, layers: list[int]
) -> tuple[dict[int, Tensor], Mapping[int, Tensor]]:
    """What mean and resample ablation replace a head's output with: the reference ``hook_z`` of each layer
    (computed from texts or a Batch) and each head's mean of it (or the precomputed means); empty otherwise.

    Raises:
        ValueError: no reference, precomputed means for another kind than ``"mean"``, or lacking a layer.
    """
    if kind not in ("mean", "resample"):
        return {}, {}
    if reference is None:
        raise ValueError(f"kind={kind!r} needs a reference set (texts or a Batch)")
    if isinstance(reference, Mapping):
        if kind != "mean":
            raise ValueError("precomputed head means (a mapping) only serve kind='mean'")
        missing = sorted(set(layers) - set(reference))
        if missing:
            raise ValueError(f"the precomputed head means lack layers {missing}")
        return {}, reference
    ref = reference_z(model, reference, sorted(layers))
    return ref, {layer: z.mean(0) for layer, z in ref.items()}


def _ablation_hook(
    layer: int, heads: list[int], kind: str, scale: float, means: Mapping[int, Tensor], ref: Mapping[int, Tensor],
    gen: torch.Generator, rows: Sequence[int] | None,
) -> Callable[[Tensor, Any], Tensor]:
    """The ``hook_z`` hook of one layer: its ``heads`` ablated the ``kind`` way (in ``rows`` only, if given)."""
    idx = torch.tensor(heads, dtype=torch.long)

    def hook(z: Tensor, hook: Any) -> Tensor:
        original = z
        z = z.clone()
        i = idx.to(z.device)
        if kind == "zero":
            z[:, :, i] = 0.0
        elif kind == "scale":
            z[:, :, i] = z[:, :, i] * scale
        elif kind == "mean":
            z[:, :, i] = means[layer][i].to(z.device, z.dtype)
        else:  # resample: each (row, position) takes the head output of a random reference position
            pick = torch.randint(0, ref[layer].shape[0], z.shape[:2], generator=gen)
            z[:, :, i] = ref[layer][pick][:, :, i].to(z.dtype)
        if rows is not None:  # only these batch rows are ablated; the others keep their output
            if max(rows) >= z.shape[0]:
                raise ValueError(f"ablation rows {list(rows)} out of range for a batch of {z.shape[0]}")
            on = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
            on[torch.as_tensor(list(rows), device=z.device)] = True
            z = torch.where(on[:, None, None, None], z, original)
        return z

    return hook


def first_layer(heads: Sequence[Head]) -> int:
    """The lowest layer among ``heads``: an ablation of them leaves every earlier layer unchanged."""
    if not heads:
        raise ValueError("no heads given")
    return min(int(layer) for layer, _ in heads)


@contextlib.contextmanager
def ablate_heads(
    model: Model,
    heads: Sequence[Head],
    kind: str = "zero",
    scale: float = 0.0,
    *,
    reference: Sequence[str] | Batch | Mapping[int, Tensor] | None = None,
    seed: int = 0,
    rows: Sequence[int] | None = None,
) -> Iterator[Any]:
    """Within the block, the given heads are ablated (or scaled) in every forward pass.

    Args:
        model: A bridge.
        heads: ``(layer, head)`` pairs (query heads).
        kind: ``"zero"`` (output 0), ``"mean"`` (mean output over the reference set's real positions),
            ``"resample"`` (the output at a random reference position, seeded), or ``"scale"`` (output times
            ``scale``; the paper's steering, ``scale=0`` is zero ablation).
        scale: Factor for ``kind="scale"``.
        reference: Texts or a Batch for mean/resample ablation (e.g. neutral text or control-group probes), or
            for ``kind="mean"`` the means already computed: layer -> ``[n_heads, d_head]`` (see
            :func:`head_means`), so repeated ablations do not rerun the reference set.
        seed: Seed of the resampling.
        rows: Ablate only in these rows of each batch (e.g. one variant of a batched generation); default all.

    Yields:
        The model.

    Raises:
        ValueError: unknown kind, heads out of range, missing or empty reference set.

    Examples:
        >>> with ablate_heads(model, [(21, 1), (9, 6)]):        # doctest: +SKIP
        ...     logits = model(batch.input_ids, attention_mask=batch.attention_mask)
    """
    hooks = head_ablation_hooks(model, heads, kind=kind, scale=scale, reference=reference, seed=seed, rows=rows)
    with hooked(model, fwd_hooks=hooks):
        yield model


@contextlib.contextmanager
def steer(
    model: Model,
    vector: Float[Tensor, " d_model"],
    layers: int | Sequence[int],
    alpha: float = 1.0,
    *,
    positions: Sequence[int] | None = None,
) -> Iterator[Any]:
    """Within the block, add ``alpha * vector`` to the residual stream after each of ``layers``.

    Args:
        model: A bridge.
        vector: ``[d_model]`` direction (e.g. from :func:`biasgym_lens.heads.steering.bias_direction`); negative
            ``alpha`` subtracts it.
        layers: Layer index or indices (each once); the vector is added at ``blocks.L.hook_resid_post``.
        alpha: Multiplier, a finite number.
        positions: Absolute positions to steer, non-negative integers (default: all positions): columns of the
            token tensor, counted from the first cached position during a KV-cached generation step (see
            :func:`biasgym_lens.core.hooks.position_offset`); in a left-padded batch the padding counts. A forward
            pass outside a generation on a sequence too short to hold one of them raises ``ValueError``
            (nothing is skipped silently); a generation steers each position once it is reached.

    Raises:
        InputTypeError: a vector that is not a tensor, a non-integer layer or position, a non-number alpha.
        ValueError: wrong vector size, layer out of range or repeated, non-finite vector or alpha, negative or
            repeated positions, or (in the forward pass) a position beyond the sequence.
    """
    check_vector(model, vector, "steering vector")
    alpha = check_real(alpha, "alpha")
    last = model.cfg.n_layers - 1
    if is_int(layers):
        layer_list = [check_int(layers, "layers", minimum=0, maximum=last)]
    else:
        layer_list = check_int_list(layers, "layers", minimum=0, maximum=last, unique=True)
    pos = None
    if positions is not None:
        pos = torch.tensor(check_int_list(positions, "positions", minimum=0, unique=True), dtype=torch.long)

    def hook(x: Tensor, hook: Any) -> Tensor:
        v = (alpha * vector).to(device=x.device, dtype=x.dtype)
        if pos is None:
            return x + v
        if not decoding(model) and int(pos.max()) >= x.shape[1]:
            raise ValueError(
                f"steering positions {pos.tolist()} include {int(pos.max())}, beyond this sequence of "
                f"{x.shape[1]} tokens (positions 0..{x.shape[1] - 1})"
            )
        local = pos - position_offset(model)  # a cached generation step sees only the new positions
        keep = local[(local >= 0) & (local < x.shape[1])].to(x.device)
        if keep.numel() == 0:
            return x
        x = x.clone()
        x[:, keep] = x[:, keep] + v
        return x

    with hooked(model, fwd_hooks=[(f"blocks.{layer}.hook_resid_post", hook) for layer in layer_list]):
        yield model


def generate_greedy(
    model: Model,
    text: str | Sequence[str],
    max_new_tokens: int = 40,
    *,
    prepend_bos: bool | None = None,
    stop_at_eos: bool = True,
    use_cache: bool = True,
) -> Any:
    """Greedy continuation of ``text`` under the hooks in place: :func:`biasgym_lens.core.generation.generate` with
    ``temperature=0``, returning strings.

    Several texts (any lengths) run as one left-padded batch; with ``ablate_heads(..., rows=...)`` each row can
    carry its own intervention. The KV cache is exact under the package's hooks; ``use_cache=False`` runs one
    full forward pass per new token.

    Returns:
        The generated continuation only (special tokens removed); a list of them for a list of texts.

    Raises:
        InputTypeError: ``max_new_tokens`` not an integer, ``text`` not a string or list of strings.
        ValueError: ``max_new_tokens < 1``, no texts, an empty text, or a prompt whose length plus
            ``max_new_tokens`` exceeds the model's context (``cfg.n_ctx``).
    """
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens", minimum=1)
    stop_at_eos = check_bool(stop_at_eos, "stop_at_eos")
    texts = [text] if isinstance(text, str) else check_str_list(text, "text", nonempty=False, blank_ok=True)
    if not texts:
        raise ValueError("no texts to continue (empty list)")
    res = generate(
        model, texts, max_new_tokens, stop_at_eos=stop_at_eos, use_cache=use_cache, prepend_bos=prepend_bos
    )
    return res.texts[0] if isinstance(text, str) else list(res.texts)
