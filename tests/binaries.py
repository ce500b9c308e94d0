"""External programs that tests drive (redis-server, curl, dnsmasq, haproxy ...).

A test that needs one is marked ``@pytest.mark.needs_binary("name")``
(``-m "not needs_binary"`` deselects them all); the mark, and fixtures that
start such a program, go through :func:`require_binary`: on a developer
machine without the program the test is skipped, but under ``CI`` a missing
program fails the run, so CI can never skip these proofs silently. The
conftest at the top of ``tests/`` honours the mark everywhere below it.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest


def require_binary(name: str) -> str:
    """Return the path of program ``name``; skip the test if it is missing, unless on CI."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = (
        f"{name} is not installed (Debian: apt-get install redis-server redis-tools curl "
        "bind9-dnsutils dnsmasq-base haproxy)"
    )
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{message}; CI must run this test, not skip it", pytrace=False)
    pytest.skip(message)


def free_udp_and_tcp_port() -> int:
    """A loopback port free for both UDP and TCP a moment ago (a DNS server takes both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no loopback port free for both UDP and TCP")
