"""The loss family against naive reference implementations, packing, input checks and baselines.

The naive references below are written from SHIQ_MATH §3-§5 with plain Python loops over each
trajectory's list of actions, sharing no code with ``shiq_train.losses``.
"""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shiq_train.losses import (
    copg_loss,
    dpo_loss,
    dro_v_loss,
    loo_soft_value,
    preference_pairs,
    sft_loss,
    shiq_loss,
    turn_start_mask,
)
from shiq_train.stats import causal_lm_stats, token_stats

# ---------------------------------------------------------------------------------------------
# naive references


def naive_deltas(traj, beta, gamma, variant):
    """``traj`` is a list of per-action tuples (c, z, c_ref, z_ref, r, starts_a_turn); returns the
    residuals used."""
    n = len(traj)
    rho = [(c - z) - (cr - zr) for c, z, cr, zr, *_ in traj]
    G = [0.0] * n
    acc = 0.0
    for k in reversed(range(n)):
        acc = (traj[k][4] - beta * rho[k]) + gamma * acc
        G[k] = acc
    if variant == "shiq":
        return [G[t] - beta * (traj[t][1] - traj[t][3]) for t in range(n)]
    if variant == "init":
        return [G[t] - beta * traj[t][1] for t in range(n)]
    if variant == "tk":  # the first action of every turn (SHIQ_MATH §4)
        return [G[t] - beta * (traj[t][1] - traj[t][3]) for t in range(n) if traj[t][5]]
    out = []
    for t in range(n):
        nxt = beta * (traj[t + 1][1] - traj[t + 1][3]) if t + 1 < n else 0.0
        out.append(traj[t][4] + gamma * nxt - beta * (traj[t][0] - traj[t][2]))
    return out


def naive_loss(trajs, beta, gamma, variant):
    deltas = [naive_deltas(t, beta, gamma, variant) for t in trajs]
    flat = [d for ds in deltas for d in ds]
    return sum(d * d for d in flat) / max(len(flat), 1)


@st.composite
def trajectories(draw):
    """A list of trajectories, each a list of (is_action, c, z, c_ref, z_ref, r) per token."""
    n = draw(st.integers(1, 5))
    out = []
    f = st.floats(-3, 3, allow_nan=False, width=32)
    for _ in range(n):
        length = draw(st.integers(1, 7))
        toks = []
        for _ in range(length):
            act = draw(st.booleans())
            toks.append((act, draw(f), draw(f), draw(f), draw(f), draw(f) if act else 0.0))
        out.append(toks)
    return out


def padded(trajs, dtype=torch.float64):
    B, T = len(trajs), max(len(t) for t in trajs)
    cols = [torch.zeros(B, T, dtype=dtype) for _ in range(5)]
    m = torch.zeros(B, T, dtype=torch.bool)
    for b, traj in enumerate(trajs):
        for t, (act, *vals) in enumerate(traj):
            m[b, t] = act
            for i, v in enumerate(vals):
                cols[i][b, t] = v
    return (*cols, m)


