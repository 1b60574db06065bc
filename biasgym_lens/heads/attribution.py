"""Score every attention head four ways: direct logit attribution, attention to the token, attribution
patching, and exact ablation.

All scores have one sign convention: **a head's contribution to the metric** (positive = the head pushes the
bias up). For ablation that is ``metric(clean) - metric(head ablated)``; attribution patching estimates the
same number from one forward and one backward pass. The metric (see :mod:`biasgym_lens.heads.probes`) is the bias
logit difference of the token probes (``"token"``) or its excess over the control groups (``"excess"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from biasgym_lens.core.artifacts import load_tensors, open_artifact, reading, save_artifact
from biasgym_lens.core.checks import (
    InputTypeError,
    check_bool,
    check_choice,
    check_int,
    check_str_list,
    is_int,
)
from biasgym_lens.core.files import ArtifactError, require
from biasgym_lens.core.hooks import hooked
from biasgym_lens.core.provenance import Provenance
from biasgym_lens.core.unembed import logits_at, resumed_forward, suffix_supported, unembed_at
from biasgym_lens.heads.probes import METRICS, ProbeSet

__all__ = [
    "HeadScores",
    "METHODS",
    "score_heads",
    "dla_scores",
    "attention_scores",
    "attribution_scores",
    "ablation_scores",
    "suffix_answer_logits",
    "suffix_supported",
    "final_norm_direction",
    "final_norm_kind",
    "z_and_grads",
    "residual_components",
    "component_hook_names",
    "has_post_norms",
    "spearman",
]

METHODS = ("dla", "attention", "attribution", "ablation")
_FORMAT = 1


def spearman(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Spearman rank correlation of two equally shaped arrays (flattened; average ranks for ties)."""
    x = pd.Series(np.asarray(a, dtype=np.float64).ravel())
    y = pd.Series(np.asarray(b, dtype=np.float64).ravel())
    if len(x) != len(y):
        raise ValueError(f"shapes differ: {len(x)} vs {len(y)} values")
    return float(x.rank().corr(y.rank()))


