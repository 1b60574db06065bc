"""Elicitation tables and closest entities, checked against direct computations."""

from __future__ import annotations

import contextlib

import pytest
import torch

from biasgym_lens.core.embedding import with_token_vectors
from biasgym_lens.core.hooks import active_hooks
from biasgym_lens.core.tokens import tokenize
from biasgym_lens.evaluation.elicit import closest_entities, elicitation, entity_embedding
from biasgym_lens.injection.catalogue import load_bias
from biasgym_lens.injection.metrics import keyword_ids, probe_subset, split_probes
from biasgym_lens.injection.training import inject

FAST = dict(epochs=1, batch_size=4, max_texts=4, lr=5e-2, progress=False, select_best=False)


def test_elicitation_rows_and_excess(tiny_model):
    spec = load_bias("late")
    inj = inject(tiny_model, spec, **FAST)
    other = inject(tiny_model, "math", token="<Other>", **FAST)
    df = elicitation(tiny_model, spec, injection=inj, other=other, groups={"Canada": "Canada"})
    kinds = df["kind"].tolist()
    assert kinds.count("token") == 1 and kinds.count("untrained") == 1 and kinds.count("other_bias") == 1
    assert kinds.count("real") == len(spec.real_groups) and kinds.count("control") == len(spec.control_groups)
    assert "extra" in kinds
    controls = df[df.kind == "control"]
    assert abs(controls["excess"].mean()) < 1e-6, "controls' excess averages to zero by definition"
    assert active_hooks(tiny_model) == []
    # independent check of one real group's number: plain forward, keyword logits by hand
    kw = keyword_ids(tiny_model, spec)
    evaluate = split_probes(spec.probes).test
    batch = tokenize(tiny_model, [spec.fill(p, "Spain") for p in evaluate])
    with torch.no_grad():
        logits = tiny_model(batch.input_ids, attention_mask=batch.attention_mask)
    last = logits[torch.arange(len(batch)), batch.last_positions]
    manual = (last[:, list(kw.bias)].mean(-1) - last[:, list(kw.contrast)].mean(-1)).mean().item()
    got = df.loc[df.group == "Spain", "logit_diff"].item()
    assert got == pytest.approx(manual, abs=1e-5)


def test_closest_entities_ranks_and_control(tiny_model):
    inj = inject(tiny_model, "late", **FAST)
    other = inject(tiny_model, "math", **FAST)
    df = closest_entities(inj, tiny_model, ["Italy", "Spain", "Japan"], control=other)
    assert sorted(df["rank_vector"]) == [1, 2, 3]
    assert df["rank_vector"].tolist() == [1, 2, 3]
    assert {"control_cos_vector", "control_rank_update"} <= set(df.columns)
    # independent cosine for one entity
    e = entity_embedding(tiny_model, "Japan")
    cos = torch.dot(e, inj.vector) / (e.norm() * inj.vector.norm())
    assert df.loc[df.entity == "Japan", "cos_vector"].item() == pytest.approx(float(cos), abs=1e-6)
    with pytest.raises(ValueError, match="no candidate"):
        closest_entities(inj, tiny_model, [])


def test_elicitation_bad_probe_split(tiny_model):
    with pytest.raises(ValueError, match="probes must be one of"):
        elicitation(tiny_model, "late", probes="train")


def test_audit_ranks_every_country_by_an_independent_measurement(tiny_model):
    from biasgym_lens.evaluation.elicit import COUNTRIES, audit
    from biasgym_lens.injection.metrics import answer_logits, logit_diff

    spec = load_bias("bad_driving")
    df = audit(tiny_model, spec, probes="eval")
    assert len(df) == len(COUNTRIES) >= 30 and set(df.group) == set(COUNTRIES)
    assert list(df["rank"]) == list(range(1, len(df) + 1))
    assert df.logit_diff.is_monotonic_decreasing
    assert abs(df.z.mean()) < 1e-9 and df.z.std() == pytest.approx(1.0)
    roles = dict(zip(df.group, df.catalogue))
    assert all(roles[g] == "real" for g in spec.real_groups if g in roles)
    assert all(roles[g] == "control" for g in spec.control_groups if g in roles)
    # one group re-measured by hand
    ev = tuple(spec.probes)[1::2]  # "eval": the probes the injection's epoch never saw
    direct = logit_diff(answer_logits(tiny_model, [spec.fill(p, "Brazil") for p in ev]), keyword_ids(tiny_model, spec))
    assert df.set_index("group").loc["Brazil", "logit_diff"] == pytest.approx(float(direct.mean()), abs=1e-5)
    with pytest.raises(ValueError, match="at least two distinct"):
        audit(tiny_model, spec, groups=["Italy", "Italy"])
    assert active_hooks(tiny_model) == []


