"""Tokenization helpers used by every forward pass: padded batches with explicit masks, and chat formatting.

TransformerLens's own string handling builds attention masks only for left padding and applies its own BOS
default, so this package tokenizes with the Hugging Face tokenizer itself and always passes
``attention_mask``. A :class:`Batch` knows the last real position of each row, whatever the padding side.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from biasgym_lens.core.checks import InputTypeError, check_bool, check_choice
from biasgym_lens.core.protocols import Model

__all__ = ["Batch", "tokenize", "check_context", "check_added_tokens", "last_positions", "chat_format", "forward", "get_tokenizer"]


@dataclass(frozen=True)
class Batch:
    """Token ids of several texts, padded to one length, with the mask that says which are real.

    Attributes:
        input_ids: ``[batch, pos]`` token ids (padding filled with the pad id).
        attention_mask: ``[batch, pos]`` 1 for real tokens, 0 for padding.
        padding_side: ``"right"`` or ``"left"``.
    """

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    padding_side: str = "right"

    @property
    def last_positions(self) -> Int[Tensor, " batch"]:
        """Index of the last real token of each row."""
        return last_positions(self.attention_mask)

    @property
    def lengths(self) -> Int[Tensor, " batch"]:
        return self.attention_mask.sum(-1)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        """A copy on another device."""
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.padding_side)

    def select(self, rows: Sequence[int] | Tensor) -> Batch:
        """A batch of some rows (padding columns that became empty are kept)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        return Batch(self.input_ids[idx], self.attention_mask[idx], self.padding_side)

    def trimmed(self) -> Batch:
        """Right padding cut to the longest row (only padding columns go; no real position moves); a left-padded
        batch as it is."""
        if self.padding_side != "right":
            return self
        n_pos = int(self.lengths.max())
        return Batch(self.input_ids[:, :n_pos], self.attention_mask[:, :n_pos], self.padding_side)


def last_positions(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
    """Position of the last real (mask == 1) token in each row; works for left and right padding.

    Raises:
        ValueError: if a row has no real token.
    """
    mask = attention_mask.long()
    if (mask.sum(-1) == 0).any():
        raise ValueError("a row of the attention mask has no real token")
    n_pos = mask.shape[-1]
    return n_pos - 1 - mask.flip(-1).argmax(-1)


def get_tokenizer(model_or_tokenizer: Any) -> Any:
    """The Hugging Face tokenizer of a bridge, or the tokenizer itself."""
    tok = getattr(model_or_tokenizer, "tokenizer", None)
    return tok if tok is not None else model_or_tokenizer


def _prepend_bos_default(model_or_tokenizer: Any) -> bool:
    cfg = getattr(model_or_tokenizer, "cfg", None)
    if cfg is not None:
        return bool(getattr(cfg, "default_prepend_bos", False))
    return False


def tokenize(
    model_or_tokenizer: Any,
    texts: str | Sequence[str],
    *,
    padding_side: str = "right",
    prepend_bos: bool | None = None,
    device: torch.device | str | None = None,
) -> Batch:
    """Tokenize texts into one padded :class:`Batch` with an explicit attention mask.

    Args:
        model_or_tokenizer: A bridge (its tokenizer and ``cfg.default_prepend_bos`` are used) or a tokenizer.
        texts: One text or several; none may be empty unless a BOS token is prepended.
        padding_side: ``"right"`` (default) or ``"left"``.
        prepend_bos: Prepend the tokenizer's BOS token; default: the model's convention
            (``cfg.default_prepend_bos``, set by ``load_model`` to what the Hugging Face tokenizer does).
            Chat-formatted text already carries its own start tokens: pass ``False``.
        device: Where to put the tensors; default the model's device (CPU for a bare tokenizer).

    Returns:
        The batch; ``batch.last_positions`` gives each row's last real token.

    With a model, the rows are also checked against it: none may be longer than its context (``cfg.n_ctx``),
    and none may hold a token added by an injection (``"<BiasToken>"``) unless that injection is applied (the
    tokenizer keeps the added token, but the model has no embedding row for it outside ``injection.apply``).

    Raises:
        InputTypeError: ``texts`` or one of them is not a string (a list of strings), ``prepend_bos`` not a bool.
        ValueError: for an empty list, an empty text, a bad ``padding_side``, a text longer than the model's
            context, or an injected token used outside ``with injection.apply(model):``.
    """
    check_choice(padding_side, "padding_side", ("right", "left"))
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(texts, (bytes, Mapping)) or not isinstance(texts, Iterable):
        raise InputTypeError(f"texts must be a string or a list of strings, got {type(texts).__name__} {texts!r:.60}")
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to tokenize (empty list)")
    tok = get_tokenizer(model_or_tokenizer)
    if prepend_bos is None:
        prepend_bos = _prepend_bos_default(model_or_tokenizer)
    prepend_bos = check_bool(prepend_bos, "prepend_bos")
    rows: list[list[int]] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputTypeError(f"text {i} is a {type(text).__name__} ({text!r:.60}), not a string")
        ids = list(tok.encode(text, add_special_tokens=False))
        if prepend_bos:
            if tok.bos_token_id is None:
                raise ValueError("prepend_bos=True but the tokenizer has no BOS token")
            ids = [tok.bos_token_id, *ids]
        if not ids:
            raise ValueError(f"text {i} ({text!r}) has no tokens: give a non-empty text")
        rows.append(ids)
    if getattr(model_or_tokenizer, "cfg", None) is not None:  # a model, not a bare tokenizer
        check_context(model_or_tokenizer, rows, texts)
        check_added_tokens(model_or_tokenizer, rows, texts)
    n_pos = max(len(r) for r in rows)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), n_pos), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n_pos), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if padding_side == "right" else slice(n_pos - len(r), n_pos)
        input_ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    if device is None:
        cfg = getattr(model_or_tokenizer, "cfg", None)
        device = getattr(cfg, "device", None) or "cpu"
    return Batch(input_ids.to(device), mask.to(device), padding_side)


