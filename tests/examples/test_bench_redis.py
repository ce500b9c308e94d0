"""benchmarks/bench_redis.py runs and reports both servers (a smoke test: no timing is judged)."""

from __future__ import annotations

import shutil
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_redis


@pytest.mark.needs_binary("redis-server")
@pytest.mark.needs_binary("redis-benchmark")
def test_a_tiny_run_reports_every_command_for_both_servers() -> None:
    result = bench_redis.run(True, requests=800)
    assert result["parameters"]["pipeline"] == 16
    assert result["parameters"]["clients"] == 50
    assert set(result["commands"]) == set(bench_redis.COMMANDS)
    for row in result["commands"].values():
        assert row["triocomm_rps"] > 0
        assert row["redis_rps"] > 0
        assert row["ratio"] == pytest.approx(row["triocomm_rps"] / row["redis_rps"], abs=0.001)
    table = bench_redis.format_table(result)
    assert all(command in table for command in bench_redis.COMMANDS)


def test_missing_programs_are_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    result = bench_redis.run(True)
    assert "redis-benchmark" in result["skipped"]
    assert bench_redis.format_table(result).startswith("redis benchmark skipped")
