"""Training-step cost of ShiQ against plain SFT, and memory of chunked against full-logit statistics.

One run, one model, the same micro-batches (CPU, megatron-core GPTModel, TP=1):

- ``sft (action positions)``: the project's SFT objective (``shiq-train loss=sft``, SHIQ_MATH §5) through the
  same step as ShiQ: the output layer runs on the action positions only, as it does for every loss of the
  family. This is the same output-layer work as the ShiQ rows, so it is the baseline of the ratios.
- ``sft (megatron cross-entropy)``: megatron's own causal-LM loss (``GPTModel(..., labels=)`` →
  ``vocab_parallel_cross_entropy``), masked mean over completion tokens: the plain SFT step of a
  megatron user, whose output layer runs on every position (prompt included).
- ``shiq (precomputed ref)``: the ShiQ loss (SHIQ_MATH §3) with reference statistics read from the batch.
- ``shiq (online ref)``: the same, plus a forward pass of a frozen reference model per micro-batch.
- ``shiq (chunked stats)``: the same as precomputed, statistics computed ``--chunk`` tokens at a time.

Every step is a full optimizer step (forward, backward, gradient clipping, AdamW). Methods run
interleaved, every other pass reversed (A B C D D C B A ...) after one warm-up each, so load from other processes hits all alike;
the table gives the median and the ratio to SFT on the action positions.

Memory: the per-token statistics of SHIQ_MATH §2 (chosen logit and log-partition, forward and backward,
including the output-weight gradient) from final hidden states ``[B, T, H]``, full logits against
chunked, each in a fresh subprocess that holds nothing else. Peak = the process's resident high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs`` just before the computation, once ``malloc_trim`` has
returned freed temporaries to the system) minus its resident size at that point. (The peak since the process
started, ``ru_maxrss``, would hide the first tens of MiB of either path under the transient peak of importing
torch and megatron.) torch's large CPU buffers are mmap-backed and returned to the OS when freed, so the
resident peak tracks its allocator.

    python tools/bench_train.py                 # defaults: hidden 256, 4 layers, vocab 49152, seq 256, batch 4
    python tools/bench_train.py --reps 3 --vocab 8192
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings

import _args

from shiq_data.cli_common import ArgumentParser


def parse_args(argv=None):
    p = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Prints a table of median step times (and ratio to SFT on the action positions) and of peak "
        "statistics memory (full logits vs chunked).",
    )
    _args.add_model_shape(p, vocab=49152, seq=256, vocab_note=", SmolLM2's")
    p.add_argument("--prompt", type=_args.count, default=64, help="prompt tokens per row (not actions; default 64)")
    p.add_argument("--chunk", type=_args.count, default=64, help="tokens per chunk on the chunked path (default 64)")
    p.add_argument("--reps", type=_args.count, default=5, help="timed steps per method after one warm-up (default 5)")
    p.add_argument("--threads", type=_args.threads, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--skip-time", action="store_true", help="only measure memory")
    p.add_argument("--skip-memory", action="store_true", help="only measure step times")
    p.add_argument("--memory-child", choices=["full", "chunked"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    _args.check_model_shape(p, args)
    if args.prompt >= args.seq:
        p.error(f"--prompt {args.prompt} must be below --seq {args.seq}: a row needs actions after its prompt")
    if args.skip_time and args.skip_memory:
        p.error("--skip-time and --skip-memory together leave nothing to measure")
    return args


# ----------------------------------------------------------------------------------------------
# step times


def make_batch(args, seed=0):
    """One micro-batch ``[B, T]``: random tokens, actions after the prompt, a reward on the last token."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    mask = torch.zeros(args.batch, args.seq, dtype=torch.bool)
    mask[:, args.prompt :] = True
    rewards = torch.zeros(args.batch, args.seq)
    rewards[:, -1] = torch.randn(args.batch, generator=g)
    return {"tokens": tokens, "action_mask": mask, "rewards": rewards}


