"""BFCL model output cannot escape, hang, corrupt or crash: the work of every entry is bounded,
process-wide state is kept, and hostile text is refused before it can recurse or exhaust memory."""

import ast
import copy
import decimal
import gc
import json
import subprocess
import sys
import textwrap
import time

import pytest

from shiq_eval.bfcl import budget, checker, data, executor, parse, rollout
from shiq_eval.scorers import BFCLScorer

pytest.importorskip("bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker")
long_context = pytest.importorskip("bfcl_eval.eval_checker.multi_turn_eval.func_source_code.long_context")
mpmath = pytest.importorskip("mpmath")


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
    """Unbounded, du() over the blown-up tree is still running 5 s after the tree was built (then
    killed): the budget is needed."""
    script = _PRELUDE + textwrap.dedent(
        """
        env = executor.Environment(entry)
        env.execute(BLOWUP)
        print("built", flush=True)
        print(env.execute(["du()"])[0], flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(BLOWUP)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "built\n"
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    finally:
        proc.kill()
        proc.wait()


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
    # The step budget (about a second of work) ends it; wall time is generous for loaded machines.
    assert r["seconds"] < 60.0 and r["spent"] > budget.DEFAULT_STEPS
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
            out[name + "_cpu"] = b.spent_seconds
        print(json.dumps(out))
        """,
        timeout=240,
    )
    assert r["time"][0] == executor.ERROR_PREFIX + "work limit of this entry: time budget of 1 s exhausted"
    assert 1.0 <= r["time_cpu"] < 2.0 and r["time_seconds"] < 60.0  # CPU time of the thread; wall: any load
    assert r["memory"][0] == (
        executor.ERROR_PREFIX + f"work limit of this entry: memory allowance of {64 << 20} bytes per call exceeded"
    )
    assert r["time"][1] == r["time"][0] and r["memory"][1] == r["memory"][0]  # the entry is done


def test_the_memory_allowance_counts_from_the_memory_held_not_from_an_earlier_peak():
    """The allowance was measured against the process's peak resident memory: after a higher peak (a
    model loaded and freed, or the parent's peak, which Linux hands to a process at ``exec``), a call
    could grow by that whole height plus the allowance before it was stopped."""
    r = _run(
        """
        import resource
        def peak_kb():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        held = bytearray(512 << 20)
        held[::4096] = b"x" * len(held[::4096])  # resident, then given back
        del held
        before = peak_kb()
        env = executor.Environment(entry, budget.Budget(steps=10**15, seconds=120.0, memory_bytes=64 << 20))
        env.execute(BLOWUP)
        result = env.execute(["find(path='.')"])[0]
        print(json.dumps({"result": result, "before": before, "after": peak_kb()}))
        """,
        timeout=240,
    )
    assert (
        r["result"]
        == executor.ERROR_PREFIX + f"work limit of this entry: memory allowance of {64 << 20} bytes per call exceeded"
    )
    assert r["after"] == r["before"]  # stopped about 64 MB above what it held: far below the earlier peak


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


def test_garbage_collected_during_a_call_is_not_charged():
    """Finalizers of other objects, run by a collection that a call's allocations trigger, would
    add profiler events that depend on the process's history, not on the call."""

    def work():  # 20,000 new lists: well past any collection threshold below
        return len([[i] for i in range(20_000)])

    clean = budget.Budget()
    budget.bounded_call(clean, work)
    finalized = []

    class Finalized:
        def __del__(self):
            finalized.append(sum(range(3)))

    thresholds = gc.get_threshold()
    gc.collect()
    gc.disable()
    try:
        for _ in range(1000):  # cyclic garbage: only a collection frees it
            x = Finalized()
            x.me = x
        del x
        # The next collection comes after 500 more allocations: inside the call, not before it.
        gc.set_threshold(gc.get_count()[0] + 500, *thresholds[1:])
        gc.enable()
        b = budget.Budget()
        budget.bounded_call(b, work)
        gc.collect()
    finally:
        gc.set_threshold(*thresholds)
        gc.enable()
    assert len(finalized) == 1000 and b.spent_steps == clean.spent_steps


