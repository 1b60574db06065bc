"""Several injection seeds of one study, and the heads that come back (``biasgym run --seeds N``).

A multi-seed folder holds one ordinary :class:`~biasgym_lens.study.pipeline.Study` per seed in ``seed_<s>/``
(same stages, each resumable) and, at the top, ``seeds.json`` (what the folder holds: bias, model, seeds,
preset, dtype, version) and two stages of its own:

- **stability** (needs the model): every seed's ranking and chosen heads compared
  (:class:`~biasgym_lens.heads.seed_stability.SeedStability`) -> ``per_seed.csv``, ``overlap.csv``,
  ``membership.csv``, ``stable_heads.csv``; then the stable heads, the heads in the top k of more than half of
  the seeds, ablated on every seed's test split (:func:`~biasgym_lens.heads.seed_stability.measure_heads`) ->
  ``stable_measures.csv``, written last. The stable set is chosen from the seeds' rankings and chosen counts,
  which only the select and tune probes and passages shaped, so its measure on each seed's test split (probes
  and passages no choice saw) is a held-out one.
- **page** (no model): ``figures/seed_stability.html`` and ``seeds.html`` (:mod:`biasgym_lens.study.seed_report`).

A run interrupted anywhere resumes where it stopped: each seed's study skips its done stages (and keeps its
report), and the stability stage is redone only when missing or when a seed's injection or scope had to be
(re)made. The folder rules are a study's (:mod:`biasgym_lens.study.folders`), stricter in one way: a multi-seed
folder, or a seed folder in it, holding any file biasgym did not write is refused before anything changes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from biasgym_lens._version import __version__
from biasgym_lens.core.files import (
    ArtifactError,
    dumps,
    read_json,
    remove_outputs,
    require,
    write_csv,
    write_text_atomic,
)
from biasgym_lens.core.protocols import Model
from biasgym_lens.heads.scope_result import ScopeResult
from biasgym_lens.heads.seed_stability import SeedStability
from biasgym_lens.injection.artifact import Injection
from biasgym_lens.study.evaluate_steps import read_injection_check
from biasgym_lens.study.folders import (
    SEEDS_MANIFEST,
    StudyError,
    bias_digest,
    check_only_ours,
    folder_kind,
    locked_session,
    refuse_dangerous_overwrite,
    seed_folder,
)
from biasgym_lens.study.pipeline import PRESETS, Study
from biasgym_lens.study.seed_report import TABLE_FILES, SeedTables, write_seed_report

logger = logging.getLogger(__name__)

__all__ = ["SeedStudy", "SEED_STAGE_OUTPUTS"]

SEED_STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "stability": tuple(TABLE_FILES),
    "page": ("figures", "seeds.html"),
}
"""The top-level outputs of each stage of a multi-seed study (the last one listed is written last)."""


@dataclass
class SeedStudy:
    """A multi-seed study folder: one :class:`~biasgym_lens.study.pipeline.Study` per injection seed, and the
    stability of their heads.

    Attributes:
        out: The folder.
        bias: Bias name or bias file.
        seeds: Distinct non-negative injection seeds, at least two (each also seeds its study's baselines).
        model_name: Model name for ``load_model``.
        preset: ``"default"`` or ``"quick"``.
        dtype: The model's weights dtype.
        allow_weak_injection: Passed to every seed's study.

    Examples:
        >>> SeedStudy.consecutive("results/late_seeds", "late", 3, first=5).seeds
        (5, 6, 7)
    """

    out: Path
    bias: str
    seeds: tuple[int, ...]
    model_name: str = "smollm2"
    preset: str = "default"
    dtype: str = "float32"
    allow_weak_injection: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    _digest: str | None = field(default=None, init=False, repr=False)
    _overwrite: bool = field(default=False, init=False, repr=False)
    _active: bool = field(default=False, init=False, repr=False)  # inside session(): seeds.json may be rewritten

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if isinstance(self.seeds, (list, tuple, range)):
            self.seeds = tuple(self.seeds)

    @classmethod
    def consecutive(cls, out: str | os.PathLike[str], bias: str, n: int, *, first: int = 0, **settings: Any) -> SeedStudy:
        """The study of seeds ``first, first + 1, ..., first + n - 1`` (``biasgym run --seed first --seeds n``).

        Raises:
            StudyError: ``n`` below 2 or not an integer, ``first`` negative or not an integer.
        """
        for name, value, low in (("--seeds", n, 2), ("--seed", first, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise StudyError(f"{name} must be an integer >= {low}, got {value!r}")
        return cls(Path(out), bias, tuple(range(first, first + n)), **settings)

    # ---------------------------------------------------------------------------------------- folder
    def identity(self) -> dict[str, Any]:
        """What makes two multi-seed studies the same: bias, model, seeds, preset and dtype."""
        return {"bias": self.bias, "model": self.model_name, "seeds": list(self.seeds), "preset": self.preset, "dtype": self.dtype}

    def studies(self) -> list[Study]:
        """Every seed's study, in ``out/seed_<s>``, in seed order as given."""
        return [
            Study(seed_folder(self.out, s), self.bias, self.model_name, s, self.preset, self.dtype, self.allow_weak_injection)
            for s in self.seeds
        ]

    def check(self, *, overwrite: bool = False) -> str:
        """Validate the settings, the folder and every seed's folder without touching anything.

        Returns:
            What :meth:`session` will do: ``"new"`` (absent or empty folder), ``"resume"`` (this same multi-seed
            study) or ``"replace"`` (another multi-seed or single-seed study of this package, with ``overwrite``:
            only its outputs are removed).

        Raises:
            StudyError: fewer than two seeds, a repeated or negative seed, an unknown preset or bias, a changed
                bias file without ``overwrite``, a folder or seed folder holding a file biasgym did not write
                (never replaced, with or without ``overwrite``), another study without ``overwrite``, a seed
                folder its own study refuses, or ``overwrite`` aimed at ``/``, home, the working folder or above.
        """
        self._check_seeds()
        if self.preset not in PRESETS:
            raise StudyError(f"unknown preset {self.preset!r}; valid: {', '.join(PRESETS)}")
        digest = bias_digest(self.bias)
        kind = folder_kind(self.out)
        if overwrite:
            refuse_dangerous_overwrite(self.out)
        action = self._action(kind, digest, overwrite)
        if action == "resume":
            for study in self.studies():
                study.check(overwrite=overwrite)
        return action

    def _check_seeds(self) -> None:
        seeds = self.seeds
        if not isinstance(seeds, tuple) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
            raise StudyError(f"seeds must be non-negative integers, got {seeds!r}")
        if len(seeds) < 2:
            raise StudyError(f"a multi-seed study needs at least 2 seeds, got {list(seeds)}; one seed is a single study")
        if len(set(seeds)) != len(seeds):
            raise StudyError(f"seeds must be distinct, got {list(seeds)}")

    def _action(self, kind: str, digest: str | None, overwrite: bool) -> str:
        if kind == "new":
            return "new"
        if kind == "foreign":
            raise StudyError(
                f"output folder {self.out} holds files and no study of biasgym; nothing was changed. Choose another "
                "--out (--overwrite only ever replaces a study folder written by biasgym)"
            )
        check_only_ours(self.out, kind)
        if kind == "study":
            other = "a single-seed study (study.json)"
        else:
            held = self._held()
            if held["identity"] == self.identity():
                if held.get("bias_sha256") == digest:
                    return "resume"
                other = f"a multi-seed study whose bias file {self.bias} changed since it started"
            else:
                other = f"another multi-seed study ({held['identity']})"
        if not overwrite:
            raise StudyError(f"output folder {self.out} holds {other}; pass --overwrite to replace its outputs or choose another --out")
        return "replace"

    def _held(self) -> dict[str, Any]:
        path = self.out / SEEDS_MANIFEST
        try:
            held = require(read_json(path, "multi-seed manifest"), ("identity",), path)
            require(held["identity"], ("bias", "model", "seeds", "preset", "dtype"), path)
        except ArtifactError as e:
            raise StudyError(f"{e} (not a multi-seed folder of this version; choose another --out)") from e
        return held

    @contextlib.contextmanager
    def session(self, *, overwrite: bool = False) -> Iterator[SeedStudy]:
        """Lock the folder for this process, prepare it (see :meth:`check`) and write ``seeds.json``.

        Raises:
            StudyError: as :meth:`check`, the folder cannot be created, or another process holds it.
        """
        with locked_session(self.out, lambda: self.check(overwrite=overwrite)) as action:
            if action == "resume":  # keep the times of the stages done before
                held = self._held().get("timings")
                self.timings = {**(held if isinstance(held, dict) else {}), **self.timings}
            self._digest, self._overwrite = bias_digest(self.bias), overwrite
            self._write_manifest()
            self._active = True
            try:
                yield self
            finally:
                self._active = False

    def _write_manifest(self) -> None:
        data = {"identity": self.identity(), "bias_sha256": self._digest, "version": __version__, "timings": self.timings}
        write_text_atomic(self.out / SEEDS_MANIFEST, dumps(data))

    @classmethod
    def open(cls, out: str | os.PathLike[str]) -> SeedStudy:
        """The multi-seed study held in an existing folder (as written by :meth:`session`).

        Raises:
            StudyError: no multi-seed study there, or a damaged ``seeds.json``.
        """
        folder = Path(out)
        if not (folder / SEEDS_MANIFEST).is_file():
            raise StudyError(f"{folder} holds no multi-seed study (no {SEEDS_MANIFEST}); run `biasgym run --seeds N` first")
        ident = cls(folder, "", ())._held()["identity"]
        return cls(
            folder, str(ident["bias"]), tuple(int(s) for s in ident["seeds"]), str(ident["model"]),
            str(ident["preset"]), str(ident["dtype"]),
        )

    def has(self, stage: str) -> bool:
        """Whether the multi-seed stage ``stage`` (``"stability"``, ``"page"``) is done: all its outputs exist."""
        return all((self.out / f).exists() for f in SEED_STAGE_OUTPUTS[stage])

    # ---------------------------------------------------------------------------------------- stages
    def run(self, model: Model, *, images: Sequence[str] = ("png",), say: Callable[[str], Any] = logger.info) -> Path:
        """Inside :meth:`session`: every seed's study (its stages not yet done), then the stability stage and
        the page, each unless already done; returns the page's path.

        Raises:
            InjectionDidNotTakeError: a seed's injection did not take (see ``allow_weak_injection``).
        """
        studies = self.studies()
        if not all(s.has("inject") and s.has("scope") for s in studies):  # a seed's heads may change
            remove_outputs(self.out, [*SEED_STAGE_OUTPUTS["stability"], *SEED_STAGE_OUTPUTS["page"]])
        for study in studies:
            say(f"== seed {study.seed}: {study.out}")
            with study.session(overwrite=self._overwrite):
                study.run_stages(model, images=images, say=say, keep_report=True)
        for stage in ("stability", "page"):
            if self.has(stage):
                say(f"[{stage}] already done in {self.out}, skipping")
                continue
            say(f"[{stage}] ...")
            if stage == "stability":
                self.run_stability(model)
            else:
                self.run_page(images=images)
        return self.out / "seeds.html"

    def run_stability(self, model: Model) -> SeedStability:
        """Compare the seeds' heads and measure the stable ones on every seed's test split; writes the tables
        of :data:`~biasgym_lens.study.seed_report.TABLE_FILES`, ``stable_measures.csv`` last.

        Raises:
            StudyError: a seed without its scope results.
        """
        studies = self.studies()
        for study in studies:
            study.require("scope")
        t0 = time.perf_counter()
        results = {s.seed: ScopeResult.load(s.out / "scope") for s in studies}
        stability = SeedStability.from_results(next(iter(results.values())).bias, results)
        injections = {s.seed: Injection.load(s.out / "injection", model) for s in studies}
        tables = SeedTables(
            stability.per_seed(), stability.overlap(), stability.membership(), stability.stable_table(),
            stability.stable_measures(model, injections),
        )
        for name in TABLE_FILES:  # in order: stable_measures.csv, the last, marks the stage done
            write_csv(tables.to_dataframe(_VIEWS[name]), self.out / name)
        self._timed("stability", t0)
        return stability

    def run_page(self, *, images: Sequence[str] = ("png",)) -> Path:
        """Write ``figures/seed_stability.html`` and ``seeds.html`` from the saved tables (no model needed)."""
        t0 = time.perf_counter()
        studies = self.studies()
        took = {s.seed: _took(s.out) for s in studies}
        links = {s.seed: f"{s.out.name}/report.html" for s in studies}
        subtitle = (
            f"bias {self.bias} · model {self.model_name} · seeds {', '.join(map(str, self.seeds))} · "
            f"{self.preset} preset · {self.dtype}"
        )
        path = write_seed_report(
            self.out, SeedTables.read(self.out), title=f"BiasGym over {len(self.seeds)} injection seeds: {self.bias}",
            subtitle=subtitle, took=took, links=links, images=images,
        )
        self._timed("page", t0)
        return path

    def _timed(self, stage: str, t0: float) -> None:
        self.timings[stage] = round(time.perf_counter() - t0, 2)
        if self._active:
            self._write_manifest()


_VIEWS = {
    "per_seed.csv": "per_seed", "overlap.csv": "overlap", "membership.csv": "membership", "stable_heads.csv": "stable",
    "stable_measures.csv": "measures",
}


def _took(folder: Path) -> bool | None:
    check = read_injection_check(folder)
    return None if not isinstance(check, dict) or "took" not in check else bool(check["took"])
