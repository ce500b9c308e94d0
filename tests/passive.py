"""Test helper: run one passive round of a connection, as a service's request loop does."""

from __future__ import annotations

from typing import Any

from triocomm import Connection
from triocomm._timeouts import Limits


async def answered(conn: Connection[Any, Any], first: bytes) -> list[bytes]:
    """The requests a passive round starting with ``first`` hands its handler, in order."""
    handed: list[bytes] = []

    async def record(request: bytes, conn: Connection[Any, Any]) -> None:
        handed.append(request)

    await conn._answer(record, first, Limits())
    return handed
