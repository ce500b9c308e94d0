"""triocomm.contrib.prometheus, scraped over HTTP by the real curl and read back
with prometheus_client's own parser: the numbers match ``Server.stats``."""

from __future__ import annotations

import copy
import pickle
import re
import struct
import subprocess
import sys
from functools import partial

import pytest
import trio

pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families

import triocomm
from binaries import require_binary
from triocomm import Connection, LengthPrefixed, Server, Target, open_client
from triocomm.contrib.prometheus import PrometheusObserver

pytestmark = pytest.mark.needs_binary("curl")

LOOPBACK = "127.0.0.1"


async def echo(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
    if request == b"boom":
        raise ValueError("handler failed")
    return request


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at http://127.0.0.1:port/metrics, by name and sorted labels."""
    with trio.fail_after(30):
        result = await trio.run_process(
            [require_binary("curl"), "--silent", "--show-error", "--max-time", "20",
             f"http://{LOOPBACK}:{port}/metrics"],
            capture_stdout=True,
        )  # fmt: skip
    samples = {}
    for family in text_string_to_metric_families(result.stdout.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


async def test_a_scrape_of_a_live_service_matches_its_stats(registry: CollectorRegistry) -> None:
    observer = PrometheusObserver(registry)
    httpd, thread = start_http_server(0, addr=LOOPBACK, registry=registry)
    try:
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(
                partial(
                    triocomm.serve,
                    echo,
                    0,
                    host=LOOPBACK,
                    codec=LengthPrefixed(),
                    observers=[observer],
                )
            )
            target = Target(LOOPBACK, server.port, LengthPrefixed())
            async with open_client(retries=0) as client:
                for payload in (b"a", b"bb", b"ccc"):
                    assert await client.request(target, payload) == payload
                with pytest.raises(triocomm.ConnectionLost):
                    await client.request(target, b"boom")
                # One connection still open, one closed by the handler's error.
                assert await client.request(target, b"d") == b"d"
                with trio.fail_after(5):
                    while server.stats.connections_open != 1:
                        await trio.sleep(0.01)
                samples = await scrape(httpd.server_port)
                stats = copy.copy(server.stats)  # the live one changes as the client closes
            nursery.cancel_scope.cancel()
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
    service = (("service", f"{LOOPBACK}:{server.port}"),)
    expected = {
        "triocomm_server_connections_open": stats.connections_open,
        "triocomm_server_connections_peak": stats.connections_peak,
        "triocomm_server_connections_total": stats.connections_total,
        "triocomm_server_sessions_total": stats.sessions,
        "triocomm_server_bytes_received_total": stats.bytes_received,
        "triocomm_server_bytes_sent_total": stats.bytes_sent,
        "triocomm_server_messages_received_total": stats.messages_received,
        "triocomm_server_messages_sent_total": stats.messages_sent,
    }
    assert {name: samples[(name, service)] for name in expected} == expected
    assert stats.sessions == 5
    assert stats.messages_sent == 4
    assert samples[("triocomm_server_errors_total", (("kind", "handler"), *service))] == 1
    assert samples[("triocomm_connections_opened_total", ())] == 2
    assert samples[("triocomm_connections_closed_total", (("outcome", "error"),))] == 1
    assert samples[("triocomm_sessions_total", (("outcome", "ok"),))] == 4
    assert samples[("triocomm_sessions_total", (("outcome", "error"),))] == 1
    assert samples[("triocomm_session_duration_seconds_count", ())] == 5


async def test_a_stopped_service_is_no_longer_exported(registry: CollectorRegistry) -> None:
    observer = PrometheusObserver(registry)
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            partial(
                triocomm.serve, echo, 0, host=LOOPBACK, codec=LengthPrefixed(), observers=[observer]
            )
        )
        assert observer.services() == [server]
        await server.shutdown()
    assert observer.services() == []


async def test_a_client_observer_counts_connects_and_sessions(registry: CollectorRegistry) -> None:
    observer = PrometheusObserver(registry)
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            partial(triocomm.serve, echo, 0, host=LOOPBACK, codec=LengthPrefixed())
        )
        async with open_client(observers=[observer]) as client:
            target = Target(LOOPBACK, server.port, LengthPrefixed())
            for _ in range(3):
                await client.request(target, b"x")
        nursery.cancel_scope.cancel()
    assert registry.get_sample_value("triocomm_sessions_total", {"outcome": "ok"}) == 3
    assert registry.get_sample_value("triocomm_connections_opened_total") == 1
    assert registry.get_sample_value("triocomm_connections_closed_total", {"outcome": "ok"}) == 1


async def test_triocomm_serve_metrics_port_exposes_the_echo_service() -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "triocomm", "serve", "--port", "0", "--metrics-port", "0"],
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        text = ""
        with trio.fail_after(30):
            while "listening on" not in text:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, text
                text += chunk.decode()
        metrics = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", text)
        service = re.search(r"listening on 127\.0\.0\.1:(\d+)", text)
        assert metrics, text
        assert service, text
        async with await trio.open_tcp_stream(LOOPBACK, int(service.group(1))) as stream:
            await stream.send_all(frame(b"hello") * 3)
            want, got = 3 * len(frame(b"hello")), b""
            while len(got) < want:
                got += await stream.receive_some(4096)
        labels = {"service": f"{LOOPBACK}:{service.group(1)}"}
        with trio.fail_after(30):
            while True:  # the connection's close reaches the service asynchronously
                samples = await scrape(int(metrics.group(1)))
                if samples[("triocomm_server_connections_open", tuple(labels.items()))] == 0:
                    break
                await trio.sleep(0.05)
        assert samples[("triocomm_server_sessions_total", tuple(labels.items()))] == 3
        assert samples[("triocomm_server_messages_sent_total", tuple(labels.items()))] == 3
        assert samples[("triocomm_connections_closed_total", (("outcome", "ok"),))] == 1
    finally:
        process.terminate()
        with trio.fail_after(30):
            await process.wait()


def test_histograms_count_into_cumulative_le_buckets(registry: CollectorRegistry) -> None:
    observer = PrometheusObserver(registry)
    for seconds in (0.003, 0.005, 2.0, 60.0):
        observer.pool_wait("target", seconds)

    def bucket(le: str) -> float | None:
        return registry.get_sample_value("triocomm_pool_wait_seconds_bucket", {"le": le})

    assert [bucket(le) for le in ("0.001", "0.005", "1.0", "5.0", "10.0", "+Inf")] == [
        0,
        2,
        2,
        3,
        3,
        4,
    ]
    assert registry.get_sample_value("triocomm_pool_wait_seconds_count") == 4
    assert registry.get_sample_value("triocomm_pool_wait_seconds_sum") == pytest.approx(62.008)


def test_a_registry_takes_one_observer(registry: CollectorRegistry) -> None:
    PrometheusObserver(registry)
    with pytest.raises(ValueError, match="Duplicated"):
        PrometheusObserver(registry)


def test_the_observer_refuses_to_pickle_rather_than_count_apart(
    registry: CollectorRegistry,
) -> None:
    # serve_workers pickles its options: a copy in each worker would count
    # apart from the registry the parent exposes.
    with pytest.raises(TypeError):
        pickle.dumps(PrometheusObserver(registry))
