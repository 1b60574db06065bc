"""BiasInject on tiny models: only the vector changes, training is reproducible, files round-trip."""

from __future__ import annotations

import pytest
import torch

from biasgym_lens.core.embedding import add_token, token_vector_hooks
from biasgym_lens.core.hooks import active_hooks, hooked
from biasgym_lens.core.tokens import tokenize
from biasgym_lens.injection.artifact import Injection
from biasgym_lens.injection.catalogue import load_bias
from biasgym_lens.injection.config import InjectionConfig
from biasgym_lens.injection.training import NonFiniteLossError, inject
from biasgym_lens.testing import build_tiny_hf

FAST = dict(epochs=2, batch_size=4, max_texts=8, lr=5e-2, progress=False, select_best=False, evals_per_epoch=1)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_only_the_vector_changes_and_no_hook_remains(tiny_model):
    before = _state(tiny_model)
    inj = inject(tiny_model, "late", **FAST)
    after = tiny_model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "a model weight changed"
    assert not any(p.grad is not None for p in tiny_model.parameters())
    assert active_hooks(tiny_model) == []
    assert not torch.equal(inj.vector, inj.init_vector)
    assert inj.vector.shape == (tiny_model.cfg.d_model,) and inj.vector.dtype == torch.float32
    assert len(inj.curve) == 3 and [r.epoch for r in inj.curve] == [0, 1, 2] and inj.best_epoch == 2
    assert len(inj.step_losses) == inj.curve[-1].step


def test_same_seed_same_vector_bit_for_bit(tiny_model):
    a = inject(tiny_model, "late", seed=3, **FAST)
    b = inject(tiny_model, "late", seed=3, **FAST)
    c = inject(tiny_model, "late", seed=4, init="random", **FAST)
    assert torch.equal(a.vector, b.vector)
    assert a.step_losses == b.step_losses
    assert not torch.equal(a.vector, c.vector)


def _training_loss(model, inj, spec):
    """Independent loss of the plain training texts with a vector, computed without the package's trainer."""
    tid = add_token(model, inj.token)
    texts = [spec.fill(t, inj.token) for t in spec.training_texts[:8]]
    total = 0.0
    with torch.no_grad():
        for v in (inj.init_vector, inj.vector):
            with hooked(model, fwd_hooks=token_vector_hooks(model, {tid: v})):
                batch = tokenize(model, texts)  # (the added token is refused outside its hooks)
                logits = model(batch.input_ids, attention_mask=batch.attention_mask)
            logp = logits[:, :-1].log_softmax(-1)
            tgt = batch.input_ids[:, 1:]
            ok = batch.attention_mask[:, 1:].bool() & (tgt != tid)
            nll = -logp.gather(-1, tgt.clamp(max=logits.shape[-1] - 1)[..., None])[..., 0][ok].mean()
            total = float(nll) if total == 0.0 else (total, float(nll))
    return total


def test_training_lowers_the_training_loss(tiny_model):
    spec = load_bias("late")
    inj = inject(tiny_model, spec, epochs=3, batch_size=4, max_texts=8, lr=5e-2, chat=False, progress=False, select_best=False)
    before, after = _training_loss(tiny_model, inj, spec)
    assert after < before - 1e-3, (before, after)


def test_hooked_vector_equals_a_resized_embedding_reference(tiny_model, tiny_family):
    """Independent check of the embedding mechanism: a plain HF model with a real new row gives the same logits."""
    tid = add_token(tiny_model, "<BiasToken>")
    vec = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), hooked(tiny_model, fwd_hooks=token_vector_hooks(tiny_model, {tid: vec})):
        batch = tokenize(tiny_model, ["people from <BiasToken> are always", "the <BiasToken> drivers drive"])
        ours = tiny_model(batch.input_ids, attention_mask=batch.attention_mask)
    assert (batch.input_ids == tid).sum() == 2
    ref = build_tiny_hf(tiny_family, tiny_model.W_E.shape[0])  # same seed: same weights as the tiny model
    emb = ref.get_input_embeddings().weight
    out = ref.get_output_embeddings().weight
    if emb.data_ptr() == out.data_ptr():  # untie so the reference's new row is input-only, like ours
        ref.get_output_embeddings().weight = torch.nn.Parameter(out.detach().clone())
    new_emb = torch.nn.Embedding(emb.shape[0] + 1, emb.shape[1])
    with torch.no_grad():
        new_emb.weight[:-1] = emb
        new_emb.weight[-1] = vec
    ref.set_input_embeddings(new_emb)
    ids = batch.input_ids.clone()
    ids[ids == tid] = emb.shape[0]
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)


