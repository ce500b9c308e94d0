"""triocomm's benchmark suite: one entry point, a table on the terminal, a JSON file.

``python benchmarks/run.py`` (or ``nox -s bench``) measures, in one run:

* **servers** — the RPC echo workload (4-byte big-endian length prefix, the
  server echoes each frame) against five servers (``servers.py``), each in
  its own process on core 0, all driven by the same load generator
  (``loadgen.py``, asyncio protocol on uvloop) on core 1, in four scenarios:
  (a) 1 connection ping-pong 64 B, (b) 64 connections ping-pong 64 B,
  (c) 8 connections x 16 pipelined 64 B, (d) 8 connections ping-pong 64 KiB;
* **clients** — triocomm's pooled ``client.request`` and a raw-Trio client
  (``clients.py``, core 1) against one fixed fast server (core 0), in
  scenarios (a) and (b);
* **memory** — resident memory per idle keep-alive connection of a triocomm
  server and of the raw-Trio server holding 10,000 connections (``memory.py``);
* **codecs** — decoder throughput, from ``bench_codecs.run``;
* **backpressure** — the server's RSS growth per connection while clients
  pipeline tiny requests with large replies and never read
  (``backpressure.py``).

Each measurement is repeated (``--reps``, at least 3 for the full run); the
table shows medians with min-max and the ratio triocomm / raw Trio, which is
what the targets are stated in. Servers are measured rep by rep in a
rotating order, so a burst of load from elsewhere on the machine spreads
over all of them instead of hitting one. The suite never asserts a speed:
it reports. ``--quick`` is a short smoke run (about a minute).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness

SCENARIOS: dict[str, dict[str, Any]] = {
    "a": {"title": "(a) 1 conn ping-pong 64 B", "conns": 1, "size": 64, "depth": 1},
    "b": {"title": "(b) 64 conns ping-pong 64 B", "conns": 64, "size": 64, "depth": 1},
    "c": {"title": "(c) 8 conns x 16 pipelined 64 B", "conns": 8, "size": 64, "depth": 16},
    "d": {"title": "(d) 8 conns ping-pong 64 KiB", "conns": 8, "size": 65536, "depth": 1},
}
CLIENT_SCENARIOS = ("a", "b")
SERVER_KINDS = ("triocomm", "raw-trio", "asyncio-streams", "asyncio-protocol", "uvloop-protocol")
CLIENT_KINDS = ("triocomm", "raw-trio")
MEMORY_KINDS = ("triocomm", "raw-trio")
PARTS = ("server", "client", "memory", "codecs", "backpressure")
DEFAULT_JSON = harness.HERE / "results" / "latest.json"
# Targets from the performance issue, reported beside the ratios (never asserted).
SERVER_TARGET = 1.0
CLIENT_TARGET = 0.95
MEMORY_TARGET_BYTES = 8 * 1024
MIB = 1024 * 1024


def have(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def triocomm_has(*names: str) -> bool:
    import triocomm

    return all(hasattr(triocomm, name) for name in names)


class Settings:
    """How long and how often to measure."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.quick: bool = args.quick
        self.reps: int = args.reps or (1 if args.quick else 3)
        self.duration: float = args.duration or (0.5 if args.quick else 2.0)
        self.warmup: float = 0.2 if args.quick else 0.5
        self.memory_conns: int = args.memory_conns or (1000 if args.quick else 10_000)
        self.loop = "uvloop" if have("uvloop") else "asyncio"
        self.parts: tuple[str, ...] = tuple(args.only.split(",")) if args.only else PARTS


def _json_from(proc: subprocess.CompletedProcess[str], what: str) -> dict[str, Any]:
    lines = proc.stdout.strip().splitlines()
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"{what} printed no result: {proc.stderr.strip()[-500:]}") from None
    if proc.returncode != 0 or "error" in result:
        raise RuntimeError(f"{what} failed: {result.get('error', proc.stderr[-500:])}")
    return result


