"""The bias catalogue: one JSON file per stereotype, listed and loaded into an immutable :class:`BiasSpec`.

What a file holds and the checks it passes are in :mod:`biasgym_lens.injection.schema`.

Built-in files live in ``biasgym_lens/data/biases/`` and are held to the full minimums
(``strict=True``); user files are validated with smaller minimums unless ``strict=True`` is passed.
The field-by-field schema is documented in ``biasgym_lens/data/biases/README.md``.

Example:
    >>> from biasgym_lens.injection.catalogue import load_bias
    >>> spec = load_bias("late")
    >>> spec.probes_for("Italy")[0]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from biasgym_lens.core.checks import InputTypeError
from biasgym_lens.injection.schema import BUILTIN_SOURCE, NAME_PATTERN, BiasFileError
from biasgym_lens.injection.spec import BiasSpec, validate_bias_dict

__all__ = ["list_biases", "load_bias", "catalogue_bias"]

_BUILTIN_PACKAGE = "biasgym_lens"
_BUILTIN_DIR = ("data", "biases")


def _builtin_dir() -> Any:
    return resources.files(_BUILTIN_PACKAGE).joinpath(*_BUILTIN_DIR)


def list_biases() -> list[str]:
    """Return the sorted names of the built-in biases."""
    return sorted(
        entry.name[: -len(".json")]
        for entry in _builtin_dir().iterdir()
        if entry.name.endswith(".json") and entry.is_file()
    )


def _decode(text: str, label: str) -> Any:
    if not text.strip():
        raise BiasFileError(label, None, "file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BiasFileError(
            label, None, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc


def _read_text(read: Any, label: str) -> str:
    try:
        return read()
    except UnicodeDecodeError as exc:
        raise BiasFileError(label, None, f"not valid UTF-8 text ({exc.reason} at byte {exc.start})") from exc


@cache
def _load_builtin(name: str, strict: bool) -> BiasSpec:
    entry = _builtin_dir().joinpath(f"{name}.json")
    label = f"{name}.json"
    data = _decode(_read_text(lambda: entry.read_text(encoding="utf-8"), label), label)
    return validate_bias_dict(data, BUILTIN_SOURCE, strict=strict, expected_name=name)


def _load_path(path: Path, strict: bool) -> BiasSpec:
    label = str(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"bias file {label} {what}; give an existing .json bias file or a catalogue name")
    data = _decode(_read_text(lambda: path.read_text(encoding="utf-8"), label), label)
    return validate_bias_dict(data, label, strict=strict, expected_name=path.stem)


def _unknown_name(name: str) -> ValueError:
    return ValueError(
        f"unknown bias {name!r}; valid names: {', '.join(list_biases())} (or a path to a .json bias file)"
    )


def catalogue_bias(name: str, *, strict: bool = True) -> BiasSpec:
    """A built-in bias by its catalogue name only, never a path: for names read back from saved files.

    Raises:
        InputTypeError: ``name`` is not a string.
        ValueError: not a catalogue name (the message lists the valid names).
    """
    if not isinstance(name, str):
        raise InputTypeError(f"a bias name must be a string, got {type(name).__name__} {name!r:.60}")
    if not NAME_PATTERN.fullmatch(name) or name not in list_biases():
        raise _unknown_name(name)
    return _load_builtin(name, strict)


def load_bias(name_or_path: str | os.PathLike[str], *, strict: bool | None = None) -> BiasSpec:
    """Load a built-in bias by name, or a user bias file by path.

    The argument is read in one of two ways, and nothing else is accepted:

    * a string matching ``[a-z0-9_]+`` is a catalogue name, which must exist;
    * a ``pathlib.Path`` (any ``os.PathLike``), or a string ending in ``.json``, is a path to an existing
      ``.json`` bias file (relative to the working folder, as on the command line: ``--bias my_bias.json``).

    Any other string (``"Late"``, ``"../../etc/passwd"``, ``"biases/late"``, ``""``) is refused: a name never
    becomes a path unless it says it is one.

    Args:
        name_or_path: ``"late"`` or ``"path/to/my_bias.json"`` (or ``Path("path/to/my_bias.json")``).
        strict: Apply the built-in minimums. Defaults to ``True`` for built-ins and ``False`` for files.

    Returns:
        The validated spec (built-ins are cached; specs are immutable).

    Raises:
        InputTypeError: neither a string nor a path (e.g. None, a number, a BiasSpec).
        ValueError: an unknown catalogue name (the message lists the valid names), a string that is neither a
            name nor a ``.json`` path, or a path that does not end in ``.json``.
        FileNotFoundError: a ``.json`` path that does not exist or is a folder.
        BiasFileError: a file that does not follow the schema.
    """
    if strict is not None and not isinstance(strict, bool):
        raise InputTypeError(f"strict must be True, False or None, got {strict!r}")
    if isinstance(name_or_path, str) and NAME_PATTERN.fullmatch(name_or_path):
        if name_or_path not in list_biases():
            raise _unknown_name(name_or_path)
        return _load_builtin(name_or_path, True if strict is None else strict)
    if isinstance(name_or_path, str) and not name_or_path.lower().endswith(".json"):
        raise ValueError(
            f"bias {name_or_path!r} is neither a catalogue name ([a-z0-9_]+: {', '.join(list_biases())}) nor a "
            "path to a .json bias file"
        )
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise InputTypeError(
            f"a bias must be a catalogue name or the path of a .json file, got {type(name_or_path).__name__} "
            f"{name_or_path!r:.60}" + (" (a BiasSpec can be passed directly instead)" if isinstance(name_or_path, BiasSpec) else "")
        )
    path = Path(os.fspath(name_or_path))
    if path.suffix.lower() != ".json":
        raise ValueError(f"bias file {str(path)!r} must be a .json file")
    return _load_path(path, False if strict is None else strict)
