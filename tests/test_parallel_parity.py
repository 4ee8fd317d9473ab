"""Tensor- and pipeline-parallel ShiQ training matches the single-process reference.

Tiny GPT (2 layers, hidden 64, 4 heads, vocab 128, seq 16, tied embeddings, gated SiLU MLP, RoPE),
2 micro-batches of 2 rows, ShiQ loss (SHIQ_MATH §3) on the model's vocab-parallel statistics with
random rewards on action positions and random reference statistics, run through megatron's
``get_forward_backward_func()``. The reference is TP=1/PP=1 in this process; TP=2, PP=2 and
TP=2×PP=2 run with gloo in 2 / 2 / 4 spawned processes (TP=2×PP=2 also with chunked statistics),
DP=2 in 2 processes (one micro-batch each), and TP=2 with sequence parallelism (model.sequence_parallel;
full and chunked statistics, one after the other in the same 2 processes), all from the reference's
parameters. The reference computes the statistics at every position; runs marked "actions" compute them
at the action positions only (a loss that reads only those: ``ShiQGPTModel._position_stats``), single-process,
at TP=2×PP=2 and at TP=2 with sequence parallelism, full and chunked, against the same reference. Interleaved pipeline stages (PP=2 × 2 virtual stages, megatron's interleaved 1F1B over
model chunks; alone, and times TP=2 with sequence parallelism in 4 processes) run a 4-layer variant against
its own single-process reference.
Asserted: the loss and every parameter's gradient (reassembled from tensor-parallel shards by the
parameter's partition dim) equal the reference to a relative difference below 1e-5. ShiQ ignores the
statistics of other positions, so the runs marked "actions" also record every token whose statistics are
computed (:func:`statistics_targets`) and assert that these are the action tokens, no others.
"""

import contextlib
import os
import time
import types
import warnings

import pytest
import torch
from ranks import spawn

from shiq_train import model as M
from shiq_train import parallel
from shiq_train import vocab_parallel as vp
from shiq_train import weights as W
from shiq_train.losses import shiq_loss
from shiq_train.train_step import finalize_grads, forward_backward, grad_norm

SEED = 1234
MICRO_BATCHES, ROWS, SEQ = 2, 2, 16
BETA = 0.1
TOL = 1e-5


def tiny_config(**kw) -> M.ModelConfig:
    shape = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, max_sequence_length=SEQ)
    return M.ModelConfig(**{**shape, **kw})


