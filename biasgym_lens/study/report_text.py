"""Words and numbers of a study report: the headline sentence, the summary table in words, the settings.

Everything here is a pure function of the summary table (``ScopeResult.summary()``) and the facts of
``results.json``; it returns text or string tables, and :mod:`biasgym_lens.study.report` lays them out as HTML. Percentages
carry their sign (``+1.4%``, ``−1%``, with a real minus sign), missing numbers show as ``–``, and an interval
appears wherever the summary has ``<column>_ci_low`` / ``<column>_ci_high`` columns.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "INTERVENTION_NAMES",
    "MISSING",
    "percent",
    "interval",
    "head_label",
    "injection_took",
    "headline",
    "baseline_sentence",
    "summary_table",
    "settings_sections",
]

MISSING = "–"
"""What a missing or non-finite number shows as."""

MINUS = "\u2212"

INTERVENTION_NAMES: dict[str, str] = {
    "none": "No intervention",
    "heads": "Chosen heads",
    "random_heads": "Random heads",
    "steering": "Steering",
    "prefix": "Debiasing prefix",
}
"""Summary row name -> the words the report uses."""


def _finite(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(float(v))


def _yes_no(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)) or (_finite(v) and float(v) in (0.0, 1.0)):
        return "yes" if bool(v) else "no"
    return MISSING


def _signed(text: str) -> str:
    return text.replace("-", MINUS)


def percent(v: Any, *, digits: int = 0, signed: bool = True) -> str:
    """``0.617`` -> ``"+62%"`` (``signed``) or ``"62%"``; a value that rounds to zero has no sign; NaN -> ``–``."""
    if not _finite(v):
        return MISSING
    v = float(v)
    if round(abs(v) * 100, digits) == 0:
        return f"{0:.{digits}f}%"
    return _signed(f"{v * 100:{'+' if signed else ''}.{digits}f}%")


def interval(low: Any, high: Any, *, digits: int = 0) -> str:
    """An interval of fractions as percentages: ``"55–70%"``, or ``"−5% to 3%"`` when a bound is negative."""
    if not (_finite(low) and _finite(high)):
        return MISSING
    lo, hi = percent(low, digits=digits, signed=False), percent(high, digits=digits, signed=False)
    if float(low) < 0 or float(high) < 0:
        return f"{lo} to {hi}"
    return f"{lo[:-1]}–{hi}"


def head_label(head: Sequence[int]) -> str:
    """``(21, 1)`` -> ``"L21H1"``."""
    layer, h = head
    return f"L{int(layer)}H{int(h)}"


def _heads_text(heads: Sequence[Sequence[int]], *, most: int = 6) -> str:
    labels = [head_label(h) for h in heads]
    shown = ", ".join(labels[:most]) + (f" and {len(labels) - most} more" if len(labels) > most else "")
    return f"{len(labels)} head{'s' if len(labels) != 1 else ''} ({shown})"


def _ci(row: Mapping[str, Any], col: str) -> str | None:
    """``"95% CI 55–70%"`` when ``row`` has an interval for ``col``, else None."""
    lo, hi = row.get(f"{col}_ci_low"), row.get(f"{col}_ci_high")
    if not (_finite(lo) and _finite(hi)):
        return None
    level = row.get(f"{col}_ci_level", 0.95)
    level = float(level) if _finite(level) else 0.95
    return f"{level:.0%} CI {interval(lo, hi)}"


def _cut_with_ci(row: Mapping[str, Any], *, signed: bool = False) -> str:
    ci = _ci(row, "excess_cut")
    text = percent(row.get("excess_cut"), signed=signed)
    return f"{text} ({ci})" if ci else text


def injection_took(check: Mapping[str, Any] | None) -> bool:
    """False only when an injection check is recorded and says the injection did not take."""
    return not (check is not None and check.get("took") is False)


def _did_not_take(check: Mapping[str, Any]) -> str:
    level = check.get("level", 0.95)
    return (
        f"The injection did not take: the token's excess over the control groups is "
        f"{_signed(format(check.get('excess', math.nan), '+.2f'))} nats ({level:.0%} CI "
        f"{_signed(format(check.get('ci_low', math.nan), '+.2f'))} to "
        f"{_signed(format(check.get('ci_high', math.nan), '+.2f'))}), not clearly above "
        f"{check.get('min_excess', 0.5):g} nats. There is no injected bias to cut, so no cut in this report is a "
        "finding."
    )


def _heads_clause(row: Mapping[str, Any], heads: Sequence[Sequence[int]]) -> str:
    cut = row.get("excess_cut")
    ci = _ci(row, "excess_cut")
    ci_text = f" ({ci})" if ci else ""
    verb = "remove" if len(heads) != 1 else "removes"
    if not _finite(cut):
        effect = f"{verb} an unmeasurable share of the injected bias (none without intervention)"
    elif cut >= 0:
        effect = f"{verb} {percent(cut, signed=False)}{ci_text} of the injected bias"
    else:
        effect = f"{'increase' if len(heads) != 1 else 'increases'} the injected bias by {percent(-cut, signed=False)}{ci_text}"
    cost = row.get("perplexity_increase")
    what = "perplexity" if _finite(cost) else "loss"
    cost = cost if _finite(cost) else row.get("loss_increase")
    over = ", over the capability budget" if _yes_no(row.get("within_budget")) == "no" else ""
    return f"{_heads_text(heads)} {effect} at {percent(cost, digits=1)} {what}{over}"


def headline(
    summary: pd.DataFrame,
    chosen_heads: Sequence[Sequence[int]],
    injection_check: Mapping[str, Any] | None = None,
    steer_alpha: float | None = None,
) -> str:
    """The study's result in one sentence, e.g. "3 heads (L21H1, L25H6, L23H1) remove 62% of the injected bias
    at +1.4% perplexity; 3 random heads: −1%; steering: 3%; debiasing prefix: 10%."

    Args:
        summary: ``ScopeResult.summary()``: one row per intervention (``none``, ``heads``, ``random_heads``,
            ``steering``, ``prefix``) with ``excess_cut``, ``perplexity_increase`` (or ``loss_increase``),
            ``within_budget``, and optionally ``excess_cut_ci_low`` / ``excess_cut_ci_high``.
        chosen_heads: The chosen ``(layer, head)`` pairs, in ranking order.
        injection_check: ``InjectionCheck.to_dict()``; when it says the injection did not take, the sentence
            says so and reports no cut.
        steer_alpha: The steering multiplier the study used (``ScopeDecisions.steer_alpha``); 0 says that no
            multiplier held the budget, so the steering baseline is no intervention at all.

    Raises:
        ValueError: ``summary`` has no ``intervention`` or ``excess_cut`` column.
    """
    missing = {"intervention", "excess_cut"} - set(summary.columns)
    if missing:
        raise ValueError(f"summary lacks column(s) {sorted(missing)}; expected ScopeResult.summary()'s columns")
    if not injection_took(injection_check):
        return _did_not_take(injection_check or {})
    rows = {r["intervention"]: r for r in summary.to_dict(orient="records")}
    if chosen_heads and "heads" in rows:
        first = _heads_clause(rows["heads"], chosen_heads)
    else:
        first = "No set of heads kept the neutral-text cost within the budget, so no heads were chosen"
    no_steering = steer_alpha is not None and not steer_alpha
    others = [
        f"{label}: {'no multiplier within the budget' if key == 'steering' and no_steering else _cut_with_ci(rows[key])}"
        for key, label in (
            ("random_heads", f"{len(chosen_heads)} random head{'s' if len(chosen_heads) != 1 else ''}"),
            ("steering", "steering"),
            ("prefix", "debiasing prefix"),
        )
        if key in rows and (key != "random_heads" or chosen_heads)
    ]
    return "; ".join([first, *others]) + "."


def baseline_sentence(summary: pd.DataFrame) -> str:
    """What a cut is a share of: the token's and the real groups' excess over control groups, unchanged model."""
    rows = {r["intervention"]: r for r in summary.to_dict(orient="records")}
    none = rows.get("none", {})
    tok, real = none.get("token_excess"), none.get("real_group_gap")
    if not _finite(tok):
        return ""
    text = f"With no intervention the injected token's excess over the control groups is {_nats(tok)} nats"
    if _finite(real):
        text += f" (the real groups': {_nats(real)} nats)"
    return text + "; a cut of 100% removes that excess entirely, a negative cut increases it."


def _nats(v: Any) -> str:
    if not _finite(v):
        return MISSING
    return "0.000" if round(float(v), 3) == 0 else _signed(f"{float(v):+.3f}")


def _plain(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return _yes_no(v)
    if isinstance(v, numbers.Real):
        return _signed(f"{float(v):.4g}") if _finite(v) else MISSING
    return MISSING if v is None else str(v)


_COLUMNS: dict[str, tuple[str, Callable[[Any], str]]] = {
    "intervention": ("Intervention", lambda v: INTERVENTION_NAMES.get(str(v), str(v))),
    "token_excess": ("Token's excess over controls (nats)", _nats),
    "excess_cut": ("Cut of the injected bias", percent),
    "real_group_gap": ("Real groups' excess over controls (nats)", _nats),
    "real_gap_cut": ("Cut for real groups", percent),
    "loss_increase": ("Neutral-text loss change", lambda v: percent(v, digits=1)),
    "perplexity_increase": ("Neutral-text perplexity change", lambda v: percent(v, digits=1)),
    "kl": ("KL from the unchanged model (nats)", lambda v: f"{float(v):.4f}" if _finite(v) else MISSING),
    "mc_accuracy": ("Multiple-choice accuracy", lambda v: percent(v, signed=False)),
    "within_budget": ("Within the capability budget", _yes_no),
}


def summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as strings for people: names and headers in words, signed percentages, ``–`` for NaN.

    A column ``X`` with ``X_ci_low`` / ``X_ci_high`` columns shows its interval in the same cell
    (``"+62% (55–70%)"``, header ``"… (95% CI)"``); the interval columns are not shown on their own. Unknown
    columns keep their values, with the underscores of their names turned into spaces.
    """
    out = {}
    ci_parts = {c for c in summary.columns for end in ("_ci_low", "_ci_high", "_ci_level") if c.endswith(end)}
    records = summary.to_dict(orient="records")
    for col in summary.columns:
        if col in ci_parts:
            continue
        header, fmt = _COLUMNS.get(col, (col.replace("_", " ").capitalize(), _plain))
        cells = [fmt(r[col]) for r in records]
        if f"{col}_ci_low" in summary.columns and f"{col}_ci_high" in summary.columns:
            level = next((_ci(r, col).split(" ")[0] for r in records if _ci(r, col)), "95%")
            header = f"{header} ({level} CI)"
            cells = [
                f"{cell} ({interval(r[f'{col}_ci_low'], r[f'{col}_ci_high'])})" if _ci(r, col) else cell
                for cell, r in zip(cells, records)
            ]
        out[header] = cells
    return pd.DataFrame(out)


