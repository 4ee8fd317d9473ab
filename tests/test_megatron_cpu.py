"""megatron-core on CPU: the adaptations in ``shiq_train.parallel``, model building from the Hydra
model configs, start-up errors, statistics from the model, and a short ShiQ training run."""

import dataclasses
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from checkpoint_files import write_meta
from omegaconf import OmegaConf

from shiq_train import model as M
from shiq_train import parallel
from shiq_train import weights as W
from shiq_train.stats import causal_lm_stats

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU adaptations")


@pytest.fixture
def dist1():
    """A world-size-1 gloo process group with megatron's groups, seeded; torn down afterwards."""
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=1234):
        yield


# ----------------------------------------------------------------------------------------------
# adaptations


def test_adaptations_are_idempotent_and_narrow():
    from megatron.core import utils as mutils
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer import clip_grads, distrib_optimizer
    from megatron.core.optimizer import optimizer as moptimizer
    from megatron.core.pipeline_parallel import p2p_communication, schedules
    from megatron.core.tensor_parallel import mappings
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import attention

    names = parallel.apply_cpu_adaptations()
    assert names == [
        "rng_tracker",
        "checkpoint_rng",
        "memory_buffer",
        "rope_device",
        "schedule_zeros",
        "p2p_device_and_sync",
        "tied_embedding_copy",
        "sp_linear_grad",
        "kv_cache",
        "tp_gather",
        "grad_buffer",
        "optimizer_flags",
        "grad_norm_device",
        "param_type_names",
        "optimizer_state_alloc",
    ]

    def patched():  # what the adaptations replace, as it stands now
        return (
            mrandom.CudaRNGStatesTracker,
            mutils.torch,
            schedules.torch,
            p2p_communication.torch,
            LanguageModule.setup_embeddings_and_output_layer,
            attention.torch,
            mappings.torch,
            param_and_grad_buffer.torch,
            moptimizer.torch,
            clip_grads.torch,
            distrib_optimizer.torch,
            distrib_optimizer.DistributedOptimizer.__init__,
            moptimizer.clip_grad_by_total_norm_fp32,
        )

    before = patched()
    assert parallel.apply_cpu_adaptations() == names
    assert patched() == before
    from megatron.core.tensor_parallel import layers

    for module in (attention, mappings, layers, param_and_grad_buffer, distrib_optimizer):
        assert module.torch.cuda.current_device() == torch.device("cpu")
        assert module.torch.empty is torch.empty
    # activation recomputation saves and restores no CUDA generator state (there is none)
    assert mrandom._get_cuda_rng_state() is None and mrandom._set_cuda_rng_state(None) is None
    assert mrandom._get_cuda_rng_state is mrandom._set_cuda_rng_state
    # only the named attributes differ inside the patched modules ...
    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert schedules.torch.ones is torch.ones and schedules.torch.Tensor is torch.Tensor
    assert p2p_communication.torch.cuda.current_device() == torch.device("cpu")
    assert p2p_communication.torch.cuda.synchronize() is None
    assert mutils.torch.cuda.is_available is torch.cuda.is_available
    for module in (moptimizer, clip_grads, mutils):
        assert module.torch.tensor([1.0], device="cuda").device.type == "cpu"
        assert module.torch.ones is torch.ones
    assert clip_grads.torch.zeros(1, device="cuda").device.type == "cpu"
    # ... and torch itself is untouched
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")
    assert torch.ones(1).type() == "torch.FloatTensor"


def test_rng_tracker_forks_cpu_streams(dist1):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # default stream restored
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the forked stream advanced
    parallel.set_seed(1234)
    with get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), a)  # reproducible from the seed


def test_global_memory_buffer_is_on_cpu(dist1):
    from megatron.core import parallel_state

    buf = parallel_state.get_global_memory_buffer().get_tensor((2, 3), torch.float32, "test")
    assert buf.device.type == "cpu"


def test_a_lone_process_needs_no_port_and_free_ports_avoid_the_ephemeral_range(monkeypatch):
    """Rendezvous cannot race other tests for a port: a lone process uses an in-memory store, and the
    ports handed to multi-process groups lie below the range the kernel gives automatic binds and
    outgoing connections (where gloo's own connections in a test running alongside land)."""

    def no_port():
        raise AssertionError("a lone process asked for a TCP port")

    monkeypatch.setattr(parallel, "free_port", no_port)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with parallel.distributed(seed=0):
        assert torch.distributed.get_world_size() == 1
        torch.distributed.all_reduce(t := torch.ones(2))
        assert t.tolist() == [1.0, 1.0]
    monkeypatch.undo()
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        lo = int(f.read().split()[0])
    ports = {parallel.free_port() for _ in range(20)}
    assert all(1024 <= p < lo for p in ports) and len(ports) > 1
    import socket

    for p in ports:  # and each is really free
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


# ----------------------------------------------------------------------------------------------
# configs and start-up errors


@pytest.mark.parametrize("name", ["tiny", "smollm2_135m"])
def test_yaml_mirrors_dataclass(name):
    raw = OmegaConf.load(CONFIGS / f"{name}.yaml")
    assert set(raw) == {f.name for f in dataclasses.fields(M.ModelConfig)}
    cfg = M.ModelConfig.from_dict(raw)
    assert cfg.name == name


