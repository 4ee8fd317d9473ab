"""Q♯ through the commands (SHIQ_MATH §8): ``shiq-train loss=qsharp_value`` trains the value model from a
buffer, ``shiq-eval run --guide VALUE_DIR --beta B`` evaluates the reference guided by it.

References independent of the commands: ``train_value_model`` called directly with the run's settings
spelled out by hand; the guided policy's KL recomputed with full forward passes of the reference and of
the value trunk (no KV cache, no padding) at every visited state; the reward recomputed from the saved
regression head and the encoder.
"""

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import commands
import pytest
import torch
import transformers
from test_eval_cli import tiny_hf_folder, write_tiny_buffer  # (a tiny Llama folder and buffer)

from shiq_data.reward_head import RegressionRewardModel, minilm_encoder
from shiq_eval.cli import main as eval_main

REPO = Path(__file__).resolve().parents[1]
BETA, TOP_K = 0.5, 5
# the run's settings on the command line, and the same settings as a ValueTrainConfig (configs/train.yaml
# gives adam_beta2 0.95, adam_eps 1e-8, clip_grad 1.0, weight_decay 0; the model's sequence length is 16)
RUN_ARGS = [
    "loss=qsharp_value",
    "loss.num_atoms=7",
    "loss.head_lr=0.05",
    "train.steps=4",
    "optimizer.lr=3e-3",
    "optimizer.min_lr=1e-4",
    "optimizer.warmup_steps=2",
    "optimizer.decay_steps=2",
    "data.rows_per_micro_batch=3",
    "data.micro_batches_per_step=2",
    "seed=5",
]
DIRECT = dict(
    steps=4,
    rows_per_micro_batch=3,
    micro_batches_per_step=2,
    lr=3e-3,
    head_lr=0.05,
    min_lr=1e-4,
    warmup_steps=2,
    decay_steps=2,
    adam_beta1=0.9,
    adam_beta2=0.95,
    adam_eps=1e-8,
    clip_grad=1.0,
    weight_decay=0.0,
    num_atoms=7,
    gamma=1.0,
    trainable_last_layers=-1,
    seed=5,
    max_tokens_per_row=16,
    progress=False,
)


