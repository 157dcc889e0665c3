"""The package's import graph holds to the picture in docs/architecture.md.

    transports (server, serve, httpfront, http, tls, admin, exchangefront)
        → envoy (protobuf ↔ plain facts)
            → decision core (decision, response)
                → identity / policy / signals
                    → plain vocabulary (facts, trees, decisioncache, errors, configkeys, ...)

The graph is read from the source with ``ast`` (every ``import`` and ``from … import``,
the ones inside functions and under ``TYPE_CHECKING`` included: a lazy import is still a
dependency, it only hides a loop until the day it runs). A small import-linter: no cycle,
no arrow pointing up the picture, and the core reads no protobuf, no transport and no clock.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "authz_server"
ROOT = "authz_server"

TRANSPORTS = {f"{ROOT}.{name}" for name in ("server", "serve", "httpfront", "http", "tls", "admin", "exchangefront")}
ENVOY = f"{ROOT}.envoy"
CORE = {f"{ROOT}.{name}" for name in ("decision", "response")}
# Below the core: what it asks. ``cli`` modules are entry points (they wire the parts), not part of a layer.
BELOW_CORE = ("identity", "policy", "signals")
# The plain vocabulary everything shares: the request as facts, path trees, errors, config-key
# reading, and the decision cache with every part of its key (the fronts, identity and policy
# each contribute a part: they call it, it calls none of them).
VOCABULARY = {f"{ROOT}.{name}" for name in ("facts", "trees", "decisioncache", "errors", "configkeys", "durations")}

PROTOBUF = {"google", "envoy", "grpc", "grpc_health", "grpc_reflection", "xds", "udpa", "validate"}
TRANSPORT_LIBRARIES = {"grpc", "aiohttp", "httptools", "socket", "ssl", "asyncio"}
CLOCK = {"time", "datetime"}


def _modules() -> dict[str, tuple[Path, bool]]:
    found: dict[str, tuple[Path, bool]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    for path in PACKAGE.rglob("*.c"):  # a C extension module (setup.py): it imports none of ours
        found[".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)] = (path, False)
    return found


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The module of ours that ``name`` (a module or a name in one) is."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(modules of ours, top-level outside packages) that ``module`` imports, anywhere in it."""
    path, is_package = MODULES[module]
    package = module if is_package else module.rpartition(".")[0]
    ours: set[str] = set()
    outside: set[str] = set()
    if path.suffix == ".c":
        return ours, outside
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import sub` imports the submodule; `from mod import name` the module.
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
            names = submodules or [base]
        for name in names:
            if name == ROOT or name.startswith(ROOT + "."):
                owner = _owner(name)
                if owner is not None and owner != module:
                    ours.add(owner)
            else:
                outside.add(name.split(".")[0])
    return ours, outside


GRAPH = {module: _imports(module) for module in MODULES}


def _in(module: str, package: str) -> bool:
    return module == f"{ROOT}.{package}" or module.startswith(f"{ROOT}.{package}.")


def _is_entry_point(module: str) -> bool:
    return module.rpartition(".")[2] == "cli"


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(GRAPH):
        if start in index:
            continue
        work = [(start, iter(sorted(GRAPH[start][0])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for target in edges:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(GRAPH[target][0]))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
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


def test_the_graph_is_read() -> None:
    assert len(MODULES) > 100
    assert f"{ROOT}.policy.loader" in GRAPH[f"{ROOT}.decision"][0]  # a plain import
    assert f"{ROOT}.tls" in GRAPH[f"{ROOT}.exchangefront"][0]  # the reader sees into functions too


def test_no_import_cycles() -> None:
    assert _cycles() == []


def _violations(sources: set[str], forbidden_ours: set[str], forbidden_outside: set[str]) -> list[str]:
    out = []
    for module in sorted(sources):
        ours, outside = GRAPH[module]
        out += [f"{module} → {target}" for target in sorted(ours & forbidden_ours)]
        out += [f"{module} → {target} (outside)" for target in sorted(outside & forbidden_outside)]
    return out


def test_the_core_reads_no_protobuf_no_transport_and_no_clock() -> None:
    assert _violations(CORE | VOCABULARY, TRANSPORTS | {ENVOY, f"{ROOT}._proto"},
                       PROTOBUF | TRANSPORT_LIBRARIES | CLOCK) == []


def test_identity_imports_no_transport() -> None:
    identity = {m for m in MODULES if _in(m, "identity") and not _is_entry_point(m)}
    assert _violations(identity, TRANSPORTS | {ENVOY, f"{ROOT}._proto"}, PROTOBUF) == []


@pytest.mark.parametrize("part", BELOW_CORE)
def test_what_the_core_asks_never_imports_the_core_or_above(part: str) -> None:
    modules = {m for m in MODULES if _in(m, part) and not _is_entry_point(m)}
    assert _violations(modules, CORE | TRANSPORTS | {ENVOY}, set()) == []


def test_envoy_imports_no_transport() -> None:
    assert _violations({ENVOY}, TRANSPORTS, set()) == []


def test_the_vocabulary_imports_only_the_vocabulary() -> None:
    above = {m for m in MODULES if m not in VOCABULARY}
    assert _violations(VOCABULARY, above, set()) == []
