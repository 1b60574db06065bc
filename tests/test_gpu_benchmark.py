"""benchmarks/gpu.py on CPU with the tiny shape: every measure in the JSON, positive times, and a forward
pass's FLOP count equal to one made from the model's shapes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

GPU_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
# The tiny tokenizer splits one keyword of the bias; the library warns and leaves it out of the metric.
pytestmark = pytest.mark.filterwarnings("ignore:bias 'bad_driving'.*not a single token:UserWarning")
COUNTED = ("forward", "inject", "dla", "attention", "attribution", "ablation", "generate")  # load, scope: not


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", GPU_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while being defined
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tiny_run(gpu_bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_bench") / "gpu.json"
    argv = ["--device", "cpu", "--dtype", "float32", "--shapes", "tiny", "--tokenizer", "tiny", "--probes", "2",
            "--controls", "1", "--texts", "2", "--repeats", "1", "--json", str(out)]
    report = gpu_bench.main(argv)
    return report, json.loads(out.read_text())


def forward_flops(r: dict, batch: int, seq: int) -> int:
    """FLOPs of one plain forward pass of a Llama, from its shapes: every matmul's 2 * weights * tokens
    (query and output, key and value, the three MLP matrices, the unembedding) plus the attention scores and
    the pattern times the values (each 2 * batch * heads * seq^2 * d_head per layer); norms and softmax are
    not counted."""
    d, heads, kv, d_head = r["d_model"], r["heads"], r["kv_heads"], r["d_head"]
    weights = (
        r["layers"] * (2 * d * heads * d_head + 2 * d * kv * d_head + 3 * d * r["d_mlp"]) + d * r["vocab"]
    )
    attention = r["layers"] * 2 * (2 * batch * heads * seq * seq * d_head)
    return 2 * weights * batch * seq + attention


def test_the_json_has_every_measure_with_positive_times(gpu_bench, tiny_run):
    report, data = tiny_run
    assert data == json.loads(json.dumps(report))
    assert {"date", "device", "torch", "transformers", "peak_tflops"} <= set(data)
    assert data["peak_tflops"] is None  # CPU without --peak-tflops: no MFU
    (r,) = data["results"]
    assert r["shape"] == "tiny" and r["dtype"] == "float32" and r["layers"] == 2
    assert r["vocab"] == data["vocab"]  # the model's vocabulary is the tokenizer's
    assert list(r["measures"]) == list(gpu_bench.MEASURES)
    for name, m in r["measures"].items():
        assert m["time_s"] > 0 and m["peak_mib"] > 0, name
        if name in COUNTED:
            assert m["flops"] > 0, name
        else:
            assert m["flops"] is None, name
        assert m["mfu"] is None, name
    assert r["measures"]["ablation"]["detail"] == {"probes": 2, "controls": 1, "heads": 2 * 4}
    assert r["measures"]["ablation"]["flops"] > r["measures"]["forward"]["flops"] / 10


def test_the_forward_flops_match_the_shapes(tiny_run):
    (r,) = tiny_run[1]["results"]
    fwd = r["measures"]["forward"]
    expected = forward_flops(r, fwd["detail"]["batch"], fwd["detail"]["seq"])
    assert fwd["flops"] == pytest.approx(expected, rel=0.03)
    assert fwd["tflops_per_s"] == pytest.approx(fwd["flops"] / fwd["time_s"] / 1e12)


def test_mfu_uses_the_given_peak_and_the_table_names_every_measure(gpu_bench, tiny_run):
    report = json.loads(json.dumps(tiny_run[0]))
    measures = {k: gpu_bench.Measure(**v) for k, v in report["results"][0]["measures"].items()}
    gpu_bench.add_rates(measures, 0.5)
    fwd = measures["forward"]
    assert fwd.mfu == pytest.approx(fwd.flops / fwd.time_s / 0.5e12)
    assert gpu_bench.peak_tflops("cpu", None) is None and gpu_bench.peak_tflops("cpu", 2.0) == 2.0
    table = gpu_bench.markdown_table(report)
    assert all(f"| tiny | 0.1 M | float32 | {name} |" in table for name in gpu_bench.MEASURES)


def test_bad_flags_are_refused(gpu_bench):
    for argv in (["--shapes", "llama-70b"], ["--repeats", "0"], ["--dtype", "int8"]):
        with pytest.raises(SystemExit):
            gpu_bench.parse_args(argv)
