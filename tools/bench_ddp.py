"""Data-parallel training: optimizer-state memory per rank and step time, per-parameter reduce against megatron's DDP.

One run, gloo processes on this machine (CPU), a megatron GPT and the ShiQ loss (SHIQ_MATH §3), the same
micro-batches for every method. Methods:

- ``per-parameter``: the default (``optimizer.distributed=false``): one all-reduce per parameter over the
  data-parallel group (``shiq_train.train_step.finalize_grads``), every rank holding the whole AdamW state.
- ``megatron DDP``: megatron's DistributedDataParallel (one contiguous float32 gradient buffer, one
  all-reduce) with megatron's non-distributed optimizer: what ``optimizer.distributed=false`` would be on
  the engine's DDP.
- ``distributed``: ``optimizer.distributed=true``: megatron's DDP with the distributed optimizer
  (reduce-scatter, AdamW state and float32 masters sharded over the data-parallel ranks, all-gather).

Memory: bytes of optimizer state on each rank after a step (``shiq_train.dist_optim.optimizer_state_bytes``:
AdamW moments and step counts, and float32 master copies), for float32 and bfloat16 parameters, at each
data-parallel size (``megatron DDP`` float32 only: its bfloat16 optimizer is not adapted to CPU).

Time: training steps, methods interleaved (A B C, then C B A, ...) after a warm-up each, at each data-parallel
size above 1, each step timed in two phases (a barrier of all ranks before, between and after them), median per
method and phase and its ratio to ``per-parameter``'s, and the whole step's (each step's two phases summed):

- ``forward+backward+reduction``: zero the gradients, forward and backward over the micro-batches, and the
  gradients' reduction over the data-parallel ranks (``per-parameter``: ``finalize_grads``'s all-reduce per
  parameter; the other two: megatron's DDP, one all-reduce or reduce-scatter of its buffer, inside the schedule).
  The methods run the same model and loss here: this phase's ratio is that of the reduction strategies.
- ``update``: clipping by the global gradient norm, the optimizer's step and the schedule (``per-parameter``:
  ``train_step.clip_grad_norm`` and torch's fused AdamW, one kernel over every tensor; the other two:
  megatron's optimizer, its own norm and clipping and torch's AdamW looping over the tensors, as megatron-core
  falls back to on CPU; ``distributed`` steps 1/DP of the parameters and then all-gathers them). This phase
  mixes the optimizer implementation with the sharding: its ratio is not that of a reduction strategy.

The timed methods start from the same weights (``shiq_train.parallel.set_seed(0)`` before each build) and the same
AdamW settings (a constant learning rate: ``megatron DDP`` has no scheduler, the others' ``LambdaLR`` keeps the
rate), and each rank
checks that their losses (the data-parallel mean) agree step for step, the warm-up included, within
``LOSS_RTOL`` x max(1, |loss|): the largest difference is printed under the time table; when they differ, no time
table, one line naming the methods and the step, and exit status 1.

Checkpoints (``shiq_train.checkpoint.save_checkpoint``, float32, ``per-parameter`` and ``distributed``): the bytes
all ranks write against the state they hold once (the weights once, the optimizer state of one rank for
``per-parameter``, of every rank for ``distributed``: 1.00 means each value is written once), the largest rank
file's share of them, and the median seconds of a save (``--reps`` saves, the ranks' slowest; the two alternate, the order reversed
every other save).

    python tools/bench_ddp.py                 # DP 1, 2, 4; hidden 256, 4 layers, vocab 8192, 2 x 4 x 128 tokens
    python tools/bench_ddp.py --dp 2 --reps 3
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import warnings

import _args

from shiq_data.cli_common import ArgumentParser

METHODS = ("per-parameter", "megatron DDP", "distributed")
# the step's two timed phases: what the methods' reduction strategies differ in, and the optimizer's step
PHASES = {"gradients": "forward+backward+reduction", "update": "update"}


def parse_args(argv=None):
    p = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Prints a table of optimizer-state bytes per rank, one of checkpoint saves, and one of median times "
        "of the step's two phases (forward+backward+reduction, update) and of the whole step (ratios to per-parameter).",
    )
    p.add_argument(
        "--dp", type=_args.processes, nargs="+", default=[1, 2, 4], help="data-parallel sizes (default 1 2 4)"
    )
    _args.add_model_shape(p, vocab=8192, seq=128)
    p.add_argument("--micro-batches", type=_args.count, default=2, help="micro-batches per step and rank (default 2)")
    p.add_argument("--reps", type=_args.count, default=5, help="timed steps per method after one warm-up (default 5)")
    p.add_argument("--threads", type=_args.threads, default=1, help="torch CPU threads per process (default 1)")
    args = p.parse_args(argv)
    _args.check_model_shape(p, args)
    return args


def micro_batches(args, rank):
    import torch

    g = torch.Generator().manual_seed(rank)
    out = []
    for _ in range(args.micro_batches):
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
        mask = torch.zeros(args.batch, args.seq, dtype=torch.bool)
        mask[:, args.seq // 4 :] = True
        rewards = torch.zeros(args.batch, args.seq)
        rewards[:, -1] = torch.randn(args.batch, generator=g)
        stats = {"ref_chosen_logits": torch.zeros(args.batch, args.seq), "ref_logz": torch.zeros(args.batch, args.seq)}
        out.append({"tokens": tokens, "action_mask": mask, "rewards": rewards, **stats})
    return out


def megatron_ddp(model, opt_cfg):
    """megatron's DDP and non-distributed optimizer (FP32Optimizer, or Float16 with float32 masters), with the
    AdamW settings of ``opt_cfg`` as ``shiq_train.dist_optim.build_distributed`` passes them
    (``dist_optim.megatron_adamw``). No learning-rate scheduler: ``opt_cfg``'s schedule is constant (no warm-up,
    no decay), so the other methods' ``LambdaLR`` keeps their rate at ``opt_cfg.lr`` too."""
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from shiq_train.dist_optim import megatron_adamw

    bf16 = any(p.dtype == torch.bfloat16 for p in model.parameters())
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    model.config.no_sync_func = ddp.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    assert opt_cfg.warmup_steps == 0 and opt_cfg.decay_steps == 0  # a constant rate: no scheduler needed
    opt = megatron_adamw([ddp], opt_cfg, bf16, distributed=False)

    def gradients(mbs, loss_fn):
        from shiq_train.train_step import forward_backward

        ddp.zero_grad_buffer()
        opt.zero_grad()
        return forward_backward(ddp, mbs, loss_fn)[0]  # the reduction: megatron's finalize, in the schedule

    return opt, Step(gradients, opt.step)


