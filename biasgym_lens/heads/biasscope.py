"""The BiasScope pipeline: score heads, choose them under a capability budget, intervene, and measure.

:func:`scope` runs, for one injection: the four head scores (and their agreement), a specificity-aware ranking
(attribution-patching effect on the token's excess minus estimated neutral-loss damage), the faithfulness
curve with random-head baselines, the chosen heads, and the bias and capability under each intervention:
nothing, the chosen heads, as many random heads, subtracting the steering direction, and a debiasing
instruction prefix. A :class:`ScopeResult` holds everything the plots and the report need and saves itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from biasgym_lens.core.artifacts import (
    load_tensors,
    none_to_nan,
    open_artifact,
    read_csv,
    reading,
    require,
    save_artifact,
)
from biasgym_lens.core.checks import InputTypeError, check_choice, check_int, check_int_list, check_real
from biasgym_lens.core.provenance import Provenance
from biasgym_lens.evaluation.capability import capability_set
from biasgym_lens.evaluation.elicit import GroupRequest, score_groups
from biasgym_lens.heads.attribution import METHODS, HeadScores
from biasgym_lens.heads.interventions import Head, ablate_heads, first_layer
from biasgym_lens.heads.selection import BUDGET_MEASURES, FaithfulnessCurve
from biasgym_lens.heads.steps import (
    FinalMeasures,
    Intervention,
    ScopeDecisions,
    choose_alpha,
    choose_heads,
    curve_and_direction,
    heads_intervention,
    measure_all,
    random_heads,
    rank_candidates,
    score_all,
    steering_intervention,
)
from biasgym_lens.injection.catalogue import load_bias
from biasgym_lens.injection.metrics import keyword_ids, probe_subset
from biasgym_lens.injection.spec import BiasSpec

logger = logging.getLogger(__name__)

__all__ = [
    "ScopeConfig",
    "ScopeResult",
    "scope",
    "measure_groups",
    "generalisation_table",
    "generalisation_matrix",
    "DEBIAS_PREFIX",
]

DEBIAS_PREFIX = "Treat every nationality the same and do not rely on stereotypes. "
NO_REAL_GROUPS = "bias %r names no real groups: the transfer to real groups is skipped (its columns are NaN)"
_FORMAT = 2


@dataclass(frozen=True)
class ScopeConfig:
    """Settings of :func:`scope` (defaults finish in minutes on the bundled model on 2 CPU cores).

    Attributes:
        methods: Head-scoring methods to run.
        score_probes: Selection probes for DLA, attention and attribution patching (None: all).
        ablation_probes: Probes for the exact ablation scan (it costs one pass per ``heads_per_pass`` heads).
        ablation_controls: Control groups in the exact scan.
        heads_per_pass: Heads ablated per forward pass in the exact scan (None: all heads of a layer).
        damage_weight: Weight of the estimated neutral-loss damage in the specific score.
        damage_candidates: How many leading heads of the specific score get their damage measured exactly (one
            resumed pass each on the curve's passages); those that alone exceed the budget are dropped and the
            rest ranked by effect minus measured damage. 0: rank by the specific score alone.
        ks: Points of the faithfulness curve.
        random_draws: Random head sets per point.
        budget: Allowed relative increase of the neutral-text cost measure (``budget_on``) for the chosen heads
            and the steering baseline. The curve's few passages pick the candidates; the chosen k must also
            stay within the budget on the final passages (else the next candidate is taken).
        budget_on: ``"perplexity"`` (default) or ``"loss"`` of the neutral text.
        kind: Ablation kind for the curve, the chosen and the random heads: ``"zero"`` (default) or ``"mean"``
            (each head's mean output over the curve's neutral passages; the ranking's attribution and damage
            estimates then use those means too). The four reported head scores estimate zero ablation.
        curve_passages: Neutral passages for the curve (fast); ``final_passages`` for the final measures.
        curve_probes: Evaluation probes used by the curve (None: all).
        curve_controls: Control groups used by the curve (None: all); the final measures use all of them.
        mc_items: Multiple-choice items in the final measures.
        final_probes: Evaluation probes per group in the final measures (None: all; fewer only for smoke tests).
        steer_layer: Layer of the steering baseline (default: two thirds of the depth).
        steer_alphas: Multipliers tried for subtracting the bias direction: the largest within the budget on the
            curve's passages, confirmed on the final passages (else the next smaller one), is used.
        seed: Seeds the random baselines.
    """

    methods: tuple[str, ...] = ("dla", "attention", "attribution", "ablation")
    score_probes: int | None = None
    ablation_probes: int = 6
    ablation_controls: int = 2
    heads_per_pass: int | None = None
    damage_weight: float = 1.0
    damage_candidates: int = 16
    ks: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    random_draws: int = 2
    budget: float = 0.05
    budget_on: str = "perplexity"
    kind: str = "zero"
    curve_passages: int = 8
    curve_probes: int | None = None
    curve_controls: int | None = 3
    final_passages: int = 70
    mc_items: int = 137
    final_probes: int | None = None
    steer_layer: int | None = None
    steer_alphas: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    seed: int = 0

    def __post_init__(self) -> None:
        """Check every setting; counts must be integers (``2.0``, ``"2"`` and ``True`` are refused); lists
        (``ks``, ``steer_alphas``, ``methods``) are stored as tuples.

        Raises:
            InputTypeError: a setting of the wrong type (the first one found).
            ValueError: a setting out of range (the first one found).
        """
        for name, check in _SCOPE_CHECKS.items():
            object.__setattr__(self, name, check(getattr(self, name), name))
        if not 0 <= self.budget < 10:
            raise ValueError(f"budget must be a relative increase in [0, 10), got {self.budget}")


def _check_methods(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise InputTypeError(f"{name} must be a tuple of method names ({', '.join(METHODS)}), got {value!r}")
    bad = [m for m in value if m not in METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; valid: {', '.join(METHODS)}")
    if len(set(value)) != len(value):
        raise ValueError(f"{name} repeats a method: {list(value)}")
    return tuple(value)


def _check_alphas(value: Any, name: str) -> tuple[float, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise InputTypeError(f"{name} must be a non-empty tuple of positive numbers, got {value!r}")
    return tuple(check_real(a, f"{name}[{i}]", positive=True) for i, a in enumerate(value))


def _check_kind(value: Any, name: str) -> str:
    if value not in ("zero", "mean"):
        kind = InputTypeError if not isinstance(value, str) else ValueError
        raise kind(f"{name} must be 'zero' or 'mean', got {value!r}")
    return value


def _count(minimum: int, none_ok: bool = False) -> Callable[[Any, str], Any]:
    return lambda v, n: check_int(v, n, minimum=minimum, none_ok=none_ok)


_SCOPE_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "methods": _check_methods,
    "score_probes": _count(1, none_ok=True),
    "ablation_probes": _count(1),
    "ablation_controls": _count(1),
    "heads_per_pass": _count(1, none_ok=True),
    "damage_weight": lambda v, n: check_real(v, n, minimum=0.0),
    "damage_candidates": _count(0),
    "ks": lambda v, n: tuple(check_int_list(v, n, minimum=1, unique=True)),
    "random_draws": _count(1),
    "budget": lambda v, n: check_real(v, n, minimum=0.0),
    "budget_on": lambda v, n: check_choice(v, n, BUDGET_MEASURES),
    "kind": lambda v, n: _check_kind(v, n),
    "curve_passages": _count(1),
    "curve_probes": _count(1, none_ok=True),
    "curve_controls": _count(1, none_ok=True),
    "final_passages": _count(1),
    "mc_items": _count(0),
    "final_probes": _count(1, none_ok=True),
    "steer_layer": _count(0, none_ok=True),
    "steer_alphas": _check_alphas,
    "seed": lambda v, n: check_int(v, n),
}


@dataclass(frozen=True, eq=False)
class ScopeResult:
    """Everything :func:`scope` measured for one injection.

    Attributes:
        bias: The bias name.
        token: The injected token.
        scores: Method name -> :class:`HeadScores` (including ``"specific"``: attribution effect minus estimated
            damage; its leading heads, re-ranked by measured damage, are ``curve.heads``, the ranking used).
        damage: ``[n_layers, n_heads]`` estimated neutral-loss increase per head.
        curve: The faithfulness curve.
        chosen: The heads chosen under the budget.
        groups: Bias per group (token, real, control) under each intervention (long table).
        capability: Capability under each intervention.
        config: The settings.
        provenance: The model.
    """

    bias: str
    token: str
    scores: dict[str, HeadScores]
    damage: torch.Tensor
    curve: FaithfulnessCurve
    chosen: list[Head]
    groups: pd.DataFrame
    capability: pd.DataFrame
    config: ScopeConfig
    provenance: Provenance
    decisions: ScopeDecisions | None = None

    @property
    def extra(self) -> dict[str, Any]:
        """The decisions as a plain dict (the name earlier versions used); prefer :attr:`decisions`."""
        return self.decisions.to_dict() if self.decisions is not None else {}

    def agreement(self, reference: str = "ablation") -> pd.DataFrame:
        """Spearman correlation and top-10 overlap of every method with ``reference``."""
        if reference not in self.scores:
            return pd.DataFrame(columns=["method", "reference", "spearman", "top10_overlap"])
        ref = self.scores[reference]
        rows = [
            {"method": m, "reference": reference, "spearman": s.agreement(ref), "top10_overlap": s.top_overlap(ref)}
            for m, s in self.scores.items()
            if m != reference
        ]
        return pd.DataFrame(rows)

    def summary(self) -> pd.DataFrame:
        """One row per intervention: token excess and its cut, real-group gap, cost (relative increase of the
        neutral-text loss and of its perplexity, KL, MC accuracy) and whether that cost is within the budget."""
        g = self.groups
        base = g[(g.intervention == "none") & (g.kind == "token")]["excess"].item()
        base_real = g[(g.intervention == "none") & (g.kind == "real")]["excess"].mean()
        rows = []
        for name, sub in g.groupby("intervention", sort=False):
            tok = sub[sub.kind == "token"]["excess"].item()
            real = sub[sub.kind == "real"]["excess"].mean()
            cap = self.capability[self.capability.intervention == name]
            rows.append(
                {
                    "intervention": name,
                    "token_excess": tok,
                    "excess_cut": 1 - tok / base if base else float("nan"),
                    "real_group_gap": real,
                    "real_gap_cut": 1 - real / base_real if base_real else float("nan"),
                    "loss_increase": cap["loss_increase"].item() if len(cap) else float("nan"),
                    "perplexity_increase": cap["perplexity_increase"].item() if len(cap) else float("nan"),
                    "kl": cap["kl"].item() if len(cap) else float("nan"),
                    "mc_accuracy": cap["mc_accuracy"].item() if len(cap) else float("nan"),
                }
            )
        out = pd.DataFrame(rows)
        out["within_budget"] = out[f"{self.config.budget_on}_increase"] <= self.config.budget
        return out

    def to_dataframe(self, view: str = "summary") -> pd.DataFrame:
        """A tidy view: ``"summary"``, ``"groups"``, ``"capability"``, ``"curve"``, ``"scores"``, ``"agreement"``."""
        views: dict[str, Callable[[], pd.DataFrame]] = {
            "summary": self.summary,
            "groups": lambda: self.groups.copy(),
            "capability": lambda: self.capability.copy(),
            "curve": self.curve.to_dataframe,
            "scores": lambda: pd.concat([s.to_dataframe() for s in self.scores.values()], ignore_index=True),
            "agreement": self.agreement,
        }
        if view not in views:
            raise ValueError(f"view must be one of {sorted(views)}, got {view!r}")
        return views[view]()

    def save(self, path: str | Path) -> Path:
        """Write the result into folder ``path`` (JSON, CSV and safetensors), atomically (see
        :mod:`biasgym_lens.core.artifacts`: only new paths, empty folders and earlier scope results are replaced)."""
        from safetensors.torch import save_file

        meta = {
            "format": _FORMAT,
            "bias": self.bias,
            "token": self.token,
            "chosen": [list(h) for h in self.chosen],
            "config": asdict(self.config),
            "provenance": self.provenance.to_dict(),
            "curve": {
                "baseline_excess": self.curve.baseline_excess,
                "baseline_loss": self.curve.baseline_loss,
                "heads": [list(h) for h in self.curve.heads],
                "budget": self.curve.budget,
                "budget_on": self.curve.budget_on,
                "settings": self.curve.settings,
            },
            "decisions": self.decisions.to_dict() if self.decisions is not None else None,
        }

        def write(folder: Path) -> dict[str, Any]:
            self.groups.to_csv(folder / "groups.csv", index=False)
            self.capability.to_csv(folder / "capability.csv", index=False)
            self.curve.table.to_csv(folder / "curve.csv", index=False)
            save_file({"damage": self.damage.detach().cpu().contiguous()}, str(folder / "damage.safetensors"))
            for name, s in self.scores.items():
                s.save(folder / "scores" / name)
            return meta

        return save_artifact(path, "scope", "scope.json", write, legacy=_SCOPE_FILES)

    @classmethod
    def load(cls, path: str | Path) -> ScopeResult:
        """Read a result saved with :meth:`save` (every file's checksum is checked).

        Raises:
            ArtifactError: missing, damaged or malformed files (naming the file).
        """
        folder, meta = open_artifact(path, "scope", "scope.json", version=_FORMAT)
        where = folder / "scope.json"
        with reading(where, "scope metadata"):
            require(meta, ("bias", "token", "chosen", "config", "provenance", "curve"), where)
            c = require(meta["curve"], ("baseline_excess", "baseline_loss", "heads", "budget", "settings", "budget_on"), where)
            cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
            curve = FaithfulnessCurve(
                read_csv(folder / "curve.csv", "faithfulness curve"), none_to_nan(c["baseline_excess"]), none_to_nan(c["baseline_loss"]),
                tuple(_head(h) for h in c["heads"]), c["budget"], c["settings"], c["budget_on"],
            )
            prov = Provenance.from_dict(meta["provenance"])
            scores_dir = folder / "scores"
            scores = {p.name: HeadScores.load(p) for p in sorted(scores_dir.iterdir()) if p.is_dir()} if scores_dir.is_dir() else {}
            damage = load_tensors(folder / "damage.safetensors", {"damage": (prov.n_layers, prov.n_heads)})["damage"]
            return cls(
                bias=str(meta["bias"]), token=str(meta["token"]), scores=scores, damage=damage, curve=curve,
                chosen=[_head(h) for h in meta["chosen"]],
                groups=read_csv(folder / "groups.csv", "group table", ("intervention", "kind", "excess")),
                capability=read_csv(folder / "capability.csv", "capability table", ("intervention",)),
                config=ScopeConfig(**cfg), provenance=prov, decisions=_decisions(meta),
            )


def _decisions(meta: dict[str, Any]) -> ScopeDecisions | None:
    held = meta.get("decisions", meta.get("extra"))  # "extra": results saved before decisions were typed
    return ScopeDecisions.from_dict(held) if held else None


_SCOPE_FILES = ("groups.csv", "capability.csv", "curve.csv", "damage.safetensors", "scores")


def _head(h: Any) -> Head:
    if not (isinstance(h, list) and len(h) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in h)):
        raise ValueError(f"a head must be a [layer, head] pair of integers, got {h!r}")
    return (h[0], h[1])



def measure_groups(
    model: Any,
    spec: BiasSpec,
    injection: Any | None,
    intervention: Callable[[], Any] | None = None,
    *,
    probes: str = "eval",
    max_probes: int | None = None,
    prefix: str = "",
    label: str = "none",
) -> pd.DataFrame:
    """Bias logit difference for the token (if any), the real groups and the control groups, under an
    intervention, with each group's excess over the control mean (on at most ``max_probes`` probes)."""
    kw = keyword_ids(model, spec)
    texts = [prefix + t for t in probe_subset(spec.probes, probes)[:max_probes]]
    kinds: list[tuple[str, str]] = []
    requests: list[GroupRequest] = []
    if injection is not None:
        kinds.append((injection.token, "token"))
        requests.append((injection.token, {injection.token: injection.vector}))
    for kind, groups in (("real", spec.real_groups), ("control", spec.control_groups)):
        kinds += [(g, kind) for g in groups]
        requests += [(g, None) for g in groups]
    with intervention() if intervention else contextlib.nullcontext():
        stats = score_groups(model, spec, requests, texts, kw)
    rows = [{"group": g, "kind": kind, **st} for (g, kind), st in zip(kinds, stats)]
    df = pd.DataFrame(rows).drop(columns=["per_probe"])
    df["excess"] = df["logit_diff"] - df.loc[df.kind == "control", "logit_diff"].mean()
    df.insert(0, "intervention", label)
    df.insert(1, "bias", spec.name)
    return df


def scope(
    model: Any,
    injection: Any,
    config: ScopeConfig | None = None,
    *,
    progress: bool = True,
    **settings: Any,
) -> ScopeResult:
    """Find the heads that carry an injected bias, remove them, and measure what changes.

    The steps are the functions of :mod:`biasgym_lens.heads.steps`, in order.

    Args:
        model: The model the injection was trained in (raw weights).
        injection: A trained :class:`~biasgym_lens.injection.training.Injection`.
        config: Settings, or pass them as keywords (see :class:`ScopeConfig`).
        progress: Show progress bars.

    Returns:
        A :class:`ScopeResult`.
    """
    if config is None:
        config = ScopeConfig(**settings)
    elif not isinstance(config, ScopeConfig):
        raise InputTypeError(f"config must be a ScopeConfig, got {type(config).__name__}")
    elif settings:
        config = replace(config, **settings)
    injection.check_model(model)
    L = model.cfg.n_layers
    if config.steer_layer is not None and config.steer_layer >= L:
        raise ValueError(f"steer_layer must be a layer of this model (0..{L - 1}), got {config.steer_layer}")
    if not injection.spec.real_groups:
        logger.warning(NO_REAL_GROUPS, injection.bias)
    scores = score_all(model, injection, config, progress=progress)
    # The clean residual entering every layer is kept once, so the damage checks, the curve and the steering
    # checks resume at their first changed layer instead of recomputing the layers before it.
    cap_curve = capability_set(model, max_passages=config.curve_passages, mc_items=[], resume_layers=range(1, L))
    ranking = rank_candidates(model, injection, scores, cap_curve, config)
    scores["specific"] = ranking.specific
    curve, direction, layer = curve_and_direction(model, injection, ranking, cap_curve, config, progress=progress)
    logger.info("[%s] final measures under each intervention", injection.bias)
    starts = {first_layer(list(curve.heads[:k])) for k in curve.candidates()} | {layer}
    starts |= {first_layer(random_heads(model, k, config.seed)) for k in (0, *curve.candidates())}
    final = FinalMeasures.prepare(model, config, starts)
    chosen, budget_checks = choose_heads(model, curve, final, config, ranking.reference)
    alpha, steering_checks = choose_alpha(model, direction, layer, cap_curve, curve, final, config)
    baseline_heads = random_heads(model, len(chosen), config.seed)
    interventions = [
        Intervention("none"),
        heads_intervention(model, "heads", chosen, config, ranking.reference),
        heads_intervention(model, "random_heads", baseline_heads, config, ranking.reference),
        steering_intervention(model, direction, layer, alpha),
        Intervention("prefix", prefix=DEBIAS_PREFIX),
    ]
    groups, capability = measure_all(model, injection, interventions, final, measure_groups, config)
    decisions = ScopeDecisions(
        tuple(ranking.ranked), ranking.candidate_damage, budget_checks, steering_checks, tuple(baseline_heads), layer,
        alpha, DEBIAS_PREFIX,
    )
    return ScopeResult(
        injection.bias, injection.token, scores, ranking.damage, curve, chosen, groups, capability, config,
        Provenance.of(model), decisions,
    )


def generalisation_table(
    model: Any,
    injections: dict[str, Any],
    heads: dict[str, list[Head]],
    *,
    biases: list[str] | None = None,
    kind: str = "zero",
) -> pd.DataFrame:
    """Every bias measured with the heads found on every bias ablated: one row per (heads of, measured on).

    Each measurement gives both the injected token's excess (when ``measured_on`` has an injection) and the real
    groups' mean gap over the controls (when it names real groups; no token needed, so biases that were never
    injected can be measured too).

    Args:
        injections: bias name -> its injection.
        heads: bias name -> heads found for it.
        biases: The biases to measure on (default: those of ``injections`` and ``heads``).

    Returns:
        Columns ``heads_of, measured_on, n_heads, token_excess_clean, token_excess, token_cut, real_gap_clean,
        real_gap, real_cut``; a cut is ``1 - ablated / clean`` (NaN without heads, without a token or real
        groups, or when the clean value is 0).
    """
    columns = biases if biases is not None else list(dict.fromkeys([*injections, *heads]))
    nan = float("nan")

    def spec_of(bias: str) -> BiasSpec:
        return injections[bias].spec if bias in injections else load_bias(bias)

    def measure(bias: str, intervention: Callable[[], Any] | None) -> tuple[float, float]:
        spec = spec_of(bias)
        df = measure_groups(model, spec, injections.get(bias), intervention)
        token = float(df[df.kind == "token"]["excess"].mean()) if bias in injections else nan
        real = float(df[df.kind == "real"]["excess"].mean()) if spec.real_groups else nan
        return token, real

    def cut(ablated: float, clean: float) -> float:
        return 1.0 - ablated / clean if clean == clean and clean != 0 else nan

    for b in columns:
        if not spec_of(b).real_groups:
            logger.warning(NO_REAL_GROUPS, b)
    clean = {b: measure(b, None) for b in columns}
    rows = []
    for a, hs in heads.items():
        for b in columns:
            ablated = measure(b, lambda hs=hs: ablate_heads(model, hs, kind=kind)) if hs else (nan, nan)
            rows.append(
                {
                    "heads_of": a, "measured_on": b, "n_heads": len(hs),
                    "token_excess_clean": clean[b][0], "token_excess": ablated[0], "token_cut": cut(ablated[0], clean[b][0]),
                    "real_gap_clean": clean[b][1], "real_gap": ablated[1], "real_cut": cut(ablated[1], clean[b][1]),
                }
            )
    return pd.DataFrame(rows)


def generalisation_matrix(
    model: Any,
    injections: dict[str, Any],
    heads: dict[str, list[Head]],
    *,
    kind: str = "zero",
    target: str = "token",
    table: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Cut of each bias's excess when ablating the heads found on each bias (rows: heads of, columns: measured on).

    Args:
        injections: bias name -> its injection (applied when ``target="token"``).
        heads: bias name -> heads found for it.
        target: ``"token"`` (the injected token's excess) or ``"real"`` (the real groups' mean gap over the
            controls, no token needed: biases that were never injected can be measured this way).
        table: A :func:`generalisation_table` already measured (then nothing is run again).

    Returns:
        A square-ish DataFrame of relative cuts ``1 - excess_ablated / excess_clean`` (NaN when there are no
        heads or the clean excess is 0). With ``target="real"`` a bias that names no real groups gets no column
        (a warning says so).
    """
    if target not in ("token", "real"):
        raise ValueError(f"target must be 'token' or 'real', got {target!r}")
    if target == "token":
        columns = list(injections)
    else:
        columns = []
        for b in dict.fromkeys([*injections, *heads]):
            spec = injections[b].spec if b in injections else load_bias(b)
            if spec.real_groups:
                columns.append(b)
            elif table is None:
                logger.warning(NO_REAL_GROUPS, b)
    if table is None:
        table = generalisation_table(model, injections, heads, biases=columns, kind=kind)
    out = pd.DataFrame(index=list(heads), columns=columns, dtype=float)
    for row in table.itertuples():
        if row.measured_on in columns and row.heads_of in out.index:
            out.loc[row.heads_of, row.measured_on] = getattr(row, f"{target}_cut")
    return out
