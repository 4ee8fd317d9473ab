"""tools/bench_sampler.py: every mode at every size, the ratios its own columns give, and its refusals."""

from __future__ import annotations

import subprocess
import sys

from tool_runs import TOOLS, run_tool, table_rows


def test_every_mode_and_size_is_timed_and_the_ratios_follow_from_the_times():
    out = run_tool(
        "bench_sampler.py",
        "--rows",
        "300",
        "--dp",
        "4",
        "1",
        "--reps",
        "2",
        "--max-tokens",
        "40",
        "--packed-tokens",
        "64",
    )
    assert "300 rows of 8..40 tokens" in out and "the order reversed every other round" in out
    rows = table_rows(out)
    assert rows[0] == ["mode", "data-parallel ranks", "ms per step", "/ padded", "/ 1 rank(s)"]
    assert [(r[0], r[1]) for r in rows[1:]] == [(m, w) for m in ("padded", "packed", "groups") for w in ("1", "4")]
    ms = {(r[0], r[1]): float(r[2]) for r in rows[1:]}
    for mode, world, t, to_padded, to_one in rows[1:]:
        assert float(t) > 0
        for cell, base in ((to_padded, ms["padded", world]), (to_one, ms[mode, "1"])):
            # the times are printed to 0.01 ms and the ratios to 0.01: compare within what the rounding allows
            ratio = ms[mode, world] / base
            assert abs(float(cell.rstrip("x")) - ratio) <= ratio * (0.005 / ms[mode, world] + 0.005 / base) + 0.006


def test_bad_sizes_are_refused_in_one_line():
    for args, needle in (
        (["--min-tokens", "50", "--max-tokens", "40"], "--min-tokens 50 is more than --max-tokens 40"),
        (["--packed-tokens", "100", "--max-tokens", "200"], "--packed-tokens 100 is less than --max-tokens 200"),
        (["--rows", "10"], "--rows 10: at least 4 x --rows-per-micro-batch (32)"),
        (
            ["--rows", "300", "--max-tokens", "40"],
            "8 packed rows of 1024 tokens would hold the",
        ),
    ):
        res = subprocess.run([sys.executable, str(TOOLS / "bench_sampler.py"), *args], capture_output=True, text=True)
        assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr
        assert res.stdout == ""  # nothing printed before the refusal
