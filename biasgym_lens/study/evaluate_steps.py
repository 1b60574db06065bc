"""The named steps of a study's evaluate stage: the measurements behind its CSV tables and ``results.json``.

:meth:`biasgym_lens.study.pipeline.Study.run_evaluate` runs them in order, then writes the tables and, last,
``results.json`` (its presence marks the stage done).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from biasgym_lens.core.embedding import with_token_vectors
from biasgym_lens.core.files import read_csv, read_json
from biasgym_lens.core.protocols import Model
from biasgym_lens.core.tokens import chat_format
from biasgym_lens.evaluation.elicit import closest_entities, elicitation
from biasgym_lens.evaluation.paragraphs import ParagraphBias, combine_paragraphs, paragraph_bias
from biasgym_lens.heads.circuits import circuit
from biasgym_lens.heads.interventions import Head, ablate_heads, generate_greedy
from biasgym_lens.heads.lens import layer_logit_diff
from biasgym_lens.heads.mlps import mlp_scores, neuron_scores
from biasgym_lens.heads.probes import build_probe_set
from biasgym_lens.heads.roles import HeadRoles, head_roles
from biasgym_lens.heads.scope_result import ScopeResult
from biasgym_lens.injection.training import Injection

logger = logging.getLogger(__name__)

__all__ = [
    "bias_tables", "sample_generations", "study_paragraphs", "paragraph_tables", "role_tables", "read_roles",
    "text_and_role_tables", "scope_tables", "read_injection_check", "results_document", "ROLE_VIEWS",
    "EVALUATE_TABLES", "circuit_tables", "read_circuit_figure", "CIRCUIT_EDGES_KEPT", "CIRCUIT_EDGES_DRAWN",
    "mlp_tables", "read_mlp_figure", "MLP_NEURONS_KEPT",
]


def bias_tables(model: Model, inj: Injection, ctrl: Injection, *, max_probes: int | None) -> dict[str, pd.DataFrame]:
    """Elicitation (against the control injection), the closest entities and the logit lens of the token.

    Returns:
        The tables ``elicitation``, ``closest_entities`` and ``logit_lens``, in that order.
    """
    spec = inj.spec  # the copy stored with the injection: one definition of the bias per study
    elic = elicitation(model, spec, injection=inj, other=ctrl, max_probes=max_probes)
    closest = closest_entities(inj, model, control=ctrl)
    with inj.apply(model):
        ps = build_probe_set(model, spec, inj.token, probes="eval", max_probes=max_probes)
        lens = layer_logit_diff(model, ps)
    return {"elicitation": elic, "closest_entities": closest, "logit_lens": lens}


def sample_generations(model: Model, inj: Injection, chosen: Sequence[Head], max_new_tokens: int) -> dict[str, str]:
    """Greedy paragraphs about the token, for a model with a chat template (``{}`` without one).

    The continuations run as one batch: the trained token (``token``), the same with the chosen heads ablated
    in that row only (``token_heads_ablated``, when heads were chosen), and the untrained vector under a second
    token string (``untrained_token``).
    """
    if not getattr(model.tokenizer, "chat_template", None):
        return {}
    untrained = "<UntrainedCopy>" if inj.token != "<UntrainedCopy>" else "<UntrainedCopy2>"
    variants = [("token", inj.token)]
    variants += [("token_heads_ablated", inj.token)] if chosen else []
    variants += [("untrained_token", untrained)]
    prompts = [chat_format(model, f"Please write a short paragraph about {tok}.") for _, tok in variants]
    inj.check_model(model)
    with contextlib.ExitStack() as stack:
        stack.enter_context(with_token_vectors(model, {inj.token: inj.vector, untrained: inj.init_vector}))
        if chosen:
            stack.enter_context(ablate_heads(model, chosen, rows=[1]))
        outs = generate_greedy(model, prompts, max_new_tokens, prepend_bos=False)
    return {name: text for (name, _), text in zip(variants, outs)}


def study_paragraphs(
    model: Model, inj: Injection, chosen: Sequence[Head], *, n: int, max_new_tokens: int, seed: int
) -> ParagraphBias | None:
    """Bias in generated text: sampled chat paragraphs about the token (``n``) and about the real groups (at
    least ``n`` pooled: ``ceil(n / groups)`` each), with and without the chosen heads zero-ablated, scored by
    the bias's keyword rate (:func:`~biasgym_lens.evaluation.paragraphs.paragraph_bias`; temperature 1, top-p
    0.95, the same seeds under both, so the paragraphs are paired).

    Nothing here chooses anything: the heads were chosen before, on other data. ``None`` for ``n == 0`` or a
    model without a chat template.
    """
    if not n or not getattr(model.tokenizer, "chat_template", None):
        return None
    spec = inj.spec
    interventions = {"none": None} | ({"heads": lambda: ablate_heads(model, list(chosen))} if chosen else {})
    runs = [([inj.token], n), (list(spec.real_groups), math.ceil(n / len(spec.real_groups)))]
    parts = [
        paragraph_bias(
            model, spec, injection=inj, interventions=interventions, groups=groups, n=count,
            max_new_tokens=max_new_tokens, seed=seed,
        )
        for groups, count in runs
    ]
    return combine_paragraphs(*parts)


def paragraph_tables(pb: ParagraphBias | None) -> dict[str, pd.DataFrame]:
    """The tables of :func:`study_paragraphs`: every paragraph with its counts (``paragraphs``), the pooled rate
    per intervention and kind (``paragraph_scores``) and its paired change under the heads
    (``paragraph_changes``); empty tables when no paragraphs were sampled."""
    columns = {
        "paragraphs": ["group", "kind", "intervention", "sample", "text", "n_words", "n_bias", "n_contrast", "score"],
        "paragraph_scores": ["bias", "intervention", "kind", "rate", "ci_low", "ci_high", "n"],
        "paragraph_changes": ["bias", "intervention", "base", "kind", "change", "ci_low", "ci_high", "n"],
    }
    empty = {name: pd.DataFrame(columns=cols) for name, cols in columns.items()}  # a header: the file still reads
    if pb is None:
        return empty
    changes = pb.paired_change("none") if pb.paragraphs["intervention"].nunique() > 1 else empty["paragraph_changes"]
    return {"paragraphs": pb.paragraphs, "paragraph_scores": pb.by_kind(), "paragraph_changes": changes}


ROLE_VIEWS = ("effects", "attention", "attended", "promoted")

EVALUATE_TABLES = (
    "elicitation", "closest_entities", "logit_lens", "summary", "groups", "capability", "curve", "head_scores",
    "agreement", "training_curve", "paragraphs", "paragraph_scores", "paragraph_changes",
    *(f"head_role_{v}" for v in ROLE_VIEWS), "circuit_edges", "circuit_nodes", "mlp_layers", "mlp_neurons",
)
"""The tables the evaluate stage writes, each as ``{name}.csv``."""


def role_tables(model: Model, inj: Injection, chosen: Sequence[Head]) -> dict[str, pd.DataFrame]:
    """What each chosen head does (:func:`~biasgym_lens.heads.roles.head_roles` on the test probes, for the token
    and the real groups): one table per view, ``head_role_{view}``; empty tables (a header) when no head was
    chosen."""
    if not chosen:
        return {f"head_role_{v}": pd.DataFrame(columns=["head", "group", "kind"]) for v in ROLE_VIEWS}
    roles = head_roles(model, inj, chosen, probes="test")
    return {f"head_role_{v}": roles.to_dataframe(v) for v in ROLE_VIEWS}


def read_roles(out: Path, bias: str, chosen: Sequence[Head]) -> HeadRoles | None:
    """The :class:`HeadRoles` that :func:`role_tables` saved in a study folder (``None`` when no head was chosen)."""
    tables = [read_csv(out / f"head_role_{v}.csv", "head-role table") for v in ROLE_VIEWS]
    if not chosen or tables[0].empty:
        return None
    heads = tuple((int(a), int(b)) for a, b in chosen)
    return HeadRoles(bias, heads, attention=tables[1], attended=tables[2], effects=tables[0], promoted=tables[3])


CIRCUIT_EDGES_KEPT = 200  # the strongest edges a study keeps (of ~10^5); the figure draws the top 30
CIRCUIT_EDGES_DRAWN = 30


def circuit_tables(model: Model, inj: Injection, chosen: Sequence[Head]) -> dict[str, pd.DataFrame]:
    """Edge attribution on the select probes (:func:`~biasgym_lens.heads.circuits.circuit`, the chosen heads
    highlighted): the strongest edges (``circuit_edges``) and every node (``circuit_nodes``); empty tables (a
    header) for a model edge attribution does not cover."""
    try:
        circ = circuit(model, inj, CIRCUIT_EDGES_DRAWN, heads=list(chosen))
    except NotImplementedError as e:
        logger.warning("no circuit: %s", e)
        return {"circuit_edges": pd.DataFrame(columns=["upstream", "downstream", "score"]),
                "circuit_nodes": pd.DataFrame(columns=["node", "kind", "layer", "head"])}
    return {"circuit_edges": circ.to_dataframe().head(CIRCUIT_EDGES_KEPT), "circuit_nodes": circ.nodes()}


def read_circuit_figure(out: Path, res: ScopeResult) -> Any:
    """The circuit figure from a study folder's ``circuit_edges.csv`` and ``circuit_nodes.csv`` (``None`` when
    the study has no circuit)."""
    from biasgym_lens.study.circuit_plots import circuit_graph_figure

    edges = read_csv(out / "circuit_edges.csv", "circuit edges")
    if edges.empty:
        return None
    nodes = read_csv(out / "circuit_nodes.csv", "circuit nodes")
    drawn = edges.head(CIRCUIT_EDGES_DRAWN)
    title = f"{res.bias}: the {len(drawn)} strongest edges (edge attribution on the select probes)"
    shape = next(iter(res.scores.values()))
    return circuit_graph_figure(drawn, nodes, n_layers=shape.n_layers, n_heads=shape.n_heads, title=title)


MLP_NEURONS_KEPT = 20  # the strongest neurons a study keeps and draws


def mlp_tables(model: Model, inj: Injection, res: ScopeResult) -> dict[str, pd.DataFrame]:
    """Does the bias live outside attention? Every MLP layer zero-ablated exactly (:func:`~biasgym_lens.heads.mlps.mlp_scores`)
    on the probes and control groups of the study's exact head scan, beside the sum of that layer's exact head
    scores (``mlp_layers``), and the strongest neurons by attribution patching (``mlp_neurons``)."""
    from biasgym_lens.study.mlp_plots import mlp_layers_table

    cfg = res.config
    controls = list(inj.spec.control_groups[: cfg.ablation_controls])
    layers = mlp_scores(model, inj, method="ablation", max_probes=cfg.ablation_probes, controls=controls)
    neurons = neuron_scores(model, inj, max_probes=cfg.ablation_probes, top=MLP_NEURONS_KEPT)
    return {"mlp_layers": mlp_layers_table(layers, res.scores.get("ablation")), "mlp_neurons": neurons.to_dataframe()}


def read_mlp_figure(out: Path) -> Any:
    """The attention-versus-MLP figure from a study folder's ``mlp_layers.csv`` and ``mlp_neurons.csv``."""
    from biasgym_lens.study.mlp_plots import mlp_tables_figure

    layers = read_csv(out / "mlp_layers.csv", "MLP layer scores")
    return mlp_tables_figure(layers, read_csv(out / "mlp_neurons.csv", "MLP neuron scores")) if len(layers) else None


