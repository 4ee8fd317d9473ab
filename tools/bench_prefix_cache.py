"""Training-step time with and without the frozen-prefix cache and shared prefixes, on the demo's model and batch shape.

SmolLM2-135M-Instruct (the packaged model, 30 layers) as a megatron GPT, the last ``--trainable`` layers
and the final norm trained (embeddings frozen), ShiQ loss on a synthetic replay buffer of
``--groups`` prompt groups of ``--group-size`` completions (rows of about ``--tokens`` tokens, 60% of
them the group's prompt, whose first ``--system`` tokens every prompt shares, as a chat template's system
turn; reference statistics present), or on a replay buffer of your own (``--buffer``, e.g. a
``shiq-demo`` run's ``DIR/buffer``), micro-batches of ``--rows`` rows in groups mode, ``--micro-batches`` a
step, as in ``shiq-demo`` by default (``shiq-bfcl``: the third command below). Three copies of the model
take the same micro-batches: ``full`` runs all 30 layers at every step; ``cached`` runs only the
trainable layers on the hidden states of ``shiq_train.prefix_cache.PrefixCache`` (their lookup included
in the step); ``shared`` does too, and runs the leading tokens its rows share once
(``train.share_prefixes``, ``shiq_train.prefix_tree``; building the tree included). Steps run
interleaved after one warm-up each, every other pass reversed (full, cached, shared, then shared, cached,
full, ...), so neither load from other processes nor the order favours a path. Also timed: the one-off cache build
over the whole buffer, as tries of token-sorted rows (the default), then as length-sorted padded rows (their
states must agree), both after an untimed warm-up build of the buffer's first ``WARM_ROWS`` rows each way (the
model's first forward passes and allocations, one-time costs that would otherwise fall on the first way
timed); and the first step's loss of every path (they must agree).

    python tools/bench_prefix_cache.py                # 640 rows of ~50 tokens, 16 rows a step, 6 of 30 layers
    python tools/bench_prefix_cache.py --reps 5 --trainable 2
    python tools/bench_prefix_cache.py --buffer runs/demo/buffer   # the main job's own rows
    python tools/bench_prefix_cache.py --trainable 4 --groups 8 --group-size 2 --tokens 2556 --rows 2 \
        --micro-batches 2 --logits-chunk 1024 --reps 3   # shiq-bfcl's shape: 2 scenarios of 2 trajectories
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from pathlib import Path

import _args

from shiq_data.cli_common import ArgumentParser


def parse_args(argv=None):
    p = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Prints the median step time of each path, their ratio, the cache build time and the "
        "number of steps after which the cache has paid for itself.",
    )
    p.add_argument("--trainable", type=_args.integer(1, 29), default=6, help="trainable last layers of 30 (default 6)")
    p.add_argument("--groups", type=_args.count, default=160, help="prompt groups in the buffer (default 160)")
    p.add_argument("--group-size", type=_args.count, default=4, help="rows per prompt group (default 4)")
    p.add_argument("--tokens", type=_args.count, default=50, help="mean tokens per row (default 50; +-6)")
    p.add_argument(
        "--system",
        type=_args.count_or_zero,
        default=24,
        help="leading prompt tokens every row shares (default 24; 0: none)",
    )
    p.add_argument(
        "--buffer", type=_args.buffer_folder, default=None, help="a replay buffer to read instead of synthetic rows"
    )
    p.add_argument("--rows", type=_args.count, default=16, help="rows per micro-batch, whole groups (default 16)")
    p.add_argument("--micro-batches", type=_args.count, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument(
        "--logits-chunk",
        type=_args.count_or_zero,
        default=0,
        help="output layer this many positions at a time (default 0: all at once)",
    )
    p.add_argument("--reps", type=_args.count, default=7, help="timed steps per path after one warm-up (default 7)")
    p.add_argument("--threads", type=_args.threads, default=2, help="torch CPU threads (default 2)")
    args = p.parse_args(argv)
    if args.buffer is None and args.rows < args.group_size:
        p.error(f"--rows {args.rows}: a micro-batch holds whole groups, at least --group-size {args.group_size} rows")
    return args


WARM_ROWS = 64  # rows of the untimed warm-up build, each way, before the cache builds are timed


def timed_builds(model, buffer, trainable: int, warm_rows: int = WARM_ROWS):
    """``(cache, seconds, padded, padded_seconds)``: the cache of every row of ``buffer`` built as tries (the
    default) and as length-sorted padded rows, each timed, after one untimed build of each way over the first
    ``warm_rows`` rows (the one-time costs of a first forward fall on neither timed build)."""
    from shiq_train.prefix_cache import PrefixCache, _buffer_tokens

    warm = _buffer_tokens(buffer)[:warm_rows]
    for share in (None, False):
        PrefixCache.build(model, warm, trainable, share_prefixes=share, progress=False)
    t0 = time.perf_counter()
    cache = PrefixCache.from_buffer(model, buffer, trainable)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    padded = PrefixCache.from_buffer(model, buffer, trainable, share_prefixes=False)
    return cache, seconds, padded, time.perf_counter() - t0


def pass_order(items: list, rep: int) -> list:
    """The paths of timed pass ``rep``: in order, reversed every other pass (A B C C B A ...), so that no path
    always runs after the same one (the cache and allocator state it leaves)."""
    return items if rep % 2 == 0 else items[::-1]


def synthetic_buffer(out: Path, args, vocab: int):
    """``args.groups`` groups of ``args.group_size`` rows: the group's prompt (its first ``args.system`` tokens
    the same in every group), then actions, a reward on the last one. A group's rows are of about
    ``args.tokens`` tokens, its prompt 60% of their mean."""
    import numpy as np

    from shiq_data.buffer import write_buffer

    rng = np.random.default_rng(0)
    rows = []
    system = [int(t) for t in rng.integers(0, vocab, args.system)]
    for g in range(args.groups):
        p = max(int(args.tokens * 0.6), args.system + 1)
        prompt = (system + [int(t) for t in rng.integers(0, vocab, p)])[:p]
        for c in range(args.group_size):
            n = max(int(rng.integers(args.tokens - 6, args.tokens + 7)), p + 1)
            rewards = [0.0] * n
            rewards[-1] = float(np.float32(rng.normal()))
            rows.append(
                {
                    "row_id": f"g{g}c{c}",
                    "source": "bench",
                    "group_id": g,
                    "prompt_len": p,
                    "tokens": prompt + [int(t) for t in rng.integers(0, vocab, n - p)],
                    "action_mask": [False] * p + [True] * (n - p),
                    "rewards": rewards,
                    "ref_chosen_logits": [0.0] + [float(np.float32(x)) for x in rng.normal(0, 1, n - 1)],
                    "ref_logz": [0.0] + [float(np.float32(x)) for x in rng.normal(np.log(vocab), 1, n - 1)],
                }
            )
    info = {"name": "bench", "fingerprint": "b" * 64, "vocab_size": vocab}
    return write_buffer(rows, out, tokenizer_info=info, command=["bench"], progress=False, ref_model={"name": "bench"})


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from tqdm.auto import tqdm

    from shiq_data.buffer import open_buffer
    from shiq_data.sampler import BufferSampler
    from shiq_train import parallel
    from shiq_train.hf_convert import import_llama, load_smollm2, model_config_from_llama
    from shiq_train.model import build_model
    from shiq_train.objectives import LossConfig
    from shiq_train.prefix_cache import suffix_only
    from shiq_train.train_step import OptimizerConfig, build_optimizer, objective_loss_fn, train_step
    from shiq_train.trainer import add_prefix_trees, freeze_all_but_last_layers

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    hf, _ = load_smollm2()
    parallel.init_distributed(seed=0)
    try:
        models, opts = {}, {}
        for name in ("full", "cached", "shared"):
            m = build_model(model_config_from_llama(hf.config, logits_chunk_tokens=args.logits_chunk))
            import_llama(m, hf.state_dict(), hf.config)
            freeze_all_but_last_layers(m, args.trainable)
            models[name], opts[name] = m, build_optimizer(m, OptimizerConfig(lr=1e-5))
        layers = models["full"].config.num_layers
        with tempfile.TemporaryDirectory() as tmp:
            if args.buffer is not None:
                buffer = open_buffer(args.buffer)
            else:
                buffer = synthetic_buffer(Path(tmp) / "buffer", args, hf.config.vocab_size)
            cache, build_s, rows, build_rows_s = timed_builds(models["cached"], buffer, args.trainable)
            build_diff = float((rows.hidden - cache.hidden).abs().max() / rows.hidden.abs().max())
            del rows
            cache.check_model(models["cached"], args.trainable)
            sampler = BufferSampler(
                buffer, rows_per_micro_batch=args.rows, micro_batches_per_step=args.micro_batches, seed=0, mode="groups"
            )
            batches = [sampler.next_micro_batches() for _ in range(args.reps + 1)]
        loss_fn = objective_loss_fn(LossConfig("shiq", beta=0.3))

        def full(mbs):
            opt, sched = opts["full"]
            return train_step(models["full"], opt, sched, [dict(mb) for mb in mbs], loss_fn, 1.0)

        def cached(mbs):
            opt, sched = opts["cached"]
            mbs = cache.add_to([dict(mb) for mb in mbs])
            with suffix_only(models["cached"], cache.n_frozen):
                return train_step(models["cached"], opt, sched, mbs, loss_fn, 1.0)

        def shared(mbs):
            opt, sched = opts["shared"]
            mbs = add_prefix_trees(cache.add_to([dict(mb) for mb in mbs]))
            with suffix_only(models["shared"], cache.n_frozen):
                return train_step(models["shared"], opt, sched, mbs, loss_fn, 1.0)

        paths = {"full": full, "cached": cached, "shared": shared}
        first = {name: fn(batches[0])["loss"] for name, fn in paths.items()}  # warm-up, same batch
        times = {name: [] for name in paths}
        for rep, mbs in enumerate(tqdm(batches[1:], desc="timing", dynamic_ncols=True)):
            for name, fn in pass_order(list(paths.items()), rep):
                t0 = time.perf_counter()
                fn(mbs)
                times[name].append(time.perf_counter() - t0)
    finally:
        parallel.destroy_distributed()
    tokens = sum(int(mb["tokens"].numel()) for mbs in batches[1:] for mb in mbs) / args.reps
    real = sum(int(mb["lengths"].sum()) for mbs in batches[1:] for mb in mbs) / args.reps
    nodes = sum(t["prefix_tree"].num_nodes for mbs in batches[1:] for t in add_prefix_trees(mbs)) / args.reps
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"\nSmolLM2-135M, {args.trainable} of {layers} layers trainable, {args.rows * args.micro_batches} rows a step "
        f"(~{tokens:.0f} padded tokens), {args.threads} threads, median of {args.reps} interleaved steps, the order reversed every other step\n"
    )
    print("| path | s/step (median) | min | max | / full |")
    print("|---|---|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {med[k]:.3f} | {min(v):.3f} | {max(v):.3f} | {med[k] / med['full']:.2f}x |")
    saved = med["full"] - med["cached"]
    print(
        f"\ncache build (after an untimed warm-up build of {min(WARM_ROWS, len(cache))} rows each way): "
        f"{build_s:.1f} s for {len(cache)} rows ({cache.nbytes / 2**20:.1f} MiB); "
        f"speed-up {med['full'] / med['cached']:.2f}x; pays for itself after "
        f"{build_s / saved if saved > 0 else float('inf'):.1f} steps"
    )
    print(
        f"cache build as length-sorted padded rows: {build_rows_s:.1f} s ({build_rows_s / build_s:.2f}x the tries' "
        f"time); largest difference of their states {build_diff:.1e} (relative to the largest state)"
    )
    print(
        f"shared prefixes: {nodes:.0f} positions a step through the trainable layers against {real:.0f} real "
        f"tokens ({nodes / real:.2f}); speed-up {med['cached'] / med['shared']:.2f}x against cached"
    )
    rel = max(abs(first[k] - first["full"]) / abs(first["full"]) for k in ("cached", "shared"))
    print(
        f"first step's loss: full {first['full']:.6f}, cached {first['cached']:.6f}, shared {first['shared']:.6f} "
        f"(relative difference {rel:.1e})"
    )


if __name__ == "__main__":
    main()
