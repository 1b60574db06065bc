"""Edge attribution patching (Syed et al. 2023): a score for every edge of the graph from one forward and one
backward pass, batched over probes and chunked like the node scores.

The score of an edge ``u -> v`` (nodes: :mod:`biasgym_lens.heads.edge_graph`) is the first-order estimate of
``metric(clean) - metric(u's output removed from v's input alone)``: ``out_u . dmetric/d(input_v)``, summed over
positions, with ``dmetric/d(input_v)`` the gradient through ``v`` only. That is the zero-ablation baseline of
the node scores (the activation difference is ``-out_u``) with their sign: positive = the edge pushes the bias
up. Exact path patching of the same edge is :func:`biasgym_lens.heads.path_patching.path_patching_scores`.

How each input's own gradient is found. A head's query, key and value are read by that head alone (``hook_q``
per query head; ``hook_k``/``hook_v`` per key/value head), so backward hooks there give each input's gradient in
head space. Under grouped-query attention a key/value head feeds a group of query heads; its gradient is split
per query head by one backward, batched over the positions in the group, from the heads' ``hook_z`` to the
keys and values (a query head's output is the only way its key and value reach the metric). Each head-space
gradient goes back to the residual stream through the head's own ``W_Q``/``W_K``/``W_V`` and the
pre-attention norm's Jacobian at that layer (:func:`~biasgym_lens.heads.norm_vjp.norm_vjp`, for every head
input of the layer at once: LayerNorm and RMSNorm in closed form, checked against autograd on the first layer;
other norms by autograd). The MLP's input gradient is read inside its norm (``ln2.hook_in``, which only the MLP
reads), the logits' inside the final norm. First order only: the norms are not linear.

The model runs unchanged (no per-head copies of the residual stream; exact path patching makes those), so the
check against path patching compares two independent computations. Cost: the forward and backward pass, the
per-layer projections and norm products, and the products of every upstream output with every input gradient
(``[rows, n_up, pos * d_model] @ [rows, pos * d_model, n]`` per block of :data:`CONTRACT_COLUMNS` inputs).
"""

from __future__ import annotations

from typing import Any

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from biasgym_lens.core.hooks import HookSpec, hooked
from biasgym_lens.core.protocols import Model
from biasgym_lens.core.unembed import logits_at
from biasgym_lens.heads.edge_graph import EdgeGraph, check_edge_support, edge_graph
from biasgym_lens.heads.norm_vjp import (
    closed_form_projected,
    norm_form,
    norm_scale,
    norm_vjp,
    projection_weights,
)
from biasgym_lens.heads.patching import probe_totals
from biasgym_lens.heads.probes import METRICS, ProbeSet

__all__ = ["edge_attribution_scores", "input_weights", "EDGE_MAX_TOKENS", "CONTRACT_COLUMNS"]

EDGE_MAX_TOKENS = 448
"""Default chunk size (padded tokens) of edge attribution: every upstream output is kept at every position. 448,
not 512: chunks of similar length fill up to the cap, and at 512 the default study's peak memory grew by about
120 MB (the circuit alone: 2.82 GB against 2.59 GB at 448, bundled model, 22 probes)."""

CONTRACT_COLUMNS = 128
"""Downstream inputs whose gradients are queued before they are multiplied with the upstream outputs."""


