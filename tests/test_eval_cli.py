"""``shiq-eval run`` end to end on tiny models: two shiq-train runs (ShiQ and DPO) started from a tiny
Hugging Face Llama folder, evaluated against that folder with a MiniLM regression reward head.

Checked against independent references: the method and step of every row come from the runs' configs
and checkpoint names; the reference policy's KL to itself is exactly 0; each sample's reward equals
``w · e(prompt + " " + completion) + b`` computed here from the saved head and the encoder; a bad
prompts file fails naming the file, line and field.
"""

import csv
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("shiq_data.sampler")

from shiq_eval.cli import main  # noqa: E402
from shiq_eval.scorers import RegressionRewardModel, minilm_encoder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB = 128


def tiny_hf_folder(path: Path) -> Path:
    """A random tiny Llama (the shape of configs/model/tiny.yaml) with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<eos>"] + [f"w{i}" for i in range(2, VOCAB)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def write_tiny_buffer(path: Path) -> None:
    from shiq_data.buffer import write_buffer

    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):
        n = 10 + i % 3
        rows.append({"group_id": i // 2, "prompt_len": 4, "source": "test",
                     "tokens": torch.randint(2, VOCAB, (n,), generator=g).tolist(),
                     "action_mask": [False] * 4 + [True] * (n - 4), "rewards": [0.0] * (n - 1) + [float(i % 2)]})
    write_buffer(rows, path, tokenizer_info={"name": "test", "fingerprint": "0", "vocab_size": VOCAB},
                 command=["test"], progress=False)


def train(tmp_path, init: Path, loss: str) -> Path:
    out = tmp_path / f"run_{loss}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, "-m", "shiq_train", f"data.buffer={tmp_path / 'buffer'}", f"out={out}",
                          f"init={init}", f"loss={loss}", "train.steps=2", "train.save_every=1",
                          "train.reference=online", "train.progress=false", "train.tensorboard=false",
                          "optimizer.lr=3e-3", "data.rows_per_micro_batch=4"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_eval_run_over_two_methods(tmp_path):
    init = tiny_hf_folder(tmp_path / "init")
    write_tiny_buffer(tmp_path / "buffer")
    runs = [train(tmp_path, init, "shiq"), train(tmp_path, init, "dpo")]

    encoder = minilm_encoder()
    texts = ["a wonderful film", "a dreadful film", "great acting", "boring plot", "w5 w6", "w9 w10"]
    head = RegressionRewardModel.fit(encoder, texts, [1.0, -1.0, 1.0, -1.0, 0.5, -0.5], l2=1.0)
    head.save(tmp_path / "rm.safetensors")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1} w{i + 2}"}) + "\n" for i in range(3, 9)))

    out = tmp_path / "eval"
    code = main(["run", str(runs[0]), str(runs[1] / "checkpoints" / "step_00000002"), "--out", str(out),
                 "--prompts", str(prompts), "--reward-model", str(tmp_path / "rm.safetensors"),
                 "--max-new-tokens", "4", "--batch-size", "6", "--quiet"])
    assert code == 0
    rows = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["step"]) for r in rows] == [("reference", 0), ("shiq", 1), ("shiq", 2), ("dpo", 2)]
    assert rows[0]["kl_exact"] == 0.0 and rows[0]["kl_sample"] == 0.0
    assert all(r["n"] == 6 for r in rows)
    # every row identifies the exact prompt set: the SHA-256 of [[prompt, scorer prompt], ...]
    want = hashlib.sha256(json.dumps([[f"w{i} w{i + 1} w{i + 2}"] * 2 for i in range(3, 9)]).encode()).hexdigest()
    assert {r["prompt_set_sha256"] for r in rows} == {want}
    assert {r["prompt_set"] for r in rows} == {str(prompts.resolve())}
    assert all(math.isfinite(r["kl_exact"]) and r["kl_exact"] >= 0 for r in rows)
    assert any(r["kl_exact"] > 1e-6 for r in rows[1:])  # training moved the policies
    for r in rows:  # the reward is the saved head on the prompt and completion text
        for prompt, completion, reward in r["samples"]:
            e = encoder([prompt + " " + completion]).double()[0]
            assert reward == pytest.approx(float(e @ head.weight + head.bias), abs=1e-6)
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["method"] for t in table] == ["reference", "shiq", "shiq", "dpo"]
    assert {t["prompt_set_sha256"] for t in table} == {want}
    for name in ("reward_vs_kl.png", "reward_vs_step.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs_name_the_problem(tmp_path, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "w3 w4"}\n{"text": "w5"}\n')
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"step": 1, "layout": {"tp": 1, "pp": 1, "dp": 1},
                                                "meta": {"loss": {"name": "shiq"}, "hf_config": {}}}))
    (tmp_path / "rm.safetensors").write_bytes(b"")
    args = ["run", str(tmp_path / "run"), "--out", str(tmp_path / "o"), "--prompts", str(bad),
            "--reward-model", str(tmp_path / "rm.safetensors"), "--reference", str(tiny_hf_folder(tmp_path / "m"))]
    assert main(args) == 2
    assert f"{bad}, line 2: field 'prompt' must be a non-empty string" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--prompts", str(bad),
                 "--reward-model", "x"]) == 2
    assert "not a checkpoint step directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written on failure


def test_atomic_writes_leave_shareable_files_and_no_temporaries(tmp_path):
    """Reports, plots and trajectories are read by others: not mkstemp's owner-only 0600."""
    import stat

    from shiq_eval.bfcl_rollout import write_trajectories
    from shiq_eval.report import atomic_write_json

    atomic_write_json(tmp_path / "r.json", {"a": 1})
    write_trajectories(tmp_path / "t.jsonl", [{"b": 2}])
    for name in ("r.json", "t.jsonl"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "t.jsonl"]
