"""redis-benchmark against examples/redis_server.py and against the real redis-server.

Both servers get exactly the same load, from the same program with the same
parameters: ``redis-benchmark -t ping,set,get,incr -P 16 -c 50`` (16
pipelined commands on each of 50 connections), and the table reports
requests per second per command for each, with the ratio triocomm / Redis.
Redis is C with a hand-tuned event loop, so the ratio says how far a Python
server on triocomm is from the reference implementation of the protocol,
not whether it is "fast enough".

Each server runs in its own process pinned to core 0 and redis-benchmark on
core 1 (see ``harness.py``). Each measurement is repeated and the median
reported; the servers alternate, so load from elsewhere on the machine
spreads over both. Nothing is asserted.

Run it on its own::

    python benchmarks/bench_redis.py [--quick] [--json FILE]

or import it: :func:`run` returns the figures as a dict. Without
``redis-server`` or ``redis-benchmark`` (Debian: ``redis-server``,
``redis-tools``), it reports that it skipped.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

REPO = HERE.parent
REDIS_EXAMPLE = REPO / "examples" / "redis_server.py"
TESTS = "ping,set,get,incr"
PIPELINE = 16
CLIENTS = 50
#: The rows redis-benchmark prints for TESTS ("ping" runs both PING forms).
COMMANDS = ("PING_INLINE", "PING_MBULK", "SET", "GET", "INCR")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_listening(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} is not listening on 127.0.0.1:{port} after 15 s")


class _Server:
    """A server subprocess on core 0, stopped by its PID on exit."""

    def __init__(self, what: str, argv: list[str], port: int) -> None:
        self.what = what
        self.port = port
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=lambda: harness.pin_to_core(harness.SERVER_CORE),
        )
        try:
            _wait_listening(port, self.process, what)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _benchmark(binary: str, port: int, requests: int) -> dict[str, float]:
    """One redis-benchmark run: requests per second for each command."""
    argv = [binary, "-h", "127.0.0.1", "-p", str(port), "-n", str(requests), "--csv"]
    argv += ["-t", TESTS, "-P", str(PIPELINE), "-c", str(CLIENTS)]
    result = subprocess.run(
        argv,
        capture_output=True,
        check=False,
        timeout=600,
        preexec_fn=lambda: harness.pin_to_core(harness.LOAD_CORE),
    )
    output = result.stdout.decode()
    if result.returncode != 0:
        raise RuntimeError(
            f"redis-benchmark failed (status {result.returncode}): {result.stderr.decode()[-500:]}"
        )
    return {row["test"]: float(row["rps"]) for row in csv.DictReader(io.StringIO(output))}


def run(quick: bool, *, requests: int | None = None) -> dict[str, Any]:
    """Measure both servers; return parameters, per-command medians and ratios.

    ``quick`` runs each server once with 20,000 requests per command (a few
    seconds); otherwise three repetitions of 200,000. ``requests`` overrides
    the count (the smoke test uses a tiny one).
    """
    redis_server = shutil.which("redis-server")
    redis_benchmark = shutil.which("redis-benchmark")
    if redis_server is None or redis_benchmark is None:
        return {"skipped": "redis-server and redis-benchmark are needed (Debian: redis-tools)"}
    if requests is None:
        requests = 20_000 if quick else 200_000
    reps = 1 if quick else 3
    version = subprocess.run(
        [redis_server, "--version"], capture_output=True, check=False, timeout=30
    ).stdout.decode()
    samples: dict[str, dict[str, list[float]]] = {
        "triocomm": {c: [] for c in COMMANDS},
        "redis": {c: [] for c in COMMANDS},
    }
    with tempfile.TemporaryDirectory() as workdir:
        example_port = _free_port()
        redis_port = _free_port()
        servers = {
            "triocomm": _Server(
                "examples/redis_server.py",
                [sys.executable, str(REDIS_EXAMPLE), "--port", str(example_port)],
                example_port,
            ),
        }
        try:
            argv = [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1"]
            # As in the tests: nothing is written to disk.
            argv += ["--save", "", "--appendonly", "no", "--dir", workdir, "--daemonize", "no"]
            servers["redis"] = _Server("redis-server", argv, redis_port)
            for rep in range(reps):
                # Alternate which server goes first in each repetition.
                order = ["triocomm", "redis"] if rep % 2 == 0 else ["redis", "triocomm"]
                for name in order:
                    figures = _benchmark(redis_benchmark, servers[name].port, requests)
                    for command in COMMANDS:
                        samples[name][command].append(figures[command])
        finally:
            for server in servers.values():
                server.close()
    commands: dict[str, dict[str, float]] = {}
    for command in COMMANDS:
        ours = statistics.median(samples["triocomm"][command])
        theirs = statistics.median(samples["redis"][command])
        commands[command] = {
            "triocomm_rps": round(ours, 1),
            "redis_rps": round(theirs, 1),
            "ratio": round(ours / theirs, 3) if theirs else float("nan"),
        }
    return {
        "parameters": {
            "tool": "redis-benchmark",
            "tests": TESTS,
            "pipeline": PIPELINE,
            "clients": CLIENTS,
            "requests_per_command": requests,
            "repetitions": reps,
            "redis_version": version.strip(),
        },
        "commands": commands,
        "samples": samples,
    }


def format_table(result: dict[str, Any]) -> str:
    """The figures as a text table (what the command line prints)."""
    if "skipped" in result:
        return f"redis benchmark skipped: {result['skipped']}"
    p = result["parameters"]
    lines = [
        f"redis-benchmark -t {p['tests']} -P {p['pipeline']} -c {p['clients']} "
        f"-n {p['requests_per_command']} (median of {p['repetitions']})",
        f"{'command':<12} {'triocomm req/s':>15} {'redis req/s':>12} {'ratio':>7}",
    ]
    for command, row in result["commands"].items():
        lines.append(
            f"{command:<12} {row['triocomm_rps']:>15,.0f} {row['redis_rps']:>12,.0f} "
            f"{row['ratio']:>7.3f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="one short run per server")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    result = run(args.quick)
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
