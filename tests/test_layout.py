"""The layout shows the architecture: no import cycles, one place for the ridge head's construction,
a curated public API, only ``carrot`` installed."""
import ast
import re
import tomllib
from pathlib import Path

import carrot

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "carrot"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def load_time_imports(path: Path, modules: set[str]) -> set[str]:
    """carrot modules a module imports when it loads (top level, not inside functions)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        out |= {n for n in names if n in modules}
    return out


def test_no_import_cycles_at_load_time():
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    graph = {m: load_time_imports(p, set(files)) - {m} for m, p in files.items()}
    graph = {m: {d for d in deps if d != "carrot"} for m, deps in graph.items()}  # the lazy top-level package
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_relative_imports_are_not_used_so_moves_stay_greppable():
    assert not [p for p in PKG.rglob("*.py") if re.search(r"^\s*from \.", p.read_text(), re.M)]


def test_the_head_is_constructed_from_a_bare_lambda_only_in_the_ridge_core():
    offenders = [f"{p.relative_to(ROOT)}" for p in PKG.rglob("*.py")
                 if "RidgeHead(lam=" in p.read_text() and p.parent.name != "ridge"]
    offenders += [f"{p.relative_to(ROOT)}" for p in PKG.rglob("*.py")
                  if re.search(r"PrimalSystem\.fit\(", p.read_text()) and p.parent.name != "ridge"]
    assert offenders == []


def test_only_carrot_is_installed_and_the_entry_point_is_inside_it():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["tool"]["setuptools"]["packages"]["find"]["include"] == ["carrot", "carrot.*"]
    assert "py-modules" not in meta["tool"]["setuptools"]
    assert meta["project"]["scripts"]["carrot-run"] == "carrot.cli:main"


def test_public_api_resolves():
    for name in carrot.__all__:
        assert getattr(carrot, name) is not None, name
    assert carrot.RidgeHead.__module__ == "carrot.ridge.head" and carrot.Carrot.__module__ == "carrot.run.pipeline"
    assert issubclass(carrot.CarrotError, ValueError)
