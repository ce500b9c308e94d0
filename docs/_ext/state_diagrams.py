"""The ``state-diagram`` and ``timeline-diagram`` directives: pictures drawn from data.

``triocomm._states`` holds the client and server state machines and the
timeout timelines as plain tables, and ``tests/test_states.py`` checks the
tables against the state changes the code makes. These directives turn the
tables into Graphviz ``dot`` source and hand it to ``sphinx.ext.graphviz``,
which runs ``dot`` at build time (no network, no stored images), so a
picture cannot drift from the code without a test failing first::

    ```{state-diagram} client
    ```

    ```{timeline-diagram} server
    ```

Both draw top to bottom, which keeps them narrow enough for a phone.
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.ext.graphviz import graphviz
from sphinx.util.docutils import SphinxDirective

from triocomm._states import (
    CLIENT,
    CLIENT_TIMELINE,
    SERVER,
    SERVER_TIMELINE,
    Moment,
    Span,
    Transition,
)

FONT = "Helvetica,Arial,sans-serif"
INK = "#2f4b7c"
FAIL = "#b3403a"
CLOSE = "#6b6b6b"
STYLE = {
    "main": f'color="{INK}", fontcolor="{INK}", penwidth=1.6',
    "close": f'color="{CLOSE}", fontcolor="{CLOSE}"',
    "failure": f'color="{FAIL}", fontcolor="{FAIL}", style=dashed, arrowsize=0.7',
}
HEADER = f"""\
  graph [bgcolor="white", pad=0.25, nodesep=0.35, ranksep=0.4, fontname="{FONT}"];
  node [fontname="{FONT}", fontsize=11];
  edge [fontname="{FONT}", fontsize=9, arrowsize=0.8];"""


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def state_dot(name: str, table: tuple[Transition, ...], entry: str) -> str:
    """Dot source for one state machine; ``entry`` labels the way in."""
    states = []
    for t in table:
        for state in (t.source, t.target):
            if state not in states:
                states.append(state)
    lines = [f"digraph {name} {{", HEADER]
    lines.append(f'  node [shape=box, style="rounded,filled", fillcolor="#eef2f9", color="{INK}"];')
    lines.append('  start [shape=circle, width=0.14, label="", style=filled, fillcolor="black"];')
    for state in states:
        extra = ""
        if state.name == "ERROR":
            extra = f', fillcolor="#fbecea", color="{FAIL}", fontcolor="{FAIL}"'
        elif state.name == "CLOSED":
            extra = ", peripheries=2"
        lines.append(f"  {state.name} [label={_quote(state.name)}{extra}];")
    lines.append(f"  start -> CONNECTED [label={_quote(entry)}, {STYLE['main']}];")
    for t in table:
        # Failure edges would all say "failed": the legend says it once.
        label = "" if t.kind == "failure" else f"label={_quote(t.label)}, "
        # Closing and failing lead down and out; they must not pull the
        # main loop's layout around.
        weight = "" if t.kind == "main" else ", weight=0"
        lines.append(f"  {t.source.name} -> {t.target.name} [{label}{STYLE[t.kind]}{weight}];")
    lines.append("  { rank=sink; CLOSED; ERROR; }")
    lines.append("}")
    return "\n".join(lines)


def timeline_dot(name: str, timeline: tuple[tuple[Moment, ...], tuple[Span, ...]]) -> str:
    """Dot source for a timeline: time runs down, each limit labels the stretch it covers.

    A limit over one step labels the arrow between two moments; a limit over
    several steps is a bracket beside them.
    """
    moments, spans = timeline
    order = [m.name for m in moments]
    one_step: dict[str, list[str]] = {}
    longer = []
    for span in spans:
        label = span.limit if not span.note else f"{span.limit} ({span.note})"
        if order.index(span.end) - order.index(span.start) == 1:
            one_step.setdefault(span.start, []).append(label)
        else:
            longer.append((span, label))
    lines = [f"digraph {name} {{", HEADER]
    lines.append(
        '  node [shape=box, style="rounded,filled", fillcolor="#f4f4f4", color="#9a9a9a",'
        " width=2.4, group=axis];"
    )
    for moment in moments:
        lines.append(f"  {moment.name} [label={_quote(moment.label)}];")
    for before, after in itertools.pairwise(moments):
        labels = one_step.get(before.name)
        if labels:
            text = _quote("\n".join(labels))
            style = STYLE["main"]
            lines.append(f"  {before.name} -> {after.name} [label={text}, {style}, weight=10];")
        else:
            lines.append(
                f'  {before.name} -> {after.name} [color="#9a9a9a", arrowsize=0.6, weight=10];'
            )
    # A bracket is a line between two dots set beside its moments, on the left.
    for number, (span, label) in enumerate(longer):
        top, bottom = f"{span.limit}_{number}_from", f"{span.limit}_{number}_to"
        for end in (top, bottom):
            # One group: dot draws the line between them straight.
            lines.append(
                f'  {end} [shape=point, width=0.07, color="{INK}", fillcolor="{INK}",'
                f" group=bracket{number}];"
            )
        lines.append(f"  {{ rank=same; {top} -> {span.start} [style=invis, minlen=2]; }}")
        lines.append(f"  {{ rank=same; {bottom} -> {span.end} [style=invis, minlen=2]; }}")
        style = STYLE["main"]
        lines.append(f"  {top} -> {bottom} [label={_quote(label)}, {style}, arrowhead=none];")
    lines.append("}")
    return "\n".join(lines)


def _graph(directive: SphinxDirective, code: str, alt: str) -> list[nodes.Node]:
    node = graphviz()
    node["code"] = code
    node["options"] = {"docname": directive.env.current_document.docname}
    node["alt"] = alt
    node["classes"] = ["triocomm-diagram"]
    return [node]


class StateDiagram(SphinxDirective):
    """``state-diagram client`` or ``state-diagram server``."""

    required_arguments = 1
    option_spec: ClassVar[dict[str, Any]] = {}

    def run(self) -> list[nodes.Node]:
        side = directives.choice(self.arguments[0], ("client", "server"))
        table, entry = (CLIENT, "connected") if side == "client" else (SERVER, "accepted")
        alt = f"The {side} connection's states and the transitions between them."
        return _graph(self, state_dot(f"{side}_states", table, entry), alt)


class TimelineDiagram(SphinxDirective):
    """``timeline-diagram client`` or ``timeline-diagram server``."""

    required_arguments = 1
    option_spec: ClassVar[dict[str, Any]] = {}

    def run(self) -> list[nodes.Node]:
        side = directives.choice(self.arguments[0], ("client", "server"))
        timeline = CLIENT_TIMELINE if side == "client" else SERVER_TIMELINE
        alt = f"Which time limit covers which span of a {side} session."
        return _graph(self, timeline_dot(f"{side}_timeline", timeline), alt)


def setup(app: Sphinx) -> dict[str, Any]:
    app.setup_extension("sphinx.ext.graphviz")
    app.add_directive("state-diagram", StateDiagram)
    app.add_directive("timeline-diagram", TimelineDiagram)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
