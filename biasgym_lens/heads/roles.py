"""What a chosen head does: where it looks from the answer position, and what it writes into the logits.

For each head and each group (the injected token, each real group of the bias) over the same probe templates:

- **attention** from the answer position: the share that lands on the group's tokens, on the first position
  (the usual attention sink), on the answer position itself, and on the rest; and the tokens it attends to
  most (probability summed per token string, averaged over probes);
- **direct effect**: the head's output at the answer position carried straight to the logits (through the
  final norm with its cached scale held fixed, as direct logit attribution does): its effect on the mean
  logit of the bias keywords, of the contrast keywords, their difference, and the tokens it promotes and
  suppresses most.

All of it is read from one cached pass per group (no intervention). The keyword difference equals the head's
direct logit attribution (:func:`~biasgym_lens.heads.decomposition.dla_scores`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import einops
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from biasgym_lens.core.protocols import Model
from biasgym_lens.core.tokens import get_tokenizer, tokenize
from biasgym_lens.core.unembed import cached_activations
from biasgym_lens.heads.decomposition import final_norm_kind, has_post_norms, head_gain, norm_gain
from biasgym_lens.heads.interventions import Head, validate_heads
from biasgym_lens.injection.metrics import keyword_ids, probe_subset

__all__ = ["HeadRoles", "head_roles", "ATTENTION_TARGETS"]

ATTENTION_TARGETS = ("group", "first", "answer", "other")


@dataclass(frozen=True)
class HeadRoles:
    """The roles of a few heads, per group (see the module docstring).

    Attributes:
        bias: The bias.
        heads: The heads described.
        attention: ``head, group, kind, target, prob``: mean attention from the answer position to each target
            (:data:`ATTENTION_TARGETS`; the four sum to 1).
        attended: ``head, group, kind, rank, token, prob``: the most attended tokens.
        effects: ``head, group, kind, bias_logit, contrast_logit, logit_diff``: the direct effect on the mean
            logit of the bias and the contrast keywords (nats, mean over probes).
        promoted: ``head, group, kind, direction, rank, token, logit``: the tokens the head's direct effect
            raises (``"promoted"``) and lowers (``"suppressed"``) most.
    """

    bias: str
    heads: tuple[Head, ...]
    attention: pd.DataFrame
    attended: pd.DataFrame
    effects: pd.DataFrame
    promoted: pd.DataFrame

    def to_dataframe(self, view: str = "effects") -> pd.DataFrame:
        """One of the tables: ``"effects"`` (default), ``"attention"``, ``"attended"`` or ``"promoted"``.

        Raises:
            ValueError: another view name.
        """
        views = {"effects": self.effects, "attention": self.attention, "attended": self.attended, "promoted": self.promoted}
        if view not in views:
            raise ValueError(f"unknown view {view!r}; valid: {', '.join(views)}")
        return views[view].copy()


def group_positions(model: Model, templates: Sequence[str], group: str, fill: Any) -> tuple[Any, list[list[int]]]:
    """Tokenize ``templates`` filled with ``group`` and find, in each row, the positions of the group's tokens
    (those whose characters overlap the first filled placeholder).

    Returns:
        ``(batch, positions)``: the right-padded batch and one list of positions per row.
    """
    texts = [fill(t, group) for t in templates]
    batch = tokenize(model, texts)
    tok = get_tokenizer(model)
    positions = []
    for r, (template, text) in enumerate(zip(templates, texts)):
        start = template.index("{group}")
        span = (start, start + len(group))
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        shift = int(batch.attention_mask[r].sum()) - len(enc["input_ids"])  # a prepended BOS
        pos = [i + shift for i, (a, b) in enumerate(enc["offset_mapping"]) if a < span[1] and b > span[0]]
        if not pos:
            raise ValueError(f"cannot locate {group!r} in the tokens of {text!r}")
        positions.append(pos)
    return batch, positions


def unembed_direct(model: Model, vectors: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_vocab"]:
    """The logits that residual-stream vectors add when the final norm's scale is already divided out: the
    final norm's centring (LayerNorm) and gain (raw weights) applied, then ``W_U`` (no bias)."""
    v = vectors.float()
    if final_norm_kind(model) == "ln":
        v = v - v.mean(-1, keepdim=True)
    if not getattr(model, "_weights_processed", False):
        g = norm_gain(model, model.ln_final)
        if g is not None:
            v = v * g
    return v @ model.W_U.detach().float()


def head_vectors(
    model: Model, cache: Any, heads: Sequence[Head], rows: Int[Tensor, " n"], pos: Int[Tensor, " n"]
) -> Float[Tensor, "head n d_model"]:
    """Each head's output at ``(rows, pos)`` as it enters the residual stream, divided by the final norm's
    cached scale: what the head adds to the normalised final residual."""
    scale = cache["ln_final.hook_scale"][rows, pos].float()  # [n, 1]
    W_O = model.W_O.detach().float()
    out = []
    for layer, h in heads:
        z = cache[f"blocks.{layer}.attn.hook_z"][rows, pos, h].float()
        v = einops.einsum(z, W_O[layer, h], "n d_head, d_head d_model -> n d_model")
        gain = head_gain(model, cache, layer, rows, pos)
        out.append((v * gain if gain is not None else v) / scale)
    return torch.stack(out)


