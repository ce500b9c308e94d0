"""A small program that uses triocomm the way an application would.

`nox -s typing_compat` type-checks it with trio-typing installed and its mypy
plugin enabled (see mypy.ini), to show that projects which still carry
trio-typing can use triocomm's public API. It is a real program too: run it
with `python user_program.py` and it prints the replies it gets.
"""

from __future__ import annotations

import functools

import trio

import triocomm


async def shout(request: bytes, conn: triocomm.Connection[bytes, bytes]) -> bytes | None:
    """A passive session: answer each request with its upper-case version."""
    if request == b"quiet":
        return None  # no reply for this one
    conn.context["requests"] = int(conn.context.get("requests", 0)) + 1
    return request.upper()


async def greet(conn: triocomm.Connection[bytes, bytes], name: bytes) -> bytes:
    """A longer session on a borrowed connection."""
    await conn.send(b"hello " + name)
    return await conn.receive()


async def main() -> None:
    codec = triocomm.LengthPrefixed(header="!H", max_frame=1024)
    async with trio.open_nursery() as nursery:
        server: triocomm.Server = await nursery.start(
            functools.partial(triocomm.serve, shout, 0, host="127.0.0.1", codec=codec)
        )
        target = triocomm.Target("127.0.0.1", server.port, codec)
        timeouts = triocomm.Timeouts(connect=2.0, first_response=5.0)
        async with triocomm.open_client(timeouts=timeouts, retries=1) as client:
            reply: bytes = await client.request(target, b"ping")
            print(reply)
            print(await client.run(target, greet, b"trio"))
            async with client.connection(target) as conn:
                await conn.send(b"direct")
                print(await conn.receive(), conn.seq, conn.state)
            stats = client.stats(target)
            print(stats.created, stats.reused)
        await server.shutdown(grace=1.0)


if __name__ == "__main__":
    trio.run(main)