def make_micro_batches(vocab=128):
    """Deterministic micro-batches: a 4-token prompt, then actions; rewards on the last action."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(MICRO_BATCHES):
        tokens = torch.randint(0, vocab, (ROWS, SEQ), generator=g)
        action = torch.zeros(ROWS, SEQ, dtype=torch.bool)
        action[:, 4:] = True
        action[1, 12:] = False  # a shorter completion (padding after it)
        rewards = torch.randn(ROWS, SEQ, generator=g) * action
        out.append(
            {
                "tokens": tokens,
                "action_mask": action,
                "rewards": rewards,
                "ref_chosen_logits": torch.randn(ROWS, SEQ, generator=g) * 0.1,
                "ref_logz": torch.log(torch.tensor(float(vocab))) + torch.randn(ROWS, SEQ, generator=g) * 0.1,
            }
        )
    return out


def shiq_loss_fn(st, mb):
    loss = shiq_loss(
        st.chosen_logits, st.logz, mb["ref_chosen_logits"], mb["ref_logz"], mb["rewards"], mb["action_mask"], beta=BETA
    )
    return loss, {}


def shiq_actions_loss_fn(st, mb):
    """The same loss, declared to read only the actions' statistics (the trainer's objective losses are)."""
    return shiq_loss_fn(st, mb)


shiq_actions_loss_fn.reads_actions_only = True


def action_targets(micro_batches) -> torch.Tensor:
    """The tokens whose statistics a loss of the actions reads, micro-batch after micro-batch, row-major:
    token ``t`` of every action position ``t ≥ 1`` (predicted by the hidden state at ``t − 1``)."""
    return torch.cat([mb["tokens"][:, 1:][mb["action_mask"][:, 1:]] for mb in micro_batches])


@contextlib.contextmanager
def statistics_targets():
    """Records the targets of every computation of statistics, in call order: the two functions that meet
    the output layer's logits (``VocabParallelTokenStats``: megatron's output layer or
    ``hidden_token_stats``) or its weight (``ChunkedTokenStats``), through which every path goes."""
    seen = []
    real = {name: getattr(vp, name) for name in ("VocabParallelTokenStats", "ChunkedTokenStats")}

    def recording(fn):
        def apply(first, *args):
            targets = args[1] if fn is real["ChunkedTokenStats"] else args[0]
            assert first.shape[0] == targets.shape[0]  # one row of logits / hidden states per target
            seen.append(targets.detach().clone())
            return fn.apply(first, *args)

        return types.SimpleNamespace(apply=apply)

    for name, fn in real.items():
        setattr(vp, name, recording(fn))
    try:
        yield seen
    finally:
        for name, fn in real.items():
            setattr(vp, name, fn)


def _targets(seen) -> torch.Tensor:
    return torch.cat(seen) if seen else torch.zeros(0, dtype=torch.int64)


def run_layout(cfg, full_params=None, dp_rank=0, dp=1, actions=False):
    """Build (and load), forward/backward on this data-parallel rank's micro-batches, reduce grads;
    returns the model, loss, grad norm, local grads and the step time. ``actions``: statistics at the
    action positions only."""
    model = M.build_model(cfg)
    if full_params is not None:
        M.load_full_parameters(model, full_params)
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss_fn = shiq_actions_loss_fn if actions else shiq_loss_fn
    loss, _ = forward_backward(model, make_micro_batches()[dp_rank::dp], loss_fn)
    finalize_grads(model)
    step_s = time.perf_counter() - t0
    grads = {}
    for name, p in model.named_parameters():
        dim, glu = M.tp_layout(model, name, p)
        grads[name] = (M.full_param_name(model, name), dim, glu, p.grad.detach().clone())
    return model, loss, grad_norm(model), grads, step_s


def _worker(rank, world, port, tp, pp, params_path, out_dir, chunks, sp=False):
    """One rank of a ``world``-process layout; data parallelism is ``world / (tp * pp)``. Runs the
    layout once per entry ``(logits_chunk_tokens, actions)`` of ``chunks`` in the same process group
    (``actions``: statistics at the action positions only)."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    with parallel.distributed(
        parallel.ParallelConfig(tp, pp), rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}", seed=SEED
    ):
        from megatron.core import parallel_state as ps

        full = torch.load(params_path, weights_only=True)
        for chunk, actions in chunks:
            with statistics_targets() as seen:
                _, loss, norm, grads, step_s = run_layout(
                    tiny_config(logits_chunk_tokens=chunk, sequence_parallel=sp),
                    full,
                    ps.get_data_parallel_rank(),
                    ps.get_data_parallel_world_size(),
                    actions=actions,
                )
            torch.save(
                {
                    "loss": loss,
                    "grad_norm": norm,
                    "grads": grads,
                    "tp_rank": ps.get_tensor_model_parallel_rank(),
                    "step_s": step_s,
                    "last_stage": ps.is_pipeline_last_stage(),
                    "targets": _targets(seen),
                },
                os.path.join(out_dir, _file(rank, chunk, actions)),
            )


def _file(rank: int, chunk: int, actions: bool) -> str:
    return f"rank{rank}-chunk{chunk}{'-actions' if actions else ''}.pt"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=SEED):
        model, loss, norm, grads, _ = run_layout(tiny_config())
        full = {name: p.detach().clone() for name, p in model.named_parameters()}
    path = d / "full_params.pt"
    torch.save(full, path)
    return {
        "params_path": str(path),
        "loss": loss,
        "grad_norm": norm,
        "grads": {full_name: g for full_name, _, _, g in grads.values()},
    }


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def _gather(results, tp):
    """Full gradients by full name, reassembled over tensor-parallel ranks (first copy wins for
    names held by two pipeline stages: the tied embedding, whose copies must agree anyway)."""
    by_name = {}
    for res in results:
        for _local, (full_name, dim, glu, g) in res["grads"].items():
            by_name.setdefault(full_name, {}).setdefault((dim, glu), {}).setdefault(res["tp_rank"], []).append(g)
    out = {}
    for full_name, layouts in by_name.items():
        (dim, glu), ranks = next(iter(layouts.items()))
        assert sorted(ranks) == list(range(tp)), (full_name, sorted(ranks))
        copies = [c for r in ranks.values() for c in r] if dim is None else None
        for r in [copies] if dim is None else ranks.values():  # replicated norms; tied embedding on 2 stages
            for other in r[1:]:
                assert _rel(other, r[0]) < TOL, f"{full_name}: copies disagree"
        out[full_name] = W.unshard_tensors([ranks[r][0] for r in range(tp)], dim, glu)
    return out


