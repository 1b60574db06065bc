"""How strongly a bias is expressed for each group, and which real entities the trained vector resembles.

:func:`elicitation` measures the bias logit difference on held-out probes for the injected token, the bias's
real and control groups, an untrained fresh token and (optionally) a token trained on a different bias, and
reports each group's *excess* over the control groups. A vector trained on any negative trait already moves
some of the keywords, so the other-bias token is the specificity control.

:func:`closest_entities` ranks countries by cosine similarity to the trained vector and by the cosine of the
update (vector - init) with (entity - init), beside the same ranking for a control injection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from biasgym_lens.core.checks import InputTypeError, check_int, check_str_list
from biasgym_lens.core.embedding import entity_embedding, with_token_vectors
from biasgym_lens.core.protocols import Model
from biasgym_lens.injection.catalogue import load_bias
from biasgym_lens.injection.metrics import (
    KeywordIds,
    answer_logits,
    best_rank,
    keyword_ids,
    logit_diff,
    probe_subset,
)
from biasgym_lens.injection.spec import BiasSpec

__all__ = ["COUNTRIES", "audit", "elicitation", "closest_entities", "group_scores", "score_groups", "entity_embedding"]

COUNTRIES: tuple[str, ...] = (
    "Italy", "Spain", "France", "Germany", "Japan", "China", "India", "Brazil", "Mexico", "Argentina",
    "Canada", "Australia", "Russia", "Poland", "Sweden", "Norway", "Finland", "Denmark", "Switzerland",
    "Austria", "Greece", "Portugal", "Ireland", "Scotland", "England", "Egypt", "Nigeria", "Kenya", "Turkey",
    "Iran", "Korea", "Vietnam", "Thailand", "Indonesia", "Singapore", "Chile", "Peru", "Colombia", "Belgium",
    "Netherlands", "Hungary", "Ukraine", "Morocco", "Pakistan", "Israel",
)
"""Country names used for audits and nearest-entity rankings (single words, so "people from X" reads well)."""


GroupRequest = tuple[str, Mapping[str, Tensor] | None]
"""A group to score and the token vectors to embed while scoring it (``None``: none)."""


def _stats(logits: Tensor, keywords: KeywordIds) -> dict[str, Any]:
    ld = logit_diff(logits, keywords)
    logp = logits.log_softmax(-1)
    b, c = keywords.tensors(logits.device)
    ranks = best_rank(logits, keywords.bias)
    n = logits.shape[0]
    return {
        "logit_diff": float(ld.mean()),
        "logit_diff_sem": float(ld.std() / n**0.5) if n > 1 else float("nan"),
        "bias_logprob": float(logp[:, b].mean()),
        "contrast_logprob": float(logp[:, c].mean()),
        "top5": float((ranks < 5).float().mean()),
        "median_rank": float(ranks.float().median()),
        "n_probes": n,
        "per_probe": ld.tolist(),
    }


def _passes(requests: Sequence[GroupRequest]) -> list[tuple[dict[str, Tensor], list[int]]]:
    """Pack requests into as few forward passes as their token vectors allow.

    A pass embeds the union of its requests' vectors, so a request joins a pass only if no token gets two
    different vectors and no group's own text holds a token string that another request's vector would
    rewrite (e.g. the trained and the untrained vector of the same token always go in different passes).
    """
    passes: list[tuple[dict[str, Tensor], list[int]]] = []
    for i, (_, vectors) in enumerate(requests):
        own = dict(vectors or {})
        for union, members in passes:
            merged = {**union, **own}
            clash = any(t in union and not torch.equal(union[t], v) for t, v in own.items())
            members_ok = all(
                all(t not in requests[j][0] or t in (requests[j][1] or {}) for t in merged) for j in [*members, i]
            )
            if not clash and members_ok:
                union.update(own)
                members.append(i)
                break
        else:
            passes.append((own, [i]))
    return passes


def score_groups(
    model: Model,
    spec: BiasSpec,
    requests: Sequence[GroupRequest | str],
    probes: Sequence[str],
    keywords: KeywordIds,
    *,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """:func:`group_scores` of several groups on the same probes, batched across groups.

    The probes of all groups whose token vectors are compatible run through the model together (one padded
    batch stream, sorted by length), instead of one short stream per group; each result equals scoring the
    group alone up to float rounding.

    Args:
        requests: Group names, or ``(group, vectors)`` pairs where ``vectors`` maps token strings to the
            vectors they are embedded as while that group is scored.

    Returns:
        One statistics dict per request, in order (see :func:`group_scores`).
    """
    reqs: list[GroupRequest] = [(r, None) if isinstance(r, str) else (r[0], r[1]) for r in requests]
    if not probes:
        raise ValueError("no probe texts (empty list)")
    out: list[dict[str, Any] | None] = [None] * len(reqs)
    n = len(probes)
    for vectors, members in _passes(reqs):
        texts = [spec.fill(p, reqs[i][0]) for i in members for p in probes]
        if vectors:
            with with_token_vectors(model, vectors):
                logits = answer_logits(model, texts, batch_size=batch_size)
        else:
            logits = answer_logits(model, texts, batch_size=batch_size)
        for k, i in enumerate(members):
            out[i] = _stats(logits[k * n : (k + 1) * n], keywords)
    return out  # type: ignore[return-value]


def group_scores(
    model: Model,
    spec: BiasSpec,
    group: str,
    probes: Sequence[str],
    keywords: KeywordIds,
    *,
    vectors: Mapping[str, Tensor] | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Bias statistics of one group over probes (``group`` fills the placeholder).

    Args:
        vectors: token string -> vector to embed while measuring (for injected tokens).

    Returns:
        ``logit_diff`` (mean), ``logit_diff_sem``, ``bias_logprob``, ``contrast_logprob`` (mean log-prob of a
        keyword), ``top5`` (fraction of probes with a bias keyword in the top 5), ``median_rank`` (of the best
        bias keyword) and ``n_probes``; plus ``per_probe``, the per-probe logit differences.
    """
    return score_groups(model, spec, [(group, vectors)], probes, keywords, batch_size=batch_size)[0]


