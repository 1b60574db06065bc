"""The kinds of head change over several studies: which removes the most bias within the budget, per bias.

Usage:
    biasgym removals --out STUDY            # once per study folder (writes STUDY/removals/)
    python benchmarks/removals.py STUDY [STUDY ...] [--csv removals.csv]

Reads each study's ``removals/`` (:class:`~biasgym_lens.heads.removal.RemovalComparison`, checksums checked; no
model needed) and prints one markdown row per bias: for each kind its test-probe cut of the token's excess with
its 95% interval and the perplexity cost (test passages), marked ``*`` where it beats both its random heads and
the steering baseline (one-sided paired sign-flip tests, p < 0.05); then the best kind per bias and how many
biases reach a 50% cut that beats both, per kind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from biasgym_lens.heads.removal import REMOVAL_KINDS, RemovalComparison  # noqa: E402


def _cell(row) -> str:
    if not row.k:
        return "none within budget"
    mark = "*" if row.beats_random and row.beats_steering else ""
    return (f"{100 * row.excess_cut:.0f}%{mark} [{100 * row.excess_cut_ci_low:.0f}, {100 * row.excess_cut_ci_high:.0f}]"
            f" / {100 * row.perplexity_increase:+.1f}% ({row.k})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("studies", nargs="+")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()
    tables = [RemovalComparison.load(Path(s) / "removals").table() for s in args.studies]
    table = pd.concat(tables, ignore_index=True)
    print("| bias | " + " | ".join(REMOVAL_KINDS) + " | steering |")
    print("|---" * (len(REMOVAL_KINDS) + 2) + "|")
    for bias, rows in table.groupby("bias", sort=False):
        by_kind = rows.set_index("kind")
        cells = [_cell(by_kind.loc[k]) if k in by_kind.index else "—" for k in REMOVAL_KINDS]
        print(f"| `{bias}` | " + " | ".join(cells) + f" | {100 * rows.steering_cut.iloc[0]:.0f}% |")
    good = table[(table.k > 0) & (table.excess_cut >= 0.5) & table.beats_random & table.beats_steering]
    print("\nbiases with a >= 50% cut that beats random heads and steering, per kind: " + ", ".join(
        f"{k} {good[good.kind == k].bias.nunique()}/{table.bias.nunique()}" for k in REMOVAL_KINDS))
    print("any kind: " + f"{good.bias.nunique()}/{table.bias.nunique()}")
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
