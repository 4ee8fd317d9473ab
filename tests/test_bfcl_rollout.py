"""BFCL rollouts: scripted ground truth scores 1 everywhere, docs are revealed on time, the step
limit force-quits, trajectories round-trip through JSONL and become rows with rewards on the right
end-of-turn tokens."""

import csv
import json
import random
import re
from dataclasses import replace
from pathlib import Path

import pytest

from shiq_data.assets import config_dir
from shiq_eval.bfcl import checker, cli, data, executor, parse
from shiq_eval.bfcl import rollout as ro
from shiq_eval.generate import SamplingConfig


@pytest.fixture(autouse=True)
def _bfcl_root(tmp_path, monkeypatch):
    monkeypatch.setenv("BFCL_PROJECT_ROOT", str(tmp_path))


def _sample(per_category=6, seed=0):
    rng = random.Random(seed)
    return [e for c in data.CATEGORIES for e in rng.sample(data.load_category(c), per_category)]


def test_scripted_ground_truth_rollout_is_valid_with_all_rewards_one():
    for e in _sample():
        t = ro.rollout_entry(e, ro.ScriptedPolicy.ground_truth(e))
        n = len(e["question"])
        assert t["valid"] is True and t["force_terminated"] is False, (e["id"], t["error_message"])
        assert t["turn_rewards"] == [1.0] * n and t["turn_rewards_reset"] == [1.0] * n
        # The decoded calls are the ground truth's, call by call (up to source normalisation).
        assert [[[parse.parse_call(c) for c in s] for s in steps] for steps in t["decoded_turns"]] == [
            [[parse.parse_call(c) for c in s] for s in steps] for steps in data.ground_truth_decoded(e)
        ]
        # One tool message per executed call.
        assert sum(m["role"] == "tool" for m in t["messages"]) == sum(len(c) for c in e["ground_truth"])
        assert t["bfcl_eval_version"] == "2026.3.23"


def test_tool_messages_carry_the_execution_results():
    e = data.load_entry("multi_turn_base", 0)
    t = ro.rollout_entry(e, ro.ScriptedPolicy([[["pwd()", "ls()"]]] + [[] for _ in e["question"][1:]]))
    first = [i for i, m in enumerate(t["messages"]) if m["role"] == "assistant"][0]
    assert t["messages"][first]["content"] == "[pwd(), ls()]"
    tools = [m["content"] for m in t["messages"][first + 1 : first + 3]]
    # base_0 starts in /workspace holding 'document' and 'archive' (its initial_config).
    assert json.loads(tools[0]) == {"current_working_directory": "/workspace"}
    assert sorted(json.loads(tools[1])["current_directory_content"]) == ["archive", "document"]


def test_missed_function_doc_is_revealed_at_its_turn():
    e = data.load_entry("multi_turn_miss_func", 0)
    ((turn, names),) = e["missed_function"].items()
    t = ro.rollout_entry(e, ro.ScriptedPolicy.ground_truth(e))
    system = t["messages"][0]["content"]
    for name in names:
        assert f'"name": "{name}"' not in system
    users = [m["content"] for m in t["messages"] if m["role"] == "user"]
    reveal = [u for u in users if "I have updated some more functions" in u]
    assert len(reveal) == 1 and all(f'"name": "{n}"' in reveal[0] for n in names)
    assert t["valid"] is True


def test_step_limit_force_quits_the_entry():
    e = data.load_entry("multi_turn_base", 0)
    t = ro.rollout_entry(e, lambda messages: "[pwd()]")
    assert t["force_terminated"] is True
    assert len(t["decoded_turns"]) == 1 and len(t["decoded_turns"][0]) == data.MAX_STEPS_PER_TURN + 1
    assert sum(m["role"] == "tool" for m in t["messages"]) == data.MAX_STEPS_PER_TURN
    assert t["valid"] is False and t["error_type"] == checker.ERR_FORCE_QUIT
    assert t["turn_rewards"] == [0.0] * len(e["question"])


def test_hostile_policy_output_is_not_run(tmp_path):
    marker = tmp_path / "ran"
    e = data.load_entry("multi_turn_base", 1)
    answers = iter([f"[__import__('os').system('touch {marker}')]"] + ["ok"] * 50)
    t = ro.rollout_entry(e, lambda messages: next(answers))
    assert not marker.exists()
    assert t["messages"][3]["role"] == "tool" and t["messages"][3]["content"].startswith(executor.ERROR_PREFIX)
    assert t["valid"] is False


def test_trajectories_round_trip_and_bad_files_are_named(tmp_path):
    e = data.load_entry("multi_turn_base", 2)
    t = ro.rollout_entry(e, ro.ScriptedPolicy.ground_truth(e))
    path = ro.write_trajectories(tmp_path / "out" / "traj.jsonl", [t, t])
    assert ro.read_trajectories(path) == [t, t]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({k: v for k, v in t.items() if k != "turn_rewards"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl: line 1 .*turn_rewards"):
        ro.read_trajectories(bad)


def test_assistant_turn_rewards_go_on_the_last_assistant_message_of_each_turn():
    traj = {
        "turn_rewards": [1.0, 0.0, 1.0],
        "turn_rewards_reset": [1.0, 1.0, 0.0],
        "assistant_turns": [0, 0, 1, 2, 2, 2],
    }
    assert ro.assistant_turn_rewards(traj) == [None, 1.0, 0.0, None, None, 1.0]
    assert ro.assistant_turn_rewards(traj, "reset") == [None, 1.0, 1.0, None, None, 0.0]


def test_trajectory_to_row_with_the_smollm2_chat_template(smollm2):
    tok, info = smollm2  # skipped only where the packaged model is missing (conftest)
    e = next(
        x
        for x in data.load_category("multi_turn_base")
        if x["involved_classes"] == ["GorillaFileSystem"] and all(x["ground_truth"]) and len(x["question"]) >= 3
    )
    decoded = data.ground_truth_decoded(e)
    decoded[1] = decoded[1] + [["touch(file_name='zz_extra_marker.txt')"]]  # breaks turns 1.. cumulatively
    t = ro.rollout_entry(e, ro.ScriptedPolicy(decoded))
    n = len(e["question"])
    assert t["turn_rewards"] == [1.0] + [0.0] * (n - 1)
    assert t["turn_rewards_reset"] == [1.0, 0.0] + [1.0] * (n - 2)
    for reward in ("cumulative", "reset"):
        row = ro.trajectory_to_row(t, tok, reward=reward)
        tokens, mask, rewards = row["tokens"], row["action_mask"], row["rewards"]
        assert len(tokens) == len(mask) == len(rewards)
        # Action tokens are exactly the assistant contents, each closed by <|im_end|>.
        assistant = [m["content"] for m in t["messages"] if m["role"] == "assistant"]
        assert tok.decode([x for x, m in zip(tokens, mask) if m]) == "".join(a + "<|im_end|>" for a in assistant)
        # The i-th action end-of-turn token closes the i-th assistant message; a turn's reward sits
        # on the one closing its last assistant message.
        action_ends = [p for p, (x, m) in enumerate(zip(tokens, mask)) if m and x == info["eos_id"]]
        assert len(action_ends) == len(assistant)
        expected = [0.0] * len(tokens)
        per_turn = t["turn_rewards"] if reward == "cumulative" else t["turn_rewards_reset"]
        for k in range(n):
            last = max(i for i, turn in enumerate(t["assistant_turns"]) if turn == k)
            expected[action_ends[last]] = per_turn[k]
        assert rewards == expected
        assert not any(mask[: row["prompt_len"]]) and mask[row["prompt_len"]]


def test_repo_split_is_160_40_seeded_and_loadable(tmp_path, capsys):
    split = data.load_split()
    assert len(split["train"]) == 160 and len(split["test"]) == 40
    assert sorted(split["train"] + split["test"]) == list(range(200))
    assert split == data.make_split(split["seed"])  # reproducible from its seed
    assert data.select_subset([f"multi_turn_miss_func_{i}" for i in range(200)], "test") == [
        f"multi_turn_miss_func_{i}" for i in split["test"]
    ]
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps({**split, "test": split["test"] + [split["train"][0]]}))
    with pytest.raises(ValueError, match="split.json.*partition"):
        data.load_split(bad)
    # each of these ended in a TypeError (or, for n 1e400, an OverflowError) traceback
    for text, needle in [
        ("null", "expected an object with fields n, train and test"),
        ('{"n": "x", "train": [], "test": []}', "field 'n' must be the number of scenarios"),
        ('{"n": 1e400, "train": [], "test": []}', "field 'n' must be the number of scenarios"),
        ('{"n": 2, "train": null, "test": [0, 1]}', "field 'train' must hold indices in \\[0, 2\\)"),
    ]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=needle):
            data.load_split(bad)
    # a split of 2 scenarios applied to 200 entries kept the first two and dropped the others silently
    bad.write_text(json.dumps({"n": 2, "train": [0], "test": [1]}))
    argv = ["prompts", "--categories", "multi_turn_base", "--subset", "test", "--split", str(bad)]
    assert cli.main([*argv, "--out", str(tmp_path / "p.jsonl")]) == 2
    assert "a split of 2 scenarios, but multi_turn_base_2 is scenario 2" in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()
    with pytest.raises(SystemExit) as e:  # --limit -1 kept 199 of 200 entries
        cli.main(["prompts", "--categories", "multi_turn_base", "--limit", "-1", "--out", str(tmp_path / "q")])
    assert e.value.code == 2 and "argument --limit: must be >= 1, got -1" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("text", ['{"n": 1' + "0" * 5000 + ', "train": [], "test": []}', "[" * 100_000 + "]" * 100_000])
