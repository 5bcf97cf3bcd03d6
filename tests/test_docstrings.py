"""Every public class, function and method of the package says what it does.

Exempt: names starting with an underscore, ``@overload`` stubs (the implementation
carries the docstring), property setters (the getter carries it), and Tornado handler
methods overriding the framework's (``get``, ``prepare``, ``on_message``...: the
handler's class docstring names the route, the framework documents the method).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import tornado.web
import tornado.websocket

PACKAGE = Path(__file__).resolve().parent.parent / "eyewall"
FRAMEWORK = set(dir(tornado.web.RequestHandler)) | set(dir(tornado.websocket.WebSocketHandler))


def _decorated(node: ast.AST, name: str) -> bool:
    return any(
        getattr(d, "id", None) == name or getattr(d, "attr", None) == name
        for d in getattr(node, "decorator_list", ())
    )


def _undocumented() -> list[str]:
    missing: list[str] = []

    def visit(body: list[ast.stmt], path: Path, prefix: str, handler: bool) -> None:
        for node in body:
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            if node.name.startswith("_") or _decorated(node, "overload"):
                continue
            if _decorated(node, "setter") or (handler and node.name in FRAMEWORK):
                continue
            if ast.get_docstring(node) is None:
                missing.append(
                    f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {prefix}{node.name}"
                )
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b) for b in node.bases}
                is_handler = handler or any(
                    b.startswith("tornado.") or b in {"Base", "Guarded"} for b in bases
                )
                visit(node.body, path, f"{prefix}{node.name}.", is_handler)

    for path in sorted(PACKAGE.rglob("*.py")):
        visit(ast.parse(path.read_text()).body, path, "", False)
    return missing


def test_public_names_have_docstrings() -> None:
    missing = _undocumented()
    assert not missing, "public names without a docstring:\n" + "\n".join(missing)


def test_the_check_finds_a_missing_docstring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The checker itself must be able to fail.
    package = tmp_path / "eyewall"
    package.mkdir()
    (package / "m.py").write_text(
        'def documented():\n    """Yes."""\n\n\n'
        "def bare():\n    pass\n\n\n"
        "def _private():\n    pass\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    assert _undocumented() == ["eyewall/m.py:5 bare"]