def test_hydra_composes_the_model_group_with_overrides():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS.parent), version_base=None):
        cfg = compose(overrides=["+model=smollm2_135m", "model.params_dtype=float32", "model.logits_chunk_tokens=0"])
    mc = M.ModelConfig.from_dict(cfg.model)
    assert (mc.num_query_groups, mc.rotary_base, mc.params_dtype, mc.logits_chunk_tokens) == (3, 100000, "float32", 0)


def test_tiny_yaml_is_the_dataclass_default():
    assert M.ModelConfig.from_dict(OmegaConf.load(CONFIGS / "tiny.yaml")) == M.ModelConfig()


def test_smollm2_builds_with_hf_parameter_count(dist1):
    cfg = dataclasses.replace(
        M.ModelConfig.from_dict(OmegaConf.load(CONFIGS / "smollm2_135m.yaml")), params_dtype="float32"
    )
    model = M.build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    st = M.forward_stats(model, torch.randint(0, cfg.vocab_size, (1, 8)))
    assert st.logz.shape == (1, 8) and torch.isfinite(st.logz).all()


@pytest.mark.parametrize("impl", ["transformer_engine", "auto"])
def test_fp8_without_gpu_fails_at_startup_naming_what_is_missing(impl):
    import importlib.util

    cfg = M.ModelConfig(fp8="hybrid", transformer_impl=impl)
    missing = "a CUDA GPU" + ("" if importlib.util.find_spec("transformer_engine") else " and Transformer Engine")
    with pytest.raises(
        RuntimeError,
        match=rf"model.fp8='hybrid' needs a CUDA GPU .* missing here: {missing}\. "
        r"Set model.fp8=null",
    ):
        M.check_runtime(cfg)
    with pytest.raises(RuntimeError, match=r"model.fp8='hybrid' needs a CUDA GPU"):
        M.build_model(cfg)


def test_fp8_with_local_layers_is_refused(monkeypatch):
    """Even where a GPU and Transformer Engine are present (pretended here), FP8 needs TE layers."""
    pretend_gpu_with_transformer_engine(monkeypatch)
    with pytest.raises(RuntimeError, match=r"needs model.transformer_impl=transformer_engine or auto \(got 'local'\)"):
        M.check_runtime(M.ModelConfig(fp8="hybrid", transformer_impl="local"))
    assert M.resolved_transformer_impl(M.ModelConfig()) == "transformer_engine"  # auto picks TE there
    M.check_runtime(M.ModelConfig(fp8="hybrid"))  # auto + fp8: accepted


def pretend_gpu_with_transformer_engine(monkeypatch, capability=(9, 0), name="NVIDIA H100 80GB HBM3"):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "transformer_engine" else find_spec(name, *a)
    )


@pytest.mark.parametrize("capability,name,ok", [((8, 0), "NVIDIA A100-SXM4-80GB", False), ((8, 9), "NVIDIA L4", True)])
def test_fp8_on_a_gpu_without_fp8_tensor_cores_is_refused_at_startup(monkeypatch, capability, name, ok):
    """An A100 with Transformer Engine (pretended here) passed the start-up check, though its tensor cores have no
    FP8: refused in one line naming the GPU and its compute capability; Ada (8.9) and Hopper (9.0) pass."""
    pretend_gpu_with_transformer_engine(monkeypatch, capability, name)
    if ok:
        M.check_runtime(M.ModelConfig(fp8="hybrid"))
        return
    with pytest.raises(RuntimeError, match=r"compute capability 8.9 or newer.*this is NVIDIA A100-SXM4-80GB \(8.0\)"):
        M.check_runtime(M.ModelConfig(fp8="hybrid"))
    M.check_runtime(M.ModelConfig())  # bf16 on the same GPU: fine


def fp8_gemm_runs(rows: int, inner: int, out: int | None = None) -> bool:
    """Transformer Engine's condition on an FP8 GEMM's operands (``assert_dim_for_fp8_exec``): the input's
    ``rows x inner`` and the weight's ``out x inner`` each with the leading dimension divisible by 8 and the
    last by 16."""
    return rows % 8 == 0 and inner % 16 == 0 and (out is None or out % 8 == 0)


