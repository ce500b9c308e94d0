"""Upstream through the real client: selection, fuses, retries elsewhere, key routing.

The servers are scripted raw-Trio echo servers on loopback, not triocomm's own.
"""

from __future__ import annotations

import functools
import socket

import pytest
import trio

import triocomm
from triocomm import ConnectError, LengthPrefixed, Target, Upstream, UpstreamUnavailable

CODEC = LengthPrefixed()


async def _tagged_echo(tag: bytes, stream: trio.SocketStream) -> None:
    conn = triocomm.Connection(stream, CODEC)
    async with conn:
        try:
            async for message in conn:
                await conn.send(tag + message)
        except triocomm.CommError:
            pass


@pytest.fixture
async def servers(nursery: trio.Nursery) -> list[Target[bytes, bytes]]:
    targets = []
    for tag in (b"A:", b"B:", b"C:"):
        listeners = await nursery.start(
            functools.partial(
                trio.serve_tcp, functools.partial(_tagged_echo, tag), 0, host="127.0.0.1"
            )
        )
        port = listeners[0].socket.getsockname()[1]
        targets.append(Target("127.0.0.1", port, CODEC))
    return targets


def dead_target() -> Target[bytes, bytes]:
    """A loopback port with nothing listening (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return Target("127.0.0.1", port, CODEC)


async def test_round_robin_spreads_requests(servers: list[Target[bytes, bytes]]) -> None:
    up = Upstream(servers)
    async with triocomm.open_client() as client:
        replies = [await client.request(up, b"x") for _ in range(6)]
    assert replies == [b"A:x", b"B:x", b"C:x"] * 2
    assert [st.sessions for st in up.stats().values()] == [2, 2, 2]


async def test_consistent_hash_routes_a_key_to_one_address(
    servers: list[Target[bytes, bytes]],
) -> None:
    up = Upstream(servers, policy="consistent_hash")
    async with triocomm.open_client() as client:
        for key in ("user:1", "user:2", "user:3"):
            replies = {await client.request(up, b"k", key=key) for _ in range(4)}
            assert len(replies) == 1


async def test_connect_failure_retries_on_another_address_and_fuses(
    servers: list[Target[bytes, bytes]],
) -> None:
    dead = dead_target()
    up = Upstream([dead, servers[0]], max_fails=1, fuse_time=60)
    async with triocomm.open_client(retries=1) as client:
        # The first pick is the dead address: the connect fails, counts
        # against it, and the retry goes to the address not yet tried.
        assert await client.request(up, b"1") == b"A:1"
        st = up.stats()[dead]
        assert (st.failures, st.in_flight) == (1, 0)
        assert st.fused_until is not None
        # Fused: every later session skips it.
        for i in range(5):
            assert await client.request(up, b"%d" % i) == b"A:%d" % i
        assert up.stats()[dead].sessions == 1


async def test_every_address_fused_fails_at_once() -> None:
    up = Upstream([dead_target(), dead_target()], max_fails=1, fuse_time=60)
    async with triocomm.open_client(retries=1) as client:
        with pytest.raises(ConnectError):
            await client.request(up, b"x")
        with pytest.raises(UpstreamUnavailable, match="2 of 2 fused"):
            await client.request(up, b"x")
    assert isinstance(UpstreamUnavailable("x"), triocomm.CommError)


async def test_plain_target_connect_failure_is_not_retried() -> None:
    target = dead_target()
    async with triocomm.open_client(retries=3) as client:
        with pytest.raises(ConnectError) as info:
            await client.request(target, b"x")
        assert client.stats(target).failed >= 1
    assert str(target.port) in str(info.value)


async def test_user_error_in_session_does_not_fuse(servers: list[Target[bytes, bytes]]) -> None:
    up = Upstream(servers[:1], max_fails=1)

    async def session(conn: triocomm.Connection[bytes, bytes]) -> None:
        raise KeyError("mine")

    async with triocomm.open_client() as client:
        with pytest.raises(KeyError):
            await client.run(up, session)
        assert up.stats()[servers[0]].fused_until is None
        assert await client.request(up, b"ok") == b"A:ok"


async def test_connection_borrow_through_upstream(servers: list[Target[bytes, bytes]]) -> None:
    up = Upstream(servers[1:2])
    async with triocomm.open_client() as client, client.connection(up) as conn:
        await conn.send_many([b"1", b"2"])
        assert [await conn.receive(), await conn.receive()] == [b"B:1", b"B:2"]
    st = up.stats()[servers[1]]
    assert (st.sessions, st.in_flight, st.failures) == (1, 0, 0)


async def test_connect_failure_is_not_masked_when_the_others_are_fused(
    servers: list[Target[bytes, bytes]],
) -> None:
    dead = dead_target()
    up = Upstream([servers[0], dead], max_fails=1, fuse_time=60)
    up.choose(exclude=[dead]).settle(False)  # fuse the live one
    async with triocomm.open_client(retries=1) as client:
        # The only available address refuses: the caller sees that failure,
        # not an UpstreamUnavailable from a retry that had nowhere to go.
        with pytest.raises(ConnectError):
            await client.request(up, b"x")
    assert all(st.in_flight == 0 for st in up.stats().values())


async def test_a_cancelled_session_leaves_nothing_in_flight_and_fuses_nothing(
    nursery: trio.Nursery,
) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
    target = Target("127.0.0.1", listeners[0].socket.getsockname()[1], CODEC)
    up = Upstream([target], max_fails=1)
    async with triocomm.open_client() as client:
        with trio.move_on_after(0.2) as scope:
            await client.request(up, b"never answered")
        assert scope.cancelled_caught
        st = up.stats()[target]
        assert (st.sessions, st.in_flight, st.failures, st.fused_until) == (1, 0, 0, None)
        assert client.stats(target).in_use == 0


async def test_a_refused_message_counts_nothing_against_any_address(
    servers: list[Target[bytes, bytes]],
) -> None:
    dead = dead_target()
    up = Upstream([dead, servers[0]], max_fails=1)
    async with triocomm.open_client(retries=1) as client:
        for _ in range(2):  # each address in turn, the dead one included
            with pytest.raises(TypeError):
                await client.request(up, "not bytes")  # type: ignore[misc]
        for target in (dead, servers[0]):
            st = up.stats()[target]
            assert (st.in_flight, st.failures, st.fused_until) == (0, 0, None)
            assert client.stats(target) == triocomm.PoolStats()


async def test_a_session_across_remove_and_add_settles_on_its_own_entry(
    servers: list[Target[bytes, bytes]],
) -> None:
    a, b = servers[:2]
    up = Upstream([a, b], policy="least_connections")
    started, finish = trio.Event(), trio.Event()

    async def long_session(conn: triocomm.Connection[bytes, bytes]) -> bytes:
        started.set()
        await finish.wait()
        await conn.send(b"late")
        return await conn.receive()

    async with triocomm.open_client() as client, trio.open_nursery() as nursery:
        replies: list[bytes] = []

        async def run_long() -> None:
            replies.append(await client.run(up, long_session))

        nursery.start_soon(run_long)
        await started.wait()
        up.remove(a)
        up.add(a)
        finish.set()
    assert replies == [b"A:late"]
    assert up.stats()[a].in_flight == 0
    # One session held open on each address: least_connections must
    # alternate, which it would not if `a` were at -1 in flight.
    async with (
        triocomm.open_client() as client,
        client.connection(up) as first,
        client.connection(up) as second,
    ):
        await first.send(b"1")
        await second.send(b"2")
        tags = [(await first.receive())[:2], (await second.receive())[:2]]
        assert sorted(tags) == [b"A:", b"B:"]


async def test_a_closed_client_leaves_nothing_in_flight(
    servers: list[Target[bytes, bytes]],
) -> None:
    up = Upstream(servers[:2])
    async with triocomm.open_client() as client:
        assert await client.request(up, b"x") == b"A:x"
    for _ in range(2):  # the address used before, and one never used
        with pytest.raises(trio.ClosedResourceError):
            await client.request(up, b"x")
    with pytest.raises(trio.ClosedResourceError):
        async with client.connection(up):
            pass  # pragma: no cover
    assert [st.in_flight for st in up.stats().values()] == [0, 0]
