"""serve_workers: several processes share one port via SO_REUSEPORT (real processes, loopback)."""

from __future__ import annotations

import functools
import os
import signal
import struct

import pytest
import trio

import triocomm
from triocomm._workers import WorkerGroup, serve_workers

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")


async def pid_handler(request: bytes, conn: triocomm.Connection[bytes, bytes]) -> bytes:
    """Reply with the worker's pid, so the test sees which process answered."""
    return struct.pack("!I", os.getpid()) + request


async def ask(port: int) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with triocomm.Connection(stream, triocomm.LengthPrefixed()) as conn:
        await conn.send(b"hi")
        reply = await conn.receive()
    return struct.unpack("!I", reply[:4])[0], reply[4:]


async def test_two_workers_share_the_port_and_stop_gracefully(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            group: WorkerGroup = await nursery.start(
                functools.partial(
                    serve_workers,
                    pid_handler,
                    0,
                    workers=2,
                    host="127.0.0.1",
                    codec=triocomm.LengthPrefixed(),
                    grace=1.0,
                )
            )
            assert group.port > 0
            pids = set(group.pids)
            assert len(pids) == 2
            assert os.getpid() not in pids
            seen = set()
            for _ in range(200):
                pid, echo = await ask(group.port)
                assert echo == b"hi"
                seen.add(pid)
                if seen == pids:
                    break
            # The kernel spreads connections over both listening processes.
            assert seen == pids
            # Under load (a connection open mid-session) SIGTERM still ends
            # every worker by itself: exit status 0, nobody killed.
            held = await trio.open_tcp_stream("127.0.0.1", group.port)
            await group.shutdown()
            await held.aclose()
            assert group.pids == []
            assert group.deaths == 0
            assert [p.exitcode for p in group._processes.values()] == [0, 0]
            assert not any("killing" in r.getMessage() for r in caplog.records)
            nursery.cancel_scope.cancel()
    with pytest.raises(OSError):
        await ask(group.port)


async def test_a_dead_worker_is_reported_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            group: WorkerGroup = await nursery.start(
                functools.partial(
                    serve_workers,
                    pid_handler,
                    0,
                    workers=1,
                    host="127.0.0.1",
                    codec=triocomm.LengthPrefixed(),
                    grace=1.0,
                )
            )
            (victim,) = group.pids
            os.kill(victim, signal.SIGKILL)
            for _ in range(600):
                if group.restarts == 1 and group.pids and group.pids != [victim]:
                    break
                await trio.sleep(0.05)
            assert group.deaths == 1
            assert group.restarts == 1
            (replacement,) = group.pids
            assert replacement != victim
            pid, _ = await ask(group.port)
            assert pid == replacement
            nursery.cancel_scope.cancel()
    assert any("exited with status" in r.getMessage() for r in caplog.records)
    assert group.pids == []


def test_bad_worker_count() -> None:
    async def main() -> None:
        await serve_workers(pid_handler, 0, workers=0, codec=triocomm.LengthPrefixed())

    with pytest.raises(ValueError, match="workers"):
        trio.run(main)


@pytest.mark.parametrize(
    "codec",
    [
        triocomm.LengthPrefixed("<H", max_frame=1000),
        triocomm.Lines(b"\r\n", max_line=10),
        triocomm.Raw(max_chunk=7),
    ],
)
def test_builtin_codecs_pickle(codec: object) -> None:
    import pickle

    copy = pickle.loads(pickle.dumps(codec))
    assert copy == codec
    assert hash(copy) == hash(codec)
    assert copy.decoder().feed(codec.encode(b"abc")) == [b"abc"]  # type: ignore[attr-defined]


async def greet(conn: triocomm.Connection[bytes, bytes]) -> None:
    await conn.send(b"hello from %d" % os.getpid())


async def test_hooks_reach_the_workers() -> None:
    # on_connect (like on_close and observers) is pickled into each worker.
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            group: WorkerGroup = await nursery.start(
                functools.partial(
                    serve_workers,
                    pid_handler,
                    0,
                    workers=1,
                    host="127.0.0.1",
                    codec=triocomm.LengthPrefixed(),
                    on_connect=greet,
                    grace=1.0,
                )
            )
            stream = await trio.open_tcp_stream("127.0.0.1", group.port)
            async with triocomm.Connection(stream, triocomm.LengthPrefixed()) as conn:
                assert await conn.receive() == b"hello from %d" % group.pids[0]
            await group.shutdown()
            nursery.cancel_scope.cancel()
