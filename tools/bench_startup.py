"""Start-up of the commands: megatron-core's fused kernels wrapped by torch.compile at import, against
compiled at their first call (shiq_train.deferred_compile).

Every process that imports megatron-core pays for its import; most of the test suite's processes and every
``torchrun`` rank do little else. Each measure runs a fresh Python process both ways, alternating, and
prints the median wall time (the wrapped way first in even rounds, 0, 2, ..., second in odd ones, so
neither the order nor load from other processes favours a way):

- ``import``: ``import torch; import megatron.core`` alone (as megatron-core ships), against the same after
  ``import shiq_train`` (as the commands import it);
- ``2 steps``: ``shiq-train`` training the default tiny model 2 steps on an 8-row buffer made here, with a
  checkpoint (what most of the command-line tests run).

"wrapped at import" runs the command with megatron-core imported before ``shiq_train`` (so its ``jit_fuser``
stays ``torch.compile``): the commands as they were before.

(``shiq-train --help`` is not measured: it does not import megatron-core.)

    python tools/bench_startup.py               # 5 rounds, about 4 minutes on 2 cores
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _args

from shiq_data.cli_common import ArgumentParser

REPO = Path(__file__).resolve().parents[1]
MEASURES = ("import", "2 steps")


def parse_args(argv=None):
    p = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Prints, per measure, the median seconds of a fresh process each way and their ratio (wrapped at "
        "import over compiled at first call: above 1, deferring is faster).",
    )
    p.add_argument("--rounds", type=_args.count, default=5, help="processes per measure and way (default 5)")
    p.add_argument(
        "--measures", default=",".join(MEASURES), help=f"comma-separated, of {', '.join(MEASURES)} (default all)"
    )
    args = p.parse_args(argv)
    args.measures = [m.strip() for m in args.measures.split(",") if m.strip()]
    unknown = sorted(set(args.measures) - set(MEASURES))
    if unknown or not args.measures:
        p.error(f"--measures: expected some of {', '.join(MEASURES)}, got {', '.join(unknown) or 'none'}")
    return args


def write_buffer(path: Path) -> None:
    """8 rows of random tokens (vocabulary 128) in 4 prompt groups, with reference columns."""
    import random

    from shiq_data.buffer import write_buffer as write

    rng = random.Random(0)
    rows = []
    for i in range(8):
        n = 10 + i % 3
        rows.append(
            {
                "group_id": i // 2,
                "prompt_len": 4,
                "tokens": [rng.randrange(128) for _ in range(n)],
                "action_mask": [False] * 4 + [True] * (n - 4),
                "rewards": [0.0] * (n - 1) + [float(i % 2)],
                "source": "bench",
                "ref_chosen_logits": [0.0] * n,
                "ref_logz": [0.0] + [math.log(128.0)] * (n - 1),
            }
        )
    tok = {"name": "bench", "fingerprint": "0", "vocab_size": 128}
    write(rows, path, tokenizer_info=tok, command=["bench_startup"], progress=False)


def command(args: list[str], wrapped: bool) -> str:
    """Python code running ``shiq-train args``; ``wrapped``: megatron-core imported first."""
    first = "import megatron.core; " if wrapped else ""
    return f"{first}import runpy, sys; sys.argv = ['shiq-train'] + {args!r}; runpy.run_module('shiq_train', run_name='__main__')"


def timed(code: str, run_dir: Path | None) -> float:
    if run_dir is not None:
        shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        sys.exit(f"bench_startup: the process failed: {res.stderr.strip().splitlines()[-1:]}")
    return seconds


def check_ways() -> None:
    """The two ways differ as they should: megatron-core's ``jit_fuser`` is ``torch.compile`` when it is imported
    first, and compiles at the first call when ``shiq_train`` is."""
    for first, want in (("megatron.core", "compile"), ("shiq_train", "compile_at_first_call")):
        code = f"import {first}, shiq_train, megatron.core; from megatron.core.jit import jit_fuser; print(jit_fuser.__name__)"
        res = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=REPO, capture_output=True, text=True)
        if res.stdout.strip() != want:
            sys.exit(f"bench_startup: with {first} imported first, jit_fuser is {res.stdout.strip()!r}, not {want!r}")


def main(argv=None) -> None:
    args = parse_args(argv)
    check_ways()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "2 steps" in args.measures:
            write_buffer(tmp / "buf")
        train = ["train.progress=false", "train.tensorboard=false", f"data.buffer={tmp / 'buf'}", f"out={tmp / 'run'}"]
        train += ["data.rows_per_micro_batch=2", "train.steps=2"]
        measures = {
            "import": (
                {
                    True: "import torch; import megatron.core",
                    False: "import shiq_train, torch; import megatron.core",
                },
                None,
            ),
            "2 steps": ({w: command(train, w) for w in (True, False)}, tmp / "run"),
        }
        print(
            f"median wall seconds of {args.rounds} fresh processes each way, alternating, the order reversed every "
            "other round, 1 torch thread"
        )
        print()
        print("| measure | wrapped at import | compiled at first call | wrapped / first call |")
        print("|---|---|---|---|")
        for name in args.measures:
            codes, run_dir = measures[name]
            times = {True: [], False: []}
            for r in range(args.rounds):
                for wrapped in (True, False) if r % 2 == 0 else (False, True):  # A B, then B A: no way always leads
                    times[wrapped].append(timed(codes[wrapped], run_dir))
            old, new = statistics.median(times[True]), statistics.median(times[False])
            print(f"| {name} | {old:.2f} | {new:.2f} | {old / new:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
