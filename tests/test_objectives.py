"""Loss selection by name: each name reaches the loss it names, metrics match hand computations."""

import re

import pytest
import torch

from shiq_train import losses as L
from shiq_train.objectives import LOSSES, LossConfig, compute_loss


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


@pytest.mark.parametrize("name", [n for n, s in LOSSES.items() if s.trains == "policy"])
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
    elif name == "dro_v":
        want = L.dro_v_loss(*stats, r, m, beta=0.3)
    elif name == "sft":  # mean NLL of the action tokens, written out
        c, z = stats[0], stats[1]
        want = -((c - z) * m).sum() / m.sum()
    else:
        want = L.dro_v_loss(*stats, r, m, L.loo_soft_value(R, groups, beta=0.3), beta=0.3)
    assert float(loss) == pytest.approx(float(want), rel=1e-12)
    c, z, cr, zr = stats
    log_ratio = (((c - z) - (cr - zr)) * m).sum(1).mean()
    assert metrics["reward"] == pytest.approx(float(R.mean()))
    assert metrics["log_ratio"] == pytest.approx(float(log_ratio))
    assert "kl" not in metrics


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


@pytest.mark.parametrize("name", [n for n, s in LOSSES.items() if s.needs_groups])
def test_group_losses_refuse_batches_without_whole_groups(name):
    """A group loss never trains on padded batches without group ids, nor on packed rows."""
    stats, r, m, groups = batch()
    with pytest.raises(ValueError, match=f"loss '{name}' needs group_ids .*data.mode=groups"):
        compute_loss(LossConfig(name), *stats, r, m)
    seg = torch.zeros(m.shape, dtype=torch.long)
    with pytest.raises(ValueError, match=f"loss '{name}' needs one trajectory per row, but the micro-batch is packed"):
        compute_loss(LossConfig(name), *stats, r, m, group_ids=groups, segment_ids=seg)
    # a row without an action would enter the pairs and groups as a completion of return 0 and log-ratio 0
    m2, r2 = m.clone(), r.clone()
    m2[1], r2[1] = False, 0.0
    compute_loss(LossConfig(name), *stats, r, m, group_ids=groups)  # whole rows pass
    with pytest.raises(ValueError, match="action_mask: row 1 has no action position"):
        compute_loss(LossConfig(name), *stats, r2, m2, group_ids=groups)


def test_registry_entries_are_consistent():
    from shiq_train.objectives import LOSS_NAMES, LossSpec

    assert LOSS_NAMES == tuple(LOSSES)
    assert all(name == spec.name and spec.description for name, spec in LOSSES.items())
    assert {s.variant for s in LOSSES.values() if s.variant} == {"shiq", "init", "ms", "tk"}
    with pytest.raises(ValueError, match="exactly one of variant"):
        LossSpec("broken", "neither a ShiQ variant nor a group loss")
    assert {n for n, s in LOSSES.items() if s.trains == "value"} == {"qsharp_value"}
    with pytest.raises(ValueError, match="trains must be one of"):
        LossSpec("broken", "trains nothing known", variant="shiq", trains="critic")
    with pytest.raises(ValueError, match="trains a value model"):
        LossSpec("broken", "a value loss with a ShiQ variant", variant="shiq", trains="value", needs_reference=False)


def test_the_policy_trainer_refuses_the_value_loss():
    """qsharp_value trains Q♯'s value model (SHIQ_MATH §8): no LossConfig, so no policy Trainer, takes it."""
    with pytest.raises(ValueError, match="loss 'qsharp_value' trains a value model, not the policy"):
        LossConfig("qsharp_value")


