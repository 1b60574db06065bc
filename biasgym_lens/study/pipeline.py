"""The whole study as resumable stages writing to one folder: inject -> scope -> evaluate [-> benchmarks] -> report.

Each stage reads the artifacts of the previous ones and writes its own atomically; a stage counts as done only
when all its outputs exist (:data:`STAGE_OUTPUTS`), so a study interrupted anywhere resumes where it stopped.
``study.json`` records what the folder holds (bias, model, seed, preset, and the SHA-256 of a user bias file).

Safety of the user's files (the rules are in :mod:`biasgym_lens.study.folders`): a folder that holds anything
but a study of this package is never written to; ``overwrite=True`` replaces another study (or a multi-seed
study, see :mod:`biasgym_lens.study.seed_study`) by removing only the names this package writes
(:data:`~biasgym_lens.study.folders.OUTPUTS`) and is refused on ``/``, the home folder, the working folder and
its parents; a lock file keeps a second process out of a busy folder. Everything is validated
(:meth:`Study.check`) before anything is changed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from biasgym_lens._version import __version__
from biasgym_lens.core.files import (
    ArtifactError,
    dumps,
    read_csv,
    read_json,
    require,
    write_csv,
    write_text_atomic,
)
from biasgym_lens.core.protocols import Model
from biasgym_lens.evaluation.uptake import check_injection
from biasgym_lens.heads.biasscope import scope
from biasgym_lens.heads.scope_config import ScopeConfig
from biasgym_lens.heads.scope_result import ScopeResult
from biasgym_lens.injection.artifact import Injection
from biasgym_lens.injection.catalogue import list_biases
from biasgym_lens.injection.config import InjectionConfig
from biasgym_lens.injection.training import inject
from biasgym_lens.study import benchmark_stage
from biasgym_lens.study.evaluate_steps import (
    bias_tables,
    mlp_tables,
    read_circuit_figure,
    read_injection_check,
    read_mlp_figure,
    read_roles,
    results_document,
    sample_generations,
    scope_tables,
    text_and_role_tables,
)
from biasgym_lens.study.folders import (
    STAGE_OUTPUTS,
    StudyError,
    bias_digest,
    check_only_ours,
    folder_kind,
    locked_session,
    refuse_dangerous_overwrite,
)
from biasgym_lens.study.removal_text import read_removals

logger = logging.getLogger(__name__)

__all__ = ["StudyPreset", "PRESETS", "InjectionDidNotTakeError", "Study"]


class InjectionDidNotTakeError(StudyError):
    """The injected token does not elicit its bias beyond the control groups: nothing to scope."""


@dataclass(frozen=True)
class StudyPreset:
    """Injection and scope settings of a study preset."""

    injection: InjectionConfig
    scope: ScopeConfig
    control_max_texts: int | None = 30
    generate_tokens: int = 40
    paragraphs: int = 32  # sampled paragraphs about the token (and, pooled, the real groups) per intervention
    paragraph_tokens: int = 48
    gate: bool = True  # stop before scope when the injection did not take (see biasgym_lens.evaluation.uptake)


PRESETS: dict[str, StudyPreset] = {
    "default": StudyPreset(InjectionConfig(), ScopeConfig()),
    "quick": StudyPreset(
        InjectionConfig(epochs=1, max_texts=16, evals_per_epoch=1, max_probes=8),
        ScopeConfig(
            score_probes=6, ablation_probes=1, ablation_controls=1, damage_candidates=6, ks=(1, 2, 4), random_draws=1,
            curve_passages=2, tune_passages=4, final_passages=4, mc_items=8, final_probes=4, steer_alphas=(1.0,), curve_probes=6,
            curve_controls=1,
        ),
        control_max_texts=4,
        generate_tokens=6,
        paragraphs=2,
        paragraph_tokens=6,
        gate=False,  # a smoke test of the machinery: its one-epoch injection may not take; the report says so
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
        dtype: The model's weights dtype (``"float32"``, ``"bfloat16"``, ``"float16"``).
        allow_weak_injection: Scope even when the injection did not take (see :mod:`biasgym_lens.evaluation.uptake`);
            by default the scope stage stops with :class:`InjectionDidNotTakeError`.
    """

    out: Path
    bias: str
    model_name: str = "smollm2"
    seed: int = 0
    preset: str = "default"
    dtype: str = "float32"
    allow_weak_injection: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    _digest: str | None = field(default=None, init=False, repr=False)  # of the bias file when the session began

    # ---------------------------------------------------------------------------------------- folder
    def identity(self) -> dict[str, Any]:
        return {"bias": self.bias, "model": self.model_name, "seed": self.seed, "preset": self.preset, "dtype": self.dtype}

    def check(self, *, overwrite: bool = False) -> str:
        """Validate the settings and the folder without touching anything.

        Returns:
            What :meth:`session` will do: ``"new"`` (absent or empty folder), ``"resume"`` (this same study)
            or ``"replace"`` (another study of this package, or a multi-seed study, with ``overwrite``: only its
            outputs are removed).

        Raises:
            StudyError: unknown preset or bias, a changed bias file, a folder that holds other files (never
                replaced, with or without ``overwrite``), another study or a multi-seed study without
                ``overwrite``, a multi-seed study holding a file biasgym did not write, or ``overwrite`` aimed at
                ``/``, the home folder, the working folder or one of its parents.
        """
        if self.preset not in PRESETS:
            raise StudyError(f"unknown preset {self.preset!r}; valid: {', '.join(PRESETS)}")
        bias_digest(self.bias)
        out = self.out
        kind = folder_kind(out)
        if overwrite:
            refuse_dangerous_overwrite(out)
        if kind == "new":
            return "new"
        if kind == "seeds":
            return self._replace_seeds(overwrite)
        if kind == "foreign":
            raise StudyError(
                f"output folder {out} holds files and no study of biasgym; nothing was changed. Choose another "
                "--out (--overwrite only ever replaces a study folder written by biasgym)"
            )
        held = self._held()
        if {"dtype": "float32", **held["identity"]} != self.identity():  # studies before dtype was recorded: float32
            if not overwrite:
                raise StudyError(
                    f"output folder {out} holds another study ({held['identity']}); pass --overwrite to replace "
                    "its outputs or choose another --out"
                )
            return "replace"
        if held.get("bias_sha256") not in (None, bias_digest(self.bias)):
            if not overwrite:
                raise StudyError(
                    f"bias file {self.bias} changed since the study in {out} started; pass --overwrite to start "
                    "the study again with the new file, or choose another --out"
                )
            return "replace"
        return "resume"

    def _replace_seeds(self, overwrite: bool) -> str:
        """A multi-seed study in the folder: replaced only with ``overwrite`` and only when all of it is ours."""
        if not overwrite:
            raise StudyError(
                f"output folder {self.out} holds a multi-seed study of biasgym (seeds.json); pass --overwrite to "
                "replace its outputs or choose another --out"
            )
        check_only_ours(self.out, "seeds")
        return "replace"

    @contextlib.contextmanager
    def session(self, *, overwrite: bool = False) -> Iterator[Study]:
        """Lock the folder for this process, prepare it (see :meth:`check`) and write ``study.json``.

        Only this package's own outputs are removed when a study is replaced
        (:func:`~biasgym_lens.study.folders.clear_outputs`); any other file in a study folder stays. A second
        process on the same folder gets a :class:`StudyError`. On resume, the times of the stages done before
        are kept.
        """
        with locked_session(self.out, lambda: self.check(overwrite=overwrite)) as action:
            if action == "resume":  # keep the times of the stages done before
                held = self._held().get("timings")
                self.timings = {**(held if isinstance(held, dict) else {}), **self.timings}
            self._digest = bias_digest(self.bias)
            self._write_manifest()
            yield self

    def _held(self) -> dict[str, Any]:
        path = self.out / "study.json"
        try:
            held = require(read_json(path, "study manifest"), ("identity",), path)
            require(held["identity"], ("bias", "model", "seed", "preset"), path)
        except ArtifactError as e:
            raise StudyError(f"{e} (not a study folder of this version; choose another --out)") from e
        return held

    def _write_manifest(self) -> None:
        data = {
            "identity": self.identity(), "bias_sha256": self._digest, "version": __version__,
            "timings": self.timings,
        }
        write_text_atomic(self.out / "study.json", dumps(data))

    def _timed(self, stage: str, t0: float) -> None:
        self.timings[stage] = round(time.perf_counter() - t0, 2)
        self._write_manifest()

    @classmethod
    def open(cls, out: str | os.PathLike[str]) -> Study:
        """The study held in an existing folder (as written by :meth:`session`).

        Raises:
            StudyError: no study there, or a damaged ``study.json``.
        """
        folder = Path(out)
        if not (folder / "study.json").is_file():
            raise StudyError(f"{folder} holds no study (no study.json); run `biasgym run` or `biasgym inject` first")
        held = cls(folder, "")._held()
        ident = held["identity"]
        timings = held.get("timings")
        return cls(
            folder, str(ident["bias"]), str(ident["model"]), int(ident["seed"]), str(ident["preset"]),
            str(ident.get("dtype", "float32")), timings=dict(timings) if isinstance(timings, dict) else {},
        )

    @property
    def preset_obj(self) -> StudyPreset:
        return PRESETS[self.preset]

    def has(self, stage: str) -> bool:
        """Whether ``stage`` is done: every one of its outputs exists (each is written atomically)."""
        return all((self.out / f).is_file() for f in STAGE_OUTPUTS[stage])

    def require(self, stage: str) -> None:
        if not self.has(stage):
            raise StudyError(f"{self.out} has no {stage} results yet; run `biasgym {stage} --out {self.out}` first")

    def run_stages(
        self, model: Model, *, images: Sequence[str] = ("png",), say: Callable[[str], Any] = logger.info,
        keep_report: bool = False, before_report: Callable[[], Any] | None = None,
    ) -> list[str]:
        """Run, in this folder's :meth:`session`, every stage not yet done (inject, scope, evaluate), then the
        report: always rewritten (``biasgym run`` does so), or with ``keep_report`` only when missing or when an
        earlier stage ran now.

        Args:
            model: The model (as :func:`~biasgym_lens.core.models.load_model` returns it).
            images: Static formats of the report's figures.
            say: Where each stage's one-line progress goes.
            keep_report: Keep a report written before.
            before_report: Called after evaluate, before the report (e.g. the optional benchmarks stage).

        Returns:
            The stages run, in order.

        Raises:
            InjectionDidNotTakeError: the scope stage's gate (see :meth:`run_scope`).
        """
        ran = []
        for stage in ("inject", "scope", "evaluate"):
            if self.has(stage):
                say(f"[{stage}] already done in {self.out}, skipping")
                continue
            say(f"[{stage}] ...")
            getattr(self, f"run_{stage}")(model)
            ran.append(stage)
        if before_report is not None:
            before_report()
        if not (keep_report and not ran and self.has("report")):
            self.run_report(images=images)
            ran.append("report")
        return ran

    # ---------------------------------------------------------------------------------------- stages
    def run_inject(self, model: Model, *, progress: bool = True) -> Injection:
        """Train the bias token and a control token (a different bias); a part already saved is kept."""
        t0 = time.perf_counter()
        cfg = InjectionConfig(**{**asdict(self.preset_obj.injection), "seed": self.seed})
        if (self.out / "injection" / "injection.json").is_file():
            inj = Injection.load(self.out / "injection", model)
        else:
            inj = inject(model, self.bias, config=cfg, progress=progress)
            inj.save(self.out / "injection")
        if not (self.out / "control_injection" / "injection.json").is_file():
            ctrl_cfg = InjectionConfig(
                **{**asdict(cfg), "token": "<ControlToken>", "max_texts": self.preset_obj.control_max_texts}
            )
            ctrl = inject(model, _control_bias(inj.bias), config=ctrl_cfg, progress=progress)
            ctrl.save(self.out / "control_injection")
        self._timed("inject", t0)
        return inj

    def run_scope(self, model: Model, *, progress: bool = True) -> ScopeResult:
        self.require("inject")
        t0 = time.perf_counter()
        inj = Injection.load(self.out / "injection", model)
        cfg = ScopeConfig(**{**asdict(self.preset_obj.scope), "seed": self.seed})
        check = check_injection(model, inj, max_probes=cfg.score_probes, seed=self.seed)
        write_text_atomic(self.out / "injection_check.json", dumps(check.to_dict()))
        logger.info("%s", check.message())
        if not check.took and self.preset_obj.gate and not self.allow_weak_injection:
            raise InjectionDidNotTakeError(check.message())
        res = scope(model, inj, cfg, progress=progress)
        res.save(self.out / "scope")
        self._timed("scope", t0)
        return res

    def run_evaluate(self, model: Model) -> dict[str, Any]:
        """Measure the injected model (:mod:`biasgym_lens.study.evaluate_steps`), write every table as CSV and,
        last, ``results.json``; returns what ``results.json`` holds."""
        self.require("scope")
        t0 = time.perf_counter()
        inj = Injection.load(self.out / "injection", model)
        ctrl = Injection.load(self.out / "control_injection", model)
        res = ScopeResult.load(self.out / "scope")
        tables = bias_tables(model, inj, ctrl, max_probes=self.preset_obj.scope.final_probes)
        gens = sample_generations(model, inj, res.chosen, self.preset_obj.generate_tokens)
        tables.update(scope_tables(inj, res))
        n, tokens = self.preset_obj.paragraphs, self.preset_obj.paragraph_tokens
        tables.update(text_and_role_tables(model, inj, res.chosen, n=n, max_new_tokens=tokens, seed=self.seed))
        tables.update(mlp_tables(model, inj, res))
        for name, table in tables.items():
            write_csv(table, self.out / f"{name}.csv")
        results = results_document(
            identity=self.identity(), inj=inj, ctrl=ctrl, res=res, tables=tables, generations=gens,
            injection_check=read_injection_check(self.out), timings=self.timings,
        )
        write_text_atomic(self.out / "results.json", dumps(results))  # last: its presence marks the stage done
        self._timed("evaluate", t0)
        return results

    def run_benchmarks(self, model: Model, settings: benchmark_stage.BenchmarkSettings, *, batch_size: int = 32) -> Any:
        """The optional stage: StereoSet and BBQ under every intervention of the scope, written to the folder
        (:func:`~biasgym_lens.study.benchmark_stage.run_benchmark_stage`); returns the measurements."""
        self.require("scope")
        t0 = time.perf_counter()
        result = benchmark_stage.run_benchmark_stage(model, self.out, settings, batch_size=batch_size)
        self._timed("benchmarks", t0)
        return result

    def run_report(self, *, images: Sequence[str] = ("png",)) -> Path:
        from biasgym_lens.study.report import study_figures, write_report

        self.require("evaluate")
        t0 = time.perf_counter()
        inj = Injection.load(self.out / "injection")
        res = ScopeResult.load(self.out / "scope")
        closest = read_csv(self.out / "closest_entities.csv", "closest-entity table")
        lens = read_csv(self.out / "logit_lens.csv", "logit-lens table")
        roles, circuit = read_roles(self.out, self.bias, res.chosen), read_circuit_figure(self.out, res)
        figures = study_figures(inj, res, closest=closest, lens=lens, roles=roles, circuit=circuit, mlp=read_mlp_figure(self.out))
        keys = ("identity", "provenance", "injection", "chosen_heads", "generations", "timings")
        path = self.out / "results.json"
        facts = require(read_json(path, "study results"), keys, path)
        facts = {**{k: facts.get(k) for k in (*keys, "injection_check", "scope_extra", "scope_decisions", "paragraphs")}, "timings": {**facts["timings"], **self.timings}}
        path = write_report(
            self.out, figures, title=f"BiasGym study: {self.bias} on {self.model_name}", summary=res.summary(),
            facts=facts, images=images, benchmarks=benchmark_stage.read_benchmark_tables(self.out),
            removals=read_removals(self.out),
        )
        self._timed("report", t0)
        return path
