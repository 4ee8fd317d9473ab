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
import re
import signal
import subprocess
import sys
from pathlib import Path

import commands
import numpy as np
import pytest
import torch
import transformers

from shiq_data.reward_head import RegressionRewardModel, minilm_encoder
from shiq_eval.cli import EvalInputError, main, read_prompts_jsonl

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
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def write_tiny_buffer(path: Path, tokenizer_folder: Path) -> None:
    """8 rows tokenised (as far as shiq-train checks) by the tokenizer of ``tokenizer_folder``."""
    from shiq_data.buffer import write_buffer
    from shiq_data.tokenizers import load_tokenizer

    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):
        n = 10 + i % 3
        rows.append(
            {
                "group_id": i // 2,
                "prompt_len": 4,
                "source": "test",
                "tokens": torch.randint(2, VOCAB, (n,), generator=g).tolist(),
                "action_mask": [False] * 4 + [True] * (n - 4),
                "rewards": [0.0] * (n - 1) + [float(i % 2)],
            }
        )
    write_buffer(
        rows,
        path,
        tokenizer_info=load_tokenizer(str(tokenizer_folder))[1],
        command=["test"],
        progress=False,
    )


def train(tmp_path, init: Path, loss: str, *overrides: str, name: str | None = None, in_process=False) -> Path:
    """A 2-step shiq-train run (checkpoints at steps 1 and 2) from ``init`` in ``tmp_path/name`` (default
    ``run_LOSS``); ``overrides``: more key=value settings. ``in_process``: the same command line composed by
    Hydra and run by ``shiq_train.cli.run`` in this process (no start-up cost), else ``python -m shiq_train``."""
    out = tmp_path / (name or f"run_{loss}")
    args = [
        f"data.buffer={tmp_path / 'buffer'}",
        f"out={out}",
        f"init={init}",
        f"loss={loss}",
        "train.steps=2",
        "train.save_every=1",
        "train.reference=online",
        "train.progress=false",
        "train.tensorboard=false",
        "optimizer.lr=3e-3",
        "data.rows_per_micro_batch=4",
        *overrides,
    ]
    if in_process:
        from hydra import compose, initialize_config_dir
        from omegaconf import OmegaConf

        from shiq_train import cli

        with initialize_config_dir(config_dir=str(cli.CONFIG_DIR), version_base=None):
            cfg = OmegaConf.to_container(compose(config_name="train", overrides=args), resolve=True)
        assert cli.run(cfg, cli.model_keys_given(args)) == out
        return out
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    res = commands.run([sys.executable, "-m", "shiq_train", *args], cwd=REPO, env=env, timeout=120)  # (forked)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_eval_run_over_two_methods(tmp_path, capsys):
    init = tiny_hf_folder(tmp_path / "init")
    write_tiny_buffer(tmp_path / "buffer", init)
    runs = [train(tmp_path, init, "shiq"), train(tmp_path, init, "dpo")]

    encoder = minilm_encoder()
    texts = ["a wonderful film", "a dreadful film", "great acting", "boring plot", "w5 w6", "w9 w10"]
    head = RegressionRewardModel.fit(encoder, texts, [1.0, -1.0, 1.0, -1.0, 0.5, -0.5], l2=1.0)
    head.save(tmp_path / "rm.safetensors")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1} w{i + 2}"}) + "\n" for i in range(3, 9)))

    out = tmp_path / "eval"
    capsys.readouterr()  # (what building the runs printed)
    argv = ["run", str(runs[0]), str(runs[1] / "checkpoints" / "step_00000002"), "--out", str(out), "--quiet"]
    argv += ["--prompts", str(prompts), "--reward-model", str(tmp_path / "rm.safetensors")]
    argv += ["--max-new-tokens", "4", "--batch-size", "6"]
    # the folder the runs started from, recorded in their meta.json, is not followed: a file names no path to read
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"the runs' initial model is the folder {init} as recorded there" in err
    assert f"give it with --reference {init}\n" in err and not out.exists()
    unsaved = runs[0] / "checkpoints" / "step_00000003"  # a save under way, or killed: no meta.json yet
    unsaved.mkdir()
    code = main([*argv, "--reference", str(init)])
    assert code == 0
    err = capsys.readouterr().err
    assert f"warning: {unsaved} holds no meta.json (a save under way or cut short): not evaluated" in err
    assert "Loading" not in err and "%|" not in err, err[-2000:]  # --quiet: no bar, transformers' own neither
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
    # and that of their token ids, as the README says of every row: the folder's tokenizer, plain text
    tok = transformers.AutoTokenizer.from_pretrained(str(init))
    ids = [tok.encode(f"w{i} w{i + 1} w{i + 2}", add_special_tokens=False) for i in range(3, 9)]
    assert {t["prompt_ids_sha256"] for t in table} == {hashlib.sha256(json.dumps(ids).encode()).hexdigest()}
    for name in ("reward_vs_kl.png", "reward_vs_step.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs_name_the_problem(tmp_path, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "w3 w4"}\n{"text": "w5"}\n')
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(
        json.dumps(
            {"step": 1, "layout": {"tp": 1, "pp": 1, "dp": 1}, "meta": {"loss": {"name": "shiq"}, "hf_config": {}}}
        )
    )
    (step / "rank_tp0_pp0_dp0.pt").write_bytes(b"")  # a placeholder: the refusal comes before weights are read
    (tmp_path / "rm.safetensors").write_bytes(b"")
    args = [
        "run",
        str(tmp_path / "run"),
        "--out",
        str(tmp_path / "o"),
        "--prompts",
        str(bad),
        "--reward-model",
        str(tmp_path / "rm.safetensors"),
        "--reference",
        str(tiny_hf_folder(tmp_path / "m")),
    ]
    assert main(args) == 2
    assert f"{bad}, line 2: field 'prompt' must be a string that is not blank" in capsys.readouterr().err
    assert (
        main(
            [
                "run",
                str(tmp_path / "nothing"),
                "--out",
                str(tmp_path / "o"),
                "--prompts",
                str(bad),
                "--reward-model",
                "x",
            ]
        )
        == 2
    )
    assert f"{tmp_path / 'nothing'}: no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written on failure
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    for given, said in (
        ("empty", "not a checkpoint step directory (no meta.json), a run with saved steps"),
        ("afile", "is a file: give a checkpoint step folder, a shiq-train run folder or a Hugging Face model folder"),
    ):
        run = ["run", str(tmp_path / given), "--out", str(tmp_path / "o"), "--prompts", str(bad), "--reward-model", "x"]
        assert main(run) == 2
        assert said in capsys.readouterr().err, given
    assert not (tmp_path / "o").exists()


def test_a_step_without_weights_is_refused_before_the_reference_is_evaluated(tmp_path, capsys, monkeypatch):
    """A step whose meta.json is sound but whose rank files are gone (a save cut short, a copy without them) was
    refused only once the reference had been evaluated, leaving a .rows/ folder in --out; it is now refused up
    front in one line naming the step folder, nothing written (as a Hugging Face folder without weights is)."""
    init = tiny_hf_folder(tmp_path / "init")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "score_len.py").write_text("def score(p, c):\n    return [float(len(x)) for x in c]\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "w3 w4"}\n')
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    meta = {
        "loss": {"name": "shiq", "beta": 0.1},
        "hf_config": transformers.LlamaConfig.from_pretrained(init).to_dict(),
    }
    (step / "meta.json").write_text(json.dumps({"step": 1, "layout": {"tp": 1, "pp": 1, "dp": 1}, "meta": meta}))
    argv = ["run", str(tmp_path / "run"), "--out", str(tmp_path / "o"), "--prompts", str(tmp_path / "p.jsonl")]
    argv += ["--scorer", "python:score_len:score", "--reference", str(init), "--max-new-tokens", "2", "--quiet"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"shiq-eval: error: {step}: a checkpoint step without weights (no rank_tp*_pp*_dp0.pt file)", err
    assert not (tmp_path / "o").exists()


def test_run_replaces_an_earlier_runs_results_only_with_overwrite(tmp_path, capsys):
    """An --out holding results.json was written over in silence (results of another suite and other models
    that may have taken hours): refused in one line, nothing touched; --overwrite goes on (here to the next
    refusal, a CHECKPOINT that does not exist, which shows the results check came first and let it pass)."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.json").write_text("[]")
    (out / "results.csv").write_text("run\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    run = ["run", str(tmp_path / "nothing"), "--out", str(out), "--scorer", "vader", "--movie-prompts", "2"]
    assert main(run) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"--out {out} holds an earlier run's results (results.json): give --overwrite to replace them" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main([*run, "--overwrite"]) == 2
    assert f"{tmp_path / 'nothing'}: no such file or folder" in capsys.readouterr().err


def test_a_latest_link_is_no_mark_of_a_run_s_checkpoints(tmp_path):
    """A checkpoints folder is marked by the ``latest`` file shiq-train writes, naming a step folder: a results
    folder with a ``latest`` link to its newest results (or a file of that name holding other text) is an --out
    like any other, and a run's checkpoints folder is still refused."""
    from shiq_eval.cli import check_results_folder

    results = tmp_path / "results"
    (results / "2026-12-07").mkdir(parents=True)
    (results / "latest").symlink_to("2026-12-07")
    check_results_folder(results)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "latest").write_text("the run of 2026-12-07\n")
    check_results_folder(notes)
    ckpt = tmp_path / "run" / "checkpoints"
    (ckpt / "step_00000002").mkdir(parents=True)
    (ckpt / "latest").write_text("step_00000002\n")
    with pytest.raises(EvalInputError, match="a shiq-train run's checkpoints folder \\(it holds latest\\)"):
        check_results_folder(ckpt)


def test_run_settings_out_of_range_are_refused_before_anything_is_written(tmp_path, capsys):
    """Sampling settings without bound (10**5 samples per prompt, a seed torch refuses), --movie-prompts 0 or
    -1 (which took every prompt), --top-k without --guide, a model given twice (its rows listed twice), --out a
    model folder (results written among its files), a --tokenizer that is no tokenizer: one line each, exit 2,
    nothing written."""
    folder = tiny_hf_folder(tmp_path / "m")
    (tmp_path / "p.jsonl").write_text('{"prompt": "w3 w4"}\n')
    base, end = ["run", str(folder)], ["--scorer", "vader", "--reference", str(folder)]
    out, prompts = ["--out", str(tmp_path / "o")], ["--prompts", str(tmp_path / "p.jsonl")]
    cases = [
        ([*out, *prompts, "--samples-per-prompt", "100000"], "--samples-per-prompt: sampling.samples_per_prompt must"),
        ([*out, *prompts, "--batch-size", "0"], "sampling.batch_size must be in 1..65,536, got 0"),
        ([*out, *prompts, "--batch-size", "65537"], "sampling.batch_size must be in 1..65,536, got 65537"),
        ([*out, *prompts, "--seed", "-1"], "sampling.seed must be in 0..1,000,000,000, got -1"),
        ([*out, *prompts, "--seed", str(10**20)], "sampling.seed must be in 0..1,000,000,000"),
        ([*out, *prompts, "--temperature", "1e-320"], "sampling.temperature must be a finite number >= 1e-30"),
        ([*out, "--movie-prompts", "0"], "--movie-prompts: movie_prompts must be >= 1, got 0"),
        ([*out, "--movie-prompts", "-1"], "--movie-prompts: movie_prompts must be >= 1, got -1"),
        ([*out, "--movie-prompts", str(10**6)], "--movie-prompts 1000000: there are "),
        ([*out, *prompts, "--top-k", "5"], "--top-k is the number of Q♯ candidates per token: give it with --guide"),
        ([str(folder), *out, *prompts], f"CHECKPOINT {folder} holds {folder}, which {folder} names too"),
        (
            ["--out", str(folder), *prompts],
            f"--out {folder} is a model folder or a recipe's run (it holds config.json)",
        ),
        (
            [*out, *prompts, "--tokenizer", str(tmp_path)],
            f"--tokenizer {tmp_path}: not a Hugging Face tokenizer folder",
        ),
        # a `..` through a folder not made yet reached the model folder unchecked, and wrote results into it
        (["--out", str(folder / "x" / ".."), *prompts], f"--out {folder} is a model folder or a recipe's run"),
    ]
    marks = (
        ("leaderboard.csv", "a leaderboard's folder"),
        ("full_report.json", "a shiq-demo --full study"),
        ("latest", "a shiq-train run's checkpoints folder"),  # RUN/checkpoints: results among its step folders
    )
    for name, what in marks:
        (tmp_path / name.split(".")[0]).mkdir()
        (tmp_path / name.split(".")[0] / name).write_text("step_00000002\n" if name == "latest" else "x")
        cases.append((["--out", str(tmp_path / name.split(".")[0]), *prompts], f"is {what} (it holds {name})"))
    capsys.readouterr()  # (the tiny folder's writing)
    for extra, needle in cases:
        before = sorted(folder.iterdir())
        assert main([*base, *extra, *end]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, (extra, err)
        assert not (tmp_path / "o").exists() and sorted(folder.iterdir()) == before
    with pytest.raises(SystemExit) as e:  # argparse's refusal, in one line
        main([*base, "--out", "", *prompts, *end])
    assert e.value.code == 2 and "--out: must name a folder, got an empty string" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # it was read as "launch with torchrun --nproc_per_node 0"
        main([*base, *out, *prompts, *end, "--engine", "megatron", "--tp", "0"])
    assert e.value.code == 2 and "argument --tp: must be >= 1, got 0" in capsys.readouterr().err


def test_prompts_jsonl_keeps_a_line_separator_inside_a_string(tmp_path):
    """U+2028 inside a JSON string (json.dumps writes it raw with ensure_ascii=False) is text, not a line
    break: splitlines() cut such a row in two, and the file was refused as invalid JSON."""
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "a\u2028b\u2029c\x85d"}, {"prompt": "e"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")
    assert read_prompts_jsonl(path)[0] == ["a\u2028b\u2029c\x85d", "e"]


def test_a_cut_safetensors_file_is_named_in_one_line(tmp_path, capsys):
    """A model folder whose model.safetensors was cut short (an interrupted copy): safetensors' own error
    named no file; now the file is named, for a policy folder and a --reference alike, exit 2."""
    from shiq_train.hf_convert import load_causal_lm

    folder = tiny_hf_folder(tmp_path / "m")
    assert load_causal_lm(str(folder))[0].config.num_hidden_layers >= 1  # intact: loads
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{weights}: not a readable safetensors file"):
        load_causal_lm(str(folder))
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    argv = ["run", str(folder), "--out", str(tmp_path / "o"), "--prompts", str(tmp_path / "p.jsonl")]
    capsys.readouterr()
    assert main([*argv, "--scorer", "vader", "--reference", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{weights}: not a readable safetensors file" in err, err
    assert not (tmp_path / "o").exists()


def test_atomic_writes_leave_shareable_files_and_no_temporaries(tmp_path):
    """Reports, plots and trajectories are read by others: not mkstemp's owner-only 0600."""
    import stat

    from shiq_data.io import atomic_write_json
    from shiq_eval.bfcl.rollout import write_trajectories

    atomic_write_json(tmp_path / "r.json", {"a": 1})
    write_trajectories(tmp_path / "t.jsonl", [{"b": 2}])
    for name in ("r.json", "t.jsonl"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "t.jsonl"]


def test_megatron_logits_give_the_kls_transformers_give(tmp_path):
    """The megatron engine's KL path (MegatronLogits over right-padded rows) against transformers on the
    same two models and the same sequences: the independent reference is transformers itself."""
    import warnings

    from shiq_eval.evaluate import sequence_kls
    from shiq_eval.generate import MegatronLogits
    from shiq_train import hf_convert as H
    from shiq_train import model as M
    from shiq_train import parallel

    warnings.filterwarnings("ignore")
    a = transformers.LlamaForCausalLM.from_pretrained(tiny_hf_folder(tmp_path / "a")).eval()
    torch.manual_seed(5)
    b = transformers.LlamaForCausalLM(a.config).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (3, 5, 2, 4)]
    completions = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (4, 1, 6, 3)]
    want = sequence_kls(a, b, prompts, completions, batch_size=3)
    with parallel.distributed(seed=0):
        engines = []
        for hf in (a, b):
            mg = M.build_model(H.model_config_from_llama(hf.config, params_dtype="float32", logits_chunk_tokens=0))
            H.import_llama(mg, hf.state_dict(), hf.config)
            engines.append(MegatronLogits(mg))
        got = sequence_kls(*engines, prompts, completions, batch_size=3)
        chunked = M.build_model(H.model_config_from_llama(a.config, logits_chunk_tokens=8))
        with pytest.raises(ValueError, match="logits_chunk_tokens=0"):
            MegatronLogits(chunked)
    for w, x in zip(want, got, strict=True):
        assert torch.allclose(x, w, atol=1e-5, rtol=1e-4), (x, w)
    assert float(want[1].abs().sum()) > 1e-3  # the two models differ: a KL of zero would prove nothing


def test_eval_run_with_the_megatron_engine_tp1_and_tp2(tmp_path):
    """`--engine megatron`: the reference's KL to itself is 0, rewards are the head's on the decoded
    samples, and a tensor-parallel run (torchrun, TP=2) reproduces the TP=1 table."""
    init = tiny_hf_folder(tmp_path / "init")
    write_tiny_buffer(tmp_path / "buffer", init)
    run = train(tmp_path, init, "shiq")
    encoder = minilm_encoder()
    head = RegressionRewardModel.fit(
        encoder, ["a wonderful film", "a dreadful film", "w5 w6", "w9 w10"], [1.0, -1.0, 0.5, -0.5], l2=1.0
    )
    head.save(tmp_path / "rm.safetensors")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1} w{i + 2}"}) + "\n" for i in range(3, 9)))
    common = [str(run), "--reference", str(init), "--engine", "megatron", "--quiet"]
    common += ["--prompts", str(prompts), "--reward-model", str(tmp_path / "rm.safetensors")]
    common += ["--max-new-tokens", "4", "--batch-size", "4"]

    assert main(["run", *common, "--out", str(tmp_path / "tp1")]) == 0
    one = json.loads((tmp_path / "tp1" / "results.json").read_text())
    assert [(r["method"], r["step"], r["engine"]) for r in one] == [
        ("reference", 0, "megatron"),
        ("shiq", 1, "megatron"),
        ("shiq", 2, "megatron"),
    ]
    assert one[0]["kl_exact"] == 0.0 and one[0]["kl_sample"] == 0.0
    assert all(math.isfinite(r["kl_exact"]) and r["kl_exact"] >= 0 and r["n"] == 6 for r in one)
    for r in one:
        for prompt, completion, reward in r["samples"]:
            e = encoder([prompt + " " + completion]).double()[0]
            assert reward == pytest.approx(float(e @ head.weight + head.bias), abs=1e-6)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    from shiq_train.parallel import free_port

    # a step folder whose save is under way: each rank warned of it, the same line twice (once from rank 0 now)
    (run / "checkpoints" / "step_00000099").mkdir()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "-m",
            "shiq_eval.cli",
            "run",
            *common,
            "--tp",
            "2",
            "--out",
            str(tmp_path / "tp2"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    unsaved = f"shiq-eval: warning: {run / 'checkpoints' / 'step_00000099'} holds no meta.json"
    assert res.stderr.count(unsaved) == 1, res.stderr[-3000:]
    two = json.loads((tmp_path / "tp2" / "results.json").read_text())
    for r1, r2 in zip(one, two, strict=True):
        assert [s[:2] for s in r2["samples"]] == [s[:2] for s in r1["samples"]]  # the same draws
        for key in ("reward_mean", "kl_exact", "kl_sample"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), key
    assert main(["run", *common, "--tp", "2", "--out", str(tmp_path / "bad")]) == 2  # not under torchrun
    assert not (tmp_path / "bad").exists()


TORCHRUN_EVAL = """import os, sys
from shiq_eval import cli, generate
if os.environ.get("KEEP_ROWS"):  # the rows kept beside the results, as an interrupted run leaves them
    cli.SavedRows.discard = lambda self: None
if os.environ["RANK"] != "0":  # a row file this rank does not see (another node's stale view of --out)
    def unseen(path, *a):
        raise FileNotFoundError(f"{path}: not seen")
    cli.read_saved_row = unseen
    def damaged(path, *a):  # and a batch file it sees damaged
        raise ValueError(f"{path}: damaged")
    cli.read_saved_batch = damaged
if os.environ.get("STOP_AT_BATCH"):  # Ctrl-C while that batch is sampled, on every rank
    real, seen = generate.MegatronPolicy._generate_batch, []
    def counted(self, *a, **kw):
        seen.append(len(seen))
        if len(seen) == int(os.environ["STOP_AT_BATCH"]):
            raise KeyboardInterrupt
        return real(self, *a, **kw)
    generate.MegatronPolicy._generate_batch = counted
sys.exit(cli.main())
"""


# three torchrun launches (about 50 s); its quick variants: test_ranks_follow_rank_0_on_an_overwrite_runs_saved_rows
# (two ranks take rank 0's saved row and batch) and test_eval_run_with_the_megatron_engine_tp1_and_tp2
@pytest.mark.slow
def test_a_tp2_run_resumes_with_rank_0s_saved_rows_and_batches(tmp_path):
    """Under torchrun (TP=2) every rank looked for the saved rows itself: a row file one rank saw and another did
    not (a node's stale view of --out) made one rank reuse the row while the other evaluated it, the ranks then in
    different collectives. Rank 0 reads the saved rows, and the saved batches of a row interrupted part-way, and
    every rank takes its answer (rank 1 here does not see the row files and sees the batch file damaged): a run
    resumed from some of the rows and batches reuses them and writes an uninterrupted run's results, byte for
    byte."""
    init = tiny_hf_folder(tmp_path / "init")
    for i, name in enumerate(("p1", "p2", "p3")):
        tiny_hf_folder(tmp_path / name)
        torch.manual_seed(10 + i)
        transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(init)).save_pretrained(tmp_path / name)
    argv = score_len_run(tmp_path, tmp_path / "p1", init, max_new_tokens=3)
    argv[2:2] = [str(tmp_path / "p2"), str(tmp_path / "p3")]
    argv += ["--samples-per-prompt", "3", "--batch-size", "1", "--engine", "megatron", "--tp", "2"]
    (tmp_path / "torchrun_eval.py").write_text(TORCHRUN_EVAL)
    from shiq_train.parallel import free_port

    def torchrun(out: Path, **env) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        command += ["--master_port", str(free_port()), "torchrun_eval.py", *argv, "--out", str(out)]
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # (the cwd is tmp_path)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": path, **env}
        return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)

    whole, out = tmp_path / "whole", tmp_path / "o"
    res = torchrun(whole, KEEP_ROWS="1")
    assert res.returncode == 0, res.stderr[-6000:]
    files = {json.loads(f.read_text())["key"]["row"]["run"]: f for f in (whole / ".rows").glob("*.json")}
    assert sorted(files) == ["p1", "p2", "p3", "reference"]
    res = torchrun(out, STOP_AT_BATCH="5")  # p1's second batch: the reference's row (3 batches), p1's first saved
    assert res.returncode != 0 and "shiq-eval: interrupted" in res.stderr, res.stderr[-3000:]
    assert len(list((out / ".rows").glob("*.json"))) == 1 and len(list((out / ".rows").glob("*/batch_*.json"))) == 1
    (out / ".rows" / files["p2"].name).write_bytes(files["p2"].read_bytes())  # a row saved by another run
    res = torchrun(out)
    assert res.returncode == 0, res.stderr[-6000:]
    assert f"shiq-eval: 2 of 4 rows reused from {out / '.rows'}" in res.stderr, res.stderr[-3000:]
    assert "1 batch of unfinished rows reused" in res.stderr and "warning" not in res.stderr, res.stderr[-3000:]
    assert results_of(out) == results_of(whole)
    assert not (out / ".rows").exists()