def test_fp8_sizes_transformer_engine_cannot_run_are_refused_at_startup(monkeypatch):
    """Where a GPU and Transformer Engine are present (pretended here), FP8 refuses, in one line naming the
    setting, a model whose linear layers' widths Transformer Engine's FP8 GEMMs cannot take (on each
    tensor-parallel rank) and a max_sequence_length the padded widths would exceed. Without them the missing
    GPU is named first, whatever the sizes."""
    bad_hidden = M.ModelConfig(fp8="hybrid", hidden_size=72, num_attention_heads=4, ffn_hidden_size=256)
    with pytest.raises(RuntimeError, match=r"model.fp8='hybrid' needs a CUDA GPU"):
        M.check_runtime(bad_hidden)
    pretend_gpu_with_transformer_engine(monkeypatch)
    M.check_runtime(M.ModelConfig(fp8="hybrid"))  # hidden 64, ffn 256, qkv width 192: every GEMM runs
    cases = [
        (bad_hidden, 1, r"model.hidden_size=72 divisible by 16"),
        (M.ModelConfig(fp8="e4m3", ffn_hidden_size=200), 1, r"model.ffn_hidden_size=200 divisible by 16"),
        (M.ModelConfig(fp8="hybrid", hidden_size=96, ffn_hidden_size=512), 4, r"model.hidden_size=96 / parallel.tp=4"),
        (M.ModelConfig(fp8="hybrid", ffn_hidden_size=80), 2, r"model.ffn_hidden_size=80 / parallel.tp=2 divisible"),
        (
            M.ModelConfig(fp8="hybrid", hidden_size=48, num_attention_heads=16, num_query_groups=1),
            1,
            r"query-key-value width .*=54 divisible by 8",
        ),
        (M.ModelConfig(fp8="hybrid", max_sequence_length=40), 1, r"use model.max_sequence_length=48 or model.fp8"),
        (  # heads of their own width: the attention output projection's input is 4 * 20, not hidden_size
            M.ModelConfig(fp8="hybrid", kv_channels=20),
            2,
            r"attention width num_attention_heads \* kv_channels = 4 \* 20=80 / parallel.tp=2 divisible by 16",
        ),
    ]
    for model_cfg, tp, match in cases:
        with pytest.raises(RuntimeError, match=match) as refused:
            M.check_fp8_shapes(model_cfg, tp)
        assert "\n" not in str(refused.value) and "model.fp8=null" in str(refused.value)
        if tp == 1:
            with pytest.raises(RuntimeError, match=match):
                M.check_runtime(model_cfg)
    # the sizes accepted are those every FP8 GEMM of a layer takes, on every rank
    for model_cfg, tp in ((M.ModelConfig(fp8="hybrid"), 1), (M.ModelConfig(fp8="hybrid", hidden_size=128), 4)):
        M.check_fp8_shapes(model_cfg, tp)
        h, f = model_cfg.hidden_size, model_cfg.ffn_hidden_size or 4 * model_cfg.hidden_size
        qkv = (model_cfg.num_attention_heads + 2 * model_cfg.num_attention_heads) * (h // 4)
        assert fp8_gemm_runs(16, h, qkv // tp) and fp8_gemm_runs(16, h // tp, h)  # attention in / out
        assert fp8_gemm_runs(16, h, 2 * f // tp) and fp8_gemm_runs(16, f // tp, h)  # MLP in / out
    M.check_fp8_shapes(M.ModelConfig(hidden_size=72, num_attention_heads=4, max_sequence_length=40), 3)  # no fp8


@pytest.mark.parametrize(
    "tp,sequence_parallel", [(tp, sp) for tp in (1, 2, 3, 4, 8) for sp in (False, True) if tp > 1 or not sp]
)
def test_fp8_pads_every_width_so_each_gemm_gets_whole_fp8_tiles(tp, sequence_parallel):
    """The sampler's width multiple under FP8 (``width_multiple``): whatever the rows B and the longest row, the
    padded batch's tokens B·T (the weight gradient's inner dimension) are divisible by 16 and each rank's share
    under sequence parallelism (B·T/tp, the input a layer casts before gathering the sequence) by 8. Without
    FP8 only sequence parallelism pads (to tp)."""
    cfg = M.ModelConfig(fp8="hybrid", sequence_parallel=sequence_parallel, max_sequence_length=4096)
    multiple = M.width_multiple(cfg, tp)
    assert multiple == (math.lcm(16, 8 * tp) if sequence_parallel else 16)
    for longest in range(1, 70):
        T = -(-longest // multiple) * multiple
        for B in range(1, 6):
            assert (B * T) % 16 == 0
            if sequence_parallel:
                assert T % tp == 0 and fp8_gemm_runs(B * T // tp, 16)
    plain = dataclasses.replace(cfg, fp8=None)
    assert M.width_multiple(plain, tp) == (tp if sequence_parallel else 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU resolution of transformer_impl=auto")
def test_auto_layers_are_local_without_a_gpu():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from shiq_train.attention import SDPACoreAttention

    cfg = M.ModelConfig()
    assert cfg.transformer_impl == "auto"
    assert M.resolved_transformer_impl(cfg) == "local"
    assert M.layer_spec(cfg).submodules.self_attention.submodules.core_attention is SDPACoreAttention
    megatron_attention = M.ModelConfig(attention_backend="megatron")
    assert M.layer_spec(megatron_attention).submodules.self_attention.submodules.core_attention is DotProductAttention


def test_transformer_engine_impl_without_gpu_fails_clearly():
    with pytest.raises(RuntimeError, match=r"transformer_impl=transformer_engine needs a CUDA GPU"):
        M.check_runtime(M.ModelConfig(transformer_impl="transformer_engine"))


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"activation": "relu2"}, "model.activation"),
        ({"fp8": "e5m2"}, "model.fp8"),
        ({"hidden_size": 65}, "divisible by num_attention_heads"),
        ({"logits_chunk_tokens": -1}, "logits_chunk_tokens"),
        ({"num_query_groups": 0}, r"model.num_query_groups = 0 is not valid: an integer >= 1"),
        ({"num_query_groups": 3}, r"model.num_query_groups = 3 is not valid: must divide num_attention_heads=4"),
        ({"hidden_dropout": 1.5}, r"model.hidden_dropout = 1.5 is not valid: a probability in \[0, 1\)"),
        ({"attention_dropout": 1.0}, r"model.attention_dropout = 1.0 is not valid: a probability in \[0, 1\)"),
        ({"hidden_dropout": -0.1}, r"model.hidden_dropout = -0.1 is not valid"),
        ({"ffn_hidden_size": -3}, r"model.ffn_hidden_size = -3 is not valid: an integer >= 1"),
        ({"ffn_hidden_size": 0}, r"model.ffn_hidden_size = 0 is not valid"),
        ({"layernorm_epsilon": -1.0}, r"model.layernorm_epsilon = -1.0 is not valid: a finite number > 0"),
        ({"layernorm_epsilon": 0.0}, r"model.layernorm_epsilon = 0.0 is not valid"),
        ({"init_method_std": float("nan")}, r"model.init_method_std = nan is not valid"),
        ({"rotary_base": 0}, r"model.rotary_base = 0 is not valid"),
        ({"rope_scaling_factor": 0.5}, r"model.rope_scaling_factor = 0.5 is not valid: a finite number >= 1"),
        ({"rope_scaling_factor": float("inf")}, r"model.rope_scaling_factor = inf is not valid"),
        ({"rope_scaling_factor": True}, r"model.rope_scaling_factor = True is not valid"),
        (
            {"rope_scaling_factor": 8.0, "position_embedding_type": "learned_absolute"},
            r"model.rope_scaling_factor = 8.0 is not valid: scales rotary embeddings: needs position_embedding_type",
        ),
    ],
)
def test_bad_config_values_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        M.ModelConfig(**kw)


INT_FIELDS = [
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "ffn_hidden_size",
    "vocab_size",
    "max_sequence_length",
    "logits_chunk_tokens",
    "recompute_num_layers",
]


@pytest.mark.parametrize("field", INT_FIELDS)
def test_a_bool_is_not_an_integer_config_value(field):
    # True == 1 passes each field's range check: only the integer type check names it (hidden_size=True would
    # otherwise fail only as not divisible by the heads)
    with pytest.raises(ValueError, match=rf"model\.{field} = True is not valid: (expected )?an integer"):
        M.ModelConfig(**{field: True})


def test_config_values_at_the_edges_are_accepted():
    a = M.ModelConfig(num_query_groups=1, hidden_dropout=0.0, attention_dropout=0.999, ffn_hidden_size=1)
    b = M.ModelConfig(num_query_groups=4, layernorm_epsilon=1e-12, hidden_dropout=0)
    assert (a.num_query_groups, a.hidden_dropout, a.attention_dropout, a.ffn_hidden_size) == (1, 0.0, 0.999, 1)
    assert (b.num_query_groups, b.layernorm_epsilon, b.hidden_dropout) == (4, 1e-12, 0)
    for edge in ({"attention_dropout": 1.0}, {"ffn_hidden_size": 0}, {"num_query_groups": 0}):  # just beyond
        with pytest.raises(ValueError, match=rf"model\.{next(iter(edge))} = "):
            M.ModelConfig(**edge)


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match=r"unknown model config keys \['hidden'\]"):
        M.ModelConfig.from_dict({"hidden": 3})


# ----------------------------------------------------------------------------------------------
# the model and its statistics


def test_causal_mask_blocks_the_future():
    m = M.causal_mask(4)
    assert m.shape == (1, 1, 4, 4) and m.dtype == torch.bool
    assert m[0, 0].tolist() == [
        [False, True, True, True],
        [False, False, True, True],
        [False, False, False, True],
        [False, False, False, False],
    ]


def test_model_is_causal(dist1):
    model = M.build_model(M.ModelConfig())
    tok = torch.randint(0, 128, (1, 16))
    tok2 = tok.clone()
    tok2[0, 10:] = (tok2[0, 10:] + 1) % 128
    a, b = model(**M.model_inputs(tok)), model(**M.model_inputs(tok2))
    assert torch.equal(a[0, :10], b[0, :10]) and not torch.equal(a[0, 10:], b[0, 10:])


def test_forward_stats_match_full_logits_both_paths(dist1):
    model = M.build_model(M.ModelConfig())
    tok = torch.randint(0, 128, (2, 16))
    logits = model(**M.model_inputs(tok))
    assert logits.shape == (2, 16, 128)
    ref = causal_lm_stats(logits, tok)
    st = M.forward_stats(model, tok)
    torch.testing.assert_close(st.logz, ref.logz)
    torch.testing.assert_close(st.chosen_logits, ref.chosen_logits)
    model.stats_from_labels = False  # labels= then gives megatron's own cross-entropy: -log π(y_t)
    ce = model(**M.model_inputs(tok), labels=tok.roll(-1, dims=1))
    model.stats_from_labels = True
    torch.testing.assert_close(ce[:, :-1], (ref.logz - ref.chosen_logits)[:, 1:], rtol=1e-5, atol=1e-5)
    model.return_hidden, model.logits_chunk_tokens = True, 7  # the chunked path, same weights
    st2 = M.forward_stats(model, tok)
    torch.testing.assert_close(st2.logz, ref.logz, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st2.chosen_logits, ref.chosen_logits, rtol=1e-5, atol=1e-5)


def test_dropout_runs_through_the_rng_tracker(dist1):
    model = M.build_model(M.ModelConfig(hidden_dropout=0.1, attention_dropout=0.1))
    model.train()
    tok = torch.randint(0, 128, (2, 16))
    a, b = model(**M.model_inputs(tok)), model(**M.model_inputs(tok))
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model(**M.model_inputs(tok)), model(**M.model_inputs(tok)))