def test_reference_model_is_sane(reference):
    assert torch.isfinite(torch.tensor(reference["loss"]))
    assert reference["loss"] > 0
    assert all(g.abs().max() > 0 for g in reference["grads"].values())


@pytest.mark.parametrize(
    "tp,pp,dp,runs",
    [
        (2, 1, 1, [(0, False)]),
        (1, 2, 1, [(0, False)]),
        (2, 2, 1, [(0, False), (0, True)]),
        (2, 2, 1, [(5, False), (5, True)]),
        (1, 1, 2, [(0, False)]),
    ],
    ids=["tp2", "pp2", "tp2xpp2", "tp2xpp2-chunked", "dp2"],
)
def test_parallel_layout_matches_reference(reference, tmp_path, tp, pp, dp, runs):
    world = tp * pp * dp
    spawn(
        _worker,
        args=(world, parallel.free_port(), tp, pp, reference["params_path"], str(tmp_path), runs),
        nprocs=world,
    )
    for chunk, actions in runs:
        results = [torch.load(tmp_path / _file(r, chunk, actions), weights_only=True) for r in range(world)]
        what = f"tp={tp} pp={pp} dp={dp} chunk={chunk} actions={actions}"
        _check_against_reference(results, reference, tp, what)
        if actions:
            _check_action_targets(results, what)


def test_sequence_parallel_matches_reference(reference, tmp_path):
    runs = [(0, False), (5, False), (0, True), (5, True)]
    args = (2, parallel.free_port(), 2, 1, reference["params_path"], str(tmp_path), runs, True)
    spawn(_worker, args=args, nprocs=2)
    for chunk, actions in runs:
        results = [torch.load(tmp_path / _file(r, chunk, actions), weights_only=True) for r in range(2)]
        what = f"tp=2 sequence-parallel chunk={chunk} actions={actions}"
        _check_against_reference(results, reference, 2, what)
        if actions:
            _check_action_targets(results, what)


@pytest.mark.parametrize("chunk", [0, 5], ids=["full", "chunked"])
def test_action_positions_only_match_reference(reference, chunk):
    """One process: the statistics at the action positions only give the all-positions reference's loss
    and gradients (the output layer never sees the prompt and padding positions)."""
    full = torch.load(reference["params_path"], weights_only=True)
    with parallel.distributed(seed=SEED), statistics_targets() as seen:
        model, loss, norm, grads, _ = run_layout(tiny_config(logits_chunk_tokens=chunk), full, actions=True)
    results = [{"loss": loss, "grad_norm": norm, "grads": grads, "tp_rank": 0, "step_s": 0.0}]
    what = f"one process chunk={chunk} actions=True"
    _check_against_reference(results, reference, 1, what)
    _check_action_targets([{**results[0], "last_stage": True, "targets": _targets(seen)}], what)


def _check_action_targets(results, what):
    """The output layer met the action tokens only (each once, on every rank of the last pipeline stage) and
    no rank of an earlier stage computed statistics. Layouts with data parallelism are not run this way."""
    want = action_targets(make_micro_batches())
    assert len(want) == 40 < MICRO_BATCHES * ROWS * (SEQ - 1)  # 12 + 8 actions after position 0 per micro-batch
    assert any(res["last_stage"] for res in results), what
    for res in results:
        got = res["targets"]
        assert torch.equal(got, want if res["last_stage"] else want[:0]), f"{what}: {len(got)} targets, not {len(want)}"


