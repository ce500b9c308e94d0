"""An HTTP/1.1 server with keep-alive: h11 for the protocol, triocomm for the rest.

HTTP does not fit the one-request-one-reply shape of ``triocomm.serve``: a
request may carry a body, a reply may be a file of any size, and whether the
connection stays open depends on both. So this server uses
``triocomm.serve_connections``, which hands each connection to
:func:`serve_http` for its whole life, and lets `h11
<https://h11.readthedocs.io>`_ (a sans-I/O HTTP/1.1 library) decide what the
bytes mean. The connection speaks the ``Raw`` codec: its messages are plain
chunks of bytes, fed to h11 as they arrive.

What it shows:

* keep-alive: one connection serves request after request until the client
  asks to close (``Connection: close``) or the server's keep-alive limit ends it;
* static files sent with ``Connection.send_file`` (zero-copy ``sendfile`` on
  a plain socket), after h11 has written the headers;
* malformed requests answered with ``400 Bad Request`` and a close;
* bounded memory: request heads are limited by h11's
  ``max_incomplete_event_size`` and request bodies by ``max_body``.

Run it (h11 comes with the examples' extra: ``pip install '.[examples]'``)::

    python examples/http_server.py --port 8080 --root /some/folder
    curl -v http://127.0.0.1:8080/ http://127.0.0.1:8080/files/name.txt

It prints one line saying where it listens (``--port 0`` picks a free port)
and serves until SIGINT (Ctrl-C) or SIGTERM, then shuts down gracefully.
"""

from __future__ import annotations

import argparse
import email.utils
import functools
import logging
import math
import mimetypes
import os
import signal
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

import h11
import trio

import triocomm

__all__ = ["FileBody", "Site", "main", "serve_http", "serve_site"]

#: How long requests in flight may run on after SIGINT or SIGTERM, in seconds.
GRACE = 5.0

log = logging.getLogger("triocomm.examples.http")

#: The largest request head (request line plus headers) accepted.
MAX_HEAD = 16 * 1024
TEXT = "text/plain; charset=utf-8"


@dataclass
class Site:
    """What the server serves, and what it has seen.

    Routes: ``/`` (a greeting), ``/conn`` (which connection and which request
    on it: shows keep-alive at work), ``/files/<name>`` (a file from ``root``,
    when set). ``GET`` and ``HEAD`` only.

    Attributes:
        root: folder served under ``/files/``; ``None`` serves no files.
        max_body: the largest request body accepted, in bytes; a larger one is
            answered with ``413`` and the connection is closed.
        request_timeout: seconds from a request's first byte to its last
            (default 10). A client that trickles a request slower than that
            (a *slowloris*) is cut off: ``408`` if its request head was
            complete, else a plain close. The wait *between* requests is the
            server's ``keepalive`` limit instead.
        connections: connections handled so far.
        requests: requests answered so far (any status).
    """

    root: Path | None = None
    max_body: int = 64 * 1024
    request_timeout: float = 10.0
    connections: int = 0
    requests: int = 0
    _resolved_root: Path | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.root is not None:
            self._resolved_root = Path(self.root).resolve()

    def find_file(self, name: str) -> Path | None:
        """Return the file ``name`` under ``root``, or ``None``.

        Refuses any name that would leave ``root`` (``..``, absolute paths,
        symbolic links pointing outside).
        """
        if self._resolved_root is None or not name or "\x00" in name:
            return None
        path = (self._resolved_root / name).resolve()
        if not path.is_relative_to(self._resolved_root) or not path.is_file():
            return None
        return path


@dataclass(frozen=True)
class FileBody:
    """A response body that is a file; h11 only needs its length.

    It travels through :meth:`h11.Connection.send_with_data_passthrough`
    untouched, and :func:`serve_http` then sends the file itself with
    ``Connection.send_file`` instead of reading it into memory.
    """

    path: Path
    size: int

    def __len__(self) -> int:
        return self.size


