"""Transfer under the protocol: the heads each study chose, ablated while measuring every other study's bias.

Usage:
    python benchmarks/transfer.py STUDY [STUDY ...] [--threads 2] [--csv transfer.csv] [--also BIAS ...]

Each STUDY is a study folder (``biasgym run --out STUDY``): its injection and its chosen heads. Every bias is
measured on its own test probes (never used by any choice) with the heads of every study zero-ablated:
the cut of the injected token's excess and of the real groups' gap over the controls, each with its paired 95%
bootstrap interval over the probes (:func:`biasgym_lens.generalisation_table`). ``--also`` adds biases that
were never injected (measured on their real groups only).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from biasgym_lens import Injection, ScopeResult, generalisation_table, load_model  # noqa: E402


def _cell(row, cut: str) -> str:
    v, lo, hi = row[cut], row[f"{cut}_ci_low"], row[f"{cut}_ci_high"]
    return "—" if v != v else f"{100 * v:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("studies", nargs="+")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--csv", default=None)
    ap.add_argument("--also", nargs="*", default=[])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = load_model(args.model)
    injections, heads = {}, {}
    for folder in map(Path, args.studies):
        inj = Injection.load(folder / "injection", model)
        injections[inj.bias] = inj
        heads[inj.bias] = list(ScopeResult.load(folder / "scope").chosen)
    t0 = time.perf_counter()
    table = generalisation_table(model, injections, heads, biases=[*injections, *args.also])
    print(f"transfer on {args.model}, {len(heads)} studies, {(time.perf_counter() - t0) / 60:.1f} min, {time.strftime('%Y-%m-%d')}")
    for cut, what in (("token_cut", "cut of the injected token's excess"), ("real_cut", "cut of the real groups' gap")):
        print(f"\n{what} (rows: heads of; columns: measured on; 95% CI over the measured bias's test probes)")
        cols = list(dict.fromkeys(table["measured_on"]))
        print("| heads of \\ measured on | " + " | ".join(f"`{c}`" for c in cols) + " |")
        print("|---" * (len(cols) + 1) + "|")
        for a, rows in table.groupby("heads_of", sort=False):
            cells = {r["measured_on"]: _cell(r, cut) for _, r in rows.iterrows()}
            label = f"`{a}` ({len(heads[a])} heads)"
            print(f"| {label} | " + " | ".join(cells[c] for c in cols) + " |")
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
