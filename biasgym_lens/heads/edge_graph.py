"""The computational graph that edge scores live on: its nodes, its edges and the model switch that separates them.

Upstream nodes write into the residual stream: the embedding (``"embed"``: token embedding plus learned
positions where the model has them), every head's output ``z @ W_O`` (``"L{l}H{h}"``, without the attention
output bias) and every MLP's output (``"MLP{l}"``). Downstream nodes read from it: every head's query, key and
value input (``"L{l}H{h}.q"``, ``".k"``, ``".v"``), every MLP's input (``"MLP{l}"``) and the final residual
(``"logits"``). An edge ``u -> v`` exists when ``u`` writes before ``v`` reads: into a head input of layer
``l`` from the embedding and layers before ``l``; into MLP ``l`` also from the heads of layer ``l`` (not in
parallel blocks, where attention and MLP read the same residual); into the logits from everything.

Upstream index: ``embed`` is 0, then per layer its heads and its MLP. Downstream index: per layer the queries,
keys and values of its heads and its MLP, then ``logits``. So the upstream nodes an input can read are always
a prefix of the upstream list (:meth:`EdgeGraph.n_sources`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch
from jaxtyping import Bool
from torch import Tensor

from biasgym_lens.core.protocols import Model
from biasgym_lens.heads.decomposition import has_post_norms

__all__ = ["EdgeGraph", "edge_graph", "split_qkv_inputs", "check_edge_support", "INPUTS", "parse_node"]

INPUTS = ("q", "k", "v", "mlp", "logits")
"""The kinds of downstream input: a head's query, key or value, an MLP's input, the final residual."""

_HEAD = re.compile(r"^L(\d+)H(\d+)$")
_MLP = re.compile(r"^MLP(\d+)$")


def parse_node(name: str, n_layers: int) -> tuple[str, int, int]:
    """``(kind, layer, head)`` of a node name (``"embed"``: layer -1; ``"logits"``: layer ``n_layers``; head -1
    where there is none). Kind is ``"embed"``, ``"head"``, ``"mlp"`` or ``"logits"``.

    Raises:
        ValueError: a name that is none of ``embed``, ``L{l}H{h}``, ``MLP{l}``, ``logits``.
    """
    if name == "embed":
        return "embed", -1, -1
    if name == "logits":
        return "logits", n_layers, -1
    if m := _HEAD.match(name):
        return "head", int(m.group(1)), int(m.group(2))
    if m := _MLP.match(name):
        return "mlp", int(m.group(1)), -1
    raise ValueError(f"node {name!r} is not one of 'embed', 'L<layer>H<head>', 'MLP<layer>', 'logits'")


@dataclass(frozen=True)
class EdgeGraph:
    """Nodes and edges of a model with ``n_layers`` layers of ``n_heads`` heads.

    Attributes:
        n_layers: Layers.
        n_heads: Query heads per layer.
        parallel: Attention and MLP of a layer read the same residual stream (GPT-J / NeoX blocks).
        n_kv_heads: Key/value heads per layer (grouped-query attention); None: one per query head.
    """

    n_layers: int
    n_heads: int
    parallel: bool = False
    n_kv_heads: int | None = None

    @property
    def kv_group(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.n_heads // (self.n_kv_heads or self.n_heads)

    @cached_property
    def upstream(self) -> tuple[str, ...]:
        """Upstream node names in index order (built once per graph)."""
        out = ["embed"]
        for layer in range(self.n_layers):
            out += [f"L{layer}H{h}" for h in range(self.n_heads)] + [f"MLP{layer}"]
        return tuple(out)

    @cached_property
    def downstream(self) -> tuple[str, ...]:
        """Downstream input names in index order (``"L{l}H{h}.q"``, ..., ``"MLP{l}"``, ``"logits"``; built once
        per graph)."""
        out = []
        for layer in range(self.n_layers):
            out += [f"L{layer}H{h}.{kind}" for kind in "qkv" for h in range(self.n_heads)] + [f"MLP{layer}"]
        return (*out, "logits")

    def head_index(self, layer: int, head: int) -> int:
        """Upstream index of head ``(layer, head)``."""
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_index(self, layer: int) -> int:
        """Upstream index of MLP ``layer``."""
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def input_index(self, layer: int, head: int, kind: str) -> int:
        """Downstream index of the ``kind`` (``"q"``, ``"k"``, ``"v"``) input of head ``(layer, head)``, or of
        MLP ``layer``'s input (``kind="mlp"``, head ignored)."""
        base = layer * (3 * self.n_heads + 1)
        if kind == "mlp":
            return base + 3 * self.n_heads
        return base + "qkv".index(kind) * self.n_heads + head

    @property
    def logits_index(self) -> int:
        return self.n_layers * (3 * self.n_heads + 1)

    def n_sources(self, layer: int, kind: str) -> int:
        """How many upstream nodes (a prefix of the upstream list) write into an input of ``kind`` at ``layer``."""
        if kind == "logits":
            return 1 + self.n_layers * (self.n_heads + 1)
        before = 1 + layer * (self.n_heads + 1)
        return before + self.n_heads if kind == "mlp" and not self.parallel else before

    def downstream_node(self, index: int) -> tuple[str, str, int, int]:
        """``(node, input, layer, head)`` of a downstream index (node without the ``.q/.k/.v`` suffix)."""
        name = self.downstream[index]
        node, _, kind = name.partition(".")
        _, layer, head = parse_node(node, self.n_layers)
        return node, kind or ("logits" if node == "logits" else "mlp"), layer, head

    def sources(self) -> list[int]:
        """``n_sources`` of every downstream index."""
        return list(self._sources)

    @cached_property
    def _sources(self) -> tuple[int, ...]:
        return tuple(self.n_sources(layer, kind) for _, kind, layer, _ in map(self.downstream_node, range(self.n_downstream)))

    @property
    def n_upstream(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def n_downstream(self) -> int:
        return self.n_layers * (3 * self.n_heads + 1) + 1

    def valid(self) -> Bool[Tensor, "upstream downstream"]:
        """Which ``(upstream, downstream)`` pairs are edges."""
        up = torch.arange(self.n_upstream)[:, None]
        return up < torch.tensor(self._sources)[None, :]

    def edge(self, upstream: str, downstream: str) -> tuple[int, int]:
        """Indices of the edge ``upstream -> downstream`` (downstream as in :attr:`downstream`).

        Raises:
            ValueError: an unknown node, or a pair that is not an edge (``upstream`` does not write before
                ``downstream`` reads).
        """
        ups, downs = self.upstream, self.downstream
        if upstream not in ups:
            raise ValueError(f"unknown upstream node {upstream!r}; valid: 'embed', 'L<l>H<h>', 'MLP<l>' in range")
        if downstream not in downs:
            raise ValueError(
                f"unknown downstream input {downstream!r}; valid: 'L<l>H<h>.q|k|v', 'MLP<l>', 'logits' in range"
            )
        i, j = ups.index(upstream), downs.index(downstream)
        if i >= self._sources[j]:
            raise ValueError(f"{upstream} -> {downstream} is not an edge: {upstream} does not write before it reads")
        return i, j


def edge_graph(model: Model) -> EdgeGraph:
    """The :class:`EdgeGraph` of a model."""
    cfg = model.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None)
    parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
    return EdgeGraph(int(cfg.n_layers), int(cfg.n_heads), parallel, int(n_kv) if n_kv else None)


