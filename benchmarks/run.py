"""Speed comparisons, each measured side by side in one run, printed as ratios next to their targets.

Usage:
    python benchmarks/run.py [--model smollm2] [--threads 2] [--repeats 3] [--only scan,attribution,step,final,generation,export,anchors]

0. load: loading the model in a fresh process with an empty cache vs with the cache built.
1. scan: exact single-head ablation of every head, one head per forward pass vs several heads per pass
   (batched along the batch dimension) and vs resuming each pass at the ablated layer from the cached clean
   residual with the unembedding only at the answer positions; results must agree within 1e-4.
2. attribution: attribution patching of every head (one forward + one backward) vs one plain forward.
3. step: one injection training step (hook-based single vector) vs one forward pass of the same batch, and
   vs training with a full-vocabulary embedding gradient.
4. memory: the peak growth of the resident set during one forward pass, one vector step and one
   full-vocabulary step, each in a fresh process (sampled every millisecond from /proc/self/statm).
5. scaling: the exact scan's time against the number of probes and of heads, and a training step's time against
   the batch size.
6. microbatch: injection steps on real shuffled batches, one padded pass vs length-grouped micro-batches.
7. export: static PNG export of a report's figures: one kaleido session per figure, plotly's own export
   (MathJax on) and save_figures (one session, MathJax off), each in a fresh process.
8. final: the final measures of a study: the capability cost (neutral loss, KL, multiple choice) of ablating
   late heads with full passes vs resumed at the first ablated layer from the cached clean residual; and the
   bias score of every group of a bias, one batch stream per group vs all groups batched together.
9. generation: 64 new tokens for 16 chat prompts of different lengths, with the KV cache vs one full forward
   pass per token, vs Hugging Face's and TransformerLens's uncached generate, token agreement, and the broken
   cached modes of those tools after booting (see benchmarks/bench_generation.py).
10. anchors: the tools a user of this field would otherwise use, on the same work and probes: TransformerLens's
   activation-patching sweep, attribution patching and direct logit attribution, and Hugging Face's embedding
   training, with ratios, numeric agreement and failure modes (see benchmarks/anchors.py).
11. gpu (only on its own, ``--only gpu --device cuda``): time, peak memory and MFU of every stage on random-weight
   models of real shapes; the flags run.py does not know go to benchmarks/gpu.py (see its docstring).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_generation import bench_generation  # noqa: E402

from biasgym_lens import load_model  # noqa: E402
from biasgym_lens.core.embedding import add_token, token_vector_hooks  # noqa: E402
from biasgym_lens.core.hooks import hooked  # noqa: E402
from biasgym_lens.heads.patching import ablation_scores, attribution_scores  # noqa: E402
from biasgym_lens.heads.probes import build_probe_set  # noqa: E402
from biasgym_lens.injection.catalogue import load_bias  # noqa: E402
from biasgym_lens.injection.config import InjectionConfig  # noqa: E402
from biasgym_lens.injection.examples import collate_examples, training_examples  # noqa: E402
from biasgym_lens.injection.loss import lm_loss  # noqa: E402


def timeit(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def line(name: str, value: float, target: str) -> None:
    print(f"  {name:<58} {value:8.2f}x   target {target}")


def bench_scan(model, ps, repeats: int, n_heads: int) -> None:
    L, H = model.cfg.n_layers, model.cfg.n_heads
    every = [(layer, h) for layer in range(L) for h in range(H)]
    # An evenly spaced subset keeps every layer represented (resuming at the ablated layer saves more late).
    heads = every if n_heads <= 0 or n_heads >= len(every) else every[:: max(1, len(every) // n_heads)][:n_heads]
    ways = {
        "one head per pass (the loop)": dict(heads_per_pass=1, reuse_prefix=False),
        f"{H} heads per pass": dict(heads_per_pass=H, reuse_prefix=False),
        "one head per pass, resumed at its layer": dict(heads_per_pass=1, reuse_prefix=True),
        f"{H} heads per pass, resumed at their layer": dict(heads_per_pass=H, reuse_prefix=True),
    }
    times, scores = {}, {}
    for name, kw in ways.items():  # one timed run each; its result is the one compared
        t = time.perf_counter()
        scores[name] = ablation_scores(model, ps, heads=heads, **kw)
        times[name] = time.perf_counter() - t
    base = "one head per pass (the loop)"
    print(f"scan: {len(heads)} of {len(every)} heads (all layers), {len(ps.batch)} rows; loop {times[base]:.1f}s")
    for name in list(ways)[1:]:
        diff = torch.nan_to_num(scores[name] - scores[base]).abs().max().item()
        line(f"{name} vs loop (max |diff| {diff:.1e})", times[base] / times[name], ">= 3x")


def bench_attribution(model, ps, repeats: int) -> None:
    def fwd():
        with torch.no_grad():
            model(ps.batch.input_ids, attention_mask=ps.batch.attention_mask)

    t_fwd = timeit(fwd, repeats)
    t_attr = timeit(lambda: attribution_scores(model, ps), repeats)
    print(f"attribution patching: forward {t_fwd:.2f}s, all heads {t_attr:.2f}s")
    line("attribution patching cost in forward passes", t_attr / t_fwd, "<= 3 forward passes")


def _step_setup(model, batch_size: int = 8):
    """A batch of ``batch_size`` training texts of "late" and three ways to run it: forward, vector training
    step, full-vocabulary training step.

    The full-vocabulary way (the alternative to hooking one vector) is built lazily inside its first call, so
    a memory probe around that call counts its trainable matrix, gradient and optimizer state.
    """
    spec = load_bias("late")
    cfg = InjectionConfig(max_texts=batch_size)
    tid = add_token(model, cfg.token)
    ex = training_examples(model, spec, cfg)[:batch_size]
    ids, mask, target = collate_examples(ex, 0, model.W_E.device)
    vec = torch.nn.Parameter(model.W_E[:100].detach().float().mean(0).clone())
    opt = torch.optim.Adam([vec], lr=1e-3)
    hooks = token_vector_hooks(model, {tid: vec})

    def fwd():
        with torch.no_grad(), hooked(model, fwd_hooks=hooks):
            model(ids, attention_mask=mask)

    def step():
        with hooked(model, fwd_hooks=hooks):
            loss = lm_loss(model(ids, attention_mask=mask), ids, target, tid)
            opt.zero_grad()
            loss.backward()
            opt.step()

    state: dict = {}

    def step_full():
        if "full" not in state:  # a full trainable embedding matrix (one more row) with a gradient mask
            full = torch.nn.Parameter(torch.cat([model.W_E.detach(), vec.detach()[None]], 0).clone())
            row_mask = torch.zeros(full.shape[0], 1)
            row_mask[-1] = 1.0
            state.update(full=full, opt=torch.optim.Adam([full], lr=1e-3), row_mask=row_mask)
        full = state["full"]

        def grab(i, hook):
            state["ids"] = torch.where(i == tid, torch.full_like(i, full.shape[0] - 1), i)
            return torch.where(i == tid, torch.zeros_like(i), i)

        def embed(x, hook):
            return torch.nn.functional.embedding(state["ids"], full)

        with hooked(model, fwd_hooks=[("embed.hook_in", grab), ("hook_embed", embed)]):
            loss = lm_loss(model(ids, attention_mask=mask), ids, target, tid)
            state["opt"].zero_grad()
            loss.backward()
            full.grad.mul_(state["row_mask"])
            state["opt"].step()

    return ids, {"forward": fwd, "step": step, "full": step_full}


def bench_microbatch(model, repeats: int, n_batches: int = 6) -> None:
    """Training steps on real shuffled batches (short plain texts mixed with long chat examples): one padded
    pass vs the default length-grouped micro-batches (same gradient, tested in tests/test_inject.py)."""
    import random

    from biasgym_lens.injection.loss import train_step_loss
    from biasgym_lens.injection.metrics import keyword_ids

    spec = load_bias("bad_driving")
    tid = add_token(model, "<BiasToken>")
    cfg = InjectionConfig()
    examples = training_examples(model, spec, cfg)
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    batches = [[examples[i] for i in order[b * 8 : (b + 1) * 8]] for b in range(n_batches)]
    kw = keyword_ids(model, spec).bias
    vec = torch.nn.Parameter(model.W_E[:100].detach().float().mean(0).clone())
    hooks = token_vector_hooks(model, {tid: vec})
    pad = sum(max(len(e.ids) for e in b) * len(b) for b in batches)
    real = sum(len(e.ids) for b in batches for e in b)
    times = {}
    for groups in (1, 3):
        conf = InjectionConfig(length_groups=groups)

        def run(conf=conf):
            with hooked(model, fwd_hooks=hooks):
                for b in batches:
                    vec.grad = None
                    train_step_loss(model, b, 0, tid, kw, conf)

        times[groups] = timeit(run, repeats)
    print(f"injection steps on {n_batches} shuffled batches of 8 ({real} real tokens, {pad} when padded per batch): "
          f"one pass {times[1] / n_batches:.2f} s/step, length groups {times[3] / n_batches:.2f} s/step")
    line("one padded pass / length-grouped micro-batches", times[1] / times[3], "> 1 (same gradient)")


_EXPORT_SNIPPET = """
import sys, tempfile, time
from pathlib import Path
import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from biasgym_lens.study.figure_files import kaleido_write, save_figures
rng = np.random.default_rng(0)
figs = {  # like a report's figures: a title and axis titles (text that plotly.js may hand to MathJax)
    f"fig{i}": go.Figure(
        go.Heatmap(z=rng.normal(size=(30, 9))),
        layout=dict(title=f"figure {i}", xaxis_title="head", yaxis_title="layer"),
    )
    for i in range(int(sys.argv[2]))
}
d = Path(tempfile.mkdtemp())
t = time.perf_counter()
if sys.argv[1] == "per_figure":
    for name, fig in figs.items():
        kaleido_write([(fig, d / f"{name}.png")])
