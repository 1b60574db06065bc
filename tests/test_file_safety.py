"""Nothing the user has is lost: saving refuses strangers, is atomic under interrupts, and reading checks all."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from biasgym_lens.core import artifacts, files
from biasgym_lens.core.files import ArtifactError, MissingArtifactError
from biasgym_lens.heads.head_scores import HeadScores
from biasgym_lens.injection.artifact import Injection
from biasgym_lens.injection.training import inject

FAST = dict(epochs=1, max_texts=8, evals_per_epoch=1, max_probes=4)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every path below ``folder`` with the SHA-256 of its bytes ("dir" for folders)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = p.relative_to(folder).as_posix()
        out[key] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _litter(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture(scope="module")
def model(_tiny_models):
    """File handling does not depend on the architecture: one tiny family is enough here."""
    return _tiny_models["llama"]


@pytest.fixture(scope="module")
def injections(model):
    """Two injections of one tiny model that differ in their vectors."""
    from dataclasses import replace

    a = inject(model, "late", **FAST)
    return a, replace(a, vector=a.vector + 1.0)


@pytest.fixture(scope="module")
def head_scores(injections, model):
    from biasgym_lens.heads.head_scores import score_heads

    return score_heads(model, injections[0], "dla", max_probes=4)


# ------------------------------------------------------------------------------------------------ refusal


def _strangers(tmp_path: Path) -> dict[str, Path]:
    """Paths holding user things that no save() may replace."""
    user_dir = tmp_path / "mydir"
    user_dir.mkdir()
    (user_dir / "thesis.tex").write_text("three years of work")
    note = tmp_path / "notes.txt"
    note.write_text("do not lose me")
    link = tmp_path / "link"
    link.symlink_to(user_dir)
    nested = tmp_path / "emptysub"
    (nested / "inner").mkdir(parents=True)
    return {"user_dir": user_dir, "file": note, "symlink": link, "folder_with_subfolder": nested}


@pytest.mark.parametrize("which", ["user_dir", "file", "symlink", "folder_with_subfolder"])
@pytest.mark.parametrize("artifact", ["injection", "head_scores"])
def test_save_refuses_to_replace_what_it_did_not_write(injections, head_scores, tmp_path, which, artifact):
    target = _strangers(tmp_path)[which]
    before = _snapshot(tmp_path)
    obj = injections[0] if artifact == "injection" else head_scores
    with pytest.raises(ArtifactError, match="refusing to replace") as e:
        obj.save(target)
    assert str(target) in str(e.value)
    assert _snapshot(tmp_path) == before


def test_save_refuses_an_artifact_of_another_kind_and_one_with_user_files(injections, head_scores, tmp_path):
    inj = injections[0]
    scores_dir = head_scores.save(tmp_path / "scores")
    with pytest.raises(ArtifactError, match="is not an injection folder written by this package"):
        inj.save(scores_dir)
    with pytest.raises(ArtifactError, match="holds a head-scores, not an injection"):
        artifacts.save_artifact(scores_dir, "injection", "scores.json", lambda folder: {"format": 1})
    folder = inj.save(tmp_path / "inj")
    (folder / "my_notes.md").write_text("mine")
    before = _snapshot(tmp_path)
    with pytest.raises(ArtifactError, match="did not write .*my_notes.md"):
        injections[1].save(folder)
    assert _snapshot(tmp_path) == before


def test_save_replaces_an_empty_folder_and_its_own_kind(injections, tmp_path, model):
    empty = tmp_path / "empty"
    empty.mkdir()
    injections[0].save(empty)
    assert torch.equal(Injection.load(empty, model).vector, injections[0].vector)
    injections[1].save(empty)
    assert torch.equal(Injection.load(empty, model).vector, injections[1].vector)
    assert _litter(tmp_path, "empty") == []


# ------------------------------------------------------------------------------------------------ interrupts


class _Interrupt:
    """Raise KeyboardInterrupt at the n-th call of a wrapped function."""

    def __init__(self, fn, at: int = 1):
        self.fn, self.at, self.calls = fn, at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.fn(*args, **kwargs)


_STEPS = [
    ("biasgym_lens.injection.artifact.save_file", 1),  # while writing the tensors
    ("biasgym_lens.core.artifacts.sha256_file", 1),  # while checksumming (the name a save looks up)
    ("biasgym_lens.core.artifacts.fsync_dir", 1),  # after the metadata, before the swap
    ("biasgym_lens.core.artifacts._exchange", 1),  # at the swap
    ("biasgym_lens.core.artifacts.fsync_dir", 2),  # right after the swap
    ("biasgym_lens.core.artifacts.remove_path", 1),  # while removing the old folder
]


@pytest.mark.parametrize("target,at", _STEPS, ids=[f"{t.rsplit('.', 1)[1]}#{n}" for t, n in _STEPS])
def test_a_save_interrupted_at_any_step_leaves_old_or_new_complete_and_no_litter(
    injections, tmp_path, model, monkeypatch, target, at
):
    old, new = injections
    path = old.save(tmp_path / "inj")
    module, name = target.rsplit(".", 1)
    import importlib

    mod = importlib.import_module(module)
    monkeypatch.setattr(mod, name, _Interrupt(getattr(mod, name), at))
    with pytest.raises(KeyboardInterrupt):
        new.save(path)
    monkeypatch.undo()
    loaded = Injection.load(path, model)
    assert torch.equal(loaded.vector, old.vector) or torch.equal(loaded.vector, new.vector)
    assert _litter(tmp_path, "inj") == []


def test_two_rename_fallback_interrupted_between_renames_recovers_the_old(injections, tmp_path, model, monkeypatch):
    """Where the atomic exchange is unavailable, an interrupt between the two renames loses nothing."""
    old, new = injections
    path = old.save(tmp_path / "inj")
    monkeypatch.setattr(artifacts, "_exchange", lambda a, b: False)
    monkeypatch.setattr(artifacts.os, "replace", _Interrupt(os.replace, at=2))
    with pytest.raises(KeyboardInterrupt):
        new.save(path)
    monkeypatch.undo()
    assert not path.exists()  # the moment of danger: the old one is aside, the new one not in place
    assert torch.equal(Injection.load(path, model).vector, old.vector)  # open restores it
    assert _litter(tmp_path, "inj") == []
    new.save(path)
    assert torch.equal(Injection.load(path, model).vector, new.vector)


def test_leftovers_of_a_killed_process_are_removed_by_the_next_save(injections, tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f".inj.tmp-{dead}-0a0b0c0d"
    stale.mkdir()
    (stale / "injection.safetensors").write_bytes(b"half")
    alive = tmp_path / ".inj.tmp-1-0a0b0c0d"  # pid 1 is alive: a save in progress elsewhere, left alone
    alive.mkdir()
    injections[0].save(tmp_path / "inj")
    assert not stale.exists() and alive.exists()


def test_write_text_atomic_uses_unique_temporary_names_and_never_replaces_a_folder(tmp_path, monkeypatch):
    seen = []
    real_open = open

    def spy(file, *a, **k):
        seen.append(Path(file).name)
        return real_open(file, *a, **k)

    monkeypatch.setattr("builtins.open", spy)
    files.write_text_atomic(tmp_path / "a.json", "1")
    files.write_text_atomic(tmp_path / "a.json", "2")
    monkeypatch.undo()
    assert len(set(seen)) == 2 and all(n.startswith(".a.json.tmp-") for n in seen)
    assert (tmp_path / "a.json").read_text() == "2" and _litter(tmp_path, "a.json") == []
    (tmp_path / "d").mkdir()
    with pytest.raises(ArtifactError, match="is a folder"):
        files.write_text_atomic(tmp_path / "d", "x")


# ------------------------------------------------------------------------------------------------ reading


def _rewrite_json(path: Path, **changes) -> None:
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def test_a_flipped_byte_is_caught_by_the_checksum(injections, tmp_path):
    folder = injections[0].save(tmp_path / "inj")
    f = folder / "injection.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="injection.safetensors: checksum mismatch"):
        Injection.load(folder)


@pytest.mark.parametrize(
    "damage,message",
    [
        ("truncate_tensors", "not a readable tensor file"),
        ("invalid_json", r"injection.json: not valid JSON \(.* at line"),
        ("missing_key", "missing key.*'token'"),
        ("wrong_shape", r"tensor 'vector' has shape \(3,\), expected"),
        ("nan_vector", "tensor 'vector' has non-finite values"),
        ("no_tensor_file", "injection.safetensors: missing"),
        ("bad_config", "malformed injection metadata"),
        ("not_a_dict", "expected a JSON object"),
    ],
)
def test_damaged_injections_name_the_file_and_the_problem(injections, tmp_path, damage, message):
    folder = injections[0].save(tmp_path / "inj")
    meta_path, tensors = folder / "injection.json", folder / "injection.safetensors"
    meta = json.loads(meta_path.read_text())
    if damage == "truncate_tensors":
        tensors.write_bytes(tensors.read_bytes()[:40])
    elif damage == "invalid_json":
        meta_path.write_text(meta_path.read_text()[:-20])
    elif damage == "missing_key":
        del meta["token"]
    elif damage in ("wrong_shape", "nan_vector"):
        v = torch.full((3,), 1.0) if damage == "wrong_shape" else injections[0].vector.clone().fill_(float("nan"))
        save_file({"vector": v, "init_vector": injections[0].init_vector}, str(tensors))
    elif damage == "no_tensor_file":
        tensors.unlink()
    elif damage == "bad_config":
        meta["config"]["not_a_setting"] = 1
    elif damage == "not_a_dict":
        meta_path.write_text("[1, 2]")
    if damage in ("missing_key", "bad_config", "wrong_shape", "nan_vector", "truncate_tensors"):
        meta["files"] = {k: files.sha256_file(folder / k) for k in meta["files"]}  # a consistent but bad artifact
        meta_path.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=message) as e:
        Injection.load(folder)
    assert str(folder) in str(e.value)


def test_missing_artifacts_are_both_artifact_and_file_not_found_errors(tmp_path):
    with pytest.raises(MissingArtifactError) as e:
        Injection.load(tmp_path / "nowhere")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)
    with pytest.raises(MissingArtifactError, match="head-scores metadata not found"):
        (tmp_path / "x").mkdir()
        HeadScores.load(tmp_path / "x")


def test_non_finite_numbers_are_written_as_null_and_read_back_as_nan(injections, tmp_path, model):
    from dataclasses import replace

    inj = replace(injections[0], control_logit_diff=float("nan"), step_losses=(1.0, float("inf")))
    folder = inj.save(tmp_path / "inj")

    def refuse(token):
        raise AssertionError(f"non-JSON constant {token} in injection.json")

    meta = json.loads((folder / "injection.json").read_text(), parse_constant=refuse)
    assert meta["control_logit_diff"] is None and meta["step_losses"] == [1.0, None]
    back = Injection.load(folder, model)
    assert math.isnan(back.control_logit_diff) and math.isnan(back.step_losses[1])


def test_head_scores_round_trip_and_check_their_shape(head_scores, tmp_path):
    folder = head_scores.save(tmp_path / "s")
    back = HeadScores.load(folder)
    assert torch.equal(back.per_prompt, head_scores.per_prompt) and back.method == head_scores.method
    save_file({"per_prompt": torch.zeros(2, 1, 1)}, str(folder / "scores.safetensors"))
    meta = json.loads((folder / "scores.json").read_text())
    meta["files"]["scores.safetensors"] = files.sha256_file(folder / "scores.safetensors")
    (folder / "scores.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"per_prompt has shape \(2, 1, 1\)"):
        HeadScores.load(folder)


def test_csv_cells_are_safe_for_spreadsheets(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"group": ["=HYPERLINK(\"http://x\")", "a\nb", "-1.5", "+cmd", "Italy"], "v": [1, 2, 3, 4, 5]})
    files.write_csv(df, tmp_path / "t.csv")
    back = pd.read_csv(tmp_path / "t.csv")
    assert back["group"].tolist() == ["'=HYPERLINK(\"http://x\")", "a b", "-1.5", "'+cmd", "Italy"]
    assert len((tmp_path / "t.csv").read_text().splitlines()) == 6