def test_text_of_calls_and_results_is_charged():
    """Results kept by an entry total at most about steps * CHARS_PER_STEP characters."""
    b = budget.Budget(steps=100_000)
    env = executor.Environment(data.load_entry(*FS_ENTRY), b)
    content = "x" * 90_000
    assert env.execute(["touch(file_name='big.txt')", f"echo(content='{content}', file_name='big.txt')"])[1] == "None"
    results = env.execute(["cat(file_name='big.txt')"] * 1000)
    kept = [r for r in results if not r.startswith(executor.ERROR_PREFIX)]
    assert kept[0] == json.dumps({"file_content": content}) and results[-1].startswith(executor.ERROR_PREFIX + "work")
    assert 50 < len(kept) and sum(map(len, kept)) <= b.steps * budget.CHARS_PER_STEP + len(kept[0])


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


# ---- 2. no process-wide state changes -----------------------------------------------------------

TRAVEL_MATH = ("multi_turn_long_context", 157)  # TravelAPI (long context) and MathAPI
EXTENSION_CARD = "1234567812345678"  # a card the long-context TravelAPI adds from module data
PRECISION_CALLS = [
    "square_root(number=2, precision=60)",
    "logarithm(value=3, base=2, precision=40)",
    f"book_flight(access_token='abc123xyz', card_id='{EXTENSION_CARD}', travel_date='2026-03-03', "
    "travel_from='CRH', travel_to='PHV', travel_class='business')",
]
VEHICLE_LONG = ("multi_turn_long_context", 57)


def _context_fields(ctx):
    return (ctx.prec, ctx.rounding, ctx.Emin, ctx.Emax, ctx.capitals, ctx.clamp, dict(ctx.flags), dict(ctx.traps))


def test_the_precision_and_booking_calls_do_change_process_state_when_run_bare():
    """Run directly on the simulators, these calls change the decimal context, mpmath's precision
    and bfcl_eval's module-level card data (so the next test can fail)."""
    env = executor.Environment(data.load_entry(*TRAVEL_MATH))
    math_api, travel = env.instances["MathAPI"], env.instances["TravelAPI"]
    card = copy.deepcopy(long_context.CREDIT_CARD_EXTENSION[EXTENSION_CARD])
    prec = mpmath.mp.prec
    try:
        with decimal.localcontext():
            math_api.square_root(number=2, precision=60)
            assert decimal.getcontext().prec == 60
        math_api.logarithm(value=3, base=2, precision=40)
        assert mpmath.mp.dps == 40
        parsed = parse.parse_call(PRECISION_CALLS[2])
        assert travel.book_flight(**parsed.kwargs)["booking_status"] is True
        assert long_context.CREDIT_CARD_EXTENSION[EXTENSION_CARD]["balance"] < card["balance"]
    finally:
        mpmath.mp.prec = prec
        budget.MODULE_STATE.restore()
    assert long_context.CREDIT_CARD_EXTENSION[EXTENSION_CARD] == card


def test_entries_leave_precision_and_module_data_as_they_were():
    travel_math = data.load_entry(*TRAVEL_MATH)
    later = data.load_entry("multi_turn_long_context", 161)  # also TravelAPI, long context
    later_calls = data.ground_truth_decoded(later)
    later_calls[0] = later_calls[0] + [
        [f"get_credit_card_balance(access_token='abc123xyz', card_id='{EXTENSION_CARD}')"]
    ]

    def run_later():
        traj = rollout.rollout_entry(later, rollout.ScriptedPolicy(later_calls))
        return {k: traj[k] for k in ("valid", "error_type", "turn_rewards", "turn_rewards_reset", "messages")}

    alone = run_later()
    ctx = decimal.getcontext()
    ctx_before, prec_before, dps_before = _context_fields(ctx), mpmath.mp.prec, mpmath.mp.dps
    cards_before = copy.deepcopy(long_context.CREDIT_CARD_EXTENSION)
    weather_before = copy.deepcopy(long_context.LONG_WEATHER_EXTENSION)

    d = data.ground_truth_decoded(travel_math)
    d[0] = d[0] + [PRECISION_CALLS]
    r = checker.check_trajectory(travel_math, d)
    traj = rollout.rollout_entry(travel_math, rollout.ScriptedPolicy(d))
    tool = [m["content"] for m in traj["messages"] if m["role"] == "tool"]
    assert "{'result': Decimal('1.41421356237309504880168872420969807856967187537694807317668')}" in tool
    assert any(t.startswith('{"booking_id": "3426812"') and '"booking_status": true' in t for t in tool)
    assert r["num_turns"] == len(d)
    vehicle = data.load_entry(*VEHICLE_LONG)
    vd = data.ground_truth_decoded(vehicle)
    vd[0] = vd[0] + [["get_outside_temperature_from_google()"]]
    checker.check_trajectory(vehicle, vd)

    assert decimal.getcontext() is ctx and _context_fields(ctx) == ctx_before
    assert (mpmath.mp.prec, mpmath.mp.dps) == (prec_before, dps_before)
    assert long_context.CREDIT_CARD_EXTENSION == cards_before
    assert long_context.LONG_WEATHER_EXTENSION == weather_before
    assert any(EXTENSION_CARD not in m["content"] and "card_balance" in m["content"] for m in alone["messages"])
    assert run_later() == alone


