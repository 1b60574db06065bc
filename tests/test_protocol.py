"""The study's protocol: no choice sees the test split.

Every token sequence that enters the model is recorded (a pre-hook on the embedding) while a bias is injected,
its uptake checked and its heads scoped; the test split's probes and passages must not appear before
``TestSet.prepare`` starts the final measures, and must appear after it (so the detector can see them).
"""

from __future__ import annotations

import pytest

from biasgym_lens.evaluation.capability_data import load_neutral_text
from biasgym_lens.evaluation.uptake import check_injection
from biasgym_lens.heads import steps
from biasgym_lens.heads.biasscope import scope
from biasgym_lens.injection.catalogue import load_bias
from biasgym_lens.injection.metrics import split_probes
from biasgym_lens.injection.training import inject

SCOPE = dict(
    ablation_probes=3, ablation_controls=1, ks=(1, 2), random_draws=1, curve_passages=3, tune_passages=6,
    final_passages=4, mc_items=4, steer_alphas=(0.5,), curve_controls=1,
)
MARK = "<<final measures start>>"


def _fragments(template: str) -> tuple[str, str]:
    before, _, after = template.partition("{group}")
    return before.strip(), after.strip()


def _seen(text: str, fragments: tuple[str, str]) -> bool:
    return all(f in text for f in fragments if f)


@pytest.fixture
def record(_tiny_models, monkeypatch):
    model = _tiny_models["llama"]
    events: list[str] = []

    def pre_hook(module, args, kwargs):
        ids = args[0] if args else kwargs.get("input")
        events.extend(model.tokenizer.batch_decode(ids, skip_special_tokens=True))

    handle = model.embed.register_forward_pre_hook(pre_hook, with_kwargs=True)
    prepare = steps.TestSet.prepare.__func__

    def marked(cls, *a, **k):
        events.append(MARK)
        return prepare(cls, *a, **k)

    monkeypatch.setattr(steps.TestSet, "prepare", classmethod(marked))
    yield model, events
    handle.remove()


def test_no_test_probe_or_passage_is_read_before_the_final_measures(record):
    model, events = record
    spec = load_bias("late")
    inj = inject(model, "late", epochs=1, batch_size=4, max_texts=4, max_probes=4, progress=False)
    check_injection(model, inj, seed=0)
    res = scope(model, inj, progress=False, **SCOPE)
    assert events.count(MARK) == 1
    before, after = events[: events.index(MARK)], events[events.index(MARK) + 1 :]
    splits = split_probes(spec.probes)
    test_probes = [_fragments(p) for p in splits.test]
    passages = load_neutral_text()
    # tune: passages 0, 11, 23, 35, 46, 58 of 70 (spread, i * 70 // 6); test: the first 4 of the others
    test_passages = [passages[i][:40] for i in (1, 2, 3, 4)]
    # the detector tells the splits apart: no select or tune probe looks like a test probe
    for template in (*splits.select, *splits.tune):
        assert not any(_seen(spec.fill(template, "Italy"), f) for f in test_probes), template
    assert not any(_seen(t, f) for t in before for f in test_probes), "a test probe was read before the final measures"
    assert not any(p in t for t in before for p in test_passages), "a test passage was read before the final measures"
    # ... while the choices did read the select and tune splits, and the final measures read the test split
    assert any(_seen(t, _fragments(p)) for t in before for p in splits.tune)
    assert any(_seen(t, f) for t in after for f in test_probes)
    assert any(p in t for t in after for p in test_passages)
    assert res.probe_values["probe"].max() + 1 == len(splits.test)
