"""BFCL multi-turn checker: ground truth passes, verdicts agree with bfcl_eval's own checker on
corrupted trajectories, turn rewards follow their definitions, unsafe calls never run."""

import builtins
import json
import random
import time
import uuid

import pytest

from shiq_eval.bfcl import checker, data, executor, parse
from shiq_eval.bfcl.edits import (
    CORRUPTIONS,
    corrupt_drop_call,
    corrupt_empty_turn,
    corrupt_wrong_args,
)
from shiq_eval.bfcl.edits import nonempty_turns as _nonempty_turns

multi_turn_checker_mod = pytest.importorskip("bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker")
multi_turn_utils = pytest.importorskip("bfcl_eval.eval_checker.multi_turn_eval.multi_turn_utils")

SAMPLE_PER_CATEGORY = 40


@pytest.fixture(autouse=True)
def _bfcl_root(tmp_path, monkeypatch):
    monkeypatch.setenv("BFCL_PROJECT_ROOT", str(tmp_path))


def official_verdict(entry, decoded):
    """bfcl_eval's multi_turn_checker on fresh instances (unique model name), cache cleared after."""
    name = "shiqtest_" + uuid.uuid4().hex
    try:
        return multi_turn_checker_mod.multi_turn_checker(
            decoded, entry["ground_truth"], entry, entry["id"].rsplit("_", 1)[0], name
        )
    finally:
        for key in [k for k in vars(multi_turn_utils) if k.startswith(name)]:
            del vars(multi_turn_utils)[key]


def sampled_entries(seed=0, per_category=SAMPLE_PER_CATEGORY):
    rng = random.Random(seed)
    out = []
    for cat in data.CATEGORIES:
        entries = data.load_category(cat)
        out += rng.sample(entries, per_category)
    return out


# ---- tests --------------------------------------------------------------------------------


def test_categories_load_with_docs_and_version():
    assert data.bfcl_version() == "2026.3.23"
    for cat in data.CATEGORIES:
        entries = data.load_category(cat)
        assert len(entries) == 200
        assert all(len(e["ground_truth"]) == len(e["question"]) for e in entries)
    e = data.load_entry("multi_turn_miss_func", 0)
    docs, withheld = data.function_docs(e)
    names = {d["name"] for d in docs}
    for turn, missed in e["missed_function"].items():
        assert e["question"][int(turn)] == []
        assert [d["name"] for d in withheld[int(turn)]] == missed
        assert not set(missed) & names
    base = data.load_entry("multi_turn_base", 0)
    # Every doc of every involved class is shown when nothing is withheld.
    n_docs = sum(1 for c in base["involved_classes"] for _ in data._class_docs(c))
    assert len(data.function_docs(base)[0]) == n_docs and data.function_docs(base)[1] == {}


def test_ground_truth_passes_every_entry():
    """All 800 entries: valid, every turn reward 1 under both definitions (about 4 s)."""
    failures = []
    for cat in data.CATEGORIES:
        for e in data.load_category(cat):
            r = checker.check_trajectory(e, data.ground_truth_decoded(e))
            if (
                not r["valid"]
                or r["turn_rewards"] != [1.0] * len(e["question"])
                or r["turn_rewards_reset"] != [1.0] * len(e["question"])
            ):
                failures.append((e["id"], r["error_type"], r["error_message"]))
    assert failures == []


def test_ground_truth_agrees_with_official_checker_on_sample():
    for e in sampled_entries(seed=1, per_category=5):
        assert official_verdict(e, data.ground_truth_decoded(e))["valid"] is True
        assert checker.check_entry(e["id"].rsplit("_", 1)[0], e["id"], data.ground_truth_decoded(e))["valid"]


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=lambda f: f.__name__)
def test_verdicts_agree_with_official_checker(corruption):
    rng = random.Random(CORRUPTIONS.index(corruption))
    verdicts = []
    for e in sampled_entries(seed=0):
        decoded = corruption(e, rng)
        theirs = official_verdict(e, json.loads(json.dumps(decoded)))
        ours = checker.check_trajectory(e, decoded)
        assert ours["valid"] == theirs["valid"], (e["id"], decoded, ours, theirs)
        if not theirs["valid"]:
            assert ours["error_type"] == theirs["error_type"], (e["id"], ours, theirs)
        # The verdict is the product of the cumulative rewards of turns with ground-truth calls.
        assert ours["valid"] == all(ours["turn_rewards"][k] == 1.0 for k in _nonempty_turns(e))
        verdicts.append(ours["valid"])
    if corruption in (corrupt_drop_call, corrupt_empty_turn):
        assert not any(verdicts)
    elif corruption is corrupt_wrong_args:
        assert sum(verdicts) <= len(verdicts) // 4  # a few corruptions are genuine no-ops
    assert len(verdicts) == 4 * SAMPLE_PER_CATEGORY


