"""The ``biasgym`` command line (its shared plumbing is in :mod:`biasgym_lens.study.cli_common`)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from biasgym_lens._version import __version__
from biasgym_lens.study.cli_common import (
    POSITIVE,
    CliError,
    OneLineGroup,
    allow_weak_option,
    check_writable,
    folder_options,
    image_formats,
    image_options,
    load_cli_model,
    set_threads,
    study_options,
    user_errors,
)
from biasgym_lens.study.cli_stages import (
    benchmark_settings,
    benchmark_stage,
    benchmark_study,
    num,
    removals_study,
    run_seeds,
)


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="biasgym")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def main(verbose: bool) -> None:
    """BiasGym on TransformerLens: inject a bias on a fresh token, find its heads, remove them."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # the package reports its stages at INFO; other libraries stay at WARNING unless --verbose
    logging.getLogger("biasgym_lens").setLevel(logging.INFO)
    if verbose:
        logging.getLogger().setLevel(logging.INFO)


@main.command("list-models")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_models_cmd(as_json: bool) -> None:
    """List the bundled models and whether they are installed and cached."""
    from biasgym_lens.core.bundled_models import list_models

    rows = list_models()
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        state = ("installed" if r["installed"] else "not installed") + (", cached" if r["cached"] else "")
        click.echo(f"{r['name']:<12} {state:<24} {r['description']}")
        if not r["installed"]:
            click.echo(f"{'':<12} install: {r['install']}")
    click.echo("Any Hugging Face model id supported by TransformerLens, or a save_pretrained folder, also works.")


@main.command()
@click.option("--model", default="smollm2", show_default=True, help="Bundled key, Hub id or folder.")
@click.option("--prompt", default="People from Italy are", show_default=True)
@click.option("--top", default=10, show_default=True, type=POSITIVE, help="How many next tokens to show.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available).")
@click.option("--threads", default=None, type=POSITIVE, help="torch CPU threads.")
@user_errors
def demo(model: str, prompt: str, top: int, device: str | None, threads: int | None) -> None:
    """Load a model and print its top next tokens for a prompt."""
    import torch

    from biasgym_lens.core.models import model_info
    from biasgym_lens.core.tokens import tokenize

    set_threads(threads)
    if not prompt.strip():
        raise CliError(f"--prompt must contain some text, got {prompt!r}")
    m = load_cli_model(model, device)
    batch = tokenize(m, [prompt])
    with torch.no_grad():
        logits = m(batch.input_ids, attention_mask=batch.attention_mask)[0, -1]
    probs = logits.float().softmax(-1)
    values, ids = probs.topk(min(top, probs.shape[-1]))
    info = model_info(m)
    click.echo(f"{info.name} ({info.official_name}), prompt {prompt!r}:")
    for p, i in zip(values.tolist(), ids.tolist()):
        click.echo(f"  {m.tokenizer.decode([i])!r:<16} {p:.3f}")


@main.command("audit")
@click.option("--bias", required=True, help="A catalogue bias (see list-biases) or a bias file.")
@click.option("--model", default="smollm2", show_default=True, help="Bundled key, Hub id or folder.")
@click.option("--top", default=10, show_default=True, type=POSITIVE, help="Rows to print from each end.")
@click.option("--csv", "csv_path", default=None, type=click.Path(dir_okay=False), help="Write the full table here.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available).")
@click.option("--threads", default=None, type=POSITIVE, help="torch CPU threads.")
@user_errors
def audit_cmd(bias: str, model: str, top: int, csv_path: str | None, device: str | None, threads: int | None) -> None:
    """Rank 45 countries by how strongly the unmodified model ties them to a bias."""
    from biasgym_lens.core.files import write_csv
    from biasgym_lens.evaluation.elicit import audit
    from biasgym_lens.injection.catalogue import load_bias

    set_threads(threads)
    spec = load_bias(bias)
    if csv_path:
        check_writable(csv_path)  # before the model runs, not after
    m = load_cli_model(model, device)
    df = audit(m, spec)
    if csv_path:
        write_csv(df, csv_path)
    shown = df if len(df) <= 2 * top else df.iloc[list(range(top)) + list(range(len(df) - top, len(df)))]
    click.echo(f"{spec.name}: {spec.description} (bias logit difference on all {len(spec.probes)} probes, nats)")
    click.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


# ------------------------------------------------------------------------------------------------ study


def _new_study(bias: str, out: str | None, model: str, seed: int, quick: bool, dtype: str, allow_weak: bool = False):
    from biasgym_lens.study.pipeline import Study

    folder = Path(out) if out else Path("results") / Path(bias).stem
    return Study(folder, bias, model, seed, "quick" if quick else "default", dtype, allow_weak)


@main.command("list-biases")
def list_biases_cmd() -> None:
    """List the bias catalogue."""
    from biasgym_lens.injection.catalogue import list_biases, load_bias

    for name in list_biases():
        spec = load_bias(name)
        click.echo(f"{name:<12} {spec.description}  (real groups: {', '.join(spec.real_groups)})")


