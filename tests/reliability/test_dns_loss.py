"""The DNS resolver example against dnsmasq while 5 % of datagrams are lost.

A network namespace of its own (named after this process) holds the
loopback interface, a private dnsmasq and the resolver. Datagrams are dropped
at random on the way in, 5 % of them, by ``tc netem`` where the kernel has it,
else by an iptables ``statistic`` rule (the same loss, for datagrams): a query
or its answer is lost about once in ten exchanges. Every lookup must still
succeed, by sending the query again, and the truncated answer must still be
fetched over TCP. The namespace is removed whatever happens; without root,
``ip``, dnsmasq or either way of dropping, the test is skipped (on CI, a
missing dnsmasq fails it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUERIES = 300
# With about 10 % of exchanges lost, 10 attempts leave one lookup in 10^10 to fail.
ATTEMPTS = 10

RESOLVE = """
import json, sys, trio, triocomm
from dns_client import Resolver

async def main(port):
    found = {"ok": 0, "retried": 0, "tcp": 0}
    async with triocomm.open_client() as client:
        for _ in range(200):  # dnsmasq is starting: wait for its TCP port
            try:
                await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                break
            except OSError:
                await trio.sleep(0.05)
        resolver = Resolver(client, "127.0.0.1", port, attempts=%(attempts)d, timeout=0.25)

        async def one(name, kind):
            answer = await resolver.lookup(name, kind)
            assert answer.status == "NOERROR" and answer.records, answer
            found["ok"] += 1
            found["retried"] += answer.attempts > 1
            found["tcp"] += answer.transport == "tcp"

        names = [("host.test", "A"), ("host.test", "AAAA"), ("big.test", "TXT")]
        limit = trio.CapacityLimiter(30)

        async def bounded(name, kind):
            async with limit:
                await one(name, kind)

        async with trio.open_nursery() as nursery:
            for i in range(%(queries)d):
                nursery.start_soon(bounded, *names[i %% len(names)])
    print(json.dumps(found))

trio.run(main, int(sys.argv[1]))
"""


def _dnsmasq_command(binary: str, port: int, directory: Path) -> list[str]:
    """dnsmasq from its command line only (as in tests/examples/test_dns_client.py)."""
    return [
        binary,
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        f"--port={port}",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        "--local=/test/",
        f"--pid-file={directory / 'dnsmasq.pid'}",
        f"--log-facility={directory / 'dnsmasq.log'}",
        "--host-record=host.test,192.0.2.10,2001:db8::10",
        "--txt-record=big.test," + ",".join(str(i) * 100 for i in range(8)),
    ]


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def _dnsmasq() -> str:
    path = shutil.which("dnsmasq")
    if path is not None:
        return path
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail("dnsmasq is not installed; CI must run this test, not skip it")
    pytest.skip("dnsmasq is not installed (Debian: apt-get install dnsmasq-base)")


@pytest.fixture
def lossy_namespace() -> Iterator[str]:
    """A network namespace whose loopback drops 5 % of incoming datagrams."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and the ip command")
    name = f"tc-dns-{os.getpid()}"
    if _run("ip", "netns", "add", name).returncode != 0:
        pytest.skip("creating a network namespace is not permitted here")
    try:
        _run("ip", "-n", name, "link", "set", "lo", "up")
        netem = _run("tc", "-n", name, "qdisc", "add", "dev", "lo", "root", "netem", "loss", "5%")
        if netem.returncode != 0:
            rule = ["-A", "INPUT", "-p", "udp", "-m", "statistic", "--mode", "random"]
            dropping = _run(
                "ip",
                "netns",
                "exec",
                name,
                "iptables",
                *rule,
                "--probability",
                "0.05",
                "-j",
                "DROP",
            )
            if dropping.returncode != 0:
                pytest.skip(f"neither netem nor iptables can drop datagrams: {netem.stderr}")
        yield name
    finally:
        _run("ip", "netns", "del", name)


def test_every_lookup_succeeds_with_5_percent_loss(lossy_namespace: str, tmp_path: Path) -> None:
    port = 5353
    enter = ["ip", "netns", "exec", lossy_namespace]
    dnsmasq = subprocess.Popen(
        [*enter, *_dnsmasq_command(_dnsmasq(), port, tmp_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        script = tmp_path / "resolve.py"
        script.write_text(RESOLVE % {"attempts": ATTEMPTS, "queries": QUERIES})
        env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO / 'examples'}"}
        result = subprocess.run(
            [*enter, sys.executable, str(script), str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=False,
        )
    finally:
        dnsmasq.terminate()
        dnsmasq.wait(timeout=10)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["ok"] == QUERIES
    assert found["tcp"] == QUERIES // 3  # every big.test answer, fetched over TCP
    assert found["retried"] > 0  # the loss was real, and the resolver resent