def test_wrong_turn_count_and_too_many_steps_are_force_terminated():
    e = data.load_entry("multi_turn_base", 3)
    gt = data.ground_truth_decoded(e)
    r = checker.check_trajectory(e, gt[:-1])
    assert (r["valid"], r["error_type"]) == (False, checker.ERR_FORCE_QUIT)
    assert r["turn_rewards"] == [1.0] * (len(gt) - 1) + [0.0]
    k = next(i for i, t in enumerate(gt) if t)
    long_turn = gt[k] + [["pwd()"]] * data.MAX_STEPS_PER_TURN
    r = checker.check_trajectory(e, gt[:k] + [long_turn] + gt[k + 1 :])
    assert (r["valid"], r["error_type"]) == (False, checker.ERR_FORCE_QUIT)


def test_the_step_limit_reached_in_the_last_turn_is_checked_as_the_official_evaluation_does():
    """The official inference loop runs the step that goes past MAX_STEPS_PER_TURN and then stops the
    entry: before the last turn, later turns are missing (force-terminated by the eval runner); in the
    last turn every turn is there, and the eval runner checks the trajectory as any other."""
    e = next(x for x in _fs_entries() if x["ground_truth"][-1])
    n = len(e["ground_truth"])
    gt = data.ground_truth_decoded(e)
    steps = [[c] for c in gt[-1][0]]
    looping = gt[:-1] + [steps + [["pwd()"]] * (data.MAX_STEPS_PER_TURN + 1 - len(steps))]
    assert len(looping[-1]) == data.MAX_STEPS_PER_TURN + 1
    theirs = official_verdict(e, json.loads(json.dumps(looping)))
    ours = checker.check_trajectory(e, looping)
    assert theirs["valid"] is True
    assert (ours["valid"], ours["error_type"]) == (True, None)
    assert ours["turn_rewards"] == [1.0] * n
    # The official loop never records more steps than that, nor a turn after the one that ran over.
    r = checker.check_trajectory(e, gt[:-1] + [looping[-1] + [["pwd()"]]])
    assert (r["valid"], r["error_type"]) == (False, checker.ERR_FORCE_QUIT)
    r = checker.check_trajectory(e, [looping[-1]] + gt[1:])
    assert (r["valid"], r["error_type"]) == (False, checker.ERR_FORCE_QUIT)


def _fs_entries():
    """Base entries whose only stateful class is the file system and whose turns all have calls."""
    out = []
    for e in data.load_category("multi_turn_base"):
        if e["involved_classes"] == ["GorillaFileSystem"] and all(e["ground_truth"]) and len(e["question"]) >= 3:
            out.append(e)
    return out


def test_turn_rewards_after_a_lasting_state_change():
    """An extra file created in turn k is never removed by later ground-truth turns, so the
    cumulative rewards are 1 before k and 0 from k on, while the reset rewards are 0 only at k."""
    entries = _fs_entries()
    assert len(entries) >= 5
    for e in entries[:8]:
        n = len(e["question"])
        for k in range(n):
            d = data.ground_truth_decoded(e)
            d[k] = d[k] + [["touch(file_name='zz_extra_marker.txt')"]]
            r = checker.check_trajectory(e, d)
            assert r["turn_rewards"] == [1.0] * k + [0.0] * (n - k), (e["id"], k)
            assert r["turn_rewards_reset"] == [1.0] * k + [0.0] + [1.0] * (n - k - 1), (e["id"], k)
            assert (r["valid"], r["failed_turn"], r["error_type"]) == (False, k, checker.ERR_STATE)


