"""The package's layers, read from its import statements (all of them: inside functions
and under ``TYPE_CHECKING`` too).

* No import cycle between modules.
* The pure floor — ``http1``, ``errors``, ``flow``, ``config`` — imports the standard
  library and, downwards, itself only (``config`` nothing of eyewall at all).
* ``policy`` imports, of eyewall, ``http1``, ``errors`` and itself; of third parties,
  bcrypt only.  ``tls`` imports cryptography, the standard library and itself.
* ``observe`` never imports ``proxy``; ``dashboard`` never imports ``proxy``.
* Nothing but ``proxy.server`` imports the client loop (``proxy.client``).

Each rule is proved able to fail, on a copy of the graph with one forbidden edge added.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "eyewall"

Graph = dict[str, set[str]]  # module -> modules (eyewall's and others') it imports


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, module: str, modules: set[str]) -> set[str]:
    """Modules named by ``path``'s import statements, resolved to eyewall modules where
    they are (``from eyewall.x import Y`` is ``eyewall.x``, or ``eyewall.x.Y`` when that
    is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in modules else target)
    return found


def import_graph() -> Graph:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: imports_of(path, name, modules) - {name} for name, path in paths.items()}


def top(name: str) -> str:
    return name.split(".")[0]


def is_stdlib(name: str) -> bool:
    return top(name) in sys.stdlib_module_names or name == "__future__"


def cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


PURE_FLOOR = ("eyewall.http1", "eyewall.errors", "eyewall.flow", "eyewall.config")


def violations(graph: Graph) -> Iterator[str]:
    """Every broken layering rule, as 'module -> import (rule)'."""
    for module, imported in sorted(graph.items()):
        for name in sorted(imported):
            ours = under(name, "eyewall")
            if under(module, "eyewall.config") and ours:
                yield f"{module} -> {name} (config imports nothing of eyewall)"
            elif under(module, *PURE_FLOOR):
                if ours and not under(name, *PURE_FLOOR):
                    yield f"{module} -> {name} (the pure floor imports only itself)"
                elif not ours and not is_stdlib(name):
                    yield f"{module} -> {name} (the pure floor imports only the stdlib)"
            if under(module, "eyewall.policy"):
                if ours and not under(name, "eyewall.policy", "eyewall.http1", "eyewall.errors"):
                    yield f"{module} -> {name} (policy imports only http1 and errors)"
                elif not ours and not is_stdlib(name) and top(name) != "bcrypt":
                    yield f"{module} -> {name} (policy's only third party is bcrypt)"
            if (
                under(module, "eyewall.tls")
                and not ours
                and not is_stdlib(name)
                and (top(name) != "cryptography")
            ):
                yield f"{module} -> {name} (tls: cryptography and the stdlib)"
            if under(module, "eyewall.tls") and ours and not under(name, "eyewall.tls"):
                yield f"{module} -> {name} (tls imports only itself)"
            if under(module, "eyewall.observe", "eyewall.dashboard") and under(
                name, "eyewall.proxy"
            ):
                yield f"{module} -> {name} (observers never import the proxy)"
            if name == "eyewall.proxy.client" and module != "eyewall.proxy.server":
                yield f"{module} -> {name} (only the server imports the client loop)"


def test_the_graph_is_read():
    graph = import_graph()
    assert "eyewall.proxy.client" in graph["eyewall.proxy.server"]
    assert "eyewall.proxy.tunnel" in graph["eyewall.proxy.context"]  # a TYPE_CHECKING import
    assert "eyewall.config" in graph["eyewall.app"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_layering_rules_hold():
    assert list(violations(import_graph())) == []


@pytest.mark.parametrize(
    ("module", "added", "rule"),
    [
        ("eyewall.config", "eyewall.policy.rules", "config imports nothing"),
        ("eyewall.http1.parse", "tornado.iostream", "only the stdlib"),
        ("eyewall.flow", "eyewall.observe.records", "the pure floor imports only itself"),
        ("eyewall.policy.engine", "eyewall.config", "policy imports only http1 and errors"),
        ("eyewall.policy.admission", "asyncio.tasks", ""),  # stdlib: allowed
        ("eyewall.policy.state", "tornado.ioloop", "policy's only third party is bcrypt"),
        ("eyewall.observe.metrics", "eyewall.proxy.server", "observers never import the proxy"),
        ("eyewall.proxy.exchange", "eyewall.proxy.client", "only the server imports the client"),
        ("eyewall.tls.leaves", "eyewall.proxy.streams", "tls imports only itself"),
    ],
)
def test_each_rule_can_fail(module, added, rule):
    graph = import_graph()
    graph[module] = graph[module] | {added}
    found = [v for v in violations(graph) if v.startswith(f"{module} -> {added} ")]
    if rule:
        assert found and rule in found[0]
    else:
        assert found == []


def test_the_cycle_check_can_fail():
    graph = import_graph()
    graph["eyewall.proxy.context"] = graph["eyewall.proxy.context"] | {"eyewall.proxy.client"}
    assert ["eyewall.proxy.client", "eyewall.proxy.context"] in [
        [m for m in c if m in ("eyewall.proxy.client", "eyewall.proxy.context")]
        for c in cycles(graph)
    ]
