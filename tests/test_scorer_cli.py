"""Scorers named on the command line: a Python function (``--scorer python:MODULE:FUNCTION``) and the BFCL
checker's turn reward (``--scorer bfcl`` with the prompts of ``shiq-eval bfcl prompts``).

Checked against independent references: each completion's reward equals the helper function called directly
on the prompt and completion stored in results.json; the suite fingerprint changes with the function named;
a function that returns the wrong thing fails in one line naming it, exit status 2; the BFCL scorer gives 1 to
a turn's ground-truth calls and 0 to an empty answer or another turn's calls (the checker's verdicts on the
ground truth, which check-ground-truth replays), and the turn prompts end with that turn's user message.
"""

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import scorer_functions  # (the Python scorers of these tests)
from test_eval_cli import tiny_hf_folder  # (a tiny Llama folder with a word-level tokenizer)

from shiq_eval import cli as eval_cli
from shiq_eval.suite import fingerprint as suite_fingerprint


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    return tiny_hf_folder(tmp_path_factory.mktemp("tiny") / "init")


# two-sided 95% Student t quantiles, as printed in statistics tables (an independent reference)
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def clustered_note(g: int) -> str:
    """The ``stderr_note`` of standard errors clustered over ``g`` scenarios, its t quantile for ``g − 1``
    degrees of freedom from a printed table."""
    return (
        f"clustered by scenario ({g} scenarios; 95% interval ± {T95[g - 1]:.2f} standard errors, "
        f"Student's t with {g - 1} degree{'s' if g > 2 else ''} of freedom)"
    )


def run_eval(tmp_path, init, scorer, out="eval", *extra):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1} w{i + 2}"}) + "\n" for i in range(3, 7)))
    return eval_cli.main(
        [
            "run",
            str(init),
            "--reference",
            str(init),
            "--out",
            str(tmp_path / out),
            "--prompts",
            str(prompts),
            "--scorer",
            scorer,
            "--max-new-tokens",
            "5",
            "--quiet",
            *extra,
        ]
    )


def test_python_function_scorer_gives_the_function_s_rewards(tmp_path, init):
    assert run_eval(tmp_path, init, "python:scorer_functions:length_and_letters") == 0
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert len(rows) == 2 and all(len(r["samples"]) == 4 for r in rows)
    for r in rows:
        prompts, completions, rewards = zip(*r["samples"])
        want = [len(c.split()) - 0.1 * c.count("w") + len(p) / 100 for p, c in zip(prompts, completions)]
        assert list(rewards) == pytest.approx(want, abs=1e-12)
        assert list(rewards) == pytest.approx(scorer_functions.length_and_letters(prompts, completions), abs=1e-12)
        assert r["rewards"] == list(rewards)
    suite = json.loads((tmp_path / "eval" / "suite.json").read_text())
    assert suite["content"]["scorer"] == "python:scorer_functions:length_and_letters"
    # the fingerprint names the function and the SHA-256 of its module's source file
    source = hashlib.sha256(Path(scorer_functions.__file__).read_bytes()).hexdigest()
    spec = "python:scorer_functions:length_and_letters"
    assert suite["content"]["scorer_sha256"] == hashlib.sha256(f"{spec}\n{source}".encode()).hexdigest()
    other, _ = eval_cli.load_suite(None, {"prompts": "p.jsonl", "scorer": "python:scorer_functions:one_short"})
    assert suite_fingerprint(other, "0" * 64)[1] != suite_fingerprint(replace(other, scorer=spec), "0" * 64)[1]


@pytest.mark.parametrize(
    "name, problem",
    [
        ("not_a_list", "returned str"),
        ("one_short", "returned list of length 3"),
        ("with_nan", "non-finite value nan"),
        ("missing", "has no function 'missing'"),
        ("raises", "the function raised KeyError: 'no such key'"),  # was a traceback
        ("too_large", "holding a number beyond a float's range"),  # 10**400: an OverflowError, no name
    ],
)
def test_a_bad_python_scorer_fails_in_one_line_naming_it(tmp_path, capsys, init, name, problem):
    capsys.readouterr()
    assert run_eval(tmp_path, init, f"python:scorer_functions:{name}") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error" in line]  # (transformers' loading bars aside)
    assert len(lines) == 1 and lines[0].startswith("shiq-eval: error: ") and err.endswith(lines[0] + "\n"), err
    assert f"python:scorer_functions:{name}" in lines[0] and problem in lines[0], err


