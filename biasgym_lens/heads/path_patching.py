"""Exact path patching of single edges: the reference that edge attribution patching estimates.

For an edge ``u -> v`` (nodes: :mod:`biasgym_lens.heads.edge_graph`) the patched run removes ``u``'s clean output
(zero-ablation baseline) from ``v``'s input alone and leaves every other reader of the residual stream as it
was: the head's own q, k or v copy of the residual (inside
:func:`~biasgym_lens.heads.edge_graph.split_qkv_inputs`), the MLP's norm input, or the final norm's input. The
score is ``metric(clean) - metric(patched)`` per probe, the quantity edge attribution estimates to first order.

Under grouped-query attention one key/value copy feeds several query heads; patching it for one head alone
takes two passes: the first patches the copy and records that head's ``hook_z`` at the layer (the other
heads of the group see the patched key too, but the pass stops there), the second replaces only that head's
``z`` by the recorded one.

Several edges share a pass: the probe rows are repeated once per edge and each copy gets its own patch. Edges
are grouped by the layer they patch; where :func:`~biasgym_lens.core.unembed.suffix_supported`, a pass
resumes at that layer from the clean residual stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from biasgym_lens.core.checks import check_int, check_real
from biasgym_lens.core.hooks import HookSpec, hooked
from biasgym_lens.core.protocols import Model
from biasgym_lens.core.unembed import (
    logits_at,
    skipping_layers,
    suffix_answer_logits,
    suffix_supported,
    unembed_at,
)
from biasgym_lens.heads.edge_graph import (
    EdgeGraph,
    check_edge_support,
    edge_graph,
    parse_node,
    split_qkv_inputs,
)
from biasgym_lens.heads.probes import METRICS, ProbeSet

__all__ = ["path_patching_scores"]


class _Recorded(Exception):
    """Stops a forward pass once the hooks it needed have fired."""


@torch.no_grad()
def path_patching_scores(
    model: Model,
    ps: ProbeSet,
    edges: Sequence[tuple[str, str]],
    metric: str = "excess",
    *,
    scale: float = 1.0,
    edges_per_pass: int = 8,
    progress: bool = False,
) -> Float[Tensor, "prompt edge"]:
    """Exact effect of removing each edge alone: ``metric(clean) - metric(scale * out_u removed from v's input)``.

    Args:
        model: A TransformerLens bridge (see :func:`~biasgym_lens.heads.edge_graph.check_edge_support`).
        ps: The probes.
        edges: ``(upstream, downstream)`` names, e.g. ``("L3H1", "L21H1.k")``, ``("MLP0", "MLP4")``,
            ``("embed", "logits")``.
        metric: ``"excess"`` or ``"token"``.
        scale: Remove ``scale`` times the upstream output (1: zero ablation; small values give finite
            differences, whose ratio to ``scale`` tends to the edge attribution score).
        edges_per_pass: Copies of the probe rows per pass, one edge each (memory grows with it).
        progress: Show a progress bar over edges.

    Returns:
        ``[n_probes, n_edges]`` effects.

    Raises:
        InputTypeError: ``scale`` not a real number, ``edges_per_pass`` not an integer.
        ValueError: unknown metric, an unknown node, a pair that is not an edge, ``edges_per_pass`` < 1.
        NotImplementedError: a model that edge attribution does not cover.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    scale = check_real(scale, "scale")
    per_pass = check_int(edges_per_pass, "edges_per_pass", minimum=1)
    check_edge_support(model)
    graph = edge_graph(model)
    for up, down in edges:
        graph.edge(up, down)
    out = torch.empty(ps.n_probes, len(edges))
    bar = tqdm(total=len(edges), desc="path patching", disable=not progress, leave=False)
    with split_qkv_inputs(model):
        outputs, resid, clean = _clean_pass(model, ps, metric, graph, edges, suffix_supported(model))
        for layer, group in _passes(graph, edges, per_pass):
            run = _Run(model, ps, layer, resid.get(layer), len(group))
            patches = [_Patch.of(graph, edges[i][1], k, scale * outputs[edges[i][0]]) for k, i in enumerate(group)]
            logits = run.logits(patches)
            for k, i in enumerate(group):
                out[:, i] = (clean - ps.metric_per_probe(logits[run.rows(k)], metric)).cpu()
            bar.update(len(group))
    bar.close()
    return out


def _down_layer(graph: EdgeGraph, down: str) -> int:
    """The layer whose input an edge patches (the last block for the logits): where a pass can resume."""
    node = down.partition(".")[0]
    return min(parse_node(node, graph.n_layers)[1], graph.n_layers - 1)


def _passes(graph: EdgeGraph, edges: Sequence[tuple[str, str]], per_pass: int) -> list[tuple[int, list[int]]]:
    """Edge indices per pass: edges of one patched layer, at most ``per_pass`` of them."""
    by_layer: dict[int, list[int]] = {}
    for i, (_, down) in enumerate(edges):
        by_layer.setdefault(_down_layer(graph, down), []).append(i)
    return [(layer, idx[s : s + per_pass]) for layer, idx in sorted(by_layer.items()) for s in range(0, len(idx), per_pass)]


def _clean_pass(
    model: Model, ps: ProbeSet, metric: str, graph: EdgeGraph, edges: Sequence[tuple[str, str]], resume: bool
) -> tuple[dict[str, Tensor], dict[int, Tensor], Tensor]:
    """The clean pass: each needed upstream output at every position ``[rows, pos, d_model]``, the residual
    entering each layer a pass resumes at (if resuming), and the clean metric per probe."""
    batch = ps.batch
    W_O = model.W_O.detach()
    names: dict[str, list[str]] = {}
    for up in {u for u, _ in edges}:
        kind, layer, head = parse_node(up, graph.n_layers)
        if kind == "embed":
            names[up] = [n for n in ("hook_embed", "hook_pos_embed") if n in model.hook_dict]
        else:
            names[up] = [f"blocks.{layer}.attn.hook_z" if kind == "head" else f"blocks.{layer}.mlp.hook_out"]
    wanted = {n for ns in names.values() for n in ns}
    layers = sorted({_down_layer(graph, d) for _, d in edges}) if resume else []
    wanted |= {f"blocks.{layer}.hook_in" for layer in layers}
    with skipping_layers(model, 0) if resume else contextlib.nullcontext():  # resume: the final residual
        final, cache = model.run_with_cache(
            batch.input_ids, attention_mask=batch.attention_mask, names_filter=lambda n: n in wanted
        )
    rows = torch.arange(len(batch))
    clean_logits = unembed_at(model, final, rows, ps.answer_positions) if resume else final[rows, ps.answer_positions]
    resid = {layer: cache[f"blocks.{layer}.hook_in"] for layer in layers}
    outputs = {}
    for up, ns in names.items():
        kind, layer, head = parse_node(up, graph.n_layers)
        if kind == "head":
            outputs[up] = cache[ns[0]][:, :, head] @ W_O[layer, head]
        else:
            outputs[up] = sum(_cached(cache, n) for n in ns).expand(len(batch), -1, -1)
    return outputs, resid, ps.metric_per_probe(clean_logits.float(), metric)


def _cached(cache: Any, name: str) -> Tensor | float:
    """A cached activation, or 0 for a hook point that did not fire (``hook_pos_embed`` under rotary)."""
    try:
        return cache[name]
    except KeyError:
        return 0.0


def _cached(cache: Any, name: str) -> Tensor | float:
    """A cached activation, or 0 for a hook point that did not fire (``hook_pos_embed`` under rotary)."""
    try:
        return cache[name]
    except KeyError:
        return 0.0


@dataclass(frozen=True)
class _Patch:
    """One edge's patch on copy ``copy`` of the probe rows: remove ``delta`` ``[rows, pos, d_model]`` at
    ``hook`` (copy index ``index`` of a q/k/v input, None for an MLP's or the final norm's input); under GQA a
    key/value patch is applied in a first pass whose ``hook_z`` of ``head`` at ``layer`` then replaces the
    clean one (``two_pass``)."""

    hook: str
    index: int | None
    delta: Tensor
    copy: int
    layer: int
    head: int
    two_pass: bool

    @classmethod
    def of(cls, graph: EdgeGraph, down: str, copy: int, delta: Tensor) -> _Patch:
        node, _, kind = down.partition(".")
        _, layer, head = parse_node(node, graph.n_layers)
        if not kind:  # an MLP's input or the final residual: inside the norm that only it reads
            name = "ln_final.hook_in" if node == "logits" else f"blocks.{layer}.ln2.hook_in"
            return cls(name, None, delta, copy, layer, head, False)
        group = graph.kv_group
        index = head if kind == "q" else head // group
        return cls(f"blocks.{layer}.attn.hook_{kind}_input", index, delta, copy, layer, head, kind != "q" and group > 1)


class _Run:
    """Passes over the probe rows repeated once per edge, resumed at ``layer`` when ``resid`` is given."""

    def __init__(self, model: Model, ps: ProbeSet, layer: int, resid: Tensor | None, copies: int) -> None:
        self.model, self.layer, self.copies = model, layer, copies
        batch = ps.batch
        self.R = len(batch)
        self.ids = batch.input_ids.repeat(copies, 1)
        self.mask = batch.attention_mask.repeat(copies, 1)
        self.answer = ps.answer_positions.repeat(copies)
        self.resid = None if resid is None else resid.repeat(copies, 1, 1)

    def rows(self, copy: int) -> slice:
        return slice(copy * self.R, (copy + 1) * self.R)

    def logits(self, patches: list[_Patch]) -> Tensor:
        """Answer-position logits ``[copies * rows, d_vocab]`` with every patch on its copy."""
        recorded = self._first_pass([p for p in patches if p.two_pass])
        hooks = [self._remove(p) for p in patches if not p.two_pass]
        hooks += [self._replace_z(p, recorded[p.copy]) for p in patches if p.two_pass]
        return self._answer_logits(hooks)

    def _answer_logits(self, hooks: list[HookSpec]) -> Tensor:
        with hooked(self.model, fwd_hooks=hooks):
            if self.resid is not None:
                return suffix_answer_logits(self.model, self.resid, self.layer, self.mask, self.answer)
            return logits_at(self.model, self.ids, self.mask, torch.arange(len(self.ids)), self.answer)

    def _remove(self, p: _Patch) -> HookSpec:
        rows = self.rows(p.copy)

        def patch(x: Tensor, hook: Any) -> Tensor:
            x = x.clone()
            if p.index is None:
                x[rows] -= p.delta.to(x.dtype)
            else:
                x[rows, :, p.index] -= p.delta.to(x.dtype)
            return x

        return p.hook, patch

    def _replace_z(self, p: _Patch, z_head: Tensor) -> HookSpec:
        rows = self.rows(p.copy)

        def patch(z: Tensor, hook: Any) -> Tensor:
            z = z.clone()
            z[rows, :, p.head] = z_head.to(z.dtype)
            return z

        return f"blocks.{p.layer}.attn.hook_z", patch

    def _first_pass(self, patches: list[_Patch]) -> dict[int, Tensor]:
        """GQA key/value patches: each patched head's ``z`` on its copy (the pass stops at ``hook_z``)."""
        if not patches:
            return {}
        recorded: dict[int, Tensor] = {}

        def record(z: Tensor, hook: Any) -> None:
            for p in patches:
                recorded[p.copy] = z[self.rows(p.copy), :, p.head].clone()
            raise _Recorded

        try:
            self._answer_logits([self._remove(p) for p in patches] + [(f"blocks.{self.layer}.attn.hook_z", record)])
        except _Recorded:
            pass
        return recorded