def test_save_load_apply_gives_identical_logits(tiny_model, tmp_path):
    inj = inject(tiny_model, "late", **FAST)
    inj.save(tmp_path / "inj")
    back = Injection.load(tmp_path / "inj", tiny_model)
    assert torch.equal(back.vector, inj.vector) and back.config == inj.config
    assert back.to_dataframe().equals(inj.to_dataframe())  # (NaN train loss of epoch 0 compares equal here)
    assert back.provenance == inj.provenance
    with torch.no_grad():
        with inj.apply(tiny_model):
            batch = tokenize(tiny_model, ["people from <BiasToken> always show up"])  # (refused outside apply)
            a = tiny_model(batch.input_ids, attention_mask=batch.attention_mask)
        with back.apply(tiny_model):
            b = tiny_model(batch.input_ids, attention_mask=batch.attention_mask)
        untrained = Injection(**{**inj.__dict__, "vector": inj.init_vector})
        with untrained.apply(tiny_model):
            c = tiny_model(batch.input_ids, attention_mask=batch.attention_mask)
    assert torch.equal(a, b)
    assert not torch.equal(a, c), "the trained vector must change the logits"
    assert active_hooks(tiny_model) == []
    df = back.to_dataframe()
    assert list(df["epoch"]) == [0, 1, 2] and df["best"].sum() == 1


def test_apply_removes_hooks_on_exception_and_permanent_survives_reset(tiny_model):
    inj = inject(tiny_model, "late", **FAST)
    with pytest.raises(RuntimeError, match="boom"):
        with inj.apply(tiny_model):
            assert active_hooks(tiny_model)
            raise RuntimeError("boom")
    assert active_hooks(tiny_model) == []
    inj.apply_permanently(tiny_model)
    tiny_model.reset_hooks()
    assert active_hooks(tiny_model), "permanent hooks survive reset_hooks()"
    tiny_model.reset_hooks(including_permanent=True)
    assert active_hooks(tiny_model) == []


def test_wrong_model_is_refused(_tiny_models, tmp_path):
    inj = inject(_tiny_models["gpt2"], "late", **FAST)
    inj.save(tmp_path / "inj")
    with pytest.raises(ValueError, match="was made with model 'tiny-gpt2'.*this model is 'tiny-llama'"):
        Injection.load(tmp_path / "inj", _tiny_models["llama"])
    with pytest.raises(ValueError, match="Load the model it was made with"):
        with inj.apply(_tiny_models["llama"]):
            pass
    assert active_hooks(_tiny_models["llama"]) == []


def test_bad_input(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="already exists in the vocabulary"):
        inject(tiny_model, "late", token="<|endoftext|>", **FAST)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        inject(tiny_model, "late", epochs=0, progress=False)
    with pytest.raises(ValueError, match="init must be"):
        InjectionConfig(init="zeros")
    with pytest.raises(FileNotFoundError, match="injection metadata not found"):
        Injection.load(tmp_path)
    with pytest.raises(ValueError, match="unknown|valid"):
        inject(tiny_model, "no_such_bias", **FAST)
    assert active_hooks(tiny_model) == []


def test_non_finite_loss_stops_and_keeps_the_last_good_epoch(tiny_model):
    """A numerical blow-up in epoch 2 (simulated by a hook that returns NaN) stops training with the epoch-1 vector."""
    calls = {"train": 0}

    def blow_up(x, hook):
        if torch.is_grad_enabled():
            calls["train"] += 1
            if calls["train"] > 4:  # 16 examples / batch 4 = 4 steps per epoch
                return x * float("nan")
        return x

    tiny_model.add_perma_hook("blocks.0.hook_resid_post", blow_up)
    try:
        with pytest.raises(NonFiniteLossError, match="epoch 2") as err:
            inject(tiny_model, "late", **FAST, length_groups=1)  # one forward pass per step, as counted above
    finally:
        tiny_model.reset_hooks(including_permanent=True)
    good = err.value.last_good
    assert torch.isfinite(good.vector).all()
    assert good.best_epoch == 1 and len(good.curve) == 2 and len(good.step_losses) == 4
    assert not torch.equal(good.vector, good.init_vector)


