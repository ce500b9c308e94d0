"""The live progress of a ``bench`` run, on stderr."""

from __future__ import annotations

from collections import deque
from typing import IO

import trio

from ._formatting import PROG
from ._load import LoadRun


class ProgressDisplay:
    """Live progress of a run, on stderr (so that stdout holds only the report).

    On a terminal one line is rewritten in place four times a second; anywhere
    else (a pipe, a CI log) one plain line is printed per second, which reads
    well in a log and never fills it with carriage returns. Hand-written
    rather than taken from a terminal UI library: it is one line of text, and
    the command line then needs nothing beyond Trio.
    """

    BAR = 20

    def __init__(
        self,
        stream: IO[str],
        *,
        live: bool,
        duration: float | None,
        requests: int | None,
        unicode: bool = True,
    ) -> None:
        self.stream = stream
        self.live = live
        self.duration = duration
        self.requests = requests
        self.unicode = unicode
        self.interval = 0.25 if live else 1.0
        self._shown = False

    def line(
        self, elapsed: float, done: int, errors: int, rate: float, connect_errors: int = 0
    ) -> str:
        """The text of one progress update (failed connects only once there are some)."""
        if self.requests is not None:
            fraction = done / self.requests
            amount = f"{done:,}/{self.requests:,} requests"
        else:
            fraction = elapsed / self.duration if self.duration else 0.0
            amount = f"{done:,} requests"
        figures = f"{rate:,.0f} req/s  {errors:,} errors"
        if connect_errors:
            figures += f"  {connect_errors:,} failed connects"
        if not self.live:
            return f"{PROG} bench: {elapsed:.1f} s  {figures}  {amount}"
        full, empty = ("█", "░") if self.unicode else ("#", "-")
        cells = min(self.BAR, int(fraction * self.BAR))
        bar = full * cells + empty * (self.BAR - cells)
        clock = f"{elapsed:4.1f}/{self.duration:g} s" if self.duration else f"{elapsed:4.1f} s"
        return f"{clock} [{bar}] {figures}  {amount}"

    def show(
        self, elapsed: float, done: int, errors: int, rate: float, connect_errors: int = 0
    ) -> None:
        """Print one update."""
        text = self.line(elapsed, done, errors, rate, connect_errors)
        if self.live:
            # Clear to the end of the line: the new text may be shorter.
            self.stream.write(f"\r{text}\x1b[K")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        """Remove the live line, so the report starts on a clean line."""
        if self.live and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


async def show_progress(run: LoadRun, display: ProgressDisplay) -> None:
    """Update ``display`` at its interval until cancelled."""
    # Requests/s is measured over the last second, not since the start, so
    # the display shows the present rate (a stall shows as a drop at once).
    history: deque[tuple[float, int]] = deque([(run.started_at, 0)])
    next_at = run.started_at
    while True:
        next_at += display.interval
        await trio.sleep_until(next_at)
        now = run.clock()
        history.append((now, run.done))
        while len(history) > 2 and now - history[1][0] >= 1.0:
            history.popleft()
        then, done_then = history[0]
        rate = (run.done - done_then) / (now - then) if now > then else 0.0
        display.show(now - run.started_at, run.done, run.error_count, rate, run.connect_error_count)
