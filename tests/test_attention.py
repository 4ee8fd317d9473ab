"""``model.attention_backend=sdpa`` (``shiq_train.attention.SDPACoreAttention``) against megatron's own
core attention (``DotProductAttention``, ``attention_backend=megatron``) as the independent reference.

On the tiny GPT of ``test_parallel_parity`` (2 layers, hidden 64, 4 heads, vocab 128, 16 tokens), from
the same parameters: the ShiQ loss and every parameter's gradient of one forward/backward over two
micro-batches agree to a relative 1e-5 for plain causal rows, packed rows (block-diagonal mask),
grouped-query attention (2 and 1 key/value groups) and selective recomputation, in one process and at
TP=2 (two gloo processes, one key/value group per rank; also with sequence parallelism). Sampling with
megatron's KV cache (a prompt forward, then one token at a time against the cache) gives the same
logits. The config refuses what the module cannot do.
"""

import os
import warnings

import pytest
import torch
from ranks import spawn
from test_parallel_parity import SEED, TOL, _gather, _rel, make_micro_batches, shiq_loss_fn, tiny_config

from shiq_train import model as M
from shiq_train import parallel
from shiq_train.attention import SDPACoreAttention
from shiq_train.train_step import finalize_grads, forward_backward

# per row of a micro-batch: segment ids of the packed trajectories (the last row ends in a padding segment)
SEGMENTS = [[0] * 6 + [1] * 10, [0] * 5 + [1] * 7 + [2] * 4]


def micro_batches(packed: bool) -> list[dict]:
    mbs = make_micro_batches()
    if packed:
        for mb in mbs:
            mb["segment_ids"] = torch.tensor(SEGMENTS)
    return mbs


def run(cfg, full=None, packed=False):
    """Model, loss, local gradients ``{name: (full name, partition dim, glu, grad)}`` and full-named
    parameters after one forward/backward over the two micro-batches."""
    model = M.build_model(cfg)
    if full is not None:
        M.load_full_parameters(model, full)
    model.zero_grad(set_to_none=True)
    loss, _ = forward_backward(model, micro_batches(packed), shiq_loss_fn)
    finalize_grads(model)
    grads, params = {}, {}
    for name, p in model.named_parameters():
        dim, glu = M.tp_layout(model, name, p)
        grads[name] = (M.full_param_name(model, name), dim, glu, p.grad.detach().clone())
        params[M.full_param_name(model, name)] = p.detach().clone()
    return model, float(loss), grads, params


def full_grads(grads) -> dict:
    return {full: g for full, _, _, g in grads.values()}


def core_attention(model):
    return model.decoder.layers[0].self_attention.core_attention


def assert_same(loss, grads, ref_loss, ref_grads, what):
    """``grads``, ``ref_grads``: full gradients by full parameter name."""
    assert _rel(torch.tensor(loss), torch.tensor(ref_loss)) < TOL, (what, loss, ref_loss)
    assert sorted(grads) == sorted(ref_grads)
    for k, ref in ref_grads.items():
        assert ref.abs().max() > 0, f"{what}: {k} has no gradient in the reference"
        assert _rel(grads[k], ref) < TOL, f"{what}: {k} relative difference {_rel(grads[k], ref):.2e}"


@pytest.fixture
def dist1():
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=SEED):
        yield


@pytest.mark.parametrize(
    "kw,packed",
    [
        ({}, False),
        ({"num_query_groups": 2}, False),
        ({}, True),
        ({"num_query_groups": 1}, True),
        ({"num_query_groups": 2, "recompute": "selective"}, True),
    ],
    ids=["causal", "gqa", "packed", "packed-mqa", "packed-gqa-selective-recompute"],
)
def test_sdpa_matches_megatron_attention(dist1, kw, packed):
    ref_model, ref_loss, ref_grads, params = run(tiny_config(attention_backend="megatron", **kw), packed=packed)
    assert type(core_attention(ref_model)).__name__ == "DotProductAttention"
    model, loss, grads, _ = run(tiny_config(attention_backend="sdpa", **kw), params, packed=packed)
    assert isinstance(core_attention(model), SDPACoreAttention)
    assert_same(loss, full_grads(grads), ref_loss, full_grads(ref_grads), f"{kw} packed={packed}")


# one key/value group per rank at TP=2
TP_CASES = {"causal": ({}, False), "packed": ({}, True), "sequence-parallel": ({"sequence_parallel": True}, False)}
TP_SHAPE = {"num_query_groups": 2}


