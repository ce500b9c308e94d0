"""Decoder throughput of the built-in codecs, and the proof that decoding is linear.

Two measurements, both on plain bytes (framing is sans-I/O, so no event loop
and no sockets are involved):

* **throughput** — MB/s of wire bytes decoded by each codec, for small
  (64 B) and large (64 KiB) messages, fed in 64 KiB chunks as a socket read
  would deliver them;
* **linearity** — one large message fed *one byte at a time*, at 256 KiB,
  512 KiB and 1 MiB. A decoder that rescans or re-copies its buffer on each
  chunk is quadratic: doubling the size would quadruple the time. The ratios
  printed must stay near 2.

Run it on its own (``python benchmarks/bench_codecs.py [--quick] [--json
FILE]``) or from the benchmark suite, which calls :func:`run`. The figures are
reported, never asserted: a loaded machine makes timings noisy, so the
linearity verdict uses the best of several repetitions.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    import triocomm
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    import triocomm

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB
# Doubling the size should double the time; 4 would mean quadratic. Anything
# under this is called linear (timer noise on a shared machine stays well below).
LINEAR_RATIO_LIMIT = 2.8


def _codecs(max_size: int) -> dict[str, Any]:
    return {
        "LengthPrefixed": triocomm.LengthPrefixed(max_frame=max_size),
        "Lines": triocomm.Lines(max_line=max_size),
        "Lines(CRLF)": triocomm.Lines(b"\r\n", max_line=max_size),
        "Raw": triocomm.Raw(),
    }


def _best_of(repeats: int, fn: Callable[[], int]) -> float:
    """Best wall time of ``fn`` over ``repeats`` runs (the least disturbed one)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _payload(size: int) -> bytes:
    # No byte of it is a delimiter, so every codec can frame it.
    return bytes(b"abcdefghijklmnopqrstuvwxyz012345"[i % 32] for i in range(size))


def throughput(message_size: int, total: int, repeats: int) -> dict[str, float]:
    """MB/s of wire bytes decoded per codec, fed in CHUNK-sized reads."""
    results = {}
    for name, codec in _codecs(max(message_size, CHUNK)).items():
        frame = bytes(codec.encode(_payload(message_size)))
        stream = frame * max(1, total // len(frame))
        chunks = [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)]
        expected = len(stream) // len(frame) if name != "Raw" else len(chunks)

        def decode(codec: Any = codec, chunks: list[bytes] = chunks) -> int:
            feed = codec.decoder().feed
            return sum(len(feed(chunk)) for chunk in chunks)

        got = decode()
        if got != expected:
            raise RuntimeError(f"{name} decoded {got} messages, expected {expected}")
        seconds = _best_of(repeats, decode)
        results[name] = round(len(stream) / seconds / 1e6, 1)
    return results


def byte_at_a_time(sizes: list[int], repeats: int) -> dict[str, dict[str, Any]]:
    """Time one message of each size fed one byte at a time; report the ratios."""
    results: dict[str, dict[str, Any]] = {}
    for name, codec in _codecs(max(sizes)).items():
        if name == "Raw":
            continue  # Raw holds nothing between chunks: trivially linear.
        seconds = []
        for size in sizes:
            frame = bytes(codec.encode(_payload(size)))
            pieces = [frame[i : i + 1] for i in range(len(frame))]

            def decode(codec: Any = codec, pieces: list[bytes] = pieces) -> int:
                feed = codec.decoder().feed
                count = 0
                for piece in pieces:
                    count += len(feed(piece))
                return count

            if decode() != 1:
                raise RuntimeError(f"{name} did not decode the {size}-byte message")
            seconds.append(_best_of(repeats, decode))
        ratios = [round(b / a, 2) for a, b in itertools.pairwise(seconds)]
        results[name] = {
            "sizes": sizes,
            "seconds": [round(s, 4) for s in seconds],
            "ns_per_byte": [round(s / n * 1e9, 1) for s, n in zip(seconds, sizes, strict=True)],
            "ratios": ratios,
            "linear": all(r < LINEAR_RATIO_LIMIT for r in ratios),
        }
    return results


def run(quick: bool) -> dict[str, Any]:
    """Run every measurement and return the figures (quick: smaller and fewer)."""
    repeats = 2 if quick else 5
    total = 4 * MiB if quick else 32 * MiB
    sizes = [64 * KiB, 128 * KiB, 256 * KiB] if quick else [256 * KiB, 512 * KiB, 1 * MiB]
    return {
        "unit": "MB/s of wire bytes, 64 KiB reads",
        "small_messages_64B": throughput(64, total // 4, repeats),
        "large_messages_64KiB": throughput(64 * KiB, total, repeats),
        "byte_at_a_time": byte_at_a_time(sizes, repeats),
    }


def report(results: dict[str, Any]) -> str:
    lines = ["Decoder throughput (MB/s of wire bytes, fed in 64 KiB reads)"]
    small, large = results["small_messages_64B"], results["large_messages_64KiB"]
    lines.append(f"  {'codec':<16}{'64 B msgs':>12}{'64 KiB msgs':>14}")
    for name in small:
        lines.append(f"  {name:<16}{small[name]:>12.1f}{large[name]:>14.1f}")
    lines.append("")
    lines.append("One message fed one byte at a time (ratio per doubling: ~2 linear, 4 quadratic)")
    for name, row in results["byte_at_a_time"].items():
        sizes = ", ".join(f"{s // KiB} KiB" for s in row["sizes"])
        times = ", ".join(f"{s:.3f}s" for s in row["seconds"])
        verdict = "linear" if row["linear"] else "NOT LINEAR"
        lines.append(f"  {name:<16}{sizes}: {times}; ratios {row['ratios']} -> {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    results = run(args.quick)
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    linear = all(row["linear"] for row in results["byte_at_a_time"].values())
    return 0 if linear else 1


if __name__ == "__main__":
    sys.exit(main())
