"""Reference statistics written into a buffer: equal to a direct per-row computation, padding-free, resumable."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from data_cli_runs import rewrite_shard

from shiq_data.buffer import add_ref_columns, open_buffer, write_buffer
from shiq_data.ref_stats import compute_ref_stats, length_sorted_batches, rows_ref_stats
from shiq_train.reference import check_tokenizer_matches, hf_stats_fn, megatron_stats_fn

VOCAB = 64
TOKENIZER = {"name": "test", "fingerprint": "ab" * 32, "vocab_size": VOCAB}
REPO = Path(__file__).resolve().parents[1]


def make_rows(n, seed=0, min_len=3, max_len=11):
    g = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        t = int(g.integers(min_len, max_len + 1))
        p = int(g.integers(1, t))
        mask = [False] * p + [True] * (t - p)
        rewards = [0.0] * t
        rewards[-1] = float(g.normal())
        rows.append(
            {
                "row_id": f"r{i}",
                "source": "test",
                "group_id": i // 2,
                "prompt_len": p,
                "tokens": g.integers(0, VOCAB, t).tolist(),
                "action_mask": mask,
                "rewards": rewards,
            }
        )
    return rows


def build(tmp_path, name="buf", n=10, shard_rows=4, seed=0):
    return write_buffer(
        make_rows(n, seed),
        tmp_path / name,
        tokenizer_info=TOKENIZER,
        command=["test"],
        shard_rows=shard_rows,
        progress=False,
    )


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2's tokenizer, read once from the packaged GGUF file."""
    from transformers import AutoTokenizer

    from shiq_data.assets import AssetMissing, smollm2_gguf

    try:
        gguf = smollm2_gguf()
    except AssetMissing as e:
        pytest.skip(str(e))
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def assert_each_row_alone(model, rows, chosen, logz):
    """``chosen`` and ``logz`` of ``rows`` equal :func:`naive_stats` of each row's own forward pass through
    ``model`` (a Hugging Face causal LM) to 1e-5."""
    for t, got_c, got_z in zip(rows, chosen, logz, strict=True):
        with torch.no_grad():
            c, z = naive_stats(model(input_ids=torch.tensor([t])).logits[0], t)
        np.testing.assert_allclose(got_c, c, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(got_z, z, atol=1e-5, rtol=1e-5)


def naive_stats(logits, tokens):
    """c_t = logits[t-1, tokens[t]], z_t = log Σ_v exp logits[t-1, v] in float64, 0 at t = 0 (a plain loop)."""
    lg = logits.double()
    c, z = [0.0], [0.0]
    for t in range(1, len(tokens)):
        c.append(float(lg[t - 1, tokens[t]]))
        z.append(float(np.log(np.exp(lg[t - 1].numpy()).sum())))
    return np.array(c), np.array(z)


def assert_naive_stats(rows: list[dict], model) -> None:
    """Each row's reference columns are :func:`naive_stats` of ``model``'s logits on its tokens."""
    for r in rows:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([r["tokens"]])).logits[0]
        c, z = naive_stats(logits, r["tokens"])
        np.testing.assert_allclose(r["ref_chosen_logits"], c, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(r["ref_logz"], z, atol=1e-5, rtol=1e-5)


def test_batches_respect_token_budget_and_cover_every_row():
    lengths = [5, 1, 9, 3, 3, 7, 20, 2]
    batches = length_sorted_batches(lengths, 12)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 12
    assert [6] in batches  # longer than the budget: alone


def test_written_stats_equal_direct_per_row_logits(tmp_path, tiny_llama):
    buf = build(tmp_path, n=10, shard_rows=4)
    done = compute_ref_stats(
        buf.path, hf_stats_fn(tiny_llama), ref_model={"name": "tiny"}, max_batch_tokens=24, progress=False
    )
    assert done == [0, 1, 2]
    out = open_buffer(buf.path)
    assert out.has_ref_stats and out.manifest["ref_stats"]["ref_model"] == {"name": "tiny", "dtype": "float32"}
    assert len(out.manifest["ref_stats"]["done"]) == 3
    # Read back with plain pyarrow, shard by shard, independently of the buffer reader.
    rows = []
    for p in out.shard_paths:
        with pa.ipc.open_stream(pa.memory_map(str(p))) as r:
            rows += r.read_all().to_pylist()
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in make_rows(10)]
    assert_naive_stats(rows, tiny_llama)
    # Nothing left to do: a second call computes nothing.
    assert compute_ref_stats(buf.path, hf_stats_fn(tiny_llama), ref_model={"name": "tiny"}, progress=False) == []
    # another reference model's statistics are not added beside these: refused, naming the recorded one
    other = "holds reference statistics with ref_model.name 'tiny', not 'other'; build a new buffer for another"
    with pytest.raises(ValueError, match=re.escape(f"{buf.path / 'manifest.json'}: {other}")):
        compute_ref_stats(buf.path, hf_stats_fn(tiny_llama), ref_model={"name": "other"}, progress=False)


def test_a_hand_edited_token_id_is_refused_naming_shard_and_row(tmp_path, tiny_llama):
    """A token id outside the buffer's vocabulary (a shard edited with its checksum) is named, not met as
    the embedding lookup's IndexError; the shards before it keep their statistics."""
    buf = build(tmp_path, n=10, shard_rows=4)
    rewrite_shard(buf.path, 1, lambda rows: rows[2]["tokens"].__setitem__(0, VOCAB))
    with pytest.raises(ValueError, match=rf"shard-00001.arrow: row 2: field 'tokens': token id {VOCAB} outside"):
        compute_ref_stats(buf.path, hf_stats_fn(tiny_llama), ref_model={"name": "tiny"}, progress=False)
    assert [s["has_ref"] for s in open_buffer(buf.path).manifest["shards"]] == [True, False, False]


