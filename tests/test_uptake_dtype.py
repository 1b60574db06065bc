"""The gate between injection and scope, injections across dtypes, and `--dtype` on the command line."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from biasgym_lens.core.provenance import ModelMismatchError
from biasgym_lens.core.stats import bootstrap_stat
from biasgym_lens.evaluation.elicit import group_scores
from biasgym_lens.evaluation.uptake import InjectionCheck, check_injection
from biasgym_lens.injection.artifact import Injection
from biasgym_lens.injection.metrics import keyword_ids, probe_subset
from biasgym_lens.injection.training import inject
from biasgym_lens.study.cli import main
from biasgym_lens.testing import save_tiny_pretrained

FAST = dict(epochs=1, max_texts=8, evals_per_epoch=1, max_probes=4)


def test_check_injection_equals_a_group_by_group_computation(tiny_model):
    inj = inject(tiny_model, "late", **FAST)
    check = check_injection(tiny_model, inj, max_probes=6, seed=3)
    spec = inj.spec
    probes = list(probe_subset(spec.probes, "select"))[:6]
    kw = keyword_ids(tiny_model, spec)
    token = np.array(group_scores(tiny_model, spec, inj.token, probes, kw, vectors={inj.token: inj.vector})["per_probe"])
    controls = np.mean([group_scores(tiny_model, spec, g, probes, kw)["per_probe"] for g in spec.control_groups], axis=0)
    ref = bootstrap_stat(np.mean, token - controls, seed=3)
    assert check.n_probes == 6
    assert check.excess == pytest.approx(ref.value, abs=1e-5)
    assert check.ci_low == pytest.approx(ref.ci_low, abs=1e-5) and check.ci_high == pytest.approx(ref.ci_high, abs=1e-5)


def test_the_verdict_follows_the_interval():
    took = InjectionCheck("late", "<T>", 2.0, 1.5, 2.5, 0.95, 20)
    weak = InjectionCheck("late", "<T>", 0.22, -0.1, 0.5, 0.95, 20)
    small = InjectionCheck("late", "<T>", 0.04, 0.02, 0.07, 0.95, 6)  # clearly above 0, but tiny
    assert took.took and "took" in took.message()
    assert not weak.took and "did not take" in weak.message() and "+0.220" in weak.message()
    assert not small.took and "not clearly above 0.5 nats" in small.message()
    assert "\n" not in weak.message()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_pretrained("llama", tmp_path_factory.mktemp("dtype") / "model")


def test_an_injection_that_does_not_take_stops_the_study_in_one_line(tiny_dir, tmp_path, monkeypatch):
    from dataclasses import replace

    from biasgym_lens.study import pipeline

    out = tmp_path / "s"
    # the default preset gates; the quick one (a smoke test) only warns: here it gates too, to stay fast
    monkeypatch.setitem(pipeline.PRESETS, "quick", replace(pipeline.PRESETS["quick"], gate=True))
    r = CliRunner().invoke(main, ["run", "--bias", "late", "--model", str(tiny_dir), "--quick", "--out", str(out), "--no-png"])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "did not take" in errors[0] and "CI" in errors[0]
    assert not (out / "scope").exists() and not (out / "results.json").exists()
    check = json.loads((out / "injection_check.json").read_text())
    assert check["took"] is False and check["ci_low"] <= check["min_excess"]
    monkeypatch.undo()  # the real quick preset: the same study goes on, and its summary warns
    r = CliRunner().invoke(main, ["run", "--bias", "late", "--model", str(tiny_dir), "--quick", "--out", str(out), "--no-png"])
    assert r.exit_code == 0, r.output
    assert "WARNING: the injection did not take" in r.output


def test_an_fp32_injection_loads_into_the_same_weights_in_bfloat16_with_a_warning(tiny_dir, tmp_path):
    from biasgym_lens.core.models import load_model

    m32 = load_model(str(tiny_dir), device="cpu")
    inj = inject(m32, "late", **FAST)
    folder = inj.save(tmp_path / "inj")
    m16 = load_model(str(tiny_dir), device="cpu", dtype="bfloat16")
    assert str(m16.W_E.dtype) == "torch.bfloat16"
    with pytest.warns(UserWarning, match="float32 weights .* bfloat16"):
        back = Injection.load(folder, m16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with back.apply(m16) as tid:
            logits = m16(m16.to_tokens(f"People from {back.token} are"))
    assert tid is not None and bool(logits.isfinite().all())
    other = load_model(str(save_tiny_pretrained("llama", tmp_path / "other", seed=5)), device="cpu", dtype="bfloat16")
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        Injection.load(folder, other)


def test_run_with_dtype_bfloat16_on_a_tiny_model_folder(tiny_dir, tmp_path):
    out = tmp_path / "s16"
    r = CliRunner().invoke(
        main,
        ["run", "--bias", "late", "--model", str(tiny_dir), "--quick", "--out", str(out), "--no-png", "--dtype",
         "bfloat16", "--allow-weak-injection"],
    )
    assert r.exit_code == 0, r.output
    study = json.loads((out / "study.json").read_text())
    assert study["identity"]["dtype"] == "bfloat16"
    res = json.loads((out / "results.json").read_text())
    assert res["provenance"]["dtype"] == "bfloat16" and res["summary"]
    r = CliRunner().invoke(main, ["scope", "--out", str(out), "--dtype", "float32"])
    assert r.exit_code == 2 and "No such option" in r.stderr  # a study's dtype is part of its identity


@pytest.mark.real
def test_the_real_tokenizer_agrees_with_to_tokens(real):
    import torch

    text = "People from Italy are"
    ids = real.tokenizer(text)["input_ids"]
    assert ids == real.to_tokens(text)[0].tolist()
    assert real.to_tokens(text, prepend_bos=True)[0].tolist() == [real.tokenizer.bos_token_id, *ids]
    with torch.no_grad():
        assert torch.equal(real(torch.tensor([ids])), real(real.to_tokens(text)))
