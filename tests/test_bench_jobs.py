"""tools/bench_jobs.py: both ways run every arm on the real model and the table reports them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def test_help_is_plain_text():
    out = subprocess.run([sys.executable, str(TOOLS / "bench_jobs.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "side by side" in " ".join(out.stdout.split())
    assert "``" not in out.stdout and "--arm" not in out.stdout


def test_both_ways_run_the_arms_on_smollm2():
    from shiq_data.assets import AssetMissing, smollm2_gguf

    try:
        smollm2_gguf()
    except AssetMissing as e:
        pytest.skip(str(e))
    cmd = [sys.executable, str(TOOLS / "bench_jobs.py"), "--steps", "1", "--prompts", "2", "--new-tokens", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.stdout.splitlines() if line.startswith("| ")
    }
    assert set(rows) == {"how", "one after the other", "side by side"}
    assert rows["one after the other"][0].strip() == "2" and rows["side by side"][0].strip() == "1"
    for how in ("one after the other", "side by side"):
        per_arm, wall = float(rows[how][1]), float(rows[how][2])
        assert 0 < per_arm < wall  # the wall time includes loading the model, once per arm
    assert float(rows["side by side"][3].strip().rstrip("x")) == pytest.approx(
        float(rows["one after the other"][2]) / float(rows["side by side"][2]), abs=0.01
    )