async def serve_http(site: Site, conn: triocomm.Connection[bytes, bytes]) -> None:
    """Serve HTTP/1.1 requests on one connection until either side ends it.

    This is the ``conn_handler`` given to ``triocomm.serve_connections``;
    the connection must use the ``triocomm.Raw`` codec. It returns when the
    connection should close, and the server then closes it.
    """
    site.connections += 1
    http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    timer = _RequestTimer(site.request_timeout)
    while True:
        try:
            event = await _next_event(conn, http, timer)
            if isinstance(event, h11.ConnectionClosed):
                return
            assert isinstance(event, h11.Request), event
            if not await _read_body(site, conn, http, timer):
                return
            await _respond(site, conn, http, event)
        except h11.RemoteProtocolError as exc:
            log.info("bad HTTP request from %s: %s", conn.peer, exc)
            await _send_error(site, conn, http, exc.error_status_hint, f"{exc}\n")
            return
        except _RequestTimedOut:
            log.info("request from %s took over %gs; closing", conn.peer, site.request_timeout)
            text = f"request not complete within {site.request_timeout:g}s\n"
            await _send_error(site, conn, http, 408, text)
            return
        if http.our_state is not h11.DONE or http.their_state is not h11.DONE:
            return  # Connection: close, or an HTTP/1.0 client
        http.start_next_cycle()
        # The next request may have arrived already (pipelining).
        timer.reset(started=bool(http.trailing_data[0]))


class _RequestTimedOut(Exception):
    """The request was not complete within ``Site.request_timeout``."""