def sft_step(model, optimizer, scheduler, micro_batches, clip_grad):
    """An SFT optimizer step through megatron's schedule and its own cross-entropy loss."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from shiq_train.model import model_inputs
    from shiq_train.train_step import clip_grad_norm, finalize_grads

    def forward_step(it, model):
        mb = next(it)
        labels = mb["tokens"].roll(-1, dims=1)  # label at t = token t + 1 (the last one is masked out)
        per_token = model(**model_inputs(mb["tokens"]), labels=labels)  # [B, T] cross-entropy
        mask = mb["action_mask"].roll(-1, dims=1)
        mask[:, -1] = False

        def loss_func(out):
            loss = (out * mask).sum() / mask.sum()
            return loss, {"loss": loss.detach().clone()}

        return per_token, loss_func

    optimizer.zero_grad(set_to_none=True)
    tokens = micro_batches[0]["tokens"]
    model.stats_from_labels = False  # labels= gives megatron's cross-entropy, not SHIQ_MATH §2 statistics
    try:
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=model,
            num_microbatches=len(micro_batches),
            seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0],
            forward_only=False,
        )
    finally:
        model.stats_from_labels = True
    finalize_grads(model)
    clip_grad_norm(model, clip_grad)
    optimizer.step()
    scheduler.step()


BASE = "sft (action positions)"  # the ratios' baseline: the same output-layer work as ShiQ's step


def pass_order(items: list, rep: int) -> list:
    """The methods of timed pass ``rep``: in order, reversed every other pass (A B C C B A ...), so that no method
    always runs after the same one (the cache and allocator state it leaves)."""
    return items if rep % 2 == 0 else items[::-1]


def time_steps(args) -> list[dict]:
    import torch
    from tqdm.auto import tqdm

    from shiq_train import model as M
    from shiq_train import parallel
    from shiq_train.objectives import LossConfig
    from shiq_train.train_step import OptimizerConfig, build_optimizer, objective_loss_fn, train_step
    from shiq_train.trainer import _capture_reference, frozen_copy

    torch.set_num_threads(args.threads)
    parallel.init_distributed(seed=0)
    try:
        cfg = M.ModelConfig(
            num_layers=args.layers,
            hidden_size=args.hidden,
            num_attention_heads=args.heads,
            vocab_size=args.vocab,
            max_sequence_length=args.seq,
        )
        chunked_cfg = M.ModelConfig(**{**cfg.to_dict(), "logits_chunk_tokens": args.chunk})
        model = M.build_model(cfg)
        ref = frozen_copy(model, cfg)
        chunked = frozen_copy(model, chunked_cfg).train()
        for p in chunked.parameters():
            p.requires_grad_(True)
        opt_cfg = OptimizerConfig(lr=1e-5)
        opt, sched = build_optimizer(model, opt_cfg)
        copt, csched = build_optimizer(chunked, opt_cfg)
        loss_fn = objective_loss_fn(LossConfig("shiq", beta=0.1))
        sft_fn = objective_loss_fn(LossConfig("sft", beta=0.1))  # beta is not read by SFT
        batch = make_batch(args)
        with torch.no_grad():
            st = M.forward_stats(ref, batch["tokens"])
        with_ref = {**batch, "ref_chosen_logits": st.chosen_logits, "ref_logz": st.logz}

        def online():
            mbs = [dict(batch)]
            _capture_reference(ref, mbs)
            train_step(model, opt, sched, mbs, loss_fn, 1.0)

        methods = {
            BASE: lambda: train_step(model, opt, sched, [dict(batch)], sft_fn, 1.0),
            "sft (megatron cross-entropy, every position)": lambda: sft_step(model, opt, sched, [dict(batch)], 1.0),
            "shiq (precomputed ref)": lambda: train_step(model, opt, sched, [dict(with_ref)], loss_fn, 1.0),
            "shiq (online ref)": online,
            f"shiq (chunked stats, {args.chunk} tokens)": lambda: train_step(
                chunked, copt, csched, [dict(with_ref)], loss_fn, 1.0
            ),
        }
        times = {k: [] for k in methods}
        for fn in methods.values():  # warm-up
            fn()
        for rep in tqdm(range(args.reps), desc="timing", dynamic_ncols=True):
            for name, fn in pass_order(list(methods.items()), rep):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    finally:
        parallel.destroy_distributed()
    base = statistics.median(times[BASE])
    return [
        {
            "method": k,
            "median_s": statistics.median(v),
            "min_s": min(v),
            "max_s": max(v),
            "ratio_to_sft": statistics.median(v) / base,
        }
        for k, v in times.items()
    ]


# ----------------------------------------------------------------------------------------------
# statistics memory


def memory_child(args) -> dict:
    """Peak RSS increase (MiB) of statistics forward + backward from hidden states, in this process."""
    import torch

    from shiq_train import vocab_parallel as vp

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.batch, args.seq, args.hidden, generator=g).requires_grad_(True)
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.02).requires_grad_(True)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)

    def stats():
        if args.memory_child == "full":
            st = vp.vocab_parallel_causal_stats(hidden @ weight.t(), tokens)
        else:
            st = vp.chunked_causal_stats(hidden, weight, tokens, args.chunk)
        (st.logz - st.chosen_logits).mean().backward()

    return {"path": args.memory_child, "peak_increase_mib": peak_increase_mib(stats)}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_increase_mib(fn) -> float:
    """How far ``fn()`` raises this process's resident memory above its size when called (MiB): ``VmHWM`` reset
    to the resident size first, so an earlier, higher peak (importing torch) hides nothing."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed temporaries would otherwise be reused unseen
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current resident size
        f.write("5")
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) / 1024