# ----------------------------------------------------------------------------------------------
# training


def make_micro_batches(n=2, rows=2, seq=16, vocab=128):
    """Prompt of 4 tokens, then actions with random rewards; random reference statistics."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        action = torch.zeros(rows, seq, dtype=torch.bool)
        action[:, 4:] = True
        out.append(
            {
                "tokens": torch.randint(0, vocab, (rows, seq), generator=g),
                "action_mask": action,
                "rewards": torch.randn(rows, seq, generator=g) * action,
                "ref_chosen_logits": torch.randn(rows, seq, generator=g) * 0.1,
                "ref_logz": 4.85 + torch.randn(rows, seq, generator=g) * 0.1,
            }
        )
    return out


def test_short_shiq_run_lowers_the_loss(dist1):
    from shiq_train.objectives import LossConfig
    from shiq_train.train_step import OptimizerConfig, build_optimizer, objective_loss_fn, train_step

    model = M.build_model(M.ModelConfig(logits_chunk_tokens=8))
    opt_cfg = OptimizerConfig(lr=3e-3, warmup_steps=3, decay_steps=30, min_lr=3e-4, clip_grad=1.0)
    opt, sched = build_optimizer(model, opt_cfg)
    batches = make_micro_batches()
    loss_fn = objective_loss_fn(LossConfig(name="shiq", beta=0.1))
    logs = [train_step(model, opt, sched, batches, loss_fn, opt_cfg.clip_grad) for _ in range(30)]
    assert logs[0]["lr"] == pytest.approx(1e-3) and logs[2]["lr"] == pytest.approx(3e-3)
    assert logs[-1]["lr"] < logs[3]["lr"]
    assert logs[-1]["loss"] < 0.35 * logs[0]["loss"], [round(l["loss"], 4) for l in logs]
    assert {"abs_delta_mean", "log_ratio", "reward", "grad_norm"} <= set(logs[0])


def test_bf16_parameters_train_with_fp32_master_weights(dist1):
    from shiq_train.objectives import LossConfig
    from shiq_train.train_step import (
        MasterWeightOptimizer,
        OptimizerConfig,
        build_optimizer,
        objective_loss_fn,
        train_step,
    )

    model = M.build_model(M.ModelConfig(params_dtype="bfloat16"))
    assert model.embedding.word_embeddings.weight.dtype == torch.bfloat16
    opt, sched = build_optimizer(model, OptimizerConfig(lr=3e-3))
    assert isinstance(opt, MasterWeightOptimizer)
    loss_fn = objective_loss_fn(LossConfig(name="shiq", beta=0.1))
    logs = [train_step(model, opt, sched, make_micro_batches(), loss_fn, 1.0) for _ in range(10)]
    assert logs[-1]["loss"] < 0.6 * logs[0]["loss"]


@pytest.mark.parametrize("master", [False, True])
def test_small_bf16_updates_accumulate_only_in_master_weights(dist1, master):
    from shiq_train.objectives import LossConfig
    from shiq_train.train_step import OptimizerConfig, build_optimizer, objective_loss_fn, train_step

    model = M.build_model(M.ModelConfig(params_dtype="bfloat16"))
    w = model.embedding.word_embeddings.weight
    w0 = w.detach().clone()
    opt, sched = build_optimizer(model, OptimizerConfig(lr=2e-5, fp32_master_weights=master))
    loss_fn = objective_loss_fn(LossConfig(name="shiq", beta=0.1))
    for _ in range(16):
        train_step(model, opt, sched, make_micro_batches(), loss_fn, 0.0)
    # weights in [2^-5, 2^-4) have a bf16 ulp of 2^-12 ~ 2.4e-4: a single AdamW update (a few
    # times lr at most) rounds away, while 16 of them accumulate in float32 master weights
    band = (w0.float().abs() >= 2**-5) & (w0.float().abs() < 2**-4)
    changed = float((w.detach() != w0)[band].float().mean())
    assert (changed > 0.3) if master else (changed == 0.0), changed


def test_optimizer_schedule():
    from shiq_train.train_step import OptimizerConfig

    c = OptimizerConfig(lr=1.0, min_lr=0.1, warmup_steps=4, decay_steps=10)
    assert [c.lr_at(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert c.lr_at(4) == 1.0 and c.lr_at(14) == pytest.approx(0.1) and c.lr_at(100) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="min_lr"):
        OptimizerConfig(lr=1.0, min_lr=2.0)


# ----------------------------------------------------------------------------------------------
# checkpoints: exact resume, full-parameter gathering


def _resume_matches_uninterrupted(ckpt_dir, before=2, after=2, params_dtype="float32"):
    """Train ``before + after`` steps straight, and ``before`` steps, save, rebuild everything from
    another seed, load, ``after`` steps: losses and parameters must be bit-identical (dropout on,
    so the RNG states must be restored too). Returns the gathered full parameters (rank 0) and
    the resumed model's loss in eval mode."""
    from shiq_train.checkpoint import gather_full_parameters, load_checkpoint, save_checkpoint
    from shiq_train.objectives import LossConfig
    from shiq_train.train_step import OptimizerConfig, build_optimizer, forward_backward, objective_loss_fn, train_step

    cfg = M.ModelConfig(hidden_dropout=0.1, attention_dropout=0.1, params_dtype=params_dtype)
    opt_cfg = OptimizerConfig(lr=1e-3, warmup_steps=2, decay_steps=4, weight_decay=0.1)
    loss_fn = objective_loss_fn(LossConfig(name="shiq", beta=0.1))
    batches = make_micro_batches()

    def fresh(seed):
        parallel.set_seed(seed)
        model = M.build_model(cfg)
        return (model, *build_optimizer(model, opt_cfg))

    def run(state, n):
        model, opt, sched = state
        model.train()
        return [train_step(model, opt, sched, batches, loss_fn, 1.0)["loss"] for _ in range(n)]

    straight = fresh(5)
    losses_a = run(straight, before + after)
    interrupted = fresh(5)
    losses_b = run(interrupted, before)
    save_checkpoint(ckpt_dir, before, *interrupted, user_state={"sampler": 17}, meta={"model": cfg.to_dict()})
    resumed = fresh(99)
    step, user = load_checkpoint(ckpt_dir, *resumed)
    assert (step, user) == (before, {"sampler": 17})
    losses_b += run(resumed, after)
    assert losses_b == losses_a
    for (n, p), (_, q) in zip(straight[0].named_parameters(), resumed[0].named_parameters()):
        assert torch.equal(p, q), n
    save_checkpoint(ckpt_dir, before + after, *resumed)  # read back offline by the export tests
    resumed[0].eval()
    eval_loss, _ = forward_backward(resumed[0], batches, loss_fn, forward_only=True)
    return gather_full_parameters(resumed[0]), eval_loss


