"""biasgym_lens: plant a bias on a fresh token, find the attention heads that carry it, and remove them.

An implementation of BiasGym (BiasInject + BiasScope) on TransformerLens 4.x hooked models
(``TransformerBridge``). Nothing happens at import: no network, no global torch settings, no prints; the
heavier entry points below are imported lazily on first use.

Examples:
    >>> from biasgym_lens import load_model, inject, score_heads, ablate_heads   # doctest: +SKIP
    >>> model = load_model()                                                    # doctest: +SKIP
    >>> inj = inject(model, "bad_driving")                                      # doctest: +SKIP
    >>> scores = score_heads(model, inj, "attribution")                         # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

from biasgym_lens._version import __version__
from biasgym_lens.hooks import active_hooks
from biasgym_lens.models import ModelLoadError, list_models, load_model, model_info
from biasgym_lens.tokens import Batch, chat_format, last_positions, tokenize

_LAZY = {
    "BiasSpec": "biasgym_lens.catalogue",
    "list_biases": "biasgym_lens.catalogue",
    "load_bias": "biasgym_lens.catalogue",
    "Injection": "biasgym_lens.injection",
    "InjectionConfig": "biasgym_lens.injection",
    "inject": "biasgym_lens.injection",
    "elicitation": "biasgym_lens.elicit",
    "closest_entities": "biasgym_lens.elicit",
    "HeadScores": "biasgym_lens.attribution",
    "score_heads": "biasgym_lens.attribution",
    "ablate_heads": "biasgym_lens.interventions",
    "steer": "biasgym_lens.interventions",
    "generate_greedy": "biasgym_lens.interventions",
    "generate": "biasgym_lens.generation",
    "GenerationResult": "biasgym_lens.generation",
    "paragraph_bias": "biasgym_lens.paragraphs",
    "ParagraphBias": "biasgym_lens.paragraphs",
    "ScopeConfig": "biasgym_lens.study",
    "ScopeResult": "biasgym_lens.study",
    "scope": "biasgym_lens.study",
    "generalisation_matrix": "biasgym_lens.study",
    "generalisation_table": "biasgym_lens.study",
    "BenchmarkResult": "biasgym_lens.benchmarks",
    "benchmark": "biasgym_lens.benchmarks",
}

__all__ = [
    "__version__",
    "Batch",
    "ModelLoadError",
    "active_hooks",
    "chat_format",
    "last_positions",
    "list_models",
    "load_model",
    "model_info",
    "tokenize",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'biasgym_lens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
