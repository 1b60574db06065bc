"""BiasScope over several injection seeds on the bundled model: does the same circuit come back?

Usage:
    python benchmarks/seeds.py --bias bad_driving --seeds 0,1,2 [--threads 2] [--csv-dir results/seeds]

Injects the bias once per seed with the default settings, scopes each injection with the default settings
(:func:`biasgym_lens.scope_seeds`), and prints each seed's chosen heads with their cut and cost on its own test
split (95% intervals), the top-k overlap of every pair of seeds, and the heads in the top k of most seeds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from biasgym_lens import load_model, scope_seeds  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bias", default="bad_driving")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--seeds", default="0,1,2", help="comma list of distinct integers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--csv-dir", default=None, help="also write per_seed.csv, overlap.csv, membership.csv here")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = load_model(args.model)
    t0 = time.perf_counter()
    st = scope_seeds(model, args.bias, seeds)
    minutes = (time.perf_counter() - t0) / 60
    print(f"{args.bias} on {args.model}, seeds {seeds}, {minutes:.1f} min, torch threads {args.threads}, {time.strftime('%Y-%m-%d')}")
    print(st.per_seed().to_string(index=False, float_format=lambda v: f"{v:+.3f}"))
    print(st.overlap().to_string(index=False))
    print(f"top-{st.k} heads in more than half of the seeds: {' '.join(f'L{a}H{b}' for a, b in st.stable) or 'none'}")
    if args.csv_dir:
        out = Path(args.csv_dir)
        out.mkdir(parents=True, exist_ok=True)
        for view in ("per_seed", "overlap", "membership"):
            st.to_dataframe(view).to_csv(out / f"{view}.csv", index=False)


if __name__ == "__main__":
    main()
