"""MLP scores: whether the bias also lives outside attention, per MLP layer and per MLP neuron.

Same sign convention as the head scores (:mod:`biasgym_lens.heads.head_scores`): **a component's contribution
to the metric**, ``metric(clean) - metric(component zeroed)``, positive = it pushes the bias up; on the same
probe set (the injection applied, the select split, the token rows and the control groups' rows).

- An MLP layer is its output as it enters the residual stream, ``blocks.{l}.hook_mlp_out`` (after the
  post-MLP norm where the model has one). ``"ablation"`` zeroes it exactly, one batched pass per layer
  (resumed at that layer where :func:`~biasgym_lens.core.unembed.suffix_supported`); ``"attribution"`` is
  its first-order estimate ``grad . mlp_out`` from one forward and one backward pass.
- A neuron is one unit of the input to the down projection, ``blocks.{l}.mlp.hook_post`` (the activation,
  or in a gated MLP ``act(gate) * up``): its score is ``grad_i . act_i`` (attribution patching). Where the
  down projection is the last map before the residual stream, the neurons of a layer sum to the layer's
  attribution score minus ``grad . b_out`` (the down projection's bias, none in Llama-family models).

Both sum over the real positions of each row and add a probe's control rows to it (as the head scores do).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from biasgym_lens.core.checks import (
    InputTypeError,
    check_choice,
    check_int,
    check_int_list,
    check_str_list,
    is_int,
)
from biasgym_lens.core.hooks import hooked
from biasgym_lens.core.protocols import Model
from biasgym_lens.core.provenance import Provenance
from biasgym_lens.core.unembed import forward_keeping, suffix_answer_logits, suffix_supported, unembed_at
from biasgym_lens.heads.patching import acts_and_grads, probe_totals
from biasgym_lens.heads.probes import METRICS, ProbeSet, build_probe_set

__all__ = [
    "MlpScores", "NeuronScores", "MLP_METHODS", "mlp_scores", "neuron_scores", "mlp_attribution", "mlp_ablation",
    "neuron_attribution", "mlp_out_hook", "neuron_hook",
]

MLP_METHODS = ("attribution", "ablation")
MAX_TOKENS = 1024
"""Attribution runs over chunks of probes of about this many padded tokens (same scores, bounded memory)."""


def mlp_out_hook(layer: int) -> str:
    """The hook of MLP ``layer``'s output as it enters the residual stream."""
    return f"blocks.{layer}.hook_mlp_out"


def neuron_hook(layer: int) -> str:
    """The hook of MLP ``layer``'s neurons: the input of its down projection ``[batch, pos, d_mlp]``."""
    return f"blocks.{layer}.mlp.hook_post"


def _check_hooks(model: Model, names: Sequence[str]) -> None:
    missing = [n for n in names if n not in model.hook_dict]
    if missing:
        raise ValueError(f"this model has no hook {missing[0]!r}; MLP scores need it on every scored layer")


def _rank(values: Tensor) -> np.ndarray:
    """1 for the largest value (NaN last), stable."""
    v = torch.nan_to_num(values.flatten().float(), nan=-torch.inf)
    order = torch.argsort(v, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(order) + 1)
    return rank.numpy()


def _check_k(k: Any, n: int, what: str) -> int:
    if not is_int(k):
        raise InputTypeError(f"k must be an integer between 1 and the number of {what} ({n}), got {k!r} ({type(k).__name__})")
    if not 1 <= int(k) <= n:
        raise ValueError(f"k must be between 1 and the number of {what} ({n}), got {k}")
    return int(k)


