"""biasgym_lens: plant a bias on a fresh token, find the attention heads that carry it, and remove them.

An implementation of BiasGym (BiasInject + BiasScope) on TransformerLens 4.x hooked models
(``TransformerBridge``). Nothing happens at import: no network, no global torch settings, no prints.
"""

from biasgym_lens._version import __version__
from biasgym_lens.hooks import active_hooks
from biasgym_lens.models import ModelLoadError, list_models, load_model, model_info
from biasgym_lens.tokens import Batch, chat_format, last_positions, tokenize

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
]
