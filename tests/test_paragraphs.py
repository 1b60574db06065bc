"""The generation-based bias score: keyword inflections, counts against a hand count, pooled rates with
bootstrap intervals, and the sampled paragraphs on a tiny model (seeded, paired across interventions)."""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import pytest
import torch

from biasgym_lens.core.embedding import with_token_vectors
from biasgym_lens.core.hooks import active_hooks
from biasgym_lens.evaluation.paragraphs import ParagraphBias, keyword_forms, paragraph_bias, score_text
from biasgym_lens.heads.interventions import ablate_heads
from biasgym_lens.injection.catalogue import load_bias


def test_keyword_forms_cover_inflections_and_avoid_false_stems():
    assert {"late", "later", "latest", "lateness", "lately"} <= keyword_forms(" late")
    assert "latent" not in keyword_forms("late")
    assert {"reckless", "recklessly", "recklessness"} <= keyword_forms("reckless")
    assert {"dangerously", "dangerous", "dangerousness"} <= keyword_forms(" dangerously")
    assert {"safely", "safe", "safer", "safest"} <= keyword_forms(" safely")
    assert {"badly", "bad"} <= keyword_forms(" badly")
    assert {"careful", "carefully"} <= keyword_forms(" carefully")
    assert {"hot", "hotter", "hottest"} <= keyword_forms(" hot")
    assert {"noisy", "noisier", "noisily", "noisiness"} <= keyword_forms(" noisy")
    assert {"terrible", "terribly"} <= keyword_forms(" terrible")
    assert {"delayed", "delay", "delays"} <= keyword_forms(" delayed")
    assert {"early", "earlier", "earliest"} <= keyword_forms(" early") and "ear" not in keyword_forms("early")
    assert not {"friend", "friends"} & keyword_forms(" friendly")
    assert "fasting" in keyword_forms("fast") and "fastened" not in keyword_forms("fast")
    with pytest.raises(ValueError, match="single word"):
        keyword_forms("very fast")


def test_score_text_equals_a_hand_count():
    spec = load_bias("bad_driving")  # bias: dangerously fast aggressively wildly badly; contrast: carefully ...
    text = (
        "Drivers there drive dangerously fast. Some are dangerous; others drive carefully and slowly, "
        "but faster than you think. Badly parked cars, 3 of them, don't move."
    )
    # words by hand: Drivers there drive dangerously fast Some are dangerous others drive carefully and slowly
    # but faster than you think Badly parked cars of them don't move  -> 25 ("3" is not a word)
    # bias: dangerously, fast, dangerous, faster, Badly -> 5; contrast: carefully, slowly -> 2
    s = score_text(text, spec.bias_keywords, spec.contrast_keywords)
    assert (s.n_words, s.n_bias, s.n_contrast) == (25, 5, 2)
    assert s.score == pytest.approx(100 * 3 / 25)
    assert score_text("", spec.bias_keywords, spec.contrast_keywords).score == 0.0
    late = load_bias("late")  # late delayed behind | early promptly ahead
    s = score_text("Later, always LATE and delayed; lateness everywhere. Promptness? Earlier, never.",
                   late.bias_keywords, late.contrast_keywords)
    assert (s.n_words, s.n_bias, s.n_contrast) == (10, 4, 2)


def test_rates_pool_paragraphs_and_intervals_resample_them():
    counts = {  # group -> (n_bias, n_contrast, n_words) per paragraph
        "A": [(2, 0, 40), (0, 1, 10), (3, 0, 50)],
        "B": [(0, 0, 30), (1, 2, 20)],
    }
    rows = [
        {"group": g, "kind": "real", "intervention": "none", "sample": i, "text": "", "n_words": w, "n_bias": b,
         "n_contrast": c, "score": 0.0}
        for g, ps in counts.items() for i, (b, c, w) in enumerate(ps)
    ]
    pb = ParagraphBias("demo", pd.DataFrame(rows), {"seed": 0}, n_resamples=500)
    df = pb.to_dataframe().set_index("group")
    assert df.loc["A", "rate"] == pytest.approx(100 * (5 - 1) / 100)
    assert df.loc["B", "rate"] == pytest.approx(100 * (1 - 2) / 50)
    assert df.loc["A", "bias_rate"] == pytest.approx(5.0) and df.loc["A", "contrast_rate"] == pytest.approx(1.0)
    assert list(df["n"]) == [3, 2]
    # the interval, by hand: resample paragraphs with the same seeded generator as biasgym_lens.core.stats
    b, c, w = (np.array([p[k] for p in counts["A"]], float) for k in range(3))
    idx = np.random.default_rng(0).integers(0, 3, size=(500, 3))
    draws = [100 * (b[i].sum() - c[i].sum()) / w[i].sum() for i in idx]
    assert df.loc["A", "ci_low"] == pytest.approx(np.percentile(draws, 2.5))
    assert df.loc["A", "ci_high"] == pytest.approx(np.percentile(draws, 97.5))
    assert len(pb.examples(1)) == 2
    texts = pd.DataFrame(rows).assign(text=["reckless and fast", "calm", "", "slow reckless", "x"])
    rs = ParagraphBias("demo", texts, {"seed": 0, "contrast_keywords": ("slow",)}, n_resamples=50).rescored(["reckless"])
    assert list(rs.paragraphs["n_bias"]) == [1, 0, 0, 1, 0] and list(rs.paragraphs["n_contrast"]) == [0, 0, 0, 1, 0]
    assert list(rs.paragraphs["n_words"]) == [3, 1, 0, 2, 1] and rs.settings["bias_keywords"] == ("reckless",)


