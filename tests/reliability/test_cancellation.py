"""Fault class: cancellation at every checkpoint of a client session.

For each kind of session, the test runs it again and again, cancelling it
after 1, 2, 3 ... of its own checkpoints (counted by a Trio instrument),
until one run completes. After every run the pool must be sound, exactly
the one expected connection may be open (no stray task, no leaked fd), and
the next session on the same pool must get *its own* reply: a connection
cancelled mid-session is never handed out again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from triocomm import Connection, Target, open_client

# A session has a few dozen checkpoints; this bounds the loop if one never ends.
MAX_CHECKPOINTS = 400


class CancelAfter(trio.abc.Instrument):
    """Cancel ``scope`` once ``task`` has run ``steps`` steps (yielded that many times)."""

    def __init__(self, task: trio.lowlevel.Task, scope: trio.CancelScope, steps: int) -> None:
        self.task = task
        self.scope = scope
        self.left = steps

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.left -= 1
            if self.left == 0:
                self.scope.cancel()


async def request(client: Any, target: Target, message: bytes) -> bytes:
    reply: bytes = await client.request(target, message)
    return reply


async def borrowed(client: Any, target: Target, message: bytes) -> bytes:
    async with client.connection(target) as conn:
        await conn.send(message)
        reply: bytes = await conn.receive()
        await conn.send(message + b"/2")
        assert await conn.receive() == message + b"/2"
        return reply


async def run(client: Any, target: Target, message: bytes) -> bytes:
    async def pipelined(conn: Connection) -> bytes:
        await conn.send_many([message, message + b"/2"])
        first: bytes = await conn.receive()
        assert await conn.receive() == message + b"/2"
        return first

    reply: bytes = await client.run(target, pipelined)
    return reply


async def bulk(client: Any, target: Target, message: bytes) -> bytes:
    # About 1 MB each way in 50 KB turns: many reads and writes, so many
    # more checkpoints than a small request.
    async def exchange(conn: Connection) -> bytes:
        for i in range(20):
            part = message + bytes([i]) * 50_000
            await conn.send(part)
            assert await conn.receive() == part
        return message

    reply: bytes = await client.run(target, exchange)
    return reply


SESSIONS: dict[str, Callable[[Any, Target, bytes], Awaitable[bytes]]] = {
    "request": request,
    "connection": borrowed,
    "run": run,
    "bulk": bulk,
}


async def say_hello(conn: Connection) -> None:
    await conn.send(b"HELLO")
    assert await conn.receive() == b"HELLO"


@pytest.mark.parametrize(
    "warm", [True, False, "on_connect"], ids=["reused", "fresh", "fresh+on_connect"]
)
@pytest.mark.parametrize("session", SESSIONS.values(), ids=SESSIONS.keys())
async def test_cancel_at_every_checkpoint(
    session, warm, start_server, invariants, codec, until
) -> None:
    server = await start_server()
    on_connect = say_hello if warm == "on_connect" else None
    target = Target("127.0.0.1", server.port, codec, on_connect=on_connect)
    task = trio.lowlevel.current_task()
    async with open_client() as client:
        # One pooled connection, so "open connections" has a known cost.
        assert await client.request(target, b"warm-up") == b"warm-up"
        await invariants.mark()
        completed_at = None
        for steps in range(1, MAX_CHECKPOINTS):
            if warm is not True:
                # Empty the pool, so the session has to connect.
                async with client.connection(target) as conn:
                    await trio.aclose_forcefully(conn)
            message = b"session-%d" % steps
            with trio.CancelScope() as scope:
                instrument = CancelAfter(task, scope, steps)
                trio.lowlevel.add_instrument(instrument)
                try:
                    reply = await session(client, target, message)
                finally:
                    trio.lowlevel.remove_instrument(instrument)
            if not scope.cancelled_caught:
                assert reply == message
                completed_at = steps
                break
            # The next session gets its own reply, whatever the cancel left behind.
            check = b"check-%d" % steps
            with trio.fail_after(5):
                assert await client.request(target, check) == check
            # Back to one idle pooled connection (and its server side), nothing more.
            await invariants.check((client, target))
            assert client.stats(target).open == 1
        assert completed_at is not None, f"session never completed in {MAX_CHECKPOINTS} steps"
        assert completed_at > 1
    await until(lambda: server.stats.connections_open == 0, "server connections closed")
    assert server.stats.errors["handler"] == 0
