"""tools/bench_ref_stats_prefix.py on a small buffer of grouped rows: the three ways agree, on the real model,
and the two shared-prefix ways read each group's prefix once (run in-process, the statistics function recorded)."""

from __future__ import annotations

import sys

import numpy as np
import torch
from tool_runs import TOOLS, table_rows

from shiq_data.buffer import write_buffer
from shiq_train import reference

sys.path.insert(0, str(TOOLS))

import bench_ref_stats_prefix as tool  # noqa: E402


def recording_hf_stats_fn(calls: list):
    """``hf_stats_fn`` whose statistics function records each call: ``("whole", real tokens)`` for a batch of
    whole rows, ``("prefix", row lengths, shared)`` for one group read with its prefix once, ``("prefixes",
    [(row lengths, shared), ...])`` for several groups side by side."""
    real = reference.hf_stats_fn

    def hf_stats_fn(model, *args, **kwargs):
        fn = real(model, *args, **kwargs)

        def stats(tokens, attention_mask):
            calls.append(("whole", int(attention_mask.sum())))
            return fn(tokens, attention_mask)

        def with_prefix(rows, shared, max_batch_tokens):
            calls.append(("prefix", sorted(map(len, rows)), shared))
            return fn.with_prefix(rows, shared, max_batch_tokens)

        def with_prefixes(groups, max_batch_tokens):
            groups = list(groups)
            calls.append(("prefixes", [(sorted(map(len, rows)), shared) for rows, shared in groups]))
            return fn.with_prefixes(groups, max_batch_tokens)

        stats.with_prefix, stats.with_prefixes = with_prefix, with_prefixes
        return stats

    return hf_stats_fn


def test_the_ways_agree_on_smollm2(tmp_path, smollm2, monkeypatch, capsys):
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
    calls = []
    monkeypatch.setattr(reference, "hf_stats_fn", recording_hf_stats_fn(calls))
    threads = torch.get_num_threads()
    try:
        tool.main([str(tmp_path / "buf"), "--groups", "2", "--rounds", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    # the first 2 groups: 2 × (45 + 46 + 47) tokens, each group's rows sharing their 40-token prefix
    assert "2 groups (6 rows, 276 tokens" in out and "2 groups share at least" in out
    assert "(mean shared prefix 40)" in out
    group = ([45, 46, 47], 40)
    # an untimed warm-up pass of each way, then the timed round, in the same order (one round): the same calls
    half = len(calls) // 2
    assert calls[:half] == calls[half:]
    whole = [c for c in calls[:half] if c[0] == "whole"]
    assert sum(n for _, n in whole) == 276  # every row whole: each real token once
    assert calls[len(whole) : half] == [("prefix", *group), ("prefix", *group), ("prefixes", [group, group])]
    rows = {r[0]: r for r in table_rows(out)}
    ways = [
        "every row whole",
        "shared prefixes once, a group at a time",
        "shared prefixes once, small groups side by side",
    ]
    assert all(w in rows for w in ways)
    assert all(float(rows[w][-1]) < 1e-4 for w in ways[1:])  # other paths, the same values
