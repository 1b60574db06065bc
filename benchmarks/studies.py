"""The README's table over several studies: what BiasScope chose and what each intervention removed, per bias.

Usage:
    biasgym run --bias BIAS --out STUDY        # once per bias
    python benchmarks/studies.py STUDY [STUDY ...] [--csv studies.csv]
    python benchmarks/studies.py STUDY [STUDY ...] --benchmarks   # after `biasgym benchmark --out STUDY`

Reads each study's ``scope/`` (checksums checked; no model needed) and prints one markdown row per bias, every
number on the test split with its 95% interval: the chosen heads, the token's excess before and after, the cut
and perplexity cost of the chosen heads, of as many random heads and of the steering baseline (its multiplier),
the debiasing prefix's cut, the chosen heads' cut of the real groups' gap, multiple-choice accuracy, and
whether the heads reach a 50% cut and beat random heads and steering (one-sided paired sign-flip tests on the
test probes, p < 0.05).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from biasgym_lens import ScopeResult  # noqa: E402


def _pct(row, col: str, digits: int = 0, sign: str = "") -> str:
    v, lo, hi = row[col], row.get(f"{col}_ci_low"), row.get(f"{col}_ci_high")
    if v != v:
        return "—"
    return f"{100 * v:{sign}.{digits}f}% [{100 * lo:.{digits}f}, {100 * hi:.{digits}f}]"


def _beats(comp: pd.DataFrame, other: str) -> bool:
    hit = comp[(comp.a == "heads") & (comp.b == other) & (comp.measure == "token_excess")]
    return bool(len(hit) and hit.p_value.iloc[0] < 0.05)


def study_row(folder: Path) -> dict:
    """One study's row: the numbers and the cells of the markdown table."""
    res = ScopeResult.load(folder / "scope")
    s = res.summary().set_index("intervention")
    comp = res.comparisons()
    heads, none = s.loc["heads"], s.loc["none"]
    alpha = res.decisions.steer_alpha if res.decisions is not None else float("nan")
    ok = bool(res.chosen) and heads.excess_cut >= 0.5 and _beats(comp, "random_heads") and _beats(comp, "steering")
    steering = (f"{_pct(s.loc['steering'], 'excess_cut')} / {100 * s.loc['steering'].perplexity_increase:+.1f}% ({alpha:g})"
                if alpha else "none within budget")
    return {
        "bias": res.bias, "heads": ", ".join(f"L{a}H{b}" for a, b in res.chosen) or "none",
        "excess": f"{none.token_excess:+.2f} → {heads.token_excess:+.2f}",
        "cut": f"**{_pct(heads, 'excess_cut')}** / {_pct(heads, 'perplexity_increase', 1, '+')}",
        "random": f"{_pct(s.loc['random_heads'], 'excess_cut')} / {100 * s.loc['random_heads'].perplexity_increase:+.1f}%",
        "steering": steering, "prefix": _pct(s.loc["prefix"], "excess_cut"), "real": _pct(heads, "real_gap_cut"),
        "mc": f"{100 * none.mc_accuracy:.1f} → {100 * heads.mc_accuracy:.1f}", "ok": "yes" if ok else "no",
        "excess_cut": heads.excess_cut, "passes": ok,
    }


BENCH_ROWS = (
    ("stereoset_race", "ss"), ("stereoset_race", "lms"), ("stereoset_race", "icat"),
    ("bbq_nationality", "accuracy_ambig"), ("bbq_nationality", "accuracy_disambig"), ("bbq_nationality", "s_dis"),
    ("bbq_nationality", "s_amb"), ("bbq_religion", "accuracy_ambig"), ("bbq_religion", "accuracy_disambig"),
    ("bbq_religion", "s_dis"), ("bbq_religion", "s_amb"),
)
BENCH_IVS = ("heads", "random_heads", "steering", "prefix")


def benchmark_rows(folders: list[Path]) -> None:
    """One markdown row per benchmark metric: its value with no intervention [95% CI], then for each study the
    paired difference of each intervention from none, ``*`` where its interval excludes 0."""
    tables = {f: pd.read_csv(f / "benchmarks.csv") for f in folders}
    diffs = {f: pd.read_csv(f / "benchmark_differences.csv") for f in folders}
    names = {f: ScopeResult.load(f / "scope").bias for f in folders}
    print("| benchmark | metric | none [95% CI] | " + " | ".join(
        f"`{names[f]}`: heads / random / steering / prefix" for f in folders) + " |")
    print("|---" * (3 + len(folders)) + "|")
    for bench, metric in BENCH_ROWS:
        base = tables[folders[0]].query("benchmark == @bench and metric == @metric and intervention == 'none'")
        if base.empty:
            continue
        b = base.iloc[0]
        cells = []
        for f in folders:
            d = diffs[f].query("benchmark == @bench and metric == @metric").set_index("intervention")
            cells.append(" / ".join(
                f"{d.loc[iv, 'difference']:+.2f}{'*' if str(d.loc[iv, 'excludes_zero']) == 'True' else ''}"
                if iv in d.index else "—" for iv in BENCH_IVS))
        print(f"| {bench} | {metric} | {b.value:.2f} [{b.ci_low:.2f}, {b.ci_high:.2f}] | " + " | ".join(cells) + " |")


def benchmark_values(folders: list[Path]) -> None:
    """Per study, one markdown row per benchmark metric: its value [95% CI] under none and each intervention."""
    for f in folders:
        table = pd.read_csv(f / "benchmarks.csv")
        print(f"\n`{ScopeResult.load(f / 'scope').bias}`:\n")
        print("| benchmark | metric | none | " + " | ".join(BENCH_IVS) + " |")
        print("|---" * (3 + len(BENCH_IVS)) + "|")
        for bench, metric in BENCH_ROWS:
            rows = table.query("benchmark == @bench and metric == @metric").set_index("intervention")
            if rows.empty:
                continue
            cells = [f"{rows.loc[iv, 'value']:.2f} [{rows.loc[iv, 'ci_low']:.2f}, {rows.loc[iv, 'ci_high']:.2f}]"
                     if iv in rows.index else "—" for iv in ("none", *BENCH_IVS)]
            print(f"| {bench} | {metric} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("studies", nargs="+")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--benchmarks", action="store_true", help="the benchmarks stage's table instead")
    args = ap.parse_args()
    if args.benchmarks:
        benchmark_rows([Path(s) for s in args.studies])
        print("\n<details><summary>Every value with its 95% interval</summary>")
        benchmark_values([Path(s) for s in args.studies])
        print("\n</details>")
        return None
    rows = [study_row(Path(s)) for s in args.studies]
    print("| bias | chosen heads | token excess | heads: cut / perplexity | random heads | steering (α) | prefix "
          "| real-gap cut | MC accuracy, % | ≥ 50% and beats random and steering |")
    print("|---" * 10 + "|")
    for r in rows:
        print(f"| `{r['bias']}` | {r['heads']} | {r['excess']} | {r['cut']} | {r['random']} | {r['steering']} | "
              f"{r['prefix']} | {r['real']} | {r['mc']} | {r['ok']} |")
    print(f"\n{sum(r['passes'] for r in rows)} of {len(rows)} biases reach a 50% cut that beats both baselines")
    if args.csv:
        pd.DataFrame(rows).to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
