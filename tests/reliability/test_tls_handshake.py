"""Fault class: a TLS handshake that fails or never completes.

The handshake has its own limit; a failed one is counted, logged and costs
nothing else.
"""

from __future__ import annotations

import ssl

import pytest
import trio

from triocomm import ServerTimeouts
from triocomm.testing import Fault, fault_client

LIMIT = 0.2


async def test_server_times_out_a_handshake_that_never_completes(
    start_server, server_ssl_context, invariants, codec
) -> None:
    server = await start_server(
        ssl_context=server_ssl_context, timeouts=ServerTimeouts(handshake=LIMIT)
    )
    await invariants.mark()
    async with fault_client(Fault.handshake_stall(), server.port, codec=codec) as peer:
        with trio.fail_after(5):
            await peer.wait(hangups=1)
    await invariants.check(servers=[server])
    assert server.stats.errors["handshake"] == 1


async def test_server_refuses_plaintext_on_a_tls_port(
    start_server, server_ssl_context, invariants, codec, client_ssl_context
) -> None:
    server = await start_server(ssl_context=server_ssl_context)
    await invariants.mark()
    async with fault_client(port=server.port, codec=codec, requests=[b"hello" * 40]) as peer:
        with trio.fail_after(5):
            await peer.wait(hangups=1)
    await invariants.check(servers=[server])
    assert server.stats.errors["handshake"] == 1
    # A real TLS client is still served.
    async with fault_client(
        port=server.port, codec=codec, requests=[b"hi"], ssl_context=client_ssl_context,
        server_hostname="localhost",
    ) as peer:  # fmt: skip
        with trio.fail_after(5):
            await peer.wait(messages=1)
    assert peer.received == [b"hi"]


async def test_a_client_that_rejects_the_certificate_costs_the_server_nothing(
    start_server, server_ssl_context, invariants, codec
) -> None:
    server = await start_server(ssl_context=server_ssl_context)
    await invariants.mark()
    untrusting = ssl.create_default_context()  # does not know the test CA
    with pytest.raises(trio.BrokenResourceError):
        async with fault_client(port=server.port, codec=codec, ssl_context=untrusting):
            pytest.fail("the handshake must fail")
    await invariants.check(servers=[server])
    assert server.stats.errors["handshake"] == 1