def packed(trajs, row_len, dtype=torch.float64):
    """Greedy packing into rows of ``row_len``; padding gets the next segment id.

    Returns the packed statistics, the segment ids, and each trajectory's (row, start).
    """
    rows, cur, places = [], [], []
    for traj in trajs:
        used = sum(len(t) for t in cur)
        if used + len(traj) > row_len:
            rows.append(cur)
            cur, used = [], 0
        places.append((len(rows), used))
        cur.append(traj)
    rows.append(cur)
    B = len(rows)
    cols = [torch.zeros(B, row_len, dtype=dtype) for _ in range(5)]
    m = torch.zeros(B, row_len, dtype=torch.bool)
    seg = torch.zeros(B, row_len, dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for s, traj in enumerate(row):
            for act, *vals in traj:
                m[b, t] = act
                seg[b, t] = s
                for i, v in enumerate(vals):
                    cols[i][b, t] = v
                t += 1
        seg[b, t:] = len(row)
    return (*cols, m), seg, places


def actions_only(trajs):
    """Per trajectory, its actions as (c, z, c_ref, z_ref, r, starts_a_turn): an action starts a turn
    when the token before it in the trajectory is not an action."""
    return [[(*tok[1:], i == 0 or not traj[i - 1][0]) for i, tok in enumerate(traj) if tok[0]] for traj in trajs]


# ---------------------------------------------------------------------------------------------
# ShiQ family


@settings(max_examples=60, deadline=None)
@given(
    trajs=trajectories(),
    variant=st.sampled_from(["shiq", "init", "ms", "tk"]),
    beta=st.floats(0.05, 3.0),
    gamma=st.sampled_from([1.0, 0.9, 0.5, 0.0]),
)
def test_shiq_loss_matches_naive_reference(trajs, variant, beta, gamma):
    got = shiq_loss(*padded(trajs), beta=beta, gamma=gamma, variant=variant)
    acts = [a for a in actions_only(trajs) if a] if variant == "tk" else actions_only(trajs)
    want = naive_loss(acts, beta, gamma, variant)
    assert float(got) == pytest.approx(want, rel=1e-9, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    trajs=trajectories(),
    variant=st.sampled_from(["shiq", "init", "ms", "tk"]),
    gamma=st.sampled_from([1.0, 0.8]),
    slack=st.integers(0, 6),
)
def test_packed_equals_unpacked_in_value_and_gradient(trajs, variant, gamma, slack):
    row_len = max(len(t) for t in trajs) + slack
    (c, z, cr, zr, r, m) = padded(trajs)
    c.requires_grad_(True)
    z.requires_grad_(True)
    ref = shiq_loss(c, z, cr, zr, r, m, beta=0.5, gamma=gamma, variant=variant)
    ref.backward()

    (pc, pz, pcr, pzr, pr, pm), seg, places = packed(trajs, row_len)
    assert len(places) == len(trajs)
    pc.requires_grad_(True)
    pz.requires_grad_(True)
    got = shiq_loss(pc, pz, pcr, pzr, pr, pm, segment_ids=seg, beta=0.5, gamma=gamma, variant=variant)
    got.backward()
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-10, abs=1e-12)
    for i, (traj, (b, start)) in enumerate(zip(trajs, places)):
        n = len(traj)
        assert torch.allclose(pc.grad[b, start : start + n], c.grad[i, :n], atol=1e-12)
        assert torch.allclose(pz.grad[b, start : start + n], z.grad[i, :n], atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 4), st.integers(0, 3)), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
    gamma=st.sampled_from([1.0, 0.7]),
)
def test_tk_on_single_turn_rows_is_the_first_action_of_each_trajectory(shape, seed, gamma):
    """Single-turn rows (prompt, one run of actions, padding): ShiQ/tk is the mean over trajectories
    of ``(G_0 − β(z_0 − z_ref_0))²`` at the first action, written here directly in float64."""
    g = torch.Generator().manual_seed(seed)
    T = max(p + a + pad for p, a, pad in shape)
    B = len(shape)
    c, z, cr, zr = (torch.randn(B, T, generator=g, dtype=torch.float64) for _ in range(4))
    m = torch.zeros(B, T, dtype=torch.bool)
    for b, (p, a, _) in enumerate(shape):
        m[b, p : p + a] = True
    r = torch.randn(B, T, generator=g, dtype=torch.float64) * m
    beta = 0.6
    want = []
    for b, (p, a, _) in enumerate(shape):
        rho = (c[b] - z[b]) - (cr[b] - zr[b])
        G0 = sum(gamma**k * (float(r[b, p + k]) - beta * float(rho[p + k])) for k in range(a))
        want.append((G0 - beta * float(z[b, p] - zr[b, p])) ** 2)
    got = shiq_loss(c, z, cr, zr, r, m, beta=beta, gamma=gamma, variant="tk")
    assert float(got) == pytest.approx(sum(want) / len(want), rel=1e-9, abs=1e-12)


def test_turn_start_mask_by_hand():
    m = torch.tensor([[0, 1, 1, 0, 1, 0, 0, 1], [1, 1, 1, 1, 0, 1, 1, 0]], dtype=torch.bool)
    seg = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1, 1, 2]])
    assert turn_start_mask(m).int().tolist() == [[0, 1, 0, 0, 1, 0, 0, 1], [1, 0, 0, 0, 0, 1, 0, 0]]
    assert turn_start_mask(m, seg).int().tolist() == [[0, 1, 0, 0, 1, 0, 0, 1], [1, 0, 1, 0, 0, 1, 0, 0]]


def test_stats_at_non_action_positions_are_ignored():
    trajs = [
        [
            (False, 1, 1, 1, 1, 0),
            (True, 0.3, 1.2, 0.1, 0.9, 1.0),
            (False, 2, 2, 2, 2, 0),
            (True, -0.5, 0.4, 0.2, 0.3, 0.5),
        ]
    ]
    c, z, cr, zr, r, m = padded(trajs)
    base = {v: float(shiq_loss(c, z, cr, zr, r, m, beta=0.4, variant=v)) for v in ("shiq", "init", "ms", "tk")}
    noise = torch.randn(c.shape) * ~m
    for v, want in base.items():
        got = shiq_loss(c + noise, z - noise, cr + 2 * noise, zr, r, m, beta=0.4, variant=v)
        assert float(got) == pytest.approx(want, rel=1e-12)


def test_bf16_statistics_are_upcast():
    trajs = [[(True, 0.3, 1.2, 0.1, 0.9, 1.0), (True, -0.5, 0.4, 0.2, 0.3, 0.5)]]
    stats64 = padded(trajs)
    stats16 = [x.to(torch.bfloat16) if x.is_floating_point() else x for x in stats64]
    got = shiq_loss(*stats16, beta=0.5)
    assert got.dtype == torch.float32
    exact = shiq_loss(*[x.to(torch.float64) if x.is_floating_point() else x for x in stats16], beta=0.5)
    assert float(got) == pytest.approx(float(exact), rel=1e-6)


