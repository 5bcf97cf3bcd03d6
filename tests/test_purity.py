"""The pure modules (parsing, framing rules, errors, settings, flow records) never import
Tornado: they are usable, and testable, without an event loop.

Checked two ways: importing them in a fresh interpreter leaves ``tornado`` out of
``sys.modules``, and their source holds no import of Tornado or of a module that uses it,
not even one deferred into a function body.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PURE = [
    "eyewall.http1.parse",
    "eyewall.http1.target",
    "eyewall.http1.framing",
    "eyewall.http1.fields",
    "eyewall.http1.methods",
    "eyewall.http1.response",
    "eyewall.http1.chunked",
    "eyewall.errors",
    "eyewall.config",
    "eyewall.flow",
    "eyewall.policy.admission",
    "eyewall.policy.auth",
    "eyewall.policy.engine",
    "eyewall.policy.limits",
    "eyewall.policy.networks",
    "eyewall.policy.rules",
    "eyewall.policy.state",
]
# Modules of the package that are allowed to use Tornado; a pure module importing one of
# them would pull Tornado in.
IMPURE_PREFIXES = (
    "tornado",
    "eyewall.proxy",
    "eyewall.observe.accesslog",
    "eyewall.cli",
    "eyewall.__main__",
)

PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m == "tornado" or m.startswith("tornado."))))
"""


def tornado_modules_after_importing(*modules: str) -> list[str]:
    """The tornado modules loaded by a fresh interpreter after importing ``modules``."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *modules],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    loaded: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return loaded


def test_pure_modules_together_do_not_load_tornado():
    assert tornado_modules_after_importing(*PURE) == []


@pytest.mark.parametrize("module", PURE)
def test_each_pure_module_alone_does_not_load_tornado(module):
    assert tornado_modules_after_importing(module) == []


def test_the_probe_sees_tornado_when_it_is_loaded():
    # The check above can fail: a module of the I/O layer does load Tornado.
    assert "tornado" in tornado_modules_after_importing("eyewall.proxy.server")


def imported_names(module: str) -> set[str]:
    """Every module named by an import statement anywhere in ``module``'s source."""
    path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    package = module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("module", PURE)
def test_pure_module_source_has_no_io_layer_import(module):
    bad = sorted(
        name
        for name in imported_names(module)
        if any(name == p or name.startswith(p + ".") for p in IMPURE_PREFIXES)
    )
    assert bad == [], f"{module} imports {bad}"


def test_source_scan_sees_the_io_layer_imports():
    # The scan can fail too: it finds Tornado where the access log imports it.
    names = imported_names("eyewall.observe.accesslog")
    assert "tornado.ioloop" in names
    assert "eyewall.flow.Flow" in names