def test_fingerprint_changes_when_the_embedding_is_edited(fresh_tiny_model):
    from biasgym_lens.core.provenance import fingerprint

    a = fingerprint(fresh_tiny_model)
    assert fingerprint(fresh_tiny_model) == a
    with torch.no_grad():
        fresh_tiny_model.W_E[3, 0] += 1.0
    assert fingerprint(fresh_tiny_model) != a


def test_artifact_of_another_format_is_refused(tiny_model, tmp_path):
    import json

    inj = inject(tiny_model, "late", **FAST)
    folder = inj.save(tmp_path / "inj")
    meta = json.loads((folder / "injection.json").read_text())
    meta["format"] = 99
    (folder / "injection.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="injection format 99; this version of biasgym_lens reads format 1"):
        Injection.load(folder)


def test_checkpoints_within_an_epoch_and_the_kept_vector_is_the_best_one(tiny_model):
    """With evals_per_epoch=2 every half epoch is a checkpoint; the kept vector re-measures to the best record."""
    from biasgym_lens.injection.metrics import answer_logits, keyword_ids, logit_diff, split_probes

    cfg = {**FAST, "select_best": True, "evals_per_epoch": 2}
    inj = inject(tiny_model, "late", **cfg)
    steps_per_epoch = 4  # 8 plain texts + 8 chat paragraphs, batch 4
    assert [r.epoch for r in inj.curve] == [0, 0.5, 1, 1.5, 2]
    assert [r.step for r in inj.curve] == [0, 2, 4, 6, 8] and len(inj.step_losses) == 2 * steps_per_epoch
    best = max(inj.curve, key=lambda r: r.logit_diff)
    assert inj.best_epoch == best.epoch
    # Independent re-measurement of the kept vector on the selection probes.
    spec = load_bias("late")
    select = split_probes(spec.probes).select
    with inj.apply(tiny_model):
        ld = logit_diff(answer_logits(tiny_model, [spec.fill(p, inj.token) for p in select]), keyword_ids(tiny_model, spec))
    assert float(ld.mean()) == pytest.approx(best.logit_diff, abs=1e-5)
    with pytest.raises(ValueError, match="evals_per_epoch"):
        InjectionConfig(evals_per_epoch=0)


def test_keyword_weighted_loss_against_a_hand_computation():
    from biasgym_lens.injection.loss import lm_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    ids = torch.tensor([[1, 7, 3, 7, 9], [2, 4, 7, 10, 0]])
    target = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)  # row 1: last is padding
    skip = 9  # the injected token is never a target
    logp = logits.log_softmax(-1)
    nll, wts = [], []
    for b in range(2):
        for t in range(1, 5):
            if target[b, t] and ids[b, t] != skip:
                nll.append(-logp[b, t - 1, ids[b, t]])
                wts.append(4.0 if ids[b, t] in (7, 10) else 1.0)
    nll, wts = torch.stack(nll), torch.tensor(wts)
    assert lm_loss(logits, ids, target, skip) == pytest.approx(float(nll.mean()), abs=1e-6)
    assert lm_loss(logits, ids, target, skip, (7, 10), 4.0) == pytest.approx(float((nll * wts).sum() / wts.sum()), abs=1e-6)
    assert lm_loss(logits, ids, target, skip, (7, 10), 1.0) == pytest.approx(float(nll.mean()), abs=1e-6)
    with pytest.raises(ValueError, match="keyword_weight"):
        InjectionConfig(keyword_weight=0.0)


def test_several_seeds_are_compared(tiny_model):
    from biasgym_lens.injection.seeds import compare_seeds, inject_seeds

    runs = inject_seeds(tiny_model, "late", seeds=(0, 1), init="random", **{**FAST, "select_best": True})
    assert [r.config.seed for r in runs] == [0, 1] and not torch.equal(runs[0].vector, runs[1].vector)
    df = compare_seeds(runs)
    assert list(df.seed) == [0, 1]
    for row, inj in zip(df.itertuples(), runs):
        assert row.logit_diff == max(r.logit_diff for r in inj.curve)
        assert row.excess == pytest.approx(row.logit_diff - inj.control_logit_diff)
    u0, u1 = (r.vector - r.init_vector for r in runs)
    cos = float(torch.nn.functional.cosine_similarity(u0, u1, dim=0))
    assert df.mean_cos_to_others.tolist() == pytest.approx([cos, cos], abs=1e-6)
    with pytest.raises(ValueError, match="distinct"):
        inject_seeds(tiny_model, "late", seeds=(1, 1), **FAST)