def test_a_multi_turn_row_by_hand_discounts_per_action_and_starts_a_turn_after_the_tools_tokens():
    """One row: a prompt token, a turn of two actions, two tool tokens, a turn of two actions, a padding token; junk
    statistics off the actions. At β = 0.5 and γ = 0.5 or 1 the residuals of SHIQ_MATH §3-§4 worked out by hand:
    the tool's tokens neither count nor discount (§2: the exponent counts actions), ShiQ/tk keeps positions 1 and 5
    (the first action of each turn), and ShiQ/ms's next state of position 2 is position 5."""
    from shiq_train.losses import shiq_td

    junk = 5.0
    # on the actions c_ref = 0 and z_ref = 1, so ρ = (c − c_ref) − (z − z_ref) = 0.2, -0.1, 0.3, 0.1 at 1, 2, 5, 6
    c = torch.tensor([[junk, 0.6, -0.3, junk, -junk, 0.9, 0.1, junk]], dtype=torch.float64)
    z = torch.tensor([[-junk, 1.4, 0.8, junk, junk, 1.6, 1.0, -junk]], dtype=torch.float64)
    c_ref = torch.tensor([[junk, 0, 0, -junk, junk, 0, 0, junk]], dtype=torch.float64)
    z_ref = torch.tensor([[junk, 1, 1, junk, -junk, 1, 1, junk]], dtype=torch.float64)
    r = torch.tensor([[0, 0, 1.0, 0, 0, 0, 2.0, 0]], dtype=torch.float64)  # each turn's reward on its last token
    m = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0]], dtype=torch.bool)
    shaped = {1: 0.4, 2: -0.2, 5: 0.6, 6: 0.0}  # z − z_ref on the actions
    # r − βρ = -0.1, 1.05, -0.15, 1.95; G_t = (r_t − βρ_t) + γ G_next action, one γ per action:
    # γ = 0.5: G_6 = 1.95, G_5 = -0.15 + 0.975 = 0.825, G_2 = 1.05 + 0.4125 = 1.4625, G_1 = -0.1 + 0.73125 = 0.63125
    # γ = 1: G_6 = 1.95, G_5 = 1.8, G_2 = 2.85, G_1 = 2.75
    for gamma, G in ((0.5, {1: 0.63125, 2: 1.4625, 5: 0.825, 6: 1.95}), (1.0, {1: 2.75, 2: 2.85, 5: 1.8, 6: 1.95})):
        shiq = {t: G[t] - 0.5 * shaped[t] for t in G}  # δ_t = G_t − β(z_t − z_ref_t)
        init = {t: G[t] - 0.5 * (shaped[t] + 1) for t in G}  # δ_t = G_t − β z_t
        # δ_t = r_t + γβ(z_t' − z_ref_t') − β(c_t − c_ref_t), the middle term 0 on the last action
        ms = {1: gamma * 0.5 * -0.2 - 0.3, 2: 1.0 + gamma * 0.5 * 0.6 + 0.15, 5: -0.45, 6: 2.0 - 0.05}
        tk = {1: shiq[1], 5: shiq[5]}
        for variant, want in (("shiq", shiq), ("init", init), ("ms", ms), ("tk", tk)):
            expected = [want.get(t, 0.0) for t in range(8)]
            got = shiq_td(c, z, c_ref, z_ref, r, m, beta=0.5, gamma=gamma, variant=variant)[0].tolist()
            assert got == pytest.approx(expected, abs=1e-12), (variant, gamma)
            loss = shiq_loss(c, z, c_ref, z_ref, r, m, beta=0.5, gamma=gamma, variant=variant)
            assert float(loss) == pytest.approx(sum(d * d for d in want.values()) / len(want), rel=1e-12), variant


def test_no_action_gives_zero_loss_with_a_gradient_path():
    c = torch.zeros(2, 3, requires_grad=True)
    loss = shiq_loss(c, c, c.detach(), c.detach(), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool), beta=1.0)
    loss.backward()
    assert float(loss.detach()) == 0.0 and c.grad is not None and not c.grad.any()


# ---------------------------------------------------------------------------------------------
# input checks


def _good():
    c = torch.randn(2, 4)
    m = torch.tensor([[False, True, True, False], [False, True, False, True]])
    return [c, c + 1, c * 0.5, c + 2, torch.randn(2, 4) * m, m]


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda a: a.__setitem__(0, torch.randn(2, 5)), "shape mismatch: chosen_logits"),
        (lambda a: a.__setitem__(3, torch.randn(3, 4)), "shape mismatch: ref_logz"),
        (
            lambda a: a[1].__setitem__((0, 0), float("nan")),
            "logz has a non-finite value at \\[row, position\\] = \\[0, 0\\]",
        ),
        (lambda a: a[4].__setitem__((1, 2), float("inf")), "rewards has a non-finite"),
        (
            lambda a: a[4].__setitem__((0, 0), 1.0),
            "nonzero value on a non-action position at \\[row, position\\] = \\[0, 0\\]",
        ),
        (lambda a: a.__setitem__(5, a[5].float()), "action_mask must be a bool"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_problem(mutate, message):
    args = _good()
    mutate(args)
    with pytest.raises(ValueError, match=message):
        shiq_loss(*args, beta=0.5)


@pytest.mark.parametrize("name", ["dpo", "copg"])
def test_group_losses_called_directly_refuse_a_row_without_an_action(name):
    """Such a row would enter the pairs as a completion of return 0 and log-ratio 0 (as ``compute_loss`` refuses
    it, so do the losses themselves)."""
    args = _good()
    args[4][1] = 0.0
    args[5][1] = False
    with pytest.raises(ValueError, match="row 1 has no action position"):
        _baseline_call(name, args)


def test_copg_takes_a_one_element_tensor_beta_and_passes_it_a_gradient():
    c, z, cr, zr, r, m = _good()
    g = torch.tensor([3, 3])
    want = copg_loss(c, z, cr, zr, r, m, g, beta=0.5)
    assert copg_loss(c, z, cr, zr, r, m, g, beta=torch.tensor([[0.5]])) == want
    beta = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():  # reading β did not detach it: torch warned of a tensor that requires grad
        warnings.simplefilter("error")
        loss = copg_loss(*(x.double() for x in (c, z, cr, zr, r)), m, g, beta=beta)
    loss.backward()
    # against a central difference; h = 1e-4 keeps its rounding (about 1e-12 of the loss) and its O(h²) error
    # (about 1e-8 of the third derivative) far below the tolerance, whatever the random logits
    h = 1e-4
    up, down = (copg_loss(*(x.double() for x in (c, z, cr, zr, r)), m, g, beta=0.5 + s) for s in (h, -h))
    assert float(beta.grad) == pytest.approx(float(up - down) / (2 * h), rel=1e-5, abs=1e-9)
    returns, groups = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0, 0, 1])
    assert loo_soft_value(returns, groups, beta=torch.tensor([[0.5]])).shape == (3,)


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf")])
def test_non_positive_beta_raises(beta):
    with pytest.raises(ValueError, match="beta must be"):
        shiq_loss(*_good(), beta=beta)