# ---- 3. parsing follows Python's rules and cannot recurse out -----------------------------------


def test_a_repeated_keyword_argument_is_an_error_as_in_python():
    with pytest.raises(SyntaxError, match="keyword argument repeated"):
        compile("f(a=1, a=2)", "<call>", "eval")
    with pytest.raises(parse.UnsafeCallError, match="keyword argument repeated: a"):
        parse.parse_call("f(a=1, a=2)")
    e = data.load_entry(*FS_ENTRY)
    call = "cd(folder='document', folder='temp')"
    assert parse.decode_calls(f"[{call}]") == [call]
    assert executor.Environment(e).execute([call]) == [executor.ERROR_PREFIX + "keyword argument repeated: folder"]


NESTED = {
    "brackets": "[" * 100_000 + "]" * 100_000,
    "call of brackets": "f(x=" + "[" * 100_000 + "]" * 100_000 + ")",
    "unary minus": "f(x=" + "-" * 100_000 + "1)",
    "not": "f(x=" + "not " * 100_000 + "1)",
    "attributes": "f(x=a" + ".b" * 100_000 + ")",
    "call chain": "f" + "()" * 100_000,
    "sum": "f(x=" + "+".join(["1"] * 100_000) + ")",
    "dict": "f(x=" + "{1:" * 10_000 + "1" + "}" * 10_000 + ")",
}
HUGE = "[" + ", ".join(["pwd()"] * 7_200_000) + "]"  # 50 MB


@pytest.mark.parametrize("name", sorted(NESTED))
def test_deeply_nested_text_is_refused_everywhere(name):
    text = NESTED[name]
    e = data.load_entry(*FS_ENTRY)
    # within the length limit, but nested too deep for Python's own parser (SyntaxError "too many nested
    # parentheses", RecursionError or MemoryError on every case): not a list of calls
    assert len(text) <= parse.MAX_STEP_CHARS
    assert parse.decode_calls(text) is None
    with pytest.raises(parse.UnsafeCallError):
        parse.parse_call(text)
    assert executor.Environment(e).execute([text])[0].startswith(executor.ERROR_PREFIX)
    d = data.ground_truth_decoded(e)
    d[0] = d[0] + [[text]]
    r = checker.check_entry("multi_turn_base", 0, d)
    assert r["valid"] is True  # an error result changes no state and removes no ground-truth result
    scorer = BFCLScorer()
    assert scorer(["multi_turn_base_0"], [json.dumps(d)]) == [1.0]
    assert scorer(["multi_turn_base_0"], ["[" * 100_000 + "]" * 100_000]) == [0.0]
    traj = rollout.rollout_entry(e, lambda messages: text)
    assert traj["valid"] is False and traj["error_type"] == checker.ERR_EMPTY


def test_enormous_completions_are_refused_quickly():
    assert len(HUGE) > 50_000_000
    e = data.load_entry(*FS_ENTRY)
    start = time.perf_counter()
    assert parse.decode_calls(HUGE) is None
    with pytest.raises(parse.UnsafeCallError, match="longer than"):
        parse.parse_call(HUGE)
    assert executor.Environment(e).execute([HUGE])[0].startswith(executor.ERROR_PREFIX)
    assert BFCLScorer()(["multi_turn_base_0"], [json.dumps([[[HUGE]]])]) == [0.0]
    r = checker.check_entry("multi_turn_base", 0, [[[HUGE]]] + [[] for _ in e["question"][1:]])
    assert r["valid"] is False
    traj = rollout.rollout_entry(e, lambda messages: HUGE)
    assert traj["valid"] is False and traj["decoded_turns"] == [[] for _ in e["question"]]
    assert time.perf_counter() - start < 20.0
    # Just inside the bounds still parses: the longest ground-truth call is far below them.
    longest = max(
        (c for cat in data.CATEGORIES for x in data.load_category(cat) for t in x["ground_truth"] for c in t), key=len
    )
    assert len(longest) * 10 < parse.MAX_CALL_CHARS
    assert parse.parse_call(longest).name == ast.parse(longest, mode="eval").body.func.id
