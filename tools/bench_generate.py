"""Sampling speed: the megatron model (MegatronPolicy) against transformers (HFPolicy, with and without
reading the prompts' shared leading tokens once).

One run, the same SmolLM2-135M-Instruct weights (imported into megatron-core), the same prompts (the
demo's held-out movie-review openings in the chat template), the same batches, greedy decoding so
both produce the same tokens (the table says how many completions agree exactly). Both keep a KV
cache: transformers' dynamic cache, megatron's ``StaticInferenceContext``. Methods alternate
(A B C C B A ...: the order reversed every other pass) after one warm-up each, so neither load from other
processes nor the order favours one.

    python tools/bench_generate.py                   # 32 prompts, 32 new tokens, batches of 8
    python tools/bench_generate.py --prompts 64 --batch 16 --reps 5
    python tools/bench_generate.py --prompts 16 --repeat 4 --batch 64 --new-tokens 24   # as the main job samples
    python tools/bench_generate.py --prompts 64 --batch 32 64 --new-tokens 24 --reps 2  # two batch sizes side by side

With several ``--batch`` sizes every engine runs at each, all in the same alternation, so the ratio
between batch sizes is measured side by side too.

With --repeat N every prompt comes N times in a row (N completions of each, as the main job's buffer
and J* samples); a fourth engine then reads every repeated prompt again, to show what reading each
distinct prompt of a batch once saves.
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
        epilog="Prints median seconds per pass over the prompts, generated tokens/s, and each engine's time against the first's.",
    )
    p.add_argument("--prompts", type=_args.count, default=32, help="held-out movie prompts (default 32)")
    p.add_argument("--new-tokens", type=_args.count, default=32, help="new tokens per prompt (default 32)")
    p.add_argument(
        "--batch",
        type=_args.count,
        nargs="+",
        default=[8],
        help="prompts per batch; several sizes are timed alike (default 8)",
    )
    p.add_argument(
        "--repeat", type=_args.count, default=1, help="times each prompt comes, one after another (default 1)"
    )
    p.add_argument("--reps", type=_args.count, default=3, help="timed passes per engine after one warm-up (default 3)")
    p.add_argument("--threads", type=_args.threads, default=2, help="torch CPU threads (default 2)")
    args = p.parse_args(argv)
    if args.prompts > (held_out := _args.movie_prompt_count()):
        p.error(f"--prompts: there are {held_out} held-out movie prompts, got {args.prompts}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    from shiq_eval.cli import encode_prompts
    from shiq_eval.generate import HFPolicy, MegatronPolicy, SamplingConfig
    from shiq_eval.moviereviews import movie_prompts
    from shiq_train import hf_convert as H
    from shiq_train import model as M
    from shiq_train import parallel

    torch.set_num_threads(args.threads)
    hf, tok = H.load_smollm2(torch.float32)
    prompts, _ = movie_prompts(args.prompts)
    ids = [p for p in encode_prompts(tok, prompts, chat=True) for _ in range(args.repeat)]
    with parallel.distributed(seed=0):
        mg = M.build_model(H.model_config_from_llama(hf.config, params_dtype="float32", logits_chunk_tokens=0))
        H.import_llama(mg, hf.state_dict(), hf.config)
        engines = {
            "transformers (HFPolicy)": HFPolicy(hf, eos_id=tok.eos_token_id),
            "transformers (HFPolicy, every prompt read whole)": HFPolicy(
                hf, eos_id=tok.eos_token_id, share_prefix=False
            ),
            "megatron-core (MegatronPolicy)": MegatronPolicy(mg.eval(), eos_id=tok.eos_token_id),
        }
        if args.repeat > 1:  # the default engine but for reading each distinct prompt once
            again = type("ReadAgain", (HFPolicy,), {"_read_prompts": HFPolicy._read_distinct})
            engines["transformers (HFPolicy, repeated prompts read again)"] = again(hf, eos_id=tok.eos_token_id)
        sizes = list(dict.fromkeys(args.batch))
        cfgs = {b: SamplingConfig(max_new_tokens=args.new_tokens, temperature=0, batch_size=b) for b in sizes}
        runs = {(name, b): (e, cfgs[b]) for b in sizes for name, e in engines.items()}  # [engine x batch size]
        outputs = {key: e.generate(ids, cfg) for key, (e, cfg) in runs.items()}  # warm-up
        times = {key: [] for key in runs}
        for rep in range(args.reps):
            for key in list(runs) if rep % 2 == 0 else list(runs)[::-1]:  # reversed every other pass
                e, cfg = runs[key]
                t0 = time.perf_counter()
                e.generate(ids, cfg)
                times[key].append(time.perf_counter() - t0)
    tokens = {key: sum(len(o) for o in out) for key, out in outputs.items()}
    base_key = next(iter(runs))
    base = statistics.median(times[base_key])
    same = sum(len(set(map(tuple, rows))) == 1 for rows in zip(*outputs.values()))  # the same in every run
    print(
        f"SmolLM2-135M-Instruct, {len(ids)} prompts ({min(map(len, ids))}-{max(map(len, ids))} tokens"
        f"{f', each {args.repeat} times' if args.repeat > 1 else ''}), "
        f"greedy, {args.new_tokens} new tokens, batches of {' and '.join(map(str, sizes))}, {args.threads} threads, "
        f"median of {args.reps}; identical completions: {same}/{len(ids)}"
    )
    print()
    print(f"| engine | batch | seconds per pass | generated tokens/s | time / {base_key[0]}, batch {base_key[1]} |")
    print("|---|---|---|---|---|")
    for name, b in runs:
        med = statistics.median(times[name, b])
        print(f"| {name} | {b} | {med:.2f} | {tokens[name, b] / med:,.0f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
