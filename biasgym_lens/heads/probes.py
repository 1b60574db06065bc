"""Probe sets: the token-filled and control-filled probes of a bias, tokenized once, with their positions.

A :class:`ProbeSet` is what head scoring and the faithfulness measures run on. Its metric is the bias logit
difference at each probe's answer position; ``excess`` subtracts, probe by probe, the mean over the control
groups of the same probe, so generic effects (every group's keyword logits moving together) cancel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from biasgym_lens.core.checks import check_int, check_str_list
from biasgym_lens.core.protocols import Model
from biasgym_lens.core.tokens import Batch, tokenize
from biasgym_lens.injection.metrics import KeywordIds, keyword_ids, logit_diff, probe_subset
from biasgym_lens.injection.spec import BiasSpec

__all__ = ["ProbeSet", "build_probe_set", "METRICS"]

METRICS = ("excess", "token")


@dataclass(frozen=True)
class ProbeSet:
    """Probes with the injected token (rows ``0..n-1``) followed by the same probes for each control group.

    Attributes:
        spec: The bias.
        token: The injected token string.
        token_id: Its id.
        probes: The probe templates (with the placeholder).
        controls: The control groups, in row order after the token rows.
        batch: All rows, tokenized (right padding, explicit mask).
        keywords: Keyword ids of the bias for this model.
        token_positions: ``[n]`` position of the (first) injected token in each token row.
    """

    spec: BiasSpec
    token: str
    token_id: int
    probes: tuple[str, ...]
    controls: tuple[str, ...]
    batch: Batch
    keywords: KeywordIds
    token_positions: Tensor

    @property
    def n_probes(self) -> int:
        return len(self.probes)

    @property
    def answer_positions(self) -> Tensor:
        return self.batch.last_positions

    def chunks(self, max_tokens: int = 1024) -> list[ProbeSet]:
        """Split into probe sets of consecutive probes (each with its token and control rows) holding at most
        about ``max_tokens`` padded tokens, so a backward pass over one stays small (at least one probe each)."""
        rows_per_probe = 1 + len(self.controls)
        width = int(self.batch.attention_mask.shape[1])
        per = max(1, max_tokens // max(1, rows_per_probe * width))
        return [self.subset(range(i, min(i + per, self.n_probes))) for i in range(0, self.n_probes, per)]

    def length_chunks(self, max_tokens: int = 1024) -> list[tuple[list[int], ProbeSet]]:
        """Like :meth:`chunks`, with less padding: probes of similar length together (each probe's length is
        that of its longest row), each chunk cut to its own longest row (right padding: only padding is cut)
        and holding at most about ``max_tokens`` padded tokens (at least one probe each). Returns each chunk's
        probe indices in this set with the chunk; per-probe results go back to ``indices``."""
        rows_per_probe = 1 + len(self.controls)
        n = self.n_probes
        row_len = self.batch.attention_mask.sum(1).view(rows_per_probe, n)
        length = row_len.max(0).values.tolist()
        out: list[tuple[list[int], ProbeSet]] = []
        current: list[int] = []
        for i in sorted(range(n), key=lambda i: (length[i], i)):
            if current and rows_per_probe * (len(current) + 1) * length[i] > max_tokens:
                out.append((current, self._trimmed(current)))
                current = []
            current.append(i)
        out.append((current, self._trimmed(current)))
        return out

    def _trimmed(self, probes: Sequence[int]) -> ProbeSet:
        """:meth:`subset`, cut to its longest row when padded on the right (:meth:`Batch.trimmed`)."""
        sub = self.subset(probes)
        return replace(sub, batch=sub.batch.trimmed())

    def subset(self, probes: Sequence[int]) -> ProbeSet:
        """The same probe set restricted to the probes at these indices (rows in the same layout)."""
        idx = list(probes)
        n = self.n_probes
        rows = torch.tensor([g * n + i for g in range(1 + len(self.controls)) for i in idx], dtype=torch.long)
        batch = Batch(self.batch.input_ids[rows], self.batch.attention_mask[rows], self.batch.padding_side)
        return ProbeSet(
            self.spec, self.token, self.token_id, tuple(self.probes[i] for i in idx), self.controls, batch,
            self.keywords, self.token_positions[torch.tensor(idx, dtype=torch.long)],
        )

    def metric_per_probe(
        self, logits: Float[Tensor, "rows pos d_vocab"] | Float[Tensor, "rows d_vocab"], metric: str = "excess"
    ) -> Float[Tensor, " n_probes"]:
        """The metric of each probe from the logits of all rows (full logits or already at answer positions)."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if logits.ndim == 3:
            rows = torch.arange(logits.shape[0], device=logits.device)
            logits = logits[rows, self.answer_positions.to(logits.device)]
        return self.per_probe(logit_diff(logits, self.keywords), metric)

    def per_probe(self, per_row: Tensor, metric: str = "excess") -> Tensor:
        """Per-row values ``[rows, ...]`` -> per-probe metric values ``[n_probes, ...]``: the token row's value
        (``"token"``), minus the control groups' mean on the same probe (``"excess"``)."""
        n = self.n_probes
        token = per_row[:n]
        if metric == "token" or not self.controls:
            return token
        return token - einops.reduce(per_row[n:], "(group probe) ... -> probe ...", "mean", group=len(self.controls))


def build_probe_set(
    model: Model,
    spec: BiasSpec,
    token: str,
    *,
    probes: str | Sequence[str] = "select",
    controls: Sequence[str] | None = None,
    max_probes: int | None = None,
) -> ProbeSet:
    """Tokenize a bias's probes for the injected token and for its control groups.

    Args:
        model: A bridge in which ``token`` has been added (e.g. inside ``injection.apply(model)`` or after
            :func:`biasgym_lens.core.embedding.add_token`).
        spec: The bias.
        token: The injected token string.
        probes: ``"select"`` (default: the half used for selection), ``"eval"``, ``"all"``, or templates.
        controls: Control groups (default: the bias's control groups); ``[]`` for the token rows only.
        max_probes: Use at most this many probes.

    Raises:
        InputTypeError: ``controls`` or ``probes`` a single string where a list is expected, ``max_probes`` not an
            integer.
        ValueError: no probes, or a probe without the placeholder, or the token not added to the model.
    """
    from biasgym_lens.core.embedding import token_id

    if isinstance(probes, str):
        templates = probe_subset(spec.probes, probes)
    else:
        templates = tuple(check_str_list(probes, "probes"))
    max_probes = check_int(max_probes, "max_probes", minimum=1, none_ok=True)
    if controls is not None:
        controls = check_str_list(controls, "controls", nonempty=False)
    if max_probes is not None:
        templates = templates[:max_probes]
    if not templates:
        raise ValueError("no probes to run")
    for t in templates:
        if "{group}" not in t:
            raise ValueError(f"probe {t!r} contains no {{group}} placeholder, so it cannot hold the token")
    tid = token_id(model, token)
    ctrl = tuple(spec.control_groups if controls is None else controls)
    texts = [spec.fill(t, token) for t in templates] + [spec.fill(t, g) for g in ctrl for t in templates]
    batch = tokenize(model, texts)
    n = len(templates)
    is_tok = batch.input_ids[:n] == tid
    if not is_tok.any(-1).all():  # pragma: no cover - guarded by the placeholder check
        raise ValueError("a probe row does not contain the injected token")
    token_positions = is_tok.long().argmax(-1)
    return ProbeSet(spec, token, tid, templates, ctrl, batch, keyword_ids(model, spec), token_positions)
