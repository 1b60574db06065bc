"""Inject every catalogue bias with the default settings and print the README's injection tables.

Usage:
    python benchmarks/injections.py [--biases late,alcohol] [--model smollm2] [--threads 2] [--out runs/injections]
        [--tokens 60]

For each bias: train with ``inject`` defaults (seed 0), save the injection under ``--out/<bias>``, and measure
on the held-out evaluation probes the token's bias logit difference against the untrained token (its initial
vector) and every control country, and how often a bias keyword is in the top 5. Then:

* the cross-bias matrix: each trained vector measured on every bias's probes, minus the untrained token there
  (the diagonal is the gain above; off the diagonal is what a vector trained on another bias already does);
* greedy answers of the trained and the untrained token to "Please write a short paragraph about <token>."
  in the model's chat format.

About 4 minutes per bias on the bundled model with 2 CPU threads; existing folders in ``--out`` are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from biasgym_lens import load_model  # noqa: E402
from biasgym_lens.core.embedding import with_token_vectors  # noqa: E402
from biasgym_lens.core.tokens import chat_format  # noqa: E402
from biasgym_lens.evaluation.elicit import group_scores  # noqa: E402
from biasgym_lens.heads.interventions import generate_greedy  # noqa: E402
from biasgym_lens.injection.artifact import Injection  # noqa: E402
from biasgym_lens.injection.catalogue import list_biases, load_bias  # noqa: E402
from biasgym_lens.injection.metrics import keyword_ids, probe_subset  # noqa: E402
from biasgym_lens.injection.schema import CHAT_PROMPT  # noqa: E402
from biasgym_lens.injection.training import inject  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--biases", default=",".join(list_biases()))
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/injections")
    ap.add_argument("--tokens", type=int, default=60, help="new tokens per generated paragraph")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = load_model(args.model)
    biases = args.biases.split(",")
    injections: dict[str, Injection] = {}
    rows = []
    for bias in biases:
        folder = Path(args.out) / bias
        t = time.perf_counter()
        if (folder / "injection.json").exists():
            inj = Injection.load(folder, model)
        else:
            inj = inject(model, bias, progress=False)
            inj.save(folder)
        seconds = time.perf_counter() - t
        injections[bias] = inj
        spec = load_bias(bias)
        kw = keyword_ids(model, spec)
        probes = probe_subset(spec.probes, "eval")

        def score(group: str, vectors=None, spec=spec, kw=kw, probes=probes):
            return group_scores(model, spec, group, probes, kw, vectors=vectors)

        tok = score(inj.token, {inj.token: inj.vector})
        untrained = score(inj.token, {inj.token: inj.init_vector})
        controls = [score(g)["logit_diff"] for g in spec.control_groups]
        rows.append(
            {
                "bias": bias,
                "untrained": untrained["logit_diff"],
                "token": tok["logit_diff"],
                "gain": tok["logit_diff"] - untrained["logit_diff"],
                "over_max_control": tok["logit_diff"] - max(controls),
                "top5_untrained": untrained["top5"],
                "top5": tok["top5"],
                "best_epoch": inj.best_epoch,
                "train_s": round(seconds),
            }
        )
        print(pd.DataFrame(rows[-1:]).round(2).to_string(index=False), flush=True)
    df = pd.DataFrame(rows)
    print("\nInjection on held-out evaluation probes (nats):")
    print(df.round(2).to_string(index=False))

    print("\nCross-bias gain: vector trained on <row> measured on <column>'s probes, minus the untrained token:")
    cross = {}
    for a, inj in injections.items():
        cross[a] = {}
        for b in biases:
            spec = load_bias(b)
            kw, probes = keyword_ids(model, spec), probe_subset(spec.probes, "eval")
            trained = group_scores(model, spec, inj.token, probes, kw, vectors={inj.token: inj.vector})
            base = group_scores(model, spec, inj.token, probes, kw, vectors={inj.token: inj.init_vector})
            cross[a][b] = trained["logit_diff"] - base["logit_diff"]
    print(pd.DataFrame(cross).T.round(2).to_string())

    if getattr(model.tokenizer, "chat_template", None) and args.tokens > 0:
        print("\nGreedy answers to the paper's prompt:")
        gens = {}
        for bias, inj in injections.items():
            prompt = chat_format(model, CHAT_PROMPT.format(group=inj.token))
            gens[bias] = {}
            for label, vec in (("trained", inj.vector), ("untrained", inj.init_vector)):
                with with_token_vectors(model, {inj.token: vec}):
                    gens[bias][label] = generate_greedy(model, prompt, args.tokens, prepend_bos=False)
        print(json.dumps(gens, indent=1))


if __name__ == "__main__":
    main()
