"""Sphinx configuration for the triocomm documentation.

Pages are Markdown (MyST) or reStructuredText. The build must pass offline with
``-W``: intersphinx inventories are fetched only when TRIOCOMM_DOCS_INTERSPHINX=1
is set, and the API page is generated from ``triocomm.__all__``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
# Document the work tree's source, even when an older triocomm is installed.
sys.path.insert(0, str(DOCS.parent / "src"))
sys.path.insert(0, str(DOCS / "_ext"))

import triocomm  # noqa: E402

project = "triocomm"
author = "The triocomm developers"
copyright = "the triocomm developers"
release = triocomm.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.graphviz",
    "sphinx.ext.intersphinx",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "page_toctree",
    "public_api",
    "state_diagrams",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "_static", "requirements.txt", "Thumbs.db", ".DS_Store"]

# `single backticks` in docstrings link to Python objects, as in trio's docs.
default_role = "py:obj"

myst_enable_extensions = ["colon_fence", "deflist"]
# Links such as [pool](client.md#keep-alive-pool) resolve to headings.
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# Attributes listed in a docstring's "Attributes:" section become fields, not
# separate object descriptions that would clash with autodoc's own.
napoleon_use_ivar = True

# The build machines have no network, and a failed inventory fetch is a
# warning, which -W turns into an error; so the links are opt-in.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
if os.environ.get("TRIOCOMM_DOCS_INTERSPHINX") == "1":
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "trio": ("https://trio.readthedocs.io/en/stable", None),
    }

# Diagrams are drawn by Graphviz's dot at build time, as SVG (sharp at any
# width; static CSS scales them to the column).
graphviz_output_format = "svg"
graphviz_dot_args = ["-Gfontnames=svg"]

html_theme = "furo"
html_title = f"triocomm {release}"
html_static_path = ["_static"]
html_css_files = ["triocomm.css"]
# triocomm.css: a content column wide enough for 100-character code lines
# at 1280 px; on a phone, diagrams scaled to the column and tables that fit.
