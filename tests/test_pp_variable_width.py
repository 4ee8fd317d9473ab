"""Pipeline parallelism with micro-batches of different widths and row counts in one step.

Padded rows of varying length give each micro-batch its own width, and whole prompt groups give each
its own number of rows. PP=2 and TP=2×PP=2 (gloo, spawned processes) must give the single-process
loss and gradient norm of one step (relative difference below 1e-5), and then the same loss after an
optimizer step. Before megatron was told to send activation shapes between stages, the second
micro-batch's activation arrived in a buffer of the first one's shape (a gloo size mismatch, then an
abort).
"""

import os
import warnings

import pytest
import torch
from ranks import spawn

from shiq_train import model as M
from shiq_train import parallel
from shiq_train.losses import shiq_loss
from shiq_train.train_step import finalize_grads, forward_backward, grad_norm

SEED = 99
BETA = 0.1
TOL = 1e-5
SHAPES = [(2, 9), (3, 16), (1, 5)]  # (rows, width) of the step's three micro-batches


def tiny_config() -> M.ModelConfig:
    return M.ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, max_sequence_length=16)


def micro_batches(vocab=128):
    g = torch.Generator().manual_seed(3)
    out = []
    for rows, width in SHAPES:
        tokens = torch.randint(0, vocab, (rows, width), generator=g)
        action = torch.zeros(rows, width, dtype=torch.bool)
        action[:, 2:] = True
        action[0, width - 1 :] = False  # a shorter first row
        out.append(
            {
                "tokens": tokens,
                "action_mask": action,
                "rewards": torch.randn(rows, width, generator=g) * action,
                "ref_chosen_logits": torch.randn(rows, width, generator=g) * 0.1,
                "ref_logz": torch.log(torch.tensor(float(vocab))) + torch.randn(rows, width, generator=g) * 0.1,
            }
        )
    return out


def loss_fn(st, mb):
    ref = (mb["ref_chosen_logits"], mb["ref_logz"])
    return shiq_loss(st.chosen_logits, st.logz, *ref, mb["rewards"], mb["action_mask"], beta=BETA), {}


def two_steps(model):
    """Loss and grad norm of a step, then the loss after one SGD update (same batches)."""
    model.zero_grad(set_to_none=True)
    loss, _ = forward_backward(model, micro_batches(), loss_fn)
    finalize_grads(model)
    norm = grad_norm(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    model.zero_grad(set_to_none=True)
    loss2, _ = forward_backward(model, micro_batches(), loss_fn)
    return [float(loss), float(norm), float(loss2)]


def _worker(rank, world, port, tp, pp, params_path, out_dir):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    with parallel.distributed(
        parallel.ParallelConfig(tp, pp), rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}", seed=SEED
    ):
        model = M.build_model(tiny_config())
        M.load_full_parameters(model, torch.load(params_path, weights_only=True))
        torch.save(two_steps(model), os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("pp_var")
    with parallel.distributed(seed=SEED):
        model = M.build_model(tiny_config())
        full = {M.full_param_name(model, n): p.detach().clone() for n, p in model.named_parameters()}
        torch.save(full, out / "params.pt")
        result = two_steps(model)
    return out, result


@pytest.mark.parametrize("tp, pp", [(1, 2), (2, 2)], ids=["pp2", "tp2xpp2"])
def test_pipeline_stages_agree_on_micro_batches_of_different_shapes(reference, tp, pp, tmp_path):
    out, expected = reference
    world = tp * pp
    spawn(_worker, args=(world, parallel.free_port(), tp, pp, str(out / "params.pt"), str(tmp_path)), nprocs=world)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, g, e in zip(["loss", "grad norm", "loss after a step"], got, expected):
            assert abs(g - e) <= TOL * max(1.0, abs(e)), (rank, name, g, e)
