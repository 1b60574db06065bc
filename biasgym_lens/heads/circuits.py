"""The circuit of an injected bias: every edge's attribution score and the strongest edges, as a :class:`Circuit`.

:func:`circuit` runs edge attribution patching (:mod:`biasgym_lens.heads.edges`) on the bias's probes with the
injection applied. Scores follow the node scores' convention: an edge's contribution to the metric (the
token's bias logit difference minus the control groups' mean), positive = the edge pushes the bias up,
estimated to first order for zero-ablating the upstream output on that edge alone.

Read edges, not per-input totals: a pre-norm input is scale-invariant (the norm divides its scale out), so to
first order removing all of an input's sources changes nothing and its edges' signed scores sum to about zero
(exactly, up to the norm's epsilon and the bias terms, which are not nodes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float
from torch import Tensor

from biasgym_lens.core.checks import InputTypeError, check_choice, check_int, check_str_list
from biasgym_lens.core.protocols import Model
from biasgym_lens.core.provenance import Provenance
from biasgym_lens.heads.edge_graph import EdgeGraph, edge_graph, parse_node
from biasgym_lens.heads.edges import EDGE_MAX_TOKENS, edge_attribution_scores
from biasgym_lens.heads.interventions import validate_heads
from biasgym_lens.heads.probes import METRICS, build_probe_set

__all__ = ["Circuit", "circuit"]


@dataclass(frozen=True, eq=False)
class Circuit:
    """Edge attribution scores of every edge, with the strongest ``top_edges`` as the circuit.

    Attributes:
        per_prompt: ``[n_probes, n_upstream, n_downstream]`` scores, NaN where a pair is not an edge (indexed as
            in :attr:`graph`).
        graph: The nodes and edges (:class:`~biasgym_lens.heads.edge_graph.EdgeGraph`).
        top_edges: How many of the strongest edges (by ``|score|``) form the circuit.
        heads: Chosen heads to highlight, ``(layer, head)``.
        metric: ``"excess"`` or ``"token"``.
        bias: The bias name.
        provenance: The model that produced it.
        settings: Probe split, number of probes, control groups, token.
    """

    per_prompt: Float[Tensor, "prompt upstream downstream"]
    graph: EdgeGraph
    top_edges: int
    heads: tuple[tuple[int, int], ...]
    metric: str
    bias: str
    provenance: Provenance
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def scores(self) -> Float[Tensor, "upstream downstream"]:
        """Mean over probes (NaN where a pair is not an edge)."""
        return self.per_prompt.mean(0)

    def to_dataframe(self) -> pd.DataFrame:
        """Every edge, strongest first: ``upstream, upstream_kind, upstream_layer, upstream_head, downstream,
        downstream_kind, downstream_layer, downstream_head, input`` (``q``, ``k``, ``v``, ``mlp``, ``logits``),
        ``score, score_sem, rank`` (1 = largest ``|score|``), ``in_circuit`` (rank <= ``top_edges``),
        ``bias, metric``. Layers: -1 for the embedding, ``n_layers`` for the logits; heads: -1 where none."""
        g = self.graph
        up_idx, down_idx = (a.numpy() for a in g.valid().nonzero(as_tuple=True))
        n = self.per_prompt.shape[0]
        score = self.scores.numpy()[up_idx, down_idx]
        per = self.per_prompt.numpy()[:, up_idx, down_idx]
        sem = per.std(0, ddof=1) / np.sqrt(n) if n > 1 else np.full_like(score, np.nan)
        ups = [parse_node(u, g.n_layers) for u in g.upstream]
        downs = [g.downstream_node(j) for j in range(g.n_downstream)]
        df = pd.DataFrame({
            "upstream": np.array(g.upstream)[up_idx],
            "upstream_kind": [ups[i][0] for i in up_idx],
            "upstream_layer": [ups[i][1] for i in up_idx],
            "upstream_head": [ups[i][2] for i in up_idx],
            "downstream": [downs[j][0] for j in down_idx],
            "downstream_kind": [parse_node(downs[j][0], g.n_layers)[0] for j in down_idx],
            "downstream_layer": [downs[j][2] for j in down_idx],
            "downstream_head": [downs[j][3] for j in down_idx],
            "input": [downs[j][1] for j in down_idx],
            "score": score,
            "score_sem": sem,
        })
        order = np.argsort(-np.abs(score), kind="stable")
        df = df.iloc[order].reset_index(drop=True)
        df["rank"] = np.arange(1, len(df) + 1)
        df["in_circuit"] = df["rank"] <= self.top_edges
        df["bias"], df["metric"] = self.bias, self.metric
        return df

    def edges(self, k: int | None = None) -> pd.DataFrame:
        """The ``k`` strongest edges (default ``top_edges``) as rows of :meth:`to_dataframe`.

        Raises:
            InputTypeError: ``k`` not an integer.
            ValueError: ``k`` < 1.
        """
        k = self.top_edges if k is None else check_int(k, "k", minimum=1)
        return self.to_dataframe().head(k)

    def top(self, k: int | None = None) -> list[tuple[str, str]]:
        """The ``k`` strongest edges (default ``top_edges``) as ``(upstream, downstream input)`` names, e.g.
        ``("L3H1", "L21H1.k")``: the form :func:`~biasgym_lens.heads.path_patching.path_patching_scores` takes."""
        return [edge_name(row) for row in self.edges(k).itertuples()]

    def nodes(self) -> pd.DataFrame:
        """Every node: ``node, kind, layer, head, chosen, in_circuit`` (on an edge of the circuit), ``score_out``
        and ``score_in`` (sum of the scores of its circuit edges going out and coming in)."""
        g = self.graph
        names = list(g.upstream) + ["logits"]
        edges = self.edges()
        chosen = {f"L{layer}H{h}" for layer, h in self.heads}
        out = edges.groupby("upstream")["score"].sum()
        into = edges.groupby("downstream")["score"].sum()
        rows = []
        for name in names:
            kind, layer, head = parse_node(name, g.n_layers)
            rows.append({
                "node": name, "kind": kind, "layer": layer, "head": head, "chosen": name in chosen,
                "in_circuit": name in out.index or name in into.index,
                "score_out": float(out.get(name, 0.0)), "score_in": float(into.get(name, 0.0)),
            })
        return pd.DataFrame(rows)


def edge_name(row: Any) -> tuple[str, str]:
    """``(upstream, downstream input)`` of a row of :meth:`Circuit.to_dataframe` (``"L21H1.k"``, ``"MLP3"``)."""
    down = f"{row.downstream}.{row.input}" if row.input in ("q", "k", "v") else row.downstream
    return str(row.upstream), down


def _check_circuit_options(injection: Any, top_edges: Any, metric: Any, controls: Any, max_probes: Any, max_tokens: Any) -> int:
    if not all(hasattr(injection, a) for a in ("apply", "spec", "token")):
        raise InputTypeError(f"injection must be an Injection (from inject() or Injection.load), got {type(injection).__name__}")
    check_choice(metric, "metric", METRICS)
    if controls is not None:
        check_str_list(controls, "controls", nonempty=False)
    check_int(max_probes, "max_probes", minimum=1, none_ok=True)
    check_int(max_tokens, "max_tokens", minimum=1, none_ok=True)
    return check_int(top_edges, "top_edges", minimum=1)


def circuit(
    model: Model,
    injection: Any,
    top_edges: int = 30,
    *,
    heads: Sequence[tuple[int, int]] = (),
    probes: str = "select",
    metric: str = "excess",
    controls: list[str] | None = None,
    max_probes: int | None = None,
    max_tokens: int | None = EDGE_MAX_TOKENS,
) -> Circuit:
    """Score every edge of the model for how much it carries the injected bias; the strongest form the circuit.

    One forward and one backward pass per chunk of probes (edge attribution patching, see
    :mod:`biasgym_lens.heads.edges`); check a sample against exact path patching with
    :func:`~biasgym_lens.heads.edge_check.check_edges`.

    Args:
        model: The model the injection was trained in (a TransformerLens bridge without post-attention norms).
        injection: A :class:`~biasgym_lens.injection.artifact.Injection`.
        top_edges: How many of the strongest edges (by ``|score|``) form the circuit (table, figure).
        heads: Chosen heads to highlight, e.g. ``ScopeResult.chosen``.
        probes: Which probes (``"select"`` by default, as for the node scores).
        metric: ``"excess"`` (token minus control groups, default) or ``"token"``.
        controls: Control groups (default: the bias's).
        max_probes: Use at most this many probes.
        max_tokens: Chunk size in padded tokens (memory bound; same scores); None: one pass.

    Returns:
        A :class:`Circuit`.

    Raises:
        InputTypeError: an option of the wrong type (``top_edges=2.0``, ``controls="Japan"``, a head not a pair).
        ValueError: an option out of range, an unknown metric, a head outside the model, an injection from
            another model.
        NotImplementedError: a model that edge attribution does not cover (Gemma 2/3 post-norms).
    """
    top_edges = _check_circuit_options(injection, top_edges, metric, controls, max_probes, max_tokens)
    chosen = tuple(validate_heads(model, heads))
    with injection.apply(model):
        ps = build_probe_set(model, injection.spec, injection.token, probes=probes, controls=controls, max_probes=max_probes)
        per = edge_attribution_scores(model, ps, metric, max_tokens=max_tokens)
    settings = {"probes": probes, "n_probes": ps.n_probes, "controls": list(ps.controls), "token": injection.token,
                "max_probes": max_probes}
    return Circuit(per, edge_graph(model), top_edges, chosen, metric, injection.spec.name, Provenance.of(model), settings)

