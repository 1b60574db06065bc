"""Rules of the code's layout that a reviewer would otherwise have to remember."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _private_imports(folder: Path) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("biasgym_lens"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{alias.name}")
    return found


def test_no_private_name_crosses_a_module_line_in_the_package_or_the_benchmarks():
    assert _private_imports(ROOT / "biasgym_lens") == []
    assert _private_imports(ROOT / "benchmarks") == []


def test_the_checker_sees_a_private_import(tmp_path):
    (tmp_path / "m.py").write_text("from biasgym_lens.attribution import _hidden\n")
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        assert _private_imports(tmp_path) == ["m.py:1 imports biasgym_lens.attribution._hidden"]
    finally:
        ROOT = old
