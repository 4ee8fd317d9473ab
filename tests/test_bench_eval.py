"""tools/bench_eval.py: the evaluation's paths sample the same completions and agree on the KL, on the real model."""

from __future__ import annotations

import pytest
from tool_runs import run_tool, table_rows


def test_shared_path_matches_two_passes_on_smollm2():
    from shiq_data.assets import AssetMissing, smollm2_gguf

    try:
        smollm2_gguf()
    except AssetMissing as e:
        pytest.skip(str(e))
    # one thread: two beside the other test worker's busy core spin-wait (124 s against 15 s for this run)
    out = run_tool("bench_eval.py", "--prompts", "6", "--new-tokens", "3", "--rounds", "1", "--threads", "1")
    rows = {r[0]: r[1:] for r in table_rows(out)}
    shared = [
        "shared first 24 layers, prompts' pass kept, both models' later layers over prompt + completion (before)",
        "shared first 24 layers",
        "shared first 24 layers, prompts' pass kept",
    ]
    assert set(rows) == {"path", "two full passes (baseline)", *shared}
    for name in shared:
        same, dkl = rows[name][2], float(rows[name][3])
        assert same == "yes" and dkl < 1e-4, name
    assert "prompts' pass kept against not: same completions yes, max KL difference 0.0e+00" in out
