"""Cost of the BFCL recipe's evaluation with scenarios answered one at a time against in lockstep batches.

The recipe's evaluation (``shiq-bfcl``, :func:`shiq_eval.bfcl.turns.answer_turns_batch`) answers every
turn of a held-out scenario greedily given the ground-truth history, with the exact KL to the reference
along each answer. Decoding one token reads all the model's weights once, so one scenario at a time is
bound by memory on a CPU; a batch of scenarios shares each read. One run, SmolLM2-135M-Instruct as the
policy and (a second copy) as the reference, the first held-out scenarios of ``multi_turn_base`` with the
compact function docs, as the recipe's default evaluation sees them. Batch sizes alternate in rounds, so
load from other processes hits all alike; medians are reported, and the answers, KLs and ground-truth NLLs
of every batch size are compared with those of batch size 1.

    python tools/bench_bfcl_eval.py                          # 8 scenarios, batch sizes 1, 4 and 8
    python tools/bench_bfcl_eval.py --scenarios 16 --batch 1 8 16 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Prints, per batch size, median seconds per pass over the scenarios, the speed-up against batch "
        "size 1, and whether the answers are the same as batch size 1's.",
    )
    p.add_argument("--scenarios", type=int, default=8, help="held-out scenarios (default 8)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8], help="batch sizes (default 1 4 8)")
    p.add_argument(
        "--new-tokens", type=int, default=64, help="new tokens per answer at most (default 64, the recipe's)"
    )
    p.add_argument("--rounds", type=int, default=1, help="timed passes per batch size (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = p.parse_args(argv)
    if args.scenarios < 1 or args.rounds < 1 or min(args.batch) < 1:
        p.error("--scenarios, --rounds and every --batch must be >= 1")
    if 1 not in args.batch:
        args.batch = [1, *args.batch]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("BFCL_PROJECT_ROOT", tempfile.mkdtemp(prefix="bench_bfcl_"))
    import torch

    from shiq_eval.bfcl.turns import answer_turns_batch, ground_truth_trajectory
    from shiq_eval.recipes import bfcl
    from shiq_train.hf_convert import load_smollm2

    torch.set_num_threads(args.threads)
    policy, tok = load_smollm2(torch.float32)
    ref, _ = load_smollm2(torch.float32)
    policy.eval(), ref.eval()
    cfg = bfcl.load_config(overrides=[f"eval.scenarios={args.scenarios}"])
    entries = bfcl.scenario_entries(cfg, "test")
    trajs = [ground_truth_trajectory(e, compact=True) for e in entries]

    def one_pass(batch: int) -> list[dict]:
        results = []
        for i in range(0, len(entries), batch):
            results += answer_turns_batch(
                policy, tok, entries[i : i + batch], trajs[i : i + batch], ref_model=ref, max_new_tokens=args.new_tokens
            )
        return results

    times = {b: [] for b in args.batch}
    outputs = {}
    for _ in range(args.rounds):
        for b in args.batch:
            t0 = time.perf_counter()
            outputs[b] = one_pass(b)
            times[b].append(time.perf_counter() - t0)
    base = outputs[1]
    turns = sum(len(r["answers"]) for r in base)
    generated = sum(len(t) for r in base for t in r["tokens"])
    print(
        f"SmolLM2-135M-Instruct (policy and reference), {len(entries)} held-out scenarios of multi_turn_base, "
        f"{turns} turns, greedy, at most {args.new_tokens} new tokens ({generated} generated at batch size 1), "
        f"{args.threads} threads, median of {args.rounds} interleaved pass(es)"
    )
    print()
    print(
        "| batch size | seconds per pass | speed-up vs 1 | same answers as 1 | max KL difference | max NLL difference |"
    )
    print("|---|---|---|---|---|---|")
    t1 = statistics.median(times[1])
    for b in args.batch:
        same = all(r["tokens"] == q["tokens"] for r, q in zip(outputs[b], base))
        dkl = max(abs(x - y) for r, q in zip(outputs[b], base) for x, y in zip(r["kl"], q["kl"]))
        dnll = max(abs(x - y) for r, q in zip(outputs[b], base) for x, y in zip(r["gt_nll"], q["gt_nll"]))
        t = statistics.median(times[b])
        print(f"| {b} | {t:.1f} | {t1 / t:.2f}x | {'yes' if same else 'no'} | {dkl:.1e} | {dnll:.1e} |")


if __name__ == "__main__":
    main()
