"""The ``page-toctree`` directive: a toctree that tolerates pages not written yet.

The index names the guide pages in reading order, including pages that other
contributors have not written yet; a plain ``toctree`` would warn about each
missing one, and ``-W`` makes that an error. ``page-toctree`` takes the same
options as ``toctree`` but leaves out plain entries whose page does not exist
and glob entries that match no page not already listed, so a new page appears
in the index without anyone editing it.
"""

from __future__ import annotations

from typing import Any

from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.directives.other import TocTree, glob_re
from sphinx.util import docname_join, url_re
from sphinx.util.matching import patfilter
from sphinx.util.nodes import explicit_title_re


class PageToctree(TocTree):
    """A ``toctree`` whose entries may name pages that do not exist (yet)."""

    def parse_content(self, toctree: addnodes.toctree) -> None:
        here = self.env.current_document.docname
        found = self.env.found_docs - {here}

        def is_plain(entry: str) -> bool:
            return not (
                glob_re.match(entry) or explicit_title_re.match(entry) or url_re.match(entry)
            )

        listed = {docname_join(here, entry) for entry in self.content if entry and is_plain(entry)}
        kept = []
        for entry in self.content:
            if not entry:
                continue
            if is_plain(entry):
                if docname_join(here, entry) in found:
                    kept.append(entry)
            elif toctree["glob"] and glob_re.match(entry):
                matches = patfilter(found, docname_join(here, entry))
                if any(docname not in listed for docname in matches):
                    kept.append(entry)
            else:
                kept.append(entry)  # an explicit title or a URL: left to toctree
        self.content = kept  # type: ignore[assignment]
        super().parse_content(toctree)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("page-toctree", PageToctree)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
