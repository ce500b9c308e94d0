"""Prometheus metrics for triocomm clients and services (``pip install triocomm[prometheus]``).

:class:`PrometheusObserver` is an :class:`~triocomm.Observer`: pass it as
``observers=[...]`` to :func:`~triocomm.open_client` or a service function,
and expose its registry the usual ``prometheus_client`` way
(``start_http_server``, or ``triocomm serve --metrics-port``). Built on
triocomm's public API only.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .. import Connection, ObservedPeer, Observer, Server

__all__ = ["PrometheusObserver"]

# Session latencies from 100 microseconds to 10 seconds.
_LATENCY_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)


class PrometheusObserver(Observer):
    """An :class:`~triocomm.Observer` that counts in Prometheus metrics.

    From the events of every client and service it is attached to:

    * ``triocomm_connections_opened_total``,
      ``triocomm_connections_closed_total{outcome="ok"|"error"}``,
    * ``triocomm_connect_failures_total``, ``triocomm_retries_total``,
    * ``triocomm_sessions_total{outcome="ok"|"error"}`` and the histogram
      ``triocomm_session_duration_seconds``,
    * the histogram ``triocomm_pool_wait_seconds``.

    And, read from :attr:`Server.stats <triocomm.Server.stats>` at each
    scrape, one series per running service (label ``service``, its
    addresses): ``triocomm_server_connections_open``,
    ``triocomm_server_connections_peak``, ``triocomm_server_connections_total``,
    ``triocomm_server_sessions_total``, ``triocomm_server_errors_total{kind}``,
    ``triocomm_server_bytes_received_total``, ``triocomm_server_bytes_sent_total``,
    ``triocomm_server_messages_received_total`` and
    ``triocomm_server_messages_sent_total``.

    Args:
        registry: the :class:`prometheus_client.CollectorRegistry` to register
            in; ``None`` means ``prometheus_client``'s global one. A registry
            takes one ``PrometheusObserver`` (the metric names are fixed);
            one observer may watch any number of clients and services.

    It does not pickle (it holds a lock and its registry), so it cannot be
    handed to ``serve_workers``, whose options travel to each worker process.

    The events only add to plain integers (no lock, no label lookup per
    session); the metrics are built from them when Prometheus scrapes, in
    the scraping thread. Attach one observer to the clients and services of
    one Trio run.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._services: dict[int, Server] = {}
        self._lock = threading.Lock()  # scrapes run in another thread
        self._opened = 0
        # By outcome: [ok, error].
        self._closed = [0, 0]
        self._sessions = [0, 0]
        self._connect_failures = 0
        self._retries = 0
        self._session_duration = _Histogram(_LATENCY_BUCKETS)
        self._pool_wait_duration = _Histogram(_LATENCY_BUCKETS)
        (REGISTRY if registry is None else registry).register(_Collector(self))

    # -- the observer ----------------------------------------------------------

    def attached(self, source: object) -> None:
        """Export the stats of ``source`` if it is a service."""
        if isinstance(source, Server):
            with self._lock:
                self._services[id(source)] = source

    def detached(self, source: object) -> None:
        """Stop exporting ``source``'s stats."""
        with self._lock:
            self._services.pop(id(source), None)

    def connection_opened(self, conn: Connection[Any, Any]) -> None:
        """Count an established connection."""
        self._opened += 1

    def connection_closed(self, conn: Connection[Any, Any], error: BaseException | None) -> None:
        """Count a closed connection by outcome."""
        self._closed[error is not None] += 1

    def connect_failed(self, address: tuple[str, int] | str, error: BaseException) -> None:
        """Count a failed connect."""
        self._connect_failures += 1

    def session_ended(
        self, conn: ObservedPeer, error: BaseException | None, duration: float
    ) -> None:
        """Count a session by outcome and record its duration."""
        self._sessions[error is not None] += 1
        self._session_duration.observe(duration)

    def pool_wait(self, target: Any, duration: float) -> None:
        """Record a wait for a pool slot."""
        self._pool_wait_duration.observe(duration)

    def retry(self, target: Any, attempt: int, error: BaseException) -> None:
        """Count a retry."""
        self._retries += 1

    def services(self) -> list[Server]:
        """The running services whose stats are exported."""
        with self._lock:
            return list(self._services.values())


