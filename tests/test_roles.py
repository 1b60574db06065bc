"""Head roles: attention shares, attended tokens and direct effects, against independent computations."""

from __future__ import annotations

import pytest
import torch

from biasgym_lens.core.hooks import active_hooks
from biasgym_lens.heads.decomposition import (
    attention_scores,
    component_hook_names,
    dla_scores,
    residual_components,
)
from biasgym_lens.heads.probes import build_probe_set
from biasgym_lens.heads.roles import ATTENTION_TARGETS, group_positions, head_roles, unembed_direct
from biasgym_lens.injection.catalogue import load_bias
from biasgym_lens.injection.training import inject

FAST = dict(epochs=1, batch_size=4, max_texts=4, lr=5e-2, progress=False, select_best=False)
HEADS = [(0, 1), (1, 0)]


@pytest.fixture
def injected(tiny_model):
    return tiny_model, inject(tiny_model, "late", **FAST)


def test_token_effects_equal_dla_and_attention_equals_the_attention_score(injected):
    model, inj = injected
    roles = head_roles(model, inj, HEADS, max_probes=5, groups=["Italy"])
    assert active_hooks(model) == []
    with inj.apply(model):
        ps = build_probe_set(model, load_bias("late"), inj.token, controls=[], max_probes=5)
        dla = dla_scores(model, ps, "token").mean(0)  # [layer, head]
        att = attention_scores(model, ps).mean(0)
    eff = roles.effects.set_index(["head", "kind"])
    att_tab = roles.attention.set_index(["head", "kind", "target"])
    for layer, h in HEADS:
        assert eff.loc[(f"L{layer}H{h}", "token"), "logit_diff"] == pytest.approx(float(dla[layer, h]), abs=1e-5)
        assert att_tab.loc[(f"L{layer}H{h}", "token", "group"), "prob"] == pytest.approx(float(att[layer, h]), abs=1e-6)
    shares = roles.attention.groupby(["head", "group"])["prob"].sum()
    assert ((shares - 1).abs() < 1e-5).all() and set(roles.attention["target"]) == set(ATTENTION_TARGETS)
    e = roles.effects
    assert ((e["bias_logit"] - e["contrast_logit"] - e["logit_diff"]).abs() < 1e-9).all()
    assert set(e["group"]) == {inj.token, "Italy"} and len(e) == 4
    promoted = roles.to_dataframe("promoted")
    top = promoted[(promoted.direction == "promoted") & (promoted["rank"] == 1)]
    assert (top["logit"] >= promoted[promoted.direction == "promoted"].groupby(["head", "group"])["logit"].transform("max").loc[top.index] - 1e-9).all()
    attended = roles.to_dataframe("attended")
    assert (attended.groupby(["head", "group"])["prob"].sum() <= 1 + 1e-5).all()


def test_unembed_direct_recovers_the_logits_up_to_constant_biases(tiny_model):
    """Every residual component, divided by the final norm's scale and unembedded, sums to the logits up to the
    same bias vector in every row (final-norm and unembedding biases)."""
    model = tiny_model
    spec = load_bias("late")
    batch, _ = group_positions(model, list(spec.probes[:4]), "Italy", spec.fill)
    names = component_hook_names(model)
    logits, cache = model.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask, names_filter=lambda n: n in names)
    rows, pos = torch.arange(len(batch)), batch.last_positions
    comps = residual_components(model, cache, rows, pos)
    scale = cache["ln_final.hook_scale"][rows, pos].float()
    summed = sum(unembed_direct(model, v / scale) for v in comps.values())
    residual = logits[rows, pos].float() - summed
    torch.testing.assert_close(residual, residual[:1].expand_as(residual), atol=1e-4, rtol=1e-4)


def test_group_positions_cover_the_group_tokens(tiny_model):
    spec = load_bias("late")
    templates = [t for t in spec.probes if not t.startswith("{group}")][:3]
    batch, positions = group_positions(tiny_model, templates, "Italy", spec.fill)
    tok = tiny_model.tokenizer
    for r, pos in enumerate(positions):
        text = tok.decode(batch.input_ids[r, pos].tolist())
        assert "Italy" in text and len(text.strip()) <= len("Italy") + 1


def test_bad_inputs_are_refused(injected):
    model, inj = injected
    with pytest.raises(ValueError, match="heads is empty"):
        head_roles(model, inj, [])
    with pytest.raises(ValueError, match="top must be an int >= 1, got 0"):
        head_roles(model, inj, HEADS, top=0)
    roles = head_roles(model, inj, HEADS[:1], max_probes=2, groups=[])
    with pytest.raises(ValueError, match="unknown view 'edges'; valid: effects, attention, attended, promoted"):
        roles.to_dataframe("edges")
    assert active_hooks(model) == []


def test_head_roles_figure_has_a_row_per_head(injected):
    from biasgym_lens.study.role_plots import head_roles_figure

    model, inj = injected
    roles = head_roles(model, inj, HEADS, max_probes=3, groups=["Italy"], top=4)
    fig = head_roles_figure(roles, top=3)
    assert len(fig.layout.annotations) == 3 * len(HEADS)
    bars = [t for t in fig.data if t.orientation == "h"]
    assert len(bars) == len(HEADS) and all(len(b.y) == 3 for b in bars)
    first = roles.effects.query("head == 'L0H1' and kind == 'token'").iloc[0]
    assert list(fig.data[1].y) == pytest.approx([first.bias_logit, first.contrast_logit, first.logit_diff])
