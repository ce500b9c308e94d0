"""Observers on a datagram service: each handled datagram is a session of its
``DatagramPeer``; an observer's exception is logged and swallowed; a service
without observers of sessions never takes the observed path."""

from __future__ import annotations

import functools
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

import triocomm
import triocomm._datagram_service
from triocomm import DatagramPeer, Observer, Server

LOOPBACK = "127.0.0.1"


class Recorder(Observer):
    """Session events with the peer's address and the error's type; attach events."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self._ended = 0
        self._changed = trio.Event()

    async def ended(self, count: int) -> None:
        """Wait until ``count`` sessions have ended."""
        with trio.fail_after(10):
            while self._ended < count:
                await self._changed.wait()

    def attached(self, source: object) -> None:
        self.events.append(("attached", type(source).__name__))

    def detached(self, source: object) -> None:
        self.events.append(("detached", type(source).__name__))

    def connection_opened(self, conn: Any) -> None:
        self.events.append(("opened",))  # pragma: no cover - must not come

    def connection_closed(self, conn: Any, error: BaseException | None) -> None:
        self.events.append(("closed",))  # pragma: no cover - must not come

    def session_started(self, conn: Any) -> None:
        assert isinstance(conn, DatagramPeer)
        self.events.append(("started", conn.remote_address))

    def session_ended(self, conn: Any, error: BaseException | None, duration: float) -> None:
        assert isinstance(conn, DatagramPeer)
        assert duration >= 0
        self.events.append(("ended", conn.remote_address, type(error).__name__ if error else None))
        self._ended += 1
        self._changed.set()
        self._changed = trio.Event()


class Broken(Observer):
    """Raises from both session events."""

    def session_started(self, conn: Any) -> None:
        raise RuntimeError("started broke")

    def session_ended(self, conn: Any, error: BaseException | None, duration: float) -> None:
        raise RuntimeError("ended broke")


async def answer(request: bytes, peer: DatagramPeer[bytes]) -> bytes | None:
    if request == b"boom":
        raise ValueError("handler failed")
    if request == b"quiet":
        return None
    if request == b"huge":
        return b"x" * 100  # beyond max_datagram: the reply cannot be encoded
    return request


@asynccontextmanager
async def service(observers: list[Observer] | None, handler: Any = answer) -> AsyncIterator[Server]:
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            functools.partial(
                triocomm.serve_datagrams,
                handler,
                0,
                host=LOOPBACK,
                codec=triocomm.Raw(),
                max_datagram=64,
                observers=observers,
            )
        )
        yield server
        await server.shutdown()


@asynccontextmanager
async def udp_client(server: Server) -> AsyncIterator[Any]:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.connect((LOOPBACK, server.port))
        yield sock


async def ask(sock: Any, payload: bytes) -> bytes:
    await sock.send(payload)
    with trio.fail_after(10):
        data: bytes = await sock.recv(1000)
        return data


async def exchange(server: Server, recorder: Recorder) -> Any:
    """One good datagram, one that raises, one without a reply, one whose reply is
    too large, then a good one, each once the one before has ended (the service
    runs the handlers of one batch of datagrams in no fixed order)."""
    async with udp_client(server) as sock:
        for count, payload in enumerate((b"a", b"boom", b"quiet", b"huge", b"b"), 1):
            await sock.send(payload)
            await recorder.ended(count)
        with trio.fail_after(10):  # sent before their sessions ended
            assert await sock.recv(1000) == b"a"
            assert await sock.recv(1000) == b"b"
        return sock.getsockname()


async def test_each_datagram_is_a_session_of_its_peer() -> None:
    recorder = Recorder()
    async with service([recorder]) as server:
        me = await exchange(server, recorder)
        assert server.stats.errors == {"handler": 2}
    assert recorder.events == [
        ("attached", "Server"),
        ("started", me),
        ("ended", me, None),
        ("started", me),
        ("ended", me, "ValueError"),  # the handler's own exception
        ("started", me),
        ("ended", me, None),
        ("started", me),
        ("ended", me, "ValueError"),  # the reply did not fit in max_datagram
        ("started", me),
        ("ended", me, None),
        ("detached", "Server"),
    ]


async def test_a_session_cut_by_the_grace_period_ends_with_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    running = trio.Event()

    async def stuck(request: bytes, peer: DatagramPeer[bytes]) -> bytes:
        running.set()
        await trio.sleep_forever()
        raise AssertionError("not reached")  # pragma: no cover

    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            functools.partial(
                triocomm.serve_datagrams,
                stuck,
                0,
                host=LOOPBACK,
                codec=triocomm.Raw(),
                observers=[recorder],
            )
        )
        async with udp_client(server) as sock:
            me = sock.getsockname()
            await sock.send(b"x")
            with trio.fail_after(10):
                await running.wait()
            await server.shutdown(grace=1.0)
    assert recorder.events[1:] == [
        ("started", me),
        ("ended", me, "Cancelled"),
        ("detached", "Server"),
    ]


async def test_an_observer_that_raises_is_logged_and_changes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    async with service([Broken(), recorder]) as server, udp_client(server) as sock:
        assert await ask(sock, b"a") == b"a"
        assert await ask(sock, b"b") == b"b"  # the service still runs
        await recorder.ended(2)
        assert not server.stats.errors
    # The observer after the broken one still hears everything.
    assert [event[0] for event in recorder.events] == [
        "attached",
        *["started", "ended"] * 2,
        "detached",
    ]
    lines = [r.getMessage() for r in caplog.records if r.name == "triocomm.observe"]
    assert len(lines) == 4
    for line, what in zip(lines, ("started", "ended") * 2, strict=True):
        assert f"Broken.session_{what}" in line
        assert f"{what} broke" in line
        assert f"<DatagramPeer {LOOPBACK}:" in line  # names the peer


@pytest.mark.parametrize("observed", [False, True])
async def test_without_observers_of_sessions_no_datagram_takes_the_observed_path(
    monkeypatch: pytest.MonkeyPatch, observed: bool
) -> None:
    async def refuse(*args: Any) -> None:
        raise AssertionError("observed path taken")

    class Attached(Observer):
        def attached(self, source: object) -> None:
            pass

    monkeypatch.setattr(triocomm._datagram_service.DatagramFront, "_handle_observed", refuse)
    observers: list[Observer] | None = [Attached()] if observed else None
    async with service(observers) as server, udp_client(server) as sock:
        assert await ask(sock, b"a") == b"a"
        assert not server.stats.errors


async def test_bad_observers_fail_before_binding() -> None:
    with pytest.raises(TypeError, match="Observer"):
        await triocomm.serve_datagrams(
            answer,
            0,
            host=LOOPBACK,
            codec=triocomm.Raw(),
            observers=[object()],  # type: ignore[list-item]
        )


async def test_prometheus_exports_a_datagram_service() -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry

    from triocomm.contrib.prometheus import PrometheusObserver

    registry = CollectorRegistry()
    observer = PrometheusObserver(registry)
    recorder = Recorder()
    async with service([observer, recorder]) as server:
        assert observer.services() == [server]
        await exchange(server, recorder)
        name = {"service": f"{LOOPBACK}:{server.port}"}
        value = registry.get_sample_value
        assert value("triocomm_server_sessions_total", name) == server.stats.sessions == 5
        assert value("triocomm_server_errors_total", {**name, "kind": "handler"}) == 2
        assert value("triocomm_sessions_total", {"outcome": "ok"}) == 3
        assert value("triocomm_sessions_total", {"outcome": "error"}) == 2
        assert value("triocomm_session_duration_seconds_count") == 5
        assert value("triocomm_connections_opened_total") == 0
    assert observer.services() == []