class _RequestTimer:
    """The deadline of the request being read: set when its first byte arrives."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.deadline = math.inf

    def reset(self, *, started: bool) -> None:
        self.deadline = math.inf
        if started:
            self.start()

    def start(self) -> None:
        if self.deadline == math.inf:
            self.deadline = trio.current_time() + self.limit


async def _next_event(
    conn: triocomm.Connection[bytes, bytes], http: h11.Connection, timer: _RequestTimer
) -> object:
    """Return h11's next event, reading from the connection when it needs data.

    Before a request's first byte, the wait is bounded by the server's
    keep-alive limit (inside ``conn.receive``); after it, by the timer.
    Cancelling a receive loses no bytes, so the connection is still usable
    to answer 408.
    """
    while True:
        event = http.next_event()
        if event is not h11.NEED_DATA:
            return event
        with trio.move_on_at(timer.deadline):
            try:
                data = await conn.receive()
            except trio.EndOfChannel:
                data = b""  # h11 decides whether the close was clean
            timer.start()
            http.receive_data(data)
            continue
        raise _RequestTimedOut


async def _read_body(
    site: Site, conn: triocomm.Connection[bytes, bytes], http: h11.Connection, timer: _RequestTimer
) -> bool:
    """Read (and drop) the request body, so the next request can follow.

    Returns ``False`` when the body was too large and the client has been
    answered with 413: the rest of it is never read, so the connection must
    close.
    """
    received = 0
    while True:
        event = await _next_event(conn, http, timer)
        if isinstance(event, h11.EndOfMessage):
            return True
        if isinstance(event, h11.Data):
            received += len(event.data)
            if received > site.max_body:
                await _send_error(
                    site, conn, http, 413, f"request body exceeds {site.max_body} bytes\n"
                )
                return False


async def _respond(
    site: Site, conn: triocomm.Connection[bytes, bytes], http: h11.Connection, request: h11.Request
) -> None:
    method = request.method.decode("ascii", "replace")
    target = request.target.decode("ascii", "replace").split("?", 1)[0]
    request_number = conn.context.get("http_requests", 0)
    conn.context["http_requests"] = request_number + 1
    head_only = method == "HEAD"
    if method not in ("GET", "HEAD"):
        text = f"{method} is not allowed\n"
        await _send(site, conn, http, 405, text, head_only, [("allow", "GET, HEAD")])
    elif target == "/":
        await _send(site, conn, http, 200, "Hello from triocomm and h11.\n", head_only)
    elif target == "/conn":
        # Which connection, and which request on it: keep-alive made visible.
        text = f"connection {conn.id} request {request_number}\n"
        await _send(site, conn, http, 200, text, head_only)
    elif target.startswith("/files/") and (path := site.find_file(target[7:])) is not None:
        await _send(site, conn, http, 200, FileBody(path, path.stat().st_size), head_only)
    else:
        await _send(site, conn, http, 404, f"no such page: {target}\n", head_only)


async def _send(
    site: Site,
    conn: triocomm.Connection[bytes, bytes],
    http: h11.Connection,
    status: int,
    body: str | FileBody,
    head_only: bool,
    extra: list[tuple[str, str]] | None = None,
) -> None:
    """Send one response: text goes out in a single write, a file by ``send_file``."""
    if isinstance(body, FileBody):
        content_type = mimetypes.guess_type(body.path.name)[0] or "application/octet-stream"
        payload: bytes | FileBody = body
    else:
        content_type, payload = TEXT, body.encode()
    headers = [
        ("server", "triocomm-example"),
        ("date", email.utils.formatdate(usegmt=True)),
        ("content-type", content_type),
        ("content-length", str(len(payload))),
        *(extra or []),
    ]
    reason = HTTPStatus(status).phrase.encode()
    response = h11.Response(status_code=status, headers=headers, reason=reason)
    parts: list[object] = [http.send(response)]
    if not head_only:  # a HEAD reply announces the length but carries no body
        # h11 types Data.data as bytes, but only takes its len() here.
        data = h11.Data(data=payload)  # type: ignore[arg-type]
        parts += http.send_with_data_passthrough(data) or []
    parts.append(http.send(h11.EndOfMessage()))
    site.requests += 1
    # Bytes are gathered into as few writes as possible; a file body is sent
    # as it is, zero-copy on a plain socket.
    pending = bytearray()
    for part in parts:
        if isinstance(part, FileBody):
            await conn.send(bytes(pending))
            pending.clear()
            await conn.send_file(part.path, 0, part.size)
        elif isinstance(part, (bytes, bytearray, memoryview)):
            pending += part
    if pending:
        await conn.send(bytes(pending))


async def _send_error(
    site: Site,
    conn: triocomm.Connection[bytes, bytes],
    http: h11.Connection,
    status: int,
    text: str,
) -> None:
    """Answer with an error status and ``Connection: close``, when HTTP still allows a reply.

    That is once a request head was read, or after h11 rejected the client's
    bytes; not in the middle of our own response, nor in the middle of a
    request head (then closing is all we can do).
    """
    if http.our_state is not h11.SEND_RESPONSE and http.their_state is not h11.ERROR:
        return
    try:
        await _send(site, conn, http, status, text, False, [("connection", "close")])
    except trio.BrokenResourceError:
        pass  # the client is gone (triocomm.ConnectionLost): no one to tell


async def serve_site(
    site: Site,
    port: int = 8080,
    *,
    host: str | None = "127.0.0.1",
    task_status: trio.TaskStatus[triocomm.Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``site`` over HTTP on ``host:port`` until cancelled or shut down.

    Use it with ``nursery.start`` to learn the bound port (``port=0`` picks a
    free one)::

        server = await nursery.start(serve_site, Site(root=Path("public")), 0)
    """
    await triocomm.serve_connections(
        functools.partial(serve_http, site),
        port,
        host=host,
        codec=triocomm.Raw(),
        task_status=task_status,
    )


async def main(argv: list[str] | None = None) -> None:
    """Serve until SIGINT (Ctrl-C) or SIGTERM, then shut down gracefully."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--root", type=Path, default=Path(os.curdir), help="served under /files/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    # SIGINT (Ctrl-C) and SIGTERM arrive as messages, not as exceptions. The
    # receiver opens before the port is printed, so no signal is missed.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            serving = functools.partial(serve_site, Site(root=args.root), args.port, host=args.host)
            server: triocomm.Server = await nursery.start(serving)
            host = f"[{args.host}]" if ":" in args.host else args.host
            print(f"http_server: listening on {host}:{server.port}", flush=True)
            async for signum in signals:
                signame = signal.Signals(signum).name
                print(f"http_server: {signame} received, shutting down", flush=True)
                break
            # Stop accepting, let requests in flight finish (GRACE s at most).
            await server.shutdown(grace=GRACE)


if __name__ == "__main__":
    trio.run(main)
