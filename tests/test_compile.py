"""``model.compile``: every decoder layer's forward under ``torch.compile``, the same result.

The tiny GPT of ``tests/test_parallel_parity.py`` (its micro-batches, ShiQ loss and reference run):
compiled layers give the eager run's loss, gradient norm and every gradient to a relative 1e-5, in
one process and at TP=2 (gloo, 2 processes), with the parameter names unchanged (checkpoints and the
weight layout do not see the compilation) and dynamo really compiling frames. The CI tests trace with
the ``aot_eager`` backend (dynamo's graphs and the compiled autograd, no code generation); the run
marked slow uses inductor, the backend ``model.compile`` uses.
"""

import os
import warnings

import pytest
import torch
from ranks import spawn
from test_parallel_parity import SEED, _check_against_reference, _rel, run_layout, tiny_config

from shiq_train import model as M
from shiq_train import parallel

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU runs")


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=SEED):
        model, loss, norm, grads, _ = run_layout(tiny_config())
        full = {name: p.detach().clone() for name, p in model.named_parameters()}
    path = tmp_path_factory.mktemp("compile") / "full.pt"
    torch.save(full, path)
    return {"full": full, "path": str(path), "loss": loss, "grad_norm": norm, "grads": grads}


def _compiled_run(monkeypatch, eager, backend):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(M, "COMPILE_BACKEND", backend)
    torch._dynamo.reset()
    counters.clear()
    with parallel.distributed(seed=SEED):
        model, loss, norm, grads, _ = run_layout(tiny_config(compile=True), eager["full"])
    assert counters["frames"]["ok"] > 0  # dynamo compiled the layers' frames
    assert sorted(grads) == sorted(eager["grads"])  # same parameter names: no `_orig_mod` in the tree
    assert _rel(torch.tensor(loss), torch.tensor(eager["loss"])) < 1e-5
    assert _rel(torch.tensor(norm), torch.tensor(eager["grad_norm"])) < 1e-5
    for k, (_, _, _, g) in grads.items():
        assert _rel(g, eager["grads"][k][3]) < 1e-5, k


def test_compiled_layers_give_the_eager_loss_and_gradients(monkeypatch, eager):
    _compiled_run(monkeypatch, eager, "aot_eager")


@pytest.mark.slow
def test_inductor_compiled_layers_give_the_eager_loss_and_gradients(monkeypatch, eager):
    _compiled_run(monkeypatch, eager, "inductor")


def _tp_worker(rank, port, params_path, out_dir):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    M.COMPILE_BACKEND = "aot_eager"
    with parallel.distributed(
        parallel.ParallelConfig(2, 1), rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}", seed=SEED
    ):
        from megatron.core import parallel_state as ps

        full = torch.load(params_path, weights_only=True)
        _, loss, norm, grads, _ = run_layout(tiny_config(compile=True), full)
        out = {"loss": loss, "grad_norm": norm, "grads": grads, "tp_rank": ps.get_tensor_model_parallel_rank()}
        torch.save({**out, "step_s": 0.0}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_compiled_layers_match_the_reference_at_tp2(eager, tmp_path):
    spawn(_tp_worker, args=(parallel.free_port(), eager["path"], str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    reference = {**eager, "grads": {full_name: g for full_name, _, _, g in eager["grads"].values()}}
    _check_against_reference(results, reference, 2, "tp=2, compiled layers")


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"hidden_dropout": 0.1}, "other dropout masks"),
        ({"recompute": "full"}, "not with recompute=full"),
        ({"compile": "yes"}, "model.compile = 'yes'"),
    ],
)
def test_compile_refuses_what_it_cannot_reproduce(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**{"compile": True, **kw})


def test_compile_refuses_transformer_engine_layers():
    with pytest.raises(RuntimeError, match="model.compile=true compiles megatron's local layers"):
        M.check_runtime(tiny_config(compile=True, transformer_impl="transformer_engine"))
