"""Every public name of ``biasgym_lens`` is one object, whatever was imported before it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import biasgym_lens

_PROBE = r"""
import importlib, json, pkgutil, sys
order = json.loads(sys.argv[1])
before = json.loads(sys.argv[2])
import biasgym_lens
if before:
    for m in pkgutil.walk_packages(biasgym_lens.__path__, "biasgym_lens."):
        importlib.import_module(m.name)
got = {}
for name in order:
    obj = getattr(__import__("biasgym_lens", fromlist=[name]), name)
    got[name] = f"{type(obj).__name__}:{getattr(obj, '__module__', '')}:{getattr(obj, '__qualname__', name)}"
again = {n: f"{type(getattr(biasgym_lens, n)).__name__}:{getattr(getattr(biasgym_lens, n), '__module__', '')}:"
         f"{getattr(getattr(biasgym_lens, n), '__qualname__', n)}" for n in order}
print(json.dumps({"got": got, "again": again}))
"""


def _resolve(order: list[str], import_all_first: bool) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(order), json.dumps(import_all_first)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


NAMES = [n for n in biasgym_lens.__all__ if n != "__version__"]


@pytest.mark.parametrize(
    "order,import_all_first",
    [
        (NAMES, False),
        (list(reversed(NAMES)), False),
        (["Injection", "inject", "scope", "ScopeResult"], False),  # the order that once gave the module
        (NAMES, True),
    ],
    ids=["declared", "reversed", "class-before-function", "after-every-submodule"],
)
def test_every_public_name_is_the_same_object_in_any_order(order, import_all_first):
    res = _resolve(order, import_all_first)
    reference = _resolve(NAMES, False)["got"]
    for name in order:
        assert res["got"][name] == res["again"][name] == reference[name], name
        assert not res["got"][name].startswith("module:"), f"{name} resolved to a module"


def test_no_module_of_the_package_carries_a_public_function_name():
    import pkgutil

    parts = {p for m in pkgutil.walk_packages(biasgym_lens.__path__, "biasgym_lens.") for p in m.name.split(".")}
    assert len(parts) > 30  # the walk reached the stages' modules
    assert not parts & set(biasgym_lens.__all__)
