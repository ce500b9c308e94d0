"""The echo service both commands run: ``serve`` on its own, ``bench``
embedded when no address is given. It is ``triocomm.serve`` with a handler
that returns each request unchanged."""

from __future__ import annotations

import functools
import ssl

import trio

from .. import Codec, Observer, Server, serve
from ._arguments import TcpAddress
from ._failure import CliFailure, leaf


async def _echo(request: bytes, conn: object) -> bytes:
    # One reply per request; with the raw codec a "request" is whatever chunk
    # arrived, and echoing chunk by chunk still returns the bytes in order.
    return request


def server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    """A TLS context serving ``cert`` with ``key`` (PEM files); a bad pair is a CliFailure."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise CliFailure(
            f"cannot load the TLS certificate {cert!r} with key {key!r}: {exc}"
        ) from None
    return context


async def start_echo_service(
    nursery: trio.Nursery,
    *,
    codec: Codec[bytes, bytes],
    port: int | None = None,
    host: str | None = None,
    path: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    observers: list[Observer] | None = None,
) -> Server:
    """Start ``triocomm.serve`` with the echo handler in ``nursery``; return its Server."""
    where = path if path is not None else str(TcpAddress(host or "*", port or 0))
    try:
        server: Server = await nursery.start(
            functools.partial(
                serve,
                _echo,
                port,
                host=host,
                path=path,
                codec=codec,
                ssl_context=ssl_context,
                observers=observers,
            )
        )
        return server
    except BaseException as exc:
        error = leaf(exc)
        if isinstance(error, OSError):
            reason = error.strerror or str(error)
            raise CliFailure(f"cannot listen on {where}: {reason}") from None
        raise