@pytest.mark.parametrize(
    "tp, change, message",
    [
        (
            3,
            {"vocab_size": 132},
            "model.num_attention_heads=4 must be divisible by the tensor-parallel size 3 (--tp: 1, 2 or 4 divide it)",
        ),
        (2, {"num_key_value_heads": 1}, "model.num_query_groups=1 must be divisible by the tensor-parallel size 2"),
        (
            2,
            {"vocab_size": VOCAB + 1},
            f"model.vocab_size={VOCAB + 1} must be divisible by the tensor-parallel size 2 "
            "(--tp: a size that divides it)",
        ),
        (2, {"intermediate_size": 255}, "model.ffn_hidden_size=255 must be divisible by the tensor-parallel size 2"),
    ],
)
def test_megatron_engine_refuses_a_tp_size_that_does_not_split_the_model(tmp_path, monkeypatch, tp, change, message):
    """Only the heads were checked: a vocabulary or MLP width --tp does not divide failed in megatron-core, or
    named the training config's parallel.tp (and suggested padding a vocabulary read from the weights)."""
    from megatron.core import parallel_state as ps

    from shiq_eval.cli import EvalInputError, MegatronEngine
    from shiq_train import parallel

    folder = tiny_hf_folder(tmp_path / "m")  # 4 attention heads, 4 key-value heads
    config = transformers.AutoConfig.from_pretrained(folder)
    for key, value in change.items():
        setattr(config, key, value)
    model = transformers.LlamaForCausalLM(config)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    with parallel.distributed(seed=0):
        monkeypatch.setattr(ps, "get_tensor_model_parallel_world_size", lambda: tp)
        with pytest.raises(EvalInputError) as e:
            MegatronEngine(model, tok)
    assert message in str(e.value) and "parallel.tp" not in str(e.value) and "pad" not in str(e.value), e.value