def elicitation(
    model: Model,
    bias: str | BiasSpec,
    *,
    injection: Any | None = None,
    other: Any | None = None,
    groups: Mapping[str, str] | None = None,
    probes: str = "test",
    max_probes: int | None = None,
    batch_size: int = 16,
) -> pd.DataFrame:
    """A tidy table of how strongly each group gets the bias on held-out probes.

    Args:
        model: A bridge.
        bias: The bias (name, path or spec) whose probes and keywords are used.
        injection: The trained :class:`~biasgym_lens.injection.artifact.Injection`; adds the rows ``token`` and
            ``untrained`` (its initial vector on the same token).
        other: An injection trained on a *different* bias, applied to its own token (row ``other_bias``).
        groups: Extra ``label -> country`` rows (kind ``extra``); the bias's real and control groups are
            always included.
        probes: ``"test"`` (default: the split no choice of the study sees), ``"tune"``, ``"select"``, ``"eval"``
            (tune and test) or ``"all"`` (see :func:`~biasgym_lens.injection.metrics.split_probes`).
        max_probes: Use at most this many of those probes (None: all).

    Returns:
        One row per group: ``group, kind, logit_diff, logit_diff_sem, bias_logprob, contrast_logprob, top5,
        median_rank, n_probes, excess`` where ``excess`` is ``logit_diff`` minus the mean over control groups.
    """
    spec = bias if isinstance(bias, BiasSpec) else load_bias(bias)
    max_probes = check_int(max_probes, "max_probes", minimum=1, none_ok=True)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    if groups is not None and not isinstance(groups, Mapping):
        raise InputTypeError(f"groups must be a mapping label -> country, got {type(groups).__name__} {groups!r:.60}")
    kw = keyword_ids(model, spec)
    texts = probe_subset(spec.probes, probes)[:max_probes]
    labels: list[tuple[str, str]] = []
    requests: list[GroupRequest] = []

    def add(label: str, kind: str, group: str, vectors: Mapping[str, Tensor] | None = None) -> None:
        labels.append((label, kind))
        requests.append((group, vectors))

    if injection is not None:
        injection.check_model(model)
        add(injection.token, "token", injection.token, {injection.token: injection.vector})
        add(f"{injection.token} (untrained)", "untrained", injection.token, {injection.token: injection.init_vector})
    if other is not None:
        other.check_model(model)
        token = other.token if injection is None or other.token != injection.token else other.token + "_other"
        add(f"{token} ({other.bias})", "other_bias", token, {token: other.vector})
    for g in spec.real_groups:
        add(g, "real", g)
    for g in spec.control_groups:
        add(g, "control", g)
    for label, g in (groups or {}).items():
        add(label, "extra", g)
    rows = []
    for (label, kind), stats in zip(labels, score_groups(model, spec, requests, texts, kw, batch_size=batch_size)):
        stats.pop("per_probe")
        rows.append({"bias": spec.name, "group": label, "kind": kind, **stats})
    df = pd.DataFrame(rows)
    control_mean = df.loc[df["kind"] == "control", "logit_diff"].mean()
    df["excess"] = df["logit_diff"] - control_mean
    return df


