"""Benchmark of the replay buffer against the ``datasets`` library on synthetic data; prints a table.

1. Build rate (rows/s): JSONL of (prompt, completion, reward) -> token-aligned rows on disk, with GPT-2.
   Ours: ``shiq_data.readers.generic.read_jsonl`` + ``write_buffer``. Baseline: ``Dataset.from_json`` + a
   batched ``.map`` doing the same tokenisation and alignment.
2. Random-batch read rate (real tokens/s): padded ``[B, T]`` tensors of random rows.
   Ours: ``BufferSampler`` (padded). Baseline: ``dataset[indices]`` on the mapped dataset, padded with numpy.
   Each side times its batches after one untimed batch of its own.
   Both measures run ``--repeat`` rounds, each side's best kept; shiq_data goes first in even rounds (0, 2, ...)
   and datasets in odd ones, so the order (the page cache and allocator state the other leaves) favours neither.
3. Reader memory as the buffer grows: peak RssAnon (process heap, excluding the page cache of the
   memory-mapped shards) and VmHWM (everything resident, including those mapped file pages) while
   reading a whole epoch, for a buffer of N tokens and one of 10 N tokens, each in a fresh process.
4. Parallel build: ``shiq-data build --workers 2`` against one process (the same input and tokenizer).
5. Every verb's memory as the buffer grows: build (from a JSONL file of the rows' texts), append (a fixed
   1,000 rows that repeat old texts, to a copy of the buffer), retokenize, validate, info, stats, show,
   filter, dedup (exact and --near), split, mix and export (jsonl, parquet, hf), each run through the
   command line in a fresh process on a buffer of R rows and one of 10 R rows (random tokens with text
   columns); peak RssAnon (sampled every 5 ms), its ratio between the two sizes (1 is flat) and what it
   grew by per added row.
6. filter, exact dedup and stats against the same operation with ``datasets`` on the same shards
   (``Dataset.from_file`` of each shard): ``.filter`` then ``save_to_disk``; a hash of the normalised text
   per row, pandas ``duplicated``, ``.select`` then ``save_to_disk``; ``.to_pandas()`` of the scalar and
   token columns with ``describe`` per source and group sizes. Interleaved, best of ``--repeat``.
7. The readers' group numbering as the input grows (``--part groups``): ``build`` from a JSONL file whose
   every row is its own prompt group, with a prompt of ``--prompt-chars`` characters, for R rows and 10 R
   rows (``--group-rows``, shards of R / 5 rows), each in a fresh process; peak RssAnon and what it grew by
   per added group. ``--code DIR`` runs the measured commands on another checkout's ``shiq_data`` (the same
   inputs), to compare two versions.
8. Near duplicates that cluster (``--part near``): ``dedup --near --by completion`` of buffers of R, 2 R and
   4 R rows (``--near-rows``), half of them one boilerplate answer differing by a number (a cluster of R / 2
   to 2 R rows alike), half random; seconds and peak RssAnon, each in a fresh process. ``--code DIR`` runs them
   on another checkout (the rows kept must agree).
9. Shards bounded by size (``--part shards``): a JSONL file of R long documents (``--shard-doc-rows``; 20-60 words
   of prompt and 1,300-1,700 of completion: 1,544 GPT-2 tokens and 7 KB of text a row, 19.8 KB of Arrow data),
   then ``build`` with ``--shard-rows R`` (so only the size bound cuts) at ``--shard-mib`` 4096 (no cut below
   some 200,000 rows), 256 (the default) and 64, and ``decontaminate`` of each buffer against 200 evaluation texts
   (50 of them runs of a row's words), each in a fresh process on the same input; seconds, peak RssAnon (sampled
   every 5 ms), shards and each peak's ratio to the 4096 MiB run's; the rows kept must agree.
   At the default 4,000 rows (76 MB of Arrow data) 256 MiB makes one shard too; 20,000 rows (378 MB) make two.
   ``--code DIR`` runs them on another checkout.

Usage: ``python tools/bench_data.py [--part all|buffer|curate|groups|near|shards] [--tokens 1000000] [--growth 10]
[--curate-rows 5000] [--speed-only] [--group-rows 2000] [--prompt-chars 2000] [--near-rows 2000]
[--shard-doc-rows 4000] [--code DIR]``
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

import _args
import numpy as np

from shiq_data.cli_common import ArgumentParser

# the checkout whose shiq_data the measured processes run (--code; their "-P" keeps the working folder off sys.path)
CODE = Path(__file__).resolve().parents[1]
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


SIDES = ("shiq_data", "datasets")  # the contenders of the build and read rates, in even rounds' order


def side_order(round_: int) -> tuple:
    """The contenders' order in round ``round_``: :data:`SIDES` in even rounds, reversed in odd ones."""
    return SIDES if round_ % 2 == 0 else SIDES[::-1]


