"""tools/bench_generate.py: every engine samples the same greedy completions, repeated
prompts included (so what the table compares is the same work)."""

from __future__ import annotations

from tool_runs import run_tool, table_rows


def test_every_engine_samples_the_same_completions():
    args = ["--prompts", "3", "--repeat", "2", "--batch", "4", "--new-tokens", "3", "--reps", "1", "--threads", "1"]
    out = run_tool("bench_generate.py", *args)
    assert "6 prompts" in out and "each 2 times" in out
    assert "identical completions: 6/6" in out  # megatron-core and transformers, greedy
    rows = table_rows(out)[1:]  # the header dropped
    engines = [r[0] for r in rows]
    assert engines == [
        "transformers (HFPolicy)",
        "transformers (HFPolicy, every prompt read whole)",
        "megatron-core (MegatronPolicy)",
        "transformers (HFPolicy, repeated prompts read again)",
    ]
    assert all(float(r[1]) > 0 for r in rows)
