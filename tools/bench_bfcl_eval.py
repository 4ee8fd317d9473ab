"""Cost of the BFCL recipe's evaluation with scenarios answered one at a time against in lockstep batches.

The recipe's evaluation (``shiq-bfcl``, :func:`shiq_eval.bfcl.turns.answer_turns_batch`) answers every
turn of a held-out scenario greedily given the ground-truth history, with the exact KL to the reference
along each answer. Decoding one token reads all the model's weights once, so one scenario at a time is
bound by memory on a CPU; a batch of scenarios shares each read. The policy, like the recipe's, is a
fine-tune of the reference's last ``--trained`` layers, so the reference runs only those layers, on the
hidden states the policy computed (the row "1, reference whole" runs it from its first layer instead, as
for an unrelated reference). One run, SmolLM2-135M-Instruct as the reference and a copy with its last layers
perturbed as the policy, the first held-out scenarios of ``multi_turn_base`` with the compact
function docs, as the recipe's default evaluation sees them. Each row first answers its first batch of
scenarios untimed (a warm-up); then rows alternate in rounds, in reverse order every other round, so neither
first-call costs nor load from other processes favour a row; medians are reported, and the answers, KLs and ground-truth NLLs of every row
are compared with those of batch size 1.

    python tools/bench_bfcl_eval.py                          # 8 scenarios, batch sizes 1, 4 and 8, 2 rounds
    python tools/bench_bfcl_eval.py --scenarios 16 --batch 1 8 16 --rounds 2
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings

import _args

from shiq_data.cli_common import ArgumentParser


def held_out_scenarios() -> int:
    """How many held-out scenarios the recipe's default evaluation has."""
    from shiq_eval.recipes import bfcl

    return len(bfcl.scenario_entries(bfcl.load_config(overrides=["eval.scenarios=0"]), "test"))


def parse_args(argv=None):
    p = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Prints, per batch size, median seconds per pass over the scenarios, the speed-up against batch "
        "size 1, and whether the answers are the same as batch size 1's.",
    )
    p.add_argument("--scenarios", type=_args.count, default=8, help="held-out scenarios (default 8)")
    p.add_argument("--batch", type=_args.count, nargs="+", default=[1, 4, 8], help="batch sizes (default 1 4 8)")
    p.add_argument(
        "--new-tokens", type=_args.count, default=64, help="new tokens per answer at most (default 64, the recipe's)"
    )
    p.add_argument("--rounds", type=_args.count, default=2, help="timed passes per batch size (default 2)")
    p.add_argument(
        "--trained",
        type=_args.integer(1, 29),
        default=4,
        help="the policy's trained last layers (default 4, the recipe's)",
    )
    p.add_argument("--threads", type=_args.threads, default=2, help="torch CPU threads (default 2)")
    args = p.parse_args(argv)
    if args.scenarios > (held_out := held_out_scenarios()):
        p.error(f"--scenarios: the recipe has {held_out} held-out scenarios, got {args.scenarios}")
    if 1 not in args.batch:
        args.batch = [1, *args.batch]
    return args


def main(argv=None) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_bfcl_") as root:
        os.environ.setdefault("BFCL_PROJECT_ROOT", root)  # bfcl_eval makes its result folders there at import
        run(parse_args(argv))


def run(args) -> None:
    warnings.filterwarnings("ignore")
    import torch

    from shiq_eval.bfcl import turns
    from shiq_eval.bfcl.turns import answer_turns_batch, ground_truth_trajectory
    from shiq_eval.recipes import bfcl
    from shiq_train.hf_convert import load_smollm2

    torch.set_num_threads(args.threads)
    policy, tok = load_smollm2(torch.float32)
    ref, _ = load_smollm2(torch.float32)
    policy.eval(), ref.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.model.layers[len(policy.model.layers) - args.trained :].parameters():
            p.add_(0.02 * p.abs().mean() * torch.randn(p.shape, generator=g))
    shared = turns.shared_prefix_layers
    cfg = bfcl.load_config(overrides=[f"eval.scenarios={args.scenarios}"])
    entries = bfcl.scenario_entries(cfg, "test")
    trajs = [ground_truth_trajectory(e, compact=True) for e in entries]

    def one_pass(batch: int, whole: bool = False, upto: int | None = None) -> list[dict]:
        turns.shared_prefix_layers = (lambda a, b: 0) if whole else shared
        results = []
        n = len(entries) if upto is None else upto
        for i in range(0, n, batch):
            j = min(i + batch, n)
            results += answer_turns_batch(
                policy, tok, entries[i:j], trajs[i:j], ref_model=ref, max_new_tokens=args.new_tokens
            )
        turns.shared_prefix_layers = shared
        return results

    rows = {str(b): (b, False) for b in args.batch}
    rows |= {"1, reference whole": (1, True)}
    times = {r: [] for r in rows}
    outputs = {}
    for b, whole in rows.values():  # warm-up, untimed: first calls' costs are paid before any row is timed
        one_pass(b, whole, upto=min(b, len(entries)))
    for k in range(args.rounds):
        for r in list(rows) if k % 2 == 0 else list(rows)[::-1]:  # forward, then reversed, so no row always leads
            b, whole = rows[r]
            t0 = time.perf_counter()
            outputs[r] = one_pass(b, whole)
            times[r].append(time.perf_counter() - t0)
    base = outputs["1"]
    turns = sum(len(r["answers"]) for r in base)
    generated = sum(len(t) for r in base for t in r["tokens"])
    print(
        f"SmolLM2-135M-Instruct (reference; the policy: its last {args.trained} layers perturbed, "
        f"{shared(policy, ref)} layers shared), {len(entries)} held-out scenarios of multi_turn_base, "
        f"{turns} turns, greedy, at most {args.new_tokens} new tokens ({generated} generated at batch size 1), "
        f"{args.threads} threads, median of {args.rounds} interleaved pass(es)"
    )
    print()
    print(
        "| batch size | seconds per pass | speed-up vs 1 | same answers as 1 | max KL difference | max NLL difference |"
    )
    print("|---|---|---|---|---|---|")
    t1 = statistics.median(times["1"])
    for name in rows:
        same = all(r["tokens"] == q["tokens"] for r, q in zip(outputs[name], base))
        dkl = max(abs(x - y) for r, q in zip(outputs[name], base) for x, y in zip(r["kl"], q["kl"]))
        dnll = max(abs(x - y) for r, q in zip(outputs[name], base) for x, y in zip(r["gt_nll"], q["gt_nll"]))
        t = statistics.median(times[name])
        print(f"| {name} | {t:.1f} | {t1 / t:.2f}x | {'yes' if same else 'no'} | {dkl:.1e} | {dnll:.1e} |")


if __name__ == "__main__":
    main()
