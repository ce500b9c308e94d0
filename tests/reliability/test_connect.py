"""Fault class: connections that cannot be made — refused, no such socket, bad TLS.

Each raises ``ConnectError`` naming the address with the cause chained (or a
``connect`` timeout), takes no pool slot, and leaves nothing open.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio

from triocomm import (
    CommTimeout,
    ConnectError,
    Target,
    Timeouts,
    Upstream,
    UpstreamUnavailable,
    open_client,
)
from triocomm.testing import Fault, fault_server


async def closed_port() -> int:
    """A loopback port that nobody listens on (it was bound a moment ago)."""
    async with fault_server() as peer:
        return peer.port


async def test_refused_tcp_connect(invariants, codec) -> None:
    port = await closed_port()
    target = Target("127.0.0.1", port, codec)
    await invariants.mark()
    async with open_client() as client:
        for attempt in range(1, 4):
            with trio.fail_after(5), pytest.raises(ConnectError) as info:
                await client.request(target, b"hello")
            assert f"127.0.0.1:{port}" in str(info.value)
            assert isinstance(info.value.__cause__, OSError)
            await invariants.check((client, target))
            stats = client.stats(target)
            assert (stats.open, stats.created, stats.failed) == (0, 0, attempt)
    await invariants.check()


async def test_missing_unix_socket(invariants, codec, tmp_path: Path) -> None:
    path = tmp_path / "nobody.sock"
    target = Target.unix(path, codec)
    await invariants.mark()
    async with open_client() as client:
        with trio.fail_after(5), pytest.raises(ConnectError) as info:
            await client.request(target, b"hello")
        assert str(path) in str(info.value)
        await invariants.check((client, target))
    await invariants.check()


async def test_tls_handshake_that_never_completes_hits_the_connect_limit(
    invariants, codec, client_ssl_context
) -> None:
    async with fault_server(Fault.handshake_stall(), codec=codec) as peer:
        target = Target(
            "127.0.0.1", peer.port, codec, ssl_context=client_ssl_context,
            timeouts=Timeouts(connect=0.2),
        )  # fmt: skip
        await invariants.mark()
        async with open_client() as client:
            with trio.fail_after(5), pytest.raises(CommTimeout) as info:
                await client.request(target, b"hello")
            assert info.value.phase == "connect"
            # Our end is closed, so the fault server saw the hangup and let go too.
            await invariants.check((client, target))
            assert peer.hangups == 1
            assert client.stats(target).open == 0


# (trust, server_hostname): "system" trusts only the system CAs, not the test CA.
BAD_TLS = {
    "untrusted CA": ("system", None),
    "wrong host name": ("test CA", "not-the-server.example"),
}


@pytest.mark.parametrize("case", BAD_TLS.values(), ids=BAD_TLS.keys())
async def test_client_tls_verifies_the_certificate_and_the_host_name(
    case, invariants, codec, server_ssl_context, client_ssl_context
) -> None:
    trust, name = case
    context = ssl.create_default_context() if trust == "system" else client_ssl_context
    async with fault_server(ssl_context=server_ssl_context, codec=codec) as peer:
        target = Target("127.0.0.1", peer.port, codec, ssl_context=context, server_hostname=name)
        await invariants.mark()
        async with open_client() as client:
            with trio.fail_after(5), pytest.raises(ConnectError) as info:
                await client.request(target, b"hello")
            assert isinstance(info.value.__cause__, (ssl.SSLError, trio.BrokenResourceError))
            await invariants.check((client, target))
        # The same server with a correct client works: the failure was the check.
        good = Target("127.0.0.1", peer.port, codec, ssl_context=client_ssl_context)
        async with open_client() as client:
            with trio.fail_after(5):
                assert await client.request(good, b"hello") == b"hello"


async def test_upstream_routes_around_a_refused_address(invariants, codec) -> None:
    dead = Target("127.0.0.1", await closed_port(), codec)
    async with fault_server(codec=codec) as peer:
        live = Target("127.0.0.1", peer.port, codec)
        upstream = Upstream([dead, live], max_fails=1, fuse_time=60)
        await invariants.mark()
        async with open_client() as client:
            with trio.fail_after(5):
                for i in range(10):
                    message = b"request %d" % i
                    # A refused connect is retried on the address not yet tried.
                    assert await client.request(upstream, message) == message
            # The dead address failed once and was then fused: never tried again.
            assert client.stats(dead).failed == 1
            assert client.stats(live).created + client.stats(live).reused == 10
            invariants.check_pools((client, dead), (client, live))
        await invariants.check()


async def test_an_upstream_with_every_address_refused_fails_at_once(invariants, codec) -> None:
    targets = [Target("127.0.0.1", await closed_port(), codec) for _ in range(2)]
    upstream = Upstream(targets, max_fails=1, fuse_time=60)
    await invariants.mark()
    async with open_client() as client:
        with trio.fail_after(5), pytest.raises(ConnectError):
            await client.request(upstream, b"hello")  # tries both, both refuse
        with trio.fail_after(5), pytest.raises(UpstreamUnavailable):
            await client.request(upstream, b"hello")  # both fused now
        for target in targets:
            await invariants.check((client, target))
