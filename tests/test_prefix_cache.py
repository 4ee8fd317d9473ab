"""The frozen-prefix cache: training on cached hidden states equals training the whole model.

Tiny megatron GPT (4 layers, the last 2 trainable, hidden 64, vocab 128) on a small replay buffer of
variable-length rows in groups of 2. Three optimizer steps with the cache (one cache shared by several
trainers, or built by ``train.cache_frozen_prefix``) give the losses and trained parameters of the same
run without it, within 1e-5 relative (the parity tests' standard): DPO in groups mode, ShiQ padded,
CoPG with an online reference. Then the cases it refuses.
"""

import json
import warnings

import numpy as np
import pytest
import torch

from shiq_data.buffer import write_buffer
from shiq_data.sampler import BufferSampler
from shiq_train import model as M
from shiq_train import parallel
from shiq_train.objectives import LossConfig
from shiq_train.prefix_cache import PrefixCache, model_setting, suffix_only
from shiq_train.train_step import OptimizerConfig
from shiq_train.trainer import TrainConfig, Trainer, frozen_copy

VOCAB, LAYERS, TRAINABLE, SEQ = 128, 4, 2, 16
TOK = {"name": "toy", "fingerprint": "f" * 64, "vocab_size": VOCAB}
TOL = 1e-5
LR = 1e-2
# Two float32 runs that sum in different orders differ by rounding, and AdamW's normalisation can blow
# that up in an isolated entry whose gradient is near zero (its update is about ±lr whatever the
# gradient's size). So: the bulk of a parameter within rounding, no entry off by a tenth of one update.
# A wrong cache changes the gradients everywhere and moves most entries by whole updates.


def assert_close_parameter(p: torch.Tensor, q: torch.Tensor, name: str) -> None:
    d = (p - q).abs()
    assert float(d.mean()) <= TOL * (float(p.abs().max()) or 1.0), name
    assert float(d.max()) <= 0.1 * LR, name


