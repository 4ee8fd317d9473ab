"""tools/bench_adamw.py: plain-text help, and the three ways of stepping AdamW update the parameters alike."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def test_help_is_plain_text():
    out = subprocess.run([sys.executable, str(TOOLS / "bench_adamw.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "fused" in out.stdout
    assert "``" not in out.stdout


def test_the_ways_update_alike():
    cmd = [sys.executable, str(TOOLS / "bench_adamw.py"), "--steps", "2", "--rounds", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split(" | ") for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    rows = rows[1:]  # the header
    assert [r[1] for r in rows] == ["loop over tensors", "foreach", "fused"] * 2
    assert "21.2M in 55 tensors" in rows[0][0] and "101 tensors" in rows[3][0]
    for r in rows:
        assert float(r[2]) > 0 and float(r[-1].strip(" |")) < 1e-6  # 2 steps from the same start: the same update
