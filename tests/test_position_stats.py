"""Every loss the trainer builds reads the statistics of the action positions only.

The trainer's step relies on it (``objective_loss_fn(...).reads_actions_only``): it runs the output layer on
the hidden states that predict actions and leaves the other positions' statistics at zero
(``ShiQGPTModel._position_stats``; that those statistics equal the all-positions ones is checked in
``tests/test_parallel_parity.py``, in one process and at TP=2×PP=2 and TP=2 with sequence parallelism).
Here: for every policy loss of :data:`shiq_train.objectives.LOSSES`, on padded multi-turn rows (prompt, then
turns of actions separated by tool tokens, then padding), replacing the four statistics at every
non-action position with large random values changes neither the loss, its gradient nor its metrics.
"""

import pytest
import torch

from shiq_train.objectives import LOSSES, LossConfig
from shiq_train.stats import TokenStats
from shiq_train.train_step import objective_loss_fn

POLICY_LOSSES = [name for name, spec in LOSSES.items() if spec.trains == "policy"]
B, T = 6, 20


def batch(seed: int) -> dict:
    """Two prompt groups of three rows: a 3-5 token prompt, two turns of actions with tool tokens between
    them, padding after a row-dependent end; turn rewards on each turn's last action."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.bool)
    rewards = torch.zeros(B, T)
    for b in range(B):
        p = 3 + b % 3
        first_end = p + 3 + b % 2
        end = T - (b % 4)
        mask[b, p:first_end] = True
        mask[b, first_end + 2 : end] = True  # two tool tokens between the turns
        rewards[b, first_end - 1] = float(torch.randn((), generator=g))
        rewards[b, end - 1] = float(torch.randn((), generator=g))
    return {
        "action_mask": mask,
        "rewards": rewards,
        "group_ids": torch.tensor([0, 0, 0, 1, 1, 1]),
        "ref_chosen_logits": torch.randn(B, T, generator=g),
        "ref_logz": 5 + torch.randn(B, T, generator=g),
    }


def run(name: str, c: torch.Tensor, z: torch.Tensor, mb: dict):
    c, z = c.clone().requires_grad_(), z.clone().requires_grad_()
    loss, metrics = objective_loss_fn(LossConfig(name, beta=0.3))(TokenStats(c, z), mb)
    loss.backward()
    return loss.detach(), c.grad, z.grad, metrics


@pytest.mark.parametrize("name", POLICY_LOSSES)
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_reads_only_action_statistics(name, seed):
    assert objective_loss_fn(LossConfig(name)).reads_actions_only
    mb = batch(seed)
    g = torch.Generator().manual_seed(100 + seed)
    c, z = torch.randn(B, T, generator=g), 5 + torch.randn(B, T, generator=g)
    off = ~mb["action_mask"]
    garbage = lambda x: torch.where(off, 1e3 * torch.randn(B, T, generator=g), x)
    noisy = {**mb, "ref_chosen_logits": garbage(mb["ref_chosen_logits"]), "ref_logz": garbage(mb["ref_logz"])}
    loss, gc, gz, metrics = run(name, c, z, mb)
    loss2, gc2, gz2, metrics2 = run(name, garbage(c), garbage(z), noisy)
    assert loss != 0  # the batch exercises the loss
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gc2, gc, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gz2, gz, rtol=1e-6, atol=1e-7)
    assert metrics2.keys() == metrics.keys()
    for k in metrics:
        assert metrics2[k] == pytest.approx(metrics[k], rel=1e-6, abs=1e-6), k
    # the gradient never reaches a non-action position
    assert not gc[off].any() and not gz[off].any()
