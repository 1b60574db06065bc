"""Edge attribution patching on the bundled model: its cost in forward passes, and its agreement with exact path
patching.

Usage:
    python benchmarks/edges.py [--model smollm2] [--bias bad_driving] [--threads 2] [--repeats 3]
                               [--injection PATH | --train] [--max-probes N] [--check] [--top 20] [--random 20]

1. cost: edge attribution of every edge (one forward and one backward pass per chunk of probes of similar
   length, the head-space gradients taken back to the residual stream, then the products with every upstream
   output) against one plain forward pass of the same probe rows without gradients, as forward-pass
   equivalents (target: about 3), and against plain forward passes over the same length chunks (the padding
   the chunks save is then not counted as a gain); node attribution patching (hook_z, every head) alongside.
2. check (``--check``): exact path patching of the circuit's ``--top`` strongest edges and ``--random`` others
   drawn uniformly (seed 0), on the same probes; the Spearman rank agreement of attribution and exact effect
   per sample, the share of same signs, and the per-edge table.

The injection: ``--injection PATH`` loads a saved one; ``--train`` trains one with the default settings (the
study's); by default an untrained placeholder vector (the mean input embedding) stands in for the token, which
is enough for the cost (the cost does not depend on the vector) but gives the check an untrained token.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from biasgym_lens import Injection, circuit, inject, load_model  # noqa: E402
from biasgym_lens.core.provenance import Provenance  # noqa: E402
from biasgym_lens.heads.edge_check import check_edges  # noqa: E402
from biasgym_lens.heads.edges import EDGE_MAX_TOKENS, edge_attribution_scores  # noqa: E402
from biasgym_lens.heads.patching import attribution_scores  # noqa: E402
from biasgym_lens.heads.probes import build_probe_set  # noqa: E402
from biasgym_lens.injection.config import InjectionConfig  # noqa: E402


def timeit(fn, repeats: int) -> tuple[float, float]:
    """Median wall time and median CPU time of this process (steadier than wall time on a shared machine)."""
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def placeholder(model, bias: str) -> Injection:
    """An untrained injection: the mean input embedding as the token's vector (for timing)."""
    vec = model.W_E.detach().float().mean(0)
    return Injection(
        vector=vec, init_vector=vec.clone(), token="<EdgeBench>", bias=bias, config=InjectionConfig(), curve=(),
        step_losses=(), best_epoch=0.0, control_logit_diff=0.0, provenance=Provenance.of(model),
    )


def bench_cost(model, inj, max_probes, repeats: int) -> None:
    with inj.apply(model):
        ps = build_probe_set(model, inj.spec, inj.token, max_probes=max_probes)

        def fwd():
            with torch.no_grad():
                model(ps.batch.input_ids, attention_mask=ps.batch.attention_mask)

        chunks = [c for _, c in ps.length_chunks(EDGE_MAX_TOKENS)]

        def fwd_chunks():  # the same rows as edge attribution runs them: by length, each chunk cut to its longest
            with torch.no_grad():
                for c in chunks:
                    model(c.batch.input_ids, attention_mask=c.batch.attention_mask)

        fwd()  # warm-up
        n_tokens = int(ps.batch.attention_mask.sum())
        padded = sum(c.batch.input_ids.numel() for c in chunks)
        print(f"cost: {ps.n_probes} probes, {len(ps.batch)} rows x {ps.batch.input_ids.shape[1]} positions "
              f"({n_tokens} real tokens), {len(chunks)} chunk(s) of <= {EDGE_MAX_TOKENS} tokens by length "
              f"({padded} padded tokens)", flush=True)
        times = {}
        for name, fn in (("forward", fwd), ("forward, chunks", fwd_chunks),
                         ("edge attribution", lambda: edge_attribution_scores(model, ps)),
                         ("node attribution", lambda: attribution_scores(model, ps))):
            times[name] = wall, cpu = timeit(fn, repeats)
            print(f"  {name:<18} wall {wall:6.2f}s   cpu {cpu:6.2f}s", flush=True)
    (fw, fc), (gw, gc), (ew, ec), (nw, nc) = times.values()
    print(f"  edge attribution, every edge, in forward passes    wall {ew / fw:5.2f}x   cpu {ec / fc:5.2f}x   target about 3")
    print(f"    in forward passes over the same length chunks    wall {ew / gw:5.2f}x   cpu {ec / gc:5.2f}x")
    print(f"  node attribution, every head, in forward passes    wall {nw / fw:5.2f}x   cpu {nc / fc:5.2f}x   (for comparison)")


def bench_check(model, inj, max_probes, top: int, random: int) -> None:
    t = time.perf_counter()
    circ = circuit(model, inj, top_edges=top, max_probes=max_probes)
    check = check_edges(model, inj, circ, top=top, random=random, seed=0)
    minutes = (time.perf_counter() - t) / 60
    print(f"check: {len(circ.to_dataframe())} edges scored; top {top} + {random} random path-patched, {minutes:.1f} min")
    print(check.summary().to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(check.to_dataframe().to_string(index=False, float_format=lambda v: f"{v:+.4f}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--bias", default="bad_driving")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-probes", type=int, default=None, help="default: every selection probe")
    ap.add_argument("--injection", default=None, help="a saved injection folder (Injection.load)")
    ap.add_argument("--train", action="store_true", help="train an injection with the default settings")
    ap.add_argument("--check", action="store_true", help="also path-patch the top and random edges")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--random", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = load_model(args.model)
    if args.injection:
        inj = Injection.load(args.injection, model)
    elif args.train:
        inj = inject(model, args.bias, progress=False)
    else:
        inj = placeholder(model, args.bias)
    kind = "loaded" if args.injection else "trained" if args.train else "untrained placeholder"
    print(f"{inj.bias} on {args.model} ({kind} injection), torch threads {args.threads}, {time.strftime('%Y-%m-%d')}")
    bench_cost(model, inj, args.max_probes, args.repeats)
    if args.check:
        bench_check(model, inj, args.max_probes, args.top, args.random)


if __name__ == "__main__":
    main()