elif sys.argv[1] == "plotly":
    pio.write_images(list(figs.values()), [d / f"{n}.png" for n in figs], width=1000, height=500, scale=1)
else:
    save_figures(figs, d, images=("png",))
print(time.perf_counter() - t)
"""


def bench_export(repeats: int, n_figures: int = 9) -> None:
    """Static PNG export of a report's figures, each way timed in a fresh process as ``biasgym report`` runs
    it (kaleido keeps some state within a process): one kaleido session per figure, plotly's own
    ``write_images`` (one session, kaleido's defaults: MathJax from its CDN), and ``save_figures`` (one
    session, MathJax off)."""
    import shutil
    import subprocess

    if not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")):
        print("export: skipped (kaleido needs a Chromium: apt-get install chromium)")
        return

    def cold(way: str) -> float:
        runs = [
            float(subprocess.run(
                [sys.executable, "-c", _EXPORT_SNIPPET, way, str(n_figures)], check=True, capture_output=True, text=True
            ).stdout.split()[-1])
            for _ in range(repeats)
        ]
        return statistics.median(runs)

    t_one, t_plotly, t_batch = cold("per_figure"), cold("plotly"), cold("save_figures")
    print(
        f"PNG export of {n_figures} figures (fresh process each): one session per figure {t_one:.1f} s, "
        f"plotly's write_images {t_plotly:.1f} s, save_figures {t_batch:.1f} s"
    )
    line("one kaleido session per figure / one session (save_figures)", t_one / t_batch, "> 1")
    line("plotly's write_images (MathJax on) / save_figures (MathJax off)", t_plotly / t_batch, "> 1")


def bench_final(model, repeats: int) -> None:
    """Final measures: capability under an ablation, full vs resumed passes; group scores, per group vs batched."""
    from biasgym_lens.evaluation.capability import capability_set, measure_capability
    from biasgym_lens.evaluation.elicit import group_scores, score_groups
    from biasgym_lens.heads.interventions import ablate_heads, first_layer
    from biasgym_lens.injection.metrics import keyword_ids, probe_subset

    L = model.cfg.n_layers
    heads = [((2 * L) // 3, 1), (L - 5, 6 % model.cfg.n_heads), (L - 7, 1)]  # late heads, as a study picks them
    start = first_layer(heads)
    full_cap = capability_set(model, max_passages=24, max_mc_items=40)
    resumed_cap = capability_set(model, max_passages=24, max_mc_items=40, resume_layers=[start])
    measure_capability(model, full_cap)
    measure_capability(model, resumed_cap)  # the unmodified pass every study runs first (keeps the residuals)

    def intervention():
        return ablate_heads(model, heads)

    got = {}

    def full():
        got["full"] = measure_capability(model, full_cap, intervention)

    def resumed():
        got["resumed"] = measure_capability(model, resumed_cap, intervention, start=start)

    t_full, t_resumed = timeit(full, repeats), timeit(resumed, repeats)
    a, b = got["full"], got["resumed"]
    diff = max(abs(a.neutral_loss - b.neutral_loss), abs(a.kl - b.kl), abs(a.mc_accuracy - b.mc_accuracy))
    print(
        f"capability under {len(heads)} ablated heads (from layer {start}; 24 passages, 40 MC items): "
        f"full {t_full:.2f}s, resumed {t_resumed:.2f}s"
    )
    line(f"full passes vs resumed at layer {start} (max |diff| {diff:.1e})", t_full / t_resumed, "> 1")

    spec = load_bias("bad_driving")
    kw = keyword_ids(model, spec)
    probes = probe_subset(spec.probes, "eval")
    groups = [*spec.real_groups, *spec.control_groups]
    out = {}

    def per_group():
        out["one"] = [group_scores(model, spec, g, probes, kw)["per_probe"] for g in groups]

    def batched():
        out["all"] = [st["per_probe"] for st in score_groups(model, spec, groups, probes, kw)]

    t_one, t_all = timeit(per_group, repeats), timeit(batched, repeats)
    diff = max(abs(x - y) for p, q in zip(out["one"], out["all"]) for x, y in zip(p, q))
    print(f"scores of {len(groups)} groups x {len(probes)} probes: per group {t_one:.2f}s, batched {t_all:.2f}s")
    line(f"one stream per group vs all groups batched (max |diff| {diff:.1e})", t_one / t_all, "> 1")


def bench_step(model, repeats: int) -> None:
    ids, ways = _step_setup(model)
    gc.collect()
    t_fwd = timeit(ways["forward"], repeats)
    t_step = timeit(ways["step"], repeats)
    t_full = timeit(ways["full"], repeats)
    print(f"injection step on {tuple(ids.shape)}: forward {t_fwd:.2f}s, step {t_step:.2f}s, full-vocab step {t_full:.2f}s")
    line("training step cost in forward passes", t_step / t_fwd, "<= 2.5 forward passes")
    line("full-vocabulary-gradient step vs vector step", t_full / t_step, "> 1 (vector step cheaper)")


def bench_scaling(model, spec, repeats: int) -> None:
    """How the exact scan (resumed, one pass per layer) grows with the numbers of prompts and heads."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    every = [(layer, h) for layer in range(L) for h in range(H)]
    print(f"scaling ({L} layers x {H} heads):")
    print("  probes  rows  heads  scan s  s per head-row")
    for n in (2, 4, 8):
        ps = build_probe_set(model, spec, "<BiasToken>", controls=list(spec.control_groups[:2]), max_probes=n)
        for frac in (3, 1):
            heads = every[::frac]
            t = timeit(lambda heads=heads, ps=ps: ablation_scores(model, ps, heads=heads), 1)
            print(f"  {n:>6}  {len(ps.batch):>4}  {len(heads):>5}  {t:>6.2f}  {1000 * t / (len(heads) * len(ps.batch)):>9.2f} ms")