def _which(i: int, texts: Sequence[str] | None) -> str:
    if not texts:
        return f"row {i}"
    text = texts[i]
    return f"text {i} ({text[:60]!r}{'...' if len(text) > 60 else ''})"


def check_context(
    model: Model, rows: Sequence[Sequence[int]], texts: Sequence[str] | None = None, *, reserve: int = 0
) -> None:
    """Check that no row of token ids, plus ``reserve`` tokens still to come (a generation's new tokens), is
    longer than the model's context (``cfg.n_ctx``).

    Raises:
        ValueError: naming the first row that is too long, its length and the limit.
    """
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    for i, r in enumerate(rows):
        if n_ctx is None or len(r) + reserve <= n_ctx:
            continue
        if reserve:
            raise ValueError(
                f"{_which(i, texts)}: {len(r)} tokens plus max_new_tokens={reserve} exceeds the model's context "
                f"of {n_ctx} tokens (cfg.n_ctx); shorten it or ask for at most {n_ctx - len(r)} new tokens"
            )
        raise ValueError(
            f"{_which(i, texts)} has {len(r)} tokens, more than the model's context of {n_ctx} tokens "
            "(cfg.n_ctx); shorten it"
        )


def check_added_tokens(model: Model, rows: Sequence[Sequence[int]], texts: Sequence[str] | None = None) -> None:
    """Check that no row holds a token added by an injection while no injection embeds it.

    Outside ``with injection.apply(model):`` the tokenizer still knows ``"<BiasToken>"``, but the model has
    no embedding row for it: a forward pass would fail deep inside torch (or, with a padded embedding matrix,
    silently use an untrained row).

    Raises:
        ValueError: naming the first row and the token.
    """
    from biasgym_lens.core.embedding import active_token_ids, added_tokens

    active = active_token_ids(model)
    if active is None:  # cannot be told on this model
        return
    idle = {t: s for t, s in added_tokens(model).items() if t not in active}
    for i, r in enumerate(rows):
        hit = [idle[t] for t in r if t in idle]
        if hit:
            raise ValueError(
                f"{_which(i, texts)} contains {hit[0]!r}, a token added by an injection, but no injection is "
                "applied to it: use it inside `with injection.apply(model):`"
            )


def chat_format(
    model_or_tokenizer: Any,
    user: str,
    assistant: str | None = None,
    *,
    system: str | None = None,
) -> str:
    """Format one exchange with the model's own chat template, as text.

    Args:
        model_or_tokenizer: A bridge or a tokenizer that has a chat template.
        user: The user's message.
        assistant: The reply; when None the text ends with the generation prompt, ready for the model to
            answer; when given, the text ends with the reply (for training on it).
        system: Optional system message. (SmolLM2's template adds its own default one when None.)

    Returns:
        The formatted text; tokenize it with ``prepend_bos=False``.

    Raises:
        ValueError: if the tokenizer has no chat template (a base model): use plain text instead.
    """
    tok = get_tokenizer(model_or_tokenizer)
    if not getattr(tok, "chat_template", None):
        raise ValueError(
            f"the tokenizer of {getattr(tok, 'name_or_path', 'this model')!r} has no chat template "
            "(a base model?); use plain-text prompts instead"
        )
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": user})
    if assistant is None:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(
        [*messages, {"role": "assistant", "content": assistant}], tokenize=False, add_generation_prompt=False
    )
    if not full.startswith(prompt):  # templates that rewrite earlier turns: fall back to prompt + reply
        return prompt + assistant
    return full


def forward(model: Model, batch: Batch) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits of a batch, always with its attention mask (needed for left padding)."""
    return model(batch.input_ids, attention_mask=batch.attention_mask)
