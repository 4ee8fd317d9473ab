"""ShiQ's minimisers against the exact optimal policy of small tabular tree MDPs (SHIQ_MATH §1, §3, §4),
and DRO-V with ``V ≡ 0`` against the closed form of the policy it converges to instead (§5).

The reference is backward induction on the soft Bellman equation, written here independently of the
library: ``q*(s,a) = r(s,a) + γ β log Σ_b π_ref(b|s') exp(q*(s',b)/β)`` and ``π* ∝ π_ref exp(q*/β)``.
Each test builds every trajectory of a tree (so the data cover every transition), parameterises a
tabular policy by one logit vector per state, minimises the loss from the reference logits, and
compares ``softmax(ℓ)`` with ``π*`` at every state.
"""

import itertools
import math

import pytest
import torch

from shiq_train.losses import dro_v_loss, shiq_loss

V = 3  # actions per state
F64 = torch.float64


class Tree:
    """A deterministic tree MDP over action prefixes, optionally with environment tokens.

    ``gap_after`` lists action depths after which the environment appends one non-action token
    (a user/tool turn), as in multi-turn rows; rewards given at those depths are turn rewards.
    """

    def __init__(self, depth, seed, reward="token", gap_after=(), prompt_len=1):
        g = torch.Generator().manual_seed(seed)
        self.depth = depth
        self.states = [p for d in range(depth) for p in itertools.product(range(V), repeat=d)]
        self.index = {s: i for i, s in enumerate(self.states)}
        self.ref_logits = 2.0 * torch.randn(len(self.states), V, generator=g, dtype=F64)
        if reward == "token":
            self.r = torch.randn(len(self.states), V, generator=g, dtype=F64)
        else:  # sequence-level: one reward at the last action only
            self.r = torch.zeros(len(self.states), V, dtype=F64)
            last = [i for i, s in enumerate(self.states) if len(s) == depth - 1]
            self.r[last] = torch.randn(len(last), V, generator=g, dtype=F64)
        self.gap_after = set(gap_after)
        self.prompt_len = prompt_len

    def optimal_q(self, beta, gamma):
        """q* by backward induction (SHIQ_MATH §1), a dict state -> [V] values of its actions."""
        log_ref = torch.log_softmax(self.ref_logits, -1)
        q = {}
        for s in sorted(self.states, key=len, reverse=True):
            qs = self.r[self.index[s]].clone()
            if len(s) < self.depth - 1:
                for a in range(V):
                    nxt = q[s + (a,)]
                    qs[a] += gamma * beta * torch.logsumexp(log_ref[self.index[s + (a,)]] + nxt / beta, 0)
            q[s] = qs
        return q

    def optimal_policy(self, beta, gamma):
        """π* ∝ π_ref exp(q*/β) (SHIQ_MATH §1), a dict state -> probabilities."""
        log_ref = torch.log_softmax(self.ref_logits, -1)
        q = self.optimal_q(beta, gamma)
        return {s: torch.softmax(log_ref[self.index[s]] + q[s] / beta, 0) for s in self.states}

    def batch(self, logits):
        """Every trajectory as one row: per-token statistics under ``logits`` [states, V]."""
        rows = list(itertools.product(range(V), repeat=self.depth))
        T = self.prompt_len + self.depth + len(self.gap_after)
        B = len(rows)
        c = torch.zeros(B, T, dtype=F64)
        z = torch.zeros(B, T, dtype=F64)
        cr = torch.zeros(B, T, dtype=F64)
        zr = torch.zeros(B, T, dtype=F64)
        r = torch.zeros(B, T, dtype=F64)
        m = torch.zeros(B, T, dtype=torch.bool)
        c_list, z_list, pos_list = [], [], []
        for b, y in enumerate(rows):
            t = self.prompt_len
            for d in range(self.depth):
                s = self.index[y[:d]]
                c_list.append(logits[s, y[d]])
                z_list.append(torch.logsumexp(logits[s], 0))
                pos_list.append((b, t))
                cr[b, t] = self.ref_logits[s, y[d]]
                zr[b, t] = torch.logsumexp(self.ref_logits[s], 0)
                r[b, t] = self.r[s, y[d]]
                m[b, t] = True
                t += 1 + (d in self.gap_after)
        idx = torch.tensor(pos_list)
        c = c.index_put((idx[:, 0], idx[:, 1]), torch.stack(c_list))
        z = z.index_put((idx[:, 0], idx[:, 1]), torch.stack(z_list))
        # non-action positions carry arbitrary finite statistics: the losses must ignore them
        junk = torch.randn(B, T, generator=torch.Generator().manual_seed(0), dtype=F64)
        c = torch.where(m, c, junk)
        z = torch.where(m, z, junk + 1)
        return c, z, cr, zr, r, m


