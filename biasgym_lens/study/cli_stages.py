"""The longer paths of the ``biasgym`` commands: several seeds (``run --seeds N``) and the benchmarks stage
(``run --benchmarks``, ``benchmark --out STUDY``), with what they print."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from biasgym_lens.study.cli_common import CliError, check_writable, load_cli_model

__all__ = ["run_seeds", "print_stability", "benchmark_settings", "benchmark_stage", "benchmark_study", "removals_study", "num"]


def run_seeds(bias, out, model, quick, seed, dtype, device, device_map, overwrite, images, allow_weak, n) -> None:
    """``run --seeds N``: every seed's study, the stability stage and seeds.html (see ``study.seed_study``)."""
    from biasgym_lens.study.seed_study import SeedStudy

    folder = Path(out) if out else Path("results") / Path(bias).stem
    multi = SeedStudy.consecutive(
        folder, bias, n, first=seed, model_name=model, preset="quick" if quick else "default", dtype=dtype,
        allow_weak_injection=allow_weak,
    )
    multi.check(overwrite=overwrite)  # every seed folder too, before the model loads and before any file changes
    m = load_cli_model(multi.model_name, device, dtype=dtype, device_map=device_map)
    with multi.session(overwrite=overwrite):
        path = multi.run(m, images=images, say=click.echo)
    print_stability(multi.out)
    click.echo(f"report: {path}")



def print_stability(out: Path) -> None:
    from biasgym_lens.study.seed_report import SeedTables

    tables = SeedTables.read(out)
    labels = " ".join(tables.stable["label"]) or "none"
    click.echo(f"heads in the top {tables.k} of more than half of the seeds: {labels}")
    for row in tables.measures.to_dict("records"):
        click.echo(
            f"  seed {row['seed']}: stable heads cut {num(row['excess_cut'], '+.0%')} of the token's excess, "
            f"perplexity {num(row['perplexity_increase'], '+.1%')} (test split)"
        )



def benchmark_settings(names: str | None, items: int | None, seed: int) -> Any:
    """The benchmarks stage's settings from ``--benchmarks`` and ``--benchmark-items`` (None: no stage)."""
    from biasgym_lens.study.benchmark_stage import BenchmarkSettings, parse_benchmark_names

    if names is None:
        if items is not None:
            raise CliError("--benchmark-items needs --benchmarks (e.g. --benchmarks all --benchmark-items 200)")
        return None
    return BenchmarkSettings(parse_benchmark_names(names), items, seed)



def benchmark_stage(study, m, settings, *, batch_size: int = 32, again: bool = False) -> Any:
    """Run the benchmarks stage unless it is done with these settings (``again``: run it anyway); prints the
    time of each benchmark under each intervention."""
    from biasgym_lens.study.benchmark_stage import benchmarks_done

    if not again and benchmarks_done(study.out, settings):
        click.echo(f"[benchmarks] already done in {study.out} with these settings, skipping")
        return None
    click.echo(f"[benchmarks] {', '.join(settings.names)} under every intervention ...")
    result = study.run_benchmarks(m, settings, batch_size=batch_size)
    for name, sub in result.seconds.groupby("benchmark", sort=False):
        times = ", ".join(f"{r.intervention} {r.seconds:.2f} s" for r in sub.itertuples())
        click.echo(f"  {name} ({result.table.query('benchmark == @name')['n_items'].iloc[0]} items): {times}")
    return result



def benchmark_study(out, names, max_items, seed, score, batch_size, csv_path, device) -> None:
    """``biasgym benchmark --out STUDY``: the study's benchmarks stage, measured (again) with these settings."""
    from click.core import ParameterSource

    from biasgym_lens.core.files import write_csv
    from biasgym_lens.evaluation.benchmarks import BENCHMARK_NAMES
    from biasgym_lens.study.benchmark_stage import BenchmarkSettings
    from biasgym_lens.study.pipeline import Study

    ctx = click.get_current_context()
    for option in ("model", "heads", "with_base"):
        if ctx.get_parameter_source(option) == ParameterSource.COMMANDLINE:
            raise CliError(f"--{option.replace('_', '-')} does not apply with --out: the study's model is measured "
                           "under each of its own interventions")
    study = Study.open(out)
    study.require("scope")
    given = ctx.get_parameter_source("seed") == ParameterSource.COMMANDLINE
    settings = BenchmarkSettings(names or BENCHMARK_NAMES, max_items, seed if given else study.seed, score)
    if csv_path:
        check_writable(csv_path)
    m = load_cli_model(study.model_name, device, dtype=study.dtype)
    with study.session():
        result = benchmark_stage(study, m, settings, batch_size=batch_size, again=True)
    if csv_path:
        write_csv(result.table, csv_path)
    click.echo(result.table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    click.echo(f"benchmarks saved in {Path(out) / 'benchmarks.csv'}; `biasgym report --out {out}` adds them to the report")



def removals_study(out, device) -> None:
    """``biasgym removals --out STUDY``: the kinds of head change compared on the study's protocol
    (:func:`~biasgym_lens.heads.removal.compare_removals`), saved in ``STUDY/removals``."""
    from biasgym_lens.heads.removal import compare_removals
    from biasgym_lens.heads.scope_result import ScopeResult
    from biasgym_lens.injection.artifact import Injection
    from biasgym_lens.study.pipeline import Study

    study = Study.open(out)
    study.require("scope")
    m = load_cli_model(study.model_name, device, dtype=study.dtype)
    with study.session():
        inj = Injection.load(study.out / "injection", m)
        comparison = compare_removals(m, inj, ScopeResult.load(study.out / "scope"))
        comparison.save(study.out / "removals")
    cols = ["kind", "param", "k", "heads", "excess_cut", "excess_cut_ci_low", "excess_cut_ci_high",
            "perplexity_increase", "random_cut", "steering_cut", "p_vs_random", "p_vs_steering"]
    click.echo(comparison.table()[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    click.echo(f"saved in {study.out / 'removals'}")


def num(v: Any, fmt: str) -> str:
    """A number for the summary lines; JSON ``null`` (not measurable) as ``n/a``."""
    return "n/a" if v is None else format(v, fmt)