@dataclass(frozen=True, eq=False)
class MlpScores:
    """Scores of every MLP layer.

    Attributes:
        per_prompt: ``[n_probes, n_layers]`` scores on each probe.
        method: One of :data:`MLP_METHODS`.
        metric: ``"excess"`` or ``"token"``.
        bias: The bias name.
        provenance: The model that produced it.
        settings: The probe split, probes, control groups and token.
    """

    per_prompt: Float[Tensor, "prompt n_layers"]
    method: str
    metric: str
    bias: str
    provenance: Provenance
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def scores(self) -> Float[Tensor, " n_layers"]:
        """Mean over probes."""
        return self.per_prompt.mean(0)

    @property
    def n_probes(self) -> int:
        return int(self.per_prompt.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.per_prompt.shape[1])

    def top(self, k: int, *, absolute: bool = False) -> list[int]:
        """The ``k`` layers with the largest score (or ``|score|``).

        Raises:
            InputTypeError: ``k`` not an integer.
            ValueError: ``k`` not between 1 and the number of layers.
        """
        k = _check_k(k, self.n_layers, "layers")
        s = self.scores.abs() if absolute else self.scores
        return [int(i) for i in torch.argsort(s, descending=True, stable=True)[:k]]

    def to_dataframe(self) -> pd.DataFrame:
        """Long format: one row per layer with ``layer, score, score_sem, rank, method, metric, bias``."""
        n = self.n_probes
        sem = self.per_prompt.std(0) / n**0.5 if n > 1 else torch.full_like(self.scores, float("nan"))
        return pd.DataFrame({
            "layer": np.arange(self.n_layers), "score": self.scores.numpy(), "score_sem": sem.numpy(),
            "rank": _rank(self.scores), "method": self.method, "metric": self.metric, "bias": self.bias,
        })