def test_reset_rewards_ignore_model_changes_to_shared_long_context_cards():
    """Long-context TravelAPI instances share the module-level card dicts (CREDIT_CARD_EXTENSION),
    so a model's balance change also shows in the cumulative ground truth (the official checker
    sees no state difference and neither do we); the reset rewards compare with the ground truth
    run alone, so the change costs exactly the turn that made it (it used to leak into the
    ground-truth states of later turns and go unseen in the last turn)."""
    for i in (150, 151, 152):
        e = data.load_entry("multi_turn_long_context", i)
        tok = e["initial_config"]["TravelAPI"]["access_token"]
        extra = (
            f"purchase_insurance(access_token='{tok}', insurance_type='comprehensive', booking_id='booking_901', "
            "insurance_cost=10.0, card_id='1234567812345678')"
        )
        n = len(e["question"])
        for k in range(n):
            d = data.ground_truth_decoded(e)
            d[k] = d[k] + [[extra]]
            ours = checker.check_trajectory(e, d)
            theirs = official_verdict(e, json.loads(json.dumps(d)))
            assert ours["valid"] == theirs["valid"], (e["id"], k, ours, theirs)
            assert ours["turn_rewards_reset"] == [1.0] * k + [0.0] + [1.0] * (n - k - 1), (e["id"], k, ours)


def test_response_check_counts_results_as_a_multiset():
    assert checker.missing_results(["a", "a", "b"], ["b", "a"]) == ["a"]
    assert checker.missing_results(["a", "b"], ["x", "b", "a"]) == []
    assert checker.missing_results([], []) == []


def test_empty_ground_truth_turns_are_executed_not_checked():
    e = next(x for x in data.load_category("multi_turn_miss_param") if any(not t for t in x["ground_truth"]))
    k = next(i for i, t in enumerate(e["ground_truth"]) if not t)
    d = data.ground_truth_decoded(e)
    d[k] = [["pwd()"] if "GorillaFileSystem" in e["involved_classes"] else []]
    r = checker.check_trajectory(e, d)
    assert r["valid"] is True and r["turn_rewards"][k] == 1.0


def test_parse_call_accepts_literals_only():
    p = parse.parse_call("cd(folder='document')")
    assert (p.name, p.args, p.kwargs) == ("cd", (), {"folder": "document"})
    p = parse.parse_call("f(1, -2.5, x=[1, {'a': None}], y=True)")
    assert p.args == (1, -2.5) and p.kwargs == {"x": [1, {"a": None}], "y": True}
    for bad in [
        "__import__('os').system('true')",
        "os.system('true')",
        "cd(folder=__import__('os').getcwd())",
        "cd(folder=open('/etc/passwd').read())",
        "cd(folder=x)",
        "cd(*a)",
        "cd(**k)",
        "cd(folder='a' + 'b')",
        "f()()",
        "[cd(folder='a')]",
        "lambda: 0",
        "cd(folder='a'",
        "",
    ]:
        with pytest.raises(parse.UnsafeCallError):
            parse.parse_call(bad)