def make_rows(n=16, seed=3):
    """Groups of 2 completions; prompts of 2-4 and completions of 2-9 tokens; a reward on the last
    action; reference statistics near a uniform policy."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        p, c = int(rng.integers(2, 5)), int(rng.integers(2, 10))
        rewards = [0.0] * (p + c)
        rewards[-1] = float(np.float32(rng.normal()))
        rows.append(
            {
                "row_id": f"r{i}",
                "source": "t",
                "group_id": i // 2,
                "prompt_len": p,
                "tokens": [int(t) for t in rng.integers(1, VOCAB, p + c)],
                "action_mask": [False] * p + [True] * c,
                "rewards": rewards,
                "ref_chosen_logits": [0.0] + [float(np.float32(x)) for x in rng.normal(0, 0.1, p + c - 1)],
                "ref_logz": [0.0] + [float(np.float32(x)) for x in np.log(VOCAB) + rng.normal(0, 0.1, p + c - 1)],
            }
        )
    return rows


def model_cfg(**kw):
    return M.ModelConfig(
        num_layers=LAYERS, hidden_size=64, num_attention_heads=4, vocab_size=VOCAB, max_sequence_length=SEQ, **kw
    )


@pytest.fixture(scope="module")
def buffer(tmp_path_factory):
    out = tmp_path_factory.mktemp("buf") / "b"
    return write_buffer(
        make_rows(), out, tokenizer_info=TOK, command=["t"], shard_rows=5, progress=False, ref_model={"name": "t"}
    )


@pytest.fixture
def dist1():
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=5):
        yield


def train(buffer, init, out, loss, mode, cache=None, **train_kw):
    """Three AdamW steps from ``init``; returns the losses, the trained parameters and how many times
    the first layer ran."""
    model = M.build_model(model_cfg())
    model.load_state_dict(init)
    ref = frozen_copy(model, model_cfg()) if train_kw.get("reference") == "online" else None
    calls = []
    model.decoder.layers[0].register_forward_hook(lambda *a: calls.append(1))
    trainer = Trainer(
        model,
        LossConfig(loss, beta=0.3),
        OptimizerConfig(lr=LR),
        TrainConfig(steps=3, trainable_last_layers=TRAINABLE, progress=False, tensorboard=False, **train_kw),
        out,
        ref_model=ref,
        prefix_cache=cache,
    )
    sampler = BufferSampler(buffer, rows_per_micro_batch=4, micro_batches_per_step=2, seed=1, mode=mode)
    hist = trainer.fit(sampler)
    return [h["loss"] for h in hist], {n: p.detach().clone() for n, p in model.named_parameters()}, len(calls)


def assert_same_run(a, b, init):
    losses_a, params_a, _ = a
    losses_b, params_b, _ = b
    assert losses_b == pytest.approx(losses_a, rel=TOL)
    assert params_a.keys() == params_b.keys()
    moved = 0
    for name, p in params_a.items():
        q = params_b[name]
        assert_close_parameter(p, q, name)
        moved += not torch.equal(p, init[name])
    assert moved > 0  # the comparison is of trained parameters


def test_cached_training_equals_full_training(dist1, buffer, tmp_path):
    init = {k: v.clone() for k, v in M.build_model(model_cfg()).state_dict().items() if torch.is_tensor(v)}
    builder = M.build_model(model_cfg())
    builder.load_state_dict(init)
    for p in builder.parameters():
        p.requires_grad_(False)
    cache = PrefixCache.build(
        builder,
        [buffer.row(i)["tokens"] for i in range(len(buffer))],
        TRAINABLE,
        tokens_per_batch=40,  # several length-sorted batches, each padded differently from training's
        progress=False,
    )
    assert len(cache) == len(buffer) and cache.n_frozen == LAYERS - TRAINABLE
    for loss, mode in (("dpo", "groups"), ("shiq", "padded")):  # one cache for both trainers
        full = train(buffer, init, tmp_path / f"{loss}-full", loss, mode)
        cached = train(buffer, init, tmp_path / f"{loss}-cached", loss, mode, cache=cache)
        assert full[2] > 0 and cached[2] == 0  # the cached run never ran the frozen layers
        assert_same_run(full, cached, init)
    # train.cache_frozen_prefix builds the cache itself; the online reference starts from it too
    full = train(buffer, init, tmp_path / "copg-full", "copg", "groups", reference="online")
    cached = train(
        buffer, init, tmp_path / "copg-cached", "copg", "groups", reference="online", cache_frozen_prefix=True
    )
    assert cached[2] == 1  # once: building the cache (stopped after layer 2)
    assert_same_run(full, cached, init)


def test_suffix_only_restores_the_full_model(dist1):
    model = M.build_model(model_cfg())
    keys = list(model.state_dict())
    with suffix_only(model, 3):
        assert len(model.decoder.layers) == 1 and model.decoder.layers[0].layer_number == 4
    assert list(model.state_dict()) == keys and len(model.decoder.layers) == LAYERS


def frozen_model(**kw):
    model = M.build_model(model_cfg(**kw))
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(f"decoder.layers.{LAYERS - 1}.") or "final_layernorm" in name)
    return model


def test_refusals(dist1, buffer):
    rows = [[1, 2, 3], [4, 5]]
    with pytest.raises(ValueError, match="trainable_last_layers >= 1"):
        TrainConfig(cache_frozen_prefix=True, trainable_last_layers=-1)
    with pytest.raises(ValueError, match="true or false"):
        TrainConfig(cache_frozen_prefix="yes", trainable_last_layers=1)
    for k in (-1, LAYERS):
        with pytest.raises(ValueError, match="0 <= train.trainable_last_layers < num_layers=4"):
            PrefixCache.build(frozen_model(), rows, k, progress=False)
    with pytest.raises(ValueError, match="dropout"):
        PrefixCache.build(frozen_model(hidden_dropout=0.1), rows, 1, progress=False)
    trainable = M.build_model(model_cfg())
    cache = PrefixCache.build(trainable, rows, 1, progress=False)  # built before a trainer freezes the prefix
    with pytest.raises(ValueError, match="embedding.word_embeddings.weight trains"):
        cache.check_model(trainable)
    model = frozen_model()
    model.config.tensor_model_parallel_size = 2
    with pytest.raises(ValueError, match="tensor and pipeline parallel size 1"):
        PrefixCache.build(model, rows, 1, progress=False)
    model = frozen_model()
    cache = PrefixCache.build(model, rows, 1, progress=False)
    with pytest.raises(ValueError, match="differ from those"):
        cache.check_model(frozen_model())  # other weights
    with pytest.raises(ValueError, match="not trainable_last_layers=2"):
        cache.check_model(model, 2)
    mb = {"tokens": torch.tensor([[1, 2, 3], [4, 5, 0]]), "buffer_rows": torch.tensor([0, 1])}
    assert cache.gather(mb).shape == (3, 2, 64)
    with pytest.raises(ValueError, match="packed rows"):
        cache.gather({**mb, "segment_ids": torch.zeros(2, 3, dtype=torch.int64)})
    with pytest.raises(ValueError, match="not those the frozen-prefix cache was built from"):
        cache.gather({**mb, "buffer_rows": torch.tensor([1, 0])})
    with pytest.raises(ValueError, match="has no 'buffer_rows'"):
        cache.gather({"tokens": mb["tokens"]})
    # a Trainer refuses a cache of another number of trainable layers
    with pytest.raises(ValueError, match="not trainable_last_layers=2"):
        Trainer(
            model, LossConfig(), OptimizerConfig(), TrainConfig(trainable_last_layers=2), "unused", prefix_cache=cache
        )


def value_runs(buffer, out, variants: dict) -> dict:
    """Three AdamW steps of Q♯'s value model (a megatron trunk of 3 layers, the last trainable, plus the atom
    head) from one seeded tiny Llama, once per ``ValueTrainConfig`` overrides in ``variants``: each run's
    per-step ``value_ce`` and saved weights."""
    import transformers

    from shiq_train.qsharp_train import ValueTrainConfig, train_value_model

    warnings.filterwarnings("ignore")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg)
    runs = {}
    for name, kw in variants.items():
        cfg = ValueTrainConfig(steps=3, rows_per_micro_batch=4, lr=LR, trainable_last_layers=1, progress=False, **kw)
        run = train_value_model(buffer.path, out / name, hf.state_dict(), hf_cfg, cfg, verify_checksums=False)
        lines = (run / "metrics.jsonl").read_text().splitlines()
        runs[name] = [json.loads(x)["value_ce"] for x in lines], torch.load(run / "value_model.pt", weights_only=True)
    return runs


def assert_same_value_runs(a, b) -> None:
    assert b[0] == pytest.approx(a[0], rel=TOL)
    for name, p in a[1].items():
        assert_close_parameter(p, b[1][name], name)
    assert float(a[1]["head.weight"].abs().max()) > 0  # trained (the head starts at zero)


def test_cached_value_model_training_equals_full_training(tmp_path, buffer, monkeypatch):
    """Q♯'s value model: the same metrics and saved weights with the trunk's frozen prefix cached as without."""
    gathered = []
    gather = PrefixCache.gather
    monkeypatch.setattr(PrefixCache, "gather", lambda self, mb: gathered.append(1) or gather(self, mb))
    runs = value_runs(buffer, tmp_path, {"full": {}, "cached": {"cache_frozen_prefix": True}})
    assert len(gathered) == 3  # the cached run's three micro-batches came from the cache
    assert_same_value_runs(runs["full"], runs["cached"])


def test_trainer_finds_the_buffer_behind_shiq_train_data_source(buffer):
    from shiq_train.cli import DeviceSource
    from shiq_train.trainer import _buffer_of

    sampler = BufferSampler(buffer, rows_per_micro_batch=4, seed=0, mode="groups")
    assert _buffer_of(DeviceSource(sampler, torch.device("cpu"))) is buffer
    assert _buffer_of(object()) is None
    for mode in ("groups", "padded"):  # buffer_rows name each row's buffer index
        mb = BufferSampler(buffer, rows_per_micro_batch=4, seed=2, mode=mode).next_micro_batches()[0]
        assert len(mb["buffer_rows"]) == mb["tokens"].shape[0]
        for b, r in enumerate(mb["buffer_rows"].tolist()):
            row = buffer.row(r)["tokens"]
            assert mb["tokens"][b, : len(row)].tolist() == row


def test_validation_loss_from_a_prefix_cache_equals_the_full_forward(dist1, buffer, tmp_path):
    """Trainer.validation_loss with a PrefixCache of the held-out rows' buffer runs only the trainable layers
    and gives the loss of the full forward (after a step, so the policy differs from its frozen prefix's
    reference); the micro-batches come from another sampler than training's."""
    model = M.build_model(model_cfg())
    calls = []
    model.decoder.layers[0].register_forward_hook(lambda *a: calls.append(1))
    trainer = Trainer(
        model,
        LossConfig("shiq", beta=0.3),
        OptimizerConfig(lr=LR),
        TrainConfig(steps=1, trainable_last_layers=TRAINABLE, progress=False, tensorboard=False),
        tmp_path,
    )
    trainer.fit(BufferSampler(buffer, rows_per_micro_batch=4, micro_batches_per_step=2, seed=1, mode="padded"))
    held_out = BufferSampler(buffer, rows_per_micro_batch=4, micro_batches_per_step=3, seed=7, mode="padded")
    mbs = held_out.next_micro_batches()
    full = trainer.validation_loss([dict(mb) for mb in mbs])
    cache = PrefixCache.build(model, [buffer.row(i)["tokens"] for i in range(len(buffer))], TRAINABLE, progress=False)
    calls.clear()
    cached = trainer.validation_loss([dict(mb) for mb in mbs], prefix_cache=cache)
    assert calls == [] and cached == pytest.approx(full, rel=1e-5) and full > 0


