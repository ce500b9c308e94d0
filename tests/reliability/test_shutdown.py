"""Fault class: the service shuts down while requests are in flight.

Every request gets either its own reply or a clear error: none is silently
dropped, none is answered with another request's reply. A request whose
handler finished within the grace period is answered.
"""

from __future__ import annotations

import random

import pytest
import trio

from triocomm import CommError, Target, Timeouts, open_client

REQUESTS = 400
CONCURRENCY = 64


@pytest.mark.parametrize(
    ("handler_time", "grace"),
    [
        (0.05, 1.0),  # grace long enough for every handler in flight
        (0.5, 0.05),  # grace runs out: handlers in flight are cancelled
    ],
    ids=["drain", "cut"],
)
async def test_shutdown_under_load(
    handler_time, grace, start_server, invariants, codec, until
) -> None:
    rng = random.Random(7)
    handled: set[bytes] = set()

    async def handler(request: bytes, conn: object) -> bytes:
        await trio.sleep(rng.random() * handler_time)
        handled.add(request)
        return b"reply to " + request

    await invariants.mark()  # before the service: it is gone at the end
    server = await start_server(handler)
    target = Target("127.0.0.1", server.port, codec, max_connections=CONCURRENCY // 2)
    replies: dict[bytes, bytes] = {}
    errors: dict[bytes, BaseException] = {}
    limiter = trio.Semaphore(CONCURRENCY)
    # Bound every wait: a request that hangs would be a silent drop.
    timeouts = Timeouts(connect=2, first_response=5, pool=5)

    async def one(client, request: bytes) -> None:
        async with limiter:
            try:
                replies[request] = await client.request(target, request)
            except CommError as exc:
                errors[request] = exc

    async with open_client(timeouts=timeouts) as client:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(REQUESTS):
                    nursery.start_soon(one, client, b"request %d" % i)
                await until(lambda: len(replies) >= REQUESTS // 4, "a quarter answered")
                await server.shutdown(grace=grace)
        await invariants.check((client, target))

    # Accounted for: every request got exactly one outcome.
    assert len(replies) + len(errors) == REQUESTS
    assert not replies.keys() & errors.keys()
    # Never another request's reply.
    wrong = {r: got for r, got in replies.items() if got != b"reply to " + r}
    assert not wrong
    assert replies, "the service answered nothing before shutting down"
    if grace > handler_time:
        # Every handler finished within the grace period, so every request
        # that reached one must have its reply delivered.
        dropped = handled - replies.keys()
        assert not dropped, f"{len(dropped)} replies were computed but never delivered"
    kinds = {type(exc).__name__ for exc in errors.values()}
    assert kinds <= {"ConnectError", "ConnectionLost"}, kinds
