"""The HTTP logic of examples/http_server.py, over in-memory connections.

No socket and no server here: ``serve_http`` runs on one end of a
``connection_pair`` and an h11 client (or raw bytes) drives the other end.
The same handler against curl over TCP is in test_http_server.py.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import h11
import pytest
import trio
import trio.testing
from http_server import Site, serve_http

import triocomm
from triocomm.testing import connection_pair

Conn = triocomm.Connection[bytes, bytes]


@asynccontextmanager
async def http_session(
    site: Site, *, limit: float = 10.0
) -> AsyncIterator[tuple[Conn, trio.Event]]:
    """Yield the client end of a connection served by ``serve_http``, and an
    event set when the handler has returned; all within ``limit`` seconds."""
    client, server = connection_pair(triocomm.Raw())
    finished = trio.Event()

    async def run_handler() -> None:
        async with server:
            await serve_http(site, server)
        finished.set()

    with trio.fail_after(limit):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_handler)
            try:
                yield client, finished
            finally:
                # The client leaving is what ends a keep-alive handler.
                await client.aclose()


class Client:
    """A minimal h11 client over a triocomm connection."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.http = h11.Connection(h11.CLIENT)

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
    ) -> tuple[h11.Response, bytes]:
        all_headers = [("host", "example"), *(headers or [])]
        if body:
            all_headers.append(("content-length", str(len(body))))
        data = self.http.send(h11.Request(method=method, target=target, headers=all_headers))
        data = (data or b"") + (self.http.send(h11.Data(data=body)) or b"") if body else data
        data = (data or b"") + (self.http.send(h11.EndOfMessage()) or b"")
        await self.conn.send(data)
        return await self.response()

    async def response(self) -> tuple[h11.Response, bytes]:
        response: h11.Response | None = None
        body = bytearray()
        while True:
            event = self.http.next_event()
            if event is h11.NEED_DATA:
                try:
                    self.http.receive_data(await self.conn.receive())
                except trio.EndOfChannel:
                    self.http.receive_data(b"")
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                if self.http.our_state is h11.DONE and self.http.their_state is h11.DONE:
                    self.http.start_next_cycle()
                return response, bytes(body)
            else:
                raise AssertionError(f"unexpected {event!r}")


def header(response: h11.Response, name: str) -> str | None:
    for key, value in response.headers:
        if key == name.encode():
            return value.decode()
    return None


async def read_until_closed(conn: Conn) -> bytes:
    data = bytearray()
    while True:
        try:
            data += await conn.receive()
        except trio.EndOfChannel:
            return bytes(data)


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    site = Site()
    async with http_session(site) as (conn, finished):
        client = Client(conn)
        bodies = []
        for _ in range(3):
            response, body = await client.request("GET", "/conn")
            assert response.status_code == 200
            bodies.append(body)
        ids = {body.split()[1] for body in bodies}
        assert len(ids) == 1
        assert [body.split()[3] for body in bodies] == [b"0", b"1", b"2"]
        assert not finished.is_set()
        await conn.aclose()  # a clean close between requests ends the handler
        await finished.wait()
    assert (site.connections, site.requests) == (1, 3)


async def test_pipelined_requests_are_answered_in_order() -> None:
    site = Site()
    async with http_session(site) as (conn, _finished):
        await conn.send(
            b"GET /conn HTTP/1.1\r\nhost: a\r\n\r\n"
            b"GET /nope HTTP/1.1\r\nhost: a\r\n\r\n"
            b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"
        )
        raw = await read_until_closed(conn)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)
    assert statuses == [b"200", b"404", b"200"]
    assert site.requests == 3


async def test_head_announces_the_length_without_a_body(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"12345")
    async with http_session(Site(root=tmp_path)) as (conn, _finished):
        client = Client(conn)
        response, body = await client.request("HEAD", "/files/a.txt")
        assert (response.status_code, body) == (200, b"")
        assert header(response, "content-length") == "5"
        assert header(response, "content-type") == "text/plain"
        response, body = await client.request("GET", "/files/a.txt")
        assert (response.status_code, body) == (200, b"12345")


async def test_a_file_of_several_mib_arrives_intact(data_file: Path) -> None:
    # Over a memory stream send_file takes its chunked path; over TCP (the curl
    # test) it is zero-copy. Both must deliver the same bytes.
    async with http_session(Site(root=data_file.parent)) as (conn, _finished):
        response, body = await Client(conn).request("GET", f"/files/{data_file.name}")
    assert response.status_code == 200
    assert len(body) == data_file.stat().st_size > 4 * 1024 * 1024
    assert hashlib.sha256(body).digest() == hashlib.sha256(data_file.read_bytes()).digest()


