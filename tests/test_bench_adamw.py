"""tools/bench_adamw.py: the three ways of stepping AdamW update the parameters alike."""

from __future__ import annotations

from tool_runs import run_tool, table_rows


def test_the_ways_update_alike():
    rows = table_rows(run_tool("bench_adamw.py", "--steps", "2", "--rounds", "1", "--threads", "1"))[1:]  # no header
    assert [r[1] for r in rows] == ["loop over tensors", "foreach", "fused"] * 2
    assert "21.2M in 55 tensors" in rows[0][0] and "101 tensors" in rows[3][0]
    for r in rows:
        assert float(r[2]) > 0 and float(r[-1]) < 1e-6  # 2 steps from the same start: the same update