@pytest.mark.parametrize(
    "command",
    [
        ["shiq_eval.cli"],
        ["shiq_eval.cli", "run"],
        ["shiq_eval.cli", "bfcl"],
        ["shiq_eval.cli", "bfcl", "rollout"],
        ["shiq_eval.bfcl"],
        ["shiq_eval.bfcl", "check-ground-truth"],
        ["shiq_eval.bfcl", "report"],
        ["shiq_eval.bfcl", "to-buffer"],
        ["shiq_eval.recipes.demo"],
        ["shiq_eval.recipes.toys"],
    ],
    ids=" ".join,
)
def test_help_is_plain_text_without_checkout_paths(command, tmp_path):
    """--help of shiq-eval, shiq-eval bfcl, shiq-demo and shiq-toys: no reST markup, no absolute path
    of the checkout (nor of the configs folder the package resolves)."""
    from shiq_data.assets import config_dir

    res = subprocess.run(
        [sys.executable, "-m", *command, "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert text.startswith("usage: ") and len(text.splitlines()) > 5, text
    for bad in ["``", ":func:", ":class:", ":mod:", str(REPO), str(config_dir().resolve().parent)]:
        assert bad not in text, (bad, text)


def test_a_run_trained_on_another_tokenizer_is_refused_before_sampling(tmp_path, capsys):
    """The checkpoint records its buffer's tokenizer; evaluating with a reference whose tokenizer differs is
    refused naming both, before any model is sampled or the reward model read."""
    folder = tiny_hf_folder(tmp_path / "m")
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    buffer_tok = {"name": "gpt2", "fingerprint": "f" * 64, "vocab_size": VOCAB}
    meta = {"loss": {"name": "shiq"}, "hf_config": {"vocab_size": VOCAB}, "tokenizer": buffer_tok}
    (step / "meta.json").write_text(json.dumps({"step": 1, "layout": {"tp": 1, "pp": 1, "dp": 1}, "meta": meta}))
    (step / "rank_tp0_pp0_dp0.pt").write_bytes(b"")  # a placeholder: the refusal comes before weights are read
    from safetensors.numpy import save_file

    save_file({"weight": np.zeros(384), "bias": np.zeros(1)}, str(tmp_path / "rm.safetensors"))  # a head, never used
    (tmp_path / "p.jsonl").write_text('{"prompt": "w3 w4"}\n')
    args = ["run", str(tmp_path / "run"), "--out", str(tmp_path / "o"), "--prompts", str(tmp_path / "p.jsonl")]
    args += ["--reward-model", str(tmp_path / "rm.safetensors"), "--reference", str(folder)]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar
    assert err.startswith("shiq-eval: error: ") and f"the buffer of {step}: built with tokenizer 'gpt2'" in err
    assert "ffffffffffff" in err and "evaluation model" in err
    assert not (tmp_path / "o").exists()
    # the same record with the folder's own tokenizer passes the check: the evaluation runs (a real head now)
    from shiq_data.tokenizers import load_tokenizer

    meta["tokenizer"] = load_tokenizer(str(folder))[1]
    meta["hf_config"] = transformers.LlamaConfig.from_pretrained(folder).to_dict()
    (step / "meta.json").write_text(json.dumps({"step": 1, "layout": {"tp": 1, "pp": 1, "dp": 1}, "meta": meta}))
    RegressionRewardModel.fit(minilm_encoder(), ["good", "bad"], [1.0, -1.0], l2=1.0).save(tmp_path / "rm.safetensors")
    cut = b"PK\x03\x04"  # truncated, its checksum updated with it: refused naming the file
    (step / "rank_tp0_pp0_dp0.pt").write_bytes(cut)
    (step / "rank_tp0_pp0_dp0.pt.sha256").write_text(hashlib.sha256(cut).hexdigest() + "  rank_tp0_pp0_dp0.pt\n")
    capsys.readouterr()
    assert main(args + ["--max-new-tokens", "2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "fingerprint" not in err and f"{step / 'rank_tp0_pp0_dp0.pt'}: not a readable checkpoint" in err, err


def test_a_blank_prompt_is_named_with_its_file_and_line(tmp_path):
    """A prompt of spaces encoded to no token and failed later as "prompt 0 is empty", no file or line."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": "   "}\n')
    with pytest.raises(
        EvalInputError, match=rf"{re.escape(str(path))}, line 2: field 'prompt' must be a string that is not blank"
    ):
        read_prompts_jsonl(path)


def test_a_labels_control_characters_are_escaped_on_stderr_and_in_the_plots(tmp_path, capsys):
    """A --label holding an escape sequence was sent to the terminal as it is in the line each row prints (it
    turned the rest of the terminal red), and matplotlib, whose font has no glyph for ESC, warned while drawing
    the legend. The line and the legend show it escaped (\\x1b); results.json keeps the label as given."""
    import warnings

    from shiq_eval.report import legend_text

    init = tiny_hf_folder(tmp_path / "init")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "w3 w4"}) + "\n")
    label = "a\x1b[31mb"
    argv = ["run", str(init), "--label", label, "--out", str(tmp_path / "o"), "--prompts", str(tmp_path / "p.jsonl")]
    argv += ["--scorer", "vader", "--reference", str(init), "--max-new-tokens", "2", "--no-chat"]
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 0
    err = capsys.readouterr().err
    assert "\x1b" not in err and "a\\x1b[31mb (" in err, err
    assert not [w for w in caught if "Glyph" in str(w.message)], [str(w.message) for w in caught]
    assert [r["run"] for r in json.loads((tmp_path / "o" / "results.json").read_text())] == ["reference", label]
    assert legend_text("a\x1bb\nc\td") == "a\\x1bb\nc\td"  # (line breaks and tabs drawn as they are)


@pytest.mark.parametrize(
    "row, field",
    [
        ('{"prompt": "a\\ud800b"}', "prompt"),
        ('{"prompt": "fine", "scorer_prompt": "\\udfff"}', "scorer_prompt"),
        ('{"messages": [{"role": "user", "content": "x\\ud83d"}]}', "messages[0].content"),
    ],
)
def test_a_prompt_with_a_lone_surrogate_is_named_with_its_file_line_and_field(tmp_path, row, field):
    """JSON's "\\ud800" escape reads as a lone surrogate, which is no UTF-8 text: the prompts were read, then
    hashing them failed with Python's codec error, naming no file, line or field. A pair of surrogates, one
    character, stays text."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "\\ud83d\\ude00"}\n' + row + "\n")
    with pytest.raises(
        EvalInputError, match=rf"{re.escape(str(path))}, line 2: field '{re.escape(field)}': not Unicode text"
    ):
        read_prompts_jsonl(path)
    path.write_text('{"prompt": "\\ud83d\\ude00"}\n')
    assert read_prompts_jsonl(path)[0] == ["\U0001f600"]


def test_a_checkpoint_that_records_no_tokenizer_is_said_to_go_unchecked(tmp_path, capsys):
    """A checkpoint of a release that did not record its buffer's tokenizer was checked through the buffer's
    path in its meta.json; that path is no longer followed, and the check it cannot have is said, not skipped
    silently (a Hugging Face folder, which records none, is not an older checkpoint)."""
    from shiq_data.tokenizers import load_tokenizer
    from shiq_eval.cli import check_tokenizers

    tok = load_tokenizer("gpt2")[0]
    infos = [{"kind": "checkpoint", "path": tmp_path / "step_00000001", "tokenizer": None}]
    check_tokenizers([*infos, {"kind": "hf", "path": tmp_path / "hf", "tokenizer": None}], tok, None)
    assert capsys.readouterr().err == (
        f"shiq-eval: warning: {tmp_path / 'step_00000001' / 'meta.json'} records no tokenizer (an older checkpoint): "
        "its buffer's tokenizer cannot be compared with the evaluation's\n"
    )


def test_a_reference_other_than_the_runs_init_is_warned_of(tmp_path, capsys):
    """--reference another model than the one the runs started from was taken without a word: KL and J then
    measure the distance to a model the policies were never pulled towards. Warned of now, unless it is the
    init by name or by the folder its path leads to (a copy elsewhere is warned of, as the recorded path's files are
    not read: a path a file names is not followed)."""
    import shutil

    from shiq_eval.cli import warn_other_reference

    init = tiny_hf_folder(tmp_path / "init")
    shutil.copytree(init, tmp_path / "copy")
    (tmp_path / "link").symlink_to(init)
    other = tmp_path / "other"
    model = transformers.LlamaForCausalLM.from_pretrained(str(init), dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)
    model.save_pretrained(other)
    capsys.readouterr()  # (transformers' bars)
    for reference, inits, warned in (
        (init, {str(init)}, None),
        (tmp_path / "copy", {str(init)}, str(init)),  # the same weights under another name: said, with the caveat
        (tmp_path / "link", {str(init)}, None),  # the same folder
        (other, {str(init)}, str(init)),
        (other, {str(init), str(other)}, str(init)),
        (init, {str(tmp_path / "gone")}, str(tmp_path / "gone")),  # a folder no longer there: only its name
    ):
        warn_other_reference(str(reference), inits)
        err = capsys.readouterr().err
        if warned is None:
            assert err == "", (reference, err)
        else:
            assert err == (
                f"shiq-eval: warning: --reference {reference} is not the model the runs started from ({warned}) "
                "unless it is a copy of it: KL and J are measured against it\n"
            )


def test_a_damaged_tokenizer_record_is_named_in_one_line(tmp_path, capsys, monkeypatch):
    """A checkpoint's meta.json (or an export's record) whose tokenizer lacks its fingerprint or vocabulary size
    ended, once the reference was loaded, in a KeyError traceback from the tokenizer check (exit status 1); one
    that is not an object was taken for an older checkpoint's missing record and the check skipped. Both are now
    refused naming the file and field, before any sampling (exit status 2)."""
    init = tiny_hf_folder(tmp_path / "init")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "score_len.py").write_text("def score(p, c):\n    return [float(len(x)) for x in c]\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "w3 w4"}\n')
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    (step / "rank_tp0_pp0_dp0.pt").write_bytes(b"")  # a placeholder: the refusal comes before weights are read
    argv = ["run", str(tmp_path / "run"), "--out", str(tmp_path / "o"), "--prompts", str(prompts), "--quiet"]
    argv += ["--scorer", "python:score_len:score", "--reference", str(init)]
    for tokenizer in ({}, {"fingerprint": "f" * 64}, {"fingerprint": 3, "vocab_size": 128}, "gpt2"):
        meta = {"loss": {"name": "shiq", "beta": 0.1}, "hf_config": {}, "tokenizer": tokenizer}
        (step / "meta.json").write_text(json.dumps({"step": 1, "layout": {"tp": 1, "pp": 1, "dp": 1}, "meta": meta}))
        capsys.readouterr()
        assert main(argv) == 2, tokenizer
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"shiq-eval: error: {step / 'meta.json'}: field meta.tokenizer must be"), err
        assert len(err.splitlines()) == 1 and not (tmp_path / "o").exists()
    record = {"loss": {"name": "shiq", "beta": 0.1}, "step": 1, "tokenizer": {"vocab_size": 128}}
    record["sha256"] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in init.glob("*.safetensors")}
    (init / "shiq_export.json").write_text(json.dumps(record))
    argv[1] = str(init)
    assert main(argv) == 2
    assert f"{init / 'shiq_export.json'}: field tokenizer must be" in capsys.readouterr().err


def test_a_prompt_the_chat_template_refuses_is_named_in_one_line(tmp_path, capsys, monkeypatch):
    """A chat template that refuses a conversation (raise_exception, as templates without a system role do) ended in
    jinja's TemplateError traceback (exit status 1) once the reference was loaded; it is now one line naming the
    prompts file and the prompt (exit status 2)."""
    init = tiny_hf_folder(tmp_path / "init")
    config = json.loads((init / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }} {% endfor %}"
    )
    (init / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "score_len.py").write_text("def score(p, c):\n    return [float(len(x)) for x in c]\n")
    prompts = tmp_path / "p.jsonl"
    system = [{"role": "system", "content": "w5"}, {"role": "user", "content": "w3 w4"}]
    prompts.write_text(json.dumps({"prompt": "w3 w4"}) + "\n" + json.dumps({"messages": system}) + "\n")
    argv = ["run", str(init), "--out", str(tmp_path / "o"), "--prompts", str(prompts), "--quiet"]
    argv += ["--scorer", "python:score_len:score", "--reference", str(init)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"shiq-eval: error: {prompts}, prompt 2: the tokenizer's chat template refuses it (System role not supported)"
    ), err
    assert not (tmp_path / "o").exists()
    # a prompt that spells a control token ("<eos>" here) would be encoded as that token: refused as a buffer's is
    prompts.write_text(json.dumps({"prompt": "w3 w4"}) + "\n" + json.dumps({"prompt": "w3 <eos> w4"}) + "\n")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        f"shiq-eval: error: {prompts}, prompt 2: contains '<eos>', the text of one of the tokenizer"
    ), err
    assert not (tmp_path / "o").exists()


