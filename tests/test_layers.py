"""The import stack: library (cxr_model) -> tasks -> flows -> entry points (cxr_pneumonia), never upward, no cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# folder -> (the module prefix it installs as, its rank in the stack)
LAYERS = {"cxr_model": ("cxr_model", 0), "tasks": ("cxr_pneumonia.tasks", 1), "flows": ("cxr_pneumonia.flows", 2),
          "cxr_pneumonia": ("cxr_pneumonia", 3)}
ORCHESTRATION = ("prefect", "mlflow")  # what the library must not import


def module_name(path: Path) -> str:
    folder, *rest = path.relative_to(REPO).with_suffix("").parts
    parts = [LAYERS[folder][0], *rest]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def rank(module: str) -> int | None:
    """The layer of a project module (None for other packages)."""
    if module.startswith("cxr_pneumonia.tasks"):
        return 1
    if module.startswith("cxr_pneumonia.flows"):
        return 2
    if module.split(".")[0] == "cxr_pneumonia":
        return 3
    if module.split(".")[0] == "cxr_model":
        return 0
    return None


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, at module level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pkg import module` names a module too: count the deeper name where it is one of ours
            found += [(node.lineno, f"{node.module}.{alias.name}" if rank(node.module) is not None else node.module)
                      for alias in node.names]
    return found


def project_files() -> list[Path]:
    return sorted(p for folder in LAYERS for p in (REPO / folder).rglob("*.py"))


def known_module(name: str, modules: set[str]) -> str | None:
    """The project module an imported name refers to (`pkg.module.symbol` -> `pkg.module`)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def test_no_layer_imports_a_layer_above_it_and_the_library_no_orchestration() -> None:
    problems = []
    for path in project_files():
        own = rank(module_name(path))
        for line, name in imports(path):
            where = f"{path.relative_to(REPO)}:{line} imports {name}"
            top = name.split(".")[0]
            if top in ("tasks", "flows"):
                problems.append(f"{where}: a bare package name; import it as cxr_pneumonia.{name}")
            elif rank(name) is not None and rank(name) > own:
                problems.append(f"{where}, a layer above it")
            elif own == 0 and top in ORCHESTRATION:
                problems.append(f"{where}: the library imports neither Prefect nor MLflow")
    assert not problems, "\n".join(problems)


def test_project_modules_import_each_other_without_cycles() -> None:
    modules = {module_name(p): p for p in project_files()}
    graph = {m: {t for _, n in imports(p) if (t := known_module(n, set(modules))) and t != m}
             for m, p in modules.items()}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycle = path[path.index(node):] + [node]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        for target in sorted(graph[node]):
            visit(target, [*path, node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])


def test_the_walk_sees_an_upward_import(tmp_path: Path) -> None:
    """The check above is only as good as its import walk: it must see imports inside functions and `from` forms."""
    source = tmp_path / "bad.py"
    source.write_text("def f():\n    from cxr_pneumonia.tasks import data\n    import mlflow\n")
    assert imports(source) == [(2, "cxr_pneumonia.tasks.data"), (3, "mlflow")]
    assert rank("cxr_pneumonia.tasks.data") == 1 > rank("cxr_model.config") == 0
    assert rank("cxr_pneumonia.cli") == 3 and rank("numpy") is None


def test_the_library_loads_without_prefect_or_mlflow() -> None:
    """Importing every library module (as a user of `cxr_model` alone would) loads neither package."""
    names = [module_name(p) for p in sorted((REPO / "cxr_model").glob("*.py"))]
    code = ("import sys\n" + "".join(f"import {n}\n" for n in names)
            + "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'mlflow'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_installed_names_are_the_projects_own() -> None:
    """No bare `tasks` or `flows` package is installed: they live under cxr_pneumonia."""
    import importlib.util

    for name, folder in (("cxr_pneumonia.tasks", "tasks"), ("cxr_pneumonia.flows", "flows")):
        spec = importlib.util.find_spec(name)
        assert spec is not None and Path(spec.origin).parent == REPO / folder