def test_a_saved_cache_is_read_back_only_when_it_fits(dist1, buffer, tmp_path, monkeypatch):
    """PrefixCache.save/load round-trip bit for bit; the recipes' PrefixCaches reads a saved cache in a later
    process instead of running the frozen layers again, and builds it again (replacing the file) when the
    file is damaged, or was made from other frozen weights or another buffer."""
    from shiq_eval.recipes.common import PrefixCaches

    model = frozen_model()
    rows = [buffer.row(i)["tokens"] for i in range(len(buffer))]
    cache = PrefixCache.build(model, rows, 1, progress=False)
    cache.save(tmp_path / "c.safetensors")
    back = PrefixCache.load(tmp_path / "c.safetensors")
    for name in ("hidden", "offsets", "tokens", "n_frozen", "num_layers", "fingerprint"):
        a, b = getattr(cache, name), getattr(back, name)
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, name
    assert back.fits(buffer, model, 1) is None and back.setting == cache.setting != ""
    assert model_setting(frozen_model()) == cache.setting  # a model built again (a later process) matches
    assert "trainable_last_layers=1, not 2" in back.fits(buffer, model, 2)
    assert "other weights" in back.fits(buffer, frozen_model(), 1)  # another random init

    out = tmp_path / "run"
    out.mkdir()
    (out / "buffer").symlink_to(buffer.path, target_is_directory=True)
    cfg = {"seed": 0, "train": {"cache_frozen_prefix": True}}
    logs = []
    built = []
    real_build = PrefixCache.build.__func__
    monkeypatch.setattr(
        PrefixCache, "build", classmethod(lambda cls, *a, **k: built.append(1) or real_build(cls, *a, **k))
    )

    def get(m):
        caches = PrefixCaches(cfg, out, reference=None, log=logs.append)  # a new process's: nothing in memory
        c = caches.get("buffer", 1, m)
        assert caches.get("buffer", 1, m) is c  # once per process
        return c

    first = get(model)
    saved = out / "prefix_cache" / "buffer-k1.safetensors"
    assert built == [1] and saved.is_file() and "cached for" in logs[-1]
    again = get(model)
    assert built == [1] and "read from buffer-k1.safetensors" in logs[-1]
    assert torch.equal(again.hidden, first.hidden) and torch.equal(again.tokens, first.tokens)
    # one flipped byte in the tensors' data: refused by the digest, built again, the file replaced
    data = bytearray(saved.read_bytes())
    data[-5] ^= 0xFF
    saved.write_bytes(bytes(data))
    get(model)
    assert built == [1, 1] and any("do not match their saved digest" in m for m in logs)
    assert PrefixCache.load(saved).digest() == first.digest()
    # other frozen weights: built again from them
    other = frozen_model()
    c = get(other)
    assert built == [1, 1, 1] and any("other weights" in m for m in logs) and c.fingerprint != first.fingerprint
    # another buffer behind the same name: built again
    (out / "buffer").unlink()
    small = write_buffer(
        make_rows(n=6, seed=9),
        tmp_path / "small",
        tokenizer_info=TOK,
        command=["t"],
        progress=False,
        ref_model={"name": "t"},
    )
    (out / "buffer").symlink_to(small.path, target_is_directory=True)
    (saved.parent / f".{saved.name}.k2j4x.tmp").write_bytes(b"half")  # a save cut short by a kill
    assert len(get(other)) == 6 and built == [1, 1, 1, 1] and "built for 16 rows; the buffer has 6" in logs[-2]
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]  # the stale temporary file is gone
    # another model configuration (here: the norm's epsilon) is not this cache's either
    assert "another model configuration" in PrefixCache.load(saved).fits(small, frozen_model(layernorm_epsilon=1e-3), 1)
    # a file without the metadata the format requires: refused in one line, then rebuilt by the recipes
    from safetensors.torch import save_file

    save_file({"hidden": torch.zeros(1, 1)}, str(saved), metadata={"format": "shiq-prefix-cache/1"})
    with pytest.raises(ValueError, match="not a frozen-prefix cache of format"):
        PrefixCache.load(saved)
    get(other)
    assert built == [1, 1, 1, 1, 1]