def run_loadgen(
    port: int, scenario: str, s: Settings, *, requests: int | None = None
) -> dict[str, Any]:
    """Drive the server on ``port`` with one scenario; return the load generator's result.

    With ``requests``, stop after that many replies instead (a warm-up).
    """
    sc = SCENARIOS[scenario]
    duration, warmup = (s.duration, s.warmup) if requests is None else (10.0, 0.0)
    cmd = [
        sys.executable, str(harness.HERE / "loadgen.py"), "--port", str(port),
        "--conns", str(sc["conns"]), "--size", str(sc["size"]), "--depth", str(sc["depth"]),
        "--duration", str(duration), "--warmup", str(warmup),
        "--core", str(harness.LOAD_CORE), "--loop", s.loop,
    ]  # fmt: skip
    if requests is not None:
        cmd += ["--requests", str(requests)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60 + duration * 2)
    return _json_from(proc, f"load generator ({sc['title']})")


def run_client(kind: str, port: int, scenario: str, s: Settings) -> dict[str, Any]:
    sc = SCENARIOS[scenario]
    cmd = [
        sys.executable, str(harness.HERE / "clients.py"), "--kind", kind, "--port", str(port),
        "--conns", str(sc["conns"]), "--size", str(sc["size"]),
        "--duration", str(s.duration), "--warmup", str(s.warmup),
        "--core", str(harness.LOAD_CORE),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60 + s.duration * 2)
    return _json_from(proc, f"{kind} client ({sc['title']})")


def rotated(kinds: tuple[str, ...], rep: int) -> list[str]:
    k = rep % len(kinds)
    return list(kinds[k:] + kinds[:k])


def bench_servers(s: Settings, log: Any) -> dict[str, Any]:
    kinds = [k for k in SERVER_KINDS if available_server(k, s)]
    runs: dict[str, dict[str, list[float]]] = {sc: {k: [] for k in kinds} for sc in SCENARIOS}
    cpu: dict[str, dict[str, list[float]]] = {sc: {k: [] for k in kinds} for sc in SCENARIOS}
    for rep in range(s.reps):
        for kind in rotated(tuple(kinds), rep):
            with harness.ServerProcess(kind) as server:
                for sc in SCENARIOS:
                    before = harness.cpu_seconds(server.pid)
                    result = run_loadgen(server.port, sc, s)
                    used = harness.cpu_seconds(server.pid) - before
                    rps = result["requests_per_s"]
                    cpu_us = used / max(result["total_requests"], 1) * 1e6
                    runs[sc][kind].append(rps)
                    cpu[sc][kind].append(cpu_us)
                    log(
                        f"  server rep {rep + 1}/{s.reps} {kind:17} {sc}: {rps:10.0f} req/s"
                        f" {cpu_us:7.1f} us CPU/req"
                    )
    return {
        "runs": runs,
        "cpu_us_per_request": cpu,
        "skipped": [k for k in SERVER_KINDS if k not in kinds],
    }


def available_server(kind: str, s: Settings) -> bool:
    if kind == "uvloop-protocol":
        return have("uvloop")
    if kind == "triocomm":
        return triocomm_has("serve")
    return True


def bench_clients(s: Settings, log: Any) -> dict[str, Any]:
    fixed = "uvloop-protocol" if have("uvloop") else "asyncio-protocol"
    kinds = [k for k in CLIENT_KINDS if k != "triocomm" or triocomm_has("open_client", "Target")]
    runs: dict[str, dict[str, list[float]]] = {
        sc: {k: [] for k in kinds} for sc in CLIENT_SCENARIOS
    }
    cpu: dict[str, dict[str, list[float]]] = {sc: {k: [] for k in kinds} for sc in CLIENT_SCENARIOS}
    with harness.ServerProcess(fixed) as server:
        for rep in range(s.reps):
            for kind in rotated(tuple(kinds), rep):
                for sc in CLIENT_SCENARIOS:
                    result = run_client(kind, server.port, sc, s)
                    rps, cpu_us = result["requests_per_s"], result["cpu_us_per_request"]
                    runs[sc][kind].append(rps)
                    cpu[sc][kind].append(cpu_us)
                    log(
                        f"  client rep {rep + 1}/{s.reps} {kind:9} {sc}: {rps:10.0f} req/s"
                        f" {cpu_us:7.1f} us CPU/req"
                    )
    return {
        "server": fixed,
        "runs": runs,
        "cpu_us_per_request": cpu,
        "skipped": [k for k in CLIENT_KINDS if k not in kinds],
    }