def test_a_prompt_too_long_for_the_models_is_named_with_its_file(tmp_path, capsys, monkeypatch):
    """A prompt whose tokens and max_new_tokens pass the models' max_position_embeddings was refused as "prompt 3
    of the 6 sampled (each prompt once per sample)": no file, and an index among the repeated samples, not the
    file's prompt (here its second). It is now named by the prompts file and its place there."""
    init = tiny_hf_folder(tmp_path / "init")  # max_position_embeddings 16
    monkeypatch.chdir(tmp_path)
    (tmp_path / "score_len.py").write_text("def score(p, c):\n    return [float(len(x)) for x in c]\n")
    prompts = tmp_path / "p.jsonl"
    long = " ".join(f"w{i}" for i in range(3, 16))  # 13 tokens
    prompts.write_text(json.dumps({"prompt": "w3"}) + "\n\n" + json.dumps({"prompt": long}) + "\n")
    argv = ["run", str(init), "--out", str(tmp_path / "o"), "--prompts", str(prompts), "--quiet"]
    argv += ["--scorer", "python:score_len:score", "--reference", str(init), "--samples-per-prompt", "3"]
    capsys.readouterr()
    assert main([*argv, "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"shiq-eval: error: {prompts}, prompt 2: 13 tokens + max_new_tokens 4 exceed the models' "
        "max_position_embeddings 16: shorten the prompt or lower max_new_tokens"
    ), err
    assert not (tmp_path / "o").exists()
    assert main([*argv, "--max-new-tokens", "3"]) == 0  # 13 + 3 fit


def test_reward_model_flag_keeps_a_suites_hf_reward_model_scorer(tmp_path, capsys, monkeypatch):
    """--reward-model alone made the scorer reward_model (a head file) even when the suite names hf_reward_model,
    so another Hugging Face folder for that suite was refused as "no such file"; it now replaces the suite's
    folder and the suite's scorer stands. With a suite whose scorer reads no model (vader), it is still a head."""
    import shiq_eval.cli as cli

    loaded = []
    real = cli.load_suite

    def recording(spec, overrides=None):
        loaded.append(real(spec, overrides)[0])
        return loaded[-1], None

    monkeypatch.setattr(cli, "load_suite", recording)
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "config.json").write_text("{}")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    for scorer, given, want in (("hf_reward_model", "other", "hf_reward_model"), ("vader", "head.st", "reward_model")):
        suite = tmp_path / f"{scorer}.yaml"
        suite.write_text(f"name: s\nscorer: {scorer}\nreward_model: rm\nmovie_prompts: 2\n")
        run = ["run", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--suite", str(suite)]
        assert main([*run, "--reward-model", str(tmp_path / given)]) == 2  # (no such checkpoint, after the suite)
        assert (loaded[-1].scorer, loaded[-1].reward_model) == (want, str(tmp_path / given))
    capsys.readouterr()


def test_a_reward_model_beside_a_scorer_that_reads_none_is_refused(tmp_path, capsys):
    """``--scorer vader --reward-model rm.safetensors`` scored with VADER and left the head unused, even a file
    that did not exist, and the results said nothing of it: the two flags contradict each other."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "w3 w4"}\n')
    for scorer in ("vader", "python:score_len:score"):
        argv = ["run", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--prompts", str(prompts)]
        assert main([*argv, "--scorer", scorer, "--reward-model", str(tmp_path / "rm.safetensors")]) == 2
        assert capsys.readouterr().err == (
            f"shiq-eval: error: --reward-model: scorer {scorer} reads no reward model (only reward_model and "
            "hf_reward_model do), so the file would be left unused: leave out --reward-model or --scorer\n"
        )
        assert not (tmp_path / "o").exists()


def score_len_run(tmp_path, policy, reference, max_new_tokens: int) -> list[str]:
    """``shiq-eval run`` of ``policy`` against ``reference`` on one prompt, scored by completion length (a
    ``python:`` scorer written in ``tmp_path``, the working folder), into ``tmp_path/o``."""
    (tmp_path / "score_len.py").write_text("def score(p, c):\n    return [float(len(x)) for x in c]\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "w3 w4"}) + "\n")
    argv = ["run", str(policy), "--out", str(tmp_path / "o"), "--prompts", str(prompts), "--quiet"]
    return argv + [
        "--scorer",
        "python:score_len:score",
        "--reference",
        str(reference),
        "--max-new-tokens",
        f"{max_new_tokens}",
    ]


@pytest.mark.parametrize("which", ["policy", "reference"])
def test_a_row_names_the_weights_it_evaluated(tmp_path, monkeypatch, which):
    """A policy's weights were hashed after it was evaluated, and the reference's after it was loaded, so weights
    replaced meanwhile (a training run saving into the folder, a folder being written) gave the row the new
    files' hash, not that of the weights evaluated."""
    from shiq_eval import cli as eval_cli

    init = tiny_hf_folder(tmp_path / "init")
    policy = tiny_hf_folder(tmp_path / "policy")
    weights = (policy if which == "policy" else init) / "model.safetensors"
    loaded_hash = hashlib.sha256(weights.read_bytes()).hexdigest()
    name = "hf_policy" if which == "policy" else "load_reference"
    loader = getattr(eval_cli, name)

    def load_then_replace(spec):
        loaded = loader(spec)
        config = (loaded if which == "policy" else loaded[0]).config
        torch.manual_seed(7)
        transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "other")  # other weights
        (tmp_path / "other" / "model.safetensors").replace(weights)
        return loaded

    monkeypatch.setattr(eval_cli, name, load_then_replace)
    monkeypatch.chdir(tmp_path)
    argv = score_len_run(tmp_path, policy, init, max_new_tokens=2)
    assert main(argv) == 0
    rows = json.loads((tmp_path / "o" / "results.json").read_text())
    assert hashlib.sha256(weights.read_bytes()).hexdigest() != loaded_hash  # the folder did change
    assert rows[0]["run"] == "reference" and len(rows) == 2  # then the policy's row
    assert rows[1 if which == "policy" else 0]["model_sha256"] == loaded_hash