def test_unsafe_calls_are_error_results_and_never_run(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    ran = []
    e = data.load_entry("multi_turn_base", 0)
    env = executor.Environment(e)  # first: importing the simulator modules runs exec
    monkeypatch.setattr(builtins, "eval", lambda *a, **k: ran.append("eval"))
    monkeypatch.setattr(builtins, "exec", lambda *a, **k: ran.append("exec"))
    before = json.dumps({c: sorted(s) for c, s in env.state().items()})
    calls = [
        f"__import__('os').system('touch {marker}')",
        f"system('touch {marker}')",
        f"ls(a=__import__('os').system('touch {marker}'))",
        "os.getcwd()",
        "_load_scenario({})",
        "__class__()",
        "__init__()",
        "remove(x=1)",
        "ls.__globals__()",
        "len('abc')",
    ]
    results = env.execute(calls)
    assert not marker.exists() and ran == []
    assert all(r.startswith(executor.ERROR_PREFIX) for r in results), results
    assert results[4] == executor.ERROR_PREFIX + "name '_load_scenario' is not defined"
    assert results[7] == executor.ERROR_PREFIX + "Function call remove is not allowed."
    assert json.dumps({c: sorted(s) for c, s in env.state().items()}) == before
    # The whole checker path on a hostile trajectory.
    d = [[[calls[0]]] for _ in e["question"]]
    assert checker.check_trajectory(e, d)["valid"] is False and not marker.exists()


def official_results(e, calls):
    """The result strings of the official executor for ``calls`` on entry ``e`` (its simulator
    instances, created under a fresh name, are removed afterwards)."""
    name = "shiqtest_" + uuid.uuid4().hex
    try:
        theirs, _ = multi_turn_utils.execute_multi_turn_func_call(
            calls, e["initial_config"], e["involved_classes"], name, e["id"]
        )
    finally:
        for key in [k for k in vars(multi_turn_utils) if k.startswith(name)]:
            del vars(multi_turn_utils)[key]
    return theirs


def test_results_are_stringified_like_the_official_executor():
    e = data.load_entry("multi_turn_base", 0)
    calls = [c for t in e["ground_truth"] for c in t][:6]
    theirs = official_results(e, calls)
    assert executor.Environment(e).execute(calls) == theirs
    assert executor.stringify_result({"a": 1}) == '{"a": 1}' and executor.stringify_result([1]) == "[1]"


def test_long_context_scenarios_are_loaded_long():
    base = executor.Environment(data.load_entry("multi_turn_base", 0))
    long = executor.Environment(data.load_entry("multi_turn_long_context", 0))
    assert executor.is_long_context("multi_turn_long_context_0") and not executor.is_long_context("multi_turn_base_0")
    assert long.instances["GorillaFileSystem"].long_context is True
    assert base.instances["GorillaFileSystem"].long_context is False
    cat = ["cd(folder='document')", "cat(file_name='previous_report.pdf')"]
    assert len(long.execute(cat)[1]) > len(base.execute(cat)[1]) + 1000


def test_decode_calls():
    assert parse.decode_calls("[cd(folder='a'), ls()]") == ["cd(folder='a')", "ls()"]
    assert parse.decode_calls("```python\n[ls(a=True)]\n```") == ["ls(a=True)"]
    assert parse.decode_calls("ls()") == ["ls()"]
    assert parse.decode_calls("[]") == []
    assert parse.decode_calls("Done, the file is moved.") is None
    assert parse.decode_calls("[1, 2]") is None


def test_bad_input_names_the_entry_and_position():
    with pytest.raises(ValueError, match="multi_turn_base_0.*decoded_turns\\[0\\]\\[0\\]"):
        checker.check_entry("multi_turn_base", 0, [[["ls()", 3]]])
    with pytest.raises(ValueError, match="category"):
        checker.check_entry("multi_turn_nope", 0, [])
    with pytest.raises(ValueError, match="not an id of category"):
        checker.check_entry("multi_turn_base", "multi_turn_miss_func_0", [])


@pytest.mark.slow
def test_verdicts_agree_with_official_checker_on_every_entry():
    """All 800 entries x every corruption (about 25 s): same verdict and error type."""
    disagreements = []
    for ci, corruption in enumerate(CORRUPTIONS):
        rng = random.Random(100 + ci)
        for cat in data.CATEGORIES:
            for e in data.load_category(cat):
                decoded = corruption(e, rng)
                theirs = official_verdict(e, json.loads(json.dumps(decoded)))
                ours = checker.check_trajectory(e, decoded)
                if ours["valid"] != theirs["valid"] or (
                    not theirs["valid"] and ours["error_type"] != theirs["error_type"]
                ):
                    disagreements.append((corruption.__name__, e["id"]))
    assert disagreements == []


# ---- model output that cannot be executed safely is an error result --------------------------

HUGE_CALLS = [
    "power(base=10, exponent=10000000000)",  # 10**10 digits: refused before it runs
    "power(10, 9999999999999999)",
    "power(base=10, exponent=1000000000000000000000000000000)",  # beyond int64
    "power(base=0x" + "f" * 5000 + ", exponent=2)",  # hex literals have no digit limit
    "multiply(a=[1, {'k': -99999999999999999999}], b=2)",  # nested too
    "logarithm(value=3, base=2, precision=1000000000)",
    "logarithm(value=3, base=2, precision=1e300)",
    "square_root(number=2, precision=100000000)",
    "round_number(number=5, decimal_places=-1000000000000)",
    "logarithm(value=3, base=2, precision='1000000000')",  # mpmath takes int('1000000000')
    "logarithm(value=3, base=2, precision=b'200000')",
]


def test_result_that_cannot_be_stringified_is_an_error_result():
    """10**5000 has more digits than str() allows: an error result, as from the official executor."""
    e = data.load_entry("multi_turn_base", 15)
    assert "MathAPI" in e["involved_classes"]
    calls = ["power(base=10, exponent=5000)", "power(10, 4299)"]
    results = executor.Environment(e).execute(calls)
    assert results[0].startswith(executor.ERROR_PREFIX) and "4300 digits" in results[0]
    assert json.loads(results[1]) == {"result": 10**4299}
    theirs = official_results(e, calls)
    assert results == theirs
    # The checker runs through it and computes the verdict: an extra stateless call changes nothing.
    d = data.ground_truth_decoded(e)
    d[0] = d[0] + [[calls[0]]]
    r = checker.check_entry("multi_turn_base", 15, d)
    assert r["valid"] is True and r["turn_rewards"] == r["turn_rewards_reset"] == [1.0] * len(e["question"])
    assert official_verdict(e, json.loads(json.dumps(d)))["valid"] is True


def test_any_exception_while_running_or_stringifying_is_an_error_result(monkeypatch):
    e = data.load_entry("multi_turn_base", 15)
    math_api = type(executor.Environment(e).instances["MathAPI"])

    class Unprintable:
        def __repr__(self):
            raise RuntimeError("no text")

        __str__ = __repr__

    class BadMessage(Exception):
        def __str__(self):
            raise ValueError("no message either")

    def raise_bad(self, number):
        raise BadMessage()

    monkeypatch.setattr(math_api, "absolute_value", lambda self, number: Unprintable())
    monkeypatch.setattr(math_api, "add", lambda self, a, b: {"result": Unprintable()})
    monkeypatch.setattr(math_api, "square_root", raise_bad)
    env = executor.Environment(e)
    assert env.execute(["absolute_value(number=1)", "add(a=1, b=2)", "square_root(number=4)"]) == [
        executor.ERROR_PREFIX + "no text",
        executor.ERROR_PREFIX + "no text",
        executor.ERROR_PREFIX + "BadMessage",
    ]


def test_calls_beyond_the_work_bounds_are_refused_quickly():
    e = data.load_entry("multi_turn_base", 15)
    env = executor.Environment(e)
    start = time.perf_counter()
    results = env.execute(HUGE_CALLS)
    assert time.perf_counter() - start < 2.0
    assert all(r.startswith(executor.ERROR_PREFIX) for r in results), results
    assert results[0] == executor.ERROR_PREFIX + f"power: the result would have more than {executor.MAX_DIGITS} digits"
    assert results[2] == executor.ERROR_PREFIX + "power: argument 'exponent' holds an integer beyond the int64 range"
    assert (
        results[5] == executor.ERROR_PREFIX + f"logarithm: precision must be at most {executor.MAX_DIGITS} in magnitude"
    )
    assert results[9] == results[10] == results[5]
    # Just inside the bounds still runs; powers of 0 and +-1 are cheap whatever the exponent.
    ok = env.execute(
        [
            "power(base=-1, exponent=9223372036854775807)",
            "square_root(number=2, precision=50)",
            "round_number(number=12345, decimal_places=-2)",
        ]
    )
    assert [json.loads(r)["result"] for r in ok[::2]] == [-1, 12300] and ok[1].startswith("{'result': Decimal('1.41421")
    assert parse.parse_call(f"f(x={parse.MAX_INT_LITERAL}, y=[-{parse.MAX_INT_LITERAL}])").kwargs["x"] == 2**63 - 1
    for bad in [
        f"f(x={parse.MAX_INT_LITERAL + 1})",
        f"f(x={{1: [-{parse.MAX_INT_LITERAL + 1}]}})",
        "f(0x" + "f" * 5000 + ")",
    ]:
        with pytest.raises(parse.UnsafeCallError, match="int64"):
            parse.parse_call(bad)
    # A literal that cannot be unparsed (str() of a huge int raises) is decoded as its source text.
    hexcall = "power(base=0x" + "f" * 5000 + ", exponent=1)"
    assert parse.decode_calls(f"[{hexcall}, pwd()]") == [hexcall, "pwd()"]


def test_work_bounds_accept_every_ground_truth_call():
    """The bounds refuse no call of the 800 ground truths (largest int literal: 987654, largest
    precision: 10), so they change no ground-truth result."""
    math_api = executor.Environment(data.load_entry("multi_turn_base", 15)).instances["MathAPI"]
    largest, n = 0, 0
    for cat in data.CATEGORIES:
        for e in data.load_category(cat):
            for call in (c for turn in e["ground_truth"] for c in turn):
                p = parse.parse_call(call)  # raises on an int beyond MAX_INT_LITERAL
                for v in list(p.args) + list(p.kwargs.values()):
                    for x in v if isinstance(v, list) else [v]:
                        if type(x) is int:
                            largest = max(largest, abs(x))
                if hasattr(math_api, p.name):
                    assert executor._work_limit_error("MathAPI", getattr(math_api, p.name), p) is None, (e["id"], call)
                    n += 1
    assert largest == 987654 and n > 0


def test_leaderboard_markdown_keeps_each_row_on_one_line():
    """A model name with a line break (a trajectory's ``model`` field, ``--model-name``) split its row of the
    Markdown leaderboard in two, breaking the table; the break is a space now, a ``|`` still escaped."""
    row = {c: "N/A" for c in checker.LEADERBOARD_HEADER} | {"Rank": 1, "Model": "A\nB | c\r\nD", "Entries": 1}
    lines = checker.leaderboard_markdown([row]).splitlines()
    assert len(lines) == 3 and lines[2].startswith("| 1 | A B \\| c D | N/A |"), lines
    row["Model"] = "*m* <b>"  # and shown as written, not in italics or bold
    assert checker.leaderboard_markdown([row]).splitlines()[2].startswith("| 1 | \\*m\\* &lt;b&gt; | N/A |")


def test_models_of_one_accuracy_share_its_rank_whatever_the_order_given():
    """Two models with the category accuracies 10%, 20%, 30% in other categories have one overall accuracy (20%),
    but its mean summed in another order differs in the last bit: they were ranked 1 and 2 by that rounding (the
    second given first), and equal accuracies by the order of the files. Ranks checked against exact fractions."""
    from fractions import Fraction

    import pandas as pd

    cats = ["multi_turn_base", "multi_turn_miss_func", "multi_turn_miss_param"]

    def trajectories(valid_of: list[int]) -> list[dict]:  # 10 entries per category, the first k valid
        return [
            {"id": f"{c}_{i}", "valid": i < k, "turn_rewards": [1.0], "turn_rewards_reset": [1.0]}
            for c, k in zip(cats, valid_of)
            for i in range(10)
        ]

    valid = {"B": [3, 2, 1], "A": [1, 2, 3], "C": [5, 5, 5], "D": [0, 0, 1]}
    exact = pd.Series({m: sum(Fraction(k, 10) for k in ks) / 3 for m, ks in valid.items()})
    expected = exact.rank(method="min", ascending=False).astype(int).to_dict()
    for names in (list(valid), list(reversed(valid))):
        rows = checker.leaderboard_rows({m: checker.summarize(trajectories(valid[m])) for m in names})
        assert [(r["Model"], r["Rank"]) for r in rows] == [("C", 1), ("A", 2), ("B", 2), ("D", 4)]
        assert {r["Model"]: r["Rank"] for r in rows} == expected
    # categories of 256 and 10 entries: both means are exactly 3017/5120, whose floats differ in the last bit and
    # rounded to 9 decimals fell on either side of a digit (ranked 1 and 2)
    sizes = {"multi_turn_base": 256, "multi_turn_miss_func": 10, "multi_turn_miss_param": 256}
    sizes["multi_turn_long_context"] = 10

    def sized(valid_of: list[int]) -> list[dict]:
        return [
            {"id": f"{c}_{i}", "valid": i < k, "turn_rewards": [1.0], "turn_rewards_reset": [1.0]}
            for (c, n), k in zip(sizes.items(), valid_of)
            for i in range(n)
        ]

    half = {"A": [52, 6, 193, 8], "B": [136, 7, 109, 7]}
    assert {m: sum(Fraction(k, n) for k, n in zip(ks, sizes.values())) / 4 for m, ks in half.items()} == {
        "A": Fraction(3017, 5120),
        "B": Fraction(3017, 5120),
    }
    rows = checker.leaderboard_rows({m: checker.summarize(sized(ks)) for m, ks in half.items()})
    assert [(r["Model"], r["Rank"]) for r in rows] == [("A", 1), ("B", 1)]