class _TransformerEngineProbe(torch.nn.Module):
    """A module without parameters from Transformer Engine's megatron extension: in a model it marks the layers
    as Transformer Engine's (``shiq_train.prefix_tree.unsupported``), which this machine cannot build."""


_TransformerEngineProbe.__module__ = "megatron.core.extensions.transformer_engine"


def states_alone(model, row, n_frozen):
    """The hidden states ``[T, H]`` after layer ``n_frozen`` of ``row`` run alone through the model."""
    seen = []
    hook = model.decoder.layers[n_frozen - 1].register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            model(**M.model_inputs(torch.tensor([row])))
    finally:
        hook.remove()
    return seen[0][:, 0]


def test_a_cache_of_transformer_engine_layers_runs_plain_rows(dist1):
    """On Transformer Engine layers a cache is built from plain rows (their attention ignores a trie's mask)
    without an error about train.share_prefixes, which nobody set; asking for tries there is refused, naming
    the argument. With FP8 every batch is padded to a multiple of 16 tokens. Each row's cached states are
    those of the row run alone."""
    rows = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7], [1, 2, 3, 4, 5, 8, 9], [10, 11]]
    n_frozen = LAYERS - TRAINABLE
    model = frozen_model()
    model.add_module("te_probe", _TransformerEngineProbe())
    cache = PrefixCache.build(model, rows, TRAINABLE, progress=False)
    for i, row in enumerate(rows):
        got = cache.hidden[int(cache.offsets[i]) : int(cache.offsets[i + 1])]
        torch.testing.assert_close(got, states_alone(model, row, n_frozen), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"PrefixCache.build\(share_prefixes=True\).*megatron's local layers") as e:
        PrefixCache.build(model, rows, TRAINABLE, progress=False, share_prefixes=True)
    assert "train.share_prefixes" not in str(e.value)
    del model.te_probe
    widths = []
    model.embedding.register_forward_hook(lambda m, a, out: widths.append(out.shape[0]))  # [T, B, H]
    model.config.fp8 = "hybrid"  # megatron's local layers ignore it; the cache pads for Transformer Engine's
    padded = PrefixCache.build(model, rows, TRAINABLE, progress=False, share_prefixes=False, tokens_per_batch=16)
    assert len(widths) > 1 and all(w % 16 == 0 for w in widths), widths
    torch.testing.assert_close(padded.hidden, cache.hidden, rtol=1e-5, atol=1e-6)