def test_bad_scorer_names_are_refused_before_any_model_loads(tmp_path, capsys, init, monkeypatch):
    capsys.readouterr()
    (tmp_path / "broken_scorer_module.py").write_text("def f(prompts, completions:\n    return []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec, problem in [
        ("python:broken_scorer_module:f", "cannot import module 'broken_scorer_module' (SyntaxError: "),
        ("python:no_such_module_here:f", "cannot import module 'no_such_module_here'"),
        ("python:scorer_functions", "expected python:MODULE:FUNCTION"),
        ("python:scorer_functions:one_argument", "one_argument must take two arguments"),
        ("bleu", "scorer must be one of"),
        ("bfcl", "prompts.jsonl, prompt 1: scorer_prompt 'w3 w4 w5' is not a BFCL turn reference ENTRY_ID:TURN"),
    ]:
        assert run_eval(tmp_path, init, spec) == 2
        err = capsys.readouterr().err.strip().splitlines()  # one line: no model was loaded (no loading bars)
        assert len(err) == 1 and err[0].startswith("shiq-eval: error: ") and problem in err[0], (spec, err)


def test_bfcl_turn_scorer_and_prompts(tmp_path):
    from shiq_eval.bfcl import cli as bfcl_cli
    from shiq_eval.bfcl.data import load_entry
    from shiq_eval.bfcl.rollout import format_calls
    from shiq_eval.scorers import BFCLTurnScorer

    out = tmp_path / "bfcl_prompts.jsonl"
    assert bfcl_cli.main(["prompts", "--categories", "multi_turn_base", "--limit", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    entry = load_entry("multi_turn_base", "multi_turn_base_0")
    n = len(entry["ground_truth"])
    assert [r["scorer_prompt"] for r in rows] == [f"multi_turn_base_0:{k}" for k in range(n)]
    for k, r in enumerate(rows):  # each prompt ends with its turn's user message; earlier turns' answers in it
        assert r["messages"][-1] == {"role": "user", "content": entry["question"][k][-1]["content"]}
        assert r["messages"][0]["role"] == "system"
        assert sum(m["role"] == "assistant" for m in r["messages"]) >= 2 * k  # calls and end-of-turn text
    prompts, shown = eval_cli.read_prompts_jsonl(out)
    assert prompts == [r["messages"] for r in rows] and shown == [r["scorer_prompt"] for r in rows]

    scorer = BFCLTurnScorer()
    refs = [r["scorer_prompt"] for r in rows]
    truth = [format_calls(calls) for calls in entry["ground_truth"]]
    assert scorer(refs, truth) == [1.0] * n
    assert scorer(refs, ["I cannot do that."] * n) == [0.0] * n
    assert scorer(refs, truth[1:] + truth[:1]) == [0.0] * n  # another turn's calls
    with pytest.raises(ValueError, match="multi_turn_base_0:99"):
        scorer(["multi_turn_base_0:99"], [truth[0]])
    for odd in ("multi_turn_base_0:\u0663", "multi_turn_base_0:\u00b2"):  # "٣" (turn 3?) and "²": digits to str.isdigit
        with pytest.raises(ValueError, match="is not a BFCL turn reference ENTRY_ID:TURN"):
            scorer([odd], [truth[0]])


def test_bfcl_results_keep_each_turn_s_scenario(tmp_path, init):
    """shiq-eval run with the bfcl scorer keeps each prompt's (turn's) scenario, its entry id, in prompt order
    (scenario_ids, one per prompt, not per sample), beside the fields older files have; the leaderboard of
    those results clusters its standard errors by scenario (its numbers: tests/test_leaderboard.py)."""
    import pandas as pd

    refs = ["multi_turn_base_0:0", "multi_turn_base_1:0", "multi_turn_base_0:1", "multi_turn_base_0:2"]
    prompts = tmp_path / "turns.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"w{i} w{i + 1}", "scorer_prompt": r}) + "\n" for i, r in enumerate(refs, 3))
    )
    args = ["run", str(init), "--reference", str(init), "--out", str(tmp_path / "eval"), "--prompts", str(prompts)]
    args += ["--scorer", "bfcl", "--max-new-tokens", "3", "--samples-per-prompt", "2", "--quiet"]
    assert eval_cli.main(args) == 0
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())
    want = ["multi_turn_base_0", "multi_turn_base_1", "multi_turn_base_0", "multi_turn_base_0"]
    assert len(rows) == 2 and all(r["scenario_ids"] == want for r in rows)
    assert all(len(r["rewards"]) == 2 * len(refs) and {"rewards", "kls_exact", "kls_sample"} <= set(r) for r in rows)
    assert eval_cli.main(["leaderboard", str(tmp_path / "eval"), "--out", str(tmp_path / "board")]) == 0
    table = pd.read_csv(tmp_path / "board" / "leaderboard.csv")
    assert (table["stderr_note"] == clustered_note(2)).all()
    # the run's own results (results.json, results.csv) say how their standard errors were computed (the
    # numbers: test_run_rows_cluster_their_standard_errors_by_scenario; here every value is 0, the policy
    # being the reference and no turn passing the checker)
    csv_rows = pd.read_csv(tmp_path / "eval" / "results.csv")
    assert list(csv_rows["stderr_note"]) == [r["stderr_note"] for r in rows] == [clustered_note(2)] * 2