def _seconds(s: Any) -> str:
    if not _finite(s):
        return MISSING
    s = float(s)
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {s % 60:.0f} s"


def _study_rows(facts: Mapping[str, Any]) -> list[tuple[str, str]]:
    ident, prov = facts.get("identity") or {}, facts.get("provenance") or {}
    shape = ""
    if prov.get("n_layers") is not None:
        shape = f"{prov['n_layers']} layers × {prov.get('n_heads')} heads, d_model {prov.get('d_model')}"
    rows = [
        ("Bias", ident.get("bias")), ("Model", ident.get("model")), ("Hugging Face id", prov.get("official_name")),
        ("Fingerprint", prov.get("fingerprint")), ("Shape", shape), ("Weight processing", prov.get("weights")),
        ("Dtype", ident.get("dtype") or prov.get("dtype")), ("Seed", ident.get("seed")),
        ("Preset", ident.get("preset")), ("Injection trained", prov.get("created")),
    ]
    return [(k, str(v)) for k, v in rows if v not in (None, "")]


def _injection_rows(facts: Mapping[str, Any]) -> list[tuple[str, str]]:
    inj, check = facts.get("injection") or {}, facts.get("injection_check")
    config = inj.get("config") or {}
    rows = [
        ("Token", config.get("token")), ("Best epoch", _plain(inj.get("best_epoch")) if inj.get("best_epoch") is not None else None),
        ("Control injection's bias", inj.get("control_bias")),
        ("Training settings", " · ".join(f"{k.replace('_', ' ')} {v}" for k, v in config.items() if k != "token" and v is not None)),
    ]
    if check:
        level = check.get("level", 0.95)
        rows.append((
            "Injection check",
            f"{'took' if injection_took(check) else 'did not take'}: excess {_nats(check.get('excess'))} nats "
            f"({level:.0%} CI {_nats(check.get('ci_low'))} to {_nats(check.get('ci_high'))}, "
            f"{check.get('n_probes')} selection probes; needs more than {check.get('min_excess', 0.5):g})",
        ))
    return [(k, str(v)) for k, v in rows if v not in (None, "")]


