"""``biasgym run --seeds N`` on a tiny model: every file, numbers checked against the seeds' own results and an
independent measure, resume, and refusals that leave every file as it was."""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from biasgym_lens.study.cli import main
from biasgym_lens.testing import save_tiny_pretrained

SEEDS = (3, 4)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return str(save_tiny_pretrained("llama", tmp_path_factory.mktemp("tinyseeds") / "model"))


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _multi(out, tiny_folder, *extra):
    return _run("run", "--bias", "late", "--model", tiny_folder, "--quick", "--out", out, "--no-png",
                "--allow-weak-injection", *extra)


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def _one_error_line(r) -> str:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


@pytest.fixture(scope="module")
def finished(tiny_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seeds") / "D"
    r = _multi(out, tiny_folder, "--seeds", len(SEEDS), "--seed", SEEDS[0])
    assert r.exit_code == 0, r.output
    assert "heads in the top" in r.output and "seeds.html" in r.output
    return out


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    """A private copy of the finished multi-seed folder, to resume, damage or refuse."""
    return Path(shutil.copytree(finished, tmp_path / "D"))


def _heads(text: str) -> list[tuple[int, int]]:
    return [(int(h[1:].split("H")[0]), int(h.split("H")[1])) for h in text.split()]


# ------------------------------------------------------------------------------------------------ the files


def test_every_file_is_written(finished):
    top = ("seeds.json", "per_seed.csv", "overlap.csv", "membership.csv", "stable_heads.csv", "stable_measures.csv",
           "seeds.html", "figures/seed_stability.html")
    for name in top:
        assert (finished / name).is_file(), name
    for s in SEEDS:
        for name in ("study.json", "results.json", "report.html", "summary.csv", "scope/scope.json", "injection/injection.json"):
            assert (finished / f"seed_{s}" / name).is_file(), (s, name)
        assert json.loads((finished / f"seed_{s}" / "study.json").read_text())["identity"]["seed"] == s
    manifest = json.loads((finished / "seeds.json").read_text())
    assert manifest["identity"] == {"bias": "late", "model": manifest["identity"]["model"], "seeds": list(SEEDS),
                                    "preset": "quick", "dtype": "float32"}
    assert manifest["version"] and {"stability", "page"} <= set(manifest["timings"])
    page = (finished / "seeds.html").read_text()
    for s in SEEDS:
        assert f"href='seed_{s}/report.html'" in page
    assert 'id="fig-seed_stability"' in page and "Plotly.newPlot" in page
    assert '<script src="http' not in page and "<script charset=\"utf-8\" src=" not in page  # offline: plotly.js embedded
    assert "The stable heads on each seed" in page and "Top-" in page and "[95% CI]" in page
    assert sorted(p.name for p in finished.iterdir()) == sorted(
        [".biasgym.lock", *(f"seed_{s}" for s in SEEDS), "figures", *(n for n in top if "/" not in n)]
    )


def test_per_seed_numbers_are_each_seeds_own_scope_summary(finished):
    per_seed = pd.read_csv(finished / "per_seed.csv").set_index("seed")
    for s in SEEDS:
        heads = pd.read_csv(finished / f"seed_{s}" / "summary.csv").set_index("intervention").loc["heads"]
        chosen = json.loads((finished / f"seed_{s}" / "results.json").read_text())["chosen_heads"]
        row = per_seed.loc[s]
        assert _heads(row["chosen"]) == [tuple(h) for h in chosen] and row["n_chosen"] == len(chosen)
        for m in ("excess_cut", "real_gap_cut", "perplexity_increase"):
            for end in ("", "_ci_low", "_ci_high"):
                assert row[m + end] == pytest.approx(heads[m + end], rel=1e-12, nan_ok=True), m + end
        assert row["excess_cut_ci_low"] <= row["excess_cut"] <= row["excess_cut_ci_high"]


def test_overlap_and_stable_heads_follow_from_the_saved_rankings_by_hand(finished):
    rankings, chosen = {}, {}
    for s in SEEDS:
        meta = json.loads((finished / f"seed_{s}" / "scope" / "scope.json").read_text())
        rankings[s] = [tuple(h) for h in meta["curve"]["heads"]]
        chosen[s] = meta["chosen"]
    k = max(1, *(len(c) for c in chosen.values()))
    top = {s: rankings[s][:k] for s in SEEDS}
    overlap = pd.read_csv(finished / "overlap.csv")
    shared = len(set(top[SEEDS[0]]) & set(top[SEEDS[1]]))
    assert overlap.to_dict("records") == [
        {"seed_a": SEEDS[0], "seed_b": SEEDS[1], "k": k, "shared": shared, "overlap": shared / k}
    ]
    count = {h: sum(h in t for t in top.values()) for h in {h for t in top.values() for h in t}}
    mean_rank = {h: sum(t.index(h) + 1 for t in top.values() if h in t) / count[h] for h in count}
    majority = sorted((h for h in count if count[h] > len(SEEDS) / 2), key=lambda h: (-count[h], mean_rank[h], h))[:k]
    stable = pd.read_csv(finished / "stable_heads.csv")
    assert list(zip(stable["layer"], stable["head"])) == majority
    assert list(stable["n_seeds"]) == [count[h] for h in majority]
    assert list(stable["mean_rank"]) == pytest.approx([mean_rank[h] for h in majority])
    members = pd.read_csv(finished / "membership.csv")
    assert len(members) == len(SEEDS) * len(count) and members["in_top_k"].sum() == sum(len(t) for t in top.values())


def _perplexity(model, passages, intervention=None) -> float:
    """Next-token perplexity over the passages, one full pass per passage (no batching, no resumed layers)."""
    import contextlib

    from biasgym_lens.core.tokens import tokenize

    nll, n = 0.0, 0
    with torch.no_grad(), intervention() if intervention else contextlib.nullcontext():
        for text in passages:
            batch = tokenize(model, [text])
            logits = model(batch.input_ids, attention_mask=batch.attention_mask).float()
            logp = logits[0, :-1].log_softmax(-1).gather(-1, batch.input_ids[0, 1:, None])[:, 0]
            keep = batch.attention_mask[0, 1:].bool()
            nll, n = nll - float(logp[keep].sum()), n + int(keep.sum())
    return math.exp(nll / n)


def test_the_stable_heads_measure_equals_an_independent_ablation_on_each_test_split(finished, tiny_folder):
    from biasgym_lens.core.hooks import active_hooks
    from biasgym_lens.core.models import load_model
    from biasgym_lens.evaluation.capability_data import load_neutral_text, passage_splits
    from biasgym_lens.heads.interventions import ablate_heads
    from biasgym_lens.heads.transfer import measure_groups
    from biasgym_lens.injection.artifact import Injection

    model = load_model(tiny_folder, device="cpu")
    stable = list(zip(*(pd.read_csv(finished / "stable_heads.csv")[c] for c in ("layer", "head"))))
    assert stable, "the tiny model's seeds share no top-k head; this test needs one"
    measures = pd.read_csv(finished / "stable_measures.csv").set_index("seed")
    assert list(measures.index) == list(SEEDS)
    for s in SEEDS:
        cfg = json.loads((finished / f"seed_{s}" / "scope" / "scope.json").read_text())["config"]
        inj = Injection.load(finished / f"seed_{s}" / "injection", model)

        def ablate():
            return ablate_heads(model, stable, kind="zero")

        excess = []
        for intervention in (None, ablate):
            df = measure_groups(model, inj.spec, inj, intervention, probes="test", max_probes=cfg["final_probes"])
            excess.append(float(df[df.kind == "token"]["excess"].item()))
        cut = 1 - excess[1] / excess[0]
        text = load_neutral_text()
        split = passage_splits(len(text), curve=cfg["curve_passages"], tune=cfg["tune_passages"], test=cfg["final_passages"])
        test_passages = [text[i] for i in split.test]
        increase = _perplexity(model, test_passages, ablate) / _perplexity(model, test_passages) - 1
        row = measures.loc[s]
        assert _heads(row["heads"]) == stable
        assert row["excess_cut"] == pytest.approx(cut, rel=1e-4, abs=1e-6)
        assert row["perplexity_increase"] == pytest.approx(increase, rel=1e-3, abs=1e-6)
        for m in ("excess_cut", "perplexity_increase", "real_gap_cut"):
            assert row[f"{m}_ci_low"] <= row[m] <= row[f"{m}_ci_high"], m
        assert active_hooks(model) == []


# ------------------------------------------------------------------------------------------------ resume


def test_a_deleted_seed_report_is_the_only_thing_redone(copy, tiny_folder):
    (copy / "seed_4" / "report.html").unlink()
    before = _snapshot(copy)
    r = _multi(copy, tiny_folder, "--seeds", 2, "--seed", 3)
    assert r.exit_code == 0, r.output
    assert r.output.count("[inject] already done") == 2 and r.output.count("[evaluate] already done") == 2
    assert "[stability] already done" in r.output and "[page] already done" in r.output
    after = _snapshot(copy)
    changed = {n for n in set(before) | set(after) if before.get(n) != after.get(n)}
    assert "seed_4/report.html" in changed
    unexpected = [n for n in changed if not n.startswith(("seed_4/report.html", "seed_4/figures/", "seed_4/study.json"))]
    assert unexpected == []
    assert json.loads((copy / "seed_4" / "study.json").read_text())["timings"].keys() >= {"inject", "scope", "evaluate"}


def test_a_run_interrupted_in_the_second_seed_resumes_to_the_same_tables(finished, tiny_folder, tmp_path, monkeypatch):
    import biasgym_lens.heads.scope_result as scope_result

    out = tmp_path / "D"
    save = scope_result.ScopeResult.save
    calls = []

    def interrupted(self, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return save(self, path)

    monkeypatch.setattr(scope_result.ScopeResult, "save", interrupted)
    r = _multi(out, tiny_folder, "--seeds", 2, "--seed", 3)
    assert r.exit_code == 1 and "Aborted" in r.output
    monkeypatch.undo()
    assert (out / "seed_3" / "report.html").is_file() and not (out / "seed_4" / "scope").exists()
    assert not (out / "per_seed.csv").exists()
    r = _multi(out, tiny_folder, "--seeds", 2, "--seed", 3)
    assert r.exit_code == 0, r.output
    assert "[inject] already done in " + str(out / "seed_3") in r.output and "[scope] ..." in r.output
    for name in ("per_seed.csv", "overlap.csv", "membership.csv", "stable_heads.csv", "stable_measures.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out / name), pd.read_csv(finished / name), check_exact=False, rtol=1e-6)


def test_a_redone_scope_makes_the_stability_stage_run_again(copy, tiny_folder):
    shutil.rmtree(copy / "seed_3" / "scope")
    r = _multi(copy, tiny_folder, "--seeds", 2, "--seed", 3)
    assert r.exit_code == 0, r.output
    assert "[stability] ..." in r.output and "[page] ..." in r.output


# ------------------------------------------------------------------------------------------------ refusals


def _refused(folder: Path, *args, cwd: Path | None = None) -> str:
    before = _snapshot(folder)
    line = _one_error_line(_run(*args))
    assert _snapshot(folder) == before, "a refused command changed a file"
    return line


@pytest.mark.parametrize("where", ["notes.txt", "seed_3/notes.txt", "seed_9"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_foreign_file_in_the_folder_or_a_seed_folder_is_refused(copy, tiny_folder, where, overwrite):
    target = copy / where
    if where == "seed_9":
        target.mkdir()
        (target / "data.csv").write_text("mine")
    else:
        target.write_text("mine")
    line = _refused(copy, "run", "--bias", "late", "--model", tiny_folder, "--quick", "--out", copy, "--no-png",
                    "--seeds", 2, "--seed", 3, *(["--overwrite"] if overwrite else []))
    assert "biasgym did not write" in line and where.split("/")[0] in line


@pytest.mark.parametrize(
    "args,message",
    [
        (["--seeds", 3, "--seed", 3], "holds another multi-seed study"),
        (["--seeds", 2, "--seed", 0], "holds another multi-seed study"),
        (["--seeds", 2, "--seed", 3, "--bias", "math"], "holds another multi-seed study"),
        (["--seeds", 1], "holds a multi-seed study"),
        ([], "holds a multi-seed study"),
        (["--seeds", 0], "--seeds must be a number of injection seeds, at least 2"),
        (["--seeds", -2], "got -2"),
        (["--seeds", 2, "--bias", "nope"], "'nope'"),
    ],
)
def test_mistakes_and_other_studies_are_refused_before_any_change(copy, tmp_path, args, message):
    line = _refused(copy, "run", "--bias", "late", "--model", tmp_path / "typo", "--quick", "--out", copy, "--no-png", *args)
    assert message in line


def test_a_single_study_is_another_study_for_seeds_and_overwrite_on_cwd_is_refused(tmp_path, tiny_folder, monkeypatch):
    single = tmp_path / "single"
    assert _run("inject", "--bias", "late", "--model", tiny_folder, "--quick", "--out", single).exit_code == 0
    line = _refused(single, "run", "--bias", "late", "--model", tiny_folder, "--quick", "--out", single, "--seeds", 2)
    assert "holds a single-seed study" in line and "--overwrite" in line
    (single / "notes.txt").write_text("mine")
    line = _refused(single, "run", "--bias", "late", "--model", tiny_folder, "--quick", "--out", single, "--seeds", 2,
                    "--overwrite")
    assert "notes.txt" in line
    monkeypatch.chdir(single)
    line = _refused(single, "run", "--bias", "late", "--model", tiny_folder, "--quick", "--out", ".", "--seeds", 2,
                    "--overwrite")
    assert "refusing --overwrite" in line


def test_a_second_process_on_the_folder_gets_a_clear_error(copy, tiny_folder):
    fd = os.open(copy / ".biasgym.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"4242", 0)
        line = _one_error_line(_multi(copy, tiny_folder, "--seeds", 2, "--seed", 3))
        assert "another biasgym process (pid 4242)" in line
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------ overwrite


def test_overwrite_turns_one_kind_of_study_into_the_other_removing_only_its_outputs(copy, tmp_path, tiny_folder):
    from biasgym_lens.study.seed_study import SeedStudy

    r = _run("inject", "--bias", "late", "--model", tiny_folder, "--quick", "--out", copy, "--overwrite")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in copy.iterdir()) == [".biasgym.lock", "control_injection", "injection", "study.json"]
    with SeedStudy(copy, "late", (0, 1), tiny_folder, "quick").session(overwrite=True):
        pass
    assert sorted(p.name for p in copy.iterdir()) == [".biasgym.lock", "seeds.json"]
    assert json.loads((copy / "seeds.json").read_text())["identity"]["seeds"] == [0, 1]


def test_replacing_a_multi_seed_study_removes_its_seed_folders(copy, tiny_folder):
    from biasgym_lens.study.seed_study import SeedStudy

    with SeedStudy(copy, "late", (0, 1, 2), tiny_folder, "quick").session(overwrite=True) as multi:
        assert multi.check() == "resume"
    assert sorted(p.name for p in copy.iterdir()) == [".biasgym.lock", "seeds.json"]


def test_seed_settings_are_checked_in_python_too(tmp_path):
    from biasgym_lens.study.folders import StudyError
    from biasgym_lens.study.seed_study import SeedStudy

    assert SeedStudy.consecutive(tmp_path / "x", "late", 3, first=5).seeds == (5, 6, 7)
    for seeds, message in (((1,), "at least 2 seeds"), ((1, 1), "distinct"), ((0, -1), "non-negative")):
        with pytest.raises(StudyError, match=message):
            SeedStudy(tmp_path / "x", "late", seeds).check()
    with pytest.raises(StudyError, match="--seeds must be an integer >= 2, got 1"):
        SeedStudy.consecutive(tmp_path / "x", "late", 1)
    with pytest.raises(StudyError, match="unknown preset"):
        SeedStudy(tmp_path / "x", "late", (0, 1), preset="slow").check()
    assert not (tmp_path / "x").exists()


@pytest.mark.wrong_types
def test_a_seed_that_is_not_an_integer_is_refused(tmp_path):
    from biasgym_lens.study.folders import StudyError
    from biasgym_lens.study.seed_study import SeedStudy

    with pytest.raises(StudyError, match=r"non-negative integers, got \(0, 1.0\)"):
        SeedStudy(tmp_path / "x", "late", (0, 1.0)).check()
    with pytest.raises(StudyError, match="--seeds must be an integer >= 2, got 2.0"):
        SeedStudy.consecutive(tmp_path / "x", "late", 2.0)
