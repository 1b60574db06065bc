"""What a biasgym output folder may hold, and how it is locked, recognised and cleared.

Two kinds of folder are this package's: a study (``study.json``, see :class:`~biasgym_lens.study.pipeline.Study`)
and a multi-seed study (``seeds.json``, see :class:`~biasgym_lens.study.seed_study.SeedStudy`), whose
``seed_<s>`` subfolders are studies. :func:`folder_kind` tells them apart from an empty folder and from a
folder of someone else's files; :func:`clear_outputs` removes only the names this package writes
(:data:`OUTPUTS`, :data:`SEED_OUTPUTS`) and refuses, before removing anything, a multi-seed folder that holds a
file this package did not write. :func:`folder_lock` keeps a second process out of a busy folder and
:func:`refuse_dangerous_overwrite` keeps ``--overwrite`` away from ``/``, the home folder, the working folder
and its parents.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from biasgym_lens.core.files import remove_outputs, remove_path
from biasgym_lens.injection.catalogue import load_bias
from biasgym_lens.study.evaluate_steps import EVALUATE_TABLES

logger = logging.getLogger(__name__)

__all__ = [
    "StudyError",
    "LOCK_FILE",
    "STAGE_OUTPUTS",
    "OUTPUTS",
    "SEEDS_MANIFEST",
    "SEED_OUTPUTS",
    "seed_folder",
    "refuse_dangerous_overwrite",
    "folder_lock",
    "folder_kind",
    "foreign_entries",
    "check_only_ours",
    "clear_outputs",
    "locked_session",
    "bias_digest",
    "BENCHMARK_OUTPUTS",
]


class StudyError(ValueError):
    """A user-facing problem with a study folder or its settings."""


LOCK_FILE = ".biasgym.lock"

BENCHMARK_OUTPUTS = ("benchmark_differences.csv", "benchmarks.csv", "benchmarks.json")
"""The files of the optional benchmarks stage (:mod:`biasgym_lens.study.benchmark_stage`; the last is written last)."""

STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "inject": ("injection/injection.json", "control_injection/injection.json"),
    "scope": ("scope/scope.json",),
    "evaluate": (*(f"{t}.csv" for t in EVALUATE_TABLES), "results.json"),
    "report": ("report.html",),
    "benchmarks": BENCHMARK_OUTPUTS,  # optional, between evaluate and report
}
"""The files each stage of a study writes (the last one listed is written last)."""

OUTPUTS: tuple[str, ...] = (
    "study.json", "injection", "control_injection", "injection_check.json", "scope", *(f"{t}.csv" for t in EVALUATE_TABLES),
    "results.json", "figures", "report.html", *BENCHMARK_OUTPUTS, "removals",
)
"""Every top-level name a study writes in its folder: all that ``overwrite`` may ever remove."""

SEEDS_MANIFEST = "seeds.json"

SEED_OUTPUTS: tuple[str, ...] = (
    SEEDS_MANIFEST, "per_seed.csv", "overlap.csv", "membership.csv", "stable_heads.csv", "stable_measures.csv",
    "figures", "seeds.html",
)
"""Every top-level name a multi-seed study writes besides its ``seed_<s>`` study folders."""

_SEED_FOLDER = re.compile(r"seed_[0-9]+")


def seed_folder(out: Path, seed: int) -> Path:
    """The study folder of injection seed ``seed`` inside the multi-seed folder ``out``: ``out/seed_<seed>``."""
    return Path(out) / f"seed_{int(seed)}"


def refuse_dangerous_overwrite(out: Path) -> None:
    """Refuse ``overwrite`` aimed at ``/``, the home folder, the working folder or a folder above it.

    Raises:
        StudyError: ``out`` resolves to one of those.
    """
    target = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if target == Path(target.anchor) or target == Path.home().resolve() or target == cwd or target in cwd.parents:
        raise StudyError(
            f"refusing --overwrite on {out} (resolves to {target}: the root, home or working folder or one above "
            "it); give a dedicated output folder such as results/NAME"
        )


@contextlib.contextmanager
def folder_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.biasgym.lock`` (an exclusive ``flock``, with this process's id written in it) while inside.

    Raises:
        StudyError: another process holds it (its id is named), or the lock file cannot be written.
    """
    path = Path(out) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise StudyError(f"cannot write in output folder {out}: {e.strerror}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise StudyError(
                f"another biasgym process (pid {other}) is working in {out}; wait for it or choose another --out"
            ) from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def folder_kind(out: Path) -> str:
    """What ``out`` holds: ``"new"`` (absent, empty, or only a lock file), ``"study"`` (a ``study.json``),
    ``"seeds"`` (a ``seeds.json`` and no ``study.json``) or ``"foreign"`` (anything else).

    Raises:
        StudyError: ``out`` is a file.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StudyError(f"output folder {out} is a file; choose another --out")
    if not out.is_dir() or not any(p.name != LOCK_FILE for p in out.iterdir()):
        return "new"
    if (out / "study.json").is_file():
        return "study"
    if (out / SEEDS_MANIFEST).is_file():
        return "seeds"
    return "foreign"


def _outside(folder: Path, names: Iterable[str]) -> list[Path]:
    allowed = {*names, LOCK_FILE}
    return [p for p in sorted(folder.iterdir()) if p.name not in allowed]


def foreign_entries(out: Path, kind: str) -> list[Path]:
    """The entries of a ``"study"`` or ``"seeds"`` folder that this package does not write: top-level names
    outside :data:`OUTPUTS` (a study) or outside :data:`SEED_OUTPUTS` and the ``seed_<s>`` folders (a
    multi-seed study), and in each ``seed_<s>`` folder (a real folder, not a link) names outside :data:`OUTPUTS`."""
    out = Path(out)
    if kind == "study":
        return _outside(out, OUTPUTS)
    found = []
    for p in _outside(out, SEED_OUTPUTS):
        if _SEED_FOLDER.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            found += _outside(p, OUTPUTS)
        else:
            found.append(p)
    return found


def check_only_ours(out: Path, kind: str) -> None:
    """Refuse a study or multi-seed folder holding anything this package did not write (see :func:`foreign_entries`).

    Raises:
        StudyError: naming the first foreign entry; nothing is changed.
    """
    foreign = foreign_entries(out, kind)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise StudyError(
            f"output folder {out} holds {foreign[0]}{more}, which biasgym did not write; nothing was changed. "
            "Move it away or choose another --out (--overwrite never removes files biasgym did not write)"
        )


def _manifest_last(names: Iterable[str], manifest: str) -> list[str]:
    names = list(names)
    return [n for n in names if n != manifest] + [manifest]


def clear_outputs(out: Path) -> list[str]:
    """Remove this package's outputs from ``out``, its manifest last (so an interrupted removal leaves a folder
    still recognised as this package's): a study's :data:`OUTPUTS`, or a multi-seed study's
    :data:`SEED_OUTPUTS` and its ``seed_<s>`` folders (each emptied of :data:`OUTPUTS` and its lock file, then
    removed). Other files of a study folder stay; a multi-seed folder holding any is refused first.

    Returns:
        The top-level names removed.

    Raises:
        StudyError: a multi-seed folder that holds a file this package did not write (nothing is removed).
    """
    out = Path(out)
    kind = folder_kind(out)
    if kind == "study":
        return remove_outputs(out, _manifest_last(OUTPUTS, "study.json"))
    if kind != "seeds":
        return []
    check_only_ours(out, "seeds")
    gone = []
    for p in sorted(q for q in out.iterdir() if _SEED_FOLDER.fullmatch(q.name)):
        with folder_lock(p):
            remove_outputs(p, _manifest_last(OUTPUTS, "study.json"))
        remove_path(p / LOCK_FILE)
        p.rmdir()
        gone.append(p.name)
    return gone + remove_outputs(out, _manifest_last(SEED_OUTPUTS, SEEDS_MANIFEST))


def bias_digest(bias: str) -> str | None:
    """SHA-256 of a user bias file (None for a catalogue bias); validates the bias.

    Raises:
        StudyError: an unknown bias, or a bias file that cannot be read or parsed.
    """
    try:
        spec = load_bias(bias)
    except (ValueError, FileNotFoundError) as e:
        raise StudyError(str(e)) from e
    if spec.source == "builtin":
        return None
    try:
        return hashlib.sha256(Path(spec.source).read_bytes()).hexdigest()
    except OSError as e:
        raise StudyError(f"cannot read bias file {spec.source}: {e.strerror}") from e


@contextlib.contextmanager
def locked_session(out: Path, check: Callable[[], str]) -> Iterator[str]:
    """Prepare a study folder: ``check()`` (it validates and returns ``"new"``, ``"resume"`` or ``"replace"``),
    create the folder, take its lock, ``check()`` again under the lock (no other process can change it now) and,
    for ``"replace"``, remove only this package's outputs (:func:`clear_outputs`); yields the action.

    Raises:
        StudyError: from ``check``, a folder that cannot be created, or another process holding the lock.
    """
    check()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StudyError(f"cannot create output folder {out}: {e.strerror}") from e
    with folder_lock(out):
        action = check()
        if action == "replace":
            gone = clear_outputs(out)
            logger.info("removed the outputs of the previous study in %s: %s", out, ", ".join(gone))
        yield action