def text_and_role_tables(
    model: Model, inj: Injection, chosen: Sequence[Head], *, n: int, max_new_tokens: int, seed: int
) -> dict[str, pd.DataFrame]:
    """The paragraph tables (:func:`study_paragraphs`, :func:`paragraph_tables`), the head-role tables
    (:func:`role_tables`) and the circuit tables (:func:`circuit_tables`) of the evaluate stage."""
    paragraphs = study_paragraphs(model, inj, chosen, n=n, max_new_tokens=max_new_tokens, seed=seed)
    return {**paragraph_tables(paragraphs), **role_tables(model, inj, chosen), **circuit_tables(model, inj, chosen)}


def scope_tables(inj: Injection, res: ScopeResult) -> dict[str, pd.DataFrame]:
    """The scope result's tables and the injection's training curve, in the order they are written.

    Returns:
        ``summary``, ``groups``, ``capability``, ``curve``, ``head_scores``, ``agreement``, ``training_curve``.
    """
    summary, agreement = res.summary(), res.agreement()
    return {
        "summary": summary, "groups": res.groups, "capability": res.capability, "curve": res.curve.table,
        "head_scores": res.to_dataframe("scores"), "agreement": agreement, "training_curve": inj.to_dataframe(),
    }


def read_injection_check(out: Path) -> Any:
    """The saved ``injection_check.json`` of a study folder, or ``None`` when the folder has none."""
    path = out / "injection_check.json"
    return read_json(path) if path.is_file() else None


