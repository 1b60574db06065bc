"""Artifact folders the package writes and reads: atomic, checksummed, never replacing what it did not write.

Every artifact folder (an injection, head scores, a scope result) has one JSON metadata file that names its kind,
its format and the SHA-256 of every other file in it. The rules:

* **Saving never replaces a stranger.** A path may be replaced only when it does not exist, is an empty folder,
  or is an artifact folder of the same kind holding only the files that artifact wrote. A file, a link, a folder
  of another kind or a folder with files of the user's in it is refused with :class:`ArtifactError`.
* **Saving is atomic.** The new folder is written beside the old one under a unique hidden name and then
  exchanged with it in one system call (``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere two renames with a
  recovery step on the next open). After an interrupt at any point the path holds the old or the new artifact,
  complete; leftovers of a killed process are removed by the next save of that path.
* **Reading checks everything.** A missing file, invalid JSON, a missing key, a checksum mismatch, a truncated
  tensor file, a wrong shape or a non-finite value raises :class:`ArtifactError` naming the file and the problem.

The single files inside them (strict JSON, atomic text, CSV tables, checksums) are in :mod:`biasgym_lens.core.files`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from biasgym_lens.core.files import (
    ArtifactError,
    MissingArtifactError,
    PathLike,
    dumps,
    fsync_dir,
    read_json,
    remove_path,
    require,
    sha256_file,
    unique_sibling,
)

__all__ = [
    "save_artifact",
    "open_artifact",
    "load_tensors",
    "reading",
]


def _listing(folder: Path) -> list[str]:
    """Relative paths of every file below ``folder`` (sorted, ``/``-separated)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def _may_replace(final: Path, kind: str, meta_file: str, legacy: Sequence[str]) -> None:
    """Raise unless ``final`` is absent, an empty folder, or a ``kind`` artifact holding only its own files."""
    if not final.exists() and not final.is_symlink():
        return
    refuse = f"exists and is not {_article(kind)} {kind} folder written by this package; refusing to replace it"
    if final.is_symlink() or not final.is_dir():
        raise ArtifactError(final, f"{refuse} (choose another path, or remove it yourself)")
    present = _listing(final)
    if not present and not any(final.iterdir()):
        return
    try:
        meta = require(read_json(final / meta_file), ("format",), final / meta_file)
    except ArtifactError as e:
        raise ArtifactError(final, f"{refuse} ({e.problem} in {meta_file})") from e
    if meta.get("artifact", kind) != kind:
        raise ArtifactError(final, f"holds {_article(meta['artifact'])} {meta['artifact']}, not {_article(kind)} {kind}; refusing to replace it")
    own = set(meta.get("files", {})) | {meta_file} if "files" in meta else None
    foreign = [
        f for f in present
        if (f not in own if own is not None else f.split("/")[0] not in (meta_file, *legacy))
    ]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ArtifactError(final, f"holds files this package did not write ({shown}); refusing to replace it")


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    fn = getattr(_libc(), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        except OSError:  # pragma: no cover - platforms without a C library handle
            _LIBC = False
    return _LIBC or None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers: no save of this path is running in this process right now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_leftovers(final: Path) -> None:
    """Remove ``.NAME.tmp-PID-*`` siblings of processes that are gone; restore an orphaned ``.NAME.old-*``."""
    if not final.parent.is_dir():
        return
    for p in final.parent.glob(f".{final.name}.*-*-*"):
        tag, _, rest = p.name[len(final.name) + 2 :].partition("-")
        pid = rest.split("-")[0]
        if tag not in ("tmp", "old") or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if tag == "old" and not final.exists():
            os.replace(p, final)  # a two-rename swap was interrupted between its renames: the old one returns
        else:
            remove_path(p)


def save_artifact(
    path: PathLike,
    kind: str,
    meta_file: str,
    write: Callable[[Path], dict[str, Any]],
    *,
    legacy: Sequence[str] = (),
) -> Path:
    """Write an artifact folder atomically, refusing to replace anything but an artifact of the same kind.

    Args:
        path: The folder to write.
        kind: What it is (``"injection"``, ...), stored as ``"artifact"`` in the metadata.
        meta_file: Name of the metadata JSON file.
        write: Writes every file except the metadata into the folder it is given and returns the metadata
            (with its ``"format"``); the checksums of the files are added to it.
        legacy: Top-level names an older version of the artifact (without a file list) may hold.

    Returns:
        ``Path(path)``.

    Raises:
        ArtifactError: ``path`` holds something that is not such an artifact, or cannot be written.
    """
    final = Path(path)
    _clean_leftovers(final)
    _may_replace(final, kind, meta_file, legacy)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = unique_sibling(final, "tmp")
        tmp.mkdir()
    except (PermissionError, FileExistsError, NotADirectoryError) as e:
        raise ArtifactError(final, f"cannot write here ({e.strerror})") from e
    try:
        meta = dict(write(tmp))
        meta["artifact"] = kind
        meta["files"] = {f: sha256_file(tmp / f) for f in _listing(tmp)}
        (tmp / meta_file).write_text(dumps(meta), encoding="utf-8")
        fsync_dir(tmp)
        _swap_in(tmp, final)
    finally:
        if tmp.exists() or tmp.is_symlink():
            remove_path(tmp)  # the unfinished new folder, or the old one after an exchange
    return final


def _swap_in(tmp: Path, final: Path) -> None:
    if not final.exists():
        os.rename(tmp, final)
    elif not _exchange(tmp, final):
        old = unique_sibling(final, "old")
        os.replace(final, old)
        os.replace(tmp, final)
        remove_path(old)
    fsync_dir(final.parent)


def open_artifact(path: PathLike, kind: str, meta_file: str, *, version: int) -> tuple[Path, dict[str, Any]]:
    """Open an artifact folder: read its metadata, check kind, format and the checksum of every file.

    Returns:
        ``(folder, metadata)``.

    Raises:
        MissingArtifactError: no such folder or metadata file, or a listed file is missing.
        ArtifactError: another kind or format, invalid JSON, or a file whose checksum differs.
    """
    folder = Path(path)
    _clean_leftovers(folder)
    if not folder.is_dir():
        raise MissingArtifactError(folder, f"not found: no {kind} folder written by save() here")
    meta = require(read_json(folder / meta_file, f"{kind} metadata"), ("format",), folder / meta_file)
    if meta.get("artifact", kind) != kind:
        raise ArtifactError(folder, f"holds {_article(str(meta['artifact']))} {meta['artifact']}, not {_article(kind)} {kind}")
    if meta["format"] != version:
        raise ArtifactError(folder, f"{kind} format {meta['format']!r}; this version of biasgym_lens reads format {version}")
    for name, digest in meta.get("files", {}).items():
        f = folder / name
        if not f.is_file():
            raise MissingArtifactError(f, f"missing: the {kind} in {folder} is incomplete")
        if sha256_file(f) != digest:
            raise ArtifactError(f, "checksum mismatch: the file was changed or damaged since it was saved")
    return folder, meta


@contextlib.contextmanager
def reading(where: PathLike, what: str) -> Iterator[None]:
    """Within the block, a malformed metadata value (a missing key, a wrong type or value) becomes an
    :class:`ArtifactError` naming ``where``; an :class:`ArtifactError` passes through as it is."""
    try:
        yield
    except ArtifactError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ArtifactError(where, f"malformed {what} ({type(e).__name__}: {e})") from e


def load_tensors(path: PathLike, shapes: Mapping[str, tuple[int, ...] | None]) -> dict[str, torch.Tensor]:
    """Load a safetensors file and check that it holds ``shapes`` (``None``: any shape), all finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    p = Path(path)
    if not p.is_file():
        raise MissingArtifactError(p, "tensor file not found")
    try:
        tensors = load(p.read_bytes())
    except (SafetensorError, ValueError, OSError) as e:
        raise ArtifactError(p, f"not a readable tensor file ({e})") from e
    for name, shape in shapes.items():
        if name not in tensors:
            raise ArtifactError(p, f"has no tensor {name!r} (found {sorted(tensors)})")
        t = tensors[name]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ArtifactError(p, f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ArtifactError(p, f"tensor {name!r} has non-finite values")
    return tensors

