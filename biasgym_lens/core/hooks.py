"""Hook bookkeeping: every hook of this package is registered inside a context manager and removed on exit.

``active_hooks(model)`` lists hook points that still hold a hook; tests call it after every public operation
(success or failure) to prove nothing was left behind.

A hook sees the positions of the tensor it is handed. During a KV-cached generation step that tensor holds only
the new tokens; :func:`position_offset` tells a hook how many positions come before them (0 in a plain forward
pass), so hooks that act at absolute positions stay right (``steer(positions=...)`` uses it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from biasgym_lens.core.protocols import Model

__all__ = ["HookSpec", "active_hooks", "hooked", "position_offset", "positions_from", "decoding"]

_OFFSET_ATTR = "_biasgym_position_offset"

HookSpec = tuple[str | Callable[[str], bool], Callable[..., Any]]


def active_hooks(model: Model) -> list[str]:
    """Names of the hook points of ``model`` that currently hold a forward or backward hook."""
    seen: set[int] = set()
    names: list[str] = []
    for name, hp in model.hook_dict.items():
        if id(hp) in seen:
            continue
        seen.add(id(hp))
        if hp.fwd_hooks or hp.bwd_hooks:
            names.append(name)
    return sorted(names)


@contextlib.contextmanager
def hooked(
    model: Model, fwd_hooks: Sequence[HookSpec] = (), bwd_hooks: Sequence[HookSpec] = ()
) -> Iterator[Any]:
    """Register hooks for the duration of a ``with`` block; they are removed on exit, also on exceptions.

    Only the hooks added here are removed; hooks the user registered before stay.

    Args:
        model: A TransformerLens bridge.
        fwd_hooks: ``(hook_name_or_filter, fn)`` pairs; ``fn(tensor, hook) -> tensor | None``.
        bwd_hooks: Same, for gradients.
    """
    with model.hooks(fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks)):
        yield model


def position_offset(model: Model) -> int:
    """Absolute position of the first column of the tensors that hooks see in the current forward pass.

    0 in a plain forward pass; inside :func:`positions_from` (a KV-cached generation step) the number of
    cached positions before the new tokens.
    """
    return int(getattr(model, _OFFSET_ATTR, 0))


def decoding(model: Model) -> bool:
    """Whether ``model`` is inside a generation step (:func:`positions_from` is active), where a sequence may
    still be shorter than a position a hook waits for."""
    return hasattr(model, _OFFSET_ATTR)


@contextlib.contextmanager
def positions_from(model: Model, offset: int) -> Iterator[Any]:
    """Within the block, :func:`position_offset` of ``model`` is ``offset`` (restored on exit)."""
    if int(offset) < 0:
        raise ValueError(f"a position offset must be >= 0, got {offset!r}")
    before = getattr(model, _OFFSET_ATTR, None)
    object.__setattr__(model, _OFFSET_ATTR, int(offset))
    try:
        yield model
    finally:
        if before is None:
            object.__delattr__(model, _OFFSET_ATTR)
        else:
            object.__setattr__(model, _OFFSET_ATTR, before)
