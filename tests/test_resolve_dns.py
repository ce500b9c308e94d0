"""DnsResolver against a real DNS server: dnsmasq on a loopback port.

The fixture starts dnsmasq on 127.0.0.1 with nothing of the system's (no
``resolv.conf``, no ``/etc/hosts``, no configuration file): its records come
from a hosts file of the test's own and from ``--srv-host`` options, all in
the ``.test`` domain, which it answers alone (``--local``). Names and their
TTLs are checked on Trio's ``MockClock``: moving it past a TTL needs no real
waiting. dnsmasq is killed by the fixture whatever the test did.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

import triocomm
from binaries import free_udp_and_tcp_port, require_binary
from triocomm.testing import open_fd_count, task_count

dns_query = pytest.importorskip("dns.query", reason="DnsResolver needs dnspython (triocomm[dns])")
import dns.message  # noqa: E402  (after the skip above)
import dns.rdatatype  # noqa: E402

pytestmark = pytest.mark.needs_binary("dnsmasq")

#: The TTL dnsmasq gives its records (--local-ttl).
LOCAL_TTL = 30
HOSTS = """\
127.0.0.2 svc.test
127.0.0.3 svc.test
127.0.0.4 svc.test
::1 v6only.test
127.0.0.5 node1.test
127.0.0.6 node2.test
"""
SRV_HOSTS = [
    # service, target, port, priority, weight
    "_echo._tcp.test,node2.test,7002,10,1",
    "_echo._tcp.test,node3.test,7003,20,9",
    "_echo._tcp.test,node1.test,7001,10,5",
]


class Dnsmasq:
    """A dnsmasq of the test's own on 127.0.0.1:``port``."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.hosts = directory / "hosts"
        self.hosts.write_text(HOSTS)
        self.log = directory / "dnsmasq.log"
        self.output = directory / "dnsmasq.out"
        self.port = free_udp_and_tcp_port()
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        # As root, dnsmasq would switch to "nobody", who cannot read the
        # test's private folder: it stays who we are.
        user = pwd.getpwuid(os.geteuid()).pw_name
        group = grp.getgrgid(os.getegid()).gr_name
        return [
            self.binary,
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            f"--addn-hosts={self.hosts}",
            "--local=/test/",
            f"--local-ttl={LOCAL_TTL}",
            f"--port={self.port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            f"--pid-file={self.directory / 'dnsmasq.pid'}",
            f"--log-facility={self.log}",
            f"--user={user}",
            f"--group={group}",
            *(f"--srv-host={srv}" for srv in SRV_HOSTS),
        ]

    def query(self, name: str, rdtype: str = "A") -> set[str]:
        """Ask dnsmasq directly (blocking, real time): the records' text."""
        request = dns.message.make_query(name, dns.rdatatype.from_text(rdtype))
        reply = dns.query.udp(request, "127.0.0.1", port=self.port, timeout=0.2)
        return {rdata.to_text() for rrset in reply.answer for rdata in rrset}

    def _poll(self, name: str, expected: set[str] | None) -> None:
        """Ask until dnsmasq answers (with ``expected``, if given); bounded in time."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"dnsmasq exited: {self.output.read_text(errors='replace')}")
            try:
                answer = self.query(name)
            except (OSError, dns.exception.Timeout):
                time.sleep(0.02)
                continue
            if expected is None or answer == expected:
                return
            time.sleep(0.02)
        raise RuntimeError(f"dnsmasq did not answer {name} with {expected} within 10 s")

    async def wait_for(self, name: str, expected: set[str] | None = None) -> None:
        # In a thread, on the real clock: the test's clock may be a MockClock.
        await trio.to_thread.run_sync(self._poll, name, expected)

    async def start(self) -> None:
        with self.output.open("wb") as output:
            # A file, not a pipe: nobody reads it while dnsmasq runs.
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=output, stderr=output
            )
        await self.wait_for("svc.test")

    def change_hosts(self, text: str) -> None:
        """Rewrite the hosts file and make dnsmasq read it again (SIGHUP)."""
        self.hosts.write_text(text)
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def kill(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(timeout=5)


@pytest.fixture
async def dnsmasq(tmp_path: Path) -> AsyncIterator[Dnsmasq]:
    server = Dnsmasq(require_binary("dnsmasq"), tmp_path)
    try:
        await server.start()
        yield server
    finally:
        server.kill()


def resolver_for(server: Dnsmasq, **kwargs: float) -> triocomm.DnsResolver:
    return triocomm.DnsResolver([("127.0.0.1", server.port)], **kwargs)  # type: ignore[arg-type]


async def test_a_name_with_three_addresses(dnsmasq: Dnsmasq) -> None:
    async with resolver_for(dnsmasq) as resolver:
        answer = await resolver.lookup("svc.test", 7000)
        assert sorted(answer.records) == [
            ("127.0.0.2", 7000), ("127.0.0.3", 7000), ("127.0.0.4", 7000),
        ]  # fmt: skip
        # The records' own TTL, since the resolver was given none.
        assert answer.ttl == LOCAL_TTL
        assert not answer.stale
        assert await resolver.resolve("v6only.test", 1) == [("::1", 1)]


async def test_srv_records_by_priority_then_weight(dnsmasq: Dnsmasq) -> None:
    async with resolver_for(dnsmasq) as resolver:
        assert await resolver.resolve_srv("_echo._tcp.test") == [
            ("node1.test", 7001, 10, 5),
            ("node2.test", 7002, 10, 1),
            ("node3.test", 7003, 20, 9),
        ]
        answer = await resolver.lookup_srv("_echo._tcp.test")
        assert answer.ttl == LOCAL_TTL
        # A target found through SRV is then resolved like any name.
        assert await resolver.resolve("node1.test", 7001) == [("127.0.0.5", 7001)]


async def test_names_that_do_not_resolve(dnsmasq: Dnsmasq) -> None:
    async with resolver_for(dnsmasq) as resolver:
        with pytest.raises(socket.gaierror, match=r"'nope\.test'.*no such name") as caught:
            await resolver.resolve("nope.test", 1)
        assert caught.value.errno == socket.EAI_NONAME
        assert f"127.0.0.1:{dnsmasq.port}" in str(caught.value)
        with pytest.raises(socket.gaierror, match="no SRV record"):
            await resolver.resolve_srv("svc.test")
        with pytest.raises(socket.gaierror, match="no such name"):
            await resolver.resolve_srv("_nothing._tcp.test")


async def test_follows_a_change_of_the_records_after_their_ttl(
    dnsmasq: Dnsmasq, mock_clock: trio.testing.MockClock
) -> None:
    async with resolver_for(dnsmasq) as resolver:
        first = await resolver.lookup("svc.test", 7000)
        assert len(first.records) == 3
        dnsmasq.change_hosts("127.0.0.3 svc.test\n127.0.0.7 svc.test\n")
        await dnsmasq.wait_for("svc.test", {"127.0.0.3", "127.0.0.7"})
        # Within the TTL the answer is the one cached.
        mock_clock.jump(LOCAL_TTL - 1)
        assert await resolver.lookup("svc.test", 7000) == first
        mock_clock.jump(1)
        second = await resolver.lookup("svc.test", 7000)
        assert sorted(second.records) == [("127.0.0.3", 7000), ("127.0.0.7", 7000)]
        assert second.resolved_at == first.resolved_at + LOCAL_TTL
        # The name removed: the next lookup after the TTL says so.
        dnsmasq.change_hosts("127.0.0.5 other.test\n")
        await dnsmasq.wait_for("other.test", {"127.0.0.5"})
        mock_clock.jump(LOCAL_TTL)
        with pytest.raises(socket.gaierror, match="no such name"):
            await resolver.resolve("svc.test", 7000)


async def test_ttl_overrides_the_records_ttl(
    dnsmasq: Dnsmasq, mock_clock: trio.testing.MockClock
) -> None:
    async with resolver_for(dnsmasq, ttl=2) as resolver:
        answer = await resolver.lookup("svc.test", 1)
        assert (answer.ttl, answer.expires_at - answer.resolved_at) == (2, 2)
        srv = await resolver.lookup_srv("_echo._tcp.test")
        assert srv.ttl == 2


async def test_a_dead_server_serves_the_stale_answer(
    dnsmasq: Dnsmasq, mock_clock: trio.testing.MockClock
) -> None:
    async with resolver_for(dnsmasq, timeout=3) as resolver:
        fresh = await resolver.lookup("svc.test", 1)
        dnsmasq.kill()
        mock_clock.jump(LOCAL_TTL)
        # Only now: while dnsmasq answered, a jump could have cut its answer
        # short (waiting for a real reply is "blocked" to the clock).
        mock_clock.autojump_threshold = 0
        stale = await resolver.lookup("svc.test", 1)
        assert stale.stale
        assert stale.records == fresh.records
        with pytest.raises(socket.gaierror) as caught:
            await resolver.resolve("other.test", 1)
        assert caught.value.errno == socket.EAI_AGAIN


async def test_nothing_outlives_the_resolver(dnsmasq: Dnsmasq) -> None:
    tasks, fds = task_count(), open_fd_count()
    async with resolver_for(dnsmasq) as resolver, trio.open_nursery() as nursery:
        for name in ("svc.test", "v6only.test", "node1.test"):
            nursery.start_soon(resolver.resolve, name, 1)
        nursery.start_soon(resolver.resolve_srv, "_echo._tcp.test")
    assert (task_count(), open_fd_count()) == (tasks, fds)