def shiq_train(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # --config-dir: this checkout's configs are searched too, whatever configs the install points at
    cmd = [sys.executable, "-m", "shiq_train", "--config-dir", str(REPO / "configs"), "train.progress=false", *args]
    return commands.run(cmd, cwd=REPO, env=env, timeout=600)  # (forked: see commands.py)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(tmp, init folder, value folder)``: a value model trained by the command line."""
    tmp = tmp_path_factory.mktemp("qsharp")
    init = tiny_hf_folder(tmp / "init")
    write_tiny_buffer(tmp / "buffer", init)
    res = shiq_train(f"data.buffer={tmp / 'buffer'}", f"init={init}", f"out={tmp / 'value'}", *RUN_ARGS)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "shiq-eval run --guide" in res.stdout  # says what to do with it
    return tmp, init, tmp / "value"


def test_shiq_train_trains_the_value_model_train_value_model_would(trained):
    from shiq_train.qsharp_train import ValueTrainConfig, train_value_model
    from shiq_train.qsharp_value import load_value_model

    warnings.filterwarnings("ignore")
    tmp, init, value_dir = trained
    hf = transformers.LlamaForCausalLM.from_pretrained(str(init), dtype=torch.float32)
    direct = train_value_model(tmp / "buffer", tmp / "direct", hf.state_dict(), hf.config, ValueTrainConfig(**DIRECT))

    got = torch.load(value_dir / "value_model.pt", weights_only=True)
    want = torch.load(direct / "value_model.pt", weights_only=True)
    assert sorted(got) == sorted(want)
    for k in want:  # two processes, two thread counts: float32 rounding only
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(got["head.weight"], torch.zeros_like(got["head.weight"]))  # the head trained
    history = [json.loads(x) for x in (value_dir / "metrics.jsonl").read_text().splitlines()]
    direct_history = [json.loads(x) for x in (direct / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    for a, b in zip(history, direct_history):
        assert a["value_ce"] == pytest.approx(b["value_ce"], rel=1e-5)
    # the buffer's returns are 0 and 1 (one reward on the last token): the default support spans them
    meta = json.loads((value_dir / "value_model.json").read_text())
    assert meta["atoms"] == pytest.approx([i / 6 for i in range(7)], abs=1e-7)
    assert meta["config"]["loss"]["name"] == "qsharp_value" and meta["config"]["init"] == str(init)
    assert meta["train"]["adam_beta2"] == 0.95 and meta["train"]["data_seed"] == 5
    # the model it built: the reference's own (float32, no dropout), as value_model.json records
    assert meta["config"]["model"]["params_dtype"] == "float32" and meta["config"]["model"]["hidden_dropout"] == 0.0
    assert meta["config"]["model"]["hidden_size"] == transformers.AutoConfig.from_pretrained(str(init)).hidden_size

    loaded, loaded_direct = load_value_model(value_dir), load_value_model(direct)
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), loaded_direct(tokens), rtol=1e-4, atol=1e-5)
    assert loaded(tokens).shape == (2, 9, 7)


def test_value_loss_config_errors(trained, tmp_path):
    tmp, init, _ = trained
    no_init = shiq_train(f"data.buffer={tmp / 'buffer'}", f"out={tmp_path / 'v'}", "loss=qsharp_value")
    assert no_init.returncode == 2 and "starts the value model from the reference" in no_init.stderr
    (tmp_path / "policy_run").mkdir()
    (tmp_path / "policy_run" / "config.yaml").write_text("out: x\n")
    taken = shiq_train(
        f"data.buffer={tmp / 'buffer'}", f"out={tmp_path / 'policy_run'}", f"init={init}", "loss=qsharp_value"
    )
    assert taken.returncode == 2 and "is not a value-model folder" in taken.stderr
    assert (tmp_path / "policy_run" / "config.yaml").read_text() == "out: x\n"  # left alone
    assert os.listdir(tmp_path / "policy_run") == ["config.yaml"]  # nothing added
    # a bound beyond the buffer's returns was named as train_value_model's argument (v_min=5), not the run's key
    high = shiq_train(
        f"data.buffer={tmp / 'buffer'}", f"out={tmp_path / 'v'}", f"init={init}", "loss=qsharp_value", "loss.v_min=5"
    )
    assert high.returncode == 2
    assert high.stderr.strip().splitlines()[-1] == (
        "shiq-train: error: loss.v_min=5 is not below loss.v_max=1, the largest return-to-go in buffer "
        f"{tmp / 'buffer'}: give loss.v_max too (above loss.v_min), or leave loss.v_min to the buffer"
    )
    # a support too narrow for float32 said v_min=1 to v_max=1 (printed with 6 digits) and named no key
    narrow = shiq_train(
        f"data.buffer={tmp / 'buffer'}", f"out={tmp_path / 'v'}", f"init={init}", "loss=qsharp_value",
        "loss.v_min=0.9999999",
    )  # fmt: skip
    assert narrow.returncode == 2
    assert narrow.stderr.strip().splitlines()[-1] == (
        "shiq-train: error: float32 cannot hold 11 finite distinct atoms from v_min=0.9999999 to v_max=1.0: give "
        "returns of a smaller scale, or a wider [v_min, v_max] (loss.v_min given; loss.v_max from the "
        f"returns-to-go of buffer {tmp / 'buffer'})"
    )
    assert not (tmp_path / "v").exists()


def test_a_value_run_into_a_folder_another_run_trains_into_is_refused(trained, tmp_path):
    """Two value runs into one out= both trained, each appending its steps to the one metrics.partial.jsonl and
    saving its state over the other's resume.pt. Now the second is refused in one line, as a policy run is, and
    the first, stopped by SIGTERM, keeps its folder to resume from."""
    import signal
    import time

    tmp, init, _ = trained
    out = tmp_path / "v"
    args = [f"data.buffer={tmp / 'buffer'}", f"out={out}", f"init={init}", *RUN_ARGS]
    long_run = [a for a in args if not a.startswith(("train.steps=", "optimizer.decay_steps="))]
    long_run += ["train.steps=100000", "optimizer.decay_steps=99998"]  # (stopped by SIGTERM, below)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    first = subprocess.Popen(
        [sys.executable, "-m", "shiq_train", "--config-dir", str(REPO / "configs"), "train.progress=false", *long_run],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.partial.jsonl").is_file() and (out / "metrics.partial.jsonl").read_text()):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-3000:]
            time.sleep(0.2)
        second = shiq_train(*args)
        assert first.poll() is None  # still training
        steps = (out / "metrics.partial.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in steps] == list(range(1, len(steps) + 1))  # one run's steps
    finally:
        first.send_signal(signal.SIGTERM)
        err = first.communicate(timeout=120)[1]
    assert second.returncode == 2, second.stderr[-2000:]
    assert second.stderr.strip().splitlines()[-1] == (
        f"shiq-train: error: out={out}: {out / '.lock'} is held by another shiq-train run, training into this "
        "folder: wait for it to end, or use another out="
    )
    assert "Traceback" not in second.stderr
    assert first.returncode == 143, err[-3000:]
    assert {"resume.pt", "metrics.partial.jsonl"} <= set(os.listdir(out))  # what the first run resumes from


@pytest.mark.parametrize(
    "settings, says",
    [
        # model settings a value run would not use (it builds the reference's own model)
        (["model.params_dtype=bfloat16", "model.hidden_dropout=0.5"], "model.hidden_dropout=0.5, model.params_dtype="),
        # with model= chosen (as for init=smollm2 model=smollm2_135m): accepted and ignored before
        (["model=tiny", "model.hidden_dropout=0.5", "train.steps=1"], "model.hidden_dropout=0.5 would not be used"),
        # with optimizer.decay_steps=0 the value model trained at a constant lr: min_lr changed nothing
        (["optimizer.min_lr=1e-5"], "optimizer.min_lr=1e-05 is never reached with optimizer.decay_steps=0"),
    ],
)
def test_value_run_settings_that_would_change_nothing_are_refused(trained, tmp_path, settings, says):
    """A setting a value run would not read is refused in one line, and nothing is recorded."""
    tmp, init, _ = trained
    res = shiq_train(
        f"data.buffer={tmp / 'buffer'}", f"out={tmp_path / 'v'}", f"init={init}", "loss=qsharp_value", *settings
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert says in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "v").exists()


def write_json_hashed(folder: Path, config) -> None:
    """``value_model.json`` as ``config``, with its ``.sha256`` written again (an edit made with its checksum)."""
    import hashlib

    text = json.dumps(config).encode()
    (folder / "value_model.json").write_bytes(text)
    (folder / "value_model.json.sha256").write_text(f"{hashlib.sha256(text).hexdigest()}  value_model.json\n")


def full_pass_kl(ref, value, prompt, completion, atoms, beta, top_k):
    """Exact KL(π_g ‖ π_ref) summed over the completion's states, each from full forward passes of
    prompt + completion prefix (+ candidate for the value model), in float64, over the vocabulary: the
    reference softmax with the guidance added to the top-k logits only (SHIQ_MATH §6, §8)."""
    total = 0.0
    with torch.no_grad():
        for t in range(len(completion)):
            prefix = prompt + completion[:t]
            ref_logits = ref(torch.tensor([prefix])).logits[0, -1].double()
            top, cand = ref_logits.topk(top_k)
            rows = torch.tensor([prefix + [int(c)] for c in cand])
            atom_logits = value.head(value.trunk(input_ids=rows).last_hidden_state[:, -1]).double()
            guided = top + torch.logsumexp(torch.log_softmax(atom_logits, -1) + atoms.double() / beta, -1)
            full = ref_logits.clone()
            full[cand] = guided
            logp_g = torch.log_softmax(full, -1)
            logq = torch.log_softmax(ref_logits, -1)
            total += float((logp_g.exp() * (logp_g - logq)).sum())
    return total


def test_shiq_eval_run_guide_reports_the_guided_policy(trained):
    from shiq_eval.generate import SamplingConfig
    from shiq_eval.qsharp import GuidedPolicy
    from shiq_train.qsharp_value import load_value_model

    warnings.filterwarnings("ignore")
    tmp, init, value_dir = trained
    encoder = minilm_encoder()
    texts = ["a wonderful film", "a dreadful film", "great acting", "boring plot", "w5 w6", "w9 w10"]
    head = RegressionRewardModel.fit(encoder, texts, [1.0, -1.0, 1.0, -1.0, 0.5, -0.5], l2=1.0)
    head.save(tmp / "rm.safetensors")
    prompt_texts = [f"w{i} w{i + 1} w{i + 2}" for i in range(3, 9)]
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompt_texts))
    out = tmp / "eval"
    args = ["run", "--guide", str(value_dir), "--beta", str(BETA), "--top-k", str(TOP_K), "--out", str(out)]
    args += ["--prompts", str(tmp / "prompts.jsonl"), "--reward-model", str(tmp / "rm.safetensors")]
    args += ["--reference", str(init)]  # (the folder value_model.json records is not followed: it is given)
    assert eval_main(args + ["--max-new-tokens", "4", "--batch-size", "4", "--quiet"]) == 0
    rows = json.loads((out / "results.json").read_text())
    # no checkpoints: the reference (the value model's init) and the guided policy
    assert [(r["method"], r["step"], r["checkpoint"]) for r in rows] == [
        ("reference", 0, str(init)),
        ("qsharp", 4, str(value_dir)),
    ]
    row = rows[1]
    assert row["beta"] == BETA and row["top_k"] == TOP_K and row["n"] == 6
    import hashlib

    digest = hashlib.sha256()  # the weights, then value_model.json, which shapes the model: one hash of both
    for name in ("value_model.pt", "value_model.json"):
        digest.update((value_dir / name).read_bytes())
    assert row["model_sha256"] == digest.hexdigest()
    recorded = json.loads((value_dir / "value_model.json").read_text())
    assert recorded["reference_sha256"] == rows[0]["model_sha256"]  # the reference it learnt the returns of
    assert recorded["tokenizer"] == json.loads((tmp / "buffer" / "manifest.json").read_text())["tokenizer"]
    assert row["prompt_set_sha256"] == rows[0]["prompt_set_sha256"]

    # the same guided policy built here, on the same prompts and seed, samples the saved completions
    ref = transformers.LlamaForCausalLM.from_pretrained(str(init), dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(init))
    value = load_value_model(value_dir)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompt_texts]
    policy = GuidedPolicy(ref, value, value.atoms, BETA, top_k=TOP_K, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    completions = policy.generate(ids, SamplingConfig(max_new_tokens=4, batch_size=4, seed=0))
    decoded = [tok.decode(c, skip_special_tokens=True).strip() for c in completions]
    assert [s[1] for s in row["samples"]] == decoded[: len(row["samples"])]
    # KL: the row's numbers are GuidedPolicy.sequence_kls, and those are the full-pass exact KL
    ks, ke = policy.sequence_kls(ids, completions, batch_size=4)
    assert row["kl_exact"] == pytest.approx(float(ke.mean()), abs=1e-12)
    assert row["kl_sample"] == pytest.approx(float(ks.mean()), abs=1e-12)
    full = [full_pass_kl(ref, value, p, c, value.atoms, BETA, TOP_K) for p, c in zip(ids, completions)]
    assert row["kl_exact"] == pytest.approx(sum(full) / len(full), abs=1e-5)
    assert row["kl_exact"] > 1e-4  # guidance of the top-5 moves it off the reference
    # reward: the saved head on prompt + completion text, for every completion
    want = [float(encoder([p + " " + c]).double()[0] @ head.weight + head.bias) for p, c in zip(prompt_texts, decoded)]
    assert row["rewards"] == pytest.approx(want, abs=1e-6)
    # the mean of the saved rewards; those match a one-at-a-time encoding to float32 rounding (batching)
    assert row["reward_mean"] == pytest.approx(sum(row["rewards"]) / len(row["rewards"]), abs=1e-12)
    assert row["reward_mean"] == pytest.approx(sum(want) / len(want), abs=1e-6)
    for prompt, completion, reward in row["samples"]:
        e = encoder([prompt + " " + completion]).double()[0]
        assert reward == pytest.approx(float(e @ head.weight + head.bias), abs=1e-6)
    assert math.isfinite(row["kl_sample"])
    with open(out / "results.csv") as f:
        assert [t["method"] for t in csv.DictReader(f)] == ["reference", "qsharp"]
    for name in ("reward_vs_kl.png", "reward_vs_step.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_guide_argument_errors(trained, capsys):
    tmp, init, value_dir = trained
    base = ["run", "--out", str(tmp / "o"), "--prompts", str(tmp / "p.jsonl"), "--reward-model", "rm"]
    cases = [
        ([], "nothing to evaluate"),
        (["--guide", str(value_dir)], "--guide needs --beta"),
        (["--guide", str(value_dir), "--beta", "0"], "--guide needs --beta"),
        (["--beta", "0.5", str(value_dir)], "--beta is the KL weight of Q♯ guidance"),
        (["--guide", str(tmp / "buffer"), "--beta", "0.5"], "value_model.json does not exist"),
        (["--guide", str(value_dir), "--beta", "0.5", "--engine", "megatron"], "use --engine hf"),
        (["--guide", str(tmp / "x" / "reference"), "--beta", "0.5"], "its row would be labelled 'reference'"),
    ]
    for extra, message in cases:
        assert eval_main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp / "o").exists()


def test_a_damaged_value_model_is_named_in_one_line(trained, tmp_path, capsys):
    """value_model.json or value_model.pt edited or damaged (wrong kinds, fewer layers than the weights, other
    atoms, a file of another kind): a ValueError naming the file, not a traceback or a truncated trunk; the
    same from shiq-eval run --guide for what it reads before loading the reference."""
    from shiq_train.checkpoint import save_hashed
    from shiq_train.qsharp_value import load_value_model

    _, _, value_dir = trained
    saved = json.loads((value_dir / "value_model.json").read_text())
    tensors = torch.load(value_dir / "value_model.pt", weights_only=True)
    hf = saved["hf_config"]
    json_cases = [
        ([], "format is 'list'"),
        ({**saved, "num_atoms": "x"}, "field 'num_atoms' must be an integer >= 2"),
        ({**saved, "atoms": saved["atoms"][:-1]}, "field 'atoms' must be num_atoms increasing finite numbers"),
        ({**saved, "atoms": saved["atoms"][::-1]}, "field 'atoms'"),
        ({**saved, "hf_config": 3}, "field 'hf_config' must be an object"),
        ({**saved, "hf_config": {**hf, "hidden_size": "x"}}, "value_model.json: field 'hf_config':"),
        ({**saved, "hf_config": {**hf, "num_hidden_layers": hf["num_hidden_layers"] - 1}}, "has no place for"),
        ({**saved, "atoms": [a + 1 for a in saved["atoms"]]}, "its atoms differ from those of value_model.json"),
        # a trunk training cannot build (it was loaded and computed with another MLP), or a field of a kind
        # transformers does not check (a TypeError and a ZeroDivisionError traceback)
        ({**saved, "hf_config": {**hf, "hidden_act": "gelu"}}, "field 'hf_config': only SiLU-gated Llama MLPs"),
        ({**saved, "hf_config": {**hf, "model_type": ["llama"]}}, "value_model.json: field 'hf_config':"),
        ({**saved, "hf_config": {**hf, "head_dim": 0}}, "field 'hf_config': head_dim=0"),
    ]
    pt_cases = [
        ([1, 2], "expected a dict of tensors"),
        ({k: v for k, v in tensors.items() if k != "head.weight"}, "does not fit"),
        ({**tensors, "head.bias": torch.zeros(3)}, "does not fit"),
    ]
    for i, (config, needle) in enumerate(json_cases + [(saved, n) for _, n in pt_cases]):
        folder = tmp_path / f"v{i}"
        shutil.copytree(value_dir, folder)
        write_json_hashed(folder, config)  # edited together with its checksum: the fields themselves are checked
        if i >= len(json_cases):
            save_hashed(pt_cases[i - len(json_cases)][0], folder / "value_model.pt")
        with pytest.raises(ValueError, match=re.escape(needle)):
            load_value_model(folder)
    write_json_hashed(tmp_path / "v0", {**saved, "steps": "x"})
    base = ["run", "--out", str(tmp_path / "o"), "--prompts", str(tmp_path / "p.jsonl"), "--reward-model", "rm"]
    assert eval_main(base + ["--guide", str(tmp_path / "v0"), "--beta", "0.5"]) == 2
    assert "field 'steps' must be an integer >= 0, got 'x'" in capsys.readouterr().err
    # value_model.json shapes the model (rope_theta, its init, its step) and has a checksum of its own: an edit
    # without it (a changed rope_theta loaded silently, under the weights' unchanged hash) is refused
    edited = tmp_path / "edited"
    shutil.copytree(value_dir, edited)
    (edited / "value_model.json").write_text(json.dumps({**saved, "hf_config": {**hf, "rope_theta": 7.0}}))
    with pytest.raises(ValueError, match="value_model.json: sha256 differs from value_model.json.sha256's"):
        load_value_model(edited)
    assert eval_main(base + ["--guide", str(edited), "--beta", "0.5"]) == 2
    assert "value_model.json: sha256 differs" in capsys.readouterr().err


def test_a_guide_without_weights_is_refused_before_any_policy_is_evaluated(trained, tmp_path, capsys, monkeypatch):
    """--guide a folder whose value_model.pt is gone was found out only after the reference and every checkpoint
    had been evaluated (minutes to hours); the value model is now loaded with the reference, before them."""
    from shiq_eval import evaluate

    _, init, value_dir = trained
    shutil.copytree(value_dir, tmp_path / "v")
    (tmp_path / "v" / "value_model.pt").unlink()
    (tmp_path / "p.jsonl").write_text('{"prompt": "w3 w4 w5"}\n')

    def evaluated(*a, **k):
        raise AssertionError("a policy was evaluated before the value model was checked")

    monkeypatch.setattr(evaluate, "evaluate_policy", evaluated)  # (imported from there when run starts)
    args = [
        "run",
        "--guide",
        str(tmp_path / "v"),
        "--beta",
        "0.5",
        "--out",
        str(tmp_path / "o"),
        "--reference",
        str(init),
    ]
    assert eval_main(args + ["--prompts", str(tmp_path / "p.jsonl"), "--scorer", "vader", "--quiet"]) == 2
    assert "value_model.pt does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_top_k_beyond_the_vocabulary_is_recorded_as_the_vocabulary(trained, capsys):
    """--top-k 1000000000 was recorded in the results while decoding used the whole vocabulary; it is now recorded
    as the vocabulary's size, and said in a warning (it was silent)."""
    from types import SimpleNamespace

    from shiq_eval.cli import guide_info, load_guide
    from shiq_train.qsharp_value import load_value_model

    _, init, value_dir = trained
    vocab = load_value_model(value_dir).config.vocab_size
    tok = transformers.AutoTokenizer.from_pretrained(str(init))
    ref = SimpleNamespace(config=SimpleNamespace(vocab_size=vocab))
    args = SimpleNamespace(guide=str(value_dir), top_k=10**9, beta=0.5)
    info = guide_info(str(value_dir))
    capsys.readouterr()
    load_guide(args, ref, str(init), tok, info, info["reference_sha256"])
    assert args.top_k == vocab
    assert capsys.readouterr().err == (
        f"shiq-eval: warning: --top-k 1000000000 is more than the reference's vocabulary ({vocab} tokens): every "
        f"token is a candidate, and the results record top-k {vocab}\n"
    )
    args.top_k = 5
    load_guide(args, ref, str(init), tok, info, info["reference_sha256"])
    assert args.top_k == 5
    assert "--top-k" not in capsys.readouterr().err


def test_a_guide_is_refused_with_another_reference_or_a_beta_its_atoms_overflow(trained, tmp_path, capsys):
    """Guided decoding reweights the reference the value model learnt the returns of (SHIQ_MATH §8): another
    reference of the same vocabulary was accepted, and the guided policy reported as if it were that one's. A β
    so small that z/β overflows failed late, as NaN probabilities, after the reference's evaluation."""
    tmp, init, value_dir = trained
    other = tmp_path / "other"
    model = transformers.LlamaForCausalLM.from_pretrained(str(init), dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)  # (tied: the embeddings too) another model, the same shape
    model.save_pretrained(other)
    transformers.AutoTokenizer.from_pretrained(str(init)).save_pretrained(other)
    (tmp_path / "p.jsonl").write_text('{"prompt": "w3 w4 w5"}\n')
    args = ["run", "--guide", str(value_dir), "--out", str(tmp_path / "o"), "--prompts", str(tmp_path / "p.jsonl")]
    args += ["--scorer", "vader", "--quiet", "--max-new-tokens", "2"]
    assert eval_main([*args, "--beta", "0.5", "--reference", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"--guide {value_dir} learnt the returns of the reference {init}" in err and str(other) in err, err
    assert eval_main([*args, "--beta", "1e-320", "--reference", str(init)]) == 2
    assert "--beta 1e-320 is too small for the value model's atoms" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert eval_main([*args, "--beta", "0.5", "--reference", str(init)]) == 0  # its own reference, given: fine


def test_a_buffer_of_another_tokenizer_than_the_reference_is_refused(trained, tmp_path):
    """A value model learns the returns of the buffer's token ids under the reference: a buffer built with another
    tokenizer (of no more ids than the reference's) trained one silently, where a policy run refuses it."""
    from test_qsharp import write_toy_buffer

    tmp, init, _ = trained
    write_toy_buffer(tmp_path / "other", rows=4, tokenizer="other")
    res = shiq_train(
        f"data.buffer={tmp_path / 'other'}",
        f"init={init}",
        f"out={tmp_path / 'v'}",
        "loss=qsharp_value",
        "train.steps=1",
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "built with tokenizer 'other'" in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize(
    "arg, message",
    [("seed=-1", "seed=-1: expected an integer >= 0"), ("data.seed=-1", "data.seed=-1: expected an integer >= 0")],
)
def test_a_negative_seed_is_refused_naming_it(trained, tmp_path, arg, message):
    """numpy's ``expected non-negative integer`` named no key: the value run checks the plain options as a policy
    run does."""
    tmp, init, _ = trained
    res = shiq_train(f"data.buffer={tmp / 'buffer'}", f"init={init}", f"out={tmp_path / 'v'}", "loss=qsharp_value", arg)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == f"shiq-train: error: {message}"


def test_a_guide_recording_no_init_beside_a_policy_that_records_one_is_one_line(trained, tmp_path, capsys):
    """A value_model.json whose config.init is null (allowed: a string or null) beside a policy whose record names
    its init, without --reference: the inits were sorted with None among strings, a TypeError traceback; a null
    init now counts for nothing, as a policy's does, and the reference is the policy's."""
    import hashlib

    from shiq_data.io import weight_files

    tmp, init, value_dir = trained
    policy = tmp_path / "policy"
    shutil.copytree(init, policy)
    sums = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in weight_files(policy)}
    record = {"loss": {"name": "sft"}, "step": 1, "init": str(tmp_path / "elsewhere"), "sha256": sums}
    (policy / "shiq_export.json").write_text(json.dumps(record))
    guide = tmp_path / "guide"
    shutil.copytree(value_dir, guide)
    saved = json.loads((value_dir / "value_model.json").read_text())
    write_json_hashed(guide, {**saved, "config": {**saved["config"], "init": None}})
    args = ["run", str(policy), "--guide", str(guide), "--beta", "0.5", "--out", str(tmp_path / "o")]
    args += ["--prompts", str(tmp_path / "p.jsonl"), "--reward-model", "rm"]
    assert eval_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "elsewhere" in err[0], err


def test_the_guided_row_names_the_value_model_it_evaluated(trained, tmp_path, monkeypatch):
    """The value model's files were hashed after it was loaded, so files replaced meanwhile (a folder being
    written) gave the Q♯ row the new files' hash, not that of the weights evaluated."""
    import hashlib

    from shiq_train import qsharp_value

    _, init, value_dir = trained
    guide = tmp_path / "guide"
    shutil.copytree(value_dir, guide)
    digest = hashlib.sha256()
    for name in ("value_model.pt", "value_model.json"):
        digest.update((guide / name).read_bytes())
    loaded_hash = digest.hexdigest()
    loader = qsharp_value.load_value_model

    def load_then_replace(path, *a, **k):
        value = loader(path, *a, **k)
        with open(Path(path) / "value_model.pt", "ab") as f:  # other bytes in the folder's weights file
            f.write(b"\0")
        return value

    monkeypatch.setattr(qsharp_value, "load_value_model", load_then_replace)
    (tmp_path / "p.jsonl").write_text('{"prompt": "w3 w4 w5"}\n')
    args = ["run", "--guide", str(guide), "--beta", "0.5", "--top-k", "2", "--out", str(tmp_path / "o")]
    args += ["--reference", str(init), "--prompts", str(tmp_path / "p.jsonl"), "--scorer", "vader", "--quiet"]
    assert eval_main(args + ["--max-new-tokens", "2"]) == 0
    rows = json.loads((tmp_path / "o" / "results.json").read_text())
    assert rows[1]["method"] == "qsharp" and rows[1]["model_sha256"] == loaded_hash


def test_a_guided_row_saved_before_an_interruption_is_reused_for_its_beta_only(trained, tmp_path, monkeypatch, capsys):
    """The Q♯ row is saved as soon as it is computed: a run interrupted after it (here while the results are
    written) reuses it and the reference's; another --beta (not in the suite's fingerprint) evaluates it again."""
    from shiq_eval import cli as eval_cli
    from shiq_eval import evaluate, qsharp

    _, init, value_dir = trained
    (tmp_path / "score_len.py").write_text("def score(p, c):\n    return [float(len(x)) for x in c]\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "w3 w4"}) + "\n")
    monkeypatch.chdir(tmp_path)
    args = ["run", "--guide", str(value_dir), "--beta", str(BETA), "--top-k", str(TOP_K), "--quiet"]
    args += ["--prompts", "p.jsonl", "--scorer", "python:score_len:score", "--reference", str(init)]
    args += ["--max-new-tokens", "3"]
    assert eval_main([*args, "--out", str(tmp_path / "whole")]) == 0
    calls = []
    for name, module in (("evaluate_policy", evaluate), ("evaluate_guided_policy", qsharp)):
        real = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw)
        )
    real_plots = eval_cli.plot_curves

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_cli, "plot_curves", interrupted)
    out = tmp_path / "o"
    assert eval_main([*args, "--out", str(out)]) == 130
    assert len(calls) == 2 and len(list((out / ".rows").glob("*.json"))) == 2
    monkeypatch.setattr(eval_cli, "plot_curves", real_plots)
    calls.clear()
    capsys.readouterr()
    assert eval_main([*args, "--out", str(out)]) == 0
    assert calls == [] and "2 of 2 rows reused" in capsys.readouterr().err
    for name in ("results.json", "results.csv"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    monkeypatch.setattr(eval_cli, "plot_curves", interrupted)
    assert eval_main([*args, "--out", str(tmp_path / "o2")]) == 130
    monkeypatch.setattr(eval_cli, "plot_curves", real_plots)
    calls.clear()
    other = [a if a != str(BETA) else str(2 * BETA) for a in args]
    assert eval_main([*other, "--out", str(tmp_path / "o2")]) == 0
    assert calls == ["evaluate_guided_policy"]  # the reference's row reused, the guided one evaluated at its beta
    assert json.loads((tmp_path / "o2" / "results.json").read_text())[1]["beta"] == 2 * BETA


def test_a_value_run_at_a_log_level_above_info_draws_no_progress_bar(trained, tmp_path):
    """``logging.level=WARNING`` keeps warnings only, as a policy run does and --log-level's help says: a value
    run (loss=qsharp_value) still drew its "train value" bar with train.progress at its default."""
    tmp, init, _ = trained
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("SHIQ_VERBOSE", None)
    args = [f"data.buffer={tmp / 'buffer'}", f"init={init}", f"out={tmp_path / 'v'}", *RUN_ARGS, "train.steps=2"]
    res = subprocess.run(
        [sys.executable, "-m", "shiq_train", "--config-dir", str(REPO / "configs"), *args, "logging.level=WARNING"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr == "", res.stderr[-3000:]
    assert (tmp_path / "v" / "value_model.json").is_file()
