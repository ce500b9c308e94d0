"""The tutorial's echo service as a file: a server that runs until it is stopped.

``docs/tutorial.md`` (step 3) shows this program; run it as::

    python examples/echo_server.py          # port 7000
    python examples/echo_server.py 0        # any free port; the line says which

It prints one line saying where it listens, then serves until SIGINT (Ctrl-C)
or SIGTERM, and then shuts down gracefully: it stops accepting, lets requests
in flight finish (for up to 5 seconds) and exits with status 0.
"""

import functools
import signal
import sys

import trio

import triocomm


async def echo(request: bytes, conn: triocomm.Connection[bytes, bytes]) -> bytes:
    return request


async def main(port: int) -> None:
    codec = triocomm.LengthPrefixed()
    # Ctrl-C (SIGINT) and SIGTERM arrive here as messages, not as exceptions.
    # The receiver opens before the port is printed, so no signal is missed.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                functools.partial(triocomm.serve, echo, port, host="127.0.0.1", codec=codec)
            )
            print(f"echo_server: listening on 127.0.0.1:{server.port}", flush=True)
            async for signum in signals:
                name = signal.Signals(signum).name
                print(f"echo_server: {name} received, shutting down", flush=True)
                break
            # Stop accepting, let requests in flight finish (5 s at most).
            # The serve task then returns, and so does the nursery.
            await server.shutdown(grace=5.0)


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 7000  # 0: any free port
    trio.run(main, port)