def test_non_finite_statistics_are_refused_naming_shard_and_row(tmp_path, capsys):
    """A non-finite value from stats_fn was refused with the row's number within its shard only, which does not
    say which shard; the shard file is now named with it. The shards before it keep their statistics. The
    progress bar, left half-drawn above the error line, is cleared (nothing shown after its last '\r')."""
    buf = build(tmp_path, n=10, shard_rows=4)
    target = make_rows(10)[6]["tokens"]  # shard 1's row 2

    def stats_fn(tokens, mask):
        c, z = torch.zeros(tokens.shape), torch.ones(tokens.shape)
        for b in range(tokens.shape[0]):
            if int(mask[b].sum()) == len(target) and tokens[b, : len(target)].tolist() == target:
                c[b, 1] = float("nan")
        return c, z

    capsys.readouterr()
    with pytest.raises(ValueError, match=r"shard-00001.arrow: row 2: stats_fn returned non-finite"):
        compute_ref_stats(buf.path, stats_fn, ref_model={"name": "r"}, progress=True)
    err = capsys.readouterr().err
    assert "reference statistics" in err and "\n" not in err and err.rsplit("\r", 1)[-1].strip() == "", err
    assert [s["has_ref"] for s in open_buffer(buf.path).manifest["shards"]] == [True, False, False]


def test_statistics_recorded_without_a_dtype_are_resumed_in_float32(tmp_path):
    """A buffer whose first shard got its statistics before the dtype was recorded (so float32, as training
    reads it) was refused by a float32 run resuming it ("ref_model.dtype None, not 'float32'"); it continues
    with the remaining shards. Another dtype is still refused."""
    buf = build(tmp_path, n=10, shard_rows=4)
    n = [len(r["tokens"]) for r in make_rows(10)[:4]]
    add_ref_columns(buf.path, 0, [[0.0] * k for k in n], [[0.0] + [1.0] * (k - 1) for k in n], ref_model={"name": "r"})

    def stats_fn(tokens, mask):
        return torch.zeros(tokens.shape), torch.ones(tokens.shape)

    with pytest.raises(ValueError, match="ref_model.dtype 'float32', not 'bfloat16'"):
        compute_ref_stats(buf.path, stats_fn, ref_model={"name": "r"}, progress=False, dtype="bfloat16")
    assert compute_ref_stats(buf.path, stats_fn, ref_model={"name": "r"}, progress=False) == [1, 2]
    out = open_buffer(buf.path)
    assert out.has_ref_stats and out.manifest["ref_model"] == {"name": "r", "dtype": "float32"}


def test_a_hand_edited_null_token_is_refused_naming_shard_and_row(tmp_path, tiny_llama):
    """A null token id (a shard edited with its checksum) failed with pyarrow's zero-copy error naming no shard,
    row or field; it is named like a token id outside the vocabulary, and the shards before it keep theirs."""
    buf = build(tmp_path, n=10, shard_rows=4)
    rewrite_shard(buf.path, 1, lambda rows: rows[2]["tokens"].__setitem__(1, None))
    with pytest.raises(ValueError, match=r"shard-00001.arrow: row 2: field 'tokens': null at position 1"):
        compute_ref_stats(buf.path, hf_stats_fn(tiny_llama), ref_model={"name": "tiny"}, progress=False)
    assert [s["has_ref"] for s in open_buffer(buf.path).manifest["shards"]] == [True, False, False]


