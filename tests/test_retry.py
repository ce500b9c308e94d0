"""Retry policies: each kind of failure on each path it can happen, idempotence,
Upstream, cancellation, the budget, and the backoff on a mock clock.

Servers are scripted raw-Trio servers (``test_client_peers``); connect
failures on a mock clock come from a stand-in for the client's connect.
"""

from __future__ import annotations

import functools
import math
import socket
from typing import Any

import pytest
import trio
import trio.testing

import triocomm
from triocomm import (
    CommTimeout,
    ConnectError,
    ConnectionLost,
    LengthPrefixed,
    RetryPolicy,
    Target,
    Timeouts,
    Upstream,
    _client,
    _retry,
    open_client,
)

try:
    from .test_client_peers import Peer, ScriptedServer, echo, frame, scripted_server
except ImportError:
    from test_client_peers import Peer, ScriptedServer, echo, frame, scripted_server

CODEC = LengthPrefixed()
NO_LIMITS = Timeouts(connect=None, inactivity=None, keepalive=None)
ALL_KINDS = RetryPolicy(attempts=3, on=("stale", "connect", "lost", "timeout"), jitter=False)


def target_of(server: ScriptedServer, **options: Any) -> Target[bytes, bytes]:
    return Target("127.0.0.1", server.port, CODEC, **options)


def dead_target() -> Target[bytes, bytes]:
    """A loopback port with nothing listening (bound, then closed): refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return Target("127.0.0.1", port, CODEC, timeouts=NO_LIMITS)


def notes(exc: BaseException) -> list[str]:
    return list(getattr(exc, "__notes__", []))


# -- the policy value ---------------------------------------------------------------


def test_the_policy_is_an_immutable_validated_value() -> None:
    policy = RetryPolicy()
    assert (policy.attempts, policy.on, policy.backoff, policy.max_backoff) == (
        2,
        ("stale",),
        0.0,
        1.0,
    )
    assert policy.jitter is True
    assert policy.budget is None
    with pytest.raises(AttributeError):
        policy.attempts = 3  # type: ignore[misc]
    # Kinds are kept in a canonical order, without duplicates: equal values.
    assert RetryPolicy(on=("timeout", "stale", "timeout")) == RetryPolicy(on=("stale", "timeout"))
    assert hash(RetryPolicy(on=["connect"])) == hash(RetryPolicy(on=("connect",)))  # type: ignore[arg-type]
    assert policy.replace(attempts=5).attempts == 5


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"attempts": 0}, ValueError),
        ({"attempts": True}, ValueError),
        ({"attempts": 1.5}, ValueError),
        ({"on": "stale"}, TypeError),
        ({"on": ("stale", "reset")}, ValueError),
        ({"backoff": -1}, ValueError),
        ({"backoff": math.nan}, ValueError),
        ({"max_backoff": math.inf}, ValueError),
        ({"backoff": "1"}, TypeError),
        ({"jitter": 1}, TypeError),
        ({"budget": -0.1}, ValueError),
        ({"budget": "0.1"}, TypeError),
    ],
)
def test_the_policy_refuses_nonsense(options: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        RetryPolicy(**options)


def test_an_int_means_attempts_n_plus_1_on_stale() -> None:
    assert _retry.as_policy(0) == RetryPolicy(attempts=1, on=("stale",))
    assert _retry.as_policy(3) == RetryPolicy(attempts=4, on=("stale",))
    policy = RetryPolicy(budget=0.1)
    assert _retry.as_policy(policy) is policy
    with pytest.raises(ValueError, match="retries"):
        _retry.as_policy(-1)
    with pytest.raises(TypeError, match="retries"):
        _retry.as_policy("2")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="retries"):
        open_client(retries=2.0)  # type: ignore[arg-type]


def test_the_backoff_doubles_up_to_its_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = RetryPolicy(backoff=0.5, max_backoff=3.0, jitter=False)
    assert [policy.delay(n) for n in range(1, 7)] == [0.0, 0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.delay(10_000) == 3.0  # no overflow
    assert RetryPolicy(jitter=False).delay(5) == 0.0  # backoff 0: no wait
    monkeypatch.setattr(_retry, "_jitter", lambda: 0.25)
    assert policy.replace(jitter=True).delay(4) == 0.5


# -- the kinds: stale -----------------------------------------------------------------


async def stale_after_one(peer: Peer) -> None:
    """The first connection answers one request, then hangs up on the next."""
    if peer.number == 1:
        await peer.send_frame(await peer.read_frame() or b"")
        await peer.read_frame()
        return
    await echo(peer)


@pytest.mark.parametrize("idempotent", [False, True])
async def test_stale_is_retried_whatever_idempotent_says(idempotent: bool) -> None:
    async with scripted_server(stale_after_one) as server, open_client() as client:
        target = target_of(server)
        await client.request(target, b"a")
        assert await client.request(target, b"b", idempotent=idempotent) == b"b"
        assert server.accepted == 2
        stats = client.stats(target)
        assert (stats.retries, stats.failed) == (1, 1)


async def test_stale_is_not_retried_by_a_policy_that_does_not_name_it() -> None:
    policy = RetryPolicy(attempts=5, on=("connect", "lost", "timeout"))
    async with scripted_server(stale_after_one) as server, open_client() as client:
        target = target_of(server)
        await client.request(target, b"a")
        with pytest.raises(ConnectionLost):
            await client.request(target, b"b", retries=policy, idempotent=True)
        assert server.accepted == 1
        assert client.stats(target).retries == 0


async def test_stale_while_writing_is_retried_too() -> None:
    """A reused connection that breaks during the write, staged in a session function."""
    calls = 0

    async def exchange(conn: triocomm.Connection[bytes, bytes]) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 2:  # the reused connection
            raise ConnectionLost("connection lost while sending (staged)")
        await conn.send(b"x")
        return await conn.receive()

    async with scripted_server(echo) as server, open_client() as client:
        target = target_of(server)
        assert await client.run(target, exchange) == b"x"
        assert await client.run(target, exchange) == b"x"
        assert calls == 3
        stats = client.stats(target)
        assert (stats.created, stats.reused, stats.retries) == (2, 1, 1)


# -- connect ------------------------------------------------------------------------


class Connects(list[float]):
    """The trio-clock time of every connect the client made; the first ``fail`` fail."""

    fail = 10**9


@pytest.fixture
def failing_connects(monkeypatch: pytest.MonkeyPatch) -> Connects:
    """The client's connects raise ConnectError (the first ``fail`` of them: all by default)."""
    connects = Connects()
    real = _client._open_stream

    async def fake(target: Target[Any, Any]) -> trio.abc.Stream:
        connects.append(trio.current_time())
        if len(connects) <= connects.fail:
            await trio.lowlevel.checkpoint()
            raise ConnectError(f"cannot connect to {target}: refused (fake)", address=target)
        return await real(target)

    monkeypatch.setattr(_client, "_open_stream", fake)
    return connects


