"""Fresh tokens whose input embedding lives in a hook, never in the model's weights.

A new token is added to the tokenizer only (its id is ``len(tokenizer)`` or a padded row); the model's
embedding matrix is never resized or written. Two hooks carry the vector instead:

* ``embed.hook_in`` sees the input ids; it records where the new ids are and, when an id has no row in the
  embedding matrix, replaces it by id 0 so the lookup stays valid;
* ``hook_embed`` (``embed.hook_out``) writes ``vector * embed_scale`` at those positions (``embed_scale`` is
  Gemma's sqrt(d_model), 1 elsewhere).

So the model's weights stay bit-identical, tied embeddings are not an issue (the token has no output row to
drift), padded matrices (Pythia, Qwen2) are not shrunk, and removing the hooks removes the token's effect.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from jaxtyping import Float
from tokenizers import AddedToken
from torch import Tensor

from biasgym_lens.core.checks import InputTypeError
from biasgym_lens.core.hooks import HookSpec, hooked
from biasgym_lens.core.protocols import Model

__all__ = [
    "active_token_ids",
    "add_token",
    "added_tokens",
    "check_vector",
    "embed_scale",
    "embedding_rms",
    "entity_embedding",
    "token_id",
    "token_vector_hooks",
    "with_token_vectors",
]

_ADDED_ATTR = "_biasgym_added_tokens"
_IDS_ATTR = "biasgym_token_ids"  # set on the ``embed.hook_in`` hook: the token ids it embeds


def embed_scale(model: Model) -> float:
    """Factor between a row of ``W_E`` and what ``hook_embed`` sees (Gemma: sqrt(d_model); others 1)."""
    comp = getattr(model.embed, "original_component", None)
    s = getattr(comp, "embed_scale", None)
    if s is None:
        return 1.0
    return float(s.item() if isinstance(s, Tensor) else s)


def _added(tokenizer: Any) -> set[str]:
    added = getattr(tokenizer, _ADDED_ATTR, None)
    if added is None:
        added = set()
        setattr(tokenizer, _ADDED_ATTR, added)
    return added


def add_token(model: Model, token: str) -> int:
    """Add ``token`` to the model's tokenizer as a special token (idempotent) and return its id.

    Raises:
        ValueError: if ``token`` is empty, contains whitespace, or is already a token of the vocabulary that
            this package did not add (a fresh token must be new to the model).
    """
    if not isinstance(token, str):
        raise InputTypeError(f"the token must be a non-empty string without whitespace, got {token!r}")
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"the token must be a non-empty string without whitespace, got {token!r}")
    tok = model.tokenizer
    added = _added(tok)
    if token in added:
        return tok.convert_tokens_to_ids(token)
    if token in tok.get_vocab():
        raise ValueError(
            f"token {token!r} already exists in the vocabulary of this model (id {tok.convert_tokens_to_ids(token)}); "
            "a BiasGym token must be new: choose another string, e.g. '<BiasToken>'"
        )
    # lstrip: the token absorbs the space before it, like a word token (" Italy"), instead of leaving a lone
    # space token in front of it.
    new = AddedToken(token, lstrip=True, rstrip=False, normalized=False, special=True)
    tok.add_special_tokens({"additional_special_tokens": [new]}, replace_extra_special_tokens=False)
    new_id = tok.convert_tokens_to_ids(token)
    if tok.encode(token, add_special_tokens=False) != [new_id]:  # pragma: no cover - tokenizer misbehaviour
        raise RuntimeError(f"the tokenizer did not keep {token!r} as one token")
    added.add(token)
    return new_id


def added_tokens(model: Model) -> dict[int, str]:
    """Id -> string of every token :func:`add_token` added to this model's tokenizer (it keeps them)."""
    tok = model.tokenizer
    return {int(tok.convert_tokens_to_ids(t)): t for t in sorted(_added(tok))}


def active_token_ids(model: Model) -> set[int] | None:
    """Ids of added tokens whose vector hooks are registered on ``model`` now, or None if that cannot be told.

    A token is active inside ``with injection.apply(model):``, during :func:`biasgym_lens.injection.training.inject`'s
    training, and after ``apply_permanently`` (until ``model.reset_hooks(including_permanent=True)``). Found by
    reading the hooks registered on ``embed.hook_in`` (TransformerLens keeps each one's callable), so it is
    right whatever removed a hook.
    """
    hook_dict = getattr(model, "hook_dict", None)
    point = hook_dict.get("embed.hook_in") if isinstance(hook_dict, Mapping) else None
    if point is None:
        return None
    ids: set[int] = set()
    for handle in point.fwd_hooks:
        if not hasattr(handle, "user_hook"):  # an older TransformerLens: unknown
            return None
        ids |= getattr(handle.user_hook, _IDS_ATTR, frozenset())
    return ids