@pytest.mark.parametrize("chunk_tokens", [1, 5, 4096])
def test_llama_stats_never_form_full_logits_and_equal_them(tiny_llama, chunk_tokens, monkeypatch):
    """The chunked Llama path gives the naive full-logit values without calling the output layer."""
    _chunked_equals_full_logits(tiny_llama, chunk_tokens, monkeypatch)


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3"])
def test_mistral_and_qwen_stats_take_the_chunked_path_and_equal_full_logits(arch, monkeypatch):
    """Mistral, Qwen2 (query/key/value biases, none on the output layer) and Qwen3 (query and key norms, heads of
    their own width), which the trainer imports as Llama-family models, take the chunked path too, with the naive
    full-logit values."""
    import transformers

    config_class, model_class = {
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[arch]
    torch.manual_seed(0)
    cfg = config_class(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, **({"head_dim": 12} if arch == "qwen3" else {}),
    )  # fmt: skip
    model = model_class(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)  # (Qwen2's biases start at 0)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)  # (Qwen3's start at 1)
    _chunked_equals_full_logits(model, 5, monkeypatch)


def _chunked_equals_full_logits(model, chunk_tokens, monkeypatch):
    """The statistics of ``model`` by :func:`hf_stats_fn` equal the naive ones of its full logits, and its output
    layer is never called."""
    tiny_llama = model
    rows = [r["tokens"] for r in make_rows(5, seed=4, min_len=2, max_len=12)]
    with torch.no_grad():
        expected = [naive_stats(tiny_llama(input_ids=torch.tensor([t])).logits[0], t) for t in rows]

    def refuse(*a, **k):
        raise AssertionError("full logits formed")

    monkeypatch.setattr(tiny_llama.lm_head, "forward", refuse)
    chosen, logz = rows_ref_stats(rows, hf_stats_fn(tiny_llama, chunk_tokens=chunk_tokens), max_batch_tokens=30)
    for (c, z), got_c, got_z in zip(expected, chosen, logz, strict=True):
        np.testing.assert_allclose(got_c, c, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(got_z, z, atol=1e-5, rtol=1e-5)


def test_the_stats_function_takes_a_0_1_attention_mask(tiny_llama):
    """transformers' own mask form (0/1 integers) gives what a bool mask gives: padded positions 0."""
    tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    fn = hf_stats_fn(tiny_llama)
    want = fn(tokens, mask.bool())
    got = fn(tokens, mask)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not want[1][1, 2:].any() and want[1][1, 1] != 0


def test_other_models_use_their_full_logits():
    """A model outside the Llama family (GPT-2: its own output path) goes through its full logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    rows = [r["tokens"] for r in make_rows(4, seed=5, min_len=2, max_len=12)]
    chosen, logz = rows_ref_stats(rows, hf_stats_fn(model, chunk_tokens=2), max_batch_tokens=30)
    assert_each_row_alone(model, rows, chosen, logz)


def test_padding_does_not_change_values(tiny_llama):
    rows = [r["tokens"] for r in make_rows(7, seed=3, min_len=2, max_len=15)]
    alone = rows_ref_stats(rows, hf_stats_fn(tiny_llama), max_batch_tokens=1)  # each row unpadded
    padded = rows_ref_stats(rows, hf_stats_fn(tiny_llama), max_batch_tokens=10_000)  # one padded batch
    for a, b in zip(alone[0] + alone[1], padded[0] + padded[1], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_megatron_stats_fn_matches_full_logits():
    import warnings

    from shiq_train import model as M
    from shiq_train import parallel

    warnings.filterwarnings("ignore")
    rows = [r["tokens"] for r in make_rows(5, seed=4, min_len=2, max_len=12)]
    with parallel.distributed(seed=1):
        model = M.build_model(M.ModelConfig(vocab_size=VOCAB, max_sequence_length=16)).eval()
        c, z = rows_ref_stats(rows, megatron_stats_fn(model), max_batch_tokens=10_000)
        for tokens, ci, zi in zip(rows, c, z, strict=True):
            with torch.no_grad():
                logits = model(**M.model_inputs(torch.tensor([tokens])))[0]
            want_c, want_z = naive_stats(logits, tokens)
            np.testing.assert_allclose(ci, want_c, atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(zi, want_z, atol=1e-5, rtol=1e-5)


def toy_stats_numpy(tokens, mask):
    """Depends on the prefix only, like a causal model's statistics; numpy out."""
    x = tokens.numpy().astype(np.float64)
    prev = np.concatenate([np.zeros_like(x[:, :1]), x[:, :-1]], 1)
    return np.sin(x + 0.5 * prev), np.cumsum(prev, 1) * 0.01 + 1.0


def test_stats_fn_may_return_numpy_arrays():
    """A ``stats_fn`` giving numpy arrays is stored like a torch one: each row equals the formula on that
    row alone (float64, a plain loop), position 0 set to 0, padding dropped."""
    rows = [r["tokens"] for r in make_rows(6, seed=7, min_len=2, max_len=9)]
    chosen, logz = rows_ref_stats(rows, toy_stats_numpy, max_batch_tokens=20)
    for t, c, z in zip(rows, chosen, logz, strict=True):
        want_c = [0.0] + [np.sin(t[i] + 0.5 * t[i - 1]) for i in range(1, len(t))]
        want_z = [0.0] + [1.0 + 0.01 * sum(t[:i]) for i in range(1, len(t))]
        assert c.dtype == z.dtype == np.float32 and len(c) == len(t)
        np.testing.assert_allclose(c, want_c, atol=1e-6)
        np.testing.assert_allclose(z, want_z, rtol=1e-6)
    with pytest.raises(ValueError, match=r"stats_fn returned logz of shape \(1, 1\)"):
        rows_ref_stats(rows[:1], lambda t, m: (np.zeros(t.shape), np.zeros((1, 1))))


CHILD = """
import json, os, pathlib, sys, threading
import torch
import shiq_data.ref_stats as R
from shiq_data.ref_stats import compute_ref_stats

committed = []  # shards added so far
_add = R.add_ref_columns
def add_ref_columns(*args, **kwargs):
    _add(*args, **kwargs)
    committed.append(args[1])
R.add_ref_columns = add_ref_columns

def toy_stats(tokens, mask):
    # Depends on the prefix only, like a causal model's statistics.
    if os.environ.get("HOLD_AFTER_FIRST") and committed:  # in the second shard: say so, and wait to be killed
        tmp = pathlib.Path(os.environ["HOLD_AFTER_FIRST"] + ".tmp")
        tmp.write_text(str(committed))
        tmp.rename(os.environ["HOLD_AFTER_FIRST"])
        threading.Event().wait()
    x = tokens.double()
    prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
    c = torch.sin(x + 0.5 * prev)
    z = torch.cumsum(prev, 1) * 0.01 + 1.0
    c[:, 0] = z[:, 0] = 0
    return c.float(), z.float()

done = compute_ref_stats(sys.argv[1], toy_stats, ref_model={"name": "toy"}, max_batch_tokens=1000, progress=False)
print(json.dumps(done))
"""


def run_child(buffer_dir, hold="", wait=True):
    env = {**os.environ, "HOLD_AFTER_FIRST": str(hold), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(buffer_dir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if wait:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        return json.loads(out)
    return proc


def test_killed_run_resumes_at_first_unfinished_shard(tmp_path):
    buf = build(tmp_path, "a", n=12, shard_rows=4)
    shutil.copytree(buf.path, tmp_path / "b")
    assert run_child(tmp_path / "a") == [0, 1, 2]

    # killed in the second shard's statistics, once the first is committed (the child holds there)
    held = tmp_path / "held"
    proc = run_child(tmp_path / "b", hold=held, wait=False)
    manifest = tmp_path / "b" / "manifest.json"
    deadline = time.monotonic() + 120
    try:
        while not held.exists():
            assert proc.poll() is None, f"the child ended before its second shard: {proc.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "the child reached no second shard in 120 s"
            time.sleep(0.05)
        assert held.read_text() == "[0]"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed = json.loads(manifest.read_text())
    assert [s["has_ref"] for s in killed["shards"]] == [True, False, False]
    first = dict(killed["shards"][0])

    assert run_child(tmp_path / "b") == [1, 2]  # the done shard is not recomputed
    resumed, full = open_buffer(tmp_path / "b"), open_buffer(tmp_path / "a")
    assert resumed.manifest["shards"][0] == first
    assert resumed.table.equals(full.table)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(p.name for p in (tmp_path / "a").iterdir())


def test_tokenizer_mismatch_is_refused():
    other = {**TOKENIZER, "name": "gpt2", "fingerprint": "cd" * 32}
    with pytest.raises(ValueError, match="fingerprint"):
        check_tokenizer_matches(TOKENIZER, other, VOCAB, "buf")
    with pytest.raises(ValueError, match="only 32"):
        check_tokenizer_matches(TOKENIZER, TOKENIZER, 32, "buf")
    check_tokenizer_matches(TOKENIZER, TOKENIZER, VOCAB, "buf")


def test_cli_builds_hh_and_adds_ref_stats_with_a_local_model(tmp_path, capsys, smollm2_tokenizer, monkeypatch):
    """``shiq-data build hh`` then ``shiq-train ref-stats --model FOLDER`` on a tiny random Llama whose folder
    holds SmolLM2's tokenizer; a buffer tokenised differently is refused."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from shiq_data.cli import main
    from shiq_train.reference import main as ref_stats

    tok = smollm2_tokenizer
    folder = tmp_path / "tiny-llama"
    torch.manual_seed(1)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=128,
        )
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    hh = tmp_path / "hh.jsonl"
    hh.write_text(
        json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."})
        + "\n"
    )
    buf = tmp_path / "buf"
    assert main(["build", "hh", str(hh), "--tokenizer", str(folder), "--out", str(buf), "--no-progress"]) == 0
    assert ref_stats([str(buf), "--model", str(folder), "--batch-tokens", "64", "--no-progress"]) == 0
    assert "computed for 1 shard; 1/1 shards" in capsys.readouterr().out
    assert open_buffer(buf).manifest["ref_model"]["dtype"] == "float32"
    rows = open_buffer(buf).table.to_pylist()
    model.eval()
    assert_naive_stats(rows, model)
    # the same folder refilled with other weights is another reference: its statistics are not mixed in, nor
    # is the buffer taken as holding them already
    saved = (folder / "model.safetensors").read_bytes()
    torch.manual_seed(2)
    LlamaForCausalLM(model.config).save_pretrained(folder)
    capsys.readouterr()
    assert ref_stats([str(buf), "--model", str(folder), "--no-progress"]) == 2
    assert "whose weights have changed since (another sha256)" in capsys.readouterr().err
    (folder / "model.safetensors").write_bytes(saved)
    # statistics recorded before the weights' sha256 was kept: the same model still, resumed and upgraded
    manifest = json.loads((buf / "manifest.json").read_text())
    assert len(manifest["ref_model"]["sha256"]) == 64
    old = {k: v for k, v in manifest["ref_model"].items() if k != "sha256"}
    (buf / "manifest.json").write_text(
        json.dumps({**manifest, "ref_model": old, "ref_stats": {**manifest["ref_stats"], "ref_model": old}})
    )
    assert ref_stats([str(buf), "--model", str(folder), "--no-progress"]) == 0
    assert "computed for 0 shards; 1/1 shards" in capsys.readouterr().out

    # --dtype bfloat16: the statistics of the model in bf16 (logits rounded to bf16), recorded as such
    assert (
        main(["build", "hh", str(hh), "--tokenizer", str(folder), "--out", str(tmp_path / "b16"), "--no-progress"]) == 0
    )
    assert ref_stats([str(tmp_path / "b16"), "--model", str(folder), "--dtype", "bfloat16", "--no-progress"]) == 0
    b16 = open_buffer(tmp_path / "b16")
    assert b16.manifest["ref_model"]["dtype"] == "bfloat16"
    model16 = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    # The bf16 rows equal the bf16 model's statistics to float32 rounding (measured: logz 6e-7 apart, the
    # chosen logits equal), while the float32 rows sit 1e-5 (logz) and 8e-4 (chosen logits) away from them
    # and the constant log V 4e-3 (logz ≈ 10.8): tolerances well inside those distances, no relative one.
    for r, r32 in zip(b16.table.to_pylist(), rows, strict=True):
        with torch.no_grad():
            logits = model16(input_ids=torch.tensor([r["tokens"]])).logits[0].float()
        c, z = naive_stats(logits, r["tokens"])
        np.testing.assert_allclose(r["ref_logz"], z, atol=4e-6, rtol=0)
        np.testing.assert_allclose(r["ref_chosen_logits"], c, atol=1e-4, rtol=0)
        for key, want in (("ref_logz", z), ("ref_chosen_logits", c)):  # nearer bf16 than the float32 rows
            assert np.abs(np.array(r[key]) - want).max() < np.abs(np.array(r32[key]) - want).max(), key
        assert np.abs(z[1:] - np.log(len(tok))).max() > 100 * 4e-6  # logz is not the constant log V
    capsys.readouterr()  # transformers' loading bar
    # another dtype than the buffer's statistics is refused before the model loads (slow for a large one)
    import shiq_train.reference as reference

    def no_load(*args, **kwargs):
        raise AssertionError("the reference model was loaded")

    with monkeypatch.context() as m:
        m.setattr(reference, "load_causal_lm", no_load)
        assert ref_stats([str(tmp_path / "b16"), "--model", str(folder), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "ref_model.dtype 'bfloat16', not 'float32'" in err and "(or --dtype bfloat16)" in err, err

    other = write_buffer(make_rows(2), tmp_path / "other", tokenizer_info=TOKENIZER, command=["test"], progress=False)
    assert ref_stats([str(other.path), "--model", str(folder), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shiq-train ref-stats: error: ") and "fingerprint" in err and len(err.splitlines()) == 1
    assert not open_buffer(other.path).has_ref_stats
    # the same through the shiq-train command
    exe = Path(sys.executable).with_name("shiq-train")
    cmd = (
        [str(exe)]
        if exe.exists()
        else [sys.executable, "-c", "import sys; from shiq_train.command_line import main; sys.exit(main())"]
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [*cmd, "ref-stats", str(other.path), "--model", str(folder), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("shiq-train ref-stats: error: ") and "fingerprint" in proc.stderr
    assert not open_buffer(other.path).has_ref_stats
    proc = subprocess.run([*cmd, "ref-stats", "--help"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "--megatron-checkpoint" in proc.stdout and "--batch-tokens" in proc.stdout


def test_cli_reference_from_a_training_checkpoint(tmp_path, capsys, smollm2_tokenizer):
    """``--megatron-checkpoint``: the statistics written equal the megatron model's own on each row."""
    import warnings

    from shiq_data.cli import main
    from shiq_train import model as M
    from shiq_train import parallel
    from shiq_train.checkpoint import save_checkpoint
    from shiq_train.cli import llama_config_from_model
    from shiq_train.reference import main as ref_stats

    warnings.filterwarnings("ignore")
    tok = smollm2_tokenizer
    folder = tmp_path / "arch"
    tok.save_pretrained(folder)
    multiturn = tmp_path / "mt.jsonl"
    multiturn.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Add 2 and 3."},
                    {"role": "assistant", "content": "add(2, 3)", "reward": 0.5},
                    {"role": "tool", "content": "5"},
                    {"role": "assistant", "content": "5", "reward": 1.0},
                ]
            }
        )
        + "\n"
    )
    buf = tmp_path / "buf"
    assert (
        main(["build", "multiturn", str(multiturn), "--tokenizer", str(folder), "--out", str(buf), "--no-progress"])
        == 0
    )
    cfg = M.ModelConfig(
        vocab_size=len(tok), hidden_size=32, num_attention_heads=2, num_layers=1, max_sequence_length=128
    )
    with parallel.distributed(seed=3):
        mg = M.build_model(cfg)
        meta = {"hf_config": llama_config_from_model(cfg).to_dict()}  # as shiq-train records it
        save_checkpoint(tmp_path / "run" / "checkpoints", 1, mg, meta=meta)
        llama_config_from_model(cfg).save_pretrained(folder)  # architecture only; weights come from the checkpoint
        wide = M.ModelConfig(**{**cfg.to_dict(), "hidden_size": 64})
        llama_config_from_model(wide).save_pretrained(tmp_path / "wide")  # another architecture
        tok.save_pretrained(tmp_path / "wide")
        heads = M.ModelConfig(**{**cfg.to_dict(), "kv_channels": 24})  # heads of another width only
        llama_config_from_model(heads).save_pretrained(tmp_path / "heads")
        tok.save_pretrained(tmp_path / "heads")
        qwen3 = M.ModelConfig(**{**cfg.to_dict(), "qk_layernorm": True})  # the same sizes, with query/key norms
        llama_config_from_model(qwen3).save_pretrained(tmp_path / "qwen3")
        tok.save_pretrained(tmp_path / "qwen3")
        for name, change in (
            ("theta", {"rotary_base": 500000}),
            ("llama3", {"rope_scaling_factor": 32.0}),
            ("vocab", {"vocab_size": len(tok) + 64}),  # room for the buffer's ids, but not the run's embedding
            ("untied", {"share_embeddings_and_output_weights": False}),
        ):
            other = M.ModelConfig(**{**cfg.to_dict(), **change})  # one setting other than the run's
            llama_config_from_model(other).save_pretrained(tmp_path / name)
            tok.save_pretrained(tmp_path / name)
        rows = open_buffer(buf).table.to_pylist()
        want_c, want_z = rows_ref_stats([r["tokens"] for r in rows], megatron_stats_fn(mg))
    assert (
        ref_stats(
            [
                str(buf),
                "--model",
                str(folder),
                "--megatron-checkpoint",
                str(tmp_path / "run"),  # the run, as export and evaluation take it (its newest step)
                "--no-progress",
            ]
        )
        == 0
    )
    out = open_buffer(buf)
    assert out.manifest["ref_model"]["megatron_checkpoint"].endswith("step_00000001")
    # a run of another architecture than --model's is named as such, not as a damaged checkpoint
    args = [str(buf), "--model", str(tmp_path / "wide"), "--megatron-checkpoint", str(tmp_path / "run")]
    assert ref_stats([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "its run trained another model than --model" in err and "hidden_size 32 against 64" in err, err
    args = [str(buf), "--model", str(tmp_path / "heads"), "--megatron-checkpoint", str(tmp_path / "run")]
    assert ref_stats([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "its run trained another model than --model" in err and "head_dim 16 against 24" in err, err
    args = [str(buf), "--model", str(tmp_path / "qwen3"), "--megatron-checkpoint", str(tmp_path / "run")]
    assert ref_stats([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "its run trained another model than --model" in err and "model_type 'llama' against 'qwen3'" in err, err
    assert "head_dim" not in err, err  # (the same sizes: only the norms differ)
    for name, needle in (
        ("theta", "rope_theta 10000 against 500000"),
        ("llama3", "scaling factor none against 32"),
        ("vocab", f"vocab_size {len(tok)} against {len(tok) + 64}"),
        ("untied", "tie_word_embeddings True against False"),
    ):
        args = [str(buf), "--model", str(tmp_path / name), "--megatron-checkpoint", str(tmp_path / "run")]
        assert ref_stats([*args, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "its run trained another model than --model" in err and needle in err, err
    assert open_buffer(buf).manifest == out.manifest
    for form in ("checkpoints", "checkpoints/step_00000001"):  # its checkpoints folder, a step: the same model
        args = [str(buf), "--model", str(folder), "--megatron-checkpoint", str(tmp_path / "run" / form)]
        assert ref_stats([*args, "--no-progress"]) == 0
    for r, c, z in zip(out.table.to_pylist(), want_c, want_z, strict=True):
        np.testing.assert_allclose(r["ref_chosen_logits"], c, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(r["ref_logz"], z, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "option, value, needle",
    [
        ("--threads", "-1", "must be in 0..1024, got -1"),
        ("--threads", "100000", "must be in 0..1024, got 100000"),  # torch's thread pool crashed
        ("--threads", "1025", "must be in 0..1024, got 1025"),
        ("--batch-tokens", "0", "must be >= 1, got 0"),
    ],
)
def test_cli_sizes_out_of_range_are_refused(tmp_path, capsys, option, value, needle):
    from shiq_train.reference import main as ref_stats

    with pytest.raises(SystemExit) as e:
        ref_stats([str(tmp_path), "--model", "smollm2", option, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {option}: {needle}" in err and "Traceback" not in err


def test_load_causal_lm_reads_any_causal_lm_folder_and_names_a_missing_config(tmp_path):
    """``load_causal_lm(FOLDER)`` gives the saved model (a GPT-2 here, not only Llama: same logits, eval mode);
    a folder without config.json is refused naming that file."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from shiq_train.hf_convert import load_causal_lm

    torch.manual_seed(2)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=32)).eval()
    model.save_pretrained(tmp_path / "gpt2")
    loaded, tokenizer = load_causal_lm(str(tmp_path / "gpt2"))
    assert isinstance(loaded, GPT2LMHeadModel) and not loaded.training
    assert tokenizer is None  # the folder holds no tokenizer files
    tokens = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, model(input_ids=tokens).logits)
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'empty' / 'config.json'} does not exist"):
        load_causal_lm(str(tmp_path / "empty"))


def grouped_rows(seed=0):
    """Groups whose rows share long prefixes (one row is exactly the shared prefix, suffixes of several
    lengths), a group whose rows share only 3 tokens, and a group of one row."""
    g = np.random.default_rng(seed)
    rows, groups = [], []
    for gid, (shared, suffixes) in enumerate([(40, [0, 3, 9, 1]), (33, [12, 5]), (3, [20, 30]), (45, [6])]):
        prefix = g.integers(0, VOCAB, shared).tolist()
        for n in suffixes:
            rows.append(prefix + g.integers(0, VOCAB, n).tolist())
            groups.append(gid)
    return rows, groups


@pytest.mark.parametrize("budget", [20, 400])  # each shared group alone; both shared groups in one batch
def test_shared_prefix_groups_give_the_per_row_values(tmp_path, tiny_llama, budget):
    """Rows of a group that share at least MIN_SHARED_TOKENS tokens go through ``with_prefixes`` (the
    prefix once, each remainder from its KV cache; several groups to a batch when they fit); every row's
    values are still those of the model's full logits on that row alone (naive_stats), whatever path it took."""
    from shiq_data.ref_stats import MIN_SHARED_TOKENS, common_prefix

    token_lists, groups = grouped_rows()
    assert MIN_SHARED_TOKENS <= 33
    rows = [
        {
            "row_id": f"r{i}",
            "source": "test",
            "group_id": gid,
            "prompt_len": 1,
            "tokens": t,
            "action_mask": [False] + [True] * (len(t) - 1),
            "rewards": [0.0] * (len(t) - 1) + [1.0],
        }
        for i, (t, gid) in enumerate(zip(token_lists, groups))
    ]
    buf = write_buffer(rows, tmp_path / "buf", tokenizer_info=TOKENIZER, command=["test"], progress=False)
    fn = hf_stats_fn(tiny_llama)
    calls = []
    real = fn.with_prefixes
    fn.with_prefixes = lambda groups, n: calls.extend((len(r), s) for r, s in groups) or real(groups, n)
    compute_ref_stats(buf.path, fn, ref_model={"name": "tiny"}, max_batch_tokens=budget, progress=False)
    assert sorted(calls) == [(2, 33), (4, 40)]  # the 3-token group and the single row take the plain path
    assert common_prefix(token_lists[:4]) == 40
    out = []
    for p in open_buffer(buf.path).shard_paths:
        with pa.ipc.open_stream(pa.memory_map(str(p))) as r:
            out += r.read_all().to_pylist()
    assert [r["tokens"] for r in out] == token_lists
    assert_naive_stats(out, tiny_llama)


def test_groups_sharing_a_batch_read_their_prefixes_in_one_pass(tiny_llama):
    """``with_prefixes`` with a budget that fits three groups (prefixes of 40, 33 and 35 tokens; remainders of
    0 to 12 tokens): the decoder runs twice in all (the prefixes side by side, then every remainder), and each
    row's values are the model's full logits on that row alone; a budget that fits none runs them one by one,
    with the same values."""
    token_lists, groups = grouped_rows()
    g = np.random.default_rng(1)
    third = g.integers(0, VOCAB, 35).tolist()
    shared = [(token_lists[:4], 40), (token_lists[4:6], 33), ([third + [1, 2], third + [3]], 35)]
    decoder = tiny_llama.get_decoder()
    for budget, passes in ((400, 2), (30, None)):
        calls = []
        hook = decoder.register_forward_hook(lambda *a: calls.append(1))
        try:
            got = list(hf_stats_fn(tiny_llama).with_prefixes(shared, budget))
        finally:
            hook.remove()
        assert passes is None or len(calls) == passes
        assert passes is not None or len(calls) > 3
        for (rows, _), values in zip(shared, got, strict=True):
            assert len(values) == len(rows)
            for row, (c, z) in zip(rows, values, strict=True):
                with torch.no_grad():
                    want_c, want_z = naive_stats(tiny_llama(input_ids=torch.tensor([row])).logits[0], row)
                np.testing.assert_allclose(c.numpy(), want_c, atol=1e-5, rtol=1e-5)
                np.testing.assert_allclose(z.numpy(), want_z, atol=1e-5, rtol=1e-5)


def test_with_prefix_refuses_a_prefix_longer_than_a_row(tiny_llama):
    with pytest.raises(ValueError, match="shared must be in 1..3"):
        hf_stats_fn(tiny_llama).with_prefix([[1, 2, 3], [1, 2, 3, 4]], 4, 100)


def test_a_resumed_run_refuses_a_model_folder_whose_config_changed(tmp_path, capsys, smollm2_tokenizer, monkeypatch):
    """The reference record kept the SHA-256 of a folder's weights but not of its config.json: a run interrupted
    after its first shard, resumed after config.json changed (another rope_theta: other logits from the same
    weights), added the other model's statistics to the rest of the buffer, which then claimed one reference."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import shiq_data.ref_stats
    from shiq_data.cli import main
    from shiq_train.reference import main as ref_stats

    tok = smollm2_tokenizer
    folder = tmp_path / "tiny-llama"
    torch.manual_seed(1)
    cfg = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), max_position_embeddings=128, **cfg)).save_pretrained(folder)
    tok.save_pretrained(folder)
    hh = tmp_path / "hh.jsonl"
    pair = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    hh.write_text(json.dumps(pair) + "\n" + json.dumps(pair) + "\n")
    buf = tmp_path / "buf"
    assert main(["build", "hh", str(hh), "--tokenizer", str(folder), "--out", str(buf), "--shard-rows", "2"]) == 0
    commit = shiq_data.ref_stats.add_ref_columns

    def interrupted_after_one(buffer_dir, i, *args, **kwargs):
        if i > 0:
            raise KeyboardInterrupt
        return commit(buffer_dir, i, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(shiq_data.ref_stats, "add_ref_columns", interrupted_after_one)
        assert ref_stats([str(buf), "--model", str(folder), "--no-progress"]) == 130
    assert [s["has_ref"] for s in open_buffer(buf).manifest["shards"]] == [True, False]
    config = json.loads((folder / "config.json").read_text())
    rope = {"rope_parameters": {"rope_theta": 500.0, "rope_type": "default"}}  # (transformers 5; older: rope_theta)
    (folder / "config.json").write_text(json.dumps({**config, **rope, "rope_theta": 500.0}))
    capsys.readouterr()
    assert ref_stats([str(buf), "--model", str(folder), "--no-progress"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (after transformers' bar of the weights' loading)
    assert last.startswith("shiq-train ref-stats: error: ") and "whose config.json has changed since" in last, err
    assert [s["has_ref"] for s in open_buffer(buf).manifest["shards"]] == [True, False]


def test_rows_past_learned_position_embeddings_are_refused_before_any_shard(tmp_path, capsys, smollm2_tokenizer):
    """A model with learned absolute positions (GPT-2's 40 here) cannot read a row longer than them: ref-stats
    warned of the length, then ended in torch's IndexError traceback (exit status 1) when that row's batch came,
    after the shards before it; it is now refused first, in one line naming the shard, row and field."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from shiq_data.cli import main
    from shiq_train.reference import main as ref_stats

    tok = smollm2_tokenizer
    folder = tmp_path / "tiny-gpt2"
    torch.manual_seed(1)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=40)).save_pretrained(
        folder
    )
    tok.save_pretrained(folder)
    hh = tmp_path / "hh.jsonl"
    short = {"chosen": "\n\nHuman: Hi\n\nAssistant: Yo", "rejected": "\n\nHuman: Hi\n\nAssistant: No"}
    long = {"chosen": "\n\nHuman: Hi\n\nAssistant: " + "hello " * 20, "rejected": "\n\nHuman: Hi\n\nAssistant: No"}
    hh.write_text(json.dumps(short) + "\n" + json.dumps(long) + "\n")
    buf = tmp_path / "buf"
    assert main(["build", "hh", str(hh), "--tokenizer", str(folder), "--out", str(buf), "--shard-rows", "2"]) == 0
    rows = open_buffer(buf).table.to_pylist()
    assert max(len(r["tokens"]) for r in rows[:2]) <= 40 < len(rows[2]["tokens"])
    capsys.readouterr()
    assert ref_stats([str(buf), "--model", str(folder), "--no-progress"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("shiq-train ref-stats: error: ") and "shard-00001.arrow: row 0: field 'tokens'" in last
    assert not any(s["has_ref"] for s in open_buffer(buf).manifest["shards"])


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_groups_of_a_sliding_window_model_get_its_plain_statistics(arch):
    """Groups sharing a batch have their prefixes right-padded to the longest; a sliding window counts its width
    in those padded places, so a row of a shorter prefix saw other tokens than its own forward pass does (0.1
    off in logz on a window of 16). Each row's statistics are the naive ones of its own logits."""
    import transformers

    config_class, model_class = {
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    window = {"sliding_window": 16} if arch == "mistral" else {"use_sliding_window": True, "sliding_window": 16}
    torch.manual_seed(0)
    cfg = config_class(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, max_window_layers=0, **window,
    )  # fmt: skip
    model = model_class(cfg).eval()
    g = np.random.default_rng(1)
    rows, groups = [], []
    for k, (shared, tails) in enumerate([(33, (0, 2, 7)), (50, (1, 3)), (40, (9, 4, 12))]):
        prefix = g.integers(0, VOCAB, shared).tolist()
        rows += [prefix + g.integers(0, VOCAB, n).tolist() for n in tails]
        groups += [k] * len(tails)
    chosen, logz = rows_ref_stats(rows, hf_stats_fn(model, chunk_tokens=5), max_batch_tokens=10_000, groups=groups)
    assert_each_row_alone(model, rows, chosen, logz)


def test_committing_a_shard_does_not_hold_its_rows_as_python_objects(tmp_path):
    """add_ref_columns checked each row of the new shard from ``table.to_pylist()``: every token of the shard as
    Python objects at once (about 130 bytes a token, 2 GB for a shard of 4096 rows of 4096 tokens), on top of
    the statistics. Its Python peak is now that of a bounded number of rows, the same for a 4 times longer shard."""
    import tracemalloc

    peaks = []
    for n in (500, 2000):
        rows = [
            {"row_id": f"r{i}", "source": "s", "group_id": i, "prompt_len": 10, "tokens": [1] * 100,
             "action_mask": [False] * 10 + [True] * 90, "rewards": [0.0] * 100}
            for i in range(n)
        ]  # fmt: skip
        folder = tmp_path / f"b{n}"
        write_buffer(rows, folder, tokenizer_info=TOKENIZER, command=["t"], shard_rows=n, progress=False)
        del rows
        ref = [np.zeros(100, np.float32) for _ in range(n)]
        tracemalloc.start()
        add_ref_columns(folder, 0, ref, ref, ref_model={"name": "m"})
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.5 * peaks[0] + 1_000_000, peaks


def test_a_megatron_checkpoint_trained_on_another_tokenizer_is_refused(tmp_path, capsys):
    """A run trained on a buffer of another tokenizer (its meta.json's record) learned other token ids: its
    statistics on this buffer were computed and stored without a word. Refused in one line naming the step and
    both tokenizers, the buffer untouched; the run of this tokenizer is read."""
    import warnings

    from test_eval_cli import tiny_hf_folder

    from shiq_data.buffer import write_buffer
    from shiq_data.tokenizers import load_tokenizer
    from shiq_train import model as M
    from shiq_train import parallel
    from shiq_train.checkpoint import save_checkpoint
    from shiq_train.cli import llama_config_from_model
    from shiq_train.reference import main as ref_stats

    warnings.filterwarnings("ignore")
    folder = tiny_hf_folder(tmp_path / "tok")
    tok_info = load_tokenizer(str(folder))[1]
    g = torch.Generator().manual_seed(0)
    rows = [
        {"group_id": i, "prompt_len": 3, "tokens": torch.randint(0, 16, (8,), generator=g).tolist(),
         "action_mask": [False] * 3 + [True] * 5, "rewards": [0.0] * 7 + [1.0], "source": "test"}
        for i in range(2)
    ]  # fmt: skip
    write_buffer(rows, tmp_path / "buf", tokenizer_info=tok_info, command=["test"], progress=False)

    from transformers import AutoConfig

    from shiq_train.hf_convert import model_config_from_llama

    cfg = model_config_from_llama(AutoConfig.from_pretrained(folder))
    other = {"name": "other", "fingerprint": "f" * 64, "vocab_size": tok_info["vocab_size"]}
    with parallel.distributed(seed=3):
        mg = M.build_model(cfg)
        for run, tok in (("other", other), ("same", tok_info)):
            meta = {"hf_config": llama_config_from_model(cfg).to_dict(), "tokenizer": tok}
            save_checkpoint(tmp_path / run / "checkpoints", 1, mg, meta=meta)
    before = (tmp_path / "buf" / "manifest.json").read_text()
    args = [str(tmp_path / "buf"), "--model", str(folder), "--no-progress", "--megatron-checkpoint"]
    assert ref_stats([*args, str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (above it: tiny_hf_folder's writing)
    assert (
        err.startswith("shiq-train ref-stats: error: ")
        and "step_00000001" in err
        and "'other'" in err
        and str(folder) in err
    ), err
    assert (tmp_path / "buf" / "manifest.json").read_text() == before
    assert ref_stats([*args, str(tmp_path / "same")]) == 0


def _shard_of_rows(folder, n):
    """A one-shard buffer of ``n`` rows of 2 + 3 tokens (ids from i mod 59), the last token rewarded."""
    rows = [
        {"row_id": f"r{i}", "source": "s", "group_id": i, "prompt_len": 2, "tokens": [i % (VOCAB - 5) + k for k in range(5)],
         "action_mask": [False, False, True, True, True], "rewards": [0.0] * 4 + [1.0]}
        for i in range(n)
    ]  # fmt: skip
    write_buffer(rows, folder, tokenizer_info=TOKENIZER, command=["t"], shard_rows=n, progress=False)


def test_committing_clean_statistics_converts_no_row_to_python(tmp_path, monkeypatch):
    """add_ref_columns checked each of the new shard's rows in Python (check_row): a clean shard is now checked
    on whole columns, no row at all one by one, and the statistics are stored as given."""
    import shiq_data.schema

    _shard_of_rows(tmp_path / "b", 3000)  # three slices of 1024 rows, the last short
    calls = []
    monkeypatch.setattr(shiq_data.schema, "check_row", lambda *a, **k: calls.append(1))
    chosen = [np.array([0.0, 1, 2, 3, i], np.float32) for i in range(3000)]
    logz = [np.array([0.0, -1, -2, -3, -i], np.float32) for i in range(3000)]
    add_ref_columns(tmp_path / "b", 0, chosen, logz, ref_model={"name": "m"})
    assert calls == []
    table = open_buffer(tmp_path / "b").shard_tables[0]
    assert table.column("ref_chosen_logits").to_pylist()[2999] == [0.0, 1.0, 2.0, 3.0, 2999.0]
    assert table.column("ref_logz").to_pylist()[1500] == [0.0, -1.0, -2.0, -3.0, -1500.0]


@pytest.mark.parametrize(
    "field, row, position, value, says",
    [
        ("ref_logz", 2500, 3, np.inf, "field 'ref_logz': non-finite value inf at position 3"),
        ("ref_chosen_logits", 7, 4, np.nan, "field 'ref_chosen_logits': non-finite value nan at position 4"),
        (
            "ref_logz",
            1100,
            0,
            1.0,
            "field 'ref_logz': position 0 must be 0 (nothing predicts the first token), got 1.0",
        ),
    ],
)
def test_bad_statistics_are_refused_naming_the_shard_row_and_field(tmp_path, field, row, position, value, says):
    """A statistic training would refuse (non-finite, or non-zero at position 0) is still refused before
    anything is written, naming the shard file, the row and the field as the row by row check did."""
    folder = tmp_path / "b"
    _shard_of_rows(folder, 3000)
    before = json.loads((folder / "manifest.json").read_text())
    stats = {n: [np.zeros(5, np.float32) for _ in range(3000)] for n in ("ref_chosen_logits", "ref_logz")}
    stats[field][row][position] = value
    with pytest.raises(ValueError) as e:
        add_ref_columns(folder, 0, stats["ref_chosen_logits"], stats["ref_logz"], ref_model={"name": "m"})
    assert str(e.value) == f"{folder / 'shard-00000.arrow'}: row {row}: {says}"
    assert json.loads((folder / "manifest.json").read_text()) == before
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "manifest.json",
        "shard-00000.arrow",
    ]


def _toy_stats(tokens, mask):
    """CHILD's statistics: a function of each row's prefix, like a causal model's."""
    x = tokens.double()
    prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
    c, z = torch.sin(x + 0.5 * prev), torch.cumsum(prev, 1) * 0.01 + 1.0
    c[:, 0] = z[:, 0] = 0
    return c.float(), z.float()


def test_a_run_stopped_among_shards_of_unequal_size_resumes_at_the_first_unfinished_one(tmp_path):
    """Shards cut by size (``shard_bytes``) hold different numbers of rows; the statistics are computed and
    committed shard by shard from each shard's own rows, so a run stopped after two shards resumes at the third and
    ends with the statistics of a run that was never stopped."""
    rows = make_rows(40, seed=3, min_len=3, max_len=300)
    write_buffer(
        rows, tmp_path / "a", tokenizer_info=TOKENIZER, command=["t"], shard_rows=64, shard_bytes=4096, progress=False
    )
    counts = [s["rows"] for s in open_buffer(tmp_path / "a").manifest["shards"]]
    assert len(counts) >= 5 and len(set(counts)) > 1, counts
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    model = {"name": "toy"}
    assert compute_ref_stats(tmp_path / "a", _toy_stats, ref_model=model, max_batch_tokens=600, progress=False) == list(
        range(len(counts))
    )

    class Stopped(Exception):
        pass

    def stopping(tokens, mask):
        done = (json.loads((tmp_path / "b" / "manifest.json").read_text()).get("ref_stats") or {}).get("done", [])
        if len(done) == 2:
            raise Stopped
        return _toy_stats(tokens, mask)

    with pytest.raises(Stopped):
        compute_ref_stats(tmp_path / "b", stopping, ref_model=model, max_batch_tokens=600, progress=False)
    stopped = open_buffer(tmp_path / "b").manifest
    assert [s["has_ref"] for s in stopped["shards"]] == [True, True] + [False] * (len(counts) - 2)
    again = compute_ref_stats(tmp_path / "b", _toy_stats, ref_model=model, max_batch_tokens=600, progress=False)
    assert again == list(range(2, len(counts)))
    resumed, full = open_buffer(tmp_path / "b"), open_buffer(tmp_path / "a")
    assert resumed.manifest["shards"][:2] == stopped["shards"][:2]
    assert resumed.table.equals(full.table)
    assert resumed.table.column("row_id").to_pylist() == [r["row_id"] for r in rows]


def test_threads_beyond_the_bound_are_refused_in_one_line(capsys):
    """``--threads`` is bounded (torch's thread pools crash far beyond the cores a machine has): 1024 is taken,
    1025 refused by the option itself, naming it and its rule, before the buffer or model is read."""
    from shiq_train.reference import build_parser
    from shiq_train.reference import main as ref_stats

    assert build_parser().parse_args(["b", "--model", "m", "--threads", "1024"]).threads == 1024
    with pytest.raises(SystemExit) as e:
        ref_stats(["no_buffer", "--model", "no_model", "--threads", "1025"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "argument --threads: must be in 0..1024, got 1025" in err
