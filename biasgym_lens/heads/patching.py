"""Scores that patch the heads: attribution patching (first order, one forward and one backward pass) and the
exact ablation scan (one batched pass per group of heads).

Both give a head's contribution to the metric, ``metric(clean) - metric(head ablated)`` (see
:mod:`biasgym_lens.heads.head_scores`); attribution patching estimates it as ``grad . (z - baseline)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from biasgym_lens.core.hooks import HookSpec, hooked
from biasgym_lens.core.packing import Packing, attention_cost, pack_rows, packed_forward, packing_supported
from biasgym_lens.core.protocols import Model
from biasgym_lens.core.tokens import Batch
from biasgym_lens.core.unembed import (
    forward_keeping,
    logits_at,
    resumed_forward,
    suffix_supported,
    unembed_at,
    unembed_columns,
)
from biasgym_lens.heads.probes import ProbeSet
from biasgym_lens.injection.examples import length_partition
from biasgym_lens.injection.metrics import KeywordIds, logit_diff

__all__ = ["acts_and_grads", "z_and_grads", "attribution_scores", "ablation_scores", "probe_totals"]


def acts_and_grads(
    model: Model, batch: Any, metric_fn: Any, names: list[str], answer_pos: Tensor | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """One forward and one backward pass; returns the activation at each hook of ``names`` and d(metric)/d(it).

    The embedding is made a leaf that requires grad (the parameters stay frozen), so the gradient reaches every
    hook. ``metric_fn`` gets the full logits ``[rows, pos, d_vocab]``, or with ``answer_pos`` only the logits at
    those positions ``[rows, d_vocab]``: then (where :func:`suffix_supported`) the unembedding runs on those
    rows alone, which saves the full-vocabulary logits of every position and their gradient.

    Returns:
        ``(acts, grads, value)``: hook name -> activation, hook name -> gradient, and the metric's value.
    """
    acts: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}

    def make_leaf(x: Tensor, hook: Any) -> Tensor:
        return x.detach().requires_grad_(True)

    def save_act(x: Tensor, hook: Any, name: str) -> None:
        acts[name] = x.detach()

    def save_grad(g: Tensor, hook: Any, name: str) -> None:
        grads[name] = g.detach()

    fwd = [("hook_embed", make_leaf)] + [(n, lambda x, hook, n=n: save_act(x, hook, n)) for n in names]
    bwd = [(n, lambda g, hook, n=n: save_grad(g, hook, n)) for n in names]
    with torch.enable_grad(), hooked(model, fwd_hooks=fwd, bwd_hooks=bwd):
        if answer_pos is not None:
            rows = torch.arange(batch.input_ids.shape[0])
            value = metric_fn(logits_at(model, batch.input_ids, batch.attention_mask, rows, answer_pos))
        else:
            value = metric_fn(model(batch.input_ids, attention_mask=batch.attention_mask))
        value.backward()
    return acts, grads, value.detach()


def z_and_grads(
    model: Model, batch: Any, metric_fn: Any, answer_pos: Tensor | None = None
) -> tuple[dict[int, Tensor], dict[int, Tensor], Tensor]:
    """One forward and one backward pass; returns ``hook_z`` and d(metric)/d(hook_z) of every layer (by layer).

    See :func:`acts_and_grads` for ``metric_fn`` and ``answer_pos``.
    """
    names = {f"blocks.{layer}.attn.hook_z": layer for layer in range(model.cfg.n_layers)}
    acts, grads, value = acts_and_grads(model, batch, metric_fn, list(names), answer_pos)
    return {names[n]: a for n, a in acts.items()}, {names[n]: g for n, g in grads.items()}, value


# ------------------------------------------------------------------------------------ attribution patching


def attribution_scores(
    model: Model,
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
    if ablation == "zero":
        if max_tokens is not None and len(chunks := ps.chunks(max_tokens)) > 1:
            # Each probe's metric depends only on its own rows: chunks of probes give the same scores with a
            # backward pass (whose saved activations grow with the tokens) over fewer rows at a time.
            return torch.cat(
                [attribution_scores(model, c, metric, ablation, max_tokens=None, baseline=baseline) for c in chunks]
            )
        return _zero_attribution(model, ps, metric, baseline)
    if ablation == "counterfactual":
        return _counterfactual_attribution(model, ps)
    raise ValueError(f"ablation must be 'zero' or 'counterfactual', got {ablation!r}")


def _head_dot(grad: Tensor, delta: Tensor, mask: Tensor) -> Tensor:
    """``grad . delta`` of each row and head, summed over the real positions and ``d_head``: ``[rows, n_heads]``."""
    return ((grad * delta).float() * mask[:, :, None, None].float()).sum((1, 3))


def probe_totals(per_row: Tensor, ps: ProbeSet, metric: str) -> Tensor:
    """Per-row contributions ``[rows, ...]`` -> per probe ``[n_probes, ...]``: each probe's metric depends on its
    token row and (for ``"excess"``) its control rows, so their contributions add up."""
    n = ps.n_probes
    total = per_row[:n].clone()
    if metric == "excess" and ps.controls:
        total += einops.reduce(per_row[n:], "(group probe) ... -> probe ...", "sum", group=len(ps.controls))
    return total


def _zero_attribution(
    model: Model, ps: ProbeSet, metric: str, baseline: dict[int, Tensor] | None
) -> Float[Tensor, "prompt n_layers n_heads"]:
    """``grad . (z - baseline)`` of every head (baseline 0 unless given), from one backward pass over all rows."""

    def metric_fn(logits: Tensor) -> Tensor:
        return ps.metric_per_probe(logits, metric).sum()  # the gradient of each probe lands on its own rows

    acts, grads, _ = z_and_grads(model, ps.batch, metric_fn, ps.answer_positions)
    if baseline is not None:
        acts = {layer: z - baseline[layer].to(z.device, z.dtype) for layer, z in acts.items()}
    mask = ps.batch.attention_mask
    per_row = torch.stack(
        [_head_dot(grads[layer], acts[layer], mask) for layer in range(model.cfg.n_layers)], dim=1
    )  # [rows, L, H]
    return probe_totals(per_row, ps, metric).cpu()


def _aligned_controls(ps: ProbeSet) -> list[str]:
    """The control groups whose probes tokenize to the same lengths as the token's (position-aligned rows)."""
    if not ps.controls:
        raise ValueError("counterfactual attribution needs control groups")
    n = ps.n_probes
    lengths = ps.batch.lengths
    aligned = [
        g for i, g in enumerate(ps.controls) if torch.equal(lengths[n * (i + 1) : n * (i + 2)], lengths[:n])
    ]
    if not aligned:
        raise ValueError(
            f"no control group of {list(ps.controls)} tokenizes to the same length as the token's probes; "
            "counterfactual patching needs position-aligned prompts (single-token group names)"
        )
    return aligned


