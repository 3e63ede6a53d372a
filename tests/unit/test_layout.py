"""The folder list is the architecture: these tests hold the import rules that make it so.

- the algorithm library (``specdec/`` less ``specdec/rpc``) has no gRPC in it and imports neither
  the edge, the services nor the tools;
- the gRPC edge (``specdec/rpc``, and ``specdec/client.py``, the client other services call the
  public API with) imports no service and no tool;
- a service imports no tool and no other service;
- no module imports another that imports it back, directly or around a longer cycle.

Imports inside functions count as much as those at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Repository folder -> installed package (pyproject.toml's package-dir).
PACKAGES = {
    "specdec": "specdec",
    "orchestrator": "specdec.orchestrator",
    "draft_service": "specdec.draft_service",
    "verify_service": "specdec.verify_service",
    "tools": "specdec.tools",
}
SERVICES = ("specdec.orchestrator", "specdec.draft_service", "specdec.verify_service")
TOOLS = "specdec.tools"
EDGE = "specdec.rpc"
CLIENT = "specdec.client"  # part of the edge: gRPC on the caller's side


def project_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            if "v1" in path.relative_to(ROOT / folder).parts[:-1] or path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue  # generated stubs
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``name`` imports (project modules resolved to the longest known name)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    resolved = set()
    for target in found:
        parts = target.split(".")
        while parts and ".".join(parts) not in known:
            parts.pop()
        resolved.add(".".join(parts) if parts else target)
    resolved.discard(name)
    return resolved


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer(module: str) -> str:
    if under(module, TOOLS):
        return "tools"
    if any(under(module, s) for s in SERVICES):
        return next(s for s in SERVICES if under(module, s))
    if under(module, EDGE) or module == CLIENT:
        return "edge"
    return "library"


def test_the_library_has_no_grpc(graph):
    bad = {
        m: sorted(i for i in imports if under(i, "grpc") or under(i, "grpc_health") or under(i, "grpc_reflection")
                  or i.endswith("_pb2_grpc")
                  or (i.startswith("specdec.") and layer(i) != "library"))
        for m, imports in graph.items() if layer(m) == "library"
    }
    assert not {m: i for m, i in bad.items() if i}


def test_the_edge_imports_no_service_or_tool(graph):
    bad = {m: sorted(i for i in imports if layer(i) not in ("library", "edge")) for m, imports in graph.items() if layer(m) == "edge"}
    assert not {m: i for m, i in bad.items() if i}


def test_services_import_no_tool_and_no_other_service(graph):
    bad = {}
    for m, imports in graph.items():
        mine = layer(m)
        if mine in SERVICES:
            wrong = sorted(i for i in imports if layer(i) not in ("library", "edge", mine) and i.startswith("specdec"))
            if wrong:
                bad[m] = wrong
    assert not bad


def test_no_import_cycles(graph):
    project = {m: {i for i in imports if i in graph} for m, imports in graph.items()}
    # A package's __init__ is imported by its submodules implicitly; only explicit imports count here.
    cycles, state = [], {}

    def visit(module, stack):
        state[module] = "open"
        stack.append(module)
        for target in sorted(project[module]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[module] = "done"

    for module in sorted(project):
        if module not in state:
            visit(module, [])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_every_folder_is_installed(graph):
    """Every repository folder with Python code maps to a package in the one namespace."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {k: v for k, v in config["package-dir"].items()} == {
        package: folder for folder, package in PACKAGES.items() if folder != "specdec"
    } | {"specdec.benchmarks": "benchmarks"}
    packages = set(config["packages"])
    for module, path in project_modules().items():
        if path.name == "__init__.py":
            assert module in packages, f"{module} ({path}) is not in pyproject.toml's packages"


# The orchestrator's doors and its core: each door converts its wire format into the core's types
# (specdec.generation) and runs them through the core (specdec.orchestrator.generations); no door
# calls another, and the core speaks no protocol.
GRPC_DOOR = "specdec.orchestrator.server"
HTTP_DOOR = ("specdec.orchestrator.http_api", "specdec.orchestrator.http_schemas", "specdec.orchestrator.http_chat",
             "specdec.orchestrator.http_responses", "specdec.orchestrator.http_streaming", "specdec.orchestrator.http_server")
CORE = ("specdec.generation", "specdec.orchestrator.generations", "specdec.orchestrator.controller")
PROTOCOLS = ("grpc", "grpc_health", "grpc_reflection", "specdec.v1", "specdec.rpc", "starlette", "uvicorn", "pydantic", "anyio")


def test_the_doors_never_import_each_other(graph):
    assert GRPC_DOOR in graph and all(m in graph for m in HTTP_DOOR)
    assert not [i for i in graph[GRPC_DOOR] if i in HTTP_DOOR and i != "specdec.orchestrator.http_server"]
    assert not {m: sorted(i for i in graph[m] if i == GRPC_DOOR) for m in HTTP_DOOR if GRPC_DOOR in graph[m]}


def test_the_core_imports_no_protocol_and_no_door(graph):
    bad = {m: sorted(i for i in graph[m] if any(under(i, p) for p in PROTOCOLS) or i == GRPC_DOOR or i in HTTP_DOOR)
           for m in CORE}
    assert not {m: i for m, i in bad.items() if i}
