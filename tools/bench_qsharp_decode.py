"""Decoding cost of Q♯ guidance (GuidedPolicy) against plain sampling of the same-size policy (HFPolicy).

A ShiQ-trained policy samples with a plain softmax; Q♯ keeps the reference and pays, per token, a
top-k selection plus one value-model pass that scores the k candidates over the value trunk's KV
cache (SHIQ_MATH §8). One run, SmolLM2-135M-Instruct as the reference and as the plain policy, the
value trunk initialised from the same weights with a random atom head (the cost does not depend on
what the head learned), the same prompts (the demo's held-out movie-review openings in the chat
template) and batches, sampling at temperature 1. Q♯ runs twice: with both models reading the leading
tokens the prompts share once (``share_prefix``, the default), and reading every prompt whole; the tool
checks the two sample the same completions. Methods alternate (A B C C B A ...: the order reversed every
other pass) after one warm-up each, so neither load from other processes nor the order favours one; medians
are reported.

    python tools/bench_qsharp_decode.py                        # 8 prompts, 16 new tokens, k = 20
    python tools/bench_qsharp_decode.py --prompts 32 --new-tokens 32 --top-k 10 --reps 5
"""

from __future__ import annotations

import statistics
import time
import warnings

import _args

from shiq_data.cli_common import ArgumentParser

VOCAB = 49152  # SmolLM2's: the most candidates there are


def parse_args(argv=None):
    p = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Prints median seconds per pass over the prompts, generated tokens/s, and the ratio to plain sampling.",
    )
    p.add_argument("--prompts", type=_args.count, default=8, help="held-out movie prompts (default 8)")
    p.add_argument("--new-tokens", type=_args.count, default=16, help="new tokens per prompt at most (default 16)")
    p.add_argument("--batch", type=_args.count, default=8, help="prompts per batch (default 8)")
    p.add_argument("--top-k", type=_args.integer(1, VOCAB), default=20, help="Q♯ candidates per step (default 20)")
    p.add_argument("--beta", type=_args.positive_number, default=0.1, help="Q♯ KL weight (default 0.1)")
    p.add_argument("--atoms", type=_args.integer(2), default=11, help="return atoms of the value head (default 11)")
    p.add_argument("--reps", type=_args.count, default=3, help="timed passes per method after one warm-up (default 3)")
    p.add_argument("--threads", type=_args.threads, default=2, help="torch CPU threads (default 2)")
    args = p.parse_args(argv)
    if args.prompts > (held_out := _args.movie_prompt_count()):
        p.error(f"--prompts: there are {held_out} held-out movie prompts, got {args.prompts}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    from shiq_eval.cli import encode_prompts, movie_prompts
    from shiq_eval.generate import HFPolicy, SamplingConfig
    from shiq_eval.qsharp import GuidedPolicy
    from shiq_train.hf_convert import load_smollm2
    from shiq_train.qsharp_value import HFValueModel, atom_support

    torch.set_num_threads(args.threads)
    hf, tok = load_smollm2(torch.float32)
    prompts, _ = movie_prompts(args.prompts)
    ids = encode_prompts(tok, prompts, chat=True)
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0, batch_size=args.batch, seed=0)
    atoms = atom_support(0.0, 1.0, args.atoms)
    torch.manual_seed(0)
    value = HFValueModel.from_causal_lm(hf, atoms).eval()
    methods = {
        "plain sampling (HFPolicy, a ShiQ-trained policy)": HFPolicy(hf, eos_id=tok.eos_token_id),
        f"Q♯ guided (GuidedPolicy, k={args.top_k})": GuidedPolicy(
            hf, value, atoms, args.beta, top_k=args.top_k, eos_id=tok.eos_token_id
        ),
        f"Q♯ guided, every prompt read whole (k={args.top_k}, share_prefix=False)": GuidedPolicy(
            hf, value, atoms, args.beta, top_k=args.top_k, eos_id=tok.eos_token_id, share_prefix=False
        ),
    }
    for m in methods.values():  # warm-up
        m.generate(ids, cfg)
    times = {name: [] for name in methods}
    tokens = {name: [] for name in methods}
    completions = {}
    for rep in range(args.reps):
        for name in list(methods) if rep % 2 == 0 else list(methods)[::-1]:  # reversed every other pass
            m = methods[name]
            t0 = time.perf_counter()
            out = m.generate(ids, cfg)
            times[name].append(time.perf_counter() - t0)
            tokens[name].append(sum(len(o) for o in out))
            completions[name] = out
    base_name = next(iter(methods))
    rate = {name: statistics.median(n / t for n, t in zip(tokens[name], times[name])) for name in methods}
    print(
        f"SmolLM2-135M-Instruct, {len(ids)} prompts ({min(map(len, ids))}-{max(map(len, ids))} tokens), "
        f"temperature 1, at most {args.new_tokens} new tokens, batches of {args.batch}, {args.threads} threads, "
        f"{args.atoms} atoms, median of {args.reps} interleaved passes"
    )
    print()
    print("| method | seconds per pass | generated tokens per pass | generated tokens/s | tokens/s vs plain |")
    print("|---|---|---|---|---|")
    for name in methods:
        print(
            f"| {name} | {statistics.median(times[name]):.2f} | {statistics.median(tokens[name]):.0f} | "
            f"{rate[name]:,.1f} | {rate[name] / rate[base_name]:.2f}x |"
        )
    shared, whole = list(methods)[1:]
    same = sum(a == b for a, b in zip(completions[shared], completions[whole]))
    print()
    print(
        f"Q♯ reading the prompts' shared tokens once: {statistics.median(times[whole]) / statistics.median(times[shared]):.2f}x "
        f"the speed of reading every prompt whole; the same completions for {same} of {len(ids)} prompts."
    )


if __name__ == "__main__":
    main()
