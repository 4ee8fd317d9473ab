"""Loss selection by name: each name reaches the loss it names, metrics match hand computations."""

import pytest
import torch

from shiq_train import losses as L
from shiq_train.objectives import LOSS_NAMES, LossConfig, compute_loss


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 6
    m = torch.rand(B, T, generator=g) > 0.3
    m[:, 0] = False
    m[:, -1] = True
    stats = [torch.randn(B, T, generator=g, dtype=torch.float64) for _ in range(4)]
    r = torch.randn(B, T, generator=g, dtype=torch.float64) * m
    groups = torch.tensor([0, 0, 1, 1])
    return stats, r, m, groups


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_name_computes_the_loss_it_names(name):
    stats, r, m, groups = batch()
    loss, metrics = compute_loss(LossConfig(name=name, beta=0.3), *stats, r, m, group_ids=groups)
    R = (r * m).sum(1)
    if name.startswith("shiq"):
        variant = {"shiq": "shiq", "shiq_init": "init", "shiq_ms": "ms", "shiq_tk": "tk"}[name]
        want = L.shiq_loss(*stats, r, m, beta=0.3, variant=variant)
    elif name in ("dpo", "mt_dpo"):
        w, l = L.preference_pairs(R, groups)
        want = L.dpo_loss(*stats, m, w, l, beta=0.3)
    elif name in ("copg", "mt_copg"):
        want = L.copg_loss(*stats, r, m, groups, beta=0.3)
    else:
        want = L.dro_v_loss(*stats, r, m, L.loo_soft_value(R, groups, beta=0.3), beta=0.3)
    assert float(loss) == pytest.approx(float(want), rel=1e-12)
    c, z, cr, zr = stats
    kl = (((c - z) - (cr - zr)) * m).sum(1).mean()
    assert metrics["reward"] == pytest.approx(float(R.mean()))
    assert metrics["kl"] == pytest.approx(float(kl))


def test_packed_metrics_count_each_trajectory():
    stats, r, m, _ = batch(1)
    seg = torch.tensor([[0, 0, 0, 1, 1, 1]] * 4)
    _, metrics = compute_loss(LossConfig("shiq"), *stats, r, m, segment_ids=seg)
    halves = [(r[b, s : s + 3] * m[b, s : s + 3]).sum() for b in range(4) for s in (0, 3) if m[b, s : s + 3].any()]
    assert metrics["reward"] == pytest.approx(float(torch.stack(halves).mean()))
    assert metrics["abs_delta_max"] >= metrics["abs_delta_mean"] > 0


def test_config_errors():
    with pytest.raises(ValueError, match="loss name must be one of"):
        LossConfig(name="ppo")
    with pytest.raises(ValueError, match="gamma < 1"):
        LossConfig(name="dpo", gamma=0.9)
    stats, r, m, _ = batch()
    with pytest.raises(ValueError, match="needs group_ids"):
        compute_loss(LossConfig("copg"), *stats, r, m)