def test_a_cache_of_other_rotary_frequencies_does_not_fit(dist1, buffer):
    """The same weights with another rope_theta or Llama 3's scaled RoPE compute other hidden states: a cache
    saved with one is not the other's (the frequencies are GPTModel arguments, outside the config that
    model_setting hashed, so such a cache was read back as fitting)."""
    model = frozen_model()
    rows = [buffer.row(i)["tokens"] for i in range(len(buffer))]
    cache = PrefixCache.build(model, rows, 1, progress=False)
    for change in ({"rotary_base": 500000}, {"rope_scaling_factor": 32.0}, {"rope_scaling_factor": 8.0}):
        other = frozen_model(**change)
        other.load_state_dict(model.state_dict())  # the same weights
        assert "another model configuration" in (cache.fits(buffer, other, 1) or ""), change
    scaled = frozen_model(rope_scaling_factor=32.0)
    assert model_setting(scaled) == model_setting(frozen_model(rope_scaling_factor=32.0))  # rebuilt: it matches
    assert model_setting(scaled) != model_setting(frozen_model(rope_scaling_factor=8.0))


def test_a_row_longer_than_its_cached_one_is_refused(dist1):
    """A micro-batch row whose first tokens are its cached row's but which goes on (``lengths`` says so: a buffer
    rebuilt with longer rows behind the same indices) has no cached state for its last tokens: gather refused it
    only when the first tokens differed, and gave zeros as the states of the others (another forward)."""
    model = frozen_model()
    cache = PrefixCache.build(model, [[1, 2, 3], [4, 5]], 1, progress=False)
    mb = {"tokens": torch.tensor([[1, 2, 3, 6], [4, 5, 0, 0]]), "buffer_rows": torch.tensor([0, 1])}
    assert cache.gather({**mb, "lengths": torch.tensor([3, 2])}).shape == (4, 2, 64)  # padding after them
    with pytest.raises(ValueError, match="buffer row 0: the micro-batch's 4 tokens are not the 3 the frozen-prefix"):
        cache.gather({**mb, "lengths": torch.tensor([4, 2])})


