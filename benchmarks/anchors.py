"""Anchors: the project's ways next to the tools a user of this field would otherwise use, on the same work and
probes: time ratios, numeric agreement, and the failure modes met on the way (printed as they are).

Usage:
    python benchmarks/anchors.py [--model smollm2] [--threads 2] [--repeats 3] [--probes 6] [--heads 0]
    python benchmarks/run.py --only anchors

All run on one quickly trained injection of "late" (``with inj.apply(model)``) and its selection probes; the
metric is the project's (excess bias logit difference at the answer positions), averaged over the probes.
1. scan: exact zero-ablation of each head: ``ablation_scores`` vs TransformerLens's ``generic_activation_patch``
   (a patch setter zeroing one head's ``hook_z``) vs a ``run_with_hooks`` loop; max |diff|; executed matmul
   FLOPs (``FlopCounterMode``) over the floor (one clean pass plus each head's suffix layers, real tokens only,
   and only the keyword columns of the unembedding at the answer).
2. attribution: attribution patching, zero baseline: ``attribution_scores`` vs TransformerLens's
   ``attribution_patch`` (with the workarounds it needs) and its batched ``cache_activation_and_gradient``.
3. dla: ``dla_scores`` vs ``direct_logit_attribution`` and ``cache.stack_head_results`` + ``cache.logit_attrs``.
4. step: one injection step, the project's vs Hugging Face's way (see anchor_step.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformer_lens.patching import generic_activation_patch
from transformer_lens.tools.analysis.attribution_patching import (
    attribution_patch,
    cache_activation_and_gradient,
)
from transformer_lens.tools.analysis.direct_logit_attribution import direct_logit_attribution

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anchor_step import step_anchor  # noqa: E402
from run import line, timeit  # noqa: E402

from biasgym_lens import inject, load_model  # noqa: E402

# The package's submodules used here, in one place (to update if they move).
from biasgym_lens.core.hooks import hooked  # noqa: E402
from biasgym_lens.heads.decomposition import dla_scores  # noqa: E402
from biasgym_lens.heads.head_scores import spearman  # noqa: E402
from biasgym_lens.heads.patching import ablation_scores, attribution_scores  # noqa: E402
from biasgym_lens.heads.probes import build_probe_set  # noqa: E402
from biasgym_lens.injection.catalogue import load_bias  # noqa: E402
from biasgym_lens.injection.metrics import logit_diff  # noqa: E402


def setup(model, n_probes: int, n_controls: int):
    """A quickly trained injection of "late" (one step) and its selection probe set."""
    spec = load_bias("late")
    settings = dict(epochs=1, max_texts=8, chat=False, evals_per_epoch=1, max_probes=n_probes, select_best=False)
    inj = inject(model, spec, progress=False, **settings)
    with inj.apply(model):
        ps = build_probe_set(model, spec, inj.token, controls=list(spec.control_groups[:n_controls]), max_probes=n_probes)
    return inj, ps


def mean_metric(ps):
    """The project's metric (excess bias logit difference) averaged over the probes, from full logits."""
    return lambda logits: ps.metric_per_probe(logits).mean()


def row_weights(ps) -> torch.Tensor:
    """Each row's weight in :func:`mean_metric`, which is linear in the rows' logit differences (token rows
    ``1/n``, each control row ``-1/(n * groups)``): for tools whose metric sees one row at a time."""
    n, g = ps.n_probes, len(ps.controls)
    w = torch.full((n * (1 + g),), -1.0 / (n * g) if g else 0.0)
    w[:n] = 1.0 / n
    return w


def row_metric(ps, weight: float, pos: int):
    """The weighted logit difference of one row at its answer position (logits of that row alone)."""
    return lambda logits: weight * logit_diff(logits[:, int(pos)], ps.keywords)[0]


def failure(fn) -> str:
    """The first sentence of the exception ``fn`` raises, or ``"runs"``."""
    try:
        fn()
    except Exception as e:  # the failure mode is the result
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0].split('. ')[0][:100]}"
    return "runs"


def run_ways(model, inj, ways: dict, repeats: int) -> tuple[dict, dict]:
    """Each way's result (float, on CPU) and median seconds, with the injection applied."""
    got, t = {}, {}
    with inj.apply(model):
        for name, fn in ways.items():
            t[name] = timeit(lambda name=name, fn=fn: got.__setitem__(name, fn().float().cpu()), repeats)
    return got, t


def zero_head(act, index, clean_act):
    """A patch setter for ``generic_activation_patch``: zero head ``index[1]`` of ``hook_z``."""
    act[:, :, int(index[1])] = 0.0
    return act


