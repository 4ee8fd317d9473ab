"""The main job (``shiq-demo``): configuration handling, buffer rows, and the quick end-to-end run."""

import csv
import hashlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from shiq_eval.recipes import demo


def test_config_quick_and_overrides():
    full = demo.load_config()
    quick = demo.load_config(quick=True)
    assert quick["train"]["steps"] < full["train"]["steps"]
    assert quick["train"]["methods"] == full["train"]["methods"]  # quick keeps every method
    cfg = demo.load_config(overrides=["train.steps=120", "train.methods=[shiq,dpo]"])
    assert cfg["train"]["steps"] == 120 and cfg["train"]["methods"] == ["shiq", "dpo"]


def test_full_runs_every_method_at_every_beta_of_its_grid_once_per_seed():
    assert "full" not in demo.load_config()
    cfg = demo.load_config(full=True)
    runs = demo.full_runs(cfg)
    assert [name for name, _ in runs] == [f"seed{s}" for s in cfg["full"]["seeds"]]
    for name, c in runs:
        assert c["seed"] == int(name[len("seed") :])
        arms = c["train"]["methods"]
        expected = [(m, float(b)) for m, betas in cfg["full"]["betas"].items() for b in betas]
        assert [(a.partition("@")[0], demo.arm_beta(c, a)) for a in arms] == expected
        assert set(cfg["train"]["methods"]) <= {a.partition("@")[0] for a in arms}  # every default method
        assert {"shiq_init", "shiq_ms", "shiq_tk", "shiq-single", "dro_v-single"} <= {a.partition("@")[0] for a in arms}
        assert c["train"]["steps"] == cfg["train"]["steps"]  # the same training budget as the default
        assert c["train"]["eval_every"] == cfg["full"]["eval_every"] < c["train"]["steps"]  # a curve, not a point
        assert c["eval"]["validation_prompts"] == cfg["full"]["validation_prompts"]
        assert c["train"]["keep_checkpoints"] is cfg["full"]["keep_checkpoints"] is False  # 51 trained arms: ~33 GB
    assert cfg["seed"] == demo.load_config()["seed"]  # expanding does not change the loaded config
    with pytest.raises(ValueError, match="exclude each other"):
        demo.load_config(quick=True, full=True)
    one = demo.load_config(overrides=["train.methods=[shiq@0.05,dpo]"])
    assert demo.arm_beta(one, "shiq@0.05") == 0.05 and demo.arm_beta(one, "dpo") == one["methods"]["dpo"]["beta"]


@pytest.mark.parametrize("arm", ["../../elsewhere", "/tmp", "a/b", "..", ""])
def test_full_report_refuses_an_arm_name_that_is_a_path(tmp_path, arm):
    """The study's report reads each arm's files under ``runs/<arm>``, the arm named by a seed's report.json: an
    edited report could have it read files outside the run. A name that is not one folder is refused."""
    (tmp_path / "seed0").mkdir()
    (tmp_path / "seed0" / "report.json").write_text(json.dumps({"methods": {arm: {}}, "reference": {}}))
    with pytest.raises(ValueError, match=r"seed0/report.json: method .* is not an arm's name"):
        demo.full_report(tmp_path, ["seed0"])