class Step:
    """One training step in its two timed phases: ``gradients(micro_batches, loss_fn) -> loss`` (zero the
    gradients, forward, backward, their reduction over the data-parallel ranks; the loss is the step's, the
    data-parallel mean) and ``update()`` (clipping, the optimizer's step, the schedule); calling it runs both.
    ``model``: what a checkpoint saves beside the optimizer."""

    def __init__(self, gradients, update, model=None):
        self.gradients, self.update, self.model = gradients, update, model

    def __call__(self, mbs, loss_fn):
        loss = self.gradients(mbs, loss_fn)
        self.update()
        return loss


def build(method, args, dtype):
    """``(optimizer, Step)`` for a fresh model (its weights drawn from torch's generator: seed it before each
    build for the same weights)."""
    from shiq_train import model as M
    from shiq_train.dist_optim import build_distributed
    from shiq_train.train_step import OptimizerConfig, build_optimizer, gradients, update

    cfg = M.ModelConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        vocab_size=args.vocab,
        max_sequence_length=args.seq,
        params_dtype=dtype,
    )
    model = M.build_model(cfg)
    opt_cfg = OptimizerConfig(lr=1e-4, distributed=method == "distributed")
    if method == "megatron DDP":
        return megatron_ddp(model, opt_cfg)
    if method == "distributed":
        model, opt, sched = build_distributed(model, opt_cfg)
    else:
        opt, sched = build_optimizer(model, opt_cfg)
    return opt, Step(  # train_step's two phases
        lambda mbs, loss_fn: gradients(model, opt, mbs, loss_fn)[0],
        lambda: update(model, opt, sched, opt_cfg.clip_grad),
        model,
    )


def state_bytes(method, opt):
    from shiq_train.dist_optim import optimizer_state_bytes

    if method != "megatron DDP":
        return optimizer_state_bytes(opt)
    inner = opt.chained_optimizers[0]  # FP32Optimizer / Float16OptimizerWithFloat16Params
    masters = [m for g in getattr(inner, "fp32_from_float16_groups", []) for m in g]
    return optimizer_state_bytes(inner.optimizer) + sum(m.numel() * m.element_size() for m in masters)


