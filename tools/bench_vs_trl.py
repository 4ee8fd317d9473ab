"""Training throughput of ShiQ on megatron-core against TRL's DPOTrainer and a plain transformers SFT step.

One run, one model (SmolLM2-135M-Instruct, float32, every parameter trained), the same AdamW (betas
0.9/0.999, no weight decay, gradient norm clipped at 1; torch's fused kernel, as the trainer steps it: TRL's
optim=adamw_torch_fused) and the same rows for every contestant. A step
takes the next P prompt pairs (a prompt with two completions, the better one first), that is 2P
trajectories, so every contestant trains on the same real tokens per step:

- shiq padded: the ShiQ loss (SHIQ_MATH §3) through the trainer's step (megatron-core GPTModel), reference
  statistics precomputed, the 2P trajectories as one micro-batch right-padded to its longest row.
- shiq packed: the same with the trajectories packed into rows of at most --pack-tokens tokens
  (segment ids, a block-diagonal causal mask; what data.mode=packed reads).
- shiq padded, compiled: shiq padded with every decoder layer under torch.compile (--compile only).
- trl dpo (precomputed ref), compiled: the same with TRL's own torch_compile=True (the Trainer compiles the
  whole model through accelerate, every dimension dynamic from the first step as for ShiQ; --compile only,
  with TRL's precomputed contestant), so the compiled ShiQ is also measured against a compiled TRL.
- shiq padded, all positions: shiq padded with the statistics of every position, as before the step ran
  the output layer on the action positions only (--all-positions only).
- shiq padded, megatron attention: shiq padded with megatron-core's own core attention
  (model.attention_backend=megatron) instead of torch's scaled_dot_product_attention (--megatron-attention
  only).
- megatron sft / megatron dpo: the SFT loss (completion tokens) and DPO (SHIQ_MATH §5, the pair of each
  prompt) through the same step and padding; DPO with precomputed reference statistics.
- trl dpo (online ref) / trl dpo (precomputed ref): TRL's DPOTrainer (sigmoid loss, beta 0.1) with a
  frozen reference forward each step, or with precompute_ref_log_probs; its collator pads the 2P
  sequences of a step to the longest; no gradient checkpointing (TRL turns it on by default; the
  others do not recompute either), float32, the rows given as token ids.
- transformers sft: LlamaForCausalLM(labels=) on the same padded rows, backward, clip, AdamW.

Row sets: synthetic (fixed length: every row --synthetic-len tokens, half prompt), buffer (pairs taken
from a replay buffer: in each prompt group the trajectories with the highest and the lowest return;
--buffer PATH, otherwise a small buffer of synthetic rows shaped like the demo's, 46-51 prompt and 9-29
completion tokens, groups of 4) and hh (synthetic tokens in the shape of Anthropic HH: 64-192 prompt
tokens, two completions of 16-128 tokens of different lengths).

Each contestant runs in its own process: it loads the model, precomputes what it precomputes, runs one
warm-up step and --steps timed steps, and reports each step's seconds and real tokens. Processes run one
after another, A B C ... then, for --rounds > 1, in reverse order ... C B A, so load from other jobs
hits all alike. Throughput = real (non-pad) tokens of the timed steps / their seconds (forward, backward,
clipping, optimizer step; batch assembly excluded for all). Peak memory = the process's resident
high-water mark (VmHWM) from the end of loading to the last step, the model, optimizer and
activations included.

    python tools/bench_vs_trl.py                              # three row sets, 8 pairs a step, 2 steps, 2 rounds
    python tools/bench_vs_trl.py --buffer runs/demo/buffer --sets buffer --compile
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _args

from shiq_data.cli_common import ArgumentParser

TRL_INSTALL = "pip install 'shiq[bench]' (the optional extra bench: trl==1.16.0)"
SETS = ("synthetic", "buffer", "hh")
CONTESTANTS = (
    "shiq padded",
    "shiq packed",
    "shiq padded, compiled",
    "megatron sft",
    "megatron dpo",
    "trl dpo (online ref)",
    "trl dpo (precomputed ref)",
    "transformers sft",
    "shiq padded, megatron attention",
    "trl dpo (precomputed ref), compiled",
    "shiq padded, all positions",
)
COMPILED = ("shiq padded, compiled", "trl dpo (precomputed ref), compiled")
OPT_IN = (*COMPILED, "shiq padded, megatron attention", "shiq padded, all positions")
DEFAULT_CONTESTANTS = tuple(c for c in CONTESTANTS if c not in OPT_IN)
BETA, LR, CLIP = 0.1, 1e-6, 1.0
VOCAB = 49152  # SmolLM2's; the tiny model uses the same tokenizer


def parse_args(argv=None):
    p = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Prints, per row set, a table of real tokens/s (and its range over the rounds) and peak memory per "
        "contestant, and the ratio of each to TRL DPO with online and with precomputed reference (and, with "
        "--compile, to TRL's compiled precomputed contestant).",
    )
    p.add_argument("--sets", default=",".join(SETS), help=f"row sets, comma-separated (default {','.join(SETS)})")
    p.add_argument(
        "--buffer", type=_args.buffer_folder, help="replay buffer for the buffer set (default: a small synthetic one)"
    )
    p.add_argument(
        "--contestants",
        default=",".join(DEFAULT_CONTESTANTS),
        help="contestants, comma-separated, from: " + "; ".join(CONTESTANTS),
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also run 'shiq padded, compiled' and, when TRL's precomputed contestant runs, its compiled twin",
    )
    p.add_argument("--megatron-attention", action="store_true", help="also run 'shiq padded, megatron attention'")
    p.add_argument("--all-positions", action="store_true", help="also run 'shiq padded, all positions'")
    p.add_argument("--pairs", type=_args.count, default=8, help="prompt pairs per step (2x rows; default 8)")
    p.add_argument("--steps", type=_args.count, default=2, help="timed steps per contestant and round (default 2)")
    p.add_argument("--rounds", type=_args.count, default=2, help="rounds over the contestants (default 2)")
    p.add_argument("--synthetic-len", type=_args.integer(2), default=64, help="tokens per synthetic row (default 64)")
    p.add_argument("--pack-tokens", type=_args.count, default=256, help="packed row width (default 256)")
    p.add_argument("--threads", type=_args.threads, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2", help="tiny: a random 2-layer Llama")
    p.add_argument("--json", type=_args.output_file, help="also write the results to this JSON file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not set(args.sets.split(",")) <= set(SETS):
        p.error(f"--sets: expected some of {','.join(SETS)}, comma-separated; got {args.sets!r}")
    names = [c.strip() for c in args.contestants.split(",") if c.strip()]
    if not names or not set(names) <= set(CONTESTANTS):
        p.error(f"--contestants: expected some of {'; '.join(CONTESTANTS)}, comma-separated; got {args.contestants!r}")
    if args.buffer and "buffer" not in args.sets.split(","):
        p.error("--buffer is read by the row set buffer: add it to --sets")
    return args


# ----------------------------------------------------------------------------------------------
# row sets: lists of pairs {"prompt", "chosen", "rejected"} of token ids, the better completion first


def _rng(seed):
    import numpy as np

    return np.random.default_rng(seed)


def synthetic_pairs(n: int, length: int, seed: int = 0) -> list[dict]:
    """``n`` pairs of rows of exactly ``length`` tokens, half prompt, random token ids."""
    g, half = _rng(seed), length // 2
    ids = lambda k: g.integers(100, VOCAB - 100, k).tolist()
    return [{"prompt": ids(half), "chosen": ids(length - half), "rejected": ids(length - half)} for _ in range(n)]


def hh_pairs(n: int, seed: int = 1) -> list[dict]:
    """``n`` pairs shaped like Anthropic HH (synthetic tokens): 64-192 prompt tokens, two completions of
    16-128 tokens of different lengths."""
    g = _rng(seed)
    ids = lambda k: g.integers(100, VOCAB - 100, int(k)).tolist()
    out = []
    for _ in range(n):
        a, b = _two_lengths(g)
        out.append({"prompt": ids(g.integers(64, 193)), "chosen": ids(a), "rejected": ids(b)})
    return out


def _two_lengths(g) -> tuple[int, int]:
    a = int(g.integers(16, 129))
    b = int(g.integers(16, 128))
    return a, b + (b >= a)  # a different length, uniform over the rest


def demo_like_buffer(folder: Path, groups: int = 64, seed: int = 2) -> Path:
    """A small replay buffer of random tokens shaped like the demo's: groups of 4 completions of one
    prompt, 46-51 prompt and 9-29 completion tokens, a terminal reward."""
    from shiq_data.buffer import write_buffer
    from shiq_data.tokenizers import load_tokenizer

    g = _rng(seed)
    rows = []
    for k in range(groups):
        prompt = g.integers(100, VOCAB - 100, int(g.integers(46, 52))).tolist()
        for _ in range(4):
            completion = g.integers(100, VOCAB - 100, int(g.integers(9, 30))).tolist()
            n = len(prompt) + len(completion)
            rewards = [0.0] * n
            rewards[-1] = float(g.normal())
            rows.append(
                {
                    "source": "bench",
                    "group_id": k,
                    "prompt_len": len(prompt),
                    "tokens": prompt + completion,
                    "action_mask": [False] * len(prompt) + [True] * len(completion),
                    "rewards": rewards,
                }
            )
    _, info = load_tokenizer("smollm2")
    write_buffer(rows, folder, tokenizer_info=info, command=["bench_vs_trl"], progress=False)
    return folder


def buffer_pairs(path: Path) -> list[dict]:
    """One pair per prompt group of the buffer: its trajectories with the highest and the lowest return
    (groups whose two differ in return and share the prompt), prompt = the tokens before ``prompt_len``."""
    from shiq_data.buffer import open_buffer

    rows = open_buffer(path).columns(["group_id", "prompt_len", "tokens", "rewards"]).to_pylist()
    groups: dict[int, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group_id"], []).append(r)
    out = []
    for members in groups.values():
        members = sorted(members, key=lambda r: sum(r["rewards"]), reverse=True)
        best, worst = members[0], members[-1]
        p = best["prompt_len"]
        if (
            sum(best["rewards"]) == sum(worst["rewards"])
            or best["tokens"][:p] != worst["tokens"][: worst["prompt_len"]]
        ):
            continue
        out.append({"prompt": best["tokens"][:p], "chosen": best["tokens"][p:], "rejected": worst["tokens"][p:]})
    if not out:
        raise SystemExit(f"{path}: no prompt group with two trajectories of different return")
    return out


def step_pairs(pairs: list[dict], step: int, per_step: int) -> list[dict]:
    """The pairs of step ``step`` (cycling through the set)."""
    return [pairs[(step * per_step + i) % len(pairs)] for i in range(per_step)]


def trajectories(pairs: list[dict]) -> list[tuple[list[int], int]]:
    """``(tokens, prompt length)`` of each row: chosen and rejected of each pair in turn."""
    return [(p["prompt"] + p[k], len(p["prompt"])) for p in pairs for k in ("chosen", "rejected")]


# ----------------------------------------------------------------------------------------------
# the contestants (each in its own process)


class Reporter:
    """Protocol of a worker: JSON lines on the original stdout (everything else printed goes to stderr)."""

    def __init__(self):
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)

    def send(self, **msg):
        self.out.write(json.dumps(msg) + "\n")

    @staticmethod
    def reset_peak():
        import ctypes
        import gc

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed loading buffers go back to the system first
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size

    @staticmethod
    def peak_mib() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc/self/status")


def build_hf(model: str):
    """The Hugging Face Llama every contestant starts from (float32): SmolLM2-135M-Instruct or a tiny
    random one (2 layers, hidden 64, SmolLM2's vocabulary)."""
    import torch

    if model == "smollm2":
        from shiq_train.hf_convert import load_smollm2

        return load_smollm2(torch.float32)[0]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def load_hf(folder: str):
    """The model :func:`build_hf` made, saved once by the parent (each process then loads it quickly)."""
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def megatron_batch(pairs: list[dict], packed_width: int | None) -> tuple[dict, int]:
    """One micro-batch of the trajectories of ``pairs`` (``[B, T]``) and its real token count: padded (one
    trajectory per row, ``group_ids`` = pair) or packed greedily in order into rows of at most
    ``packed_width`` tokens (``segment_ids``); a terminal reward (1 chosen, 0 rejected)."""
    import torch

    rows = trajectories(pairs)
    if packed_width is None:
        layout = [[i] for i in range(len(rows))]
    else:
        width = max(packed_width, max(len(t) for t, _ in rows))
        layout, used = [[]], 0
        for i, (t, _) in enumerate(rows):
            if layout[-1] and used + len(t) > width:
                layout.append([])
                used = 0
            layout[-1].append(i)
            used += len(t)
    T = max(sum(len(rows[i][0]) for i in row) for row in layout)
    B = len(layout)
    tokens = torch.zeros(B, T, dtype=torch.int64)
    mask = torch.zeros(B, T, dtype=torch.bool)
    rewards = torch.zeros(B, T)
    segments = torch.zeros(B, T, dtype=torch.int64)
    for b, row in enumerate(layout):
        at = 0
        for k, i in enumerate(row):
            t, p = rows[i]
            n = len(t)
            tokens[b, at : at + n] = torch.tensor(t)
            mask[b, at + p : at + n] = True
            rewards[b, at + n - 1] = 1.0 if i % 2 == 0 else 0.0
            segments[b, at : at + n] = k
            at += n
        segments[b, at:] = len(row)
    mb = {"tokens": tokens, "action_mask": mask, "rewards": rewards}
    if packed_width is None:
        mb["group_ids"] = torch.arange(B) // 2
    else:
        mb["segment_ids"] = segments
    return mb, sum(len(t) for t, _ in rows)


def fused(optimizer) -> bool:
    """Whether every parameter group of ``optimizer`` steps torch's fused AdamW kernel (reported with each step,
    so that no contestant steps another implementation: the loop over tensors takes 3-5x as long on CPU)."""
    return all(bool(group.get("fused")) for group in optimizer.param_groups)


def run_megatron(name: str, rowset: dict, args, rep: Reporter) -> None:
    import torch

    from shiq_train import parallel
    from shiq_train.hf_convert import import_llama, model_config_from_llama
    from shiq_train.model import build_model, compile_layers, forward_stats
    from shiq_train.objectives import LossConfig
    from shiq_train.train_step import OptimizerConfig, build_optimizer, objective_loss_fn, train_step

    loss = {"megatron sft": "sft", "megatron dpo": "dpo"}.get(name, "shiq")
    width = args.pack_tokens if name == "shiq packed" else None
    parallel.init_distributed(seed=0)
    try:
        hf = load_hf(args.model_dir)
        attention = "megatron" if name == "shiq padded, megatron attention" else "auto"
        model = build_model(model_config_from_llama(hf.config, attention_backend=attention))
        import_llama(model, hf.state_dict(), hf.config)
        del hf
        steps = []
        model.eval()
        with torch.no_grad():  # reference statistics of the initial model, precomputed (not timed)
            for s in range(1 + args.steps):
                mb, n = megatron_batch(step_pairs(rowset["pairs"], s, args.pairs), width)
                st = forward_stats(model, mb["tokens"], mb.get("segment_ids"))
                steps.append(({**mb, "ref_chosen_logits": st.chosen_logits, "ref_logz": st.logz}, n))
        model.train()
        if name == "shiq padded, compiled":
            compile_layers(model)
        opt, sched = build_optimizer(model, OptimizerConfig(lr=LR, adam_beta2=0.999, clip_grad=CLIP))
        loss_fn = objective_loss_fn(LossConfig(loss, beta=BETA))
        if name == "shiq padded, all positions":  # the same loss, not declared to read the actions only
            loss_fn = functools.partial(loss_fn)
        rep.reset_peak()
        for s, (mb, n) in enumerate(steps):
            t0 = time.perf_counter()
            metrics = train_step(model, opt, sched, [dict(mb)], loss_fn, CLIP)
            seconds = time.perf_counter() - t0
            rep.send(
                step=s,
                seconds=seconds,
                tokens=n,
                loss=float(metrics["loss"]),
                grad_norm=float(metrics["grad_norm"]),
                fused=fused(opt),
            )
    finally:
        parallel.destroy_distributed()


def hf_batch(pairs: list[dict], pad_id: int) -> tuple[dict, int]:
    """``input_ids``, ``attention_mask`` and ``labels`` (-100 off the completions) ``[2P, T]``, right-padded."""
    import torch

    rows = trajectories(pairs)
    T = max(len(t) for t, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.int64)
    att = torch.zeros(len(rows), T, dtype=torch.int64)
    labels = torch.full((len(rows), T), -100, dtype=torch.int64)
    for b, (t, p) in enumerate(rows):
        ids[b, : len(t)] = torch.tensor(t)
        att[b, : len(t)] = 1
        labels[b, p : len(t)] = ids[b, p : len(t)]
    return {"input_ids": ids, "attention_mask": att, "labels": labels}, int(att.sum())


def run_transformers_sft(rowset: dict, args, rep: Reporter) -> None:
    import torch

    model = load_hf(args.model_dir).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    steps = [hf_batch(step_pairs(rowset["pairs"], s, args.pairs), 2) for s in range(1 + args.steps)]
    rep.reset_peak()
    for s, (batch, n) in enumerate(steps):
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rep.send(step=s, seconds=time.perf_counter() - t0, tokens=n, loss=loss.item(), fused=fused(opt))


def run_trl(name: str, rowset: dict, args, rep: Reporter, work: Path) -> None:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from shiq_data.tokenizers import load_tokenizer

    class RowsAsIds(DPOTrainer):
        """DPOTrainer on rows given as token ids (its own tokenisation skipped), counting real tokens."""

        tokens, loss, grad_norm = 0, None, None

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.tokens += int(inputs["attention_mask"].sum())
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.loss = float((out[0] if return_outputs else out).detach())
            return out

        def _get_grad_norm(self, *a, **k):  # the step's gradient norm before clipping, as the trainer computed it
            norm = super()._get_grad_norm(*a, **k)
            self.grad_norm = float(norm)
            return norm

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            trainer.tokens, self.t0 = 0, time.perf_counter()

        def on_step_end(self, state_args, state, *a, **k):
            seconds = time.perf_counter() - self.t0
            rep.send(
                step=state.global_step - 1,
                seconds=seconds,
                tokens=trainer.tokens,
                loss=trainer.loss,
                grad_norm=trainer.grad_norm,
                fused=fused(trainer.optimizer),
            )

    n_steps = 1 + args.steps
    pairs = [p for s in range(n_steps) for p in step_pairs(rowset["pairs"], s, args.pairs)]
    data = Dataset.from_dict(
        {
            "prompt_ids": [p["prompt"] for p in pairs],
            "chosen_ids": [p["chosen"] for p in pairs],
            "rejected_ids": [p["rejected"] for p in pairs],
        }
    )
    config = DPOConfig(
        output_dir=str(work / "trl"),
        beta=BETA,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=CLIP,
        optim="adamw_torch_fused",  # the kernel the trainer's AdamW steps
        per_device_train_batch_size=args.pairs,
        max_steps=n_steps,
        train_sampling_strategy="sequential",
        precompute_ref_log_probs=name.startswith("trl dpo (precomputed ref)"),
        torch_compile=name.endswith(", compiled"),
        activation_checkpointing=False,
        bf16=False,
        use_cpu=True,
        max_length=None,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    if config.torch_compile:
        import torch._dynamo

        # every dimension dynamic from the first step, as model.compile's dynamic=True: otherwise the second
        # step's other row length recompiles inside the timed steps
        torch._dynamo.config.assume_static_by_default = False
    tok, _ = load_tokenizer("smollm2")
    model = load_hf(args.model_dir)
    # online: a frozen copy as the reference (TRL would otherwise reload the model by name, which it has not)
    ref = copy.deepcopy(model).eval() if name == "trl dpo (online ref)" else None
    trainer = RowsAsIds(model=model, ref_model=ref, args=config, train_dataset=data, processing_class=tok)
    trainer.add_callback(Timer())
    rep.reset_peak()
    trainer.train()


def worker(args) -> int:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    rep = Reporter()
    torch.set_num_threads(args.threads)
    name = args.worker
    if name == "save-model":
        build_hf(args.model).save_pretrained(args.model_dir)
        return 0
    rowset = json.loads(Path(args.rows).read_text())
    with tempfile.TemporaryDirectory(prefix="bench_vs_trl_") as tmp:
        if name.startswith("trl"):
            run_trl(name, rowset, args, rep, Path(tmp))
        elif name == "transformers sft":
            run_transformers_sft(rowset, args, rep)
        else:
            run_megatron(name, rowset, args, rep)
    rep.send(peak_rss_mib=rep.peak_mib())
    return 0


# ----------------------------------------------------------------------------------------------
# the parent: row sets, processes in rounds, the table


def run_contestant(name: str, rows_file: Path, args, log: Path) -> dict:
    """Run one contestant's process; its per-step reports (warm-up = step 0) and peak memory."""
    cmd = [sys.executable, __file__, "--worker", name, "--rows", str(rows_file), "--model-dir", args.model_dir]
    cmd += ["--pairs", str(args.pairs), "--steps", str(args.steps), "--threads", str(args.threads)]
    cmd += ["--pack-tokens", str(args.pack_tokens)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    with log.open("w") as err:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    msgs = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    steps = [m for m in msgs if "step" in m]
    peak = [m["peak_rss_mib"] for m in msgs if "peak_rss_mib" in m]
    if out.returncode != 0 or len(steps) != 1 + args.steps or not peak:
        tail = "\n".join(log.read_text().strip().splitlines()[-15:])
        raise RuntimeError(f"contestant {name!r} failed (exit {out.returncode}); the end of its log:\n{tail}")
    return {"steps": steps, "peak_rss_mib": peak[0]}


def row_sets(args, work: Path) -> dict[str, dict]:
    n = args.pairs * (1 + args.steps)
    sets = {}
    for name in args.sets.split(","):
        if name == "synthetic":
            pairs, what = synthetic_pairs(n, args.synthetic_len), f"synthetic, {args.synthetic_len} tokens a row"
        elif name == "hh":
            pairs, what = hh_pairs(n), "HH-shaped synthetic tokens, 64-192 prompt + 16-128 completion tokens"
        elif name == "buffer":
            path = Path(args.buffer) if args.buffer else demo_like_buffer(work / "buffer")
            pairs = buffer_pairs(path)
            source = "/".join(path.parts[-2:]) if args.buffer else "a demo-shaped buffer of random tokens"
            what = f"{source}, best and worst of each group"
        else:
            raise SystemExit(f"--sets: unknown row set {name!r}, expected some of {', '.join(SETS)}")
        sets[name] = {"pairs": pairs, "what": what}
    return sets


def round_rate(run: dict) -> float:
    """Real tokens/s of one process's timed steps (the warm-up, step 0, left out)."""
    timed = [s for s in run["steps"] if s["step"] > 0]
    return sum(s["tokens"] for s in timed) / sum(s["seconds"] for s in timed)


def summarize(results: dict) -> list[dict]:
    """Per contestant: real tokens/s over the timed steps, tokens per step, peak memory."""
    rows = []
    for name, runs in results.items():
        timed = [s for r in runs for s in r["steps"] if s["step"] > 0]
        tokens = [[s["tokens"] for s in r["steps"]] for r in runs]
        if any(t != tokens[0] for t in tokens):
            raise RuntimeError(f"contestant {name!r} trained on different tokens in different rounds: {tokens}")
        rows.append(
            {
                "contestant": name,
                "tokens_per_s": sum(s["tokens"] for s in timed) / sum(s["seconds"] for s in timed),
                "round_tokens_per_s": [round_rate(r) for r in runs],  # each round's, for the range
                "tokens_per_step": tokens[0],
                "seconds_per_step": [round(s["seconds"], 3) for s in timed],
                "warmup_s": max(r["steps"][0]["seconds"] for r in runs),
                "first_loss": runs[0]["steps"][0].get("loss"),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            }
        )
    return rows


def print_table(set_name: str, what: str, rows: list[dict], args) -> None:
    by = {r["contestant"]: r["tokens_per_s"] for r in rows}
    refs = [
        c
        for c in ("trl dpo (online ref)", "trl dpo (precomputed ref)", "trl dpo (precomputed ref), compiled")
        if c in by
    ]
    heads = [f"/ {c[4:]}" for c in refs]
    print(f"\n{set_name}: {what}; {args.pairs} pairs ({2 * args.pairs} rows) a step")
    print(
        "| contestant | real tokens/step | tokens/s (range over rounds) | "
        + "".join(f"{h} | " for h in heads)
        + "peak RSS (MiB) | warm-up step (s) | first loss |"
    )
    print("|---" * (6 + len(heads)) + "|")
    for r in rows:
        ratios = "".join(f" {r['tokens_per_s'] / by[c]:.2f}x |" for c in refs)
        t = r["tokens_per_step"]
        tokens = f"{min(t)}-{max(t)}" if min(t) != max(t) else str(t[0])
        loss = "" if r["first_loss"] is None else f"{r['first_loss']:.4f}"
        spread = f"{min(r['round_tokens_per_s']):.0f}-{max(r['round_tokens_per_s']):.0f}"
        print(
            f"| {r['contestant']} | {tokens} | {r['tokens_per_s']:.0f} ({spread}) |{ratios} {r['peak_rss_mib']:,.0f} | "
            f"{r['warmup_s']:.1f} | {loss} |"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    names = [c.strip() for c in args.contestants.split(",") if c.strip()]
    if args.compile and "shiq padded, compiled" not in names:
        names.insert(1, "shiq padded, compiled")
    twin = "trl dpo (precomputed ref), compiled"
    if args.compile and "trl dpo (precomputed ref)" in names and twin not in names:
        names.insert(names.index("trl dpo (precomputed ref)") + 1, twin)
    if args.megatron_attention and "shiq padded, megatron attention" not in names:
        names.insert(1, "shiq padded, megatron attention")
    if args.all_positions and "shiq padded, all positions" not in names:
        names.insert(1, "shiq padded, all positions")
    if any(c.startswith("trl") for c in names) and importlib.util.find_spec("trl") is None:
        print(f"bench_vs_trl: TRL is not installed: {TRL_INSTALL}", file=sys.stderr)
        return 2
    report = {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "rows")}, "sets": {}}
    print(
        f"model {args.model}, float32, full fine-tune, AdamW, {args.threads} threads; {args.pairs} pairs a step; "
        f"{args.steps} timed steps after a warm-up per process, {args.rounds} round(s)"
    )
    with tempfile.TemporaryDirectory(prefix="bench_vs_trl_") as tmp:
        work = Path(tmp)
        log = work / "workers.log"
        args.model_dir = str(work / "model")
        cmd = [sys.executable, __file__, "--worker", "save-model", "--model", args.model, "--model-dir", args.model_dir]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        for set_name, rowset in row_sets(args, work).items():
            rows_file = work / f"{set_name}.json"
            rows_file.write_text(json.dumps(rowset))
            results = {c: [] for c in names}
            for r in range(args.rounds):
                for c in names if r % 2 == 0 else names[::-1]:
                    print(f"  {set_name}, round {r + 1}: {c}", file=sys.stderr, flush=True)
                    res = run_contestant(c, rows_file, args, log)
                    results[c].append(res)
                    print(
                        f"    {round_rate(res):.1f} tokens/s, peak {res['peak_rss_mib']:.0f} MiB",
                        file=sys.stderr,
                        flush=True,
                    )
            rows = summarize(results)
            print_table(set_name, rowset["what"], rows, args)
            report["sets"][set_name] = {"what": rowset["what"], "contestants": rows}
    if args.json:
        from shiq_data.io import atomic_write_json

        atomic_write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
