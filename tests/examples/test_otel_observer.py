"""examples/otel_observer.py: a span per session, read back from the SDK's in-memory exporter."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import pytest
import trio

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from otel_observer import SessionTracer

import triocomm
from triocomm import Connection, LengthPrefixed, Server, Target, open_client

LOOPBACK = "127.0.0.1"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    return InMemorySpanExporter()


def tracer_for(exporter: InMemorySpanExporter) -> SessionTracer:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return SessionTracer(provider.get_tracer("test"))


async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
    if request == b"boom":
        raise ValueError("no boom today")
    return request


def attributes(span: ReadableSpan) -> dict[str, object]:
    return dict(span.attributes or {})


async def test_a_service_gets_one_span_per_request(exporter: InMemorySpanExporter) -> None:
    observer = tracer_for(exporter)
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            partial(
                triocomm.serve,
                handler,
                0,
                host=LOOPBACK,
                codec=LengthPrefixed(),
                observers=[observer],
            )
        )
        target = Target(LOOPBACK, server.port, LengthPrefixed())
        async with open_client(retries=0) as client:
            assert await client.request(target, b"a") == b"a"
            assert await client.request(target, b"b") == b"b"
            with pytest.raises(triocomm.ConnectionLost):
                await client.request(target, b"boom")
        await server.shutdown()
    spans = exporter.get_finished_spans()
    assert [span.name for span in spans] == ["triocomm.session"] * 3
    assert all(span.kind is SpanKind.SERVER for span in spans)
    ok, again, failed = (attributes(span) for span in spans)
    assert ok["triocomm.outcome"] == again["triocomm.outcome"] == "ok"
    assert (ok["triocomm.seq"], again["triocomm.seq"], failed["triocomm.seq"]) == (0, 1, 2)
    assert ok["triocomm.connection"] == failed["triocomm.connection"]
    assert str(ok["triocomm.peer"]).startswith("127.0.0.1:")
    assert failed["triocomm.outcome"] == "ValueError"
    assert spans[2].status.status_code is StatusCode.ERROR
    assert spans[2].events[0].name == "exception"
    assert spans[0].status.status_code is StatusCode.UNSET


async def test_a_client_gets_one_span_per_session(exporter: InMemorySpanExporter) -> None:
    observer = tracer_for(exporter)
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            partial(triocomm.serve, handler, 0, host=LOOPBACK, codec=LengthPrefixed())
        )
        target = Target(LOOPBACK, server.port, LengthPrefixed())
        async with open_client(observers=[observer]) as client:
            await client.request(target, b"a")
            async with client.connection(target) as conn:
                await conn.send(b"b")
                assert await conn.receive() == b"b"
        nursery.cancel_scope.cancel()
    spans = exporter.get_finished_spans()
    assert [attributes(span)["triocomm.outcome"] for span in spans] == ["ok", "ok"]
    assert [attributes(span)["triocomm.peer"] for span in spans] == [f"127.0.0.1:{server.port}"] * 2


async def test_a_datagram_service_gets_one_span_per_datagram(
    exporter: InMemorySpanExporter,
) -> None:
    async def echo(request: bytes, peer: object) -> bytes:
        return request

    observer = tracer_for(exporter)
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            partial(
                triocomm.serve_datagrams,
                echo,
                0,
                host=LOOPBACK,
                codec=triocomm.Raw(),
                observers=[observer],
            )
        )
        target = Target.udp(LOOPBACK, server.port, triocomm.Raw())
        async with open_client(retries=0) as client:
            assert await client.request(target, b"a") == b"a"
            assert await client.request(target, b"b") == b"b"
        await server.shutdown()
    spans = exporter.get_finished_spans()
    assert [span.name for span in spans] == ["triocomm.session"] * 2
    for span in spans:
        found = attributes(span)
        # A datagram peer has no connection id or seq: only the peer and the outcome.
        assert set(found) == {"triocomm.peer", "triocomm.outcome"}
        assert found["triocomm.outcome"] == "ok"
        assert str(found["triocomm.peer"]).startswith("('127.0.0.1',")