def save_times(held: dict, args, out_dir) -> dict:
    """Save ``args.reps`` checkpoints of each method's ``(model, optimizer)`` in ``held`` (collective), the methods
    in the listed order in even saves (0, 2, ...) and reversed in odd ones, so the first save's costs and the
    order fall on neither alone: per method, this rank's seconds per save, and (after the first save) the bytes
    of every rank file and of the weights (data-parallel rank 0's parameters)."""
    import shutil
    from pathlib import Path

    import torch.distributed as dist

    from shiq_train.checkpoint import save_checkpoint

    out = {m: {"seconds": [], "files": {}} for m in held}
    for i in range(args.reps):
        for method in list(held) if i % 2 == 0 else list(held)[::-1]:
            model, opt = held[method]
            folder = Path(out_dir) / f"ckpt_{method.replace(' ', '_')}"
            dist.barrier()
            t0 = time.perf_counter()
            step_dir = save_checkpoint(folder, i + 1, model, opt)
            out[method]["seconds"].append(time.perf_counter() - t0)
            if i == 0 and dist.get_rank() == 0:
                out[method]["files"] = {p.name: p.stat().st_size for p in step_dir.glob("rank_*.pt")}
            dist.barrier()
            if dist.get_rank() == 0:
                shutil.rmtree(step_dir)
    for method, (model, opt) in held.items():
        out[method]["weights"] = sum(p.numel() * p.element_size() for p in model.parameters())
        out[method]["state"] = state_bytes(method, opt)
    return out


# relative to max(1, |loss|): ~80 float32 ulps; the methods' losses differ by 1-2 ulps (reduction, AdamW order)
LOSS_RTOL = 1e-5


def check_losses(losses: dict) -> tuple[float, str | None]:
    """``(largest |diff|, None)`` when every method's loss agrees with ``per-parameter``'s at every step within
    :data:`LOSS_RTOL` (times ``max(1, |loss|)``); else the diff and one line naming the first methods and step
    that do not (step 0: the warm-up)."""
    import math

    ref, largest = losses[METHODS[0]], 0.0
    for m in METHODS[1:]:
        if len(losses[m]) != len(ref):
            return math.inf, f"losses differ across methods: {m} took {len(losses[m])} steps, {METHODS[0]} {len(ref)}"
    for i, a in enumerate(ref):
        for m in METHODS[1:]:
            b = losses[m][i]
            diff = abs(a - b)
            if not diff <= LOSS_RTOL * max(1.0, abs(a)):  # (a NaN fails too)
                return diff, (
                    f"losses differ across methods: {METHODS[0]} {a:.8g} and {m} {b:.8g} at step {i}"
                    f"{' (warm-up)' if i == 0 else ''}, |diff| {diff:.3g} > {LOSS_RTOL:g} x max(1, |loss|)"
                )
            largest = max(largest, diff)
    return largest, None


