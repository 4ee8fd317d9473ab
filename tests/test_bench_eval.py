"""tools/bench_eval.py: the evaluation's paths sample the same completions and agree on the KL, on the real model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def test_help_is_plain_text():
    out = subprocess.run([sys.executable, str(TOOLS / "bench_eval.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "shared pass" in " ".join(out.stdout.split())
    assert "``" not in out.stdout and str(TOOLS.parent) not in out.stdout


def test_shared_path_matches_two_passes_on_smollm2():
    from shiq_data.assets import AssetMissing, smollm2_gguf

    try:
        smollm2_gguf()
    except AssetMissing as e:
        pytest.skip(str(e))
    cmd = [sys.executable, str(TOOLS / "bench_eval.py"), "--prompts", "6", "--new-tokens", "3", "--rounds", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.stdout.splitlines() if line.startswith("| ")
    }
    shared = ["shared first 24 layers", "shared first 24 layers, prompts' pass kept"]
    assert set(rows) == {
        "path",
        "two full passes",
        "shared first 24 layers, transformers' generate (baseline)",
        *shared,
    }
    for name in shared:
        same, dkl = rows[name][2].strip(), float(rows[name][3])
        assert same == "yes" and dkl < 1e-4, name
    assert "prompts' pass kept against not: same completions yes, max KL difference 0.0e+00" in out.stdout
