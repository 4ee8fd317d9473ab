"""Benchmark of the replay buffer against the ``datasets`` library on synthetic data; prints a table.

1. Build rate (rows/s): JSONL of (prompt, completion, reward) -> token-aligned rows on disk, with GPT-2.
   Ours: ``shiq_data.readers.generic.read_jsonl`` + ``write_buffer``. Baseline: ``Dataset.from_json`` + a
   batched ``.map`` doing the same tokenisation and alignment.
2. Random-batch read rate (real tokens/s): padded ``[B, T]`` tensors of random rows.
   Ours: ``BufferSampler`` (padded). Baseline: ``dataset[indices]`` on the mapped dataset, padded with numpy.
3. Reader memory as the buffer grows: peak RssAnon (process heap, excluding the page cache of the
   memory-mapped shards) and VmHWM (everything resident, including those mapped file pages) while
   reading a whole epoch, for a buffer of N tokens and one of 10 N tokens, each in a fresh process.

Usage: ``python tools/bench_data.py [--tokens 1000000] [--growth 10] [--batch-rows 16]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which do their "
    "time if will way about many then them write would like so these her long make thing see him two has look "
    "more day could go come did number sound no most people my over know water than call first who may down "
    "side been now find any new work part take get place made live where after back little only round man year "
    "came show every good me give our under name very through just form sentence great think say help low line"
).split()


def synthetic_records(n: int, seed: int = 0):
    """``n`` records, prompts of 20-60 words and completions of 20-120 words, 4 completions per prompt."""
    rng = np.random.default_rng(seed)
    prompt = None
    for i in range(n):
        if i % 4 == 0:
            prompt = " ".join(rng.choice(WORDS, int(rng.integers(20, 60))))
        yield {
            "prompt": prompt,
            "completion": " " + " ".join(rng.choice(WORDS, int(rng.integers(20, 120)))),
            "reward": float(rng.normal()),
        }


def align_batch(batch, tokenizer, eos):
    """The datasets baseline's .map function: the same rows as shiq_data.readers.generic builds."""
    prompts = tokenizer(batch["prompt"], add_special_tokens=False)["input_ids"]
    completions = tokenizer(batch["completion"], add_special_tokens=False)["input_ids"]
    out = {"tokens": [], "action_mask": [], "rewards": [], "prompt_len": []}
    for p, c, r in zip(prompts, completions, batch["reward"]):
        a = c + [eos]
        rewards = [0.0] * (len(p) + len(a))
        rewards[-1] = r
        out["tokens"].append(p + a)
        out["action_mask"].append([False] * len(p) + [True] * len(a))
        out["rewards"].append(rewards)
        out["prompt_len"].append(len(p))
    return out


def bench_build(jsonl: Path, work: Path, tokenizer, info, tag: str = "0"):
    from shiq_data.buffer import write_buffer
    from shiq_data.readers.generic import read_jsonl

    t = time.perf_counter()
    buf = write_buffer(
        read_jsonl(jsonl, tokenizer), work / f"ours-{tag}", tokenizer_info=info, command=["bench"], progress=False
    )
    ours = time.perf_counter() - t

    import datasets

    datasets.disable_progress_bars()
    t = time.perf_counter()
    ds = datasets.Dataset.from_json(str(jsonl), cache_dir=str(work / f"hf-cache-{tag}"))
    ds = ds.map(
        align_batch,
        batched=True,
        batch_size=512,
        fn_kwargs={"tokenizer": tokenizer, "eos": info["eos_id"]},
        remove_columns=["prompt", "completion"],
        cache_file_name=str(work / f"hf-mapped-{tag}.arrow"),
    )
    theirs = time.perf_counter() - t
    return buf, ds, ours, theirs


def bench_read(buf, ds, batch_rows: int, steps: int, pad_id: int):
    from shiq_data.sampler import BufferSampler

    s = BufferSampler(buf, rows_per_micro_batch=batch_rows, seed=0, pad_id=pad_id)
    s.next_micro_batches()
    t, n_tok = time.perf_counter(), 0
    for _ in range(steps):
        mb = s.next_micro_batches()[0]
        n_tok += int((mb["tokens"] != pad_id).sum())
    ours = n_tok / (time.perf_counter() - t)

    import torch

    perm = np.random.default_rng(0).permutation(len(ds))
    t, n_tok = time.perf_counter(), 0
    for k in range(steps):
        idx = perm[(k * batch_rows) % len(ds) :][:batch_rows].tolist()
        rows = ds[idx]
        T = max(len(x) for x in rows["tokens"])
        tokens = np.full((len(idx), T), pad_id, np.int64)
        mask = np.zeros((len(idx), T), bool)
        rewards = np.zeros((len(idx), T), np.float32)
        for b, (x, m, r) in enumerate(zip(rows["tokens"], rows["action_mask"], rows["rewards"])):
            tokens[b, : len(x)], mask[b, : len(x)], rewards[b, : len(x)] = x, m, r
        batch = {
            "tokens": torch.from_numpy(tokens),
            "action_mask": torch.from_numpy(mask),
            "rewards": torch.from_numpy(rewards),
        }
        n_tok += int((batch["tokens"] != pad_id).sum())
    theirs = n_tok / (time.perf_counter() - t)
    return ours, theirs


RSS_CHILD = r"""
import sys, time
from shiq_data.buffer import open_buffer
from shiq_data.sampler import BufferSampler

def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("RssAnon", "VmHWM"):
            out[k] = int(v.split()[0])
    return out

buf = open_buffer(sys.argv[1])
s = BufferSampler(buf, rows_per_micro_batch=int(sys.argv[2]))
s.next_micro_batches()
base = status()["RssAnon"]
peak = base
t = time.perf_counter(); n = 0
while s.epoch == 0:
    for mb in s.next_micro_batches():
        n += int(mb["tokens"].numel())
    peak = max(peak, status()["RssAnon"])
print(peak, peak - base, status()["VmHWM"], time.perf_counter() - t)
"""