def tl_scan(model, ps, heads) -> torch.Tensor:
    """TransformerLens's activation-patching sweep, one forward per head (it takes no attention mask)."""
    metric, ids = mean_metric(ps), ps.batch.input_ids
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids, names_filter=lambda name: name.endswith("attn.hook_z"))
        index = pd.DataFrame(heads, columns=["layer", "head_index"])
        with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
            return metric(logits) - generic_activation_patch(model, ids, cache, metric, zero_head, "z", index_df=index)


def hooks_loop(model, ps, heads) -> torch.Tensor:
    """The plain way: ``run_with_hooks`` once per head, its hook zeroing that head's ``hook_z``."""
    b, metric, out = ps.batch, mean_metric(ps), []
    with torch.no_grad():
        clean = metric(model(b.input_ids, attention_mask=b.attention_mask))
        for layer, h in heads:
            def zero(z, hook, h=h):
                z[:, :, h] = 0.0
                return z

            hooks = [(f"blocks.{layer}.attn.hook_z", zero)]
            out.append(clean - metric(model.run_with_hooks(b.input_ids, attention_mask=b.attention_mask, fwd_hooks=hooks)))
    return torch.stack(out)


def counted(fn) -> tuple[float, dict]:
    """Matmul FLOPs ``fn`` runs (total, and per module)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops(), counter.get_flop_counts()


def flop_floor(model, ps, heads) -> float:
    """FLOPs of one clean pass plus, per head, the layers from its own to the last, each row on its real
    tokens only (right padding), unembedding only the keyword columns at the answer position (what the metric
    reads; counted row by row, unpadded)."""
    L, root, b, total = model.cfg.n_layers, type(model).__name__, ps.batch, 0.0
    keyword_unembed = 2 * model.cfg.d_model * (len(ps.keywords.bias) + len(ps.keywords.contrast))
    for r in range(len(b)):
        n = int(b.attention_mask[r].sum())
        per_module = counted(lambda r=r, n=n: model(b.input_ids[r : r + 1, :n]))[1]
        layer = [sum(per_module.get(f"{root}.blocks.{i}", {}).values()) for i in range(L)]
        suffix = [sum(layer[i:]) + keyword_unembed for i in range(L)]
        total += suffix[0] + sum(suffix[i] for i, _ in heads)
    return total


def scan_anchor(model, inj, ps, heads) -> dict:
    """Anchor 1: the exact scan three ways (one timed run each), their agreement and FLOPs over the floor."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    idx = torch.tensor([layer * H + h for layer, h in heads])
    got, t = run_ways(model, inj, {
        "project": lambda: ablation_scores(model, ps, heads=heads).mean(0).flatten()[idx],
        "tl": lambda: tl_scan(model, ps, heads),
        "loop": lambda: hooks_loop(model, ps, heads),
    }, 1)
    with inj.apply(model):
        scan = counted(lambda: ablation_scores(model, ps, heads=heads))[0]
        one_per_head = (1 + len(heads)) * counted(lambda: model(ps.batch.input_ids, attention_mask=ps.batch.attention_mask))[0]
        floor = flop_floor(model, ps, heads)
    diff = {(a, b): (got[a] - got[b]).abs().max().item() for a, b in (("tl", "project"), ("loop", "project"), ("tl", "loop"))}
    print(f"anchor scan: exact zero-ablation of {len(heads)} of {L * H} heads, {len(ps.batch)} rows: project "
          f"{t['project']:.1f}s, TL generic_activation_patch {t['tl']:.1f}s, run_with_hooks loop {t['loop']:.1f}s")
    line(f"TL activation-patching sweep vs project (max |diff| {diff['tl', 'project']:.1e})", t["tl"] / t["project"], ">= 3.2x")
    line(f"run_with_hooks loop vs project (max |diff| {diff['loop', 'project']:.1e})", t["loop"] / t["project"], ">= 3.2x")
    line(f"TL sweep vs run_with_hooks loop (max |diff| {diff['tl', 'loop']:.1e})", t["tl"] / t["loop"], "~1 (same passes)")
    line("project scan FLOPs / floor (clean pass + suffix layers, real tokens)", scan / floor, "<= 1.1")
    line("TL sweep or loop FLOPs / floor (1 + one full pass per head)", one_per_head / floor, "(reference)")
    print("  failure mode: generic_activation_patch takes no attention mask (exact here only because the probes "
          "are right-padded, so no answer position sees a pad)")
    return {"times": t, "diff": diff, "flops_over_floor": scan / floor, "loop_flops_over_floor": one_per_head / floor}


def grad_leaf(x, hook):
    """Workaround for the frozen bridge (no weight requires grad): the embedding output becomes a leaf."""
    return x.detach().requires_grad_(True)


