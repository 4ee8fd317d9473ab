"""Reference statistics with a Hugging Face model (shiq-train ref-stats): full logits against chunks.

SmolLM2-135M-Instruct (vocab 49152) computes the chosen logit and log-partition of every token of the
same synthetic rows two ways: through its full ``[B, T, V]`` logits (``causal_lm_stats``), and from
its final hidden states and output weight ``--chunk`` positions at a time (what
``shiq_train.reference.hf_stats_fn`` does for Llama-family models). Each way runs in a fresh
subprocess that holds nothing else, alternating (full, chunked, then chunked, full, ...: the order reversed every
other run, so neither it nor load from other processes favours a way), after one warm-up batch.
Peak = the process's resident high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` once
the model is loaded and ``malloc_trim`` has returned loading's freed temporaries to the system, so
neither hides anything) minus its resident memory at that point, over the warm-up and the timed run. The two ways' statistics are compared value by value.

    python tools/bench_ref_stats.py                        # 48 rows x 128 tokens, batches of 2048 tokens
    python tools/bench_ref_stats.py --rows 96 --batch-tokens 4096 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import _args

from shiq_data.cli_common import ArgumentParser


def parse_args(argv=None):
    p = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Prints seconds, tokens/s and peak memory per way, their ratios, and the "
        "largest difference between the two ways' statistics.",
    )
    p.add_argument("--rows", type=_args.count, default=48, help="synthetic rows (default 48)")
    p.add_argument("--tokens", type=_args.integer(2), default=128, help="tokens per row (default 128)")
    p.add_argument("--batch-tokens", type=_args.count, default=2048, help="ref-stats --batch-tokens (default 2048)")
    p.add_argument(
        "--chunk", type=_args.count, default=256, help="positions per chunk (default 256, the ref-stats default)"
    )
    p.add_argument("--reps", type=_args.count, default=2, help="subprocess runs per way (default 2)")
    p.add_argument("--threads", type=_args.threads, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--worker", nargs=2, metavar=("WAY", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker and args.worker[0] not in ("full", "chunked"):
        p.error(f"--worker: WAY must be full or chunked, got {args.worker[0]!r}")
    return args


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker(args) -> None:
    """One way in this process: writes seconds, peak RSS increase and the statistics to OUT."""
    import time
    import warnings

    import numpy as np
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from shiq_data.ref_stats import rows_ref_stats
    from shiq_train import reference
    from shiq_train.hf_convert import load_smollm2

    way, out = args.worker
    if way == "full":
        reference.CHUNKED_MODEL_TYPES = ()  # force the full-logit path
    model, _ = load_smollm2(torch.float32)
    g = np.random.default_rng(0)
    rows = [g.integers(0, model.config.vocab_size, args.tokens).tolist() for _ in range(args.rows)]
    fn = reference.hf_stats_fn(model, chunk_tokens=args.chunk)
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # loading's freed temporaries would otherwise be reused unseen
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current resident size
        f.write("5")
    base = _status_kib("VmRSS")
    rows_ref_stats(rows[:2], fn, args.batch_tokens)  # warm-up (its memory counts in the peak)
    t0 = time.perf_counter()
    chosen, logz = rows_ref_stats(rows, fn, args.batch_tokens)
    seconds = time.perf_counter() - t0
    peak_mib = (_status_kib("VmHWM") - base) / 1024
    np.savez(out, chosen=np.stack(chosen), logz=np.stack(logz), seconds=seconds, peak_mib=peak_mib)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    import numpy as np

    results = {"full": [], "chunked": []}
    stats = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for way in list(results) if rep % 2 == 0 else list(results)[::-1]:  # full first, then chunked first
                out = os.path.join(tmp, f"{way}{rep}.npz")
                res = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--rows",
                        str(args.rows),
                        "--tokens",
                        str(args.tokens),
                        "--batch-tokens",
                        str(args.batch_tokens),
                        "--chunk",
                        str(args.chunk),
                        "--threads",
                        str(args.threads),
                        "--worker",
                        way,
                        out,
                    ],
                    stderr=subprocess.PIPE,
                    text=True,
                )
                if res.returncode != 0:
                    last = (res.stderr.strip().splitlines() or ["no message"])[-1]
                    sys.exit(f"bench_ref_stats: the {way} worker failed (exit {res.returncode}): {last}")
                r = np.load(out)
                results[way].append((float(r["seconds"]), float(r["peak_mib"])))
                stats[way] = (r["chosen"], r["logz"])
    n_tokens = args.rows * args.tokens
    print(
        f"SmolLM2-135M, vocab 49152, {args.rows} rows x {args.tokens} tokens, --batch-tokens {args.batch_tokens}, "
        f"chunk {args.chunk}, {args.threads} threads, {args.reps} runs per way (median), the order reversed every "
        "other run\n"
    )
    print("| way | seconds | tokens/s | peak RSS increase (MiB) |")
    print("|---|---|---|---|")
    med = {}
    for way, runs in results.items():
        s = statistics.median(x[0] for x in runs)
        m = statistics.median(x[1] for x in runs)
        med[way] = (s, m)
        print(f"| {way} | {s:.2f} | {n_tokens / s:,.0f} | {m:,.0f} |")
    (fs, fm), (cs, cm) = med["full"], med["chunked"]
    diff = max(float(np.abs(stats["full"][i] - stats["chunked"][i]).max()) for i in range(2))
    print(
        f"\nchunked / full: time {cs / fs:.2f}x, peak memory {fm / max(cm, 1.0):.1f}x lower; "
        f"largest |difference| of the statistics: {diff:.2e}"
    )
    print(json.dumps({"full": med["full"], "chunked": med["chunked"], "max_abs_diff": diff}))


if __name__ == "__main__":
    main()
