"""BFCL model output cannot hang or exhaust memory: the work of every entry is bounded."""

import json
import subprocess
import sys
import textwrap

import pytest

from shiq_eval.bfcl import budget, checker, data, executor

pytest.importorskip("bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker")


@pytest.fixture(autouse=True)
def _bfcl_root(tmp_path, monkeypatch):
    monkeypatch.setenv("BFCL_PROJECT_ROOT", str(tmp_path))


# ---- 1. bounded work per entry ------------------------------------------------------------------

# In GorillaFileSystem, cp and mv share subdirectories: each round below puts two references to
# the previous directory "a" into a new "a", so after k rounds "a" holds 2**k paths (from 5k + 1
# legal calls), which du() and find() then walk.
ROUNDS = 40
BLOWUP = ["mkdir(dir_name='a')"] + [
    "cp(source='a', destination='b')",
    "mkdir(dir_name='c')",
    "mv(source='a', destination='c')",
    "mv(source='b', destination='c')",
    "mv(source='c', destination='a')",
] * ROUNDS
FS_ENTRY = ("multi_turn_base", 0)

_PRELUDE = """
import json, sys, time
from shiq_eval.bfcl import budget, checker, data, executor, rollout
from shiq_eval.scorers import BFCLScorer
BLOWUP = json.loads(sys.argv[1])
entry = data.load_entry("multi_turn_base", 0)
"""


def _run(script: str, *args, timeout: float) -> dict:
    """Run ``script`` in a fresh interpreter (so a hang is killed, never the test run); its JSON."""
    out = subprocess.run(
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(script), json.dumps(BLOWUP), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_the_blowup_walks_two_to_the_rounds_paths():
    """The crafted sequence is a real blow-up: the tree it builds, counted independently by a walk
    over shared directories with memoization, holds 2**ROUNDS paths under "a"."""
    env = executor.Environment(data.load_entry(*FS_ENTRY))
    assert not any(r.startswith(executor.ERROR_PREFIX) for r in env.execute(BLOWUP))
    fs = env.instances["GorillaFileSystem"]
    memo = {}

    def paths(d):  # number of paths below d, each shared directory counted once per path
        if id(d) not in memo:
            memo[id(d)] = sum(1 + (paths(c) if hasattr(c, "contents") else 0) for c in d.contents.values())
        return memo[id(d)]

    assert paths(fs._current_dir.contents["a"]) == 2 ** (ROUNDS + 1) - 2


def test_blowup_without_a_budget_does_not_finish():
    """Unbounded, du() over the blown-up tree runs on (killed after 3 s): the budget is needed."""
    with pytest.raises(subprocess.TimeoutExpired):
        _run(
            """
            env = executor.Environment(entry)
            print(json.dumps(env.execute(BLOWUP + ["du()"])[-1]))
            """,
            timeout=3,
        )


def test_blowup_ends_with_error_results_and_the_next_entry_is_unaffected():
    r = _run(
        """
        d = data.ground_truth_decoded(entry)
        d[0] = d[0] + [BLOWUP + ["du()", "find(path='.')", "ls()"]]
        start = time.perf_counter()
        verdict = checker.check_trajectory(entry, d)
        seconds = time.perf_counter() - start
        env = executor.Environment(entry, budget.Budget())
        results = env.execute(BLOWUP + ["du()", "find(path='.')", "pwd()"])
        score = BFCLScorer()(["multi_turn_base_0"], [json.dumps(d)])
        traj = rollout.rollout_entry(entry, rollout.ScriptedPolicy(d))
        tool = [m["content"] for m in traj["messages"] if m["role"] == "tool"]
        nxt = checker.check_entry("multi_turn_base", 1, data.ground_truth_decoded(data.load_entry("multi_turn_base", 1)))
        print(json.dumps(dict(verdict=verdict, seconds=seconds, results=results[-3:], spent=env.budget.spent_steps,
                              score=score, tool=tool[-4:], traj_valid=traj["valid"], next=nxt)))
        """,
        timeout=180,
    )
    assert r["seconds"] < 15.0  # two budgeted runs (cumulative and reset) of at most a few seconds
    assert r["verdict"]["valid"] is False and r["verdict"]["error_type"] == checker.ERR_STATE
    assert all(x.startswith(executor.ERROR_PREFIX + "work limit of this entry") for x in r["results"]), r["results"]
    assert r["score"] == [0.0] and r["traj_valid"] is False
    assert all(x.startswith(executor.ERROR_PREFIX + "work limit of this entry") for x in r["tool"][-3:]), r["tool"]
    assert r["next"]["valid"] is True and r["next"]["turn_rewards"] == [1.0] * r["next"]["num_turns"]


def test_time_and_memory_allowances_stop_a_call():
    r = _run(
        """
        out = {}
        for name, b in [("time", budget.Budget(steps=10**15, seconds=1.0)),
                        ("memory", budget.Budget(steps=10**15, seconds=120.0, memory_bytes=64 << 20))]:
            env = executor.Environment(entry, b)
            env.execute(BLOWUP)
            start = time.perf_counter()
            out[name] = env.execute(["du()" if name == "time" else "find(path='.')", "pwd()"])
            out[name + "_seconds"] = time.perf_counter() - start
        print(json.dumps(out))
        """,
        timeout=240,
    )
    assert r["time"][0] == executor.ERROR_PREFIX + "work limit of this entry: time budget of 1 s exhausted"
    assert r["time_seconds"] < 5.0
    assert r["memory"][0] == (
        executor.ERROR_PREFIX + f"work limit of this entry: memory allowance of {64 << 20} bytes per call exceeded"
    )
    assert r["time"][1] == r["time"][0] and r["memory"][1] == r["memory"][0]  # the entry is done


def test_step_budget_is_deterministic_and_counts_every_call():
    e = data.load_entry(*FS_ENTRY)
    spent = []
    for _ in range(2):
        b = budget.Budget()
        env = executor.Environment(e, b)
        env.execute(data.ground_truth_decoded(e)[0][0])
        spent.append(b.spent_steps)
    assert spent[0] == spent[1] > budget.CALL_STEPS * len(data.ground_truth_decoded(e)[0][0])
    # Many refused calls run the budget out too: 10**6 / 100 steps per call.
    b = budget.Budget()
    results = executor.Environment(e, b).execute(["nope()"] * (budget.DEFAULT_STEPS // budget.CALL_STEPS + 1))
    assert results[-2] == executor.ERROR_PREFIX + "name 'nope' is not defined"
    assert results[-1] == executor.ERROR_PREFIX + f"work limit of this entry: step budget of {b.steps} exhausted"


def test_a_profiler_installed_before_is_put_back():
    seen = []

    def outer(frame, event, arg):
        seen.append(event)

    env = executor.Environment(data.load_entry(*FS_ENTRY), budget.Budget())
    sys.setprofile(outer)
    try:
        env.execute(["pwd()"])
        after = sys.getprofile()
    finally:
        sys.setprofile(None)
    assert after is outer


def test_ground_truth_fits_the_default_budget_with_room():
    """Every ground truth, run with a budget, passes and spends under 1% of the default steps."""
    largest = 0
    for cat in data.CATEGORIES:
        for e in data.load_category(cat):
            b = budget.Budget()
            env = executor.Environment(e, b)
            for calls in e["ground_truth"]:
                assert not any(r.startswith("Error during execution: work limit") for r in env.execute(calls))
            largest = max(largest, b.spent_steps)
    assert 0 < largest < budget.DEFAULT_STEPS // 100
