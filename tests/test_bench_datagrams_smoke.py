"""Smoke test of benchmarks/bench_datagrams.py, so that it cannot rot unnoticed.

Every server kind answers the load generator for a fraction of a second, and
the report is built from the result. Nothing is timed: the benchmark reports,
this test only checks that the pieces work (every echo checked byte for byte
by the load generator, none wrong).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("bench_datagrams")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_every_server_echoes_under_the_load_generator(bench: ModuleType) -> None:
    for kind in bench.KINDS:
        result = bench.measure(kind, conns=2, duration=0.2)
        assert result["wrong"] == 0
        assert result["requests_per_s"] > 0


def test_the_report(bench: ModuleType) -> None:
    row = {"median": 2.0, "min": 1.0, "max": 3.0, "ratio_to_raw_trio": 1.0, "resent": 0}
    result = {
        "workload": "UDP echo",
        "asyncio_loop": "asyncio",
        "servers": dict.fromkeys(bench.KINDS, row),
    }
    table = bench.format_table(result)
    assert all(kind in table for kind in bench.KINDS)
    assert "1.00x" in table