def measure_memory(kind: str, conns: int, s: Settings) -> dict[str, float]:
    """RSS of a ``kind`` server before and while it holds ``conns`` idle connections."""
    with harness.ServerProcess(kind) as server:
        # One warm-up request, so that code paths run once per process (imports,
        # caches) count in the baseline and not in the per-connection cost.
        run_loadgen(server.port, "a", s, requests=50)
        time.sleep(0.2)
        baseline = harness.rss_kib(server.pid)
        cmd = [
            sys.executable, str(harness.HERE / "memory.py"), "--port", str(server.port),
            "--conns", str(conns), "--core", str(harness.LOAD_CORE), "--loop", s.loop,
        ]  # fmt: skip
        holder = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None
            line = holder.stdout.readline()
            if not line.startswith("READY"):
                raise RuntimeError(f"memory holder for {kind} failed (said {line!r})")
            time.sleep(0.5)
            loaded = harness.rss_kib(server.pid)
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            try:
                holder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.wait()
            if holder.stdout is not None:
                holder.stdout.close()
    return {
        "baseline_kib": baseline,
        "loaded_kib": loaded,
        "bytes_per_connection": (loaded - baseline) * 1024 / conns,
    }


def bench_memory(s: Settings, log: Any) -> dict[str, Any]:
    kinds = [k for k in MEMORY_KINDS if available_server(k, s)]
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    for rep in range(s.reps):
        for kind in rotated(tuple(kinds), rep):
            m = measure_memory(kind, s.memory_conns, s)
            runs[kind].append(m)
            log(
                f"  memory rep {rep + 1}/{s.reps} {kind:9}: "
                f"{m['bytes_per_connection']:7.0f} B/conn (baseline {m['baseline_kib']} KiB)"
            )
    return {"connections": s.memory_conns, "runs": runs}


def bench_codecs(s: Settings, log: Any) -> dict[str, Any]:
    try:
        import bench_codecs  # written beside this file by the framing engineer
    except ImportError as exc:
        return {"skipped": f"bench_codecs is not available: {exc}"}
    log("  codecs ...")
    result: dict[str, Any] = bench_codecs.run(s.quick)
    return result


def bench_backpressure(s: Settings, log: Any) -> dict[str, Any]:
    import backpressure

    runs = []
    for rep in range(s.reps):
        m = backpressure.measure(requests=2000 if s.quick else 5000)
        runs.append(m)
        log(
            f"  backpressure rep {rep + 1}/{s.reps}: "
            f"{m['bytes_per_connection'] / MIB:7.1f} MiB/conn "
            f"(baseline {m['baseline_kib']} KiB, {m['connections']} conns)"
        )
    return {"runs": runs}


