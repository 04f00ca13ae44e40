"""The house a newcomer walks into: small folders, small modules, one direction of imports, no cycles.

What a reader checks by eye (issue 20), checked here by walking the packages' sources."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "projection", "encoders")
LAYER = {"flows": 2, "projection": 1, "encoders": 0}  # flows -> projection -> encoders, never back
MAX_MODULES, MAX_LINES = 12, 400


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Our modules imported by ``path``, eager ones only (the top level of the module, not function bodies)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import submodule` needs the submodule; `from pkg import name` needs the package
            subs = [f"{node.module}.{a.name}" for a in node.names]
            targets = [s for s in subs if s in known] or [node.module]
        found |= {t for t in targets if t in known and t != name}
    return found


def test_folders_hold_at_most_12_modules_and_modules_at_most_400_lines():
    for pkg in PACKAGES:
        for folder in [ROOT / pkg, *[p for p in (ROOT / pkg).rglob("*") if p.is_dir() and p.name != "__pycache__"]]:
            modules = sorted(p.name for p in folder.glob("*.py"))
            assert len(modules) <= MAX_MODULES, f"{folder.relative_to(ROOT)} holds {len(modules)} modules: {modules}"
    long = {str(p.relative_to(ROOT)): n for p in _modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_import_cycle_and_no_upward_import():
    mods = _modules()
    graph = {name: _imports(path, name, set(mods)) for name, path in mods.items()}
    for name, deps in graph.items():
        for dep in deps:
            assert LAYER[dep.split(".")[0]] <= LAYER[name.split(".")[0]], f"{name} imports {dep} (upward)"
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                cycle = trail[trail.index(dep):] + [dep] if dep in trail else [node, dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, trail + [dep])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_only_flows_import_prefect_or_mlflow():
    for name, path in _modules().items():
        if name.startswith("flows"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(m.split(".")[0] in ("prefect", "mlflow") for m in mods), f"{name} imports {mods}"


def test_prefect_yaml_entrypoints_name_flow_functions_that_exist():
    import importlib

    from prefect import Flow

    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    assert deployments
    for d in deployments:
        file, func = d["entrypoint"].split(":")
        module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
        assert isinstance(getattr(module, func), Flow), d["entrypoint"]