def _cache_names(model: Model, heads: Sequence[Head]) -> set[str]:
    names = {"ln_final.hook_scale"}
    for layer, _ in heads:
        names |= {f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.attn.hook_pattern"}
        if has_post_norms(model):
            names.add(f"blocks.{layer}.ln1_post.hook_scale")
    return names


@torch.no_grad()
def _group_rows(model: Model, spec: Any, heads: Sequence[Head], templates: Sequence[str], group: str, kind: str, top: int) -> dict[str, list[dict[str, Any]]]:
    batch, positions = group_positions(model, templates, group, spec.fill)
    names = _cache_names(model, heads)
    cache = cached_activations(model, batch.input_ids, batch.attention_mask, names)
    n = len(templates)
    rows, answer = torch.arange(n), batch.last_positions
    bias_ids, contrast_ids = keyword_ids(model, spec).tensors(model.W_U.device)
    logits = unembed_direct(model, einops.rearrange(head_vectors(model, cache, heads, rows, answer), "h n d -> (h n) d"))
    logits = einops.rearrange(logits, "(h n) v -> h n v", n=n).mean(1)  # [head, vocab]
    tok = get_tokenizer(model)
    out: dict[str, list[dict[str, Any]]] = {"attention": [], "attended": [], "effects": [], "promoted": []}
    for i, (layer, h) in enumerate(heads):
        key = {"head": f"L{layer}H{h}", "group": group, "kind": kind}
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][rows, h, answer].float()  # [n, pos]
        shares = {t: 0.0 for t in ATTENTION_TARGETS}
        per_token: dict[str, float] = {}
        for r in range(n):
            p, a = pattern[r], int(answer[r])
            g = sum(float(p[j]) for j in positions[r])
            first = float(p[0]) if 0 not in positions[r] else 0.0
            self_share = float(p[a]) if a not in positions[r] and a != 0 else 0.0
            for target, v in zip(ATTENTION_TARGETS, (g, first, self_share, float(p[: a + 1].sum()) - g - first - self_share)):
                shares[target] += v / n
            for j in range(a + 1):
                label = "<group>" if j in positions[r] else tok.decode([int(batch.input_ids[r, j])])
                per_token[label] = per_token.get(label, 0.0) + float(p[j]) / n
        out["attention"] += [{**key, "target": t, "prob": v} for t, v in shares.items()]
        ranked = sorted(per_token.items(), key=lambda kv: -kv[1])[:top]
        out["attended"] += [{**key, "rank": j + 1, "token": t, "prob": v} for j, (t, v) in enumerate(ranked)]
        b, c = float(logits[i, bias_ids].mean()), float(logits[i, contrast_ids].mean())
        out["effects"].append({**key, "bias_logit": b, "contrast_logit": c, "logit_diff": b - c})
        for direction, sign in (("promoted", 1.0), ("suppressed", -1.0)):
            vals, ids = torch.topk(sign * logits[i], top)
            out["promoted"] += [
                {**key, "direction": direction, "rank": j + 1, "token": tok.decode([int(t)]), "logit": sign * float(v)}
                for j, (v, t) in enumerate(zip(vals, ids))
            ]
    return out


def head_roles(
    model: Model,
    injection: Any,
    heads: Sequence[Head],
    *,
    probes: str = "select",
    groups: Sequence[str] | None = None,
    max_probes: int | None = None,
    top: int = 8,
) -> HeadRoles:
    """Where each head attends from the answer position and what it writes into the logits, for the injected
    token and for real groups, over the same probes.

    Args:
        model: The model the injection was trained in.
        injection: An :class:`~biasgym_lens.injection.artifact.Injection` (applied while its token is read).
        heads: ``(layer, head)`` pairs, e.g. a study's chosen heads.
        probes: Probe split (``"select"``, ``"tune"``, ``"test"``, ``"eval"``, ``"all"``).
        groups: Real groups to compare (default: the bias's real groups).
        max_probes: Use at most this many probes.
        top: How many attended, promoted and suppressed tokens to keep.

    Returns:
        A :class:`HeadRoles`.

    Raises:
        ValueError: bad heads (see :func:`~biasgym_lens.heads.interventions.validate_heads`), no heads, an
            unknown probe split, or ``top < 1``.
    """
    hs = validate_heads(model, heads)
    if not hs:
        raise ValueError("heads is empty: give at least one (layer, head) pair")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be an int >= 1, got {top!r}")
    spec = injection.spec
    templates = list(probe_subset(spec.probes, probes))[:max_probes]
    real = list(spec.real_groups if groups is None else groups)
    tables: dict[str, list[dict[str, Any]]] = {"attention": [], "attended": [], "effects": [], "promoted": []}
    with injection.apply(model):
        for group, kind in [(injection.token, "token"), *((g, "real") for g in real)]:
            for name, rows in _group_rows(model, spec, hs, templates, group, kind, top).items():
                tables[name] += rows
    frames = {k: pd.DataFrame(v) for k, v in tables.items()}
    return HeadRoles(spec.name, tuple(hs), frames["attention"], frames["attended"], frames["effects"], frames["promoted"])
