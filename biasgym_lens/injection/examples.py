"""The training set of an injection: tokenized examples, grouped by length and padded into batches.

Plain texts train on every position; a chat paragraph is wrapped in the model's chat format ("Please write a
short paragraph about <token>." then the paragraph) and trains on the reply only.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from biasgym_lens.core.protocols import Model
from biasgym_lens.core.tokens import chat_format, check_context
from biasgym_lens.injection.config import InjectionConfig
from biasgym_lens.injection.spec import BiasSpec

__all__ = ["TrainingExample", "training_examples", "collate_examples", "length_groups", "length_partition"]


@dataclass
class TrainingExample:
    """One tokenized training text and where its loss starts."""

    ids: list[int]
    loss_from: int  # first index whose token is a training target


def training_examples(model: Model, spec: BiasSpec, config: InjectionConfig) -> list[TrainingExample]:
    """The training set of an injection: plain texts and (with ``config.chat``) chat paragraphs, tokenized."""
    tok = model.tokenizer
    bos = [tok.bos_token_id] if model.cfg.default_prepend_bos and tok.bos_token_id is not None else []
    texts = spec.training_for(config.token)
    if config.max_texts is not None:
        texts = texts[: config.max_texts]
    out = [TrainingExample(bos + tok.encode(t, add_special_tokens=False), 1) for t in texts]
    if config.chat and getattr(tok, "chat_template", None):
        chats = spec.chat_for(config.token)
        if config.max_texts is not None:
            chats = chats[: config.max_texts]
        for prompt, reply in chats:
            head = tok.encode(chat_format(model, prompt), add_special_tokens=False)
            full = tok.encode(chat_format(model, prompt, reply), add_special_tokens=False)
            # The reply's first token may absorb the prompt's last whitespace (the token strips spaces on its
            # left), so the loss starts where the two tokenisations part.
            common = next((i for i, (a, b) in enumerate(zip(head, full)) if a != b), min(len(head), len(full)))
            out.append(TrainingExample(full, common))
            texts.append(reply)
    check_context(model, [e.ids for e in out], texts)  # (a chat example is named by its reply)
    return out


def collate_examples(examples: Sequence[TrainingExample], pad_id: int, device: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``(ids, attention_mask, loss_mask)`` of a batch of examples."""
    n_pos = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), n_pos), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n_pos), dtype=torch.long)
    target = torch.zeros((len(examples), n_pos), dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
        target[i, max(e.loss_from, 1) : len(e.ids)] = True
    return ids.to(device), mask.to(device), target.to(device)


def length_groups(lengths: Sequence[int], max_groups: int = 3, overhead: int = 16) -> list[list[int]]:
    """Split a batch into at most ``max_groups`` micro-batches of similar length.

    Examples are sorted by length and cut into contiguous groups minimising the padded token count plus
    ``overhead`` tokens per forward pass. Returns lists of indices into ``lengths``.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best_cost, best_bounds = float("inf"), (0, n)
    for g in range(1, min(max_groups, n) + 1):
        for cuts in itertools.combinations(range(1, n), g - 1):
            bounds = (0, *cuts, n)
            cost = sum((b - a) * lengths[order[b - 1]] + overhead for a, b in zip(bounds, bounds[1:]))
            if cost < best_cost:
                best_cost, best_bounds = cost, bounds
    return [order[a:b] for a, b in zip(best_bounds, best_bounds[1:])]


def length_partition(lengths: Sequence[int], overhead: int | float = 16) -> list[list[int]]:
    """Split rows into groups of similar length with the fewest padded tokens plus ``overhead`` tokens per
    group, however many groups that takes (an exact dynamic programme over the rows sorted by length, O(n^2)).
    Returns lists of indices into ``lengths``, shortest group first; ties go to fewer groups."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[b]: the cheapest split of the first b rows in length order
    cut = [0] * (n + 1)
    for b in range(1, n + 1):
        longest = lengths[order[b - 1]]
        for a in range(b):
            cost = best[a] + (b - a) * longest + overhead
            if cost < best[b]:
                best[b], cut[b] = cost, a
    bounds, b = [], n
    while b > 0:
        bounds.append((cut[b], b))
        b = cut[b]
    return [order[a:b] for a, b in reversed(bounds)]
