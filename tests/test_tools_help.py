"""Every command-line script of ``tools/`` answers ``--help`` in plain text (as test_help_texts.py asks of the
console scripts): no reStructuredText markup and no path of this checkout, exit status 0."""

from __future__ import annotations

import pytest
from test_help_texts import MARKUP  # what the console scripts' help must not show either
from tool_runs import TOOLS, run_tool

SCRIPTS = sorted(p.name for p in TOOLS.glob("*.py") if "argparse" in p.read_text())
SAYS = {  # a phrase a script's help must contain: what it measures
    "bench_adamw.py": "fused",
    "bench_eval.py": "shared pass",
    "bench_generate.py": "--repeat",
    "bench_jobs.py": "side by side",
    "bench_ref_stats_prefix.py": "shared prefix",
    "bench_startup.py": "compiled at their first call",
    "bench_vs_trl.py": "trl dpo (online ref)",
}
HIDDEN = {"bench_jobs.py": "--arm"}  # an option for the script's own child processes, not for users


def test_every_script_is_checked():
    assert set(SAYS) | set(HIDDEN) | {"bench_data.py", "plan_memory.py"} <= set(SCRIPTS)
    assert "memory_model.py" not in SCRIPTS  # a library of plan_memory's, no command line


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_is_plain_text(name):
    text = run_tool(name, "--help", timeout=120)
    assert text.startswith("usage: ") and "options:" in text
    for markup in MARKUP:
        assert markup not in text, f"{name} --help shows {markup}"
    assert str(TOOLS.parent) not in text
    assert SAYS.get(name, "") in " ".join(text.split())
    assert name not in HIDDEN or HIDDEN[name] not in text