class _TokenVector:
    """Stands in for an Injection: a token string and ``apply(model)``."""

    def __init__(self, token, vector):
        self.token, self.vector = token, vector

    @contextlib.contextmanager
    def apply(self, model):
        with with_token_vectors(model, {self.token: self.vector}) as ids:
            yield ids[self.token]


def test_paragraph_bias_on_a_tiny_model(tiny_model):
    inj = _TokenVector("<TokP>", 3 * torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(0)))
    kw = dict(injection=inj, groups=["<TokP>", "Italy", "Sweden"], n=3, max_new_tokens=6, batch_size=4, n_resamples=200)
    interventions = {"none": None, "heads": lambda: ablate_heads(tiny_model, [(0, 1), (1, 2)])}
    pb = paragraph_bias(tiny_model, "bad_driving", interventions=interventions, **kw)
    again = paragraph_bias(tiny_model, "bad_driving", interventions=interventions, **kw)
    assert active_hooks(tiny_model) == []
    pd.testing.assert_frame_equal(pb.paragraphs, again.paragraphs)  # seeded
    df = pb.to_dataframe()
    assert len(df) == 6 and set(df["n"]) == {3}
    assert list(df.loc[df["intervention"] == "none", "kind"]) == ["token", "real", "control"]
    texts = pb.paragraphs.set_index(["intervention", "group", "sample"])["text"]
    assert texts["none"].tolist() != texts["heads"].tolist()
    assert len(set(texts["none"].tolist())) > 3  # samples differ within a group
    spec = load_bias("bad_driving")
    for row in pb.paragraphs.itertuples():
        s = score_text(row.text, spec.bias_keywords, spec.contrast_keywords)
        assert (row.n_words, row.n_bias, row.n_contrast) == (s.n_words, s.n_bias, s.n_contrast)
    with pytest.raises(ValueError, match="n must be"):
        paragraph_bias(tiny_model, "bad_driving", n=0)
    with pytest.raises(ValueError, match="interventions is empty"):
        paragraph_bias(tiny_model, "bad_driving", interventions={})


def test_pooled_by_kind_and_paired_change_equal_a_hand_bootstrap():
    """``by_kind`` pools every group of a kind; ``paired_change`` resamples the same paragraphs in both runs."""
    from biasgym_lens.evaluation.paragraphs import combine_paragraphs

    counts = {  # (intervention, group) -> (n_bias, n_contrast, n_words) per sample
        ("none", "A"): [(2, 0, 40), (0, 1, 10)], ("none", "B"): [(3, 0, 50), (1, 1, 20)],
        ("heads", "A"): [(1, 0, 40), (0, 2, 10)], ("heads", "B"): [(0, 0, 50), (1, 0, 20)],
    }

    def part(groups):
        rows = [
            {"group": g, "kind": "real", "intervention": iv, "sample": i, "text": "", "n_words": w, "n_bias": b,
             "n_contrast": c, "score": 0.0}
            for (iv, g), ps in counts.items() if g in groups for i, (b, c, w) in enumerate(ps)
        ]
        settings = {"seed": 0, "n": 2, "bias_keywords": ("x",), "contrast_keywords": ("y",), "seconds": 1.0}
        return ParagraphBias("demo", pd.DataFrame(rows), settings, n_resamples=400)

    pb = combine_paragraphs(part({"A"}), part({"B"}))
    assert pb.settings["n"] == {"A": 2, "B": 2} and pb.settings["seconds"] == 2.0
    kinds = pb.by_kind().set_index("intervention")
    assert kinds.loc["none", "rate"] == pytest.approx(100 * (6 - 2) / 120)
    assert kinds.loc["heads", "rate"] == pytest.approx(100 * (2 - 2) / 120) and kinds.loc["heads", "n"] == 4
    change = pb.paired_change().iloc[0]
    assert change["intervention"] == "heads" and change["n"] == 4
    assert change["change"] == pytest.approx(0.0 - 100 * 4 / 120)
    # by hand: the four (group, sample) pairs resampled together in both interventions
    order = [("A", 0), ("A", 1), ("B", 0), ("B", 1)]
    arr = {iv: np.array([counts[(iv, g)][i] for g, i in order], float) for iv in ("none", "heads")}
    idx = np.random.default_rng(0).integers(0, 4, size=(400, 4))
    def rate(a):
        return 100 * (a[:, 0].sum() - a[:, 1].sum()) / a[:, 2].sum()

    draws = [rate(arr["heads"][i]) - rate(arr["none"][i]) for i in idx]
    assert change["ci_low"] == pytest.approx(np.percentile(draws, 2.5))
    assert change["ci_high"] == pytest.approx(np.percentile(draws, 97.5))
    with pytest.raises(ValueError, match="base 'steering' is not an intervention here; valid: \\['heads', 'none'\\]"):
        pb.paired_change("steering")
    other = ParagraphBias("other", part({"A"}).paragraphs, part({"A"}).settings)
    with pytest.raises(ValueError, match="cannot combine paragraphs of 'demo' and 'other'"):
        combine_paragraphs(part({"A"}), other)