@pytest.mark.parametrize(
    "target",
    ["/files/../secret.txt", "/files//etc/passwd", "/files/", "/files/sub/../../secret.txt"],
)
async def test_files_outside_the_root_are_not_served(tmp_path: Path, target: str) -> None:
    root = tmp_path / "public"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("secret")
    async with http_session(Site(root=root)) as (conn, _finished):
        response, body = await Client(conn).request("GET", target)
    assert response.status_code == 404
    assert body == f"no such page: {target}\n".encode()


async def test_no_root_serves_no_files() -> None:
    async with http_session(Site()) as (conn, _finished):
        response, _ = await Client(conn).request("GET", "/files/anything")
    assert response.status_code == 404


async def test_other_methods_get_405_and_the_body_is_drained() -> None:
    async with http_session(Site()) as (conn, _finished):
        client = Client(conn)
        response, _ = await client.request("POST", "/", body=b"x" * 1000)
        assert response.status_code == 405
        assert header(response, "allow") == "GET, HEAD"
        # The body was consumed, so the connection is still in step.
        response, body = await client.request("GET", "/")
        assert (response.status_code, body) == (200, b"Hello from triocomm and h11.\n")


async def test_a_body_over_max_body_gets_413_and_a_close() -> None:
    site = Site(max_body=100)
    async with http_session(site) as (conn, finished):
        await conn.send(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 1000\r\n\r\n" + b"x" * 200)
        raw = await read_until_closed(conn)
        await finished.wait()
    assert raw.startswith(b"HTTP/1.1 413 ")
    assert b"connection: close" in raw.lower()
    assert b"exceeds 100 bytes" in raw


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 requires a Host header
        b"GET / HTTP/1.1\r\nhost: a\r\ncontent-length: nope\r\n\r\n",
    ],
)
async def test_malformed_requests_get_400_and_a_close(request_bytes: bytes) -> None:
    async with http_session(Site()) as (conn, finished):
        await conn.send(request_bytes)
        raw = await read_until_closed(conn)
        await finished.wait()
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in raw.lower()


async def test_a_request_head_over_the_limit_gets_431_and_a_close() -> None:
    async with http_session(Site()) as (conn, finished):
        await conn.send(b"GET / HTTP/1.1\r\nhost: a\r\nx-big: " + b"y" * 20000)
        raw = await read_until_closed(conn)
        await finished.wait()
    assert raw.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"connection: close" in raw.lower()


async def test_a_client_vanishing_mid_request_ends_the_handler_quietly() -> None:
    async with http_session(Site()) as (conn, finished):
        await conn.send(b"GET / HTTP/1.1\r\nhost: a\r\n")
        await conn.aclose()
        await finished.wait()


# -- slow clients (MockClock: no real waiting) ---------------------------------


async def test_a_trickled_request_head_is_cut_off(autojump_clock: trio.testing.MockClock) -> None:
    site = Site(request_timeout=10.0)
    async with http_session(site, limit=200) as (conn, finished):
        start = trio.current_time()
        with pytest.raises(trio.BrokenResourceError):
            for byte in b"GET / HTTP/1.1\r\nhost: a\r\nx-slow: " + b"y" * 100:
                await conn.send(bytes([byte]))
                await trio.sleep(1.0)
        await finished.wait()
        # Cut off about request_timeout after the first byte, not after 100 s.
        assert 10.0 <= trio.current_time() - start <= 12.0
    assert site.requests == 0


async def test_a_body_that_stops_coming_gets_408(autojump_clock: trio.testing.MockClock) -> None:
    site = Site(request_timeout=10.0)
    async with http_session(site, limit=200) as (conn, finished):
        await conn.send(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\n" + b"x" * 10)
        raw = await read_until_closed(conn)
        await finished.wait()
    assert raw.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"connection: close" in raw.lower()


async def test_the_request_timer_restarts_for_each_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Waiting between requests is not limited by request_timeout: 30 s of
    # silence after a response is fine, and each request gets its own 10 s.
    site = Site(request_timeout=10.0)
    async with http_session(site, limit=200) as (conn, _finished):
        client = Client(conn)
        for _ in range(3):
            response, _ = await client.request("GET", "/")
            assert response.status_code == 200
            await trio.sleep(30.0)
        assert site.requests == 3
