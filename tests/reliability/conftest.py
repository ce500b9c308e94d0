"""Invariant checks for the reliability suite: file descriptors, tasks, pools.

Every fault test starts with ``await invariants.mark()`` and ends with
``await invariants.check(...)``: once the dust has settled, the process holds
exactly the file descriptors and Trio tasks it held when the test started
(plus what is still legitimately open), and every pool the test names obeys
``open == idle + in_use`` with no slot left in use.

Settling is bounded: the check polls for at most ``SETTLE`` seconds of real
time, because closing sockets and ending tasks take a few scheduler rounds
after the code under test returns.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import pytest
import trio
import trio.testing

import triocomm
from triocomm._timers import Timers
from triocomm.testing import open_fd_count, task_count

# How long (real seconds) a check waits for closes and task exits to finish.
SETTLE = 5.0


def pool_problems(client: Any, target: Any) -> list[str]:
    """What is wrong with a quiet client's pool for ``target`` (empty when nothing is).

    Quiet means no session is running, so no slot may be in use, nobody may
    be waiting and nothing may be half-way through connecting.
    """
    stats = client.stats(target)
    problems = []
    if stats.open != stats.idle + stats.in_use:
        problems.append(f"open {stats.open} != idle {stats.idle} + in_use {stats.in_use}")
    if stats.open != stats.created - stats.closed:
        problems.append(f"open {stats.open} != created {stats.created} - closed {stats.closed}")
    if stats.in_use or stats.connecting or stats.waiting:
        problems.append(
            f"slots lost: {stats.in_use} in use, {stats.connecting} connecting, "
            f"{stats.waiting} waiting with no session running"
        )
    return problems


def tasks() -> int:
    """Tasks alive, not counting the watchdog task of each open client.

    A client starts its watchdog (which times its connections' reads) with
    ``open_client``, so the checks below would otherwise depend on whether
    the mark was taken inside or outside the client's block.
    """

    def watchdogs(task: trio.lowlevel.Task) -> int:
        own = getattr(task.coro, "cr_code", None) is Timers.run.__code__
        return own + sum(watchdogs(c) for n in task.child_nurseries for c in n.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return task_count() - watchdogs(root)


class Invariants:
    """The fds and tasks a test started with, and the check that it ended with them."""

    def __init__(self) -> None:
        self.fds = -1
        self.tasks = -1

    async def mark(self) -> None:
        """Record the fds and tasks held now; call it first thing in a test body."""
        await trio.testing.wait_all_tasks_blocked(cushion=0.001)
        self.fds = open_fd_count()
        self.tasks = tasks()

    def check_pools(self, *pools: tuple[Any, Any]) -> None:
        """Check ``(client, target)`` pools now, while connections may still be pooled."""
        problems = [p for client, target in pools for p in pool_problems(client, target)]
        assert not problems, "; ".join(problems)

    async def check(
        self,
        *pools: tuple[Any, Any],
        servers: Iterable[triocomm.Server] = (),
        extra_fds: int = 0,
        extra_tasks: int = 0,
    ) -> None:
        """Wait (bounded) until fds and tasks are back at the mark and pools are sound.

        ``pools`` are ``(client, target)`` pairs; each ``servers`` entry must
        have no connection left open. ``extra_fds`` and ``extra_tasks`` allow
        for what the test still holds on purpose (pooled idle connections).
        """
        servers = list(servers)
        assert self.fds >= 0, "call `await invariants.mark()` first"
        want_fds = self.fds + extra_fds
        want_tasks = self.tasks + extra_tasks
        problems: list[str] = []
        with trio.move_on_after(SETTLE):
            while True:
                await trio.testing.wait_all_tasks_blocked(cushion=0.001)
                problems = []
                for client, target in pools:
                    problems += pool_problems(client, target)
                for server in servers:
                    if server.stats.connections_open:
                        problems.append(f"{server!r} still has connections open")
                if open_fd_count() != want_fds:
                    problems.append(f"{open_fd_count()} fds open, baseline {want_fds}")
                if tasks() != want_tasks:
                    problems.append(f"{tasks()} tasks alive, baseline {want_tasks}")
                if not problems:
                    return
                await trio.sleep(0.01)
        pytest.fail("invariants broken after settling: " + "; ".join(problems))


@pytest.fixture
def invariants() -> Invariants:
    """Invariant checks: ``await invariants.mark()`` first, ``await invariants.check()`` last.

    A plain (not async) fixture on purpose: pytest-trio runs async fixtures
    in tasks of their own, which would blur the task count.
    """
    return Invariants()


# -- a service under test ------------------------------------------------------

#: The codec of the suite: small frames, so oversized ones are cheap to make.
CODEC = triocomm.LengthPrefixed(max_frame=64 * 1024)


async def echo(request: bytes, conn: triocomm.Connection[bytes, bytes]) -> bytes:
    """The service's handler in most tests: the reply is the request."""
    return request


StartServer = Callable[..., Awaitable[triocomm.Server]]


@pytest.fixture
def start_server(nursery: trio.Nursery) -> StartServer:
    """``await start_server(handler=echo, **serve_options)``: a service on loopback.

    Defaults: ``host="127.0.0.1"``, port 0, the suite's codec. The service
    runs in the test's nursery and is cancelled when the test ends.
    """

    async def start(handler: Any = echo, port: int | None = 0, **options: Any) -> triocomm.Server:
        options.setdefault("codec", CODEC)
        if "path" in options:
            port = None
        else:
            options.setdefault("host", "127.0.0.1")
        server: triocomm.Server = await nursery.start(
            functools.partial(triocomm.serve, handler, port, **options)
        )
        return server

    return start


async def assert_serves(server: triocomm.Server, message: bytes = b"still there") -> None:
    """A well-behaved client still gets its reply: the fault hurt nobody else."""
    if getattr(server, "port", None) is None:
        stream: trio.abc.Stream = await trio.open_unix_socket(server.addresses[0])
    else:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    conn = triocomm.Connection(stream, CODEC)
    try:
        with trio.fail_after(5):
            await conn.send(message)
            assert await conn.receive() == message
    finally:
        await conn.aclose()


async def wait_for(predicate: Callable[[], bool], what: str, limit: float = SETTLE) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``limit`` seconds."""
    with trio.move_on_after(limit):
        while not predicate():
            await trio.sleep(0.005)
        return
    pytest.fail(f"still waiting after {limit}s for: {what}")


@pytest.fixture
def until() -> Callable[[Callable[[], bool], str], Awaitable[None]]:
    """``await until(lambda: cond, "what")``: bounded polling (see :func:`wait_for`)."""
    return wait_for


@pytest.fixture
def serves() -> Callable[[triocomm.Server], Awaitable[None]]:
    """``await serves(server)``: a well-behaved client still gets its reply."""
    return assert_serves


@pytest.fixture
def codec() -> triocomm.LengthPrefixed:
    """The suite's codec (``LengthPrefixed`` with a 64 KiB ``max_frame``)."""
    return CODEC
