"""Hook bookkeeping: every hook of this package is registered inside a context manager and removed on exit.

``active_hooks(model)`` lists hook points that still hold a hook; tests call it after every public operation
(success or failure) to prove nothing was left behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["HookSpec", "active_hooks", "hooked"]

HookSpec = tuple[str | Callable[[str], bool], Callable[..., Any]]


def active_hooks(model: Any) -> list[str]:
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
    model: Any, fwd_hooks: Sequence[HookSpec] = (), bwd_hooks: Sequence[HookSpec] = ()
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
