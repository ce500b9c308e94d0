"""The latency histogram of ``bench``: log-spaced buckets of bounded memory,
percentiles, and the text rows the report draws."""

from __future__ import annotations

import math

from ._formatting import format_latency


class LatencyHistogram:
    """Latencies in microseconds, kept in log-spaced buckets of bounded memory.

    Below 64 µs every microsecond has its own bucket; above, each power of two
    is split into 32 buckets, so a value is known to within 1/32 (about 3 %)
    of itself, like an HDR histogram with five bits of precision. That bounds
    memory to about 1200 counters however long the run,
    while percentiles stay accurate to well under the noise of a benchmark.
    The exact minimum, maximum and sum are kept on the side.
    """

    SUB_BITS = 5
    _SUB = 1 << SUB_BITS  # buckets per power of two
    # Values at or above 2**40 µs (about 12 days) share the last bucket.
    _TOP_BITS = 40

    def __init__(self) -> None:
        self._counts = [0] * self._index(1 << self._TOP_BITS)
        self._count = 0
        self._sum = 0.0
        self._min = math.inf
        self._max = 0.0

    @classmethod
    def _index(cls, value: int) -> int:
        sub = cls._SUB
        if value < 2 * sub:
            return value
        shift = value.bit_length() - cls.SUB_BITS - 1
        return (shift + 1) * sub + (value >> shift) - sub

    @classmethod
    def bucket_range(cls, index: int) -> tuple[int, int]:
        """The lowest and highest whole microsecond that land in bucket ``index``."""
        sub = cls._SUB
        if index < 2 * sub:
            return index, index
        shift = index // sub - 1
        mantissa = index % sub + sub
        return mantissa << shift, ((mantissa + 1) << shift) - 1

    def record(self, us: float) -> None:
        """Add one latency, in microseconds (negative values count as 0)."""
        us = max(us, 0.0)
        index = min(self._index(int(us)), len(self._counts) - 1)
        self._counts[index] += 1
        self._count += 1
        self._sum += us
        if us < self._min:
            self._min = us
        if us > self._max:
            self._max = us

    @property
    def count(self) -> int:
        """How many latencies were recorded."""
        return self._count

    @property
    def min(self) -> float:
        """The smallest latency (0 when empty)."""
        return self._min if self._count else 0.0

    @property
    def max(self) -> float:
        """The largest latency (0 when empty)."""
        return self._max

    @property
    def mean(self) -> float:
        """The average latency (0 when empty)."""
        return self._sum / self._count if self._count else 0.0

    def percentile(self, q: float) -> float:
        """The latency below or at which a fraction ``q`` (0-1) of requests finished.

        Nearest-rank definition; the value reported is the middle of its
        bucket, clamped to the exact minimum and maximum, so ``percentile(1)``
        is the true maximum.
        """
        if not 0 <= q <= 1:
            raise ValueError(f"q must be between 0 and 1, got {q!r}")
        if not self._count:
            return 0.0
        rank = max(1, math.ceil(q * self._count))
        seen = 0
        for index, count in enumerate(self._counts):
            seen += count
            if seen >= rank:
                if index == len(self._counts) - 1:
                    return self._max  # the overflow bucket has no upper bound
                low, high = self.bucket_range(index)
                return min(max((low + high + 1) / 2, self._min), self._max)
        raise AssertionError("rank beyond count")  # pragma: no cover

    def buckets(self) -> list[tuple[int, int, int]]:
        """Every non-empty bucket as ``(lowest_us, highest_us, count)``, in order."""
        return [
            (*self.bucket_range(index), count) for index, count in enumerate(self._counts) if count
        ]


def histogram_rows(hist: LatencyHistogram, rows: int = 12) -> list[tuple[float, float, int]]:
    """Group the fine buckets into at most ``rows`` log-spaced ranges for display.

    Returns ``(from_us, to_us, count)`` per range, from the minimum to the
    maximum latency; empty ranges between them are kept, because a gap in a
    latency distribution is worth seeing.
    """
    buckets = hist.buckets()
    if not buckets:
        return []
    low = max(hist.min, 1.0)
    high = max(hist.max, low) * 1.000001 + 1e-9
    if high / low < 1.01:
        return [(hist.min, hist.max, hist.count)]
    ratio = (high / low) ** (1 / rows)
    edges = [low * ratio**k for k in range(rows + 1)]
    counts = [0] * rows
    for first, last, count in buckets:
        # A fine bucket counts in the range that holds its middle.
        middle = (first + last + 1) / 2
        row = 0 if middle <= low else int(math.log(middle / low) / math.log(ratio))
        counts[min(max(row, 0), rows - 1)] += count
    edges[0], edges[-1] = hist.min, hist.max
    return [(edges[k], edges[k + 1], counts[k]) for k in range(rows)]


def render_histogram(hist: LatencyHistogram, *, width: int = 80, unicode: bool = True) -> list[str]:
    """Draw the latency histogram as text lines, one bar per range."""
    rows = histogram_rows(hist)
    if not rows:
        return []
    micro = "µs" if unicode else "us"
    labels = [
        f"{format_latency(a, micro=micro):>8} - {format_latency(b, micro=micro):<8}"
        for a, b, _ in rows
    ]
    peak = max(count for _, _, count in rows) or 1
    total = hist.count
    count_width = len(str(peak))
    # label, " |", bar, " ", count, "  ", "100.0%"
    bar_width = max(10, width - len(labels[0]) - count_width - 12)
    lines = []
    for label, (_, _, count) in zip(labels, rows, strict=True):
        lines.append(
            f"  {label}|{_bar(count / peak * bar_width, unicode):<{bar_width}} "
            f"{count:>{count_width}} {100 * count / total:5.1f}%"
        )
    return lines


_EIGHTHS = " ▏▎▍▌▋▊▉"


def _bar(cells: float, unicode: bool) -> str:
    whole = int(cells)
    if not unicode:
        return "#" * whole
    eighths = int((cells - whole) * 8)
    return "█" * whole + (_EIGHTHS[eighths] if eighths else "")