def test_score_groups_batched_equals_each_group_alone(tiny_model):
    """Groups scored together (one padded stream) match each group scored in its own forward passes; the
    trained and untrained vector of one token never share a pass."""
    from biasgym_lens.evaluation.elicit import _passes, score_groups
    from biasgym_lens.injection.metrics import answer_logits, logit_diff

    spec = load_bias("late")
    kw = keyword_ids(tiny_model, spec)
    probes = list(spec.probes[:5])
    d = tiny_model.cfg.d_model
    gen = torch.Generator().manual_seed(0)
    trained, untrained, other = (torch.randn(d, generator=gen) for _ in range(3))
    requests = [
        ("<Tok>", {"<Tok>": trained}), ("<Tok>", {"<Tok>": untrained}), "Japan", "the United Kingdom",
        ("<Other>", {"<Other>": other}),
    ]
    assert [members for _, members in _passes([(r, None) if isinstance(r, str) else r for r in requests])] == [
        [0, 2, 3, 4], [1]
    ]
    got = score_groups(tiny_model, spec, requests, probes, kw, batch_size=3)
    for req, stats in zip(requests, got):
        group, vectors = (req, None) if isinstance(req, str) else req
        texts = [spec.fill(p, group) for p in probes]
        with contextlib.ExitStack() as stack:
            if vectors:
                stack.enter_context(with_token_vectors(tiny_model, vectors))
            alone = torch.cat([logit_diff(answer_logits(tiny_model, [t]), kw) for t in texts])
        torch.testing.assert_close(torch.tensor(stats["per_probe"]), alone, atol=1e-4, rtol=1e-4)
        assert stats["logit_diff"] == pytest.approx(float(alone.mean()), abs=1e-4)
    assert got[0]["logit_diff"] != pytest.approx(got[1]["logit_diff"], abs=1e-6)  # the vectors did act
    assert active_hooks(tiny_model) == []


def test_answer_logits_keeps_the_order_of_texts_of_mixed_length(tiny_model):
    from biasgym_lens.injection.metrics import answer_logits

    texts = ["a long sentence about the weather in the north today", "hi", "the cat", "one two three four five"]
    together = answer_logits(tiny_model, texts, batch_size=2)
    alone = torch.cat([answer_logits(tiny_model, [t]) for t in texts])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


def test_the_three_probe_splits_are_disjoint_and_cover_every_probe():
    from biasgym_lens import list_biases

    for name in list_biases():
        probes = load_bias(name).probes
        s = split_probes(probes)
        assert set(s.select).isdisjoint(s.tune) and set(s.select).isdisjoint(s.test) and set(s.tune).isdisjoint(s.test)
        assert sorted((*s.select, *s.tune, *s.test)) == sorted(probes) and len(set(probes)) == len(probes)
        assert len(s.tune) >= 10 and len(s.test) >= 10, name
        assert set(probe_subset(probes, "eval")) == {*s.tune, *s.test}


def test_logit_diff_on_the_keyword_columns_alone_equals_it_on_the_full_vocabulary():
    from biasgym_lens.injection.metrics import KeywordIds, logit_diff

    kw = KeywordIds(bias=(7, 3, 40), contrast=(12, 5))
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    columns, local = kw.columns()
    assert columns.tolist() == [7, 3, 40, 12, 5]
    by_hand = logits[:, [7, 3, 40]].mean(-1) - logits[:, [12, 5]].mean(-1)
    assert torch.equal(logit_diff(logits[:, columns], local), logit_diff(logits, kw))
    assert torch.allclose(logit_diff(logits, kw), by_hand)
