"""Every bad input to the library API is one clear error: the right type, a message that names the bad value,
no hook left on the model, no file touched in the working folder.

Each case is a call that must fail; ``shown`` is a piece of the message that names the bad value (its repr or
the number). Cases run on both tiny families, in a working folder holding some user files that must not change.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from biasgym_lens.core import bundled_models
from biasgym_lens.core.checks import InputTypeError
from biasgym_lens.core.embedding import add_token
from biasgym_lens.core.hooks import active_hooks
from biasgym_lens.core.provenance import Provenance
from biasgym_lens.core.tokens import tokenize
from biasgym_lens.evaluation.capability import capability_set, measure_capability
from biasgym_lens.evaluation.elicit import audit, elicitation
from biasgym_lens.heads.biasscope import scope
from biasgym_lens.heads.head_scores import HeadScores, score_heads
from biasgym_lens.heads.interventions import ablate_heads, generate_greedy, steer
from biasgym_lens.heads.probes import build_probe_set
from biasgym_lens.heads.scope_config import ScopeConfig
from biasgym_lens.injection.artifact import Injection
from biasgym_lens.injection.catalogue import load_bias
from biasgym_lens.injection.config import InjectionConfig
from biasgym_lens.injection.metrics import answer_logits, keyword_ids
from biasgym_lens.injection.spec import BiasSpec
from biasgym_lens.injection.training import inject

NAN, INF = math.nan, math.inf
IDLE = "<IdleToken>"  # added to the tokenizer by a test, never applied: refused outside `apply`

pytestmark = pytest.mark.wrong_types


class Ctx:
    """What a case needs: the model, a made-up (untrained) injection for it, head scores."""

    def __init__(self, model: Any) -> None:
        self.m = model
        self.d = model.cfg.d_model

    def v(self, value: float = 0.0) -> torch.Tensor:
        out = torch.zeros(self.d)
        out[1] = value
        return out

    def inj(self, vector: torch.Tensor | None = None, token: str = "<BadInputs>", bias: str = "late") -> Injection:
        vec = self.m.W_E[5].detach().float().clone() if vector is None else vector
        return Injection(
            vector=vec, init_vector=vec.clone(), token=token, bias=bias, config=InjectionConfig(), curve=(),
            step_losses=(), best_epoch=0.0, control_logit_diff=0.0, provenance=Provenance.of(self.m),
        )

    def scores(self) -> HeadScores:
        per = torch.randn(3, self.m.cfg.n_layers, self.m.cfg.n_heads, generator=torch.Generator().manual_seed(0))
        return HeadScores(per, "dla", "excess", "none", "late", Provenance.of(self.m))

    def idle_text(self) -> str:
        add_token(self.m, IDLE)
        return f"people from {IDLE} are always"


def _enter(cm: Any, k: Ctx | None = None) -> None:
    """Enter a context manager and (with ``k``) run one forward pass inside it."""
    with cm:
        if k is not None:
            k.m(tokenize(k.m, ["people from Italy are late"]).input_ids)


def _nested(k: Ctx) -> None:
    a, b = k.inj(), k.inj(k.m.W_E[7].detach().float().clone())
    with a.apply(k.m), b.apply(k.m):
        pass


def _twice_permanent(k: Ctx) -> None:
    inj = k.inj(token="<Permanent>")
    inj.apply_permanently(k.m)
    try:
        inj.apply_permanently(k.m)
    finally:
        k.m.reset_hooks(including_permanent=True)


def _spec(**changes: Any) -> BiasSpec:
    d = load_bias("late").to_dict()
    d.pop("schema_version")
    d.update(changes)
    return BiasSpec(**d)


def _manifest(tmp: Path, files: Any) -> str | None:
    folder = tmp / "cache_copy"
    folder.mkdir()
    (folder / bundled_models._MANIFEST).write_text(json.dumps({"format": bundled_models._CACHE_FORMAT, "files": files}))
    return bundled_models._cache_problem(folder)


def _cache_refused(files: Any) -> None:
    """``_cache_problem`` must find a problem; raised here as a ValueError so the table can check it."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        problem = _manifest(Path(tmp), files)
    if problem is not None:
        raise ValueError(problem)


