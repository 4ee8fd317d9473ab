"""Every command-line script of ``tools/`` answers ``--help`` in plain text (as test_help_texts.py asks of the
console scripts): no reStructuredText markup and no path of this checkout, exit status 0."""

from __future__ import annotations

import subprocess

import pytest
from test_help_texts import MARKUP  # what the console scripts' help must not show either
from tool_runs import TOOLS, run_tool

SCRIPTS = sorted(p.name for p in TOOLS.glob("*.py") if "ArgumentParser(" in p.read_text())
SAYS = {  # a phrase every script's help must contain: what it measures (no hyphen: wrapping may break there)
    "bench_adamw.py": "AdamW's step on CPU",
    "bench_attention.py": "with each core attention",
    "bench_bfcl_eval.py": "one at a time against in lockstep batches",
    "bench_data.py": "replay buffer against the datasets library",
    "bench_ddp.py": "reduce against megatron's DDP",
    "bench_eval.py": "KL from two full passes against one shared pass",
    "bench_generate.py": "Sampling speed: the megatron model",
    "bench_jobs.py": "one after the other with every core, against side by side",
    "bench_prefix_cache.py": "prefix cache and shared prefixes",
    "bench_qsharp_decode.py": "Decoding cost of Q♯ guidance",
    "bench_ref_stats.py": "full logits against chunks",
    "bench_ref_stats_prefix.py": "shared prefix once",
    "bench_sampler.py": "cost per step on one data",
    "bench_startup.py": "compiled at their first call",
    "bench_train.py": "cost of ShiQ against plain SFT",
    "bench_vs_trl.py": "Training throughput of ShiQ on megatron",
    "plan_memory.py": "Predicted memory per GPU",
}
HIDDEN = {"bench_jobs.py": "--arm"}  # an option for the script's own child processes, not for users


def test_every_script_is_checked():
    assert set(SAYS) == set(SCRIPTS)  # a new script needs its phrase; a removed one leaves none behind
    assert set(HIDDEN) <= set(SCRIPTS) and {"bench_data.py", "plan_memory.py"} <= set(SCRIPTS)
    assert "memory_model.py" not in SCRIPTS  # a library of plan_memory's, no command line


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_is_plain_text(name):
    text = run_tool(name, "--help", timeout=120)
    assert text.startswith("usage: ") and "options:" in text
    for markup in MARKUP:
        assert markup not in text, f"{name} --help shows {markup}"
    assert str(TOOLS.parent) not in text
    assert SAYS[name] in " ".join(text.split()), f"{name} --help does not say {SAYS[name]!r}"
    assert name not in HIDDEN or HIDDEN[name] not in text


def test_the_setup_script_help_is_its_comment_and_no_code(tmp_path):
    """``bash tools/setup_env.sh --help`` prints the script's opening comment (what it does, its two uses) and
    none of its code, and installs nothing (run from a copy, so a .venv it made would be seen)."""
    script = (TOOLS / "setup_env.sh").read_text()
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "setup_env.sh").write_text(script)
    out = subprocess.run(["bash", "tools/setup_env.sh", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = script.splitlines()[1:]  # the comment block: after the shebang, up to the first line of code
    comment = lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))]
    assert out.stdout.splitlines() == comment
    assert "--test" in out.stdout and not (tmp_path / ".venv").exists()
