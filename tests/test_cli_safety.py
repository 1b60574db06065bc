"""The command line never loses a user's file, resumes after an interrupt anywhere, and says what is wrong in one line."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from biasgym_lens.study.cli import main
from biasgym_lens.testing import save_tiny_pretrained


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return str(save_tiny_pretrained("llama", tmp_path_factory.mktemp("tinysafe") / "model"))


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def _one_error_line(r) -> str:
    """The user-mistake contract: exit code 2, no traceback, exactly one ``Error:`` line on stderr."""
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.stderr
    assert not [line for line in r.stderr.splitlines() if line.startswith(("Usage:", "Try "))], r.stderr
    return errors[0]


def _user_folder(tmp_path: Path) -> Path:
    p = tmp_path / "p"
    p.mkdir()
    (p / "thesis.tex").write_text("three years of work")
    (p / "data").mkdir()
    (p / "data" / "raw.csv").write_text("1,2,3\n")
    return p


# ------------------------------------------------------------------------------------------------ overwrite


@pytest.mark.parametrize("command", ["run", "inject"])
def test_overwrite_with_a_mistyped_model_touches_nothing(tmp_path, command):
    p = _user_folder(tmp_path)
    before = _snapshot(p)
    line = _one_error_line(_run(command, "--out", p, "--overwrite", "--model", tmp_path / "typo", "--quick"))
    assert str(p) in line and "holds files and no study" in line
    assert _snapshot(p) == before


def test_overwrite_never_empties_a_folder_that_holds_no_study_even_with_a_good_model(tmp_path, tiny_folder):
    p = _user_folder(tmp_path)
    before = _snapshot(p)
    _one_error_line(_run("inject", "--out", p, "--overwrite", "--model", tiny_folder, "--quick"))
    assert _snapshot(p) == before


@pytest.mark.parametrize("where", [".", "~", "/", ".."])
def test_overwrite_refuses_the_working_folder_home_root_and_parents(tmp_path, monkeypatch, where):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "a"))
    before = _snapshot(tmp_path)
    line = _one_error_line(_run("inject", "--out", os.path.expanduser(where), "--overwrite", "--model", tmp_path / "typo"))
    assert "refusing --overwrite" in line
    assert _snapshot(tmp_path) == before


def test_overwrite_replaces_only_the_outputs_of_the_previous_study(tmp_path, tiny_folder):
    out = tmp_path / "s"
    assert _run("inject", "--bias", "late", "--model", tiny_folder, "--quick", "--out", out).exit_code == 0
    (out / "my_notes.md").write_text("mine")
    r = _run("inject", "--bias", "math", "--model", tiny_folder, "--quick", "--out", out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert (out / "my_notes.md").read_text() == "mine"
    assert json.loads((out / "study.json").read_text())["identity"]["bias"] == "math"
    assert json.loads((out / "injection" / "injection.json").read_text())["bias"] == "math"


# ------------------------------------------------------------------------------------------------ resume


def _results_without_times(out: Path) -> dict:
    res = json.loads((out / "results.json").read_text())
    res.pop("timings")
    res["provenance"].pop("created")
    return res


@pytest.fixture(scope="module")
def reference_results(finished_study):
    return _results_without_times(finished_study)


def _kill(fn, at: int):
    """``fn`` raising KeyboardInterrupt at its n-th call (a user pressing Ctrl-C there); a plain function, so
    that it also binds as a method."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)

    return wrapper


_KILL_POINTS = [
    ("biasgym_lens.injection.artifact.Injection.save", 2),  # injection written, control not yet: the old "stuck for good" case
    ("biasgym_lens.heads.scope_result.ScopeResult.save", 1),  # during scope, before its result is written
    ("biasgym_lens.study.pipeline.write_csv", 4),  # evaluate, after some of its tables
    ("biasgym_lens.study.pipeline.write_text_atomic", 2),  # evaluate: study.json rewritten, results.json not yet
    ("biasgym_lens.study.report.write_report", 1),  # during the report
]


@pytest.mark.parametrize("target,at", _KILL_POINTS, ids=[f"{t.rsplit('.', 2)[-2]}.{t.rsplit('.', 1)[1]}#{n}" for t, n in _KILL_POINTS])
def test_a_run_interrupted_in_any_stage_resumes_to_the_same_results(
    tiny_folder, tmp_path, monkeypatch, reference_results, target, at
):
    import importlib

    out = tmp_path / "study"
    owner, name = target.rsplit(".", 1)
    try:
        obj = importlib.import_module(owner)
    except ModuleNotFoundError:
        module, cls = owner.rsplit(".", 1)
        obj = getattr(importlib.import_module(module), cls)
    monkeypatch.setattr(obj, name, _kill(getattr(obj, name), at))
    r = _run("run", "--bias", "late", "--model", tiny_folder, "--quick", "--out", out, "--no-png", "--allow-weak-injection")
    assert r.exit_code == 1 and "Aborted" in r.output  # click's answer to Ctrl-C
    monkeypatch.undo()
    assert not [p.name for p in out.rglob(".*") if p.name != ".biasgym.lock"]  # no temporary leftovers
    r = _run("run", "--bias", "late", "--model", tiny_folder, "--quick", "--out", out, "--no-png", "--allow-weak-injection")
    assert r.exit_code == 0, r.output
    assert _results_without_times(out) == reference_results


def test_a_second_process_on_the_same_folder_gets_a_clear_error(tmp_path, tiny_folder):
    out = tmp_path / "s"
    assert _run("inject", "--bias", "late", "--model", tiny_folder, "--quick", "--out", out).exit_code == 0
    fd = os.open(out / ".biasgym.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `biasgym run` holds it
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"4242", 0)
        line = _one_error_line(_run("scope", "--out", out))
        assert "another biasgym process (pid 4242)" in line
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------ one source of truth