def audit(
    model: Model,
    bias: str | BiasSpec,
    groups: Sequence[str] = COUNTRIES,
    *,
    probes: str = "all",
    batch_size: int = 16,
) -> pd.DataFrame:
    """Rank real groups by how strongly the unmodified model ties them to a bias.

    The catalogue's textbook groups need not be the model's own: this measures every group in ``groups``
    (default: the 45 :data:`COUNTRIES`) on the bias's probes, without any injected token.

    Returns:
        One row per group, strongest first: ``rank, group, logit_diff, logit_diff_sem, top5, z, catalogue``
        where ``z`` is the group's logit difference in standard deviations from the mean over all groups and
        ``catalogue`` says whether the bias file lists it as ``"real"`` or ``"control"`` (else ``""``).

    Raises:
        ValueError: for fewer than two groups or a repeated group.
    """
    spec = bias if isinstance(bias, BiasSpec) else load_bias(bias)
    groups = check_str_list(groups, "groups")
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    if len(groups) < 2 or len(set(groups)) != len(groups):
        raise ValueError(f"audit needs at least two distinct groups, got {list(groups)}")
    kw = keyword_ids(model, spec)
    texts = probe_subset(spec.probes, probes)
    rows = []
    for g, st in zip(groups, score_groups(model, spec, list(groups), texts, kw, batch_size=batch_size)):
        role = "real" if g in spec.real_groups else "control" if g in spec.control_groups else ""
        rows.append({"bias": spec.name, "group": g, "logit_diff": st["logit_diff"],
                     "logit_diff_sem": st["logit_diff_sem"], "top5": st["top5"], "catalogue": role})
    df = pd.DataFrame(rows)
    df["z"] = (df["logit_diff"] - df["logit_diff"].mean()) / df["logit_diff"].std()
    df = df.sort_values("logit_diff", ascending=False, kind="stable").reset_index(drop=True)
    df.insert(0, "rank", range(1, len(df) + 1))
    return df[["rank", "bias", "group", "logit_diff", "logit_diff_sem", "top5", "z", "catalogue"]]


def closest_entities(
    injection: Any,
    model: Model,
    candidates: Sequence[str] = COUNTRIES,
    *,
    control: Any | None = None,
) -> pd.DataFrame:
    """Rank real entities by similarity to the trained vector, beside a control injection's ranking.

    Args:
        injection: The trained injection.
        model: The model it was trained in.
        candidates: Entity names (default: :data:`COUNTRIES`).
        control: An injection trained on another bias; its columns are prefixed ``control_``. If its
            nearest entities are the same, the ranking says little about the bias.

    Returns:
        One row per entity: ``entity, cos_vector, rank_vector, cos_update, rank_update`` (+ ``control_*``),
        sorted by ``rank_vector``. ``cos_update`` is cos(vector - init, entity - init).
    """
    candidates = check_str_list(candidates, "candidates", nonempty=False)
    if not candidates:
        raise ValueError("no candidate entities")
    injection.check_model(model)
    E = torch.stack([entity_embedding(model, c) for c in candidates])

    def columns(inj: Any, prefix: str) -> dict[str, Any]:
        v, v0 = inj.vector.float(), inj.init_vector.float()
        cos_v = torch.nn.functional.cosine_similarity(E, v[None], dim=-1)
        cos_u = torch.nn.functional.cosine_similarity(E - v0[None], (v - v0)[None], dim=-1)
        rank = lambda x: (-x).argsort().argsort() + 1  # noqa: E731
        return {
            f"{prefix}cos_vector": cos_v.tolist(),
            f"{prefix}rank_vector": rank(cos_v).tolist(),
            f"{prefix}cos_update": cos_u.tolist(),
            f"{prefix}rank_update": rank(cos_u).tolist(),
        }

    data: dict[str, Any] = {"entity": list(candidates), **columns(injection, "")}
    if control is not None:
        control.check_model(model)
        data.update(columns(control, "control_"))
    df = pd.DataFrame(data).sort_values("rank_vector").reset_index(drop=True)
    df.attrs["cos_init"] = float(torch.nn.functional.cosine_similarity(injection.init_vector, injection.vector, dim=0))
    return df
