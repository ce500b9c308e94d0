"""Schedule points of the server's request loop and of client.request.

A read that finds its data already there is a cancel point but not a schedule
point when the server's loop or ``client.request`` makes it: both have a
schedule point of their own in every round (the reply's or the request's
send). These tests pin down what that must not change: a service stays fair
to every connection even when one client streams requests that get no reply
(no send, so the loop yields on its own), ``client.request`` is still a
checkpoint, and ``Connection.receive`` called by anyone else still yields.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from functools import partial

import pytest
import trio
import trio.testing

import triocomm
from triocomm import Connection, LengthPrefixed, Target

CODEC = LengthPrefixed()


async def quiet_or_echo(request: bytes, conn: Connection[bytes, bytes]) -> bytes | None:
    return None if request == b"quiet" else request


# Run in another process (a thread would share the GIL with the service and
# could not keep its socket full): stream requests that get no reply, as fast
# as the socket takes them, until killed.
FLOOD = """
import socket, struct, sys
frame = struct.pack("!I", 5) + b"quiet"
chunk = frame * 4096
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print("connected", flush=True)
while True:
    sock.sendall(chunk)
"""


@pytest.mark.timeout(30)
async def test_a_client_streaming_unanswered_requests_does_not_starve_the_others() -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(triocomm.serve, quiet_or_echo, host="127.0.0.1", port=0, codec=CODEC)
        )
        flood = subprocess.Popen(
            [sys.executable, "-c", FLOOD, str(server.port)],
            stdout=subprocess.PIPE,
        )
        try:
            # Wait until the flood is really under way: from now on the
            # service's read of it finds data every time.
            with trio.fail_after(10):
                while server.stats.sessions < 50_000:
                    await trio.sleep(0.01)
            async with triocomm.open_client() as client:
                target = Target("127.0.0.1", server.port, CODEC)
                with trio.fail_after(10):
                    for i in range(20):
                        assert await client.request(target, b"%d" % i) == b"%d" % i
            assert flood.poll() is None  # the flood went on all along
        finally:
            flood.kill()
            await trio.to_thread.run_sync(flood.wait)
            assert flood.stdout is not None
            flood.stdout.close()
        nursery.cancel_scope.cancel()


async def test_client_request_is_a_checkpoint_even_when_the_reply_is_already_there() -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(triocomm.serve, quiet_or_echo, host="127.0.0.1", port=0, codec=CODEC)
        )
        async with triocomm.open_client() as client:
            target = Target("127.0.0.1", server.port, CODEC)
            for i in range(20):
                with trio.testing.assert_checkpoints():
                    assert await client.request(target, b"%d" % i) == b"%d" % i
        nursery.cancel_scope.cancel()


async def test_a_read_that_finds_data_skips_the_schedule_point_only_when_asked() -> None:
    a, b = socket.socketpair()
    with a, b:
        conn: Connection[bytes, bytes] = Connection(
            trio.SocketStream(trio.socket.from_stdlib_socket(a)), CODEC
        )
        task = trio.lowlevel.current_task()
        b.sendall(CODEC.encode(b"one"))
        b.sendall(CODEC.encode(b"two"))
        await trio.sleep(0.01)  # both are in the socket now, in one read
        # What the server's loop and client.request do: a cancel point only.
        conn._yield_on_data = False
        before = (task._cancel_points, task._schedule_points)
        assert await conn.receive() == b"one"
        assert task._cancel_points > before[0]
        assert task._schedule_points == before[1]
        conn._yield_on_data = True
        assert await conn.receive() == b"two"  # already decoded: no read at all
        # Everyone else: a read that finds data is a full checkpoint.
        b.sendall(CODEC.encode(b"three"))
        await trio.sleep(0.01)
        with trio.testing.assert_checkpoints():
            assert await conn.receive() == b"three"
        await conn.aclose()