@pytest.mark.parametrize("params_dtype", ["float32", "bfloat16"])  # bf16: fp32 master weights resume too
def test_checkpoint_resumes_exactly(dist1, tmp_path, params_dtype):
    full, _ = _resume_matches_uninterrupted(tmp_path, params_dtype=params_dtype)
    assert (tmp_path / "latest").read_text().strip() == "step_00000004"
    assert not list(tmp_path.rglob("*.tmp*"))
    model = M.build_model(M.ModelConfig(hidden_dropout=0.1, attention_dropout=0.1))
    assert set(full) == {n for n, _ in model.named_parameters()}


def test_checkpoint_of_another_layout_is_checked(dist1, tmp_path):
    """A checkpoint of another layout loads from all its rank files (a missing one is named), and only if
    its files record the parameter layouts (older ones resume in their own layout only)."""
    from shiq_train.checkpoint import load_checkpoint, save_checkpoint, save_hashed

    model = M.build_model(M.ModelConfig())
    d = save_checkpoint(tmp_path, 3, model)
    meta = (d / "meta.json").read_text()
    write_meta(d / "meta.json", meta.replace('"tp": 1', '"tp": 2'))
    with pytest.raises(ValueError, match=r"rank_tp1_pp0_dp0.pt is missing: the checkpoint is incomplete"):
        load_checkpoint(tmp_path, model)
    write_meta(d / "meta.json", meta.replace('"dp": 1', '"dp": 2'))
    state = torch.load(d / "rank_tp0_pp0_dp0.pt", weights_only=True)
    del state["format"], state["params"]
    torch.save(state, d / "rank_tp0_pp0_dp0.pt")  # as an older version wrote it, its checksum not updated
    with pytest.raises(ValueError, match=r"rank_tp0_pp0_dp0.pt: sha256 differs from rank_tp0_pp0_dp0.pt.sha256"):
        load_checkpoint(tmp_path, model)
    save_hashed(state, d / "rank_tp0_pp0_dp0.pt")
    with pytest.raises(ValueError, match=r"without the parameter layouts .* only in its own layout tp=1 pp=1 dp=2"):
        load_checkpoint(tmp_path, model)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nowhere", model)


