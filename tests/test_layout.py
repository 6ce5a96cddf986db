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


FLOORS = ["errors", "text", "progress", "validation", "io", "devices", "distributed", "config", "data", "ridge", "features", "embed",
          "attribution", "audit", "report", "run", "studio", "cli"]  # lowest first: each may import only floors below it


def floor_of(module: str) -> int:
    part = module.split(".")[1] if module.count(".") else "carrot"
    return FLOORS.index(part) if part in FLOORS else -1


def all_imports(path: Path, modules: set[str]) -> set[str]:
    """carrot modules a module imports anywhere (load time or inside a function), type-only imports aside."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for b in ast.walk(tree) if isinstance(b, ast.If) and ast.unparse(b.test) == "TYPE_CHECKING"
                   for stmt in b.body for n in ast.walk(stmt)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m in modules}


def test_the_layers_read_one_way():
    """No lower floor imports a higher one, not even inside a function (ridge never imports attribution, audit, run or
    report; config never imports embed)."""
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    up = sorted(f"{m} -> {d}" for m, p in files.items() for d in all_imports(p, set(files))
                if floor_of(m) >= 0 and floor_of(d) > floor_of(m))
    assert up == []


def test_no_type_dispatch_on_heads_or_systems_outside_the_ridge_layer():
    pattern = re.compile(r"isinstance\([^)]*(RidgeHead|KernelRidgeHead|PrimalSystem|DualSystem|TrainingSystem)")
    hits = [f"{p.relative_to(ROOT)}:{i}" for folder in ("run", "audit", "attribution", "report")
            for p in (PKG / folder).rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert hits == []


def test_no_function_is_longer_than_80_lines():
    long = [f"{p.relative_to(ROOT)}:{n.name} ({n.end_lineno - n.lineno + 1})" for p in PKG.rglob("*.py")
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 80]
    assert long == []


def test_the_config_names_the_registries_names():
    """The config validates without torch, so it names the kinds the registries define; the two are held equal."""
    from carrot import config
    from carrot.audit.registry import AUDITS
    from carrot.data import DATA_KINDS
    from carrot.embed.tokenmap import TOKEN_MAPS
    from carrot.report.audits import SECTIONS
    from carrot.ridge.gram import KERNELS
    from carrot.ridge.heads import HEADS
    from carrot.ridge.kernel import APPROXIMATIONS

    assert config.DATA_KINDS == tuple(DATA_KINDS)
    assert config.HEAD_KINDS == (*HEADS, "auto")
    assert config.KERNEL_NAMES == tuple(KERNELS) and config.KERNEL_APPROXIMATIONS == APPROXIMATIONS
    assert config.TOKEN_MAP_KINDS == TOKEN_MAPS
    assert set(SECTIONS) == set(AUDITS)  # every built-in audit has its index section


def test_the_readme_layout_names_every_module():
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    missing = [str(p.relative_to(ROOT)) for p in PKG.rglob("*.py") if p.name != "__init__.py" and p.name not in layout]
    assert missing == []
