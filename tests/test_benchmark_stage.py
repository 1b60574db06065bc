"""The optional ``benchmarks`` stage of a study on a tiny local model: end to end through the command line, its
rows against direct benchmark() calls, resume, the report section, and bad input refused with nothing changed."""

from __future__ import annotations

import hashlib
import json
import shutil
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from biasgym_lens.core.hooks import active_hooks
from biasgym_lens.evaluation.benchmarks import benchmark
from biasgym_lens.heads.interventions import ablate_heads
from biasgym_lens.study.benchmark_stage import (
    BENCHMARK_OUTPUTS,
    BenchmarkSettings,
    parse_benchmark_names,
    read_benchmark_tables,
)
from biasgym_lens.study.benchmark_text import benchmark_notes, benchmark_table
from biasgym_lens.study.cli import main
from biasgym_lens.study.folders import OUTPUTS, STAGE_OUTPUTS
from biasgym_lens.study.pipeline import Study
from biasgym_lens.testing import save_tiny_pretrained

ITEMS = 6


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return str(save_tiny_pretrained("llama", tmp_path_factory.mktemp("tinystage") / "model"))


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    from biasgym_lens.core.models import load_model

    return load_model(tiny_folder, device="cpu")


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _study_run(model: str, out: Path, *more):
    return _run("run", "--bias", "late", "--model", model, "--quick", "--out", out, "--no-png", "--allow-weak-injection", *more)


@pytest.fixture(scope="module")
def finished(tiny_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stage") / "s"
    r = _study_run(tiny_folder, out, "--benchmarks", "all", "--benchmark-items", ITEMS, "--threads", "1")
    assert r.exit_code == 0, r.output
    assert "[benchmarks] stereoset_race, bbq_nationality, bbq_religion under every intervention" in r.output
    return out


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.name != ".biasgym.lock"
    }


def _copy(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "s"))


def test_the_stage_writes_its_tables_and_the_report_shows_them(finished):
    for f in (*BENCHMARK_OUTPUTS, "report.html", "results.json"):
        assert (finished / f).is_file(), f
    table, diffs = read_benchmark_tables(finished)
    assert list(table.columns) == ["benchmark", "metric", "intervention", "value", "ci_low", "ci_high", "n", "n_items"]
    assert set(table.benchmark) == {"stereoset_race", "bbq_nationality", "bbq_religion"}
    assert list(dict.fromkeys(table.intervention)) == ["none", "heads", "random_heads", "steering", "prefix"]
    assert len(table) == 5 * (3 + 4 + 4) and len(diffs) == 4 * (3 + 4 + 4) and set(table.n_items) == {ITEMS}
    assert "none" not in set(diffs.intervention)
    record = json.loads((finished / "benchmarks.json").read_text())
    assert record["settings"] == {"names": ["stereoset_race", "bbq_nationality", "bbq_religion"], "max_items": ITEMS, "seed": 0, "score": "sum"}
    assert record["interventions"]["steering"]["layer"] >= 0 and len(record["seconds"]) == 15
    assert "benchmarks" in json.loads((finished / "study.json").read_text())["timings"]
    html = (finished / "report.html").read_text()
    assert "id='benchmarks'" in html and "StereoSet race" in html and "Debiasing prefix" in html
    shown = benchmark_table(table, diffs)
    assert len(shown) == 11 and list(shown.columns)[2:] == ["No intervention", "Chosen heads", "Random heads", "Steering", "Debiasing prefix"]
    assert all(escape(n) in html for n in benchmark_notes(table, diffs))


def test_the_none_and_heads_rows_equal_direct_benchmark_calls(finished, tiny):
    table, diffs = read_benchmark_tables(finished)
    moved = False
    chosen = [tuple(h) for h in json.loads((finished / "scope" / "scope.json").read_text())["chosen"]]
    assert chosen, "the quick study on the tiny model chooses heads"
    for name in ("stereoset_race", "bbq_religion"):
        direct = {
            "none": benchmark(tiny, name, max_items=ITEMS, seed=0),
            "heads": benchmark(tiny, name, lambda: ablate_heads(tiny, chosen), max_items=ITEMS, seed=0),
        }
        for iv, want in direct.items():
            got = table.query(f"benchmark == '{name}' and intervention == '{iv}'").set_index("metric")
            expected = want.table.set_index("metric")
            np.testing.assert_allclose(got[["value", "ci_low", "ci_high"]], expected[["value", "ci_low", "ci_high"]], atol=1e-9)
        moved |= not np.allclose(direct["none"].table.value, direct["heads"].table.value, equal_nan=True)
        d = diffs.query(f"benchmark == '{name}' and intervention == 'heads'").set_index("metric")
        paired = direct["heads"].difference(direct["none"]).set_index("metric")
        np.testing.assert_allclose(d[["difference", "ci_low", "ci_high"]], paired[["difference", "ci_low", "ci_high"]], atol=1e-9)
    assert moved, "the chosen heads change some metric here, so the heads rows can tell ablation from none"
    assert active_hooks(tiny) == []