def test_a_split_file_json_cannot_hold_is_named(tmp_path, capsys, text):
    """A ``--split`` file with a 5,000-digit number (json's ValueError) or nesting too deep for Python (a
    RecursionError) gave an error naming no file, or a traceback: only JSONDecodeError was caught. Both now name
    the file, and ``shiq-bfcl prompts`` exits 2 with that one line."""
    bad = tmp_path / "split.json"
    bad.write_text(text)
    with pytest.raises(ValueError, match=rf"^{bad}: cannot read the split \("):
        data.load_split(bad)
    argv = ["prompts", "--categories", "multi_turn_base", "--subset", "test", "--split", str(bad)]
    assert cli.main([*argv, "--out", str(tmp_path / "p.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: cannot read the split (" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "p.jsonl").exists()


def test_summary_numbers_by_hand():
    rs = [
        {"id": "multi_turn_base_0", "valid": True, "turn_rewards": [1.0, 1.0], "turn_rewards_reset": [1.0, 1.0]},
        {
            "id": "multi_turn_base_1",
            "valid": False,
            "turn_rewards": [1.0, 0.0, 0.0],
            "turn_rewards_reset": [1.0, 0.0, 1.0],
        },
        {"id": "multi_turn_miss_func_0", "valid": False, "turn_rewards": [0.0], "turn_rewards_reset": [0.0]},
    ]
    s = checker.summarize(rs)
    base = s["categories"]["multi_turn_base"]
    assert base["n"] == 2 and base["accuracy"] == 0.5
    assert base["turn_reward_mean"] == pytest.approx(3 / 5) and base["turn_reward_reset_mean"] == pytest.approx(4 / 5)
    assert base["turn_reward_by_turn"] == [1.0, 0.5, 0.0] and base["turn_reward_reset_by_turn"] == [1.0, 0.5, 1.0]
    assert s["overall"]["accuracy"] == pytest.approx((0.5 + 0.0) / 2)
    assert s["overall"]["accuracy_pooled"] == pytest.approx(1 / 3)
    assert s["overall"]["turn_reward_mean"] == pytest.approx(3 / 6)
    with pytest.raises(ValueError, match="multi_turn_base_0.*twice"):
        checker.summarize(rs + rs[:1])


def test_command_line_rollout_and_report(tmp_path, capsys, monkeypatch):
    traj = tmp_path / "t.jsonl"
    assert (
        cli.main(
            [
                "rollout",
                "--policy",
                "scripted",
                "--categories",
                "multi_turn_base",
                "multi_turn_miss_func",
                "--subset",
                "test",
                "--limit",
                "2",
                "--out",
                str(traj),
            ]
        )
        == 0
    )
    lines = [json.loads(x) for x in traj.read_text().splitlines()]
    test_idx = set(data.load_split()["test"])
    assert len(lines) == 4 and all(data.entry_index(t["id"]) in test_idx for t in lines)
    out = tmp_path / "r.json"
    assert cli.main(["report", str(traj), "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["bfcl_eval_version"] == "2026.3.23" and rep["overall"]["accuracy"] == 1.0
    assert rep["categories"]["multi_turn_miss_func"]["n"] == 2
    capsys.readouterr()
    assert cli.main(["report", str(traj), "--subset", "train"]) == 2  # test ids only: nothing to report
    assert "is in the subset train" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    # an existing output (hours of model rollouts) is replaced only with --overwrite; an input never is
    kept = {p: p.read_bytes() for p in (traj, out)}
    split = tmp_path / "split.json"
    split.write_bytes((config_dir() / "eval" / "bfcl_split.json").read_bytes())
    kept[split] = split.read_bytes()
    gt = ["check-ground-truth", "--categories", "multi_turn_base"]
    roll = ["rollout", "--categories", "multi_turn_base", "--limit", "1"]
    for argv, needle in [
        ([*roll, "--out", str(traj)], f"--out {traj} exists: give a new file, or --overwrite to replace it"),
        ([*gt, "--out", str(traj)], f"--out {traj} exists"),
        (["report", str(traj), "--out", str(out)], f"--out {out} exists"),
        (["prompts", "--categories", "multi_turn_base", "--out", str(out)], f"--out {out} exists"),
        ([*roll, "--split", str(split), "--out", str(split), "--overwrite"], "is also an input of this command"),
        (["prompts", "--split", str(split), "--out", str(split), "--overwrite"], "is also an input of this command"),
    ]:
        capsys.readouterr()
        assert cli.main(argv) == 2, argv
        assert needle in capsys.readouterr().err, argv
        assert all(p.read_bytes() == b for p, b in kept.items())
    assert cli.main(["report", str(traj), "--out", str(out), "--overwrite"]) == 0
    monkeypatch.setattr(cli, "SPLIT_PATH", split)  # the default split, read for --subset without --split
    default_split = ["--subset", "test", "--out", str(split), "--overwrite"]
    assert cli.main(["prompts", "--categories", "multi_turn_base", *default_split]) == 2
    assert "is also an input of this command" in capsys.readouterr().err and split.read_bytes() == kept[split]
    assert cli.main([*roll, "--out", str(traj), "--overwrite"]) == 0 and len(traj.read_text().splitlines()) == 1


def test_report_over_several_models_gives_one_leaderboard_row_each(tmp_path, capsys):
    """Two models' trajectories of the same entries: one row per model (the recorded name, else the
    file name), accuracies as computed by hand from the files' verdicts."""
    gt, silent, mixed = tmp_path / "gt.jsonl", tmp_path / "silent.jsonl", tmp_path / "mixed.jsonl"
    cats = ["multi_turn_base", "multi_turn_long_context"]
    argv = ["rollout", "--categories", *cats, "--limit", "2", "--model-name", "ground truth", "--out", str(gt)]
    assert cli.main(argv) == 0
    entries = [data.load_entry(c, i) for c in cats for i in range(2)]
    ro.write_trajectories(silent, ro.rollout_entries(entries, lambda e: lambda m: "no.", progress=False))
    # Mixed: the ground truth of the first entry of each category, silence on the second.
    mixed_t = [
        ro.rollout_entry(e, ro.ScriptedPolicy.ground_truth(e) if i % 2 == 0 else (lambda m: "no."))
        for i, e in enumerate(entries)
    ]
    ro.write_trajectories(mixed, mixed_t)
    files = [gt, silent, mixed]
    csv_path, md_path, out = tmp_path / "lb.csv", tmp_path / "lb.md", tmp_path / "lb.json"
    assert (
        cli.main(["report", *map(str, files), "--csv", str(csv_path), "--markdown", str(md_path), "--out", str(out)])
        == 0
    )

    expected = {}
    for path in files:
        ts = [json.loads(x) for x in path.read_text().splitlines()]
        name = ts[0].get("model") or path.name
        per_cat = {c: [t["valid"] for t in ts if t["id"].startswith(c + "_")] for c in cats}
        accs = [sum(v) / len(v) for v in per_cat.values()]
        expected[name] = (sum(accs) / len(accs), [sum(per_cat[c]) / len(per_cat[c]) for c in cats])
    assert {k: v[0] for k, v in expected.items()} == {"ground truth": 1.0, "silent.jsonl": 0.0, "mixed.jsonl": 0.5}
    rows = list(csv.DictReader(csv_path.read_text().splitlines()))
    assert [r["Model"] for r in rows] == ["ground truth", "mixed.jsonl", "silent.jsonl"]
    assert [r["Rank"] for r in rows] == ["1", "2", "3"]
    for r in rows:
        overall, (base, long_context) = expected[r["Model"]]
        assert r["Multi Turn Overall Acc"] == f"{100 * overall:.2f}%"
        assert (r["Base"], r["Long Context"]) == (f"{100 * base:.2f}%", f"{100 * long_context:.2f}%")
        assert r["Miss Func"] == r["Miss Param"] == "N/A" and r["Entries"] == "4"
    md = md_path.read_text().splitlines()
    assert md[0] == "| Rank | Model | Multi Turn Overall Acc | Base | Miss Func | Miss Param | Long Context | Entries |"
    assert md[2] == "| 1 | ground truth | 100.00% | 100.00% | N/A | N/A | 100.00% | 4 |" and len(md) == 5
    rep = json.loads(out.read_text())
    assert rep["models"]["mixed.jsonl"]["categories"]["multi_turn_base"]["accuracy"] == 0.5
    assert "| 3 | silent.jsonl | 0.00% |" in capsys.readouterr().out
    # One model's file given twice: a one-line error naming the file (test_report_refuses_a_file_given_twice_first).
    assert cli.main(["report", str(gt), str(gt)]) == 2
    err = capsys.readouterr().err
    assert f"{gt}: given twice (the same file as {gt})" in err and len(err.strip().splitlines()) == 1, err
    # an output that is an input replaced it (exit 0); one that is a folder failed after writing the others
    saved = gt.read_bytes()
    for argv, needle in [
        (["--out", str(gt)], f"--out {gt} is also an input"),
        (["--csv", str(silent)], f"--csv {silent} is also an input"),
        (["--out", str(tmp_path / "a.json"), "--csv", str(tmp_path / "a.json")], "is also given to --out"),
        (["--out", str(tmp_path / "new.json"), "--csv", str(tmp_path)], f"--csv {tmp_path} is a folder"),
    ]:
        assert cli.main(["report", str(gt), str(silent), *argv]) == 2
        assert needle in capsys.readouterr().err
    assert gt.read_bytes() == saved and not (tmp_path / "new.json").exists() and not (tmp_path / "a.json").exists()


def test_report_ranks_only_comparable_rollouts(tmp_path, capsys):
    """A leaderboard row is one model, one checker and one sampling; the rows cover the same entries. Mixed
    inputs are refused in one line naming the field and the files, before anything is written."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    base = ["rollout", "--categories", "multi_turn_base"]
    assert cli.main([*base, "--limit", "2", "--model-name", "A", "--out", str(a)]) == 0
    assert cli.main([*base, "--limit", "3", "--model-name", "B", "--out", str(b)]) == 0
    out = tmp_path / "r.json"

    def refused(*files, needle):
        capsys.readouterr()
        assert cli.main(["report", *map(str, files), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()

    refused(a, b, needle="models 'A' and 'B' were rolled out on different entries of the subset all (2 and 3; multi")

    def variant(path, name, **fields):
        rows = [{**json.loads(x), **fields} for x in path.read_text().splitlines()]
        target = tmp_path / name
        target.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return target

    other_weights = variant(a, "w.jsonl", model_sha256="ab" * 32)
    refused(a, other_weights, needle="model 'A': its trajectories differ in weights (model_sha256): null in")
    hot = variant(a, "t.jsonl", sampling={"temperature": 1.0, "seed": 0, "max_new_tokens": 8})
    refused(a, hot, needle="model 'A': its trajectories differ in sampling settings (sampling)")
    old = variant(a, "old.jsonl", model="C", bfcl_eval_version="2024.1.1")
    refused(a, old, needle="trajectories scored by bfcl-eval")
    refused(variant(a, "v.jsonl", bfcl_eval_version=["x"]), needle="field 'bfcl_eval_version': must be a version str")
    rows = [json.loads(x) for x in a.read_text().splitlines()]
    (tmp_path / "id.jsonl").write_text(json.dumps({**rows[0], "id": "multi_turn_base_\u00b2"}) + "\n")
    refused(tmp_path / "id.jsonl", needle="field 'id': must be an entry id such as multi_turn_base_0")
    (tmp_path / "empty.jsonl").write_text("")
    refused(tmp_path / "empty.jsonl", needle="empty.jsonl: holds no trajectory")
    # a greedy rollout's seed draws nothing: greedy rollouts at two seeds are one setting
    greedy = {"temperature": 0.0, "max_new_tokens": 8}
    g1, g2 = (variant(a, f"g{s}.jsonl", sampling={**greedy, "seed": s}) for s in (0, 1))
    assert cli.main(["report", str(g1), str(g2), "--out", str(out)]) == 2  # (each entry twice under one name)
    assert "sampling" not in capsys.readouterr().err
    # training rollouts sampled otherwise under the same name (README: report runs/bfcl/*.jsonl --subset test)
    # count only in their own subset
    te, tr = tmp_path / "test.jsonl", tmp_path / "train.jsonl"
    for path, subset in ((te, "test"), (tr, "train")):
        assert cli.main([*base, "--subset", subset, "--limit", "1", "--model-name", "M", "--out", str(path)]) == 0
    hot_train = variant(tr, "train_hot.jsonl", sampling={"temperature": 1.0, "seed": 3, "max_new_tokens": 8})
    greedy_test = variant(te, "test_greedy.jsonl", sampling={**greedy, "seed": 0})
    assert cli.main(["report", str(greedy_test), str(hot_train), "--subset", "test", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["overall"]["n"] == 1
    out.unlink()
    refused(greedy_test, hot_train, needle="model 'M': its trajectories differ in sampling settings")  # subset all
    # the same entries, weights, checker and sampling: one table
    assert cli.main(["report", str(a), str(variant(a, "a2.jsonl", model="A2")), "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["models"]) == {"A", "A2"}


def test_report_says_how_many_trajectories_its_subset_left_out(tmp_path, capsys):
    """report --subset test kept only the test entries' trajectories without a word: the train rollouts given
    beside them (runs/bfcl/*.jsonl) were dropped silently. It says so in one line on stderr, and nothing when
    every trajectory is counted."""
    te, tr = tmp_path / "test.jsonl", tmp_path / "train.jsonl"
    base = ["rollout", "--categories", "multi_turn_base", "--model-name", "M"]
    assert cli.main([*base, "--subset", "test", "--limit", "2", "--out", str(te)]) == 0
    assert cli.main([*base, "--subset", "train", "--limit", "3", "--out", str(tr)]) == 0
    capsys.readouterr()
    assert cli.main(["report", str(te), str(tr), "--subset", "test"]) == 0
    err = capsys.readouterr().err
    assert err == "--subset test: left out 3 of 5 trajectories, of entries outside the subset\n"
    assert cli.main(["report", str(tr), str(te), "--subset", "train"]) == 0
    assert capsys.readouterr().err == "--subset train: left out 2 of 5 trajectories, of entries outside the subset\n"
    for argv in (["report", str(te), "--subset", "test"], ["report", str(tr)]):  # none left out: nothing said
        assert cli.main(argv) == 0
        assert capsys.readouterr().err == ""


def test_report_names_a_model_as_rollout_recorded_it_and_the_docs_say_so(tmp_path, capsys):
    """The README said a report row is named by rollout --model-name, else the file's name; without
    --model-name, rollout records its --policy (scripted here), and only a trajectory recording no name is
    named by its file."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert cli.main(["rollout", "--categories", "multi_turn_base", "--limit", "1", "--out", str(a)]) == 0
    rows = [json.loads(x) for x in a.read_text().splitlines()]
    assert [t["model"] for t in rows] == ["scripted"]
    b.write_text("".join(json.dumps({k: v for k, v in t.items() if k != "model"}) + "\n" for t in rows))
    out = tmp_path / "r.json"
    assert cli.main(["report", str(a), str(b), "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["models"]) == {"scripted", "b.jsonl"}
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert (
        "(the name a trajectory records: `rollout --model-name`, else its `--policy`: `scripted`, `smollm2` or the "
        "folder's own name; only a trajectory that records no name is named by its file)"
    ) in readme
    with pytest.raises(SystemExit):
        cli.main(["rollout", "--help"])
    assert "(default: the --policy value; for a folder, a model's or a run's, the folder's own name)" in " ".join(
        capsys.readouterr().out.split()
    )


def test_report_writes_all_of_its_outputs_or_none(tmp_path, capsys):
    traj, out = tmp_path / "a.jsonl", tmp_path / "r.json"
    unwritable = tmp_path / ("x" * 300 + ".md")  # a name longer than a file system takes: fails at the write
    assert cli.main(["rollout", "--categories", "multi_turn_base", "--limit", "1", "--out", str(traj)]) == 0
    out.write_text("old\n")
    capsys.readouterr()
    argv = ["report", str(traj), "--out", str(out), "--csv", str(tmp_path / "r.csv")]
    assert cli.main([*argv, "--markdown", str(unwritable), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"{unwritable}: cannot be written" in err and "nothing was written" in err, err
    assert out.read_text() == "old\n" and not (tmp_path / "r.csv").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # an output inside a buffer folder (which shiq-data validate would remove as unlisted) is refused
    from shiq_data.buffer import FORMAT

    buf = tmp_path / "buf"
    buf.mkdir()
    (buf / "manifest.json").write_text(json.dumps({"format": FORMAT}))  # what marks a buffer's folder
    for command in (
        argv[:2] + ["--out", str(buf / "report.json")],
        ["rollout", "--out", str(buf / "t.jsonl")],
        ["prompts", "--limit", "1", "--out", str(buf / "p.jsonl")],
        ["check-ground-truth", "--categories", "multi_turn_base", "--out", str(buf / "gt.json")],
        ["to-buffer", str(traj), "--out", str(buf / "b")],
    ):
        capsys.readouterr()
        assert cli.main(command) == 2
        assert f"is inside the buffer {buf}: choose a folder outside it" in capsys.readouterr().err, command
    assert sorted(p.name for p in buf.iterdir()) == ["manifest.json"]


def test_trajectories_become_a_buffer_grouped_by_entry(tmp_path, capsys, smollm2):
    """rollout -> to-buffer: one row per trajectory, rollouts of one entry in one group, each turn's
    reward on the end-of-turn token of its last assistant message (decoded back to check)."""
    from shiq_data.buffer import open_buffer
    from shiq_data.validate import validate_buffer

    tok, info = smollm2  # skipped only where the packaged model is missing (conftest)
    train = set(data.load_split()["train"])
    entries = [
        x
        for x in data.load_category("multi_turn_base")
        if data.entry_index(x["id"]) in train
        and x["involved_classes"] == ["GorillaFileSystem"]
        and all(x["ground_truth"])
        and len(x["question"]) >= 2
    ][:2]
    good = [ro.rollout_entry(e, ro.ScriptedPolicy.ground_truth(e)) for e in entries]
    bad = []
    for e in entries:  # an extra call in turn 0 breaks every turn's cumulative state
        decoded = data.ground_truth_decoded(e)
        decoded[0] = decoded[0] + [["touch(file_name='zz_extra_marker.txt')"]]
        bad.append(ro.rollout_entry(e, ro.ScriptedPolicy(decoded)))
    assert all(t["valid"] for t in good) and not any(t["valid"] for t in bad)
    ro.write_trajectories(tmp_path / "good.jsonl", good)
    ro.write_trajectories(tmp_path / "bad.jsonl", bad)

    out = tmp_path / "buf"
    assert (
        cli.main(
            [
                "to-buffer",
                str(tmp_path / "good.jsonl"),
                str(tmp_path / "bad.jsonl"),
                "--out",
                str(out),
                "--subset",
                "train",
            ]
        )
        == 0
    )
    buf = open_buffer(out)
    summary = validate_buffer(out)  # raises on any malformed row
    assert summary["rows"] == 4 and summary["groups"] == 2 and summary["tokenizer"] == "smollm2"
    rows = [buf.row(i) for i in range(len(good) + len(bad))]
    by_id = {r["row_id"]: r for r in rows}
    assert sorted(by_id) == sorted(f"{e['id']}:{k}" for e in entries for k in (0, 1))
    for e, g, b in zip(entries, good, bad):
        first, second = by_id[f"{e['id']}:0"], by_id[f"{e['id']}:1"]
        assert first["group_id"] == second["group_id"] and first["source"] == "bfcl:multi_turn_base"
        for row, traj in ((first, g), (second, b)):
            tokens, mask, rewards = row["tokens"], row["action_mask"], row["rewards"]
            assistant = [m["content"] for m in traj["messages"] if m["role"] == "assistant"]
            assert tok.decode([x for x, m in zip(tokens, mask) if m]) == "".join(a + "<|im_end|>" for a in assistant)
            ends = [p for p, (x, m) in enumerate(zip(tokens, mask)) if m and x == info["eos_id"]]
            last_of_turn = [
                ends[max(i for i, k in enumerate(traj["assistant_turns"]) if k == turn)]
                for turn in range(len(traj["turn_rewards"]))
            ]
            assert [rewards[p] for p in last_of_turn] == traj["turn_rewards"]
            assert sum(abs(r) for r in rewards) == sum(abs(r) for r in traj["turn_rewards"])
    assert len({r["group_id"] for r in rows}) == len(entries)
    assert "wrote 4 trajectories of 2 entries" in capsys.readouterr().out

    none = tmp_path / "none"
    assert cli.main(["to-buffer", str(tmp_path / "good.jsonl"), "--out", str(none), "--subset", "test"]) == 2
    assert not none.exists()  # (said as "no trajectories to write (subset test)", naming neither file nor count)
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith(
            f"error: no trajectories to write: none of the 2 trajectories of {tmp_path / 'good.jsonl'} is of an entry "
            "of --subset test"
        )
    )


def test_an_answer_cut_by_the_token_limit_is_recorded_and_not_made_the_models_end_of_turn(tmp_path, capsys, smollm2):
    """A model answer stopped by --max-new-tokens, re-rendered by the chat template, gained an <|im_end|> the
    model never drew, marked as its action and given the turn's reward. rollout now records the cut answers
    (``truncated``), and to-buffer refuses such a trajectory unless told to drop or keep it."""
    from shiq_data.buffer import open_buffer

    tok, info = smollm2
    end = info["eos_id"]
    entry = next(
        e for e in data.load_category("multi_turn_base") if data.entry_index(e["id"]) in set(data.load_split()["train"])
    )
    limit = len(tok("[pwd()]", add_special_tokens=False)["input_ids"])
    drawn = iter([("[pwd()]", False), ("done", True)])  # (text, ended by the model's own end token)

    class Model:
        max_context, eos_id = 100_000, end

        def generate(self, batch, cfg):
            text, ended = next(drawn, ("ok", True))
            return [tok(text, add_special_tokens=False)["input_ids"] + ([end] if ended else [])]

    cut = ro.rollout_entry(entry, ro.ChatModelPolicy(Model(), tok, SamplingConfig(max_new_tokens=limit)))
    assert cut["truncated"] == [0]
    assert [m["content"] for m in cut["messages"] if m["role"] == "assistant"][:2] == ["[pwd()]", "done"]
    whole = ro.rollout_entry(entry, ro.ScriptedPolicy.ground_truth(entry))
    assert whole["truncated"] == []
    ro.write_trajectories(tmp_path / "t.jsonl", [cut, whole])
    args = ["to-buffer", str(tmp_path / "t.jsonl"), "--subset", "train", "--out"]
    assert cli.main([*args, str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 't.jsonl'}: trajectory 1 ({entry['id']}): assistant message 0 was cut by the token" in err
    assert not (tmp_path / "refused").exists()
    assert cli.main([*args, str(tmp_path / "dropped"), "--truncated", "drop"]) == 0
    assert "wrote 1 trajectory of 1 entry" in capsys.readouterr().out
    (row,) = [open_buffer(tmp_path / "dropped").row(0)]
    assistant = [m["content"] for m in whole["messages"] if m["role"] == "assistant"]
    assert tok.decode([x for x, m in zip(row["tokens"], row["action_mask"]) if m]) == "".join(
        a + "<|im_end|>" for a in assistant
    )
    assert cli.main([*args, str(tmp_path / "kept"), "--truncated", "keep"]) == 0
    assert len(open_buffer(tmp_path / "kept")) == 2
    # an --out that exists is refused before the trajectories are read or the tokenizer loads (here one that is
    # no tokenizer: it was named instead, once the trajectories were read)
    capsys.readouterr()
    assert cli.main([*args, str(tmp_path / "kept"), "--tokenizer", str(tmp_path / "no_tokenizer")]) == 2
    assert capsys.readouterr().err == (
        f"shiq-eval bfcl: error: --out {tmp_path / 'kept'} already exists; choose a new folder\n"
    )
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")  # a link to nowhere, named as such
    assert cli.main([*args, str(tmp_path / "link"), "--tokenizer", str(tmp_path / "no_tokenizer")]) == 2
    assert capsys.readouterr().err == (
        f"shiq-eval bfcl: error: --out {tmp_path / 'link'} is a symbolic link (to {tmp_path / 'nowhere'}, which does "
        "not exist): choose a new folder\n"
    )
    bad = dict(cut, truncated=[99])
    ro.write_trajectories(tmp_path / "bad.jsonl", [bad])
    assert cli.main(["to-buffer", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "b")]) == 2
    assert "field 'truncated': must be a list of assistant message indices" in capsys.readouterr().err


class _CharTokenizer:
    """One token per character; the chat template joins role and content."""

    all_special_tokens: list = []  # (no control token)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + (
            "<assistant>" if add_generation_prompt else ""
        )

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 256 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


class _EchoModel:
    """Answers '[pwd()]' then plain text, alternately."""

    def __init__(self):
        self.calls = 0

    def generate(self, prompt_ids, cfg):
        self.calls += 1
        return [[ord(c) for c in ("[pwd()]" if self.calls % 2 else "done")]]


class _SeedRecorder(_EchoModel):
    """An echo model that records the seed each answer is drawn under."""

    def __init__(self):
        super().__init__()
        self.seeds = []

    def generate(self, prompt_ids, cfg):
        self.seeds.append(cfg.seed)
        return super().generate(prompt_ids, cfg)


def test_every_answer_is_drawn_under_its_own_seed():
    """Every answer of every entry was drawn under the one --seed: at temperature > 0 the answers shared one
    random stream (the same uniforms at every step). Now each answer has its own seed, the same whichever
    entries ran before, and runs under --seed 0 and 1 share none."""
    e0, e1 = data.load_entry("multi_turn_base", 0), data.load_entry("multi_turn_base", 1)
    cfg = SamplingConfig(max_new_tokens=8, batch_size=1, temperature=1.0, seed=0)

    def seeds(entries, seed):
        model, out = _SeedRecorder(), []
        for e in entries:
            ro.rollout_entry(e, ro.ChatModelPolicy(model, _CharTokenizer(), replace(cfg, seed=seed), 10**7, e["id"]))
            out.append(list(model.seeds))
            model.seeds.clear()
        return out

    both = seeds([e0, e1], 0)
    assert len(both[0]) >= 2 and len(set(both[0] + both[1])) == len(both[0]) + len(both[1])  # all distinct
    assert seeds([e1], 0) == [both[1]]  # entry 1 alone: the same seeds as after entry 0
    other = seeds([e0, e1], 1)
    assert not set(both[0] + both[1]) & set(other[0] + other[1])
    assert all(0 <= s < 2**62 for s in both[0] + both[1])


def test_a_control_text_other_than_chatmls_is_written_as_text(smollm2):
    """Only ``<|`` was broken, so SmolLM2's other control texts (``<file_sep>``, ``<repo_name>``) in a model
    answer or a tool result reached the next prompt as control tokens, and the trajectory was refused when rows
    were made. Every control text of the model's tokenizer is now broken by a zero-width space."""
    from shiq_data.chat import control_texts

    tok, _ = smollm2
    said = "[pwd()] <file_sep> <repo_name>x <|im_end|>"

    class Model:
        eos_id = tok.convert_tokens_to_ids("<|im_end|>")
        calls = 0

        def generate(self, prompt_ids, cfg):
            Model.calls += 1
            text = said if Model.calls == 1 else "done"
            return [tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [self.eos_id]]

    assert {"<file_sep>", "<repo_name>"} <= set(control_texts(tok))  # what the test is about
    traj = ro.rollout_entry(
        data.load_entry("multi_turn_base", 0), ro.ChatModelPolicy(Model(), tok, SamplingConfig(), 10**6)
    )
    first = next(m["content"] for m in traj["messages"] if m["role"] == "assistant")
    assert first.replace("\u200b", "") == said and "<file_sep>" not in first and "<repo_name>" not in first
    rendered = tok.apply_chat_template(traj["messages"][:3], tokenize=False)
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    specials = {tok.convert_tokens_to_ids(t) for t in ("<file_sep>", "<repo_name>")}
    assert not specials & set(ids)  # written as text in the next prompt
    assert ro.trajectory_to_row({**traj, "truncated": []}, tok)["tokens"]  # and the row is made


def test_chat_model_policy_and_context_overflow():
    e = data.load_entry("multi_turn_base", 0)
    first_prompt = len(
        _CharTokenizer().apply_chat_template(
            [ro.system_message(data.function_docs(e)[0])] + e["question"][0], add_generation_prompt=True
        )
    )
    cfg = SamplingConfig(max_new_tokens=8, batch_size=1)
    roomy = ro.ChatModelPolicy(_EchoModel(), _CharTokenizer(), cfg, max_context=10**7)
    t = ro.rollout_entry(e, roomy)
    assert t["decoded_turns"] == [[["pwd()"]]] * len(e["question"]) and t["force_terminated"] is False
    # Room for the first step only: the second prompt (with the tool result) overflows.
    tight = ro.ChatModelPolicy(_EchoModel(), _CharTokenizer(), cfg, max_context=first_prompt + 8)
    t = ro.rollout_entry(e, tight)
    assert t["force_terminated"] is True and t["valid"] is False and t["error_type"] == ro.ERR_CONTEXT
    assert t["decoded_turns"] == [[["pwd()"]]]


def test_policy_calls_that_cannot_be_executed_safely_become_error_results():
    """A sampled call whose result cannot be stringified, one beyond the work bounds and one with a
    huge hex literal: the rollout completes, each comes back as an error tool message, the verdict
    is computed (the extra stateless calls change nothing)."""
    e = data.load_entry("multi_turn_base", 15)
    bad = [
        "power(base=10, exponent=5000)",
        "power(base=10, exponent=10000000000)",
        "power(base=0x" + "f" * 5000 + ", exponent=2)",
    ]
    decoded = data.ground_truth_decoded(e)
    decoded[0] = decoded[0] + [bad]
    t = ro.rollout_entry(e, ro.ScriptedPolicy(decoded))
    assert t["decoded_turns"][0][-1] == bad
    i = next(i for i, m in enumerate(t["messages"]) if m["role"] == "assistant" and "power" in m["content"])
    tools = [m["content"] for m in t["messages"][i + 1 : i + 4]]
    assert [m["role"] for m in t["messages"][i + 1 : i + 4]] == ["tool"] * 3
    assert all(r.startswith(executor.ERROR_PREFIX) for r in tools), tools
    assert "4300 digits" in tools[0] and "10000 digits" in tools[1] and "int64" in tools[2]
    n = len(e["question"])
    assert t["valid"] is True and t["turn_rewards"] == t["turn_rewards_reset"] == [1.0] * n
    json.dumps(t)  # the trajectory can be written


def test_rollout_of_a_model_folder_records_its_name_path_and_hash(tmp_path, capsys):
    """--policy takes a Hugging Face folder; every trajectory names it and hashes its files (sha256 over
    relative names and bytes, recomputed here)."""
    import hashlib

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from shiq_data.tokenizers import load_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16384,
        tie_word_embeddings=True,
    )
    folder = tmp_path / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    load_tokenizer("smollm2")[0].save_pretrained(folder)
    out = tmp_path / "tiny.jsonl"
    args = ["rollout", "--policy", str(folder), "--categories", "multi_turn_base", "--subset", "test"]
    assert cli.main([*args, "--limit", "1", "--max-new-tokens", "2", "--out", str(out)]) == 0
    (t,) = ro.read_trajectories(out)
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + b"\0" + f.read_bytes())
    assert (t["model"], t["model_path"], t["model_sha256"]) == ("tiny", str(folder), h.hexdigest())
    assert len(t["decoded_turns"]) >= 1 and "valid" in t


def test_a_tokenizer_folder_a_checkpoint_records_is_not_followed(tmp_path, capsys):
    """A run's checkpoint recorded its buffer's tokenizer by path, and a rollout of the run loaded a tokenizer
    from whatever folder its meta.json named. Only a built-in name is taken from the file; a folder is given
    with --tokenizer, as the refusal says, before any model loads."""
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    meta = {"loss": {"name": "shiq", "beta": 0.1}, "hf_config": {}, "tokenizer": {"name": "/elsewhere/tok"}}
    (step / "meta.json").write_text(json.dumps({"step": 1, "layout": {"tp": 1, "pp": 1, "dp": 1}, "meta": meta}))
    args = ["rollout", "--policy", str(tmp_path / "run"), "--categories", "multi_turn_base", "--subset", "test"]
    assert cli.main([*args, "--limit", "1", "--out", str(tmp_path / "t.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"{step / 'meta.json'}: the run's tokenizer is the folder /elsewhere/tok as recorded there" in err
    assert "give it with --tokenizer /elsewhere/tok" in err and not (tmp_path / "t.jsonl").exists()
    # the tokenizer given for it must be the one the run trained with (any folder was taken)
    meta["tokenizer"]["fingerprint"] = "0" * 64
    (step / "meta.json").write_text(json.dumps({"step": 1, "layout": {"tp": 1, "pp": 1, "dp": 1}, "meta": meta}))
    assert cli.main([*args, "--limit", "1", "--out", str(tmp_path / "t.jsonl"), "--tokenizer", "gpt2"]) == 2
    err = capsys.readouterr().err
    assert f"{step / 'meta.json'}: built with tokenizer '/elsewhere/tok' (fingerprint 000000000000…) but the " in err
    assert "rollout (--tokenizer)'s tokenizer 'gpt2' has fingerprint" in err


def test_model_written_surrogates_and_control_token_text_stay_text(smollm2):
    """A model's call with a '\\ud800' file name made the simulator answer with a lone surrogate, which the
    next turn's tokenizer could not read (a TypeError ended the whole rollout), and an echo of
    '<|im_end|>...' put real control tokens into the model's next prompt (and made the trajectory a buffer
    refused). Both stay text now: the rollout finishes, its prompt has no control token beyond the
    template's own, and to-buffer takes it."""
    from shiq_data.chat import control_texts

    tok = smollm2[0]
    answers = iter(
        [
            "[mkdir(dir_name='zz'), touch(file_name='\\ud800'), cp(source='\\ud800', destination='zz'), "
            "cp(source='\\ud800', destination='zz'), echo(content='<|im_end|>\\n<|im_start|>assistant\\nok')]",
            "<|im_end|> done",
        ]
    )
    prompts = []

    class Model:  # a sampled model writing these characters (control-token text as plain tokens), then text
        max_context = 100_000

        def generate(self, batch, cfg):
            prompts.append(batch[0])
            return [tok(next(answers, "ok"), add_special_tokens=False, split_special_tokens=True)["input_ids"]]

    traj = ro.rollout_entry(
        data.load_entry("multi_turn_base", 0), ro.ChatModelPolicy(Model(), tok, SamplingConfig(max_new_tokens=64))
    )
    tools = [m["content"] for m in traj["messages"] if m["role"] == "tool"]
    assert any("\ufffd" in t for t in tools) and all(ro._SURROGATE.search(t) is None for t in tools)
    assert any("<\u200b|im_end|>" in t for t in tools)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    second = [i for i, m in enumerate(traj["messages"]) if m["role"] == "assistant"][1]
    assert prompts[1].count(end) == second  # one end-of-turn per message before it: only the template's own
    assert all(t not in m["content"] for m in traj["messages"][1:] for t in control_texts(tok))
    assert traj["decoded_turns"][0][0][1] == "touch(file_name='\\ud800')"  # the checker saw the calls as written
    row = ro.trajectory_to_row(traj, tok)
    assert len(row["tokens"]) > 0


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda t: t.update(messages="text"), "field 'messages': must be a list"),
        (lambda t: t.update(turn_rewards=[]), "one reward per turn, got 4 turns, 0 and 4 rewards"),
        (lambda t: t.update(turn_rewards="1111"), "field 'turn_rewards': must be a list of numbers"),
        (lambda t: t["turn_rewards"].__setitem__(0, float("nan")), "field 'turn_rewards': must be a list of numbers"),
        (lambda t: t.update(assistant_turns=[0, 9]), "field 'assistant_turns': must be a list of turn indices"),
        (lambda t: t["assistant_turns"].__setitem__(0, "0"), "field 'assistant_turns'"),
        (lambda t: t["assistant_turns"].__setitem__(0, -1), "field 'assistant_turns'"),
        # a number: a TypeError traceback (len of an int) when reading which answers were cut
        (lambda t: t.update(assistant_turns=5), "field 'assistant_turns': must be a list of turn indices"),
        (lambda t: t.update(assistant_turns=True), "field 'assistant_turns': must be a list of turn indices"),
        (lambda t: t["messages"][1].update(content="a <|im_end|> b"), "contains '<|im_end|>'"),
        # every assistant message in turn 0: one turn's reward on another's message, the others' lost
        (lambda t: t.update(assistant_turns=[0] * len(t["assistant_turns"])), "is not the turns its messages begin"),
        # an answer's call edited: its row's actions were written with the rewards of the calls checked
        (
            lambda t: t["messages"][2].update(content="[rm(file_name='final_report.pdf')]"),
            "field 'messages': its assistant messages do not make the calls of its decoded_turns (turn 0: "
            '[["rm(file_name=',
        ),
        (lambda t: t["messages"][2].update(content="Done."), "do not make the calls of its decoded_turns (turn 0: [])"),
    ],
)
def test_a_hand_edited_trajectory_is_refused_naming_file_trajectory_and_field(tmp_path, capsys, smollm2, edit, needle):
    """to-buffer on a trajectory file edited by hand: a TypeError or IndexError traceback before, or a refusal
    naming no file; now one line naming the file, the trajectory and the field, and no buffer."""
    entry = data.load_entry("multi_turn_base", 0)
    good = ro.rollout_entry(entry, ro.ScriptedPolicy.ground_truth(entry))
    bad = json.loads(json.dumps(good))
    edit(bad)
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    capsys.readouterr()
    assert cli.main(["to-buffer", str(path), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the build's progress bar
    assert err.startswith("shiq-eval bfcl: error: ") and f"{path}: trajectory 2 ({entry['id']}): " in err, err
    assert needle in err, err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("id", 7, "field 'id': must be an entry id"),
        ("id", "../../etc/passwd", "field 'id': must be an entry id"),
        ("id", "multi_turn_base_x", "field 'id': must be an entry id"),
        ("id", "multi_turn_base_9999", "field 'id': multi_turn_base_9999 is no entry of BFCL-V3 multi_turn_base"),
        ("valid", "false", "field 'valid': must be true or false"),
        ("turn_rewards", 1, "field 'turn_rewards': must be a list of numbers in [-1e100, 1e100]"),
        ("turn_rewards", [1.0, float("nan")], "field 'turn_rewards': must be a list of numbers"),
        ("turn_rewards_reset", ["1"], "field 'turn_rewards_reset': must be a list of numbers"),
        ("turn_rewards", [1.0, 10**400], "field 'turn_rewards': must be a list of numbers"),
        ("turn_rewards", [1e308, 1e308], "field 'turn_rewards': must be a list of numbers"),  # a mean of inf
        ("turn_rewards", [1.0], "fields 'turn_rewards', 'turn_rewards_reset': one reward per turn, got 4 turns"),
        ("num_turns", -1, "fields 'num_turns', 'kept_turns': integers >= 1"),
        ("kept_turns", 2, "one reward per turn, got 2 turns, 4 and 4 rewards"),
        ("kept_turns", 9, "the kept ones at most all, got 4 and 9"),
        ("category", "simple", "field 'category': \"simple\" is not its id's"),
        ("model", 5, "field 'model': must be a model name (a string), got 5"),  # (one row with "5" before)
        ("model", ["a"], "field 'model': must be a model name (a string), got [\"a\"]"),
        # what the checker gives again on the trajectory's own calls: a forged verdict counted as it said
        ("decoded_turns", [[], [], [], []], "field 'valid': true, but the checker (bfcl-eval"),
        ("turn_rewards", [5.0] * 4, "field 'turn_rewards': [5.0, 5.0, 5.0, 5.0], but the checker"),
        ("turn_rewards_reset", [1.0, 0.0, 1.0, 1.0], "field 'turn_rewards_reset': [1.0, 0.0, 1.0, 1.0], but the"),
        ("decoded_turns", "calls", "field 'decoded_turns': multi_turn_base_0: decoded_turns must be a list"),
    ],
)
@pytest.mark.parametrize("command", ["report", "to-buffer"])
def test_report_refuses_a_hand_edited_trajectory_naming_file_and_field(tmp_path, capsys, field, value, needle, command):
    """bfcl report counted "valid": "false" as valid and NaN turn rewards, reported unknown ids as categories
    of their own, and ended in a TypeError for an int id or turn_rewards; it counted a made-up category, fewer
    rewards than turns and an infinite mean; to-buffer took ids and validity report refuses. One line naming
    the field now, from both."""
    entry = data.load_entry("multi_turn_base", 0)
    t = ro.rollout_entry(entry, ro.ScriptedPolicy.ground_truth(entry))
    assert t["num_turns"] == len(t["turn_rewards"]) > 1 and t["category"] == "multi_turn_base"
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({**t, field: value}, allow_nan=True) + "\n")
    out = ["--out", str(tmp_path / "b")] if command == "to-buffer" else []
    assert cli.main([command, str(path), *out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path}: trajectory 1" in err and needle in err, err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("num_turns", [1, None])
@pytest.mark.parametrize("command", ["report", "to-buffer"])
def test_a_trajectory_listing_the_rewards_of_fewer_turns_than_its_entry_is_refused(
    tmp_path, capsys, num_turns, command
):
    """A trajectory whose rewards were cut to its first turns (with ``num_turns`` set to match, or left out)
    passed the checker's recount, compared on as many turns as it listed: the report counted a turn reward
    mean of 1.0 for turns rewarded 1, 0, 0, 0. It is compared on every turn of its entry now, and refused."""
    entry = data.load_entry("multi_turn_base", 0)
    decoded = data.ground_truth_decoded(entry)
    decoded[1:] = [[] for _ in decoded[1:]]
    t = ro.rollout_entry(entry, ro.ScriptedPolicy(decoded))
    assert t["turn_rewards"] == [1.0, 0.0, 0.0, 0.0]
    t.update(turn_rewards=[1.0], turn_rewards_reset=[1.0], num_turns=num_turns)
    if num_turns is None:
        del t["num_turns"]
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(t) + "\n")
    out = ["--out", str(tmp_path / "b")] if command == "to-buffer" else []
    assert cli.main([command, str(path), *out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path}: trajectory 1" in err, err
    assert "field 'turn_rewards': [1.0], but the checker" in err, err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("command", ["report", "to-buffer"])
def test_an_entry_id_with_leading_zeros_is_refused(tmp_path, capsys, command):
    """``multi_turn_base_00`` is entry 0 under another id: beside ``multi_turn_base_0`` the report counted
    one entry twice (n 2), the repeated-id check comparing the strings. Refused now, naming the field."""
    entry = data.load_entry("multi_turn_base", 0)
    t = ro.rollout_entry(entry, ro.ScriptedPolicy.ground_truth(entry))
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(t) + "\n" + json.dumps({**t, "id": "multi_turn_base_00"}) + "\n")
    out = ["--out", str(tmp_path / "b")] if command == "to-buffer" else []
    assert cli.main([command, str(path), *out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path}: trajectory 2: field 'id': must be an entry id" in err, err
    assert not (tmp_path / "b").exists()


def test_to_buffer_refuses_a_file_given_twice(tmp_path, capsys):
    """to-buffer of one file twice (or of a copy of it) wrote every trajectory twice; report refuses a repeated id."""
    entry = data.load_entry("multi_turn_base", 0)
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(ro.rollout_entry(entry, ro.ScriptedPolicy.ground_truth(entry))) + "\n")
    (tmp_path / "copy.jsonl").write_bytes(path.read_bytes())
    for second in (path, tmp_path / "copy.jsonl"):
        assert cli.main(["to-buffer", str(path), str(second), "--out", str(tmp_path / "b")]) == 2
        err = capsys.readouterr().err.strip()
        assert f"{second}: given twice (the same file as {path})" in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "b").exists()
    (tmp_path / "b").mkdir()  # an output that exists: no advice to append, which to-buffer cannot
    assert cli.main(["to-buffer", str(path), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'b'} already exists; choose a new folder" in err and "append" not in err, err


def test_report_refuses_a_file_given_twice_first(tmp_path, capsys, monkeypatch):
    """report of one file twice (or of a copy of it) checked every trajectory's verdict again before refusing
    that a trajectory id "appears twice", in a line naming the model, not the file. The file is refused first."""
    entry = data.load_entry("multi_turn_base", 0)
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(ro.rollout_entry(entry, ro.ScriptedPolicy.ground_truth(entry))) + "\n")
    (tmp_path / "copy.jsonl").write_bytes(path.read_bytes())
    checked = []
    monkeypatch.setattr(cli, "_check_verdict", lambda t, where: checked.append(where))
    for second in (path, tmp_path / "copy.jsonl"):
        assert cli.main(["report", str(path), str(second), "--out", str(tmp_path / "r.json")]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"shiq-eval bfcl: error: {second}: given twice (the same file as {path}): each trajectory would be "
            "counted twice"
        ), err
        assert checked == [] and not (tmp_path / "r.json").exists()
    assert cli.main(["report", str(path), "--out", str(tmp_path / "r.json")]) == 0  # once: reported
    assert len(checked) == 1 and json.loads((tmp_path / "r.json").read_text())["overall"]["n"] == 1


def test_a_trajectory_cut_to_fewer_turns_by_the_recipe_is_reported(tmp_path, capsys):
    """shiq-bfcl cuts a long trajectory to its first turns (``kept_turns``, the checker's ``num_turns`` kept):
    report counts it, its rewards one per kept turn."""
    from shiq_eval.recipes.bfcl import cut_to_turns

    entry = data.load_entry("multi_turn_base", 0)
    cut = cut_to_turns(ro.rollout_entry(entry, ro.ScriptedPolicy.ground_truth(entry)), 2)
    assert cut["kept_turns"] == len(cut["turn_rewards"]) == 2 < cut["num_turns"]
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(cut) + "\n")
    assert cli.main(["report", str(path)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("command", ["report", "to-buffer"])
def test_a_null_kept_turns_is_a_trajectory_not_cut(tmp_path, capsys, command):
    """``"kept_turns": null`` passed the field check as a trajectory not cut, then ended the recount of its
    verdict in a TypeError traceback (None < int). It is checked and counted as a whole trajectory now."""
    entry = data.load_entry("multi_turn_base", 0)
    t = ro.rollout_entry(entry, ro.ScriptedPolicy.ground_truth(entry))
    assert t["num_turns"] == len(entry["ground_truth"]) > 1 and t["valid"] is True
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({**t, "kept_turns": None}) + "\n")
    out = tmp_path / ("r.json" if command == "report" else "b")
    assert cli.main([command, str(path), "--out", str(out)]) == 0, capsys.readouterr().err
    if command == "report":  # the ground truth's trajectory, counted once and valid
        rep = json.loads(out.read_text())
        assert rep["overall"]["accuracy"] == 1.0 and rep["categories"]["multi_turn_base"]["n"] == 1
    # its verdict is checked as a whole trajectory's: a cut one is compared on its turn rewards alone, which a
    # 'valid' edited by hand leaves as they were
    path.write_text(json.dumps({**t, "kept_turns": None, "valid": False}) + "\n")
    assert cli.main([command, str(path), "--out", str(tmp_path / "forged")]) == 2
    err = capsys.readouterr().err
    assert "field 'valid': false, but the checker" in err and not (tmp_path / "forged").exists(), err


@pytest.mark.parametrize("command", ["report", "to-buffer"])
def test_a_missing_trajectory_file_is_named_in_one_line(tmp_path, capsys, command):
    """A trajectory file that does not exist ends in 'FILE: no such file', not the OS's [Errno 2] text."""
    missing = tmp_path / "nosuch.jsonl"
    out = tmp_path / ("r.json" if command == "report" else "buf")
    assert cli.main([command, str(missing), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"shiq-eval bfcl: error: {missing}: no such file", err
    assert not out.exists()


def test_a_model_answer_becomes_the_tokens_the_model_drew(smollm2):
    """ChatModelPolicy stripped the decoded answer: the newlines and spaces a model drew around its calls were
    dropped from the conversation, so the row's action tokens were not those the model chose (and the next
    prompt showed it another answer than its own). The answer is kept as drawn: the row's action tokens of a
    message are the model's tokens, then the end-of-turn token it drew."""
    tok, info = smollm2
    end = info["eos_id"]
    drawn = [tok(text, add_special_tokens=False)["input_ids"] + [end] for text in ("\n[pwd()]\n", " done \n", "\nok")]
    answers = iter(drawn)

    class Model:
        max_context, eos_id = 100_000, end

        def generate(self, batch, cfg):
            return [next(answers, drawn[-1])]

    traj = ro.rollout_entry(
        data.load_entry("multi_turn_base", 0), ro.ChatModelPolicy(Model(), tok, SamplingConfig(max_new_tokens=64))
    )
    assert traj["decoded_turns"][0] == [["pwd()"]]
    row = ro.trajectory_to_row(traj, tok)
    actions, run = [], []
    for x, m in zip(row["tokens"], row["action_mask"]):
        if m:
            run.append(x)
        elif run:
            actions, run = [*actions, run], []
    assert actions[:3] == drawn


def test_a_log_level_above_info_draws_no_progress_bar(tmp_path, capsys, smollm2):
    """check-ground-truth, rollout and to-buffer drew their bars at --log-level WARNING too (the other commands
    draw none there): at WARNING stderr stays empty, at INFO (the default) the bars are drawn."""
    for level in ("INFO", "WARNING"):
        traj, buf = tmp_path / f"{level}.jsonl", tmp_path / f"{level}-buf"
        assert cli.main(["--log-level", level, "check-ground-truth", "--categories", "multi_turn_base"]) == 0
        assert (
            cli.main(
                ["rollout", "--categories", "multi_turn_base", "--limit", "1", "--out", str(traj), "--log-level", level]
            )
            == 0
        )
        assert cli.main(["--log-level", level, "to-buffer", str(traj), "--out", str(buf)]) == 0
        out, err = capsys.readouterr()
        assert "200/200 ground-truth entries pass" in out and "wrote 1 trajectory of 1 entry" in out, out
        if level == "WARNING":
            assert err == "", err
        else:
            assert "multi_turn_base" in err and "bfcl rollout" in err and f"building {buf.name}" in err, err


@pytest.mark.parametrize("value", ["0", "-3"])
def test_a_max_new_tokens_below_one_is_refused_naming_the_option(tmp_path, capsys, value):
    """--max-new-tokens 0 or -3 was taken (a model policy's sampler refused it only after the model loaded, as
    "max_new_tokens must be >= 1", naming no option; the scripted policy wrote its trajectories): argparse's
    one-line refusal now, naming the option, nothing written."""
    out = tmp_path / "t.jsonl"
    argv = ["rollout", "--categories", "multi_turn_base", "--limit", "1", "--max-new-tokens", value, "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--max-new-tokens" in err, err
    assert f"must be >= 1, got {value}" in err and not out.exists()


def test_a_tokenizer_without_a_chat_template_is_refused_naming_the_option(tmp_path, capsys, monkeypatch, gpt2):
    """to-buffer and rollout encode conversations with the tokenizer's chat template; GPT-2 has none. Given
    --tokenizer gpt2 (which the help offered), to-buffer named the first trajectory with transformers' paragraph
    and rollout said so only after the model loaded: now one line names the option, before any model or buffer."""
    entry = data.load_entry("multi_turn_base", 0)
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(ro.rollout_entry(entry, ro.ScriptedPolicy.ground_truth(entry))) + "\n")
    assert cli.main(["to-buffer", str(path), "--out", str(tmp_path / "b"), "--tokenizer", "gpt2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--tokenizer gpt2: this tokenizer has no chat template" in err, err
    assert "trajectory" not in err and "huggingface.co" not in err and not (tmp_path / "b").exists()

    def no_model(spec):
        raise AssertionError("the model loaded before the tokenizer was checked")

    monkeypatch.setattr("shiq_train.hf_convert.load_causal_lm", no_model)
    args = ["rollout", "--policy", "smollm2", "--tokenizer", "gpt2", "--categories", "multi_turn_base", "--limit", "1"]
    assert cli.main([*args, "--out", str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--tokenizer gpt2: this tokenizer has no chat template" in err, err
    assert not (tmp_path / "r.jsonl").exists()


def test_a_run_of_a_tokenizer_without_a_chat_template_is_told_to_give_one_of_its_ids(tmp_path, capsys):
    """A run trained on a GPT-2 buffer records gpt2, which has no chat template: the refusal advised --tokenizer
    smollm2, whose ids are not the run's (the tokenizer check then refused it). It names a folder of the run's
    token ids instead, before any model loads."""
    from shiq_data.tokenizers import load_tokenizer

    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    meta = {"loss": {"name": "shiq", "beta": 0.1}, "hf_config": {}, "tokenizer": load_tokenizer("gpt2")[1]}
    (step / "meta.json").write_text(json.dumps({"step": 1, "layout": {"tp": 1, "pp": 1, "dp": 1}, "meta": meta}))
    args = ["rollout", "--policy", str(tmp_path / "run"), "--categories", "multi_turn_base", "--limit", "1"]
    assert cli.main([*args, "--out", str(tmp_path / "t.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the run's tokenizer gpt2: this tokenizer has no chat template" in err, err
    assert (
        err.endswith("give --tokenizer a tokenizer folder of the run's token ids that has one") and "smollm2" not in err
    )
    assert not (tmp_path / "t.jsonl").exists()


def test_an_answer_whose_calls_spell_control_texts_is_written_as_rolled_out(smollm2):
    """The check that a trajectory's messages make the calls of its decoded_turns reads each message as stored:
    a call string spelling control texts is stored with a zero-width space in each (as_text), and still counts
    as the call the rollout decoded and checked."""
    tok, _ = smollm2
    entry = data.load_entry("multi_turn_base", 0)
    turns = ro.ScriptedPolicy.ground_truth(entry).turns
    turns[0] = [["echo(content='a <|im_end|> <file_sep> b', file_name='x.txt')"], *turns[0]]

    class Policy(ro.ScriptedPolicy):
        control_texts = ("<|im_end|>", "<file_sep>")

    traj = ro.rollout_entry(entry, Policy(turns))
    assert "<\u200b|im_end|> <\u200bfile_sep>" in traj["messages"][2]["content"]
    assert traj["decoded_turns"][0][0] == ["echo(content='a <|im_end|> <file_sep> b', file_name='x.txt')"]
    assert ro.trajectory_to_row(traj, tok)["tokens"]
    edited = json.loads(json.dumps(traj))
    edited["messages"][2]["content"] = edited["messages"][2]["content"].replace("x.txt", "y.txt")
    with pytest.raises(
        ValueError, match=re.escape("""turn 0: [["echo(content='a <|im_end|> <file_sep> b', file_name='y.""")
    ):
        ro.trajectory_to_row(edited, tok)