def minimise(tree, loss_fn, steps=200):
    logits = tree.ref_logits.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [logits],
        lr=1,
        max_iter=steps,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = loss_fn(*tree.batch(logits))
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    logits = logits.detach()
    return logits, float(loss_fn(*tree.batch(logits)))


def max_policy_error(tree, logits, pi_star):
    return max(float((torch.softmax(logits[tree.index[s]], 0) - pi_star[s]).abs().max()) for s in tree.states)


CASES = [
    # (variant, reward kind, gamma, environment gaps)
    ("shiq", "token", 1.0, ()),
    ("shiq", "sequence", 1.0, ()),
    ("shiq", "token", 0.8, ()),
    ("shiq", "token", 1.0, (0, 1)),
    ("shiq", "token", 0.7, (1,)),
    ("init", "token", 1.0, ()),
    ("init", "sequence", 1.0, (0,)),
    ("init", "token", 0.8, ()),
    ("ms", "token", 1.0, ()),
    ("ms", "sequence", 1.0, ()),
    ("ms", "token", 0.8, (0, 1)),
    ("tk", "token", 1.0, ()),
    ("tk", "sequence", 1.0, (1,)),  # two turns: the loss reads both turn starts
    ("tk", "token", 1.0, (1,)),
    ("tk", "token", 1.0, (0, 1)),  # three one-action turns
]


@pytest.mark.parametrize("case", range(len(CASES)), ids=["-".join(map(str, c)) for c in CASES])
def test_minimiser_is_the_optimal_policy(case):
    variant, reward, gamma, gaps = CASES[case]
    beta = 0.7
    tree = Tree(depth=3, seed=100 + case, reward=reward, gap_after=gaps)
    pi_star = tree.optimal_policy(beta, gamma)
    # the reference itself is not optimal, so the test is not vacuous
    assert max_policy_error(tree, tree.ref_logits, pi_star) > 0.05

    def loss_fn(*stats):
        return shiq_loss(*stats, beta=beta, gamma=gamma, variant=variant)

    logits, final = minimise(tree, loss_fn)
    assert final < 1e-10
    assert max_policy_error(tree, logits, pi_star) < 1e-5


@pytest.mark.parametrize("variant", ["ms", "shiq"])
def test_ms_and_shiq_logits_are_reference_plus_q_over_beta(variant):
    """Thm. 2/3 of the paper: the ShiQ and ShiQ/ms zero-residual logits are ``ℓ_ref + q*/β`` exactly, not only
    up to a shift per state. Both losses read ``z`` (ShiQ: ``β (z_t − z_ref_t)``; ms: ``β (z_t' − z_ref_t')``
    after ``β (c_t − c_ref_t)``), which pins the shift: with ``ℓ = ℓ_ref + q*/β``, ``z − z_ref = V*/β`` and
    every residual of SHIQ_MATH §3/§4 is 0 (γ = 1, telescoping ``q* = r + V*(s')``)."""
    beta, gamma = 0.5, 1.0
    tree = Tree(depth=2, seed=3)
    logits, final = minimise(tree, lambda *s: shiq_loss(*s, beta=beta, gamma=gamma, variant=variant))
    assert final < 1e-12
    q = tree.optimal_q(beta, gamma)
    for s in tree.states:
        i = tree.index[s]
        assert torch.allclose(logits[i] - tree.ref_logits[i], q[s] / beta, atol=1e-6, rtol=0), s
    # not vacuous: the logits moved from the reference, and by a different amount at each state
    moved = torch.stack([q[s] / beta for s in tree.states])
    assert float(moved.abs().max()) > 1.0 and float((moved.mean(1) - moved.mean()).abs().max()) > 0.1


@pytest.mark.parametrize("gaps", [(), (0, 1)])
def test_reference_is_a_stationary_point_of_shiq_but_not_of_init(gaps):
    """SHIQ_MATH §3-§4: at ℓ = ℓ_ref and r = 0, ShiQ has zero loss and zero gradient; ShiQ/init not."""
    tree = Tree(depth=3, seed=5, gap_after=gaps)
    tree.r.zero_()
    for variant in ("shiq", "ms", "tk"):
        logits = tree.ref_logits.clone().requires_grad_(True)
        loss = shiq_loss(*tree.batch(logits), beta=0.5, variant=variant)
        loss.backward()
        assert float(loss) == pytest.approx(0.0, abs=1e-20)
        assert float(logits.grad.abs().max()) == pytest.approx(0.0, abs=1e-12)
    logits = tree.ref_logits.clone().requires_grad_(True)
    loss = shiq_loss(*tree.batch(logits), beta=0.5, variant="init")
    loss.backward()
    assert float(loss) > 1e-3
    assert float(logits.grad.abs().max()) > 1e-3


