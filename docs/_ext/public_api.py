"""The ``public-api`` directive: autodoc for every name in a module's ``__all__``.

``.. public-api:: triocomm`` expands to one autodoc directive per public name,
in the order ``__all__`` lists them, so adding a public name to the package
documents it with no edit to the docs. A public name without a docstring of
its own is reported as a warning, which the ``-W`` build turns into an error.

Options: ``:optional:`` documents nothing (silently) when the module cannot be
imported, for modules that are still being written.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import types
from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)


def _autodoc_lines(qualname: str, obj: object) -> list[str]:
    if isinstance(obj, type) and issubclass(obj, BaseException):
        return [f".. autoexception:: {qualname}", "   :members:", "   :show-inheritance:"]
    if isinstance(obj, type) and issubclass(obj, enum.Enum):
        # Enum members rarely carry docstrings, yet the reader needs the list.
        return [f".. autoclass:: {qualname}", "   :members:", "   :undoc-members:"]
    if isinstance(obj, type):
        return [f".. autoclass:: {qualname}", "   :members:", "   :show-inheritance:"]
    if callable(obj):
        return [f".. autofunction:: {qualname}"]
    return [f".. autodata:: {qualname}"]


def _has_own_docstring(obj: object) -> bool:
    doc = getattr(obj, "__doc__", None)
    if not doc or not doc.strip():
        return False
    if isinstance(obj, type):
        # Text Python writes on its own: dataclasses put the signature in
        # __doc__, and Enum on 3.10 says "An enumeration.".
        if dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
            return False
        if issubclass(obj, enum.Enum) and doc == "An enumeration.":
            return False
    return True


class PublicApi(SphinxDirective):
    """Generate autodoc directives for ``module.__all__``."""

    required_arguments = 1
    option_spec = {"optional": directives.flag}

    def run(self) -> list[nodes.Node]:
        modname = self.arguments[0]
        try:
            module = importlib.import_module(modname)
        except ImportError as exc:
            if "optional" in self.options:
                return []
            raise self.error(f"public-api: cannot import {modname}: {exc}") from exc
        names = getattr(module, "__all__", None)
        if names is None:
            raise self.error(f"public-api: {modname} has no __all__")

        lines = []
        for name in names:
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType):
                continue  # a public submodule gets its own public-api directive
            qualname = f"{modname}.{name}"
            if not _has_own_docstring(obj):
                logger.warning(
                    "public name %s has no docstring", qualname, location=self.get_location()
                )
            lines += [*_autodoc_lines(qualname, obj), ""]
        return self.parse_text_to_nodes("\n".join(lines))


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("public-api", PublicApi)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