def check_edge_support(model: Model) -> None:
    """Refuse models that edge attribution does not cover.

    Raises:
        NotImplementedError: a model without the hook points used (not a TransformerLens bridge, or an
            attention type without per-head q/k/v input copies), or with post-attention norms (Gemma 2/3: a head's output is not
            additive in the residual stream).
    """
    if not hasattr(model, "set_use_split_qkv_input"):
        raise NotImplementedError(f"edge attribution needs a TransformerLens bridge, got {type(model).__name__}")
    if has_post_norms(model):
        raise NotImplementedError("edge attribution does not support post-attention norms (Gemma 2/3 blocks)")
    needed = ("attn.hook_q_input", "attn.hook_q", "attn.hook_z", "ln1.hook_in", "ln1.hook_out", "ln2.hook_in")
    missing = [n for n in [f"blocks.0.{h}" for h in needed] + ["ln_final.hook_in"] if n not in model.hook_dict]
    if missing:
        raise NotImplementedError(f"edge attribution needs the hook points {missing}, which this model lacks")


@contextlib.contextmanager
def split_qkv_inputs(model: Model) -> Iterator[Model]:
    """Within the block every head reads its query, key and value from its own copy of the residual stream
    (``blocks.{l}.attn.hook_q_input`` ``[batch, pos, n_heads, d_model]``; ``hook_k_input`` and ``hook_v_input``
    have ``n_key_value_heads`` copies), each normalised on its own: the model computes the same function, but
    a copy can be patched for one head's one input alone (exact path patching). Restored on exit.
    """
    before = bool(getattr(model.cfg, "use_split_qkv_input", False))
    model.set_use_split_qkv_input(True)
    try:
        yield model
    finally:
        model.set_use_split_qkv_input(before)
