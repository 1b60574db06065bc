"""Checks of a bias's data beyond the schema: lexical diversity, keyword coverage, single-token keywords.

Example:
    >>> from biasgym_lens.injection.catalogue import load_bias
    >>> from biasgym_lens.injection.data_quality import diversity
    >>> diversity(load_bias("late").training_texts)["distinct_2"] > 0.5  # doctest: +SKIP
    True
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from biasgym_lens.injection.schema import PLACEHOLDER
from biasgym_lens.injection.spec import BiasSpec

__all__ = ["diversity", "keyword_coverage", "check_keywords"]

_WORD_PATTERN = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def _words(text: str) -> list[str]:
    out: list[str] = []
    for i, part in enumerate(text.lower().split(PLACEHOLDER)):
        if i:
            out.append(PLACEHOLDER)
        out.extend(_WORD_PATTERN.findall(part))
    return out


def _distinct(tokenised: list[list[str]], n: int) -> float:
    grams = [tuple(ws[i : i + n]) for ws in tokenised for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def diversity(texts: Iterable[str]) -> dict[str, float]:
    """Measure lexical diversity of a set of texts.

    Words are lowercased runs of letters/digits (apostrophes inside a word kept); the placeholder counts
    as one word. N-grams do not cross text boundaries.

    Args:
        texts: The texts (e.g. ``spec.training_texts``).

    Returns:
        ``{"distinct_1": ..., "distinct_2": ..., "mean_words": ...}``: unique unigrams / all unigrams,
        unique bigrams / all bigrams, and the mean text length in words (all 0.0 for no texts).
    """
    tokenised = [_words(t) for t in texts]
    mean = sum(map(len, tokenised)) / len(tokenised) if tokenised else 0.0
    return {"distinct_1": _distinct(tokenised, 1), "distinct_2": _distinct(tokenised, 2), "mean_words": mean}


def keyword_coverage(spec: BiasSpec) -> dict[str, float]:
    """Fraction of the training texts and chat paragraphs that use a bias keyword, and a contrast keyword.

    Words are matched whole and case-insensitively. Texts that only imply a stereotype teach an injected token
    the topic but not the direction (the contrast keywords rise with the bias keywords), so a useful bias file
    uses its bias keywords often and its contrast keywords rarely.

    Returns:
        ``{"bias": ..., "contrast": ...}``: fractions in [0, 1] over all training texts and chat paragraphs.
    """
    texts = [set(_words(t)) for t in (*spec.training_texts, *spec.chat_paragraphs)]
    if not texts:
        return {"bias": 0.0, "contrast": 0.0}

    def frac(keywords: Sequence[str]) -> float:
        words = {k.strip().lower() for k in keywords}
        return sum(1 for t in texts if t & words) / len(texts)

    return {"bias": frac(spec.bias_keywords), "contrast": frac(spec.contrast_keywords)}


@runtime_checkable
class _Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...  # pragma: no cover


def check_keywords(spec: BiasSpec, tokenizer: _Encoder) -> None:
    """Check that every keyword of ``spec`` is exactly one token for ``tokenizer``.

    Args:
        spec: The bias.
        tokenizer: A Hugging Face style tokenizer (``encode(text, add_special_tokens=False)``).

    Raises:
        ValueError: Naming each keyword that is not a single token, with its token count.
    """
    bad = []
    for kw in spec.bias_keywords + spec.contrast_keywords:
        ids = tokenizer.encode(kw, add_special_tokens=False)
        if len(ids) != 1:
            bad.append(f"{kw!r} ({len(ids)} tokens)")
    if bad:
        raise ValueError(f"{spec.name}: keywords that are not a single token: {', '.join(bad)}")
