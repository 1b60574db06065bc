"""The biasgym command line on a tiny local model: the whole study, resume, and clear one-line errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from biasgym_lens.cli import main
from biasgym_lens.testing import save_tiny_pretrained


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return str(save_tiny_pretrained("llama", tmp_path_factory.mktemp("tinycli") / "model"))


def _run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_run_quick_writes_everything_and_resumes(tiny_folder, tmp_path):
    out = tmp_path / "study"
    r = _run("run", "--bias", "late", "--model", tiny_folder, "--quick", "--out", str(out), "--no-png")
    assert r.exit_code == 0, r.output
    for f in ("study.json", "results.json", "report.html", "summary.csv", "groups.csv", "injection/injection.json",
              "scope/scope.json", "figures/faithfulness.html", "elicitation.csv"):
        assert (out / f).is_file(), f
    res = json.loads((out / "results.json").read_text())
    assert res["identity"]["bias"] == "late" and {r["intervention"] for r in res["summary"]} >= {"none", "heads"}
    html = (out / "report.html").read_text()
    assert html.count("class='fig'") >= 6 and "plotly" in html
    r2 = _run("run", "--bias", "late", "--model", tiny_folder, "--quick", "--out", str(out), "--no-png")
    assert r2.exit_code == 0 and "already done" in r2.output
    r3 = _run("report", "--out", str(out), "--no-png")
    assert r3.exit_code == 0 and "report.html" in r3.output


def test_interrupted_run_resumes_from_the_missing_stage(tiny_folder, tmp_path):
    out = tmp_path / "s"
    assert _run("inject", "--bias", "late", "--model", tiny_folder, "--quick", "--out", str(out)).exit_code == 0
    r = _run("evaluate", "--out", str(out))
    assert r.exit_code == 2 and "no scope results yet" in r.output
    r = _run("run", "--bias", "late", "--model", tiny_folder, "--quick", "--out", str(out), "--no-png")
    assert r.exit_code == 0 and "[inject] already done" in r.output and "[scope] ..." in r.output


def test_user_mistakes_are_one_line_errors(tiny_folder, tmp_path):
    r = _run("run", "--bias", "nope", "--model", tiny_folder, "--out", str(tmp_path / "a"))
    assert r.exit_code == 2 and "nope" in r.output and "valid" in r.output.lower()
    assert "Traceback" not in r.output
    r = _run("run", "--bias", "late", "--model", str(tmp_path / "missing"), "--quick", "--out", str(tmp_path / "b"))
    assert r.exit_code == 2 and "does not exist" in r.output
    out = tmp_path / "c"
    assert _run("inject", "--bias", "late", "--model", tiny_folder, "--quick", "--out", str(out)).exit_code == 0
    r = _run("inject", "--bias", "math", "--model", tiny_folder, "--quick", "--out", str(out))
    assert r.exit_code == 2 and "holds another study" in r.output
    r = _run("inject", "--bias", "math", "--model", tiny_folder, "--quick", "--out", str(out), "--overwrite")
    assert r.exit_code == 0
    assert json.loads((out / "study.json").read_text())["identity"]["bias"] == "math"
    r = _run("scope", "--out", str(tmp_path / "empty"))
    assert r.exit_code == 2 and "holds no study" in r.output
    r = _run("demo", "--top", "0", "--model", tiny_folder)
    assert r.exit_code == 2 and "--top must be >= 1" in r.output