def _check_against_reference(results, reference, tp, what):
    for res in results:
        assert _rel(torch.tensor(res["loss"]), torch.tensor(reference["loss"])) < TOL
        assert _rel(torch.tensor(res["grad_norm"]), torch.tensor(reference["grad_norm"])) < TOL
    grads = _gather(results, tp)
    assert sorted(grads) == sorted(reference["grads"])
    worst = max(_rel(grads[k], reference["grads"][k]) for k in grads)
    print(
        f"{what}: loss {results[0]['loss']:.6f} vs {reference['loss']:.6f}, "
        f"max relative grad difference {worst:.2e}, step {results[0]['step_s'] * 1e3:.0f} ms"
    )
    for k in grads:
        assert _rel(grads[k], reference["grads"][k]) < TOL, (
            f"{k}: relative difference {_rel(grads[k], reference['grads'][k]):.2e}"
        )


def _vpp_worker(rank, port, params_path, out_dir, tp=1, sp=False):
    """PP=2 with 2 virtual stages per rank (times TP=``tp``, sequence parallel if ``sp``): 4 layers as chunks
    [0, 2] on pipeline rank 0 and [1, 3] on pipeline rank 1."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    layout = parallel.ParallelConfig(tp, 2, virtual_pipeline_model_parallel_size=2)
    init = f"tcp://127.0.0.1:{port}"
    with parallel.distributed(layout, rank=rank, world_size=2 * tp, init_method=init, seed=SEED):
        from megatron.core import parallel_state as ps

        chunks = M.build_model_chunks(tiny_config(num_layers=4, sequence_parallel=sp))
        assert len(chunks) == 2
        full = torch.load(params_path, weights_only=True)
        for chunk in chunks:
            M.load_full_parameters(chunk, full)
        loss, _ = forward_backward(chunks, make_micro_batches(), shiq_loss_fn)
        finalize_grads(chunks)
        grads = {}
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                dim, glu = M.tp_layout(chunk, name, p)
                grads[f"{chunk.vp_stage}/{name}"] = (M.full_param_name(chunk, name), dim, glu, p.grad.detach().clone())
        layers = [
            M.full_param_name(c, n).split(".")[2] for c in chunks for n, _ in c.named_parameters() if ".layers." in n
        ]
        out = {
            "loss": loss,
            "grad_norm": grad_norm(chunks),
            "grads": grads,
            "tp_rank": ps.get_tensor_model_parallel_rank(),
            "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "step_s": 0.0,
        }
        torch.save({**out, "layers": sorted(set(layers))}, os.path.join(out_dir, f"vpp-rank{rank}.pt"))


@pytest.fixture(scope="module")
def vpp_reference(tmp_path_factory):
    """The 4-layer single-process reference of the interleaved layouts, and its parameters' file."""
    d = tmp_path_factory.mktemp("vpp")
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=SEED):
        model, loss, norm, grads, _ = run_layout(tiny_config(num_layers=4))
        torch.save({name: p.detach().clone() for name, p in model.named_parameters()}, d / "full.pt")
    return {
        "path": str(d / "full.pt"),
        "loss": loss,
        "grad_norm": norm,
        "grads": {full_name: g for full_name, _, _, g in grads.values()},
    }


@pytest.mark.parametrize("tp,sp", [(1, False), (2, True)], ids=["pp2xvpp2", "tp2xpp2xvpp2-sequence-parallel"])
def test_interleaved_pipeline_matches_reference(vpp_reference, tmp_path, tp, sp):
    args = (parallel.free_port(), vpp_reference["path"], str(tmp_path), tp, sp)
    spawn(_vpp_worker, args=args, nprocs=2 * tp)
    results = [torch.load(tmp_path / f"vpp-rank{r}.pt", weights_only=True) for r in range(2 * tp)]
    for r in results:  # the interleaved assignment, on every tensor-parallel rank of a pipeline rank
        assert r["layers"] == [["0", "2"], ["1", "3"]][r["pp_rank"]]
    assert sorted((r["pp_rank"], r["tp_rank"]) for r in results) == [(p, t) for p in range(2) for t in range(tp)]
    _check_against_reference(results, vpp_reference, tp, f"tp={tp} pp=2 x vpp=2 sequence-parallel={sp}")


def _bias_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    init = f"tcp://127.0.0.1:{port}"
    with parallel.distributed(parallel.ParallelConfig(2, 1), rank=rank, world_size=2, init_method=init, seed=SEED):
        from megatron.core import parallel_state as ps

        full = torch.load(os.path.join(out_dir, "full_params.pt"), weights_only=True)
        _, loss, norm, grads, step_s = run_layout(tiny_config(add_bias_linear=True, sequence_parallel=True), full)
        result = {"loss": loss, "grad_norm": norm, "grads": grads, "tp_rank": ps.get_tensor_model_parallel_rank()}
        torch.save({**result, "step_s": step_s}, os.path.join(out_dir, f"bias-rank{rank}.pt"))


