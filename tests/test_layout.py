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
    (tmp_path / "m.py").write_text("from biasgym_lens.heads.head_scores import _hidden\n")
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        assert _private_imports(tmp_path) == ["m.py:1 imports biasgym_lens.heads.head_scores._hidden"]
    finally:
        ROOT = old


# The method's stages, lowest first: a module may import from its own stage and the stages before it.
STAGES = ("core", "injection", "evaluation", "heads", "study")
# Modules outside the stages: the version, and test helpers (tiny models) that may use any stage.
OUTSIDE = {"_version", "testing"}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT / "biasgym_lens").with_suffix("").parts)


def _package_modules() -> dict[str, Path]:
    """Dotted name below ``biasgym_lens`` -> file, for every module that is not a package's ``__init__``."""
    return {_module_name(p): p for p in sorted((ROOT / "biasgym_lens").rglob("*.py")) if p.stem != "__init__"}


def _package_imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (at any depth of the file, type-checking-only imports aside)."""
    modules = _package_modules()
    deps: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
            for n in ast.walk(node)
        }
        found = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "biasgym_lens":
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                rel = target.removeprefix("biasgym_lens.")
                if rel in modules:
                    found.add(rel)
        deps[name] = found - {name}
    return deps


def test_every_module_belongs_to_a_stage():
    assert set(STAGES) == {p.name for p in (ROOT / "biasgym_lens").iterdir() if (p / "__init__.py").is_file()}
    strays = [m for m in _package_modules() if m.split(".")[0] not in STAGES and m not in OUTSIDE]
    assert strays == []
    for stage in STAGES:  # each stage says what it owns
        doc = ast.get_docstring(ast.parse((ROOT / "biasgym_lens" / stage / "__init__.py").read_text()))
        assert doc and len(doc) > 40, stage


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
    assert {"core.models", "core.tokens", "core.artifacts"} <= deps["study.pipeline"] | done  # the walk saw it


def test_no_stage_imports_a_later_stage():
    rank = {stage: i for i, stage in enumerate(STAGES)}
    upward = [
        f"{module} imports {dep}"
        for module, found in _package_imports().items()
        if module not in OUTSIDE
        for dep in found
        if dep not in OUTSIDE and rank[dep.split(".")[0]] > rank[module.split(".")[0]]
    ]
    assert upward == []


def test_the_layering_check_sees_an_upward_import(tmp_path):
    for stage in STAGES:
        (tmp_path / "biasgym_lens" / stage).mkdir(parents=True)
    (tmp_path / "biasgym_lens" / "core" / "low.py").write_text("from biasgym_lens.study import high\n")
    (tmp_path / "biasgym_lens" / "study" / "high.py").write_text("")
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        assert _package_imports() == {"core.low": {"study.high"}, "study.high": set()}
    finally:
        ROOT = old



MAX_MODULE_LINES = 400
MAX_BODY_LINES = 50  # a function's body, its docstring aside
MAX_SCOPE_LINES = 60  # scope(), the method's entry point, in full


def _bodies(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]
            out.append((node.name, node.end_lineno - body[0].lineno + 1))
    return out


def test_modules_and_functions_stay_small():
    modules = _package_modules()
    long_modules = {m: n for m, p in modules.items() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    long_bodies = [f"{m}.{f}: {n}" for m, p in modules.items() for f, n in _bodies(p) if n > MAX_BODY_LINES]
    assert long_modules == {} and long_bodies == []
    scope_fn = next(n for n in ast.walk(ast.parse(modules["heads.biasscope"].read_text())) if getattr(n, "name", "") == "scope")
    assert scope_fn.end_lineno - scope_fn.lineno + 1 <= MAX_SCOPE_LINES


def test_the_size_check_counts_a_body_without_its_docstring(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('def f():\n    """Doc\n    string."""\n    a = 1\n    return a\n\n\ndef g():\n    return 2\n')
    assert _bodies(f) == [("f", 2), ("g", 1)]
