"""The code's shape, as the architecture promises it (docs/architecture.md).

* One owner per invariant: a module reaches into another module's private
  names (``x._name`` with ``x`` not ``self``/``cls``, or ``from ._m import
  _name``) in at most ``MAX_PRIVATE_REACHES`` places, all of them the named
  operations that ``Connection`` offers the layers above it.
* No function in ``src/`` is longer than 80 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "triocomm"
MAX_PRIVATE_REACHES = 10
MAX_FUNCTION_LINES = 80
# The operations Connection offers the client, the pool and the server.
CONNECTION_OPERATIONS = {
    "_answer",
    "_attach",
    "_begin_session",
    "_exchange",
    "_flush",
    "_set_state",
}


def modules() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text()) for path in sorted(SRC.rglob("*.py"))}


def defined_here(tree: ast.Module) -> set[str]:
    """Names a module defines: functions, classes, and attributes it assigns on self."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
        ):
            names.add(node.attr)
    return names


def private_reaches(path: Path, tree: ast.Module) -> list[tuple[str, str]]:
    own = defined_here(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            if node.attr.startswith("__") or node.attr in own:
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            found.append((f"{path.name}:{node.lineno}", node.attr))
        elif isinstance(node, ast.ImportFrom) and node.level:
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append((f"{path.name}:{node.lineno}", alias.name))
    return found


def test_layers_reach_into_connection_only_through_its_named_operations() -> None:
    reaches = [r for path, tree in modules().items() for r in private_reaches(path, tree)]
    assert len(reaches) <= MAX_PRIVATE_REACHES, reaches
    assert {name for _, name in reaches} <= CONNECTION_OPERATIONS, reaches


def test_no_function_is_longer_than_80_lines() -> None:
    long = [
        f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []
