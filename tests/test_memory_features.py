"""megatron's memory features through ``ModelConfig`` / ``ParallelConfig`` on CPU.

- Activation recomputation (``model.recompute``): selective and full (uniform and block) give the
  loss and every gradient of the run that keeps all activations (tiny GPT, float32, dropout on so
  that the recomputed forward must replay the same dropout masks), and really recompute (forward
  hooks count the recomputed modules' calls).
- Sequence parallelism is checked against the single-process run in ``tests/test_parallel_parity.py``;
  here its start-up errors.
- Context parallelism (``parallel.cp > 1``) is refused with one message naming what is missing.
"""

import warnings

import pytest
import torch
from test_parallel_parity import SEED, make_micro_batches, shiq_loss_fn, tiny_config

from shiq_train import model as M
from shiq_train import parallel
from shiq_train.train_step import forward_backward

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU runs")
DROPOUT = dict(hidden_dropout=0.1, attention_dropout=0.1)


def _run(cfg, full=None):
    """Loss, gradients and per-module forward-call counts of one forward/backward over the test's
    micro-batches, from the same RNG state (same dropout masks) every time."""
    model = M.build_model(cfg)
    if full is not None:
        M.load_full_parameters(model, full)
    calls = {"layer": 0, "core_attn": 0}

    def count(key):
        def hook(*_):
            calls[key] += 1

        return hook

    for layer in model.decoder.layers:
        layer.register_forward_hook(count("layer"))
        layer.self_attention.core_attention.register_forward_hook(count("core_attn"))
    model.zero_grad(set_to_none=True)
    parallel.set_seed(SEED + 1)
    loss, _ = forward_backward(model, make_micro_batches(), shiq_loss_fn)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return model, loss, grads, calls


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


@pytest.fixture(scope="module")
def no_recompute():
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=SEED):
        model, loss, grads, calls = _run(tiny_config(**DROPOUT))
        full = {n: p.detach().clone() for n, p in model.named_parameters()}
        yield full, loss, grads, calls


@pytest.mark.parametrize(
    "recompute,method,n,layer_calls,attn_calls",
    [
        # per micro-batch and layer: forward calls of the layer and of its core attention
        ("none", "uniform", 1, 1, 1),
        ("selective", "uniform", 1, 1, 2),  # core attention rerun in the backward
        ("full", "uniform", 1, 2, 2),  # every layer rerun
        ("full", "uniform", 2, 2, 2),  # both layers as one unit
        ("full", "block", 1, 1.5, 1.5),  # only the first layer of the stage rerun
    ],
)
def test_recompute_gives_the_same_loss_and_gradients(no_recompute, recompute, method, n, layer_calls, attn_calls):
    full, ref_loss, ref_grads, ref_calls = no_recompute
    with parallel.distributed(seed=SEED):
        cfg = tiny_config(recompute=recompute, recompute_method=method, recompute_num_layers=n, **DROPOUT)
        _, loss, grads, calls = _run(cfg, full)
    per = 2 * 2  # micro-batches x layers
    assert ref_calls == {"layer": per, "core_attn": per}
    assert calls == {"layer": layer_calls * per, "core_attn": attn_calls * per}
    assert _rel(torch.tensor(loss), torch.tensor(ref_loss)) < 1e-5
    assert sorted(grads) == sorted(ref_grads)
    for k in grads:
        assert _rel(grads[k], ref_grads[k]) < 1e-5, k


def test_dropout_is_on_in_the_recompute_test(no_recompute):
    """Without dropout the loss differs: the recomputation test replays real dropout masks."""
    full, ref_loss, _, _ = no_recompute
    with parallel.distributed(seed=SEED):
        _, loss, _, _ = _run(tiny_config(), full)
    assert abs(loss - ref_loss) > 1e-3


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"recompute": "partial"}, "model.recompute = 'partial'"),
        ({"recompute_method": "every"}, "model.recompute_method"),
        ({"recompute_num_layers": 3}, r"recompute_num_layers = 3 .* \[1, num_layers=2\]"),
        ({"recompute_num_layers": 0}, "recompute_num_layers"),
        ({"sequence_parallel": "yes"}, "model.sequence_parallel"),
    ],
)
def test_bad_memory_options_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        M.ModelConfig(**kw)


def test_sequence_parallel_needs_tensor_parallelism():
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=SEED):
        with pytest.raises(
            ValueError, match=r"model.sequence_parallel=true needs tensor parallelism \(parallel.tp > 1\)"
        ):
            M.build_model(tiny_config(sequence_parallel=True))


def test_selective_recompute_on_local_layers_gives_no_advice_for_transformer_engine():
    """megatron-core's advice about Transformer Engine's fused attention reached stderr twice (policy and
    reference) on runs of megatron's local layers, which have no fused attention."""
    with parallel.distributed(seed=SEED):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            M.transformer_config(tiny_config(recompute="selective"))
    assert not [w for w in seen if "transformer_engine" in str(w.message)], [str(w.message) for w in seen]


def test_context_parallel_is_refused_naming_what_is_missing():
    import importlib.util

    missing = "a CUDA GPU" + ("" if importlib.util.find_spec("transformer_engine") else " and Transformer Engine")
    with pytest.raises(
        RuntimeError,
        match=rf"^parallel.cp=2: context parallelism needs a CUDA GPU and Transformer Engine .*; "
        rf"missing here: {missing}\. Use parallel.cp=1$",
    ):
        parallel.init_distributed(parallel.ParallelConfig(context_parallel_size=2), world_size=2)
    import torch.distributed as dist

    assert not dist.is_initialized()  # refused before any process group exists
    with pytest.raises(ValueError, match="context_parallel_size must be an integer >= 1"):
        parallel.ParallelConfig(context_parallel_size=0)
    parallel.check_context_parallel(1)  # cp = 1: nothing to refuse


def test_sequence_parallel_refuses_a_width_tp_does_not_divide():
    """The check runs before megatron splits the sequence (stand-in config: TP=2 with sequence
    parallelism on a model built at TP=1; the refusal comes before any communication)."""
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=SEED):
        model = M.build_model(tiny_config())
        model.config.sequence_parallel, model.config.tensor_model_parallel_size = True, 2
        tokens = torch.zeros(2, 15, dtype=torch.long)
        with pytest.raises(ValueError, match=r"tokens \[B, T\] = \(2, 15\) need T divisible by 2 \(pad the batch\)"):
            M.forward_stats(model, tokens)