def synthetic_token_rows(n_tokens: int, seed: int = 1):
    """Rows of random token ids (no tokenizer) totalling about ``n_tokens``, for the memory scan."""
    rng = np.random.default_rng(seed)
    total, i = 0, 0
    while total < n_tokens:
        p, c = int(rng.integers(20, 80)), int(rng.integers(20, 160))
        mask = np.zeros(p + c, bool)
        mask[p:] = True
        rewards = np.zeros(p + c, np.float32)
        rewards[-1] = 1.0
        yield {
            "source": "bench",
            "group_id": i // 4,
            "prompt_len": p,
            "action_mask": mask,
            "rewards": rewards,
            "tokens": rng.integers(0, 50257, p + c, dtype=np.int32),
        }
        total += p + c
        i += 1


def bench_memory(work: Path, info: dict, n_tokens: int, batch_rows: int):
    from shiq_data.buffer import write_buffer

    folder = work / f"mem-{n_tokens}"
    t = time.perf_counter()
    buf = write_buffer(synthetic_token_rows(n_tokens), folder, tokenizer_info=info, command=["bench"], progress=False)
    build = time.perf_counter() - t
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, str(folder), str(batch_rows)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.split()
    peak, growth, hwm, secs = int(out[0]), int(out[1]), int(out[2]), float(out[3])
    return {
        "tokens": buf.manifest["tokens"],
        "rows": len(buf),
        "build_s": build,
        "rss_anon_peak_mb": peak / 1024,
        "rss_anon_growth_mb": growth / 1024,
        "vm_hwm_mb": hwm / 1024,
        "epoch_s": secs,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--tokens", type=int, default=1_000_000, help="tokens of the synthetic text data (default %(default)s)"
    )
    ap.add_argument("--growth", type=int, default=10, help="size factor of the memory scan (default %(default)s)")
    ap.add_argument("--batch-rows", type=int, default=16, help="rows per random batch (default %(default)s)")
    ap.add_argument("--steps", type=int, default=500, help="random batches timed per reader (default %(default)s)")
    ap.add_argument(
        "--repeat", type=int, default=3, help="runs of each contender; the best is reported (default %(default)s)"
    )
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from shiq_data.tokenizers import load_tokenizer

    tokenizer, info = load_tokenizer("gpt2")
    results = {}
    with tempfile.TemporaryDirectory(prefix="shiq-bench-") as tmp:
        work = Path(tmp)
        # about 110 GPT-2 tokens per record
        n_records = max(args.tokens // 110, 100)
        jsonl = work / "records.jsonl"
        with open(jsonl, "w") as f:
            for r in synthetic_records(n_records):
                f.write(json.dumps(r) + "\n")
        # the machine is shared: alternate the two contenders and keep each one's best run
        builds = [bench_build(jsonl, work, tokenizer, info, tag=str(k)) for k in range(args.repeat)]
        buf, ds = builds[0][0], builds[0][1]
        results["build"] = {
            "rows": len(buf),
            "tokens": buf.manifest["tokens"],
            "ours_rows_per_s": len(buf) / min(b[2] for b in builds),
            "datasets_rows_per_s": len(ds) / min(b[3] for b in builds),
        }
        reads = [
            bench_read(buf, ds, args.batch_rows, args.steps, pad_id=-1) for _ in range(args.repeat)
        ]  # -1: no token
        results["read"] = {
            "ours_tokens_per_s": max(r[0] for r in reads),
            "datasets_tokens_per_s": max(r[1] for r in reads),
        }
        results["memory"] = [
            bench_memory(work, info, n, args.batch_rows) for n in (args.tokens, args.tokens * args.growth)
        ]

    b, r = results["build"], results["read"]
    print(
        f"data: {b['rows']} rows, {b['tokens']} GPT-2 tokens; batches of {args.batch_rows} rows; "
        f"torch threads 1; {os.cpu_count()} CPUs (shared); best of {args.repeat} alternating runs"
    )
    print(f"{'measure':<38}{'shiq_data':>14}{'datasets':>14}{'ratio':>8}")
    print(
        f"{'build (rows/s)':<38}{b['ours_rows_per_s']:>14,.0f}{b['datasets_rows_per_s']:>14,.0f}"
        f"{b['ours_rows_per_s'] / b['datasets_rows_per_s']:>8.2f}"
    )
    print(
        f"{'random padded batches (tokens/s)':<38}{r['ours_tokens_per_s']:>14,.0f}{r['datasets_tokens_per_s']:>14,.0f}"
        f"{r['ours_tokens_per_s'] / r['datasets_tokens_per_s']:>8.2f}"
    )
    print(
        f"\n{'reader memory, one epoch':<26}{'tokens':>12}{'rows':>9}{'RssAnon peak':>14}{'growth':>9}"
        f"{'VmHWM':>9}{'epoch s':>9}"
    )
    for m in results["memory"]:
        print(
            f"{'':<26}{m['tokens']:>12,}{m['rows']:>9,}{m['rss_anon_peak_mb']:>11.1f} MB{m['rss_anon_growth_mb']:>6.1f} MB"
            f"{m['vm_hwm_mb']:>6.0f} MB{m['epoch_s']:>9.1f}"
        )
    if args.json:
        from shiq_data.io import atomic_write_json

        atomic_write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