@pytest.mark.parametrize("name", [n for n, s in LOSSES.items() if s.variant])
@pytest.mark.parametrize("packed", [False, True])
def test_shiq_family_loss_and_gradient_equal_shiq_loss(name, packed):
    """compute_loss derives loss and metrics from one set of residuals; the loss is shiq_loss's."""
    variant = {"shiq": "shiq", "shiq_init": "init", "shiq_ms": "ms", "shiq_tk": "tk"}[name]
    stats, r, m, _ = batch(2)
    seg = torch.tensor([[0, 0, 0, 1, 1, 1]] * 4) if packed else None
    a = [s.clone().requires_grad_(True) for s in stats[:2]]
    b = [s.clone().requires_grad_(True) for s in stats[:2]]
    loss, metrics = compute_loss(LossConfig(name, beta=0.4, gamma=0.9), *a, *stats[2:], r, m, segment_ids=seg)
    want = L.shiq_loss(*b, *stats[2:], r, m, beta=0.4, gamma=0.9, variant=variant, segment_ids=seg)
    loss.backward()
    want.backward()
    assert float(loss.detach()) == float(want.detach())
    for x, y in zip(a, b):
        assert torch.equal(x.grad, y.grad)
    # metrics: |δ| over the positions in the loss, by a direct float64 computation for the full loss
    if name == "shiq" and not packed:
        c, z, cr, zr = stats
        rho = ((c - z) - (cr - zr)) * m
        x = (r - 0.4 * rho) * m
        deltas = []
        for i in range(4):
            for t in range(6):
                if m[i, t]:
                    G = sum(0.9 ** int(m[i, t:k].sum()) * x[i, k] for k in range(t, 6) if m[i, k])
                    deltas.append(abs(float(G - 0.4 * (z[i, t] - zr[i, t]))))
        assert metrics["abs_delta_mean"] == pytest.approx(sum(deltas) / len(deltas), rel=1e-9)
        assert metrics["abs_delta_max"] == pytest.approx(max(deltas), rel=1e-9)


def test_dro_v_reads_single_rows_padded_or_packed():
    """dro_v (SHIQ_MATH §5) needs no groups: ½ (R − β Λ)² per trajectory by a direct float64 computation,
    the same with two trajectories packed per row, and the per-trajectory metrics."""
    assert not LOSSES["dro_v"].needs_groups and LOSSES["dro_v"].packed_ok
    assert LOSSES["dro_v_loo"].needs_groups and not LOSSES["dro_v_loo"].packed_ok
    stats, r, m, _ = batch(3)
    c, z, cr, zr = stats
    terms, returns, log_ratios = [], [], []
    for i in range(4):
        for lo, hi in ((0, 3), (3, 6)):
            acts = [t for t in range(lo, hi) if m[i, t]]
            if acts:
                R = sum(float(r[i, t]) for t in acts)
                lam = sum(float((c[i, t] - z[i, t]) - (cr[i, t] - zr[i, t])) for t in acts)
                terms.append(0.5 * (R - 0.25 * lam) ** 2)
                returns.append(R)
                log_ratios.append(lam)
    seg = torch.tensor([[0, 0, 0, 1, 1, 1]] * 4)
    loss, metrics = compute_loss(LossConfig("dro_v", beta=0.25), *stats, r, m, segment_ids=seg)
    assert float(loss) == pytest.approx(sum(terms) / len(terms), rel=1e-12)
    assert metrics["reward"] == pytest.approx(sum(returns) / len(returns), rel=1e-12)
    assert metrics["log_ratio"] == pytest.approx(sum(log_ratios) / len(log_ratios), rel=1e-12)
    # unpacked: one trajectory per row, no group ids
    loss, _ = compute_loss(LossConfig("dro_v", beta=0.25), *stats, r, m)
    rows = [
        0.5 * (float((r[i] * m[i]).sum()) - 0.25 * float((((c - z) - (cr - zr))[i] * m[i]).sum())) ** 2
        for i in range(4)
    ]
    assert float(loss) == pytest.approx(sum(rows) / 4, rel=1e-12)

    # a packed micro-batch of no tokens holds no trajectory, as an unpacked one (it ended in max() of nothing)
    empty = [x[:, :0] for x in (*stats, r)]
    for packed in (None, seg[:, :0]):
        loss, _ = compute_loss(LossConfig("dro_v", beta=0.25), *empty, m[:, :0], segment_ids=packed)
        assert float(loss) == 0.0


@pytest.mark.parametrize(
    "beta,gamma,ok",
    [
        (0.1, 1.5, False),
        (0.1, -0.2, False),
        (0.1, float("nan"), False),
        (0.1, "0.9", False),
        (float("inf"), 1.0, False),
        (float("nan"), 1.0, False),
        (0.0, 1.0, False),
        (-0.5, 1.0, False),
        (True, 1.0, False),
        (0.1, True, False),
        (0.1, 0.0, True),
        (0.1, 1.0, True),
        (0.1, 0.5, True),
        (2, 1, True),
    ],
)
def test_config_accepts_exactly_what_the_loss_accepts(beta, gamma, ok):
    """β and γ out of range are refused when the config is made, in one line naming the field and value, not at
    the first step: the config accepts exactly the values the loss functions accept (``shiq_loss``'s own check),
    and both accept the values SHIQ_MATH allows (``ok``: β finite > 0, γ in [0, 1], numbers, not bools)."""
    stats, r, m, _ = batch()
    try:
        L.shiq_loss(*stats, r, m, beta=beta, gamma=gamma)
    except ValueError:
        loss_ok = False
    else:
        loss_ok = True
    assert loss_ok == ok
    if loss_ok:
        LossConfig("shiq", beta=beta, gamma=gamma)
        return
    field, value = ("beta", beta) if not (isinstance(beta, float) and 0 < beta < float("inf")) else ("gamma", gamma)
    with pytest.raises(ValueError, match=rf"^loss\.{field} must be .*, got {re.escape(repr(value))}$"):
        LossConfig("shiq", beta=beta, gamma=gamma)
    with pytest.raises(ValueError, match=rf"^loss\.{field} must be"):
        LossConfig("dpo", beta=beta, gamma=gamma)  # the range before the family's own restriction on γ


