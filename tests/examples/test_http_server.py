"""examples/http_server.py over TCP, driven by the real curl."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from http_server import Site, serve_site

import triocomm
from conftest import require_binary

pytestmark = pytest.mark.needs_binary("curl")

# After each transfer curl prints: [status, new connections it made, bytes].
WRITE_OUT = "[%{http_code} %{num_connects} %{size_download}]\n"


@pytest.fixture
async def site_server(data_file: Path) -> AsyncIterator[tuple[Site, triocomm.Server]]:
    site = Site(root=data_file.parent)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_site, site, 0)
        yield site, server
        nursery.cancel_scope.cancel()


def status_and_connects(line: str) -> str:
    """``"[200 0 23]"`` -> ``"200 0"``: the status and the new connections."""
    return line.strip("[]").rsplit(" ", 1)[0]


async def curl(*args: str) -> tuple[int, bytes, bytes]:
    binary = require_binary("curl")
    with trio.fail_after(30):
        result = await trio.run_process(
            [binary, "--silent", "--show-error", "--max-time", "20", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return result.returncode, result.stdout, result.stderr


async def test_several_urls_share_one_connection(
    site_server: tuple[Site, triocomm.Server],
) -> None:
    site, server = site_server
    base = f"http://127.0.0.1:{server.port}"
    urls = [f"{base}/conn", f"{base}/", f"{base}/conn", f"{base}/nope", f"{base}/conn"]
    code, out, err = await curl("--write-out", WRITE_OUT, *urls)
    assert code == 0, err
    lines = out.decode().splitlines()
    # curl opened one connection for the first URL and reused it for the rest.
    assert [status_and_connects(line) for line in lines if line.startswith("[")] == [
        "200 1",
        "200 0",
        "200 0",
        "404 0",
        "200 0",
    ]
    conn_lines = [line for line in lines if line.startswith("connection ")]
    assert len({line.split()[1] for line in conn_lines}) == 1
    assert [line.split()[3] for line in conn_lines] == ["0", "2", "4"]
    # The server saw it the same way.
    assert site.connections == 1
    assert server.stats.connections_total == 1
    assert site.requests == 5


async def test_a_file_of_several_mib_arrives_intact(
    site_server: tuple[Site, triocomm.Server], data_file: Path, tmp_path: Path
) -> None:
    _site, server = site_server
    base = f"http://127.0.0.1:{server.port}"
    out_file = tmp_path / "downloaded.bin"
    size = data_file.stat().st_size
    # The file between two small pages, all on one connection: the request
    # after the sendfile body must still be parsed in step.
    code, out, err = await curl(
        "--write-out", WRITE_OUT,
        f"{base}/", "--output", "/dev/null",
        f"{base}/files/{data_file.name}", "--output", str(out_file),
        f"{base}/conn",
    )  # fmt: skip
    assert code == 0, err
    first, file, page, last = out.decode().splitlines()
    assert (first, file) == ("[200 1 29]", f"[200 0 {size}]")
    assert status_and_connects(last) == "200 0"
    assert re.fullmatch(r"connection \d+ request 2", page)
    assert size >= 5 * 1024 * 1024
    assert out_file.stat().st_size == size
    assert hashlib.sha256(out_file.read_bytes()).digest() == (
        hashlib.sha256(data_file.read_bytes()).digest()
    )
    assert server.stats.connections_total == 1


async def test_head_with_curl(site_server: tuple[Site, triocomm.Server], data_file: Path) -> None:
    _site, server = site_server
    url = f"http://127.0.0.1:{server.port}/files/{data_file.name}"
    code, out, err = await curl("--head", url)
    assert code == 0, err
    headers = out.decode().lower()
    assert headers.startswith("http/1.1 200 ok\r\n")
    assert f"content-length: {data_file.stat().st_size}\r\n" in headers
    assert "content-type: application/octet-stream\r\n" in headers


async def test_a_malformed_request_gets_400_and_a_close(
    site_server: tuple[Site, triocomm.Server],
) -> None:
    site, server = site_server
    base = f"http://127.0.0.1:{server.port}"
    # A header name with spaces is not HTTP. curl sends it with both URLs:
    # each is answered 400 and the connection closed, so curl has to connect
    # again for the second.
    code, out, err = await curl(
        "--header", "Bad Header: x", "--write-out", WRITE_OUT, f"{base}/", f"{base}/conn"
    )
    assert code == 0, err
    lines = out.decode().splitlines()
    assert lines[1] == lines[3] == "[400 1 49]"
    assert lines[0].startswith("illegal header line")
    code, out, err = await curl("--verbose", "--header", "Bad Header: x", f"{base}/")
    assert b"< connection: close" in err
    assert b"Closing connection" in err or b"closing connection" in err.lower()
    assert site.connections == server.stats.connections_total == 3


async def test_garbage_over_tcp_gets_400_then_eof(
    site_server: tuple[Site, triocomm.Server],
) -> None:
    _site, server = site_server
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(b"\x16\x03\x01 this is not HTTP\r\n\r\n")
            reply = b""
            while chunk := await stream.receive_some(4096):
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"\r\nconnection: close\r\n" in reply


async def test_the_server_closes_idle_keep_alive_connections_at_shutdown(
    data_file: Path,
) -> None:
    # A browser-like client that keeps its connection open does not hold the
    # service up: shutdown closes the connection, whose handler is waiting
    # between requests.
    site = Site(root=data_file.parent)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_site, site, 0)
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
                assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200 OK")
                await server.shutdown(grace=1.0)
                rest = await stream.receive_some(4096)
            assert rest == b""
    assert server.stats.connections_open == 0