def check_vector(model: Model, vector: Any, what: str = "vector") -> None:
    """Check that ``vector`` is a finite floating-point ``[d_model]`` tensor for ``model``.

    Raises:
        InputTypeError: not a floating-point torch tensor.
        ValueError: a shape other than ``(d_model,)``, or NaN/inf entries (the first one is named).
    """
    d_model = model.cfg.d_model
    if not isinstance(vector, Tensor) or not vector.is_floating_point():
        shown = f"a {vector.dtype} tensor" if isinstance(vector, Tensor) else f"{type(vector).__name__} {vector!r:.60}"
        raise InputTypeError(f"{what} must be a floating-point torch tensor of shape ({d_model},), got {shown}")
    if vector.shape != (d_model,):
        raise ValueError(f"{what} has shape {tuple(vector.shape)}, expected ({d_model},) (the model's d_model)")
    bad = ~torch.isfinite(vector.detach())
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{what} has {int(bad.sum())} non-finite values (the first: {float(vector[i])} at index {i}); "
            "it must be finite everywhere"
        )


def token_id(model: Model, token: str) -> int:
    """Id of a token added with :func:`add_token`.

    Raises:
        ValueError: if the token was not added to this model's tokenizer.
    """
    if token not in _added(model.tokenizer):
        raise ValueError(f"token {token!r} has not been added to this model; apply an injection first")
    return model.tokenizer.convert_tokens_to_ids(token)


def token_vector_hooks(model: Model, vectors: Mapping[int, Float[Tensor, " d_model"]]) -> list[HookSpec]:
    """The two hooks that embed each id of ``vectors`` as its vector (in ``W_E`` row units).

    Args:
        model: A bridge.
        vectors: token id -> ``[d_model]`` vector; may require grad (training).
    """
    n_rows = model.W_E.shape[0]
    scale = embed_scale(model)
    d_model = model.cfg.d_model
    for tid, v in vectors.items():
        if not isinstance(v, Tensor) or v.shape != (d_model,):
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"vector for token id {tid} has shape {shape}, expected ({d_model},)")
    taken = sorted(set(vectors) & (active_token_ids(model) or set()))
    if taken:
        names = [added_tokens(model).get(t, str(t)) for t in taken]
        raise ValueError(
            f"token {', '.join(map(repr, names))} already carries a vector on this model (an enclosing "
            "`injection.apply(model)` or a permanent hook); one token takes one vector at a time: give the "
            "inner injection its own token, e.g. `inj.with_token('<BiasToken2>').apply(model)`"
        )
    ids = torch.tensor(sorted(vectors), dtype=torch.long)
    state: dict[str, Tensor] = {}

    def grab_ids(input_ids: Tensor, hook: Any) -> Tensor:
        where = torch.isin(input_ids, ids.to(input_ids.device))
        state["ids"] = input_ids
        state["where"] = where
        if where.any() and int(ids.max()) >= n_rows:
            return torch.where(where, torch.zeros_like(input_ids), input_ids)
        return input_ids

    def write_vectors(x: Tensor, hook: Any) -> Tensor:
        where = state.get("where")
        if where is None or where.shape != x.shape[:2] or not where.any():
            return x
        out = x
        for tid, v in vectors.items():
            m = (state["ids"] == tid).unsqueeze(-1)
            if m.any():
                vec = (v * scale) if scale != 1.0 else v
                out = torch.where(m, vec.to(device=x.device, dtype=x.dtype), out)
        return out

    setattr(grab_ids, _IDS_ATTR, frozenset(int(t) for t in vectors))
    return [("embed.hook_in", grab_ids), ("hook_embed", write_vectors)]


@contextlib.contextmanager
def with_token_vectors(model: Model, vectors: Mapping[str, Float[Tensor, " d_model"]]) -> Iterator[dict[str, int]]:
    """Within the block, each token string (added to the tokenizer if needed) is embedded as its vector.

    Yields:
        token string -> token id.
    """
    by_id: dict[int, Tensor] = {}
    names: dict[str, int] = {}
    for token, v in vectors.items():
        check_vector(model, v, f"the vector of {token!r}")
        tid = add_token(model, token)
        names[token] = tid
        by_id[tid] = v
    with hooked(model, fwd_hooks=token_vector_hooks(model, by_id)):
        yield names


def entity_embedding(model: Model, name: str) -> Tensor:
    """Mean input embedding of the tokens of ``" " + name`` (float32, CPU)."""
    ids = model.tokenizer.encode(" " + name.strip(), add_special_tokens=False)
    W = model.W_E.detach()
    ids = [i for i in ids if i < W.shape[0]]
    if not ids:
        raise ValueError(f"{name!r} has no tokens in this model's embedding")
    return W[ids].float().mean(0).cpu()


def embedding_rms(model: Model) -> float:
    """Root-mean-square norm of the rows of ``W_E`` (a scale for random initialisation)."""
    W = model.W_E.detach().float()
    return float(W.pow(2).sum(-1).mean().sqrt())
