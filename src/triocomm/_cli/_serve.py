"""``triocomm serve``: run the echo service until SIGINT or SIGTERM, then shut
it down gracefully; ``-v`` shows triocomm's log on stderr."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from typing import IO, Any

import trio

from .. import Observer
from ._arguments import CODECS
from ._echo_service import server_ssl_context, start_echo_service
from ._failure import EXIT_OK, CliFailure
from ._formatting import PROG, format_address, say

# Names the handler -v adds, so a second configuration (main called twice in
# one process) replaces it instead of printing every line twice.
_HANDLER_NAME = "triocomm-cli"


def configure_logging(verbosity: int, stream: IO[str] | None = None) -> logging.Handler | None:
    """Show triocomm's log on ``stream`` (stderr): ``-v`` from INFO, ``-vv`` from DEBUG.

    ``-v`` shows each connection's open and close (INFO lines of
    ``triocomm.connection``) and triocomm's notices; ``-vv`` adds every
    DEBUG line. Without ``-v`` nothing is configured: warnings and errors
    (a peer that sent bad input) still show, through Python's last-resort
    handler. Returns the handler added, if any.
    """
    if not verbosity:
        return None
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s",
            datefmt="%Y-%m-%d %H:%M:%S",
        )
    )
    logger = logging.getLogger("triocomm")
    for old in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbosity == 1 else logging.DEBUG)
    return handler


async def serve_command(args: argparse.Namespace) -> int:
    """Run ``triocomm serve`` with parsed ``args``; return the exit status."""
    configure_logging(args.verbose)
    choice = CODECS[args.codec]
    ssl_context = server_ssl_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    host = None if args.host == "*" else args.host
    # The receiver is open before the service announces itself, so a signal
    # sent as soon as the "listening" line is read is never missed.
    with (
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
        _metrics(args.metrics_port, host) as observers,
    ):
        async with trio.open_nursery() as nursery:
            if args.unix is not None:
                server = await start_echo_service(
                    nursery,
                    codec=choice.make(),
                    path=args.unix,
                    ssl_context=ssl_context,
                    observers=observers,
                )
            else:
                server = await start_echo_service(
                    nursery,
                    codec=choice.make(),
                    port=args.port,
                    host=host,
                    ssl_context=ssl_context,
                    observers=observers,
                )
            where = ", ".join(format_address(address) for address in server.addresses)
            tls = ", TLS" if ssl_context else ""
            say(f"{PROG}: echo service ({choice.name}{tls}) listening on {where}")
            async for signum in signals:
                say(
                    f"{PROG}: {signal.Signals(signum).name} received, shutting down "
                    f"(requests in flight get up to {args.grace:g} s; signal again to stop now)"
                )
                break
            with trio.CancelScope() as shutdown:
                nursery.start_soon(_cancel_on_signal, signals, shutdown)
                await server.shutdown(grace=args.grace)
            nursery.cancel_scope.cancel()
    stats = server.stats
    say(
        f"{PROG}: echo service stopped "
        f"({stats.connections_total} connections, {stats.sessions} requests served)"
    )
    return EXIT_OK


@contextlib.contextmanager
def _metrics(port: int | None, host: str | None) -> Iterator[list[Observer]]:
    """With ``--metrics-port``: a Prometheus observer and its HTTP endpoint, for the block."""
    if port is None:
        yield []
        return
    try:
        from prometheus_client import CollectorRegistry, start_http_server

        from ..contrib.prometheus import PrometheusObserver
    except ImportError:
        raise CliFailure(
            "--metrics-port needs prometheus_client: pip install 'triocomm[prometheus]'"
        ) from None
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry)
    address = host or "0.0.0.0"
    try:
        httpd, thread = start_http_server(port, addr=address, registry=registry)
    except OSError as exc:
        raise CliFailure(f"cannot serve metrics on {address}:{port}: {exc.strerror}") from None
    shown = f"[{address}]" if ":" in address else address
    say(f"{PROG}: metrics on http://{shown}:{httpd.server_port}/metrics")
    try:
        yield [observer]
    finally:
        _stop_http(httpd, thread)


def _stop_http(httpd: Any, thread: threading.Thread) -> None:
    httpd.shutdown()
    httpd.server_close()
    thread.join()


async def _cancel_on_signal(signals: Any, scope: trio.CancelScope) -> None:
    async for _ in signals:
        scope.cancel()
        return