def test_full_report_aggregates_seeds_and_picks_each_methods_best_beta(tmp_path):
    """full_report against numpy on hand-made per-seed reports: seed means, seed s.d. (ddof 1), mean
    within-seed s.e., the gain share (J - J_ref) / (J* - J_ref) and the best β by mean share."""
    rng = np.random.default_rng(0)
    star_se = np.random.default_rng(1)  # J*'s within-seed s.e. (its own stream: the other draws are unchanged)
    arms = ["shiq@0.1", "shiq@1", "dpo@0.1", "shiq-single@0.1"]
    per = {}
    for seed in ("seed0", "seed1", "seed2"):
        methods = {}
        for arm in arms:
            v = rng.normal(size=9)
            methods[arm] = {
                "beta": float(arm.partition("@")[2]),
                "reward_mean": v[0],
                "reward_stderr": abs(v[1]),
                "gold_mean": v[2],
                "kl": abs(v[3]),
                "J": v[4],
                "J_stderr": abs(v[5]),
                "J_minus_reference": v[6],
                "J_minus_reference_stderr": abs(v[7]),
                "reference_reward_on_these_prompts": 0.1,
                "j_star": 0.1 + abs(v[8]) + 0.5,
                "j_star_stderr": float(star_se.uniform(0.01, 0.5)),
                "gold_stderr": float(star_se.uniform(0.01, 0.5)),
                "kl_stderr": float(star_se.uniform(0.01, 0.5)),
            }
        per[seed] = methods
        for arm in arms:  # per-prompt values for the paired comparisons (tested on their own below)
            (tmp_path / seed / "runs" / arm).mkdir(parents=True)
            curve = [{"step": 60, **{k: rng.normal(size=4).tolist() for k in ("rewards", "gold", "kls_exact")}}]
            (tmp_path / seed / "runs" / arm / "curve.json").write_text(json.dumps(curve))
        rep = {"methods": methods, "reference": {"reward_mean": rng.normal(), "gold_mean": 0.1}, "timings": {"a": 60.0}}
        rep["config"] = {"eval": {"samples_per_prompt": 1}}
        steps = (0, 30) if seed == "seed2" else (0, 30, 60)  # an unfinished seed: means over the seeds that have a step
        rep["curves"] = [
            {"method": arm, "step": step, "beta": methods[arm]["beta"]}
            | {k: float(rng.normal()) for k in ("reward_mean", "kl_exact", "J")}
            for arm in arms
            for step in steps
        ]
        (tmp_path / seed / "report.json").write_text(json.dumps(rep))
    out = demo.full_report(tmp_path, list(per))
    rows = {r["arm"]: r for r in out["arms"]}
    assert set(rows) == set(arms) and out["seconds"] == 180.0
    md_lines = (tmp_path / "full_report.md").read_text().splitlines()
    for arm in arms:
        ms = [per[s][arm] for s in per]
        share = np.array([(m["J_minus_reference"]) / (m["j_star"] - 0.1) for m in ms])
        r = rows[arm]
        assert r["seeds"] == 3 and r["method"] == arm.partition("@")[0]
        assert r["reward_mean"] == pytest.approx(np.mean([m["reward_mean"] for m in ms]))
        assert r["reward_mean_sd"] == pytest.approx(np.std([m["reward_mean"] for m in ms], ddof=1))
        assert r["reward_mean_se"] == pytest.approx(np.mean([m["reward_stderr"] for m in ms]))
        assert r["J_minus_reference_se"] == pytest.approx(np.mean([m["J_minus_reference_stderr"] for m in ms]))
        assert r["gain_share"] == pytest.approx(share.mean()) and r["gain_share_sd"] == pytest.approx(share.std(ddof=1))
        # J*'s cell carries the mean within-seed s.e. like J's (it showed the seeds' s.d. alone)
        star = np.array([m["j_star"] for m in ms])
        se = sum(m["j_star_stderr"] for m in ms) / len(ms)
        assert r["j_star_se"] == pytest.approx(se)
        method, beta = arm.partition("@")[::2]
        line = next(x for x in md_lines if re.match(rf"\| {re.escape(method)}( \*\*)? \| {beta} \| 3 \|", x))
        assert line.split(" | ")[8] == f"{star.mean():.3f} ± {star.std(ddof=1):.3f} [{se:.3f}]", line
        for col, key, se_key in ((4, "gold_mean", "gold_stderr"), (5, "kl", "kl_stderr")):  # so do gold's and KL's
            v, e = np.array([m[key] for m in ms]), np.mean([m[se_key] for m in ms])
            assert r[f"{key}_se"] == pytest.approx(e)
            assert line.split(" | ")[col] == f"{v.mean():.3f} ± {v.std(ddof=1):.3f} [{e:.3f}]", (col, line)
    best_shiq = max(("shiq@0.1", "shiq@1"), key=lambda a: rows[a]["gain_share"])
    assert out["best_beta"] == {"shiq": rows[best_shiq]["beta"], "dpo": 0.1, "shiq-single": 0.1}
    # an arm whose J* is not above the reference's J has no gain share: it was kept as the best when it came
    # first (x > nan is never true); it ranks last now, and its share is null (full_report.json held NaN, which
    # standard JSON cannot hold)
    for seed in per:  # the first arm of the method
        rep = json.loads((tmp_path / seed / "report.json").read_text())
        rep["methods"]["shiq@0.1"]["j_star"] = rep["methods"]["shiq@0.1"]["reference_reward_on_these_prompts"]
        if seed == "seed0":  # a report without J*'s s.e.: the mean over seeds is undefined, null, shown as –
            del rep["methods"]["shiq@0.1"]["j_star_stderr"]
        (tmp_path / seed / "report.json").write_text(json.dumps(rep))
    again = demo.full_report(tmp_path, list(per))
    assert {r["arm"]: r for r in again["arms"]}["shiq@0.1"]["gain_share"] is None
    strict = json.loads((tmp_path / "full_report.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert {r["arm"]: r for r in strict["arms"]}["shiq@0.1"]["gain_share"] is None
    assert {r["arm"]: r for r in strict["arms"]}["shiq@0.1"]["j_star_se"] is None
    line = next(x for x in (tmp_path / "full_report.md").read_text().splitlines() if x.startswith("| shiq | 0.1 |"))
    assert line.split(" | ")[8].endswith(" [–]"), line
    for r in strict["arms"]:  # a full report written before j_star_se: its table is still made
        del r["j_star_se"]
    assert "| shiq | 0.1 | 3 |" in demo.full_report_markdown(strict)
    assert "| shiq | 0.1 | 3 |" in (md := (tmp_path / "full_report.md").read_text()) and "n/a (J* ≤ J_ref)" in md
    assert again["best_beta"]["shiq"] == 1.0
    for name in ("full_report.json", "full_report.md", "frontier.png", "frontier_variants.png", "frontier_gold.png"):
        assert (tmp_path / name).is_file()
    # the checkpoints across seeds: every arm's, drawn for each frontier method at its best β
    for arm in arms:
        for step in (0, 30, 60):
            got = [c for c in out["curves"] if c["method"] == arm and c["step"] == step]
            have = [r for s in per for r in json.loads((tmp_path / s / "report.json").read_text())["curves"]]
            want = [r for r in have if r["method"] == arm and r["step"] == step]
            assert len(got) == 1 and got[0]["seeds"] == len(want) == (2 if step == 60 else 3)
            for k in ("reward_mean", "kl_exact", "J"):
                assert got[0][k] == pytest.approx(np.mean([r[k] for r in want]))
                assert got[0][f"{k.replace('_mean', '')}_sd"] == pytest.approx(np.std([r[k] for r in want], ddof=1))
    assert out["curve_arms"] == sorted({f"shiq@{rows[best_shiq]['beta']:g}", "dpo@0.1"})
    for name in ("reward_vs_kl.png", "reward_vs_step.png", "j_vs_step.png"):
        assert (tmp_path / name).is_file()
    assert "| dpo@0.1 | 60 | 2 |" in (tmp_path / "full_report.md").read_text()
    assert "| shiq-single ** | 0.1 | 3 |" in (tmp_path / "full_report.md").read_text()
    pairs = [(c["a"], c["b"]) for c in out["comparisons"]]
    assert pairs == [("shiq@0.1", "dpo@0.1"), ("shiq-single@0.1", "shiq@0.1"), ("shiq-single@0.1", "dpo@0.1")]
    assert "| shiq-single@0.1 | dpo@0.1 | 0.1 | 3 |" in (tmp_path / "full_report.md").read_text()
    assert out["matched_kl"] == demo.matched_kl_comparisons(tmp_path, list(per), {a: rows[a]["kl"] for a in arms})
    demo.check_study_folder(tmp_path, demo.FULL_FILES)  # what it wrote is what a rerun may replace


def test_full_refuses_an_out_of_other_files_before_anything_is_made(tmp_path, capsys):
    """--full ran its seeds in DIR/seed<N> and wrote its report and figures (frontier.png, ...) among the files
    of any DIR, replacing those of the same name; a folder holding one run would mix it with the seeds'."""
    out = tmp_path / "home"
    out.mkdir()
    (out / "frontier.png").write_bytes(b"mine")
    (out / "notes.txt").write_text("mine")
    assert demo.main(["--full", "--out", str(out)]) == 2
    assert "holds files (notes.txt) that a study of seeds does not write" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["frontier.png", "notes.txt"]
    assert (out / "frontier.png").read_bytes() == b"mine"
    (out / "notes.txt").unlink()
    (out / "config.json").write_text("{}")
    assert demo.main(["--full", "--out", str(out)]) == 2
    assert "holds one run (config.json, stages.json), not a study of seeds" in capsys.readouterr().err
    assert demo.main(["--full", "--out", str(out / "frontier.png")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_a_gain_is_beyond_two_standard_errors_only_where_an_error_was_measured():
    """One held-out prompt (data.eval_prompts=1 is allowed) gave a paired error of 0, and every positive gain
    was reported as beyond two standard errors; the error is now undefined (NaN), and neither it nor an older
    file's 0 puts a gain beyond two of it."""
    from shiq_eval.evaluate import _check_prompt_major
    from shiq_eval.optimum import paired_difference

    gain, se = paired_difference([0.4], [0.1])
    assert gain == pytest.approx(0.3) and math.isnan(se) and not demo.beyond_two_se(gain, se)
    assert not demo.beyond_two_se(0.3, 0.0)
    assert demo.beyond_two_se(0.3, 0.1) and not demo.beyond_two_se(0.2, 0.1)
    with pytest.raises(ValueError, match="samples_per_prompt must be a whole number, got 2.5"):  # (was taken as 2)
        _check_prompt_major([[1], [1], [2], [2]], 2.5)


def test_arm_comparisons_refuse_to_pair_values_of_different_prompts(tmp_path):
    """Two arms' per-prompt values are paired by position over the shorter list: where the evaluations record
    their prompts' snippet ids, the first P must agree (a hand-made pair of curves whose second prompt differs
    is refused naming both files); a shorter arm on a prefix of the same list pairs as before."""
    s, seed = 1, tmp_path / "seed0"
    curves = {"shiq@0.3": ([5, 7, 9], [1.0, 2.0, 3.0]), "copg@0.3": ([5, 8], [0.5, 0.5])}
    for arm, (ids, r) in curves.items():
        (seed / "runs" / arm).mkdir(parents=True)
        rec = {"step": 1, "rewards": r, "gold": r, "kls_exact": [0.1] * len(r), "snippet_ids": ids}
        (seed / "runs" / arm / "curve.json").write_text(json.dumps([rec]))
    rep = {"methods": dict.fromkeys(curves, {}), "config": {"eval": {"samples_per_prompt": s}}}
    (seed / "report.json").write_text(json.dumps(rep))
    with pytest.raises(ValueError, match="different held-out prompts") as e:
        demo.arm_comparisons(tmp_path, ["seed0"])
    assert str(seed / "runs" / "shiq@0.3" / "curve.json") in str(e.value)
    assert str(seed / "runs" / "copg@0.3" / "curve.json") in str(e.value)
    path = seed / "runs" / "copg@0.3" / "curve.json"
    rec = json.loads(path.read_text())[0]
    path.write_text(json.dumps([rec | {"snippet_ids": [5, 7]}]))  # the first two of shiq's prompts
    (row,) = demo.arm_comparisons(tmp_path, ["seed0"])
    assert row["reward"] == pytest.approx(((1.0 - 0.5) + (2.0 - 0.5)) / 2)  # by hand


def test_arm_comparisons_are_paired_by_prompt_within_seeds_and_averaged_over_seeds(tmp_path):
    """arm_comparisons against numpy on hand-made per-prompt evaluations: per seed the paired mean
    difference of reward, gold, KL and J = reward - β·KL (two samples per prompt averaged first; Q♯ scored
    on fewer prompts, so the pair uses those), then the seed mean, its standard error sqrt(max(sd², mean se²)/S)
    and the seeds' s.d."""
    rng = np.random.default_rng(1)
    arms = {"shiq@0.3": 10, "copg@0.3": 10, "qsharp@0.3": 6, "shiq@1": 10, "dpo@1": 10}  # arm -> prompts
    s, per = 2, {}
    for seed in ("seed0", "seed1"):
        per[seed] = {}
        for arm, P in arms.items():
            v = {k: rng.normal(size=P * s) for k in ("rewards", "gold", "kls_exact")}
            v["kls_exact"] = np.abs(v["kls_exact"])
            per[seed][arm] = v
            (tmp_path / seed / "runs" / arm).mkdir(parents=True)
            early = {"step": 0, **{k: [0.0] * (P * s) for k in v}}  # an earlier checkpoint: not compared
            final = {"step": 60, **{k: x.tolist() for k, x in v.items()}}
            (tmp_path / seed / "runs" / arm / "curve.json").write_text(json.dumps([final, early]))
        rep = {"methods": dict.fromkeys(arms, {}), "config": {"eval": {"samples_per_prompt": s}}}
        (tmp_path / seed / "report.json").write_text(json.dumps(rep))
    rows = {(r["a"], r["b"]): r for r in demo.arm_comparisons(tmp_path, list(per))}
    assert set(rows) == {("shiq@0.3", "copg@0.3"), ("shiq@0.3", "qsharp@0.3"), ("shiq@1", "dpo@1")}
    for (a, b), row in rows.items():
        beta, P = float(a.partition("@")[2]), min(arms[a], arms[b])
        assert row["beta"] == beta and row["seeds"] == 2
        for key, fn in (
            ("reward", lambda v: v["rewards"]),
            ("gold", lambda v: v["gold"]),
            ("kl", lambda v: v["kls_exact"]),
            ("J", lambda v: v["rewards"] - beta * v["kls_exact"]),
        ):
            d = [
                fn(per[sd][a])[: P * s].reshape(P, s).mean(1) - fn(per[sd][b])[: P * s].reshape(P, s).mean(1)
                for sd in per
            ]
            means = [x.mean() for x in d]
            ses = [x.std(ddof=1) / math.sqrt(P) for x in d]
            assert row[key] == pytest.approx(np.mean(means)), (a, b, key)
            assert row[f"{key}_per_seed"] == pytest.approx(means)
            assert row[f"{key}_sd"] == pytest.approx(np.std(means, ddof=1))
            # the seeds' spread (training and evaluation noise), never below the within-seed errors
            assert row[f"{key}_se"] == pytest.approx(math.sqrt(max(np.var(means, ddof=1), np.mean(np.square(ses))) / 2))


def test_matched_kl_comparisons_pair_each_arm_with_the_nearest_kl_of_the_other_method(tmp_path):
    """matched_kl_comparisons against numpy: each ShiQ arm against the CoPG (or DPO) arm at any β with the
    nearest mean KL, dropped when the two differ by more than the tolerance; the paired reward, gold and KL
    differences per seed, their seed mean and its standard error sqrt(max(sd², mean se²)/S); no J (two β)."""
    rng = np.random.default_rng(2)
    kl = {"shiq@0.03": 4.4, "shiq@0.1": 2.9, "shiq@0.3": 1.0, "copg@0.1": 4.3, "copg@0.3": 2.7, "dpo@0.1": 6.0}
    P, per = 8, {}
    for seed in ("seed0", "seed1", "seed2"):
        per[seed] = {}
        for arm in kl:
            v = {k: rng.normal(size=P) for k in ("rewards", "gold", "kls_exact")}
            per[seed][arm] = v
            (tmp_path / seed / "runs" / arm).mkdir(parents=True)
            (tmp_path / seed / "runs" / arm / "curve.json").write_text(
                json.dumps([{"step": 60, **{k: x.tolist() for k, x in v.items()}}])
            )
        rep = {"methods": dict.fromkeys(kl, {}), "config": {"eval": {"samples_per_prompt": 1}}}
        (tmp_path / seed / "report.json").write_text(json.dumps(rep))
    rows = demo.matched_kl_comparisons(tmp_path, list(per), kl)
    # shiq@0.3 (KL 1.0) is nearest copg@0.3 (2.7) but too far; DPO's only arm (6.0) is too far from every ShiQ arm
    assert [(r["a"], r["b"]) for r in rows] == [("shiq@0.1", "copg@0.3"), ("shiq@0.03", "copg@0.1")]
    for row in rows:
        a, b = row["a"], row["b"]
        assert (row["kl_a"], row["kl_b"]) == (kl[a], kl[b]) and row["seeds"] == 3 and "J" not in row
        assert (row["beta_a"], row["beta_b"]) == (float(a.partition("@")[2]), float(b.partition("@")[2]))
        for key, src in (("reward", "rewards"), ("gold", "gold"), ("kl", "kls_exact")):
            d = [per[sd][a][src] - per[sd][b][src] for sd in per]
            means = [x.mean() for x in d]
            assert row[f"{key}_per_seed"] == pytest.approx(means)
            assert row[key] == pytest.approx(np.mean(means))
            assert row[f"{key}_sd"] == pytest.approx(np.std(means, ddof=1))
            within = np.mean([(x.std(ddof=1) / math.sqrt(P)) ** 2 for x in d])
            assert row[f"{key}_se"] == pytest.approx(math.sqrt(max(np.var([x.mean() for x in d], ddof=1), within) / 3))
    assert demo.matched_kl_comparisons(tmp_path, list(per), {"shiq@0.1": 2.9}) == []  # no CoPG arm at all


def test_single_completion_arms_only_for_losses_that_need_no_group():
    cfg = demo.load_config(overrides=["train.methods=[shiq-single@0.1,dro_v-single]"])
    assert [demo.arm_method(a) for a in cfg["train"]["methods"]] == ["shiq", "dro_v"]
    assert demo.arm_is_single("dro_v-single") and not demo.arm_is_single("dro_v@0.3")
    assert demo.arm_beta(cfg, "dro_v-single") == cfg["methods"]["dro_v"]["beta"]
    for bad in ("dpo-single", "copg-single@0.3", "qsharp-single"):
        with pytest.raises(ValueError, match="cannot train on one completion per prompt"):
            demo.load_config(overrides=[f"train.methods=[{bad}]"])


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.stepz=3", "unknown config key 'train.stepz'"),
        ("train.methods=[shiq,ppo]", "unknown method 'ppo'"),
        ("train.steps=50", "multiple of train.eval_every"),
        ("data.completions_per_prompt=1", "data.completions_per_prompt must be an integer >= 2 (DPO, CoPG"),
        ("nonsense", "key=value"),
        ("train.methods=[shiq@x]", "'shiq@x': the β after @ must be a plain number, such as shiq@0.1"),
        ("train.methods=[shiq@inf]", "'shiq@inf': the β after @ must be a plain number"),
        ("train.methods=[shiq@1_0]", "'shiq@1_0': the β after @ must be a plain number"),  # float() read 10
        ("train.methods=[shiq@]", "'shiq@': nothing after @: give the β (shiq@0.1) or leave the @ out"),
        ("train.methods=[shiq@0.1,shiq@0.10]", "'shiq@0.1' and 'shiq@0.10' are the same arm (β 0.1)"),
        ("train.methods=[dpo,dpo@0.03]", "'dpo' and 'dpo@0.03' are the same arm (β 0.03)"),
        ("train.methods=[]", "train.methods is empty"),
        ("train.methods=[shiq@-1]", "must be a finite number > 0, got -1.0"),
        ("train.methods=[shiq,shiq]", "lists an entry twice"),
        ("methods.dpo.beta=0", "methods.dpo.beta"),
        ("train.keep_checkpoints=maybe", "train.keep_checkpoints='maybe': expected a value like True"),
        ("reward_model.finetune_last_layers=7", "finetune_last_layers must be null or an integer in 1..6, got 7"),
        ("reward_model.finetune_last_layers=true", "finetune_last_layers must be null or an integer in 1..6, got True"),
        ("reward_model.max_held_out_texts=1", "max_held_out_texts must be null or an integer >= 2, got 1"),
        ("reward_model.precision=float16", "reward_model.precision must be one of float32, bfloat16, got 'float16'"),
        # numbers a later stage would have refused or broken on, minutes in: refused before any work
        ("eval.batch_size=0", "eval.batch_size must be an integer >= 1, got 0"),
        ("data.held_out_fraction=1", "data.held_out_fraction must be a number in (0, 1), got 1"),
        ("data.held_out_fraction=0.0", "data.held_out_fraction must be a number in (0, 1), got 0.0"),
        ("train.lr=0", "train.lr must be a number > 0, got 0"),
        ("train.clip_grad=-1.0", "train.clip_grad must be a number >= 0 (0: no clipping), got -1.0"),
        ("train.trainable_last_layers=31", "train.trainable_last_layers must be an integer in 1..30 or -1"),
        ("train.trainable_last_layers=0", "train.trainable_last_layers must be an integer in 1..30 or -1"),
        ("train.trainable_last_layers=-1", "=-1 trains every layer of 30, so train.cache_frozen_prefix=true has no"),
        ("train.trainable_last_layers=30", "train at most 29, or set train.cache_frozen_prefix=false"),
        ("methods.qsharp.trainable_last_layers=30", "methods.qsharp.trainable_last_layers=30 trains every layer"),
        ("methods.qsharp.trainable_last_layers=-2", "must be an integer in 0..30 or -1 (0: the head only"),
        ("methods.qsharp.top_k=0", "methods.qsharp.top_k must be an integer in 1..49152 (SmolLM2's vocabulary), got 0"),
        # found only after the paid-for stages: a tensor of 38 GB, samples past the context, a J* loop of 10^8
        ("methods.qsharp.top_k=100000000", "methods.qsharp.top_k must be an integer in 1..49152"),
        ("data.max_new_tokens=100000000", "data.max_new_tokens must be an integer in 1..4096"),
        ("eval.j_star_samples=100000000", "eval.j_star_samples must be an integer in 1..10000"),
        ("train.methods=[qsharp_value@0.1]", "unknown method 'qsharp_value'"),  # it trains a value model
        # a method without a β in the config: the message named the key methods.shiq_tk.beta, which is no key
        ("train.methods=[shiq_tk]", "'shiq_tk': the configuration gives shiq_tk no β (it has no methods.shiq_tk)"),
        ("train.methods=[shiq_tk]", "such as shiq_tk@0.1"),
        # SFT reads no β, and every arm here is reported at its β: sft, sft@0.1 and methods.sft.beta were each refused
        ("train.methods=[sft]", "unknown method 'sft'"),
        ("train.methods=[shiq-single,sft-single]", "sft cannot train on one completion per prompt"),
        ("methods.qsharp.num_atoms=1", "methods.qsharp.num_atoms must be an integer >= 2, got 1"),
        ("reward_model.cv_folds=1", "reward_model.cv_folds must be an integer >= 2, got 1"),
        ("reward_model.l2=[1.0,-3.0]", "reward_model.l2 must be a non-empty list of entries each a number > 0"),
        ("reward_model.l2=[]", "reward_model.l2 must be a non-empty list"),
        ("eval.show_samples=-1", "eval.show_samples must be an integer >= 0, got -1"),
        ("seed=-1", "seed must be an integer in 0..1000000000"),
        # the run ended before the learning rate reached train.lr (--quick did: 5 warm-up steps of 4)
        ("train.warmup_steps=61", "train.warmup_steps (61) must not exceed train.steps (60): the learning rate"),
        ("seed=10000000000", "seed must be an integer in 0..1000000000"),
        (
            "train.share_prefixes=1",
            "override train.share_prefixes=1: expected a value like True",
        ),  # an override of another kind than the default's
    ],
)
def test_config_errors(override, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        demo.load_config(overrides=[override])


def test_quick_warms_up_within_its_steps():
    """--quick's learning rate reaches train.lr before its last step (it warmed up over 5 steps of 4)."""
    t = demo.load_config(quick=True)["train"]
    assert t["warmup_steps"] < t["steps"] and demo.load_config(overrides=["train.warmup_steps=60"])


@pytest.mark.parametrize(
    "override,needle",
    [
        ("full.betas.shiq=[0.1,-1.0]", "full.betas.shiq must be a non-empty list of entries each a number > 0"),
        ("full.betas.dpo=[]", "full.betas.dpo must be a non-empty list"),
        # named shiq@0.123457, the arm was trained at that β and reported as it
        ("full.betas.shiq=[0.1,0.123456789]", "full.betas.shiq: β 0.123456789 has more digits than an arm's name"),
        ("full.seeds=[0,-2]", "full.seeds must be a non-empty list of entries each an integer in 0..1000000000"),
        ("full.seeds=[0,0]", "full.seeds lists a seed twice"),
        # refused as "train.methods lists an entry twice", with the 19 arms made of full.betas: no key the user gave
        ("full.betas.shiq=[0.1,0.03,0.10]", "full.betas.shiq lists β 0.1 twice: [0.1, 0.03, 0.1]"),
        ("full.eval_every=0", "full.eval_every must be an integer >= 1, got 0"),
        ("full.keep_checkpoints=null", "full.keep_checkpoints must be true or false, got None"),
    ],
)
def test_full_config_errors(override, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        demo.full_runs(demo.load_config(overrides=[override], full=True))


def test_a_config_file_of_wrong_types_is_refused_naming_the_key(tmp_path):
    """A user's own config file is not type-checked by the overrides: its numbers are checked all the same."""
    cfg = yaml.safe_load((Path(demo.CONFIG)).read_text())
    cfg["eval"]["batch_size"] = "64"
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="mine.yaml: eval.batch_size is '64'; demo.yaml has 64 there"):
        demo.load_config(path)
    cfg["eval"]["batch_size"], cfg["data"]["max_new_tokens"] = 64, float("nan")
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"data.max_new_tokens must be an integer in 1..4096 .*, got nan"):
        demo.load_config(path)


def test_a_config_file_that_is_not_this_recipes_is_refused_in_one_line(tmp_path, capsys):
    """--config a file of plain text, of broken YAML or of the other recipe, and the override data=null, each
    ended in a traceback (AttributeError, ScannerError, KeyError) after parsing."""
    (tmp_path / "plain.yaml").write_text("- just\n- a list\n")
    (tmp_path / "broken.yaml").write_text("a: [1,\n")
    bfcl_yaml = Path(demo.CONFIG).with_name("bfcl.yaml")
    for argv, needle in [
        (["--config", str(tmp_path / "plain.yaml")], "plain.yaml: expected a mapping of sections"),
        (["--config", str(tmp_path / "broken.yaml")], "broken.yaml: not a readable YAML configuration"),
        (["--config", str(bfcl_yaml)], "bfcl.yaml: lacks the sections ['reward_model'] of demo.yaml"),
        (["data=null"], "override data=None: data is a section: set its keys"),
    ]:
        assert demo.main(["--out", str(tmp_path / "run"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "run").exists()


def test_a_bad_number_ends_the_command_in_one_line_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert demo.main(["--out", str(out), "eval.batch_size=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "shiq-demo: error: eval.batch_size must be an integer >= 1, got 0" and not out.exists()


def test_an_out_folder_that_cannot_be_made_is_refused_naming_the_option(tmp_path, capsys, monkeypatch):
    """An --out the system will not make (no permission, a read-only file system) ended in the bare OS message,
    "[Errno 13] Permission denied: ...", naming no option."""
    out = tmp_path / "locked" / "run"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == out:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert demo.main(["--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"shiq-demo: error: --out {out}: cannot make the folder (Permission denied)", err
    assert not out.exists()


def test_a_buffer_stage_builds_under_the_buffers_own_name(tmp_path, monkeypatch):
    """The buffer stages' progress bars name the folder being built, which was ``buffer.building``: "building
    buffer.building", "reference statistics buffer.building". The folder built is now named as the buffer, and
    moved into place whole; a ``buffer.building`` an older version left is removed."""
    from types import SimpleNamespace

    samples = [
        {"prompt_index": g, "prompt_ids": [1, 9690, 198 + g], "completion_ids": [12267, 38049], "reward": r}
        for g, r in ((0, 1.0), (0, -1.0), (1, 0.5), (1, 0.0))
    ]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (tmp_path / "buffer.building").mkdir()  # an older version's, stopped
    built, real_write = [], demo.write_buffer

    def write_buffer(rows, out_dir, **kw):
        built.append(Path(out_dir))
        return real_write(rows, out_dir, **kw)

    monkeypatch.setattr(demo, "write_buffer", write_buffer)
    monkeypatch.setattr(demo, "compute_ref_stats", lambda path, *a, **k: built.append(Path(path)))
    monkeypatch.setattr(demo, "hf_stats_fn", lambda model: None)
    demo.stage_buffer(SimpleNamespace(out=tmp_path, progress=False, reference=(None, None)))
    assert [p.name for p in built] == ["buffer", "buffer"] and built[0] != tmp_path / "buffer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["buffer", "buffer.json", "samples.jsonl"]
    assert (tmp_path / "buffer" / "manifest.json").is_file()


def test_prompt_counts_the_split_cannot_supply_are_refused_before_any_stage(tmp_path, capsys):
    """data.eval_prompts beyond the held-out split ended the run only after the reward model (minutes), and the
    run folder then refused the corrected value as a changed configuration; eval.validation_prompts beyond what
    the training prompts leave ended in random's 'Sample larger than population'. The counts are pandas' on the
    rated snippets, independently of the recipe's split."""
    import pandas as pd

    from shiq_data.assets import vader_archive
    from shiq_eval.moviereviews import load_movie_snippets

    rows = load_movie_snippets(vader_archive())
    ids = pd.Series([r.id for r in rows]).sort_values().tolist()
    random.Random(0).shuffle(ids)  # the split of seed 0: the first 20% held out
    words = pd.Series({r.id: len(r.text.split()) for r in rows})
    k = round(len(ids) * 0.2)
    held, train = int((words[ids[:k]] > 6).sum()), int((words[ids[k:]] > 6).sum())
    out, v = tmp_path / "run", 2 * ((train - 8) // 2 + 1)
    cases = [
        (["data.eval_prompts=" + str(held + 1)], f"data.eval_prompts asks for {held + 1} prompts; the held-out "
         f"split of seed 0 has {held} snippets longer than data.prompt_words (6) words"),
        (["data.train_prompts=8", f"eval.validation_prompts={v}"],  # a multiple of groups_per_step (2)
         f"data.train_prompts + eval.validation_prompts asks for {8 + v} prompts; the training split of seed 0 "
         f"has {train} snippets"),
        (["train.methods=[shiq-single]", f"data.train_prompts={train // 2 + 1}"],
         f"the -single arms' prompts) asks for {2 * (train // 2 + 1)} prompts"),
    ]  # fmt: skip
    for argv, needle in cases:
        assert demo.main(["--quick", "--out", str(out), *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, (argv, err)
        assert not out.exists()
    assert demo.main(["--full", "--out", str(out), "full.seeds=[0]", "data.eval_prompts=" + str(held + 1)]) == 2
    assert f"data.eval_prompts asks for {held + 1} prompts" in capsys.readouterr().err and not out.exists()


def test_bounds_refuse_what_is_not_a_number_of_their_kind():
    from shiq_eval.recipes.common import Bounds

    rate = Bounds(integer=False, low=0, above=True)
    assert rate.admits(3) and rate.admits(0.5) and not rate.admits(0) and not rate.admits(-1e-9)
    assert not any(rate.admits(v) for v in (float("inf"), float("nan"), True, "1", None, [1]))
    layers = Bounds(low=1, high=30, also=(-1,))
    assert layers.admits(-1) and layers.admits(30) and not layers.admits(0) and not layers.admits(31)
    assert not layers.admits(2.0) and Bounds(low=0, null=True).admits(None)
    assert layers.describe() == "an integer in 1..30 or -1"
    assert Bounds(integer=False, low=0, high=1, below=True).describe() == "a number in [0, 1)"
    with pytest.raises(ValueError, match="low 2 > high 1"):
        Bounds(low=2, high=1)


def _numeric_leaves(node, prefix=""):
    """The dotted keys of a config's number (and list of numbers) leaves, ``quick`` left out."""
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if key != "quick":
                yield from _numeric_leaves(v, key + ".")
        elif not isinstance(v, (bool, str)) and (
            v is None or isinstance(v, (int, float)) or all(isinstance(x, (int, float)) for x in v)
        ):
            yield key


@pytest.mark.parametrize("recipe", ["demo", "bfcl"])
def test_every_number_of_a_recipe_config_has_bounds(recipe):
    """A number added to a recipe's YAML without a rule would again be checked only when a stage reads it."""
    import fnmatch

    from shiq_eval.recipes import bfcl

    mod = {"demo": demo, "bfcl": bfcl}[recipe]
    cfg = yaml.safe_load(Path(mod.CONFIG).read_text())
    keys = [k for k in _numeric_leaves(cfg) if not fnmatch.fnmatch(k, "methods.*.beta")]  # check_arms: β
    assert len(keys) > 10
    dynamic = {"train.trainable_last_layers"} if recipe == "bfcl" else set()  # bounded by model.layers
    loose = [k for k in keys if k not in dynamic and not any(fnmatch.fnmatch(k, p) for p in mod.BOUNDS)]
    assert loose == []


def test_buffer_rows_put_the_centred_reward_on_the_last_completion_token():
    samples = [
        {"prompt_index": 0, "prompt_ids": [5, 6, 7], "completion_ids": [8, 9], "reward": 1.5},
        {"prompt_index": 0, "prompt_ids": [5, 6, 7], "completion_ids": [4], "reward": -0.5},
    ]
    rows = list(demo.buffer_rows(samples, center=0.5))
    assert rows[0]["tokens"] == [5, 6, 7, 8, 9] and rows[1]["tokens"] == [5, 6, 7, 4]
    assert rows[0]["action_mask"] == [False, False, False, True, True]
    assert rows[0]["rewards"] == [0, 0, 0, 0, 1.0] and rows[1]["rewards"] == [0, 0, 0, -1.0]
    assert rows[0]["group_id"] == rows[1]["group_id"] == 0 and rows[0]["prompt_len"] == 3
    with pytest.raises(ValueError, match="line 1, field 'completion_ids'"):
        list(demo.buffer_rows([{**samples[0], "completion_ids": []}], 0.0))


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_quick_run_produces_every_artifact_and_resumes(tmp_path):
    """The README's main job in its --quick form: every artifact, finite numbers; a second call
    finds every stage finished and only rewrites the report."""
    out = tmp_path / "demo"
    arms = [*demo.load_config(quick=True)["train"]["methods"], "shiq-single"]  # + the information-controlled arm
    cmd = [
        sys.executable,
        "-m",
        "shiq_eval.recipes.demo",
        "--quick",
        "--out",
        str(out),
        f"train.methods=[{','.join(arms)}]",
    ]
    # stopped by SIGTERM during the first arm's step 3 (evaluated every 2 of 4): the step is saved, off the
    # evaluation grid, and the rerun resumes from it without evaluating it (checked below: the curve's steps and
    # the validation losses' are the grid's alone; the resume evaluated and validated a stop's step before)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 1200
    while not any(len(p.read_text().splitlines()) >= 2 for p in (out / "runs").glob("*/metrics.jsonl")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be stopped"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    err = proc.communicate(timeout=600)[1]
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == (
        "shiq-demo: terminated (the same command resumes after the last finished stage)"
    ), err[-2000:]
    stopped = next(p.parent for p in (out / "runs").glob("*/metrics.jsonl"))
    assert (stopped / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert "%|" in err  # the bars of INFO, the default (the reward model's embeddings, sampling, training)
    # the rest at WARNING (warnings only): training, sampling and evaluation, with no progress bar
    rest = subprocess.run([*cmd, "--log-level", "WARNING"], timeout=1500, capture_output=True, text=True)
    assert rest.returncode == 0 and "%|" not in rest.stderr, rest.stderr[-3000:]
    for name in [
        "report.md",
        "report.json",
        "results.csv",
        "results.json",
        "reward_vs_kl.png",
        "frontier.png",
        "reward_vs_step.png",
        "j_vs_step.png",
        "j_star_curve.png",
        "reference_eval.json",
        "runs/qsharp/value/value_model.json",
        "split.json",
        "prompts.json",
        "samples.jsonl",
        "reward_model.safetensors",
        "buffer/manifest.json",
        "stages.json",
    ]:
        assert (out / name).is_file(), name
    rep = json.loads((out / "report.json").read_text())
    cfg = demo.load_config(quick=True, overrides=[cmd[-1]])
    assert set(rep["methods"]) == set(cfg["train"]["methods"]) == set(arms)
    assert _finite(rep["reference"]["reward_mean"]) and _finite(rep["reference"]["reward_stderr"])
    assert "qsharp" in rep["methods"]
    trained = [m for m in cfg["train"]["methods"] if m != "qsharp"]
    for m, r in rep["methods"].items():
        assert all(_finite(r[k]) for k in ("reward_mean", "reward_stderr", "kl", "J", "J_stderr")), (m, r)
        assert all(_finite(r[k]) for k in ("gold_mean", "gold_stderr", "train_seconds", "eval_seconds")), (m, r)
        curve = json.loads((out / "runs" / m / "curve.json").read_text())
        if m == "qsharp":
            assert r["step"] == cfg["methods"]["qsharp"]["steps"] and [c["step"] for c in curve] == [r["step"]]
        else:
            assert r["step"] == cfg["train"]["steps"]
            assert [c["step"] for c in curve] == list(
                range(cfg["train"]["eval_every"], cfg["train"]["steps"] + 1, cfg["train"]["eval_every"])
            )
    check_report_against_saved_results(out, rep, cfg)
    assert set(rep["timings"]) >= {"reward_model", "prompts", "samples", "buffer", "eval_reference", "report"}
    assert all(_finite(v) for v in rep["timings"].values())
    # the evaluation prompts never come from snippets the reward model trained on
    split = json.loads((out / "split.json").read_text())
    prompts = json.loads((out / "prompts.json").read_text())
    assert not {p["snippet_id"] for p in prompts["eval"]} & set(split["train"])
    rm_info = json.loads((out / "reward_model.json").read_text())  # --quick scores 400 of the held-out snippets
    assert rm_info["n_held_out"] == cfg["reward_model"]["max_held_out_texts"] < len(split["held_out"])
    assert {p["snippet_id"] for p in prompts["train"]} <= set(split["train"])
    # by text too (the report's contamination), against word tuples
    from shiq_data.assets import vader_archive
    from shiq_eval.moviereviews import load_movie_snippets

    def ws(text):
        return tuple(re.findall(r"\w+", text.casefold()))

    by_id = {r.id: r.text for r in load_movie_snippets(vader_archive())}
    single_ids = [json.loads(x)["snippet_id"] for x in (out / "samples_single.jsonl").read_text().splitlines()]
    prompt_words = cfg["data"]["prompt_words"]
    openings = {ws(p["opening"]) for p in prompts["train"]}
    openings |= {ws(" ".join(by_id[i].split()[:prompt_words])) for i in single_ids}
    held_runs = set()
    for i in split["held_out"]:
        w = ws(by_id[i])
        n = min(len(w), 13)
        held_runs |= {(i, w[k : k + n]) for k in range(len(w) - n + 1)} if len(w) >= 8 else set()
    runs_of = {}
    for i, run in held_runs:
        runs_of.setdefault(len(run), {}).setdefault(run, set()).add(i)
    found = set()
    for j in split["train"]:
        w = ws(by_id[j])
        for n, table in runs_of.items():
            for k in range(len(w) - n + 1):
                found |= table.get(w[k : k + n], set())
    c = rep["contamination"]
    assert c["eval_prompts"] == len(prompts["eval"]) and c["held_out_snippets"] == len(split["held_out"])
    assert c["eval_prompts_trained_on"] == sum(ws(p["opening"]) in openings for p in prompts["eval"])
    assert c["held_out_snippets_in_training_snippets"] == len(found)
    assert c["held_out_snippets_too_short"] == sum(len(ws(by_id[i])) < 8 for i in split["held_out"])
    # the information-controlled arm: one completion for each of train_prompts x k training prompts
    k, n = cfg["data"]["completions_per_prompt"], cfg["data"]["train_prompts"]
    import pyarrow.ipc as ipc

    single = json.loads((out / "buffer_single" / "manifest.json").read_text())
    groups = [
        g
        for shard in single["shards"]
        for g in ipc.open_stream((out / "buffer_single" / shard["file"]).read_bytes())
        .read_all()
        .column("group_id")
        .to_pylist()
    ]
    assert single["rows"] == len(groups) == n * k == len(set(groups))
    snippets = [json.loads(line)["snippet_id"] for line in (out / "samples_single.jsonl").read_text().splitlines()]
    assert len(set(snippets)) == n * k and set(snippets) <= set(split["train"])
    # validation losses at step 0 and every evaluation; at step 0 the policy is the reference, so every
    # DPO pair's loss is -log sigmoid(0) = log 2 exactly
    steps = [0, *range(cfg["train"]["eval_every"], cfg["train"]["steps"] + 1, cfg["train"]["eval_every"])]
    for m in trained:
        val = json.loads((out / "runs" / m / "val_loss.json").read_text())
        assert [v["step"] for v in val] == steps and all(_finite(v["loss"]) for v in val), (m, val)
        assert rep["methods"][m]["val_loss"] == val
    dpo0 = json.loads((out / "runs" / "dpo" / "val_loss.json").read_text())[0]["loss"]
    assert dpo0 == pytest.approx(math.log(2), abs=1e-5)
    assert (out / "val_loss_vs_step.png").is_file() and (out / "buffer_val" / "manifest.json").is_file()
    # the checkpoints are shiq-eval run's input too: method, step, architecture and reference recorded
    from shiq_eval.checkpoints import checkpoint_info, checkpoint_steps

    for m in trained:
        info = checkpoint_info(checkpoint_steps(out / "runs" / m)[-1])
        assert (info["method"], info["step"], info["init"]) == (demo.arm_method(m), cfg["train"]["steps"], "smollm2")
        assert info["hf_config"]["num_hidden_layers"] == 30
        # the tokenizer of the buffer it trained on, which shiq-eval compares with its own (it warned of a
        # checkpoint that "records no tokenizer (an older checkpoint)" for every arm of a new demo)
        buffer = out / ("buffer_single" if demo.arm_is_single(m) else "buffer")
        assert info["tokenizer"] == json.loads((buffer / "manifest.json").read_text())["tokenizer"], m
    # resuming: nothing but the report runs again
    before = json.loads((out / "stages.json").read_text())["done"]
    res = subprocess.run(cmd, check=True, timeout=600, capture_output=True, text=True)
    assert res.stderr.count("done earlier, skipped") == len(before) - 1  # every stage except the report
    # a different configuration is refused rather than mixed into the same folder
    res = subprocess.run(cmd + ["methods.shiq.beta=0.5"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "different configuration" in res.stderr
    # except the list of arms: fewer arms rerun nothing but the report, which then shows only those
    res = subprocess.run(
        cmd + [f"train.methods=[{trained[0]}]"], check=True, timeout=600, capture_output=True, text=True
    )
    skipped = set(re.findall(r"\] (\S+): done earlier, skipped", res.stderr))
    assert ": running" not in res.stderr
    assert skipped == {s for s in before if s != "report" and "single" not in s and not s.startswith("train_")} | {
        f"train_{trained[0]}"
    }
    assert list(json.loads((out / "report.json").read_text())["methods"]) == [trained[0]]
    # an arm killed after its last checkpoint and before that step's validation loss and evaluation: its
    # resume evaluates the checkpoint, and now also writes the step's validation loss (it was never written)
    arm, last = "dpo", cfg["train"]["steps"]
    val_path, curve_path = out / "runs" / arm / "val_loss.json", out / "runs" / arm / "curve.json"
    val, curve = json.loads(val_path.read_text()), json.loads(curve_path.read_text())
    val_path.write_text(json.dumps([v for v in val if v["step"] != last]))
    curve_path.write_text(json.dumps([c for c in curve if c["step"] != last]))
    stages = json.loads((out / "stages.json").read_text())
    del stages["done"][f"train_{arm}"]
    (out / "stages.json").write_text(json.dumps(stages))
    subprocess.run(cmd, check=True, timeout=600, capture_output=True, text=True)
    again = json.loads(val_path.read_text())
    assert [v["step"] for v in again] == steps  # the last step's too
    assert again[-1]["loss"] == pytest.approx(val[-1]["loss"], rel=1e-4)  # the same checkpoint, the same loss
    assert [c["step"] for c in json.loads(curve_path.read_text())] == [c["step"] for c in curve]
    # a damaged val_loss.json (an edit; writes are atomic) was read unchecked, into the report or a traceback
    val_path.write_text(json.dumps({"step": last}))
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"{val_path}: expected a list of records" in res.stderr.strip().splitlines()[-1]


def _se(v):
    v = np.asarray(v, dtype=np.float64)
    return v.std(ddof=1) / math.sqrt(v.size)


def test_summarize_pairs_each_prompts_mean_with_the_reference_on_the_same_prompt():
    """summarize (SHIQ_MATH §9) on hand-made values, two samples per prompt, an arm scored on the first 3 of the
    reference's 4 prompts: J per prompt is the mean reward − β · the mean exact KL, and J − J_ref, the gold score's
    difference and J* − J are paired by prompt, each standard error the s.d. (n − 1) of the per-prompt values or
    differences over √3, here with plain loops and the statistics module."""
    import statistics

    beta, s = 0.5, 2
    row = {"rewards": [1.0, 0.0, 0.5, 0.7, -0.2, 0.4], "gold": [0.3, 0.1, 0.9, 0.5, 0.0, 0.2]}
    row["kls_exact"] = [0.2, 0.4, 1.0, 0.6, 0.1, 0.1]
    ref = {"rewards": [0.4, 0.2, 0.1, 0.3, 0.5, -0.5, 9.0, 9.0], "gold": [0.0, 0.2, 0.4, 0.4, 0.1, 0.3, 9.0, 9.0]}
    ref["j_star_rewards"] = [[0.4, 1.2, -0.3], [0.1, 0.8, 0.0], [0.5, -1.0, 2.0], [9.0, 9.0, 9.0]]

    def means(values):  # [P] each prompt's two samples averaged
        return [(values[i] + values[i + 1]) / 2 for i in range(0, len(values), 2)]

    def se(values):
        return statistics.stdev(values) / math.sqrt(len(values))

    r, g, k = means(row["rewards"]), means(row["gold"]), means(row["kls_exact"])
    ref_r, ref_g = means(ref["rewards"])[:3], means(ref["gold"])[:3]
    j = [r[i] - beta * k[i] for i in range(3)]  # 0.45, 0.2, 0.025
    star = [beta * math.log(sum(math.exp(x / beta) for x in R) / len(R)) for R in ref["j_star_rewards"][:3]]
    out = demo.summarize(row, beta, ref, s)
    want = {"J": j, "J_minus_reference": [j[i] - ref_r[i] for i in range(3)]}
    want |= {"gold_minus_reference": [g[i] - ref_g[i] for i in range(3)], "j_star": star}
    want |= {"j_star_minus_J": [star[i] - j[i] for i in range(3)]}
    for key, values in want.items():
        assert out[key] == pytest.approx(statistics.fmean(values), rel=1e-12), key
        assert out[f"{key}_stderr"] == pytest.approx(se(values), rel=1e-12), key
    assert out["n_prompts"] == 3 and out["reference_reward_on_these_prompts"] == pytest.approx(statistics.fmean(ref_r))


def check_report_against_saved_results(out, rep, cfg):
    """report.json's J, J*, paired differences and gold scores, recomputed with numpy from the saved
    per-completion results (runs/<method>/curve.json, reference_eval.json; one sample per prompt)."""
    assert cfg["eval"]["samples_per_prompt"] == 1
    ref_eval = json.loads((out / "reference_eval.json").read_text())
    ref_r = np.asarray(ref_eval["rewards"], dtype=np.float64)
    P = len(ref_r)
    assert P == cfg["data"]["eval_prompts"]
    held = [p["snippet_id"] for p in json.loads((out / "prompts.json").read_text())["eval"]]
    assert ref_eval["snippet_ids"] == held  # what the arms' evaluations are paired with it by
    ref = rep["reference"]
    assert ref["reward_mean"] == pytest.approx(ref_r.mean(), abs=1e-12)
    assert ref["reward_stderr"] == pytest.approx(_se(ref_r), abs=1e-12)
    assert ref["J"] == ref["reward_mean"] and ref["gold_mean"] == pytest.approx(np.mean(ref_eval["gold"]), abs=1e-12)
    # J*: beta log mean exp(R / beta) per prompt over N reference samples, the evaluation sample first
    R = np.asarray(ref_eval["j_star_rewards"], dtype=np.float64)
    N = cfg["eval"]["j_star_samples"]
    assert R.shape == (P, N) and np.array_equal(R[:, 0], ref_r)
    js = rep["j_star"]
    beta0 = cfg["methods"][cfg["train"]["methods"][0]]["beta"]
    assert js["samples"] == N and js["beta"] == beta0
    star = beta0 * np.log(np.mean(np.exp(R / beta0), axis=1))
    assert js["mean"] == pytest.approx(star.mean(), abs=1e-9)
    assert js["stderr"] == pytest.approx(_se(star), abs=1e-9)
    assert [c["samples"] for c in js["curve"]][-1] == N
    for c in js["curve"]:
        n = c["samples"]
        assert c["j_star"] == pytest.approx(
            np.mean(beta0 * np.log(np.mean(np.exp(R[:, :n] / beta0), axis=1))), abs=1e-9
        )
    assert js["curve"][0]["j_star"] == pytest.approx(ref_r.mean(), abs=1e-9)  # one sample: J* estimate = reward
    # the gold scorer is the VADER lexicon on the completion alone
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    for i, (_, text, reward) in enumerate(ref_eval["samples"]):
        assert ref_eval["gold"][i] == pytest.approx(vader.polarity_scores(text)["compound"], abs=1e-12)
        assert reward == pytest.approx(ref_r[i], abs=1e-12)
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    for m, r in rep["methods"].items():
        beta = demo.arm_beta(cfg, m)
        last = max(json.loads((out / "runs" / m / "curve.json").read_text()), key=lambda c: c["step"])
        rw, kl, gold = (np.asarray(last[k], dtype=np.float64) for k in ("rewards", "kls_exact", "gold"))
        n = len(rw)
        expected_n = cfg["methods"]["qsharp"]["eval_prompts"] if m == "qsharp" else P
        assert n == expected_n == r["n_prompts"]
        assert last["snippet_ids"] == held[:n]
        assert r["beta"] == beta
        j = rw - beta * kl
        assert r["J"] == pytest.approx(j.mean(), abs=1e-9) and r["J_stderr"] == pytest.approx(_se(j), abs=1e-9)
        assert r["kl"] == pytest.approx(kl.mean(), abs=1e-9) and (kl >= -1e-9).all()
        assert r["reward_mean"] == pytest.approx(rw.mean(), abs=1e-9)
        assert r["gold_mean"] == pytest.approx(gold.mean(), abs=1e-9)
        # paired by prompt against the reference on the same (first n) prompts
        d = j - ref_r[:n]
        assert r["J_minus_reference"] == pytest.approx(d.mean(), abs=1e-9)
        assert r["J_minus_reference_stderr"] == pytest.approx(_se(d), abs=1e-9)
        gap = beta * np.log(np.mean(np.exp(R[:n] / beta), axis=1)) - j
        assert r["j_star_minus_J"] == pytest.approx(gap.mean(), abs=1e-9)
        # the curve starts at the reference itself (step 0, KL 0) and ends at the final checkpoint
        rows = sorted((row for row in rep["curves"] if row["method"] == m), key=lambda row: row["step"])
        assert rows[0]["step"] == 0 and rows[0]["kl_exact"] == 0.0
        assert rows[0]["reward_mean"] == pytest.approx(ref_r[:n].mean(), abs=1e-12) == rows[0]["J"]
        assert rows[-1]["step"] == r["step"] and rows[-1]["J"] == pytest.approx(r["J"], abs=1e-12)
        csv_rows = sorted((row for row in table if row["method"] == m), key=lambda row: int(row["step"]))
        assert [int(row["step"]) for row in csv_rows] == [row["step"] for row in rows]
        assert float(csv_rows[-1]["J"]) == pytest.approx(r["J"], abs=1e-9)


def test_a_new_default_beta_resumes_a_full_run_but_not_a_default_one(tmp_path):
    """Every arm of --full names its β, so the methods' default β is read by no stage of it: a changed default
    resumes that run; a default run, whose arms take the default, refuses it."""
    from shiq_eval.recipes.common import Stages

    full = demo.full_runs(demo.load_config(full=True))[0][1]
    moved = json.loads(json.dumps(full))
    moved["methods"]["shiq"]["beta"] = 0.5
    Stages(tmp_path / "full", full, free=demo.free_keys(full)).finish("prompts", 1.0)  # a stage is done
    Stages(tmp_path / "full", moved, free=demo.free_keys(moved))  # resumes
    assert json.loads((tmp_path / "full" / "config.json").read_text())["methods"]["shiq"]["beta"] == 0.5
    moved["data"]["train_prompts"] += 1
    with pytest.raises(ValueError, match=r"\(data.train_prompts: 160 saved, 161 now\); use another --out"):
        Stages(tmp_path / "full", moved, free=demo.free_keys(moved))
    # a seed or a β added to the study: the seed's own stages are the same, the new arms are new stages
    grown = demo.full_runs(
        demo.load_config(full=True, overrides=["full.seeds=[0,1,2,3]", "full.betas.shiq=[0.01,0.03]"])
    )
    assert [name for name, _ in grown] == ["seed0", "seed1", "seed2", "seed3"]
    Stages(tmp_path / "full", grown[0][1], free=demo.free_keys(grown[0][1]))  # resumes
    assert "shiq@0.01" in json.loads((tmp_path / "full" / "config.json").read_text())["train"]["methods"]
    fewer = demo.full_runs(demo.load_config(full=True, overrides=["full.eval_every=20"]))[0][1]
    with pytest.raises(ValueError, match=r"\(train.eval_every: 30 saved, 20 now\)"):  # reaches the stages: checked
        Stages(tmp_path / "full", fewer, free=demo.free_keys(fewer))
    default = demo.load_config()
    assert "full" not in demo.free_keys(default)
    Stages(tmp_path / "default", default, free=demo.free_keys(default)).finish("prompts", 1.0)
    kept = demo.load_config(overrides=["train.keep_checkpoints=false"])  # no result depends on it: resumes
    Stages(tmp_path / "default", kept, free=demo.free_keys(kept))
    changed = demo.load_config(overrides=["methods.shiq.beta=0.5"])
    with pytest.raises(ValueError, match=r"\(methods.shiq.beta: 0.03 saved, 0.5 now\)"):
        Stages(tmp_path / "default", changed, free=demo.free_keys(changed))


def test_a_plain_arm_is_not_reported_at_a_default_beta_it_was_not_trained_at(tmp_path):
    """A run whose arms all name their β takes a new default β (free_keys); a later resume that lists the
    plain arm again would have reported its old curve at the new β. The β recorded in the arm's curve.json
    refuses it, naming the file; the same β, or an arm of its own β, resumes."""
    from shiq_eval.recipes.common import Stages

    out = tmp_path / "run"
    first = demo.load_config(quick=True)
    Stages(out, first, free=demo.free_keys(first)).finish("train_shiq", 1.0)
    (out / "runs" / "shiq").mkdir(parents=True)
    (out / "runs" / "shiq" / "curve.json").write_text(json.dumps([{"method": "shiq", "beta": 0.03, "step": 4}]))
    named = demo.load_config(quick=True, overrides=["train.methods=[qsharp@0.03]", "methods.shiq.beta=0.5"])
    demo.check_trained_betas(named, out)  # shiq is not listed: nothing to compare
    Stages(out, named, free=demo.free_keys(named))  # every arm names its β: the new default is saved
    plain = demo.load_config(quick=True, overrides=["methods.shiq.beta=0.5"])
    Stages(out, plain, free=demo.free_keys(plain))  # the saved configuration agrees now ...
    with pytest.raises(ValueError, match=r"runs/shiq/curve.json: the arm shiq was trained and evaluated at β 0.03"):
        demo.check_trained_betas(plain, out)  # ... but the arm's curve does not
    demo.check_trained_betas(first, out)
    demo.check_trained_betas(demo.load_config(quick=True, overrides=["train.methods=[shiq@0.5]"]), out)
    # through Stages, as the run does: refused before the configuration is saved
    saved = (out / "config.json").read_text()
    again = demo.load_config(quick=True, overrides=["methods.shiq.beta=0.5", "train.keep_checkpoints=false"])
    with pytest.raises(ValueError, match=r"trained and evaluated at β 0.03, but the configuration gives it β 0.5"):
        Stages(out, again, free=demo.free_keys(again), check=lambda: demo.check_trained_betas(again, out))
    assert (out / "config.json").read_text() == saved
    # an arm killed after a checkpoint and before its first evaluation has no curve.json: the checkpoint's own
    # β (its meta.json's loss) decides, or it would be evaluated, or trained on, at the new β
    step = out / "runs" / "dpo" / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    meta = {"step": 2, "layout": {"tp": 1, "pp": 1, "dp": 1}, "meta": {"loss": {"name": "dpo", "beta": 0.03}}}
    (step / "meta.json").write_text(json.dumps(meta))
    (step.parent / "latest").write_text("step_00000002\n")
    demo.check_trained_betas(demo.load_config(quick=True, overrides=["train.methods=[dpo]"]), out)  # 0.03: fine
    moved = demo.load_config(quick=True, overrides=["train.methods=[dpo]", "methods.dpo.beta=0.5"])
    with pytest.raises(ValueError, match=r"step_00000002: the arm dpo was trained to this step at β 0.03, but the"):
        demo.check_trained_betas(moved, out)


def test_a_run_from_before_a_new_key_resumes_with_the_old_value_given(tmp_path):
    """A run folder whose config.json predates ``reward_model.precision`` (fitted in float32) resumes when
    given ``reward_model.precision=float32`` (the key is then saved) and refuses the new default, naming what
    resumes it; a run with the key refuses a change of it as any other."""
    from shiq_eval.recipes.common import Stages

    old = demo.load_config(overrides=["reward_model.precision=float32"])
    del old["reward_model"]["precision"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(old))
    (tmp_path / "run" / "stages.json").write_text(json.dumps({"done": {"reward_model": 1.0}}))
    new = demo.load_config()
    with pytest.raises(
        ValueError,
        match=r"\(reward_model.precision: \"float32\" saved, \"bfloat16\" now; made before reward_model.precision existed: "
        r"give reward_model.precision=float32 to resume it\); use another --out",
    ):
        Stages(tmp_path / "run", new, free=demo.free_keys(new), absent=demo.ABSENT)
    assert "precision" not in json.loads((tmp_path / "run" / "config.json").read_text())["reward_model"]
    given = demo.load_config(overrides=["reward_model.precision=float32"])
    Stages(tmp_path / "run", given, free=demo.free_keys(given), absent=demo.ABSENT)  # resumes
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == given
    with pytest.raises(
        ValueError, match=r"\(reward_model.precision: \"float32\" saved, \"bfloat16\" now\); use another --out"
    ):
        Stages(tmp_path / "run", new, free=demo.free_keys(new), absent=demo.ABSENT)


def test_a_config_file_from_before_the_precision_key_means_float32(tmp_path):
    """A user's configuration file written before ``reward_model.precision`` existed loads (no KeyError) and
    fits the reward model in float32, as the code of its day did."""
    text = (Path(demo.__file__).parents[2] / "configs" / "demo.yaml").read_text()
    lines = [line for line in text.splitlines() if not line.strip().startswith(("precision:", "# weights; the stage"))]
    assert len(lines) == len(text.splitlines()) - 2
    (tmp_path / "old.yaml").write_text("\n".join(lines) + "\n")
    cfg = demo.load_config(tmp_path / "old.yaml")
    assert "precision" not in cfg["reward_model"] and demo.reward_precision(cfg) == "float32"
    assert demo.reward_precision(demo.load_config()) == "bfloat16"


def test_the_frontier_draws_a_line_per_method_and_data_not_per_method_alone():
    """A seed's frontier: ``shiq`` and ``shiq@0.1`` are one line (two β), ``shiq-single@0.1`` another (one
    completion per prompt: other data), each point keeping its arm's β, KL and reward."""
    r = {"kl_stderr": 0.1, "reward_stderr": 0.2}
    methods = {
        "shiq": {"beta": 0.03, "kl": 3.0, "reward_mean": 0.9} | r,
        "shiq@0.1": {"beta": 0.1, "kl": 1.5, "reward_mean": 0.7} | r,
        "shiq-single@0.1": {"beta": 0.1, "kl": 1.4, "reward_mean": 0.6} | r,
        "dpo@0.1": {"beta": 0.1, "kl": 2.0, "reward_mean": 0.8} | r,
    }
    lines = {}
    for p in demo.frontier_points(methods):
        lines.setdefault(p["method"], []).append((p["beta"], p["kl"], p["reward"]))
    assert lines == {
        "shiq": [(0.03, 3.0, 0.9), (0.1, 1.5, 0.7)],
        "shiq-single": [(0.1, 1.4, 0.6)],
        "dpo": [(0.1, 2.0, 0.8)],
    }


def test_out_must_be_a_run_folder_and_its_files_must_be_whole(tmp_path, capsys):
    """Found by trying to break the recipe: --out an existing folder of other files ran the stages among them
    and replaced its buffer/ (and report.md); --out '' ran in the working folder; a run whose config.json was
    deleted resumed with whatever configuration was given and claimed it in the report; a damaged
    stages.json or a stage's cut JSON file ended in a traceback or a message naming no file; a run whose first
    stage failed on a bad value could not be rerun with the value fixed. Each refused (exit 2) or fixed now,
    with nothing written."""
    from shiq_data.buffer import FORMAT
    from shiq_eval.recipes.common import Stages, read_json

    mine = tmp_path / "mine"
    (mine / "buffer").mkdir(parents=True)
    (mine / "buffer" / "shard-00000.arrow").write_bytes(b"my data")
    (mine / "report.md").write_text("my notes")
    before = sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else None) for p in mine.rglob("*"))
    assert demo.main(["--quick", "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert f"--out {mine} holds files (buffer, report.md) but is not a shiq-demo run folder" in err
    assert sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else None) for p in mine.rglob("*")) == before
    with pytest.raises(SystemExit) as e:
        demo.main(["--quick", "--out", ""])
    assert e.value.code == 2 and "argument --out: must name a folder" in capsys.readouterr().err
    (tmp_path / "buf").mkdir()  # what marks a buffer folder: its manifest
    (tmp_path / "buf" / "manifest.json").write_text(json.dumps({"format": FORMAT}))
    from shiq_eval.recipes import bfcl, toys  # every recipe's run or study, refused alike

    for main, args in (
        (demo.main, ["--quick"]),
        (demo.main, ["--full"]),
        (bfcl.main, ["--quick"]),
        (bfcl.main, ["--quick", "--seeds", "1,2"]),
        (toys.main, ["bandit", "--quick"]),
    ):
        for out, where in ((tmp_path / "buf", "is the buffer"), (tmp_path / "buf" / "run", "is inside the buffer")):
            assert main([*args, "--out", str(out)]) == 2
            assert f"--out {out} {where}" in capsys.readouterr().err, (main, args, out)
    assert sorted(p.name for p in (tmp_path / "buf").iterdir()) == ["manifest.json"]

    cfg = demo.load_config(quick=True)
    run = tmp_path / "run"
    run.mkdir()
    Stages(run, cfg).finish("reward_model", 1.0)
    (run / "config.json").unlink()
    with pytest.raises(ValueError, match="holds stages.json but no config.json"):
        Stages(run, cfg)
    (run / "config.json").write_text(json.dumps(cfg))
    for bad in (
        '{"done": []}',
        '{"done": {"x": "fast"}}',
        "[1]",
        '{"done": {"x": true}}',
        '{"done": {"x": NaN}}',
        '{"done": {"x": 1' + "0" * 400 + "}}",
    ):
        (run / "stages.json").write_text(bad)
        with pytest.raises(ValueError, match=r"stages.json: expected \{\"done\""):
            Stages(run, cfg)
    (run / "stages.json").write_text('{"done": {"reward')
    with pytest.raises(ValueError, match=r"stages.json: not valid JSON .*delete it and every stage runs again"):
        Stages(run, cfg)
    (run / "curve.json").write_text("[1, ")  # a stage's own output: delete it and its stage
    with pytest.raises(ValueError, match=r"curve.json: not valid JSON .*delete it, and the stage that made it"):
        read_json(run / "curve.json")
    (run / "split.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=r"split.json: not UTF-8 text"):
        read_json(run / "split.json")
    # a stage's output edited by hand: named with what it lacks, not a KeyError
    (run / "curve.json").write_text('[{"step": 1, "train_seconds": 2}, {"step": 2}]')
    with pytest.raises(ValueError, match=r"curve.json: record 2: expected a JSON object with 'step', 'train_s"):
        read_json(run / "curve.json", keys=("step", "train_seconds"), records=True)
    (run / "curve.json").write_text('{"step": 1, "train_seconds": 2}')  # one record where a list belongs
    with pytest.raises(ValueError, match=r"curve.json: expected a list of records, got \{"):
        read_json(run / "curve.json", keys=("step", "train_seconds"), records=True)
    (run / "curve.json").write_text("[]")  # written only with a record in it: an IndexError further on
    with pytest.raises(
        ValueError, match=r"curve.json: expected a list of records, got \[\] .*its whole folder runs/ARM"
    ):
        read_json(run / "curve.json", keys=("step",), records=True)
    edited = tmp_path / "edited"
    Stages(edited, cfg).finish("reward_model", 1.0)
    _save_head(edited)  # a whole head, its checksum recorded (checked before the next stage runs)
    Stages(edited, cfg).finish("prompts", 1.0)
    (edited / "prompts.json").write_text(json.dumps({"instruction": "x", "eval": []}))
    assert demo.main(["--quick", "--out", str(edited)]) == 2
    assert "prompts.json: expected a JSON object with 'train', 'eval', got {" in capsys.readouterr().err
    # nothing finished: a new configuration is taken (the first stage failed on a value now fixed), but not
    # once a stage left an output (a checkpoint or curve a new configuration would be trained on top of)
    (run / "stages.json").write_text('{"done": {}}')
    fixed = demo.load_config(quick=True, overrides=["seed=5"])
    with pytest.raises(ValueError, match=r"\(seed: 0 saved, 5 now\)"):
        Stages(run, fixed)
    for name in ("curve.json", "split.json"):
        (run / name).unlink()
    (run / "run.log").write_text("a side-by-side job's log")  # --jobs opens it first
    Stages(run, fixed)
    assert json.loads((run / "config.json").read_text())["seed"] == 5
    # the other recipe's run: said so, not as forty differing keys
    from shiq_eval.recipes import bfcl

    other = tmp_path / "bfcl_run"
    Stages(other, bfcl.load_config(quick=True), prog="shiq-bfcl").finish("data", 1.0)
    with pytest.raises(
        ValueError, match=r"other sections \(model, reward_model in one .*another recipe than shiq-demo"
    ):
        Stages(other, cfg)
    # --jobs opens run.log in a new seed folder before the run: still a new run folder
    (tmp_path / "seed3").mkdir()
    (tmp_path / "seed3" / "run.log").write_text("")
    Stages(tmp_path / "seed3", cfg)
    (run / "stages.json").write_text('{"done": {"x": -1}}')
    with pytest.raises(ValueError, match=r"stages.json: expected \{\"done\""):
        Stages(run, fixed)
    # a stage that finds an earlier stage's output gone: named, with what to do in stages.json
    (run / "stages.json").write_text('{"done": {"samples": 3.0}}')

    def read_samples():
        open(run / "samples.jsonl", encoding="utf-8")

    with pytest.raises(ValueError, match=rf"buffer: .*samples.jsonl.* one of samples, from {run / 'stages.json'}"):
        Stages(run, fixed).run([("samples", None), ("buffer", read_samples)], print, dict, str)
    with pytest.raises(FileNotFoundError, match="/nonexistent/asset"):  # not a stage's output: as it was
        Stages(run, fixed).run([("samples", None), ("buffer", lambda: open("/nonexistent/asset"))], print, dict, str)
    (run / "stages.json").write_text('{"done": {}}')  # nothing finished: no stage to blame
    with pytest.raises(FileNotFoundError, match="samples.jsonl"):
        Stages(run, fixed).run([("buffer", read_samples)], print, dict, str)


def test_evaluation_files_edited_or_cut_by_hand_are_named_with_record_and_field(tmp_path):
    """A NaN reward, a list cut short or a stage's record of other prompts ended in a TypeError, a NaN in the
    report or a silently shorter pairing with the reference; each is named with the file, record and field."""
    s = 2  # samples per prompt
    rec = {k: 0.5 for k, kind in demo.EVAL_FIELDS.items() if kind in ("number", "error")}
    rec |= {"rewards": [1.0, 2.0, 3.0, 4.0], "gold": [0.0] * 4, "kls_exact": [0.1] * 4, "n": 4, "samples": []}
    curve = tmp_path / "curve.json"
    curve.write_text(json.dumps([rec | {"step": 2, "train_seconds": 1.0}]))
    assert demo.read_evaluations(curve, s)[0]["rewards"] == [1.0, 2.0, 3.0, 4.0]
    curve.write_text(json.dumps([rec | {"step": 2, "train_seconds": 1.0, "reward_stderr": None}]))
    got = demo.read_evaluations(curve, s)[0]  # an undefined error (one prompt), null in the file: NaN
    assert math.isnan(got["reward_stderr"]) and got["gold_stderr"] == 0.5
    curve.write_text(json.dumps([rec | {"step": 2, "train_seconds": 1.0}]))
    ref = rec | {"j_star_rewards": [[1.0, 2.0, 0.0], [3.0, 4.0, 1.0]], "j_star_seconds": 1.0}
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    assert demo.read_evaluations(tmp_path / "ref.json", s, demo.REFERENCE_FIELDS, records=False) == ref
    bad_curves = [
        ({"rewards": [1.0, float("nan"), 3.0, 4.0]}, r"record 2: field 'rewards' must be a non-empty list of finite"),
        ({"reward_mean": None}, r"record 2: field 'reward_mean' must be a finite number, got null"),
        ({"kls_exact": [0.1] * 3}, r"record 2: fields 'rewards', 'gold' and 'kls_exact' must be of one length.*\[4, 4, 3\]"),
        ({"rewards": [1.0] * 3, "gold": [0.0] * 3, "kls_exact": [0.0] * 3}, r"record 2: .*samples_per_prompt \(2\), got lengths \[3, 3, 3\]"),
        ({"step": -1}, r"record 2: field 'step' must be an integer >= 0, got -1"),
        ({"n": True}, r"record 2: field 'n' must be an integer >= 1, got true"),
        ({"reward_stderr": "0.1"}, r"record 2: field 'reward_stderr' must be a finite number or null, got \"0.1\""),
    ]  # fmt: skip
    for edit, needle in bad_curves:
        curve.write_text(
            json.dumps([rec | {"step": 2, "train_seconds": 1.0}, rec | {"step": 4, "train_seconds": 2.0} | edit])
        )
        with pytest.raises(ValueError, match=rf"curve.json: {needle}.*runs/ARM"):
            demo.read_evaluations(curve, s)
    for j_star in ([[1.0, 2.0, 0.0]], [[1.0, 2.0], [3.0, 4.0, 1.0]], [[1.0], [3.0]], [[1.0, 2.0], [3.0, None]]):
        (tmp_path / "ref.json").write_text(json.dumps(ref | {"j_star_rewards": j_star}))
        with pytest.raises(ValueError, match=r"ref.json: field 'j_star_rewards' must be 2 lists \(one a prompt\) of"):
            demo.read_evaluations(tmp_path / "ref.json", s, demo.REFERENCE_FIELDS, records=False)


def test_overrides_and_config_files_that_reached_a_traceback_or_the_run_unchecked(tmp_path, capsys):
    """Broken YAML in an override and an entry of a list as a key ended in tracebacks; a section given whole
    (``train={stepz: 3}``) saved its misspelt key into the run; a --config file whose section is a list, or that
    lacks a key, ended in a ConfigTypeError or a KeyError; a misspelt key in it was ignored. Each is one line,
    exit 2, nothing written. A copy of the shipped file, or one of before ``reward_model.precision``, loads."""
    shipped = yaml.safe_load(Path(demo.CONFIG).read_text())

    def file(name, edit):
        cfg = json.loads(json.dumps(shipped))
        edit(cfg)
        (tmp_path / name).write_text(yaml.safe_dump(cfg))
        return ["--config", str(tmp_path / name)]

    cases = [
        (['data.instruction="a'], "not valid YAML values"),
        (["train.methods=[shiq,dpo"], "not valid YAML values"),
        (["train.methods.0=dpo"], "'train.methods.0' is not a config key (an entry of a list: set the whole list"),
        (["train.methods[0]=dpo"], "is not a config key (an entry of a list"),
        (["=1"], "'' is not a config key"),
        (["train={stepz: 3}"], "override train={'stepz': 3}: set each key on its own (train.NAME=...)"),
        (["methods.shiq={beta:0}"], "set each key on its own (methods.shiq.NAME=...)"),
        (file("list.yaml", lambda c: c.__setitem__("train", [1, 2])), "list.yaml: train is [1, 2]; demo.yaml has"),
        (file("quick.yaml", lambda c: c.__setitem__("quick", 5)), "quick.yaml: quick is 5; demo.yaml has"),
        (file("lacks.yaml", lambda c: c["data"].pop("instruction")), "lacks.yaml: lacks the key 'instruction' that"),
        (file("empty.yaml", lambda c: c.__setitem__("eval", None)), "empty.yaml: eval is None; demo.yaml has"),
        (file("typo.yaml", lambda c: c["train"].__setitem__("stepz", 3)), "typo.yaml: unknown key 'train.stepz'"),
        (file("qtypo.yaml", lambda c: c["quick"]["train"].__setitem__("stepz", 3)), "unknown key 'quick.train.stepz'"),
        (  # resolved, a shared file copied the environment (a secret) into the run's config and report
            file("env.yaml", lambda c: c["data"].__setitem__("instruction", "${oc.env:HOME}")),
            "env.yaml: data.instruction is '${oc.env:HOME}': a file's values are data, never a resolver call",
        ),
    ]
    for argv, needle in cases:
        assert demo.main(["--quick", "--out", str(tmp_path / "run"), *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, (argv, err)
    assert not (tmp_path / "run").exists()
    file("copy.yaml", lambda c: None)
    assert demo.load_config(tmp_path / "copy.yaml", quick=True)["train"] == demo.load_config(quick=True)["train"]
    file("old.yaml", lambda c: c["reward_model"].pop("precision"))
    assert "precision" not in demo.load_config(tmp_path / "old.yaml")["reward_model"]

    def older(c):  # keys added since, read with their defaults of before; methods no arm trains
        for section, key in (("eval", "validation_prompts"), ("train", "share_prefixes")):
            c[section].pop(key)
        c["reward_model"].pop("finetune_last_layers")
        c["train"]["methods"] = ["shiq"]
        for m in ("dpo", "copg", "dro_v", "qsharp"):
            c["methods"].pop(m)

    file("older.yaml", older)
    assert demo.load_config(tmp_path / "older.yaml")["train"]["methods"] == ["shiq"]


def _save_head(out: Path, **info) -> Path:
    """A reward head (zeros, MiniLM's width) saved as the stage reward_model saves it, with its record."""
    import torch

    from shiq_data.reward_head import RegressionRewardModel

    demo.save_reward_head(out, RegressionRewardModel(None, torch.zeros(384), 0.5), {"pearson_held_out": 0.5, **info})
    return out / "reward_model.safetensors"


def test_the_reward_head_is_checked_against_the_sha256_its_record_keeps(tmp_path):
    """The head was read back (on resume) with only its shapes checked: a file damaged or replaced since the
    run fitted it scored every later stage. Its record now keeps its SHA-256, checked before it is read: a
    changed file, a missing one, a record without the field (a run of before) each a one-line error naming
    the file, the last saying how to resume."""
    head = _save_head(tmp_path)
    record = json.loads((tmp_path / "reward_model.json").read_text())
    digest = hashlib.sha256(head.read_bytes()).hexdigest()
    assert record == {"pearson_held_out": 0.5, "sha256": {"reward_model.safetensors": digest}}
    assert demo.check_reward_head(tmp_path) == head
    rm = demo.Context({}, tmp_path).reward_model  # read once checked
    assert rm.bias == 0.5 and rm.score_texts(["a review"]) == [0.5]

    data = bytearray(head.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    head.write_bytes(bytes(data))
    for check in (lambda: demo.check_reward_head(tmp_path), lambda: demo.Context({}, tmp_path).reward_model):
        with pytest.raises(ValueError) as e:
            check()
        assert str(e.value).startswith(f"{head}: sha256 differs from reward_model.json's (the file changed or is")
        assert "\n" not in str(e.value)
    head.unlink()
    with pytest.raises(ValueError, match=re.escape(f"{head}: missing (a stage's output")):
        demo.check_reward_head(tmp_path)

    _save_head(tmp_path)
    (tmp_path / "reward_model.json").write_text(json.dumps({"pearson_held_out": 0.5}))  # as written before
    with pytest.raises(ValueError) as e:
        _ = demo.Context({}, tmp_path).reward_model
    msg = str(e.value)
    assert msg.startswith(
        f"{tmp_path / 'reward_model.json'}: field 'sha256' is missing, so reward_model.safetensors cannot be "
        "checked: a run made before the recipe kept it; if the file is known to be good, add "
        '"sha256": {"reward_model.safetensors": "<its SHA-256, as sha256sum prints it>"} to reward_model.json'
    )
    assert "delete reward_model from" in msg and "\n" not in msg
    (tmp_path / "reward_model.json").write_text(json.dumps({"sha256": {"other.safetensors": "0" * 64}}))
    with pytest.raises(ValueError, match=r"reward_model.json: field 'sha256': must give the SHA-256 of exactly the"):
        demo.check_reward_head(tmp_path)


def test_a_resumed_run_refuses_an_unchecked_head_before_any_stage_runs(tmp_path, capsys):
    """shiq-demo on a run folder whose reward_model stage is done: the head's checksum is checked before the
    next stage (sampling, minutes of work) begins, and a run of before, without one, ends in one line, exit 2."""
    from shiq_eval.recipes.common import Stages

    cfg = demo.load_config(quick=True)
    out = tmp_path / "run"
    Stages(out, cfg).finish("reward_model", 1.0)
    _save_head(out)
    (out / "reward_model.json").write_text(json.dumps({"pearson_held_out": 0.5}))  # a run of before
    before = sorted(p.name for p in out.iterdir())
    assert demo.main(["--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"shiq-demo: error: {out / 'reward_model.json'}: field 'sha256' is missing, so reward_")
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == before and not (out / "prompts.json").exists()


def test_two_runs_in_one_folder_are_refused(tmp_path, capsys):
    """Two shiq-demo processes started in one --out ran the same stages side by side, writing each other's files,
    and both ended with status 0. The second is refused in one line while the first holds the folder's lock;
    the folder is the first's, unchanged; the lock goes with the process that held it."""
    from shiq_data.io import exclusive_lock

    out = tmp_path / "run"
    out.mkdir()
    with exclusive_lock(out / ".lock"):  # what the first run's process holds
        assert demo.main(["--quick", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{out / '.lock'} is held by another shiq-demo run: wait for it" in err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_a_folder_holding_a_config_json_of_something_else_is_refused_not_replaced(tmp_path, capsys):
    """A folder with only a config.json of the user's own was taken as a new run, and the file replaced by
    the demo's configuration. Now a config.json that is not this recipe's configuration is refused, kept."""
    out = tmp_path / "proj"
    out.mkdir()
    (out / "config.json").write_text('{"my": "precious settings"}')
    assert demo.main(["--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a run with other sections" in err and len(err.splitlines()) == 1, err
    assert json.loads((out / "config.json").read_text()) == {"my": "precious settings"}
    (out / "config.json").write_text("[1, 2]")
    assert demo.main(["--quick", "--out", str(out)]) == 2
    assert "expected the run's configuration (a JSON object)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_a_one_layer_model_is_not_told_to_train_at_most_zero_layers():
    from shiq_eval.recipes.common import check_frozen_prefix

    with pytest.raises(ValueError, match="a model of one layer has none: set train.cache_frozen_prefix=false"):
        check_frozen_prefix({"train.trainable_last_layers": 6}, 1)  # said "train at most 0", which bounds refuse
    with pytest.raises(ValueError, match="train at most 29, or set train.cache_frozen_prefix=false"):
        check_frozen_prefix({"train.trainable_last_layers": -1}, 30)
    check_frozen_prefix({"train.trainable_last_layers": 6}, 30)


def _one_prompt_run(out, earlier_ids=None):
    """The stage files build_report reads, hand-made for one held-out prompt (snippet 7) and one arm, shiq@0.1,
    evaluated at step 4 (and, with ``earlier_ids``, at step 2 on the prompts of those snippet ids); its context."""
    from types import SimpleNamespace

    cfg = demo.load_config(quick=True, overrides=["train.methods=[shiq@0.1]", "eval.samples_per_prompt=1"])
    errors = ("reward_stderr", "gold_stderr", "kl_exact_stderr", "kl_sample_stderr")
    ev = {"n": 1, "samples": [], "eval_seconds": 1.0, "snippet_ids": [7], **dict.fromkeys(errors)}
    ev |= {"rewards": [0.5], "gold": [0.25], "reward_mean": 0.5, "gold_mean": 0.25}
    ref = ev | {"kls_exact": [0.0], "kl_exact": 0.0, "kl_sample": 0.0, "j_star_rewards": [[0.5, 0.7]]}
    (out / "reference_eval.json").write_text(json.dumps(ref | {"j_star_seconds": 1.0}))
    arm = ev | {"rewards": [0.75], "reward_mean": 0.75, "kls_exact": [0.5], "kl_exact": 0.5, "kl_sample": 0.5}
    (out / "runs" / "shiq@0.1").mkdir(parents=True)
    rows = [arm | {"method": "shiq@0.1", "beta": 0.1, "step": 4, "train_seconds": 2.0}]
    if earlier_ids is not None:
        rows.insert(0, rows[0] | {"step": 2, "snippet_ids": earlier_ids})
    (out / "runs" / "shiq@0.1" / "curve.json").write_text(json.dumps(rows))
    (out / "reward_model.json").write_text(
        json.dumps({"l2": 1.0, "n_train": 9, "n_held_out": 3, "pearson_held_out": 0.5})
    )
    (out / "buffer.json").write_text(json.dumps({"reward_center": 0.0}))
    (out / "split.json").write_text(json.dumps({"train": [1, 2], "held_out": [7]}))  # (the report's contamination)
    openings = {"train": [{"snippet_id": 1, "opening": "a b c"}], "eval": [{"snippet_id": 7, "opening": "d e f"}]}
    (out / "prompts.json").write_text(json.dumps({"instruction": "x", **openings}))
    return SimpleNamespace(cfg=cfg, out=out)


def test_every_evaluation_of_an_arm_is_paired_with_the_reference_on_its_own_prompts(tmp_path):
    """The report pairs each of an arm's evaluations (every checkpoint's row of the table) with the reference by
    prompt: an earlier evaluation recorded on other prompts than the reference's is refused naming both files,
    where only the last evaluation was checked."""
    with pytest.raises(ValueError, match="different held-out prompts") as e:
        demo.build_report(_one_prompt_run(tmp_path, earlier_ids=[8]), {"report": 1.0})
    assert str(tmp_path / "runs" / "shiq@0.1" / "curve.json") in str(e.value)
    assert str(tmp_path / "reference_eval.json") in str(e.value)


def test_the_report_estimates_j_star_at_the_configured_betas_besides_the_arms(tmp_path):
    """``eval.j_star_betas``: the report gives J* (β log mean exp(R/β) over the N reference samples, SHIQ_MATH §9)
    and its curve over N at those β as well as at the arms' (a study compares them across its grid; the default's
    one β said nothing of how far 8 samples are from converging at the others), in report.json and report.md."""
    ctx = _one_prompt_run(tmp_path)
    ctx.cfg["eval"]["j_star_betas"] = [0.03, 1.0]
    rep = demo.build_report(ctx, {"report": 1.0})
    by_beta = rep["j_star"]["by_beta"]
    assert sorted(map(float, by_beta)) == [0.03, 0.1, 1.0]  # the arm's 0.1 and the two asked for
    R = np.array([0.5, 0.7])
    for beta in (0.03, 0.1, 1.0):
        v = by_beta[str(beta)]
        assert v["mean"] == pytest.approx(beta * np.log(np.mean(np.exp(R / beta))), abs=1e-12)
        assert [(c["samples"], c["j_star"]) for c in v["curve"]] == [
            (1, pytest.approx(0.5)),
            (2, pytest.approx(v["mean"])),
        ]
    text = demo.report_markdown(rep)
    assert all(f"- β = {b:g}: J* = {by_beta[str(b)]['mean']:.3f}" in text for b in (0.03, 0.1, 1.0))
    assert rep["j_star"]["beta"] == 0.1 and rep["methods"]["shiq@0.1"]["j_star"] == pytest.approx(
        by_beta["0.1"]["mean"]
    )


def test_the_attainable_gain_at_each_beta_has_its_paired_standard_error_in_both_reports(tmp_path):
    """report.md's "J* = ... i.e. +G over the reference's J" line gave the gain J* − J_ref with no uncertainty (and
    report.json had no such number): both now give it with its standard error, paired by prompt (SHIQ_MATH §9),
    here on three hand-made prompts against numpy."""
    ctx = _one_prompt_run(tmp_path)
    rewards, R = [0.5, -1.0, 2.0], [[0.5, 0.7], [-1.0, 1.5], [2.0, 1.0]]
    ref = json.loads((tmp_path / "reference_eval.json").read_text())
    ref |= {"rewards": rewards, "gold": [0.0] * 3, "kls_exact": [0.0] * 3, "j_star_rewards": R, "n": 3}
    (tmp_path / "reference_eval.json").write_text(json.dumps(ref | {"snippet_ids": [7, 8, 9]}))
    ctx.cfg["eval"]["j_star_betas"] = [0.3]
    rep = demo.build_report(ctx, {"report": 1.0})
    text = demo.report_markdown(rep)
    for beta in (0.1, 0.3):
        star = beta * np.log(np.mean(np.exp(np.array(R) / beta), axis=1))
        gain = star - np.array(rewards)
        v = rep["j_star"]["by_beta"][str(beta)]
        assert v["minus_reference"] == pytest.approx(gain.mean(), abs=1e-12)
        assert v["minus_reference_stderr"] == pytest.approx(gain.std(ddof=1) / math.sqrt(3), abs=1e-12)
        assert (
            f"- β = {beta:g}: J* = {star.mean():.3f} ± {star.std(ddof=1) / math.sqrt(3):.3f}, i.e. {gain.mean():+.3f} "
            f"(paired s.e. {gain.std(ddof=1) / math.sqrt(3):.3f}) over the reference's J"
        ) in text


def test_the_reward_gain_is_paired_by_prompt_on_the_arms_prompts(tmp_path):
    """report.json's reward gain of an arm scored on the first 3 of the reference's 4 prompts (SHIQ_MATH §9): the
    mean of the per-prompt differences, its paired standard error (their s.d., n − 1, over √3), the unpaired one
    (both means' errors combined) and whether the gain is beyond two paired errors, with the statistics module.
    Only one prompt, whose errors are undefined, was tested."""
    import statistics

    ctx = _one_prompt_run(tmp_path)
    ref_r, arm_r = [0.5, -1.0, 2.0, 9.0], [0.75, -0.5, 2.5]
    ref = json.loads((tmp_path / "reference_eval.json").read_text())
    ref |= {"rewards": ref_r, "gold": [0.0] * 4, "kls_exact": [0.0] * 4, "n": 4, "snippet_ids": [7, 8, 9, 10]}
    (tmp_path / "reference_eval.json").write_text(json.dumps(ref | {"j_star_rewards": [[x, x] for x in ref_r]}))
    arm_se = statistics.stdev(arm_r) / math.sqrt(3)
    (rec,) = json.loads((tmp_path / "runs" / "shiq@0.1" / "curve.json").read_text())
    rec |= {"rewards": arm_r, "gold": [0.0] * 3, "kls_exact": [0.0] * 3, "n": 3, "snippet_ids": [7, 8, 9]}
    rec |= {"reward_mean": statistics.fmean(arm_r), "reward_stderr": arm_se}
    (tmp_path / "runs" / "shiq@0.1" / "curve.json").write_text(json.dumps([rec]))
    m = demo.build_report(ctx, {"report": 1.0})["methods"]["shiq@0.1"]
    diffs = [a - b for a, b in zip(arm_r, ref_r)]  # 0.25, 0.5, 0.5
    paired = statistics.stdev(diffs) / math.sqrt(3)
    assert m["reward_gain"] == pytest.approx(statistics.fmean(diffs), rel=1e-12)
    assert m["reward_gain_paired_stderr"] == pytest.approx(paired, rel=1e-12)
    unpaired = math.hypot(arm_se, statistics.stdev(ref_r[:3]) / math.sqrt(3))
    assert m["reward_gain_unpaired_stderr"] == pytest.approx(unpaired, rel=1e-12)
    assert statistics.fmean(diffs) > 2 * paired and m["gain_over_2se"] is True  # 0.417 against 2 · 0.083


def test_a_report_without_validation_losses_leaves_no_earlier_validation_plot(tmp_path):
    """A finished run reported again with train.methods=[qsharp] (no arm with validation losses) kept the
    earlier report's val_loss_vs_step.png of other arms beside a report.md that shows no such plot."""
    ctx = _one_prompt_run(tmp_path)  # its one arm has no val_loss.json
    (tmp_path / "val_loss_vs_step.png").write_bytes(b"an earlier report's plot")
    rep = demo.build_report(ctx, {"report": 1.0})
    assert not (tmp_path / "val_loss_vs_step.png").exists()
    assert "val_loss_vs_step.png" not in demo.report_markdown(rep)
    assert (tmp_path / "frontier.png").is_file() and (tmp_path / "j_vs_step.png").is_file()


def test_one_held_out_prompt_writes_its_undefined_standard_errors_as_null_and_empty(tmp_path):
    """data.eval_prompts=1: one prompt measures no spread. The report (build_report on hand-made stage files,
    written as the run writes it) holds null for every standard error over prompts in report.json and
    results.json and empty cells in results.csv, where all held 0.0 (read as exact); report.md shows "–". The
    stage files hold null for them too and are read back (a resumed run re-reads them)."""
    from types import SimpleNamespace

    from shiq_eval.recipes.common import Stages

    errors = ("reward_stderr", "gold_stderr", "kl_exact_stderr", "kl_sample_stderr")
    rep = demo.build_report(_one_prompt_run(tmp_path), {"report": 1.0})
    Stages._write_report(SimpleNamespace(out=tmp_path), rep, demo.report_markdown)
    strict = json.loads((tmp_path / "report.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert {k: strict["reference"][k] for k in ("reward_stderr", "gold_stderr", "J_stderr")} == dict.fromkeys(
        ("reward_stderr", "gold_stderr", "J_stderr")
    )
    m = strict["methods"]["shiq@0.1"]
    per_prompt = ("J_stderr", "J_minus_reference_stderr", "gold_minus_reference_stderr", "j_star_stderr")
    per_prompt += ("j_star_minus_J_stderr", "reward_gain_paired_stderr", "reward_gain_unpaired_stderr")
    assert {k: m[k] for k in errors[:2] + ("kl_stderr", "kl_sample_stderr") + per_prompt} == dict.fromkeys(
        errors[:2] + ("kl_stderr", "kl_sample_stderr") + per_prompt
    )
    assert m["gain_over_2se"] is False and m["reward_gain"] == 0.25
    assert strict["j_star"]["stderr"] is None and {c["j_star_stderr"] for c in strict["j_star"]["curve"]} == {None}
    # the table: step 0 (the reference on the arm's prompt; its KL 0 exact) and the arm's checkpoint
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["step"], r["reward_stderr"], r["gold_stderr"], r["J_stderr"]) for r in rows] == [
        (0, None, None, None),
        (4, None, None, None),
    ]
    assert [(r["kl_exact_stderr"], r["kl_sample_stderr"]) for r in rows] == [(0.0, 0.0), (None, None)]
    with open(tmp_path / "results.csv", newline="") as f:
        cells = list(csv.DictReader(f))
    assert [(c["reward_stderr"], c["gold_stderr"], c["kl_exact_stderr"], c["J_stderr"]) for c in cells] == [
        ("", "", "0.0", ""),
        ("", "", "", ""),
    ]
    md = (tmp_path / "report.md").read_text()
    assert "nan" not in md and "± –" in md


def test_seed_statistics_of_one_seed_or_undefined_errors_are_nan_not_zero():
    """seed_stats: the s.d. of one seed is NaN (undefined), not 0; across_seeds: with one seed the standard
    error is that seed's, with undefined within-seed errors (one prompt) the seeds' spread alone, NaN when
    neither is defined, and otherwise sqrt(max(sd², mean se²) / S) as before (numbers of defined errors
    unchanged); the written form is null and reads back as NaN, an older 0.0 as 0.0."""
    from shiq_eval.optimum import null_as_undefined, undefined_as_null
    from shiq_eval.recipes.common import across_seeds, sd_cell, seed_stats

    mean, sd = seed_stats([0.5])
    assert mean == 0.5 and math.isnan(sd) and sd_cell(sd, 1) == "–" and sd_cell(math.nan, 3) == "–"
    mean, se, sd = across_seeds([(0.5, 0.2)])
    assert (mean, se) == (0.5, 0.2) and math.isnan(sd)
    per = [(0.5, math.nan), (0.7, math.nan), (0.9, math.nan)]  # one prompt in each seed
    assert across_seeds(per)[1] == pytest.approx(np.std([0.5, 0.7, 0.9], ddof=1) / math.sqrt(3), rel=1e-15)
    assert all(math.isnan(x) for x in across_seeds([(0.5, math.nan)])[1:])
    per = [(0.5, 0.3), (0.7, 0.01), (0.6, 0.2)]
    within = np.mean([0.3**2, 0.01**2, 0.2**2])
    assert across_seeds(per)[1] == float(np.sqrt(max(np.std([0.5, 0.7, 0.6], ddof=1) ** 2, within) / 3))
    row = {"J": 0.5, "J_se": math.nan, "J_sd": 0.0, "curve": [{"j_star_stderr": math.nan, "j_star": math.nan}]}
    assert json.dumps(undefined_as_null(row)) == (
        '{"J": 0.5, "J_se": null, "J_sd": 0.0, "curve": [{"j_star_stderr": null, "j_star": NaN}]}'
    )  # only errors: another NaN is left for atomic_write_json to refuse
    back = null_as_undefined(json.loads('{"J_se": null, "J_sd": 0.0, "gain_share": null}'))
    assert math.isnan(back["J_se"]) and back["J_sd"] == 0.0 and back["gain_share"] is None


def test_a_method_with_no_gain_share_at_any_beta_has_no_best_beta(tmp_path):
    """The best β of a method is the one of the largest mean gain share (full_report_markdown's **): a method none
    of whose β has a share (J* at or below J_ref in a seed, SHIQ_MATH §9) has none, where the β of the largest J
    was named and marked, J at two β being two objectives (the smallest β's, whose KL costs least, won)."""
    arms = {"dpo@0.03": (0.9, 0.1), "dpo@1": (0.6, 0.3), "shiq@0.03": (0.5, 0.8), "shiq@1": (0.4, 0.9)}
    for seed in ("seed0", "seed1"):
        methods = {}
        for arm, (j, star) in arms.items():
            methods[arm] = {"beta": float(arm.partition("@")[2]), "reward_mean": j, "reward_stderr": 0.1}
            methods[arm] |= {"gold_mean": 0.0, "kl": 1.0, "J": j, "J_stderr": 0.1, "J_minus_reference": j - 0.3}
            methods[arm] |= {"J_minus_reference_stderr": 0.1, "reference_reward_on_these_prompts": 0.3}
            methods[arm] |= {"j_star": star, "j_star_stderr": 0.1, "gold_stderr": 0.1, "kl_stderr": 0.1}
            (tmp_path / seed / "runs" / arm).mkdir(parents=True)
            curve = [{"step": 4, **{k: [0.1, 0.2, 0.3] for k in ("rewards", "gold", "kls_exact")}}]
            (tmp_path / seed / "runs" / arm / "curve.json").write_text(json.dumps(curve))
        rep = {"methods": methods, "reference": {"reward_mean": 0.3, "gold_mean": 0.0}, "timings": {"a": 1.0}}
        rep |= {"config": {"eval": {"samples_per_prompt": 1}}, "curves": []}
        (tmp_path / seed / "report.json").write_text(json.dumps(rep))
    out = demo.full_report(tmp_path, ["seed0", "seed1"])
    assert [r["gain_share"] for r in out["arms"]][:2] == [None, None]  # dpo's J* is not above J_ref at either β
    assert out["best_beta"] == {"shiq": 0.03}
    md = (tmp_path / "full_report.md").read_text()
    assert "| dpo | 0.03 |" in md and "| dpo | 1 |" in md and "| shiq ** | 0.03 |" in md


def test_the_qsharp_stage_stopped_by_sigterm_resumes_its_value_run_and_counts_every_run_s_seconds(
    tmp_path, monkeypatch
):
    """The Q♯ value run now stops on SIGTERM after saving its step (SavedOnSigterm). The stage wrote train.json
    only after a whole run: a stop in the last step (the value model saved, the run complete) had the rerun
    train the value model again from step 0, and a resumed run's train_seconds counted only its own part. The
    seconds of a stopped run are kept for the resume (train_stopped.json), and a complete one writes train.json."""
    import types

    from shiq_train.qsharp_train import RESUME_FILE
    from shiq_train.trainer import SavedOnSigterm

    clock = iter(range(0, 1000, 10))  # each reading 10 s after the one before
    monkeypatch.setattr(demo, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    runs = []

    def train_value_model(buffer, value_dir, *a, **kw):
        runs.append(len(runs))
        value_dir.mkdir(parents=True, exist_ok=True)
        if len(runs) > 2:  # trained again
            return value_dir
        if len(runs) == 1:  # stopped in step 3 of 6: saved for the rerun
            (value_dir / RESUME_FILE).write_bytes(b"state")
            raise SavedOnSigterm(3)
        (value_dir / RESUME_FILE).unlink(missing_ok=True)
        (value_dir / "value_model.json").write_text("{}")
        raise SavedOnSigterm(6, complete=True)  # stopped in its last step: the value model saved

    monkeypatch.setattr(demo, "train_value_model", train_value_model)
    monkeypatch.setattr(demo, "load_value_model", lambda path: types.SimpleNamespace(atoms=None))
    monkeypatch.setattr(demo, "GuidedPolicy", lambda *a, **kw: None)
    monkeypatch.setattr(demo, "evaluate_hf", lambda ctx, model, guided=None, limit=0: {"reward_mean": 1.0})
    written = []
    monkeypatch.setattr(demo, "write_results_json", lambda path, rows: written.append(rows))
    q = {"steps": 6, "lr": 1e-3, "num_atoms": 11, "trainable_last_layers": 1, "top_k": 5, "eval_prompts": 0}
    cfg = {"methods": {"qsharp": q}, "train": {"groups_per_step": 1}, "data": {"completions_per_prompt": 2}}
    tok = types.SimpleNamespace(pad_token_id=0, eos_token_id=0)
    ctx = types.SimpleNamespace(
        cfg={**cfg, "seed": 0},
        out=tmp_path,
        reference=(types.SimpleNamespace(state_dict=dict, config=None), tok),
        prefix_caches=types.SimpleNamespace(get=lambda *a: None),
        progress=False,
    )
    for _ in range(2):
        with pytest.raises(SavedOnSigterm):
            demo.stage_train_qsharp(ctx, "qsharp@0.5")
    demo.stage_train_qsharp(ctx, "qsharp@0.5")
    assert runs == [0, 1]  # the complete run was not trained again
    assert written[-1][0]["train_seconds"] == 20  # 10 s before the stop, 10 s after
    assert not (tmp_path / "runs" / "qsharp" / "train_stopped.json").exists()


def test_a_quick_run_resumed_without_quick_is_refused_in_one_short_line(tmp_path, capsys):
    """A run made with --quick, given the same command without it (or the other way round), was refused with
    every key of the quick block listed as a change: the line now says which flag to give."""
    for made_quick in (True, False):
        out = tmp_path / f"run{int(made_quick)}"
        out.mkdir()
        saved = demo.load_config(quick=made_quick, overrides=["train.methods=[shiq]"])
        (out / "config.json").write_text(json.dumps(saved))
        (out / "stages.json").write_text(json.dumps({"done": {"reward_model": 1.0}}))
        argv = ["--out", str(out), "train.methods=[shiq]"] + ([] if made_quick else ["--quick"])
        assert demo.main(argv) == 2
        err = capsys.readouterr().err.strip()
        flag = "add --quick" if made_quick else "leave --quick out"
        assert (
            err
            == f"shiq-demo: error: {out} holds a run made {'with' if made_quick else 'without'} --quick: {flag} to resume it, or use another --out"
        )
        assert json.loads((out / "config.json").read_text()) == saved  # left as it was
    # another change as well: the list of changes, as before
    out = tmp_path / "run1"
    assert demo.main(["--out", str(out), "train.methods=[shiq]", "seed=1"]) == 2
    assert "holds a run with a different configuration" in capsys.readouterr().err


def test_a_run_stopped_in_its_first_stage_takes_a_corrected_configuration(tmp_path, monkeypatch, capsys):
    """The README: "a run none of whose stages finished takes a new configuration". A stop in the reward-model
    stage left split.json (written as the stage began), so the corrected command was refused as a changed one."""

    def stop(*args, **kwargs):  # the stop comes while the encoder loads (its first minutes are the embedding)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "minilm_encoder", stop)
    out = tmp_path / "run"
    for seed in (1, 2):  # the first command's seed was a mistake
        with pytest.raises(KeyboardInterrupt):
            demo.run(demo.load_config(quick=True, overrides=[f"seed={seed}"]), out, progress=False)
        assert json.loads((out / "config.json").read_text())["seed"] == seed
    assert not (out / "split.json").exists()


def test_a_staged_folder_is_built_under_its_name_and_replaces_the_old_one_whole(tmp_path):
    """What the demo's and shiq-bfcl's buffer stages build (``build_staged``): a folder named as the final one, so
    the progress bars name it ("reference statistics buffer", where shiq-bfcl's read "buffer.building"), in a
    staging folder; it replaces the old folder only once built; what a stop left is removed first."""
    from shiq_eval.recipes.common import build_staged

    (tmp_path / "buffer").mkdir()
    (tmp_path / "buffer" / "old").write_text("the earlier build")
    for stale in (tmp_path / ".building" / "buffer", tmp_path / "buffer.building"):  # a stop's, an older version's
        stale.mkdir(parents=True)
        (stale / "half").write_text("")
    seen = []

    def build(folder):
        seen.append((folder.name, sorted(p.name for p in folder.parent.iterdir()), folder.exists()))
        folder.mkdir()
        (folder / "new").write_text("built")

    def failing(folder):
        folder.mkdir()
        raise ValueError("a bad row")

    with pytest.raises(ValueError, match="a bad row"):
        build_staged(tmp_path, "buffer", failing)
    assert [p.name for p in (tmp_path / "buffer").iterdir()] == ["old"]  # the old folder, untouched
    assert build_staged(tmp_path, "buffer", build) == tmp_path / "buffer"
    assert seen == [("buffer", [], False)]  # named as the buffer, the failed build's remains removed first
    assert [p.name for p in (tmp_path / "buffer").iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["buffer"]
