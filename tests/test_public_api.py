"""The public surface: exactly ``__all__``, documented, and layered.

* ``triocomm`` exports exactly the names in ``__all__`` (sorted), nothing
  more: anything else is private and may change.
* Every public name, and every public method or property of a public class,
  has a docstring of its own.
* Each layer imports only the layers before it (errors and timeouts →
  framing → connection → client → server → the command line and test kit),
  and framing works with Trio missing altogether.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import TypeVar

import pytest

import triocomm
import triocomm.testing

SRC = Path(triocomm.__file__).parent

# Layer of each private module; a module may import only from layers <= its own,
# and framing may not import from its own layer's neighbours either.
LAYERS = {
    "_errors": 0,
    "_timeouts": 0,
    "_version": 0,
    "_framing": 1,
    "_connection": 2,
    "_datagram": 2,
    "_client": 3,
    "_pool": 3,
    "_upstream": 3,
    "_udp": 3,
    "_server": 4,
    "_datagram_service": 4,
    "_workers": 4,
    "_cli": 5,
    "__main__": 5,
    "testing": 5,
    "__init__": 5,
}


def public_names(module: types.ModuleType) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


def test_package_surface_is_exactly_all() -> None:
    exported = list(triocomm.__all__)
    assert exported == sorted(exported), "keep __all__ sorted"
    assert len(exported) == len(set(exported))
    assert public_names(triocomm) == set(exported)


def test_testing_kit_exports_what_it_defines() -> None:
    module = triocomm.testing
    exported = list(module.__all__)
    assert exported == sorted(exported), "keep __all__ sorted"
    for name in exported:
        assert hasattr(module, name), f"triocomm.testing.__all__ names missing {name!r}"
    # Helpers it imports are not its API; what it defines without a leading
    # underscore is.
    defined_here = {
        name
        for name in public_names(module)
        if getattr(getattr(module, name), "__module__", None) == module.__name__
        and not isinstance(getattr(module, name), TypeVar)
    }
    assert defined_here <= set(exported)


def test_design_names_are_public() -> None:
    for name in [
        "Codec", "Decoder", "LengthPrefixed", "Lines", "Raw", "Connection", "ConnState",
        "ConnectionStats", "Idle", "CommError", "ConnectionLost", "FrameTooLarge",
        "ProtocolError", "CommTimeout", "ConnectError", "UpstreamUnavailable", "Timeouts",
        "ServerTimeouts",
    ]:  # fmt: skip
        assert name in triocomm.__all__


def own_docstring(obj: object) -> bool:
    doc = getattr(obj, "__doc__", None)
    if not doc or not doc.strip():
        return False
    if isinstance(obj, type):
        # Text that Python writes by itself does not count.
        if dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
            return False
        if issubclass(obj, enum.Enum) and doc == "An enumeration.":
            return False
    return True


def public_members(cls: type) -> list[tuple[str, object]]:
    """Methods and properties a class defines itself (not inherited, not private)."""
    members = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, property):
            members.append((name, value))
    return members


@pytest.mark.parametrize("module", [triocomm, triocomm.testing], ids=lambda m: m.__name__)
def test_every_public_name_is_documented(module: types.ModuleType) -> None:
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        if not own_docstring(obj):
            missing.append(name)
        if isinstance(obj, type) and not issubclass(obj, enum.Enum):
            missing += [
                f"{name}.{member}"
                for member, value in public_members(obj)
                if not own_docstring(value)
            ]
    assert missing == []


def test_errors_are_a_family() -> None:
    for name in ["ConnectionLost", "FrameTooLarge", "ProtocolError", "CommTimeout",
                 "ConnectError", "UpstreamUnavailable"]:  # fmt: skip
        assert issubclass(getattr(triocomm, name), triocomm.CommError)
    import trio

    assert issubclass(triocomm.ConnectionLost, trio.BrokenResourceError)
    assert issubclass(triocomm.CommTimeout, TimeoutError)
    assert issubclass(triocomm.FrameTooLarge, triocomm.ProtocolError)


def imports_of(path: Path) -> set[str]:
    """Every module a source file imports, anywhere in it, as written
    (relative imports keep their leading dot)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            if node.level and not node.module:
                found.update(base + alias.name for alias in node.names)
            else:
                found.add(base)
    return found


def own_module(name: str) -> str | None:
    """The triocomm module an import refers to, or None for another package."""
    if name.startswith("."):
        return name.lstrip(".").split(".")[0] or "__init__"
    if name == "triocomm" or name.startswith("triocomm."):
        rest = name.split(".")[1:]
        return rest[0] if rest else "__init__"
    return None


