"""The type of the models every stage works on.

:data:`Model` is what the package needs of a hooked model, as a runtime-checkable protocol: TransformerLens's
``TransformerBridge`` (4.x) has it, and so would any model with the same hook and config API. Because it is a
protocol, annotating with it imports nothing heavy, and jaxtyping's runtime checks (the test suite runs under
them) refuse an object that is not a model (a tokenizer, a Hugging Face model, a path) where one is expected.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["Model"]


@runtime_checkable
class Model(Protocol):
    """A hooked language model: ``cfg`` (n_layers, n_heads, d_model, ...), its ``tokenizer``, named hook
    points in ``hook_dict``, and forward passes with hooks (``run_with_hooks``)."""

    cfg: Any
    tokenizer: Any
    hook_dict: Any

    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
