"""tools/bench_prefix_cache.py at a tiny size, in the BFCL recipe's shape (groups of 2, two micro-batches a
step, the output layer in chunks): the three paths train on the same batches and start from the same loss; the
paths' order is reversed every other timed pass; the cache builds are timed after a warm-up."""

from __future__ import annotations

import re
import sys

from tool_runs import TOOLS, run_tool

sys.path.insert(0, str(TOOLS))

import bench_prefix_cache as tool  # noqa: E402


def test_the_timed_passes_alternate_their_order():
    names = ["full", "cached", "shared"]
    assert [tool.pass_order(names, rep) for rep in range(3)] == [names, names[::-1], names]


def test_the_cache_builds_are_timed_after_an_untimed_warm_up(monkeypatch):
    """The tries' build used to be timed first and cold: the model's first forward passes fell on it alone."""
    import shiq_train.prefix_cache as P

    clock, calls = [0.0], []

    def fake_build(cls, model, rows, trainable, share_prefixes=None, progress=True):
        calls.append((len(rows), share_prefixes))
        clock[0] += 10.0 if len(calls) == 1 else 1.0  # the first build ever pays the one-time costs
        return len(calls)

    monkeypatch.setattr(P, "_buffer_tokens", lambda buffer: [[1, 2, 3]] * 100)
    monkeypatch.setattr(P.PrefixCache, "build", classmethod(fake_build))
    monkeypatch.setattr(tool.time, "perf_counter", lambda: clock[0])
    cache, seconds, padded, padded_seconds = tool.timed_builds(None, object(), 2, warm_rows=8)
    assert calls == [(8, None), (8, False), (100, None), (100, False)]  # warm-up each way, then the timed builds
    assert (cache, seconds, padded, padded_seconds) == (3, 1.0, 4, 1.0)


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
    assert "cache build (after an untimed warm-up build of 8 rows each way): " in out and "for 8 rows" in out
    nodes, real = map(float, re.search(r"shared prefixes: (\d+) positions .* against (\d+) real", out).groups())
    assert nodes < real  # a group's two rows share their prompt
    diff = float(re.search(r"largest difference of their states ([\d.e+-]+)", out).group(1))
    assert diff < 1e-5  # the cache built as tries and as padded rows
    rel = float(re.search(r"relative difference ([\d.e+-]+)\)", out).group(1))
    assert rel < 1e-5
