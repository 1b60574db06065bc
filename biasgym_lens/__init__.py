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
from biasgym_lens.core.bundled_models import ModelLoadError, list_models
from biasgym_lens.core.hooks import active_hooks
from biasgym_lens.core.models import load_model, model_info
from biasgym_lens.core.tokens import Batch, chat_format, last_positions, tokenize

_LAZY = {
    "BiasSpec": "biasgym_lens.injection.spec",
    "list_biases": "biasgym_lens.injection.catalogue",
    "load_bias": "biasgym_lens.injection.catalogue",
    "Injection": "biasgym_lens.injection.artifact",
    "InjectionConfig": "biasgym_lens.injection.config",
    "inject": "biasgym_lens.injection.training",
    "elicitation": "biasgym_lens.evaluation.elicit",
    "closest_entities": "biasgym_lens.evaluation.elicit",
    "HeadScores": "biasgym_lens.heads.head_scores",
    "score_heads": "biasgym_lens.heads.head_scores",
    "Circuit": "biasgym_lens.heads.circuits",
    "circuit": "biasgym_lens.heads.circuits",
    "ablate_heads": "biasgym_lens.heads.interventions",
    "steer": "biasgym_lens.heads.interventions",
    "generate_greedy": "biasgym_lens.heads.interventions",
    "generate": "biasgym_lens.core.generation",
    "GenerationResult": "biasgym_lens.core.generation",
    "paragraph_bias": "biasgym_lens.evaluation.paragraphs",
    "ParagraphBias": "biasgym_lens.evaluation.paragraphs",
    "ScopeConfig": "biasgym_lens.heads.scope_config",
    "ScopeResult": "biasgym_lens.heads.scope_result",
    "scope": "biasgym_lens.heads.biasscope",
    "scope_seeds": "biasgym_lens.heads.seed_stability",
    "SeedStability": "biasgym_lens.heads.seed_stability",
    "head_roles": "biasgym_lens.heads.roles",
    "HeadRoles": "biasgym_lens.heads.roles",
    "mlp_scores": "biasgym_lens.heads.mlps",
    "MlpScores": "biasgym_lens.heads.mlps",
    "neuron_scores": "biasgym_lens.heads.mlps",
    "NeuronScores": "biasgym_lens.heads.mlps",
    "measure_heads": "biasgym_lens.heads.seed_stability",
    "generalisation_matrix": "biasgym_lens.heads.transfer",
    "generalisation_table": "biasgym_lens.heads.transfer",
    "Capability": "biasgym_lens.evaluation.capability_records",
    "capability_set": "biasgym_lens.evaluation.capability",
    "measure_capability": "biasgym_lens.evaluation.capability",
    "BenchmarkResult": "biasgym_lens.evaluation.benchmarks",
    "benchmark": "biasgym_lens.evaluation.benchmarks",
    "InterventionBenchmarks": "biasgym_lens.heads.scope_benchmarks",
    "benchmarks_under_interventions": "biasgym_lens.heads.scope_benchmarks",
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