# -- report ----------------------------------------------------------------------


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Medians, ranges and ratios of everything measured."""
    out: dict[str, Any] = {}
    for part, scenarios in (("server", SCENARIOS), ("client", CLIENT_SCENARIOS)):
        if part not in results:
            continue
        table: dict[str, Any] = {}
        for sc in scenarios:
            runs = results[part]["runs"][sc]
            row: dict[str, Any] = {k: harness.Summary.of(v).as_dict() for k, v in runs.items()}
            ratios = {}
            for base in ("raw-trio", "asyncio-streams"):
                if "triocomm" in row and base in row:
                    ratios[f"triocomm/{base}"] = row["triocomm"]["median"] / row[base]["median"]
            entry = {"title": SCENARIOS[sc]["title"], "kinds": row, "ratios": ratios}
            cpu = results[part].get("cpu_us_per_request", {}).get(sc)
            if cpu:
                entry["cpu_us_per_request"] = {
                    k: harness.Summary.of(v).as_dict() for k, v in cpu.items() if v
                }
            table[sc] = entry
        out[part] = table
    if "memory" in results:
        mem: dict[str, Any] = {}
        for kind, runs in results["memory"]["runs"].items():
            mem[kind] = harness.Summary.of([r["bytes_per_connection"] for r in runs]).as_dict()
        if "triocomm" in mem and "raw-trio" in mem:
            mem["ratio triocomm/raw-trio"] = mem["triocomm"]["median"] / mem["raw-trio"]["median"]
        out["memory"] = mem
    if "backpressure" in results:
        runs = results["backpressure"]["runs"]
        out["backpressure"] = harness.Summary.of(
            [r["bytes_per_connection"] for r in runs]
        ).as_dict()
    return out


def _rate(value: float) -> str:
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"


def _cell(summary: dict[str, Any]) -> str:
    return f"{_rate(summary['median'])} ({_rate(summary['min'])}-{_rate(summary['max'])})"


def _memory_rows(summary: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """The measured memory kinds, in table order, with their statistics."""
    mem = summary["memory"]
    return [(kind, mem[kind]) for kind in MEMORY_KINDS if kind in mem]


def format_table(summary: dict[str, Any], results: dict[str, Any]) -> str:
    lines: list[str] = []
    for part, kinds, target, heading in (
        ("server", SERVER_KINDS, SERVER_TARGET, "RPC echo servers"),
        ("client", CLIENT_KINDS, CLIENT_TARGET, "RPC echo clients"),
    ):
        if part not in summary:
            continue
        present = [k for k in kinds if k in next(iter(summary[part].values()))["kinds"]]
        extra = f" against {results['client']['server']}" if part == "client" else ""
        lines.append(f"{heading}{extra}: requests/s, median (min-max)")
        header = f"{'scenario':34}" + "".join(f"{k:>24}" for k in present) + f"{'trio/raw':>10}"
        if part == "server":
            header += f"{'trio/streams':>14}"
        lines.append(header)
        for row in summary[part].values():
            line = f"{row['title']:34}" + "".join(f"{_cell(row['kinds'][k]):>24}" for k in present)
            ratio = row["ratios"].get("triocomm/raw-trio")
            line += f"{ratio:>9.2f}x" if ratio else f"{'-':>10}"
            if ratio:
                line += "*" if ratio < target else " "
            if part == "server":
                streams = row["ratios"].get("triocomm/asyncio-streams")
                line += f"{streams:>12.2f}x" if streams else f"{'-':>13}"
            lines.append(line)
        lines.append(f"  (* below the target of {target:.2f}x raw Trio)")
        lines.append("")
        if all("cpu_us_per_request" in row for row in summary[part].values()):
            who = "server" if part == "server" else "client"
            lines.append(f"CPU time of the {who} process per request, microseconds, median")
            lines.append(f"{'scenario':34}" + "".join(f"{k:>24}" for k in present))
            for row in summary[part].values():
                cpu = row["cpu_us_per_request"]
                lines.append(
                    f"{row['title']:34}"
                    + "".join(
                        f"{cpu[k]['median']:>24.1f}" if k in cpu else f"{'-':>24}" for k in present
                    )
                )
            lines.append("")
    if "memory" in summary:
        conns = results["memory"]["connections"]
        lines.append(f"Idle keep-alive connections: bytes of RSS per connection, {conns} held")
        for kind, m in _memory_rows(summary):
            lines.append(
                f"  {kind:10} {m['median']:8.0f} B ({m['min']:.0f}-{m['max']:.0f})"
                f"   target <= {MEMORY_TARGET_BYTES} B"
            )
        ratio = summary["memory"].get("ratio triocomm/raw-trio")
        if ratio is not None:
            lines.append(f"  triocomm / raw-trio: {ratio:.2f}x")
        lines.append("")
    if "backpressure" in summary:
        lines.append(_backpressure_title(results) + ":")
        b = summary["backpressure"]
        lines.append(
            f"  triocomm   {b['median'] / MIB:8.1f} MiB ({b['min'] / MIB:.1f}-{b['max'] / MIB:.1f})"
        )
        lines.append("")
    codecs = results.get("codecs")
    if codecs and "skipped" not in codecs:
        import bench_codecs

        lines.append(bench_codecs.report(codecs))
    elif codecs:
        lines.append(f"Codecs: {codecs['skipped']}")
    return "\n".join(lines)


def _backpressure_title(results: dict[str, Any]) -> str:
    first = results["backpressure"]["runs"][0]
    return (
        f"Never-reading clients: server RSS growth per connection, {first['connections']} "
        f"conns x {first['requests_per_connection']} pipelined requests, "
        f"{first['reply_bytes'] // 1024} KiB replies"
    )


# Typographic dash and times sign for the Markdown tables.
DASH = "\u2013"
TIMES = "\u00d7"


def _md_rate(value: float) -> str:
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"


def _md_cell(summary: dict[str, Any]) -> str:
    return (
        f"{_md_rate(summary['median'])} "
        f"({_md_rate(summary['min'])}{DASH}{_md_rate(summary['max'])})"
    )


def format_markdown(summary: dict[str, Any], results: dict[str, Any]) -> str:
    """The same figures as :func:`format_table`, as Markdown tables for the docs."""
    out: list[str] = []
    for part, kinds in (("server", SERVER_KINDS), ("client", CLIENT_KINDS)):
        if part not in summary:
            continue
        present = [k for k in kinds if k in next(iter(summary[part].values()))["kinds"]]
        ratios = ["raw-trio", "asyncio-streams"] if part == "server" else ["raw-trio"]
        out.append(f"**{part.capitalize()}s**: requests per second, median (min{DASH}max)")
        out.append("")
        out.append(
            "| scenario | "
            + " | ".join(present)
            + "".join(f" | triocomm / {r}" for r in ratios)
            + " |"
        )
        out.append("|---" * (1 + len(present) + len(ratios)) + "|")
        for row in summary[part].values():
            cells = [_md_cell(row["kinds"][k]) for k in present]
            cells += [
                f"**{row['ratios'][f'triocomm/{r}']:.2f}{TIMES}**"
                if f"triocomm/{r}" in row["ratios"]
                else DASH
                for r in ratios
            ]
            out.append(f"| {row['title']} | " + " | ".join(cells) + " |")
        out.append("")
        out.append(f"**{part.capitalize()}s**: CPU time of the process per request, µs (median)")
        out.append("")
        out.append("| scenario | " + " | ".join(present) + " |")
        out.append("|---" * (1 + len(present)) + "|")
        for row in summary[part].values():
            cpu = row.get("cpu_us_per_request", {})
            cells = [f"{cpu[k]['median']:.1f}" if k in cpu else DASH for k in present]
            out.append(f"| {row['title']} | " + " | ".join(cells) + " |")
        out.append("")
    if "memory" in summary:
        conns = results["memory"]["connections"]
        out.append(f"**Idle keep-alive connections**, {conns:,} held, bytes of RSS each:")
        for kind, m in _memory_rows(summary):
            out.append(f"{kind} {m['median']:,.0f} ({m['min']:,.0f}{DASH}{m['max']:,.0f});")
        out.append("")
    if "backpressure" in summary:
        b = summary["backpressure"]
        out.append(f"**{_backpressure_title(results)}**:")
        low, high = b["min"] / MIB, b["max"] / MIB
        out.append(f"triocomm {b['median'] / MIB:.1f} MiB ({low:.1f}{DASH}{high:.1f}).")
        out.append("")
    return "\n".join(out)


def environment() -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, cwd=harness.HERE, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: version(d) for d in ("triocomm", "trio", "uvloop")},
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (about a minute)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--memory-conns", type=int, default=None)
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {PARTS}")
    parser.add_argument(
        "--markdown", action="store_true", help="print Markdown tables (for docs/performance.md)"
    )
    args = parser.parse_args(argv)
    s = Settings(args)
    harness.raise_nofile_limit()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    env = environment()
    log(f"triocomm benchmarks on {env['cpu']} ({env['cores']} cores), Python {env['python']}")
    if s.loop != "uvloop":
        log("  uvloop is not installed: the load generator uses asyncio's default loop")
    started = time.perf_counter()
    results: dict[str, Any] = {}
    steps = {
        "server": bench_servers,
        "client": bench_clients,
        "memory": bench_memory,
        "codecs": bench_codecs,
        "backpressure": bench_backpressure,
    }
    for part in s.parts:
        results[part] = steps[part](s, log)
    summary = summarize(results)
    document = {
        "environment": env,
        "settings": {
            "reps": s.reps,
            "duration_s": s.duration,
            "warmup_s": s.warmup,
            "load_generator_loop": s.loop,
            "quick": s.quick,
        },
        "scenarios": SCENARIOS,
        "results": results,
        "summary": summary,
        "elapsed_s": time.perf_counter() - started,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    print(format_markdown(summary, results) if args.markdown else format_table(summary, results))
    log(f"results written to {args.json} in {document['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
