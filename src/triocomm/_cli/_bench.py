"""``triocomm bench``: start the embedded service (without ADDRESS), check with
one probe request that the peer echoes in the chosen codec, run the load with
a live progress line, and print the report.

Signals: the first SIGINT / SIGTERM ends the load and still prints the
report; a second one (or one before the load has started) stops at once.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import ssl
import sys
from collections.abc import Callable
from typing import Any

import trio

from .. import (
    Codec,
    CommError,
    CommTimeout,
    ConnectError,
    ConnectionLost,
    ProtocolError,
    Target,
    Timeouts,
    open_client,
)
from ._arguments import CODECS, DEFAULT_DURATION, DEFAULT_HOST, Address, TcpAddress, UnixAddress
from ._echo_service import start_echo_service
from ._failure import EXIT_FAILED, EXIT_OK, CliFailure, cause, os_cause
from ._formatting import PROG, can_encode, say
from ._load import EchoMismatch, LoadRun, Session, error_kind, make_session, payload_maker, worker
from ._progress import ProgressDisplay, show_progress
from ._report import BenchResult, BenchSettings, render_report, report_json

# How long the first request may wait for its echo before the run is declared
# failed: long enough for a loaded machine, short enough to explain a wrong
# --codec (the reply never comes) while the user is still looking.
PROBE_TIMEOUT = 5.0
# After the run's end, requests in flight get this long to finish; any still
# unanswered then count as errors ("unanswered at the end").
STOP_GRACE = 2.0
# Per-phase limits of the load generator's requests. A request that gets no
# reply fails after `inactivity` seconds and is counted as an error, so a run
# always ends.
BENCH_TIMEOUTS = Timeouts(connect=PROBE_TIMEOUT, inactivity=10.0)


class BenchControl:
    """What a SIGINT / SIGTERM does during ``bench``: the first ends the load
    and still prints the report; a second one (or one before the load has
    started) stops at once."""

    def __init__(self, scope: trio.CancelScope) -> None:
        self.scope = scope
        self.stop_load: Callable[[], None] | None = None
        self.aborted = False

    async def watch(self, signals: Any) -> None:
        """Act on each signal received (run as a task for the whole command)."""
        async for _ in signals:
            if self.stop_load is not None:
                stop, self.stop_load = self.stop_load, None
                stop()
            else:
                self.aborted = True
                self.scope.cancel()


def _codec_hint(codec: str) -> str:
    return f"is it an echo service using the {codec} codec? (check --codec)"


async def probe(session: Session, settings: BenchSettings) -> None:
    """Send one request before the load starts, turning the usual ways a run
    cannot even begin into one clear line each.

    A service speaking another codec either never answers (it waits for the
    rest of a frame), closes the connection (what it read is bad input to
    it), or answers in a form this codec cannot read; each line says which
    and points at ``--codec``.
    """
    where, codec = settings.address, settings.codec
    try:
        await session([payload_maker(settings.size)(0, 0)], lambda sent_at: None)
    except ConnectError as exc:
        raise CliFailure(f"cannot connect to {where}: {cause(exc)}") from None
    except CommTimeout as exc:
        raise CliFailure(
            f"no echo from {where} within {exc.limit:g} s ({exc.phase} timeout): "
            + _codec_hint(codec)
        ) from None
    except EchoMismatch as exc:
        raise CliFailure(
            f"{where} did not echo the request ({exc}): " + _codec_hint(codec)
        ) from None
    except ProtocolError as exc:
        raise CliFailure(
            f"{where} replied with bytes the {codec} codec cannot read ({exc}): "
            + _codec_hint(codec)
        ) from None
    except (ConnectionLost, trio.BrokenResourceError, trio.EndOfChannel) as exc:
        # EndOfChannel: a clean close; the others: a close or a reset, maybe
        # while the request was still being written.
        how = _close_cause(exc)
        raise CliFailure(
            f"{where} closed the connection{how} without echoing the first request: "
            + _codec_hint(codec)
        ) from None
    except (CommError, OSError) as exc:
        raise CliFailure(
            f"the first request to {where} failed: {error_kind(exc)}: {exc or 'no reason given'}"
        ) from None


def _close_cause(exc: BaseException) -> str:
    """`` (Connection reset by peer)`` when an OS error says how the peer closed, else ``""``."""
    reason = os_cause(exc)
    return f" ({reason})" if reason else ""


def _target(
    address: Address, codec: Codec[bytes, bytes], conns: int, tls_ca: str | None
) -> Target[bytes, bytes]:
    if isinstance(address, UnixAddress):
        return Target.unix(address.path, codec, max_connections=conns)
    ssl_context = None
    if tls_ca:
        try:
            ssl_context = ssl.create_default_context(cafile=tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise CliFailure(f"cannot load the CA certificate {tls_ca!r}: {exc}") from None
    return Target(address.host, address.port, codec, ssl_context=ssl_context, max_connections=conns)


async def measure(
    address: Address,
    codec: Codec[bytes, bytes],
    settings: BenchSettings,
    tls_ca: str | None,
    control: BenchControl,
    display: ProgressDisplay,
) -> BenchResult:
    """Probe ``address``, then run the load; return what was measured."""
    framed = CODECS[settings.codec].framed
    target = _target(address, codec, settings.conns, tls_ca)
    async with open_client(timeouts=BENCH_TIMEOUTS) as client:
        probe_timeouts = BENCH_TIMEOUTS.replace(first_response=PROBE_TIMEOUT)
        await probe(
            make_session(client, target, framed=framed, depth=1, timeouts=probe_timeouts),
            settings,
        )
        session = make_session(client, target, framed=framed, depth=settings.pipeline)
        run = LoadRun(settings.requests)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(show_progress, run, display)
            await _run_workers(run, session, settings, control)
            nursery.cancel_scope.cancel()
        display.close()
    return BenchResult(
        settings,
        run.done,
        run.elapsed,
        run.latency,
        run.errors,
        run.interrupted,
        run.connect_errors,
        run.measured,
    )


async def _run_workers(
    run: LoadRun, session: Session, settings: BenchSettings, control: BenchControl
) -> None:
    """Run one worker per connection until the budget, the time or a signal ends the run."""
    with trio.CancelScope() as workers_scope:

        def stop(*, interrupted: bool = False) -> None:
            run.stop(interrupted=interrupted)
            # Requests in flight get a short grace, then are abandoned.
            workers_scope.deadline = min(workers_scope.deadline, trio.current_time() + STOP_GRACE)

        control.stop_load = lambda: stop(interrupted=True)
        async with trio.open_nursery() as workers:
            if settings.duration is not None:
                workers.start_soon(_stop_after, settings.duration, run, stop)
            for index in range(settings.conns):
                workers.start_soon(worker, index, run, session, settings.pipeline, settings.size)
    run.finish()
    control.stop_load = None


async def _stop_after(duration: float, run: LoadRun, stop: Callable[[], None]) -> None:
    # Also wakes when the run is stopped early (interrupted), so the timer
    # does not keep the workers' nursery open.
    with trio.move_on_at(run.started_at + duration):
        await run.stopped.wait()
    stop()


async def bench_command(args: argparse.Namespace) -> int:
    """Run ``triocomm bench`` with parsed ``args``; return the exit status."""
    choice = CODECS[args.codec]
    codec = choice.make()
    duration = None if args.requests is not None else (args.duration or DEFAULT_DURATION)
    unicode = can_encode(sys.stdout, "µ█▏") and can_encode(sys.stderr, "█░")
    display = ProgressDisplay(
        sys.stderr,
        live=sys.stderr.isatty(),
        duration=duration,
        requests=args.requests,
        unicode=unicode,
    )
    result: BenchResult | None = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            control = BenchControl(nursery.cancel_scope)
            nursery.start_soon(control.watch, signals)
            address: Address = args.address
            if args.address is None:
                address = await _start_embedded(nursery, codec, choice.name)
            settings = BenchSettings(
                address=str(address),
                embedded=args.address is None,
                codec=choice.name,
                conns=args.conns,
                size=args.size,
                pipeline=args.pipeline,
                duration=duration,
                requests=args.requests,
                tls=bool(args.tls_ca),
            )
            result = await measure(address, codec, settings, args.tls_ca, control, display)
            # Stops the embedded service (if any) and the signal watcher.
            nursery.cancel_scope.cancel()
    if result is None:
        raise CliFailure("interrupted before the load started")
    if args.json:
        say(json.dumps(report_json(result)))
    else:
        width = shutil.get_terminal_size((80, 24)).columns
        say(render_report(result, width=min(width, 100), unicode=unicode))
    return EXIT_OK if result.ok else EXIT_FAILED


async def _start_embedded(nursery: trio.Nursery, codec: Codec[bytes, bytes], name: str) -> Address:
    server = await start_echo_service(nursery, codec=codec, port=0, host=DEFAULT_HOST)
    address = TcpAddress(DEFAULT_HOST, server.port)
    say(f"{PROG} bench: embedded echo service ({name}) on {address}", sys.stderr)
    return address