_BETAS = [0.5, 2, 1e-30, 1e300, True, False, 0, -0.5, math.nan, math.inf, "0.5", b"1", None, [0.5], 3 + 0j]


@pytest.mark.parametrize("beta", _BETAS + ["numpy", "tensor", "tensor1", "tensor2", "tensor_bool", "tensor_0"])
def test_the_training_and_evaluation_beta_checks_accept_the_same_values(beta):
    """``shiq_train.losses.check_beta`` (torch) and ``shiq_eval.optimum.check_beta`` (no torch) agree: each
    returns the float the value means, or refuses it, on numbers, numpy scalars, bools, strings and tensors."""
    import numpy as np

    from shiq_eval.optimum import check_beta as eval_check
    from shiq_train.losses import check_beta as train_check

    made = {
        "numpy": (np.float32(0.25), 0.25),
        "tensor": (torch.tensor(0.25, dtype=torch.float64), 0.25),
        "tensor1": (torch.tensor([0.25]), 0.25),
        "tensor2": (torch.tensor([0.25, 0.5]), None),
        "tensor_bool": (torch.tensor(True), None),
        "tensor_0": (torch.tensor(0.0), None),
    }
    value, want = made[beta] if isinstance(beta, str) and beta in made else (beta, None)
    if want is None and not isinstance(value, torch.Tensor):
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        want = float(value) if ok else None
    for check in (train_check, eval_check):
        if want is None:
            with pytest.raises(ValueError, match="beta must be a finite number > 0"):
                check(value)
        else:
            got = check(value)
            assert type(got) is float and got == want


def test_numpy_and_integer_beta_are_accepted():
    import numpy as np

    args = _good()
    want = shiq_loss(*args, beta=0.5)
    assert torch.equal(shiq_loss(*args, beta=np.float32(0.5)), want)
    assert torch.equal(shiq_loss(*args, beta=1), shiq_loss(*args, beta=1.0))  # an int β is that float


def _baseline_call(name, args, **override):
    c, z, cr, zr, r, m = args
    kw = {
        "winners": torch.tensor([0]),
        "losers": torch.tensor([1]),
        "group_ids": torch.tensor([3, 3]),
        "values": torch.zeros(2),
    }
    kw.update(override)
    if name == "dpo":
        return dpo_loss(c, z, cr, zr, m, kw["winners"], kw["losers"], beta=0.5)
    if name == "copg":
        return copg_loss(c, z, cr, zr, r, m, kw["group_ids"], beta=0.5)
    return dro_v_loss(c, z, cr, zr, r, m, kw["values"], beta=0.5)


@pytest.mark.parametrize("name", ["dpo", "copg", "dro_v"])
@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda a: a.__setitem__(0, torch.randn(2, 5)), "shape mismatch: chosen_logits"),
        (lambda a: a[1].__setitem__((0, 0), float("nan")), "logz has a non-finite value"),
        (lambda a: a.__setitem__(5, a[5].float()), "action_mask must be a bool"),
    ],
)
def test_baselines_check_their_statistics(name, mutate, message):
    args = _good()
    assert torch.isfinite(_baseline_call(name, args))
    mutate(args)
    with pytest.raises(ValueError, match=message):
        _baseline_call(name, args)


