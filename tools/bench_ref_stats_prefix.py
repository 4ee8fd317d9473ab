"""Reference statistics of a buffer's rows with and without reading each group's shared prefix once.

The rows of a group (completions of one prompt; a trajectory and its edits) begin with the same tokens.
``shiq_data.ref_stats.rows_ref_stats`` with the rows' group ids runs that prefix once per group and each
row's remainder from its KV cache, a group at a time (``hf_stats_fn(...).with_prefix``) or several small
groups to a batch (``with_prefixes``, what the function uses when it has it); without them every row runs
whole, in length-sorted batches. One run, side by side, SmolLM2-135M-Instruct on the first ``--groups`` groups of
a real buffer (the main job's ``DIR/buffer``, the BFCL recipe's ``DIR/buffer``). Each way runs once untimed
first (a warm-up: first-call costs such as allocation and kernel selection fall on no timed pass); then the
ways alternate in rounds, in the listed order in even rounds (0, 2, ...) and reversed in odd ones, so load
from other processes and the order itself hit them alike; medians are reported, and the statistics of each
way are compared value by value with those of whole rows.

    python tools/bench_ref_stats_prefix.py runs/demo/buffer                 # 32 groups, 2 rounds
    python tools/bench_ref_stats_prefix.py runs/bfcl/buffer --groups 8 --rounds 1
"""

from __future__ import annotations

import statistics
import time
import warnings

import _args

from shiq_data.cli_common import ArgumentParser


def parse_args(argv=None):
    p = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Prints, per way, median seconds and tokens per second, the speed-up of the shared prefixes, and "
        "the largest difference between the two ways' statistics.",
    )
    p.add_argument(
        "buffer", metavar="BUFFER", type=_args.buffer_folder, help="a replay buffer folder (rows with group ids)"
    )
    p.add_argument("--groups", type=_args.count, default=32, help="the buffer's first N groups (default 32)")
    p.add_argument("--batch-tokens", type=_args.count, default=2048, help="ref-stats --batch-tokens (default 2048)")
    p.add_argument(
        "--rounds", type=_args.count, default=2, help="timed passes per way, after one untimed warm-up pass (default 2)"
    )
    p.add_argument("--threads", type=_args.threads, default=2, help="torch CPU threads (default 2)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import numpy as np
    import torch

    from shiq_data.buffer import open_buffer, read_shard
    from shiq_data.ref_stats import MIN_SHARED_TOKENS, common_prefix, rows_ref_stats
    from shiq_train.hf_convert import load_smollm2
    from shiq_train.reference import hf_stats_fn

    torch.set_num_threads(args.threads)
    tokens, groups = [], []
    for path in open_buffer(args.buffer).shard_paths:
        table = read_shard(path)
        tokens += [list(t) for t in table.column("tokens").to_pylist()]
        groups += table.column("group_id").to_pylist()
    keep = sorted(set(groups))[: args.groups]
    picked = [i for i, g in enumerate(groups) if g in set(keep)]
    tokens, groups = [tokens[i] for i in picked], [groups[i] for i in picked]
    shared = {g: common_prefix([t for t, h in zip(tokens, groups) if h == g]) for g in keep}
    model, _ = load_smollm2(torch.float32)
    fn = hf_stats_fn(model)

    def one_group_at_a_time(batch, mask):
        return fn(batch, mask)

    one_group_at_a_time.with_prefix = fn.with_prefix  # and no with_prefixes
    ways = {
        "every row whole": (fn, None),
        "shared prefixes once, a group at a time": (one_group_at_a_time, groups),
        "shared prefixes once, small groups side by side": (fn, groups),
    }
    for f, g in ways.values():  # warm-up, untimed
        rows_ref_stats(tokens, f, args.batch_tokens, groups=g)
    times = {name: [] for name in ways}
    out = {}
    for r in range(args.rounds):
        order = list(ways) if r % 2 == 0 else list(reversed(ways))
        for name in order:
            f, g = ways[name]
            t0 = time.perf_counter()
            out[name] = rows_ref_stats(tokens, f, args.batch_tokens, groups=g)
            times[name].append(time.perf_counter() - t0)
    n_tokens = sum(map(len, tokens))
    used = [g for g in keep if shared[g] >= MIN_SHARED_TOKENS and groups.count(g) > 1]
    print(
        f"SmolLM2-135M-Instruct, {len(keep)} groups ({len(tokens)} rows, {n_tokens:,} tokens, "
        f"{np.mean([len(t) for t in tokens]):.0f} per row) of {args.buffer}; {len(used)} groups share at least "
        f"{MIN_SHARED_TOKENS} tokens (mean shared prefix {np.mean([shared[g] for g in used]) if used else 0:.0f}); "
        f"--batch-tokens {args.batch_tokens}, {args.threads} threads, after a warm-up pass of each way, median of "
        f"{args.rounds} interleaved round(s), the order reversed every other round"
    )
    print()
    print("| way | seconds | tokens/s | speed-up | largest difference from whole rows |")
    print("|---|---|---|---|---|")
    base = statistics.median(next(iter(times.values())))
    c0, z0 = out["every row whole"]
    for name in ways:
        t = statistics.median(times[name])
        c1, z1 = out[name]
        diff = max(float(np.abs(a - b).max()) for x, y in ((c0, c1), (z0, z1)) for a, b in zip(x, y))
        print(f"| {name} | {t:.2f} | {n_tokens / t:,.0f} | {base / t:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