def edge_attribution_scores(
    model: Model, ps: ProbeSet, metric: str = "excess", *, max_tokens: int | None = EDGE_MAX_TOKENS
) -> Float[Tensor, "prompt upstream downstream"]:
    """Edge attribution patching of every edge, per probe; NaN where a pair is not an edge.

    Args:
        model: A TransformerLens bridge (see :func:`~biasgym_lens.heads.edge_graph.check_edge_support`).
        ps: The probes (token rows and control rows).
        metric: ``"excess"`` (the token's bias logit difference minus the control groups' mean) or ``"token"``.
        max_tokens: Run over chunks of probes of similar length of at most about this many padded tokens
            (:meth:`~biasgym_lens.heads.probes.ProbeSet.length_chunks`; the same scores up to float rounding,
            bounded memory, less padding); None: all probes in one pass.

    Returns:
        ``[n_probes, n_upstream, n_downstream]`` scores, indexed as in :func:`edge_graph`.

    Raises:
        ValueError: unknown metric.
        NotImplementedError: a model that edge attribution does not cover.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    check_edge_support(model)
    graph, weights = edge_graph(model), input_weights(model)
    chunks = ps.length_chunks(max_tokens) if max_tokens is not None else [(list(range(ps.n_probes)), ps)]
    closed_form: bool | None = None  # checked against autograd on the first chunk, then trusted (or not)
    scores = torch.empty(ps.n_probes, graph.n_upstream, graph.n_downstream)
    for probes, chunk in chunks:
        edge_pass = _EdgePass(model, graph, chunk, weights, closed_form)
        scores[probes] = probe_totals(edge_pass.run(metric), chunk, metric).cpu()
        closed_form = edge_pass.closed_form
    return scores


def input_weights(model: Model) -> Float[Tensor, "n_layers inputs d_model d_head"]:
    """``W_Q``, ``W_K``, ``W_V`` of every query head, stacked per layer as ``[q of heads 0..H-1, k ..., v ...]``
    (under grouped-query attention each key/value head's weights repeated for its query heads)."""
    H = int(model.cfg.n_heads)
    return torch.cat(
        [w.detach().float().repeat_interleave(H // w.shape[1], dim=1) for w in (model.W_Q, model.W_K, model.W_V)], dim=1
    )


class _EdgePass:
    """State of one forward and backward pass: the upstream outputs at every position, each layer's head-space
    gradients and norm graph, then the scores, multiplied out in blocks of inputs."""

    def __init__(
        self, model: Model, graph: EdgeGraph, ps: ProbeSet, weights: Tensor, closed_form: bool | None = None
    ) -> None:
        self.model, self.graph, self.ps = model, graph, ps
        self.H, self.group = graph.n_heads, graph.kv_group  # query heads, query heads per key/value head
        R, P = ps.batch.input_ids.shape
        device = ps.batch.input_ids.device
        self.W_O = model.W_O.detach().float()  # [L, H, d_head, d_model]
        self.W_in = weights  # [L, 3 * H, d_model, d_head], see input_weights
        self.out = torch.empty(graph.n_upstream, R, P, int(model.cfg.d_model), device=device)  # filled by hooks
        self.out[0] = 0.0  # the embedding: token plus position embedding, added
        self.scores = torch.full((R, graph.n_upstream, graph.n_downstream), float("nan"), device=device)
        self.mask = ps.batch.attention_mask.to(device, torch.float32)
        self.block: Tensor | None = None  # gradients of queued inputs [columns, rows, pos, d_model]
        self.block_cols: list[int] = []  # their downstream indices
        self.block_sources = 0  # the most upstream nodes any of them reads
        self.kept: dict[int, dict[str, Tensor]] = {}  # layer -> norm input/output (GQA: z, k, v), with graph
        self.grads: dict[int, dict[str, Tensor]] = {}  # layer -> head-space gradients q, k, v (GQA: z)
        self.leaf: Tensor | None = None
        self.recording = True
        self.closed_form = closed_form  # the norm's closed-form Jacobian matches autograd (None: unchecked)

    # -------------------------------------------------------------------------------------- the pass

    def run(self, metric: str) -> Float[Tensor, "rows upstream downstream"]:
        """Forward, backward, then each layer's head inputs; the per-row scores."""
        ps = self.ps
        with torch.enable_grad(), hooked(self.model, fwd_hooks=self._forward_hooks(), bwd_hooks=self._backward_hooks()):
            rows = torch.arange(len(ps.batch))
            logits = logits_at(self.model, ps.batch.input_ids, ps.batch.attention_mask, rows, ps.answer_positions)
            value = ps.metric_per_probe(logits, metric).sum()
            assert self.leaf is not None, "the embedding hook did not fire"
            if not bool(self.mask.all()):
                self.out *= self.mask[None, :, :, None]  # padding positions count for no edge
            torch.autograd.grad(value, self.leaf, retain_graph=True)
            self.recording = False  # the backward passes below run through the same hooks
            self._flush()  # the MLP and logits inputs (late layers read many nodes) apart from early head inputs
            for layer in range(self.graph.n_layers):
                self._head_inputs(layer)
            self._flush()
        self.kept.clear()
        self.scores[:, ~self.graph.valid().to(self.scores.device)] = float("nan")
        return self.scores

    def _forward_hooks(self) -> list[HookSpec]:
        hooks: list[HookSpec] = [("hook_embed", self._embed)]
        if "hook_pos_embed" in self.model.hook_dict:
            hooks.append(("hook_pos_embed", self._pos_embed))
        for layer in range(self.graph.n_layers):
            for name in ("ln1.hook_in", "ln1.hook_out"):
                hooks.append((f"blocks.{layer}.{name}", lambda x, hook, layer=layer, name=name: self._keep(x, layer, name)))
            hooks.append((f"blocks.{layer}.attn.hook_z", lambda z, hook, layer=layer: self._heads_out(z, layer)))
            hooks.append((f"blocks.{layer}.mlp.hook_out", lambda x, hook, layer=layer: self._mlp_out(x, layer)))
            if self.group > 1:  # the keys and values as the attention consumes them (returned, so in the graph)
                for kind in "kv":
                    hooks.append((f"blocks.{layer}.attn.hook_{kind}", lambda x, hook, layer=layer, kind=kind: self._keep(x, layer, kind)))
        return hooks

    def _backward_hooks(self) -> list[HookSpec]:
        hooks: list[HookSpec] = [("ln_final.hook_in", lambda g, hook: self._logits_grad(g))]
        for layer in range(self.graph.n_layers):
            for kind in ("q", "z") if self.group > 1 else ("q", "k", "v"):
                hooks.append((f"blocks.{layer}.attn.hook_{kind}", lambda g, hook, layer=layer, kind=kind: self._grad(g, layer, kind)))
            hooks.append((f"blocks.{layer}.ln2.hook_in", lambda g, hook, layer=layer: self._mlp_grad(g, layer)))
        return hooks

    # ------------------------------------------------------------------------------- forward hooks

    def _embed(self, x: Tensor, hook: Any) -> Tensor:
        self.out[0] += x.detach().float()
        self.leaf = x.detach().requires_grad_(True)  # parameters are frozen: the graph starts here
        return self.leaf

    def _pos_embed(self, x: Tensor, hook: Any) -> None:
        self.out[0] += x.detach().float()

    def _heads_out(self, z: Tensor, layer: int) -> None:
        start, d = self.graph.head_index(layer, 0), self.out.shape[-1]
        per_head = einops.rearrange(z.detach().float(), "row pos head d_head -> head (row pos) d_head")
        torch.bmm(per_head, self.W_O[layer], out=self.out[start : start + self.H].view(self.H, -1, d))
        if self.group > 1:
            self.kept.setdefault(layer, {})["z"] = z

    def _mlp_out(self, x: Tensor, layer: int) -> None:
        self.out[self.graph.mlp_index(layer)] = x.detach().float()

    def _keep(self, x: Tensor, layer: int, name: str) -> Tensor:
        self.kept.setdefault(layer, {})[name] = x
        return x

    # ------------------------------------------------------------------------------ backward hooks

    def _grad(self, g: Tensor, layer: int, kind: str) -> None:
        if self.recording:
            self.grads.setdefault(layer, {})[kind] = g.detach().float()

    def _mlp_grad(self, g: Tensor, layer: int) -> None:
        if self.recording:
            self._contract([self.graph.input_index(layer, 0, "mlp")], self.graph.n_sources(layer, "mlp"), g[None])

    def _logits_grad(self, g: Tensor) -> None:
        if self.recording:
            self._contract([self.graph.logits_index], self.graph.n_upstream, g[None])

    # ------------------------------------------------------------------------------- head inputs

    def _head_inputs(self, layer: int) -> None:
        """Every head input of ``layer``: head-space gradients -> the residual stream, then queued."""
        grads, kept = self.grads.pop(layer), self.kept.pop(layer)
        if self.group > 1:
            grads["k"], grads["v"] = self._split_key_value(kept, grads["z"])
        g = torch.cat([grads[kind] for kind in "qkv"], dim=2)  # [rows, pos, 3 * n_heads, d_head]
        ln1 = self.model.blocks[layer].ln1
        cols = [self.graph.input_index(layer, h, kind) for kind in "qkv" for h in range(self.H)]
        n_up = self.graph.n_sources(layer, "q")
        form = norm_form(self.model, ln1) if self.closed_form else None
        if form is not None:  # closed form, checked on an earlier layer: written straight into the block
            kind, gain, eps = form
            r, chat = norm_scale(kind, eps, kept["ln1.hook_in"])
            weights = projection_weights(kind, gain, self.W_in[layer])
            closed_form_projected(weights, g * r[..., None], chat, self._reserve(cols, n_up))
            self._flush_if_full()
            return
        # the norm's output gradient per head input, then through the norm's Jacobian
        resid, self.closed_form = norm_vjp(
            self.model, ln1, kept["ln1.hook_in"], kept["ln1.hook_out"], self._project(g, layer), trust=self.closed_form
        )
        self._contract(cols, n_up, resid)

    def _project(self, g: Tensor, layer: int) -> Float[Tensor, "c rows pos d_model"]:
        """``W g`` of each head input (``g``: ``[rows, pos, c, d_head]``)."""
        return einops.einsum(g, self.W_in[layer], "r p c e, c d e -> c r p d")

    def _split_key_value(self, kept: dict[str, Tensor], gz: Tensor) -> tuple[Tensor, Tensor]:
        """Per-query-head key and value gradients ``[rows, pos, n_heads, d_head]`` of a GQA layer: for each
        position ``m`` in a group, the backward from ``hook_z`` of heads ``m, m + group, ...`` (one per key/value
        head) to the keys and values, all positions in one batched backward."""
        G = self.group
        select = torch.zeros(G, self.H, device=gz.device, dtype=gz.dtype)
        for m in range(G):
            select[m, m::G] = 1.0
        gk, gv = torch.autograd.grad(
            kept["z"], [kept["k"], kept["v"]], grad_outputs=(gz[None] * select[:, None, None, :, None]).to(kept["z"].dtype),
            retain_graph=True, is_grads_batched=True,
        )  # [G, rows, pos, n_kv, d_head]; key/value head j feeds query head j * G + m
        k, v = (einops.rearrange(g.float(), "m r p j e -> r p (j m) e") for g in (gk, gv))
        return k, v

    # --------------------------------------------------------------------------------- the scores

    def _contract(self, cols: list[int], n_up: int, grad: Float[Tensor, "n rows pos d_model"]) -> None:
        """Queue ``scores[r, u, cols] = sum over positions of out_u . grad`` for the first ``n_up`` upstream
        nodes (see :meth:`_reserve`)."""
        self._reserve(cols, n_up).copy_(grad.detach())
        self._flush_if_full()

    def _reserve(self, cols: list[int], n_up: int) -> Float[Tensor, "n rows pos d_model"]:
        """Room in the block for the gradients of the inputs ``cols`` (written by the caller), which read the
        first ``n_up`` upstream nodes. The block is multiplied out once it holds :data:`CONTRACT_COLUMNS`
        inputs, so each block reads the upstream outputs once (one input at a time the product is
        memory-bound)."""
        n = len(cols)
        if self.block is None:
            self.block = self.out.new_empty(CONTRACT_COLUMNS + 3 * self.H + 1, *self.out.shape[1:])
        if len(self.block_cols) + n > self.block.shape[0]:
            self._flush()
        start = len(self.block_cols)
        self.block_cols += cols
        self.block_sources = max(self.block_sources, n_up)
        return self.block[start : start + n]

    def _flush_if_full(self) -> None:
        if len(self.block_cols) >= CONTRACT_COLUMNS:
            self._flush()

    def _flush(self) -> None:
        """Multiply out the queued inputs (pairs that are not edges are set to NaN at the end of :meth:`run`):
        per row, ``[n_up, pos * d_model] @ [pos * d_model, n]`` (strided views, no copy)."""
        if not self.block_cols or self.block is None:
            return
        U, R, P, d = self.out.shape
        n, n_up = len(self.block_cols), self.block_sources
        out = self.out.view(U, R, P * d)[:n_up].permute(1, 0, 2)  # [rows, n_up, pos * d_model]
        grads = self.block.view(-1, R, P * d)[:n].permute(1, 2, 0)  # [rows, pos * d_model, n]
        self.scores[:, :n_up, self.block_cols] = torch.bmm(out, grads)
        self.block_cols, self.block_sources = [], 0
