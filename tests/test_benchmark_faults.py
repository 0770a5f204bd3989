"""benchmarks/faults.py runs and finds nothing lost or doubled across a SIGKILL (short run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_one_sigkill_loses_and_doubles_nothing() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "faults.py"),
            "--kills",
            "1",
            "--interval",
            "1.5",
            "--subscribers",
            "2",
            "--publishers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lost           0 receipted" in result.stdout
    assert "duplicates     0 messages" in result.stdout
    assert "(2 reconnects)" in result.stdout