@pytest.mark.parametrize("name", [n for n, s in LOSSES.items() if s.needs_groups])
@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r, g: (r.__setitem__((1, 5), float("nan")), g)[1], r"rewards has a non-finite value at .* \[1, 5\]"),
        (lambda r, g: (r.__setitem__((2, 0), 1.0), g)[1], r"rewards has a nonzero value on a non-action position"),
        (lambda r, g: g.double(), "group_ids must be an integer tensor"),
        (lambda r, g: g[:3], r"group_ids must be \[4\]"),
    ],
)
def test_group_losses_check_rewards_and_groups_before_pairing(name, mutate, message):
    """DPO orders pairs by return without reading rewards otherwise: a NaN reward used to drop its pairs
    silently, where CoPG and DRO-V raised. Every group loss now raises the same ValueError."""
    stats, r, m, groups = batch()
    groups = mutate(r, groups)
    with pytest.raises(ValueError, match=message):
        compute_loss(LossConfig(name), *stats, r, m, group_ids=groups)


def test_dro_v_loo_on_one_row_takes_a_value_of_zero_not_its_own_return():
    """A micro-batch of one completion has no other completion to estimate V from: V = 0 (dro_v's value),
    so the loss is ½(R − βΛ)² and depends on the reward, where V = R made it ½(βΛ)² whatever R."""
    stats, r, m, _ = batch(3)
    one = [s[:1] for s in stats]
    c, z, cr, zr = one
    lam = float((((c - z) - (cr - zr)) * m[:1]).sum())
    losses = []
    for reward in (-5.0, 0.0, 5.0):
        rr = torch.zeros_like(r[:1])
        rr[0, -1] = reward
        loss, _ = compute_loss(LossConfig("dro_v_loo", beta=0.5), *one, rr, m[:1], group_ids=torch.tensor([0]))
        assert float(loss) == pytest.approx(0.5 * (reward - 0.5 * lam) ** 2, rel=1e-12)
        losses.append(float(loss))
    assert len(set(losses)) == 3
    with pytest.raises(ValueError, match="beta must be"):
        L.loo_soft_value(torch.tensor([1.0, 2.0]), torch.tensor([0, 0]), beta=0.0)
    with pytest.raises(ValueError, match=r"group_ids must be \[2\]"):
        L.loo_soft_value(torch.tensor([1.0, 2.0]), torch.tensor([0, 0, 1]), beta=1.0)


def test_a_loss_that_reads_no_reference_or_rewards_takes_none():
    """compute_loss for sft, called directly (a TRL-style loop) without reference statistics, ended in an
    AttributeError on None although the registry says sft reads none; now it gives the mean NLL of the action
    tokens (computed here by hand), Λ = 0 in its metrics. A loss that reads them refuses None naming them."""
    import torch

    from shiq_train.objectives import LOSSES, LossConfig, compute_loss

    torch.manual_seed(0)
    c, z = torch.randn(2, 4), torch.randn(2, 4) + 3
    m = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    want = float(-(c - z)[m].mean())
    for rewards in (torch.zeros(2, 4), None):
        loss, metrics = compute_loss(LossConfig("sft"), c, z, None, None, rewards, m)
        assert float(loss) == pytest.approx(want, rel=1e-6) and metrics["log_ratio"] == 0.0
    assert not LOSSES["sft"].needs_reference and not LOSSES["sft"].needs_rewards
    with pytest.raises(ValueError, match="loss 'shiq' reads the reference statistics"):
        compute_loss(LossConfig("shiq"), c, z, None, None, torch.zeros(2, 4), m)
    with pytest.raises(ValueError, match=r"loss 'dro_v' reads the rewards: give rewards \[B, T\]"):
        compute_loss(LossConfig("dro_v"), c, z, c, z, None, m)
