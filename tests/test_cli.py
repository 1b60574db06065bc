"""The biasgym command line on a tiny local model: the whole study, resume, and clear one-line errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from biasgym_lens.study.cli import main
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
    _check_paragraphs(out, res, html)
    r2 = _run("run", "--bias", "late", "--model", tiny_folder, "--quick", "--out", str(out), "--no-png", "--allow-weak-injection")
    assert r2.exit_code == 0 and "already done" in r2.output
    r3 = _run("report", "--out", str(out), "--no-png")
    assert r3.exit_code == 0 and "report.html" in r3.output


def _check_paragraphs(out, res, html):
    """The quick preset samples 2 paragraphs about the token and at least 2 pooled over the real groups, under
    'none' and (when heads were chosen) 'heads'; the pooled rates follow from the per-paragraph counts."""
    import math

    import pandas as pd

    from biasgym_lens.injection.catalogue import load_bias

    paragraphs = pd.read_csv(out / "paragraphs.csv")
    scores = pd.read_csv(out / "paragraph_scores.csv").set_index(["intervention", "kind"])
    real = load_bias("late").real_groups
    wanted = {"none"} | ({"heads"} if res["chosen_heads"] else set())
    assert set(paragraphs["intervention"]) == wanted
    for iv in wanted:
        rows = paragraphs[paragraphs["intervention"] == iv]
        assert (rows["kind"] == "token").sum() == 2 and (rows["kind"] == "real").sum() == len(real) * math.ceil(2 / len(real))
        for kind, g in rows.groupby("kind"):
            words = g["n_words"].sum()
            rate = 100 * (g["n_bias"].sum() - g["n_contrast"].sum()) / words if words else float("nan")
            assert scores.loc[(iv, kind), "rate"] == pytest.approx(rate, nan_ok=True)
    changes = pd.read_csv(out / "paragraph_changes.csv")
    assert len(changes) == (2 if res["chosen_heads"] else 0)
    assert "Bias in generated text" in html and len(res["paragraphs"]["examples"]) == 2 * len(wanted)
    roles = pd.read_csv(out / "head_role_effects.csv")
    chosen = {f"L{a}H{b}" for a, b in res["chosen_heads"]}
    assert set(roles["head"]) == chosen and ("What each chosen head does" in html) == bool(chosen)
    if chosen:  # the token and every real group of the bias, per head
        assert len(roles) == len(chosen) * (1 + len(real))
    edges = pd.read_csv(out / "circuit_edges.csv")  # the strongest edges, strongest first, ranks 1..n
    assert 0 < len(edges) <= 200 and list(edges["rank"]) == list(range(1, len(edges) + 1))
    assert (edges["score"].abs().diff().dropna() <= 1e-12).all()
    nodes = pd.read_csv(out / "circuit_nodes.csv")
    assert set(nodes.loc[nodes["chosen"], "node"]) == chosen and "The circuit: strongest edges" in html


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


needs_chromium = pytest.mark.skipif(_chromium() is None, reason="needs a Chromium (Debian: apt-get install chromium)")


def _browser(url: str, profile, *flags: str):
    """Headless Chromium's DOM of ``url`` after its scripts ran, with every network fetch failing."""
    import subprocess

    return subprocess.run(
        [
            _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",  # any network fetch fails
            "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}", "--enable-logging=stderr",
            "--v=0", "--virtual-time-budget=20000", *flags, "--dump-dom", url,
        ],
        capture_output=True, text=True, timeout=180,
    )


def _attribute_json(dom: str, name: str):
    import html
    import re

    found = re.search(name + r'="([^"]*)"', dom)
    assert found, f"the page's check script did not run ({name} missing)"
    return json.loads(html.unescape(found.group(1)))


