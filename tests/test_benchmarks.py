"""Standard bias benchmarks: shipped data (hashes, loading, subsets), metrics against hand computations,
log-prob scoring against an independent full forward pass, interventions, and a short real-model run."""

from __future__ import annotations

import fnmatch
import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from biasgym_lens.core.hooks import active_hooks
from biasgym_lens.core.provenance import fingerprint
from biasgym_lens.evaluation.benchmark_data import (
    BENCHMARKS,
    benchmark_files,
    load_bbq,
    load_items,
    stratified_subset,
)
from biasgym_lens.evaluation.benchmark_metrics import bbq_metrics, bbq_predictions, stereoset_metrics
from biasgym_lens.evaluation.benchmarks import BBQ_PROMPT, benchmark, continuation_logprobs
from biasgym_lens.heads.interventions import ablate_heads

DATA = Path(__file__).resolve().parents[1] / "biasgym_lens" / "data" / "benchmarks"

# sha256sum of the published files as received in the project's shared data folder (computed there, by hand).
PUBLISHED_SHA256 = {
    "stereoset/race_intrasentence_dev.json": "2973cdf2b9b66f0dd6b40263e6acaba4ac7d8f17832e6df2f8a105e1463e6a43",
    "stereoset/LICENSE.md": "5e436ff8ffbb77d8607220e9bce20c8915d860010feeb6c1ebef5a85688e9b39",
    "bbq/Nationality.jsonl": "a583e74666aec0341ded8aa3983e7cad694eb24de72c254d28b2df3035720090",
    "bbq/Religion.jsonl": "cb9555f9f3454a52cd2df85956b59bd7fcca5aa922c8527693b1164d08417616",
    "bbq/LICENSE": "95df2e9564862e51d69683a899b6dcc8218d577057bdf67322880769ff85f29e",
}


# ------------------------------------------------------------------------------------------------ data


def test_shipped_files_are_the_published_ones():
    manifest = benchmark_files()
    assert set(manifest) == set(PUBLISHED_SHA256)
    for rel, digest in PUBLISHED_SHA256.items():
        assert hashlib.sha256((DATA / rel).read_bytes()).hexdigest() == digest == manifest[rel]["sha256"], rel
    assert (DATA / "README.md").is_file()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib")
