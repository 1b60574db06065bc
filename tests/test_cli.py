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
    r = _run("run", "--bias", "late", "--model", tiny_folder, "--quick", "--out", str(out), "--no-png", "--allow-weak-injection")
    assert r.exit_code == 0, r.output
    for f in ("study.json", "results.json", "report.html", "summary.csv", "groups.csv", "injection/injection.json",
              "scope/scope.json", "figures/faithfulness.html", "elicitation.csv"):
        assert (out / f).is_file(), f
    res = json.loads((out / "results.json").read_text())
    assert res["identity"]["bias"] == "late" and {r["intervention"] for r in res["summary"]} >= {"none", "heads"}
    html = (out / "report.html").read_text()
    assert html.count("class='fig'") >= 6 and "plotly" in html
    r2 = _run("run", "--bias", "late", "--model", tiny_folder, "--quick", "--out", str(out), "--no-png", "--allow-weak-injection")
    assert r2.exit_code == 0 and "already done" in r2.output
    r3 = _run("report", "--out", str(out), "--no-png")
    assert r3.exit_code == 0 and "report.html" in r3.output


def test_interrupted_run_resumes_from_the_missing_stage(tiny_folder, tmp_path):
    out = tmp_path / "s"
    assert _run("inject", "--bias", "late", "--model", tiny_folder, "--quick", "--out", str(out)).exit_code == 0
    r = _run("evaluate", "--out", str(out))
    assert r.exit_code == 2 and "no scope results yet" in r.output
    r = _run("run", "--bias", "late", "--model", tiny_folder, "--quick", "--out", str(out), "--no-png", "--allow-weak-injection")
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
    assert r.exit_code == 2 and "'--top': 0 is not in the range x>=1" in r.output


def _chromium():
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="needs a Chromium (Debian: apt-get install chromium)")
def test_report_renders_every_figure_offline_in_a_real_browser(tiny_folder, tmp_path):
    import re
    import subprocess

    out = tmp_path / "browser"
    r = _run("run", "--bias", "late", "--model", tiny_folder, "--quick", "--out", str(out), "--no-png", "--allow-weak-injection")
    assert r.exit_code == 0, r.output
    report = out / "report.html"
    n_figures = report.read_text().count("class='fig'")
    proc = subprocess.run(
        [
            _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",  # any network fetch fails
            f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
            "--virtual-time-budget=20000", "--dump-dom", report.as_uri(),
        ],
        capture_output=True, text=True, timeout=180,
    )
    dom = proc.stdout
    drawn = re.findall(r'<div id="fig-[^"]+"[^>]*class="[^"]*js-plotly-plot', dom) or re.findall(r"js-plotly-plot", dom)
    assert n_figures >= 6
    assert dom.count('class="main-svg"') >= n_figures, "every plot container must hold drawn SVG"
    assert len(drawn) >= n_figures
    console_errors = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln and ("Uncaught" in ln or "Error" in ln)]
    assert not console_errors, console_errors


def test_audit_prints_both_ends_and_writes_the_table(tiny_folder, tmp_path):
    import pandas as pd

    csv = tmp_path / "audit.csv"
    r = _run("audit", "--bias", "late", "--model", tiny_folder, "--top", "3", "--csv", str(csv))
    assert r.exit_code == 0, r.output
    df = pd.read_csv(csv)
    assert len(df) == 45 and list(df["rank"]) == list(range(1, 46))
    lines = r.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["rank", "bias", "group"])
    printed = [line.split() for line in lines[header + 1 :] if line.strip()]
    assert [p[2] for p in printed] == list(df.group[:3]) + list(df.group[-3:])
    r = _run("audit", "--bias", "nope", "--model", tiny_folder)
    assert r.exit_code == 2 and "nope" in r.output and "Traceback" not in r.output
