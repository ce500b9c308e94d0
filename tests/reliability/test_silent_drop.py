"""Silent drops on a real network path: how the client fails or recovers, with figures.

A server listens in a network namespace (``netlab.py``); the client, in ours,
reaches it over a veth pair. Then the path fails the way NATs and firewalls
make it fail: the packets of a pooled connection vanish (no FIN, no RST), or
every packet to the peer does. Each test checks *what* happens (an error
naming the phase, a recovery, a connection discarded) and prints *how long*
it took; nothing asserts on time. Limits are scaled down (inactivity 3 s,
keep-alive probes after 1 s) to keep the file fast: the figures scale with
them. Run with ``-s`` to see them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
import trio

import triocomm
from triocomm import CommTimeout, LengthPrefixed, RetryPolicy, Target, Timeouts, open_client

try:
    from .netlab import NetLab, lab_problem, netem_problem
except ImportError:
    from netlab import NetLab, lab_problem, netem_problem  # type: ignore[no-redef]

CODEC = LengthPrefixed()
LIMITS = Timeouts(connect=2.0, inactivity=3.0)
Conn = triocomm.Connection[bytes, bytes]


@functools.cache
def _problem() -> str | None:
    return lab_problem()


@pytest.fixture
def lab() -> Iterator[NetLab]:
    """A namespace with a veth pair to it, removed when the test ends."""
    problem = _problem()
    if problem is not None:
        pytest.skip(f"no network lab: {problem}")
    built = NetLab().open()
    try:
        yield built
    finally:
        built.close()


async def _echo(stream: trio.SocketStream) -> None:
    conn = triocomm.Connection(stream, CODEC)
    async with conn:
        try:
            async for message in conn:
                await conn.send(message)
        except (triocomm.CommError, trio.BrokenResourceError):
            pass


@pytest.fixture
async def far_target(lab: NetLab, nursery: trio.Nursery) -> Target[bytes, bytes]:
    """An echo service inside the lab's namespace; the target to reach it."""
    sock = lab.listen()
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    nursery.start_soon(trio.serve_listeners, _echo, [listener])
    return Target(lab.far, sock.getsockname()[1], CODEC, timeouts=LIMITS)


def figure(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n[silent drop] {text}")


async def ping(conn: Conn) -> None:
    """A health check: one echo, within half a second."""
    with trio.fail_after(0.5):
        await conn.send(b"ping")
        if await conn.receive() != b"ping":
            raise RuntimeError("bad pong")


async def drop_the_pooled_connection(
    client: triocomm.Client, target: Target[bytes, bytes], lab: NetLab
) -> None:
    """Warm up one pooled connection, then make the network forget it."""
    async with client.connection(target) as conn:
        await conn.send(b"warm")
        assert await conn.receive() == b"warm"
        port = conn.local_address[1]  # type: ignore[index]
    lab.drop_flow(port)


async def timed(call: functools.partial[object]) -> tuple[float, object]:
    start = trio.current_time()
    try:
        result = await call()
    except Exception as exc:
        result = exc
    return trio.current_time() - start, result


async def test_the_lab_carries_requests(far_target: Target[bytes, bytes]) -> None:
    async with open_client() as client:
        assert await client.request(far_target, b"hello") == b"hello"


async def test_without_help_a_dropped_connection_fails_after_inactivity(
    lab: NetLab, far_target: Target[bytes, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    async with open_client() as client:
        await drop_the_pooled_connection(client, far_target, lab)
        took, error = await timed(functools.partial(client.request, far_target, b"x"))
    assert isinstance(error, CommTimeout)
    assert error.phase == "inactivity"
    figure(capsys, f"no health check, no keep-alive: the request fails after {took:.2f}s")


async def test_a_timeout_retry_recovers_an_idempotent_request(
    lab: NetLab, far_target: Target[bytes, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    policy = RetryPolicy(on=("stale", "timeout"))
    async with open_client(retries=policy) as client:
        await drop_the_pooled_connection(client, far_target, lab)
        call = functools.partial(client.request, far_target, b"x", idempotent=True)
        took, reply = await timed(call)
        assert reply == b"x"
        assert client.stats(far_target).retries == 1
    figure(capsys, f"retry on timeout (idempotent): the request succeeds after {took:.2f}s")


async def test_a_health_check_finds_the_dropped_connection_before_lending_it(
    lab: NetLab, far_target: Target[bytes, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    target = Target(
        lab.far, far_target.port, CODEC, timeouts=LIMITS, health_check=ping, health_check_after=0
    )
    async with open_client() as client:
        await drop_the_pooled_connection(client, target, lab)
        took, reply = await timed(functools.partial(client.request, target, b"x"))
        assert reply == b"x"
        stats = client.stats(target)
        assert (stats.health_checks_failed, stats.failed) == (1, 0)
    figure(capsys, f"health check (0.5 s ping): the request succeeds after {took:.2f}s")


async def test_tcp_keepalive_discards_the_dropped_connection_while_idle(
    lab: NetLab, far_target: Target[bytes, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    target = Target(lab.far, far_target.port, CODEC, timeouts=LIMITS, tcp_keepalive=1)
    async with open_client() as client:
        await drop_the_pooled_connection(client, target, lab)
        start = trio.current_time()
        with trio.fail_after(20):  # the kernel's probes: about 1 + 3 x 1 s
            while client.stats(target).closed == 0:
                await trio.sleep(0.05)
        found = trio.current_time() - start
        took, reply = await timed(functools.partial(client.request, target, b"x"))
        assert reply == b"x"
        assert client.stats(target).failed == 0
    figure(
        capsys,
        f"tcp_keepalive=1: the pool drops the dead connection {found:.2f}s after the drop; "
        f"a request then takes {took * 1000:.1f} ms",
    )


async def test_a_black_holed_peer_fails_the_connect_and_a_retry_recovers(
    lab: NetLab,
    far_target: Target[bytes, bytes],
    capsys: pytest.CaptureFixture[str],
    nursery: trio.Nursery,
) -> None:
    lab.black_hole()
    async with open_client() as client:
        took, error = await timed(functools.partial(client.request, far_target, b"x"))
        assert isinstance(error, CommTimeout)
        assert error.phase == "connect"
        figure(capsys, f"black hole, no retry: the connect fails after {took:.2f}s")

        async def heal_later() -> None:
            await trio.sleep(1.0)
            lab.heal()

        nursery.start_soon(heal_later)
        policy = RetryPolicy(attempts=4, on=("connect",), backoff=0.25, jitter=False)
        call = functools.partial(client.request, far_target, b"x", retries=policy)
        took, reply = await timed(call)
        assert reply == b"x"
    figure(capsys, f"black hole healed after 1 s, connect retries: success after {took:.2f}s")


@pytest.fixture
def netem(lab: NetLab) -> NetLab:
    """The lab, where ``tc netem`` works (a sync fixture: the skip keeps its reason)."""
    problem = netem_problem()
    if problem is not None:
        pytest.skip(problem)
    return lab


async def test_requests_over_a_delayed_lossy_path(
    netem: NetLab, far_target: Target[bytes, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    lab = netem
    lab.netem("delay", "50ms", "loss", "5%")
    async with open_client() as client:
        took, _ = await timed(functools.partial(client.request, far_target, b"x"))
        for _ in range(20):
            assert await client.request(far_target, b"y") == b"y"
    figure(capsys, f"netem delay 50ms loss 5%: first request (with connect) {took:.2f}s")
