"""Arms of the main job one after the other with every core, against side by side with a share each (--jobs).

``shiq-demo --full`` trains and evaluates one arm after another, three seeds of them; ``--jobs`` runs the
seeds in parallel processes, the cores shared among them. Whether that pays depends on how well one run
uses several threads. This measures it on a stand-in for one arm of the main job, built from the same
parts on the same sizes: SmolLM2-135M-Instruct as the reference and, as the policy, a copy whose last
``--trained`` layers are perturbed; ``--steps`` AdamW steps of those layers from the cached hidden states
entering them (16 rows of 72 tokens, a causal-LM loss over the vocabulary: what a training step of the
main job computes, without its loss's details), then the evaluation of the main job
(:func:`shiq_eval.evaluate.evaluate_policy`: ``eval.samples_per_prompt`` samples per held-out prompt and their
exact KL, ``eval.batch_size`` prompts at a time). The evaluation's settings (``eval.batch_size``,
``eval.samples_per_prompt``, ``eval.show_samples``) and the defaults of ``--batch``, ``--new-tokens``
(``data.max_new_tokens``) and ``--trained`` (``train.trainable_last_layers``) are read from the main job's
``configs/demo.yaml`` next to this folder.

One run, side by side: ``--runs`` such arms one after the other, a process each with all ``--threads``
threads; and the same arms in ``--runs`` processes at once, ``--threads // --runs`` threads each (at least
one). With ``--rounds`` N the two ways alternate N times, one after the other first in even rounds (0, 2,
...) and side by side first in odd ones, so neither always runs first; medians over the rounds are reported.
The wall time includes each process's start and its loading of the model, the tokenizer and the prompts
(every arm loads them, either way); the seconds per arm exclude them (their mean over every arm and round).
The table gives both and the ratio of the wall times.

    python tools/bench_jobs.py                    # 2 arms, 2 threads, 20 steps, 64 prompts, 1 round
    python tools/bench_jobs.py --runs 3 --steps 5 --prompts 16 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import _args

from shiq_data.cli_common import ArgumentParser

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"  # the main job's settings


def demo_config() -> dict:
    """The main job's configuration, ``configs/demo.yaml`` (without its ``quick`` block)."""
    import yaml

    with open(DEMO_CONFIG, encoding="utf-8") as f:
        return yaml.safe_load(f)


def parse_args(argv=None):
    cfg = demo_config()
    p = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Prints the wall time of the arms one after the other (all threads) and side by side (one process "
        "each, the threads shared), model loading included, and how many times sooner side by side is.",
    )
    p.add_argument("--runs", type=_args.processes, default=2, help="arms to run (default 2)")
    p.add_argument(
        "--threads", type=_args.threads, default=2, help="torch CPU threads in all (default 2: this machine's cores)"
    )
    p.add_argument("--steps", type=_args.count, default=20, help="training steps per arm (default 20)")
    p.add_argument("--prompts", type=_args.count, default=64, help="held-out prompts evaluated per arm (default 64)")
    p.add_argument(
        "--batch",
        type=_args.count,
        default=cfg["eval"]["batch_size"],
        help=f"prompts sampled together in the evaluation (default {cfg['eval']['batch_size']}: the main job's "
        "eval.batch_size in configs/demo.yaml)",
    )
    p.add_argument(
        "--new-tokens",
        type=_args.count,
        default=cfg["data"]["max_new_tokens"],
        help=f"new tokens per completion (default {cfg['data']['max_new_tokens']}: the main job's data.max_new_tokens)",
    )
    p.add_argument(
        "--trained",
        type=_args.integer(1, 29),
        default=cfg["train"]["trainable_last_layers"],
        help=f"trained last layers of 30 (default {cfg['train']['trainable_last_layers']}: the main job's "
        "train.trainable_last_layers)",
    )
    p.add_argument(
        "--rounds",
        type=_args.count,
        default=1,
        help="rounds of both ways, the first way alternating; medians reported (default 1)",
    )
    p.add_argument(
        "--arm", type=_args.count_or_zero, default=None, help=argparse.SUPPRESS
    )  # a child: run arm N, print JSON
    args = p.parse_args(argv)
    if args.prompts > (held_out := _args.movie_prompt_count()):
        p.error(f"--prompts: there are {held_out} held-out movie prompts, got {args.prompts}")
    return args