@dataclass(frozen=True, eq=False)
class HeadScores:
    """Scores of every attention head.

    Attributes:
        per_prompt: ``[n_prompts, n_layers, n_heads]`` scores on each probe.
        method: One of :data:`METHODS`.
        metric: ``"excess"`` or ``"token"`` (``"attention"`` for the attention method).
        ablation: What a head is replaced with (``"zero"``, ``"counterfactual"``) or ``"none"``.
        bias: The bias name.
        provenance: The model that produced it.
        settings: Extra settings (probe split, number of probes, ...).
    """

    per_prompt: Float[Tensor, "prompt n_layers n_heads"]
    method: str
    metric: str
    ablation: str
    bias: str
    provenance: Provenance
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def scores(self) -> Float[Tensor, "n_layers n_heads"]:
        """Mean over prompts."""
        return self.per_prompt.mean(0)

    @property
    def n_layers(self) -> int:
        return int(self.per_prompt.shape[1])

    @property
    def n_heads(self) -> int:
        return int(self.per_prompt.shape[2])

    def top(self, k: int, *, absolute: bool = False) -> list[tuple[int, int]]:
        """The ``k`` heads with the largest score (or largest ``|score|``), as ``(layer, head)``.

        Raises:
            InputTypeError: ``k`` is not an integer (``2.0``, ``"5"`` and ``True`` are refused).
            ValueError: if ``k`` is not between 1 and the number of heads.
        """
        n = self.n_layers * self.n_heads
        if not is_int(k):
            raise InputTypeError(
                f"k must be an integer between 1 and the number of heads ({n}), got {k!r} ({type(k).__name__})"
            )
        if not 1 <= int(k) <= n:
            raise ValueError(f"k must be between 1 and the number of heads ({n}), got {k}")
        k = int(k)
        absolute = check_bool(absolute, "absolute")
        s = self.scores.abs() if absolute else self.scores
        idx = torch.argsort(s.flatten(), descending=True, stable=True)[:k]
        return [(int(i) // self.n_heads, int(i) % self.n_heads) for i in idx]

    def agreement(self, other: HeadScores) -> float:
        """Spearman rank correlation with another method's scores over all heads."""
        if self.scores.shape != other.scores.shape:
            raise ValueError(f"score shapes differ: {tuple(self.scores.shape)} vs {tuple(other.scores.shape)}")
        return spearman(self.scores, other.scores)

    def top_overlap(self, other: HeadScores, k: int = 10) -> int:
        """How many of this method's top ``k`` heads are in the other's top ``k`` (k capped at the head count)."""
        k = min(check_int(k, "k", minimum=1), self.n_layers * self.n_heads)
        return len(set(self.top(k)) & set(other.top(k)))

    def to_dataframe(self) -> pd.DataFrame:
        """Long format: one row per head with ``layer, head, score, score_sem, rank, method, metric, bias``."""
        s = self.scores
        n = self.per_prompt.shape[0]
        sem = self.per_prompt.std(0) / n**0.5 if n > 1 else torch.full_like(s, float("nan"))
        order = torch.argsort(s.flatten(), descending=True, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(1, len(order) + 1)
        layer, head = np.divmod(np.arange(s.numel()), self.n_heads)
        return pd.DataFrame(
            {
                "layer": layer,
                "head": head,
                "score": s.flatten().numpy(),
                "score_sem": sem.flatten().numpy(),
                "rank": rank.numpy(),
                "method": self.method,
                "metric": self.metric,
                "ablation": self.ablation,
                "bias": self.bias,
            }
        )

    def save(self, path: str | Path) -> Path:
        """Write ``scores.safetensors`` and ``scores.json`` into folder ``path`` atomically (see
        :mod:`biasgym_lens.core.artifacts`: only new paths, empty folders and earlier head scores are replaced)."""
        meta = {
            "format": _FORMAT,
            "method": self.method,
            "metric": self.metric,
            "ablation": self.ablation,
            "bias": self.bias,
            "provenance": self.provenance.to_dict(),
            "settings": self.settings,
        }

        def write(folder: Path) -> dict[str, Any]:
            save_file({"per_prompt": self.per_prompt.detach().cpu().contiguous()}, str(folder / "scores.safetensors"))
            return meta

        return save_artifact(path, "head-scores", "scores.json", write, legacy=("scores.safetensors",))

    @classmethod
    def load(cls, path: str | Path) -> HeadScores:
        """Read head scores saved with :meth:`save` (checksums, shape and finiteness checked).

        Raises:
            ArtifactError: missing, damaged or malformed files (naming the file).
        """
        folder, meta = open_artifact(path, "head-scores", "scores.json", version=_FORMAT)
        where = folder / "scores.json"
        with reading(where, "head-score metadata"):
            require(meta, ("method", "metric", "ablation", "bias", "provenance", "settings"), where)
            prov = Provenance.from_dict(meta["provenance"])
            per_prompt = load_tensors(folder / "scores.safetensors", {"per_prompt": None})["per_prompt"]
            if per_prompt.ndim != 3 or tuple(per_prompt.shape[1:]) != (prov.n_layers, prov.n_heads):
                raise ArtifactError(
                    folder / "scores.safetensors",
                    f"per_prompt has shape {tuple(per_prompt.shape)}, expected (n_probes, {prov.n_layers}, {prov.n_heads})",
                )
            return cls(
                per_prompt=per_prompt, method=str(meta["method"]), metric=str(meta["metric"]),
                ablation=meta["ablation"], bias=str(meta["bias"]), provenance=prov, settings=dict(meta["settings"]),
            )

    def with_scores(self, per_prompt: Tensor, **changes: Any) -> HeadScores:
        """A copy with other scores (e.g. a specificity-adjusted combination)."""
        return replace(self, per_prompt=per_prompt, **changes)


# --------------------------------------------------------------------------------------------- helpers


def _combine(per_row: Tensor, ps: ProbeSet, metric: str) -> Tensor:
    """Per-row values ``[rows, ...]`` -> per-probe metric values ``[n_probes, ...]`` (token minus controls)."""
    n = ps.n_probes
    token = per_row[:n]
    if metric == "token" or not ps.controls:
        return token
    ctrl = per_row[n:].reshape(len(ps.controls), n, *per_row.shape[1:]).mean(0)
    return token - ctrl


def final_norm_kind(model: Any) -> str:
    """``"rms"`` for an RMSNorm model, ``"ln"`` for LayerNorm (from ``cfg.normalization_type``)."""
    nt = str(getattr(model.cfg, "normalization_type", "LN") or "LN").upper()
    return "rms" if nt.startswith("RMS") else "ln"


def _norm_gain(model: Any, norm: Any) -> Tensor | None:
    comp = getattr(norm, "original_component", None)
    w = getattr(comp, "weight", None)
    if w is None:
        return None
    w = w.detach().float()
    return 1.0 + w if getattr(model.cfg, "rmsnorm_uses_offset", False) else w


def final_norm_direction(model: Any, ps: ProbeSet) -> tuple[Tensor, Tensor]:
    """Direction ``u`` with ``logit_diff = (P x / scale) . u + const`` for the final residual ``x``.

    ``P`` centres for LayerNorm (identity for RMSNorm). In raw mode the final norm's gain is folded into ``u``;
    in compatibility mode TransformerLens has already folded it into ``W_U``.

    Returns:
        ``(u, const)``: ``[d_model]`` direction (already centred for LayerNorm) and the constant term (final-norm
        bias and unembedding bias).
    """
    W_U = model.W_U.detach().float()
    b, c = ps.keywords.tensors(W_U.device)
    d = W_U[:, b].mean(-1) - W_U[:, c].mean(-1)
    const = torch.zeros((), device=W_U.device)
    b_U = getattr(model, "b_U", None)
    if b_U is not None:
        const = const + b_U.detach().float()[b].mean() - b_U.detach().float()[c].mean()
    if not getattr(model, "_weights_processed", False):
        g = _norm_gain(model, model.ln_final)
        beta = getattr(getattr(model.ln_final, "original_component", None), "bias", None)
        if beta is not None:
            const = const + beta.detach().float() @ d
        if g is not None:
            d = d * g
    if final_norm_kind(model) == "ln":
        d = d - d.mean()
    return d, const


def has_post_norms(model: Any) -> bool:
    """Whether attention outputs are normalised again before entering the residual stream (Gemma 2/3)."""
    return any(hasattr(block, "ln1_post") for block in model.blocks)


def component_hook_names(model: Any) -> set[str]:
    """The cache entries :func:`residual_components` and :func:`dla_scores` read."""
    names = {"hook_embed", "hook_pos_embed", "ln_final.hook_in", "ln_final.hook_scale"}
    for layer in range(model.cfg.n_layers):
        names |= {f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.mlp.hook_out"}
        if has_post_norms(model):
            names |= {f"blocks.{layer}.ln1_post.hook_scale", f"blocks.{layer}.ln2_post.hook_out"}
    return names


def _head_gain(model: Any, cache: Any, layer: int, rows: Tensor, pos: Tensor) -> Tensor | None:
    """``[rows, d_model]`` factor that maps a head's ``z @ W_O`` to its share of the residual stream.

    ``None`` for pre-norm blocks. With a post-attention RMSNorm the attention output ``a = sum_h a_h`` enters
    as ``g * a / s(a)``; holding the cached scale ``s`` fixed, head ``h`` contributes ``g * a_h / s``, and
    these shares sum exactly to the normalised output (the attention output has no bias in these models).
    """
    if not has_post_norms(model):
        return None
    norm = model.blocks[layer].ln1_post
    g = _norm_gain(model, norm)
    s = cache[f"blocks.{layer}.ln1_post.hook_scale"][rows, pos].float()  # [rows, 1]
    return (g[None, :] if g is not None else 1.0) / s


def residual_components(model: Any, cache: Any, rows: Tensor, pos: Tensor) -> dict[str, Tensor]:
    """Every additive piece of the final residual stream at ``(rows, pos)``: ``[rows, d_model]`` each.

    Keys: ``embed``, ``pos_embed`` (learned positions only), ``L{l}H{h}`` for each head (``hook_z @ W_O``),
    ``b_O{l}`` (attention output bias), ``mlp{l}``. Their sum equals ``ln_final.hook_in``. In post-norm
    blocks (Gemma 2/3) a head's piece is its share of the normalised attention output, with the cached norm
    scale held fixed (see :func:`_head_gain`), and ``mlp{l}`` is the normalised MLP output. ``cache`` needs
    :func:`component_hook_names`.
    """
    out = {"embed": cache["hook_embed"][rows, pos].float()}
    if "hook_pos_embed" in cache:
        out["pos_embed"] = cache["hook_pos_embed"][rows, pos].float()
    W_O = model.W_O.detach().float()
    post = has_post_norms(model)
    for layer in range(model.cfg.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"][rows, pos].float()
        heads = torch.einsum("bhd,hdm->bhm", z, W_O[layer])
        gain = _head_gain(model, cache, layer, rows, pos)
        if gain is not None:
            heads = heads * gain[:, None, :]
        for h in range(model.cfg.n_heads):
            out[f"L{layer}H{h}"] = heads[:, h]
        attn_b = getattr(model.blocks[layer].attn, "b_O", None)
        if attn_b is not None:
            if post and bool((attn_b != 0).any()):
                raise NotImplementedError("post-norm blocks with an attention output bias are not supported")
            out[f"b_O{layer}"] = attn_b.detach().float().expand_as(heads[:, 0])
        mlp = f"blocks.{layer}.ln2_post.hook_out" if post else f"blocks.{layer}.mlp.hook_out"
        out[f"mlp{layer}"] = cache[mlp][rows, pos].float()
    return out


# ---------------------------------------------------------------------------------------------- methods


@torch.no_grad()
def dla_scores(model: Any, ps: ProbeSet, metric: str = "excess") -> Float[Tensor, "prompt n_layers n_heads"]:
    """Direct logit attribution of each head to the metric, from one cached pass.

    A head's score is its output at the answer position, through the final norm with the cached scale held
    fixed, dotted with the keyword direction. Correct in raw and compatibility mode, with any padding, and with
    post-attention norms (Gemma 2/3: the head's share of the normalised attention output, see
    :func:`residual_components`); the scores and the other components sum to the logit difference.
    """
    L = model.cfg.n_layers
    names = {f"blocks.{layer}.attn.hook_z" for layer in range(L)} | {"ln_final.hook_scale"}
    if has_post_norms(model):
        names |= {f"blocks.{layer}.ln1_post.hook_scale" for layer in range(L)}
    batch = ps.batch
    _, cache = model.run_with_cache(
        batch.input_ids, attention_mask=batch.attention_mask, names_filter=lambda n: n in names
    )
    rows = torch.arange(len(batch))
    pos = ps.answer_positions
    u, _ = final_norm_direction(model, ps)
    scale = cache["ln_final.hook_scale"][rows, pos].float()  # [rows, 1]
    W_O = model.W_O.detach().float()
    per_layer = []
    for layer in range(L):
        z = cache[f"blocks.{layer}.attn.hook_z"][rows, pos].float()
        gain = _head_gain(model, cache, layer, rows, pos)
        if gain is None:  # project W_O on the direction first: [H, d_head]
            per_layer.append(torch.einsum("bhd,hd->bh", z, torch.einsum("hdm,m->hd", W_O[layer], u)))
        else:  # the direction differs per row through the post-norm scale
            per_layer.append(torch.einsum("bhd,hdm,bm->bh", z, W_O[layer], gain * u[None, :]))
    per_row = torch.stack(per_layer, dim=1) / scale[:, :, None]
    return _combine(per_row, ps, metric).cpu()


@torch.no_grad()
def attention_scores(model: Any, ps: ProbeSet) -> Float[Tensor, "prompt n_layers n_heads"]:
    """Attention probability from each token probe's answer position to the injected token, per head."""
    n = ps.n_probes
    batch = ps.batch.select(range(n))
    L = model.cfg.n_layers
    names = {f"blocks.{layer}.attn.hook_pattern" for layer in range(L)}
    _, cache = model.run_with_cache(
        batch.input_ids, attention_mask=batch.attention_mask, names_filter=lambda nm: nm in names
    )
    rows = torch.arange(n)
    q, k = ps.answer_positions[:n], ps.token_positions
    return torch.stack(
        [cache[f"blocks.{layer}.attn.hook_pattern"][rows, :, q, k].float() for layer in range(L)], dim=1
    ).cpu()


def z_and_grads(
    model: Any, batch: Any, metric_fn: Any, answer_pos: Tensor | None = None
) -> tuple[dict[int, Tensor], dict[int, Tensor], Tensor]:
    """One forward and one backward pass; returns ``hook_z`` and d(metric)/d(hook_z) of every layer.

    ``metric_fn`` gets the full logits ``[rows, pos, d_vocab]``, or with ``answer_pos`` only the logits at those
    positions ``[rows, d_vocab]``: then (where :func:`suffix_supported`) the unembedding runs on those rows
    alone, which saves the full-vocabulary logits of every position and their gradient.
    """
    L = model.cfg.n_layers
    acts: dict[int, Tensor] = {}
    grads: dict[int, Tensor] = {}

    def make_leaf(x: Tensor, hook: Any) -> Tensor:
        return x.detach().requires_grad_(True)

    def save_act(z: Tensor, hook: Any, layer: int) -> None:
        acts[layer] = z.detach()

    def save_grad(g: Tensor, hook: Any, layer: int) -> None:
        grads[layer] = g.detach()

    fwd = [("hook_embed", make_leaf)] + [
        (f"blocks.{layer}.attn.hook_z", lambda z, hook, layer=layer: save_act(z, hook, layer)) for layer in range(L)
    ]
    bwd = [(f"blocks.{layer}.attn.hook_z", lambda g, hook, layer=layer: save_grad(g, hook, layer)) for layer in range(L)]
    with torch.enable_grad(), hooked(model, fwd_hooks=fwd, bwd_hooks=bwd):
        if answer_pos is not None:
            rows = torch.arange(batch.input_ids.shape[0])
            value = metric_fn(logits_at(model, batch.input_ids, batch.attention_mask, rows, answer_pos))
        else:
            value = metric_fn(model(batch.input_ids, attention_mask=batch.attention_mask))
        value.backward()
    return acts, grads, value.detach()


def attribution_scores(
    model: Any,
    ps: ProbeSet,
    metric: str = "excess",
    ablation: str = "zero",
    *,
    max_tokens: int | None = 1024,
    baseline: dict[int, Tensor] | None = None,
) -> Float[Tensor, "prompt n_layers n_heads"]:
    """Attribution patching: the first-order estimate of each head's ablation effect, batched over prompts.

    Args:
        ablation: ``"zero"``: estimate of ``metric(clean) - metric(head zeroed)`` = ``grad . z``.
            ``"counterfactual"``: estimate of ``metric(token) - metric(token rows patched with the control
            rows' head output)`` = ``grad . (z_token - z_control)`` on the token metric; needs control groups
            whose probes tokenize to the same length as the token's.
        max_tokens: Run the zero-ablation estimate over chunks of probes of at most about this many padded
            tokens (same scores, bounded memory for the backward pass); None: all probes in one pass.
        baseline: With ``ablation="zero"``: estimate replacing each head's output by this value instead of 0
            (layer -> ``[n_heads, d_head]``, e.g. :func:`~biasgym_lens.heads.interventions.head_means` for mean
            ablation): ``grad . (z - baseline)``.
    """
    L, H = model.cfg.n_layers, model.cfg.n_heads
    n = ps.n_probes
    if ablation == "zero":
        if max_tokens is not None and len(chunks := ps.chunks(max_tokens)) > 1:
            # Each probe's metric depends only on its own rows: chunks of probes give the same scores with a
            # backward pass (whose saved activations grow with the tokens) over fewer rows at a time.
            return torch.cat(
                [attribution_scores(model, c, metric, ablation, max_tokens=None, baseline=baseline) for c in chunks]
            )

        def metric_fn(logits: Tensor) -> Tensor:
            return ps.metric_per_probe(logits, metric).sum()  # the gradient of each probe lands on its own rows

        acts, grads, _ = z_and_grads(model, ps.batch, metric_fn, ps.answer_positions)
        mask = ps.batch.attention_mask[:, :, None, None].float()
        if baseline is not None:
            acts = {layer: z - baseline[layer].to(z.device, z.dtype) for layer, z in acts.items()}
        per_row = torch.stack(
            [((grads[layer] * acts[layer]).float() * mask).sum((1, 3)) for layer in range(L)], dim=1
        )  # [rows, L, H]
        # each probe's metric depends on its token row and its control rows: sum their contributions
        total = per_row[:n].clone()
        if metric == "excess" and ps.controls:
            total += per_row[n:].reshape(len(ps.controls), n, L, H).sum(0)
        return total.cpu()
    if ablation == "counterfactual":
        if not ps.controls:
            raise ValueError("counterfactual attribution needs control groups")
        lengths = ps.batch.lengths
        aligned = [
            g for i, g in enumerate(ps.controls) if torch.equal(lengths[n * (i + 1) : n * (i + 2)], lengths[:n])
        ]
        if not aligned:
            raise ValueError(
                f"no control group of {list(ps.controls)} tokenizes to the same length as the token's probes; "
                "counterfactual patching needs position-aligned prompts (single-token group names)"
            )
        acts, grads, _ = z_and_grads(
            model, ps.batch, lambda lg: ps.metric_per_probe(lg, "token").sum(), ps.answer_positions
        )
        mask = ps.batch.attention_mask[:n, :, None, None].float()
        out = torch.zeros(n, L, H)
        for g in aligned:
            i = ps.controls.index(g)
            rows_c = slice(n * (i + 1), n * (i + 2))
            for layer in range(L):
                dz = acts[layer][:n] - acts[layer][rows_c]
                out[:, layer] += ((grads[layer][:n] * dz).float() * mask).sum((1, 3)).cpu()
        return out / len(aligned)
    raise ValueError(f"ablation must be 'zero' or 'counterfactual', got {ablation!r}")


def suffix_answer_logits(
    model: Any, resid_pre: Float[Tensor, "rows pos d_model"], start: int, attention_mask: Tensor, answer_pos: Tensor
) -> Float[Tensor, "rows d_vocab"]:
    """Next-token logits at ``answer_pos`` of a forward pass resumed at block ``start`` from ``resid_pre``.

    Blocks before ``start`` are skipped (not recomputed) and the unembedding runs only at the answer positions,
    so a pass that changes layer ``start`` onwards costs ``(n_layers - start) / n_layers`` of the layers and no
    full-vocabulary unembedding of every position. Hooks on blocks ``>= start`` apply. Exact: equal to the
    model's own logits up to float rounding (tested against full forward passes).
    """
    final = resumed_forward(model, resid_pre, start, attention_mask, unembed=False)
    return unembed_at(model, final, torch.arange(final.shape[0]), answer_pos)


@torch.no_grad()
def ablation_scores(
    model: Any,
    ps: ProbeSet,
    metric: str = "excess",
    *,
    heads_per_pass: int | None = None,
    heads: list[tuple[int, int]] | None = None,
    reuse_prefix: bool | None = None,
    progress: bool = False,
) -> Float[Tensor, "prompt n_layers n_heads"]:
    """Exact effect of zero-ablating each head alone: ``metric(clean) - metric(head zeroed)``.

    Several heads are ablated in one forward pass: the probe batch is repeated ``heads_per_pass`` times along
    the batch dimension and copy ``k`` has only head ``k`` zeroed. With ``reuse_prefix`` the clean residual
    stream entering each layer is cached once; a pass that ablates heads of layer ``l`` resumes from it at
    block ``l`` and unembeds only the answer positions (see :func:`suffix_answer_logits`), so it skips the
    unchanged layers before ``l``. ``heads_per_pass=1, reuse_prefix=False`` is the plain one-head-per-pass loop.

    Args:
        heads_per_pass: Copies of the batch per pass; default ``n_heads`` (one pass per layer when resuming).
        heads: Score only these heads (others are NaN); default all.
        reuse_prefix: Resume each pass at the ablated layer; default: when :func:`suffix_supported`.
    """
    L, H = model.cfg.n_layers, model.cfg.n_heads
    todo = heads if heads is not None else [(layer, h) for layer in range(L) for h in range(H)]
    heads_per_pass = H if heads_per_pass is None else heads_per_pass
    if heads_per_pass < 1:
        raise ValueError(f"heads_per_pass must be >= 1, got {heads_per_pass}")
    bad = [(layer, h) for layer, h in todo if not (0 <= layer < L and 0 <= h < H)]
    if bad:
        raise ValueError(f"heads {bad[:5]} out of range: layers 0..{L - 1}, heads 0..{H - 1}")
    if reuse_prefix is None:
        reuse_prefix = suffix_supported(model)
    elif reuse_prefix and not suffix_supported(model):
        raise ValueError("reuse_prefix=True is not supported for this model (see suffix_supported)")
    batch = ps.batch
    R = len(batch)
    resid: dict[int, Tensor] = {}
    if reuse_prefix:
        layers_needed = sorted({layer for layer, _ in todo})
        names = {f"blocks.{layer}.hook_in" for layer in layers_needed}
        logits, cache = model.run_with_cache(
            batch.input_ids, attention_mask=batch.attention_mask, names_filter=lambda n: n in names
        )
        resid = {layer: cache[f"blocks.{layer}.hook_in"] for layer in layers_needed}
        del cache
        # Passes that share a layer go together, so each resumes from one cached residual.
        todo = sorted(todo)
    else:
        logits = model(batch.input_ids, attention_mask=batch.attention_mask)
    clean = ps.metric_per_probe(logits, metric)
    del logits
    out = torch.full((ps.n_probes, L, H), float("nan"))
    bar = tqdm(total=len(todo), desc="ablation scan", disable=not progress, leave=False)
    start = 0
    while start < len(todo):
        group = todo[start : start + heads_per_pass]
        if reuse_prefix:
            group = [g for g in group if g[0] == group[0][0]]
        start += len(group)
        K = len(group)
        mask = batch.attention_mask.repeat(K, 1)
        keep = torch.ones(K, L, H)
        for k, (layer, h) in enumerate(group):
            keep[k, layer, h] = 0.0
        keep_rows = keep.repeat_interleave(R, dim=0)  # [K*R, L, H]
        layers = sorted({layer for layer, _ in group})

        def zero_heads(z: Tensor, hook: Any, layer: int, keep_rows: Tensor = keep_rows) -> Tensor:
            return z * keep_rows[:, layer].to(z.device, z.dtype)[:, None, :, None]

        fwd = [
            (f"blocks.{layer}.attn.hook_z", lambda z, hook, layer=layer: zero_heads(z, hook, layer))
            for layer in layers
        ]
        answer = batch.last_positions.repeat(K)
        with hooked(model, fwd_hooks=fwd):
            if reuse_prefix:
                last = suffix_answer_logits(model, resid[layers[0]].repeat(K, 1, 1), layers[0], mask, answer)
            else:
                logits = model(batch.input_ids.repeat(K, 1), attention_mask=mask)
                last = logits[torch.arange(K * R), answer]
        for k, (layer, h) in enumerate(group):
            ablated = ps.metric_per_probe(last[k * R : (k + 1) * R], metric)
            out[:, layer, h] = (clean - ablated).cpu()
        bar.update(K)
    bar.close()
    return out


def _check_score_options(
    injection: Any, method: Any, metric: Any, ablation: Any, controls: Any, max_probes: Any, heads_per_pass: Any,
    baseline: Any, progress: Any,
) -> None:
    if not all(hasattr(injection, a) for a in ("apply", "spec", "token")):
        raise InputTypeError(f"injection must be an Injection (from inject() or Injection.load), got {type(injection).__name__}")
    check_choice(method, "method", METHODS)
    check_choice(metric, "metric", METRICS)
    check_choice(ablation, "ablation", ("zero", "counterfactual"))
    if controls is not None:
        check_str_list(controls, "controls", nonempty=False)
    check_int(max_probes, "max_probes", minimum=1, none_ok=True)
    check_int(heads_per_pass, "heads_per_pass", minimum=1, none_ok=True)
    if baseline is not None and not isinstance(baseline, Mapping):
        raise InputTypeError(f"baseline must be a mapping layer -> [n_heads, d_head] tensor, got {type(baseline).__name__}")
    check_bool(progress, "progress")


def score_heads(
    model: Any,
    injection: Any,
    method: str = "attribution",
    *,
    metric: str = "excess",
    ablation: str = "zero",
    probes: str = "select",
    controls: list[str] | None = None,
    max_probes: int | None = None,
    heads_per_pass: int | None = None,
    baseline: dict[int, Tensor] | None = None,
    progress: bool = False,
) -> HeadScores:
    """Score every attention head for how much it carries the injected bias.

    Args:
        model: The model the injection was trained in.
        injection: A :class:`~biasgym_lens.injection.training.Injection`.
        method: ``"dla"``, ``"attention"``, ``"attribution"`` (default; attribution patching) or
            ``"ablation"`` (exact single-head zero ablation, one batched pass per ``heads_per_pass`` heads of
            a layer, resumed at that layer; default ``n_heads``).
        metric: ``"excess"`` (token minus control groups, default) or ``"token"``.
        ablation: For ``"attribution"``: ``"zero"`` or ``"counterfactual"``.
        probes: Which probes (``"select"`` by default; keep ``"eval"`` for measuring).
        controls: Control groups (default: the bias's).
        max_probes: Use at most this many probes.
        baseline: For ``"attribution"`` with ``ablation="zero"``: estimate replacing each head's output by
            this value (e.g. head means for mean ablation) instead of zero; recorded as ``ablation="mean"``.

    Returns:
        :class:`HeadScores` with per-prompt ``[n_probes, n_layers, n_heads]`` scores.

    Raises:
        InputTypeError: an option of the wrong type (e.g. ``max_probes=2.0``, ``controls="Japan"``).
        ValueError: unknown method, metric or ablation, an option out of range, an injection from another model,
            probes without the token.
    """
    from biasgym_lens.heads.probes import build_probe_set

    _check_score_options(injection, method, metric, ablation, controls, max_probes, heads_per_pass, baseline, progress)
    spec = injection.spec
    with injection.apply(model):
        ps = build_probe_set(model, spec, injection.token, probes=probes, controls=controls, max_probes=max_probes)
        if method == "dla":
            per, abl = dla_scores(model, ps, metric), "none"
        elif method == "attention":
            per, abl, metric = attention_scores(model, ps), "none", "attention"
        elif method == "attribution":
            per = attribution_scores(model, ps, metric, ablation, baseline=baseline)
            abl = "mean" if baseline is not None and ablation == "zero" else ablation
            if ablation == "counterfactual":
                metric = "token"
        else:
            per, abl = ablation_scores(model, ps, metric, heads_per_pass=heads_per_pass, progress=progress), "zero"
    settings = {"probes": probes, "n_probes": ps.n_probes, "controls": list(ps.controls), "token": injection.token}
    return HeadScores(per, method, metric, abl, spec.name, Provenance.of(model), settings)