def test_baselines_check_rewards_and_per_row_vectors():
    args = _good()
    args[4][0, 0] = 1.0  # a reward off the actions
    for name in ("copg", "dro_v"):
        with pytest.raises(ValueError, match="non-action position"):
            _baseline_call(name, args)
    good = _good()
    for w, l in (([2], [1]), ([-1], [1]), ([0], [-2])):  # a negative index would read a row from the end
        with pytest.raises(ValueError, match=r"holds a row index outside \[0, 2\)"):
            _baseline_call("dpo", good, winners=torch.tensor(w), losers=torch.tensor(l))
    with pytest.raises(ValueError, match="pair up"):
        _baseline_call("dpo", good, losers=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="group_ids must be \\[2\\]"):
        _baseline_call("copg", good, group_ids=torch.tensor([3, 3, 3]))
    with pytest.raises(ValueError, match="group_ids must be an integer"):
        _baseline_call("copg", good, group_ids=torch.tensor([3.0, 3.0]))
    with pytest.raises(ValueError, match="values has a non-finite value at row 1"):
        _baseline_call("dro_v", good, values=torch.tensor([0.0, float("inf")]))
    for name in ("dpo", "copg", "dro_v"):
        with pytest.raises(ValueError, match="beta must be"):
            c, z, cr, zr, r, m = good
            {
                "dpo": lambda: dpo_loss(c, z, cr, zr, m, torch.tensor([0]), torch.tensor([1]), beta=0.0),
                "copg": lambda: copg_loss(c, z, cr, zr, r, m, torch.tensor([3, 3]), beta=-1.0),
                "dro_v": lambda: dro_v_loss(c, z, cr, zr, r, m, torch.zeros(2), beta=float("nan")),
            }[name]()


def test_bad_variant_gamma_and_segments_raise():
    with pytest.raises(ValueError, match="variant must be one of"):
        shiq_loss(*_good(), beta=0.5, variant="dqn")
    for gamma in (1.5, -0.2, float("nan"), float("inf"), "0.5", True):
        with pytest.raises(ValueError, match=r"gamma must be a number in \[0, 1\]"):
            shiq_loss(*_good(), beta=0.5, gamma=gamma)
    for gamma in (0.0, 0.5, 1.0):  # the edges are allowed
        assert torch.isfinite(shiq_loss(*_good(), beta=0.5, gamma=gamma))
    with pytest.raises(ValueError, match="non-decreasing"):
        shiq_loss(*_good(), segment_ids=torch.tensor([[0, 0, 1, 0], [0, 0, 0, 0]]), beta=0.5)
    for seg, message in (
        (torch.tensor([[0, 0, 1, 1], [-1, 0, 0, 0]]), "segment_ids must be non-negative"),
        (torch.zeros(2, 4), "segment_ids must be an integer tensor, got dtype torch.float32"),
        (torch.zeros(2, 4, dtype=torch.bool), "segment_ids must be an integer tensor, got dtype torch.bool"),
        (torch.zeros(2, 3, dtype=torch.long), r"shape mismatch: segment_ids has shape \(2, 3\)"),
    ):
        with pytest.raises(ValueError, match=message):
            shiq_loss(*_good(), segment_ids=seg, beta=0.5)
    for mask in (torch.ones(4, dtype=torch.bool), torch.ones(2, 4, 1, dtype=torch.bool)):
        args = _good()
        args[5] = mask
        with pytest.raises(ValueError, match=r"inputs must be \[B, T\]; action_mask has shape"):
            shiq_loss(*args, beta=0.5)


# ---------------------------------------------------------------------------------------------
# per-token statistics


def test_token_stats_bf16_with_large_logits():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 5, 50, generator=g) * 3000).to(torch.bfloat16)
    targets = torch.randint(0, 50, (2, 5), generator=g)
    st_ = token_stats(logits, targets)
    exact = logits.double()
    want_z = torch.logsumexp(exact, -1)
    want_c = exact.gather(-1, targets[..., None])[..., 0]
    assert torch.isfinite(st_.logz).all()
    assert torch.allclose(st_.logz.double(), want_z, rtol=1e-6)
    assert torch.allclose(st_.chosen_logits.double(), want_c, rtol=0, atol=0)
    assert torch.allclose(
        st_.logprobs.double(), torch.log_softmax(exact, -1).gather(-1, targets[..., None])[..., 0], atol=1e-2
    )


def test_token_stats_keep_float64():
    logits = torch.randn(2, 3, 7, dtype=torch.float64)
    targets = torch.randint(0, 7, (2, 3))
    st = token_stats(logits, targets)
    assert st.chosen_logits.dtype == st.logz.dtype == torch.float64
    assert torch.equal(st.logz, torch.logsumexp(logits, -1))  # no float32 rounding on the way


def test_causal_lm_stats_alignment():
    logits = torch.randn(1, 4, 7)
    tokens = torch.tensor([[3, 1, 6, 2]])
    st_ = causal_lm_stats(logits, tokens)
    for t in range(1, 4):
        assert float(st_.chosen_logits[0, t]) == pytest.approx(float(logits[0, t - 1, tokens[0, t]]))
        assert float(st_.logz[0, t]) == pytest.approx(float(torch.logsumexp(logits[0, t - 1], 0)), rel=1e-6)
    assert float(st_.chosen_logits[0, 0]) == 0.0


def test_token_stats_rejects_out_of_vocab_targets():
    with pytest.raises(ValueError, match="outside"):
        token_stats(torch.randn(1, 2, 5), torch.tensor([[1, 5]]))


# ---------------------------------------------------------------------------------------------
# baselines (SHIQ_MATH §5)


def bandit_stats(logits, ref, arms):
    """Per-token statistics of a one-step bandit, ``[N, 1]`` each."""
    c = logits[arms].view(-1, 1)
    z = torch.logsumexp(logits, 0).expand(len(arms)).reshape(-1, 1)
    cr = ref[arms].view(-1, 1)
    zr = torch.logsumexp(ref, 0).expand(len(arms)).reshape(-1, 1)
    return c, z, cr, zr