def test_sequence_parallel_biases_get_the_gradient_of_every_position(tmp_path):
    """Under sequence parallelism megatron-core marks the row-parallel layers' biases ``sequence_parallel``: each
    tensor-parallel rank adds only its own positions' gradient, and ``finalize_grads`` must sum them over the
    tensor-parallel group (as megatron's ``finalize_model_grads`` does for such parameters, Transformer Engine's
    norms included). Against one process: every gradient, and the two ranks' copies of each bias, agree."""
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=SEED):
        model, loss, norm, grads, _ = run_layout(tiny_config(add_bias_linear=True))
        torch.save({name: p.detach().clone() for name, p in model.named_parameters()}, tmp_path / "full_params.pt")
    reference = {"loss": loss, "grad_norm": norm, "grads": {full: g for full, _, _, g in grads.values()}}
    assert any(k.endswith("linear_fc2.bias") for k in reference["grads"])
    spawn(_bias_worker, args=(parallel.free_port(), str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"bias-rank{r}.pt", weights_only=True) for r in range(2)]
    _check_against_reference(results, reference, 2, "tp=2 sequence-parallel with biases")


QK_NORM = dict(qk_layernorm=True, kv_channels=24, num_query_groups=2)  # (heads 24 wide, not hidden_size / 4)


def _qk_norm_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    init = f"tcp://127.0.0.1:{port}"
    with parallel.distributed(parallel.ParallelConfig(2, 1), rank=rank, world_size=2, init_method=init, seed=SEED):
        from megatron.core import parallel_state as ps

        full = torch.load(os.path.join(out_dir, "full_params.pt"), weights_only=True)
        for sp in (False, True):
            _, loss, norm, grads, step_s = run_layout(tiny_config(**QK_NORM, sequence_parallel=sp), full)
            result = {"loss": loss, "grad_norm": norm, "grads": grads, "tp_rank": ps.get_tensor_model_parallel_rank()}
            torch.save({**result, "step_s": step_s}, os.path.join(out_dir, f"qk-sp{int(sp)}-rank{rank}.pt"))


def test_query_and_key_norms_get_the_gradient_of_every_head(tmp_path):
    """With ``model.qk_layernorm`` (Qwen3) each tensor-parallel rank normalises only its own heads, so the query and
    key norms' weight gradient on a rank sums over those heads only; ``finalize_grads`` must sum it over the
    tensor-parallel group (as megatron's ``finalize_model_grads`` does for parameters named q_layernorm or
    k_layernorm). At TP=2, with and without sequence parallelism, from random norm weights and heads of another
    width than hidden_size / heads: the loss and every gradient (the norms' included, on both ranks) are those
    of one process."""
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=SEED):
        model = M.build_model(tiny_config(**QK_NORM))
        with torch.no_grad():
            g = torch.Generator().manual_seed(3)
            for name, p in model.named_parameters():
                if "layernorm" in name:
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        full = {name: p.detach().clone() for name, p in model.named_parameters()}
        model, loss, norm, grads, _ = run_layout(tiny_config(**QK_NORM), full)
        torch.save(full, tmp_path / "full_params.pt")
    reference = {"loss": loss, "grad_norm": norm, "grads": {full: g for full, _, _, g in grads.values()}}
    heads = [k for k in reference["grads"] if "q_layernorm" in k or "k_layernorm" in k]
    assert len(heads) == 4 and all(reference["grads"][k].shape == (24,) for k in heads)
    spawn(_qk_norm_worker, args=(parallel.free_port(), str(tmp_path)), nprocs=2)
    for sp in (0, 1):
        results = [torch.load(tmp_path / f"qk-sp{sp}-rank{r}.pt", weights_only=True) for r in range(2)]
        _check_against_reference(results, reference, 2, f"tp=2 sequence_parallel={bool(sp)} with q/k norms")
        for res in results:  # (each rank's copy: _gather checks they agree, and here the norms' against one process)
            got = {full: g for full, _, _, g in res["grads"].values()}
            assert max(_rel(got[k], reference["grads"][k]) for k in heads) < TOL
