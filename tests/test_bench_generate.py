"""tools/bench_generate.py: plain-text help, and every engine samples the same greedy completions, repeated
prompts included (so what the table compares is the same work)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def test_help_is_plain_text():
    out = subprocess.run([sys.executable, str(TOOLS / "bench_generate.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--repeat" in out.stdout
    assert "``" not in out.stdout


def test_every_engine_samples_the_same_completions():
    cmd = [sys.executable, str(TOOLS / "bench_generate.py")]
    cmd += ["--prompts", "3", "--repeat", "2", "--batch", "4", "--new-tokens", "3", "--reps", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "6 prompts" in out.stdout and "each 2 times" in out.stdout
    assert "identical completions: 6/6" in out.stdout  # megatron-core and transformers, greedy
    rows = [line.split(" | ") for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    engines = [r[0].strip("| ") for r in rows[1:]]
    assert engines == [
        "transformers (HFPolicy)",
        "transformers (HFPolicy, every prompt read whole)",
        "megatron-core (MegatronPolicy)",
        "transformers (HFPolicy, repeated prompts read again)",
    ]
    assert all(float(r[1]) > 0 for r in rows[1:])