def test_dpo_matches_hand_computation_and_ignores_gaps():
    g = torch.Generator().manual_seed(1)
    logits, ref = torch.randn(2, 5, 6, generator=g), torch.randn(2, 5, 6, generator=g)
    tokens = torch.randint(0, 6, (2, 5), generator=g)
    m = torch.tensor([[False, True, False, True, True], [False, True, True, False, True]])
    s, sr = causal_lm_stats(logits, tokens), causal_lm_stats(ref, tokens)
    beta = 0.2
    lp = torch.log_softmax(logits, -1)
    lpr = torch.log_softmax(ref, -1)
    lam = [
        sum(float(lp[b, t - 1, tokens[b, t]] - lpr[b, t - 1, tokens[b, t]]) for t in range(5) if m[b, t])
        for b in range(2)
    ]
    want = -math.log(1 / (1 + math.exp(-beta * (lam[1] - lam[0]))))
    got = dpo_loss(
        s.chosen_logits, s.logz, sr.chosen_logits, sr.logz, m, torch.tensor([1]), torch.tensor([0]), beta=beta
    )
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_dpo_of_several_pairs_is_their_mean_by_hand():
    """DPO's loss is the mean over its pairs (SHIQ_MATH §3: a per-sequence loss averages its terms, here pairs) of
    ``−log σ(β(Λ_w − Λ_l))`` (§5), a row in several pairs counted in each: Λ of each row summed here over its
    actions (position 0 a prompt token with junk statistics), the pairs' terms with ``math``."""
    # per row, its actions' (c, z, c_ref, z_ref): Λ = Σ (c − z) − (c_ref − z_ref) = 0.5, -0.3, 1.2, 0.0
    actions = [
        [(1.0, 2.0, 0.5, 2.0), (0.0, 1.0, 0.0, 1.0)],
        [(0.2, 1.0, 0.5, 1.0), (0.0, 1.0, 0.0, 1.0)],
        [(2.0, 1.0, 0.0, 0.2), (0.0, 0.0, 0.0, 0.0)],
        [(0.3, 0.3, 0.7, 0.7), (1.0, 1.0, 0.0, 0.0)],
    ]
    lam = [sum((c - z) - (cr - zr) for c, z, cr, zr in row) for row in actions]
    assert lam == pytest.approx([0.5, -0.3, 1.2, 0.0])
    stats = torch.full((4, 4, 3), 9.0, dtype=torch.float64)  # [stat, row, position]
    for b, row in enumerate(actions):
        for t, values in enumerate(row, start=1):
            stats[:, b, t] = torch.tensor(values, dtype=torch.float64)
    m = torch.tensor([[False, True, True]] * 4)
    winners, losers, beta = torch.tensor([0, 2, 3, 2]), torch.tensor([1, 1, 1, 0]), 0.7
    terms = [-math.log(1 / (1 + math.exp(-beta * (lam[w] - lam[l])))) for w, l in zip(winners, losers)]
    got = dpo_loss(*stats, m, winners, losers, beta=beta)
    assert float(got) == pytest.approx(sum(terms) / len(terms), rel=1e-12)


def test_preference_pairs_within_groups_drop_ties():
    returns = torch.tensor([1.0, 2.0, 2.0, 0.0, 5.0])
    groups = torch.tensor([0, 0, 0, 1, 2])
    w, l = preference_pairs(returns, groups)
    assert sorted(zip(w.tolist(), l.tolist())) == [(1, 0), (2, 0)]


def _fit(params, loss_fn, steps=300):
    opt = torch.optim.LBFGS(
        params, max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)


def test_copg_minimiser_is_the_optimal_bandit_policy():
    """CoPG on every pair of arms converges to π* ∝ π_ref exp(r/β) (SHIQ_MATH §1, §5)."""
    torch.manual_seed(0)
    K, beta = 5, 0.5
    ref = torch.randn(K, dtype=torch.float64)
    r = torch.randn(K, dtype=torch.float64)
    arms = torch.arange(K)
    logits = ref.clone().requires_grad_(True)
    rewards = r.view(-1, 1)
    mask = torch.ones(K, 1, dtype=torch.bool)
    groups = torch.zeros(K, dtype=torch.long)
    _fit([logits], lambda: copg_loss(*bandit_stats(logits, ref, arms), rewards, mask, groups, beta=beta))
    pi_star = torch.softmax(ref + r / beta, 0)
    assert torch.allclose(torch.softmax(logits.detach(), 0), pi_star, atol=1e-6)


def test_dro_v_with_learned_value_recovers_pi_star_and_soft_value():
    """DRO's theorem (SHIQ_MATH §5): V → β log E_ref exp(R/β) and π → π* when V is learned."""
    torch.manual_seed(1)
    K, beta = 4, 0.8
    ref = torch.randn(K, dtype=torch.float64)
    r = torch.randn(K, dtype=torch.float64)
    # rows weighted by the reference distribution: each arm repeated ∝ π_ref would be sampling;
    # with all arms once, the unique zero of every residual still gives π* and V*.
    arms = torch.arange(K)
    logits = ref.clone().requires_grad_(True)
    value = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(K, 1, dtype=torch.bool)
    _fit(
        [logits, value],
        lambda: dro_v_loss(*bandit_stats(logits, ref, arms), r.view(-1, 1), mask, value.expand(K), beta=beta),
    )
    pi_star = torch.softmax(ref + r / beta, 0)
    assert torch.allclose(torch.softmax(logits.detach(), 0), pi_star, atol=1e-6)
    v_star = beta * torch.logsumexp(torch.log_softmax(ref, 0) + r / beta, 0)
    assert float(value) == pytest.approx(float(v_star), abs=1e-6)


