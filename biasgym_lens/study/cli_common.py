"""The plumbing shared by the ``biasgym`` commands: one-line errors, shared options, model loading, path checks.

A user's mistake (a bad option value, an unknown model, a damaged or foreign file, a path that cannot be
written) is printed as one line with exit code 2; ``-v`` shows the traceback instead. The commands themselves
are in :mod:`biasgym_lens.study.cli`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

__all__ = [
    "CliError",
    "OneLineGroup",
    "POSITIVE",
    "DTYPE",
    "set_threads",
    "user_errors",
    "is_verbose",
    "one_line",
    "model_options",
    "study_options",
    "folder_options",
    "image_options",
    "allow_weak_option",
    "image_formats",
    "load_cli_model",
    "check_writable",
]


class CliError(click.ClickException):
    """A user mistake: printed as one line, exit code 2."""

    exit_code = 2


def set_threads(n: int | None) -> None:
    """Set torch's CPU threads when ``--threads`` was given (torch is imported only then)."""
    import torch

    if n is not None:
        torch.set_num_threads(n)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the package's user-facing errors into one line on stderr and exit code 2 (``-v``: the traceback).

    User mistakes and damaged or foreign files raise ``ValueError`` subclasses (bad settings, a changed bias
    file, a model mismatch, an artifact that fails its checks) or ``OSError`` (a path that cannot be read or
    written); everything else is a bug and keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError) as e:
            if is_verbose():
                raise
            raise CliError(one_line(e)) from e

    return wrapper


def is_verbose() -> bool:
    """Whether the command line asked for ``-v``/``--verbose`` (False outside a click command)."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("verbose"))


def one_line(e: BaseException) -> str:
    """An exception's message on one line, with the file name of an ``OSError`` when the message lacks it."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return text


POSITIVE = click.IntRange(min=1)


class OneLineGroup(click.Group):
    """A command group whose usage errors (bad option values, unknown options) are one line, exit code 2."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            raise _usage(e) from e

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            raise _usage(e) from e


def _usage(e: click.UsageError) -> click.ClickException:
    from click.exceptions import NoArgsIsHelpError

    if isinstance(e, NoArgsIsHelpError):  # `biasgym` alone prints the help, as usual
        return e
    where = e.ctx.command_path if e.ctx else "biasgym"
    return CliError(f"{' '.join(e.format_message().split())} (see '{where} --help')")


# ------------------------------------------------------------------------------------------------ options


def model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--device`` and ``--device-map``."""
    f = click.option(
        "--device-map", default=None,
        help="Spread a model too large for one card over several ('auto', as transformers does with accelerate); exclusive with --device.",
    )(f)
    f = click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available).")(f)
    return f


DTYPE = click.Choice(["float32", "bfloat16", "float16"])


def study_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options of a command that starts a study: ``--out --model --quick --seed --dtype``, the model's
    placement and ``--threads``."""
    f = click.option("--threads", default=None, type=POSITIVE, help="torch CPU threads (default: torch's choice).")(f)
    f = model_options(f)
    f = click.option("--dtype", default="float32", show_default=True, type=DTYPE, help="Weights dtype of the model.")(f)
    f = click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the injection and baselines.")(f)
    f = click.option("--quick", is_flag=True, help="Small settings for a smoke test (about a minute on the bundled model on 2 CPU cores).")(f)
    f = click.option("--model", default="smollm2", show_default=True, help="Bundled key, Hub id or folder.")(f)
    f = click.option("--out", default=None, type=click.Path(file_okay=False), help="Output folder [results/BIAS].")(f)
    return f


def folder_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options of a command that continues the study in ``--out``: the model's placement and ``--threads``."""
    f = click.option("--threads", default=None, type=POSITIVE, help="torch CPU threads.")(f)
    f = model_options(f)
    f = click.option("--out", required=True, type=click.Path(file_okay=False), help="A study folder.")(f)
    return f


def image_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--no-png`` and ``--svg`` (see :func:`image_formats`)."""
    f = click.option("--svg", is_flag=True, help="Also export every figure as SVG (needs Chromium, like PNG).")(f)
    f = click.option("--no-png", is_flag=True, help="Skip PNG export (HTML figures and report only).")(f)
    return f


def allow_weak_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--allow-weak-injection``."""
    return click.option(
        "--allow-weak-injection", is_flag=True,
        help="Scope even when the injection did not take (its token excess interval reaches zero); "
        "by default the study stops there with a one-line message.",
    )(f)


def image_formats(no_png: bool, svg: bool) -> tuple[str, ...]:
    """The image formats to export besides HTML, from ``--no-png`` and ``--svg``."""
    return (() if no_png else ("png",)) + (("svg",) if svg else ())


# ------------------------------------------------------------------------------------------------ checks


def load_cli_model(name: str, device: str | None, *, dtype: str | None = None, device_map: str | None = None) -> Any:
    """Load a model for a command; any failure to load is the user's model name or files: one line, exit 2."""
    from biasgym_lens.core.bundled_models import ModelLoadError
    from biasgym_lens.core.models import load_model

    try:
        return load_model(name, device=device, dtype=dtype, device_map=device_map)
    except ModelLoadError as e:
        raise CliError(str(e)) from e
    except Exception as e:  # truncated weights, a foreign folder, a Hub id offline, ...
        if is_verbose():
            raise
        raise CliError(f"could not load model {name!r}: {one_line(e)}") from e


def check_writable(path: str) -> None:
    """Fail before any work when a file cannot be written at ``path``."""
    p = Path(path)
    if p.is_dir():
        raise CliError(f"{path} is a folder; give a file name")
    if not p.parent.is_dir():
        raise CliError(f"cannot write {path}: folder {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise CliError(f"cannot write {path}: permission denied")
