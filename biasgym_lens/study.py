"""The BiasScope pipeline: score heads, choose them under a capability budget, intervene, and measure.

:func:`scope` runs, for one injection: the four head scores (and their agreement), a specificity-aware ranking
(attribution-patching effect on the token's excess minus estimated neutral-loss damage), the faithfulness
curve with random-head baselines, the chosen heads, and the bias and capability under each intervention:
nothing, the chosen heads, as many random heads, subtracting the steering direction, and a debiasing
instruction prefix. A :class:`ScopeResult` holds everything the plots and the report need and saves itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from biasgym_lens.attribution import METHODS, HeadScores, score_heads
from biasgym_lens.capability import Capability, capability_set, measure_capability, neutral_loss
from biasgym_lens.catalogue import BiasSpec, load_bias
from biasgym_lens.checks import InputTypeError, check_choice, check_int, check_int_list, check_real
from biasgym_lens.elicit import GroupRequest, score_groups
from biasgym_lens.interventions import Head, ablate_heads, first_layer, head_means, steer
from biasgym_lens.metrics import keyword_ids, probe_subset
from biasgym_lens.probes import build_probe_set
from biasgym_lens.provenance import Provenance, atomic_dir, read_artifact
from biasgym_lens.selection import (
    BUDGET_MEASURES,
    FaithfulnessCurve,
    damage_scores,
    faithfulness_curve,
    first_within_budget,
    measured_damage,
    relative_increase,
    specific_scores,
)
from biasgym_lens.steering import bias_direction

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
    extra: dict[str, Any] = field(default_factory=dict)

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
        """Write the result into folder ``path`` (JSON, CSV and safetensors), atomically."""
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
            "extra": self.extra,
        }
        with atomic_dir(path) as tmp:
            (tmp / "scope.json").write_text(json.dumps(meta, indent=1, default=str))
            self.groups.to_csv(tmp / "groups.csv", index=False)
            self.capability.to_csv(tmp / "capability.csv", index=False)
            self.curve.table.to_csv(tmp / "curve.csv", index=False)
            save_file({"damage": self.damage.contiguous()}, str(tmp / "damage.safetensors"))
            for name, s in self.scores.items():
                s.save(tmp / "scores" / name)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ScopeResult:
        from safetensors.torch import load_file

        folder, meta = read_artifact(path, "scope", "scope.json", version=_FORMAT)
        c = meta["curve"]
        cfg = meta["config"]
        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
        curve = FaithfulnessCurve(
            pd.read_csv(folder / "curve.csv"), c["baseline_excess"], c["baseline_loss"],
            tuple(tuple(h) for h in c["heads"]), c["budget"], c["settings"], c["budget_on"],
        )
        scores = {p.name: HeadScores.load(p) for p in sorted((folder / "scores").iterdir()) if p.is_dir()}
        return cls(
            bias=meta["bias"],
            token=meta["token"],
            scores=scores,
            damage=load_file(str(folder / "damage.safetensors"))["damage"],
            curve=curve,
            chosen=[tuple(h) for h in meta["chosen"]],
            groups=pd.read_csv(folder / "groups.csv"),
            capability=pd.read_csv(folder / "capability.csv"),
            config=ScopeConfig(**cfg),
            provenance=Provenance.from_dict(meta["provenance"]),
            extra=meta.get("extra", {}),
        )


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

    Args:
        model: The model the injection was trained in (raw weights).
        injection: A trained :class:`~biasgym_lens.inject.Injection`.
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
    spec = injection.spec
    L, H = model.cfg.n_layers, model.cfg.n_heads
    if config.steer_layer is not None and config.steer_layer >= L:
        raise ValueError(f"steer_layer must be a layer of this model (0..{L - 1}), got {config.steer_layer}")

    def step(msg: str) -> None:
        logger.info("[%s] %s", spec.name, msg)

    if not spec.real_groups:
        logger.warning(NO_REAL_GROUPS, spec.name)

    scores: dict[str, HeadScores] = {}
    for method in config.methods:
        step(f"scoring heads: {method}")
        kw: dict[str, Any] = {"max_probes": config.score_probes}
        if method == "ablation":
            kw = dict(
                max_probes=config.ablation_probes,
                controls=list(spec.control_groups[: config.ablation_controls]),
                heads_per_pass=config.heads_per_pass,
                progress=progress,
            )
        scores[method] = score_heads(model, injection, method, **kw)
    if "attribution" not in scores:
        scores["attribution"] = score_heads(model, injection, "attribution", max_probes=config.score_probes)

    step("estimating each head's damage to neutral text")
    # The clean residual entering every layer is kept once, so the exact damage checks, the curve and the
    # steering checks resume at their first changed layer instead of recomputing the layers before it.
    cap_curve = capability_set(model, max_passages=config.curve_passages, mc_items=[], resume_layers=range(1, L))
    # Mean ablation replaces a head's output by its mean over the curve's neutral passages; the ranking then
    # estimates that replacement (attribution and damage against the means) instead of zeroing.
    reference = head_means(model, cap_curve.neutral[0]) if config.kind == "mean" else None
    damage = damage_scores(model, cap_curve, baseline=reference)
    effect = scores["attribution"]
    if reference is not None:
        effect = score_heads(model, injection, "attribution", max_probes=config.score_probes, baseline=reference)
    specific = specific_scores(effect, damage, config.damage_weight)
    scores["specific"] = specific
    ranked = specific.top(min(max(config.ks), L * H))
    candidate_damage: list[list[Any]] = []
    if config.damage_candidates:
        # The first-order damage estimate misses heads the model cannot lose (zeroing is no small change):
        # measure the leading candidates' cost exactly, drop those that alone break the budget, and rank the rest
        # by effect minus measured damage.
        step("measuring the leading candidates' damage exactly")
        pool = specific.top(min(config.damage_candidates, L * H))
        base_loss, exact = measured_damage(model, cap_curve, pool, kind=config.kind, reference=reference)
        own = {h: relative_increase(base_loss + d, base_loss, config.budget_on) for h, d in exact.items()}
        candidate_damage = [[h[0], h[1], exact[h], own[h]] for h in pool]
        fitting = [h for h in pool if own[h] <= config.budget]
        fitting.sort(key=lambda h: -(float(effect.scores[h]) - config.damage_weight * max(exact[h], 0.0)))
        ranked = (fitting or pool)[: max(config.ks)]

    step("faithfulness curve")
    with injection.apply(model):
        curve_controls = None if config.curve_controls is None else list(spec.control_groups[: config.curve_controls])
        ps_eval = build_probe_set(
            model, spec, injection.token, probes="eval", controls=curve_controls, max_probes=config.curve_probes
        )
        curve = faithfulness_curve(
            model, ps_eval, ranked, cap_curve, ks=config.ks, random_draws=config.random_draws,
            kind=config.kind, budget=config.budget, budget_on=config.budget_on, seed=config.seed, reference=reference,
            progress=progress,
        )
        layer = config.steer_layer if config.steer_layer is not None else (2 * L) // 3
        ps_select = build_probe_set(model, spec, injection.token, probes="select", max_probes=config.score_probes)
        direction = bias_direction(model, ps_select, layer)

    step("final measures under each intervention")
    all_heads = [(a, b) for a in range(L) for b in range(H)]

    def random_sample(k: int) -> list[Head]:
        return random.Random(config.seed + 1).sample(all_heads, max(1, k))

    # Every intervention measured below changes the model from a known layer on (its first ablated head, the
    # steering layer), where the final passes resume from the clean residual kept by the unmodified pass.
    candidates = curve.candidates()
    starts = {first_layer(list(curve.heads[:k])) for k in candidates}
    starts |= {first_layer(random_sample(k)) for k in (0, *candidates)} | {layer}
    cap = capability_set(
        model, max_passages=config.final_passages, max_mc_items=config.mc_items, resume_layers=[x for x in starts if x]
    )
    base_cap = measure_capability(model, cap)

    def cost(c: Capability) -> float:
        return c.relative_to(base_cap)[f"{config.budget_on}_increase"]

    def heads_cm(heads: list[Head]) -> Callable[[], Any]:
        return lambda: ablate_heads(model, heads, kind=config.kind, reference=reference)

    # The curve's few passages pick the candidates; the chosen k must hold the budget on the final passages too.
    measured: dict[str, Capability] = {}
    curve_costs = curve.table[curve.table.selection == "top"].set_index("k")[f"{config.budget_on}_increase"]
    by_k: dict[int, Capability] = {}

    def final_cost(k: int) -> float:
        heads = list(curve.heads[:k])
        by_k[k] = measure_capability(model, cap, heads_cm(heads), with_mc=False, start=first_layer(heads))
        return cost(by_k[k])

    k_chosen, checks = first_within_budget(candidates, final_cost, lambda k: curve_costs[k], config.budget)
    chosen: list[Head] = list(curve.heads[:k_chosen])
    if k_chosen:
        measured["heads"] = by_k[k_chosen]
    random_heads = random_sample(len(chosen))

    # The steering baseline gets the same treatment: the largest alpha within budget on the curve's passages,
    # confirmed on the final ones.
    def steering(alpha: float) -> Callable[[], Any]:
        return lambda: steer(model, direction, layer, -alpha)

    alpha_cost = {
        a: relative_increase(
            neutral_loss(model, cap_curve, steering(a), start=layer), curve.baseline_loss, config.budget_on
        )
        for a in config.steer_alphas
    }
    by_alpha: dict[float, Capability] = {}

    def final_alpha_cost(a: float) -> float:
        by_alpha[a] = measure_capability(model, cap, steering(a), with_mc=False, start=layer)
        return cost(by_alpha[a])

    fitting = sorted((a for a, c in alpha_cost.items() if c <= config.budget), reverse=True)
    alpha_used, steer_checks = first_within_budget(fitting, final_alpha_cost, alpha_cost.__getitem__, config.budget)
    if alpha_used:
        measured["steering"] = by_alpha[alpha_used]
    interventions: list[tuple[str, Callable[[], Any] | None, str, int]] = [
        ("none", None, "", 0),
        ("heads", heads_cm(chosen) if chosen else None, "", first_layer(chosen) if chosen else 0),
        ("random_heads", heads_cm(random_heads), "", first_layer(random_heads)),
        ("steering", steering(alpha_used) if alpha_used else None, "", layer),
        ("prefix", None, DEBIAS_PREFIX, 0),
    ]
    tables, caps = [], []
    for name, cm, prefix, start in interventions:
        step(f"measuring: {name}")
        tables.append(
            measure_groups(model, spec, injection, cm, max_probes=config.final_probes, prefix=prefix, label=name)
        )
        if cm is None:  # the unmodified model (the prefix only changes the bias prompts, not the neutral text)
            c: Capability = base_cap
        elif name in measured:  # loss and KL already measured under this intervention: add the MC accuracy
            mc = measure_capability(model, cap, cm, with_neutral=False, start=start).mc_accuracy
            c = replace(measured[name], mc_accuracy=mc)
        else:
            c = measure_capability(model, cap, cm, start=start)
        caps.append({"intervention": name, **c.to_dict(), **c.relative_to(base_cap)})
    extra = {
        "candidate_damage": candidate_damage,
        "ranked": [list(h) for h in ranked],
        "budget_checks": checks,
        "steering_checks": steer_checks,
        "random_heads": [list(h) for h in random_heads],
        "steer_layer": layer,
        "steer_alpha": alpha_used,
        "prefix": DEBIAS_PREFIX,
    }
    return ScopeResult(
        bias=spec.name,
        token=injection.token,
        scores=scores,
        damage=damage,
        curve=curve,
        chosen=chosen,
        groups=pd.concat(tables, ignore_index=True),
        capability=pd.DataFrame(caps),
        config=config,
        provenance=Provenance.of(model),
        extra=extra,
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