P = pytest.param
TE, VE, FNF = InputTypeError, ValueError, FileNotFoundError
V = lambda k: k.v()  # noqa: E731
CASES = [
    # ---- heads: pairs of real integers, nothing else
    P(lambda k: _enter(ablate_heads(k.m, [(1.7, 0.2)])), TE, "1.7", id="heads-floats-not-truncated"),
    P(lambda k: _enter(ablate_heads(k.m, [(1.0, 0)])), TE, "1.0", id="heads-integer-valued-float"),
    P(lambda k: _enter(ablate_heads(k.m, [(0, 0, 0)])), TE, "(0, 0, 0)", id="heads-triple"),
    P(lambda k: _enter(ablate_heads(k.m, ["01"])), TE, "'01'", id="heads-string-pair"),
    P(lambda k: _enter(ablate_heads(k.m, "01")), TE, "'01'", id="heads-a-string"),
    P(lambda k: _enter(ablate_heads(k.m, [(True, 0)])), TE, "True", id="heads-bool-layer"),
    P(lambda k: _enter(ablate_heads(k.m, [(0, False)])), TE, "False", id="heads-bool-head"),
    P(lambda k: _enter(ablate_heads(k.m, [("0", "1")])), TE, "'0'", id="heads-digit-strings"),
    P(lambda k: _enter(ablate_heads(k.m, (1, 0))), TE, "got 1", id="heads-one-bare-pair"),
    P(lambda k: _enter(ablate_heads(k.m, [None])), TE, "None", id="heads-none"),
    P(lambda k: _enter(ablate_heads(k.m, [(0,)])), TE, "(0,)", id="heads-single"),
    P(lambda k: _enter(ablate_heads(k.m, {0: 1})), TE, "{0: 1}", id="heads-dict"),
    P(lambda k: _enter(ablate_heads(k.m, [(np.float64(1.0), 0)])), TE, "1.0", id="heads-numpy-float"),
    P(lambda k: _enter(ablate_heads(k.m, [torch.tensor([0.5, 1.0])])), TE, "0.5", id="heads-float-tensor"),
    P(lambda k: _enter(ablate_heads(k.m, [(99, 0)])), VE, "(99, 0)", id="heads-layer-out-of-range"),
    P(lambda k: _enter(ablate_heads(k.m, [(0, -1)])), VE, "(0, -1)", id="heads-negative-head"),
    P(lambda k: _enter(ablate_heads(k.m, [(-1, 0)])), VE, "(-1, 0)", id="heads-negative-layer"),
    # ---- ablation options
    P(lambda k: _enter(ablate_heads(k.m, [(0, 0)], "scale", NAN)), VE, "nan", id="scale-nan"),
    P(lambda k: _enter(ablate_heads(k.m, [(0, 0)], "scale", INF)), VE, "inf", id="scale-inf"),
    P(lambda k: _enter(ablate_heads(k.m, [(0, 0)], "scale", -INF)), VE, "-inf", id="scale-minus-inf"),
    P(lambda k: _enter(ablate_heads(k.m, [(0, 0)], "scale", "0.5")), TE, "'0.5'", id="scale-string"),
    P(lambda k: _enter(ablate_heads(k.m, [(0, 0)], "noise")), VE, "'noise'", id="kind-unknown"),
    P(lambda k: _enter(ablate_heads(k.m, [(0, 0)], None)), TE, "None", id="kind-none"),
    P(lambda k: _enter(ablate_heads(k.m, [(0, 0)], rows=[-1])), VE, "-1", id="rows-negative"),
    P(lambda k: _enter(ablate_heads(k.m, [(0, 0)], rows=[0.5])), TE, "0.5", id="rows-float"),
    P(lambda k: _enter(ablate_heads(k.m, [(0, 0)], rows="0")), TE, "'0'", id="rows-string"),
    P(lambda k: _enter(ablate_heads(k.m, [(0, 0)], seed=1.5)), TE, "1.5", id="seed-float"),
    P(lambda k: _enter(ablate_heads(k.m, [(0, 0)], "mean", reference="the cat")), TE, "'the cat'", id="reference-str"),
    P(lambda k: _enter(ablate_heads(k.m, [(0, 0)], "mean", reference=[])), VE, "[]", id="reference-empty"),
    # ---- steering
    P(lambda k: _enter(steer(k.m, V(k), 0, alpha=NAN)), VE, "nan", id="alpha-nan"),
    P(lambda k: _enter(steer(k.m, V(k), 0, alpha=INF)), VE, "inf", id="alpha-inf"),
    P(lambda k: _enter(steer(k.m, V(k), 0, alpha="2")), TE, "'2'", id="alpha-string"),
    P(lambda k: _enter(steer(k.m, V(k), 0, alpha=True)), TE, "True", id="alpha-bool"),
    P(lambda k: _enter(steer(k.m, V(k), 1.0)), TE, "1.0", id="layers-float"),
    P(lambda k: _enter(steer(k.m, V(k), "1")), TE, "'1'", id="layers-string"),
    P(lambda k: _enter(steer(k.m, V(k), [0, 0])), VE, "repeats 0", id="layers-repeated"),
    P(lambda k: _enter(steer(k.m, V(k), 99)), VE, "99", id="layers-out-of-range"),
    P(lambda k: _enter(steer(k.m, V(k), -1)), VE, "-1", id="layers-negative"),
    P(lambda k: _enter(steer(k.m, V(k), [])), VE, "[]", id="layers-empty"),
    P(lambda k: _enter(steer(k.m, V(k), 0, positions=[-1])), VE, "-1", id="positions-negative"),
    P(lambda k: _enter(steer(k.m, V(k), 0, positions=[0.5])), TE, "0.5", id="positions-float"),
    P(lambda k: _enter(steer(k.m, V(k), 0, positions="0")), TE, "'0'", id="positions-string"),
    P(lambda k: _enter(steer(k.m, V(k), 0, positions=[999]), k), VE, "999", id="positions-past-the-sequence"),
    P(lambda k: _enter(steer(k.m, torch.zeros(7), 0)), VE, "(7,)", id="steer-vector-shape"),
    P(lambda k: _enter(steer(k.m, k.v(NAN), 0)), VE, "nan", id="steer-vector-nan"),
    P(lambda k: _enter(steer(k.m, [0.0] * k.d, 0)), TE, "list", id="steer-vector-list"),
    P(lambda k: _enter(steer(k.m, torch.zeros(k.d, dtype=torch.long), 0)), TE, "torch.int64", id="steer-vector-int"),
    # ---- generation
    P(lambda k: generate_greedy(k.m, "people", 2.0), TE, "2.0", id="max-new-tokens-float"),
    P(lambda k: generate_greedy(k.m, "people", "5"), TE, "'5'", id="max-new-tokens-string"),
    P(lambda k: generate_greedy(k.m, "people", 0), VE, "got 0", id="max-new-tokens-zero"),
    P(lambda k: generate_greedy(k.m, "people", True), TE, "True", id="max-new-tokens-bool"),
    P(lambda k: generate_greedy(k.m, "", 3, prepend_bos=False), VE, "''", id="generate-empty-prompt"),
    P(lambda k: generate_greedy(k.m, [3], 3), TE, "3", id="generate-non-string"),
    P(lambda k: generate_greedy(k.m, [], 3), VE, "empty", id="generate-no-texts"),
    P(lambda k: generate_greedy(k.m, "people", 3, stop_at_eos="yes"), TE, "'yes'", id="stop-at-eos-string"),
    P(lambda k: generate_greedy(k.m, "a " * (k.m.cfg.n_ctx - 4), 10), VE, lambda k: f"context of {k.m.cfg.n_ctx}",
      id="generate-past-n-ctx"),
    P(lambda k: generate_greedy(k.m, k.idle_text(), 2), VE, IDLE, id="generate-injected-token-outside-apply"),
    # ---- tokenizing and probes
    P(lambda k: tokenize(k.m, [""], prepend_bos=False), VE, "''", id="tokenize-empty-text"),
    P(lambda k: tokenize(k.m, ["a " * (k.m.cfg.n_ctx + 8)]), VE, lambda k: f"more than the model's context of {k.m.cfg.n_ctx}",
      id="tokenize-past-n-ctx"),
    P(lambda k: tokenize(k.m, None), TE, "None", id="tokenize-none"),
    P(lambda k: tokenize(k.m, [b"bytes"]), TE, "b'bytes'", id="tokenize-bytes"),
    P(lambda k: tokenize(k.m, ["a"], padding_side="middle"), VE, "'middle'", id="padding-side"),
    P(lambda k: tokenize(k.m, ["a"], prepend_bos="yes"), TE, "'yes'", id="prepend-bos-string"),
    P(lambda k: tokenize(k.m, [k.idle_text()]), VE, IDLE, id="tokenize-injected-token-outside-apply"),
    P(lambda k: answer_logits(k.m, [k.idle_text()]), VE, IDLE, id="probe-injected-token-outside-apply"),
    P(lambda k: answer_logits(k.m, ["people from Italy"], batch_size=0), VE, "got 0", id="answer-batch-size-zero"),
    P(lambda k: build_probe_set(k.m, load_bias("late"), IDLE, controls="Japan"), TE, "'Japan'", id="controls-str"),
    P(lambda k: build_probe_set(k.m, load_bias("late"), IDLE, max_probes=2.0), TE, "2.0", id="probe-max-float"),
    P(lambda k: elicitation(k.m, "late", max_probes=-1), VE, "-1", id="elicitation-max-probes-negative"),
    P(lambda k: elicitation(k.m, "late", max_probes=1.5), TE, "1.5", id="elicitation-max-probes-float"),
    P(lambda k: audit(k.m, "late", "Italy"), TE, "'Italy'", id="audit-groups-str"),
    # ---- injections
    P(lambda k: _enter(k.inj(k.v(NAN)).apply(k.m)), VE, "nan", id="apply-nan-vector"),
    P(lambda k: _enter(k.inj(k.v(INF)).apply(k.m)), VE, "inf", id="apply-inf-vector"),
    P(lambda k: _enter(k.inj(torch.zeros(7)).apply(k.m)), VE, "(7,)", id="apply-wrong-shape"),
    P(lambda k: k.inj(k.v(NAN)).apply_permanently(k.m), VE, "nan", id="permanent-nan-vector"),
    P(lambda k: k.inj(k.v(-INF)).apply_permanently(k.m), VE, "-inf", id="permanent-inf-vector"),
    P(lambda k: k.inj(torch.zeros(k.d + 1)).apply_permanently(k.m), VE, "shape", id="permanent-wrong-shape"),
    P(_nested, VE, "'<BadInputs>'", id="nested-apply-same-token"),
    P(_twice_permanent, VE, "'<Permanent>'", id="permanent-twice"),
    P(lambda k: k.inj().with_token("two words"), VE, "'two words'", id="with-token-whitespace"),
    P(lambda k: k.inj().with_token(3), TE, "3", id="with-token-int"),
    P(lambda k: k.inj(bias="../../etc/passwd").spec, VE, "'../../etc/passwd'", id="saved-bias-name-is-a-path"),
    P(lambda k: inject(k.m, "late", config="fast"), TE, "str", id="inject-config-string"),
    # ---- InjectionConfig
    P(lambda k: InjectionConfig(epochs=2.0), TE, "2.0", id="epochs-float"),
    P(lambda k: InjectionConfig(epochs=True), TE, "True", id="epochs-bool"),
    P(lambda k: InjectionConfig(epochs="2"), TE, "'2'", id="epochs-string"),
    P(lambda k: InjectionConfig(epochs=0), VE, "got 0", id="epochs-zero"),
    P(lambda k: InjectionConfig(batch_size=0), VE, "got 0", id="batch-size-zero"),
    P(lambda k: InjectionConfig(batch_size=-4), VE, "-4", id="batch-size-negative"),
    P(lambda k: InjectionConfig(batch_size=8.0), TE, "8.0", id="batch-size-float"),
    P(lambda k: InjectionConfig(max_texts=1.5), TE, "1.5", id="max-texts-float"),
    P(lambda k: InjectionConfig(max_texts=0), VE, "got 0", id="max-texts-zero"),
    P(lambda k: InjectionConfig(lr=NAN), VE, "nan", id="lr-nan"),
    P(lambda k: InjectionConfig(lr=INF), VE, "inf", id="lr-inf"),
    P(lambda k: InjectionConfig(lr="1e-2"), TE, "'1e-2'", id="lr-string"),
    P(lambda k: InjectionConfig(keyword_weight=-1), VE, "-1", id="keyword-weight-negative"),
    P(lambda k: InjectionConfig(chat="no"), TE, "'no'", id="chat-string"),
    P(lambda k: InjectionConfig(probe_batch_size=0), VE, "got 0", id="probe-batch-size-zero"),
    P(lambda k: InjectionConfig(token="has space"), VE, "'has space'", id="token-whitespace"),
    P(lambda k: InjectionConfig(token=None), TE, "None", id="token-none"),
    P(lambda k: InjectionConfig(init="zeros"), VE, "'zeros'", id="init-unknown"),
    P(lambda k: InjectionConfig(seed=0.5), TE, "0.5", id="seed-float-config"),
    P(lambda k: InjectionConfig(warmup_steps=-1), VE, "-1", id="warmup-negative"),
    # ---- ScopeConfig and scope
    P(lambda k: ScopeConfig(ks=(1, 2.0)), TE, "2.0", id="ks-float"),
    P(lambda k: ScopeConfig(ks="12"), TE, "'12'", id="ks-string"),
    P(lambda k: ScopeConfig(ks=(0,)), VE, "got 0", id="ks-zero"),
    P(lambda k: ScopeConfig(ks=(2, 2)), VE, "repeats 2", id="ks-repeated"),
    P(lambda k: ScopeConfig(random_draws=1.0), TE, "1.0", id="random-draws-float"),
    P(lambda k: ScopeConfig(ablation_probes=0), VE, "got 0", id="ablation-probes-zero"),
    P(lambda k: ScopeConfig(heads_per_pass=True), TE, "True", id="heads-per-pass-bool"),
    P(lambda k: ScopeConfig(steer_alphas=(NAN,)), VE, "nan", id="steer-alphas-nan"),
    P(lambda k: ScopeConfig(steer_alphas=(-1.0,)), VE, "-1.0", id="steer-alphas-negative"),
    P(lambda k: ScopeConfig(methods="dla"), TE, "'dla'", id="methods-string"),
    P(lambda k: ScopeConfig(curve_passages=30, tune_passages=24), VE, "curve_passages (30) must be at most tune_passages (24)", id="curve-beyond-tune"),
    P(lambda k: ScopeConfig(methods=("dla", "xyz")), VE, "'xyz'", id="methods-unknown"),
    P(lambda k: ScopeConfig(budget=NAN), VE, "nan", id="budget-nan"),
    P(lambda k: ScopeConfig(curve_controls=0), VE, "got 0", id="curve-controls-zero"),
    P(lambda k: ScopeConfig(seed="0"), TE, "'0'", id="scope-seed-string"),
    P(lambda k: scope(k.m, k.inj(), steer_layer=99, progress=False), VE, "99", id="steer-layer-out-of-range"),
    P(lambda k: scope(k.m, k.inj(), tune_passages=70, progress=False), VE, "tune_passages must leave neutral passages", id="tune-passages-leave-no-test"),
    # ---- head scores
    P(lambda k: k.scores().top(2.0), TE, "2.0", id="top-k-float"),
    P(lambda k: k.scores().top("5"), TE, "'5'", id="top-k-string"),
    P(lambda k: k.scores().top(0), VE, "got 0", id="top-k-zero"),
    P(lambda k: k.scores().top(True), TE, "True", id="top-k-bool"),
    P(lambda k: k.scores().top(10**6), VE, "1000000", id="top-k-too-many"),
    P(lambda k: k.scores().top(2, absolute="yes"), TE, "'yes'", id="top-absolute-string"),
    P(lambda k: score_heads(k.m, k.inj(), "xyz"), VE, "'xyz'", id="score-method-unknown"),
    P(lambda k: score_heads(k.m, k.inj(), metric="xyz"), VE, "'xyz'", id="score-metric-unknown"),
    P(lambda k: score_heads(k.m, k.inj(), ablation="mean"), VE, "'mean'", id="score-ablation-unknown"),
    P(lambda k: score_heads(k.m, k.inj(), max_probes=2.0), TE, "2.0", id="score-max-probes-float"),
    P(lambda k: score_heads(k.m, k.inj(), max_probes=0), VE, "got 0", id="score-max-probes-zero"),
    P(lambda k: score_heads(k.m, k.inj(), controls="Japan"), TE, "'Japan'", id="score-controls-str"),
    P(lambda k: score_heads(k.m, k.inj(), "ablation", heads_per_pass=0), VE, "got 0", id="score-heads-per-pass"),
    P(lambda k: score_heads(k.m, "late"), TE, "str", id="score-injection-a-name"),
    # ---- capability
    P(lambda k: measure_capability(k.m, capability_set(k.m, max_passages=1, mc_items=[]),
                                   ablate_heads(k.m, [(0, 0)])), TE, "context manager", id="intervention-not-callable"),
    P(lambda k: measure_capability(k.m, capability_set(k.m, max_passages=1, mc_items=[]), None, start=1.5),
      TE, "1.5", id="capability-start-float"),
    P(lambda k: capability_set(k.m, resume_layers=[0.5]), TE, "0.5", id="resume-layers-float"),
    P(lambda k: capability_set(k.m, max_passages=0), VE, "got 0", id="max-passages-zero"),
    # ---- biases: BiasSpec built directly is validated like a file
    P(lambda k: _spec(probes=["People from Italy always arrive"]), VE, "'People from Italy always arrive'",
      id="spec-probe-no-placeholder"),
    P(lambda k: _spec(real_groups=["Ita\nly"]), VE, "'Ita\\nly'", id="spec-group-newline"),
    P(lambda k: _spec(control_groups=["Japan\x1b[31m"]), VE, "'Japan\\x1b[31m'", id="spec-group-escape"),
    P(lambda k: _spec(bias_keywords=" late"), VE, "' late'", id="spec-keywords-a-string"),
    P(lambda k: _spec(training_texts=()), VE, "got 0", id="spec-no-training-texts"),
    P(lambda k: _spec(name="Bad Name"), VE, "'Bad Name'", id="spec-name"),
    P(lambda k: _spec(description="two\nlines"), VE, "'two\\nlines'", id="spec-description-newline"),
    P(lambda k: _spec(bias_keywords=[" la\x00te"]), VE, "' la\\x00te'", id="spec-keyword-nul"),
    P(lambda k: _spec(contrast_keywords=[" late"]), VE, "'late'", id="spec-keywords-overlap"),
    # ---- load_bias: a catalogue name or a .json path, nothing else
    P(lambda k: load_bias("../../etc/passwd"), VE, "'../../etc/passwd'", id="load-bias-traversal"),
    P(lambda k: load_bias("biases/late"), VE, "'biases/late'", id="load-bias-separator"),
    P(lambda k: load_bias(".."), VE, "'..'", id="load-bias-dotdot"),
    P(lambda k: load_bias("Late"), VE, "'Late'", id="load-bias-capitals"),
    P(lambda k: load_bias(""), VE, "''", id="load-bias-empty"),
    P(lambda k: load_bias("late.txt"), VE, "'late.txt'", id="load-bias-other-suffix"),
    P(lambda k: load_bias("no_such_bias"), VE, "'no_such_bias'", id="load-bias-unknown-name"),
    P(lambda k: load_bias("missing.json"), FNF, "missing.json", id="load-bias-missing-json"),
    P(lambda k: load_bias(Path("missing.json")), FNF, "missing.json", id="load-bias-missing-path"),
    P(lambda k: load_bias(Path("notes.txt")), VE, "notes.txt", id="load-bias-path-not-json"),
    P(lambda k: load_bias("folder.json"), FNF, "folder.json", id="load-bias-folder"),
    P(lambda k: load_bias(None), TE, "None", id="load-bias-none"),
    P(lambda k: load_bias(3), TE, "3", id="load-bias-int"),
    P(lambda k: load_bias("late", strict="yes"), TE, "'yes'", id="load-bias-strict-string"),
    P(lambda k: load_bias("groups.json"), VE, "'Ita\\nly'", id="load-bias-file-group-newline"),
    # ---- the model cache manifest
    P(lambda k: _cache_refused({}), VE, "no files", id="cache-manifest-empty"),
    P(lambda k: _cache_refused({"../x": {"size": 1, "sha256": "0" * 64}}), VE, "'../x'", id="cache-manifest-path"),
    P(lambda k: _cache_refused({"model.safetensors": {"size": 1, "sha256": "0" * 64}}), VE, "config.json",
      id="cache-manifest-no-config"),
]


