"""The smallest triocomm program: an echo server and a client that talks to it.

This is the quick start of the README, as a file you can run::

    python examples/echo.py

The server (``triocomm.serve``) answers each request with the request
itself; the client (``triocomm.open_client``) sends ``b"hello"`` and prints
the reply. Both speak ``LengthPrefixed``: every message is a 4-byte
big-endian length followed by that many bytes. ``docs/tutorial.md`` builds
this program up step by step, then splits it into a separate server and
client.
"""

import functools

import trio

import triocomm


async def echo(request: bytes, conn: triocomm.Connection[bytes, bytes]) -> bytes:
    return request  # one reply per request; None would send no reply


async def main() -> None:
    codec = triocomm.LengthPrefixed()  # 4-byte big-endian length, then the payload
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(triocomm.serve, echo, 0, host="127.0.0.1", codec=codec)
        )
        target = triocomm.Target("127.0.0.1", server.port, codec)
        async with triocomm.open_client() as client:
            reply = await client.request(target, b"hello")
            print(reply)  # b'hello'
        await server.shutdown(grace=1.0)


if __name__ == "__main__":
    trio.run(main)