def worker(rank, world, port, args, out_dir):
    import torch
    import torch.distributed as dist

    from shiq_train import parallel
    from shiq_train.losses import shiq_loss

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    def loss_fn(st, mb):
        r = (mb["rewards"], mb["action_mask"])
        return shiq_loss(st.chosen_logits, st.logz, mb["ref_chosen_logits"], mb["ref_logz"], *r, beta=0.1), {}

    with parallel.distributed(rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}", seed=0):
        mbs = micro_batches(args, rank)
        result = {"memory": {}, "time": {m: {ph: [] for ph in PHASES} for m in METHODS}}
        held = {}  # float32 models and optimizers whose checkpoints are timed
        for dtype in ("float32", "bfloat16"):
            for method in METHODS:
                if method == "megatron DDP" and dtype == "bfloat16":
                    continue  # its Float16 optimizer is not adapted to CPU (the project does not use it)
                parallel.set_seed(0)  # the same starting weights for every method (bytes and save times do not
                opt, step = build(method, args, dtype)  # depend on them, but each measured model is then known)
                step([dict(mb) for mb in mbs], loss_fn)  # AdamW allocates its state at the first step
                result["memory"][(dtype, method)] = state_bytes(method, opt)
                if dtype == "float32" and method != "megatron DDP":
                    held[method] = (step.model, opt)
                del opt, step
        result["checkpoint"] = save_times(held, args, out_dir)
        del held
        if world > 1:
            steps = {}
            for m in METHODS:  # the same starting weights for every method
                parallel.set_seed(0)
                steps[m] = build(m, args, "float32")[1]
            losses = result["loss"] = {m: [] for m in METHODS}  # per method, its steps' losses, warm-up first
            for m in METHODS:  # warm-up
                losses[m].append(float(steps[m]([dict(mb) for mb in mbs], loss_fn)))
            for r in range(args.reps):
                for m in METHODS if r % 2 == 0 else METHODS[::-1]:  # A B C, then C B A: no method always leads
                    dist.barrier()
                    t0 = time.perf_counter()
                    loss = steps[m].gradients([dict(mb) for mb in mbs], loss_fn)
                    dist.barrier()
                    t1 = time.perf_counter()
                    steps[m].update()
                    dist.barrier()
                    result["time"][m]["gradients"].append(t1 - t0)
                    result["time"][m]["update"].append(time.perf_counter() - t1)
                    losses[m].append(float(loss))
            result["loss_check"] = check_losses(losses)  # this rank's verdict: (largest |diff|, mismatch or None)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import torch.multiprocessing as mp

    from shiq_train.parallel import free_port

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dp in args.dp:
            print(f"bench_ddp: DP={dp} ...", file=sys.stderr, flush=True)
            mp.spawn(worker, args=(dp, free_port(), args, tmp), nprocs=dp, join=True)
            results[dp] = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(dp)]
    for dp, ranks in results.items():  # every rank's own check of the methods' losses, step for step
        for rank, r in enumerate(ranks):
            if dp > 1 and r["loss_check"][1] is not None:
                print(f"bench_ddp: DP={dp}, rank {rank}: {r['loss_check'][1]}: no time table", file=sys.stderr)
                return 1
    load = os.getloadavg()[0]
    print(
        f"\nhidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {args.micro_batches} micro-batches of "
        f"{args.batch} x {args.seq} tokens per rank; {args.threads} thread(s) per process; "
        f"load average {load:.1f} on {os.cpu_count()} cores\n"
    )
    print("| params | DP | " + " | ".join(f"{m}, bytes/rank" for m in METHODS) + " | distributed / per-parameter |")
    print("|---|---|" + "---|" * (len(METHODS) + 1))
    for dtype in ("float32", "bfloat16"):
        for dp, ranks in results.items():
            per_rank = {m: max(r["memory"].get((dtype, m), -1) for r in ranks) for m in METHODS}
            cells = " | ".join(f"{per_rank[m]:,}" if per_rank[m] >= 0 else "n/a" for m in METHODS)
            print(f"| {dtype} | {dp} | {cells} | {per_rank['distributed'] / per_rank['per-parameter']:.3f} |")
    print(
        "\n| DP | optimizer | bytes written, all ranks | / state held once | largest rank file / all | "
        "median s/save | distributed / per-parameter |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for dp, ranks in results.items():
        seconds = {}
        for m in ("per-parameter", "distributed"):
            c = [r["checkpoint"][m] for r in ranks]
            files = c[0]["files"]
            # the weights once; the optimizer state of one rank (replicated) or of every rank (sharded)
            held = c[0]["weights"] + (sum(x["state"] for x in c) if m == "distributed" else c[0]["state"])
            # the ranks' slowest save, the median of them
            seconds[m] = statistics.median(max(x["seconds"][i] for x in c) for i in range(len(c[0]["seconds"])))
            ratio = f"{seconds[m] / seconds['per-parameter']:.2f}x" if m == "distributed" else ""
            print(
                f"| {dp} | {m} | {sum(files.values()):,} | {sum(files.values()) / held:.2f} | "
                f"{max(files.values()) / sum(files.values()):.2f} | {seconds[m]:.3f} | {ratio} |"
            )
    timed = {dp: ranks[0]["time"] for dp, ranks in results.items() if dp > 1}
    if timed:
        print(
            "\n| DP | method | "
            + " | ".join(f"{label}, median s | / per-parameter" for label in (*PHASES.values(), "whole step"))
            + " |"
        )
        print("|---|---|" + "---:|" * (2 * len(PHASES) + 2))
        for dp, t in timed.items():
            med = {}
            for m in METHODS:  # per phase, and the whole step's (each step's phases summed)
                med[m] = [statistics.median(t[m][ph]) for ph in PHASES]
                med[m].append(statistics.median(sum(x) for x in zip(*(t[m][ph] for ph in PHASES))))
            for m in METHODS:
                cells = " | ".join(f"{s:.3f} | {s / ref:.2f}x" for s, ref in zip(med[m], med[METHODS[0]]))
                print(f"| {dp} | {m} | {cells} |")
        largest = max(r["loss_check"][0] for dp in timed for r in results[dp])
        steps = len(next(iter(results[next(iter(timed))][0]["loss"].values())))
        print(
            f"\nlosses agree across methods: max |diff| = {largest:.3g} over {steps} steps (warm-up included) "
            f"on every rank (tolerance {LOSS_RTOL:g} x max(1, |loss|), the same starting weights)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