def measure_memory(args) -> list[dict]:
    rows = []
    for path in ("full", "chunked"):
        cmd = [
            sys.executable,
            __file__,
            "--memory-child",
            path,
            "--hidden",
            str(args.hidden),
            "--heads",
            str(args.heads),
            "--vocab",
            str(args.vocab),
            "--seq",
            str(args.seq),
            "--prompt",
            str(args.prompt),
            "--batch",
            str(args.batch),
            "--chunk",
            str(args.chunk),
            "--threads",
            str(args.threads),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["no message"])[-1]
            sys.exit(f"bench_train: the {path} memory measurement failed (exit {out.returncode}): {last}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    full = rows[0]["peak_increase_mib"]
    if full < 1.0:
        raise RuntimeError("the full-logits statistics raised no measurable peak RSS; rerun on a less loaded machine")
    for r in rows:
        # below a page-level resolution the increase can read as 0: report the ratio as a lower bound
        r["full_over_this"] = full / max(r["peak_increase_mib"], 1.0)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.memory_child:
        print(json.dumps(memory_child(args)))
        return 0
    print(
        f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}; "
        f"micro-batch {args.batch} x {args.seq} tokens ({args.seq - args.prompt} actions per row); "
        f"{args.threads} threads"
    )
    # memory first: its fresh subprocesses then run while this process is still small
    if not args.skip_memory:
        rows = measure_memory(args)
        logits_mib = args.batch * (args.seq - 1) * args.vocab * 4 / 2**20
        print(f"\n| statistics fwd+bwd, vocab {args.vocab} | peak RSS increase (MiB) | full / this |\n|---|---|---|")
        for r in rows:
            label = "full logits" if r["path"] == "full" else f"chunked ({args.chunk} tokens)"
            print(f"| {label} | {r['peak_increase_mib']:.0f} | {r['full_over_this']:.1f}x |")
        print(f"(one float32 copy of the full logits is {logits_mib:.0f} MiB)")
    if not args.skip_time:
        rows = time_steps(args)
        print(f"\n| step (median of {args.reps}) | seconds | min | max | / sft (actions) |\n|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['method']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | "
                f"{r['ratio_to_sft']:.2f}x |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