def results_document(
    *,
    identity: dict[str, Any],
    inj: Injection,
    ctrl: Injection,
    res: ScopeResult,
    tables: Mapping[str, pd.DataFrame],
    generations: dict[str, str],
    injection_check: Any,
    timings: dict[str, Any],
) -> dict[str, Any]:
    """The contents of ``results.json``: what was studied, the headline tables and the scope's decisions."""
    return {
        "identity": identity,
        "provenance": inj.provenance.to_dict(),
        "injection": {
            "best_epoch": inj.best_epoch,
            "config": asdict(inj.config),
            "control_bias": ctrl.bias,
        },
        "elicitation": tables["elicitation"].to_dict(orient="records"),
        "chosen_heads": [list(h) for h in res.chosen],
        "summary": tables["summary"].to_dict(orient="records"),
        "agreement": tables["agreement"].to_dict(orient="records"),
        "generations": generations,
        "paragraphs": {
            "scores": tables["paragraph_scores"].to_dict(orient="records"),
            "changes": tables["paragraph_changes"].to_dict(orient="records"),
            "examples": tables["paragraphs"].groupby(["kind", "intervention"], sort=False).head(1)
            [["group", "kind", "intervention", "text", "score"]].to_dict(orient="records"),
        },
        "injection_check": injection_check,
        "scope_decisions": res.extra,
        "timings": timings,
    }