@pytest.mark.parametrize(
    "arch, edit",
    [({"add_qkv_bias": True}, {"model_type": "llama"}), ({}, {"model_type": "qwen3", "head_dim": 16})],
)
def test_megatron_engine_refuses_a_checkpoint_whose_meta_json_does_not_fit_its_weights(tmp_path, arch, edit):
    """meta.hf_config edited to another architecture than the weights': the megatron engine loaded a Qwen2 run's
    query/key/value biases into a Llama model without them (dropped, other logits: the export refuses it), and a
    Llama run read as Qwen3 failed in a KeyError traceback instead of one line naming the step directory."""
    import yaml

    from shiq_data.assets import config_dir
    from shiq_eval.cli import MegatronEngine
    from shiq_train import model as M
    from shiq_train import parallel
    from shiq_train.checkpoint import save_checkpoint
    from shiq_train.cli import llama_config_from_model

    section = yaml.safe_load((config_dir() / "model" / "tiny.yaml").read_text())
    cfg = M.ModelConfig.from_dict({**section, **arch})
    hf_config = {**llama_config_from_model(cfg).to_dict(), **edit}
    folder = tiny_hf_folder(tmp_path / "ref")
    ref, tok = transformers.LlamaForCausalLM.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)
    with parallel.distributed(seed=0):
        save_checkpoint(tmp_path / "run" / "checkpoints", 1, M.build_model(cfg), meta={"hf_config": hf_config})
        step = tmp_path / "run" / "checkpoints" / "step_00000001"
        engine = MegatronEngine(ref, tok)
        with pytest.raises(EvalInputError, match=re.escape(f"{step}: its weights do not fit meta.hf_config")):
            engine.policy({"kind": "checkpoint", "path": step, "hf_config": hf_config})


def test_megatron_engine_names_the_folder_of_a_model_it_does_not_compute(tmp_path):
    """A Hugging Face folder the megatron engine cannot compute exactly (a Mistral whose sliding window acts) as the
    policy or the reference: refused in one line naming the field, but not the folder (which of the models?)."""
    from shiq_eval.checkpoints import hf_folder_info
    from shiq_eval.cli import MegatronEngine
    from shiq_train import parallel

    folder = tiny_hf_folder(tmp_path / "ref")
    ref, tok = transformers.LlamaForCausalLM.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)
    config = transformers.MistralConfig(**{**ref.config.to_dict(), "model_type": "mistral", "sliding_window": 8})
    transformers.MistralForCausalLM(config).save_pretrained(tmp_path / "mistral")
    with parallel.distributed(seed=0):
        engine = MegatronEngine(ref, tok)
        with pytest.raises(
            EvalInputError, match=re.escape(f"{tmp_path / 'mistral'}: model_type 'mistral' with sliding")
        ):
            engine.policy(hf_folder_info(tmp_path / "mistral"))
        mistral = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mistral")
        with pytest.raises(
            EvalInputError, match=re.escape(f"{tmp_path / 'mistral'}: model_type 'mistral' with sliding")
        ):
            MegatronEngine(mistral, tok)


@pytest.mark.parametrize("arch", ["gemma", "rope_linear"])
def test_megatron_engine_refuses_a_model_it_does_not_compute_before_the_reference_is_evaluated(
    tmp_path, capsys, monkeypatch, arch
):
    """A policy folder of an architecture or RoPE scaling the megatron engine does not compute (Gemma; linear RoPE
    scaling) was refused only once the reference had been sampled and scored (its row saved in --out/.rows/, which
    on a real suite is most of an hour); it is now refused before any model is evaluated, in one line naming the
    folder and the field, nothing written."""
    init = tiny_hf_folder(tmp_path / "init")
    shape = {k: v for k, v in transformers.AutoConfig.from_pretrained(init).to_dict().items() if k != "model_type"}
    if arch == "gemma":
        config, field = transformers.GemmaConfig(**{**shape, "head_dim": 16}), "model_type 'gemma'"
        transformers.GemmaForCausalLM(config).save_pretrained(tmp_path / "policy")
    else:
        config = transformers.LlamaConfig(**{**shape, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
        transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "policy")
        field = "rope_type='linear'"
    monkeypatch.chdir(tmp_path)
    argv = score_len_run(tmp_path, tmp_path / "policy", init, max_new_tokens=2)
    capsys.readouterr()
    assert main([*argv, "--engine", "megatron"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{tmp_path / 'policy'}: " in err and field in err, err
    assert "kept" not in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("which", ["policy", "reference"])
def test_a_model_type_transformers_does_not_know_is_named_with_its_config(tmp_path, capsys, monkeypatch, which):
    """A folder whose config.json gives a model_type transformers does not know was refused in transformers' words
    alone, naming no file (which of the models?), and as a policy only once the reference had been evaluated; it is
    now refused in one line naming its config.json before any model is evaluated, nothing written."""
    init = tiny_hf_folder(tmp_path / "init")
    odd = tiny_hf_folder(tmp_path / "odd")
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "model_type": "nosuchmodel"}))
    monkeypatch.chdir(tmp_path)
    argv = score_len_run(tmp_path, odd, init, 2) if which == "policy" else score_len_run(tmp_path, init, odd, 2)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{odd / 'config.json'}: " in err and "nosuchmodel" in err, err
    assert not (tmp_path / "o").exists()


