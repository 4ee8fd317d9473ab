"""Runs have names, suites have fingerprints, and the leaderboard's numbers are the per-run results'.

Two tiny ShiQ runs that differ only in β, from one tiny Llama folder, are evaluated with one suite (a YAML
file), and so is a Hugging Face export of the second run. Checked against independent references: the run
labels, β and weight hashes against the runs' folders (config.yaml, hashlib on the files); the exported
folder gives the same completions and rewards as the checkpoint it came from; every leaderboard number
(means, standard errors over prompts, J = R − β·KL, paired differences) recomputed here with numpy and
pandas from the per-completion values in results.json; a second suite's results are refused in the same
table.
"""

import base64
import hashlib
import html
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from test_eval_cli import tiny_hf_folder, train, write_tiny_buffer  # (a tiny Llama, buffer, 2-step run)
from test_scorer_cli import clustered_note

from shiq_eval import checkpoints
from shiq_eval import cli as eval_cli
from shiq_train import export

K = 2  # samples per prompt in the suite


def sha256_of(*paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def recompute(row: dict, beta) -> dict:
    """Mean and s.e. over prompts of reward, exact KL and J, from the per-completion values (prompt-major)."""
    r = np.asarray(row["rewards"], dtype=np.float64).reshape(-1, K).mean(1)
    kl = np.asarray(row["kls_exact"], dtype=np.float64).reshape(-1, K).mean(1)
    j = r if beta is None else r - beta * kl
    se = lambda x: x.std(ddof=1) / math.sqrt(x.size)
    return {
        "reward_mean": r.mean(),
        "reward_stderr": se(r),
        "kl": kl.mean(),
        "kl_stderr": se(kl),
        "J": j.mean(),
        "J_stderr": se(j),
        "_r": r,
        "_j": j,
    }


def test_two_runs_an_export_one_suite_and_the_leaderboard(tmp_path, capsys, monkeypatch):
    from shiq_data.reward_head import RegressionRewardModel, minilm_encoder

    init = tiny_hf_folder(tmp_path / "init")
    write_tiny_buffer(tmp_path / "buffer", init)
    runs = {b: train(tmp_path, init, "shiq", f"loss.beta={b}", name=f"b{b}", in_process=True) for b in ("0.1", "0.5")}
    hf = tmp_path / "hf_b05"
    assert export.main([str(runs["0.5"]), "--hf", str(hf), "--tokenizer", str(init)]) == 0
    assert checkpoints.EXPORT_RECORD == export.EXPORT_RECORD  # the name written is the name read

    suite_dir = tmp_path / "suite"
    suite_dir.mkdir()
    texts = ["a wonderful film", "a dreadful film", "great acting", "boring plot", "w5 w6", "w9 w10", "w3 w4 w7"]
    RegressionRewardModel.fit(minilm_encoder(), texts, [1.0, -1.0, 1.0, -1.0, 0.5, -0.5, 0.2], l2=1.0).save(
        suite_dir / "rm.safetensors"
    )
    (suite_dir / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": f"w{i} w{i + 1} w{i + 2}"}) + "\n" for i in range(3, 9))
    )
    suite = {
        "name": "tiny_words",
        "prompts": "prompts.jsonl",  # relative to the suite file
        "scorer": "reward_model",
        "reward_model": "rm.safetensors",
        "sampling": {"max_new_tokens": 4, "samples_per_prompt": K, "seed": 3, "batch_size": 5},
    }
    (suite_dir / "tiny.yaml").write_text(yaml.safe_dump(suite))
    common = ["--suite", str(suite_dir / "tiny.yaml"), "--quiet", "--reference", str(init)]
    runs_b = [str(runs["0.1"]), str(runs["0.5"])]
    assert eval_cli.main(["run", *runs_b, "--out", str(tmp_path / "ev"), *common]) == 0
    monkeypatch.chdir(tmp_path)  # a model named by a relative path is recorded by its absolute one
    assert eval_cli.main(["run", hf.name, "--out", str(tmp_path / "ev_hf"), *common]) == 0
    ev = json.loads((tmp_path / "ev" / "results.json").read_text())
    ev_hf = json.loads((tmp_path / "ev_hf" / "results.json").read_text())

    # runs have names: the folder's name, the step, β from the run's config, the hash of the weights read
    assert [(r["run"], r["method"], r["step"]) for r in ev] == [
        ("reference", "reference", 0),
        ("b0.1", "shiq", 1),
        ("b0.1", "shiq", 2),
        ("b0.5", "shiq", 1),
        ("b0.5", "shiq", 2),
    ]
    betas = {name: yaml.safe_load((run / "config.yaml").read_text())["loss"]["beta"] for name, run in runs.items()}
    assert [r["beta"] for r in ev] == [None, betas["0.1"], betas["0.1"], betas["0.5"], betas["0.5"]]
    for r in ev[1:]:
        rank_file = runs[r["run"][1:]] / "checkpoints" / f"step_{r['step']:08d}" / "rank_tp0_pp0_dp0.pt"
        assert r["model_sha256"] == sha256_of(rank_file)
    assert ev[0]["model_sha256"] == sha256_of(init / "model.safetensors")
    assert [(r["run"], r["method"], r["step"], r["beta"]) for r in ev_hf[1:]] == [("hf_b05", "shiq", 2, betas["0.5"])]
    assert ev_hf[1]["model_sha256"] == sha256_of(hf / "model.safetensors")
    assert ev_hf[1]["checkpoint"] == os.path.abspath(hf) and ev[1]["checkpoint"] == os.path.abspath(
        runs["0.1"] / "checkpoints" / "step_00000001"
    )
    # one suite, one fingerprint: the resolved settings with the prompts' and head's content hashes
    prompts_sha = hashlib.sha256(
        json.dumps([[f"w{i} w{i + 1} w{i + 2}"] * 2 for i in range(3, 9)]).encode()
    ).hexdigest()
    assert {r["prompt_set_sha256"] for r in ev + ev_hf} == {prompts_sha}
    assert len({r["suite_sha256"] for r in ev + ev_hf}) == 1 and {r["suite"] for r in ev + ev_hf} == {"tiny_words"}
    saved = json.loads((tmp_path / "ev" / "suite.json").read_text())
    assert saved["content"]["prompt_set_sha256"] == prompts_sha
    assert saved["content"]["scorer_sha256"] == sha256_of(suite_dir / "rm.safetensors")
    assert saved["content"]["sampling"] == suite["sampling"] | {"temperature": 1.0}
    assert all(r["n"] == 6 * K and len(r["rewards"]) == 6 * K for r in ev + ev_hf)
    assert all(r["temperature"] == 1.0 and r["samples_per_prompt"] == K for r in ev + ev_hf)
    for r in ev + ev_hf:  # the run's own standard errors: over prompts, a prompt's K samples averaged first
        for values, se in (
            ("rewards", "reward_stderr"),
            ("kls_exact", "kl_exact_stderr"),
            ("kls_sample", "kl_sample_stderr"),
        ):
            per_prompt = np.asarray(r[values], dtype=np.float64).reshape(-1, K).mean(1)
            assert r[se] == pytest.approx(per_prompt.std(ddof=1) / math.sqrt(per_prompt.size), rel=1e-9, abs=1e-12)
    # the exported folder is the checkpoint it came from: the same draws, rewards and KL
    assert ev_hf[1]["rewards"] == pytest.approx(ev[4]["rewards"], abs=1e-6)
    assert ev_hf[1]["kls_exact"] == pytest.approx(ev[4]["kls_exact"], abs=1e-5)
    assert ev[2]["rewards"] != pytest.approx(ev[4]["rewards"], abs=1e-9)  # β changed the policy

    out = tmp_path / "board"
    assert eval_cli.main(["leaderboard", str(tmp_path / "ev"), str(tmp_path / "ev_hf"), "--out", str(out)]) == 0
    table = pd.read_csv(out / "leaderboard.csv")
    # one row per run and step (the reference, in both folders, once), ordered by suite, loss, β, run, step
    assert list(zip(table["run"], table["step"])) == [
        ("reference", 0),
        ("b0.1", 1),
        ("b0.1", 2),
        ("b0.5", 1),
        ("b0.5", 2),
        ("hf_b05", 2),
    ]
    by_key = {(r["run"], r["step"]): r for r in ev + ev_hf}
    want = {k: recompute(r, r["beta"]) for k, r in by_key.items()}
    for _, t in table.iterrows():
        w = want[(t["run"], t["step"])]
        for col in ("reward_mean", "reward_stderr", "kl", "kl_stderr", "J", "J_stderr"):
            assert t[col] == pytest.approx(w[col], rel=1e-9, abs=1e-12), (t["run"], t["step"], col)
        assert t["prompts"] == 6 and t["samples_per_prompt"] == K
    pairs = pd.read_csv(out / "pairs.csv")
    finals = ["reference", "b0.1", "b0.5", "hf_b05"]  # each run's last step, in table order
    last = {"reference": 0, "b0.1": 2, "b0.5": 2, "hf_b05": 2}
    assert list(zip(pairs["run_a"], pairs["run_b"])) == [(a, b) for i, b in enumerate(finals) for a in finals[i + 1 :]]
    beta_of = {r["run"]: r["beta"] for r in ev + ev_hf}
    for _, p in pairs.iterrows():
        a, b = want[(p["run_a"], last[p["run_a"]])], want[(p["run_b"], last[p["run_b"]])]
        one_beta = "reference" in (p["run_a"], p["run_b"]) or beta_of[p["run_a"]] == beta_of[p["run_b"]]
        if not one_beta:  # J at two β is two objectives: no J difference, a note instead
            assert math.isnan(p["J_diff"]) and math.isnan(p["J_diff_stderr"]) and "two objectives" in p["J_note"]
        for col, key in (("reward_diff", "_r"), ("J_diff", "_j")) if one_beta else (("reward_diff", "_r"),):
            d = a[key] - b[key]
            assert p[col] == pytest.approx(d.mean(), abs=1e-12)
            assert p[col + "_stderr"] == pytest.approx(d.std(ddof=1) / math.sqrt(d.size), rel=1e-9, abs=1e-12)
    same = pairs[(pairs["run_a"] == "hf_b05") & (pairs["run_b"] == "b0.5")].iloc[0]
    assert abs(same["reward_diff"]) < 1e-6  # the export against its checkpoint
    md = (out / "leaderboard.md").read_text()
    assert "## suite tiny_words" in md and "| b0.5 | shiq | 0.5 | 2 |" in md and "| hf_b05 @ 2 | b0.5 @ 2 |" in md
    page = (out / "leaderboard.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3 and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert 'src="http' not in page and "b0.1" in page

    # a second suite (here: the same file with a shorter completion limit, sampled at temperature 0.5) is
    # refused in the same table
    step = runs["0.1"] / "checkpoints" / "step_00000002"
    other = ["run", str(step), "--out", str(tmp_path / "ev2"), *common, "--max-new-tokens", "3", "--temperature", "0.5"]
    assert eval_cli.main(other) == 0
    ev2 = json.loads((tmp_path / "ev2" / "results.json").read_text())
    assert [r["temperature"] for r in ev2] == [0.5, 0.5]
    assert ev2[1]["suite"] == "tiny_words" and ev2[1]["suite_sha256"] != ev[1]["suite_sha256"]
    capsys.readouterr()
    mixed = ["leaderboard", str(tmp_path / "ev"), str(tmp_path / "ev2"), "--out", str(tmp_path / "mixed")]
    assert eval_cli.main(mixed) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("shiq-eval: error: "), err
    assert str(tmp_path / "ev" / "results.json") in err[0] and str(tmp_path / "ev2" / "results.json") in err[0]
    assert not (tmp_path / "mixed").exists()
    assert eval_cli.main([*mixed, "--allow-mixed"]) == 0
    mixed_table = pd.read_csv(tmp_path / "mixed" / "leaderboard.csv")
    assert len(mixed_table) == 5 + 2
    hot = mixed_table[mixed_table["temperature"] == 0.5]  # the tempered suite's rows: reward and KL, no J
    assert len(hot) == 2 and hot["J"].isna().all() and hot["reward_mean"].notna().all()
    assert mixed_table[mixed_table["temperature"] == 1.0]["J"].notna().all()


def test_labels_name_runs_and_a_label_may_not_name_two(tmp_path, capsys):
    """--label once per CHECKPOINT; the default (the run folder's name) may not give two runs one label."""
    from shiq_eval.checkpoints import policy_infos, run_label

    for name in ("a/shiq", "b/shiq"):
        step = tmp_path / name / "checkpoints" / "step_00000001"
        step.mkdir(parents=True)
        meta = {"loss": {"name": "shiq", "beta": 0.1}, "hf_config": {}}
        (step / "meta.json").write_text(json.dumps({"step": 1, "layout": {"tp": 1, "pp": 1, "dp": 1}, "meta": meta}))
        (step / "rank_tp0_pp0_dp0.pt").write_bytes(b"")  # a placeholder: its weights are never read here
    a, b = tmp_path / "a" / "shiq", tmp_path / "b" / "shiq"
    assert run_label(a) == run_label(a / "checkpoints" / "step_00000001") == "shiq"
    with pytest.raises(ValueError, match="would both be labelled 'shiq'"):
        policy_infos([str(a), str(b)], None)
    assert [i["run"] for i in policy_infos([str(a), str(b)], ["A", "B"])] == ["A", "B"]
    with pytest.raises(ValueError, match="which .* names too: give each model once"):  # its rows listed twice
        policy_infos([str(a), str(a / "checkpoints" / "step_00000001")], None)
    with pytest.raises(ValueError, match="--label is given once for 2 CHECKPOINT arguments"):
        policy_infos([str(a), str(b)], ["A"])


def test_a_runs_checkpoints_folder_is_labelled_with_the_runs_name(tmp_path):
    """shiq-eval run reads RUN/checkpoints as the run RUN; its rows were labelled 'checkpoints' (the folder's own
    name), so two runs given that way were refused as one label. The label is the run folder's name, as for RUN and
    RUN/checkpoints/step_N; a run whose folder is itself named 'checkpoints' keeps that name."""
    from shiq_eval.checkpoints import policy_infos, run_label

    for name in ("a/shiq", "b/dpo", "c/checkpoints"):
        step = tmp_path / name / "checkpoints" / "step_00000001"
        step.mkdir(parents=True)
        meta = {"loss": {"name": "shiq", "beta": 0.1}, "hf_config": {}}
        (step / "meta.json").write_text(json.dumps({"step": 1, "layout": {"tp": 1, "pp": 1, "dp": 1}, "meta": meta}))
        (step / "rank_tp0_pp0_dp0.pt").write_bytes(b"")  # a placeholder: its weights are never read here
    a, b, c = tmp_path / "a" / "shiq", tmp_path / "b" / "dpo", tmp_path / "c" / "checkpoints"
    assert run_label(a / "checkpoints") == "shiq" and run_label(c) == "checkpoints"
    infos = policy_infos([str(a / "checkpoints"), str(b / "checkpoints"), str(c)], None)
    assert [i["run"] for i in infos] == ["shiq", "dpo", "checkpoints"]
    with pytest.raises(ValueError, match="which .* names too: give each model once"):  # one run, not two labels
        policy_infos([str(a), str(a / "checkpoints")], None)


def test_a_label_or_checkpoint_path_that_is_not_utf8_is_refused_before_any_work(tmp_path):
    """A byte of another encoding in --label or in a CHECKPOINT's path (Python reads it as a lone surrogate,
    '\\udcff') was taken, and writing results.json failed once the reference was evaluated, with the codec's
    error naming neither. A link of a UTF-8 name to the folder is evaluated."""
    from shiq_eval.checkpoints import policy_infos

    for name in ("ok", "r\udcff"):  # (the folder's name on disk holds the byte 0xff)
        step = tmp_path / name / "checkpoints" / "step_00000001"
        step.mkdir(parents=True)
        meta = {"loss": {"name": "shiq", "beta": 0.1}, "hf_config": {}}
        (step / "meta.json").write_text(json.dumps({"step": 1, "layout": {"tp": 1, "pp": 1, "dp": 1}, "meta": meta}))
        (step / "rank_tp0_pp0_dp0.pt").write_bytes(b"")  # a placeholder: its weights are never read here
    assert os.fsencode(tmp_path / "r\udcff").endswith(b"r\xff")
    with pytest.raises(ValueError, match=r"--label 'a\\udcffb': a run label must be UTF-8 text"):
        policy_infos([str(tmp_path / "ok")], ["a\udcffb"])
    with pytest.raises(ValueError, match=r"CHECKPOINT .*r\\udcff.*: the path is not UTF-8 text"):
        policy_infos([str(tmp_path / "r\udcff")], ["fine"])
    (tmp_path / "link").symlink_to(tmp_path / "r\udcff")
    assert [i["run"] for i in policy_infos([str(tmp_path / "link")], None)] == ["link"]


def test_a_loss_without_a_kl_weight_has_no_beta_and_no_j(tmp_path):
    """SFT reads no reference (SHIQ_MATH §5): the loss.beta its config carries (0.1 by default, unused) was
    recorded as the run's β, so the leaderboard gave it J = reward − 0.1·KL and a J difference to ShiQ at β 0.1,
    as if both optimised that objective (SHIQ_MATH §9: J at the policy's own β). Its rows now have no β, so no J."""
    step = tmp_path / "sft" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    meta = {"loss": {"name": "sft", "beta": 0.1}, "hf_config": {}}
    (step / "meta.json").write_text(json.dumps({"step": 1, "layout": {"tp": 1, "pp": 1, "dp": 1}, "meta": meta}))
    assert checkpoints.checkpoint_info(step)["beta"] is None
    folder = tiny_hf_folder(tmp_path / "hf")
    weights = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.glob("*.safetensors")}
    record = {"loss": {"name": "sft", "beta": 0.1}, "step": 1, "sha256": weights}
    (folder / checkpoints.EXPORT_RECORD).write_text(json.dumps(record))
    assert checkpoints.hf_folder_info(folder)["beta"] is None
    record["loss"]["name"] = "shiq"  # a loss of the family keeps its β
    (folder / checkpoints.EXPORT_RECORD).write_text(json.dumps(record))
    assert checkpoints.hf_folder_info(folder)["beta"] == 0.1


def test_the_shipped_suite_resolves_with_packaged_assets():
    """configs/eval/movie_vader_small.yaml: its prompts ship beside it, its scorer is the installed VADER lexicon;
    flags override single settings and change the fingerprint; a bad key is refused naming the file."""
    from shiq_eval.scorers import VaderScorer
    from shiq_eval.suite import SuiteError, fingerprint, load_suite

    suite, path = load_suite("movie_vader_small")
    assert path.name == "movie_vader_small.yaml" and suite.scorer == "vader"
    prompts, shown, _ = eval_cli.suite_prompts(suite)
    assert len(prompts) == 16 and all(p.endswith(s) for p, s in zip(prompts, shown))
    sha = eval_cli.prompt_set_sha256(prompts, shown)
    content, fp = fingerprint(suite, sha)
    assert "prompts" not in content and content["prompt_set_sha256"] == sha  # no machine paths in the fingerprint
    longer, _ = load_suite("movie_vader_small", {"sampling.max_new_tokens": 48, "sampling.seed": None})
    assert longer.sampling.max_new_tokens == 48 and longer.sampling.seed == suite.sampling.seed
    assert fingerprint(longer, sha)[1] != fp and fingerprint(load_suite("movie_vader_small")[0], sha)[1] == fp
    scores = VaderScorer()(shown[:2], ["a wonderful, moving film", "a dull, awful mess"])
    assert scores[0] > 0.5 and scores[1] < -0.5
    with pytest.raises(SuiteError, match="no suite of that name"):
        load_suite("nope")
    bad = path.parent / "x.yaml"
    with pytest.raises(SuiteError, match="no such file"):
        load_suite(str(bad))


def test_sampling_settings_are_taken_up_to_their_bounds_and_refused_one_past(tmp_path):
    """shiq-eval run's bounds, at the edge: 10,000 samples per prompt, a batch of 65,536, seed 10**9 and
    temperature 1e-30 are taken; one past each is refused naming its option."""
    from shiq_eval.suite import SuiteError, load_suite

    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n')
    base = {"prompts": str(tmp_path / "p.jsonl"), "scorer": "vader"}
    cases = [
        (
            "samples_per_prompt",
            10_000,
            10_001,
            "--samples-per-prompt: sampling.samples_per_prompt must be in 1..10,000",
        ),
        ("batch_size", 65_536, 65_537, "--batch-size: sampling.batch_size must be in 1..65,536, got 65537"),
        ("seed", 1_000_000_000, 1_000_000_001, "--seed: sampling.seed must be in 0..1,000,000,000, got 1000000001"),
        (
            "temperature",
            1e-30,
            9e-31,
            "--temperature: sampling.temperature must be a finite number >= 1e-30, got 9e-31",
        ),
    ]
    for key, edge, past, message in cases:
        suite, _ = load_suite(None, {**base, f"sampling.{key}": edge})
        assert getattr(suite.sampling, key) == edge
        with pytest.raises(SuiteError, match=f"^{re.escape(message)}"):
            load_suite(None, {**base, f"sampling.{key}": past})


def test_a_bad_suite_value_is_named_where_it_came_from(tmp_path):
    """--max-new-tokens 0 was blamed on the suite file (which said 4); a misspelt key of the sampling block was
    answered with the suite's top-level keys."""
    from shiq_eval.suite import SuiteError, load_suite

    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n')
    good = tmp_path / "good.yaml"
    good.write_text("name: s\nprompts: p.jsonl\nscorer: vader\nsampling:\n  max_new_tokens: 4\n")
    with pytest.raises(SuiteError, match=r"^--max-new-tokens: sampling.max_new_tokens must be in 1..[0-9,]+, got 0$"):
        load_suite(str(good), {"sampling.max_new_tokens": 0})
    zero = tmp_path / "zero.yaml"
    zero.write_text(good.read_text().replace("4", "0"))
    with pytest.raises(SuiteError, match=rf"^{zero}: sampling.max_new_tokens must be in"):
        load_suite(str(zero), {"sampling.max_new_tokens": None})
    # a resolver's value (an environment variable: a secret) was copied into results.json and suite.json
    env = tmp_path / "env.yaml"
    env.write_text('name: "${oc.env:HOME}"\nprompts: p.jsonl\nscorer: vader\n')
    with pytest.raises(SuiteError, match=rf"^{env}: name is '\$\{{oc.env:HOME\}}': a file's values are data, never"):
        load_suite(str(env))
    env.write_text("name: 'literal \\${oc.env:HOME}'\nprompts: p.jsonl\nscorer: vader\n")  # escaped: text
    assert load_suite(str(env))[0].name == "literal ${oc.env:HOME}"
    env.write_text(
        "name: 'x \\\\${oc.env:HOME}'\nprompts: p.jsonl\nscorer: vader\n"
    )  # an escaped backslash, then a call
    with pytest.raises(SuiteError, match=rf"^{env}: name is .*a file's values are data, never"):
        load_suite(str(env))
    typo = tmp_path / "typo.yaml"
    typo.write_text(good.read_text().replace("max_new_tokens", "max_new_token"))
    with pytest.raises(SuiteError, match=r"'max_new_token' not in 'Sampling' \(sampling has the keys \['temperature'"):
        load_suite(str(typo))


def result_row(run, step, model, rewards, kls, **extra):
    return {
        "run": run,
        "method": "shiq" if run != "reference" else "reference",
        "beta": 0.5 if run != "reference" else None,
        "step": step,
        "suite": "s",
        "suite_sha256": "a" * 64,
        "prompt_set_sha256": "b" * 64,
        "samples_per_prompt": 1,
        "kl_estimator": "sample",
        "model_sha256": model,
        "rewards": rewards,
        "kls_exact": [0.0] * len(kls),
        "kls_sample": kls,
        **extra,
    }


@pytest.mark.parametrize(
    "text, needle",
    [
        ("sampling:\n  max_new_tokens: four\n", "field 'sampling.max_new_tokens': Value 'four' of type 'str'"),
        ("chat: maybe\n", "field 'chat': Value 'maybe' is not a valid bool"),
    ],
)
def test_a_suite_value_of_the_wrong_type_is_named_by_its_field(tmp_path, text, needle):
    """A value of the wrong type in a suite file was answered with omegaconf's message alone ("Value 'four' of
    type 'str' could not be converted to Integer"), naming no field; a file not in UTF-8 with Python's codec
    error, followed by the suite's keys as if one were misspelt."""
    from shiq_eval.suite import SuiteError, load_suite

    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n')
    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\nprompts: p.jsonl\nscorer: vader\n" + text)
    with pytest.raises(SuiteError, match=rf"^{re.escape(str(suite))}: {re.escape(needle)}"):
        load_suite(str(suite))
    suite.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(SuiteError, match=rf"^{re.escape(str(suite))}: not valid UTF-8 \(byte 0xe9 at byte 9\)$"):
        load_suite(str(suite))


def test_leaderboard_refuses_one_label_for_two_models_and_old_results(tmp_path, capsys):
    """Synthetic results.json files: the suite's KL estimator (here the sample one) feeds J; one run label and
    step naming two different weight files is refused naming both files; results without labels are refused."""
    for name, model in (("x", "m1"), ("y", "m2")):
        rows = [
            result_row("reference", 0, "r", [1.0, 2.0, 4.0], [0.0] * 3),
            result_row("a", 3, model, [2.0, 2.0, 7.0], [1.0, 3.0, 2.0]),
        ]
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(rows))
    assert eval_cli.main(["leaderboard", str(tmp_path / "x"), "--out", str(tmp_path / "ok")]) == 0
    t = pd.read_csv(tmp_path / "ok" / "leaderboard.csv").set_index("run")
    assert t.loc["a", "J"] == pytest.approx(np.mean([2 - 0.5, 2 - 1.5, 7 - 1.0]))
    assert t.loc["a", "kl"] == pytest.approx(2.0) and t.loc["reference", "J"] == pytest.approx(7 / 3)
    capsys.readouterr()
    assert eval_cli.main(["leaderboard", str(tmp_path / "x"), str(tmp_path / "y"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "run 'a' step 3 names two different models" in err and str(tmp_path / "y" / "results.json") in err
    old = [{k: v for k, v in result_row("a", 1, "m", [1.0], [0.0]).items() if k not in ("run", "suite_sha256")}]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text(json.dumps(old))
    assert eval_cli.main(["leaderboard", str(tmp_path / "old"), "--out", str(tmp_path / "o")]) == 2
    assert "row 0 has no ['run', 'suite_sha256']" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # --out a training run, a model folder or a run's results: its own files are not the leaderboard's to
    # write among (they were, exit 0); its own earlier folder is written again
    for name, what in (
        ("checkpoints", "a shiq-train run"),
        ("config.json", "a model folder"),
        ("results.json", "a shiq-eval run's"),
    ):
        (tmp_path / "busy" / name).mkdir(parents=True)
        assert eval_cli.main(["leaderboard", str(tmp_path / "x"), "--out", str(tmp_path / "busy")]) == 2
        err = capsys.readouterr().err
        assert f"--out {tmp_path / 'busy'} is {what}" in err and "use another folder for the leaderboard" in err, err
        assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == [name]
        (tmp_path / "busy" / name).rmdir()
    assert eval_cli.main(["leaderboard", str(tmp_path / "x"), "--out", str(tmp_path / "ok")]) == 0


def test_one_label_is_one_run_and_one_model_step_one_evaluation(tmp_path, capsys):
    """A label on rows of two methods or β is two runs (refused: one curve, the later run's step paired as the
    label's last); on checkpoints of two run folders it is said on stderr; one model's step evaluated twice with
    other results (another engine or seed) keeps the first folder's, which the argument order picked silently
    before and is now said on stderr."""
    ref = result_row("reference", 0, "r", [1.0, 2.0, 4.0], [0.0] * 3)
    ckpt = lambda run, step: {"checkpoint": f"/runs/{run}/checkpoints/step_{step:08d}"}  # noqa: E731
    x = write_results(tmp_path / "x", [ref, result_row("a", 1, "m1", [2.0, 2.0, 7.0], [1.0, 3.0, 2.0], **ckpt("p", 1))])
    other_beta = result_row("a", 2, "m2", [2.0, 3.0, 7.0], [1.0, 3.0, 2.0], beta=0.1, **ckpt("q", 2))
    y = write_results(tmp_path / "y", [ref, other_beta])
    capsys.readouterr()
    assert eval_cli.main(["leaderboard", x, y, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "run 'a' has beta 0.5 in one and 0.1 in the other: two runs under one label" in err and y in err
    z = write_results(tmp_path / "z", [ref, result_row("a", 2, "m2", [2.0, 3.0, 7.0], [1.0, 3.0, 2.0], **ckpt("q", 2))])
    assert eval_cli.main(["leaderboard", x, z, "--out", str(tmp_path / "o")]) == 0
    assert "run 'a' has checkpoints of 2 run folders (/runs/p, /runs/q): drawn as one run" in capsys.readouterr().err
    # the same reference weights evaluated twice with other rewards (another engine or machine): the first folder's
    # is shown and the choice said, in either order; a folder given twice is said nothing of
    again = write_results(tmp_path / "again", [{**ref, "rewards": [9.0, 9.0, 9.0]}])
    for order, mean in (((x, again), 7 / 3), ((again, x), 9.0)):
        out = tmp_path / f"o-{Path(order[0]).name}"
        assert eval_cli.main(["leaderboard", *order, "--out", str(out)]) == 0
        err = capsys.readouterr().err
        assert (
            "the reference (suite s, fingerprint aaaaaaaaaaaa) is evaluated with other results in 1 more folder(s)"
            in err
        )
        assert (
            f"the first: {order[1]}/results.json): {order[0]}/results.json's is shown, with every folder's runs" in err
        )
        assert len(err.strip().splitlines()) == 1
        table = pd.read_csv(out / "leaderboard.csv").set_index("run")
        assert table.loc["reference", "reward_mean"] == pytest.approx(mean)
    many = [write_results(tmp_path / f"m{i}", [{**ref, "rewards": [float(i)] * 3}]) for i in range(5)]
    assert eval_cli.main(["leaderboard", x, *many, many[0], "--out", str(tmp_path / "o-many")]) == 0
    err = capsys.readouterr().err  # one line for the reference's five other evaluations, not one a folder
    assert len(err.strip().splitlines()) == 1 and "in 5 more folder(s)" in err
    assert eval_cli.main(["leaderboard", x, x, "--out", str(tmp_path / "o3")]) == 0
    assert "evaluated" not in capsys.readouterr().err
    assert len(pd.read_csv(tmp_path / "o3" / "leaderboard.csv")) == 2


def test_one_runs_steps_of_two_betas_are_refused_naming_the_steps(tmp_path, capsys):
    """A run resumed with another β (``+resume.allow_changed=[loss.beta]``) and evaluated whole gives one results
    file whose steps differ in β. The refusal named that file twice ("x and x: ... in one and ... in the other")
    and advised ``--label``, which labels a whole run folder alike; it now names the steps and the way out."""
    ref = result_row("reference", 0, "r", [1.0, 2.0, 4.0], [0.0] * 3)
    ckpt = lambda step: {"checkpoint": f"/runs/p/checkpoints/step_{step:08d}"}  # noqa: E731
    first = result_row("a", 1, "m1", [2.0, 2.0, 7.0], [1.0, 3.0, 2.0], **ckpt(1))
    resumed = result_row("a", 2, "m2", [2.0, 3.0, 7.0], [1.0, 3.0, 2.0], beta=0.1, **ckpt(2))
    x = write_results(tmp_path / "x", [ref, first, resumed])
    capsys.readouterr()
    assert eval_cli.main(["leaderboard", x, "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (
        f"shiq-eval: error: {x}/results.json: run 'a' has beta 0.5 at step 1 and 0.1 at step 2 (a run resumed "
        "with another beta?): two settings under one label; evaluate the step folders apart, each with a label "
        "of its own (shiq-eval run RUN/checkpoints/step_N --label NAME)\n"
    )
    assert not (tmp_path / "o").exists()


def write_results(folder, rows):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(rows))
    return str(folder)


def test_results_the_leaderboard_cannot_rank_are_named_and_labels_are_shown_as_written(tmp_path, capsys):
    """Two folders evaluated against different references were refused with advice that cannot be followed
    (--label cannot rename the reference); an empty results.json gave an empty leaderboard; rows of one suite
    fingerprint with two prompt sets (a hand edit) were listed as one suite's. A label with a newline or HTML
    broke the Markdown table; one with "$" or a leading "_" was drawn as math text or left out of the legend."""
    from shiq_eval.report import legend_text

    ref = result_row("reference", 0, "r", [1.0, 2.0, 4.0], [0.0] * 3)
    x = write_results(tmp_path / "x", [ref, result_row("a", 1, "m1", [2.0, 2.0, 7.0], [1.0, 3.0, 2.0])])
    other = write_results(tmp_path / "other", [{**ref, "model_sha256": "f" * 64}])
    capsys.readouterr()
    assert eval_cli.main(["leaderboard", x, other, "--out", str(tmp_path / "o")]) == 2
    assert "evaluated against two different reference models" in capsys.readouterr().err
    # one Q♯ value model (labelled by its folder) hashed two ways: no --label advice, which does not apply to it
    guided = {"method": "qsharp", "top_k": 5}
    q1 = write_results(tmp_path / "q1", [ref, result_row("vm", 4, "h1", [1.0] * 3, [0.5] * 3, **guided)])
    q2 = write_results(tmp_path / "q2", [ref, result_row("vm", 4, "h2", [1.0] * 3, [0.5] * 3, **guided)])
    assert eval_cli.main(["leaderboard", q1, q2, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "the Q♯ value model" in err and "has two hashes" in err and "--label" not in err, err
    empty = write_results(tmp_path / "empty", [])
    assert eval_cli.main(["leaderboard", x, empty, "--out", str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'empty' / 'results.json'}: no result rows" in capsys.readouterr().err
    edited = write_results(tmp_path / "edited", [{**ref, "prompt_set_sha256": "e" * 64}])
    assert eval_cli.main(["leaderboard", x, edited, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "one suite fingerprint" in err and "with two prompt sets (field 'prompt_set_sha256')" in err, err
    assert not (tmp_path / "o").exists()
    # labels as written: one line and no HTML in a Markdown cell; "$" and "_" shown in plots
    odd = write_results(tmp_path / "odd", [ref, result_row("lab|x\ny<i>&", 1, "m1", [2.0, 2.0, 7.0], [1.0] * 3)])
    assert eval_cli.main(["leaderboard", odd, "--out", str(tmp_path / "o")]) == 0
    md = (tmp_path / "o" / "leaderboard.md").read_text()
    line = next(x for x in md.splitlines() if "lab" in x)
    assert "lab\\|x y&lt;i&gt;&amp;" in line and "<i>" not in md, line
    # and no Markdown: rendered (CommonMark with tables), the cells and heading read as written
    from markdown_it import MarkdownIt

    label, suite = "*x* a_b_c_ [l](u) `c` ~~s~~ \\ |", "s*uite*_"
    odd = write_results(
        tmp_path / "md", [{**ref, "suite": suite}, {**result_row(label, 1, "m1", [2.0] * 3, [1.0] * 3), "suite": suite}]
    )
    assert eval_cli.main(["leaderboard", odd, "--out", str(tmp_path / "md_board")]) == 0
    page = MarkdownIt("commonmark").enable("table").render((tmp_path / "md_board" / "leaderboard.md").read_text())
    assert f"<td>{html.escape(label, quote=False)}</td>" in page, page
    assert f"<h2>suite {suite} (fingerprint" in page and "<em>" not in page and "<code>" not in page, page
    assert legend_text("cost $5 and $6") == r"cost \$5 and \$6" and legend_text("_hidden") == "\u2009_hidden"


@pytest.mark.parametrize(
    "edit, needle",
    [
        ({"samples_per_prompt": 2}, "with 1 and 2 samples per prompt (field 'samples_per_prompt', run 'a' step 1)"),
        (
            {"rewards": [2.0, 2.0], "kls_sample": [1.0, 1.0]},
            "with 4 and 2 completions (field 'rewards', run 'a' step 1)",
        ),
        ({"kl_estimator": "exact"}, "with sample and exact KL estimators (field 'kl_estimator', run 'a' step 1)"),
        ({"temperature": 0.5}, "with 1.0 and 0.5 temperatures (field 'temperature', run 'a' step 1)"),
    ],
)
def test_rows_of_one_suite_with_other_settings_are_refused(tmp_path, capsys, edit, needle):
    """The suite's fingerprint covers its prompts, samples per prompt, KL estimator and temperature, so every row
    of it has as many completions, grouped and measured alike: a hand edit of an earlier step's row (4 completions
    read as 2 prompts of 2 samples, or 2 completions of 4 prompts; its exact KL in a table of the sample
    estimator's; its reward at another temperature) was listed with the others. Only the rows at a run's last
    step were checked, by their pairing. Rows written before the temperature was recorded (null) are not refused
    for it."""
    ref = result_row("reference", 0, "r", [1.0, 2.0, 4.0, 3.0], [0.0] * 4, temperature=1.0)
    step1 = {**result_row("a", 1, "m1", [2.0, 2.0, 7.0, 1.0], [1.0] * 4, temperature=1.0), **edit}
    step2 = result_row("a", 2, "m2", [2.0, 3.0, 1.0, 5.0], [1.0] * 4, temperature=1.0)
    folder = write_results(tmp_path / "x", [ref, step1, step2])
    capsys.readouterr()
    assert eval_cli.main(["leaderboard", folder, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "one suite fingerprint" in err and needle in err, err
    assert not (tmp_path / "o").exists()
    if "temperature" in edit:
        older = write_results(tmp_path / "older", [ref, {**step1, "temperature": None}, step2])
        assert eval_cli.main(["leaderboard", older, "--out", str(tmp_path / "o")]) == 0


def test_mixed_suites_of_one_name_are_drawn_apart_without_one_suites_reference(tmp_path, monkeypatch):
    """With --allow-mixed, two suites of one name (one suite file run with an override) were drawn as one curve
    per run, joined across suites, against the first suite's reference and its KL estimator's axis label."""
    from shiq_eval import leaderboard as lb

    def rows(sha, estimator, mean):
        kw = {"suite_sha256": sha, "kl_estimator": estimator, "source": f"{sha[:1]}/results.json"}
        return [
            result_row("reference", 0, "r", [1.0, 2.0, 4.0], [0.0] * 3, **kw),
            result_row("a", 2, "m", [mean] * 3, [1.0] * 3, **kw),
        ]

    seen = {}
    monkeypatch.setattr(lb, "plot_curves", lambda rows, out, **kw: seen.update(rows=rows, **kw) or [])
    monkeypatch.setattr(lb, "plot_j_vs_step", lambda *a, **kw: tmp_path / "j.png")
    table, _ = lb.build(rows("a" * 64, "sample", 2.0) + rows("c" * 64, "exact", 3.0), allow_mixed=True)
    lb.plots(table, tmp_path)
    assert sorted(r["run"] for r in seen["rows"]) == ["a [s aaaaaaaa]", "a [s cccccccc]"]  # two curves
    assert seen["reference"] is None and seen["kl_name"] == "exact / sample"
    table, _ = lb.build(rows("a" * 64, "sample", 2.0), allow_mixed=False)  # one suite: its reference, as before
    lb.plots(table, tmp_path)
    assert [r["run"] for r in seen["rows"]] == ["a"] and seen["reference"]["method"] == "reference"
    assert seen["kl_name"] == "sample"


def test_suites_of_one_name_are_headed_with_the_settings_that_tell_them_apart(tmp_path, capsys):
    """--allow-mixed over one suite file run as written, with --max-new-tokens 4 and with another scorer: three
    sections headed "suite s", told apart only by a fingerprint. Each heading now names its settings that differ
    from another suite of the name (from the suite.json beside its results); a suite alone keeps its heading."""
    from shiq_eval.suite import content_sha256

    folders = []
    for sha, content in (
        ("a", {"name": "s", "scorer": "vader", "sampling": {"max_new_tokens": 48}}),
        ("c", {"name": "s", "scorer": "vader", "sampling": {"max_new_tokens": 4}}),
        ("d", {"name": "s", "scorer": "python:m:f", "sampling": {"max_new_tokens": 48}}),
        ("e", {"name": "t", "scorer": "vader", "sampling": {"max_new_tokens": 4}}),
    ):
        fingerprint = content_sha256(content)
        kw = {"suite_sha256": fingerprint, "suite": content["name"]}
        folder = write_results(
            tmp_path / sha,
            [
                result_row("reference", 0, "r", [1.0, 2.0, 4.0], [0.0] * 3, **kw),
                result_row(sha, 1, "m", [2.0] * 3, [1.0] * 3, **kw),
            ],
        )
        suite = {"name": "s", "sha256": fingerprint, "content": content}
        (tmp_path / sha / "suite.json").write_text(json.dumps(suite))
        folders.append(folder)
    assert eval_cli.main(["leaderboard", *folders, "--out", str(tmp_path / "o"), "--allow-mixed"]) == 0
    headings = [x for x in (tmp_path / "o" / "leaderboard.md").read_text().splitlines() if x.startswith("## ")]
    assert len(headings) == 4, headings
    ends = sorted(h.rpartition("; ")[2] for h in headings[:3])  # (suites of one name: in fingerprint order)
    assert ends == [
        "sampling.max_new_tokens=4, scorer=vader)",
        "sampling.max_new_tokens=48, scorer=python:m:f)",
        "sampling.max_new_tokens=48, scorer=vader)",
    ], headings
    assert headings[3].startswith("## suite t (") and headings[3].endswith("KL: sample)"), headings
    assert "sampling.max_new_tokens=4, scorer=vader" in (tmp_path / "o" / "leaderboard.html").read_text()
    # a suite of the name whose settings are unknown (no suite.json beside its results): a KeyError traceback,
    # nothing written; now every heading of the name keeps its fingerprint only
    (tmp_path / "c" / "suite.json").unlink()
    capsys.readouterr()
    assert eval_cli.main(["leaderboard", *folders, "--out", str(tmp_path / "o2"), "--allow-mixed"]) == 0
    headings = [x for x in (tmp_path / "o2" / "leaderboard.md").read_text().splitlines() if x.startswith("## suite s")]
    assert len(headings) == 3 and all(h.endswith("KL: sample)") for h in headings), headings
    # a suite.json nested past Python's recursion limit is unreadable like a missing one (it ended in a line
    # naming no file)
    (tmp_path / "c" / "suite.json").write_text("[" * 100_000 + "]" * 100_000)
    assert eval_cli.main(["leaderboard", *folders, "--out", str(tmp_path / "o3"), "--allow-mixed"]) == 0, (
        capsys.readouterr().err
    )
    assert (tmp_path / "o3" / "leaderboard.md").read_text().count("## suite s") == 3


def guide_row(beta, top_k, rewards, kls, **extra):
    """A Q♯ row as shiq-eval run --guide writes it: the value model's folder name as run, its weights' hash."""
    row = result_row("value", 4, "v" * 64, rewards, kls, beta=beta, top_k=top_k, **extra)
    return row | {"method": "qsharp"}


def se_np(x):
    x = np.asarray(x, dtype=np.float64)
    return x.std(ddof=1) / math.sqrt(x.size)


def test_qsharp_rows_at_another_beta_or_top_k_are_other_rows(tmp_path):
    """One value model at β 0.1 and 0.3 (top-k 20) and at β 0.1 with top-k 5: three policies, three rows
    labelled with their decoding settings; the same setting from two folders is one row; an older row without
    top_k is labelled by its β. Every number recomputed with numpy from the rows' values."""
    ref = result_row("reference", 0, "r", [1.0, 2.0, 4.0, 0.5], [0.0] * 4)
    rows = {
        (0.1, 20): ([2.0, 2.5, 4.0, 1.0], [1.0, 3.0, 2.0, 0.5]),
        (0.3, 20): ([3.0, 2.0, 5.0, 1.5], [2.0, 4.0, 3.0, 1.0]),
        (0.1, 5): ([1.5, 2.0, 3.0, 0.0], [0.5, 1.0, 1.5, 0.2]),
    }
    folders = [
        write_results(tmp_path / "b01", [ref, guide_row(0.1, 20, *rows[0.1, 20])]),
        write_results(tmp_path / "b03", [ref, guide_row(0.3, 20, *rows[0.3, 20])]),
        write_results(tmp_path / "k5", [ref, guide_row(0.1, 5, *rows[0.1, 5])]),
        write_results(tmp_path / "again", [guide_row(0.1, 20, *rows[0.1, 20])]),  # the same policy again
    ]
    out = tmp_path / "board"
    assert eval_cli.main(["leaderboard", *folders, "--out", str(out)]) == 0
    table = pd.read_csv(out / "leaderboard.csv")
    labels = {
        (0.1, 20): "value [β 0.1, top-k 20]",
        (0.3, 20): "value [β 0.3, top-k 20]",
        (0.1, 5): "value [β 0.1, top-k 5]",
    }
    assert sorted(table["run"]) == sorted(["reference", *labels.values()])  # three policies, each once
    t = table.set_index("run")
    for (beta, k), (r, kl) in rows.items():
        row = t.loc[labels[beta, k]]
        j = np.asarray(r) - beta * np.asarray(kl)
        assert (row["beta"], row["top_k"], row["method"]) == (beta, k, "qsharp")
        assert row["reward_mean"] == pytest.approx(np.mean(r)) and row["reward_stderr"] == pytest.approx(se_np(r))
        assert row["J"] == pytest.approx(j.mean()) and row["J_stderr"] == pytest.approx(se_np(j))
    pairs = pd.read_csv(out / "pairs.csv")
    pairs = {(p["run_a"], p["run_b"]): p for _, p in pairs.iterrows()}
    assert len(pairs) == 6  # every two of the four runs
    against = tmp_path / "against"  # only the pairs with the reference: the same three differences
    assert eval_cli.main(["leaderboard", *folders, "--out", str(against), "--against", "reference"]) == 0
    few = pd.read_csv(against / "pairs.csv")
    assert len(few) == 3 and all("reference" in (a, b) for a, b in zip(few["run_a"], few["run_b"]))
    for _, p in few.iterrows():
        assert p["reward_diff"] == pytest.approx(pairs[p["run_a"], p["run_b"]]["reward_diff"])
    assert eval_cli.main(["leaderboard", *folders, "--out", str(tmp_path / "x"), "--against", "refrence"]) == 2
    assert not (tmp_path / "x").exists()
    a, b = labels[0.1, 20], labels[0.1, 5]  # one β, two top-k: one objective, J compared
    p = pairs.get((a, b), pairs.get((b, a)))
    ja = np.asarray(rows[0.1, 20][0]) - 0.1 * np.asarray(rows[0.1, 20][1])
    jb = np.asarray(rows[0.1, 5][0]) - 0.1 * np.asarray(rows[0.1, 5][1])
    sign = 1 if (a, b) in pairs else -1
    assert p["J_diff"] == pytest.approx(sign * (ja - jb).mean()) and p["J_diff_stderr"] == pytest.approx(se_np(ja - jb))
    for x, y in ((labels[0.3, 20], labels[0.1, 20]), (labels[0.3, 20], labels[0.1, 5])):  # two β: no J difference
        p = pairs.get((x, y), pairs.get((y, x)))
        assert math.isnan(p["J_diff"]) and "two objectives" in p["J_note"]

    # two β equal to 6 digits are two policies, two labels (":g" printed both as 0.1 and refused them as one)
    close = [
        write_results(tmp_path / f"c{i}", [ref, guide_row(b, 20, *rows[0.1, 20])])
        for i, b in enumerate((0.1000001, 0.1000004))
    ]
    assert eval_cli.main(["leaderboard", *close, "--out", str(tmp_path / "close")]) == 0
    runs = set(pd.read_csv(tmp_path / "close" / "leaderboard.csv")["run"])
    assert {"value [β 0.1000001, top-k 20]", "value [β 0.1000004, top-k 20]"} <= runs

    # a row written before top_k was recorded: labelled by its β alone
    old = {k: v for k, v in guide_row(0.3, 20, *rows[0.3, 20]).items() if k != "top_k"}
    assert (
        eval_cli.main(["leaderboard", write_results(tmp_path / "old", [ref, old]), "--out", str(tmp_path / "o")]) == 0
    )
    assert "value [β 0.3]" in set(pd.read_csv(tmp_path / "o" / "leaderboard.csv")["run"])


def test_j_differences_only_at_one_beta(tmp_path):
    """Pairs of runs at two β report the reward difference but no J difference (a note instead); at one β, and
    against the reference (whose J is its reward at every β), the J difference is numpy's paired one."""
    r = {"ref": [1.0, 2.0, 4.0, 0.5], "a": [2.0, 2.5, 4.0, 1.0], "b": [3.0, 2.0, 5.0, 1.5], "c": [1.0, 3.0, 2.0, 2.0]}
    kl = {"ref": [0.0] * 4, "a": [1.0, 3.0, 2.0, 0.5], "b": [2.0, 4.0, 3.0, 1.0], "c": [0.5, 0.5, 1.0, 2.0]}
    beta = {"ref": None, "a": 0.5, "b": 0.1, "c": 0.5}
    rows = [result_row("reference", 0, "r", r["ref"], kl["ref"])]
    rows += [result_row(n, 3, f"m{n}", r[n], kl[n], beta=beta[n]) for n in ("a", "b", "c")]
    out = tmp_path / "board"
    assert eval_cli.main(["leaderboard", write_results(tmp_path / "x", rows), "--out", str(out)]) == 0
    pairs = pd.read_csv(out / "pairs.csv").fillna({"J_note": ""})
    j = {n: np.asarray(r[n]) - (beta[n] or 0.0) * np.asarray(kl[n]) for n in r}
    name = {"reference": "ref", "a": "a", "b": "b", "c": "c"}
    assert len(pairs) == 6
    for _, p in pairs.iterrows():
        x, y = name[p["run_a"]], name[p["run_b"]]
        d = np.asarray(r[x]) - np.asarray(r[y])
        assert p["reward_diff"] == pytest.approx(d.mean()) and p["reward_diff_stderr"] == pytest.approx(se_np(d))
        if "ref" in (x, y) or beta[x] == beta[y]:
            dj = j[x] - j[y]
            assert p["J_diff"] == pytest.approx(dj.mean()) and p["J_diff_stderr"] == pytest.approx(se_np(dj))
            assert p["J_note"] == ""
        else:
            assert math.isnan(p["J_diff"]) and math.isnan(p["J_diff_stderr"])
            assert "β" in p["J_note"] and "0.1" in p["J_note"] and "0.5" in p["J_note"]
    md = (out / "leaderboard.md").read_text()
    assert "two objectives" in md  # the note where the J difference would be


def test_one_prompt_shows_no_standard_error_rather_than_zero(tmp_path):
    """Over one prompt (or one BFCL scenario) there is no spread to measure: the tables show ``± –`` and say
    why, not ``± 0`` as if the value were exact; over two prompts the standard error is numpy's."""
    one = [result_row("reference", 0, "r", [1.0], [0.0]), result_row("a", 3, "m", [2.0], [1.0])]
    out = tmp_path / "one"
    assert eval_cli.main(["leaderboard", write_results(tmp_path / "x", one), "--out", str(out)]) == 0
    md = (out / "leaderboard.md").read_text()
    assert "| a | shiq | 0.5 | 3 | 2 ± – | 1 ± – | 1.5 ± – |" in md and "± 0" not in md
    assert "none (–) over a single prompt or scenario" in md and "2 ± –" in (out / "leaderboard.html").read_text()
    assert "| a @ 3 | reference @ 0 | 1 ± – | 0.5 ± – |" in md
    assert set(pd.read_csv(out / "leaderboard.csv")["units"]) == {1} and list(
        pd.read_csv(out / "pairs.csv")["units"]
    ) == [1]
    two = [result_row("reference", 0, "r", [1.0, 3.0], [0.0] * 2), result_row("a", 3, "m", [2.0, 4.0], [1.0] * 2)]
    assert eval_cli.main(["leaderboard", write_results(tmp_path / "y", two), "--out", str(tmp_path / "two")]) == 0
    md = (tmp_path / "two" / "leaderboard.md").read_text()
    assert f"| a | shiq | 0.5 | 3 | 3 ± {se_np([2.0, 4.0]):.2g} |" in md and "± –" not in md


def test_no_j_for_results_sampled_at_another_temperature(tmp_path):
    """Rows sampled at temperature 0.7 keep reward and KL but get no J (nor J differences), with a note; rows
    without the field count as temperature 1 and get their J."""
    r, kl = [2.0, 2.5, 4.0, 1.0], [1.0, 3.0, 2.0, 0.5]
    ref_r = [1.0, 2.0, 4.0, 0.5]
    hot = [
        result_row("reference", 0, "r", ref_r, [0.0] * 4, temperature=0.7),
        result_row("a", 3, "ma", r, kl, temperature=0.7),
    ]
    out = tmp_path / "hot"
    assert eval_cli.main(["leaderboard", write_results(tmp_path / "x", hot), "--out", str(out)]) == 0
    t = pd.read_csv(out / "leaderboard.csv").set_index("run")
    assert t.loc["a", "reward_mean"] == pytest.approx(np.mean(r)) and t.loc["a", "kl"] == pytest.approx(np.mean(kl))
    assert t["J"].isna().all() and t["J_stderr"].isna().all() and (t["temperature"] == 0.7).all()
    assert all("temperature 0.7" in note for note in t["J_note"])
    p = pd.read_csv(out / "pairs.csv").iloc[0]
    assert p["reward_diff"] == pytest.approx(np.mean(np.asarray(r) - ref_r)) and math.isnan(p["J_diff"])
    assert "temperature 0.7" in (out / "leaderboard.md").read_text()
    assert "x 1 sample; KL: sample; temperature 0.7)" in (out / "leaderboard.md").read_text()  # in the suite's heading
    assert not (out / "j_vs_step.png").exists()

    plain = [{k: v for k, v in row.items() if k != "temperature"} for row in hot]  # older rows: temperature 1
    assert eval_cli.main(["leaderboard", write_results(tmp_path / "y", plain), "--out", str(tmp_path / "cold")]) == 0
    t = pd.read_csv(tmp_path / "cold" / "leaderboard.csv").set_index("run")
    assert (t["temperature"] == 1.0).all()
    assert t.loc["a", "J"] == pytest.approx(np.mean(np.asarray(r) - 0.5 * np.asarray(kl)))
    assert t.loc["reference", "J"] == pytest.approx(np.mean(ref_r))


def clustered_se_pd(values, scenarios) -> float:
    """Standard error of the mean of per-turn values clustered by scenario (SHIQ_MATH §9), by hand from the
    scenarios' means and sizes: ``se² = G/(G−1) · Σ_c n_c² (m_c − v̄)² / N²``."""
    df = pd.DataFrame({"scenario": scenarios, "v": np.asarray(values, dtype=np.float64)})
    by = df.groupby("scenario")["v"].agg(["mean", "size"])
    g, n = len(by), len(df)
    return math.sqrt(g / (g - 1) * float(((by["size"] * (by["mean"] - df["v"].mean())) ** 2).sum())) / n


def bfcl_rows(with_ids: bool):
    """Result rows of a BFCL suite (scorer bfcl): 12 turns of 4 scenarios of 3, 2, 4 and 3 turns, 2 samples per
    turn; rewards and KLs that move together within a scenario, so clustering matters. Also the per-turn values
    (a turn's samples averaged), the turns' scenarios and each run's β."""
    scenarios = ["multi_turn_base_6"] * 3 + ["multi_turn_base_9"] * 2 + ["multi_turn_base_13"] * 4
    scenarios += ["multi_turn_base_17"] * 3
    level = {"multi_turn_base_6": 0.9, "multi_turn_base_9": 0.1, "multi_turn_base_13": 0.8, "multi_turn_base_17": 0.0}
    rng = np.random.default_rng(0)
    runs = {"reference": (0.0, None), "a": (0.1, 0.5), "b": (-0.2, 0.5)}
    rows, turn = [], {}
    for name, (shift, beta) in runs.items():
        base = np.array([level[s] for s in scenarios]) + shift * np.array([level[s] > 0.5 for s in scenarios])
        r = np.repeat(base, K) + rng.normal(0, 0.05, 12 * K)  # [turns * K], turn-major
        kl = 0.0 * r if name == "reference" else np.repeat(2 * base, K) + rng.uniform(0, 0.1, 12 * K)
        extra = {"scenario_ids": scenarios} if with_ids else {}
        row = result_row(name, 0 if name == "reference" else 5, f"m{name}", r.tolist(), kl.tolist(), **extra)
        row |= {"samples_per_prompt": K, "kl_estimator": "exact", "kls_exact": kl.tolist(), "beta": beta}
        rows.append(row)
        r_t, kl_t = r.reshape(-1, K).mean(1), kl.reshape(-1, K).mean(1)
        turn[name] = {"reward": r_t, "kl": kl_t, "J": r_t if beta is None else r_t - beta * kl_t}
    return rows, turn, scenarios


def write_bfcl_results(folder, rows, suite_json: bool = True):
    """``results.json`` and (as shiq-eval run writes it) the ``suite.json`` of the bfcl scorer beside it."""
    from shiq_eval.suite import content_sha256

    content = {"scorer": "bfcl", "name": "s"}
    sha = content_sha256(content)  # the fingerprint suite.json records beside its content
    out = write_results(folder, [r | {"suite_sha256": sha} for r in rows])
    if suite_json:
        suite = {"name": "s", "file": None, "sha256": sha, "content": content}
        (folder / "suite.json").write_text(json.dumps(suite))
    return out


def test_one_scenario_in_several_bfcl_categories_is_one_cluster(tmp_path):
    """multi_turn_base_6 and multi_turn_long_context_6 are one scenario (one initial state, one set of functions,
    nearly always the same questions): their turns were two clusters, as if independent, so the standard errors
    came out too small. The clusters are now the entries' indices; shiq-eval run clusters the same way."""
    rows, turn, scenarios = bfcl_rows(with_ids=True)
    renamed = [s.replace("multi_turn_base_13", "multi_turn_long_context_6") for s in scenarios]
    assert len(set(renamed)) == 4  # four entry ids, three scenarios
    rows = [r | {"scenario_ids": renamed} for r in rows]
    out = tmp_path / "board"
    assert eval_cli.main(["leaderboard", write_bfcl_results(tmp_path / "r", rows), "--out", str(out)]) == 0
    t = pd.read_csv(out / "leaderboard.csv").set_index("run")
    index = [s.rsplit("_", 1)[1] for s in renamed]
    for name, v in turn.items():
        assert t.loc[name, "reward_stderr"] == pytest.approx(clustered_se_pd(v["reward"], index), rel=1e-9)
        assert t.loc[name, "stderr_note"] == clustered_note(3)
    assert t.loc["a", "reward_stderr"] != pytest.approx(clustered_se_pd(turn["a"]["reward"], renamed), rel=1e-3)
    clustered = eval_cli.cluster_by_scenario(rows[1] | {"samples_per_prompt": rows[1]["samples_per_prompt"]}, renamed)
    assert clustered["reward_stderr"] == pytest.approx(clustered_se_pd(turn["a"]["reward"], index), rel=1e-9)


def test_bfcl_standard_errors_are_clustered_by_scenario(tmp_path, capsys):
    """BFCL results that keep each turn's scenario (scenario_ids, as shiq-eval run writes them for the bfcl
    scorer): every standard error, of the table and of the paired differences, equals the clustered one computed
    here with pandas from the scenarios' means (SHIQ_MATH §9), which is materially larger than the per-turn one
    here; the same results written before the ids were recorded keep the per-turn standard error, marked not
    clustered; beside a file of the same prompts that keeps them, they share its ids."""
    rows, turn, scenarios = bfcl_rows(with_ids=True)
    out = tmp_path / "board"
    assert eval_cli.main(["leaderboard", write_bfcl_results(tmp_path / "new", rows), "--out", str(out)]) == 0
    t = pd.read_csv(out / "leaderboard.csv").set_index("run")
    for name, v in turn.items():
        row = t.loc[name]
        assert row["prompts"] == 12
        for col, key in (("reward_mean", "reward"), ("kl", "kl"), ("J", "J")):
            assert row[col] == pytest.approx(v[key].mean(), abs=1e-12)
        assert row["reward_stderr"] == pytest.approx(clustered_se_pd(v["reward"], scenarios), rel=1e-9)
        assert row["J_stderr"] == pytest.approx(clustered_se_pd(v["J"], scenarios), rel=1e-9)
        if name != "reference":
            assert row["kl_stderr"] == pytest.approx(clustered_se_pd(v["kl"], scenarios), rel=1e-9)
        assert row["reward_stderr"] > 1.5 * se_np(v["reward"])  # clustering matters here
        assert row["stderr_note"] == clustered_note(4)
    pairs = pd.read_csv(out / "pairs.csv")
    assert len(pairs) == 3
    for _, p in pairs.iterrows():
        a, b = turn[p["run_a"]], turn[p["run_b"]]
        for col, key in (("reward_diff", "reward"), ("J_diff", "J")):
            d = a[key] - b[key]
            assert p[col] == pytest.approx(d.mean(), abs=1e-12)
            assert p[col + "_stderr"] == pytest.approx(clustered_se_pd(d, scenarios), rel=1e-9)
        assert p["stderr_note"] == clustered_note(4)
    ab = pairs[(pairs["run_a"] == "b") & (pairs["run_b"] == "a")].iloc[0]
    d = turn["b"]["reward"] - turn["a"]["reward"]
    assert ab["reward_diff_stderr"] > 1.5 * se_np(d)  # a − b, paired by turn: still correlated within scenarios
    md = (out / "leaderboard.md").read_text()
    assert clustered_note(4) in md and "a − b paired by turn, clustered by scenario" in md
    assert "clustered by scenario" in (out / "leaderboard.html").read_text()

    # the same results written before scenario ids were recorded: per-turn standard errors, marked
    old_rows = [{k: v for k, v in r.items() if k != "scenario_ids"} for r in rows]
    old = write_bfcl_results(tmp_path / "old", old_rows)
    assert eval_cli.main(["leaderboard", old, "--out", str(tmp_path / "old_board")]) == 0
    t = pd.read_csv(tmp_path / "old_board" / "leaderboard.csv").set_index("run")
    pairs = pd.read_csv(tmp_path / "old_board" / "pairs.csv")
    for name, v in turn.items():
        assert t.loc[name, "reward_stderr"] == pytest.approx(se_np(v["reward"]), rel=1e-9)
        assert t.loc[name, "J_stderr"] == pytest.approx(se_np(v["J"]), rel=1e-9)
        assert t.loc[name, "stderr_note"].startswith("not clustered")
    for _, p in pairs.iterrows():
        d = turn[p["run_a"]]["J"] - turn[p["run_b"]]["J"]
        assert p["J_diff_stderr"] == pytest.approx(se_np(d), rel=1e-9) and p["stderr_note"].startswith("not clustered")
    md = (tmp_path / "old_board" / "leaderboard.md").read_text()
    assert "not clustered: these BFCL results keep no scenario ids" in md and "a − b paired by prompt" in md
    # results of another scorer (no suite.json naming bfcl) need no such note
    plain = write_bfcl_results(tmp_path / "plain", old_rows, suite_json=False)
    assert eval_cli.main(["leaderboard", plain, "--out", str(tmp_path / "plain_board")]) == 0
    assert pd.read_csv(tmp_path / "plain_board" / "leaderboard.csv")["stderr_note"].isna().all()
    assert "clustered" not in (tmp_path / "plain_board" / "leaderboard.md").read_text()

    # an old file beside a new one of the same prompts: the same turns, so the same scenarios
    both = tmp_path / "both"
    newer = write_bfcl_results(tmp_path / "newer", [r | {"run": "c", "model_sha256": "mc"} for r in rows[1:2]])
    assert eval_cli.main(["leaderboard", old, newer, "--out", str(both)]) == 0
    t = pd.read_csv(both / "leaderboard.csv").set_index("run")
    assert (t["stderr_note"] == clustered_note(4)).all()
    assert t.loc["b", "reward_stderr"] == pytest.approx(clustered_se_pd(turn["b"]["reward"], scenarios), rel=1e-9)
    # ids that disagree on the same prompts, or that do not match the turns, are refused naming the files
    capsys.readouterr()
    edited = [r | {"scenario_ids": scenarios[::-1]} for r in rows[1:2]]
    edited = write_bfcl_results(tmp_path / "edited", [r | {"run": "c", "model_sha256": "mc"} for r in edited])
    assert eval_cli.main(["leaderboard", newer, edited, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "with different scenario_ids" in err and str(tmp_path / "edited" / "results.json") in err
    short = write_bfcl_results(tmp_path / "short", [r | {"scenario_ids": scenarios[:-1]} for r in rows])
    assert eval_cli.main(["leaderboard", short, "--out", str(tmp_path / "x")]) == 2
    assert "field 'scenario_ids': 11 scenarios for 24 rewards, 2 per prompt" in capsys.readouterr().err


def test_a_suite_json_whose_content_is_not_its_fingerprints_is_refused(tmp_path, capsys):
    """suite.json records the SHA-256 of its content beside it; the leaderboard read the content unchecked: a
    BFCL suite.json edited to another scorer (its sha256 kept) made BFCL turns without scenario ids pass for
    independent prompts, their standard errors no longer marked "not clustered". It is now refused naming the
    file; an unedited one is read as before."""
    rows, _, _ = bfcl_rows(with_ids=False)
    folder = Path(write_bfcl_results(tmp_path / "r", rows))
    assert eval_cli.main(["leaderboard", str(folder), "--out", str(tmp_path / "ok")]) == 0
    assert pd.read_csv(tmp_path / "ok" / "leaderboard.csv")["stderr_note"].str.startswith("not clustered").all()
    suite = json.loads((folder / "suite.json").read_text())
    suite["content"]["scorer"] = "vader"
    (folder / "suite.json").write_text(json.dumps(suite))
    capsys.readouterr()
    assert eval_cli.main(["leaderboard", str(folder), "--out", str(tmp_path / "edited")]) == 2
    err = capsys.readouterr().err
    assert str(folder / "suite.json") in err and "does not hash to its field 'sha256'" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "edited").exists()


def test_a_suite_file_reads_files_beside_it_and_runs_no_code_alone(tmp_path, monkeypatch):
    """A suite file is data passed between people: its prompts and reward_model must be files in its folder
    (``../`` or an absolute path read whatever they named), and a python:MODULE:FUNCTION scorer in it, which
    imports a module, runs only when --scorer names the same function on the command line."""
    import yaml

    from shiq_eval.suite import SuiteError, load_suite

    (tmp_path / "outside.jsonl").write_text('{"prompt": "x"}\n')
    folder = tmp_path / "suites"
    folder.mkdir()
    (folder / "p.jsonl").write_text('{"prompt": "hi"}\n')
    (folder / "link.jsonl").symlink_to(tmp_path / "outside.jsonl")
    (tmp_path / "evil.py").write_text("raise SystemExit('imported')\n")  # never imported below

    def suite_file(**settings):
        path = folder / "s.yaml"
        path.write_text(yaml.safe_dump({"prompts": "p.jsonl", "scorer": "vader", **settings}))
        return str(path)

    suite, _ = load_suite(suite_file())
    assert suite.prompts == str(folder / "p.jsonl")
    for key, value in [
        ("prompts", "../outside.jsonl"),
        ("prompts", str(tmp_path / "outside.jsonl")),
        ("prompts", "link.jsonl"),
        ("reward_model", "/etc/passwd"),
    ]:
        with pytest.raises(SuiteError, match=f"{key} '{re.escape(value)}' is outside the suite's folder"):
            load_suite(suite_file(**{key: value, "scorer": "reward_model"}))
    with pytest.raises(SuiteError, match=re.escape("prompts 'p.jsonl\\x00' holds a NUL character: not a file name")):
        load_suite(suite_file(prompts="p.jsonl\0"))
    # the flag may name any file: the user typed it
    flagged, _ = load_suite(suite_file(prompts="../outside.jsonl"), {"prompts": str(tmp_path / "outside.jsonl")})
    assert flagged.prompts == str(tmp_path / "outside.jsonl")

    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SuiteError, match=r"scorer python:evil:f imports and runs Python code.*--scorer python:evil:f"):
        load_suite(suite_file(scorer="python:evil:f"))
    with pytest.raises(SuiteError, match="scorer python:evil:f imports"):
        load_suite(suite_file(scorer="python:evil:f"), {"scorer": "python:scorer_functions:one_short"})
    spec = "python:scorer_functions:one_short"
    assert load_suite(suite_file(scorer=spec), {"scorer": spec})[0].scorer == spec  # named twice: runs


def test_a_leaderboard_that_fails_half_way_leaves_the_earlier_one_whole(tmp_path, capsys, monkeypatch):
    """A second leaderboard into the same folder whose plot cannot be made: before, its CSV and Markdown were
    already replaced while the HTML and PNGs stayed the first one's. Now all or nothing; the folder's other
    files are never touched, and no staging folder is left."""
    from shiq_eval import leaderboard

    rows = [result_row("reference", 0, "r", [1.0, 2.0], [0.0] * 2), result_row("a", 3, "m1", [2.0, 3.0], [1.0, 2.0])]
    x = write_results(tmp_path / "x", rows)
    out = tmp_path / "lb"
    assert eval_cli.main(["leaderboard", x, "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"leaderboard.csv", "leaderboard.md", "leaderboard.html", "pairs.csv"} <= before.keys()
    y = write_results(tmp_path / "y", [*rows, result_row("b", 3, "m2", [5.0, 6.0], [1.0, 1.0])])

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(leaderboard, "plot_j_vs_step", broken)
    capsys.readouterr()
    assert eval_cli.main(["leaderboard", x, y, "--out", str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    assert eval_cli.main(["leaderboard", x, y, "--out", str(out)]) == 0
    assert "b" in set(pd.read_csv(out / "leaderboard.csv")["run"]) and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    # a later leaderboard with no J (sampled at temperature 0.5): the earlier J plot goes with the earlier set
    assert (out / "j_vs_step.png").exists()
    cool = [{**r, "temperature": 0.5} for r in rows]
    cool_args = ["leaderboard", write_results(tmp_path / "cool", cool), "--out", str(out), "--overwrite"]
    assert eval_cli.main(cool_args) == 0  # (other results than x and y's: --overwrite)
    assert not (out / "j_vs_step.png").exists() and (out / "notes.txt").read_text() == "mine"
    # the leaderboard's plots have the names of a run's own: --out a results folder would replace them
    for folder in (x, y):
        assert eval_cli.main(["leaderboard", x, y, "--out", folder]) == 2
        assert "--out" in capsys.readouterr().err and sorted(p.name for p in Path(folder).iterdir()) == ["results.json"]
    # the folders the failed call made are removed again, its parents too
    monkeypatch.setattr(leaderboard, "plot_j_vs_step", broken)
    assert eval_cli.main(["leaderboard", x, "--out", str(tmp_path / "new" / "lb")]) == 2
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "field,value,kind",
    [
        ("step", None, "an integer >= 0"),
        ("step", "3", "an integer >= 0"),
        ("run", 5, "a non-empty string"),
        ("method", ["shiq"], "a non-empty string"),
        ("suite_sha256", None, "a string"),
        ("beta", "0.5", "null or a number in (0, 1e100]"),
        ("beta", -1.0, "null or a number in (0, 1e100]"),
        ("beta", 1e308, "null or a number in (0, 1e100]"),  # J = reward - β·KL was -inf, written as such
        ("samples_per_prompt", 1.5, "an integer >= 1"),
        ("samples_per_prompt", None, "an integer >= 1"),
        ("kl_estimator", "foo", "'exact' or 'sample'"),
        ("rewards", {"a": 1}, "a non-empty list of numbers in [-1e100, 1e100]"),
        ("rewards", [1.0, 10**400], "a non-empty list of numbers in [-1e100, 1e100]"),
        ("rewards", [1e308, 1e308], "a non-empty list of numbers in [-1e100, 1e100]"),  # their mean overflowed
        ("rewards", [], "a non-empty list of numbers in [-1e100, 1e100]"),  # no mean: numpy's shape error, no row
        ("temperature", [1], "null or a number in (0, 1e100]"),
        ("run", "a\ud800", "a non-empty string"),  # a lone surrogate: no UTF-8 to write it in
        ("model_sha256", 7, "a string or null"),
        ("scenario_ids", {"a": 1}, "null or a list of strings"),  # named the run and step, not the row or field
        ("scenario_ids", ["e0", 1], "null or a list of strings"),
    ],
)
def test_a_result_row_of_the_wrong_kind_is_refused_naming_file_row_and_field(tmp_path, capsys, field, value, kind):
    """A hand-edited results.json: each of these ended in a TypeError traceback (some after leaderboard.csv was
    written), or was taken silently (samples_per_prompt 1.5 read as 1: wrong standard errors; an unknown KL
    estimator). Now one line naming the file, row and field, and nothing written."""
    rows = [result_row("reference", 0, "r", [1.0, 2.0], [0.0] * 2), result_row("a", 3, "m1", [2.0, 3.0], [1.0, 2.0])]
    rows[1][field] = value
    x = write_results(tmp_path / "x", rows)
    assert eval_cli.main(["leaderboard", x, "--out", str(tmp_path / "lb")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"results.json: row 1: field '{field}': must be {kind}" in err, err
    assert not (tmp_path / "lb").exists()


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("kls_sample", [1.0], "field 'kls_sample': 1 values for 2 rewards"),
        ("scenario_ids", ["e0"], "field 'scenario_ids': 1 scenarios for 2 rewards, 1 per prompt"),
    ],
)
def test_lists_of_another_length_are_refused_naming_their_file(tmp_path, capsys, field, value, needle):
    """A row whose KL or scenario list does not match its rewards: named in its own file and row (the scenario
    ids were checked against the prompt set's first file, which was named instead; the KL gave numpy's shape
    error naming no file)."""
    good = [result_row("reference", 0, "r", [1.0, 2.0], [0.0] * 2, scenario_ids=["e0", "e1"])]
    bad = [result_row("a", 3, "m1", [2.0, 3.0], [1.0, 2.0], scenario_ids=["e0", "e1"])]
    bad[0][field] = value
    x, y = write_results(tmp_path / "x", good), write_results(tmp_path / "y", bad)
    assert eval_cli.main(["leaderboard", x, y, "--out", str(tmp_path / "lb")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{tmp_path / 'y' / 'results.json'}: row 0: {needle}" in err, err


def test_a_killed_writers_staging_folder_is_removed_by_the_next_write(tmp_path):
    """A set of files killed while it was staged (shiq-eval run, a leaderboard) left ``.staged.*.tmp`` in its
    --out for good, however large; the next write into the folder removes the staging folders of processes
    that are gone, and not another live writer's."""
    import os
    import socket
    import subprocess
    import sys

    from shiq_data.io import files_together

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname().replace("-", "_")
    dead = tmp_path / f".staged-{host}-{int(gone.stdout)}-k2j4x.tmp"
    kept = [
        tmp_path / f".staged-{host}-{os.getpid()}-a8b9c.tmp",  # a live writer
        tmp_path / f".staged-{host}x-{int(gone.stdout)}-a8b9c.tmp",  # another machine's (its pid means nothing here)
        tmp_path / f".staged-{host}-{10**12}-a8b9c.tmp",  # beyond any pid: not ours to judge (it raised)
    ]
    for stage in (dead, *kept):
        stage.mkdir()
        (stage / "results.json").write_text("[")
    with files_together(tmp_path, owns=["a.txt"]) as stage:
        (stage / "a.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(p.name for p in kept), "a.txt"])


def test_a_plot_of_more_lines_than_a_legend_holds_says_so_instead():
    """400 runs drew a 400-entry legend, 9,223 pixels tall; beyond 30 lines the plot says how many there are."""
    from shiq_eval import report

    rows = [
        {"run": f"r{i}", "method": "shiq", "step": 1, "kl": float(i), "reward_mean": 1.0, "reward_stderr": 0.1}
        for i in range(31)
    ]
    plt = report._pyplot()
    for n, legend in ((30, True), (31, False)):
        captured = {}
        real = report._savefig
        report._savefig = lambda fig, path: captured.setdefault("ax", fig.axes[0])
        try:
            report.plot_curves(rows[:n], "/nonexistent", kl_key="kl")
        finally:
            report._savefig = real
        ax = captured["ax"]
        assert (ax.get_legend() is not None) == legend
        assert any(f"{n} lines" in t.get_text() for t in ax.texts) != legend
    plt.close("all")


def test_a_plot_caught_by_a_glob_is_named_as_not_a_result(tmp_path, capsys):
    """``leaderboard g/*`` over folders that hold plots too: the plot was reported as "not valid JSON"."""
    plot = tmp_path / "reward_vs_kl.png"
    plot.write_bytes(b"\x89PNG\r\n")
    assert eval_cli.main(["leaderboard", str(plot), "--out", str(tmp_path / "o")]) == 2
    assert f"{plot}: not an --out folder of shiq-eval run nor a results file (" in capsys.readouterr().err
    named = tmp_path / "results-old"  # a results file under another name, without a suffix: read as before
    named.write_text(json.dumps([result_row("a", 1, "m", [1.0, 2.0], [0.5, 0.5])]))
    assert eval_cli.main(["leaderboard", str(named), "--out", str(tmp_path / "o")]) == 0


def test_runs_sort_by_the_numbers_in_their_labels():
    """``run10`` came before ``run2`` (labels compared as text)."""
    from shiq_eval.leaderboard import _natural

    labels = ["run10", "run2", "run1", "lr0.3", "lr0.25", "a", "run2x", "10run"]
    assert sorted(labels, key=_natural) == ["10run", "a", "lr0.25", "lr0.3", "run1", "run2", "run2x", "run10"]


def test_two_labels_of_one_number_stay_two_runs_in_a_fixed_order(tmp_path):
    """run1 and run01 read as one number: their steps were interleaved in the table, and which was a and
    which b in their paired difference followed the order of the folders on the command line."""
    x = write_results(tmp_path / "x", [result_row("run01", s, f"x{s}", [1.0, 2.0, 3.0], [0.1] * 3) for s in (1, 2)])
    y = write_results(tmp_path / "y", [result_row("run1", s, f"y{s}", [2.0, 2.0, 4.0], [0.1] * 3) for s in (1, 2)])
    tables = []
    for order in ((x, y), (y, x)):
        out = tmp_path / f"o{len(tables)}"
        assert eval_cli.main(["leaderboard", *order, "--out", str(out)]) == 0
        tables.append((pd.read_csv(out / "leaderboard.csv")[["run", "step"]], pd.read_csv(out / "pairs.csv")))
    assert tables[0][0]["run"].tolist() == ["run01", "run01", "run1", "run1"]
    assert tables[0][0].equals(tables[1][0]) and tables[0][1][["run_a", "run_b", "reward_diff"]].equals(
        tables[1][1][["run_a", "run_b", "reward_diff"]]
    )


def test_against_says_which_suite_it_leaves_without_pairs(tmp_path, capsys):
    rows = [result_row("a", 1, "ma", [1.0, 2.0], [0.5] * 2), result_row("b", 1, "mb", [2.0, 2.0], [0.5] * 2)]
    other = [{**r, "suite": "t", "suite_sha256": "c" * 64, "run": r["run"] + "2"} for r in rows]
    folders = [write_results(tmp_path / "s", rows), write_results(tmp_path / "t", other)]
    args = ["leaderboard", *folders, "--out", str(tmp_path / "o"), "--allow-mixed", "--against", "a"]
    assert eval_cli.main(args) == 0
    assert "suite t (fingerprint cccccccccccc) holds none of the --against runs" in capsys.readouterr().err
    assert len(pd.read_csv(tmp_path / "o" / "pairs.csv")) == 1


def test_a_leaderboard_of_other_results_or_another_tools_files_is_not_replaced_unasked(tmp_path, capsys):
    """--out holding a leaderboard was silently replaced, whatever it was built from, while shiq-eval run refuses
    an earlier run's results without --overwrite. A leaderboard built from these result files, or some of them
    (regenerated as results come in), is still replaced, said in the closing line; one built from other results
    only with --overwrite; files of a leaderboard's names that are not one of this command's never: one line,
    exit 2, nothing written."""
    rows = [result_row("reference", 0, "r", [1.0, 2.0], [0.0] * 2), result_row("a", 3, "m1", [2.0, 3.0], [1.0, 2.0])]
    x = write_results(tmp_path / "x", rows)
    y = write_results(tmp_path / "y", [rows[0], result_row("b", 3, "m2", [5.0, 6.0], [1.0, 1.0])])
    out = tmp_path / "lb"
    assert eval_cli.main(["leaderboard", x, "--out", str(out)]) == 0
    assert "replaced" not in capsys.readouterr().out
    assert eval_cli.main(["leaderboard", x, "--out", str(out)]) == 0  # the same inputs: regenerated
    assert "replaced the earlier one" in capsys.readouterr().out
    assert eval_cli.main(["leaderboard", x, y, "--out", str(out)]) == 0  # more results: regenerated
    assert "replaced the earlier one" in capsys.readouterr().out
    files = lambda folder: {p.name: p.read_bytes() for p in folder.iterdir()}  # noqa: E731
    before = files(out)
    assert eval_cli.main(["leaderboard", y, "--out", str(out)]) == 2  # x's rows would be lost
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds a leaderboard of other results" in err, err
    assert f"{Path(x).resolve() / 'results.json'}" in err and "--overwrite" in err, err
    assert files(out) == before
    assert eval_cli.main(["leaderboard", y, "--out", str(out), "--overwrite"]) == 0
    assert set(pd.read_csv(out / "leaderboard.csv")["run"]) == {"reference", "b"}
    # files of a leaderboard's names that are not a leaderboard of this command: refused even with --overwrite
    for name, text in (("leaderboard.md", "# my notes"), ("leaderboard.csv", "model,score\nm,1\n")):
        mine = tmp_path / f"mine-{name}"
        mine.mkdir()
        (mine / name).write_text(text)
        for extra in ([], ["--overwrite"]):
            assert eval_cli.main(["leaderboard", x, "--out", str(mine), *extra]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and f"--out {mine}" in err and "another folder" in err, err
            assert files(mine) == {name: text.encode()}


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("command", ["leaderboard", "run"])
def test_an_out_the_system_will_not_make_or_write_is_refused_naming_it(
    tmp_path, capsys, monkeypatch, command, existing
):
    """An --out the system will not make or write into (no permission, a read-only file system, /proc/x) ended
    in the bare OS error, "[Errno 13] Permission denied: '.../lb'" (shiq-eval run: once the reference's first
    batch had been sampled); now one line naming --out before any other work, and nothing left behind."""
    x = write_results(tmp_path / "x", [result_row("reference", 0, "r", [1.0, 2.0], [0.0] * 2)])
    out = tmp_path / "locked" / "lb"
    if existing:
        out.mkdir(parents=True)
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):  # the OS refuses to make --out, or anything inside it
        if Path(path) == out or Path(path).parent == out:
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    # (run: a checkpoint that does not exist, which would be named were --out not refused first)
    argv = ["leaderboard", x] if command == "leaderboard" else ["run", str(tmp_path / "no_run"), "--movie-prompts", "2"]
    assert eval_cli.main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    doing = "write into" if existing else "make"
    assert err == f"shiq-eval: error: --out {out}: cannot {doing} the folder (Permission denied)\n", err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("command", ["leaderboard", "run"])
def test_an_out_inside_a_model_folder_is_refused_as_one_inside_a_buffer(tmp_path, capsys, command):
    """An --out inside a Hugging Face model folder, a checkpoint step or a Q♯ value model was written there: files
    of the model from then on (shipped with it; gone with a step shiq-train removes), while one inside a buffer was
    refused. Now refused in one line naming the folder, nothing written; a folder whose config.json is not a
    model's (a project's own) is no model."""
    x = write_results(tmp_path / "x", [result_row("reference", 0, "r", [1.0, 2.0], [0.0] * 2)])
    models = {
        "the model folder": {"config.json": '{"model_type": "llama"}', "model.safetensors": "w"},
        "the checkpoint step": {"meta.json": "{}", "rank_tp0_pp0_dp0.pt": "w"},
        "the Q♯ value model": {"value_model.json": "{}", "value_model.pt": "w"},
    }
    for kind, files in models.items():
        folder = tmp_path / kind.split()[-1]
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        out = folder / "evals" / "lb"
        argv = (
            ["leaderboard", x]
            if command == "leaderboard"
            else ["run", str(tmp_path / "no_run"), "--movie-prompts", "2"]
        )
        assert eval_cli.main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == f"shiq-eval: error: --out {out} is inside {kind} {folder}: choose a folder outside it\n", err
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    project = tmp_path / "project"  # a config.json of another kind beside weights: not a model folder
    project.mkdir()
    (project / "config.json").write_text('{"lr": 0.1}')
    (project / "head.safetensors").write_text("w")
    if command == "leaderboard":
        assert eval_cli.main(["leaderboard", x, "--out", str(project / "lb")]) == 0


@pytest.mark.parametrize("command", ["leaderboard", "run"])
def test_an_out_that_is_a_buffer_or_inside_one_is_refused(tmp_path, capsys, command):
    """Results, a leaderboard's tables or plots written into a buffer's folder would be files the buffer neither
    lists nor checks: the folder itself and one inside it are refused in one line, before any other work (here a
    checkpoint that does not exist, which would be named otherwise), and nothing is written."""
    from shiq_data.buffer import FORMAT

    x = write_results(tmp_path / "x", [result_row("reference", 0, "r", [1.0, 2.0], [0.0] * 2)])
    buf = tmp_path / "buf"
    buf.mkdir()
    (buf / "manifest.json").write_text(json.dumps({"format": FORMAT}))  # what marks a buffer's folder
    argv = ["leaderboard", x] if command == "leaderboard" else ["run", str(tmp_path / "no_run"), "--movie-prompts", "2"]
    for out, where in ((buf, "is the buffer"), (buf / "evals" / "lb", f"is inside the buffer {buf}")):
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        assert eval_cli.main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == f"shiq-eval: error: --out {out} {where}: choose a folder outside it\n", err
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_leaderboard_built_from_relative_paths_is_replaced_only_by_its_own_results(tmp_path, monkeypatch, capsys):
    """leaderboard.csv kept each result file as given: a relative path, read again from another working folder
    by the check of an earlier leaderboard, named other files. The same results given as an absolute path from
    elsewhere were refused as other results, and other results under the same relative path replaced the
    leaderboard without --overwrite. The sources are now written as absolute paths."""
    rows = [result_row("reference", 0, "r", [1.0, 2.0], [0.0] * 2), result_row("a", 3, "m1", [2.0, 3.0], [1.0, 2.0])]
    write_results(tmp_path / "A" / "x", rows)
    write_results(tmp_path / "B" / "x", [rows[0], result_row("b", 3, "m2", [5.0, 6.0], [1.0, 1.0])])
    out = tmp_path / "lb"
    monkeypatch.chdir(tmp_path / "A")
    assert eval_cli.main(["leaderboard", "x", "--out", str(out)]) == 0
    assert set(pd.read_csv(out / "leaderboard.csv")["source"]) == {str(tmp_path / "A" / "x" / "results.json")}
    monkeypatch.chdir(tmp_path)  # the same results from elsewhere: regenerated
    assert eval_cli.main(["leaderboard", str(tmp_path / "A" / "x"), "--out", str(out)]) == 0
    assert "replaced the earlier one" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path / "B")  # other results under the same relative path: refused, nothing written
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert eval_cli.main(["leaderboard", "x", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a leaderboard of other results" in err and str(tmp_path / "A" / "x" / "results.json") in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def bounded_by_hand(values) -> bool:
    """Each value a real number (not a bool) that is finite and within ±1e100, one at a time."""
    for x in values:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return False
        try:
            if not (math.isfinite(x) and abs(x) <= 1e100):
                return False
        except OverflowError:  # an integer beyond the float range
            return False
    return True


def test_result_values_are_checked_as_one_array_and_refused_as_before(tmp_path, monkeypatch):
    """A leaderboard reads every completion's reward and KL of every folder: one Python call per value was most
    of its time over a hundred folders of 5,000 prompts (3 million values). A list of floats is now checked as one
    array: the per-value check runs only for the row's single numbers (β, temperature), and every list, good or
    bad, gets the answer of a check by hand."""
    from shiq_eval import leaderboard

    n = 2000
    rewards = [float(i % 7) / 3 for i in range(n)]
    kls = [float(i % 5) / 11 for i in range(n)]
    rows = [result_row("reference", 0, "r", rewards, [0.0] * n), result_row("a", 3, "m1", rewards, kls)]
    folder = write_results(tmp_path / "x", rows)
    calls = []
    real = leaderboard.is_bounded_number
    monkeypatch.setattr(leaderboard, "is_bounded_number", lambda x: calls.append(x) or real(x))
    read = leaderboard.read_results([folder])
    assert [r["rewards"] for r in read] == [rewards, rewards]
    assert len(calls) <= 4, len(calls)  # β of row 1 (row 0's is null), and no temperature: not 2 x 2 x 2,000
    monkeypatch.setattr(leaderboard, "is_bounded_number", real)
    cases = [
        [1.0, 2.5, -3e99],
        [1e100, -1e100],
        [1.0, 1.0000001e100],
        [1.0, float("nan")],
        [float("inf")],
        [-float("inf"), 0.0],
        [1, 2.0],
        [True, 1.0],
        [1.0, "2"],
        [1.0, None],
        [10**400, 1.0],
        [np.float64(2.0), 1.0],
        [np.float64("nan")],
        [],
    ]
    for values in cases:
        assert leaderboard.bounded_numbers(values) == bounded_by_hand(values), values


def test_the_reference_repeated_in_every_folder_is_serialised_once_per_folder(tmp_path, capsys, monkeypatch):
    """Every results folder holds the reference's row, and each repeat was compared with the first by turning
    both into JSON, up to twice: four serialisations of the first's values per folder. The first's is now made
    once, so six folders cost one for it and one for each of the five repeats; the table and what is said on
    stderr are the same."""
    from shiq_eval import leaderboard

    ref = result_row("reference", 0, "r", [1.0, 2.0, 3.0], [0.0] * 3)
    folders = [
        write_results(tmp_path / f"f{i}", [ref, result_row(f"run{i}", 1, f"m{i}", [1.5, 2.0, 3.0 + i], [0.5] * 3)])
        for i in range(6)
    ]
    calls = []
    real = leaderboard._measured
    monkeypatch.setattr(leaderboard, "_measured", lambda row: calls.append(row["source"]) or real(row))
    table, pairs = leaderboard.build(leaderboard.read_results(folders))
    assert len(calls) == 6, calls  # the first folder's reference once, then each of the 5 repeats once
    assert [t["run"] for t in table] == ["reference"] + [f"run{i}" for i in range(6)]
    assert len(pairs) == 7 * 6 // 2
    assert capsys.readouterr().err == ""  # the repeats agree: nothing said