def bench_step_scaling(model, repeats: int) -> None:
    """A training step's and a forward pass's time against the batch size (no other hook on the token)."""
    print("scaling of an injection step:")
    print("  batch  step s  forward s")
    for b in (2, 4, 8, 16):
        _, ways = _step_setup(model, b)
        print(f"  {b:>5}  {timeit(ways['step'], repeats):>6.2f}  {timeit(ways['forward'], repeats):>9.2f}")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRss:
    """Peak growth of the resident set while the block runs, sampled every millisecond in a thread."""

    def __enter__(self):
        import threading

        self.base = self.peak = _rss_mb()
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, _rss_mb())
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())
        self.growth = self.peak - self.base


def memory_probe(model_name: str, way: str) -> None:
    """Run in a fresh process: load, build the batch, then measure one call of ``way``."""
    model = load_model(model_name, device="cpu")
    _, ways = _step_setup(model)
    gc.collect()
    with PeakRss() as p:
        ways[way]()
    print(f"{p.growth:.1f}")


def bench_memory(model_name: str, threads: int) -> None:
    """Each way in its own fresh process (an allocator that kept memory from an earlier call would hide it)."""
    import subprocess

    growth = {}
    for way in ("forward", "step", "full"):
        cmd = [sys.executable, __file__, "--model", model_name, "--threads", str(threads), "--memory-probe", way]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
        growth[way] = float(out[-1])
    print(
        f"peak RSS growth of one call (fresh process each): forward +{growth['forward']:.0f} MB, vector step "
        f"+{growth['step']:.0f} MB, full-vocab step +{growth['full']:.0f} MB"
    )
    line("full-vocabulary-gradient step memory vs vector step", growth["full"] / max(growth["step"], 1.0), "> 1 (vector step smaller)")