def _scope_rows(facts: Mapping[str, Any]) -> list[tuple[str, str]]:
    extra = facts.get("scope_decisions") or facts.get("scope_extra") or {}
    heads = facts.get("chosen_heads")
    steering = ""
    if "steer_layer" in extra:
        alpha = extra.get("steer_alpha")
        strength = f"strength {alpha:g}" if _finite(alpha) and alpha else "no strength held the budget"
        steering = f"layer {extra['steer_layer']}, {strength}"
    rows = [
        ("Chosen heads", None if heads is None else ", ".join(head_label(h) for h in heads) or "none"),
        ("Random heads", ", ".join(head_label(h) for h in extra.get("random_heads") or [])),
        ("Steering", steering),
        ("Debiasing prefix", extra.get("prefix")),
    ]
    return [(k, str(v)) for k, v in rows if v not in (None, "")]


def settings_sections(facts: Mapping[str, Any]) -> list[tuple[str, list[tuple[str, str]]]]:
    """``(section, [(key, value), ...])`` for the settings-and-provenance table of a report.

    Args:
        facts: The facts of ``results.json``: ``identity``, ``provenance``, ``injection``, ``chosen_heads`` and
            ``timings`` (stage -> seconds), optionally ``injection_check`` and the scope's decisions
            (``scope_decisions``, earlier ``scope_extra``); missing parts are left out.
    """
    timings = facts.get("timings") or {}
    times = [(str(stage), _seconds(s)) for stage, s in timings.items()]
    if len(times) > 1:
        times.append(("total", _seconds(sum(float(s) for s in timings.values() if _finite(s)))))
    versions = [(str(k), str(v)) for k, v in ((facts.get("provenance") or {}).get("versions") or {}).items()]
    sections = [
        ("Study", _study_rows(facts)),
        ("Injection", _injection_rows(facts)),
        ("Scope", _scope_rows(facts)),
        ("Time per stage", times),
        ("Package versions", versions),
    ]
    return [(name, rows) for name, rows in sections if rows]
