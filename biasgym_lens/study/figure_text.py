"""The words beside a study's figures: each figure's title (:data:`FIGURE_TITLES`) and its one-paragraph reading
(:data:`FIGURE_NOTES`), as the report shows them."""

from __future__ import annotations

__all__ = ["FIGURE_NOTES", "FIGURE_TITLES"]


FIGURE_NOTES: dict[str, str] = {
    "training_curve": (
        "Training loss of the injected token's embedding per step, and its bias logit difference (and excess "
        "over control groups) on the selection probes after each epoch; the dotted line marks the kept epoch."
    ),
    "heads_specific": (
        "Each head's estimated contribution to the token's excess over control groups, minus its estimated "
        "damage to neutral text; red heads carry the bias, and the chosen heads (outlined, numbered in "
        "ranking order) are the top of this ranking."
    ),
    "methods": (
        "The same heads scored four ways: direct logit attribution, attention from the answer to the token, "
        "attribution patching, and exact single-head ablation; the chosen heads are outlined in each."
    ),
    "scatter": (
        "Each dot is a head: its {method} score against its exact ablation effect; the title gives their rank "
        "correlation."
    ),
    "faithfulness": (
        "Token excess and neutral-text cost (on the curve's few passages) after ablating the top k heads of the "
        "ranking (blue), against k random heads (grey band: min to max, dotted: mean); the red dashed line is the "
        "capability budget. The curve runs on the tune probes; the chosen k is the lowest-excess point within "
        "the budget whose cost the tune passages confirm."
    ),
    "circuit": (
        "Edge attribution patching on the select probes: every edge from an earlier component (embedding, head, MLP) "
        "into a later head's query, key or value, an MLP or the logits, scored by its first-order effect on the "
        "token's excess; the 30 strongest are drawn (width: |score|, red raises the bias, blue lowers it; solid "
        "query, dashed key, dotted value) and the chosen heads are gold."
    ),
    "mlp": (
        "Per layer, on the probes of the exact head scan: the effect on the token's excess of zeroing that layer's "
        "MLP (orange) beside the summed exact effects of its heads (blue); right, the MLP neurons with the largest "
        "attribution-patching scores (red raises the bias). A tall orange bar means the bias also lives outside attention."
    ),
    "head_roles": (
        "For each chosen head, on the test probes: where it attends from the answer position (the group's tokens, "
        "the first position, itself, the rest), its direct effect through the unembedding on the bias and contrast "
        "keywords, for the injected token and each real group, and the tokens it promotes most for the token."
    ),
    "interventions": (
        "What each intervention removes on the test probes (the token's excess and the real groups' gap over "
        "the controls) and what it costs on the test passages, with 95% bootstrap intervals as error bars; no "
        "choice of the study saw these probes or passages."
    ),
    "groups": (
        "Bias logit difference on the test probes for the injected token, the real groups and the control "
        "groups, with no intervention and under each intervention (error bars: standard error over the probes)."
    ),
    "closest_entities": (
        "Countries whose embedding is closest to the trained vector, beside the same ranking for a vector "
        "trained on another bias: when both agree, the ranking says little about this bias."
    ),
    "logit_lens": (
        "The bias logit difference read from the residual stream after each layer (through the final norm): "
        "where in depth the token's bias appears."
    ),
    "generalisation": "Cut of each bias's token excess when ablating heads found on another bias.",
}
"""Figure name -> its one-sentence reading (``scatter``: for every ``scatter_<method>_vs_ablation``)."""


FIGURE_TITLES: dict[str, str] = {
    "circuit": "The circuit: strongest edges into and out of the chosen heads",
    "head_roles": "What each chosen head does",
    "mlp": "Attention or MLPs: where the bias lives, layer by layer",
    "training_curve": "Training the injected token",
    "heads_specific": "Head ranking (chosen heads outlined)",
    "methods": "Head scores by method",
    "scatter_attribution_vs_ablation": "Attribution patching against exact ablation",
    "scatter_dla_vs_ablation": "Direct logit attribution against exact ablation",
    "faithfulness": "Faithfulness curve",
    "interventions": "What each intervention removes, with intervals",
    "groups": "Bias per group under each intervention",
    "closest_entities": "Closest countries to the trained vector",
    "logit_lens": "Bias by layer (logit lens)",
    "generalisation": "Heads of one bias on another",
    "seed_stability": "Top-k heads of each injection seed",
}
"""Figure name -> its heading in the report (other names: the name in words)."""
