"""A small network lab for fault tests: one network namespace, joined to ours by a veth pair.

The test process stays in the root namespace (the client's side); a
:class:`NetLab` makes a namespace holding the far end of a veth pair, where
servers listen (:meth:`NetLab.listen`, which creates the socket from a thread
that entered the namespace, so no second process is needed). Faults are made
the way real networks make them:

* :meth:`NetLab.drop_flow`: ``iptables -j DROP`` of one TCP connection, both
  ways, as a NAT or a stateful firewall that forgot the flow does: no FIN, no
  RST, the packets simply vanish. New connections still work.
* :meth:`NetLab.black_hole`: every packet to and from the namespace dropped.
* :meth:`NetLab.netem`: ``tc qdisc ... netem`` on our end of the veth pair:
  delay, loss, or ``loss 100%``.
* :meth:`NetLab.heal`: undo all of it.

Names are unique per process (pid) and per lab, so parallel runs do not
collide; :func:`lab_problem` says why a lab cannot be built here (not root,
no ``ip``/``iptables``, namespaces not permitted), for a clear skip.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_labs = itertools.count()
_CLONE_NEWNET = 0x40000000
# Commands get this long; a stuck `ip` must not hang the suite.
_COMMAND_LIMIT = 10.0


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=_COMMAND_LIMIT)


def lab_problem() -> str | None:
    """Why no lab can be built on this machine, or None if one can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "iptables") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (Debian: iproute2, iptables)"
    name = f"tcprobe{os.getpid()}"
    made = _run("ip", "netns", "add", name, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    try:
        rules = _run("ip", "netns", "exec", name, "iptables", "-L", "-n", check=False)
        if rules.returncode != 0:
            return f"iptables does not work in a namespace here: {rules.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", name, check=False)
    return None


class NetLab:
    """One namespace and a veth pair to it; :meth:`close` removes both.

    Attributes:
        namespace: the namespace's name.
        near: our end's address (the client side).
        far: the namespace's address, where servers listen.
    """

    def __init__(self) -> None:
        pid = os.getpid()
        number = next(_labs)
        tag = f"{pid % 100000}x{number}"  # interface names: 15 bytes at most
        self.namespace = f"tcl{tag}"
        self._near_if = f"tcn{tag}"
        self._far_if = f"tcf{tag}"
        # A /30 of 10.128.0.0/9 from the pid and the lab's number.
        slot = (pid * 64 + number) % (1 << 21)
        base = (10 << 24) | (1 << 23) | (slot << 2)
        self.near = socket.inet_ntoa((base + 1).to_bytes(4, "big"))
        self.far = socket.inet_ntoa((base + 2).to_bytes(4, "big"))
        self._netem = False
        self._up = False

    def open(self) -> NetLab:
        """Create the namespace and the link (undone by :meth:`close` if it fails)."""
        ns = self.namespace
        try:
            _run("ip", "netns", "add", ns)
            self._up = True
            _run("ip", "link", "add", self._near_if, "type", "veth", "peer", "name", self._far_if)
            _run("ip", "link", "set", self._far_if, "netns", ns)
            _run("ip", "addr", "add", f"{self.near}/30", "dev", self._near_if)
            _run("ip", "link", "set", self._near_if, "up")
            self._in_ns("ip", "addr", "add", f"{self.far}/30", "dev", self._far_if)
            self._in_ns("ip", "link", "set", self._far_if, "up")
            self._in_ns("ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Remove the namespace and the veth pair; safe to call twice."""
        if not self._up:
            return
        self._up = False
        # Deleting the namespace deletes its end of the pair, and with it ours.
        _run("ip", "netns", "del", self.namespace, check=False)
        _run("ip", "link", "del", self._near_if, check=False)

    def _in_ns(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", self.namespace, *argv)

    # -- servers -------------------------------------------------------------

    def listen(self, port: int = 0, backlog: int = 128) -> socket.socket:
        """A TCP socket listening on ``far:port`` inside the namespace."""

        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.far, port))
                sock.listen(backlog)
            except BaseException:
                sock.close()
                raise
            return sock

        return self._inside(make)

    def _inside(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a thread that entered the namespace (setns is per thread)."""
        libc = ctypes.CDLL(None, use_errno=True)
        results: list[T] = []
        errors: list[BaseException] = []

        def thread() -> None:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            theirs = os.open(f"/run/netns/{self.namespace}", os.O_RDONLY)
            try:
                if libc.setns(theirs, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns into the lab's namespace failed")
                try:
                    results.append(fn())
                finally:
                    if libc.setns(own, _CLONE_NEWNET) != 0:  # pragma: no cover
                        raise OSError(ctypes.get_errno(), "setns back failed")
            except BaseException as exc:
                errors.append(exc)
            finally:
                os.close(own)
                os.close(theirs)

        worker = threading.Thread(target=thread, name=f"netlab {self.namespace}")
        worker.start()
        worker.join(_COMMAND_LIMIT)
        if errors:
            raise errors[0]
        return results[0]

    # -- faults ---------------------------------------------------------------

    def drop_flow(self, client_port: int) -> None:
        """Silently drop, both ways, the packets of the connection from ``client_port``."""
        self._in_ns(
            "iptables", "-I", "INPUT", "-p", "tcp", "--sport", str(client_port), "-j", "DROP"
        )
        self._in_ns(
            "iptables", "-I", "OUTPUT", "-p", "tcp", "--dport", str(client_port), "-j", "DROP"
        )

    def black_hole(self) -> None:
        """Silently drop every packet into and out of the namespace's link."""
        self._in_ns("iptables", "-I", "INPUT", "-i", self._far_if, "-j", "DROP")
        self._in_ns("iptables", "-I", "OUTPUT", "-o", self._far_if, "-j", "DROP")

    def netem(self, *spec: str) -> None:
        """``tc qdisc replace dev <our end> root netem <spec>``, e.g. ``("delay", "100ms")``.

        Raises:
            RuntimeError: the kernel has no netem (``sch_netem``).
        """
        done = _run(
            "tc", "qdisc", "replace", "dev", self._near_if, "root", "netem", *spec, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"tc netem is not available here: {done.stderr.strip()}")
        self._netem = True

    def heal(self) -> None:
        """Remove every fault: the firewall rules and the netem qdisc."""
        self._in_ns("iptables", "-F", "INPUT")
        self._in_ns("iptables", "-F", "OUTPUT")
        if self._netem:
            _run("tc", "qdisc", "del", "dev", self._near_if, "root", check=False)
            self._netem = False


def netem_problem() -> str | None:
    """Why ``tc ... netem`` cannot be used here, or None if it can."""
    if shutil.which("tc") is None:
        return "tc not installed (Debian: iproute2)"
    if lab_problem() is not None:
        return lab_problem()
    lab = NetLab().open()
    try:
        lab.netem("delay", "1ms")
    except RuntimeError as exc:
        return str(exc)
    finally:
        lab.close()
    return None