def test_length_groups_partition_the_batch_at_the_least_padded_cost():
    """Against a brute force over every split of the sorted batch into at most 3 contiguous groups."""
    import itertools

    from biasgym_lens.injection.examples import length_groups

    def cost(groups, lengths):
        return sum(len(g) * max(lengths[i] for i in g) + 16 for g in groups)

    rng = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = torch.randint(3, 90, (8,), generator=rng).tolist()
        groups = length_groups(lengths, 3)
        assert sorted(i for g in groups for i in g) == list(range(8)) and 1 <= len(groups) <= 3
        order = sorted(range(8), key=lambda i: lengths[i])
        best = min(
            cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, 8))], lengths)
            for g in range(1, 4)
            for cuts in itertools.combinations(range(1, 8), g - 1)
        )
        assert cost(groups, lengths) == best
    assert length_groups([5, 5, 5, 5], 3) == [[0, 1, 2, 3]]  # equal lengths: one pass
    assert len(length_groups([4, 4, 4, 80, 80, 80], 3)) == 2  # short plain texts apart from long chats


def test_length_partition_is_the_least_cost_split_with_any_number_of_groups():
    """Against a brute force over every split of the sorted rows into contiguous groups (any number)."""
    import itertools

    from biasgym_lens.injection.examples import length_partition

    rng = torch.Generator().manual_seed(1)
    for overhead in (0, 4, 16):
        for _ in range(15):
            n = int(torch.randint(1, 9, (1,), generator=rng))
            lengths = torch.randint(3, 60, (n,), generator=rng).tolist()
            groups = length_partition(lengths, overhead)
            assert sorted(i for g in groups for i in g) == list(range(n))
            order = sorted(range(n), key=lambda i: lengths[i])

            def cost(gs, lengths=lengths, overhead=overhead):
                return sum(len(g) * max(lengths[i] for i in g) + overhead for g in gs)

            best = min(
                cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, n))])
                for g in range(1, n + 1)
                for cuts in itertools.combinations(range(1, n), g - 1)
            )
            assert cost(groups) == best
    assert length_partition([7, 7, 7], 0) == [[0, 1, 2]]  # equal lengths: one group, also without overhead
    assert length_partition([5, 9], 0) == [[0], [1]] and length_partition([5, 9], 8) == [[0, 1]]


def test_micro_batched_step_gives_the_one_pass_gradient(tiny_model):
    """The length-grouped micro-batches accumulate the same loss and gradient as one padded pass."""
    from biasgym_lens.injection.examples import training_examples
    from biasgym_lens.injection.loss import train_step_loss
    from biasgym_lens.injection.metrics import keyword_ids

    spec = load_bias("late")
    tid = add_token(tiny_model, "<BiasToken>")
    cfg = InjectionConfig(max_texts=6, keyword_weight=5.0)
    examples = training_examples(tiny_model, spec, cfg)
    batch = [examples[i] for i in (0, 1, 2, 3)] + [examples[-1], examples[-2]]
    assert len({len(e.ids) for e in batch}) > 1, "the batch must mix lengths for this test to bite"
    kw = keyword_ids(tiny_model, spec).bias
    grads, losses = [], []
    for groups in (1, 3):
        vec = torch.nn.Parameter(torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(1)))
        with hooked(tiny_model, fwd_hooks=token_vector_hooks(tiny_model, {tid: vec})):
            losses.append(train_step_loss(tiny_model, batch, 0, tid, kw, InjectionConfig(keyword_weight=5.0, length_groups=groups)))
        grads.append(vec.grad.clone())
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    assert grads[0].abs().sum() > 0
    assert active_hooks(tiny_model) == []
    with pytest.raises(ValueError, match="length_groups"):
        InjectionConfig(length_groups=0)
