"""What a raw-socket peer saw on the wire, checked against what a service tried to send.

The stream-integrity tests play the peer with a plain socket, not triocomm:
it keeps every byte it received and how the stream ended. :func:`problems`
parses those bytes with ``LengthPrefixed``'s framing (a 4-byte big-endian
length, then the payload) and compares them with a :class:`SendLog`, the
record of every message the service's tasks tried to send and how each
attempt ended. The promise checked is triocomm's first one: whole messages,
then at most one cut one, then nothing or a close; a send that returned was
delivered unless the connection later failed; a send that raised left the
connection closed.

Payloads are unique (a label, a number, then filler derived from both), so a
frame that swallowed the start of another message never matches a message
that was sent.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

import triocomm

HEADER = struct.Struct("!I")
#: The codec the services under test speak (frames up to 16 MiB).
CODEC = triocomm.LengthPrefixed(max_frame=16 * 1024 * 1024)
#: What a connection's state may be after a send on it raised.
CLOSED_STATES = (triocomm.ConnState.ERROR, triocomm.ConnState.CLOSED)


def frame(payload: bytes) -> bytes:
    """``payload`` as ``CODEC`` puts it on the wire."""
    return HEADER.pack(len(payload)) + payload


def parse(data: bytes) -> tuple[list[bytes], bytes]:
    """Split ``data`` into whole frames' payloads and the unfinished rest."""
    payloads = []
    at = 0
    while len(data) - at >= HEADER.size:
        (size,) = HEADER.unpack_from(data, at)
        end = at + HEADER.size + size
        if end > len(data):
            break
        payloads.append(data[at + HEADER.size : end])
        at = end
    return payloads, data[at:]


@dataclass
class Wire:
    """Everything a peer received, and how the stream ended (``"eof"`` or ``"reset"``)."""

    data: bytes
    end: str


async def drain(sock: trio.socket.SocketType) -> Wire:
    """Read ``sock`` until the end of the stream (the caller bounds the time)."""
    data = bytearray()
    while True:
        try:
            chunk = await sock.recv(256 * 1024)
        except (ConnectionResetError, BrokenPipeError):
            return Wire(bytes(data), "reset")
        if not chunk:
            return Wire(bytes(data), "eof")
        data += chunk


