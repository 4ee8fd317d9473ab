"""tools/bench_startup.py: both ways run, and they are the two ways it names (its own check: megatron-core
imported first keeps ``torch.compile`` as ``jit_fuser``; ``shiq_train`` first defers it)."""

from __future__ import annotations

import subprocess
import sys

from tool_runs import TOOLS, run_tool, table_rows


def test_the_import_measure_runs_both_ways():
    rows = table_rows(run_tool("bench_startup.py", "--rounds", "1", "--measures", "import"))
    assert rows[0] == ["measure", "wrapped at import", "compiled at first call", "wrapped / first call"]
    assert [r[0] for r in rows[1:]] == ["import"]
    old, new, ratio = float(rows[1][1]), float(rows[1][2]), float(rows[1][3].rstrip("x"))
    assert old > 0 and new > 0 and abs(ratio - old / new) < 0.01


def test_an_unknown_measure_is_refused():
    res = subprocess.run(
        [sys.executable, str(TOOLS / "bench_startup.py"), "--measures", "import,boot"], capture_output=True, text=True
    )
    assert res.returncode == 2 and "--measures: expected some of import, 2 steps, got boot" in res.stderr


def test_the_order_is_reversed_every_other_round(monkeypatch, capsys):
    """The wrapped way used to run first in every round (A B A B): the order itself could favour a way."""
    sys.path.insert(0, str(TOOLS))
    import bench_startup as B

    calls = []
    monkeypatch.setattr(B, "check_ways", lambda: None)
    monkeypatch.setattr(B, "timed", lambda code, run_dir: calls.append(code.startswith("import torch")) or 1.0)
    B.main(["--rounds", "4", "--measures", "import"])
    assert calls == [True, False, False, True, True, False, False, True]  # wrapped: True
    assert "the order reversed every other round" in capsys.readouterr().out