def bench_build(jsonl: Path, work: Path, tokenizer, info, tag: str = "0", order: tuple = SIDES):
    """``(buffer, dataset, our seconds, datasets' seconds)`` of building the rows of ``jsonl``, the two sides
    in ``order``."""

    def ours():
        from shiq_data.buffer import write_buffer
        from shiq_data.readers.generic import read_jsonl

        return write_buffer(
            read_jsonl(jsonl, tokenizer), work / f"ours-{tag}", tokenizer_info=info, command=["bench"], progress=False
        )

    def theirs():
        import datasets

        datasets.disable_progress_bars()
        ds = datasets.Dataset.from_json(str(jsonl), cache_dir=str(work / f"hf-cache-{tag}"))
        return ds.map(
            align_batch,
            batched=True,
            batch_size=512,
            fn_kwargs={"tokenizer": tokenizer, "eos": info["eos_id"]},
            remove_columns=["prompt", "completion"],
            cache_file_name=str(work / f"hf-mapped-{tag}.arrow"),
        )

    out, secs = {}, {}
    for side in order:
        t = time.perf_counter()
        out[side] = {"shiq_data": ours, "datasets": theirs}[side]()
        secs[side] = time.perf_counter() - t
    return out["shiq_data"], out["datasets"], secs["shiq_data"], secs["datasets"]