def raw_peer(port: int, *, rcvbuf: int = 8192, host: str = "127.0.0.1") -> socket.socket:
    """A connected, non-blocking plain socket with a small receive buffer.

    The small buffer is set before connecting, so the TCP window stays small
    and a peer that does not read makes a large write wait part-way. The
    connect blocks, but on loopback the kernel completes it from the
    listener's backlog at once. Its synchronous ``send`` lets a test put a
    request on the wire and move the clock within one scheduler step; wrap it
    with :func:`trio.socket.from_stdlib_socket` to read it.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


@dataclass
class Attempt:
    """One call of ``send`` / ``send_many`` / ``send_file`` / a reply, and its end."""

    payloads: list[bytes]
    how: str
    outcome: str = "running"  # "returned", "raised", or still "running"
    error: BaseException | None = None
    state_after: triocomm.ConnState | None = None


@dataclass
class SendLog:
    """Every message the service tried to send, and how each attempt ended.

    The sending helpers here (:meth:`send`, :meth:`send_many`,
    :meth:`send_file`) record the attempt, make it, and record the outcome
    and the connection's state right after a raise; exceptions propagate.
    """

    attempts: list[Attempt] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)

    def payload(self, label: str, size: int) -> bytes:
        """A new unique payload of ``size`` bytes (at least its label and number)."""
        number = self.counters.get(label, 0)
        self.counters[label] = number + 1
        head = b"<%s:%d>" % (label.encode(), number)
        return (head * (size // len(head) + 1))[: max(size, len(head))]

    def expect(self, payloads: Sequence[bytes], how: str = "reply") -> Attempt:
        """Record messages sent by code the test does not call itself (a service's replies)."""
        attempt = Attempt(list(payloads), how)
        self.attempts.append(attempt)
        return attempt

    async def _attempt(self, conn: Any, attempt: Attempt, call: Any) -> Any:
        try:
            result = await call
        except BaseException as exc:
            attempt.outcome, attempt.error, attempt.state_after = "raised", exc, conn.state
            raise
        attempt.outcome = "returned"
        return result

    async def send(self, conn: Any, payload: bytes) -> None:
        """``conn.send(payload)``, recorded."""
        await self._attempt(conn, self.expect([payload], "send"), conn.send(payload))

    async def send_many(self, conn: Any, payloads: list[bytes]) -> None:
        """``conn.send_many(payloads)``, recorded."""
        await self._attempt(conn, self.expect(payloads, "send_many"), conn.send_many(payloads))

    async def send_file(self, conn: Any, file: Any, offset: int, payloads: list[bytes]) -> None:
        """``conn.send_file`` of the frames of ``payloads``, found at ``offset`` in ``file``."""
        count = sum(HEADER.size + len(p) for p in payloads)
        attempt = self.expect(payloads, "send_file")
        sent = await self._attempt(conn, attempt, conn.send_file(file, offset, count))
        assert sent == count, f"send_file returned {sent}, expected {count}"


def _sender(payload: bytes) -> tuple[bytes, int]:
    label, number = payload[1 : payload.index(b">")].rsplit(b":", 1)
    return label, int(number)


def problems(wire: Wire, log: SendLog, *, failed: bool) -> list[str]:
    """What is wrong with ``wire`` given ``log`` (empty when nothing is).

    ``failed``: the connection ended in ``ERROR``, which excuses a returned
    send whose bytes the kernel dropped when the connection was reset.
    """
    found: list[str] = []
    known = {p: a for a in log.attempts for p in a.payloads}
    payloads, tail = parse(wire.data)
    seen: set[bytes] = set()
    last: dict[bytes, int] = {}
    for i, payload in enumerate(payloads):
        where = f"frame {i} ({len(payload)} bytes, starting {payload[:24]!r})"
        if payload not in known:
            found.append(f"{where} is no message that was sent: a desynchronised stream")
            break
        if payload in seen:
            found.append(f"{where} arrived twice")
        seen.add(payload)
        label, number = _sender(payload)
        if number <= last.get(label, -1):
            found.append(f"{where} arrived after a later message of {label!r}")
        last[label] = number
    if tail and not any(frame(p).startswith(tail) for p in known if p not in seen):
        found.append(
            f"the {len(tail)} bytes after the last whole frame (starting {tail[:24]!r}) "
            "are no prefix of a message that was sent: bytes written after a cut message"
        )
    found += _outcome_problems(log, seen, failed=failed)
    return found


def _outcome_problems(log: SendLog, delivered: set[bytes], *, failed: bool) -> list[str]:
    found = []
    for attempt in log.attempts:
        if attempt.outcome == "raised" and attempt.state_after not in CLOSED_STATES:
            # A send cancelled before it wrote anything leaves the stream as
            # it was, so it may leave the connection open: then none of its
            # messages may be on the wire (a part of one would also break
            # the framing that parse() checks).
            if isinstance(attempt.error, trio.Cancelled) and not any(
                p in delivered for p in attempt.payloads
            ):
                continue
            found.append(
                f"a {attempt.how} raised {attempt.error!r} and left the connection "
                f"{attempt.state_after}: open after a failed send"
            )
        if attempt.outcome == "returned" and not failed:
            lost = [p for p in attempt.payloads if p not in delivered]
            if lost:
                found.append(
                    f"a {attempt.how} returned but {len(lost)} of its messages never arrived "
                    f"(first {lost[0][:24]!r}), on a connection that did not fail"
                )
    return found


def describe(wire: Wire, log: SendLog) -> str:
    """A short account of an episode, for failure messages."""
    payloads, tail = parse(wire.data)
    heads = [p[: p.index(b">") + 1].decode() if b">" in p[:40] else "?" for p in payloads]
    outcomes = [f"{a.how}:{a.outcome}" for a in log.attempts]
    return (
        f"{len(wire.data)} bytes then {wire.end}: frames {heads}, {len(tail)} bytes after them; "
        f"attempts {outcomes}"
    )


def all_payloads(attempts: Iterable[Attempt]) -> list[bytes]:
    """Every payload of ``attempts``, in order."""
    return [p for a in attempts for p in a.payloads]
