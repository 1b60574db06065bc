"""Small files the package writes and reads: strict JSON, atomic text files, spreadsheet-safe CSV tables.

* **Writing is atomic.** A text file is written through a uniquely named temporary sibling and a rename, so
  readers never see half a file and a folder is never replaced by a file.
* **Reading checks.** A missing file, invalid JSON, a missing key or an unreadable table raises
  :class:`ArtifactError` naming the file and the problem.
* **JSON is JSON.** Non-finite floats are written as ``null`` (``NaN`` is not JSON) and read back as ``nan``.

The artifact folders built from these files are in :mod:`biasgym_lens.core.artifacts`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

__all__ = [
    "ArtifactError",
    "MissingArtifactError",
    "PathLike",
    "json_safe",
    "dumps",
    "read_json",
    "require",
    "write_text_atomic",
    "write_csv",
    "read_csv",
    "sha256_file",
    "unique_sibling",
    "fsync_dir",
    "remove_path",
    "remove_outputs",
    "nan_floats",
    "none_to_nan",
]

PathLike = str | os.PathLike[str]
"""A path given as a string or a path object."""


class ArtifactError(ValueError):
    """A file or folder the package wrote (or would write) is missing, damaged, foreign or in the way.

    The message reads ``"<path>: <problem>"``.
    """

    def __init__(self, path: PathLike, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class MissingArtifactError(ArtifactError, FileNotFoundError):
    """An artifact (or one of its files) does not exist."""


# ------------------------------------------------------------------------------------------------ JSON


def json_safe(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts: non-finite floats become ``None``,
    tuples become lists, NumPy and torch scalars become Python numbers, paths become strings."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return json_safe(obj.item())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, str):
        return obj
    raise TypeError(f"cannot write {type(obj).__name__} {obj!r} to JSON")


def dumps(obj: Any) -> str:
    """Strict JSON text of ``obj`` (see :func:`json_safe`)."""
    return json.dumps(json_safe(obj), indent=1, allow_nan=False)


def read_json(path: PathLike, what: str = "file") -> Any:
    """Parse a JSON file; a missing file or invalid JSON raises :class:`ArtifactError` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise MissingArtifactError(p, f"{what} not found")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ArtifactError(p, f"not a text file ({e.reason})") from e
    except json.JSONDecodeError as e:
        raise ArtifactError(p, f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e


def require(doc: Any, keys: Iterable[str], path: PathLike) -> dict[str, Any]:
    """Check that ``doc`` is a JSON object with ``keys``; returns it."""
    if not isinstance(doc, dict):
        raise ArtifactError(path, f"expected a JSON object, found {type(doc).__name__}")
    missing = [k for k in keys if k not in doc]
    if missing:
        raise ArtifactError(path, f"missing key(s) {', '.join(map(repr, missing))}")
    return doc


# ------------------------------------------------------------------------------------------------ files


def unique_sibling(final: Path, tag: str) -> Path:
    """A hidden sibling name of ``final`` unique to this process and call: ``.NAME.TAG-PID-RANDOM``."""
    return final.with_name(f".{final.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (new names, renames) to disk, where the system allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_path(path: Path) -> None:
    """Remove a file or folder; an interrupt during the removal is deferred until it is done."""
    pending: BaseException | None = None
    for _ in range(3):
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            break
        except KeyboardInterrupt as e:  # finish the clean-up, then let the interrupt through
            pending = e
    if pending is not None:
        raise pending


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write a text file through a uniquely named temporary sibling and a rename.

    Readers never see half a file, two writers never share a temporary name, and a folder at ``path`` is never
    replaced.

    Raises:
        ArtifactError: ``path`` is a folder, or its folder does not exist or cannot be written.
    """
    final = Path(path)
    if final.is_dir():
        raise ArtifactError(final, "is a folder; refusing to replace it with a file")
    if not final.parent.is_dir():
        raise MissingArtifactError(final, f"folder {final.parent} does not exist")
    tmp = unique_sibling(final, "tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except PermissionError as e:
        raise ArtifactError(final, f"cannot write here ({e.strerror})") from e
    finally:
        if tmp.exists():
            remove_path(tmp)
    return final


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _safe_cell(v: Any) -> Any:
    if not isinstance(v, str):
        return v
    v = v.replace("\r", " ").replace("\n", " ")
    if v.startswith(_FORMULA_START) and not _is_number(v):
        return "'" + v  # spreadsheet programs would run =HYPERLINK(...) and friends
    return v


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def write_csv(df: pd.DataFrame, path: PathLike) -> Path:
    """Write a table atomically, with text cells made safe for spreadsheets (no line breaks; a cell that would
    start a formula, like ``=HYPERLINK(...)``, is prefixed with ``'``)."""
    safe = df.copy()
    for col in safe.columns:
        if safe[col].dtype == object or pd.api.types.is_string_dtype(safe[col]):
            safe[col] = safe[col].map(_safe_cell)
    return write_text_atomic(path, safe.to_csv(index=False))


def read_csv(path: PathLike, what: str = "table", columns: Sequence[str] = ()) -> pd.DataFrame:
    """Read a CSV the package wrote; missing, unparsable or column-less files raise :class:`ArtifactError`."""
    p = Path(path)
    if not p.is_file():
        raise MissingArtifactError(p, f"{what} not found")
    try:
        df = pd.read_csv(p)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ArtifactError(p, f"not a readable {what} ({str(e).splitlines()[0]})") from e
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ArtifactError(p, f"{what} lacks column(s) {', '.join(missing)}")
    return df


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()



def remove_outputs(folder: Path, names: Iterable[str]) -> list[str]:
    """Remove the named entries of ``folder`` (the package's own outputs) and nothing else; returns what went."""
    gone = []
    for name in names:
        p = folder / name
        if p.exists() or p.is_symlink():
            remove_path(p)
            gone.append(name)
    return gone


def none_to_nan(value: Any) -> Any:
    """``None`` (how the package's JSON stores a non-finite float) back to ``nan``; other values unchanged."""
    return float("nan") if value is None else value


def nan_floats(values: Iterable[Any]) -> list[float]:
    """A JSON list of floats back to floats (``None`` to ``nan``)."""
    return [float(none_to_nan(v)) for v in values]
