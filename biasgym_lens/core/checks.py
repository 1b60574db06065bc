"""Strict checks of user-supplied arguments: one line that names the bad value and says what is valid.

The rule everywhere in this package: a value of the wrong *type* (a float, string or bool where an integer is
expected, a string where a list is expected) raises :class:`InputTypeError`; a value of the right type but out
of range (zero or negative sizes, NaN, unknown names) raises ``ValueError``. Integer arguments take Python,
NumPy or 0-dimensional torch integers; integer-valued floats such as ``2.0`` are refused like any other float,
and so are bools (``True`` is an ``int`` to Python, but never a meaningful count or index).

Examples:
    >>> check_int(3, "epochs", minimum=1)
    3
    >>> check_int(2.0, "epochs", minimum=1)
    Traceback (most recent call last):
    ...
    biasgym_lens.core.checks.InputTypeError: epochs must be an integer >= 1, got 2.0 (float)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "InputTypeError",
    "is_int",
    "is_real",
    "check_int",
    "check_real",
    "check_bool",
    "check_choice",
    "check_int_list",
    "check_str_list",
]


class InputTypeError(TypeError, ValueError):
    """An argument of the wrong type.

    A ``TypeError`` (Python's convention for a wrong type) that is also a ``ValueError``, so code that catches
    ``ValueError`` for user mistakes (the command line does) keeps catching it.
    """


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def is_int(value: Any) -> bool:
    """True for Python, NumPy and 0-dimensional torch integers; False for bools, floats and everything else."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, numbers.Integral)


def is_real(value: Any) -> bool:
    """True for real numbers (ints, floats, NumPy and 0-dimensional torch reals); False for bools."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, numbers.Real)


def _range_text(minimum: int | float | None, maximum: int | float | None) -> str:
    if minimum is not None and maximum is not None:
        return f" in {minimum}..{maximum}"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def check_int(
    value: Any,
    name: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    none_ok: bool = False,
) -> Any:
    """Return ``value`` as a Python ``int`` (or None when ``none_ok``), or raise naming it.

    Raises:
        InputTypeError: not an integer (floats, strings and bools included).
        ValueError: an integer outside ``minimum..maximum``.
    """
    if value is None and none_ok:
        return None
    wanted = f"an integer{_range_text(minimum, maximum)}" + (" or None" if none_ok else "")
    if not is_int(value):
        raise InputTypeError(f"{name} must be {wanted}, got {_show(value)}")
    number = int(value)
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise ValueError(f"{name} must be{_range_text(minimum, maximum)}, got {number} (out of range)")
    return number


def check_real(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    positive: bool = False,
    none_ok: bool = False,
) -> Any:
    """Return ``value`` as a finite Python ``float`` (or None when ``none_ok``), or raise naming it.

    Args:
        value: The number.
        name: Its name in the message.
        minimum: Smallest allowed value (inclusive).
        positive: Require ``value > 0``.
        none_ok: Allow None.

    Raises:
        InputTypeError: not a real number (strings, bools, tensors with several values...).
        ValueError: NaN, infinite, or out of range.
    """
    if value is None and none_ok:
        return None
    wanted = "a finite number" + (" > 0" if positive else _range_text(minimum, None)) + (" or None" if none_ok else "")
    if not is_real(value):
        raise InputTypeError(f"{name} must be {wanted}, got {_show(value)}")
    number = float(value)
    if not math.isfinite(number) or (positive and number <= 0) or (minimum is not None and number < minimum):
        raise ValueError(f"{name} must be {wanted}, got {number!r}")
    return number


def check_bool(value: Any, name: str) -> bool:
    """Return ``value`` as a ``bool``; only ``True``/``False`` (Python or NumPy) are accepted.

    Raises:
        InputTypeError: anything else (``"yes"``, ``1``, None).
    """
    if not isinstance(value, (bool, np.bool_)):
        raise InputTypeError(f"{name} must be True or False, got {_show(value)}")
    return bool(value)


def check_choice(value: Any, name: str, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``.

    Raises:
        InputTypeError: not a string.
        ValueError: a string that is not one of ``choices`` (the message lists them).
    """
    valid = list(choices)
    listed = ", ".join(repr(c) for c in valid)
    if not isinstance(value, str):
        raise InputTypeError(f"{name} must be one of {listed}, got {_show(value)}")
    if value not in valid:
        raise ValueError(f"{name} must be one of {listed}, got {value!r}")
    return value


def _as_sequence(values: Any, name: str, what: str) -> list[Any]:
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray, torch.Tensor, range)):
        raise InputTypeError(f"{name} must be a list of {what}, got {_show(values)}")
    if isinstance(values, (np.ndarray, torch.Tensor)) and values.ndim != 1:
        raise InputTypeError(f"{name} must be a 1-dimensional list of {what}, got shape {tuple(values.shape)}")
    return list(values)


def check_int_list(
    values: Any,
    name: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    nonempty: bool = True,
    unique: bool = False,
) -> list[int]:
    """Return ``values`` (a list, tuple, range, or 1-d array of integers) as a list of Python ints.

    Raises:
        InputTypeError: a string, a non-sequence, or an item that is not an integer.
        ValueError: an empty list (when ``nonempty``), an item out of range, or a repeated item (``unique``).
    """
    items = _as_sequence(values, name, "integers")
    if nonempty and not items:
        raise ValueError(f"{name} must be a non-empty list of integers, got {values!r}")
    out = [check_int(v, f"{name}[{i}]", minimum=minimum, maximum=maximum) for i, v in enumerate(items)]
    if unique:
        seen: set[int] = set()
        for i, v in enumerate(out):
            if v in seen:
                raise ValueError(f"{name} repeats {v} (item {i}); give each value once")
            seen.add(v)
    return out


def check_str_list(values: Any, name: str, *, nonempty: bool = True, blank_ok: bool = False) -> list[str]:
    """Return ``values`` (a list or tuple of strings) as a list; a single string is refused.

    Raises:
        InputTypeError: a string instead of a list, or an item that is not a string.
        ValueError: an empty list (when ``nonempty``) or an empty or blank string item (unless ``blank_ok``).
    """
    items = _as_sequence(values, name, "strings")
    if nonempty and not items:
        raise ValueError(f"{name} must be a non-empty list of strings, got {values!r}")
    for i, v in enumerate(items):
        if not isinstance(v, str):
            raise InputTypeError(f"{name}[{i}] must be a string, got {_show(v)}")
        if not blank_ok and not v.strip():
            raise ValueError(f"{name}[{i}] is an empty string ({v!r})")
    return items
