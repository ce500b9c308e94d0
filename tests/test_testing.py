"""The public test kit (triocomm.testing): connection pairs and the fault-injecting peer.

Every fault is checked from the side that suffers it, with a bare
Connection, and every test checks that the peer leaves no socket behind.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

import triocomm
from triocomm import CommTimeout, Connection, ConnectionLost, FrameTooLarge, LengthPrefixed, Lines
from triocomm._timeouts import Limits
from triocomm.testing import (
    Fault,
    FaultyPeer,
    _run_link,  # the per-connection driver: run over memory streams on a MockClock
    connection_pair,
    fault_client,
    fault_server,
    open_fd_count,
    task_count,
)

CODEC = LengthPrefixed()


@contextmanager
def no_fd_leak() -> Iterator[None]:
    before = open_fd_count()
    yield
    assert open_fd_count() == before


async def dial(peer: FaultyPeer, codec: triocomm.Codec[bytes, bytes] = CODEC) -> Connection:
    if isinstance(peer.address, str):
        return Connection(await trio.open_unix_socket(peer.address), codec)
    return Connection(await trio.open_tcp_stream("127.0.0.1", peer.port), codec)


# -- connection_pair -----------------------------------------------------------


async def test_connection_pair_carries_messages_both_ways() -> None:
    left, right = connection_pair(CODEC)
    await left.send(b"ping")
    assert await right.receive() == b"ping"
    await right.send_many([b"a", b"b"])
    assert [await left.receive(), await left.receive()] == [b"a", b"b"]
    await left.aclose()
    with pytest.raises(trio.EndOfChannel):
        await right.receive()


async def test_lockstep_pair_blocks_the_sender_until_the_peer_reads() -> None:
    left, _right = connection_pair(CODEC, lockstep=True)
    with trio.move_on_after(0.05) as scope:
        await left.send(b"x")
    assert scope.cancelled_caught  # nobody was reading


# -- Fault values --------------------------------------------------------------


def test_fault_constructors_describe_the_fault() -> None:
    assert Fault.none() == Fault()
    assert Fault.reset(after=3) == Fault("reset", 3)
    assert Fault.garbage(b"zz", after=1, pause=0.5) == Fault("garbage", 1, 0.5, b"zz")
    assert Fault.slow_reader(0.2).seconds == 0.2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "explode"}, "unknown fault kind"),
        ({"kind": "reset", "after": -1}, "after"),
        ({"kind": "delay", "seconds": float("inf")}, "seconds"),
    ],
)
def test_fault_rejects_nonsense(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Fault(**kwargs)  # type: ignore[arg-type]


def test_oversized_needs_a_codec_with_a_bound() -> None:
    with pytest.raises(ValueError, match="LengthPrefixed or Lines"):
        FaultyPeer(Fault.oversized(), triocomm.Raw(), None, None)
    with pytest.raises(ValueError, match="cannot announce"):
        FaultyPeer(Fault.oversized(), LengthPrefixed("!B"), None, None)


async def test_half_close_over_tls_is_refused_up_front(
    server_ssl_context: ssl.SSLContext,
) -> None:
    with pytest.raises(ValueError, match="cannot half-close"):
        async with fault_server(Fault.half_close(), ssl_context=server_ssl_context):
            pytest.fail("the block must not run")


# -- fault_server, seen from a bare Connection ---------------------------------


async def test_well_behaved_server_echoes_and_counts() -> None:
    with no_fd_leak():
        async with fault_server() as peer:
            conn = await dial(peer)
            await conn.send_many([b"one", b"two"])
            assert [await conn.receive(), await conn.receive()] == [b"one", b"two"]
            await conn.aclose()
            with trio.fail_after(5):
                await peer.wait(hangups=1)
        assert (peer.connections, peer.messages, peer.faults) == (1, 2, 0)
        assert peer.received == [b"one", b"two"]
        assert peer.bytes_sent == peer.bytes_received == 2 * 4 + 6


async def test_server_on_a_unix_socket_removes_its_file(tmp_path: Path) -> None:
    path = tmp_path / "peer.sock"
    with no_fd_leak():
        async with fault_server(path=path) as peer:
            assert peer.address == str(path)
            with pytest.raises(AttributeError, match="no port"):
                _ = peer.port
            conn = await dial(peer)
            await conn.send(b"x")
            assert await conn.receive() == b"x"
            await conn.aclose()
    assert not path.exists()


async def test_respond_shapes_replies_and_none_means_no_reply() -> None:
    async with fault_server(respond=lambda m: None if m == b"quiet" else m.upper()) as peer:
        conn = await dial(peer)
        await conn.send_many([b"quiet", b"loud"])
        assert await conn.receive() == b"LOUD"
        await conn.aclose()


async def test_reset_mid_frame_loses_the_connection() -> None:
    with no_fd_leak():
        async with fault_server(Fault.reset(after=6)) as peer:
            conn = await dial(peer)
            await conn.send(b"hello")
            with trio.fail_after(5), pytest.raises(ConnectionLost):
                await conn.receive()
            assert conn.state is triocomm.ConnState.ERROR
            assert peer.faults == 1
            assert peer.bytes_sent <= 6


async def test_reset_at_accept_when_after_is_zero() -> None:
    async with fault_server(Fault.reset()) as peer:
        conn = await dial(peer)
        with trio.fail_after(5):
            await peer.wait(faults=1)
            with pytest.raises(ConnectionLost):
                await conn.receive()
        assert peer.bytes_sent == 0


async def test_half_close_between_messages_is_a_clean_end() -> None:
    async with fault_server(Fault.half_close(after=4 + 5)) as peer:
        conn = await dial(peer)
        await conn.send(b"hello")
        with trio.fail_after(5):
            assert await conn.receive() == b"hello"
            with pytest.raises(trio.EndOfChannel):
                await conn.receive()
        # The peer still reads after its half-close: it sees us leave.
        await conn.aclose()
        with trio.fail_after(5):
            await peer.wait(hangups=1)


async def test_half_close_mid_frame_is_a_lost_connection() -> None:
    async with fault_server(Fault.half_close(after=5)) as peer:
        conn = await dial(peer)
        await conn.send(b"hello")
        with trio.fail_after(5), pytest.raises(ConnectionLost, match="middle of a message"):
            await conn.receive()


async def test_stall_never_answers() -> None:
    async with fault_server(Fault.stall(after=4)) as peer:
        conn = await dial(peer)
        conn._limits = Limits(first_timeout=0.2, receive=0.2)
        await conn.send(b"hello")
        with pytest.raises(CommTimeout) as info:
            await conn.receive()
        # The header arrived, the payload never does.
        assert info.value.phase == "receive"
        assert peer.bytes_sent == 4
        assert peer.faults == 1


async def test_stalled_server_stops_reading_so_big_writes_block() -> None:
    big = LengthPrefixed(max_frame=64 << 20)
    async with fault_server(Fault.stall(), codec=big) as peer:
        conn = await dial(peer, big)
        conn._limits = Limits(send=0.3)
        with pytest.raises(CommTimeout) as info:
            await conn.send(b"x" * (64 << 20))
        assert info.value.phase == "send"
        assert peer.bytes_received == 0


async def test_delay_holds_each_reply(autojump_clock: trio.testing.MockClock) -> None:
    left, right = trio.testing.memory_stream_pair()
    peer = FaultyPeer(Fault.delay(3.0), CODEC, None, lambda m: m)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _run_link(peer, right, client=False, requests=()))
        conn = Connection(left, CODEC)
        start = trio.current_time()
        await conn.send(b"a")
        assert await conn.receive() == b"a"
        assert trio.current_time() - start == pytest.approx(3.0)
        await conn.aclose()
    assert peer.faults == 1


async def test_slow_writer_sends_one_byte_per_tick(autojump_clock: trio.testing.MockClock) -> None:
    left, right = trio.testing.memory_stream_pair()
    peer = FaultyPeer(Fault.slow_writer(0.5, after=2), CODEC, None, lambda m: m)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _run_link(peer, right, client=False, requests=()))
        conn = Connection(left, CODEC)
        start = trio.current_time()
        await conn.send(b"abcd")
        assert await conn.receive() == b"abcd"
        # 8 bytes out: the first 2 at once, then one per 0.5 s tick, so the
        # last of the 6 slow ones leaves 5 ticks after the first.
        assert trio.current_time() - start == pytest.approx(5 * 0.5)
        await conn.aclose()


async def test_slow_reader_reads_one_byte_per_tick(autojump_clock: trio.testing.MockClock) -> None:
    left, right = trio.testing.memory_stream_pair()
    peer = FaultyPeer(Fault.slow_reader(1.0), CODEC, None, lambda m: m)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _run_link(peer, right, client=False, requests=()))
        conn = Connection(left, CODEC)
        start = trio.current_time()
        await conn.send(b"abcdef")
        assert await conn.receive() == b"abcdef"
        assert trio.current_time() - start == pytest.approx(9.0)  # 10 bytes, a tick after each
        await conn.aclose()


async def test_garbage_after_a_reply_is_stray_bytes() -> None:
    codec = Lines()
    async with fault_server(Fault.garbage(b"\xff" * 70_000, after=3), codec=codec) as peer:
        conn = await dial(peer, codec)
        await conn.send(b"hi")
        with trio.fail_after(5):
            assert await conn.receive() == b"hi"
            with pytest.raises(FrameTooLarge):
                await conn.receive()
            await peer.wait(hangups=1)


async def test_oversized_frame_fails_fast() -> None:
    codec = LengthPrefixed(max_frame=1000)
    async with fault_server(Fault.oversized(), codec=codec) as peer:
        conn = await dial(peer, codec)
        with trio.fail_after(5), pytest.raises(FrameTooLarge) as info:
            await conn.receive()
        assert (info.value.size, info.value.limit) == (1001, 1000)
        assert peer.bytes_sent == 4


async def test_handshake_stall_server_never_completes_tls(
    server_ssl_context: ssl.SSLContext, client_ssl_context: ssl.SSLContext
) -> None:
    server_ctx, client_ctx = server_ssl_context, client_ssl_context
    with no_fd_leak():
        async with fault_server(Fault.handshake_stall(), ssl_context=server_ctx) as peer:
            stream = trio.SSLStream(
                await trio.open_tcp_stream("127.0.0.1", peer.port),
                client_ctx,
                server_hostname="localhost",
            )
            with trio.move_on_after(0.3) as scope:
                await stream.do_handshake()
            assert scope.cancelled_caught
            assert peer.bytes_received > 0  # the ClientHello, never answered
            assert peer.bytes_sent == 0
            await trio.aclose_forcefully(stream)


async def test_tls_server_echoes(
    server_ssl_context: ssl.SSLContext, client_ssl_context: ssl.SSLContext
) -> None:
    server_ctx, client_ctx = server_ssl_context, client_ssl_context
    async with fault_server(ssl_context=server_ctx) as peer:
        stream = trio.SSLStream(
            await trio.open_tcp_stream("127.0.0.1", peer.port),
            client_ctx,
            server_hostname="localhost",
        )
        conn = Connection(stream, CODEC)
        await conn.send(b"secret")
        with trio.fail_after(5):
            assert await conn.receive() == b"secret"
        assert conn.is_secure
        await conn.aclose()


async def test_a_client_that_rejects_the_certificate_is_a_hangup(
    server_ssl_context: ssl.SSLContext,
) -> None:
    server_ctx = server_ssl_context
    untrusting = ssl.create_default_context()  # does not trust the test CA
    async with fault_server(ssl_context=server_ctx) as peer:
        stream = trio.SSLStream(
            await trio.open_tcp_stream("127.0.0.1", peer.port),
            untrusting,
            server_hostname="localhost",
        )
        with trio.fail_after(5):
            with pytest.raises(trio.BrokenResourceError):
                await stream.do_handshake()
            await trio.aclose_forcefully(stream)
            await peer.wait(hangups=1)


# -- fault_client, seen from a small Connection server --------------------------


async def echo_until_end(stream: trio.SocketStream, seen: list[BaseException | None]) -> None:
    conn = Connection(stream, CODEC)
    try:
        async for message in conn:
            await conn.send(message)
        seen.append(None)
    except triocomm.CommError as exc:
        seen.append(exc)
    finally:
        await conn.aclose()


async def start_echo(
    nursery: trio.Nursery, seen: list[BaseException | None]
) -> trio.SocketListener:
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, lambda s: echo_until_end(s, seen), 0, host="127.0.0.1")
    )
    listener: trio.SocketListener = listeners[0]
    return listener


@pytest.fixture
async def echo(nursery: trio.Nursery) -> tuple[int, list[BaseException | None]]:
    seen: list[BaseException | None] = []
    listener = await start_echo(nursery, seen)
    return listener.socket.getsockname()[1], seen


async def test_client_sends_requests_and_collects_replies(
    echo: tuple[int, list[BaseException | None]],
) -> None:
    port, _ = echo
    with no_fd_leak():
        async with fault_client(port=port, requests=[b"a", b"b"], connections=3) as peer:
            with trio.fail_after(5):
                await peer.wait(messages=6)
        assert sorted(peer.received) == [b"a"] * 3 + [b"b"] * 3
        assert peer.connections == 3


async def test_client_reset_mid_frame_reaches_the_server_as_lost(
    echo: tuple[int, list[BaseException | None]],
) -> None:
    port, seen = echo
    async with fault_client(Fault.reset(after=6), port, requests=[b"hello"]) as peer:
        with trio.fail_after(5):
            await peer.wait(faults=1)
            while not seen:
                await trio.sleep(0.01)
    assert isinstance(seen[0], ConnectionLost)


async def test_client_half_close_still_gets_its_replies(
    echo: tuple[int, list[BaseException | None]],
) -> None:
    port, seen = echo
    async with fault_client(Fault.half_close(after=2 * 5), port, requests=[b"a", b"b"]) as peer:
        with trio.fail_after(5):
            await peer.wait(messages=2, hangups=1)
    assert peer.received == [b"a", b"b"]
    assert seen == [None]


async def test_client_handshake_stall_sends_a_partial_tls_record(
    echo: tuple[int, list[BaseException | None]],
) -> None:
    port, _ = echo
    async with fault_client(Fault.handshake_stall(), port) as peer:
        with trio.fail_after(5):
            await peer.wait(faults=1, bytes_sent=5)


async def test_refused_connect_raises_before_the_block() -> None:
    async with fault_server() as peer:
        port = peer.port
    with pytest.raises(OSError):
        async with fault_client(port=port):
            pytest.fail("the block must not run")


async def test_client_needs_exactly_one_address() -> None:
    with pytest.raises(TypeError, match="exactly one"):
        async with fault_client():
            pass


# -- the peer itself -------------------------------------------------------------


async def test_errors_in_the_block_come_out_unwrapped() -> None:
    with pytest.raises(KeyError):
        async with fault_server():
            raise KeyError("mine")


async def test_wait_rejects_unknown_counters() -> None:
    async with fault_server() as peer:
        with pytest.raises(TypeError, match="unknown counter"):
            await peer.wait(replies=1)


async def test_no_task_outlives_the_block() -> None:
    before = task_count()
    async with fault_server(Fault.stall()) as peer:
        conns = [await dial(peer) for _ in range(3)]
        with trio.fail_after(5):
            await peer.wait(faults=3)
        assert task_count() > before
    assert task_count() == before
    for conn in conns:
        await conn.aclose()


async def test_the_counters_see_a_socket_and_a_task() -> None:
    fds, tasks = open_fd_count(), task_count()
    sock = trio.socket.socket()
    assert open_fd_count() == fds + 1
    sock.close()
    assert open_fd_count() == fds
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep_forever)
        await trio.testing.wait_all_tasks_blocked()
        assert task_count() == tasks + 1
        nursery.cancel_scope.cancel()
    assert task_count() == tasks