def _checkpoint_of_hf_config(tmp_path, monkeypatch, capsys, **changes):
    """``(step, argv, evaluated)``: a checkpoint step whose ``meta.hf_config`` is a tiny Llama's with ``changes``
    (its rank file a placeholder: a refusal of the config comes before weights are read), the arguments of a run
    of it against that Llama, and the list every evaluation is appended to (each then fails: none is expected)."""
    init = tiny_hf_folder(tmp_path / "init")
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    hf_config = {**transformers.LlamaConfig.from_pretrained(init).to_dict(), **changes}
    meta = {"loss": {"name": "shiq", "beta": 0.1}, "hf_config": hf_config}
    (step / "meta.json").write_text(json.dumps({"step": 1, "layout": {"tp": 1, "pp": 1, "dp": 1}, "meta": meta}))
    (step / "rank_tp0_pp0_dp0.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    argv = score_len_run(tmp_path, tmp_path / "run", init, max_new_tokens=2)
    capsys.readouterr()
    evaluated = []
    monkeypatch.setattr("shiq_eval.evaluate.evaluate_policy", lambda *a, **k: evaluated.append(a) or 1 / 0)
    return step, argv, evaluated


@pytest.mark.parametrize("engine", ["megatron", "hf"])
def test_either_engine_names_a_meta_json_field_of_the_wrong_type_in_one_line(tmp_path, capsys, monkeypatch, engine):
    """A checkpoint whose meta.hf_config gives a field of the wrong type (a hand edit) ended the megatron engine in
    transformers' traceback (exit status 1) once the reference had been evaluated, and the hf engine refused it
    only then; it is now one line naming the meta.json and the field, before any model is evaluated, nothing
    written."""
    step, argv, evaluated = _checkpoint_of_hf_config(tmp_path, monkeypatch, capsys, num_hidden_layers="two")
    assert main([*argv, "--engine", engine]) == 2
    assert evaluated == []  # (not even the reference)
    lines = capsys.readouterr().err.strip().splitlines()  # (after the warning that meta.json records no tokenizer)
    assert "Traceback" not in lines[0] and lines[-1].startswith("shiq-eval: error: "), lines
    assert f"{step / 'meta.json'}: field meta.hf_config:" in lines[-1] and "num_hidden_layers" in lines[-1], lines
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("model_type", ["gemma", "phi"])
def test_the_hf_engine_refuses_a_checkpoint_of_another_model_type_before_any_model_is_evaluated(
    tmp_path, capsys, monkeypatch, model_type
):
    """A checkpoint whose meta.hf_config names a model_type shiq-train does not train (Gemma, Phi: a hand edit) was
    refused by the hf engine only once the reference had been sampled and scored (its row kept in --out), as the
    megatron engine refused it at once; it is now one line naming the meta.json, the model_type and the ones
    supported, before any model is evaluated, nothing written. (A Hugging Face folder of such a model is evaluated
    by transformers' own classes with the hf engine.)"""
    step, argv, evaluated = _checkpoint_of_hf_config(tmp_path, monkeypatch, capsys, model_type=model_type)
    assert main([*argv, "--engine", "hf"]) == 2
    assert evaluated == []  # (not even the reference)
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (after the warning that meta.json records no tokenizer)
    assert last.startswith(f"shiq-eval: error: {step / 'meta.json'}: field meta.hf_config: model_type {model_type!r}")
    assert all(t in last for t in ("'llama'", "'mistral'", "'qwen2'", "'qwen3'")), last
    assert not (tmp_path / "o").exists()


def test_a_tokenizer_without_an_end_of_sequence_token_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """A tokenizer with no EOS token (--tokenizer, or the reference's) ended in a TypeError traceback (int(None))
    once the first policy was sampled (exit status 1); sampling needs the token that ends a completion, so it is
    now one line naming the tokenizer, before any model is sampled (exit status 2)."""
    init = tiny_hf_folder(tmp_path / "init")
    config = json.loads((init / "tokenizer_config.json").read_text())
    config.pop("eos_token", None)
    (init / "tokenizer_config.json").write_text(json.dumps(config))
    special = init / "special_tokens_map.json"
    if special.exists():
        special.write_text(json.dumps({k: v for k, v in json.loads(special.read_text()).items() if k != "eos_token"}))
    assert transformers.AutoTokenizer.from_pretrained(init).eos_token_id is None
    monkeypatch.chdir(tmp_path)
    argv = score_len_run(tmp_path, init, init, max_new_tokens=2)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "end-of-sequence" in err, err
    assert not (tmp_path / "o").exists()


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """A tokenizer (--tokenizer) with more tokens than the models' vocabulary was checked against the models only
    through a checkpoint's recorded tokenizer; for Hugging Face folders without one, a prompt token past the
    embedding ended in an IndexError traceback from the reference's first forward pass (exit status 1). It is now
    refused before any sampling, in one line (exit status 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    init = tiny_hf_folder(tmp_path / "init")  # VOCAB tokens
    words = ["<pad>", "<eos>"] + [f"w{i}" for i in range(2, 2 * VOCAB)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    big = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    big.save_pretrained(tmp_path / "big")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "score_len.py").write_text("def score(p, c):\n    return [float(len(x)) for x in c]\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": f"w3 w{VOCAB + 5}"}) + "\n")
    argv = ["run", str(init), "--out", str(tmp_path / "o"), "--prompts", str(prompts), "--quiet"]
    argv += ["--scorer", "python:score_len:score", "--reference", str(init), "--max-new-tokens", "2"]
    capsys.readouterr()
    assert main([*argv, "--tokenizer", str(tmp_path / "big")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{2 * VOCAB} tokens" in err and f"only {VOCAB}" in err, err
    assert not (tmp_path / "o").exists()
    assert main([*argv, "--tokenizer", str(init)]) == 0  # the models' own tokenizer


def test_a_policy_whose_vocabulary_is_not_the_references_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """The KL compares the policy's and the reference's distributions over the same tokens. A policy folder with
    more token ids than the reference was sampled and then, once it drew an id past the reference's embedding,
    ended in an IndexError traceback from the reference's pass (exit status 1; with fewer, a shape error). Such a
    policy is now refused before any sampling, in one line naming it (exit status 2)."""
    import shutil

    init = tiny_hf_folder(tmp_path / "init")
    wide = tmp_path / "wide"
    config = transformers.AutoConfig.from_pretrained(init)
    config.vocab_size = 2 * VOCAB
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[VOCAB:] += 5.0  # it draws ids the reference has not
    model.save_pretrained(wide)
    for f in init.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, wide / f.name)
    monkeypatch.chdir(tmp_path)
    argv = score_len_run(tmp_path, wide, init, max_new_tokens=4)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(wide) in err and f"{2 * VOCAB}" in err and f"{VOCAB}" in err, err
    assert not (tmp_path / "o").exists()


def test_a_policy_folder_with_another_tokenizer_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """A Hugging Face policy folder (no shiq-train export record) holding a tokenizer of the reference's vocabulary
    size but other token ids was evaluated in silence: its samples read and its KL taken as the reference's ids,
    which name other tokens in it. It is now refused before any sampling, in one line naming the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    init = tiny_hf_folder(tmp_path / "init")
    policy = tiny_hf_folder(tmp_path / "policy")
    words = ["<pad>", "<eos>"] + [f"w{i}" for i in range(VOCAB - 1, 1, -1)]  # the same words, other ids
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    other.save_pretrained(policy)
    ours = transformers.AutoTokenizer.from_pretrained(init)
    theirs = transformers.AutoTokenizer.from_pretrained(policy)
    assert len(theirs) == len(ours) == VOCAB and ours.encode("w3") != theirs.encode("w3")
    monkeypatch.chdir(tmp_path)
    argv = score_len_run(tmp_path, policy, init, max_new_tokens=2)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{policy}: its tokenizer" in err, err
    assert not (tmp_path / "o").exists()
    ours.save_pretrained(policy)  # the reference's own tokenizer: evaluated
    assert main(argv) == 0


def test_a_tokenizer_of_other_ids_than_the_references_own_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """--tokenizer of the reference's vocabulary size but other token ids than the tokenizer the reference folder
    holds was taken in silence: the prompts encoded, and both models' tokens read, as ids the reference gives to
    other tokens. It is now refused before any sampling, in one line naming the option."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    init = tiny_hf_folder(tmp_path / "init")
    policy = tmp_path / "policy"
    transformers.LlamaForCausalLM.from_pretrained(init).save_pretrained(policy)  # no tokenizer of its own
    words = ["<pad>", "<eos>"] + [f"w{i}" for i in range(VOCAB - 1, 1, -1)]  # the same words, other ids
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    other.save_pretrained(tmp_path / "other")
    ours = transformers.AutoTokenizer.from_pretrained(init)
    assert len(other) == len(ours) == VOCAB and ours.encode("w3") != other.encode("w3")
    ours.save_pretrained(tmp_path / "same")
    monkeypatch.chdir(tmp_path)
    argv = score_len_run(tmp_path, policy, init, max_new_tokens=2)
    capsys.readouterr()
    assert main([*argv, "--tokenizer", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--tokenizer {tmp_path / 'other'}: its token ids" in err, err
    assert not (tmp_path / "o").exists()
    assert main([*argv, "--tokenizer", str(tmp_path / "same")]) == 0  # the reference's tokenizer, saved elsewhere


def test_a_prompts_folder_is_said_to_be_a_folder(tmp_path, capsys):
    """--prompts a folder was refused as "no such file", which it is not; it is now said to be a folder, not
    a JSONL file, in one line (exit status 2)."""
    init = tiny_hf_folder(tmp_path / "init")
    (tmp_path / "prompts").mkdir()
    argv = ["run", str(init), "--out", str(tmp_path / "o"), "--prompts", str(tmp_path / "prompts")]
    argv += ["--scorer", "vader", "--reference", str(init)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a folder, not a JSONL file" in err and "no such file" not in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("label", ["", "  "])
def test_an_empty_label_is_refused_in_one_line(tmp_path, capsys, label):
    """--label "" was accepted and gave rows whose run name was empty; an empty or blank label names no run and is
    now refused in one line (exit status 2), before anything is written."""
    init = tiny_hf_folder(tmp_path / "init")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "w3 w4"}) + "\n")
    argv = ["run", str(init), "--label", label, "--out", str(tmp_path / "o"), "--prompts", str(tmp_path / "p.jsonl")]
    argv += ["--scorer", "vader", "--reference", str(init), "--max-new-tokens", "2", "--quiet"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--label" in err and "empty or blank" in err, err
    assert not (tmp_path / "o").exists()


def resumable_run(tmp_path, monkeypatch, out="o"):
    """Three Hugging Face policies (``p1``, ``p2``, ``p3``) and their reference, scored by completion length
    on one prompt into ``tmp_path/out``: ``(argv, calls)``, ``calls`` the labels of the rows evaluated (each
    call of ``evaluate_policy``, the reference's first), with ``calls.stop_at``: the number of the call that is
    interrupted by a ``KeyboardInterrupt`` (Ctrl-C), 0 for none."""
    from shiq_eval import evaluate

    init = tiny_hf_folder(tmp_path / "init")
    for i, name in enumerate(("p1", "p2", "p3")):
        tiny_hf_folder(tmp_path / name)
        torch.manual_seed(10 + i)  # each its own weights
        transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(init)).save_pretrained(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    argv = score_len_run(tmp_path, tmp_path / "p1", init, max_new_tokens=3)
    argv[argv.index("--out") + 1] = str(tmp_path / out)
    argv[2:2] = [str(tmp_path / "p2"), str(tmp_path / "p3")]

    class Calls(list):
        stop_at = 0
        by_sigterm = False  # the stop a scheduler's SIGTERM, not Ctrl-C

    calls = Calls()
    real = evaluate.evaluate_policy

    def counted(*a, **kw):
        calls.append(len(calls))
        if len(calls) == calls.stop_at:
            if calls.by_sigterm:
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(evaluate, "evaluate_policy", counted)
    return argv, calls


def results_of(out: Path) -> tuple[bytes, bytes]:
    return (out / "results.json").read_bytes(), (out / "results.csv").read_bytes()


def interrupted_at_third_row(argv, calls, capsys, out: Path) -> None:
    """Run ``argv`` interrupted while the second policy is evaluated: the reference's and p1's rows saved."""
    calls.clear()
    calls.stop_at = 3
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert (
        err.strip().splitlines()[-1]
        == "shiq-eval: interrupted (the same command resumes, reusing the rows and batches it finished)"
    )
    assert not (out / "results.json").exists() and len(list((out / ".rows").glob("*.json"))) == 2
    calls.clear()
    calls.stop_at = 0


def test_an_interrupted_run_resumes_with_the_rows_it_saved(tmp_path, monkeypatch, capsys):
    """An interrupted run lost every row computed (hours of sampling): each row is saved as it is computed and
    the same command run again evaluates only the missing ones, with the results of an uninterrupted run."""
    argv, calls = resumable_run(tmp_path, monkeypatch)
    out = tmp_path / "o"
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0  # uninterrupted (the last --out wins)
    assert len(calls) == 4 and not (tmp_path / "whole" / ".rows").exists()
    interrupted_at_third_row(argv, calls, capsys, out)
    assert main([a for a in argv if a != "--quiet"]) == 0  # (--quiet is not among a row's inputs)
    assert len(calls) == 2  # p2 and p3 only
    err = capsys.readouterr().err
    assert f"shiq-eval: 2 of 4 rows reused from {out / '.rows'}" in err
    # a reused row's line as an evaluated one's: the run's lines name every row's results
    assert all(f"{name} (" in err and "reward" in err for name in ("p1", "p2", "p3")), err
    assert results_of(out) == results_of(tmp_path / "whole")
    assert not (out / ".rows").exists()  # removed once the results are written
    assert main(argv) == 2  # a finished run's results are still refused without --overwrite
    assert "holds an earlier run's results" in capsys.readouterr().err


def test_a_sigterm_ends_the_run_in_one_line_and_the_rows_it_finished_are_reused(tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's stop) ended shiq-eval run at once, without a word; it now ends as Ctrl-C does, in one
    line with status 143 saying the same command resumes, and the rerun reuses the rows finished."""
    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        pytest.skip("SIGTERM is handled by the test runner")
    argv, calls = resumable_run(tmp_path, monkeypatch)
    calls.stop_at, calls.by_sigterm = 3, True
    assert main(argv) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "shiq-eval: terminated (the same command resumes, reusing the rows and batches it finished)"
    )
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # given back
    calls.clear()
    calls.stop_at = 0
    assert main(argv) == 0 and len(calls) == 2
    assert "2 of 4 rows reused" in capsys.readouterr().err


def test_a_saved_row_of_weights_changed_since_is_evaluated_again(tmp_path, monkeypatch, capsys):
    argv, calls = resumable_run(tmp_path, monkeypatch)
    out = tmp_path / "o"
    interrupted_at_third_row(argv, calls, capsys, out)
    torch.manual_seed(99)
    transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(tmp_path / "p1")).save_pretrained(
        tmp_path / "p1"
    )
    assert main(argv) == 0
    assert len(calls) == 3  # p1 again, p2, p3; the reference's row reused
    assert "1 of 4 rows reused" in capsys.readouterr().err
    rows = json.loads((out / "results.json").read_text())
    assert rows[1]["run"] == "p1"
    assert rows[1]["model_sha256"] == hashlib.sha256((tmp_path / "p1" / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("whose", ["p1", "init"])
def test_a_saved_row_of_a_config_changed_since_is_evaluated_again(tmp_path, monkeypatch, capsys, whose):
    """The key of a saved row held the weights' SHA-256 but not the model's config: a config.json edited since
    (another norm epsilon: the same weights, other logits) reused the row evaluated under the old one. The
    policy's config (``p1``) and the reference's (``init``) are in the key now."""
    argv, calls = resumable_run(tmp_path, monkeypatch)
    out = tmp_path / "o"
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    interrupted_at_third_row(argv, calls, capsys, out)
    config = json.loads((tmp_path / whose / "config.json").read_text())
    config["rms_norm_eps"] = 10 * config["rms_norm_eps"]
    (tmp_path / whose / "config.json").write_text(json.dumps(config))
    assert main(argv) == 0
    # p1's row again (or, with the reference's config changed, every row), p2 and p3
    assert len(calls) == (3 if whose == "p1" else 4)
    err = capsys.readouterr().err
    assert ("1 of 4 rows reused" in err) if whose == "p1" else ("reused" not in err)


def test_a_failure_after_rows_were_saved_says_they_are_kept(tmp_path, monkeypatch, capsys):
    """A run that failed with a user error after some rows were saved (a later checkpoint's weights damaged) left
    --out/.rows/ without a word, which looks like a half-written folder: the failure's one line now says how many
    rows are kept there and that the same command resumes once the cause is fixed; it resumes with them. A
    failure before any row was saved says nothing of them."""
    argv, calls = resumable_run(tmp_path, monkeypatch)
    out = tmp_path / "o"
    weights = tmp_path / "p2" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # cut short: p2 fails to load after the reference and p1 are saved
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("shiq-eval: error: "), err
    assert err[0].endswith(
        f"; the 2 rows finished are kept in {out / '.rows'}/: the same command resumes once this is fixed"
    ), err
    assert len(calls) == 2 and len(list((out / ".rows").glob("*.json"))) == 2
    assert main(argv) == 2  # the two rows reused, the failure again: still said
    assert "the 2 rows finished are kept" in capsys.readouterr().err and len(calls) == 2
    weights.write_bytes(good)
    calls.clear()
    assert main(argv) == 0 and len(calls) == 2  # p2 and p3
    assert "2 of 4 rows reused" in capsys.readouterr().err and not (out / ".rows").exists()
    # a failure before any row is saved (the reference's weights damaged): no word of saved rows
    ref = tmp_path / "init" / "model.safetensors"
    ref.write_bytes(ref.read_bytes()[:100])
    assert main([*argv, "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "shiq-eval: error: " in err and "kept" not in err and not (tmp_path / "o2" / ".rows").exists(), err


def test_overwrite_discards_the_saved_rows(tmp_path, monkeypatch, capsys):
    argv, calls = resumable_run(tmp_path, monkeypatch)
    out = tmp_path / "o"
    interrupted_at_third_row(argv, calls, capsys, out)
    assert main([*argv, "--overwrite"]) == 0
    assert len(calls) == 4
    assert "reused" not in capsys.readouterr().err
    assert not (out / ".rows").exists()


def test_a_damaged_saved_row_is_said_and_evaluated_again(tmp_path, monkeypatch, capsys):
    """A saved row is data: a file cut short, an edited value (its checksum no longer fits) or a file that is not
    an object is named in one line on stderr, without a traceback, and its row evaluated again."""
    argv, calls = resumable_run(tmp_path, monkeypatch)
    out = tmp_path / "o"
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    for damage in ("cut", "edited", "a list"):
        for p in out.glob("*"):
            p.unlink() if p.is_file() else None
        interrupted_at_third_row(argv, calls, capsys, out)
        files = sorted((out / ".rows").glob("*.json"))
        texts = [f.read_text() for f in files]
        if damage == "cut":
            files[0].write_text(texts[0][: len(texts[0]) // 2])
        elif damage == "edited":
            files[0].write_text(texts[0].replace('"reward_mean": ', '"reward_mean": 1'))
        else:
            files[0].write_text("[1, 2]")
        assert main(argv) == 0, damage
        err = capsys.readouterr().err
        said = [line for line in err.splitlines() if "warning" in line]
        assert len(said) == 1 and str(files[0]) in said[0] and "evaluated again" in said[0], (damage, err)
        assert "Traceback" not in err
        assert len(calls) == 3 and "1 of 4 rows reused" in err, damage
        assert results_of(out) == results_of(tmp_path / "whole"), damage


def test_prompts_encoded_by_another_chat_template_are_not_ranked_together(tmp_path, capsys, monkeypatch):
    """One reference's weights with two chat templates: the same prompt texts, the same suite fingerprint, but
    other prompt tokens, so other numbers. The rows record the prompts' token ids (their SHA-256, recomputed
    here with transformers' own chat template), and the leaderboard refuses to rank or pair the two, where it
    paired one folder's runs with the other's reference, measured on other prompts."""
    policy = tiny_hf_folder(tmp_path / "policy")
    texts = ["w3 w4", "w5 w6 w7"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    (tmp_path / "score_len.py").write_text("def score(p, c):\n    return [float(len(x)) for x in c]\n")
    monkeypatch.chdir(tmp_path)
    outs, want = [], []
    for i, template in enumerate(["{{ messages[0]['content'] }}", "w9 {{ messages[0]['content'] }} w10"]):
        ref = tiny_hf_folder(tmp_path / f"ref{i}")
        config = json.loads((ref / "tokenizer_config.json").read_text())
        (ref / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
        tok = transformers.AutoTokenizer.from_pretrained(ref)
        rendered = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False) for t in texts]
        ids = [tok(r, add_special_tokens=False)["input_ids"] for r in rendered]
        want.append(hashlib.sha256(json.dumps(ids).encode()).hexdigest())
        out = tmp_path / f"o{i}"
        argv = ["run", str(policy), "--out", str(out), "--prompts", "p.jsonl", "--quiet", "--chat"]
        argv += ["--scorer", "python:score_len:score", "--reference", str(ref), "--max-new-tokens", "2"]
        assert main(argv) == 0
        outs.append(out)
    rows = [json.loads((o / "results.json").read_text()) for o in outs]
    assert want[0] != want[1] and rows[0][0]["suite_sha256"] == rows[1][0]["suite_sha256"]
    assert [{r["prompt_ids_sha256"] for r in rs} for rs in rows] == [{want[0]}, {want[1]}]
    capsys.readouterr()
    assert main(["leaderboard", str(outs[0]), str(outs[1]), "--out", str(tmp_path / "board")]) == 2
    err = capsys.readouterr().err
    assert "were encoded into other token ids (field 'prompt_ids_sha256'" in err and not (tmp_path / "board").exists()
    assert main(["leaderboard", str(outs[0]), str(outs[0]), "--out", str(tmp_path / "board")]) == 0


def test_a_reference_named_by_a_relative_path_is_recorded_by_its_absolute_one(tmp_path, monkeypatch):
    """The reference's row recorded --reference as given ("init"), the checkpoints' rows their absolute paths:
    read from another folder, it named no folder, and a resumed run given ./init or the absolute path did not
    reuse the reference's saved row."""
    init = tiny_hf_folder(tmp_path / "init")
    monkeypatch.chdir(tmp_path)
    argv = ["run", "init", "--label", "m", "--reference", "init", "--out", "ev", "--scorer", "vader", "--quiet"]
    assert main([*argv, "--movie-prompts", "1", "--max-new-tokens", "1"]) == 0
    rows = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert [r["checkpoint"] for r in rows] == [str(init), str(init)]


def test_a_reward_model_folder_given_for_a_head_points_to_its_scorer(tmp_path, capsys):
    """--reward-model FOLDER (a Hugging Face reward model) without --scorer hf_reward_model was refused as "no such
    file", which it is not; now the line says what the folder is and which scorer reads it. Nothing written."""
    init = tiny_hf_folder(tmp_path / "init")
    capsys.readouterr()  # (what building the folder printed)
    out = tmp_path / "ev"
    argv = ["run", str(init), "--reference", str(init), "--out", str(out), "--movie-prompts", "1"]
    assert main([*argv, "--reward-model", str(init)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"shiq-eval: error: --reward-model {init}: a Hugging Face model folder, not a regression head file: give "
        "--scorer hf_reward_model to score with it\n"
    ), err
    assert not out.exists()
    assert main([*argv, "--reward-model", str(tmp_path / "rm.safetensors")]) == 2  # (a missing file: as before)
    assert "rm.safetensors: no such file" in capsys.readouterr().err


def test_prompts_from_a_pipe_are_read_and_an_unreadable_path_is_named(tmp_path):
    """--prompts <(jq ...) (a pipe, /dev/fd/63) was refused as "no such file", which it is not; a path that
    cannot be opened (here a socket) ended with the bare OS error. The pipe is read once, as a file is."""
    import socket
    import threading

    from shiq_eval.cli import suite_prompts
    from shiq_eval.suite import Suite

    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)
    text = json.dumps({"prompt": "w3 w4"}) + "\n" + json.dumps({"prompt": "w5", "scorer_prompt": "s"}) + "\n"
    writer = threading.Thread(target=fifo.write_text, args=(text,))  # (opening blocks until the reader opens)
    writer.start()
    read = None
    try:  # (its end of file comes once the writer closed the pipe)
        read = suite_prompts(Suite(prompts=str(fifo), scorer="vader"))
    finally:
        if read is None:  # the pipe was not read: read it here, so the writer ends
            fifo.read_bytes()
        writer.join()
    # recorded by the name it was given (a pipe's own, pipe:[INODE], differs in the resumed run: no row reused)
    assert read == (["w3 w4", "w5"], ["w3 w4", "s"], str(fifo))
    sock = socket.socket(socket.AF_UNIX)
    path = tmp_path / "s"
    sock.bind(str(path))
    try:
        with pytest.raises(EvalInputError, match=rf"^--prompts {re.escape(str(path))}: cannot be read \(.+\)$"):
            read_prompts_jsonl(path)
    finally:
        sock.close()
    with pytest.raises(EvalInputError, match=rf"^--prompts {re.escape(str(tmp_path / 'none'))}: no such file$"):
        read_prompts_jsonl(tmp_path / "none")


def test_chat_prompts_for_a_tokenizer_without_a_template_point_to_no_chat():
    """A GPT-2 run evaluated on a suite of chat: true (movie_vader_small) is told of --no-chat, the flag that runs
    it; prompts given as messages need a template whatever the flags, so they are not told of it."""
    from types import SimpleNamespace

    from shiq_eval.cli import encode_prompts

    no_template = SimpleNamespace(chat_template=None)
    with pytest.raises(EvalInputError, match=r"suite's chat: true.*--tokenizer\), or .*\(--no-chat\)$"):
        encode_prompts(no_template, ["Name a color."], chat=True)
    with pytest.raises(EvalInputError, match=r"--tokenizer\)$"):
        encode_prompts(no_template, [[{"role": "user", "content": "Hi"}]], chat=False)


def batched_run(tmp_path, monkeypatch):
    """:func:`resumable_run` with four samples of its prompt in batches of one (four batches a row): ``(argv,
    calls, batches)``, ``batches`` the batches sampled (each call of ``HFPolicy._generate_batch``), with
    ``batches.stop_at``: the number of the batch whose sampling is interrupted (Ctrl-C), 0 for none."""
    from shiq_eval.generate import HFPolicy

    argv, calls = resumable_run(tmp_path, monkeypatch)
    argv += ["--samples-per-prompt", "4", "--batch-size", "1"]

    class Batches(list):
        stop_at = 0

    batches = Batches()
    real = HFPolicy._generate_batch

    def counted(self, *a, **kw):
        batches.append(len(batches))
        if len(batches) == batches.stop_at:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(HFPolicy, "_generate_batch", counted)
    return argv, calls, batches


def interrupted_in_p1s_third_batch(argv, batches, capsys, out: Path) -> list[Path]:
    """Run ``argv`` interrupted while p1's third batch is sampled: the reference's row and p1's first two batches
    saved; returns those batches' files."""
    batches.clear()
    batches.stop_at = 4 + 3
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("shiq-eval: interrupted")
    assert len(list((out / ".rows").glob("*.json"))) == 1  # the reference's row
    saved = sorted((out / ".rows").glob("*/batch_*.json"))
    assert [p.name for p in saved] == ["batch_0.json", "batch_1.json"]
    batches.clear()
    batches.stop_at = 0
    return saved


def test_an_interrupted_row_resumes_at_its_first_batch_not_saved(tmp_path, monkeypatch, capsys):
    """A row interrupted part-way was evaluated again from its first batch (a whole model's sampling, on a large
    suite): its finished batches are saved in --out/.rows/ and the same command samples only the others, with an
    uninterrupted run's results, every completion's reward and KLs bit for bit; they are removed with the row's
    saving, and --overwrite discards them."""
    argv, calls, batches = batched_run(tmp_path, monkeypatch)
    out = tmp_path / "o"
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    assert len(batches) == 16
    saved = interrupted_in_p1s_third_batch(argv, batches, capsys, out)
    assert all(len(p.read_bytes()) < 600 for p in saved)  # token ids and two floats a completion
    assert main(argv) == 0
    assert len(batches) == 2 + 4 + 4  # p1's last two, p2's and p3's
    err = capsys.readouterr().err
    assert "1 of 4 rows reused" in err and "shiq-eval: 2 batches of unfinished rows reused" in err, err
    assert results_of(out) == results_of(tmp_path / "whole")
    assert not (out / ".rows").exists()
    again = [*argv, "--out", str(tmp_path / "o2")]
    interrupted_in_p1s_third_batch(again, batches, capsys, tmp_path / "o2")
    assert main([*again, "--overwrite"]) == 0 and len(batches) == 16
    assert "reused" not in capsys.readouterr().err and not (tmp_path / "o2" / ".rows").exists()


def test_an_interrupted_overwrite_resumes_with_the_same_command(tmp_path, monkeypatch, capsys):
    """A run given --overwrite (an earlier run's results in --out) and interrupted said "the same command
    resumes", but that command discarded what it had saved, its own rows and batches: it now takes them (they
    were saved after the older ones were discarded), with an uninterrupted run's results bit for bit, while rows
    saved by a run not given --overwrite are still discarded by it."""
    argv, calls, batches = batched_run(tmp_path, monkeypatch)
    out = tmp_path / "o"
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    assert main(argv) == 0  # the earlier run's results
    capsys.readouterr()
    again = [*argv, "--overwrite"]
    interrupted_in_p1s_third_batch(again, batches, capsys, out)
    assert (out / ".rows" / "overwriting").is_file()
    assert main(again) == 0 and len(batches) == 2 + 4 + 4  # p1's last two, p2's and p3's
    err = capsys.readouterr().err
    assert "1 of 4 rows reused" in err and "2 batches of unfinished rows reused" in err, err
    assert results_of(out) == results_of(tmp_path / "whole") and not (out / ".rows").exists()
    (out / "results.json").unlink()  # (so that a run without --overwrite may write here)
    interrupted_in_p1s_third_batch(argv, batches, capsys, out)
    assert not (out / ".rows" / "overwriting").exists()
    assert main(again) == 0 and len(batches) == 16  # rows saved without --overwrite: discarded by it
    assert "reused" not in capsys.readouterr().err and not (out / ".rows").exists()


def _overwrite_ranks(rank, port, out):
    """A rank of :func:`test_ranks_follow_rank_0_on_an_overwrite_runs_saved_rows`: rank 1 does not see the folder's
    record of --overwrite (another node's stale view); returns through ``out/rank<N>.json``."""
    import datetime

    import torch.distributed as dist

    from shiq_eval import cli as eval_cli

    if rank == 1:
        real = Path.is_file
        Path.is_file = lambda self: False if self.name == eval_cli.OVERWRITING else real(self)
    saved = eval_cli.SavedRows.for_run(Path(out), overwrite=True, write=rank == 0, scenarios=False)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    try:
        row = saved.get({"row": "reference"})
        batch = eval_cli.SavedBatches(saved, {"row": "p1"}).get(0, [[1, 2]])
        total = torch.tensor([1.0])
        dist.all_reduce(total)  # the next collective, as sampling's: reached by both ranks at once
        answer = {"row": row, "batch": None if batch is None else list(batch), "total": total.item()}
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(answer))
    finally:
        dist.destroy_process_group()


def test_ranks_follow_rank_0_on_an_overwrite_runs_saved_rows(tmp_path):
    """Whether saved rows may be used under --overwrite rests on the folder's record that a run given it saved
    them: each rank read that record itself, so a rank that did not see it (a stale view of --out) skipped rank
    0's broadcast of a saved row and went on to the next collective, the ranks then in different collectives
    (a hang). Every rank now takes rank 0's answer, here no row and a saved batch."""
    from ranks import spawn

    from shiq_eval import cli as eval_cli
    from shiq_train.parallel import free_port

    out = tmp_path / "o"
    rows = eval_cli.SavedRows.for_run(out, overwrite=True, write=True, scenarios=False)
    eval_cli.SavedBatches(rows, {"row": "p1"}).put(0, [[1, 2]], ([[7, 8]], [0.25], [0.125]))
    assert (out / ".rows" / eval_cli.OVERWRITING).is_file()
    spawn(_overwrite_ranks, args=(free_port(), str(out)), nprocs=2)
    answers = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert answers[0] == answers[1], answers
    assert answers[0]["row"] is None and answers[0]["batch"] == [[[7, 8]], [0.25], [0.125]]
    assert answers[0]["total"] == 2.0


def test_a_row_saved_removes_its_saved_batches(tmp_path, monkeypatch, capsys):
    """Interrupted twice: in p1's third batch, then, resumed, in p3's first: p1's two batches saved by the first
    run were taken by the second and removed once p1's row was saved."""
    argv, calls, batches = batched_run(tmp_path, monkeypatch)
    out = tmp_path / "o"
    interrupted_in_p1s_third_batch(argv, batches, capsys, out)
    batches.stop_at = 2 + 4 + 1  # p1's last two batches, p2's four, then p3's first
    assert main(argv) == 130
    assert len(list((out / ".rows").glob("*.json"))) == 3 and not list((out / ".rows").glob("*/batch_*.json"))
    assert not [p for p in (out / ".rows").iterdir() if p.is_dir()]


def test_a_damaged_saved_batch_is_said_and_evaluated_again(tmp_path, monkeypatch, capsys):
    """A saved batch is data: a file cut short, an edited token id or KL (its checksum no longer fits), one that is
    not an object, or one another batch's (renamed) is named in one line on stderr and its batch sampled again."""
    argv, calls, batches = batched_run(tmp_path, monkeypatch)
    out = tmp_path / "o"
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    for damage in ("cut", "edited", "a list", "renamed"):
        for p in out.glob("*"):
            p.unlink() if p.is_file() else None
        first, second = interrupted_in_p1s_third_batch(argv, batches, capsys, out)
        text = second.read_text()
        if damage == "cut":
            second.write_text(text[: len(text) // 2])
        elif damage == "edited":
            second.write_text(text.replace('"kl_exact": [', '"kl_exact": [1'))
        elif damage == "a list":
            second.write_text("[1, 2]")
        else:
            second.write_bytes(first.read_bytes())
        assert main(argv) == 0, damage
        err = capsys.readouterr().err
        said = [line for line in err.splitlines() if "warning" in line]
        assert len(said) == 1 and str(second) in said[0] and "the batch is evaluated again" in said[0], (damage, err)
        assert "Traceback" not in err
        assert len(batches) == 3 + 4 + 4 and "1 batch of unfinished rows reused" in err, damage
        assert results_of(out) == results_of(tmp_path / "whole"), damage


def test_a_scorer_that_fails_after_a_rows_batches_keeps_them(tmp_path, monkeypatch, capsys):
    """The scorer reads a row's completions once all its batches are sampled: when it fails (one line, exit 2)
    the row's batches are kept, the line says so, and the same command, the cause fixed, scores them without
    sampling them again."""
    argv, calls, batches = batched_run(tmp_path, monkeypatch)
    out = tmp_path / "o"
    argv[argv.index("python:score_len:score")] = "python:score_or_fail:score"  # (a module of its own name)
    (tmp_path / "score_or_fail.py").write_text(
        "import os\n\ndef score(p, c):\n"
        "    if os.path.exists('fail'):\n        raise RuntimeError('the scoring service is down')\n"
        "    return [float(len(x)) for x in c]\n"
    )
    (tmp_path / "fail").write_text("")
    capsys.readouterr()
    assert main(argv) == 2 and len(batches) == 4  # the reference's
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the scoring service is down" in err[0], err
    assert err[0].endswith(
        f"; 4 batches of an unfinished row are kept in {out / '.rows'}/: the same command resumes once this is fixed"
    ), err
    (tmp_path / "fail").unlink()
    batches.clear()
    assert main(argv) == 0 and len(batches) == 4 * 3  # the policies' only
    assert "shiq-eval: 4 batches of unfinished rows reused" in capsys.readouterr().err


def test_a_policy_of_another_shape_than_the_reference_is_refused_or_warned_of(capsys):
    """A shiq-bfcl --quick arm trains a 2-layer cut of SmolLM2 and records SmolLM2 as its start: its KL was
    measured against the whole 30-layer model in silence. A policy whose shape is not the reference's was not
    trained from it: refused when the reference came from the run's record, a warning when --reference names it."""
    from types import SimpleNamespace

    from shiq_eval.checkpoints import EvalInputError
    from shiq_eval.cli import check_reference_shape

    whole = transformers.LlamaConfig(num_hidden_layers=30, hidden_size=64, intermediate_size=128, num_attention_heads=4)
    ref = SimpleNamespace(config=whole)
    cut = {**whole.to_dict(), "num_hidden_layers": 2}
    infos = [{"path": "run/a", "hf_config": whole.to_dict()}, {"path": "run/b", "hf_config": cut}]
    check_reference_shape("smollm2", ref, infos[:1], given=False)  # the same shape: nothing said
    assert capsys.readouterr().err == ""
    with pytest.raises(EvalInputError) as e:
        check_reference_shape("smollm2", ref, infos, given=False)
    assert str(e.value).startswith("run/b: its model is not of the shape of smollm2")
    assert "num_hidden_layers 2 against 30" in str(e.value) and "give --reference" in str(e.value)
    check_reference_shape("smollm2", ref, infos, given=True)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: run/b is not of the shape of --reference smollm2" in err


def test_a_value_model_given_as_a_checkpoint_points_to_guide(tmp_path, capsys):
    """A Q♯ value model folder is no policy: it was refused as 'not a checkpoint step directory ... nor a Hugging
    Face model folder', which did not say how to evaluate it."""
    value = tmp_path / "qsharp"
    value.mkdir()
    (value / "value_model.json").write_text("{}")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "w3 w4"}\n')
    assert main(["run", str(value), "--out", str(tmp_path / "o"), "--prompts", str(prompts), "--scorer", "vader"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{value}: a Q♯ value model, not a policy" in err and f"--guide {value}" in err
    assert not (tmp_path / "o").exists()