def tl_batched_attribution(model, ps, names_filter=None) -> torch.Tensor:
    """``cache_activation_and_gradient`` over all rows at once (its default hook set); the zero-baseline score
    ``z . grad`` by hand. With ``names_filter`` it returns how many ``hook_z`` gradients came back None."""
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    with hooked(model, fwd_hooks=[("hook_embed", grad_leaf)]):
        got = cache_activation_and_gradient(model, ps.batch.input_ids, mean_metric(ps), names_filter=names_filter)
    if names_filter is not None:
        return sum(got.gradients.get(n) is None for n in names)
    return torch.stack([(got.activations[n] * got.gradients[n]).sum((0, 1, 3)) for n in names]).flatten()


def tl_attribution_patch(model, ps) -> torch.Tensor:
    """``attribution_patch`` with ``clean = corrupt`` = one row per call (its metric reads one row). Zero
    baseline: every ``hook_z`` is zeroed in the clean-argument pass (the first of each call's two passes), so
    its ``(a_clean - a_corrupt) . grad`` is ``-(z . grad)``; the sign is flipped back."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    passes = [0]

    def leaf_and_count(x, hook):
        passes[0] += 1
        return grad_leaf(x, hook)

    def zero_in_clean_pass(z, hook):
        return torch.zeros_like(z) if passes[0] % 2 else z

    hooks = [("hook_embed", leaf_and_count)] + [(f"blocks.{i}.attn.hook_z", zero_in_clean_pass) for i in range(L)]
    total, w = torch.zeros(L, H), row_weights(ps)
    with hooked(model, fwd_hooks=hooks):
        for r in range(len(ps.batch)):
            row = ps.batch.input_ids[r : r + 1]
            result = attribution_patch(model, row, row, row_metric(ps, float(w[r]), ps.answer_positions[r]))
            for node, score in result.node_scores.items():
                if node.kind == "attn_head_out":
                    total[node.layer, node.head] -= score
    return total.flatten()


def attribution_anchor(model, inj, ps, repeats: int) -> dict:
    """Anchor 2: attribution patching of every head, the project's vs TransformerLens's two ways."""
    got, t = run_ways(model, inj, {
        "project": lambda: attribution_scores(model, ps).mean(0).flatten(),
        "batched": lambda: tl_batched_attribution(model, ps),
        "patch": lambda: tl_attribution_patch(model, ps),
    }, repeats)
    row = ps.batch.input_ids[:1]
    with inj.apply(model):
        shipped = failure(lambda: attribution_patch(model, row, row, row_metric(ps, 1.0, ps.answer_positions[0])))
        z_only = tl_batched_attribution(model, ps, lambda name: name.endswith("attn.hook_z"))
    print(f"anchor attribution patching (zero baseline), {len(got['project'])} heads, {len(ps.batch)} rows: "
          f"project {t['project']:.2f}s, TL batched cache_activation_and_gradient {t['batched']:.2f}s, "
          f"TL attribution_patch {t['patch']:.2f}s")
    print(f"  failure mode: TL attribution_patch as shipped on the frozen bridge: {shipped}")
    print("  workarounds: a grad leaf at hook_embed (both TL ways); zero baseline by hand (batched: z . grad; "
          "attribution_patch: every hook_z zeroed in its clean-argument pass, sign flipped); one call per row")
    print(f"  failure mode: cache_activation_and_gradient with names_filter=hook_z alone: {z_only} of "
          f"{model.cfg.n_layers} gradients None, silently (the backward reaches no cached view)")
    agree = {}
    for name, label in (("batched", "TL cache_activation_and_gradient"), ("patch", "TL attribution_patch, per row")):
        agree[name] = rho, diff = spearman(got["project"], got[name]), (got["project"] - got[name]).abs().max().item()
        line(f"{label} vs project (Spearman {rho:.4f}, max |diff| {diff:.1e})", t[name] / t["project"], ">= 1")
    return {"times": t, "agreement": agree, "shipped": shipped, "z_only_missing": z_only}


def tl_cache_dla(model, ps, fold_gain: bool) -> torch.Tensor:
    """DLA from TransformerLens's cache at each row's answer position (rows grouped by position):
    ``stack_head_results`` + ``logit_attrs`` as shipped, or (``fold_gain``, the workaround)
    ``stack_head_results(apply_ln=True)`` times the final norm's gain, dotted with the unembedding by hand."""
    b, w, (bias, contrast) = ps.batch, row_weights(ps), ps.keywords.tensors()
    names = {f"blocks.{i}.attn.hook_z" for i in range(model.cfg.n_layers)} | {"ln_final.hook_scale"}
    gain = model.ln_final.original_component.weight.detach().float()
    gain = 1.0 + gain if getattr(model.cfg, "rmsnorm_uses_offset", False) else gain
    W_U, out = model.W_U.detach().float(), torch.zeros(model.cfg.n_layers * model.cfg.n_heads)
    with torch.no_grad():
        _, cache = model.run_with_cache(b.input_ids, attention_mask=b.attention_mask, names_filter=lambda n: n in names)
        for p in ps.answer_positions.unique().tolist():
            rows = ps.answer_positions == p
            if fold_gain:
                stack = cache.stack_head_results(pos_slice=p, apply_ln=True) * gain
                attrs = stack @ (W_U[:, bias].mean(-1) - W_U[:, contrast].mean(-1))
            else:
                stack = cache.stack_head_results(pos_slice=p)
                per_token = [cache.logit_attrs(stack, tokens=int(i), pos_slice=p) for i in torch.cat([bias, contrast])]
                attrs = torch.stack(per_token[: len(bias)]).mean(0) - torch.stack(per_token[len(bias) :]).mean(0)
            out += (attrs[:, rows].float().cpu() * w[rows]).sum(1)
    return out