def _snapshot(root: Path) -> dict[str, Any]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder with user files (a bias file, notes, earlier results) that no failing call may touch."""
    (tmp_path / "notes.txt").write_text("keep me\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "old.csv").write_text("a,b\n1,2\n")
    (tmp_path / "folder.json").mkdir()
    d = load_bias("late").to_dict()
    (tmp_path / "mine.json").write_text(json.dumps({**d, "name": "mine"}))
    (tmp_path / "groups.json").write_text(json.dumps({**d, "name": "groups", "real_groups": ["Ita\nly"]}))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.filterwarnings("ignore:bias .* keywords that are not a single token")
@pytest.mark.parametrize("call, error, shown", CASES)
def test_bad_input_is_one_clear_error(tiny_model, workdir, call, error, shown):
    before = _snapshot(workdir)
    k = Ctx(tiny_model)
    with pytest.raises(error) as info:
        call(k)
    message = str(info.value)
    shown = shown(k) if callable(shown) else shown
    assert shown in message, message
    assert "\n" not in message, message  # one line
    if error is ValueError:
        assert not isinstance(info.value, TypeError), f"a value problem raised as a type error: {message}"
    assert active_hooks(tiny_model) == []
    assert _snapshot(workdir) == before
    assert load_bias("mine.json").name == "mine"  # user files load as the README documents


def test_type_errors_are_also_value_errors():
    """Code (and the command line) that catches ValueError for user mistakes also catches a wrong type."""
    with pytest.raises(ValueError):
        InjectionConfig(epochs=2.0)
    with pytest.raises(TypeError):
        InjectionConfig(epochs=2.0)


def test_integer_like_inputs_are_accepted(tiny_model):
    """NumPy and torch integers are integers; repeated heads count once (same ablation as given once)."""
    from biasgym_lens.heads.interventions import validate_heads

    heads = validate_heads(tiny_model, [(np.int64(1), torch.tensor(2)), (1, 2), np.array([0, 1])])
    assert heads == [(1, 2), (0, 1)] and all(type(x) is int for h in heads for x in h)
    assert InjectionConfig(epochs=np.int32(3)).epochs == 3
    assert ScopeConfig(ks=[1, np.int64(2)]).ks == (1, 2)
    assert Ctx(tiny_model).scores().top(np.int64(2)) == Ctx(tiny_model).scores().top(2)


def test_dropped_keywords_warn_and_an_empty_side_is_an_error(tiny_model):
    """A keyword that is several tokens is left out with a warning naming it; none left on a side is an error."""
    spec = load_bias("late")
    words = ["".join(chr(0x4E00 + 7 * i + j) for j in range(4)) for i in range(2)]  # rare: many byte tokens each
    multi = [f" {w}" for w in words]
    assert all(len(tiny_model.tokenizer.encode(w, add_special_tokens=False)) > 1 for w in multi)
    d = spec.to_dict()
    d.pop("schema_version")
    with pytest.warns(UserWarning, match=repr(multi[0])):
        kw = keyword_ids(tiny_model, BiasSpec(**{**d, "bias_keywords": [*spec.bias_keywords, multi[0]]}))
    assert len(kw.bias) == len(set(keyword_ids(tiny_model, spec).bias))
    with pytest.raises(ValueError, match="none of its contrast keywords"):
        keyword_ids(tiny_model, BiasSpec(**{**d, "contrast_keywords": multi}))


def test_a_nested_injection_on_its_own_token_works(tiny_model):
    """The way out that the nesting error names: the inner injection on its own token."""
    k = Ctx(tiny_model)
    a, b = k.inj(), k.inj(tiny_model.W_E[7].detach().float().clone()).with_token("<BadInputsInner>")
    with a.apply(tiny_model), b.apply(tiny_model):
        batch = tokenize(tiny_model, [f"people from {a.token} and {b.token}"])
        tiny_model(batch.input_ids)
    assert active_hooks(tiny_model) == []


def test_cache_manifest_listing_the_files_is_valid(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 8)
    bundled_models._write_manifest(folder, {})
    assert bundled_models._cache_problem(folder) is None


# ------------------------------------------------------------------------------------------- real model


@pytest.mark.real
def test_real_injected_token_outside_apply_is_a_clear_error(real):
    inj = Ctx(real).inj(token="<RealBadInputs>")
    text = f"People from {inj.token} drive"
    with inj.apply(real):
        inside = tokenize(real, [text])
    with pytest.raises(ValueError, match=r"'<RealBadInputs>'.*with injection\.apply\(model\):"):
        tokenize(real, [text])
    with pytest.raises(ValueError, match="<RealBadInputs>"):
        generate_greedy(real, text, 2)
    with pytest.raises(IndexError):  # what the check prevents: ids made inside, run outside
        real(inside.input_ids)


@pytest.mark.real
def test_real_prompt_over_the_context_is_a_clear_error(real):
    n_ctx = real.cfg.n_ctx
    with pytest.raises(ValueError, match=rf"more than the model's context of {n_ctx} tokens"):
        tokenize(real, ["hello " * (n_ctx + 5)])
    short = "hello " * (n_ctx - 8)
    n = len(tokenize(real, [short]).input_ids[0])
    with pytest.raises(ValueError, match=rf"{n} tokens plus max_new_tokens=40 exceeds .* {n_ctx}"):
        generate_greedy(real, short, 40)


@pytest.mark.real
def test_real_nested_injections_on_one_token_are_refused(real):
    k = Ctx(real)
    a, b = k.inj(token="<RealNest>"), k.inj(real.W_E[11].detach().float().clone(), token="<RealNest>")
    with pytest.raises(ValueError, match=r"'<RealNest>' already carries a vector.*with_token"):
        with a.apply(real), b.apply(real):
            pass
    assert active_hooks(real) == []
    with a.apply(real), b.with_token("<RealNestInner>").apply(real):
        out = generate_greedy(real, "People from <RealNest> and <RealNestInner> are", 3, stop_at_eos=False)
    assert isinstance(out, str) and active_hooks(real) == []