async def test_connect_is_retried_to_the_same_target_when_named(
    failing_connects: Connects,
) -> None:
    failing_connects.fail = 2
    policy = RetryPolicy(attempts=3, on=("connect",), jitter=False)
    async with scripted_server(echo) as server, open_client(retries=policy) as client:
        target = target_of(server)
        assert await client.request(target, b"x") == b"x"
        stats = client.stats(target)
        assert (stats.retries, stats.failed, stats.created) == (2, 2, 1)
    assert len(failing_connects) == 3


@pytest.mark.parametrize("retries", [0, 1, 5])
async def test_the_int_shorthand_never_retries_a_failed_connect(
    failing_connects: Connects, retries: int
) -> None:
    async with scripted_server(echo) as server, open_client(retries=retries) as client:
        target = target_of(server)
        with pytest.raises(ConnectError):
            await client.request(target, b"x", idempotent=True)
    assert len(failing_connects) == 1


async def test_the_last_error_carries_the_earlier_ones_as_notes(
    failing_connects: Connects,
) -> None:
    policy = RetryPolicy(attempts=3, on=("connect",), jitter=False)
    async with scripted_server(echo) as server, open_client() as client:
        target = target_of(server)
        with pytest.raises(ConnectError) as info:
            await client.request(target, b"x", retries=policy)
    assert len(failing_connects) == 3
    assert notes(info.value) == [
        f"attempt 1 with {target} failed (connect): ConnectError: cannot connect to "
        f"{target}: refused (fake)",
        f"attempt 2 with {target} failed (connect): ConnectError: cannot connect to "
        f"{target}: refused (fake)",
    ]


async def test_connection_retries_getting_a_connection(failing_connects: Connects) -> None:
    failing_connects.fail = 2
    async with scripted_server(echo) as server, open_client() as client:
        target = target_of(server)
        with pytest.raises(ConnectError):
            async with client.connection(target):
                pass  # pragma: no cover
        async with client.connection(target, retries=RetryPolicy(on=("connect",))) as conn:
            await conn.send(b"in the block")
            assert await conn.receive() == b"in the block"
    assert len(failing_connects) == 3


