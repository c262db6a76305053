"""The arrows of DESIGN.md, checked on the source: ``pipelines -> tune_spaces -> ssl_core``, ``ssl_core`` imports
neither Ray nor MLflow, no stage imports another stage, no import cycle (function-level imports included), and a
registered model loads with ``ssl_core`` alone."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from conftest import BLOCK_PIPELINES_IMPORT

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ssl_core", "pipelines", "tune_spaces")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str] = frozenset()) -> set[str]:
    """Every module ``path`` imports, at any depth of its code: ``from a import b`` is ``a.b`` when that is one of
    ``modules`` (a submodule), else ``a``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    """Our modules -> the modules of ours they import (a package's ``__init__`` only when imported by name)."""
    files = {module_name(path): path for package in PACKAGES for path in (REPO / package).rglob("*.py")}
    return {name: {imported for imported in imports_of(path, set(files)) if imported in files and imported != name}
            for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_project() -> None:
    assert find_cycle(import_graph()) is None


def test_no_stage_imports_another_stage() -> None:
    graph = import_graph()
    stages = {name for name in graph if name.startswith("pipelines.stages.") and name != "pipelines.stages"}
    crossing = sorted((name, target) for name in stages for target in graph[name] if target in stages)
    assert not crossing, f"stages import each other: {crossing}"


def test_the_arrows_point_one_way() -> None:
    for name, targets in import_graph().items():
        if name.startswith("ssl_core"):
            assert not {t for t in targets if t.startswith(("pipelines", "tune_spaces"))}, name
        if name.startswith("tune_spaces"):
            assert not {t for t in targets if t.startswith("pipelines")}, name


def test_ssl_core_imports_neither_ray_nor_mlflow() -> None:
    for path in (REPO / "ssl_core").rglob("*.py"):
        heavy = {name for name in imports_of(path) if name.split(".")[0] in ("ray", "mlflow")}
        assert not heavy, f"{path.relative_to(REPO)} imports {sorted(heavy)}"
    modules = sorted(name for name in import_graph() if name.startswith("ssl_core"))
    code = f"import sys, importlib\nfor m in {modules!r}: importlib.import_module(m)\n" \
           "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow', 'pipelines'}))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


def test_a_logged_classifier_loads_without_pipelines(tmp_path: Path) -> None:
    from pipelines import tracking
    from pipelines.config import config_from_mapping
    from ssl_core.classifier import student_classifier

    cfg = config_from_mapping({"tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db",
                                            "artifact_location": str(tmp_path / "artifacts")}}, base=tmp_path)
    run_id = tracking.start_run(cfg.tracking, "model")
    model = student_classifier("resnet8", 8, 3)
    uri = tracking.log_torch_model(cfg.tracking, run_id, model, "student", torch.zeros(2, 3, 8, 8))
    code = BLOCK_PIPELINES_IMPORT + textwrap.dedent(f"""
        import mlflow, torch
        mlflow.set_tracking_uri({cfg.tracking.uri!r})
        model = mlflow.pytorch.load_model({uri!r})
        print(type(model).__module__, tuple(model(torch.rand(2, 3, 8, 8)).shape))
    """)
    loaded = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split() == ["ssl_core.classifier", "(2,", "3)"]