def test_a_step_saved_again_and_killed_before_its_meta_json_is_an_unfinished_save(dist1, tmp_path, monkeypatch):
    """A step whose save finished but was killed before ``latest`` moved is saved again by the resumed run (its
    configuration may differ: train.steps). A kill between the new meta.json.sha256 and meta.json left the first
    save's meta.json beside the new checksum, refused by every reader (shiq-eval over the run, export); now the
    folder holds no meta.json until the new one, an unfinished save that the next start removes."""
    from shiq_train import checkpoint as C

    model = M.build_model(M.ModelConfig())
    C.save_checkpoint(tmp_path, 1, model, meta={"config": {"steps": 2}})
    C.save_checkpoint(tmp_path, 2, model, meta={"config": {"steps": 2}})
    (tmp_path / "latest").write_text("step_00000001\n")  # killed before the pointer moved
    real = C.atomic_write

    def killed_at_meta_json(path, *args, **kwargs):
        if Path(path).name == "meta.json":
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(C, "atomic_write", killed_at_meta_json)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(tmp_path, 2, model, meta={"config": {"steps": 4}})
    monkeypatch.setattr(C, "atomic_write", real)
    assert C.remove_temporaries(tmp_path) == [tmp_path / "step_00000002"]
    assert C.read_meta(C.latest_step_dir(tmp_path))["step"] == 1