def _counterfactual_attribution(model: Model, ps: ProbeSet) -> Float[Tensor, "prompt n_layers n_heads"]:
    """``grad . (z_token - z_control)`` on the token metric, averaged over the position-aligned control groups."""
    aligned = _aligned_controls(ps)
    n, L, H = ps.n_probes, model.cfg.n_layers, model.cfg.n_heads
    acts, grads, _ = z_and_grads(
        model, ps.batch, lambda lg: ps.metric_per_probe(lg, "token").sum(), ps.answer_positions
    )
    mask = ps.batch.attention_mask[:n]
    out = torch.zeros(n, L, H)
    for g in aligned:
        i = ps.controls.index(g)
        rows_c = slice(n * (i + 1), n * (i + 2))
        for layer in range(L):
            out[:, layer] += _head_dot(grads[layer][:n], acts[layer][:n] - acts[layer][rows_c], mask).cpu()
    return out / len(aligned)


# ------------------------------------------------------------------------------------------ ablation scan


SCAN_PASS_OVERHEAD = 16
"""Resumed scan passes split the probe rows into groups of similar length, as many as pay: a group costs its
rows times its longest row plus this many tokens (:func:`~biasgym_lens.injection.examples.length_partition`)."""


@torch.no_grad()
def ablation_scores(
    model: Model,
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
    block ``l``, runs the probe rows in groups of similar length each cut after its longest answer, and unembeds
    only the keyword columns at the answer positions (see :func:`~biasgym_lens.core.unembed.unembed_columns`),
    so it skips the unchanged layers before ``l``, nearly all padding and the rest of the vocabulary.
    ``heads_per_pass=1, reuse_prefix=False`` is the plain one-head-per-pass loop.

    Args:
        heads_per_pass: Copies of the batch per pass; default ``n_heads`` (one pass per layer when resuming).
        heads: Score only these heads (others are NaN); default all.
        reuse_prefix: Resume each pass at the ablated layer; default: when
            :func:`~biasgym_lens.core.unembed.suffix_supported`.
    """
    L, H = model.cfg.n_layers, model.cfg.n_heads
    todo = heads if heads is not None else [(layer, h) for layer in range(L) for h in range(H)]
    heads_per_pass = H if heads_per_pass is None else heads_per_pass
    if heads_per_pass < 1:
        raise ValueError(f"heads_per_pass must be >= 1, got {heads_per_pass}")
    _check_scan_heads(todo, L, H)
    reuse_prefix = _resolve_reuse_prefix(model, reuse_prefix)
    clean, resid = _clean_scan_pass(model, ps, metric, todo, reuse_prefix)
    packing = None
    if reuse_prefix:
        todo = sorted(todo)  # passes that share a layer go together, so each resumes from one cached residual
        packing = _scan_packing(model, ps.batch) if packing_supported(model) else None
    R = len(ps.batch)
    out = torch.full((ps.n_probes, L, H), float("nan"))
    bar = tqdm(total=len(todo), desc="ablation scan", disable=not progress, leave=False)
    for group in _scan_groups(todo, heads_per_pass, same_layer=reuse_prefix):
        diffs = _ablated_logit_diffs(model, ps.batch, ps.keywords, group, resid if reuse_prefix else None, packing)
        for k, (layer, h) in enumerate(group):
            ablated = ps.per_probe(diffs[k * R : (k + 1) * R], metric)
            out[:, layer, h] = (clean - ablated).cpu()
        bar.update(len(group))
    bar.close()
    return out


def _check_scan_heads(todo: list[tuple[int, int]], n_layers: int, n_heads: int) -> None:
    """Every head of the scan is a head of the model."""
    bad = [(layer, h) for layer, h in todo if not (0 <= layer < n_layers and 0 <= h < n_heads)]
    if bad:
        raise ValueError(f"heads {bad[:5]} out of range: layers 0..{n_layers - 1}, heads 0..{n_heads - 1}")


def _resolve_reuse_prefix(model: Model, reuse_prefix: bool | None) -> bool:
    """``reuse_prefix`` as given (refused where resuming is not supported), or by default where it is."""
    if reuse_prefix is None:
        return suffix_supported(model)
    if reuse_prefix and not suffix_supported(model):
        raise ValueError("reuse_prefix=True is not supported for this model (see suffix_supported)")
    return reuse_prefix


def _clean_scan_pass(
    model: Model, ps: ProbeSet, metric: str, todo: list[tuple[int, int]], reuse_prefix: bool
) -> tuple[Tensor, dict[int, Tensor]]:
    """The clean metric per probe, and (with ``reuse_prefix``) the clean residual entering each scanned layer."""
    batch = ps.batch
    resid: dict[int, Tensor] = {}
    if reuse_prefix:
        layers_needed = sorted({layer for layer, _ in todo})
        final, resid = forward_keeping(model, batch.input_ids, batch.attention_mask, layers_needed, unembed=False)
        logits = unembed_at(model, final, torch.arange(len(batch)), ps.answer_positions)
    else:
        logits = logits_at(model, batch.input_ids, batch.attention_mask, torch.arange(len(batch)), ps.answer_positions)
    return ps.metric_per_probe(logits, metric), resid


def _scan_groups(
    todo: list[tuple[int, int]], heads_per_pass: int, *, same_layer: bool
) -> Iterator[list[tuple[int, int]]]:
    """The heads of each pass, in order: up to ``heads_per_pass`` (and with ``same_layer`` of one layer)."""
    start = 0
    while start < len(todo):
        group = todo[start : start + heads_per_pass]
        if same_layer:
            group = [g for g in group if g[0] == group[0][0]]
        start += len(group)
        yield group


def _zero_head_hooks(keep_rows: Tensor, layers: list[int]) -> list[HookSpec]:
    """Hooks that multiply each row's heads by ``keep_rows`` ``[rows, n_layers, n_heads]`` (0: zeroed)."""

    def zero_heads(z: Tensor, hook: Any, layer: int) -> Tensor:
        return z * keep_rows[:, layer].to(z.device, z.dtype)[:, None, :, None]

    return [
        (f"blocks.{layer}.attn.hook_z", lambda z, hook, layer=layer: zero_heads(z, hook, layer)) for layer in layers
    ]


def _ablated_logit_diffs(
    model: Model, batch: Batch, keywords: KeywordIds, group: list[tuple[int, int]], resid: dict[int, Tensor] | None,
    packing: Packing | None = None,
) -> Float[Tensor, " rows"]:
    """The bias logit difference at the answer ``[K * rows]`` of the batch repeated once per head of ``group``,
    copy ``k`` with head ``k`` zeroed; resumed at the group's layer from ``resid`` when given, on packed rows
    with ``packing``."""
    K, R = len(group), len(batch)
    keep = torch.ones(K, model.cfg.n_layers, model.cfg.n_heads)
    for k, (layer, h) in enumerate(group):
        keep[k, layer, h] = 0.0
    layers = sorted({layer for layer, _ in group})
    if resid is not None and packing is not None:
        return _resumed_packed(model, packing, keywords, keep, layers, resid[layers[0]])
    if resid is not None:
        return _resumed_by_length(model, batch, keywords, keep, layers, resid[layers[0]])
    fwd = _zero_head_hooks(keep.repeat_interleave(R, dim=0), layers)  # [K*R, L, H]
    with hooked(model, fwd_hooks=fwd):
        logits = model(batch.input_ids.repeat(K, 1), attention_mask=batch.attention_mask.repeat(K, 1))
        return logit_diff(logits[torch.arange(K * R), batch.last_positions.repeat(K)], keywords)


def _resumed_by_length(
    model: Model, batch: Batch, keywords: KeywordIds, keep: Tensor, layers: list[int], resid: Tensor
) -> Float[Tensor, " rows"]:
    """The resumed passes of :func:`_ablated_logit_diffs`, one per group of rows of similar length
    (:func:`~biasgym_lens.injection.examples.length_partition`), each cut after its longest row's answer: the
    suffix layers then run on little more than the real tokens (rows are right-padded, so the cut drops only
    padding and changes no real position). Only the keyword columns are unembedded. Rows come back in batch
    order."""
    K, R = keep.shape[0], len(batch)
    columns, local = keywords.columns()
    lengths = (batch.last_positions + 1).tolist()
    out = torch.empty(K * R)
    for rows in map(torch.tensor, length_partition(lengths, overhead=SCAN_PASS_OVERHEAD)):
        n = int(batch.last_positions[rows].max()) + 1
        fwd = _zero_head_hooks(keep.repeat_interleave(len(rows), dim=0), layers)
        with hooked(model, fwd_hooks=fwd):
            final = resumed_forward(
                model, resid[rows, :n].repeat(K, 1, 1), layers[0], batch.attention_mask[rows, :n].repeat(K, 1),
                unembed=False,
            )
        at = unembed_columns(model, final, torch.arange(final.shape[0]), batch.last_positions[rows].repeat(K), columns)
        out[(torch.arange(K)[:, None] * R + rows[None, :]).flatten()] = logit_diff(at, local).cpu()
    return out


def _scan_packing(model: Model, batch: Batch) -> Packing:
    """How the resumed passes pack the rows: each row's real tokens up to its answer, no padding."""
    mask = batch.attention_mask.cpu()
    starts = mask.argmax(-1)  # the first real token (0 under right padding)
    lengths = batch.last_positions.cpu() - starts + 1
    return pack_rows(lengths.tolist(), starts.tolist(), attention=attention_cost(model))


def _resumed_packed(
    model: Model, packing: Packing, keywords: KeywordIds, keep: Tensor, layers: list[int], resid: Tensor
) -> Float[Tensor, " rows"]:
    """The resumed passes of :func:`_ablated_logit_diffs` as one pass on packed rows
    (:mod:`~biasgym_lens.core.packing`): each row's tokens up to its answer, side by side with other rows', so
    the suffix layers run on the real tokens and little else, in one pass per group of heads. Only the keyword
    columns are unembedded. Rows come back in batch order."""
    K, B = keep.shape[0], packing.n_rows
    columns, local = keywords.columns()
    x = packing.pack(resid).repeat(K, 1, 1)
    fwd = _zero_head_hooks(keep.repeat_interleave(B, dim=0), layers)
    with hooked(model, fwd_hooks=fwd):
        final = packed_forward(model, x, layers[0], packing.position_ids().repeat(K, 1))
    row, pos = packing.last_tokens()
    rows = (torch.arange(K)[:, None] * B + row[None, :]).flatten()
    at = unembed_columns(model, final, rows, pos.repeat(K), columns)
    return logit_diff(at, local).cpu()
