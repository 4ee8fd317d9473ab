"""tools/bench_ref_stats_prefix.py on a small buffer of grouped rows: the three ways agree, on the real model."""

from __future__ import annotations

import numpy as np
from tool_runs import run_tool, table_rows

from shiq_data.buffer import write_buffer


def test_the_ways_agree_on_smollm2(tmp_path, smollm2):
    _, info = smollm2
    g = np.random.default_rng(0)
    rows = []
    for gid in range(3):  # groups of 3 rows sharing 40 tokens
        prefix = g.integers(0, 49152, 40).tolist()
        for k in range(3):
            t = prefix + g.integers(0, 49152, 5 + k).tolist()
            rows.append(
                {
                    "row_id": f"{gid}-{k}",
                    "source": "test",
                    "group_id": gid,
                    "prompt_len": 40,
                    "tokens": t,
                    "action_mask": [False] * 40 + [True] * (len(t) - 40),
                    "rewards": [0.0] * (len(t) - 1) + [1.0],
                }
            )
    write_buffer(rows, tmp_path / "buf", tokenizer_info=info, command=["test"], progress=False)
    out = run_tool("bench_ref_stats_prefix.py", str(tmp_path / "buf"), "--groups", "2", "--rounds", "1")
    assert "2 groups (6 rows" in out and "2 groups share at least" in out
    rows = {r[0]: r for r in table_rows(out)}
    ways = [
        "every row whole",
        "shared prefixes once, a group at a time",
        "shared prefixes once, small groups side by side",
    ]
    assert all(w in rows for w in ways)
    assert float(rows[ways[0]][-1]) == 0.0
    assert all(float(rows[w][-1]) < 1e-4 for w in ways[1:])  # other paths, the same values