def arm(args, seed: int, threads: int) -> float:
    """One stand-in arm with ``threads`` torch threads; returns its seconds (after loading the model)."""
    warnings.filterwarnings("ignore")
    import copy

    import torch

    from shiq_data.chat import user_prompt_ids
    from shiq_eval.evaluate import evaluate_policy
    from shiq_eval.moviereviews import movie_prompts
    from shiq_eval.shared_layers import decoder_from, inputs_of_layer
    from shiq_train.hf_convert import load_smollm2

    torch.set_num_threads(threads)
    ref, tok = load_smollm2(torch.float32)
    ref.eval()
    policy = copy.deepcopy(ref)
    k = len(ref.model.layers) - args.trained
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.model.layers[k:].parameters():
            p.add_(0.02 * p.abs().mean() * torch.randn(p.shape, generator=g))
    ev = demo_config()["eval"]  # the main job's evaluation settings
    n = ev["samples_per_prompt"]  # each prompt repeated, prompt-major, as the main job does
    texts, openings = movie_prompts(args.prompts)
    ids = [user_prompt_ids(tok, t) for t in texts for _ in range(n)]
    openings = [o for o in openings for _ in range(n)]
    tokens = torch.randint(0, ref.config.vocab_size, (16, 72), generator=g)  # [B, T]
    t0 = time.perf_counter()
    with torch.no_grad(), inputs_of_layer(policy, k) as seen:  # the frozen layers once, as the buffer's cache
        policy(tokens)
    hidden = seen[0]  # [B, T, H]
    tail = decoder_from(policy, k).train()
    trained = [p for layer in policy.model.layers[k:] for p in layer.parameters()]
    opt = torch.optim.AdamW(trained, lr=2e-4)
    for _ in range(args.steps):
        h = tail(inputs_embeds=hidden, use_cache=False).last_hidden_state  # [B, T, H]
        logits = policy.lm_head(h[:, :-1])  # [B, T-1, V]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()
    zero = lambda prompts, completions: [0.0] * len(completions)  # noqa: E731  scoring is not measured
    evaluate_policy(
        policy,
        ref,
        tok,
        ids,
        openings,
        zero,
        max_new_tokens=args.new_tokens,
        batch_size=args.batch,
        seed=seed,
        keep_samples=ev["show_samples"],
        progress=False,
        samples_per_prompt=n,
    )
    return time.perf_counter() - t0


def child(args, n: int, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--arm", str(n), "--threads", str(threads)]
    for flag in ("steps", "prompts", "batch", "new_tokens", "trained"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def collect(procs: list[subprocess.Popen]) -> list[float]:
    """The seconds each arm reports; when one fails, the others are stopped."""
    out = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"bench_jobs: an arm failed (exit {proc.returncode}):\n{stderr[-2000:]}")
            out.append(json.loads(stdout.strip().splitlines()[-1])["seconds"])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.arm is not None:
        print(json.dumps({"seconds": arm(args, args.arm, args.threads)}))
        return
    each = max(1, args.threads // args.runs)

    def one_after_the_other() -> list[float]:  # one process per arm too (the same model loading), all threads
        return [collect([child(args, n, args.threads)])[0] for n in range(args.runs)]

    def side_by_side() -> list[float]:
        return collect([child(args, n, each) for n in range(args.runs)])

    ways = {"one after the other": one_after_the_other, "side by side": side_by_side}
    arm_seconds = {w: [] for w in ways}  # every arm's seconds, every round
    wall = {w: [] for w in ways}  # per round
    for r in range(args.rounds):
        for w in list(ways) if r % 2 == 0 else list(reversed(ways)):
            t0 = time.perf_counter()
            arm_seconds[w] += ways[w]()
            wall[w].append(time.perf_counter() - t0)
    t_serial, t_parallel = (statistics.median(wall[w]) for w in ways)
    serial, parallel = arm_seconds.values()
    samples = demo_config()["eval"]["samples_per_prompt"]
    print(
        f"{args.runs} stand-in arms of the main job (SmolLM2-135M, last {args.trained} layers: {args.steps} training "
        f"steps of 16 x 72 tokens, then {args.prompts} prompts x {samples} sample(s) with {args.new_tokens} new "
        f"tokens and their KL, {args.batch} prompts a batch); wall seconds the median of {args.rounds} round(s), "
        "the first way alternating; seconds per arm the mean over every arm and round"
    )
    print()
    print("| how | threads per arm | mean seconds per arm (excluding model loading) | wall seconds in all | sooner |")
    print("|---|---|---|---|---|")
    print(f"| one after the other | {args.threads} | {sum(serial) / len(serial):.1f} | {t_serial:.1f} | 1.00x |")
    print(
        f"| side by side | {each} | {sum(parallel) / len(parallel):.1f} | {t_parallel:.1f} | "
        f"{t_serial / t_parallel:.2f}x |"
    )


if __name__ == "__main__":
    main()