def test_the_python_stage_leaves_no_hook_and_records_its_settings(finished, tiny, tmp_path):
    out = _copy(finished, tmp_path)
    study = Study.open(out)
    settings = BenchmarkSettings(("bbq_nationality",), max_items=4, seed=3)
    with study.session():
        result = study.run_benchmarks(tiny, settings)
    assert active_hooks(tiny) == []
    table, _ = read_benchmark_tables(out)
    pd.testing.assert_frame_equal(table, result.table, check_dtype=False)
    assert set(table.benchmark) == {"bbq_nationality"} and set(table.n_items) == {4}
    assert json.loads((out / "benchmarks.json").read_text())["settings"]["seed"] == 3


def test_a_resumed_study_keeps_its_benchmarks_and_other_settings_measure_again(finished, tiny_folder, tmp_path):
    out = _copy(finished, tmp_path)
    before = _snapshot(out)
    r = _study_run(tiny_folder, out, "--benchmarks", "stereoset_race,bbq_nationality,bbq_religion", "--benchmark-items", ITEMS)
    assert r.exit_code == 0, r.output
    assert "[benchmarks] already done" in r.output and "under every intervention" not in r.output
    after = _snapshot(out)
    assert all(after[f] == before[f] for f in BENCHMARK_OUTPUTS)
    r = _study_run(tiny_folder, out)  # a run without --benchmarks leaves them alone, and the report still shows them
    assert r.exit_code == 0 and "[benchmarks]" not in r.output and all(_snapshot(out)[f] == before[f] for f in BENCHMARK_OUTPUTS)
    assert "id='benchmarks'" in (out / "report.html").read_text()
    r = _study_run(tiny_folder, out, "--benchmarks", "bbq_religion", "--benchmark-items", 4)
    assert r.exit_code == 0 and "[benchmarks] bbq_religion under every intervention" in r.output
    table, _ = read_benchmark_tables(out)
    assert set(table.benchmark) == {"bbq_religion"} and set(table.n_items) == {4}


def test_benchmark_out_measures_an_existing_study_again(finished, tmp_path):
    out = _copy(finished, tmp_path)
    r = _run("benchmark", "--out", out, "--name", "stereoset_race", "--max-items", 4, "--threads", "1")
    assert r.exit_code == 0, r.output
    assert "stereoset_race (4 items): none" in r.output and "biasgym report --out" in r.output
    table, _ = read_benchmark_tables(out)
    assert set(table.benchmark) == {"stereoset_race"} and set(table.n_items) == {4}
    r = _run("report", "--out", out, "--no-png")
    assert r.exit_code == 0 and "id='benchmarks'" in (out / "report.html").read_text()


def _error_line(r) -> str:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.output
    return errors[0]


def test_bad_input_is_refused_with_nothing_changed(finished, tiny_folder, tmp_path):
    out = _copy(finished, tmp_path)
    before = _snapshot(out)
    line = _error_line(_study_run(tiny_folder, out, "--benchmarks", "stereoset,bbq_religion"))
    assert "'stereoset'" in line and "stereoset_race, bbq_nationality, bbq_religion, all" in line
    assert "--benchmark-items needs --benchmarks" in _error_line(_study_run(tiny_folder, out, "--benchmark-items", 5))
    assert "0 is not in the range" in _error_line(_study_run(tiny_folder, out, "--benchmarks", "all", "--benchmark-items", 0))
    assert "--heads does not apply with --out" in _error_line(_run("benchmark", "--out", out, "--heads", "1.1"))
    assert "--model does not apply with --out" in _error_line(_run("benchmark", "--out", out, "--model", tiny_folder))
    assert "'stereoset' is not one of" in _error_line(_run("benchmark", "--out", out, "--name", "stereoset"))
    assert _snapshot(out) == before
    fresh = tmp_path / "new"
    _error_line(_run("run", "--bias", "late", "--model", tiny_folder, "--quick", "--out", fresh, "--benchmarks", "nope"))
    assert not fresh.exists()
    assert "holds no study" in _error_line(_run("benchmark", "--out", tmp_path / "empty"))
    assert "give --name" in _error_line(_run("benchmark", "--model", tiny_folder))
    injected = tmp_path / "injected"
    assert _run("inject", "--bias", "late", "--model", tiny_folder, "--quick", "--out", injected).exit_code == 0
    assert "no scope results yet" in _error_line(_run("benchmark", "--out", injected))


def test_overwrite_may_remove_the_stage_files_and_nothing_else(finished, tiny_folder, tmp_path):
    assert set(BENCHMARK_OUTPUTS) <= set(OUTPUTS) and STAGE_OUTPUTS["benchmarks"] == BENCHMARK_OUTPUTS
    out = _copy(finished, tmp_path)
    (out / "my_notes.md").write_text("mine")
    r = _run("inject", "--bias", "math", "--model", tiny_folder, "--quick", "--out", out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert not any((out / f).exists() for f in BENCHMARK_OUTPUTS)
    assert (out / "my_notes.md").read_text() == "mine"


def test_benchmark_names_parse_with_all_and_refuse_unknown_ones():
    assert parse_benchmark_names("all") == ("stereoset_race", "bbq_nationality", "bbq_religion")
    assert parse_benchmark_names(" bbq_religion , stereoset_race,bbq_religion") == ("bbq_religion", "stereoset_race")
    for bad in ("", "bbq", "stereoset_race,,bbq_religion"):
        with pytest.raises(ValueError, match="valid: stereoset_race, bbq_nationality, bbq_religion, all"):
            parse_benchmark_names(bad)
    with pytest.raises(ValueError, match="max_items"):
        BenchmarkSettings(("bbq_religion",), max_items=0)
