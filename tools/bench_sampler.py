"""The sampler's cost per step on one data-parallel rank, by mode, as the number of data-parallel ranks grows.

Every rank walks the whole global batch's part of the stream (``shiq_data.sampler``: rank 0's micro-batches,
then rank 1's, ...) so that ranks agree without talking, and materialises its own micro-batches. In ``padded``
mode a step's items are one slice of the stream; ``packed`` and ``groups`` cut them into packed rows or whole
groups, for every rank. This measures what that costs a rank at ``--dp`` ranks: the median seconds of
``BufferSampler.next_micro_batches`` on the middle rank, the three modes alternating in rounds (the listed
order in even rounds, reversed in odd ones), after one untimed step each, on a buffer of ``--rows`` rows made
here (lengths uniform in ``--min-tokens..--max-tokens``, groups of 2 to 4 rows). The ratios: each mode against
``padded`` at the same number of ranks, and each against itself at the smallest ``--dp``. Every rank's share of a step is
the same size, so a sampler whose cost did not grow with the ranks would show 1.0x in the last column.

    python tools/bench_sampler.py                       # 100,000 rows, DP 1, 64, 1024; 8 x 4 rows per rank
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import _args

from shiq_data.cli_common import ArgumentParser

MODES = ("padded", "packed", "groups")


def parse_args(argv=None):
    p = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Prints, per mode and number of data-parallel ranks, the median milliseconds of a step on one rank, "
        "its ratio to padded mode's, and its ratio to the same mode's at the smallest --dp.",
    )
    p.add_argument("--rows", type=_args.count, default=100_000, help="rows of the buffer made here (default 100000)")
    p.add_argument("--min-tokens", type=_args.integer(2), default=8, help="shortest row in tokens (default 8)")
    p.add_argument("--max-tokens", type=_args.integer(2), default=256, help="longest row in tokens (default 256)")
    p.add_argument(
        "--dp", type=_args.count, nargs="+", default=[1, 64, 1024], help="data-parallel sizes (default 1 64 1024)"
    )
    p.add_argument("--rows-per-micro-batch", type=_args.count, default=8, help="rows per micro-batch (default 8)")
    p.add_argument("--micro-batches", type=_args.count, default=4, help="micro-batches per step and rank (default 4)")
    p.add_argument("--packed-tokens", type=_args.count, default=1024, help="packed row width (default 1024)")
    p.add_argument("--reps", type=_args.count, default=5, help="timed steps per mode and size (default 5)")
    args = p.parse_args(argv)
    args.dp = sorted(set(args.dp))
    if args.min_tokens > args.max_tokens:
        p.error(f"--min-tokens {args.min_tokens} is more than --max-tokens {args.max_tokens}")
    if args.packed_tokens < args.max_tokens:
        p.error(f"--packed-tokens {args.packed_tokens} is less than --max-tokens {args.max_tokens}")
    if args.rows < 4 * args.rows_per_micro_batch:
        p.error(f"--rows {args.rows}: at least 4 x --rows-per-micro-batch ({4 * args.rows_per_micro_batch})")
    return args


def make_rows(n: int, low: int, high: int):
    """``n`` rows of ``low..high`` tokens (prompt of 4), groups of 2 to 4 consecutive rows."""
    import numpy as np

    rng = np.random.default_rng(0)
    group, left = 0, int(rng.integers(2, 5))
    for i in range(n):
        length = int(rng.integers(low, high + 1))
        mask = np.ones(length, bool)
        mask[: min(4, length - 1)] = False
        rewards = np.zeros(length, np.float32)
        rewards[-1] = 1.0
        yield {
            "row_id": str(i),
            "source": "bench",
            "group_id": group,
            "prompt_len": int((~mask).sum()),
            "tokens": rng.integers(0, 1000, length, dtype=np.int32),
            "action_mask": mask,
            "rewards": rewards,
        }
        left -= 1
        if left == 0:
            group, left = group + 1, int(rng.integers(2, 5))


def main(argv=None) -> None:
    args = parse_args(argv)
    from shiq_data.buffer import write_buffer
    from shiq_data.sampler import BufferSampler

    tokenizer = {"name": "bench", "fingerprint": "0" * 64, "vocab_size": 1000}
    with tempfile.TemporaryDirectory() as tmp:
        rows = make_rows(args.rows, args.min_tokens, args.max_tokens)
        buf = write_buffer(rows, Path(tmp) / "b", tokenizer_info=tokenizer, command=["bench"], progress=False)
        try:
            samplers = {
                world: {
                    mode: BufferSampler(
                        buf,
                        rows_per_micro_batch=args.rows_per_micro_batch,
                        micro_batches_per_step=args.micro_batches,
                        seed=0,
                        dp_rank=world // 2,
                        dp_world=world,
                        mode=mode,
                        max_tokens_per_row=args.packed_tokens if mode == "packed" else args.max_tokens,
                    )
                    for mode in MODES
                }
                for world in args.dp
            }
        except ValueError as e:  # packed rows so wide that a micro-batch would hold the buffer's rows more than once
            if "more than once" not in str(e):
                raise
            print(
                f"bench_sampler.py: {args.rows_per_micro_batch} packed rows of {args.packed_tokens} tokens would hold "
                f"the {buf.manifest['tokens']:,} tokens of the {args.rows:,} rows more than once: lower "
                "--packed-tokens or raise --rows",
                file=sys.stderr,
            )
            sys.exit(2)
        print(
            f"{args.rows:,} rows of {args.min_tokens}..{args.max_tokens} tokens ({buf.manifest['tokens']:,} tokens), "
            f"{args.micro_batches} micro-batches of {args.rows_per_micro_batch} rows a step on each rank (packed "
            f"rows of {args.packed_tokens} tokens); the middle rank's step, median of {args.reps} after one "
            "untimed step, the modes alternating (the order reversed every other round)"
        )
        print()
        print(f"| mode | data-parallel ranks | ms per step | / padded | / {args.dp[0]} rank(s) |")
        print("|---|---|---|---|---|")
        ms = {}
        for world in args.dp:
            for s in samplers[world].values():  # untimed: the first epoch's permutation, the first pages read
                s.next_micro_batches()
            times = {mode: [] for mode in MODES}
            for r in range(args.reps):
                for mode in MODES if r % 2 == 0 else reversed(MODES):
                    t0 = time.perf_counter()
                    samplers[world][mode].next_micro_batches()
                    times[mode].append(time.perf_counter() - t0)
            for mode in MODES:
                ms[mode, world] = statistics.median(times[mode]) * 1e3
        for mode in MODES:
            for world in args.dp:
                t = ms[mode, world]
                print(
                    f"| {mode} | {world} | {t:.2f} | {t / ms['padded', world]:.2f}x | {t / ms[mode, args.dp[0]]:.2f}x |"
                )


if __name__ == "__main__":
    main()