def test_an_optimizer_moment_of_another_shape_is_refused_not_read_past_its_end(dist1, tmp_path):
    """A rank file edited with its checksum renewed, whose AdamW moment has another shape than its parameter,
    was loaded and stepped by the fused kernel: heap corruption (free(): invalid next size). Refused, naming
    the parameter and the moment."""
    from shiq_train.checkpoint import load_checkpoint, save_checkpoint, save_hashed
    from shiq_train.train_step import OptimizerConfig, build_optimizer

    model = M.build_model(M.ModelConfig())
    opt, sched = build_optimizer(model, OptimizerConfig())
    sum(p.float().sum() for p in model.parameters()).backward()
    opt.step()
    d = save_checkpoint(tmp_path, 1, model, opt, sched)
    rank = d / "rank_tp0_pp0_dp0.pt"
    state = torch.load(rank, weights_only=True)
    name = next(iter(state["optimizer"]["params"]))
    state["optimizer"]["params"][name]["state"]["exp_avg"] = torch.zeros(3)
    save_hashed(state, rank)
    opt2, sched2 = build_optimizer(model, OptimizerConfig())
    with pytest.raises(ValueError, match=rf"optimizer state of parameter {re.escape(name)}: exp_avg has shape \[3\]"):
        load_checkpoint(tmp_path, model, opt2, sched2)


def test_a_rank_file_is_checked_against_its_sha256_before_it_is_read(dist1, tmp_path):
    """Every rank file has a ``.sha256`` beside it (sha256sum's format, so ``sha256sum -c`` checks it too);
    a flipped byte that torch.load would read without complaint (a weight's value), a missing checksum,
    or a cut file is refused naming the file before anything is unpickled."""
    import hashlib
    import subprocess

    from shiq_train.checkpoint import load_checkpoint, save_checkpoint

    model = M.build_model(M.ModelConfig())
    d = save_checkpoint(tmp_path, 3, model)
    rank, sums = d / "rank_tp0_pp0_dp0.pt", d / "rank_tp0_pp0_dp0.pt.sha256"
    data = rank.read_bytes()
    assert sums.read_text() == f"{hashlib.sha256(data).hexdigest()}  rank_tp0_pp0_dp0.pt\n"
    assert subprocess.run(["sha256sum", "-c", sums.name], cwd=d, capture_output=True).returncode == 0
    assert load_checkpoint(tmp_path, model)[0] == 3
    saved = sums.read_text()
    sums.write_text(saved.upper().replace(rank.name.upper(), rank.name))  # upper-case hex, as sha256sum -c reads too
    assert subprocess.run(["sha256sum", "-c", sums.name], cwd=d, capture_output=True).returncode == 0
    assert load_checkpoint(tmp_path, model)[0] == 3
    sums.write_text(saved)
    at = data.index(b"data/0") + 200  # inside the first tensor's bytes: a changed weight, still a valid file
    rank.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :])
    torch.load(rank, weights_only=True)  # what the checksum catches: torch reads it without a word
    with pytest.raises(ValueError, match=f"{rank}: sha256 differs from {sums.name}"):
        load_checkpoint(tmp_path, model)
    rank.write_bytes(data)
    sums.unlink()
    with pytest.raises(ValueError, match=f"{sums} is missing or empty: .*'sha256sum {rank.name} > {sums.name}'"):
        load_checkpoint(tmp_path, model)


def _resume_worker(rank, world, port, tp, pp, out_dir):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    with parallel.distributed(
        parallel.ParallelConfig(tp, pp), rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}", seed=1
    ):
        full, eval_loss = _resume_matches_uninterrupted(Path(out_dir) / "ckpt")
        if rank == 0:
            torch.save({"full": full, "eval_loss": eval_loss}, Path(out_dir) / "full.pt")