def test_run_rows_cluster_their_standard_errors_by_scenario():
    """cluster_by_scenario (shiq-eval run's rows of BFCL turns): the standard errors of reward and both KL
    estimators over per-prompt means, clustered by scenario, against pandas on the values:
    se² = G/(G−1) · Σ_c (Σ_{i∈c} (v_i − v̄))² / N²; without scenarios the row is unchanged."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    scenarios = ["a", "a", "a", "b", "c", "c"]  # 6 prompts (turns) of 3 scenarios, 2 samples each
    shift = {"a": 1.0, "b": -1.0, "c": 0.5}  # turns of a scenario move together
    row = {"samples_per_prompt": 2, "reward_stderr": -1.0, "kl_exact_stderr": -1.0, "kl_sample_stderr": -1.0}
    for key in ("rewards", "kls_exact", "kls_sample"):
        row[key] = [shift[s] + float(x) for s in scenarios for x in rng.normal(0, 0.1, 2)]
    out = eval_cli.cluster_by_scenario(row, scenarios)
    assert eval_cli.cluster_by_scenario(row, None) is row and row["reward_stderr"] == -1.0
    assert out["stderr_note"] == clustered_note(3) and out["n_scenarios"] == 3  # a reader's G − 1
    for key, values in (("reward", "rewards"), ("kl_exact", "kls_exact"), ("kl_sample", "kls_sample")):
        v = pd.Series(row[values]).groupby(lambda i: i // 2).mean()
        d = (v - v.mean()).groupby(pd.Series(scenarios)).sum()
        se = (3 / (3 - 1) * (d**2).sum() / len(v) ** 2) ** 0.5
        assert out[f"{key}_stderr"] == pytest.approx(se, rel=1e-12), key
        assert out[f"{key}_stderr"] > 1.2 * v.sem()  # correlated turns: more than the plain standard error


def test_one_prompt_writes_its_undefined_standard_errors_as_null_and_empty(tmp_path, init):
    """One prompt measures no spread: shiq-eval run's results.json holds null for its standard errors and
    results.csv empty cells, where both held 0.0 (read as exact, a zero-width interval); the leaderboard of
    those results leaves them empty in leaderboard.csv and pairs.csv, and its Markdown shows "–"."""
    import csv

    prompts = tmp_path / "one.jsonl"
    prompts.write_text(json.dumps({"prompt": "w3 w4 w5"}) + "\n")
    args = ["run", str(init), "--reference", str(init), "--out", str(tmp_path / "eval"), "--prompts", str(prompts)]
    args += ["--scorer", "python:scorer_functions:length_and_letters", "--max-new-tokens", "3"]
    assert eval_cli.main([*args, "--samples-per-prompt", "2", "--quiet"]) == 0
    errors = ("reward_stderr", "kl_sample_stderr", "kl_exact_stderr")
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert len(rows) == 2
    assert [{k: r[k] for k in errors} for r in rows] == [dict.fromkeys(errors)] * 2  # null, not 0.0
    assert all(isinstance(r["reward_mean"], float) for r in rows)
    with open(tmp_path / "eval" / "results.csv", newline="") as f:
        cells = list(csv.DictReader(f))
    assert [{k: c[k] for k in errors} for c in cells] == [dict.fromkeys(errors, "")] * 2
    assert eval_cli.main(["leaderboard", str(tmp_path / "eval"), "--out", str(tmp_path / "board")]) == 0
    with open(tmp_path / "board" / "leaderboard.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(t["units"], t["reward_stderr"], t["kl_stderr"], t["J_stderr"]) for t in table] == [("1", "", "", "")] * 2
    with open(tmp_path / "board" / "pairs.csv", newline="") as f:
        pairs = list(csv.DictReader(f))
    assert pairs and [(p["reward_diff_stderr"], p["J_diff_stderr"]) for p in pairs] == [("", "")] * len(pairs)
    assert "± –" in (tmp_path / "board" / "leaderboard.md").read_text()
