"""The main job (``shiq-demo``): configuration handling, buffer rows, and the quick end-to-end run."""

import json
import math
import subprocess
import sys

import pytest

from shiq_eval.recipes import demo


def test_config_quick_and_overrides():
    full = demo.load_config()
    quick = demo.load_config(quick=True)
    assert quick["train"]["steps"] < full["train"]["steps"]
    assert quick["train"]["methods"] == full["train"]["methods"]  # quick keeps every method
    cfg = demo.load_config(overrides=["train.steps=90", "train.methods=[shiq,dpo]"])
    assert cfg["train"]["steps"] == 90 and cfg["train"]["methods"] == ["shiq", "dpo"]


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.stepz=3", "unknown config key 'train.stepz'"),
        ("train.methods=[shiq,ppo]", "unknown method 'ppo'"),
        ("train.steps=50", "multiple of train.eval_every"),
        ("data.completions_per_prompt=1", "completions_per_prompt must be >= 2"),
        ("nonsense", "key=value"),
    ],
)
def test_config_errors(override, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        demo.load_config(overrides=[override])


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
    cmd = [sys.executable, "-m", "shiq_eval.recipes.demo", "--quick", "--out", str(out)]
    subprocess.run(cmd, check=True, timeout=1500)
    for name in [
        "report.md",
        "report.json",
        "results.csv",
        "results.json",
        "reward_vs_kl.png",
        "reward_vs_step.png",
        "split.json",
        "prompts.json",
        "samples.jsonl",
        "reward_model.safetensors",
        "buffer/manifest.json",
        "stages.json",
    ]:
        assert (out / name).is_file(), name
    rep = json.loads((out / "report.json").read_text())
    cfg = demo.load_config(quick=True)
    assert set(rep["methods"]) == set(cfg["train"]["methods"])
    assert _finite(rep["reference"]["reward_mean"]) and _finite(rep["reference"]["reward_stderr"])
    for m, r in rep["methods"].items():
        assert all(_finite(r[k]) for k in ("reward_mean", "reward_stderr", "kl")), (m, r)
        assert r["step"] == cfg["train"]["steps"]
        curve = json.loads((out / "runs" / m / "curve.json").read_text())
        assert [c["step"] for c in curve] == list(
            range(cfg["train"]["eval_every"], cfg["train"]["steps"] + 1, cfg["train"]["eval_every"])
        )
    assert set(rep["timings"]) >= {"reward_model", "prompts", "samples", "buffer", "eval_reference", "report"}
    assert all(_finite(v) for v in rep["timings"].values())
    # the evaluation prompts never come from snippets the reward model trained on
    split = json.loads((out / "split.json").read_text())
    prompts = json.loads((out / "prompts.json").read_text())
    assert not {p["snippet_id"] for p in prompts["eval"]} & set(split["train"])
    assert {p["snippet_id"] for p in prompts["train"]} <= set(split["train"])
    # the checkpoints are shiq-eval run's input too: method, step, architecture and reference recorded
    from shiq_eval.cli import checkpoint_info, checkpoint_steps

    for m in cfg["train"]["methods"]:
        info = checkpoint_info(checkpoint_steps(out / "runs" / m)[-1])
        assert (info["method"], info["step"], info["init"]) == (m, cfg["train"]["steps"], "smollm2")
        assert info["hf_config"]["num_hidden_layers"] == 30
    # resuming: nothing but the report runs again
    before = json.loads((out / "stages.json").read_text())["done"]
    res = subprocess.run(cmd, check=True, timeout=600, capture_output=True, text=True)
    assert res.stderr.count("done earlier, skipped") == len(before) - 1  # every stage except the report
    # a different configuration is refused rather than mixed into the same folder
    res = subprocess.run(cmd + ["train.beta=0.5"], capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "different configuration" in res.stderr
