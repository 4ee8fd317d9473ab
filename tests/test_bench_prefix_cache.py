"""tools/bench_prefix_cache.py at a tiny size, in the BFCL recipe's shape (groups of 2, two micro-batches a
step, the output layer in chunks): the three paths train on the same batches and start from the same loss; the
paths' order is reversed every other timed pass."""

from __future__ import annotations

import re
import sys

from tool_runs import TOOLS, run_tool

sys.path.insert(0, str(TOOLS))

import bench_prefix_cache as tool  # noqa: E402


def test_the_timed_passes_alternate_their_order():
    names = ["full", "cached", "shared"]
    assert [tool.pass_order(names, rep) for rep in range(3)] == [names, names[::-1], names]


def test_cached_and_full_steps_agree_at_a_tiny_size(smollm2):
    args = ["--trainable", "4", "--groups", "4"]
    args += [
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
    out = run_tool("bench_prefix_cache.py", *args, "--reps", "1", "--threads", "1")
    assert "4 of 30 layers trainable, 4 rows a step" in out
    assert re.search(r"^\| full \| [\d.]+ \|", out, re.M) and re.search(r"^\| cached \| [\d.]+ \|", out, re.M)
    assert re.search(r"^\| shared \| [\d.]+ \|", out, re.M)
    assert "cache build:" in out and "for 8 rows" in out
    nodes, real = map(float, re.search(r"shared prefixes: (\d+) positions .* against (\d+) real", out).groups())
    assert nodes < real  # a group's two rows share their prompt
    diff = float(re.search(r"largest difference of their states ([\d.e+-]+)", out).group(1))
    assert diff < 1e-5  # the cache built as tries and as padded rows
    rel = float(re.search(r"relative difference ([\d.e+-]+)\)", out).group(1))
    assert rel < 1e-5