def test_bandit_minimiser_is_reference_plus_reward_over_beta():
    """SHIQ_MATH §4: in a one-step bandit every variant minimises at ℓ = ℓ_ref + r/β."""
    beta = 0.3
    ref = torch.tensor([[0.5, -1.0, 2.0, 0.0]], dtype=F64)
    r = torch.tensor([1.0, -0.5, 0.2, 0.7], dtype=F64)
    for variant in ("shiq", "tk", "ms"):
        logits = ref.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([logits], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            c = logits[0].view(4, 1)
            z = torch.logsumexp(logits[0], 0).expand(4, 1)
            loss = shiq_loss(
                c,
                z,
                ref[0].view(4, 1),
                torch.logsumexp(ref[0], 0).expand(4, 1),
                r.view(4, 1),
                torch.ones(4, 1, dtype=torch.bool),
                beta=beta,
                variant=variant,
            )
            loss.backward()
            return loss

        opt.step(closure)
        assert torch.allclose(logits.detach()[0] - ref[0], r / beta, atol=1e-6)


def test_optimal_policy_reference_matches_brute_force():
    """Guard the test's own π*: compare with exhaustive enumeration over sequences (γ = 1)."""
    beta = 0.9
    tree = Tree(depth=3, seed=11)
    pi = tree.optimal_policy(beta, 1.0)
    log_ref = torch.log_softmax(tree.ref_logits, -1)
    # π*(y) ∝ π_ref(y) exp(R(y)/β) over whole sequences; its first-token marginal must equal π*(·|root)
    weights = torch.zeros(V, dtype=F64)
    for y in itertools.product(range(V), repeat=3):
        lp = sum(float(log_ref[tree.index[y[:d]], y[d]]) for d in range(3))
        R = sum(float(tree.r[tree.index[y[:d]], y[d]]) for d in range(3))
        weights[y[0]] += math.exp(lp + R / beta)
    assert torch.allclose(weights / weights.sum(), pi[()], atol=1e-10)


# ----------------------------------------------------------------------------------------------
# DRO-V with V ≡ 0 (SHIQ_MATH §5): not π*, but a closed form


def bisect(f, lo, hi, iters=100):
    """Root of an increasing ``f`` in ``[lo, hi]`` (``f(lo) ≤ 0 ≤ f(hi)``)."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


def dro_zero_value_optimum(log_ref, R, w, beta):
    """The minimiser over distributions ``p`` of ``Σ_y w(y) ½ (R(y) − β log p(y)/π_ref(y))²`` (SHIQ_MATH §5).

    Stationarity under ``Σ p = 1``: ``w(y) δ(y) = κ p(y)`` with ``δ = R − β log p/π_ref``. With
    ``x = p / w``: ``log x + κ x / β = log b``, ``b = π_ref e^{R/β} / w`` (one root per ``y`` for ``κ ≥ 0``),
    and ``κ`` is fixed by ``Σ w x = 1``. ``κ ≥ 0`` iff ``E_ref e^{R/β} ≥ 1``, which the tests ensure.
    Returns ``p`` and ``κ`` (plain floats, independent of torch).
    """
    log_b = [lr + r / beta - math.log(wi) for lr, r, wi in zip(log_ref, R, w)]

    def x_of(kappa):
        # u = log x solves u + κ e^u / β = log b, increasing in u; the root lies in [log b − κ b / β, log b]
        return [
            math.exp(bisect(lambda u: u + kappa * math.exp(u) / beta - lb, lb - kappa * math.exp(lb) / beta, lb))
            for lb in log_b
        ]

    mass = lambda kappa: sum(wi * xi for wi, xi in zip(w, x_of(kappa)))
    assert mass(0.0) >= 1.0, "the reference solver assumes E_ref exp(R/β) ≥ 1"
    hi = 1.0
    while mass(hi) > 1.0:
        hi *= 2
    kappa = bisect(lambda k: 1.0 - mass(k), 0.0, hi)
    return [wi * xi for wi, xi in zip(w, x_of(kappa))], kappa


def _bandit_dro(ref, r, counts, beta):
    """Minimise ``dro_v_loss`` (V ≡ 0) on a bandit data set holding arm ``a`` ``counts[a]`` times."""
    arms = torch.tensor([a for a, n in enumerate(counts) for _ in range(n)])
    logits = ref.clone().requires_grad_(True)
    mask = torch.ones(len(arms), 1, dtype=torch.bool)
    opt = torch.optim.LBFGS(
        [logits], max_iter=100, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        c = logits[arms].view(-1, 1)
        z = torch.logsumexp(logits, 0).expand(len(arms)).reshape(-1, 1)
        cr = ref[arms].view(-1, 1)
        zr = torch.logsumexp(ref, 0).expand(len(arms)).reshape(-1, 1)
        loss = dro_v_loss(c, z, cr, zr, r[arms].view(-1, 1), mask, beta=beta)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return torch.softmax(logits.detach(), 0)


def test_dro_v_bandit_minimiser_is_the_closed_form_not_pi_star():
    """V ≡ 0 on reference-centred rewards (so E_ref e^{R/β} > 1 by Jensen): the minimiser is the
    closed form of SHIQ_MATH §5, with κ > 0, and it is far from π*."""
    beta = 0.5
    g = torch.Generator().manual_seed(7)
    ref = torch.randn(5, generator=g, dtype=F64)
    r = torch.randn(5, generator=g, dtype=F64)
    log_ref = torch.log_softmax(ref, 0)
    r = r - (log_ref.exp() * r).sum()  # E_ref R = 0
    counts = [1, 3, 2, 5, 4]
    w = [n / sum(counts) for n in counts]
    want, kappa = dro_zero_value_optimum(log_ref.tolist(), r.tolist(), w, beta)
    got = _bandit_dro(ref, r, counts, beta)
    assert kappa > 0.1
    assert torch.allclose(got, torch.tensor(want, dtype=F64), atol=1e-7)
    pi_star = torch.softmax(ref + r / beta, 0)
    assert float((got - pi_star).abs().max()) > 0.05
    # the residuals are κ p / w, not a constant: larger where the policy puts more mass than the data
    delta = r - beta * (torch.log(got) - log_ref)
    assert torch.allclose(delta * torch.tensor(w, dtype=F64), kappa * got, atol=1e-7)


def test_dro_v_bandit_minimiser_is_pi_star_when_the_soft_value_is_zero():
    """Shift the rewards by V* = β log E_ref e^{R/β}: then κ = 0 and V ≡ 0 is the right value, so the
    minimiser is π* exactly, whatever the data weights (SHIQ_MATH §5)."""
    beta = 0.5
    g = torch.Generator().manual_seed(8)
    ref = torch.randn(5, generator=g, dtype=F64)
    r = torch.randn(5, generator=g, dtype=F64)
    log_ref = torch.log_softmax(ref, 0)
    r = r - beta * torch.logsumexp(log_ref + r / beta, 0)
    got = _bandit_dro(ref, r, [1, 3, 2, 5, 4], beta)
    assert torch.allclose(got, torch.softmax(ref + r / beta, 0), atol=1e-7)


@pytest.mark.parametrize("reward", ["sequence", "token"])
def test_dro_v_tree_minimiser_is_the_closed_form_over_sequences(reward):
    """A depth-3 tree, every trajectory once as a padded row (prompt position, junk statistics off the
    actions): the sequence distribution of the minimiser is the closed form over the 27 leaves with
    uniform data weights, far from π*'s."""
    beta = 0.5
    tree = Tree(depth=3, seed=22, reward=reward)
    log_ref = torch.log_softmax(tree.ref_logits, -1)
    leaves = list(itertools.product(range(V), repeat=3))
    lp_ref = [sum(float(log_ref[tree.index[y[:d]], y[d]]) for d in range(3)) for y in leaves]
    R = [sum(float(tree.r[tree.index[y[:d]], y[d]]) for d in range(3)) for y in leaves]
    mean_R = sum(math.exp(lp) * rr for lp, rr in zip(lp_ref, R))
    R = [rr - mean_R for rr in R]  # centred under the reference: E_ref e^{R/β} > 1
    for b, y in enumerate(leaves):  # put the centred sequence reward back into the tree's token rewards
        tree.r[tree.index[y[:2]], y[2]] = R[b] - sum(float(tree.r[tree.index[y[:d]], y[d]]) for d in range(2))
    want, kappa = dro_zero_value_optimum(lp_ref, R, [1 / len(leaves)] * len(leaves), beta)
    logits, _ = minimise(tree, lambda *s: dro_v_loss(*s, beta=beta))
    log_pi = torch.log_softmax(logits, -1)
    got = [math.exp(sum(float(log_pi[tree.index[y[:d]], y[d]]) for d in range(3))) for y in leaves]
    assert kappa > 0.05
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-6
    star = torch.tensor([lp + rr / beta for lp, rr in zip(lp_ref, R)]).softmax(0)
    assert float((torch.tensor(got) - star).abs().max()) > 0.05
