"""The optional ``benchmarks`` stage of a study: StereoSet race and BBQ under every intervention of its scope.

It runs after ``evaluate`` and before ``report`` when asked for (``biasgym run --benchmarks ...``, or
``biasgym benchmark --out STUDY`` on a study folder), reads the study's injection and scope result, and writes
three files atomically: ``benchmark_differences.csv`` (the paired differences from no intervention),
``benchmarks.csv`` (every metric under every intervention) and, last, ``benchmarks.json`` (the settings, what
each intervention is and the time of each run), whose presence marks the stage done. A study resumed with the
same benchmark settings keeps them; other settings measure again and replace these three files.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from biasgym_lens._version import __version__
from biasgym_lens.core.files import dumps, read_csv, read_json, write_csv, write_text_atomic
from biasgym_lens.core.protocols import Model
from biasgym_lens.evaluation.benchmarks import BENCHMARK_NAMES
from biasgym_lens.heads.scope_benchmarks import InterventionBenchmarks, benchmarks_under_interventions
from biasgym_lens.heads.scope_result import ScopeResult
from biasgym_lens.injection.artifact import Injection
from biasgym_lens.study.folders import BENCHMARK_OUTPUTS

__all__ = [
    "BENCHMARK_OUTPUTS",
    "BenchmarkSettings",
    "parse_benchmark_names",
    "benchmarks_done",
    "run_benchmark_stage",
    "read_benchmark_tables",
]


"""The files of the stage, in the order they are written (the last marks it done)."""


def parse_benchmark_names(text: str) -> tuple[str, ...]:
    """Comma-separated benchmark names, or ``all``: the names, each once, in the order given.

    Raises:
        ValueError: an unknown or empty name, naming it and the valid ones.
    """
    valid = (*BENCHMARK_NAMES, "all")
    parts = [p.strip() for p in str(text).split(",")]
    bad = [p for p in parts if p not in valid]
    if bad:
        raise ValueError(f"unknown benchmark {bad[0]!r} in {text!r}; valid: {', '.join(valid)} (comma-separated)")
    names = [n for p in parts for n in (BENCHMARK_NAMES if p == "all" else (p,))]
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class BenchmarkSettings:
    """What the stage measures: the settings that, when unchanged, let a resumed study keep its results.

    Attributes:
        names: The benchmarks (see :func:`parse_benchmark_names`).
        max_items: Items per benchmark (a seeded stratified subset, the same under every intervention); None: all.
        seed: Seed of the subset and of the bootstrap.
        score: ``"sum"`` or ``"mean"`` log-probabilities.
    """

    names: tuple[str, ...]
    max_items: int | None = None
    seed: int = 0
    score: str = "sum"

    def __post_init__(self) -> None:
        parse_benchmark_names(",".join(self.names) if self.names else "")
        if self.max_items is not None and (isinstance(self.max_items, bool) or self.max_items < 1):
            raise ValueError(f"max_items must be a positive number of items or None, got {self.max_items!r}")
        if self.score not in ("sum", "mean"):
            raise ValueError(f"score must be 'sum' or 'mean', got {self.score!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (``names`` as a list)."""
        return {**asdict(self), "names": list(self.names)}


def _held(out: Path) -> dict[str, Any] | None:
    path = out / BENCHMARK_OUTPUTS[-1]
    return read_json(path, "benchmark settings") if path.is_file() else None


def benchmarks_done(out: Path, settings: BenchmarkSettings) -> bool:
    """Whether the study in ``out`` holds every file of the stage, measured with these settings."""
    held = _held(out) if all((out / f).is_file() for f in BENCHMARK_OUTPUTS) else None
    return held is not None and held.get("settings") == settings.to_dict()


def run_benchmark_stage(
    model: Model, out: Path, settings: BenchmarkSettings, *, batch_size: int = 32
) -> InterventionBenchmarks:
    """Measure the benchmarks under every intervention of the study in ``out`` and write the stage's files.

    The stage's marker (``benchmarks.json``) is removed first and written last, so a stage interrupted while
    replacing earlier results counts as not done.

    Args:
        model: The study's model.
        out: The study folder (with ``injection/`` and ``scope/``).
        settings: What to measure.
        batch_size: Sequences per forward pass (not a setting of the results).

    Returns:
        The measurements (:func:`~biasgym_lens.heads.scope_benchmarks.benchmarks_under_interventions`).
    """
    inj = Injection.load(out / "injection", model)
    res = ScopeResult.load(out / "scope")
    result = benchmarks_under_interventions(
        model, inj, res, settings.names, max_items=settings.max_items, seed=settings.seed, score=settings.score,
        batch_size=batch_size,
    )
    with contextlib.suppress(FileNotFoundError):
        (out / BENCHMARK_OUTPUTS[-1]).unlink()  # the stage's own marker: written below, last
    write_csv(result.differences, out / BENCHMARK_OUTPUTS[0])
    write_csv(result.table, out / BENCHMARK_OUTPUTS[1])
    record = {
        "settings": settings.to_dict(), "batch_size": batch_size, "n_resamples": result.settings["n_resamples"],
        "interventions": result.settings["interventions"], "seconds": result.seconds.to_dict(orient="records"),
        "version": __version__,
    }
    write_text_atomic(out / BENCHMARK_OUTPUTS[-1], dumps(record))
    return result


def read_benchmark_tables(out: Path) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """``(table, differences)`` of a study whose benchmarks stage is done, else None."""
    if not all((out / f).is_file() for f in BENCHMARK_OUTPUTS):
        return None
    table = read_csv(out / BENCHMARK_OUTPUTS[1], "benchmark table", ("benchmark", "metric", "intervention", "value"))
    differences = read_csv(out / BENCHMARK_OUTPUTS[0], "benchmark differences", ("benchmark", "metric", "intervention"))
    return table, differences