def dla_anchor(model, inj, ps, repeats: int) -> dict:
    """Anchor 3: direct logit attribution, the project's vs TransformerLens's on the raw-weight bridge."""
    got, t = run_ways(model, inj, {
        "project": lambda: dla_scores(model, ps).mean(0).flatten(),
        "raw": lambda: tl_cache_dla(model, ps, fold_gain=False),
        "folded": lambda: tl_cache_dla(model, ps, fold_gain=True),
    }, repeats)
    bias, contrast = ps.keywords.tensors()
    with inj.apply(model):
        shipped = failure(lambda: direct_logit_attribution(
            model, ps.batch.input_ids, answer_tokens=int(bias[0]), incorrect_tokens=int(contrast[0]), unit="head"
        ))
    top, result = int(got["project"].abs().argmax()), {"times": t, "shipped": shipped}
    print(f"anchor direct logit attribution, {len(got['project'])} heads, {len(ps.batch)} rows: project "
          f"{t['project']:.2f}s, TL stack_head_results + logit_attrs {t['raw']:.2f}s")
    print(f"  TL direct_logit_attribution on the raw-weight bridge: {shipped}")
    for name, label in (("raw", "TL stack_head_results + logit_attrs, raw bridge"), ("folded", "TL apply_ln stack x gain by hand")):
        rho = spearman(got["project"], got[name])
        rel = abs(got[name][top] - got["project"][top]).item() / max(abs(got["project"][top]).item(), 1e-12)
        result[name] = (rho, rel)
        line(f"{label} vs project (Spearman {rho:.4f}, top-score rel. err {rel:.1e})", t[name] / t["project"], "agree")
    if result["raw"][1] > 1e-3:
        print(f"  failure mode: on the raw-weight bridge logit_attrs runs but ignores the final norm's gain (not "
              f"folded into W_U): the top head's score is off by {100 * result['raw'][1]:.0f}%")
    return result


def spread(every: list, n: int) -> list:
    """``n`` items of ``every`` evenly spaced (all for ``n <= 0``), as run.py picks heads."""
    return every if n <= 0 or n >= len(every) else every[:: max(1, len(every) // n)][:n]


ANCHORS = ("scan", "attribution", "dla", "step")


def bench_anchors(model, model_name: str | None = None, repeats: int = 3, *, probes: int = 6, heads: int = 0,
                  controls: int = 2, threads: int = 2, only: tuple[str, ...] = ANCHORS) -> dict:
    """The anchors of ``only`` (default all four) on one model (the memory probe only with ``model_name``, a
    model ``load_model`` knows)."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    chosen = spread([(layer, h) for layer in range(L) for h in range(H)], heads)
    inj, ps = setup(model, probes, controls)
    with warnings.catch_warnings():  # TL's backward hooks on a frozen model warn on every pass
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        runs = {
            "scan": lambda: scan_anchor(model, inj, ps, chosen),
            "attribution": lambda: attribution_anchor(model, inj, ps, repeats),
            "dla": lambda: dla_anchor(model, inj, ps, repeats),
            "step": lambda: step_anchor(model, repeats, model_name, threads),
        }
        return {name: runs[name]() for name in ANCHORS if name in only}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--probes", type=int, default=6)
    ap.add_argument("--heads", type=int, default=0, help="heads in the scan, evenly spaced (all: 0)")
    ap.add_argument("--controls", type=int, default=2, help="control groups in the probe set")
    ap.add_argument("--only", default=",".join(ANCHORS), help="comma list of: " + ", ".join(ANCHORS))
    args = ap.parse_args()
    only = tuple(args.only.split(","))
    if not set(only) <= set(ANCHORS):
        ap.error(f"--only takes {', '.join(ANCHORS)}; got {args.only!r}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = load_model(args.model, device="cpu")
    print(f"model {args.model}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads; torch threads "
          f"{torch.get_num_threads()}; {time.strftime('%Y-%m-%d')}")
    bench_anchors(model, args.model, args.repeats, probes=args.probes, heads=args.heads, controls=args.controls,
                  threads=args.threads, only=only)


if __name__ == "__main__":
    main()
