"""Head scores: the :class:`HeadScores` result and :func:`score_heads`, which runs one of the four methods.

All scores have one sign convention: **a head's contribution to the metric** (positive = the head pushes the
bias up). For ablation that is ``metric(clean) - metric(head ablated)``; attribution patching estimates the
same number from one forward and one backward pass. The metric (see :mod:`biasgym_lens.heads.probes`) is the bias
logit difference of the token probes (``"token"``) or its excess over the control groups (``"excess"``). The
methods live in :mod:`biasgym_lens.heads.decomposition` (direct logit attribution, attention to the token) and
:mod:`biasgym_lens.heads.patching` (attribution patching, exact ablation).
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
from biasgym_lens.core.protocols import Model
from biasgym_lens.core.provenance import Provenance
from biasgym_lens.heads.decomposition import attention_scores, dla_scores
from biasgym_lens.heads.patching import ablation_scores, attribution_scores
from biasgym_lens.heads.probes import METRICS

__all__ = ["HeadScores", "METHODS", "score_heads", "spearman"]

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
    model: Model,
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
        injection: A :class:`~biasgym_lens.injection.artifact.Injection`.
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
