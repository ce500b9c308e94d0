"""What a ``bench`` run measured, and the report of it: text for a terminal,
or one JSON object (``--json``)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .. import __version__
from ._formatting import PROG, format_bytes, format_latency
from ._histogram import LatencyHistogram, histogram_rows, render_histogram


@dataclass
class BenchSettings:
    """What ``bench`` was asked to do, as the report describes it."""

    address: str
    embedded: bool
    codec: str
    conns: int
    size: int
    pipeline: int
    duration: float | None
    requests: int | None
    tls: bool = False


@dataclass
class BenchResult:
    """What a ``bench`` run measured."""

    settings: BenchSettings
    requests: int
    elapsed: float
    latency: LatencyHistogram
    errors: Counter[str]
    interrupted: bool = False
    #: Failed connects by cause: no request was sent on them.
    connect_errors: Counter[str] = dataclasses.field(default_factory=Counter)
    #: The time requests/s is over (``LoadRun.measured``); None: all of ``elapsed``.
    measured: float | None = None

    @property
    def measured_s(self) -> float:
        """The seconds requests/s is taken over."""
        return self.elapsed if self.measured is None else self.measured

    @property
    def requests_per_s(self) -> float:
        """Completed requests per second of measured time."""
        return self.requests / self.measured_s if self.measured_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        """Failed requests, every kind together."""
        return sum(self.errors.values())

    @property
    def connect_error_count(self) -> int:
        """Failed connects, every cause together."""
        return sum(self.connect_errors.values())

    @property
    def ok(self) -> bool:
        """True when requests were done and nothing failed, connects included."""
        return self.requests > 0 and not self.errors and not self.connect_errors


_PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p999", 0.999))


def report_json(result: BenchResult) -> dict[str, Any]:
    """The report as a JSON-ready dict (what ``--json`` prints)."""
    hist = result.latency
    latency: dict[str, float] = {"min": hist.min, "mean": hist.mean}
    latency.update({name: hist.percentile(q) for name, q in _PERCENTILES})
    latency["max"] = hist.max
    return {
        "triocomm": __version__,
        "settings": dataclasses.asdict(result.settings),
        "requests": result.requests,
        "elapsed_s": round(result.elapsed, 6),
        "measured_s": round(result.measured_s, 6),
        "requests_per_s": round(result.requests_per_s, 1),
        "bytes_per_s": round(result.requests_per_s * result.settings.size, 1),
        "latency_us": {name: round(value, 1) for name, value in latency.items()},
        "histogram": [
            {"from_us": round(a, 1), "to_us": round(b, 1), "count": count}
            for a, b, count in histogram_rows(hist)
        ],
        "errors": result.error_count,
        "errors_by_kind": dict(sorted(result.errors.items())),
        "connect_errors": result.connect_error_count,
        "connect_errors_by_cause": dict(sorted(result.connect_errors.items())),
        "interrupted": result.interrupted,
    }


def render_report(result: BenchResult, *, width: int = 80, unicode: bool = True) -> str:
    """The report as text for a terminal."""
    s = result.settings
    hist = result.latency
    micro = "µs" if unicode else "us"
    where = f"{s.address} (embedded echo service)" if s.embedded else s.address
    amount = f"{s.requests} requests" if s.requests is not None else f"{s.duration:g} s"
    lines = [
        f"{PROG} bench: {where}{' over TLS' if s.tls else ''}, codec {s.codec}, "
        f"{s.conns} connection{'s' if s.conns != 1 else ''}, {format_bytes(s.size)} messages, "
        f"pipeline {s.pipeline}, {amount}" + (" (interrupted)" if result.interrupted else ""),
        f"  requests   {result.requests} in {result.measured_s:.2f} s = "
        f"{result.requests_per_s:,.0f} req/s "
        f"({format_bytes(result.requests_per_s * s.size)}/s each way)",
    ]
    if result.errors:
        kinds = ", ".join(f"{kind} {count}" for kind, count in result.errors.most_common())
        lines.append(f"  errors     {result.error_count} ({kinds})")
    else:
        lines.append("  errors     0 (every reply checked)")
    if result.connect_errors:
        lines.append(_connects_line(result))
    if hist.count:
        figures = [f"min {format_latency(hist.min, micro=micro)}"]
        figures += [
            f"{name} {format_latency(hist.percentile(q), micro=micro)}"
            for name, q in _PERCENTILES[:3]
        ]
        figures.append(f"max {format_latency(hist.max, micro=micro)}")
        lines.append("  latency    " + "  ".join(figures))
        lines.append("")
        lines.append("  latency histogram (requests per range, share of all)")
        lines.extend(render_histogram(hist, width=width, unicode=unicode))
    return "\n".join(lines)


def _connects_line(result: BenchResult) -> str:
    causes = ", ".join(f"{why} {count}" for why, count in result.connect_errors.most_common())
    line = f"  connects   {result.connect_error_count} failed ({causes})"
    left_out = result.elapsed - result.measured_s
    if left_out > 0:
        line += f"; req/s leaves out the {left_out:.2f} s after the last reply"
    return line