async def test_backoff_waits_on_the_clock(
    failing_connects: Connects, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.autojump_threshold = 0
    policy = RetryPolicy(attempts=5, on=("connect",), backoff=1.0, max_backoff=3.0, jitter=False)
    async with open_client(retries=policy) as client:
        start = trio.current_time()
        with pytest.raises(ConnectError):
            await client.request(dead_target(), b"x")
    assert [t - start for t in failing_connects] == [0.0, 1.0, 3.0, 6.0, 9.0]


async def test_jitter_scales_each_wait(
    failing_connects: Connects,
    mock_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mock_clock.autojump_threshold = 0
    factors = iter([0.5, 0.0, 0.75])
    monkeypatch.setattr(_retry, "_jitter", lambda: next(factors))
    policy = RetryPolicy(attempts=4, on=("connect",), backoff=2.0, max_backoff=60.0)
    async with open_client(retries=policy) as client:
        start = trio.current_time()
        with pytest.raises(ConnectError):
            await client.request(dead_target(), b"x")
    # Waits: 2 * 0.5, 4 * 0.0, 8 * 0.75.
    assert [t - start for t in failing_connects] == [0.0, 1.0, 1.0, 7.0]


# -- lost and timeout -----------------------------------------------------------------


async def hang_up_on_the_first(peer: Peer) -> None:
    """The first connection reads the request and closes unanswered; later ones echo."""
    if peer.number == 1:
        await peer.read_frame()
        return
    await echo(peer)


@pytest.mark.parametrize("idempotent", [False, True])
async def test_lost_on_a_fresh_connection_is_retried_only_when_idempotent(
    idempotent: bool,
) -> None:
    policy = RetryPolicy(on=("lost",))
    async with scripted_server(hang_up_on_the_first) as server, open_client() as client:
        target = target_of(server)
        if idempotent:
            assert await client.request(target, b"x", retries=policy, idempotent=True) == b"x"
            assert server.accepted == 2
        else:
            with pytest.raises(ConnectionLost, match="before replying"):
                await client.request(target, b"x", retries=policy)
            assert server.accepted == 1


async def test_lost_is_not_retried_unless_named() -> None:
    async with scripted_server(hang_up_on_the_first) as server, open_client() as client:
        target = target_of(server)
        with pytest.raises(ConnectionLost):
            await client.request(target, b"x", retries=5, idempotent=True)
        assert server.accepted == 1


async def silent_on_the_first(peer: Peer) -> None:
    """The first connection reads requests and never answers; later ones echo."""
    if peer.number == 1:
        await peer.wait_eof()
        return
    await echo(peer)


@pytest.mark.parametrize("phase", ["first_response", "inactivity"])
@pytest.mark.parametrize("idempotent", [False, True])
async def test_a_timeout_before_the_reply_is_retried_only_when_idempotent(
    autojump_clock: trio.testing.MockClock, idempotent: bool, phase: str
) -> None:
    timeouts = NO_LIMITS.replace(**{phase: 5.0})
    policy = RetryPolicy(on=("timeout",))
    async with scripted_server(silent_on_the_first) as server, open_client() as client:
        target = target_of(server, timeouts=timeouts)
        if idempotent:
            assert await client.request(target, b"x", retries=policy, idempotent=True) == b"x"
            assert server.accepted == 2
        else:
            with pytest.raises(CommTimeout) as info:
                await client.request(target, b"x", retries=policy)
            assert info.value.phase == phase
            assert server.accepted == 1


async def test_a_timeout_on_a_reused_connection_retries_on_a_fresh_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def silent_after_one(peer: Peer) -> None:
        if peer.number == 1:
            await peer.send_frame(await peer.read_frame() or b"")
            await peer.wait_eof()  # a black hole from now on
            return
        await echo(peer)

    timeouts = NO_LIMITS.replace(first_response=5.0)
    async with scripted_server(silent_after_one) as server, open_client() as client:
        target = target_of(server, timeouts=timeouts)
        await client.request(target, b"a")
        reply = await client.request(target, b"b", retries=ALL_KINDS, idempotent=True)
        assert reply == b"b"
        assert server.accepted == 2


@pytest.mark.parametrize("ending", ["close", "stall"])
async def test_never_retried_once_a_reply_byte_arrived(
    autojump_clock: trio.testing.MockClock, ending: str
) -> None:
    async def half_a_reply(peer: Peer) -> None:
        await peer.read_frame()
        await peer.send_raw(frame(b"partial reply")[:6])
        if ending == "stall":
            await peer.wait_eof()

    timeouts = NO_LIMITS.replace(first_response=5.0, receive=5.0)
    async with scripted_server(half_a_reply) as server, open_client() as client:
        target = target_of(server, timeouts=timeouts)
        with pytest.raises((ConnectionLost, CommTimeout)):
            await client.request(target, b"x", retries=ALL_KINDS, idempotent=True)
        assert server.accepted == 1
        assert client.stats(target).retries == 0


async def test_run_retries_its_session_function() -> None:
    calls = 0

    async def exchange(conn: triocomm.Connection[bytes, bytes]) -> bytes:
        nonlocal calls
        calls += 1
        await conn.send(b"x")
        return await conn.receive()

    async with scripted_server(hang_up_on_the_first) as server, open_client() as client:
        target = target_of(server)
        assert await client.run(target, exchange, retries=ALL_KINDS, idempotent=True) == b"x"
        assert calls == 2


async def test_the_callers_own_error_is_never_retried() -> None:
    calls = 0

    async def broken(conn: triocomm.Connection[bytes, bytes]) -> None:
        nonlocal calls
        calls += 1
        raise KeyError("mine")

    async with scripted_server(echo) as server, open_client() as client:
        with pytest.raises(KeyError):
            await client.run(target_of(server), broken, retries=ALL_KINDS, idempotent=True)
    assert calls == 1


# -- Upstream -------------------------------------------------------------------------


async def test_with_an_upstream_a_retry_goes_to_an_address_not_yet_tried() -> None:
    async def hang_up(peer: Peer) -> None:
        await peer.read_frame()

    async with (
        scripted_server(hang_up) as a,
        scripted_server(hang_up) as b,
        scripted_server(hang_up) as c,
        open_client() as client,
    ):
        servers = [a, b, c]
        up = Upstream([target_of(s) for s in servers], max_fails=100)
        policy = RetryPolicy(attempts=5, on=("lost",))
        for _ in range(3):
            before = [s.accepted for s in servers]
            with pytest.raises(ConnectionLost) as info:
                await client.request(up, b"x", retries=policy, idempotent=True)
            # Five attempts over three addresses: each address once before any twice.
            added = [s.accepted - n for s, n in zip(servers, before, strict=True)]
            assert sum(added) == 5
            assert min(added) == 1
            assert len(notes(info.value)) == 4


async def test_with_a_one_address_upstream_a_stale_connection_is_retried_there() -> None:
    async with scripted_server(stale_after_one) as server, open_client() as client:
        target = target_of(server)
        up = Upstream([target])
        await client.request(up, b"a")
        assert await client.request(up, b"b") == b"b"
        assert server.accepted == 2


# -- cancellation ---------------------------------------------------------------------


async def test_a_session_cancelled_while_waiting_is_not_retried() -> None:
    async with scripted_server(silent_on_the_first) as server, open_client() as client:
        target = target_of(server, timeouts=NO_LIMITS)
        with trio.move_on_after(0.1) as scope:
            await client.request(target, b"x", retries=ALL_KINDS, idempotent=True)
        assert scope.cancelled_caught
        await trio.testing.wait_all_tasks_blocked()
        assert server.accepted == 1
        stats = client.stats(target)
        assert (stats.retries, stats.in_use) == (0, 0)


async def test_a_retryable_failure_in_a_cancelled_session_is_not_retried() -> None:
    calls = 0

    async with scripted_server(echo) as server, open_client() as client:
        target = target_of(server)
        await client.request(target, b"warm up")  # the next session reuses it
        with trio.CancelScope() as scope:

            async def fails_stale(conn: triocomm.Connection[bytes, bytes]) -> None:
                nonlocal calls
                calls += 1
                scope.cancel()  # no checkpoint yet: the failure comes first
                raise trio.BrokenResourceError("reset (staged)")

            await client.run(target, fails_stale, retries=ALL_KINDS, idempotent=True)
        assert scope.cancelled_caught
        assert calls == 1
        assert client.stats(target).retries == 0


async def test_a_session_cancelled_during_its_backoff_makes_no_more_attempts(
    failing_connects: Connects, autojump_clock: trio.testing.MockClock
) -> None:
    policy = RetryPolicy(attempts=5, on=("connect",), backoff=10.0, max_backoff=60.0, jitter=False)
    async with open_client(retries=policy) as client:
        target = dead_target()
        with trio.move_on_after(5.0) as scope:
            await client.request(target, b"x")
        assert scope.cancelled_caught
        assert len(failing_connects) == 1
        assert client.stats(target).retries == 0


# -- the budget -----------------------------------------------------------------------


async def sessions_against_a_dead_peer(client: triocomm.Client, count: int) -> None:
    target = dead_target()
    for _ in range(count):
        with pytest.raises(ConnectError):
            await client.request(target, b"x")


async def test_the_budget_holds_retries_against_a_failing_peer(
    failing_connects: Connects, mock_clock: trio.testing.MockClock
) -> None:
    # The clock stands still: every session falls in one 10 s window.
    policy = RetryPolicy(attempts=10, on=("connect",), budget=0.0)
    async with open_client(retries=policy) as client:
        await sessions_against_a_dead_peer(client, 20)
        # Without a budget: 20 * 10 attempts. With it: 20, plus 30 retries.
        assert len(failing_connects) == 20 + 30
        with pytest.raises(ConnectError) as info:
            await client.request(dead_target(), b"x")
        assert notes(info.value) == ["not retried: the retry budget (0) is spent"]


async def test_the_budget_grows_with_the_sessions(
    failing_connects: Connects, mock_clock: trio.testing.MockClock
) -> None:
    policy = RetryPolicy(attempts=3, on=("connect",), budget=0.5)
    async with open_client(retries=policy) as client:
        await sessions_against_a_dead_peer(client, 100)
    retries = len(failing_connects) - 100
    # Each retry needs retries < 0.5 * sessions + 30, the sessions counted so
    # far: 100 sessions allow fewer than 80 of the 200 retries asked for.
    assert 60 <= retries <= 0.5 * 100 + 30


async def test_the_budget_refills_as_its_window_moves_on(
    failing_connects: Connects, mock_clock: trio.testing.MockClock
) -> None:
    policy = RetryPolicy(attempts=2, on=("connect",), budget=0.0)
    async with open_client(retries=policy) as client:
        await sessions_against_a_dead_peer(client, 40)
        assert len(failing_connects) == 40 + 30
        for _ in range(11):  # the window samples once a second
            mock_clock.jump(1.0)
            await trio.testing.wait_all_tasks_blocked()
        failing_connects.clear()
        await sessions_against_a_dead_peer(client, 5)
        assert len(failing_connects) == 10


async def test_a_call_without_a_budget_is_not_held_by_it(
    failing_connects: Connects, mock_clock: trio.testing.MockClock
) -> None:
    budgeted = RetryPolicy(attempts=2, on=("connect",), budget=0.0)
    async with open_client(retries=budgeted) as client:
        await sessions_against_a_dead_peer(client, 40)
        failing_connects.clear()
        target = dead_target()
        with pytest.raises(ConnectError):
            await client.request(target, b"x", retries=budgeted.replace(budget=None))
        assert len(failing_connects) == 2


# -- UDP --------------------------------------------------------------------------------


@pytest.mark.parametrize("idempotent", [False, True])
async def test_a_lost_datagram_is_resent_only_when_idempotent(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, idempotent: bool
) -> None:
    seen: list[bytes] = []

    async def drop_the_first(request: bytes, peer: triocomm.DatagramPeer[bytes]) -> bytes | None:
        seen.append(request)
        return None if len(seen) == 1 else request

    server = await nursery.start(
        functools.partial(
            triocomm.serve_datagrams, drop_the_first, 0, host="127.0.0.1", codec=triocomm.Raw()
        )
    )
    target = Target.udp("127.0.0.1", server.port, triocomm.Raw())
    policy = RetryPolicy(attempts=3, on=("timeout",))
    async with open_client() as client:
        start = trio.current_time()
        if idempotent:
            assert await client.request(target, b"q", retries=policy, idempotent=True) == b"q"
            assert trio.current_time() - start == pytest.approx(1.0)  # one lost wait
            stats = client.stats(target)
            assert (stats.retries, stats.failed, stats.created) == (1, 1, 2)
        else:
            with pytest.raises(CommTimeout):
                await client.request(target, b"q", retries=policy)
            assert client.stats(target).retries == 0
    assert len(seen) == (2 if idempotent else 1)


def test_a_udp_target_takes_no_connection_health_options() -> None:
    for options in ({"min_idle": 1}, {"tcp_keepalive": 5}, {"max_lifetime": 5}):
        with pytest.raises(TypeError, match="UDP target has no connections"):
            Target("127.0.0.1", 53, triocomm.Raw(), max_datagram=512, **options)
