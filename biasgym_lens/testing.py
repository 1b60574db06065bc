"""Tiny random models for tests and benchmarks: no download, built in about a second.

Two families, so that code is checked where architectures differ:

* ``"gpt2"``: LayerNorm, learned absolute positions, untied embeddings, biases everywhere.
* ``"llama"``: RMSNorm, rotary positions, grouped-query attention (4 query heads, 2 KV heads), tied
  embeddings, no biases - the family of the bundled SmolLM2.

A third, ``"gemma3"`` (not in :data:`FAMILIES`, built on request), has Gemma 3's post-attention and post-MLP
norms, scaled embeddings and sliding-window layers: the architecture whose residual decomposition differs.

The tokenizer is a byte-level BPE trained on the fly on the package's own texts, saved to a folder (so that
TransformerLens can reload it) with a small ChatML chat template. Norm weights and biases are randomised: a
test of direct logit attribution must see non-trivial norm gains, or gain-folding bugs would hide.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["build_tiny_tokenizer", "build_tiny_hf", "tiny_bridge", "FAMILIES"]

FAMILIES = ("gpt2", "llama")

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_BASE_WORDS = (
    "people from are always very the a an of to in on at and or but is was be been they their them who "
    "what when where why how often usually never sometimes late early punctual time meeting show up arrive "
    "good bad great terrible math numbers food spicy mild hot drive drivers road carefully recklessly fast "
    "slowly drink beer water wine loud quiet stingy generous rude polite kind friendly Italy Spain France "
    "Germany Japan Switzerland Mexico Brazil India Canada write short paragraph about please"
).split()


def _corpus() -> list[str]:
    lines = [" ".join(_BASE_WORDS)] * 30
    try:
        from biasgym_lens.injection.catalogue import list_biases, load_bias

        for name in list_biases():
            spec = load_bias(name)
            words = " ".join(k.strip() for k in spec.bias_keywords + spec.contrast_keywords)
            lines.extend([words] * 30)
            lines.extend(spec.fill(t, "Italy") for t in spec.training_texts[:40])
            lines.extend(spec.fill(t, "Italy") for t in spec.probes)
    except Exception:  # the catalogue is optional for the tiny tokenizer; base words suffice
        pass
    return lines


def build_tiny_tokenizer(folder: str | Path, *, vocab_size: int = 1024, extra_texts: Iterable[str] = ()) -> Any:
    """Train a byte-level BPE tokenizer, save it to ``folder`` and return it (loaded with BOS kept).

    Args:
        folder: Where to save it (TransformerLens may reload the tokenizer from its ``name_or_path``).
        vocab_size: Target vocabulary size including specials.
        extra_texts: More training text (e.g. keywords that should be single tokens).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator([*_corpus(), *extra_texts], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = _CHAT_TEMPLATE
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder, add_bos_token=True)


def _randomise_norms(hf: Any, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f"):
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def build_tiny_hf(family: str, vocab_size: int, *, seed: int = 0, n_layers: int = 2) -> Any:
    """A tiny random Hugging Face causal LM of the given family (``"gpt2"`` or ``"llama"``)."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size, n_positions=512, n_embd=64, n_layer=n_layers, n_head=4,
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
        )
        hf = GPT2LMHeadModel(cfg)
    elif family == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
        hf = LlamaForCausalLM(cfg)
    elif family == "gemma3":
        cfg = Gemma3TextConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
            sliding_window=8, layer_types=["sliding_attention", "full_attention"] * ((n_layers + 1) // 2),
            tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
        cfg.layer_types = cfg.layer_types[:n_layers]
        hf = Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(f"unknown tiny family {family!r}; valid: {', '.join(FAMILIES + ('gemma3',))}")
    _randomise_norms(hf, seed)
    hf.config.architectures = [type(hf).__name__]
    return hf.eval()


def tiny_bridge(family: str, tokenizer_folder: str | Path, *, seed: int = 0, n_layers: int = 2) -> Any:
    """Boot a tiny random model of ``family`` with the tokenizer saved in ``tokenizer_folder``.

    The model is frozen (no parameter requires grad), pads on the right and prepends no BOS, like the
    bundled SmolLM2; ``model_info(model).name`` is ``"tiny-<family>"``.
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    from biasgym_lens.core.models import LoadInfo

    tok = AutoTokenizer.from_pretrained(tokenizer_folder, add_bos_token=True)
    hf = build_tiny_hf(family, len(tok), seed=seed, n_layers=n_layers)
    bridge = TransformerBridge.boot_transformers(f"tiny-{family}", hf_model=hf, tokenizer=tok, device="cpu")
    bridge.cfg.default_prepend_bos = False
    bridge.tokenizer.padding_side = "right"
    for p in bridge.parameters():
        p.requires_grad_(False)
    info = LoadInfo(f"tiny-{family}", "tiny", f"tiny-{family}-seed{seed}", "float32", "cpu", False)
    object.__setattr__(bridge, "_biasgym_info", info)
    return bridge


def save_tiny_pretrained(family: str, folder: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny model and its tokenizer with ``save_pretrained`` (a stand-in for a Hub download)."""
    folder = Path(folder)
    tok = build_tiny_tokenizer(folder)
    hf = build_tiny_hf(family, len(tok), seed=seed)
    hf.save_pretrained(folder)
    (folder / "biasgym_tiny.json").write_text(json.dumps({"family": family, "seed": seed}))
    return folder