def _tp_worker(rank, port, params_path, out_dir):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    layout = parallel.ParallelConfig(2, 1)
    with parallel.distributed(layout, rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}", seed=SEED):
        full = torch.load(params_path, weights_only=True)
        for case, (kw, packed) in TP_CASES.items():
            model, loss, grads, _ = run(tiny_config(attention_backend="sdpa", **TP_SHAPE, **kw), full, packed)
            assert isinstance(core_attention(model), SDPACoreAttention)
            out = {"loss": loss, "grads": grads, "tp_rank": rank}
            torch.save(out, os.path.join(out_dir, f"{case}-rank{rank}.pt"))


def test_sdpa_at_tp2_matches_megatron_attention_in_one_process(dist1, tmp_path):
    refs = {}
    params = None
    for packed in (False, True):
        _, loss, grads, params = run(tiny_config(attention_backend="megatron", **TP_SHAPE), params, packed)
        refs[packed] = (loss, full_grads(grads))
    torch.save(params, tmp_path / "full.pt")
    spawn(_tp_worker, args=(parallel.free_port(), str(tmp_path / "full.pt"), str(tmp_path)), nprocs=2)
    for case, (_, packed) in TP_CASES.items():
        results = [torch.load(tmp_path / f"{case}-rank{r}.pt", weights_only=True) for r in range(2)]
        ref_loss, ref_grads = refs[packed]
        grads = _gather(results, 2)  # reassembled over the two ranks' shards
        for res in results:
            assert_same(res["loss"], grads, ref_loss, ref_grads, f"tp=2 {case}")


def _logits_with_kv_cache(model, tokens, prompt_len):
    """Logits ``[B, T - prompt_len + 1, V]`` of sampling positions ``prompt_len - 1 ..`` the way
    ``MegatronPolicy`` runs the model: the prompt in one forward, then one token at a time against
    megatron's static KV cache (the mask rows ``[start, end)`` of the causal mask)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    B, T = tokens.shape
    mask = M.causal_mask(T)
    positions = torch.arange(T)
    context = StaticInferenceContext(B, T)
    out, start = [], 0
    with torch.no_grad():
        for end in range(prompt_len, T + 1):
            if start > 0:
                context.enable_decode_mode()
            logits = model(
                tokens[:, start:end],
                positions[start:end].expand(B, -1),
                mask[..., start:end, :end],
                inference_context=context,
                runtime_gather_output=True,
            )
            context.increment_sequence_len_offset(end - start)
            start = end
            out.append(logits[:, -1])
    return torch.stack(out, 1)


def test_sdpa_sampling_with_kv_cache_matches_megatron_attention(dist1):
    tokens = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(3))
    ref_model = M.build_model(tiny_config(attention_backend="megatron", num_query_groups=2)).eval()
    model = M.build_model(tiny_config(attention_backend="sdpa", num_query_groups=2)).eval()
    model.load_state_dict(ref_model.state_dict())
    want = _logits_with_kv_cache(ref_model, tokens, 5)
    got = _logits_with_kv_cache(model, tokens, 5)
    assert want.shape == (3, 8, 128)
    assert _rel(got, want) < TOL
    # and the cache changes nothing: the same as the full causal forward at each position
    with torch.no_grad():
        full = model(**M.model_inputs(tokens))[:, 4:]
    assert _rel(got, full) < TOL


def test_attention_backend_config():
    assert M.resolved_attention_backend(M.ModelConfig()) == "sdpa"
    assert M.resolved_attention_backend(M.ModelConfig(attention_dropout=0.1)) == "megatron"
    assert M.resolved_attention_backend(M.ModelConfig(attention_backend="megatron")) == "megatron"
    with pytest.raises(ValueError, match=r"model.attention_backend = 'sdpa' is not valid: sdpa has no attention"):
        M.ModelConfig(attention_backend="sdpa", attention_dropout=0.1)
    with pytest.raises(ValueError, match=r"model.attention_backend = 'flash' is not valid: one of"):
        M.ModelConfig(attention_backend="flash")
    with pytest.raises(RuntimeError, match=r"Transformer Engine layers bring their own: set model.attention_backend"):
        M.check_runtime(M.ModelConfig(attention_backend="sdpa", transformer_impl="transformer_engine"))
