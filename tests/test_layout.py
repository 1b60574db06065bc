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


def _package_imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (at any depth of the file, type-checking-only imports aside)."""
    folder = ROOT / "biasgym_lens"
    deps: dict[str, set[str]] = {}
    for path in sorted(folder.glob("*.py")):
        if path.stem == "__init__":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
            for n in ast.walk(node)
        }
        found = set()
        for node in ast.walk(tree):
            if id(node) in typing_only or not isinstance(node, ast.ImportFrom) or not node.module:
                continue
            if node.module.startswith("biasgym_lens."):
                found.add(node.module.split(".")[1])
            elif node.module == "biasgym_lens":
                found |= {a.name for a in node.names if (folder / f"{a.name}.py").is_file()}
        deps[path.stem] = found - {path.stem}
    return deps


def test_the_modules_import_each_other_without_a_cycle():
    deps = _package_imports()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for dep in sorted(deps.get(module, ())):
            visit(dep, (*path, module))
        done.add(module)

    for module in deps:
        visit(module, ())
    assert {"models", "tokens", "artifacts"} <= set(deps["pipeline"]) | done  # the walk covered the package
