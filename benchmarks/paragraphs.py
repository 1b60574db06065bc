"""The generation-based bias score on the bundled model: a quick injection, then sampled paragraphs.

Usage:
    python benchmarks/paragraphs.py [--bias bad_driving] [--n 8] [--tokens 48] [--heads 21.1,25.6,23.1]
                                    [--threads 2] [--seed 0] [--full-injection] [--extra-bias reckless]

Trains a short injection (1 epoch on 16 texts; ``--full-injection``: the default settings), then samples
``n`` paragraphs per group (the token, the real and the control groups) with and without the heads ablated,
and prints the keyword rates per group with their bootstrap intervals, the time, and example paragraphs;
``--extra-bias`` counts the same paragraphs once more with more bias words (e.g. the trait word of the bias's
description, which its single-token keywords may lack).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from biasgym_lens import load_model  # noqa: E402
from biasgym_lens.evaluation.paragraphs import paragraph_bias  # noqa: E402
from biasgym_lens.heads.interventions import ablate_heads  # noqa: E402
from biasgym_lens.injection.config import InjectionConfig  # noqa: E402
from biasgym_lens.injection.training import inject  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bias", default="bad_driving")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--heads", default="21.1,25.6,23.1", help="layer.head,...; empty: no ablation row")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full-injection", action="store_true")
    ap.add_argument("--extra-bias", default="", help="comma-separated words added to the bias keywords")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = load_model("smollm2", device="cpu")
    t = time.perf_counter()
    cfg = None if args.full_injection else InjectionConfig(epochs=1, max_texts=16, evals_per_epoch=1, max_probes=8)
    inj = inject(model, args.bias, config=cfg, progress=False)
    print(f"injection ({'default settings' if cfg is None else 'epochs=1, max_texts=16'}): "
          f"{time.perf_counter() - t:.0f} s")
    heads = [tuple(int(x) for x in h.split(".")) for h in args.heads.split(",") if h]
    interventions = {"none": None}
    if heads:
        interventions[f"ablate {args.heads}"] = lambda: ablate_heads(model, heads)
    t = time.perf_counter()
    pb = paragraph_bias(model, args.bias, injection=inj, interventions=interventions, n=args.n,
                        max_new_tokens=args.tokens, seed=args.seed)
    n_par = len(pb.paragraphs)
    print(f"paragraph_bias: {n_par} paragraphs x {args.tokens} tokens ({args.n} per group and intervention, "
          f"temperature 1.0, top_p 0.95), {time.perf_counter() - t:.0f} s, torch threads {torch.get_num_threads()}")
    show(pb, inj.token)
    extra = [w for w in args.extra_bias.split(",") if w]
    if extra:
        kw = (*pb.settings["bias_keywords"], *extra)
        print(f"the same paragraphs counted with bias keywords {', '.join(k.strip() for k in kw)}:")
        show(pb.rescored(kw), inj.token, examples=False)


def show(pb, token: str, examples: bool = True) -> None:
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 2):
        df = pb.to_dataframe().drop(columns=["bias"])
        print(df.to_string(index=False))
        kinds = df.groupby(["intervention", "kind"], sort=False)[["rate", "bias_rate", "contrast_rate"]].mean()
        print("mean over groups of each kind:")
        print(kinds.to_string())
    if examples:
        ex = pb.examples(1)
        for row in ex[ex["group"] == token].itertuples():
            print(f"[{row.intervention}] {row.group} (score {row.score:+.1f}): {row.text[:300]!r}")
        last = pb.paragraphs["group"].iloc[-1]
        for row in ex[(ex["group"] == last) & (ex["intervention"] == "none")].itertuples():
            print(f"[{row.intervention}] {row.group} (score {row.score:+.1f}): {row.text[:300]!r}")

if __name__ == "__main__":
    main()