def test_framing_imports_no_trio_and_nothing_above_errors() -> None:
    imported = imports_of(SRC / "_framing.py")
    assert not {name for name in imported if name.split(".")[0] == "trio"}
    assert {own_module(name) for name in imported} - {None} <= {"_errors"}


def subpackage_imports(folder: Path) -> set[str]:
    """What a subpackage (``_cli/``) imports from outside itself, written as a
    top-level module's imports would be: ``from .. import X`` (the package's
    public names) becomes ``"."``, ``from .._m import X`` becomes ``"._m"``;
    imports between its own modules (one dot) are left out."""
    found = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level != 1:
                found.add("." * min(node.level, 1) + (node.module or ""))
    return found


def module_layers() -> tuple[dict[str, int], dict[str, set[str]]]:
    """Layer of every module in the package, and the package modules each imports.

    Modules named in LAYERS have that layer; a module not named there gets the
    highest layer of what it imports, so a new helper module needs no edit here
    and a lower layer still cannot import it if it depends on a higher one.
    """
    imports = {
        path.stem: {own_module(name) for name in imports_of(path)} - {None, path.stem}
        for path in SRC.glob("*.py")
    }
    for folder in SRC.glob("*/__init__.py"):
        package = folder.parent
        outside = {own_module(name) for name in subpackage_imports(package)}
        imports[package.name] = outside - {None, package.name}
    layers = {name: LAYERS[name] for name in imports if name in LAYERS}
    unknown = [name for name in imports if name not in LAYERS]
    for _ in range(len(unknown) + 1):  # enough rounds for any chain of new modules
        for name in unknown:
            layers[name] = max((layers.get(t, 0) for t in imports[name] if t), default=0)
    return layers, {k: {t for t in v if t} for k, v in imports.items()}


def layer_problems(layers: dict[str, int], imports: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(imports.items()):
        for target in sorted(targets):
            if target not in layers:
                problems.append(f"{module} imports {target}, which is not in the package")
            elif layers[target] > layers[module]:
                problems.append(f"{module} (layer {layers[module]}) imports {target} "
                                f"(layer {layers[target]})")  # fmt: skip
            elif layers[target] == layers[module] and module in ("_framing", "_connection"):
                problems.append(f"{module} imports its sibling {target}")
    return problems


def test_every_module_imports_downwards() -> None:
    assert layer_problems(*module_layers()) == []


def test_the_layer_check_can_fail() -> None:
    layers, imports = module_layers()
    bad = {**imports, "_framing": {"_errors", "_connection"}, "_connection": {"_server"}}
    assert layer_problems(layers, bad) == [
        "_connection (layer 2) imports _server (layer 4)",
        "_framing (layer 1) imports _connection (layer 2)",
    ]


def test_every_module_starts_with_a_docstring() -> None:
    for path in sorted(SRC.glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc, f"{path.name} has no module docstring"


def test_framing_runs_without_trio() -> None:
    # Load _framing.py on its own, with `import trio` made to fail and a
    # minimal stand-in for the error module (the real one derives
    # ConnectionLost from a Trio class).
    script = textwrap.dedent(
        f"""
        import importlib.util, sys, types
        sys.modules["trio"] = None  # any `import trio` now raises ImportError
        package = types.ModuleType("triocomm")
        package.__path__ = []
        errors = types.ModuleType("triocomm._errors")
        class ProtocolError(Exception): pass
        class FrameTooLarge(ProtocolError):
            def __init__(self, message, *, size, limit):
                super().__init__(message)
                self.size, self.limit = size, limit
        errors.ProtocolError, errors.FrameTooLarge = ProtocolError, FrameTooLarge
        sys.modules["triocomm"], sys.modules["triocomm._errors"] = package, errors
        spec = importlib.util.spec_from_file_location(
            "triocomm._framing", {str(SRC / "_framing.py")!r})
        framing = importlib.util.module_from_spec(spec)
        sys.modules["triocomm._framing"] = framing
        spec.loader.exec_module(framing)
        for codec in (framing.LengthPrefixed(), framing.Lines(), framing.Raw()):
            assert codec.decoder().feed(codec.encode(b"hi")) == [b"hi"], codec
        try:
            framing.LengthPrefixed(max_frame=1).decoder().feed(b"\\0\\0\\0\\2")
        except FrameTooLarge:
            pass
        else:
            raise SystemExit("no FrameTooLarge")
        assert "trio" not in [m for m in sys.modules if sys.modules[m] is not None]
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