@main.command()
@click.option("--bias", default="bad_driving", show_default=True, help="A catalogue bias (see list-biases) or a bias file (.json).")
@study_options
@click.option("--overwrite", is_flag=True, help="Replace the outputs of another study in --out (never other files).")
@image_options
@allow_weak_option
@click.option(
    "--seeds", "n_seeds", default=None, type=int,
    help="Run N >= 2 injection seeds (--seed, --seed+1, ...): one study each in OUT/seed_<s>, then the heads "
    "stable across them, measured on each seed's test split (seeds.html). 1 or absent: one study.",
)
@click.option("--benchmarks", default=None, metavar="NAMES",
              help="Also measure standard bias benchmarks under every intervention, after evaluate: comma-separated "
              "stereoset_race, bbq_nationality, bbq_religion, or all.")
@click.option("--benchmark-items", default=None, type=POSITIVE,
              help="With --benchmarks: a seeded stratified subset of this many items per benchmark [all items].")
@user_errors
def run(
    bias, out, model, quick, seed, dtype, device, device_map, threads, overwrite, no_png, svg, allow_weak_injection, n_seeds,
    benchmarks, benchmark_items,
) -> None:
    """The whole study: inject -> scope -> evaluate [-> benchmarks] -> report (resumes an interrupted run in the
    same folder)."""
    set_threads(threads)
    bench = benchmark_settings(benchmarks, benchmark_items, seed)  # a bad name stops here, before anything
    if n_seeds is not None and n_seeds < 1:
        raise CliError(f"--seeds must be a number of injection seeds, at least 2 (1 or absent: one study), got {n_seeds}")
    if n_seeds is not None and n_seeds > 1:
        if bench is not None:
            raise CliError("--benchmarks runs on one study; after --seeds, run `biasgym benchmark --out OUT/seed_<s>`")
        run_seeds(bias, out, model, quick, seed, dtype, device, device_map, overwrite, image_formats(no_png, svg),
                   allow_weak_injection, n_seeds)
        return
    study = _new_study(bias, out, model, seed, quick, dtype, allow_weak_injection)
    study.check(overwrite=overwrite)  # validate everything before the model loads and before any file changes
    m = load_cli_model(study.model_name, device, dtype=dtype, device_map=device_map)
    with study.session(overwrite=overwrite):
        before_report = (lambda: benchmark_stage(study, m, bench)) if bench is not None else None
        study.run_stages(m, images=image_formats(no_png, svg), say=click.echo, before_report=before_report)
    path = study.out / "report.html"
    _print_summary(study)
    click.echo(f"report: {path}")


@main.command("inject")
@click.option("--bias", default="bad_driving", show_default=True, help="A catalogue bias or a bias file (.json).")
@study_options
@click.option("--overwrite", is_flag=True, help="Replace the outputs of another study in --out (never other files).")
@user_errors
def inject_cmd(bias, out, model, quick, seed, dtype, device, device_map, threads, overwrite) -> None:
    """Train the bias token (writes OUT/injection and OUT/control_injection)."""
    set_threads(threads)
    study = _new_study(bias, out, model, seed, quick, dtype)
    study.check(overwrite=overwrite)
    m = load_cli_model(study.model_name, device, dtype=dtype, device_map=device_map)
    with study.session(overwrite=overwrite):
        study.run_inject(m)
    click.echo(f"injection saved in {study.out / 'injection'}")


def _stage_command(
    stage: str, out: str, device: str | None, device_map: str | None, threads: int | None, allow_weak: bool = False
) -> Any:
    from biasgym_lens.study.pipeline import Study

    set_threads(threads)
    study = Study.open(out)
    study.allow_weak_injection = allow_weak
    study.require({"scope": "inject", "evaluate": "scope"}[stage])
    m = load_cli_model(study.model_name, device, dtype=study.dtype, device_map=device_map)
    with study.session():
        return getattr(study, f"run_{stage}")(m)


@main.command("scope")
@folder_options
@allow_weak_option
@user_errors
def scope_cmd(out, device, device_map, threads, allow_weak_injection) -> None:
    """Score, choose and intervene on heads for the study in OUT (needs its injection)."""
    _stage_command("scope", out, device, device_map, threads, allow_weak_injection)
    click.echo(f"scope saved in {Path(out) / 'scope'}")


@main.command("evaluate")
@folder_options
@user_errors
def evaluate_cmd(out, device, device_map, threads) -> None:
    """Elicitation, closest entities, logit lens, generations and results.json for the study in OUT."""
    from biasgym_lens.study.pipeline import Study

    _stage_command("evaluate", out, device, device_map, threads)
    _print_summary(Study.open(out))


@main.command("report")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="A study folder.")
@image_options
@user_errors
def report_cmd(out, no_png, svg) -> None:
    """Figures (HTML, PNG) and report.html from the saved results in OUT (no model needed)."""
    from biasgym_lens.study.pipeline import Study

    study = Study.open(out)
    study.require("evaluate")
    with study.session():
        path = study.run_report(images=image_formats(no_png, svg))
    click.echo(f"report: {path}")