@pytest.fixture(scope="module")
def browser_study(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("browser") / "study"
    r = _run("run", "--bias", "late", "--model", tiny_folder, "--quick", "--out", str(out), "--no-png", "--allow-weak-injection")
    assert r.exit_code == 0, r.output
    return out


@needs_chromium
def test_report_renders_every_figure_offline_in_a_real_browser(browser_study, tmp_path):
    import re

    report = browser_study / "report.html"
    n_figures = report.read_text().count("class='fig'")
    proc = _browser(report.as_uri(), tmp_path / "profile")
    dom = proc.stdout
    drawn = re.findall(r'<div id="fig-[^"]+"[^>]*class="[^"]*js-plotly-plot', dom) or re.findall(r"js-plotly-plot", dom)
    assert n_figures >= 6
    assert dom.count('class="main-svg"') >= n_figures, "every plot container must hold drawn SVG"
    assert len(drawn) >= n_figures
    console_errors = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln and ("Uncaught" in ln or "Error" in ln)]
    assert not console_errors, console_errors


_MEASURE = """<script>
window.addEventListener("load", function () { setTimeout(function () {
  var h = document.getElementById("headline").getBoundingClientRect();
  var wraps = Array.from(document.querySelectorAll(".tblwrap, .fig")).map(function (w) {
    return [w.className, w.scrollWidth, w.clientWidth]; });
  document.body.setAttribute("data-measure", JSON.stringify({
    scrollWidth: document.documentElement.scrollWidth, clientWidth: document.documentElement.clientWidth,
    innerWidth: window.innerWidth, innerHeight: window.innerHeight, top: h.top, bottom: h.bottom,
    headline: document.getElementById("headline").textContent, wraps: wraps}));
}, 300); });
</script>"""


@needs_chromium
def test_report_headline_is_visible_at_1280x800_without_horizontal_scroll(browser_study, tmp_path):
    # a copy of the report with a script that measures the laid-out page (the report itself has no such script)
    page = tmp_path / "measured.html"
    page.write_text((browser_study / "report.html").read_text().replace("</body>", _MEASURE + "</body>"))
    m = _attribute_json(_browser(page.as_uri(), tmp_path / "profile", "--window-size=1280,800").stdout, "data-measure")
    assert m["innerWidth"] == 1280 and 0 < m["innerHeight"] <= 800, m  # the window the test asks for
    assert 0 <= m["top"] < m["bottom"] <= m["innerHeight"], "the headline must be on the first screen"
    assert "did not take" in m["headline"]  # tiny random models never take the injection: the warning
    assert m["scrollWidth"] <= m["clientWidth"] <= 1280, "no horizontal scrollbar on the page"
    assert m["wraps"] and all(sw <= cw for _, sw, cw in m["wraps"]), m["wraps"]  # nor inside a table or figure


_DRAWN = """<script>
window.addEventListener("load", function () { setTimeout(function () {
  var out = Array.from(document.querySelectorAll("iframe")).map(function (f) {
    return [f.getAttribute("src"), f.contentDocument ? f.contentDocument.querySelectorAll(".main-svg").length : -1]; });
  document.body.setAttribute("data-drawn", JSON.stringify(out));
}, 500); });
</script>"""


@needs_chromium
def test_standalone_figures_open_offline(browser_study, tmp_path):
    import plotly.graph_objects as go

    figures = sorted((browser_study / "figures").glob("*.html"))
    assert len(figures) >= 6 and (browser_study / "figures" / "plotly.min.js").is_file()
    # a figure that needs the CDN, as a check that the network really is blocked
    cdn = tmp_path / "cdn.html"
    go.Figure(go.Bar(y=[1])).write_html(cdn, include_plotlyjs="cdn")
    frames = "".join(f'<iframe src="{p.as_uri()}" width="800" height="450"></iframe>' for p in [*figures, cdn])
    page = tmp_path / "frames.html"
    page.write_text(f"<!doctype html><html><body>{frames}{_DRAWN}</body></html>")
    proc = _browser(page.as_uri(), tmp_path / "profile", "--allow-file-access-from-files", "--window-size=1280,800")
    drawn = dict(_attribute_json(proc.stdout, "data-drawn"))
    assert drawn.pop(cdn.as_uri()) == 0, "the CDN figure drew: the network was not blocked"
    assert drawn == {p.as_uri(): drawn[p.as_uri()] for p in figures}
    assert all(n >= 1 for n in drawn.values()), drawn  # every figure drew its plot offline


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