class _Histogram:
    """Counts per bucket, Prometheus-style (``le``), kept as plain numbers."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        counts, running, buckets = list(self.counts), 0, []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), counts, strict=True):
            running += count
            buckets.append((bound, running))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.total)


def _service_name(server: Server) -> str:
    names = []
    for address in server.addresses:
        if isinstance(address, tuple):
            host = str(address[0])
            names.append(f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}")
        else:
            names.append(str(address))
    return ",".join(names)


class _Collector(Collector):
    """Builds the metrics when Prometheus scrapes: the events' counts, the services' stats."""

    def __init__(self, observer: PrometheusObserver) -> None:
        self._observer = observer

    def describe(self) -> list[Metric]:
        # The names, so that a registry refuses a second observer.
        return list(self._events())

    def collect(self) -> Iterator[Metric]:
        yield from self._events()
        yield from self._service_stats()

    def _events(self) -> Iterator[Metric]:
        observer = self._observer
        yield CounterMetricFamily(
            "triocomm_connections_opened", "Connections established.", value=observer._opened
        )
        yield _by_outcome("triocomm_connections_closed", "Connections closed.", observer._closed)
        yield _by_outcome("triocomm_sessions", "Sessions ended.", observer._sessions)
        yield CounterMetricFamily(
            "triocomm_connect_failures",
            "Client connect attempts that failed.",
            value=observer._connect_failures,
        )
        yield CounterMetricFamily(
            "triocomm_retries", "Client sessions tried again.", value=observer._retries
        )
        yield observer._session_duration.family(
            "triocomm_session_duration_seconds", "How long sessions took, in seconds."
        )
        yield observer._pool_wait_duration.family(
            "triocomm_pool_wait_seconds",
            "How long client sessions waited for a pool slot, in seconds.",
        )

    def _service_stats(self) -> Iterator[Metric]:
        labels = ["service"]
        gauges = {
            name: GaugeMetricFamily(f"triocomm_server_{name}", text, labels=labels)
            for name, text in (
                ("connections_open", "Open connections of the service."),
                ("connections_peak", "The most connections the service had open at once."),
            )
        }
        counters = {
            name: CounterMetricFamily(f"triocomm_server_{name}", text, labels=labels)
            for name, text in (
                ("connections", "Connections the service accepted."),
                ("sessions", "Sessions the service handed to its handler."),
                ("bytes_received", "Bytes the service's connections received."),
                ("bytes_sent", "Bytes the service's connections sent."),
                ("messages_received", "Messages the service's connections received."),
                ("messages_sent", "Messages the service's connections sent."),
            )
        }
        errors = CounterMetricFamily(
            "triocomm_server_errors", "Service failures by kind.", labels=["service", "kind"]
        )
        for server in self._observer.services():
            stats = server.stats
            service = [_service_name(server)]
            gauges["connections_open"].add_metric(service, stats.connections_open)
            gauges["connections_peak"].add_metric(service, stats.connections_peak)
            counters["connections"].add_metric(service, stats.connections_total)
            counters["sessions"].add_metric(service, stats.sessions)
            counters["bytes_received"].add_metric(service, stats.bytes_received)
            counters["bytes_sent"].add_metric(service, stats.bytes_sent)
            counters["messages_received"].add_metric(service, stats.messages_received)
            counters["messages_sent"].add_metric(service, stats.messages_sent)
            for kind, count in dict(stats.errors).items():
                errors.add_metric([*service, kind], count)
        yield from gauges.values()
        yield from counters.values()
        yield errors


def _by_outcome(name: str, documentation: str, counts: list[int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["outcome"])
    family.add_metric(["ok"], counts[0])
    family.add_metric(["error"], counts[1])
    return family