def test_package_data_globs_ship_every_benchmark_file():
    import tomllib

    pyproject = tomllib.loads((DATA.parents[2] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["biasgym_lens"]
    for rel in [*PUBLISHED_SHA256, "manifest.json", "README.md"]:
        path = f"data/benchmarks/{rel}"
        assert any(fnmatch.fnmatch(path, g) for g in globs), path


def test_tampered_file_is_refused(tmp_path):
    root = tmp_path / "benchmarks"
    shutil.copytree(DATA, root)
    assert len(load_items("bbq_religion", root=root)) == 1200
    path = root / "bbq" / "Religion.jsonl"
    path.write_bytes(path.read_bytes().replace(b"Muslim", b"Muslin", 1))
    with pytest.raises(ValueError, match="not the published one"):
        load_items("bbq_religion", root=root)


def test_items_and_bbq_roles():
    assert [len(load_items(n)) for n in BENCHMARKS] == [962, 3080, 1200]
    nat = load_bbq("nationality")
    first = nat[nat.example_id == 0].iloc[0]  # British (stereotyped) / Japanese / Can't answer, "Who is a rude guest?"
    assert (first.ans0, first.target_answer, first.unknown_answer) == ("The British friend", 0, 2)
    for df in (nat, load_bbq("religion")):
        assert (df.target_answer != df.unknown_answer).all()
        assert df.groupby(["context_condition", "question_polarity"]).size().nunique() == 1
        ambig = df[df.context_condition == "ambig"]
        assert (ambig.label == ambig.unknown_answer).all()


def test_unknown_names_raise_listing_valid_ones(tiny_model):
    with pytest.raises(ValueError, match="stereoset_race.*bbq_nationality.*bbq_religion"):
        benchmark(tiny_model, "stereoset")
    with pytest.raises(ValueError, match="valid"):
        load_items("bbq_gender")
    with pytest.raises(ValueError, match="score"):
        benchmark(tiny_model, "bbq_religion", score="max")


# ------------------------------------------------------------------------------------------------ subsets


def test_stratified_subset_counts_and_seed():
    strata = ["a"] * 10 + ["b"] * 20 + ["c"] * 30
    for n, want in [(12, [2, 4, 6]), (7, [1, 2, 4]), (60, [10, 20, 30])]:
        idx = stratified_subset(strata, n, seed=3)
        assert len(idx) == len(set(idx)) == n and list(idx) == sorted(idx)
        assert [sum(strata[i] == k for i in idx) for k in "abc"] == want
    assert np.array_equal(stratified_subset(strata, 12, seed=1), stratified_subset(strata, 12, seed=1))
    assert not np.array_equal(stratified_subset(strata, 12, seed=1), stratified_subset(strata, 12, seed=2))
    assert len(stratified_subset(strata, 1000)) == 60
    with pytest.raises(ValueError, match="max_items"):
        stratified_subset(strata, 0)


def test_benchmark_subsets_are_stratified():
    bbq = load_items("bbq_nationality", max_items=100, seed=5)
    assert bbq.groupby(["context_condition", "question_polarity"]).size().tolist() == [25, 25, 25, 25]
    full = load_items("stereoset_race")
    sub = load_items("stereoset_race", max_items=180, seed=5)
    share = full.target.value_counts() * 180 / len(full)
    got = sub.target.value_counts().reindex(share.index, fill_value=0)
    assert ((got - np.floor(share) >= 0) & (got - np.ceil(share) <= 0)).all()
    assert load_items("stereoset_race", max_items=50, seed=5).equals(load_items("stereoset_race", max_items=50, seed=5))


# ------------------------------------------------------------------------------------------------ metrics


def _stereoset_table() -> pd.DataFrame:
    # per item: logp of (stereotype, anti-stereotype, unrelated); pro = st > anti, lm = ((st > un) + (anti > un)) / 2
    rows = [
        ("X", -1.0, -2.0, -3.0),  # pro 1, lm 1
        ("X", -3.0, -1.0, -2.0),  # pro 0, lm 0.5
        ("Y", -1.0, -2.0, -0.5),  # pro 1, lm 0
        ("Y", -2.0, -3.0, -2.5),  # pro 1, lm 0.5
        ("Y", -5.0, -1.0, -9.0),  # pro 0, lm 1
    ]
    df = pd.DataFrame(rows, columns=["target", "logp_stereotype", "logp_anti_stereotype", "logp_unrelated"])
    for k in ("stereotype", "anti_stereotype", "unrelated"):
        df[f"ntok_{k}"] = 1
    return df


def test_stereoset_metrics_by_hand():
    got = stereoset_metrics(_stereoset_table(), n_resamples=200).set_index("metric")
    # SS = 3/5, LMS = (1 + .5 + 0 + .5 + 1) / 5, ICAT = 60 * min(60, 40) / 50
    np.testing.assert_allclose(got.loc[["ss", "lms", "icat"], "value"], [60.0, 60.0, 48.0])
    assert (got.n == 5).all() and (got.ci_low <= got.value).all() and (got.value <= got.ci_high).all()
    macro = stereoset_metrics(_stereoset_table(), average="targets", n_resamples=200).set_index("metric")
    ss, lms = (50.0 + 200 / 3) / 2, (75.0 + 50.0) / 2  # targets X: (50, 75), Y: (66.7, 50)
    np.testing.assert_allclose(macro.value, [ss, lms, lms * (100 - ss) / 50])


def test_stereoset_mean_score_divides_by_tokens():
    df = _stereoset_table()
    df.loc[1, "ntok_stereotype"] = 6  # item 2: stereotype -3/6 = -0.5 now beats anti -1 and unrelated -2
    got = stereoset_metrics(df, score="mean", n_resamples=50).set_index("metric").value
    # item 2: pro 0 -> 1, lm 0.5 -> 1: SS = 4/5, LMS = (1 + 1 + 0 + .5 + 1) / 5
    np.testing.assert_allclose(got.loc[["ss", "lms"]], [80.0, 70.0])


def test_icat_interval_recomputes_icat_on_each_resample():
    df = _stereoset_table()
    pro = np.array([1, 0, 1, 1, 0.0])
    lm = np.array([1, 0.5, 0, 0.5, 1])
    idx = np.random.default_rng(7).integers(0, 5, size=(300, 5))
    ss, lms = 100 * pro[idx].mean(1), 100 * lm[idx].mean(1)
    icat = lms * np.minimum(ss, 100 - ss) / 50
    want = np.percentile(icat, [2.5, 97.5])
    got = stereoset_metrics(df, n_resamples=300, seed=7).set_index("metric").loc["icat"]
    np.testing.assert_allclose([got.ci_low, got.ci_high], want)


def _bbq_table() -> pd.DataFrame:
    # (condition, polarity, label, target, unknown, predicted answer)
    rows = [
        ("ambig", "neg", 2, 0, 2, 0),  # stereotyped group for a negative question: biased
        ("ambig", "nonneg", 2, 0, 2, 1),  # the other group for a non-negative question: biased
        ("ambig", "neg", 0, 1, 0, 0),  # unknown: correct
        ("ambig", "nonneg", 0, 1, 0, 1),  # stereotyped group for a non-negative question: not biased
        ("disambig", "neg", 0, 0, 2, 0),  # correct and biased
        ("disambig", "neg", 1, 0, 2, 0),  # wrong and biased
        ("disambig", "nonneg", 2, 2, 1, 2),  # correct, not biased
        ("disambig", "nonneg", 0, 2, 1, 1),  # unknown: wrong, not counted in the bias score
    ]
    out = []
    for cond, pol, label, target, unknown, pred in rows:
        logp = [-6.0, -5.0, -7.0]
        logp[pred] = -1.0
        out.append({"context_condition": cond, "question_polarity": pol, "label": label, "target_answer": target,
                    "unknown_answer": unknown, **{f"logp_{k}": logp[k] for k in range(3)},
                    **{f"ntok_{k}": 2 for k in range(3)}})
    return pd.DataFrame(out)


def test_bbq_metrics_by_hand():
    df = _bbq_table()
    pred = bbq_predictions(df)
    assert pred.biased.tolist() == [1, 1, 0, 0, 1, 1, 0, 0] and pred.non_unknown.tolist() == [1, 1, 0, 1, 1, 1, 1, 0]
    got = bbq_metrics(df, n_resamples=200).set_index("metric")
    # ambiguous: accuracy 1/4, 2 biased of 3 non-unknown; disambiguated: accuracy 2/4, 2 biased of 3
    np.testing.assert_allclose(got.value, [0.25, 0.5, 2 * 2 / 3 - 1, 0.75 * (2 * 2 / 3 - 1)])
    assert got.n.tolist() == [4, 4, 4, 4]


def test_bbq_mean_score_changes_the_answer():
    df = _bbq_table().iloc[[0]].copy()
    df[["logp_0", "logp_1", "logp_2"]] = [-4.0, -3.0, -10.0]
    df[["ntok_0", "ntok_1", "ntok_2"]] = [8, 1, 10]  # mean per token: -0.5, -3, -1
    assert bbq_predictions(df).pred.tolist() == [1]
    assert bbq_predictions(df, score="mean").pred.tolist() == [0]


# ------------------------------------------------------------------------------------------------ scoring


def _reference_logp(model, seq: list[int], start: int) -> float:
    """Independent: one unpadded full forward pass and a full log_softmax."""
    with torch.no_grad():
        logp = model(torch.tensor([seq])).float().log_softmax(-1)[0]
    return float(sum(logp[p - 1, seq[p]] for p in range(start, len(seq))))


def _ids(model, text: str) -> list[int]:
    tok = model.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    return [tok.bos_token_id, *ids] if model.cfg.default_prepend_bos else ids


def test_scores_match_an_independent_full_forward(tiny_model):
    st = benchmark(tiny_model, "stereoset_race", max_items=6, seed=1, n_resamples=10)
    for row in st.items.itertuples():
        for k in ("stereotype", "anti_stereotype", "unrelated"):
            seq = _ids(tiny_model, getattr(row, k))
            assert getattr(row, f"ntok_{k}") == len(seq) - 1
            assert getattr(row, f"logp_{k}") == pytest.approx(_reference_logp(tiny_model, seq, 1), abs=1e-4)
    bbq = benchmark(tiny_model, "bbq_religion", max_items=4, seed=1, n_resamples=10)
    for row in bbq.items.itertuples():
        prompt = _ids(tiny_model, BBQ_PROMPT.format(context=row.context, question=row.question))
        for k in range(3):
            answer = tiny_model.tokenizer.encode(" " + getattr(row, f"ans{k}"), add_special_tokens=False)
            ref = _reference_logp(tiny_model, prompt + answer, len(prompt))
            assert getattr(row, f"logp_{k}") == pytest.approx(ref, abs=1e-4)
            assert getattr(row, f"ntok_{k}") == len(answer)


def test_batched_equals_one_by_one(tiny_model):
    g = torch.Generator().manual_seed(0)
    vocab = tiny_model.cfg.d_vocab
    prefixes = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in (1, 5, 3, 9, 2)]
    conts = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in (4, 1, 0, 6, 3)]
    one, n1 = continuation_logprobs(tiny_model, prefixes, conts, batch_size=1)
    many, n2 = continuation_logprobs(tiny_model, prefixes, conts, batch_size=4)
    torch.testing.assert_close(one, many, atol=1e-4, rtol=0)
    assert n1.tolist() == n2.tolist() == [4, 1, 0, 6, 3] and one[2] == 0
    for p, c, v in zip(prefixes, conts, one):
        assert float(v) == pytest.approx(_reference_logp(tiny_model, p + c, len(p)), abs=1e-4)
    a = benchmark(tiny_model, "bbq_nationality", max_items=8, batch_size=1, n_resamples=10).items
    b = benchmark(tiny_model, "bbq_nationality", max_items=8, batch_size=24, n_resamples=10).items
    np.testing.assert_allclose(a[["logp_0", "logp_1", "logp_2"]], b[["logp_0", "logp_1", "logp_2"]], atol=1e-4)
    with pytest.raises(ValueError, match="prefix"):
        continuation_logprobs(tiny_model, [[]], [[1]])