@dataclass(frozen=True, eq=False)
class NeuronScores:
    """Attribution-patching scores of MLP neurons (layers not scored hold NaN).

    Attributes:
        per_prompt: ``[n_probes, n_layers, d_mlp]`` scores on each probe.
        layers: The layers scored.
        metric: ``"excess"`` or ``"token"``.
        bias: The bias name.
        provenance: The model that produced it.
        n_top: How many neurons :meth:`to_dataframe` lists by default.
        settings: The probe split, probes, control groups and token.
    """

    per_prompt: Float[Tensor, "prompt n_layers d_mlp"]
    layers: tuple[int, ...]
    metric: str
    bias: str
    provenance: Provenance
    n_top: int = 50
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def scores(self) -> Float[Tensor, "n_layers d_mlp"]:
        """Mean over probes."""
        return self.per_prompt.mean(0)

    @property
    def n_probes(self) -> int:
        return int(self.per_prompt.shape[0])

    def top(self, k: int, *, absolute: bool = False) -> list[tuple[int, int]]:
        """The ``k`` scored neurons with the largest score (or ``|score|``), as ``(layer, neuron)``.

        Raises:
            InputTypeError: ``k`` not an integer.
            ValueError: ``k`` not between 1 and the number of scored neurons.
        """
        d_mlp = self.scores.shape[1]
        k = _check_k(k, len(self.layers) * d_mlp, "scored neurons")
        s = self.scores.abs() if absolute else self.scores
        idx = torch.argsort(torch.nan_to_num(s.flatten(), nan=-torch.inf), descending=True, stable=True)[:k]
        return [(int(i) // d_mlp, int(i) % d_mlp) for i in idx]

    def to_dataframe(self, k: int | None = None, *, absolute: bool = True) -> pd.DataFrame:
        """The top ``k`` neurons (default :attr:`n_top`) by ``|score|`` (or by score with ``absolute=False``):
        ``layer, neuron, score, rank, metric, bias``, ``rank`` 1 first."""
        top = self.top(self.n_top if k is None else k, absolute=absolute)
        s = self.scores
        return pd.DataFrame({
            "layer": [layer for layer, _ in top], "neuron": [i for _, i in top],
            "score": [float(s[layer, i]) for layer, i in top], "rank": np.arange(1, len(top) + 1),
            "metric": self.metric, "bias": self.bias,
        })


# ------------------------------------------------------------------------------ on a probe set


def _attribution(model: Model, ps: ProbeSet, metric: str, names: list[str], per_unit: bool) -> list[Tensor]:
    """``grad . act`` at each hook of ``names`` over the real positions, per probe: ``[n_probes]`` each, or
    ``[n_probes, d]`` (one per unit of the last dimension) with ``per_unit``; chunked over probes."""
    out: list[list[Tensor]] = [[] for _ in names]
    for chunk in ps.chunks(MAX_TOKENS):
        acts, grads, _ = acts_and_grads(
            model, chunk.batch, lambda lg, c=chunk: c.metric_per_probe(lg, metric).sum(), names, chunk.answer_positions
        )
        mask = chunk.batch.attention_mask[:, :, None].float()
        for i, n in enumerate(names):
            per_row = ((grads[n] * acts[n]).float() * mask.to(acts[n].device)).sum(1)  # [rows, d]
            out[i].append(probe_totals(per_row if per_unit else per_row.sum(-1), chunk, metric).cpu())
    return [torch.cat(parts) for parts in out]


def mlp_attribution(model: Model, ps: ProbeSet, metric: str = "excess") -> Float[Tensor, "prompt n_layers"]:
    """Attribution patching of every MLP layer: ``grad . (mlp_out - 0)`` per probe, summed over real positions.

    Raises:
        ValueError: the model has no ``hook_mlp_out``.
    """
    names = [mlp_out_hook(layer) for layer in range(model.cfg.n_layers)]
    _check_hooks(model, names)
    return torch.stack(_attribution(model, ps, metric, names, per_unit=False), dim=1)


def neuron_attribution(
    model: Model, ps: ProbeSet, metric: str = "excess", layers: Sequence[int] | None = None
) -> Float[Tensor, "prompt n_layers d_mlp"]:
    """Attribution patching of every neuron of ``layers`` (default all; other layers NaN): ``grad_i . act_i``
    at the input of the down projection, per probe, summed over real positions.

    Raises:
        ValueError: the model has no ``mlp.hook_post`` on a scored layer.
    """
    todo = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    names = [neuron_hook(layer) for layer in todo]
    _check_hooks(model, names)
    per = _attribution(model, ps, metric, names, per_unit=True)
    out = torch.full((ps.n_probes, model.cfg.n_layers, int(per[0].shape[1])), float("nan"))
    for layer, scores in zip(todo, per):
        out[:, layer] = scores
    return out


def _zero(x: Tensor, hook: Any) -> Tensor:
    return torch.zeros_like(x)


@torch.no_grad()
def mlp_ablation(model: Model, ps: ProbeSet, metric: str = "excess") -> Float[Tensor, "prompt n_layers"]:
    """Exact effect of zeroing each MLP layer's output alone: ``metric(clean) - metric(MLP l zeroed)``.

    One pass per layer over the whole probe batch; where :func:`~biasgym_lens.core.unembed.suffix_supported` it
    resumes at layer ``l`` from the cached clean residual and unembeds only the answer positions.

    Raises:
        ValueError: the model has no ``hook_mlp_out``.
    """
    L = model.cfg.n_layers
    _check_hooks(model, [mlp_out_hook(layer) for layer in range(L)])
    b, answer = ps.batch, ps.answer_positions
    rows = torch.arange(len(b))
    resume = suffix_supported(model)
    final, resid = forward_keeping(model, b.input_ids, b.attention_mask, range(L) if resume else [], unembed=not resume)
    clean = ps.metric_per_probe(unembed_at(model, final, rows, answer) if resume else final, metric)
    out = torch.empty(ps.n_probes, L)
    for layer in range(L):
        with hooked(model, fwd_hooks=[(mlp_out_hook(layer), _zero)]):
            if resume:
                logits = suffix_answer_logits(model, resid[layer], layer, b.attention_mask, answer)
            else:
                logits = model(b.input_ids, attention_mask=b.attention_mask)
        out[:, layer] = (clean - ps.metric_per_probe(logits, metric)).cpu()
    return out


# ------------------------------------------------------------------------------ entry points


def _check_options(injection: Any, metric: Any, max_probes: Any, controls: Any) -> None:
    """The options both entry points share (the probe split is checked by :func:`build_probe_set`)."""
    if not all(hasattr(injection, a) for a in ("apply", "spec", "token")):
        raise InputTypeError(f"injection must be an Injection (from inject() or Injection.load), got {type(injection).__name__}")
    check_choice(metric, "metric", METRICS)
    check_int(max_probes, "max_probes", minimum=1, none_ok=True)
    if controls is not None:
        check_str_list(controls, "controls", nonempty=False)


def _settings(ps: ProbeSet, probes: Any) -> dict[str, Any]:
    return {"probes": probes if isinstance(probes, str) else list(probes), "n_probes": ps.n_probes,
            "controls": list(ps.controls), "token": ps.token}


def mlp_scores(
    model: Model,
    injection: Any,
    *,
    method: str = "attribution",
    metric: str = "excess",
    max_probes: int | None = None,
    controls: list[str] | None = None,
    probes: str = "select",
) -> MlpScores:
    """Score every MLP layer for how much it carries the injected bias, beside the heads' scores.

    Args:
        model: The model the injection was trained in.
        injection: An :class:`~biasgym_lens.injection.artifact.Injection`.
        method: ``"attribution"`` (default: first order, one forward and one backward pass) or ``"ablation"``
            (exact: each MLP output zeroed alone, one pass per layer).
        metric: ``"excess"`` (token minus control groups, default) or ``"token"``.
        max_probes: Use at most this many probes.
        controls: Control groups (default: the bias's).
        probes: Which probes (``"select"`` by default, as :func:`~biasgym_lens.heads.head_scores.score_heads`).

    Returns:
        :class:`MlpScores` with per-probe ``[n_probes, n_layers]`` scores.

    Raises:
        InputTypeError: an option of the wrong type (``max_probes=2.0``, ``controls="Japan"``, ``method=1``).
        ValueError: an unknown method, metric or probe split, ``max_probes < 1``, or a model without
            ``hook_mlp_out``.

    Examples:
        >>> mlp = mlp_scores(model, inj)                       # doctest: +SKIP
        >>> mlp.top(3), mlp.to_dataframe()                      # doctest: +SKIP
    """
    check_choice(method, "method", MLP_METHODS)
    _check_options(injection, metric, max_probes, controls)
    with injection.apply(model):
        ps = build_probe_set(model, injection.spec, injection.token, probes=probes, controls=controls, max_probes=max_probes)
        per = mlp_attribution(model, ps, metric) if method == "attribution" else mlp_ablation(model, ps, metric)
    return MlpScores(per, method, metric, injection.spec.name, Provenance.of(model), _settings(ps, probes))


def neuron_scores(
    model: Model,
    injection: Any,
    *,
    layers: Sequence[int] | None = None,
    metric: str = "excess",
    max_probes: int | None = None,
    top: int = 50,
    probes: str = "select",
) -> NeuronScores:
    """Score the MLP neurons of ``layers`` by attribution patching (one forward and one backward pass).

    A neuron's score estimates ``metric(clean) - metric(neuron zeroed)`` as ``grad_i . act_i`` at the input of
    the down projection (``blocks.{l}.mlp.hook_post``; in a gated MLP the product ``act(gate) * up``).

    Args:
        model: The model the injection was trained in.
        injection: An :class:`~biasgym_lens.injection.artifact.Injection`.
        layers: The layers to score (default all); distinct integers in ``0..n_layers-1``.
        metric: ``"excess"`` (default) or ``"token"``.
        max_probes: Use at most this many probes.
        top: How many neurons :meth:`NeuronScores.to_dataframe` lists (at most the number scored).
        probes: Which probes (``"select"`` by default).

    Returns:
        :class:`NeuronScores` with per-probe ``[n_probes, n_layers, d_mlp]`` scores (NaN outside ``layers``).

    Raises:
        InputTypeError: an option of the wrong type (``layers=3``, ``layers=[1.0]``, ``top=2.5``).
        ValueError: a layer out of range or repeated, an empty ``layers``, an unknown metric or probe split,
            ``top < 1``, or a model without ``mlp.hook_post``.
    """
    L = model.cfg.n_layers
    todo = list(range(L)) if layers is None else check_int_list(layers, "layers", minimum=0, maximum=L - 1, unique=True)
    top = check_int(top, "top", minimum=1)
    _check_options(injection, metric, max_probes, None)
    with injection.apply(model):
        ps = build_probe_set(model, injection.spec, injection.token, probes=probes, max_probes=max_probes)
        per = neuron_attribution(model, ps, metric, todo)
    n_top = min(top, len(todo) * int(per.shape[2]))
    return NeuronScores(per, tuple(todo), metric, injection.spec.name, Provenance.of(model), n_top, _settings(ps, probes))

