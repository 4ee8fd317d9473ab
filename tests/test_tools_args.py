"""Every command-line script of ``tools/`` refuses a bad option value as the project's commands do: one line on
stderr naming the option (argparse's usage is not printed), exit status 2, no traceback, nothing on stdout and no
temporary file left behind. Only refusals run here, no measurement."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from tool_runs import TOOLS

HUGE = "1" + "0" * 40
CASES = [  # (script, arguments, the option the refusal names)
    ("bench_adamw.py", ["--steps", "0"], "--steps"),
    ("bench_adamw.py", ["--rounds", "-1"], "--rounds"),
    ("bench_adamw.py", ["--threads", HUGE], "--threads"),
    ("bench_attention.py", ["--shapes", "0x5"], "--shapes"),
    ("bench_attention.py", ["--shapes", "a,b"], "--shapes"),
    ("bench_attention.py", ["--shapes", ""], "--shapes"),
    ("bench_attention.py", ["--shapes", "4x1"], "--shapes"),
    ("bench_attention.py", ["--top", "-1"], "--top"),
    ("bench_bfcl_eval.py", ["--batch", "4", "0"], "--batch"),
    ("bench_bfcl_eval.py", ["--new-tokens", "0"], "--new-tokens"),
    ("bench_bfcl_eval.py", ["--trained", "30"], "--trained"),
    ("bench_bfcl_eval.py", ["--scenarios", "100000"], "--scenarios"),
    ("bench_data.py", ["--tokens", "0"], "--tokens"),
    ("bench_data.py", ["--growth", "1"], "--growth"),
    ("bench_data.py", ["--repeat", "0"], "--repeat"),
    ("bench_data.py", ["--verbs", "dedup,nope"], "--verbs"),
    ("bench_data.py", ["--verbs", ","], "--verbs"),
    ("bench_data.py", ["--verbs", "dedup", "--speed-only"], "--speed-only"),
    ("bench_data.py", ["--part", "groups", "--speed-only"], "--speed-only"),
    ("bench_data.py", ["--part", "shards", "--shard-doc-rows", "0"], "--shard-doc-rows"),
    ("bench_data.py", ["--part", "shards", "--shard-doc-rows", "50"], "--shard-doc-rows"),  # all 50 dropped
    ("bench_data.py", ["--code", "/nonexistent"], "--code"),
    ("bench_data.py", ["--json", "/nonexistent/out.json"], "--json"),
    ("bench_ddp.py", ["--dp", "2", "0"], "--dp"),
    ("bench_ddp.py", ["--dp", "100000"], "--dp"),
    ("bench_ddp.py", ["--hidden", "10", "--heads", "3"], "--hidden"),
    ("bench_ddp.py", ["--seq", "1"], "--seq"),
    ("bench_eval.py", ["--prompts", "0"], "--prompts"),
    ("bench_eval.py", ["--prompts", "100000"], "--prompts"),
    ("bench_eval.py", ["--batch", "x"], "--batch"),
    ("bench_generate.py", ["--new-tokens", "-3"], "--new-tokens"),
    ("bench_generate.py", ["--prompts", "100000"], "--prompts"),
    ("bench_jobs.py", ["--runs", "0"], "--runs"),
    ("bench_jobs.py", ["--arm", "-1"], "--arm"),
    ("bench_prefix_cache.py", ["--trainable", "0"], "--trainable"),
    ("bench_prefix_cache.py", ["--system", "-1"], "--system"),
    ("bench_prefix_cache.py", ["--logits-chunk", "-1"], "--logits-chunk"),
    ("bench_prefix_cache.py", ["--rows", "2", "--group-size", "4"], "--rows"),
    ("bench_prefix_cache.py", ["--buffer", "/nonexistent"], "--buffer"),
    ("bench_qsharp_decode.py", ["--beta", "nan"], "--beta"),
    ("bench_qsharp_decode.py", ["--beta", "-inf"], "--beta"),
    ("bench_qsharp_decode.py", ["--atoms", "1"], "--atoms"),
    ("bench_qsharp_decode.py", ["--top-k", "0"], "--top-k"),
    ("bench_ref_stats.py", ["--chunk", "0"], "--chunk"),
    ("bench_ref_stats.py", ["--batch-tokens", "-5"], "--batch-tokens"),
    ("bench_ref_stats_prefix.py", ["/nonexistent"], "BUFFER"),
    ("bench_ref_stats_prefix.py", ["--groups", "0", "/nonexistent"], "--groups"),
    ("bench_startup.py", ["--rounds", "0"], "--rounds"),
    ("bench_startup.py", ["--measures", ","], "--measures"),
    ("bench_train.py", ["--heads", "0"], "--heads"),
    ("bench_train.py", ["--hidden", "256", "--heads", "3"], "--hidden"),
    ("bench_train.py", ["--prompt", "256"], "--prompt"),
    ("bench_train.py", ["--chunk", "0"], "--chunk"),
    ("bench_train.py", ["--skip-time", "--skip-memory"], "--skip-memory"),
    ("bench_vs_trl.py", ["--sets", "synthetic,nope"], "--sets"),
    ("bench_vs_trl.py", ["--contestants", "nope"], "--contestants"),
    ("bench_vs_trl.py", ["--contestants", ","], "--contestants"),
    ("bench_vs_trl.py", ["--sets", "hh", "--buffer", "/nonexistent"], "--buffer"),
    ("bench_vs_trl.py", ["--pairs", "0"], "--pairs"),
    ("bench_vs_trl.py", ["--synthetic-len", "1"], "--synthetic-len"),
    ("plan_memory.py", ["--mfu", "0"], "--mfu"),
    ("plan_memory.py", ["--mfu", "nan"], "--mfu"),
    ("plan_memory.py", ["--mfu", "1.5"], "--mfu"),
    ("plan_memory.py", ["--tp", "0"], "--tp"),
    ("plan_memory.py", ["--tp", "2", "--dp", HUGE], "--dp"),
    ("plan_memory.py", ["--tp", "2", "--seq", "-1"], "--seq"),
    ("plan_memory.py", ["--tp", "2", "--trainable-layers", "0"], "--trainable-layers"),
    ("plan_memory.py", ["--tp", "2", "--trainable-layers", "33"], "does not fit model"),
    ("plan_memory.py", ["--tp", "2", "--logits-chunk-tokens", "-1"], "--logits-chunk-tokens"),
    ("plan_memory.py", ["--tp", "2", "--pp", "3"], "does not fit model"),
    ("plan_memory.py", ["--tp", "3"], "does not fit model"),
    ("plan_memory.py", ["--tp", "1", "--sequence-parallel"], "--sequence-parallel"),
    ("plan_memory.py", ["--pp", "2"], "--pp"),
    ("plan_memory.py", ["--validate", "--tp", "2"], "--validate"),
]


@pytest.mark.parametrize("name,args,option", CASES, ids=[f"{n} {' '.join(a)}"[:60] for n, a, _ in CASES])
def test_bad_value_is_one_line_and_status_2(tmp_path, name, args, option):
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(TOOLS / name), *args], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    errors = [line for line in lines if ": error: " in line]
    assert errors == lines[-1:], out.stderr
    assert option in errors[0]
    assert list(tmp_path.iterdir()) == []  # no temporary file or folder left behind


@pytest.mark.parametrize("verbose", ["0", "1"])
def test_ctrl_c_ends_a_tool_in_one_line(verbose):
    """A benchmark stopped with Ctrl-C printed a traceback of some thirty lines (under torch.distributed, each
    prefixed [rank0]); now one line, as the shiq commands print, and the status of SIGINT (130 in a shell).
    SHIQ_VERBOSE=1 keeps the traceback."""
    import signal

    code = "import sys; sys.argv = ['bench_x.py']; import _args; raise KeyboardInterrupt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TOOLS), os.environ.get("PYTHONPATH", "")]),
        "SHIQ_VERBOSE": verbose,
    }
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == -signal.SIGINT
    if verbose == "0":
        assert proc.stderr == "bench_x.py: interrupted\n"
    else:
        assert "Traceback" in proc.stderr and proc.stderr.rstrip().endswith("KeyboardInterrupt")


@pytest.mark.parametrize("unbuffered", ["1", ""])
@pytest.mark.parametrize("args", [[], ["--tp", "2"]])
def test_a_reader_that_goes_away_stops_a_tool_quietly(tmp_path, unbuffered, args):
    """``plan_memory.py | head -1``: a BrokenPipeError traceback and status 1 (or, with stdout block-buffered,
    Python's 'Exception ignored ... BrokenPipeError' at exit and status 120). It now stops as the shiq commands
    do: the shell's SIGPIPE status (141), nothing on stderr."""
    import shlex

    cmd = " ".join(shlex.quote(c) for c in [sys.executable, str(TOOLS / "plan_memory.py"), *args])
    err = tmp_path / "err"
    proc = subprocess.run(
        ["bash", "-c", f"{cmd} 2>{shlex.quote(str(err))} | true; echo ${{PIPESTATUS[0]}}"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": unbuffered, "SHIQ_VERBOSE": "0"},
        timeout=120,
    )
    assert proc.stdout.strip() == "141" and err.read_text() == "", (proc.stdout, err.read_text())