def bench_read(buf, ds, batch_rows: int, steps: int, pad_id: int, order: tuple = SIDES):
    """``(our tokens/s, datasets' tokens/s)``: real tokens/s of ``steps`` random padded batches, each side after
    one untimed batch of its own (the sampler's first call and ``dataset[indices]``'s first both pay one-off
    costs), the two sides in ``order``."""
    from shiq_data.sampler import BufferSampler

    s = BufferSampler(buf, rows_per_micro_batch=batch_rows, seed=0, pad_id=pad_id)

    def ours(k):
        return s.next_micro_batches()[0]

    import torch

    perm = np.random.default_rng(0).permutation(len(ds))

    def theirs(k):
        idx = perm[np.arange(k * batch_rows, (k + 1) * batch_rows) % len(ds)].tolist()  # wraps round: B rows
        rows = ds[idx]
        T = max(len(x) for x in rows["tokens"])
        tokens = np.full((len(idx), T), pad_id, np.int64)
        mask = np.zeros((len(idx), T), bool)
        rewards = np.zeros((len(idx), T), np.float32)
        for b, (x, m, r) in enumerate(zip(rows["tokens"], rows["action_mask"], rows["rewards"])):
            tokens[b, : len(x)], mask[b, : len(x)], rewards[b, : len(x)] = x, m, r
        return {
            "tokens": torch.from_numpy(tokens),
            "action_mask": torch.from_numpy(mask),
            "rewards": torch.from_numpy(rewards),
        }

    def rate(batch):
        batch(steps)  # warm-up, untimed: the sampler's next batch; the rows after the timed ones' (unless they wrap)
        t, n_tok = time.perf_counter(), 0
        for k in range(steps):
            n_tok += int((batch(k)["tokens"] != pad_id).sum())
        return n_tok / (time.perf_counter() - t)

    rates = {side: rate({"shiq_data": ours, "datasets": theirs}[side]) for side in order}
    return rates["shiq_data"], rates["datasets"]


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
    env = {**os.environ, "PYTHONPATH": str(CODE)}
    out = subprocess.run(
        [sys.executable, "-P", "-c", RSS_CHILD, str(folder), str(batch_rows)],
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


def bench_workers(jsonl: Path, work: Path, tokenizer, info, repeat: int) -> dict:
    """Rows/s of a build from ``jsonl`` with one process and with ``--workers 2``, alternating; the two
    buffers' shards are compared byte for byte."""
    from shiq_data.buffer import write_buffer
    from shiq_data.readers import get_format
    from shiq_data.readers.parallel import parallel_rows

    form, best = get_format("jsonl"), {1: float("inf"), 2: float("inf")}
    for k in range(repeat):
        for workers in (1, 2) if k % 2 == 0 else (2, 1):
            rows = (
                form.read(jsonl, tokenizer)
                if workers == 1
                else parallel_rows(form, jsonl, tokenizer, {}, workers, vocab_size=info["vocab_size"])
            )
            t = time.perf_counter()
            buf = write_buffer(rows, work / f"w{workers}-{k}", tokenizer_info=info, command=["bench"], progress=False)
            best[workers] = min(best[workers], time.perf_counter() - t)
    same = all(
        (work / "w1-0" / s["file"]).read_bytes() == (work / "w2-0" / s["file"]).read_bytes()
        for s in buf.manifest["shards"]
    )
    return {"rows": len(buf), "one_rows_per_s": len(buf) / best[1], "two_rows_per_s": len(buf) / best[2], "same": same}


CURATE_SOURCES = ("forum", "wiki", "chat")


def synthetic_text_rows(n_rows: int, vocab: int = 50257):
    """Rows with text columns for the curation verbs: groups of 4 rows, 3 sources, random token ids (the
    verbs read the text columns, not the tokens), prompts of 12 and completions of 8-40 random words; every
    50th row repeats an earlier row's text (exact duplicates). The rows are valid by construction and marked
    checked, so building a large buffer costs no row check."""
    from shiq_data.schema import CHECKED_KEY

    words = np.array(WORDS)
    for i in range(n_rows):
        j = i - 37 if i % 50 == 49 else i
        rng = np.random.default_rng(j)
        prompt = f"prompt {j // 4}: " + " ".join(rng.choice(words, 12))
        completion = " " + " ".join(rng.choice(words, int(rng.integers(8, 40)))) + f" {j}"
        p, c = 10 + j % 30, 10 + (7 * j) % 60
        mask = np.zeros(p + c, bool)
        mask[p:] = True
        reward = float(np.float32(rng.normal()))
        rewards = np.zeros(p + c, np.float32)
        rewards[-1] = reward
        yield {
            "source": CURATE_SOURCES[(i // 4) % 3],
            "group_id": i // 4,
            "prompt_len": p,
            "tokens": rng.integers(0, vocab, p + c, dtype=np.int32),
            "action_mask": mask,
            "rewards": rewards,
            "prompt": prompt,
            "completion": completion,
            "reward": reward,
            "turn_rewards": None,
            "extra": json.dumps({"lang": ["en", "fr"][j % 2], "score": j % 5}),
            CHECKED_KEY: vocab,
        }


MEM_VERB_CHILD = r"""
import json, sys, threading, time
import shiq_data
from shiq_data.cli import main

def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

base = rss_anon()
peak, stop = [base], []

def watch():
    while not stop:
        peak[0] = max(peak[0], rss_anon())
        time.sleep(0.005)

thread = threading.Thread(target=watch, daemon=True)
thread.start()
t = time.perf_counter()
code = main(sys.argv[1:])
secs = time.perf_counter() - t
stop.append(1)
thread.join()
peak[0] = max(peak[0], rss_anon())
result = {"code": code, "base_kb": base, "peak_kb": peak[0], "secs": secs, "package": shiq_data.__file__}
print("BENCH " + json.dumps(result))
"""


def curate_verbs(buf: Path, out: Path) -> dict[str, list[str]]:
    """The command line of each verb measured (``out``: a folder that does not exist yet); ``build`` reads
    ``<buf>.jsonl``, ``append`` adds ``<buf's folder>/append.jsonl`` to ``out`` (a copy of ``buf``),
    ``decontaminate`` reads the evaluation texts of ``<buf's folder>/eval.jsonl``."""
    return {
        "build": ["build", "jsonl", f"{buf}.jsonl", "--tokenizer", "gpt2", "--out", str(out), "--no-progress"],
        "append": ["append", str(out), "jsonl", str(buf.parent / "append.jsonl"), "--no-progress"],
        "retokenize": ["retokenize", str(buf), "--tokenizer", "gpt2", "--out", str(out), "--no-progress"],
        "validate": ["validate", str(buf)],
        "info": ["info", str(buf)],
        "stats": ["stats", str(buf)],
        "show": ["show", str(buf), "--rows", "5", "--where", "reward > 1"],
        "filter": ["filter", str(buf), "--where", "reward > 0 AND score >= 2", "--out", str(out), "--no-progress"],
        "dedup": ["dedup", str(buf), "--out", str(out), "--no-progress"],
        "dedup --near": ["dedup", str(buf), "--near", "--by", "completion", "--out", str(out), "--no-progress"],
        "decontaminate": ["decontaminate", str(buf), "--against", str(buf.parent / "eval.jsonl"), "--out", str(out)]
        + ["--no-progress"],
        "split": ["split", str(buf), "--test-fraction", "0.1", "--out", str(out), "--no-progress"],
        "mix": ["mix", f"{buf}:1", f"{buf}:2", "--out", str(out), "--no-progress"],
        "export jsonl": ["export", str(buf), "--format", "jsonl", "--out", str(out)],
        "export parquet": ["export", str(buf), "--format", "parquet", "--out", str(out)],
        "export hf": ["export", str(buf), "--format", "hf", "--out", str(out)],
    }


def run_verb(argv: list[str]) -> dict:
    """``shiq-data ARGV`` in a fresh process on :data:`CODE`: ``{"base_kb", "peak_kb", "secs", ...}`` (RssAnon)."""
    env = {**os.environ, "PYTHONPATH": str(CODE)}
    proc = subprocess.run([sys.executable, "-P", "-c", MEM_VERB_CHILD, *argv], capture_output=True, text=True, env=env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("BENCH ")]
    if proc.returncode or not line or json.loads(line[-1][6:])["code"] != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr[-2000:]}")
    result = json.loads(line[-1][6:])
    if not Path(result["package"]).resolve().is_relative_to(CODE):
        raise RuntimeError(f"the measured process ran {result['package']}, not the shiq_data of {CODE}")
    return result


def bench_curate_memory(bufs: list[Path], work: Path, verbs: list[str] | None = None) -> dict:
    """verb -> [{"rows", "peak_mb", "secs"} per buffer], each run in a fresh process; ``verbs``: only these."""
    import shutil

    results: dict = {}
    for name in curate_verbs(bufs[0], work / "x"):
        if verbs and name not in verbs:
            continue
        for buf in bufs:
            out = work / "verb-out"
            shutil.rmtree(out, ignore_errors=True)
            if name == "append":
                shutil.copytree(buf, out)
            r = run_verb(curate_verbs(buf, out)[name])
            rows = json.loads((buf / "manifest.json").read_text())["rows"]
            results.setdefault(name, []).append({"rows": rows, "peak_mb": r["peak_kb"] / 1024, "secs": r["secs"]})
        shutil.rmtree(work / "verb-out", ignore_errors=True)
    return results


def long_prompt_records(n_rows: int, prompt_chars: int):
    """``n_rows`` records, each its own prompt group: a distinct prompt of ``prompt_chars`` characters of random
    words, a completion of 8 words."""
    words = np.array(WORDS)
    rng = np.random.default_rng(7)
    for i in range(n_rows):
        prompt = f"prompt {i}: " + " ".join(rng.choice(words, prompt_chars // 3 + 1))
        yield {"prompt": prompt[:prompt_chars], "completion": " " + " ".join(rng.choice(words, 8)), "reward": 1.0}


def bench_group_memory(work: Path, rows: list[int], prompt_chars: int) -> list[dict]:
    """``build`` of ``rows[k]`` records of :func:`long_prompt_records` (shards of ``rows[0] // 5`` rows, so what
    the writer holds per shard is the same at every size), each in a fresh process: ``[{"rows", "groups",
    "peak_mb", "secs"}]``."""
    import shutil

    out = []
    for n in rows:
        jsonl = work / f"groups-{n}.jsonl"
        with open(jsonl, "w") as f:
            for r in long_prompt_records(n, prompt_chars):
                f.write(json.dumps(r) + "\n")
        buf = work / f"groups-{n}"
        shard_rows = str(max(rows[0] // 5, 1))
        r = run_verb(
            ["build", "jsonl", str(jsonl), "--tokenizer", "gpt2", "--out", str(buf), "--shard-rows", shard_rows]
            + ["--no-progress"]
        )
        m = json.loads((buf / "manifest.json").read_text())
        out.append({"rows": m["rows"], "groups": m["next_group_id"], "peak_mb": r["peak_kb"] / 1024, "secs": r["secs"]})
        shutil.rmtree(buf)
        jsonl.unlink()
    return out


BOILERPLATE = "I am sorry, but I cannot help with that request; it may cause harm. Ask me something else."


def clustered_rows(n_rows: int):
    """:func:`synthetic_text_rows` with every other row's completion the same boilerplate answer and a number:
    one cluster of ``n_rows / 2`` rows alike, spread over the buffer."""
    for i, row in enumerate(synthetic_text_rows(n_rows)):
        if i % 2 == 0:
            row["completion"] = f" {BOILERPLATE} (case {i})"
        yield row


def bench_near(work: Path, rows: list[int], info: dict) -> list[dict]:
    """``dedup --near --by completion`` of :func:`clustered_rows` buffers of ``rows[k]`` rows (shards of
    ``rows[0] // 5``), each in a fresh process: ``[{"rows", "kept", "peak_mb", "secs"}]``."""
    import shutil

    from shiq_data.buffer import write_buffer

    out = []
    for n in rows:
        buf, dst = work / f"near-{n}", work / f"near-{n}-out"
        shard_rows = max(rows[0] // 5, 1)
        write_buffer(
            clustered_rows(n), buf, tokenizer_info=info, command=["bench"], shard_rows=shard_rows, progress=False
        )
        r = run_verb(["dedup", str(buf), "--near", "--by", "completion", "--out", str(dst), "--no-progress"])
        kept = json.loads((dst / "manifest.json").read_text())["rows"]
        out.append({"rows": n, "kept": kept, "peak_mb": r["peak_kb"] / 1024, "secs": r["secs"]})
        shutil.rmtree(buf)
        shutil.rmtree(dst)
    return out


def print_near_part(results: list[dict]) -> None:
    print(f"\ndedup --near --by completion, half the rows one cluster alike ({CODE.name}; fresh process each)")
    print(f"{'rows':>10}{'kept':>9}{'RssAnon peak':>15}{'seconds':>9}")
    for r in results:
        print(f"{r['rows']:>10,}{r['kept']:>9,}{r['peak_mb']:>12.1f} MB{r['secs']:>9.1f}")


def write_long_documents(jsonl: Path, evaluation: Path, n_rows: int) -> None:
    """``n_rows`` JSONL records of long documents to ``jsonl``: a prompt of 20-60 words and a completion of
    1,300-1,700 words (each word of :data:`WORDS` is one GPT-2 token, so about 1,540 tokens and 7 KB of text a
    row), each its own prompt group; and 200 evaluation texts of 40 words to ``evaluation``, of which 50 are a
    run of 40 words from the completion of a row spread over the input (``decontaminate`` drops those rows) and
    the rest random words."""
    words = np.array(WORDS)
    rng = np.random.default_rng(11)
    taken = {k * n_rows // 50: k for k in range(50)}  # row -> which contaminated evaluation text
    runs = {}
    with open(jsonl, "w") as f:
        for i in range(n_rows):
            prompt = f"document {i}: " + " ".join(rng.choice(words, int(rng.integers(20, 60))))
            completion = rng.choice(words, int(rng.integers(1300, 1700)))
            if i in taken:
                runs[taken[i]] = " ".join(completion[100:140])
            f.write(json.dumps({"prompt": prompt, "completion": " " + " ".join(completion), "reward": 1.0}) + "\n")
    with open(evaluation, "w") as f:
        for k in range(200):
            text = runs[k // 4] if k % 4 == 0 and k // 4 in runs else " ".join(rng.choice(words, 40))
            f.write(json.dumps({"prompt": text}) + "\n")


SHARD_MIBS = (4096, 256, 64)  # --shard-mib of the shard scan: the first cuts nothing at the sizes it runs


def bench_shards(work: Path, n_rows: int, mibs=SHARD_MIBS) -> list[dict]:
    """``build`` of :func:`write_long_documents`' ``n_rows`` records with ``--shard-rows n_rows`` (only the size
    bound cuts) at each ``--shard-mib`` of ``mibs``, then ``decontaminate`` of that buffer against the evaluation
    texts, each in a fresh process on the same input: ``[{"mib", "rows", "tokens", "shards", "largest_mb",
    "build_peak_mb", "build_secs", "kept", "out_shards", "decon_peak_mb", "decon_secs"}]``."""
    import shutil

    jsonl, evaluation = work / "long.jsonl", work / "long-eval.jsonl"
    write_long_documents(jsonl, evaluation, n_rows)
    out = []
    for mib in mibs:
        buf, dst = work / f"long-{mib}", work / f"long-{mib}-out"
        b = run_verb(
            ["build", "jsonl", str(jsonl), "--tokenizer", "gpt2", "--out", str(buf), "--shard-rows", str(n_rows)]
            + ["--shard-mib", str(mib), "--no-progress"]
        )
        d = run_verb(["decontaminate", str(buf), "--against", str(evaluation), "--out", str(dst), "--no-progress"])
        m, md = (json.loads((x / "manifest.json").read_text()) for x in (buf, dst))
        out.append(
            {
                "mib": mib,
                "rows": m["rows"],
                "tokens": m["tokens"],
                "shards": len(m["shards"]),
                "largest_mb": max(s["bytes"] for s in m["shards"]) / 2**20,
                "build_peak_mb": b["peak_kb"] / 1024,
                "build_secs": b["secs"],
                "kept": md["rows"],
                "out_shards": len(md["shards"]),
                "decon_peak_mb": d["peak_kb"] / 1024,
                "decon_secs": d["secs"],
            }
        )
        shutil.rmtree(buf)
        shutil.rmtree(dst)
        if (out[-1]["rows"], out[-1]["kept"]) != (out[0]["rows"], out[0]["kept"]):
            raise RuntimeError(f"--shard-mib {mib} gave other rows than --shard-mib {mibs[0]}: {out}")
    return out


def print_shards_part(results: list[dict]) -> None:
    a = results[0]
    print(
        f"\nbuild --shard-rows {a['rows']:,} of {a['rows']:,} long documents ({a['tokens'] / a['rows']:,.0f} GPT-2 "
        f"tokens a row), then decontaminate of that buffer against 200 texts (keeps {a['kept']:,} rows); "
        f"{CODE.name}; fresh process each; ratio: peak against --shard-mib {a['mib']}'s"
    )
    print(
        f"{'--shard-mib':>11}{'shards':>8}{'largest':>11}{'build peak':>14}{'ratio':>7}{'seconds':>9}"
        f"{'decontaminate':>16}{'ratio':>7}{'seconds':>9}{'shards out':>12}"
    )
    for r in results:
        print(
            f"{r['mib']:>11}{r['shards']:>8}{r['largest_mb']:>8.1f} MB{r['build_peak_mb']:>11.1f} MB"
            f"{r['build_peak_mb'] / a['build_peak_mb']:>7.2f}{r['build_secs']:>9.1f}{r['decon_peak_mb']:>13.1f} MB"
            f"{r['decon_peak_mb'] / a['decon_peak_mb']:>7.2f}{r['decon_secs']:>9.1f}{r['out_shards']:>12}"
        )


def _norm(text: str) -> str:
    import unicodedata

    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def bench_curate_speed(buf: Path, work: Path, repeat: int) -> dict:
    """op -> (best seconds ours, best seconds datasets), alternating the two; the kept row counts are checked
    to agree."""
    import hashlib
    import shutil

    import datasets

    from shiq_data.buffer import open_buffer
    from shiq_data.curate.dedup import dedup_buffer
    from shiq_data.curate.filter import filter_buffer
    from shiq_data.curate.stats import buffer_stats

    datasets.disable_progress_bars()
    shards = [str(p) for p in open_buffer(buf).shard_paths]

    def load():
        return datasets.concatenate_datasets([datasets.Dataset.from_file(p) for p in shards])

    def ours_filter(out):
        return filter_buffer(buf, out, "reward > 0 AND source = 'wiki'", command=["bench"])[1]

    def theirs_filter(out):
        kept = load().filter(
            lambda r, s: [a > 0 and b == "wiki" for a, b in zip(r, s)],
            input_columns=["reward", "source"],
            batched=True,
            keep_in_memory=True,
        )
        kept.save_to_disk(str(out))
        return len(kept)

    def ours_dedup(out):
        return dedup_buffer(buf, out, command=["bench"])[1]["rows_kept"]

    def theirs_dedup(out):
        ds = load()

        def key(p, c):
            return {
                "key": [
                    hashlib.blake2b(f"{_norm(a)}\0{_norm(b)}".encode(), digest_size=16).digest() for a, b in zip(p, c)
                ]
            }

        keys = ds.map(key, input_columns=["prompt", "completion"], batched=True, keep_in_memory=True)
        first = ~keys.select_columns(["key"]).to_pandas()["key"].duplicated().to_numpy()
        kept = ds.select(np.flatnonzero(first), keep_in_memory=True)
        kept.save_to_disk(str(out))
        return len(kept)

    def ours_stats(out):
        return buffer_stats(buf)[0]["rows"]

    def theirs_stats(out):
        df = load().select_columns(["source", "group_id", "prompt_len", "tokens", "reward"]).to_pandas()
        df["n_tokens"] = df.tokens.map(len)
        df.groupby("source")[["n_tokens", "prompt_len", "reward"]].describe(percentiles=[0.5, 0.95])
        df[["n_tokens", "prompt_len", "reward"]].describe(percentiles=[0.5, 0.95])
        df.groupby("group_id").size().value_counts()
        return len(df)

    ops = {
        "filter": (ours_filter, theirs_filter),
        "dedup": (ours_dedup, theirs_dedup),
        "stats": (ours_stats, theirs_stats),
    }
    best = {op: [float("inf"), float("inf")] for op in ops}
    counts: dict = {}
    for k in range(repeat):
        for op, fns in ops.items():
            for side in (0, 1) if k % 2 == 0 else (1, 0):
                out = work / f"speed-{op}-{side}"
                shutil.rmtree(out, ignore_errors=True)
                t = time.perf_counter()
                counts[op, side] = fns[side](out)
                best[op][side] = min(best[op][side], time.perf_counter() - t)
            if counts[op, 0] != counts[op, 1]:
                raise RuntimeError(f"{op}: shiq_data kept {counts[op, 0]} rows, datasets {counts[op, 1]}")
    return best


def print_buffer_part(results: dict, args) -> None:
    b, r = results["build"], results["read"]
    print(
        f"data: {b['rows']} rows, {b['tokens']} GPT-2 tokens; batches of {args.batch_rows} rows; "
        f"torch threads 1; {os.cpu_count()} CPUs (shared); best of {args.repeat} runs, "
        f"{' then '.join(SIDES)} in even runs, {' then '.join(SIDES[::-1])} in odd ones"
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


def print_curate_part(results: dict, args) -> None:
    w = results.get("workers")
    if w:
        print(
            f"\nbuild --workers 2 against one process: {w['rows']} rows, {w['one_rows_per_s']:,.0f} -> "
            f"{w['two_rows_per_s']:,.0f} rows/s (x{w['two_rows_per_s'] / w['one_rows_per_s']:.2f}); shards "
            f"identical: {w['same']}; {os.cpu_count()} CPUs (shared), best of {args.repeat} alternating runs"
        )
    mem = results.get("curate_memory")
    if not mem:
        print_curate_speed(results["curate_speed"], args.curate_rows * args.growth)
        return
    small, big = (r["rows"] for r in next(iter(mem.values())))
    print(
        f"\n{'verb (fresh process)':<22}{'RssAnon peak':>14}{'':>10}{'ratio':>8}{'per added row':>15}"
        f"{'seconds':>16}\n{'':<22}{f'{small:,} rows':>14}{f'{big:,} rows':>12}{'':>8}{'':>15}"
    )
    for name, (a, b) in mem.items():
        per_row = (b["peak_mb"] - a["peak_mb"]) * 2**20 / (b["rows"] - a["rows"])
        print(
            f"{name:<22}{a['peak_mb']:>11.1f} MB{b['peak_mb']:>9.1f} MB{b['peak_mb'] / a['peak_mb']:>8.2f}"
            f"{per_row:>11.0f} B{a['secs']:>8.1f}{b['secs']:>8.1f}"
        )
    if results.get("curate_speed"):
        print_curate_speed(results["curate_speed"], big)


def print_curate_speed(speed: dict, rows: int) -> None:
    print(f"\n{f'on {rows:,} rows (seconds)':<30}{'shiq_data':>10}{'datasets':>10}{'speed ratio':>13}")
    for op, (ours, theirs) in speed.items():
        print(f"{op:<30}{ours:>10.2f}{theirs:>10.2f}{theirs / ours:>13.2f}")


def print_groups_part(results: list[dict], args) -> None:
    a, b = results
    per_group = (b["peak_mb"] - a["peak_mb"]) * 2**20 / (b["groups"] - a["groups"])
    print(
        f"\nbuild, every row its own prompt of {args.prompt_chars:,} characters ({CODE.name}; fresh process each)\n"
        f"{'groups':>10}{'RssAnon peak':>15}{'seconds':>9}"
    )
    for r in results:
        print(f"{r['groups']:>10,}{r['peak_mb']:>12.1f} MB{r['secs']:>9.1f}")
    print(f"ratio {b['peak_mb'] / a['peak_mb']:.2f}, {per_group:,.0f} B per added group")


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--part",
        choices=("all", "buffer", "curate", "groups", "near", "shards"),
        default="all",
        help="buffer: measures 1-3 (building, reading, reader memory); curate: 4-6 (parallel build, the "
        "curation verbs' memory and speed); groups: 7 (build memory per distinct prompt group); near: 8 (near "
        "duplicates that cluster); shards: 9 (build and decontaminate memory by --shard-mib on long "
        "documents); default %(default)s",
    )
    ap.add_argument(
        "--tokens", type=_args.count, default=1_000_000, help="tokens of the synthetic text data (default %(default)s)"
    )
    ap.add_argument(
        "--growth", type=_args.integer(2), default=10, help="size factor of the memory scans (default %(default)s)"
    )
    ap.add_argument("--batch-rows", type=_args.count, default=16, help="rows per random batch (default %(default)s)")
    ap.add_argument(
        "--steps", type=_args.count, default=500, help="random batches timed per reader (default %(default)s)"
    )
    ap.add_argument(
        "--curate-rows",
        type=_args.count,
        default=5000,
        help="rows of the smaller buffer of the curation memory scan; the larger has --growth times as many "
        "(default %(default)s)",
    )
    ap.add_argument(
        "--verbs",
        default=None,
        help="only the memory scan, of these comma-separated curation verbs, e.g. 'dedup,export hf' (default: "
        "every verb, and the parallel build and the speed against datasets)",
    )
    ap.add_argument(
        "--group-rows",
        type=_args.count,
        default=2000,
        help="rows (each its own group) of the smaller input of the group memory scan; the larger has --growth "
        "times as many (default %(default)s)",
    )
    ap.add_argument(
        "--near-rows",
        type=_args.count,
        default=2000,
        help="rows of the smallest buffer of the near-duplicate scan; the others have 2 and 4 times as many "
        "(default %(default)s)",
    )
    ap.add_argument(
        "--shard-doc-rows",
        type=_args.integer(51),
        default=4000,
        help="rows of long documents (about 1,540 tokens each) of the shard scan, at least 51: decontaminate drops "
        "50 of them (default %(default)s)",
    )
    ap.add_argument(
        "--prompt-chars",
        type=_args.count,
        default=2000,
        help="prompt length of the group memory scan (default %(default)s)",
    )
    ap.add_argument(
        "--code",
        type=_args.checkout,
        default=None,
        help="checkout whose shiq_data the measured commands of the memory scans run (default: this one's)",
    )
    ap.add_argument(
        "--speed-only",
        action="store_true",
        help="with --part curate: only measure 6 (filter, dedup and stats against datasets) on the larger buffer",
    )
    ap.add_argument(
        "--repeat",
        type=_args.count,
        default=3,
        help="runs of each contender; the best is reported (default %(default)s)",
    )
    ap.add_argument("--json", type=_args.output_file, default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)
    if args.verbs is not None:
        known = list(curate_verbs(Path("buffer"), Path("out")))
        args.verbs = [v.strip() for v in args.verbs.split(",")]
        unknown = [v for v in args.verbs if v not in known]
        if unknown:
            ap.error(f"--verbs: unknown {', '.join(map(repr, unknown))}; expected some of {', '.join(known)}")
    if args.verbs and args.speed_only:
        ap.error("--verbs (the memory scan) and --speed-only (no memory scan) exclude each other")
    if (args.verbs or args.speed_only) and args.part not in ("all", "curate"):
        ap.error(f"--verbs and --speed-only measure the curation verbs: not with --part {args.part}")
    global CODE
    if args.code is not None:
        CODE = Path(args.code).resolve()

    import torch

    torch.set_num_threads(1)
    from shiq_data.buffer import write_buffer
    from shiq_data.tokenizers import load_tokenizer

    tokenizer, info = load_tokenizer("gpt2")
    results = {}
    with tempfile.TemporaryDirectory(prefix="shiq-bench-") as tmp:
        work = Path(tmp)
        if args.part in ("all", "buffer"):
            # about 110 GPT-2 tokens per record
            n_records = max(args.tokens // 110, 100)
            jsonl = work / "records.jsonl"
            with open(jsonl, "w") as f:
                for r in synthetic_records(n_records):
                    f.write(json.dumps(r) + "\n")
            # the machine is shared: alternate the two contenders' order and keep each one's best run
            builds = [
                bench_build(jsonl, work, tokenizer, info, tag=str(k), order=side_order(k)) for k in range(args.repeat)
            ]
            buf, ds = builds[0][0], builds[0][1]
            results["build"] = {
                "rows": len(buf),
                "tokens": buf.manifest["tokens"],
                "ours_rows_per_s": len(buf) / min(b[2] for b in builds),
                "datasets_rows_per_s": len(ds) / min(b[3] for b in builds),
                "order": [list(side_order(k)) for k in range(args.repeat)],  # each round's, the reads' too
            }
            reads = [  # pad -1: no token
                bench_read(buf, ds, args.batch_rows, args.steps, pad_id=-1, order=side_order(k))
                for k in range(args.repeat)
            ]
            results["read"] = {
                "ours_tokens_per_s": max(r[0] for r in reads),
                "datasets_tokens_per_s": max(r[1] for r in reads),
            }
            results["memory"] = [
                bench_memory(work, info, n, args.batch_rows) for n in (args.tokens, args.tokens * args.growth)
            ]
            print_buffer_part(results, args)
        if args.part in ("all", "curate"):
            verbs = args.verbs
            scan = not args.speed_only  # the memory scan (and its inputs), else only the speed against datasets
            if verbs is None and scan:
                jsonl = work / "workers.jsonl"
                with open(jsonl, "w") as f:
                    for r in synthetic_records(args.curate_rows, seed=3):
                        f.write(json.dumps(r) + "\n")
                results["workers"] = bench_workers(jsonl, work / "workers", tokenizer, info, args.repeat)
            bufs = []
            sizes = (args.curate_rows, args.curate_rows * args.growth)
            for n in sizes if scan else sizes[1:]:
                bufs.append(work / f"curate-{n}")
                # shards of curate_rows / 5 rows: both buffers are many shards, so what a verb holds per shard is
                # the same for both and the difference is what it holds per row of the buffer
                rows = synthetic_text_rows(n)
                shard_rows = max(args.curate_rows // 5, 1)
                write_buffer(
                    rows, bufs[-1], tokenizer_info=info, command=["bench"], shard_rows=shard_rows, progress=False
                )
                if scan:
                    with open(f"{bufs[-1]}.jsonl", "w") as f:  # the same texts, for build
                        for r in synthetic_text_rows(n):
                            f.write(json.dumps({k: r[k] for k in ("prompt", "completion", "reward")}) + "\n")
            if scan:
                with open(work / "append.jsonl", "w") as f:  # 1,000 rows repeating old rows' texts (counted, warned)
                    for i, r in enumerate(synthetic_text_rows(2000)):
                        if i % 2 == 0:
                            f.write(json.dumps({k: r[k] for k in ("prompt", "completion", "reward")}) + "\n")
                with open(work / "eval.jsonl", "w") as f:  # 1,000 evaluation texts, 1 in 10 an early row's completion
                    rng = np.random.default_rng(7)
                    for i, r in enumerate(synthetic_text_rows(10_000)):
                        text = r["completion"] if i % 100 == 0 else " ".join(rng.choice(WORDS, 40))
                        if i % 10 == 0:
                            f.write(json.dumps({"prompt": text}) + "\n")
            if scan:
                results["curate_memory"] = bench_curate_memory(bufs, work, verbs)
            if verbs is None:
                results["curate_speed"] = bench_curate_speed(bufs[-1], work, args.repeat)
            print_curate_part(results, args)
        if args.part in ("all", "groups"):
            rows = [args.group_rows, args.group_rows * args.growth]
            results["group_memory"] = bench_group_memory(work, rows, args.prompt_chars)
            print_groups_part(results["group_memory"], args)
        if args.part in ("all", "near"):
            results["near"] = bench_near(work, [args.near_rows * k for k in (1, 2, 4)], info)
            print_near_part(results["near"])
        if args.part in ("all", "shards"):
            results["shards"] = bench_shards(work, args.shard_doc_rows)
            print_shards_part(results["shards"])
    if args.json:
        from shiq_data.io import atomic_write_json

        atomic_write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
