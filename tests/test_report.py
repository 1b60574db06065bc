"""The report's words and numbers on synthetic summaries (headline, table in words, settings) and the page
written from them (no model needed)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import pytest

from biasgym_lens.study.report import write_report
from biasgym_lens.study.report_text import (
    MISSING,
    baseline_sentence,
    headline,
    interval,
    percent,
    settings_sections,
    summary_table,
)

NAN = float("nan")
HEADS = [(21, 1), (25, 6), (23, 1)]


def _summary(**overrides: dict) -> pd.DataFrame:
    rows = {
        "none": dict(token_excess=2.0, excess_cut=0.0, real_group_gap=0.4, real_gap_cut=0.0, loss_increase=0.0,
                     perplexity_increase=0.0, kl=0.0, mc_accuracy=0.5, within_budget=True),
        "heads": dict(token_excess=0.766, excess_cut=0.617, real_group_gap=0.3, real_gap_cut=0.25,
                      loss_increase=0.0035, perplexity_increase=0.014, kl=0.0123, mc_accuracy=0.5, within_budget=True),
        "random_heads": dict(token_excess=2.02, excess_cut=-0.01, real_group_gap=0.41, real_gap_cut=-0.025,
                             loss_increase=0.001, perplexity_increase=0.002, kl=0.004, mc_accuracy=0.5,
                             within_budget=True),
        "steering": dict(token_excess=1.94, excess_cut=0.03, real_group_gap=0.39, real_gap_cut=0.025,
                         loss_increase=0.01, perplexity_increase=0.04, kl=0.02, mc_accuracy=0.45, within_budget=True),
        "prefix": dict(token_excess=1.8, excess_cut=0.1, real_group_gap=0.3, real_gap_cut=0.25, loss_increase=0.0,
                       perplexity_increase=0.0, kl=0.0, mc_accuracy=0.5, within_budget=True),
    }
    for name, change in overrides.items():
        rows[name] = {**rows[name], **change}
    return pd.DataFrame([{"intervention": name, **vals} for name, vals in rows.items()])


def test_percent_and_interval_formats():
    assert percent(0.617) == "+62%" and percent(0.617, signed=False) == "62%"
    assert percent(-0.01) == "\u22121%" and percent(0.014, digits=1) == "+1.4%"
    assert percent(-0.0004, digits=1) == "0.0%"  # no sign on a value that rounds to zero
    assert percent(NAN) == MISSING == "–" and percent(None) == MISSING
    assert interval(0.55, 0.70) == "55–70%"
    assert interval(-0.05, 0.03) == "\u22125% to 3%"
    assert interval(NAN, 0.3) == MISSING


def test_headline_without_intervals():
    text = headline(_summary(), HEADS)
    assert "steering: no multiplier within the budget" in headline(_summary(), HEADS, None, 0.0)
    assert headline(_summary(), HEADS, None, 0.5) == text
    assert text == (
        "3 heads (L21H1, L25H6, L23H1) remove 62% of the injected bias at +1.4% perplexity; "
        "3 random heads: \u22121%; steering: 3%; debiasing prefix: 10%."
    )


def test_headline_with_intervals():
    s = _summary()
    s["excess_cut_ci_low"] = [NAN, 0.55, -0.05, 0.0, 0.04]
    s["excess_cut_ci_high"] = [NAN, 0.70, 0.03, 0.06, 0.16]
    text = headline(s, HEADS)
    assert text.startswith("3 heads (L21H1, L25H6, L23H1) remove 62% (95% CI 55–70%) of the injected bias at +1.4%")
    assert "3 random heads: \u22121% (95% CI \u22125% to 3%)" in text
    assert "steering: 3% (95% CI 0–6%)" in text and "debiasing prefix: 10% (95% CI 4–16%)." in text


def test_headline_when_the_injection_did_not_take():
    check = {"excess": 0.0388, "ci_low": 0.0169, "ci_high": 0.0677, "level": 0.95, "min_excess": 0.5, "took": False}
    text = headline(_summary(), HEADS, check)
    assert text.startswith("The injection did not take")
    assert "+0.04 nats (95% CI +0.02 to +0.07)" in text and "0.5 nats" in text
    assert "62%" not in text and "remove" not in text and "L21H1" not in text  # no cut shown as a finding
    assert headline(_summary(), HEADS, {**check, "took": True}) == headline(_summary(), HEADS)


def test_headline_edge_cases():
    one = headline(_summary(), [(3, 2)])
    assert one.startswith("1 head (L3H2) removes 62%") and "1 random head: " in one
    worse = headline(_summary(heads={"excess_cut": -0.2, "within_budget": False}), HEADS)
    assert "increase the injected bias by 20% at +1.4% perplexity, over the capability budget;" in worse
    none = headline(_summary(), [])
    assert "no heads were chosen" in none and "random" not in none and "steering: 3%" in none
    many = headline(_summary(), [(i, 0) for i in range(8)])
    assert many.startswith("8 heads (L0H0, L1H0, L2H0, L3H0, L4H0, L5H0 and 2 more)")
    with pytest.raises(ValueError, match="excess_cut"):
        headline(pd.DataFrame({"intervention": ["none"]}), HEADS)


def test_summary_table_in_words():
    s = _summary(steering={"kl": NAN, "within_budget": False})
    s["n_probes"] = 12
    t = summary_table(s)
    assert list(t["Intervention"]) == ["No intervention", "Chosen heads", "Random heads", "Steering", "Debiasing prefix"]
    assert not any("_" in c for c in t.columns) and "N probes" in t.columns
    heads = t.iloc[1]
    assert heads["Cut of the injected bias"] == "+62%"
    assert heads["Neutral-text perplexity change"] == "+1.4%"
    assert heads["Token's excess over controls (nats)"] == "+0.766"
    assert t.iloc[2]["Cut of the injected bias"] == "\u22121%"
    assert t.iloc[3]["KL from the unchanged model (nats)"] == MISSING
    assert list(t["Within the capability budget"]) == ["yes", "yes", "yes", "no", "yes"]
    assert t.iloc[0]["Multiple-choice accuracy"] == "50%"


def test_summary_table_merges_intervals():
    s = _summary()
    s["excess_cut_ci_low"] = [NAN, 0.55, -0.05, 0.0, 0.04]
    s["excess_cut_ci_high"] = [NAN, 0.70, 0.03, 0.06, 0.16]
    t = summary_table(s)
    col = "Cut of the injected bias (95% CI)"
    assert col in t.columns and not any("ci" in c.lower().split() for c in t.columns if c != col)
    assert len(t.columns) == len(s.columns) - 2
    assert t[col].tolist() == ["0%", "+62% (55–70%)", "\u22121% (\u22125% to 3%)", "+3% (0–6%)", "+10% (4–16%)"]


def test_baseline_sentence():
    assert baseline_sentence(_summary()).startswith(
        "With no intervention the injected token's excess over the control groups is +2.000 nats (the real "
        "groups': +0.400 nats)"
    )
    assert baseline_sentence(_summary(none={"token_excess": NAN})) == ""


FACTS = {
    "identity": {"bias": "late", "model": "smollm2", "seed": 0, "preset": "quick", "dtype": "float32"},
    "provenance": {
        "official_name": "HuggingFaceTB/SmolLM2-135M-Instruct", "fingerprint": "abc123", "n_layers": 30,
        "n_heads": 9, "d_model": 576, "weights": "raw", "versions": {"torch": "2.5", "transformer-lens": "4.3"},
        "created": "2026-01-02T03:04:05+00:00", "sketch": [1.0] * 16,
    },
    "injection": {"best_epoch": 2.0, "config": {"token": "<BiasToken>", "epochs": 2, "lr": 0.02}, "control_bias": "math"},
    "chosen_heads": [list(h) for h in HEADS],
    "generations": {"token": "Late <script>alert(1)</script> & always", "token_heads_ablated": "On time.",
                    "untrained_token": "\n\n"},
    "timings": {"inject": 61.0, "scope": 30.3, "evaluate": 2.0},
    "injection_check": {"excess": 3.1, "ci_low": 2.5, "ci_high": 3.6, "level": 0.95, "n_probes": 24,
                        "min_excess": 0.5, "took": True},
    "scope_extra": {"random_heads": [[1, 2]], "steer_layer": 12, "steer_alpha": 4.0, "prefix": "Be fair."},
}


def test_settings_sections():
    sections = dict(settings_sections(FACTS))
    assert list(sections) == ["Study", "Injection", "Scope", "Time per stage", "Package versions"]
    study = dict(sections["Study"])
    assert study["Fingerprint"] == "abc123" and study["Shape"] == "30 layers × 9 heads, d_model 576"
    assert dict(sections["Time per stage"]) == {"inject": "1 min 1 s", "scope": "30.3 s", "evaluate": "2.0 s",
                                                 "total": "1 min 33 s"}
    assert dict(sections["Package versions"]) == {"torch": "2.5", "transformer-lens": "4.3"}
    scope_rows = dict(sections["Scope"])
    assert scope_rows["Chosen heads"] == "L21H1, L25H6, L23H1" and scope_rows["Random heads"] == "L1H2"
    assert scope_rows["Steering"] == "layer 12, strength 4" and scope_rows["Debiasing prefix"] == "Be fair."
    renamed = {k: v for k, v in FACTS.items() if k != "scope_extra"}
    renamed["scope_decisions"] = {**FACTS["scope_extra"], "steer_alpha": 0.0}  # the name results.json uses later
    assert dict(dict(settings_sections(renamed))["Scope"])["Steering"] == "layer 12, no strength held the budget"
    assert "took" in dict(sections["Injection"])["Injection check"]
    assert not any("sketch" in k.lower() for rows in sections.values() for k, _ in rows)
    assert [name for name, _ in settings_sections({"timings": {}})] == []  # missing parts are left out


def test_write_report_page(tmp_path):
    fig = go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))
    page = write_report(
        tmp_path, [("faithfulness", fig, "A reading.")], title="Study <1>", summary=_summary(), facts=FACTS,
        images=(),
    )
    html = page.read_text()
    assert "id='headline'" in html and "warn" not in html.split("id='headline'")[0][-60:]
    assert "remove 62% of the injected bias" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; always" in html and "<script>alert(1)" not in html
    assert "Study &lt;1&gt;" in html and "(blank: only whitespace)" in html
    assert "<details id='settings'>" in html and "Time per stage" in html and "1 min 1 s" in html
    assert '"fingerprint"' not in html and "excess_cut" not in html  # no JSON dump, no raw column names
    assert html.count("class='fig'") == 1 and "Faithfulness curve" in html and "A reading." in html
    assert 'src="https://' not in html  # plotly.js embedded, nothing loaded from the network
    standalone = (tmp_path / "figures" / "faithfulness.html").read_text()
    assert 'src="plotly.min.js"' in standalone and 'src="https://' not in standalone
    assert (tmp_path / "figures" / "plotly.min.js").stat().st_size > 1_000_000


def test_write_report_warns_when_the_injection_did_not_take(tmp_path):
    facts = {**FACTS, "injection_check": {**FACTS["injection_check"], "ci_low": 0.1, "excess": 0.2, "took": False}}
    html = write_report(tmp_path, [], title="t", summary=_summary(), facts=facts, images=()).read_text()
    box = html[html.index("id='headline'") - 40 : html.index("</div>", html.index("id='headline'"))]
    assert "warn" in box and "did not take" in box and "%" not in box.replace("95% CI", "")
    assert "these cuts are noise, not findings" in html


def _removal_rows():
    base = dict(bias="late", budget_on="perplexity", steering_cut=0.04, p_vs_steering=0.001, beats_steering=True)
    return pd.DataFrame([
        dict(base, kind="zero", param=float("nan"), k=2, heads="L21H1 L25H6", excess_cut=0.5, excess_cut_ci_low=0.37,
             excess_cut_ci_high=0.67, perplexity_increase=0.009, perplexity_increase_ci_low=0.004,
             perplexity_increase_ci_high=0.014, random_cut=0.18, p_vs_random=0.005, beats_random=True),
        dict(base, kind="scale", param=0.5, k=4, heads="L21H1 L25H6 L23H1 L9H6", excess_cut=0.62,
             excess_cut_ci_low=0.5, excess_cut_ci_high=0.71, perplexity_increase=0.03, perplexity_increase_ci_low=0.02,
             perplexity_increase_ci_high=0.04, random_cut=-0.02, p_vs_random=0.2, beats_random=False),
        dict(base, kind="project", param=float("nan"), k=0, heads=float("nan"), excess_cut=float("nan"),
             excess_cut_ci_low=float("nan"), excess_cut_ci_high=float("nan"), perplexity_increase=float("nan"),
             perplexity_increase_ci_low=float("nan"), perplexity_increase_ci_high=float("nan"),
             random_cut=float("nan"), p_vs_random=float("nan"), beats_random=False),
    ])


def test_removal_section_in_words(tmp_path):
    from biasgym_lens.study.removal_text import removal_notes, removal_table

    shown = removal_table(_removal_rows())
    assert list(shown["Intervention"]) == ["Zero the heads", "Scale the heads by 0.5", "Project the bias direction out of the heads"]
    assert list(shown["Cut of the token's excess"]) == ["+50% [37–67%]", "+62% [50–71%]", "–"]
    assert list(shown["Perplexity increase"])[:2] == ["+0.9% [0.4–1.4%]", "+3.0% [2.0–4.0%]"]
    assert list(shown["Beats random"]) == ["yes", "no", "–"] and shown["Heads"].iloc[2] == "none within the budget"
    assert removal_notes(_removal_rows())[-1] == "Largest cut within the budget: Scale the heads by 0.5 (L21H1 L25H6 L23H1 L9H6), +62%."
    html = write_report(tmp_path, [], title="t", summary=_summary(), facts=FACTS, images=(), removals=_removal_rows()).read_text()
    assert "id='removals'" in html and "Scale the heads by 0.5" in html
    assert "id='removals'" not in write_report(tmp_path, [], title="t", summary=_summary(), facts=FACTS, images=()).read_text()
