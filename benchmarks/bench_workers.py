"""Multi-core serving: scenario (b) against ``serve_workers`` with 1 and 2 workers.

``python benchmarks/bench_workers.py [--reps 3] [--duration 3] [--json FILE]``

Each configuration runs ``triocomm.serve_workers`` (an echo handler on the
RPC-echo wire format) in a subprocess, and the suite's load generator
(``loadgen.py``, uvloop) drives scenario (b): 64 connections ping-pong 64 B.
Nothing is pinned here: with two workers on a two-core machine the workers
and the load generator share the cores, which is exactly the trade-off this
measures. Importable as ``run(quick: bool) -> dict``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORKER_COUNTS = (1, 2)


async def echo(request: bytes, conn: Any) -> bytes:
    """The benchmark handler: echo the frame (module level, so it pickles)."""
    return request


def serve(workers: int) -> None:
    """Run serve_workers until stdin closes; print ``PORT <n>`` once listening."""
    import functools

    import trio

    import triocomm

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            group = await nursery.start(
                functools.partial(
                    triocomm.serve_workers,
                    echo,
                    0,
                    workers=workers,
                    host="127.0.0.1",
                    codec=triocomm.LengthPrefixed(),
                    grace=1.0,
                )
            )
            print(f"PORT {group.port}", flush=True)
            # Stop when the driver closes our stdin.
            await trio.to_thread.run_sync(sys.stdin.read)
            nursery.cancel_scope.cancel()

    trio.run(main)


def measure(workers: int, duration: float) -> float:
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(workers)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"serve_workers did not start (said {line!r})")
        port = int(line.split()[1])
        scenario_b = ["--conns", "64", "--size", "64", "--duration", str(duration)]
        out = subprocess.run(
            [sys.executable, str(HERE / "loadgen.py"), "--port", str(port), *scenario_b],
            capture_output=True,
            text=True,
            check=False,
            timeout=duration + 60,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        if "error" in result:
            raise RuntimeError(result["error"])
        return float(result["requests_per_s"])
    finally:
        assert server.stdin is not None
        server.stdin.close()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def run(quick: bool = False, reps: int = 3, duration: float = 3.0) -> dict[str, Any]:
    """Measure every worker count ``reps`` times (interleaved); return medians."""
    if quick:
        reps, duration = 1, 1.0
    samples: dict[int, list[float]] = {n: [] for n in WORKER_COUNTS}
    for _ in range(reps):
        for n in WORKER_COUNTS:
            samples[n].append(measure(n, duration))
    result: dict[str, Any] = {"scenario": "(b) 64 conns ping-pong 64 B", "workers": {}}
    for n, values in samples.items():
        result["workers"][str(n)] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
        }
    one = result["workers"]["1"]["median"]
    result["ratio_2_over_1"] = result["workers"]["2"]["median"] / one
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    result = run(args.quick, args.reps, args.duration)
    for n, row in result["workers"].items():
        print(
            f"{n} worker(s): {row['median']:>10,.0f} req/s "
            f"(min {row['min']:,.0f}, max {row['max']:,.0f})"
        )
    print(f"2 workers / 1 worker: {result['ratio_2_over_1']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
