"""A generation-based bias score: how often sampled paragraphs about a group use the bias's keywords.

For each group (the injected token, the bias's real groups, its control groups) and each named intervention,
the model writes ``n`` sampled paragraphs answering ``"Please write a short paragraph about {group}."`` in its
chat format. A paragraph is scored by counting the words that are a bias keyword or one of its inflections,
minus those that are a contrast keyword or one of its inflections; a group's **rate** pools its paragraphs:
``100 * (sum of bias words - sum of contrast words) / sum of words`` (keyword words per 100 words), with a
percentile bootstrap 95% interval over paragraphs.

Inflections are found by simple stem matching (:func:`keyword_forms`): an adverb keyword in ``-ly`` is reduced
to its adjective (``"dangerously"`` -> ``"dangerous"``) unless it is an adjective itself (``"early"``,
``"friendly"``), then regular endings are added (``-s -er -est -ly -ness -ed -ing`` with the usual spelling
changes: ``"late"`` -> ``"later", "lateness"``; ``"reckless"`` -> ``"recklessly"``; ``"noisy"`` -> ``"noisily"``;
``"hot"`` -> ``"hotter"``; ``"terrible"`` -> ``"terribly"``). It is deliberately simple: it counts ``"kinds"``
for ``"kind"`` and misses irregular forms (``"worse"``).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from biasgym_lens.core.generation import Intervention, generate
from biasgym_lens.core.models import model_info
from biasgym_lens.core.protocols import Model
from biasgym_lens.core.stats import DEFAULT_RESAMPLES, bootstrap_stat
from biasgym_lens.core.tokens import chat_format
from biasgym_lens.injection.catalogue import load_bias
from biasgym_lens.injection.schema import CHAT_PROMPT
from biasgym_lens.injection.spec import BiasSpec

__all__ = ["TextScore", "ParagraphBias", "keyword_forms", "score_text", "paragraph_bias", "combine_paragraphs"]

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")
_LY_ADJECTIVES = frozenset(
    "early friendly lovely lonely likely deadly elderly lively orderly timely costly ugly silly holy only daily "
    "weekly monthly yearly jolly curly chilly smelly".split()
)
_VOWELS = set("aeiou")


def _bases(word: str) -> set[str]:
    """The keyword itself and, for an ``-ly`` adverb or a ``-yed`` verb form, the word it is made from."""
    bases = {word}
    if word.endswith("ly") and word not in _LY_ADJECTIVES and len(word) >= 5:
        if word.endswith("ily"):
            bases.add(word[:-3] + "y")  # noisily -> noisy
        elif word.endswith(("ably", "ibly")):
            bases.add(word[:-1] + "e")  # terribly -> terrible
        else:
            bases.add(word[:-2])  # dangerously -> dangerous, safely -> safe
    if word.endswith("yed") and len(word) >= 5:
        bases.add(word[:-2])  # delayed -> delay
    return bases


def _inflections(base: str) -> set[str]:
    forms = {base, base + "s"}
    if base.endswith("e"):
        forms |= {base + s for s in ("r", "rs", "st", "d", "ly", "ness")} | {base[:-1] + "ing"}
        if base.endswith("le"):
            forms.add(base[:-1] + "y")  # terrible -> terribly
    elif base.endswith("y") and len(base) > 2 and base[-2] not in _VOWELS:
        stem = base[:-1] + "i"  # noisy -> noisier, noisily, noisiness
        forms |= {stem + s for s in ("er", "est", "ly", "ness", "es", "ed")} | {base + "ing"}
    else:
        forms |= {base + s for s in ("es", "er", "ers", "est", "ly", "ness", "ed", "ing")}
        short_cvc = len(base) <= 4 and base[-1] not in _VOWELS | set("wxy") and base[-2] in _VOWELS
        if short_cvc and (len(base) < 3 or base[-3] not in _VOWELS):
            forms |= {base + base[-1] + s for s in ("er", "est", "ed", "ing")}  # hot -> hotter
    return forms


def keyword_forms(keyword: str) -> frozenset[str]:
    """The lower-case words counted for ``keyword`` (its inflections, see the module docstring).

    Raises:
        ValueError: for a keyword that is not a single word.
    """
    word = keyword.strip().lower()
    if not _WORD.fullmatch(word):
        raise ValueError(f"a keyword must be a single word, got {keyword!r}")
    return frozenset(f for b in _bases(word) for f in _inflections(b))


@dataclass(frozen=True)
class TextScore:
    """Keyword counts of one text: ``score = 100 * (n_bias - n_contrast) / n_words`` (0 for no words)."""

    n_words: int
    n_bias: int
    n_contrast: int

    @property
    def score(self) -> float:
        return 100.0 * (self.n_bias - self.n_contrast) / self.n_words if self.n_words else 0.0


def score_text(text: str, bias_keywords: Sequence[str], contrast_keywords: Sequence[str]) -> TextScore:
    """Count the words of ``text`` and how many are forms of a bias or a contrast keyword (case-insensitive)."""
    bias = frozenset().union(*(keyword_forms(k) for k in bias_keywords))
    contrast = frozenset().union(*(keyword_forms(k) for k in contrast_keywords))
    words = [w.lower() for w in _WORD.findall(text)]
    return TextScore(len(words), sum(w in bias for w in words), sum(w in contrast for w in words))


def _pooled_rate(n_bias: np.ndarray, n_contrast: np.ndarray, n_words: np.ndarray) -> float:
    words = n_words.sum()
    return float(100.0 * (n_bias.sum() - n_contrast.sum()) / words) if words > 0 else float("nan")


@dataclass(frozen=True)
class ParagraphBias:
    """Keyword rates of sampled paragraphs per group and intervention.

    Attributes:
        bias: Name of the bias.
        paragraphs: One row per paragraph: ``group, kind, intervention, sample, text, n_words, n_bias,
            n_contrast, score`` (``kind``: ``"token"``, ``"real"`` or ``"control"``).
        settings: How the paragraphs were sampled (``n``, ``max_new_tokens``, ``temperature``, ``top_p``,
            ``seed``, ``model``, ``seconds``...).
        n_resamples: Bootstrap resamples of the intervals.
    """

    bias: str
    paragraphs: pd.DataFrame
    settings: Mapping[str, Any]
    n_resamples: int = DEFAULT_RESAMPLES

    def _pooled(self, keys: list[str]) -> list[dict[str, Any]]:
        """One row per group of ``keys``: the pooled rate with its bootstrap interval over paragraphs, ``n``,
        and the pooled bias and contrast rates and mean words."""
        rows = []
        seed = int(self.settings.get("seed", 0))
        for key, g in self.paragraphs.groupby(keys, sort=False):
            b, c, w = (g[col].to_numpy(float) for col in ("n_bias", "n_contrast", "n_words"))
            iv = bootstrap_stat(_pooled_rate, b, c, w, n_resamples=self.n_resamples, seed=seed)
            words = w.sum()
            rows.append({
                "bias": self.bias, **dict(zip(keys, key)), "rate": iv.value, "ci_low": iv.ci_low,
                "ci_high": iv.ci_high, "n": len(g), "bias_rate": 100 * b.sum() / words if words else float("nan"),
                "contrast_rate": 100 * c.sum() / words if words else float("nan"), "words": w.mean(),
            })
        return rows

    def to_dataframe(self) -> pd.DataFrame:
        """One row per group x intervention: ``rate`` (keyword words per 100 words, bias minus contrast) with
        its 95% ``ci_low``/``ci_high`` over paragraphs, ``n`` paragraphs, ``bias_rate``, ``contrast_rate``,
        ``words`` (mean words per paragraph)."""
        return pd.DataFrame(self._pooled(["intervention", "kind", "group"]))

    def by_kind(self) -> pd.DataFrame:
        """One row per intervention x kind (``token``, ``real``, ``control``), pooling the paragraphs of every
        group of that kind: ``rate`` with its 95% ``ci_low``/``ci_high`` over paragraphs and ``n``."""
        columns = ["bias", "intervention", "kind", "rate", "ci_low", "ci_high", "n"]
        return pd.DataFrame(self._pooled(["intervention", "kind"]), columns=columns)

    def paired_change(self, base: str = "none") -> pd.DataFrame:
        """The change of each kind's pooled rate under every other intervention against ``base``, with a paired
        95% bootstrap interval: the same paragraphs (group and sample, sampled with the same seeds under every
        intervention) are resampled in both. One row per intervention x kind: ``change``, ``ci_low``,
        ``ci_high``, ``n`` pairs.

        Raises:
            ValueError: ``base`` is not one of the interventions.
        """
        table = self.paragraphs
        if base not in set(table["intervention"]):
            raise ValueError(f"base {base!r} is not an intervention here; valid: {sorted(set(table['intervention']))}")
        seed, rows = int(self.settings.get("seed", 0)), []
        key = ["kind", "group", "sample"]
        ref = table[table["intervention"] == base].set_index(key)
        for (interv, kind), g in table[table["intervention"] != base].groupby(["intervention", "kind"], sort=False):
            pair = g.set_index(key).join(ref, rsuffix="_base", how="inner")
            arrays = [pair[c].to_numpy(float) for c in ("n_bias", "n_contrast", "n_words", "n_bias_base", "n_contrast_base", "n_words_base")]
            iv = bootstrap_stat(
                lambda b, c, w, b0, c0, w0: _pooled_rate(b, c, w) - _pooled_rate(b0, c0, w0), *arrays,
                n_resamples=self.n_resamples, seed=seed,
            )
            rows.append({"bias": self.bias, "intervention": interv, "base": base, "kind": kind, "change": iv.value,
                         "ci_low": iv.ci_low, "ci_high": iv.ci_high, "n": len(pair)})
        return pd.DataFrame(rows)

    def rescored(
        self, bias_keywords: Sequence[str], contrast_keywords: Sequence[str] | None = None
    ) -> ParagraphBias:
        """A copy whose paragraphs are counted with other keywords (same texts, no generation).

        ``contrast_keywords`` defaults to the ones used so far.
        """
        contrast = tuple(self.settings["contrast_keywords"] if contrast_keywords is None else contrast_keywords)
        counts = [score_text(t, bias_keywords, contrast) for t in self.paragraphs["text"]]
        table = self.paragraphs.assign(
            n_words=[c.n_words for c in counts], n_bias=[c.n_bias for c in counts],
            n_contrast=[c.n_contrast for c in counts], score=[c.score for c in counts],
        )
        settings = {**self.settings, "bias_keywords": tuple(bias_keywords), "contrast_keywords": contrast}
        return ParagraphBias(self.bias, table, settings, self.n_resamples)

    def examples(self, k: int = 2) -> pd.DataFrame:
        """The first ``k`` paragraphs of every group x intervention, with their counts."""
        cols = ["intervention", "group", "sample", "score", "n_bias", "n_contrast", "n_words", "text"]
        return self.paragraphs.groupby(["intervention", "group"], sort=False).head(k)[cols].reset_index(drop=True)


def _groups(spec: BiasSpec, injection: Any, groups: Sequence[str] | None) -> list[tuple[str, str]]:
    if groups is not None:
        if not groups:
            raise ValueError("groups is empty; pass None for the token, real and control groups")
        token = getattr(injection, "token", None)
        kinds = {g: "real" for g in spec.real_groups} | {g: "control" for g in spec.control_groups}
        return [(g, "token" if g == token else kinds.get(g, "other")) for g in groups]
    out = [(injection.token, "token")] if injection is not None else []
    return out + [(g, "real") for g in spec.real_groups] + [(g, "control") for g in spec.control_groups]


def paragraph_bias(
    model: Model,
    bias: str | BiasSpec,
    *,
    injection: Any = None,
    interventions: Mapping[str, Intervention] | None = None,
    groups: Sequence[str] | None = None,
    n: int = 8,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 0.95,
    seed: int = 0,
    batch_size: int = 32,
    n_resamples: int = DEFAULT_RESAMPLES,
    bias_keywords: Sequence[str] | None = None,
    contrast_keywords: Sequence[str] | None = None,
) -> ParagraphBias:
    """Sample ``n`` paragraphs per group and intervention and score their keyword rates.

    Args:
        model: A bridge with a chat template.
        bias: A catalogue name or a :class:`BiasSpec` (its ``bias_keywords`` and ``contrast_keywords``).
        injection: An :class:`biasgym_lens.injection.artifact.Injection`; applied around every generation, and its token
            string is the first group.
        interventions: Name -> intervention (zero-argument callable returning a context manager, or None);
            default ``{"none": None}``. Every intervention samples with the same seeds (paired paragraphs).
        groups: Group strings (default: the token, the real groups, the control groups).
        n: Paragraphs per group and intervention.
        max_new_tokens: Length of each paragraph in tokens (at most; stops at EOS).
        temperature, top_p, seed: Sampling (see :func:`biasgym_lens.core.generation.generate`).
        batch_size: Prompts per generation stream.
        n_resamples: Bootstrap resamples for the intervals.
        bias_keywords, contrast_keywords: Words to count instead of the spec's (e.g. adding ``"reckless"``,
            which ``bad_driving``'s single-token keywords lack).

    Returns:
        A :class:`ParagraphBias`: ``.to_dataframe()`` per group x intervention, ``.examples()``.

    Raises:
        ValueError: bad ``n`` or ``batch_size``, empty interventions or groups, no chat template.

    Examples:
        >>> pb = paragraph_bias(model, "bad_driving", injection=inj,               # doctest: +SKIP
        ...                     interventions={"none": None, "heads": lambda: ablate_heads(model, heads)})
        >>> pb.to_dataframe()[["intervention", "group", "rate", "ci_low", "ci_high"]]  # doctest: +SKIP
    """
    spec = bias if isinstance(bias, BiasSpec) else load_bias(bias)
    interventions = {"none": None} if interventions is None else dict(interventions)
    if not interventions:
        raise ValueError("interventions is empty; pass None for {'none': None}")
    for name, value in (("n", n), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    bias_kw = tuple(spec.bias_keywords if bias_keywords is None else bias_keywords)
    contrast_kw = tuple(spec.contrast_keywords if contrast_keywords is None else contrast_keywords)
    pairs = _groups(spec, injection, groups)
    prompts = [chat_format(model, CHAT_PROMPT.format(group=g)) for g, _ in pairs for _ in range(n)]
    t0 = time.perf_counter()
    rows = []
    with injection.apply(model) if injection is not None else contextlib.nullcontext():
        for name, intervention in interventions.items():
            texts = _sample(model, prompts, intervention, max_new_tokens, temperature, top_p, seed, batch_size)
            rows += _scored_rows(texts, pairs, n, name, bias_kw, contrast_kw)
    settings = {"n": n, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                "batch_size": batch_size, "model": model_info(model).name, "bias_keywords": bias_kw,
                "contrast_keywords": contrast_kw,
                "seconds": round(time.perf_counter() - t0, 1)}
    return ParagraphBias(spec.name, pd.DataFrame(rows), settings, n_resamples)


def _sample(
    model: Model, prompts: Sequence[str], intervention: Intervention, max_new_tokens: int, temperature: float,
    top_p: float, seed: int, batch_size: int,
) -> list[str]:
    """The paragraphs of ``prompts`` under one intervention, in streams of ``batch_size`` prompts; stream ``k``
    samples with the seed drawn from ``(seed, k)``, so every intervention samples with the same seeds."""
    texts: list[str] = []
    for k, start in enumerate(range(0, len(prompts), batch_size)):
        chunk_seed = int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
        texts += generate(
            model, prompts[start : start + batch_size], max_new_tokens, temperature=temperature,
            top_p=top_p, seed=chunk_seed, intervention=intervention, prepend_bos=False,
        ).texts
    return texts


def _scored_rows(
    texts: Sequence[str], pairs: Sequence[tuple[str, str]], n: int, intervention: str,
    bias_kw: Sequence[str], contrast_kw: Sequence[str],
) -> list[dict[str, Any]]:
    """One row per paragraph (``n`` per group, groups in the order of ``pairs``) with its keyword counts."""
    rows = []
    for i, text in enumerate(texts):
        group, kind = pairs[i // n]
        s = score_text(text, bias_kw, contrast_kw)
        rows.append({"group": group, "kind": kind, "intervention": intervention, "sample": i % n, "text": text,
                     "n_words": s.n_words, "n_bias": s.n_bias, "n_contrast": s.n_contrast, "score": s.score})
    return rows


def combine_paragraphs(*parts: ParagraphBias) -> ParagraphBias:
    """One :class:`ParagraphBias` holding the paragraphs of several runs of the same bias and keywords (e.g. the
    token with ``n`` paragraphs and the real groups with fewer each); ``settings["n"]`` maps each group to its
    number of paragraphs.

    Raises:
        ValueError: no parts, or parts of different biases or keywords.
    """
    if not parts:
        raise ValueError("combine_paragraphs needs at least one ParagraphBias")
    first = parts[0]
    for p in parts[1:]:
        same = (p.bias, p.settings["bias_keywords"], p.settings["contrast_keywords"]) == (
            first.bias, first.settings["bias_keywords"], first.settings["contrast_keywords"])
        if not same:
            raise ValueError(f"cannot combine paragraphs of {first.bias!r} and {p.bias!r} (or of different keywords)")
    n = {str(g): int(p.settings["n"]) for p in parts for g in p.paragraphs["group"].unique()}
    seconds = round(sum(float(p.settings.get("seconds", 0.0)) for p in parts), 1)
    table = pd.concat([p.paragraphs for p in parts], ignore_index=True)
    return ParagraphBias(first.bias, table, {**first.settings, "n": n, "seconds": seconds}, first.n_resamples)