def test_gathering_in_one_process_copies_every_parameter(dist1):
    """World size 1 skips the collective: every parameter under its TP=1 name (megatron's own
    ``state_dict``), equal, and a copy (a later update does not show in it)."""
    from shiq_train.checkpoint import gather_full_parameters

    model = M.build_model(M.ModelConfig())
    full = gather_full_parameters(model)
    params = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert full.keys() == params.keys() and all(torch.equal(full[k], params[k]) for k in params)
    before = {k: v.clone() for k, v in full.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert all(torch.equal(full[k], before[k]) for k in full)


def test_checkpoint_resumes_exactly_tp2_pp2_and_gathers(tmp_path):
    from ranks import spawn

    spawn(_resume_worker, args=(4, parallel.free_port(), 2, 2, str(tmp_path)), nprocs=4)
    from shiq_train.objectives import LossConfig
    from shiq_train.train_step import forward_backward, objective_loss_fn

    saved = torch.load(tmp_path / "full.pt", weights_only=True)
    assert len(list((tmp_path / "ckpt" / "step_00000002").glob("rank_*.pt"))) == 4
    # the offline reader reassembles the same parameters from the rank files alone
    from shiq_train.export import full_parameters_from_checkpoint

    offline = full_parameters_from_checkpoint(tmp_path / "ckpt" / "step_00000004", num_layers=2)
    assert set(offline) == set(saved["full"])
    assert all(torch.equal(offline[k], saved["full"][k]) for k in offline)
    # rank files of Transformer Engine layers (pre-norms fused into linear_qkv / linear_fc1) read back
    # under the local names: the same full set
    from shiq_train.checkpoint import save_hashed

    te_step = tmp_path / "te" / "step_00000004"
    te_step.mkdir(parents=True)
    (te_step / "meta.json").write_text((tmp_path / "ckpt" / "step_00000004" / "meta.json").read_text())
    renamed = 0
    for f in (tmp_path / "ckpt" / "step_00000004").glob("rank_*_dp0.pt"):
        state = torch.load(f, weights_only=True)
        params = {}
        for k, v in state["model"].items():
            te = k.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight").replace(
                "pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"
            )
            renamed += te != k
            params[te] = v
        save_hashed({"model": params}, te_step / f.name)
    assert renamed == 2 * 2 * 2  # two pre-norms in each of the 2 layers, held by both tensor-parallel ranks
    te_offline = full_parameters_from_checkpoint(te_step, num_layers=2)
    assert set(te_offline) == set(saved["full"])
    assert all(torch.equal(te_offline[k], saved["full"][k]) for k in te_offline)
    assert (
        W.local_layer_name("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight")
        == "decoder.layers.3.input_layernorm.weight"
    )
    assert W.local_layer_name("decoder.layers.3.mlp.linear_fc1.weight") == "decoder.layers.3.mlp.linear_fc1.weight"
    # the gathered parameters give a TP=1, PP=1 model the TP2xPP2 model's loss
    with parallel.distributed(seed=3):
        model = M.build_model(M.ModelConfig())
        M.load_full_parameters(model, saved["full"])
        model.eval()
        loss, _ = forward_backward(
            model, make_micro_batches(), objective_loss_fn(LossConfig(name="shiq", beta=0.1)), forward_only=True
        )
    assert loss == pytest.approx(saved["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("gated,bias", [(True, False), (False, True), (True, True)])
def test_weight_layout_table_matches_megatron_attributes(dist1, gated, bias):
    """shiq_train.weights names the split of every parameter as megatron marks it (TP=1 build)."""
    model = M.build_model(M.ModelConfig(gated_linear_unit=gated, add_bias_linear=bias))
    seen = 0
    for name, p in model.named_parameters():
        megatron_dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        dim, glu = W.tp_split(name, gated)
        assert dim == megatron_dim, name
        assert glu == (gated and "mlp.linear_fc1." in name), name
        seen += dim is not None
    assert seen == 1 + 2 * (4 + 2 * bias)  # embedding; per layer qkv, proj, fc1, fc2 (+ qkv, fc1 biases)


def test_weight_sharding_round_trip_and_names():
    full = torch.arange(48.0).view(8, 6)
    gate, up = full[:4], full[4:]
    parts = [W.shard_tensor(full, 0, True, 2, r) for r in range(2)]
    assert torch.equal(parts[1], torch.cat([gate[2:], up[2:]]))  # each rank holds [gate_r; up_r]
    assert torch.equal(W.unshard_tensors(parts, 0, True), full)
    cols = [W.shard_tensor(full, 1, False, 3, r) for r in range(3)]
    assert torch.equal(cols[2], full[:, 4:]) and torch.equal(W.unshard_tensors(cols, 1, False), full)
    assert W.shard_tensor(full, None, False, 2, 1) is full
    assert W.full_name("decoder.layers.1.mlp.linear_fc2.weight", pp_rank=2, per_stage=3, tied=True) == (
        "decoder.layers.7.mlp.linear_fc2.weight"
    )
    assert W.full_name("output_layer.weight", 1, 2, tied=True) == "embedding.word_embeddings.weight"
    assert W.full_name("output_layer.weight", 1, 2, tied=False) == "output_layer.weight"
    assert W.rank_file_name(1, 0, 3) == "rank_tp1_pp0_dp3.pt"
    with pytest.raises(ValueError, match="num_layers=5 does not split over pp=2"):
        W.layers_per_stage(5, 2)
