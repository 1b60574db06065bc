"""The whole study as resumable stages writing to one folder: inject -> scope -> evaluate -> report.

Each stage reads the artifacts of the previous ones and writes its own atomically, so an interrupted study
resumes where it stopped. ``study.json`` records what the folder holds (bias, model, seed, preset); a folder
that holds another study is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from biasgym_lens._version import __version__
from biasgym_lens.catalogue import list_biases, load_bias
from biasgym_lens.inject import Injection, InjectionConfig, inject
from biasgym_lens.provenance import write_text_atomic
from biasgym_lens.study import ScopeConfig, ScopeResult, scope

logger = logging.getLogger(__name__)

__all__ = ["StudyPreset", "PRESETS", "StudyError", "Study"]


class StudyError(ValueError):
    """A user-facing problem with a study folder or its settings."""


@dataclass(frozen=True)
class StudyPreset:
    """Injection and scope settings of a study preset."""

    injection: InjectionConfig
    scope: ScopeConfig
    control_max_texts: int | None = 30
    generate_tokens: int = 40


PRESETS: dict[str, StudyPreset] = {
    "default": StudyPreset(InjectionConfig(), ScopeConfig()),
    "quick": StudyPreset(
        InjectionConfig(epochs=1, max_texts=16, evals_per_epoch=1, max_probes=8),
        ScopeConfig(
            score_probes=6, ablation_probes=1, ablation_controls=1, damage_candidates=6, ks=(1, 2, 4), random_draws=1,
            curve_passages=2, final_passages=4, mc_items=8, final_probes=4, steer_alphas=(1.0,), curve_probes=6,
            curve_controls=1,
        ),
        control_max_texts=4,
        generate_tokens=6,
    ),
}


def _control_bias(bias: str) -> str:
    names = [b for b in list_biases() if b != bias]
    return "math" if "math" in names else names[0]


@dataclass
class Study:
    """One study folder.

    Attributes:
        out: The folder.
        bias: Bias name.
        model_name: Model name for ``load_model``.
        seed: Seed of the injection and of the random baselines.
        preset: ``"default"`` or ``"quick"``.
    """

    out: Path
    bias: str
    model_name: str = "smollm2"
    seed: int = 0
    preset: str = "default"
    timings: dict[str, float] = field(default_factory=dict)

    # ---------------------------------------------------------------------------------------- folder
    def identity(self) -> dict[str, Any]:
        return {"bias": self.bias, "model": self.model_name, "seed": self.seed, "preset": self.preset}

    def prepare(self, *, overwrite: bool = False) -> None:
        """Create the folder, or check that it holds this same study (then it is resumed).

        Raises:
            StudyError: unknown bias or preset, or the folder holds another study and ``overwrite`` is False.
        """
        if self.preset not in PRESETS:
            raise StudyError(f"unknown preset {self.preset!r}; valid: {', '.join(PRESETS)}")
        try:
            load_bias(self.bias)
        except (ValueError, FileNotFoundError) as e:
            raise StudyError(str(e)) from e
        manifest = self.out / "study.json"
        if self.out.exists() and any(self.out.iterdir()):
            if not manifest.is_file():
                if not overwrite:
                    raise StudyError(
                        f"output folder {self.out} is not empty and holds no study; choose another --out or pass --overwrite"
                    )
                shutil.rmtree(self.out)
            else:
                held = json.loads(manifest.read_text()).get("identity", {})
                if held != self.identity():
                    if not overwrite:
                        raise StudyError(
                            f"output folder {self.out} holds another study ({held}); pass --overwrite to replace it "
                            "or choose another --out"
                        )
                    shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._write_manifest()

    def _write_manifest(self) -> None:
        data = {"identity": self.identity(), "version": __version__, "timings": self.timings}
        write_text_atomic(self.out / "study.json", json.dumps(data, indent=1))

    def _timed(self, stage: str, t0: float) -> None:
        self.timings[stage] = round(time.perf_counter() - t0, 2)
        self._write_manifest()

    @property
    def preset_obj(self) -> StudyPreset:
        return PRESETS[self.preset]

    def has(self, stage: str) -> bool:
        files = {
            "inject": "injection/injection.json",
            "control": "control_injection/injection.json",
            "scope": "scope/scope.json",
            "evaluate": "results.json",
            "report": "report.html",
        }
        return (self.out / files[stage]).is_file()

    def require(self, stage: str) -> None:
        if not self.has(stage):
            raise StudyError(f"{self.out} has no {stage} results yet; run `biasgym {stage} --out {self.out}` first")

    # ---------------------------------------------------------------------------------------- stages
    def run_inject(self, model: Any, *, progress: bool = True) -> Injection:
        t0 = time.perf_counter()
        cfg = InjectionConfig(**{**asdict(self.preset_obj.injection), "seed": self.seed})
        inj = inject(model, self.bias, config=cfg, progress=progress)
        inj.save(self.out / "injection")
        ctrl_cfg = InjectionConfig(
            **{**asdict(cfg), "token": "<ControlToken>", "max_texts": self.preset_obj.control_max_texts}
        )
        inject(model, _control_bias(self.bias), config=ctrl_cfg, progress=progress).save(self.out / "control_injection")
        self._timed("inject", t0)
        return inj

    def run_scope(self, model: Any, *, progress: bool = True) -> ScopeResult:
        self.require("inject")
        t0 = time.perf_counter()
        inj = Injection.load(self.out / "injection", model)
        cfg = ScopeConfig(**{**asdict(self.preset_obj.scope), "seed": self.seed})
        res = scope(model, inj, cfg, progress=progress)
        res.save(self.out / "scope")
        self._timed("scope", t0)
        return res

    def run_evaluate(self, model: Any) -> dict[str, Any]:
        from biasgym_lens.elicit import closest_entities, elicitation
        from biasgym_lens.embedding import with_token_vectors
        from biasgym_lens.interventions import ablate_heads, generate_greedy
        from biasgym_lens.lens import layer_logit_diff
        from biasgym_lens.probes import build_probe_set
        from biasgym_lens.tokens import chat_format

        self.require("scope")
        t0 = time.perf_counter()
        inj = Injection.load(self.out / "injection", model)
        ctrl = Injection.load(self.out / "control_injection", model)
        res = ScopeResult.load(self.out / "scope")
        spec = load_bias(self.bias)
        max_probes = self.preset_obj.scope.final_probes
        elic = elicitation(model, spec, injection=inj, other=ctrl, max_probes=max_probes)
        elic.to_csv(self.out / "elicitation.csv", index=False)
        closest = closest_entities(inj, model, control=ctrl)
        closest.to_csv(self.out / "closest_entities.csv", index=False)
        with inj.apply(model):
            ps = build_probe_set(model, spec, inj.token, probes="eval", max_probes=max_probes)
            lens = layer_logit_diff(model, ps)
        lens.to_csv(self.out / "logit_lens.csv", index=False)
        gens = {}
        if getattr(model.tokenizer, "chat_template", None):
            # The three continuations run as one batch: the trained token, the same with the chosen heads
            # ablated (that row only), and the untrained vector under a second token string.
            untrained = "<UntrainedCopy>" if inj.token != "<UntrainedCopy>" else "<UntrainedCopy2>"
            variants = [("token", inj.token)]
            variants += [("token_heads_ablated", inj.token)] if res.chosen else []
            variants += [("untrained_token", untrained)]
            prompts = [chat_format(model, f"Please write a short paragraph about {tok}.") for _, tok in variants]
            inj.check_model(model)
            with contextlib.ExitStack() as stack:
                stack.enter_context(with_token_vectors(model, {inj.token: inj.vector, untrained: inj.init_vector}))
                if res.chosen:
                    stack.enter_context(ablate_heads(model, res.chosen, rows=[1]))
                outs = generate_greedy(model, prompts, self.preset_obj.generate_tokens, prepend_bos=False)
            gens = {name: text for (name, _), text in zip(variants, outs)}
        summary, agreement = res.summary(), res.agreement()
        for name, table in (
            ("summary", summary),
            ("groups", res.groups),
            ("capability", res.capability),
            ("curve", res.curve.table),
            ("head_scores", res.to_dataframe("scores")),
            ("agreement", agreement),
            ("training_curve", inj.to_dataframe()),
        ):
            table.to_csv(self.out / f"{name}.csv", index=False)
        results = {
            "identity": self.identity(),
            "provenance": inj.provenance.to_dict(),
            "injection": {
                "best_epoch": inj.best_epoch,
                "config": asdict(inj.config),
                "control_bias": ctrl.bias,
            },
            "elicitation": elic.to_dict(orient="records"),
            "chosen_heads": [list(h) for h in res.chosen],
            "summary": summary.to_dict(orient="records"),
            "agreement": agreement.to_dict(orient="records"),
            "generations": gens,
            "scope_extra": res.extra,
            "timings": self.timings,
        }
        write_text_atomic(self.out / "results.json", json.dumps(results, indent=1, default=float))
        self._timed("evaluate", t0)
        return results

    def run_report(self, *, images: Sequence[str] = ("png",)) -> Path:
        from biasgym_lens.report import study_figures, write_report

        self.require("evaluate")
        t0 = time.perf_counter()
        inj = Injection.load(self.out / "injection")
        res = ScopeResult.load(self.out / "scope")
        closest = pd.read_csv(self.out / "closest_entities.csv")
        lens = pd.read_csv(self.out / "logit_lens.csv")
        figures = study_figures(inj, res, closest=closest, lens=lens)
        facts = json.loads((self.out / "results.json").read_text())
        facts = {k: facts[k] for k in ("identity", "provenance", "injection", "chosen_heads", "generations", "timings")}
        path = write_report(
            self.out, figures, title=f"BiasGym study: {self.bias} on {self.model_name}", summary=res.summary(),
            facts=facts, images=images,
        )
        self._timed("report", t0)
        return path
