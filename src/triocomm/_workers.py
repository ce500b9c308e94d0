"""Multi-core serving: N worker processes sharing one port through SO_REUSEPORT.

One Python process runs one Trio loop on one core. To use more cores, the
same service runs in several processes, each with its own listening socket
bound to the same port with ``SO_REUSEPORT`` (Linux): the kernel spreads new
connections across them, and no process hands sockets to another.

The parent is an ordinary Trio task (:func:`serve_workers`): it reserves the
port, starts the workers with :mod:`multiprocessing`'s *spawn* method (a
fresh interpreter, never a fork of a running Trio loop), watches them, and
stops them gracefully (SIGTERM → ``Server.shutdown(grace)``) when it is
cancelled. A worker that dies is reported on the ``triocomm.workers`` logger
and, unless ``restart=False``, started again after a back-off.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from ._admission import IPAddress, Network
from ._connection import Idle
from ._framing import Codec
from ._observe import Observer
from ._server import (
    CloseHook,
    ConnectHook,
    ConnectionBody,
    IdleCallback,
    RequestLoop,
    Server,
    ServiceOptions,
    run_service,
)
from ._timeouts import ServerTimeouts

__all__ = ["WorkerGroup", "serve_workers"]

logger = logging.getLogger("triocomm.workers")

_READY_TIMEOUT = 60.0
_MAX_BACKOFF = 30.0


@dataclass(frozen=True)
class _WorkerConfig:
    """Everything a worker needs; pickled into the spawned interpreter."""

    handler: Callable[..., Any]
    connections: bool
    host: str | None
    port: int
    # The service's options without TLS (an SSLContext does not pickle):
    # each worker makes its own context with the factory.
    options: ServiceOptions
    ssl_context_factory: Callable[[], Any] | None
    grace: float


def _reuseport_listeners(host: str | None, port: int) -> list[trio.SocketListener]:
    """Listening sockets on ``host``/``port`` with SO_REUSEPORT (every interface if None)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    listeners: list[trio.SocketListener] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, type_, proto, _, sockaddr in infos:
            if (family, sockaddr) in seen:
                continue
            seen.add((family, sockaddr))
            # The address is numeric (an AI_PASSIVE result), so a plain
            # blocking bind cannot stall on a name lookup.
            sock = socket.socket(family, type_, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
                sock.listen(socket.SOMAXCONN)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners


def _worker_main(config: _WorkerConfig, ready: multiprocessing.connection.Connection) -> None:
    """Entry point of a spawned worker process."""
    # Until Trio's signal receiver is in place, a Ctrl-C meant for the parent
    # must not kill the worker with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    trio.run(_worker, config, ready)


async def _worker(config: _WorkerConfig, ready: multiprocessing.connection.Connection) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            listeners = _reuseport_listeners(config.host, config.port)
            body = (
                ConnectionBody(config.handler)
                if config.connections
                else RequestLoop(config.handler)
            )
            options = config.options
            if config.ssl_context_factory is not None:
                options = dataclasses.replace(options, ssl_context=config.ssl_context_factory())
            server: Server = await nursery.start(
                functools.partial(run_service, body, options, listeners=listeners)
            )
            ready.send(server.port)
            ready.close()
            async for signum in signals:
                logger.info(
                    "worker %d: %s, shutting down", os.getpid(), signal.Signals(signum).name
                )
                await server.shutdown(config.grace)
                break


class WorkerGroup:
    """The running workers of :func:`serve_workers` (what ``nursery.start`` returns).

    Attributes:
        port: the shared port.
        workers: how many worker processes are meant to run.
    """

    def __init__(self, port: int, workers: int) -> None:
        self.port = port
        self.workers = workers
        self._processes: dict[int, multiprocessing.process.BaseProcess] = {}
        self._restarts = 0
        self._deaths = 0
        self._stopping = False
        self._cancel_scope = trio.CancelScope()
        self._stopped = trio.Event()

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers running now."""
        return [p.pid for p in self._processes.values() if p.pid is not None and p.is_alive()]

    @property
    def restarts(self) -> int:
        """Workers started again after one died."""
        return self._restarts

    @property
    def deaths(self) -> int:
        """Workers that exited without being asked to."""
        return self._deaths

    async def shutdown(self) -> None:
        """Stop every worker gracefully and return when all have exited."""
        self._stopping = True
        self._cancel_scope.cancel()
        await self._stopped.wait()

    def __repr__(self) -> str:
        return f"<WorkerGroup port={self.port} workers={len(self.pids)}/{self.workers}>"


async def serve_workers(
    handler: Callable[..., Any],
    port: int = 0,
    *,
    workers: int | None = None,
    host: str | None = None,
    codec: Codec[Any, Any],
    connections: bool = False,
    ssl_context_factory: Callable[[], Any] | None = None,
    timeouts: ServerTimeouts | None = None,
    max_connections: int = 2000,
    idle: Mapping[Idle, float] | None = None,
    on_idle: IdleCallback | None = None,
    tcp_keepalive: float | None = None,
    proxy_protocol: bool = False,
    allow: Iterable[str | Network | IPAddress] | None = None,
    deny: Iterable[str | Network | IPAddress] | None = None,
    max_connections_per_ip: int | None = None,
    on_connect: ConnectHook | None = None,
    on_close: CloseHook | None = None,
    observers: Iterable[Observer] | None = None,
    grace: float = 5.0,
    restart: bool = True,
    task_status: trio.TaskStatus[WorkerGroup] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on several cores: ``workers`` processes share ``port`` (Linux SO_REUSEPORT).

    Each worker is a fresh interpreter running :func:`serve` (or
    :func:`serve_connections` with ``connections=True``) in its own
    :func:`trio.run`, so ``handler``, ``codec``, ``on_idle``, ``on_connect``,
    ``on_close``, ``observers`` and ``ssl_context_factory`` must be
    picklable: module-level functions and the built-in codecs are (an
    :class:`ssl.SSLContext` is not, hence a factory that each worker calls).
    Each worker has its own copy of the observers. A program that calls this
    from its own ``__main__`` module needs the ``if __name__ == "__main__":``
    guard of :mod:`multiprocessing`. ``max_connections`` applies per worker,
    and so does ``max_connections_per_ip`` (each worker counts its own
    connections); ``tcp_keepalive``, ``proxy_protocol``, ``allow`` and
    ``deny`` are :func:`serve`'s.

    Start it with ``group = await nursery.start(partial(serve_workers, ...))``;
    it returns once every worker listens. Cancelling it, or
    :meth:`WorkerGroup.shutdown`, sends SIGTERM to every worker, which shuts
    its service down with ``grace`` seconds for in-flight sessions; a worker
    still alive after ``grace`` + 5 s is killed. A worker that dies on its own
    is logged and, with ``restart=True``, started again (back-off from 0.1 s
    doubling to 30 s while it keeps dying within a second).
    """
    if not hasattr(socket, "SO_REUSEPORT"):
        raise RuntimeError("serve_workers needs SO_REUSEPORT (Linux)")
    edge = (proxy_protocol, allow, deny, max_connections_per_ip)
    hooks = (on_connect, on_close, observers)
    options = ServiceOptions.build(
        codec, None, timeouts, max_connections, idle, on_idle, tcp_keepalive, *edge, *hooks
    )
    count = workers if workers is not None else (os.cpu_count() or 1)
    if count < 1:
        raise ValueError(f"workers must be >= 1, got {count}")
    # Hold the port for the whole run: bound, never listening, so the kernel
    # never queues a connection on it, but port 0 resolves once for everyone.
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    holder = socket.socket(family[0], socket.SOCK_STREAM)
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(family[4])
        port = holder.getsockname()[1]
        config = _WorkerConfig(
            handler=handler,
            connections=connections,
            host=host,
            port=port,
            options=options,
            ssl_context_factory=ssl_context_factory,
            grace=grace,
        )
        await _run_group(WorkerGroup(port, count), config, restart, task_status)
    finally:
        holder.close()


async def _run_group(
    group: WorkerGroup,
    config: _WorkerConfig,
    restart: bool,
    task_status: trio.TaskStatus[WorkerGroup],
) -> None:
    """Start and supervise the workers until cancelled, then stop them all."""
    try:
        with group._cancel_scope:
            async with trio.open_nursery() as nursery:
                for index in range(group.workers):
                    await nursery.start(_supervise, group, config, index, restart)
                logger.info("%d workers serving on port %d", group.workers, group.port)
                task_status.started(group)
    finally:
        with trio.CancelScope(shield=True):
            await _stop_all(group, config.grace)
        group._stopped.set()


async def _spawn(
    config: _WorkerConfig,
) -> multiprocessing.process.BaseProcess:
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(
        target=_worker_main, args=(config, sender), name="triocomm-worker", daemon=True
    )
    try:
        # Starting a spawned interpreter blocks for a few milliseconds.
        await trio.to_thread.run_sync(process.start)
        sender.close()
        with trio.move_on_after(_READY_TIMEOUT):
            await trio.lowlevel.wait_readable(receiver.fileno())
        if receiver.poll():
            try:
                receiver.recv()
            except EOFError:
                pass
            else:
                return process
        raise RuntimeError(
            f"worker process {process.pid} failed to start (exit {process.exitcode})"
        )
    except BaseException:
        if process.is_alive():
            process.kill()
        raise
    finally:
        receiver.close()


async def _supervise(
    group: WorkerGroup,
    config: _WorkerConfig,
    index: int,
    restart: bool,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    backoff = 0.1
    first = True
    while True:
        process = await _spawn(config)
        group._processes[index] = process
        if first:
            task_status.started(process.pid or 0)
            first = False
        started_at = trio.current_time()
        await trio.lowlevel.wait_readable(process.sentinel)
        # The sentinel fires as the child closes its files, a moment before
        # it can be reaped: join (briefly) so that exitcode is known.
        await trio.to_thread.run_sync(process.join)
        if group._stopping:
            return
        group._deaths += 1
        logger.error(
            "worker %d (pid %s) exited with status %s%s",
            index,
            process.pid,
            process.exitcode,
            "; restarting" if restart else "",
        )
        if not restart:
            return
        backoff = 0.1 if trio.current_time() - started_at > 1.0 else min(backoff * 2, _MAX_BACKOFF)
        await trio.sleep(backoff)
        group._restarts += 1


async def _stop_all(group: WorkerGroup, grace: float) -> None:
    group._stopping = True
    processes = [p for p in group._processes.values() if p.is_alive()]
    for process in processes:
        process.terminate()  # SIGTERM: the worker shuts its service down gracefully
    # The supervisors have ended, so nothing else waits on the sentinels now.
    limit = grace + 5.0
    with trio.move_on_after(limit):
        for process in processes:
            await trio.lowlevel.wait_readable(process.sentinel)
            await trio.to_thread.run_sync(process.join)
    for process in processes:
        if process.is_alive():
            logger.error(
                "worker pid %s still running %.1fs after SIGTERM; killing it", process.pid, limit
            )
            process.kill()
            await trio.to_thread.run_sync(process.join)
