"""The layering promise, checked on the source: no import cycles, stages apart, a fabric that knows no stage.

The import graph covers ``pipeline/``, ``stages/``, ``models/`` and
``triton_kernels/``, with imports inside functions counted like any other.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "stages", "models", "triton_kernels")
STAGES = ("ingest", "tokenize", "multimodal", "schedule", "forward", "constrain", "sample", "detokenize")
FABRIC = ("pipeline.messages", "pipeline.channel", "pipeline.thread_channel", "pipeline.process_channel",
          "pipeline.stage", "pipeline.placement", "pipeline.launch", "pipeline.harness")


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def _longest_module(name: str, modules: dict[str, Path]) -> str | None:
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``module`` imports anywhere in its file (``from a import b`` counts a.b if it is a module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = _longest_module(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "stages" and len(parts) > 1 and parts[1] in STAGES else None


def test_the_graph_is_read_from_every_package(graph: dict[str, set[str]]) -> None:
    assert {m.split(".")[0] for m in graph} == set(PACKAGES)
    assert "pipeline.messages" in graph["pipeline.channel"] | graph["pipeline.process_channel"]


def test_the_cycle_finder_finds_a_cycle() -> None:
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(toy) == [["a", "b", "c"]]


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []


def test_no_stage_imports_another_stage(graph: dict[str, set[str]]) -> None:
    crossings = [f"{m} -> {d}" for m, deps in graph.items() for d in deps
                 if stage_of(m) and stage_of(d) and stage_of(m) != stage_of(d)]
    assert crossings == []


def test_the_fabric_imports_no_stage_or_model(graph: dict[str, set[str]]) -> None:
    assert set(FABRIC) <= set(graph)
    leaks = [f"{m} -> {d}" for m in FABRIC for d in graph[m] if d.split(".")[0] in ("stages", "models")]
    assert leaks == []


def test_no_module_level_hand_off_between_factories() -> None:
    offenders = [str(p.relative_to(REPO)) for p in project_modules().values() if "_ASSEMBLY" in p.read_text()]
    assert offenders == []
