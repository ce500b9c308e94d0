"""An OpenTelemetry observer: one span per session, with the peer and the outcome.

``docs/observing.md`` shows this file. Attach it to a service or a client::

    from opentelemetry import trace
    observer = SessionTracer(trace.get_tracer("my-service"))
    await triocomm.serve(handler, 7000, codec=codec, observers=[observer])

Each session (a request of ``serve``, a whole connection of
``serve_connections``, a client ``request``/``run``/``connection``) becomes a
span named ``triocomm.session`` with the attributes ``triocomm.peer``,
``triocomm.connection`` (the connection's id), ``triocomm.seq`` and, when it
ends, ``triocomm.outcome`` (``"ok"`` or the exception's type name); a failed
session also records its exception and an error status. Observer methods are
plain functions, so the span is started and ended without awaiting anything.

Run it (``pip install opentelemetry-sdk``) to serve an echo on a free port and
print each session's span on the console::

    python examples/otel_observer.py
"""

from __future__ import annotations

import functools
from typing import Any

import trio
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

import triocomm


class SessionTracer(triocomm.Observer):
    """Opens a span when a session starts and ends it when the session ends."""

    def __init__(self, tracer: trace.Tracer, kind: SpanKind = SpanKind.SERVER) -> None:
        self._tracer = tracer
        self._kind = kind
        # The open span of each connection (or datagram peer), by its id().
        self._spans: dict[int, Span] = {}

    def session_started(self, conn: triocomm.ObservedPeer) -> None:
        attributes: dict[str, str | int] = {"triocomm.peer": str(conn.remote_address)}
        if isinstance(conn, triocomm.Connection):
            attributes.update(
                {
                    "triocomm.peer": conn.peer,
                    "triocomm.connection": conn.id,
                    "triocomm.seq": conn.seq,
                }
            )
        # A connection runs one session at a time, and a datagram service
        # gives each datagram a peer object of its own: either keys the span.
        self._spans[id(conn)] = self._tracer.start_span(
            "triocomm.session", kind=self._kind, attributes=attributes
        )

    def session_ended(
        self, conn: triocomm.ObservedPeer, error: BaseException | None, duration: float
    ) -> None:
        span = self._spans.pop(id(conn), None)
        if span is None:
            return
        span.set_attribute("triocomm.outcome", "ok" if error is None else type(error).__name__)
        if error is not None:
            if isinstance(error, Exception):
                span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, str(error) or type(error).__name__))
        span.end()

    def connection_closed(
        self, conn: triocomm.Connection[Any, Any], error: BaseException | None
    ) -> None:
        # A session cut short with its connection (never seen ending): end its span too.
        span = self._spans.pop(id(conn), None)
        if span is not None:
            span.set_attribute("triocomm.outcome", "closed")
            span.end()


async def echo(request: bytes, conn: triocomm.Connection[bytes, bytes]) -> bytes:
    return request


async def demo() -> None:
    """Serve an echo with the tracer, send it three requests, print the spans."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    observer = SessionTracer(provider.get_tracer("otel_observer example"))
    codec = triocomm.LengthPrefixed()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(
                triocomm.serve, echo, 0, host="127.0.0.1", codec=codec, observers=[observer]
            )
        )
        target = triocomm.Target("127.0.0.1", server.port, codec)
        async with triocomm.open_client() as client:
            for word in (b"one", b"two", b"three"):
                await client.request(target, word)
        await server.shutdown()
    provider.shutdown()


if __name__ == "__main__":
    trio.run(demo)
