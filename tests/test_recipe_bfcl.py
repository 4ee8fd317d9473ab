"""The multi-turn BFCL recipe (``shiq-bfcl``): configuration, turn-boundary cuts, per-turn answers with a
shared KV cache against a plain recomputation, and the quick end-to-end run."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_scorer_cli import T95  # (a printed table's two-sided 95% t quantiles)

from shiq_eval.bfcl import checker, data
from shiq_eval.bfcl.edits import CORRUPTIONS, corrupt_shift_call, edit_name
from shiq_eval.bfcl.parse import decode_calls
from shiq_eval.bfcl.rollout import trajectory_to_row
from shiq_eval.bfcl.turns import answer_turns, answer_turns_batch, ground_truth_trajectory, turn_positions
from shiq_eval.recipes import bfcl

pytest.importorskip("bfcl_eval")


@pytest.fixture(autouse=True)
def _bfcl_root(tmp_path, monkeypatch):
    monkeypatch.setenv("BFCL_PROJECT_ROOT", str(tmp_path))


@pytest.fixture(scope="module")
def tokenizer():
    from shiq_data.tokenizers import load_tokenizer

    return load_tokenizer("smollm2")[0]


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_config_quick_and_errors():
    full, quick = bfcl.load_config(), bfcl.load_config(quick=True)
    assert quick["train"]["methods"] == full["train"]["methods"] == ["sft", "shiq", "shiq_tk", "mt_dpo", "mt_copg"]
    assert quick["train"]["warmup_steps"] < quick["train"]["steps"]  # it warmed up over 4 steps of 2
    assert quick["train"]["steps"] < full["train"]["steps"] and quick["model"]["layers"] > 0 == full["model"]["layers"]
    cfg = bfcl.load_config(overrides=["train.methods=[shiq@0.1,mt_dpo]"])
    assert bfcl.arm_beta(cfg, "shiq@0.1") == 0.1 and bfcl.arm_beta(cfg, "mt_dpo") == cfg["methods"]["mt_dpo"]["beta"]
    for override, needle in [
        ("train.methods=[shiq,ppo]", "unknown method 'ppo'"),
        ("data.reward=final", "data.reward"),
        ("data.edits_per_scenario=0", "compare trajectories of a scenario"),
        ("train.stepz=3", "unknown config key"),
        ("eval.scenarios=41", "eval.scenarios must be an integer in 0..40 (0: all 40 held-out scenarios), got 41"),
        ("eval.temperature=-0.5", "eval.temperature must be a number >= 0 (0: greedy), got -0.5"),
        ("data.edits_per_scenario=99", "data.edits_per_scenario must be an integer in 0.."),
        ("model.layers=31", "model.layers must be an integer in 0..30 (0: all), got 31"),
        ("train.clip_grad=-1.0", "train.clip_grad must be a number >= 0"),
        ("train.warmup_steps=21", "train.warmup_steps (21) must not exceed train.steps (20)"),
    ]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            bfcl.load_config(overrides=[override])


def test_quick_with_a_config_file_without_a_quick_block_is_refused(tmp_path, capsys):
    """--quick with a --config that has no quick block silently ran the file's full sizes (all 30 layers, 20
    steps: hours on CPU where the quick run takes minutes); now one line names the file, before any folder."""
    import yaml

    from shiq_eval.recipes import demo

    for recipe, main in ((bfcl, bfcl.main), (demo, demo.main)):
        cfg = yaml.safe_load(Path(recipe.CONFIG).read_text())
        del cfg["quick"]
        path = tmp_path / f"{recipe.__name__.rsplit('.', 1)[1]}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        with pytest.raises(ValueError, match=re.escape(f"--quick: {path} has no quick block")):
            recipe.load_config(path, quick=True)
        assert recipe.load_config(path)["train"]["steps"] == cfg["train"]["steps"]  # without --quick: the file
        out = tmp_path / "run"
        assert main(["--quick", "--config", str(path), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{path} has no quick block" in err and not out.exists(), err


def test_a_config_file_that_calls_a_resolver_is_refused(tmp_path, capsys):
    """A --config value that calls a resolver (``${oc.env:HOME}``), resolved, would copy the environment (a
    secret) into the run's config.json and report: refused in one line naming the file and key, before the run
    folder is made (shiq-demo's file is refused alike: test_demo)."""
    import yaml

    cfg = yaml.safe_load(Path(bfcl.CONFIG).read_text())
    cfg["data"]["category"] = "${oc.env:HOME}"
    path = tmp_path / "env.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert bfcl.main(["--quick", "--config", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not out.exists(), err
    assert f"{path}: data.category is '${{oc.env:HOME}}': a file's values are data, never a resolver call" in err


def test_trainable_layers_are_bounded_by_the_layers_kept():
    """``model.layers`` keeps the first N layers: at most those N train, and with the frozen-prefix cache (the
    default) at most N - 1 (the cache refused it only when a stage built it)."""
    assert bfcl.load_config(quick=True, overrides=["train.trainable_last_layers=1"])["model"]["layers"] == 2
    for override, needle in [
        ("train.trainable_last_layers=2", "trains every layer of 2, so train.cache_frozen_prefix=true"),
        ("train.trainable_last_layers=3", "must be an integer in 1..2 or -1 (of the model's 2; -1: every parameter)"),
    ]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            bfcl.load_config(quick=True, overrides=[override])
    free = ["train.cache_frozen_prefix=false"]
    for k in (2, -1):  # without the cache: all of them, or every parameter
        assert bfcl.load_config(quick=True, overrides=[f"train.trainable_last_layers={k}", *free])
    with pytest.raises(ValueError, match=re.escape("in 1..30 or -1 (of the model's 30")):
        bfcl.load_config(overrides=["train.trainable_last_layers=31"])


def test_the_buffer_holds_the_scenarios_the_training_reads():
    """``data.buffer: visited``: steps x groups_per_step distinct scenarios of the split, in its order, a
    draw that changes with the seed; every scenario when that many cover the split or with ``all``."""
    entries = [{"id": f"multi_turn_base_{i}"} for i in range(160)]
    cfg = bfcl.load_config()
    n = cfg["train"]["steps"] * cfg["train"]["groups_per_step"]
    got = bfcl.trained_scenarios(cfg, entries)
    index = [int(e["id"].rsplit("_", 1)[1]) for e in got]
    assert len(got) == n == 40 and index == sorted(set(index)) and all(0 <= i < 160 for i in index)
    other = bfcl.trained_scenarios({**cfg, "seed": 1}, entries)
    assert [e["id"] for e in other] != [e["id"] for e in got]
    assert bfcl.trained_scenarios(cfg, entries[:n]) == entries[:n]
    every = bfcl.load_config(overrides=["data.buffer=all"])
    assert bfcl.trained_scenarios(every, entries) == entries
    with pytest.raises(ValueError, match="data.buffer"):
        bfcl.load_config(overrides=["data.buffer=some"])


def test_edited_trajectories_and_turn_cuts_keep_what_the_model_saw(tokenizer):
    entry = data.load_entry("multi_turn_base", 1)
    group = bfcl.scenario_trajectories(entry, 3, seed=0, compact=True)
    assert [t["edit"] for t in group][0] == "ground_truth" and len({t["edit"] for t in group}) == 4
    assert group[0]["turn_rewards"] == [1.0] * len(entry["ground_truth"])
    for t in group[1:]:  # the checker, run again from the decoded turns, gives the recorded rewards
        again = checker.check_trajectory(entry, t["decoded_turns"])
        assert again["turn_rewards"] == t["turn_rewards"] and again["turn_rewards_reset"] == t["turn_rewards_reset"]
    full = trajectory_to_row(group[1], tokenizer)
    for n in range(1, len(entry["ground_truth"]) + 1):
        cut = trajectory_to_row(bfcl.cut_to_turns(group[1], n), tokenizer)
        T = len(cut["tokens"])
        # a prefix of the whole row (up to the newline the template writes after a turn's end token)
        assert cut["tokens"][: T - 1] == full["tokens"][: T - 1] and cut["action_mask"] == full["action_mask"][:T]
        assert cut["rewards"] == full["rewards"][:T]
        assert sum(cut["rewards"]) == sum(group[1]["turn_rewards"][:n])
    # the answers a token limit cut keep their marks, among the messages kept (a model's rollout cut by turns)
    marked = {**group[1], "truncated": [0, len(group[1]["assistant_turns"]) - 1]}
    one = bfcl.cut_to_turns(marked, 1)
    assert one["truncated"] == [0] and len(one["assistant_turns"]) < len(marked["assistant_turns"])
    trajs, rows = bfcl.fit_group(group, tokenizer, max_tokens=len(full["tokens"]) - 1, reward="cumulative")
    assert trajs and all(len(r["tokens"]) < len(full["tokens"]) for r in rows)
    assert len({t["kept_turns"] for t in trajs}) == 1  # the same turns for every trajectory of the scenario
    assert bfcl.fit_group(group, tokenizer, max_tokens=10, reward="cumulative") == ([], [])


def _tiny_llama(seed, initializer_range=0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16384,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
    )
    return LlamaForCausalLM(cfg).eval()


def _plain_answers(model, ref, tokenizer, traj, max_new_tokens):
    """Per turn: the greedy answer, its exact KL (shiq_eval.evaluate.sequence_kls on full rows) and the
    ground truth's NLL (one full forward), each recomputed from scratch without any cache."""
    from shiq_eval.evaluate import sequence_kls

    ids, spans = turn_positions(tokenizer, traj)
    out = {"tokens": [], "kl": [], "gt_nll": [], "gt_tokens": []}
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        for s, e in spans:
            prompt, gen = ids[:s], []
            for _ in range(max_new_tokens):
                last = model.model(input_ids=torch.tensor([prompt + gen])).last_hidden_state[0, -1]
                gen.append(int(model.lm_head(last).argmax()))
                if gen[-1] == tokenizer.eos_token_id:
                    break
            out["tokens"].append(gen)
            out["kl"].append(float(sequence_kls(model, ref, [prompt], [gen])[1][0]))
            logp = torch.log_softmax(model.lm_head(hidden[s - 1 : e - 1]).double(), -1)
            out["gt_nll"].append(-float(logp[torch.arange(e - s), ids[s:e]].sum()))
            out["gt_tokens"].append(e - s)
    return out


def _assert_same_answers(res, plain):
    assert res["tokens"] == plain["tokens"] and res["gt_tokens"] == plain["gt_tokens"]
    assert res["kl"] == pytest.approx(plain["kl"], rel=1e-5, abs=1e-9)
    assert res["gt_nll"] == pytest.approx(plain["gt_nll"], rel=1e-6)


def test_a_shift_with_nothing_to_shift_is_labelled_as_the_drop_it_does():
    """Scenario 46 has calls in its first turn only: the shift edit drops a call, and its trajectory says so
    (``edit``, which ``data.json``'s ``by_edit`` counts), while the row ids stay unique within the group."""
    entry = data.load_entry("multi_turn_base", 46)
    group = bfcl.scenario_trajectories(entry, len(CORRUPTIONS), seed=0, compact=True)
    by_family = {t.get("family"): t for t in group[1:]}
    assert by_family["shift_call"]["edit"] == "drop_call" and by_family["drop_call"]["edit"] == "drop_call"
    assert sorted(by_family) == sorted(f.__name__.removeprefix("corrupt_") for f in CORRUPTIONS)
    assert {t["edit"] for t in group[1:]} == set(by_family) - {"shift_call"}
    assert edit_name(corrupt_shift_call, data.load_entry("multi_turn_base", 1)) == "shift_call"


def test_answers_with_a_shared_cache_equal_a_plain_recomputation(tokenizer):
    """Greedy answers, KL and ground-truth NLL of a tiny random Llama against a recomputation without
    any cache (:func:`_plain_answers`)."""
    model, ref = _tiny_llama(0), _tiny_llama(1)
    entry = data.load_entry("multi_turn_base", 3)
    traj = ground_truth_trajectory(entry, compact=True)
    res = answer_turns(model, tokenizer, entry, traj, ref_model=ref, max_new_tokens=3)
    assert len(res["answers"]) == len(entry["ground_truth"])
    _assert_same_answers(res, _plain_answers(model, ref, tokenizer, traj, 3))
    # without a reference the KL is 0; the checker scores the parsed answers
    alone = answer_turns(model, tokenizer, entry, traj, max_new_tokens=3)
    assert alone["kl"] == [0.0] * len(res["answers"]) and alone["tokens"] == res["tokens"]
    decoded = [[c] if (c := decode_calls(a)) else [] for a in res["answers"]]
    assert checker.check_trajectory(entry, decoded)["turn_rewards_reset"] == res["turn_rewards_reset"]


def test_batched_answers_equal_each_scenario_alone(tokenizer):
    """Scenarios answered in lockstep (different prompt lengths and numbers of turns: every chunk padded,
    rows finishing early) give each scenario's plain answers; an EOS-heavy model ends rows at different
    steps."""
    # weights of std 1: answers that depend on the context (at std 0.02 every answer is one repeated token);
    # the output row of the end-of-turn token copies a token the model writes now and then, so that rows
    # end at different steps
    model, ref = _tiny_llama(0, initializer_range=1.0), _tiny_llama(1, initializer_range=1.0)
    with torch.no_grad():
        head = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untied from the input embedding
        head[tokenizer.eos_token_id] = head[39542] * 1.001
        model.lm_head.weight = head
    entries = [data.load_entry("multi_turn_base", i) for i in (3, 6, 1)]
    trajs = [ground_truth_trajectory(e, compact=True) for e in entries]
    results = answer_turns_batch(model, tokenizer, entries, trajs, ref_model=ref, max_new_tokens=4, seeds=[0, 1, 2])
    assert [len(r["answers"]) for r in results] == [2, 5, 4]
    lengths = set()
    for entry, traj, res in zip(entries, trajs, results):
        plain = _plain_answers(model, ref, tokenizer, traj, 4)
        _assert_same_answers(res, plain)
        lengths |= {len(t) for t in plain["tokens"]}
        assert res["turn_rewards_reset"] == checker.check_trajectory(entry, res["decoded_turns"])["turn_rewards_reset"]
    assert len(lengths) > 1, "every answer had the same length: the test does not exercise rows that end early"


def test_a_fine_tune_of_the_last_layer_reads_the_reference_from_the_shared_layer(tokenizer, monkeypatch):
    """A policy that differs from the reference in its last layer and output row only: the reference runs
    its last layer alone, on the hidden states the policy computed (cache_from is used), and every scenario's
    answers, KL and NLL are still those of the plain recomputation with both models whole."""
    import copy

    from shiq_eval.bfcl import turns
    from shiq_eval.shared_layers import shared_prefix_layers

    ref = _tiny_llama(1, initializer_range=1.0)
    model = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.model.layers[1].parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
        head = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untied: the end token made likelier
        head[tokenizer.eos_token_id] = head[39542] * 1.001
        model.lm_head.weight = head
    assert shared_prefix_layers(model, ref) == 1
    starts = []
    real = turns.cache_from
    monkeypatch.setattr(turns, "cache_from", lambda first: starts.append(first) or real(first))
    entries = [data.load_entry("multi_turn_base", i) for i in (3, 6, 1)]
    trajs = [ground_truth_trajectory(e, compact=True) for e in entries]
    results = answer_turns_batch(model, tokenizer, entries, trajs, ref_model=ref, max_new_tokens=4, seeds=[0, 1, 2])
    assert starts == [1] * len(entries)  # one reader of the reference per scenario, each from layer 1
    kls = []
    for traj, res in zip(trajs, results):
        _assert_same_answers(res, _plain_answers(model, ref, tokenizer, traj, 4))
        kls += res["kl"]
    assert min(kls) > 1e-4  # the models differ where the KL is taken: equal zeros would prove nothing


def test_ground_truth_answers_score_every_turn(tokenizer):
    """The scoring path on known answers: the ground truth's own first messages get reset reward 1."""
    entry = data.load_entry("multi_turn_base", 3)
    traj = ground_truth_trajectory(entry)
    _, spans = turn_positions(tokenizer, traj)
    firsts = []
    for k in range(len(spans)):
        i = traj["assistant_turns"].index(k)
        firsts.append([m for m in traj["messages"] if m["role"] == "assistant"][i]["content"])
    decoded = [[c] if (c := decode_calls(a)) else [] for a in firsts]
    assert checker.check_trajectory(entry, decoded)["turn_rewards_reset"] == [1.0] * len(spans)


def test_summary_clusters_turns_by_scenario():
    """The report's means and standard errors against pandas on the turns: the mean over turns, and
    (every scenario with 3 turns here) the standard error of the scenario means, for each metric and
    for the paired difference to the reference; the scenario accuracy from the scenarios' verdicts."""
    pd = pytest.importorskip("pandas")
    import numpy as np

    rng = np.random.default_rng(0)

    def turns(shift):
        return [
            {"id": f"multi_turn_base_{i}", "turn": k, "reset": float(rng.random() < 0.3 + shift)}
            | {"cumulative": float(rng.random() < 0.2), "kl": float(rng.exponential()), "gt_nll": float(rng.random())}
            | {"gt_tokens": int(rng.integers(5, 40)), "answer_tokens": 9, "valid": i % 3 == 0}
            for i in range(8)
            for k in range(3)
        ]

    pol, ref = turns(0.3), turns(0.0)
    out = bfcl.summarize(pol, ref)
    df, rf = pd.DataFrame(pol), pd.DataFrame(ref)
    df["d"] = df["reset"] - rf["reset"]
    for col, key in (("reset", "turn_accuracy"), ("kl", "kl"), ("d", "turn_accuracy_minus_reference")):
        means = df.groupby("id")[col].mean()
        assert out[key] == pytest.approx(df[col].mean())
        assert out[f"{key}_stderr"] == pytest.approx(means.std(ddof=1) / math.sqrt(len(means)))
    assert out["scenario_accuracy"] == pytest.approx(df.groupby("id")["valid"].first().mean())
    assert (out["n_turns"], out["n_scenarios"]) == (24, 8)


def test_tied_groups_against_pandas():
    """Scenarios whose trajectories share one return (multi-turn DPO gets no pair from them), counted
    with pandas on the same trajectories, under both reward definitions."""
    pd = pytest.importorskip("pandas")
    trajs = [
        {"id": "a", "turn_rewards": [1, 1], "turn_rewards_reset": [1, 1]},
        {"id": "a", "turn_rewards": [1, 0], "turn_rewards_reset": [1, 1]},  # tied only under reset
        {"id": "b", "turn_rewards": [0, 1, 1], "turn_rewards_reset": [1, 0, 1]},
        {"id": "b", "turn_rewards": [1, 1, 0], "turn_rewards_reset": [1, 1, 0]},  # tied under both
        {"id": "c", "turn_rewards": [1], "turn_rewards_reset": [1]},
        {"id": "c", "turn_rewards": [0], "turn_rewards_reset": [0]},
    ]
    df = pd.DataFrame(trajs)
    for reward, col in (("cumulative", "turn_rewards"), ("reset", "turn_rewards_reset")):
        expected = int((df.assign(r=df[col].map(sum)).groupby("id")["r"].nunique() == 1).sum())
        assert bfcl.tied_groups(trajs, reward) == expected
    assert (bfcl.tied_groups(trajs, "cumulative"), bfcl.tied_groups(trajs, "reset")) == (1, 2)


def test_quick_run_report_and_resume(tmp_path):
    """The README's --quick command, the recipe's quick variant in CI: report.json's structure, finite
    numbers, the reference's turn accuracy equal to the checker's verdict on its saved answers, the
    supervised model closer to the ground truth than the reference, no checkpoint left behind with
    ``train.keep_checkpoints=false``; a second call only rewrites the report (about 3.5 CPU minutes:
    loading SmolLM2, six evaluations)."""
    out = tmp_path / "bfcl"
    cmd = [sys.executable, "-m", "shiq_eval.recipes.bfcl", "--quick", "--out", str(out), "train.keep_checkpoints=false"]
    first = subprocess.run(cmd, check=True, timeout=600, capture_output=True, text=True)
    rep = json.loads((out / "report.json").read_text())
    assert (out / "report.md").is_file() and (out / "buffer" / "manifest.json").is_file()
    # the held-out scenarios' user turns against the trained scenarios', by word tuples (report.json's contamination)
    cfg = bfcl.load_config(quick=True)

    def turns(e):
        return [m["content"] for turn in e["question"] for m in turn if isinstance(m.get("content"), str)]

    def ws(text):
        return tuple(re.findall(r"\w+", text.casefold()))

    trained = {json.loads(x)["id"] for x in (out / "trajectories.jsonl").read_text().splitlines()}
    seen = [ws(t) for e in data.load_category(cfg["data"]["category"]) if e["id"] in trained for t in turns(e)]
    held = bfcl.scenario_entries(cfg, "test")

    def in_training(e):
        for t in turns(e):
            w = ws(t)
            n = min(len(w), 13)
            if len(w) >= 8 and any(
                w[k : k + n] == s[j : j + n] for s in seen for j in range(len(s) - n + 1) for k in range(len(w) - n + 1)
            ):
                return True
        return False

    c = rep["contamination"]
    assert (c["held_out_scenarios"], c["trained_scenarios"]) == (len(held), len(trained))
    assert c["held_out_scenarios_in_training_questions"] == sum(map(in_training, held))
    assert all((out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in bfcl.FIGURES)
    cfg = bfcl.load_config(quick=True)
    assert set(rep["methods"]) == {"sft", "shiq", "shiq_tk", "mt_dpo", "mt_copg"}
    keys = ["turn_accuracy", "mean_turn_reward", "kl", "gt_nll_per_token"]
    for name, r in [("reference", rep["reference"]), *rep["methods"].items()]:
        for k in keys:
            assert _finite(r[k]) and _finite(r[f"{k}_stderr"]), (name, k)
        assert r["n_scenarios"] == cfg["eval"]["scenarios"] and r["n_turns"] >= r["n_scenarios"]
        if name != "reference":
            assert all(_finite(r[f"{k}_minus_reference_stderr"]) for k in keys) and r["kl"] >= 0
    assert rep["reference"]["kl"] == 0.0
    # the reference's turn accuracy is the checker's reset reward on its answers, recomputed here
    turns = json.loads((out / "reference_eval.json").read_text())["turns"]
    by_id = {}
    for t in turns:
        calls = decode_calls(t["answer"])
        by_id.setdefault(t["id"], []).append([calls] if calls else [])
    rewards = [
        r
        for i, dec in by_id.items()
        for r in checker.check_trajectory(data.load_entry(cfg["data"]["category"], i), dec)["turn_rewards_reset"]
    ]
    assert rep["reference"]["turn_accuracy"] == pytest.approx(sum(rewards) / len(rewards))
    # the turns no answer in the ground truth's form fits (their answers are cut at eval.max_new_tokens), said
    limit = cfg["eval"]["max_new_tokens"]
    over = sum(t["gt_tokens"] > limit for t in turns)
    assert rep["reference"]["turns_longer_than_limit"] == over > 0  # 6 tokens: a quick run's answers are cut
    assert f"{over} of the {len(turns)} ground-truth answers are longer" in (out / "report.md").read_text()
    # with few scenarios a difference is judged by Student's t for G − 1 degrees of freedom, not 1.96 (a printed
    # table's two-sided 95% quantiles)
    g = rep["reference"]["n_scenarios"]
    assert g == 2  # (the quick run's)
    want = f"past Student's t quantile with 1 degree of freedom, {T95[1]:.2f} standard"
    assert want in (out / "report.md").read_text()
    # supervised training on the ground truths lowers their NLL on the held-out turns
    assert rep["methods"]["sft"]["gt_nll_per_token"] < rep["reference"]["gt_nll_per_token"]
    # the buffer holds the scenarios the training reads (2 steps x 1 of the 3 shortest), drawn by the seed
    info = json.loads((out / "data.json").read_text())
    shortest = [e["id"] for e in bfcl.scenario_entries(cfg, "train")]
    assert info["scenarios_of_split"] == 3 and len(info["scenario_ids"]) == info["scenarios"] == 2
    assert set(info["scenario_ids"]) < set(shortest)
    # every arm was evaluated, then its final checkpoint (the trainer always saves the last step) deleted
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == sorted(rep["methods"]) and all((out / "runs" / m / "eval.json").is_file() for m in runs)
    assert not [p for p in (out / "runs").rglob("*") if "checkpoint" in p.name], list((out / "runs").rglob("*"))
    # the frozen layer ran once per buffer (the supervised one, then the four reward methods' shared one)
    assert first.stderr.count("cached for") == 2, first.stderr[-2000:]
    # resuming: nothing but the report runs again
    res = subprocess.run(cmd, check=True, timeout=120, capture_output=True, text=True)
    assert res.stderr.count("done earlier, skipped") == 1 + 1 + 5  # data, the reference, five methods
    stages = json.loads((out / "stages.json").read_text())["done"]
    assert list(stages)[:2] == ["data", "eval_reference"]  # the baseline first: a run stopped part-way has it
    # its files edited by hand are named with the record, turn and field (the report ended in a KeyError,
    # a ZeroDivisionError or a TypeError)
    path, keys = out / "runs" / "shiq" / "eval.json", ("turns", "beta", "steps", "train_seconds", "eval_seconds")
    ev = json.loads(path.read_text())
    assert bfcl.read_eval(path, keys) == ev and bfcl.read_trajectories(out / "trajectories.jsonl", "turn_rewards")
    bad = tmp_path / "bad.json"
    for edit, said in (
        (lambda e: e["turns"][1].pop("kl"), "turns[1]: field 'kl' is missing"),
        (lambda e: e["turns"][0].update(gt_tokens=0), "turns[0]: field 'gt_tokens' must be an integer >= 1, got 0"),
        (lambda e: e["turns"][0].update(kl="x"), "turns[0]: field 'kl' must be a finite number, got 'x'"),
        (lambda e: e.update(turns=[]), "field 'turns' must be a non-empty list"),
        (lambda e: e.pop("train_seconds"), "'train_seconds'"),
    ):
        e = json.loads(path.read_text())
        edit(e)
        bad.write_text(json.dumps(e))
        with pytest.raises(ValueError, match=re.escape(f"{bad}: ") + ".*" + re.escape(said)):
            bfcl.read_eval(bad, keys)
    bad.write_text('{"id": 1}\n')
    with pytest.raises(ValueError, match=r"bad.json: record 1: expected a trajectory with a text 'id' and a list"):
        bfcl.read_trajectories(bad, "turn_rewards")


def test_stages_accept_new_arms_and_refuse_other_changes(tmp_path):
    """A finished run takes more arms (and another evaluation batch size) without rerunning what is done,
    and the saved configuration follows; any other change is refused."""
    from shiq_eval.recipes.common import Stages

    cfg = bfcl.load_config(quick=True)
    stages = Stages(tmp_path, cfg, prog="shiq-bfcl", free=bfcl.FREE_KEYS)
    stages.finish("train_shiq", 1.0)
    more = bfcl.load_config(
        quick=True, overrides=["train.methods=[shiq,shiq@0.1]", "eval.batch_size=3", "train.keep_checkpoints=false"]
    )
    again = Stages(tmp_path, more, prog="shiq-bfcl", free=bfcl.FREE_KEYS)
    assert again.done("train_shiq") and not again.done("train_shiq@0.1")
    assert json.loads((tmp_path / "config.json").read_text()) == more
    changed = bfcl.load_config(quick=True, overrides=["train.methods=[shiq,shiq@0.1]", "train.steps=3"])
    with pytest.raises(
        ValueError,
        match=r"holds a run with a different configuration \(train.steps: 2 saved, 3 now\); use another --out",
    ):
        Stages(tmp_path, changed, prog="shiq-bfcl", free=bfcl.FREE_KEYS)


def test_a_run_stopped_while_its_buffers_build_takes_a_corrected_configuration(tmp_path, monkeypatch):
    """The README: "a run none of whose stages finished takes a new configuration". A stop while the data stage
    built its buffers left trajectories.jsonl (written before them) and the staging folder, so the corrected
    command was refused as a changed one; the trajectories are now written once the buffers are built."""

    def stop(rows, folder, **kwargs):  # a stop part-way through the first buffer
        Path(folder).mkdir(parents=True)
        (Path(folder) / "shard-00000.arrow").write_bytes(b"part of a shard")
        raise KeyboardInterrupt

    monkeypatch.setattr(bfcl, "write_buffer", stop)
    out = tmp_path / "run"
    for steps in (3, 2):  # the first command's train.steps was a mistake
        with pytest.raises(KeyboardInterrupt):
            bfcl.run(bfcl.load_config(quick=True, overrides=[f"train.steps={steps}"]), out, progress=False)
        assert json.loads((out / "config.json").read_text())["train"]["steps"] == steps
    assert not (out / "trajectories.jsonl").exists()


def test_a_finished_arms_checkpoint_goes_only_once_the_stage_is_recorded(tmp_path):
    """train.keep_checkpoints=false: Stages.run deletes an arm's checkpoint after recording its stage finished,
    also for a stage finished earlier (a run that kept them, resumed with false) and what a deletion cut
    short left behind; other stages' folders and kept checkpoints stay."""
    from shiq_eval.recipes.common import Stages, drop_checkpoints

    def checkpoint(arm):
        step = tmp_path / "runs" / arm / "checkpoints" / "step_00000002"
        step.mkdir(parents=True)
        (step / "rank_tp0_pp0_dp0.pt").write_bytes(b"x" * 10)
        (step.parent / "latest").write_text(step.name)

    def run(cfg, seen):
        plan = [(f"train_{arm}", lambda arm=arm: (checkpoint(arm), seen.append(arm))) for arm in ("a", "b")]
        plan.append(("data", lambda: checkpoint("data")))  # not an arm's stage: never touched
        stages = Stages(tmp_path, cfg, prog="shiq-bfcl", free=bfcl.FREE_KEYS)
        stages.run(
            plan,
            log.append,
            lambda t: {},
            lambda rep: "",
            after=lambda n: drop_checkpoints(cfg, tmp_path, n, log.append),
        )

    log, seen = [], []
    keep = bfcl.load_config(quick=True)
    run(keep, seen)  # kept: both arms' checkpoints stay
    assert seen == ["a", "b"] and all((tmp_path / "runs" / a / "checkpoints" / "latest").is_file() for a in "ab")
    # a deletion of b cut short: its folder renamed, half gone
    (tmp_path / "runs" / "b" / "checkpoints").rename(tmp_path / "runs" / "b" / "checkpoints.deleting")
    (tmp_path / "runs" / "b" / "checkpoints.deleting" / "latest").unlink()
    drop = bfcl.load_config(quick=True, overrides=["train.keep_checkpoints=false"])
    run(drop, seen)  # both stages finished earlier: nothing trains again, the checkpoints go
    assert seen == ["a", "b"]
    assert sorted(p.name for p in (tmp_path / "runs" / "a").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "runs" / "b").iterdir()) == []
    assert (tmp_path / "runs" / "data" / "checkpoints" / "latest").is_file()
    assert not [m for m in log if "could not delete" in m]


def test_an_arm_stopped_by_sigterm_counts_every_process_s_training_seconds_once(tmp_path, monkeypatch):
    """An arm that SIGTERM stopped while training (SavedOnSigterm: the step under way saved) resumes on the same
    command, but eval.json's train_seconds counted only the process that finished. The seconds of a stopped
    process (or of one whose training ended before its evaluation was stopped) are kept in train_stopped.json
    for the next to add, and not counted once the checkpoints they saved are gone."""
    import contextlib
    import types

    import transformers

    from shiq_train.trainer import SavedOnSigterm

    clock = iter(range(0, 1000, 10))  # each reading 10 s after the one before
    monkeypatch.setattr(bfcl, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    run = tmp_path / "runs" / "shiq"
    fits, evals = [], []

    def save(step):
        ckpt = run / "checkpoints"
        (ckpt / f"step_{step:08d}").mkdir(parents=True, exist_ok=True)
        (ckpt / "latest").write_text(f"step_{step:08d}")

    def fit(sampler):
        fits.append(len(fits))
        run.mkdir(parents=True, exist_ok=True)
        if len(fits) == 1:  # stopped in step 2 of 4: saved for the rerun
            save(2)
            raise SavedOnSigterm(2)
        if len(fits) == 2:  # stopped in its last step: the run complete
            save(4)
            raise SavedOnSigterm(4, complete=True)
        # later: nothing left to train

    def evaluate(ctx, policy, ref):
        evals.append(len(evals))
        if len(evals) == 1:  # the evaluation of the trained policy stopped (Ctrl-C)
            raise KeyboardInterrupt
        return {"turns": [], "eval_seconds": 1.0}

    tiny = transformers.LlamaConfig(
        vocab_size=8, hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1
    )
    model = types.SimpleNamespace(config=tiny)  # the policy evaluated: a tiny Llama, its parameters as built
    monkeypatch.setattr(bfcl, "parallel", types.SimpleNamespace(distributed=lambda seed: contextlib.nullcontext()))
    monkeypatch.setattr(bfcl, "megatron_policy", lambda ref, **kw: model)
    buffer = types.SimpleNamespace(path=tmp_path / "buffer", manifest={"tokenizer": {}})
    monkeypatch.setattr(bfcl, "open_buffer", lambda path: buffer)
    monkeypatch.setattr(bfcl, "recipe_trainer", lambda *a, **kw: types.SimpleNamespace(fit=fit))
    monkeypatch.setattr(bfcl, "BufferSampler", lambda *a, **kw: None)
    monkeypatch.setattr(bfcl, "gather_full_parameters", lambda m: {})
    monkeypatch.setattr(bfcl, "_hf_shape", lambda ctx: types.SimpleNamespace(tied=True))  # (strict=False)
    monkeypatch.setattr(bfcl, "megatron_to_llama", lambda full, shape: {})
    monkeypatch.setattr(bfcl, "evaluate", evaluate)
    cfg = {"seed": 0, "train": {"steps": 4, "groups_per_step": 1, "trainable_last_layers": 1}}
    cfg |= {"data": {"edits_per_scenario": 1}, "methods": {"shiq": {"beta": 0.1}}}
    ctx = types.SimpleNamespace(
        cfg=cfg,
        out=tmp_path,
        reference=(model, None),
        prefix_caches=types.SimpleNamespace(get=lambda *a: None),
        progress=False,
    )
    for stop in (SavedOnSigterm, SavedOnSigterm, KeyboardInterrupt):
        with pytest.raises(stop):
            bfcl.stage_train(ctx, "shiq")
    bfcl.stage_train(ctx, "shiq")
    assert (len(fits), len(evals)) == (4, 2)
    assert json.loads((run / "eval.json").read_text())["train_seconds"] == 40  # 10 s in each of the 4 processes
    assert not (run / "train_stopped.json").exists()
    # the seconds of a stopped process whose checkpoints are gone: not counted (its training is done again)
    (run / "eval.json").unlink()
    (run / "train_stopped.json").write_text(json.dumps({"train_seconds": 500.0}))
    (run / "checkpoints" / "latest").unlink()
    bfcl.stage_train(ctx, "shiq")
    assert json.loads((run / "eval.json").read_text())["train_seconds"] == 10


def _hand_made_seed(out, rng, arms: dict[str, float], n_scenarios=5):
    """A seed's run folder as the recipe leaves it: report.json (reference and arm summaries) and the
    reference's and each arm's per-turn evaluation, with random values; 1 to 3 turns per scenario."""

    turns_of = [(f"s{i}", k) for i in range(n_scenarios) for k in range(1 + i % 3)]

    def turns():
        return [
            {
                "id": i,
                "turn": k,
                "reset": float(rng.integers(0, 2)),
                "cumulative": float(rng.integers(0, 2)),
                "kl": float(rng.gamma(2.0)),
                "gt_nll": float(rng.gamma(3.0)),
                "gt_tokens": int(rng.integers(5, 40)),
                "answer_tokens": 3,
                "answer": "",
                "truth": [],
                "valid": False,
            }
            for i, k in turns_of
        ]

    def summary(beta=None):
        v = rng.normal(size=16)
        keys = [*bfcl.METRICS, *(f"{m}_minus_reference" for m in bfcl.METRICS)]
        return (
            {"beta": beta}
            | {k: float(v[j]) for j, k in enumerate(keys)}
            | {f"{k}_stderr": float(abs(v[j + 8])) for j, k in enumerate(keys)}
        )

    rep = {"reference": summary(), "methods": {}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "reference_eval.json").write_text(json.dumps({"turns": turns()}))
    for arm, beta in arms.items():
        (out / "runs" / arm).mkdir(parents=True)
        (out / "runs" / arm / "eval.json").write_text(json.dumps({"turns": turns()}))
        rep["methods"][arm] = summary(beta)
    (out / "report.json").write_text(json.dumps(rep))
    return rep


def test_seeds_report_against_numpy(tmp_path):
    """seeds_report on hand-made runs of three seeds (one without the mt_dpo arm): per arm the seed mean,
    seed s.d. and mean within-seed s.e. of every metric; per pair at the same β, the per-seed paired
    difference over the seeds (computed here with pandas): mean, s.e. clustered by scenario of the turns'
    seed means, s.d. of the seeds' means."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(3)
    arms = {"shiq@0.1": 0.1, "mt_copg@0.1": 0.1, "shiq": 0.5, "mt_dpo": 0.5, "sft": 1.0, "mt_copg": 0.5}
    arms["shiq_tk@0.3"] = 0.3  # seed 0 only: no spread to show
    reps = {}
    for name in ("seed0", "seed1", "seed2"):
        these = {a: b for a, b in arms.items() if not (name == "seed2" and a == "mt_dpo")}
        these = {a: b for a, b in these.items() if name == "seed0" or a != "shiq_tk@0.3"}
        reps[name] = _hand_made_seed(tmp_path / name, rng, these)
    out = bfcl.seeds_report(tmp_path, list(reps))
    rows = {r["arm"]: r for r in out["arms"]}
    assert list(rows)[0] == "reference" and set(rows) == {"reference", *arms}
    for arm, row in rows.items():
        per = [r["reference"] if arm == "reference" else r["methods"].get(arm) for r in reps.values()]
        per = [p for p in per if p is not None]
        assert row["seeds"] == len(per) == {"mt_dpo": 2, "shiq_tk@0.3": 1}.get(arm, 3)
        for k in ("turn_accuracy", "gt_nll_per_token_minus_reference"):
            assert row[k] == pytest.approx(np.mean([p[k] for p in per]))
            if len(per) > 1:
                assert row[f"{k}_sd"] == pytest.approx(np.std([p[k] for p in per], ddof=1))
            assert row[f"{k}_se"] == pytest.approx(np.mean([p[f"{k}_stderr"] for p in per]))
    pairs = [(c["a"], c["b"], c["seeds"]) for c in out["comparisons"]]
    assert pairs == [("shiq", "mt_copg", 3), ("shiq@0.1", "mt_copg@0.1", 3), ("shiq", "mt_dpo", 2)]
    for c in out["comparisons"]:
        per_seed = []
        for name in reps:
            if c["b"] not in reps[name]["methods"]:
                continue
            a, b = (
                pd.DataFrame(json.loads((tmp_path / name / "runs" / x / "eval.json").read_text())["turns"])
                for x in (c["a"], c["b"])
            )
            per_seed.append(a["gt_nll"] / a["gt_tokens"] - b["gt_nll"] / b["gt_tokens"])
        # the seeds score the same turns: each turn's difference averaged over the seeds, then the standard
        # error clustered by scenario (SHIQ_MATH §9), not the seeds' errors combined as if independent
        d = pd.concat(per_seed, axis=1).mean(axis=1)
        sums = (d - d.mean()).groupby(a["id"]).sum()
        g = len(sums)
        assert c["gt_nll_per_token"] == pytest.approx(np.mean([x.mean() for x in per_seed]))
        clustered2 = g / (g - 1) * (sums**2).sum() / len(d) ** 2
        sd = np.std([x.mean() for x in per_seed], ddof=1)  # a seed's training shifts all its turns: added,
        # less the turns' noise the clustered part already counts (a two-way ANOVA's residual mean square)
        table = pd.concat(per_seed, axis=1)  # [turns, seeds]
        S, T = table.shape[1], table.shape[0]
        resid = table.sub(table.mean(axis=0), axis=1).sub(table.mean(axis=1), axis=0) + table.values.mean()
        r2 = (resid.values**2).sum() / ((S - 1) * (T - 1))
        assert c["gt_nll_per_token_se"] == pytest.approx(np.sqrt(clustered2 + max(0.0, sd**2 - r2 / T) / S))
        assert c["gt_nll_per_token_sd"] == pytest.approx(sd)
        assert c["n_scenarios"] == g  # the clusters, beside the errors, for a reader's t quantile
    assert all((tmp_path / f"seeds_{name}").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in bfcl.FIGURES)
    md = (tmp_path / "seeds_report.md").read_text()
    assert "| shiq@0.1 | mt_copg@0.1 | 0.1 | 3 |" in md and "| mt_dpo | 0.5 | 2 |" in md
    one = rows["shiq_tk@0.3"]  # one seed: its cells show no spread rather than a spread of 0
    assert f"| shiq_tk@0.3 | 0.3 | 1 | {one['turn_accuracy']:.3f} ± – [{one['turn_accuracy_se']:.3f}] |" in md
    assert [ln.split(" |")[0] for ln in md.splitlines() if "± –" in ln] == ["| shiq_tk@0.3"]
    bfcl.check_study_folder(tmp_path, bfcl.SEEDS_FILES)  # what it wrote is what a rerun may replace


def test_seeds_report_names_both_files_of_an_arm_evaluated_on_other_turns(tmp_path):
    """--seeds' paired differences read each arm's eval.json without the report's checks: an arm with a turn fewer
    than its seed's reference (a file cut or edited by hand) was refused as "DIR/seed1: shiq and mt_copg were
    evaluated on different turns", naming neither file, and a turn without a field ended in a KeyError. Each is
    named now as build_report names it: the arm's file and its seed's reference_eval.json, or the turn and field."""
    import numpy as np

    rng = np.random.default_rng(5)
    for name in ("seed0", "seed1"):
        _hand_made_seed(tmp_path / name, rng, {"shiq": 0.5, "mt_copg": 0.5})
    path, ref = tmp_path / "seed1" / "runs" / "shiq" / "eval.json", tmp_path / "seed1" / "reference_eval.json"
    saved = json.loads(path.read_text())
    n = len(saved["turns"])
    bad = [
        (saved["turns"][:-1], f"{path}: its {n - 1} turns are not the {n} turns of {ref}, in their order"),
        (saved["turns"][::-1], f"{path}: its {n} turns are not the {n} turns of {ref}, in their order"),
        ([{k: v for k, v in t.items() if k != "gt_nll"} for t in saved["turns"]], f"{path}: turns[0]: field 'gt_nll'"),
    ]
    for turns, said in bad:
        path.write_text(json.dumps(saved | {"turns": turns}))
        with pytest.raises(ValueError) as e:
            bfcl.seeds_report(tmp_path, ["seed0", "seed1"])
        assert str(e.value).startswith(said), str(e.value)
        assert "delete it, and the stage that made it" in str(e.value) and "\n" not in str(e.value)
    path.write_text(json.dumps(saved))
    # a seed's reference evaluated on other turns than the first seed's: both references named
    ref_turns = json.loads(ref.read_text())["turns"]
    ref.write_text(json.dumps({"turns": ref_turns[1:]}))
    with pytest.raises(ValueError) as e:
        bfcl.seeds_report(tmp_path, ["seed0", "seed1"])
    first = tmp_path / "seed0" / "reference_eval.json"
    assert str(e.value).startswith(f"{ref}: its {n - 1} turns are not the {n} turns of {first}, in their order")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("seeds_")]  # nothing written


def test_seeds_runs_each_seed_in_its_folder_then_the_report(tmp_path, monkeypatch):
    """--seeds: one run per seed in DIR/seed<N> with that seed and the same configuration otherwise, then the
    report over those folders; a seed listed twice is refused in one line (argparse's, exit 2)."""
    calls, reported = [], []
    monkeypatch.setattr(bfcl, "run", lambda cfg, out, progress: calls.append((cfg, Path(out))))
    monkeypatch.setattr(bfcl, "seeds_report", lambda out, names: reported.append((out, names)))
    assert bfcl.main(["--quick", "--out", str(tmp_path), "--seeds", "3,7", "train.steps=3"]) == 0
    base = bfcl.load_config(quick=True, overrides=["train.steps=3"])
    assert [(c["seed"], out) for c, out in calls] == [(3, tmp_path / "seed3"), (7, tmp_path / "seed7")]
    assert all(
        {k: v for k, v in c.items() if k != "seed"} == {k: v for k, v in base.items() if k != "seed"} for c, _ in calls
    )
    assert reported == [(tmp_path, ["seed3", "seed7"])]
    res = subprocess.run(
        [sys.executable, "-m", "shiq_eval.recipes.bfcl", "--quick", "--out", str(tmp_path), "--seeds", "1,1"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "a seed is listed twice" in res.stderr and "Traceback" not in res.stderr


def test_values_a_stage_would_refuse_are_refused_before_the_run_folder_is_made(tmp_path, capsys):
    """data.category misspelt failed in the data stage, after config.json was written (and a rerun with it
    fixed was then refused as a changed configuration); --seeds -1 made DIR/seed-1/ before numpy refused it;
    --out an existing folder of other files ran the stages among them, replacing its buffer/."""
    out = tmp_path / "x"
    assert bfcl.main(["--quick", "--out", str(out), "data.category=multi_turn_miss_funcc"]) == 2
    assert "data.category must be one of" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit) as e:
        bfcl.main(["--quick", "--out", str(out), "--seeds", "0,-1"])
    assert e.value.code == 2 and "each seed must be an integer in 0.." in capsys.readouterr().err
    assert not out.exists()
    (out / "buffer").mkdir(parents=True)
    assert bfcl.main(["--quick", "--out", str(out)]) == 2
    assert "is not a shiq-bfcl run folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["buffer"]
    # --seeds: the study's folder holds only seed<N> folders and its reports (seeds_report.md replaced)
    before = [p.name for p in out.iterdir()]
    assert bfcl.main(["--quick", "--out", str(out), "--seeds", "0,1"]) == 2
    assert "holds files (buffer) that a study of seeds does not write" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == before


def test_one_seed_of_one_scenario_writes_its_undefined_errors_as_null(tmp_path):
    """One scenario measures no spread between scenarios, one seed none between seeds: the run's summary gives
    NaN for the clustered errors (report.json: null, as the run writes it), and seeds_report.json holds null for
    every ``_se`` and ``_sd``, where it held 0.0 (read as exact); seeds_report.md shows "–", never "nan". A
    report.json of before, holding 0.0, still reads (its 0.0 passed on as it was)."""
    import numpy as np

    rng = np.random.default_rng(4)
    rep = _hand_made_seed(tmp_path / "seed0", rng, {"shiq": 0.5, "mt_copg": 0.5}, n_scenarios=1)
    turns = json.loads((tmp_path / "seed0" / "runs" / "shiq" / "eval.json").read_text())["turns"]
    ref_turns = json.loads((tmp_path / "seed0" / "runs" / "mt_copg" / "eval.json").read_text())["turns"]
    extra = {"valid": True, "answer_tokens": 9}
    summary = bfcl.summarize([t | extra for t in turns], [t | extra for t in ref_turns])
    errors = sorted(k for k in summary if k.endswith("_stderr"))
    assert len(errors) == 8 and all(math.isnan(summary[k]) for k in errors)
    for s in (rep["reference"], *rep["methods"].values()):
        s.update((k, None) for k in list(s) if k.endswith("_stderr"))  # as the run's report.json holds them
    (tmp_path / "seed0" / "report.json").write_text(json.dumps(rep))
    bfcl.seeds_report(tmp_path, ["seed0"])
    strict = json.loads((tmp_path / "seeds_report.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    for row in strict["arms"]:
        spread = {k: v for k, v in row.items() if k.endswith(("_se", "_sd"))}
        assert len(spread) == 16 and spread == dict.fromkeys(spread), row["arm"]
    (pair,) = strict["comparisons"]
    assert (pair["a"], pair["b"], pair["seeds"], pair["n_scenarios"]) == ("shiq", "mt_copg", 1, 1)
    spread = {k: v for k, v in pair.items() if k.endswith(("_se", "_sd"))}
    assert len(spread) == 8 and spread == dict.fromkeys(spread)
    md = (tmp_path / "seeds_report.md").read_text()
    assert "nan" not in md and "± – [–]" in md
    for s in (rep["reference"], *rep["methods"].values()):  # a report.json of before: 0.0 for the same errors
        s.update((k, 0.0) for k in list(s) if k.endswith("_stderr"))
    (tmp_path / "seed0" / "report.json").write_text(json.dumps(rep))
    rows = {r["arm"]: r for r in bfcl.seeds_report(tmp_path, ["seed0"])["arms"]}
    assert rows["shiq"]["turn_accuracy_se"] == 0.0 and math.isnan(rows["shiq"]["turn_accuracy_sd"])


def test_contamination_finds_held_out_scenarios_that_were_trained_on(tmp_path):
    """A held-out scenario among the trained ones is found by its own user turns (every scenario has a turn
    of at least 8 words); the default split's trained scenarios share no run of 13 words with the held-out
    ones; a trajectory of an unknown scenario is named."""
    cfg = bfcl.load_config()
    held = bfcl.scenario_entries(cfg, "test")
    trained = bfcl.trained_scenarios(cfg, bfcl.scenario_entries(cfg, "train"))
    leak = bfcl.contamination(cfg, [{"id": e["id"]} for e in trained + held[:3]], tmp_path / "t.jsonl")
    clean = bfcl.contamination(cfg, [{"id": e["id"]} for e in trained], tmp_path / "t.jsonl")
    assert leak["held_out_scenarios_in_training_questions"] >= 3 and leak["held_out_scenarios"] == len(held)
    assert clean["held_out_scenarios_in_training_questions"] == 0
    with pytest.raises(ValueError, match=r"t.jsonl: scenario 'nope_1' is not one of multi_turn_base's"):
        bfcl.contamination(cfg, [{"id": "nope_1"}], tmp_path / "t.jsonl")


@pytest.mark.parametrize("arms", ["[[shiq]]", "[shiq,{a:1}]"])
def test_a_method_that_is_no_name_is_refused_in_one_line(tmp_path, capsys, arms):
    """train.methods=[[shiq]] (a list, or a mapping, where a method's name goes) ended in a TypeError traceback
    (unhashable type) with status 1; it is refused in one line naming the entry, before the run folder is made."""
    out = tmp_path / "x"
    assert bfcl.main(["--quick", "--out", str(out), f"train.methods={arms}"]) == 2
    err = capsys.readouterr().err
    assert "train.methods: each entry must be a method's name" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_an_sft_arm_with_a_beta_is_refused_in_one_line(tmp_path, capsys):
    """sft@0.1 was accepted: the same run as sft (SFT reads no β), under another name and arm."""
    out = tmp_path / "x"
    assert bfcl.main(["--quick", "--out", str(out), "train.methods=[sft@0.1]"]) == 2
    err = capsys.readouterr().err
    assert "'sft@0.1': sft reads no β (no KL to the reference): write sft" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_the_largest_seed_allowed_evaluates(tmp_path):
    """seed=200000000 (the bound is 10**9) passed the configuration, then the reference's evaluation, after the
    data stage, failed: each scenario's turn generator was seeded past 2**64 (ValueError: Overflow when unpacking
    long long). Every allowed seed now evaluates; a seed below the overflow draws as before."""
    cfg = bfcl.load_config(quick=True, overrides=["seed=1000000000", "eval.scenarios=1", "eval.max_new_tokens=2"])
    ctx = bfcl.Context(cfg, tmp_path)
    res = bfcl.evaluate(ctx, ctx.reference[0])
    assert res["turns"] and all(t["answer_tokens"] >= 1 for t in res["turns"])


def test_a_dropped_scenario_is_replaced_by_another_of_the_split():
    """With ``data.buffer: visited`` a scenario of which not even the first turn fits ``data.max_tokens`` was
    dropped, and the buffer held fewer scenarios than the steps read: the sampler then repeated some. Another
    scenario of the split, not already chosen, now takes each dropped one's place (none with ``all``)."""
    split = [{"id": f"multi_turn_base_{i}"} for i in range(12)]
    cfg = bfcl.load_config(overrides=["train.steps=2", "train.groups_per_step=2", "train.warmup_steps=1"])
    chosen = bfcl.trained_scenarios(cfg, split)
    spares = bfcl.spare_scenarios(cfg, split, chosen)
    assert sorted(e["id"] for e in chosen + spares) == sorted(e["id"] for e in split)  # the rest, each once
    too_long = {chosen[1]["id"], spares[0]["id"]}  # the first spare does not fit either: the next one stands in
    kept, dropped = bfcl.fit_scenarios(chosen, spares, lambda e: ([] if e["id"] in too_long else [e], []))
    ids = [e["id"] for e, _, _ in kept]
    assert dropped == [chosen[1]["id"], spares[0]["id"]]
    assert ids == [chosen[0]["id"], chosen[2]["id"], chosen[3]["id"], spares[1]["id"]] and len(set(ids)) == 4
    everything = bfcl.load_config(overrides=["data.buffer=all"])
    assert bfcl.spare_scenarios(everything, split, bfcl.trained_scenarios(everything, split)) == []
    kept, dropped = bfcl.fit_scenarios(split[:2], [], lambda e: ([] if e is split[0] else [e], []))
    assert [e for e, _, _ in kept] == [split[1]] and dropped == [split[0]["id"]]  # no spare: one fewer


def test_a_buffer_short_of_the_scenarios_asked_says_so_in_one_line():
    """With ``data.buffer: all`` a dropped scenario has no replacement (every one of the split is in the buffer):
    the buffer held fewer scenarios than asked and only data.json's list said so. The data stage now logs it."""
    every = bfcl.load_config(overrides=["data.buffer=all", "data.max_tokens=512"])
    line = bfcl.shortfall(every, 160, 157, ["multi_turn_base_3", "multi_turn_base_9", "multi_turn_base_12"])
    assert line == (
        "data: the buffer holds 157 scenarios, 3 fewer than the 160 asked: 3 dropped (not even their first turn "
        "fits data.max_tokens=512) and data.buffer: all holds every scenario of the split, none is left to take "
        "their place"
    )
    assert "\n" not in line and bfcl.shortfall(every, 160, 160, []) is None
    visited = bfcl.load_config()
    assert "no other scenario of the split was left" in bfcl.shortfall(visited, 40, 39, ["multi_turn_base_3"])


def _hand_made_run(out):
    """A finished run's files as the report reads them: trajectories.jsonl, data.json, the reference's and one
    arm's evaluation (two scenarios of two turns)."""
    ids = ["multi_turn_base_0", "multi_turn_base_1"]
    trajs = [{"id": i, "turn_rewards": [1.0, r], "turn_rewards_reset": [1.0, r]} for i in ids for r in (0.0, 1.0)]
    (out / "trajectories.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trajs))
    data_info = {"category": "multi_turn_base", "reward": "cumulative", "scenarios": 2, "trajectories": 4}
    data_info |= {"turns": 8, "scenarios_cut": 0, "scenarios_dropped": [], "tokens": {"mean": 100.0}}
    (out / "data.json").write_text(json.dumps(data_info))
    turns = [
        {"id": i, "turn": k, "reset": 1.0, "cumulative": 0.0, "kl": 0.1 * k, "gt_nll": 3.0 + k, "gt_tokens": 5}
        | {"answer_tokens": 4, "answer": "[f()]", "truth": ["f()"], "valid": True}
        for i in ids
        for k in range(2)
    ]
    (out / "reference_eval.json").write_text(json.dumps({"turns": turns, "eval_seconds": 1.0}))
    (out / "runs" / "shiq").mkdir(parents=True)
    arm = {"turns": turns, "beta": 0.5, "steps": 2, "train_seconds": 3.0, "eval_seconds": 1.0}
    (out / "runs" / "shiq" / "eval.json").write_text(json.dumps(arm))


def test_a_damaged_data_or_eval_file_is_named_not_a_traceback(tmp_path):
    """The report reads data.json's counts and the numbers beside an arm's turns (β, steps, seconds): a file
    edited by hand without one, or with one of another kind, is named with the field in a ValueError (a
    KeyError or TypeError in the report's text before); the files as the run writes them make the report."""
    cfg = bfcl.load_config(quick=True, overrides=["train.methods=[shiq]"])
    _hand_made_run(tmp_path)
    ctx = bfcl.Context(cfg, tmp_path)
    assert "| shiq | 0.5 |" in bfcl.report_markdown(bfcl.build_report(ctx, {"data": 1.0}))
    good = json.loads((tmp_path / "data.json").read_text())
    for edit, said in (
        (lambda d: d.pop("tokens"), "field 'tokens' is missing"),
        (lambda d: d.update(tokens={}), "field 'tokens' must be an object with a finite 'mean'"),
        (lambda d: d.update(scenarios_dropped=None), "field 'scenarios_dropped' must be a list"),
        (lambda d: d.update(scenarios_cut="x"), "field 'scenarios_cut' must be an integer >= 0"),
    ):
        d = json.loads(json.dumps(good))
        edit(d)
        (tmp_path / "data.json").write_text(json.dumps(d))
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'data.json'}: {said}")):
            bfcl.build_report(ctx, {})
    (tmp_path / "data.json").write_text(json.dumps(good))
    path = tmp_path / "runs" / "shiq" / "eval.json"
    arm = json.loads(path.read_text())
    for key in ("beta", "train_seconds"):
        path.write_text(json.dumps(arm | {key: None}))
        with pytest.raises(ValueError, match=re.escape(f"{path}: field {key!r} must be a finite number, got null")):
            bfcl.report_markdown(bfcl.build_report(ctx, {}))


def test_an_arm_evaluated_on_other_turns_than_the_reference_is_named_with_both_files(tmp_path):
    """An arm's eval.json with a turn fewer than the reference's (a file cut or edited by hand) was refused as "a
    method and the reference were evaluated on different turns", naming neither file nor arm."""
    cfg = bfcl.load_config(quick=True, overrides=["train.methods=[shiq]"])
    _hand_made_run(tmp_path)
    path = tmp_path / "runs" / "shiq" / "eval.json"
    arm = json.loads(path.read_text())
    for turns in (arm["turns"][:-1], arm["turns"][::-1]):
        path.write_text(json.dumps(arm | {"turns": turns}))
        with pytest.raises(ValueError) as e:
            bfcl.build_report(bfcl.Context(cfg, tmp_path), {})
        said = str(e.value)
        assert said.startswith(
            f"{path}: its {len(turns)} turns are not the 4 turns of {tmp_path / 'reference_eval.json'}"
        )
        assert "delete it, and the stage that made it" in said and "\n" not in said


def test_the_report_says_one_of_a_count_in_the_singular(tmp_path):
    """A quick run's report.md said "1 edited ground truths", "1 scenarios per step", "the last 1 transformer
    layers trained" and "1 degrees of freedom" (the default run's too: one edit per scenario)."""
    cfg = bfcl.load_config(quick=True, overrides=["train.methods=[shiq]"])
    assert cfg["data"]["edits_per_scenario"] == cfg["train"]["groups_per_step"] == 1
    assert cfg["train"]["trainable_last_layers"] == 1
    _hand_made_run(tmp_path)  # two scenarios of two turns
    text = bfcl.report_markdown(bfcl.build_report(bfcl.Context(cfg, tmp_path), {"data": 1.0}))
    for said in (
        "2 training scenarios of multi_turn_base (the 160/40 split): each one's ground truth and 1 edited ground "
        "truth (a dropped,",
        "4 trajectories, 8 turns, 100 tokens per row",
        "2 AdamW steps each",
        "1 scenario per step with all their trajectories (sft: their ground truths only), the last 1 transformer "
        "layer trained.",
        "- **Evaluation.** 2 held-out scenarios, 4 turns:",
        "past Student's t quantile with 1 degree of freedom, 12.71 standard errors",
    ):
        assert said in text, said