# ------------------------------------------------------------------------------------------------ benchmark


def _parse_heads(text: str) -> list[tuple[int, int]]:
    heads = []
    for part in text.split(","):
        layer, dot, head = part.strip().partition(".")
        if not (dot and layer.isdigit() and head.isdigit()):
            raise CliError(f"--heads: {part.strip()!r} is not LAYER.HEAD (e.g. --heads 21.1,25.6)")
        heads.append((int(layer), int(head)))
    return heads


@main.command("benchmark")
@click.option("--name", "names", multiple=True,
              type=click.Choice(["stereoset_race", "bbq_nationality", "bbq_religion", "all"]),
              help="stereoset_race, bbq_nationality, bbq_religion or all (repeat for several; with --out: all by default).")
@click.option("--out", "study_out", default=None, type=click.Path(file_okay=False),
              help="A study folder: measure under each of its interventions and save them in it (its model and seed).")
@click.option("--model", default="smollm2", show_default=True, help="Bundled key, Hub id or folder.")
@click.option("--max-items", default=None, type=POSITIVE, help="Seeded stratified subset of this many items.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the subset and the bootstrap (with --out: the study's seed unless given).")
@click.option("--heads", default=None, help='Zero-ablate these heads, "LAYER.HEAD,..." (e.g. "21.1,25.6").')
@click.option("--with-base", is_flag=True, help="With --heads: also measure the unmodified model.")
@click.option("--score", default="sum", show_default=True, type=click.Choice(["sum", "mean"]),
              help="Compare summed or per-token mean log-probabilities.")
@click.option("--batch-size", default=32, show_default=True, type=POSITIVE)
@click.option("--csv", "csv_path", default=None, type=click.Path(dir_okay=False), help="Write the table here.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available).")
@click.option("--threads", default=None, type=POSITIVE, help="torch CPU threads.")
@user_errors
def benchmark_cmd(names, study_out, model, max_items, seed, heads, with_base, score, batch_size, csv_path, device, threads) -> None:
    """Standard bias benchmarks (StereoSet race, BBQ) with 95% intervals, optionally with heads ablated, or
    under every intervention of a study (--out)."""
    import pandas as pd

    from biasgym_lens.core.files import write_csv
    from biasgym_lens.evaluation.benchmarks import BENCHMARK_NAMES, benchmark
    from biasgym_lens.heads.interventions import ablate_heads, validate_heads

    set_threads(threads)
    names = tuple(dict.fromkeys(n for name in names for n in (BENCHMARK_NAMES if name == "all" else (name,))))
    if study_out is not None:
        return benchmark_study(study_out, names, max_items, seed, score, batch_size, csv_path, device)
    if not names:
        raise CliError("give --name (stereoset_race, bbq_nationality, bbq_religion or all), or --out STUDY")
    ablated = _parse_heads(heads) if heads else None
    if csv_path:
        check_writable(csv_path)
    m = load_cli_model(model, device)
    if ablated is not None:
        validate_heads(m, ablated)  # before any benchmark runs
    runs = [("none", None)] if ablated is None or with_base else []
    if ablated is not None:
        runs.append((f"zero {heads}", lambda: ablate_heads(m, ablated)))
    tables = []
    for name in names:
        for label, intervention in runs:
            res = benchmark(m, name, intervention, max_items=max_items, seed=seed, batch_size=batch_size,
                            score=score, label=label)
            click.echo(f"{name} [{label}]: {res.settings['n_items']} items, {res.seconds:.1f} s")
            tables.append(res.to_dataframe())
    table = pd.concat(tables, ignore_index=True)
    if csv_path:
        write_csv(table, csv_path)
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


@main.command("removals")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="A study folder with its scope stage done.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available).")
@click.option("--threads", default=None, type=POSITIVE, help="torch CPU threads.")
@user_errors
def removals_cmd(out, device, threads) -> None:
    """Compare ways of changing the heads (zero, mean, scale, project out the bias direction, per-head
    steering) on the study's protocol: best test-probe cut within its budget, against random heads and steering."""
    set_threads(threads)
    removals_study(out, device)


def _print_summary(study) -> None:
    from biasgym_lens.core.files import read_json, require

    path = study.out / "results.json"
    if not path.is_file():
        return
    res = require(read_json(path, "study results"), ("chosen_heads", "summary"), path)
    check = res.get("injection_check")
    if check and not check.get("took"):
        click.echo(
            f"WARNING: the injection did not take (token excess {num(check['excess'], '+.3f')}, 95% CI "
            f"{num(check['ci_low'], '+.3f')} to {num(check['ci_high'], '+.3f')}): the cuts below measure noise"
        )
    click.echo(f"chosen heads: {res['chosen_heads']}")
    for row in res["summary"]:
        click.echo(
            f"  {row['intervention']:<13} token excess {num(row['token_excess'], '+.3f')}  cut "
            f"{num(row['excess_cut'], '+.0%')}  real-group gap {num(row['real_group_gap'], '+.3f')}  perplexity "
            f"{num(row['perplexity_increase'], '+.1%')}"
        )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