def naive_dro_v(trajs, beta, values=None):
    """SHIQ_MATH §5 by hand: mean over trajectories with an action of ½ (R − V − β Σ ρ)², V ≡ 0 by default."""
    terms = []
    for i, traj in enumerate(trajs):
        acts = [tok[1:] for tok in traj if tok[0]]
        if acts:
            R = sum(a[4] for a in acts)
            lam = sum((c - z) - (cr - zr) for c, z, cr, zr, _ in acts)
            v = 0.0 if values is None else values[i]
            terms.append(0.5 * (R - v - beta * lam) ** 2)
    return sum(terms) / len(terms) if terms else 0.0


@settings(max_examples=60, deadline=None)
@given(trajs=trajectories(), beta=st.sampled_from([0.1, 0.5, 2.0]), with_values=st.booleans())
def test_dro_v_matches_naive_reference(trajs, beta, with_values):
    values = [0.3 * i - 0.5 for i in range(len(trajs))] if with_values else None
    c, z, cr, zr, r, m = padded(trajs)
    v = torch.tensor(values, dtype=torch.float64) if with_values else None
    got = dro_v_loss(c, z, cr, zr, r, m, v, beta=beta)
    assert float(got) == pytest.approx(naive_dro_v(trajs, beta, values), rel=1e-10, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(trajs=trajectories(), slack=st.integers(0, 6))
def test_dro_v_packed_equals_unpacked_in_value_and_gradient(trajs, slack):
    (c, z, cr, zr, r, m) = padded(trajs)
    c.requires_grad_(True)
    z.requires_grad_(True)
    ref = dro_v_loss(c, z, cr, zr, r, m, beta=0.5)
    ref.backward()
    (pc, pz, pcr, pzr, pr, pm), seg, places = packed(trajs, max(len(t) for t in trajs) + slack)
    pc.requires_grad_(True)
    pz.requires_grad_(True)
    got = dro_v_loss(pc, pz, pcr, pzr, pr, pm, beta=0.5, segment_ids=seg)
    got.backward()
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-10, abs=1e-12)
    for i, (traj, (b, start)) in enumerate(zip(trajs, places)):
        n = len(traj)
        assert torch.allclose(pc.grad[b, start : start + n], c.grad[i, :n], atol=1e-12)
        assert torch.allclose(pz.grad[b, start : start + n], z.grad[i, :n], atol=1e-12)


def test_dro_v_rows_do_not_interact():
    """No groups, no batch statistics: the batch loss is the mean of the single-row losses, and a
    row's gradient does not depend on the other rows (SHIQ_MATH §5)."""
    c, z, cr, zr, r, m = _good()
    c = c.double().requires_grad_(True)
    z, cr, zr, r = (x.double() for x in (z, cr, zr, r))
    alone = [
        dro_v_loss(c[i : i + 1], z[i : i + 1], cr[i : i + 1], zr[i : i + 1], r[i : i + 1], m[i : i + 1], beta=0.5)
        for i in range(2)
    ]
    both = dro_v_loss(c, z, cr, zr, r, m, beta=0.5)
    assert float(both) == pytest.approx(float(sum(alone)) / 2, rel=1e-12)
    (g_both,) = torch.autograd.grad(both, c)
    (g0,) = torch.autograd.grad(alone[0], c)
    assert torch.allclose(g_both[0], g0[0] / 2, atol=1e-14)


def test_dro_v_values_and_packing_do_not_mix():
    c, z, cr, zr, r, m = _good()
    with pytest.raises(ValueError, match="values are per row"):
        dro_v_loss(c, z, cr, zr, r, m, torch.zeros(2), beta=0.5, segment_ids=torch.zeros(m.shape, dtype=torch.long))
    with pytest.raises(ValueError, match="segment_ids must be non-decreasing"):
        dro_v_loss(c, z, cr, zr, r, m, beta=0.5, segment_ids=torch.tensor([[1, 0, 0, 0]] * 2))


def test_loo_soft_value_by_hand():
    R = torch.tensor([1.0, 3.0, 2.0, -1.0])
    groups = torch.tensor([0, 0, 0, 1])
    beta = 0.5
    v = loo_soft_value(R, groups, beta=beta)
    lme = lambda xs: beta * math.log(sum(math.exp(x / beta) for x in xs) / len(xs))
    assert float(v[0]) == pytest.approx(lme([3.0, 2.0]), rel=1e-6)
    assert float(v[1]) == pytest.approx(lme([1.0, 2.0]), rel=1e-6)
    assert float(v[3]) == pytest.approx(lme([1.0, 3.0, 2.0]), rel=1e-6)  # alone: the rest of the batch


