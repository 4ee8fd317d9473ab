"""One forward and backward of SmolLM2-135M through megatron-core with each core attention, and through transformers.

Three contestants hold the same weights (SmolLM2-135M-Instruct, float32) in ONE process and run in
turns (A B C, then C B A, ...), so load from other jobs hits all alike:

- megatron attention: the trainer's GPTModel (local layers) with model.attention_backend=megatron
  (megatron-core's DotProductAttention: [B, heads, T, T] scores, masked softmax, two batched matmuls).
- sdpa attention: the same model with model.attention_backend=sdpa (torch's scaled_dot_product_attention).
- transformers: LlamaForCausalLM (its own scaled_dot_product_attention).

Each step is a forward on B rows of T random tokens and the backward of the mean next-token
log-likelihood (the megatron model's vocab-parallel statistics, transformers' labels= loss); no
optimizer. Printed per shape: seconds of each contestant's steps, and their speed relative to the
megatron-attention model. With --profile, the first round runs under torch.profiler and the top
operators by self CPU time are printed for each contestant.

    python tools/bench_attention.py                           # 16 x 64 and 4 x 512 tokens, 3 rounds, 1 thread
    python tools/bench_attention.py --shapes 4x512 --profile
"""

from __future__ import annotations

import sys
import time
import warnings

import _args
from bench_vs_trl import build_hf

from shiq_data.cli_common import ArgumentParser

CONTESTANTS = ("megatron attention", "sdpa attention", "transformers")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shapes",
        type=_args.shapes,
        default="16x64,4x512",
        help="rows x tokens, comma-separated (default 16x64,4x512)",
    )
    p.add_argument("--rounds", type=_args.count, default=3, help="timed rounds over the contestants (default 3)")
    p.add_argument("--threads", type=_args.threads, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2", help="tiny: a random 2-layer Llama")
    p.add_argument("--profile", action="store_true", help="profile the first round; print the top operators")
    p.add_argument("--top", type=_args.count, default=12, help="operators printed per profile (default 12)")
    return p.parse_args(argv)


def build(model: str):
    """``{contestant: (module, step function of tokens -> loss)}`` from one set of Llama weights."""
    from shiq_train.hf_convert import import_llama, model_config_from_llama  # heavy: torch, megatron
    from shiq_train.model import build_model, forward_stats  # heavy: torch, megatron

    hf = build_hf(model).train()
    out = {}
    for name, backend in (("megatron attention", "megatron"), ("sdpa attention", "sdpa")):
        mg = build_model(model_config_from_llama(hf.config, attention_backend=backend, params_dtype="float32"))
        import_llama(mg, hf.state_dict(), hf.config)
        mg.train()

        def step(tokens, mg=mg):
            st = forward_stats(mg, tokens)
            loss = (st.logz[:, 1:] - st.chosen_logits[:, 1:]).mean()
            loss.backward()
            return loss

        out[name] = (mg, step)

    def hf_step(tokens):
        loss = hf(input_ids=tokens, labels=tokens).loss
        loss.backward()
        return loss

    out["transformers"] = (hf, hf_step)
    return out


def top_ops(prof, n: int) -> list[tuple[str, float, float]]:
    """``(operator, self CPU seconds, share of the total)`` of the ``n`` largest."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:n]
    return [(e.key, e.self_cpu_time_total / 1e6, e.self_cpu_time_total / total) for e in top]


def run_shape(models: dict, B: int, T: int, args, vocab: int) -> dict:
    """Seconds of each contestant's timed steps, its warm-up loss, and the profiles (with --profile)."""
    import torch  # heavy: only the run needs it
    from torch.profiler import ProfilerActivity, profile  # heavy: only the run needs it

    tokens = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(0))
    seconds = {c: [] for c in models}
    losses, profiles = {}, {}
    for c, (module, step) in models.items():  # warm-up
        losses[c] = float(step(tokens))
        module.zero_grad(set_to_none=True)
    for r in range(args.rounds):
        for c in list(models) if r % 2 == 0 else list(models)[::-1]:
            module, step = models[c]
            if args.profile and r == 0:
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    step(tokens)
                profiles[c] = top_ops(prof, args.top)
                module.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            step(tokens)
            seconds[c].append(time.perf_counter() - t0)
            module.zero_grad(set_to_none=True)
    return {"seconds": seconds, "losses": losses, "profiles": profiles}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch  # heavy: --help does not need it

    from shiq_train import parallel  # heavy: torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    parallel.init_distributed(seed=0)
    try:
        models = build(args.model)
        vocab = models["transformers"][0].config.vocab_size
        print(f"model {args.model}, float32, {args.threads} thread(s), {args.rounds} round(s), one process")
        for B, T in args.shapes:
            res = run_shape(models, B, T, args, vocab)
            print(f"\n{B} rows x {T} tokens: forward + backward")
            print("| contestant | seconds per step | speed / megatron attention | loss |")
            print("|---|---|---|---|")
            base = sum(res["seconds"]["megatron attention"])
            for c, secs in res["seconds"].items():
                steps = ", ".join(f"{s:.2f}" for s in secs)
                print(f"| {c} | {steps} | {base / sum(secs):.2f}x | {res['losses'][c]:.5f} |")
            for c, ops in res["profiles"].items():
                print(f"\n{c}, {B} x {T}, top operators by self CPU time (profiled round):")
                for name, s, share in ops:
                    print(f"  {name:60s} {s:8.3f} s {100 * share:5.1f}%")
    finally:
        parallel.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
