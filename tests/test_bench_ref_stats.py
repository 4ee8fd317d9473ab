"""tools/bench_ref_stats.py: the two ways' order is reversed every other run (a fake worker, no model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import bench_ref_stats as B  # noqa: E402


def test_the_order_is_reversed_every_other_run(monkeypatch, capsys):
    """The full-logit way used to run first in every run (A B A B): the order itself could favour it."""
    calls = []

    def fake_run(cmd, **kw):
        way, out = cmd[-2:]
        calls.append(way)
        stats = np.zeros((2, 3))
        np.savez(out, chosen=stats, logz=stats, seconds=1.0 if way == "full" else 2.0, peak_mib=100.0)
        return subprocess.CompletedProcess(cmd, 0, stderr="")

    monkeypatch.setattr(B.subprocess, "run", fake_run)
    B.main(["--rows", "2", "--tokens", "3", "--reps", "4", "--threads", "1"])
    assert calls == ["full", "chunked", "chunked", "full", "full", "chunked", "chunked", "full"]
    out = capsys.readouterr().out
    assert "the order reversed every other run" in out and "chunked / full: time 2.00x" in out