def test_loo_soft_value_refuses_integer_returns():
    """Integer returns came back as the log-mean-exp truncated to integers (3 for 3.43 with R = 1, 2, 4 at
    β 1): the value of SHIQ_MATH §5 is a real number, so returns must be floats."""
    with pytest.raises(ValueError, match="returns must be a floating-point tensor"):
        loo_soft_value(torch.tensor([1, 2, 4]), torch.tensor([0, 0, 0]), beta=1.0)


def test_multiturn_dpo_and_copg_sum_every_assistant_turn():
    """Multi-turn variants (SHIQ_MATH §5): Λ over all assistant tokens, R the cumulative turn reward."""
    m = torch.tensor([[False, True, True, False, False, True], [False, True, False, False, True, True]])
    g = torch.Generator().manual_seed(2)
    c, z, cr, zr = (torch.randn(2, 6, generator=g, dtype=torch.float64) for _ in range(4))
    r = torch.zeros(2, 6, dtype=torch.float64)
    r[0, 2], r[0, 5] = 1.0, 0.5  # turn rewards on each turn's last assistant token
    r[1, 1], r[1, 5] = 0.2, 0.1
    beta = 0.3
    rho = (c - z) - (cr - zr)
    lam = [float(rho[b][m[b]].sum()) for b in range(2)]
    R = [1.5, 0.3]
    w, l = preference_pairs(torch.tensor(R), torch.tensor([0, 0]))
    assert (w.tolist(), l.tolist()) == ([0], [1])
    got = dpo_loss(c, z, cr, zr, m, w, l, beta=beta)
    assert float(got) == pytest.approx(-math.log(1 / (1 + math.exp(-beta * (lam[0] - lam[1])))), rel=1e-9)
    got = copg_loss(c, z, cr, zr, r, m, torch.tensor([7, 7]), beta=beta)
    assert float(got) == pytest.approx(((R[0] - beta * lam[0]) - (R[1] - beta * lam[1])) ** 2, rel=1e-9)


def test_copg_averages_pairs_within_then_across_groups():
    R = torch.tensor([1.0, 2.0, 4.0, 0.0, 3.0], dtype=torch.float64)
    zeros = torch.zeros(5, 1, dtype=torch.float64)
    mask = torch.ones(5, 1, dtype=torch.bool)
    got = copg_loss(zeros, zeros, zeros, zeros, R.view(-1, 1), mask, torch.tensor([0, 0, 0, 1, 1]), beta=1.0)
    g0 = ((1 - 2) ** 2 + (1 - 4) ** 2 + (2 - 4) ** 2) / 3
    g1 = (0 - 3) ** 2
    assert float(got) == pytest.approx((g0 + g1) / 2)


def test_sft_loss_checks_its_inputs_like_the_other_losses():
    c, z, _, _, _, m = _good()
    with pytest.raises(ValueError, match=r"chosen_logits has a non-finite value at \[row, position\] = \[0, 0\]"):
        sft_loss(c * float("nan"), z, m)
    with pytest.raises(ValueError, match="action_mask must be a bool"):
        sft_loss(c, z, m.long())
    with pytest.raises(ValueError, match="logz must be a floating-point tensor"):
        sft_loss(c, z.long(), m)
    with pytest.raises(ValueError, match="shape mismatch: logz"):
        sft_loss(c, z[:, :3], m)


def test_packed_dro_v_on_an_empty_micro_batch_is_zero_like_the_padded_one():
    for shape in ((0, 3), (2, 0)):
        e = torch.zeros(shape, requires_grad=True)
        em = torch.zeros(shape, dtype=torch.bool)
        seg = torch.zeros(shape, dtype=torch.long)
        loss = dro_v_loss(e, e, e.detach(), e.detach(), e.detach(), em, beta=0.1, segment_ids=seg)
        loss.backward()
        assert float(loss) == 0.0 and e.grad is not None and not e.grad.any()


@pytest.mark.parametrize("beta", [1e-3, 0.5, 1e4, 1e6])
def test_the_leave_one_out_value_keeps_its_digits_at_any_beta(beta):
    """dro_v_loo's value took R / β in float32 then multiplied by β: at β 1e6 it was 3% off. Against Python's
    float64 log-mean-exp of the other completions, max-shifted (R = 1, 2, 3 in one group; 7 alone)."""
    import math

    from shiq_train.losses import loo_soft_value

    R = [1.0, 2.0, 3.0, 7.0]
    got = loo_soft_value(torch.tensor(R), torch.tensor([0, 0, 0, 1]), beta=beta).tolist()
    for i in range(len(R)):
        peers = [x for j, x in enumerate(R) if j != i and (j < 3) == (i < 3)] or [x for j, x in enumerate(R) if j != i]
        top = max(peers)
        want = top + beta * math.log(sum(math.exp((x - top) / beta) for x in peers) / len(peers))
        assert got[i] == pytest.approx(want, rel=1e-6, abs=1e-6), (i, got[i], want)


def test_rows_of_no_token_give_zero_at_every_gamma():
    """shiq_loss on [B, 0] rows gave 0 at γ = 1 and a RuntimeError (torch.stack of nothing) below it."""
    from shiq_train.losses import shiq_loss

    e, mask = torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.bool)
    for gamma in (1.0, 0.5, 0.0):
        assert float(shiq_loss(e, e, e, e, e, mask, beta=0.1, gamma=gamma)) == 0.0
