"""The soak runner itself works: a few seconds of it, as ``nox -s soak`` would run it.

(The real soak is long and not part of the default run; this keeps the
script from rotting and checks that its verdict follows its figures.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

SOAK = Path(__file__).with_name("soak.py")


async def test_a_short_soak_passes_with_zero_lost_desynced_and_leaked(tmp_path: Path) -> None:
    figures_path = tmp_path / "soak.json"
    with trio.fail_after(50):
        result = await trio.run_process(
            [
                sys.executable,
                str(SOAK),
                "--minutes",
                "0.05",
                "--seed",
                "3",
                "--json",
                str(figures_path),
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "result            PASS" in out
    figures = json.loads(figures_path.read_text())
    assert figures["requests"] > 0
    assert figures["faults_injected"] > 0
    for name in ("lost", "desynced", "leaked_fds", "leaked_tasks", "pool_violations"):
        assert figures[name] == 0, name