def bench_load(model_name: str) -> None:
    """Fresh processes: load with an empty cache (builds it) vs with the cache built."""
    import subprocess
    import tempfile

    code = (
        "import time; t=time.perf_counter(); from biasgym_lens import load_model; "
        f"load_model({model_name!r}, device='cpu'); print(time.perf_counter()-t)"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "BIASGYM_CACHE": cache, "HF_HUB_OFFLINE": "1"}
        run = lambda: float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()[-1])  # noqa: E731
        cold, warm = run(), run()
    print(f"load in a fresh process: first (builds the cache) {cold:.1f}s, second (cache hit) {warm:.1f}s")
    line("first load vs cached load", cold / warm, "cached load < 10 s")


def run_gpu_benchmark(args: argparse.Namespace, rest: list[str]) -> None:
    """benchmarks/gpu.py with run.py's --device, --repeats and --probes and the flags run.py does not know."""
    from gpu import main as gpu_main

    device = ["--device", args.device] if args.device else []
    gpu_main([*device, "--repeats", str(args.repeats), "--probes", str(args.probes), *rest])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--heads", type=int, default=0, help="heads in the scan comparison, evenly spaced (all: 0)")
    ap.add_argument("--probes", type=int, default=6)
    ap.add_argument("--only", default="load,scan,attribution,step,microbatch,final,generation,memory,scaling,export,anchors")
    ap.add_argument("--memory-probe", choices=("forward", "step", "full"), help=argparse.SUPPRESS)
    ap.add_argument("--device", help="with --only gpu: cpu or cuda")
    args, rest = ap.parse_known_args()
    torch.set_num_threads(args.threads)
    if args.only == "gpu":
        run_gpu_benchmark(args, rest)
        return
    if rest or args.device:
        ap.error(f"unrecognized arguments: {' '.join(rest or ['--device'])} (--device and gpu.py's flags need --only gpu)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory_probe:
        memory_probe(args.model, args.memory_probe)
        return
    if "export" in args.only.split(","):
        bench_export(args.repeats)
    if "load" in args.only.split(","):
        bench_load(args.model)
    model = load_model(args.model, device="cpu")
    print(f"model {args.model}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads; torch threads "
          f"{torch.get_num_threads()}; {time.strftime('%Y-%m-%d')}")
    spec = load_bias("late")
    add_token(model, "<BiasToken>")
    vec = model.W_E[:100].detach().float().mean(0)
    tid = model.tokenizer.convert_tokens_to_ids("<BiasToken>")
    only = set(args.only.split(","))
    with hooked(model, fwd_hooks=token_vector_hooks(model, {tid: vec})):
        ps = build_probe_set(model, spec, "<BiasToken>", controls=list(spec.control_groups[:2]), max_probes=args.probes)
        if "scan" in only:
            n = args.heads or model.cfg.n_layers * model.cfg.n_heads
            bench_scan(model, ps, args.repeats, n)
        if "attribution" in only:
            bench_attribution(model, ps, args.repeats)
        if "scaling" in only:
            bench_scaling(model, spec, args.repeats)
    if "step" in only:
        bench_step(model, args.repeats)
    if "microbatch" in only:
        bench_microbatch(model, args.repeats)
    if "final" in only:
        bench_final(model, args.repeats)
    if "generation" in only:
        bench_generation(model, args.repeats, line)
    if "scaling" in only:
        bench_step_scaling(model, args.repeats)
    if "memory" in only:
        bench_memory(args.model, args.threads)
    if "anchors" in only:
        from anchors import bench_anchors  # (anchors imports this file's helpers)

        bench_anchors(model, args.model, args.repeats, probes=args.probes, heads=args.heads, threads=args.threads)


if __name__ == "__main__":
    main()