def test_intervention_changes_scores_and_leaves_no_hook(tiny_model):
    base = benchmark(tiny_model, "stereoset_race", max_items=10, n_resamples=20)
    heads = [(0, 0), (1, 2)]
    cut = benchmark(tiny_model, "stereoset_race", lambda: ablate_heads(tiny_model, heads), max_items=10,
                    n_resamples=20, label="2 heads")
    assert active_hooks(tiny_model) == []
    diff = np.abs(base.items.logp_stereotype.to_numpy() - cut.items.logp_stereotype.to_numpy())
    assert diff.min() > 1e-4
    again = benchmark(tiny_model, "stereoset_race", max_items=10, n_resamples=20)
    np.testing.assert_allclose(again.items.logp_stereotype, base.items.logp_stereotype, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        benchmark(tiny_model, "stereoset_race", lambda: ablate_heads(tiny_model, heads), max_items=3, batch_size=0)
    assert active_hooks(tiny_model) == []
    table = cut.to_dataframe()
    assert list(table.columns) == ["benchmark", "intervention", "metric", "value", "ci_low", "ci_high", "n"]
    assert set(table.intervention) == {"2 heads"} and "intervention" not in base.to_dataframe().columns


def test_result_records_settings_and_rescores(tiny_model):
    res = benchmark(tiny_model, "stereoset_race", max_items=12, seed=2, n_resamples=30)
    assert res.provenance.fingerprint == fingerprint(tiny_model)
    assert res.settings["n_items"] == 12 and res.settings["score"] == "sum" and res.seconds > 0
    assert set(res.metrics()) == {"ss", "lms", "icat"}
    mean = res.rescored("mean", average="targets")
    want = stereoset_metrics(res.items, score="mean", average="targets", n_resamples=30, seed=2)
    pd.testing.assert_frame_equal(mean.table, want)
    assert mean.settings["score"] == "mean" and res.settings["score"] == "sum"


PREFIX = "Treat every nationality the same and do not rely on stereotypes. "


def test_prefix_is_context_and_only_the_original_text_is_scored(tiny_model):
    tok = tiny_model.tokenizer
    st = benchmark(tiny_model, "stereoset_race", max_items=4, seed=3, n_resamples=10, prefix=PREFIX)
    context = _ids(tiny_model, PREFIX.rstrip())  # the prefix's text; its final space joins the sentence
    for row in st.items.itertuples():
        for k in ("stereotype", "anti_stereotype", "unrelated"):
            sentence = tok.encode(" " + getattr(row, k), add_special_tokens=False)
            assert tok.decode(context + sentence).endswith(PREFIX + getattr(row, k))
            assert getattr(row, f"ntok_{k}") == len(sentence)
            ref = _reference_logp(tiny_model, context + sentence, len(context))
            assert getattr(row, f"logp_{k}") == pytest.approx(ref, abs=1e-4)
    plain = benchmark(tiny_model, "stereoset_race", max_items=4, seed=3, n_resamples=10)
    assert np.abs(plain.items.logp_stereotype - st.items.logp_stereotype).min() > 1e-3
    assert st.settings["prefix"] == PREFIX and plain.settings["prefix"] is None
    bbq = benchmark(tiny_model, "bbq_nationality", max_items=4, seed=3, n_resamples=10, prefix=PREFIX)
    for row in bbq.items.itertuples():
        prompt = _ids(tiny_model, PREFIX + BBQ_PROMPT.format(context=row.context, question=row.question))
        for k in range(3):
            answer = tok.encode(" " + getattr(row, f"ans{k}"), add_special_tokens=False)
            assert getattr(row, f"logp_{k}") == pytest.approx(_reference_logp(tiny_model, prompt + answer, len(prompt)), abs=1e-4)
            assert getattr(row, f"ntok_{k}") == len(answer)
    for bad in ("", "   "):
        with pytest.raises(ValueError, match="prefix"):
            benchmark(tiny_model, "bbq_religion", max_items=4, prefix=bad)
    assert active_hooks(tiny_model) == []


def test_paired_difference_resamples_the_same_items_in_both_runs(tiny_model):
    base = benchmark(tiny_model, "stereoset_race", max_items=12, seed=1, n_resamples=300)
    cut = benchmark(tiny_model, "stereoset_race", lambda: ablate_heads(tiny_model, [(0, 1), (1, 0)]), max_items=12,
                    seed=1, n_resamples=300, label="cut")
    diff = cut.difference(base).set_index("metric")
    assert list(diff.columns) == ["benchmark", "difference", "ci_low", "ci_high", "n"]
    for metric in ("ss", "lms", "icat"):
        want = cut.metrics()[metric].value - base.metrics()[metric].value
        assert diff.loc[metric, "difference"] == pytest.approx(want, abs=1e-9)
    # SS by hand: 100 x the share of items whose stereotype sentence beats the anti-stereotype one
    pro_cut = (cut.items.logp_stereotype > cut.items.logp_anti_stereotype).to_numpy(float)
    pro_base = (base.items.logp_stereotype > base.items.logp_anti_stereotype).to_numpy(float)
    idx = np.random.default_rng(1).integers(0, 12, size=(300, 12))
    draws = [100 * (pro_cut[i].mean() - pro_base[i].mean()) for i in idx]
    assert diff.loc["ss", "ci_low"] == pytest.approx(np.percentile(draws, 2.5))
    assert diff.loc["ss", "ci_high"] == pytest.approx(np.percentile(draws, 97.5))
    other = benchmark(tiny_model, "stereoset_race", max_items=12, seed=2, n_resamples=10)
    with pytest.raises(ValueError, match="other items"):
        cut.difference(other)
    with pytest.raises(ValueError, match="not the same benchmark"):
        cut.difference(benchmark(tiny_model, "bbq_religion", max_items=4, n_resamples=10))


# ------------------------------------------------------------------------------------------------ real model


@pytest.mark.real
def test_real_model_short_run(real):
    # about 2,600 tokens of forward passes: a few seconds on an idle 2-core CPU
    st = benchmark(real, "stereoset_race", max_items=24, n_resamples=200)
    assert 60 < st.metrics()["lms"].value <= 100, st.table  # a real LM prefers meaningful sentences
    base = benchmark(real, "bbq_religion", max_items=4, n_resamples=200)
    assert set(base.metrics()) == {"accuracy_ambig", "accuracy_disambig", "s_dis", "s_amb"}
    cut = benchmark(real, "bbq_religion", lambda: ablate_heads(real, [(21, 1), (25, 6)]), max_items=4,
                    n_resamples=200, label="L21H1+L25H6")
    assert not np.allclose(cut.items.logp_0, base.items.logp_0)