def test_an_edited_bias_file_is_refused_on_resume(tmp_path, tiny_folder):
    from biasgym_lens.injection.catalogue import load_bias

    bias_file = tmp_path / "mine.json"
    bias_file.write_text(json.dumps({**load_bias("late").to_dict(), "name": "mine"}))
    out = tmp_path / "s"
    assert _run("inject", "--bias", bias_file, "--model", tiny_folder, "--quick", "--out", out).exit_code == 0
    doc = json.loads(bias_file.read_text())
    doc["description"] = doc["description"] + " Edited."
    bias_file.write_text(json.dumps(doc))
    line = _one_error_line(_run("run", "--bias", bias_file, "--model", tiny_folder, "--quick", "--out", out, "--no-png", "--allow-weak-injection"))
    assert "changed since the study" in line and str(bias_file) in line
    line = _one_error_line(_run("scope", "--out", out))
    assert "changed since the study" in line


# ------------------------------------------------------------------------------------------------ one-line errors


@pytest.fixture(scope="module")
def finished_study(tiny_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "s"
    r = _run("run", "--bias", "late", "--model", tiny_folder, "--quick", "--out", out, "--no-png", "--allow-weak-injection")
    assert r.exit_code == 0, r.output
    return out


def _study(tmp_path: Path, finished: Path) -> Path:
    """A private copy of a finished study, to damage."""
    return Path(shutil.copytree(finished, tmp_path / "s"))


@pytest.mark.parametrize(
    "damage,command,message",
    [
        ("study.json", "report", r"study.json: not valid JSON"),
        ("results.json", "report", r"results.json: not valid JSON"),
        ("scope/scope.json", "report", r"scope.json: checksum mismatch|scope.json: not valid JSON"),
        ("scope/groups.csv", "report", r"groups.csv: checksum mismatch"),
        ("injection/injection.safetensors", "report", r"injection.safetensors: checksum mismatch"),
        ("closest_entities.csv", "report", r"closest_entities.csv: not a readable"),
    ],
)
def test_damaged_study_files_are_named_in_one_line(tmp_path, finished_study, damage, command, message):
    out = _study(tmp_path, finished_study)
    f = out / damage
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 3] + b"\x00garbage{")
    if damage == "closest_entities.csv":
        f.write_bytes(b'"unterminated\n')
    line = _one_error_line(_run(command, "--out", out, "--no-png"))
    assert __import__("re").search(message, line), line


def test_foreign_study_json_is_one_line(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "study.json").write_text(json.dumps({"something": "else"}))
    line = _one_error_line(_run("scope", "--out", out))
    assert "study.json" in line and "identity" in line


def test_a_model_folder_replaced_between_runs_is_one_line(tmp_path):
    model_dir = save_tiny_pretrained("llama", tmp_path / "model")
    out = tmp_path / "s"
    assert _run("inject", "--bias", "late", "--model", model_dir, "--quick", "--out", out).exit_code == 0
    shutil.rmtree(model_dir)
    save_tiny_pretrained("llama", model_dir, seed=1)
    line = _one_error_line(_run("scope", "--out", out))
    assert "fingerprint" in line and "Load the model it was made with" in line


def test_truncated_model_weights_are_one_line(tmp_path):
    model_dir = save_tiny_pretrained("llama", tmp_path / "model")
    weights = next(Path(model_dir).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    line = _one_error_line(_run("demo", "--model", model_dir))
    assert "could not load model" in line and str(model_dir) in line


@pytest.mark.parametrize(
    "args,message",
    [
        (["demo", "--prompt", ""], "--prompt must contain some text"),
        (["demo", "--top", "0"], "'--top': 0 is not in the range"),
        (["demo", "--threads", "1.5"], "'--threads': '1.5' is not a valid integer"),
        (["run", "--seed", "-1"], "'--seed': -1 is not in the range"),
        (["run", "--bias", "../../etc/passwd"], "../../etc/passwd"),
        (["run", "--bias", "nope"], "'nope'"),
        (["inject", "--nonsense"], "No such option '--nonsense'"),
        (["scope"], "Missing option '--out'"),
    ],
)
def test_option_mistakes_are_one_line(tmp_path, tiny_folder, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    extra = ["--model", tiny_folder] if args[0] == "demo" else []
    line = _one_error_line(_run(*args, *extra))
    assert message in line
    assert _snapshot(tmp_path) == before


def test_unwritable_outputs_fail_before_any_work(tmp_path, tiny_folder, monkeypatch):
    import biasgym_lens.evaluation.elicit as elicit

    blocker = tmp_path / "afile"
    blocker.write_text("x")
    line = _one_error_line(_run("inject", "--model", tiny_folder, "--quick", "--out", blocker / "sub"))
    assert "afile" in line
    called = []
    monkeypatch.setattr(elicit, "audit", lambda *a, **k: called.append(1))
    line = _one_error_line(_run("audit", "--bias", "late", "--model", tiny_folder, "--csv", tmp_path / "no" / "t.csv"))
    assert "does not exist" in line and not called
    assert blocker.read_text() == "x"


def test_a_stage_run_alone_keeps_the_earlier_stage_times(tmp_path, finished_study):
    out = _study(tmp_path, finished_study)
    before = json.loads((out / "study.json").read_text())["timings"]
    assert {"inject", "scope", "evaluate"} <= set(before)
    assert _run("report", "--out", out, "--no-png").exit_code == 0
    after = json.loads((out / "study.json").read_text())["timings"]
    assert {k: after[k] for k in ("inject", "scope", "evaluate")} == {k: before[k] for k in ("inject", "scope", "evaluate")}
    assert "report" in after
