"""tools/bench_prefix_cache.py at a tiny size, in the BFCL recipe's shape (groups of 2, two micro-batches a
step, the output layer in chunks): the three paths train on the same batches and start from the same loss."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def test_cached_and_full_steps_agree_at_a_tiny_size(smollm2):
    cmd = [sys.executable, str(TOOLS / "bench_prefix_cache.py"), "--trainable", "4", "--groups", "4"]
    cmd += [
        "--group-size",
        "2",
        "--tokens",
        "24",
        "--system",
        "8",
        "--rows",
        "2",
        "--micro-batches",
        "2",
        "--logits-chunk",
        "8",
    ]
    out = subprocess.run(cmd + ["--reps", "1", "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "4 of 30 layers trainable, 4 rows a step" in out.stdout
    assert re.search(r"^\| full \| [\d.]+ \|", out.stdout, re.M) and re.search(
        r"^\| cached \| [\d.]+ \|", out.stdout, re.M
    )
    assert re.search(r"^\| shared \| [\d.]+ \|", out.stdout, re.M)
    assert "cache build:" in out.stdout and "for 8 rows" in out.stdout
    nodes, real = map(float, re.search(r"shared prefixes: (\d+) positions .* against (\d+) real", out.stdout).groups())
    assert nodes < real  # a group's two rows share their prompt
    diff = float(re.search(r"largest difference of their states ([\d.e+-]+)", out.stdout).group(1))
    assert diff < 1e-5  # the cache built as tries and as padded rows
    rel = float(re.search(r"relative difference ([\d.e+-]+)\)", out.stdout).group(1))
    assert rel < 1e-5