def test_a_cache_of_another_activation_does_not_fit(dist1, buffer):
    """The same weights through gelu instead of silu compute other hidden states; the activation is a function
    in megatron's config, which model_setting (numbers, strings, dtypes) left out, so such a cache fitted."""
    model = frozen_model()
    rows = [buffer.row(i)["tokens"] for i in range(len(buffer))]
    cache = PrefixCache.build(model, rows, 1, progress=False)
    other = frozen_model(activation="gelu")
    other.load_state_dict(model.state_dict())  # the same weights
    assert not torch.equal(PrefixCache.build(other, rows, 1, progress=False).hidden, cache.hidden)
    assert "another model configuration" in (cache.fits(buffer, other, 1) or "")
    assert cache.fits(buffer, model, 1) is None


def test_a_cache_of_other_weights_than_the_resumed_checkpoints_is_refused(dist1, buffer, tmp_path):
    """A trainer checked its cache against the model it was given, then resumed a checkpoint whose frozen
    layers are other weights and trained on the cached states of the first ones (another step than the
    resumed run's); the cache is checked again against the weights the checkpoint loaded."""
    rows = [buffer.row(i)["tokens"] for i in range(len(buffer))]

    def trainer(model, steps, cache=None):
        cfg = TrainConfig(steps=steps, trainable_last_layers=TRAINABLE, progress=False, tensorboard=False)
        return Trainer(model, LossConfig("shiq", beta=0.3), OptimizerConfig(lr=LR), cfg, tmp_path, prefix_cache=cache)

    sampler = lambda: BufferSampler(buffer, rows_per_micro_batch=4, micro_batches_per_step=2, seed=1)  # noqa: E731
    trainer(frozen_model(), 1).fit(sampler())  # a checkpoint at step 1
    other = frozen_model()  # another random start: other frozen layers than the checkpoint's
    cache = PrefixCache.build(other, rows, TRAINABLE, progress=False)
    with pytest.raises(ValueError, match="differ from those the frozen-prefix cache was built with"):
        trainer(other, 2, cache).fit(sampler())
