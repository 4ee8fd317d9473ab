"""KL estimators against the exact sequence KL of a tiny tabular autoregressive model (SHIQ_MATH §6)."""

import itertools
import math

import pytest
import torch

from shiq_eval.kl import exact_token_kl, kl_from_log_probs, masked_kls, mean_stderr, sample_kl, token_kl

V, T = 3, 3
F64 = torch.float64


def tables(seed):
    """Logits per prefix for π and π_ref: dict prefix -> [V]."""
    g = torch.Generator().manual_seed(seed)
    prefixes = [p for d in range(T) for p in itertools.product(range(V), repeat=d)]
    pol = {p: torch.randn(V, generator=g, dtype=F64) for p in prefixes}
    ref = {p: torch.randn(V, generator=g, dtype=F64) for p in prefixes}
    return pol, ref


def exact_sequence_kl(pol, ref):
    total = 0.0
    for y in itertools.product(range(V), repeat=T):
        lp = sum(float(torch.log_softmax(pol[y[:t]], 0)[y[t]]) for t in range(T))
        lq = sum(float(torch.log_softmax(ref[y[:t]], 0)[y[t]]) for t in range(T))
        total += torch.exp(torch.tensor(lp)).item() * (lp - lq)
    return total


def sample(pol, ref, n, seed):
    g = torch.Generator().manual_seed(seed)
    lp = torch.zeros(n, T, dtype=F64)
    lq = torch.zeros(n, T, dtype=F64)
    logits = torch.zeros(n, T, V, dtype=F64)
    ref_logits = torch.zeros(n, T, V, dtype=F64)
    for i in range(n):
        y = ()
        for t in range(T):
            a = int(torch.multinomial(torch.softmax(pol[y], 0), 1, generator=g))
            lp[i, t] = torch.log_softmax(pol[y], 0)[a]
            lq[i, t] = torch.log_softmax(ref[y], 0)[a]
            logits[i, t], ref_logits[i, t] = pol[y], ref[y]
            y = y + (a,)
    return lp, lq, logits, ref_logits


def test_both_estimators_are_unbiased_and_token_sum_has_lower_variance():
    pol, ref = tables(0)
    exact = exact_sequence_kl(pol, ref)
    lp, lq, logits, ref_logits = sample(pol, ref, 3000, seed=1)
    mask = torch.ones(lp.shape, dtype=torch.bool)
    m1, se1 = mean_stderr(sample_kl(lp, lq, mask))
    m2, se2 = mean_stderr(exact_token_kl(token_kl(logits, ref_logits), mask))
    assert abs(m1 - exact) < 4 * se1
    assert abs(m2 - exact) < 4 * se2
    assert se2 < se1


def test_token_kl_by_hand_and_mask():
    p = torch.tensor([[[0.0, 1.0]]], dtype=F64)
    q = torch.tensor([[[1.0, 0.0]]], dtype=F64)
    pp, qq = torch.softmax(p[0, 0], 0), torch.softmax(q[0, 0], 0)
    want = float((pp * (pp.log() - qq.log())).sum())
    assert float(token_kl(p, q)) == pytest.approx(want)
    assert float(token_kl(p, p)) == pytest.approx(0.0, abs=1e-15)
    kls = torch.tensor([[1.0, 2.0, 4.0]])
    assert float(exact_token_kl(kls, torch.tensor([[True, False, True]]))) == 5.0


@pytest.mark.parametrize("chunk", [1, 3, 16, 1000])
def test_masked_kls_equal_the_whole_tensor_computation_bit_for_bit(chunk):
    """``masked_kls`` against the estimators computed on the whole ``[B, T, V]`` tensors (float64
    log-softmax everywhere, then the masked sums): the same bits, whatever the chunk; a row with no
    generated token gives zeros."""
    g = torch.Generator().manual_seed(chunk)
    B, Tn, Vn = 5, 7, 301
    logits = 3 * torch.randn(B, Tn, Vn, generator=g)
    ref_logits = logits + torch.randn(B, Tn, Vn, generator=g)
    targets = torch.randint(0, Vn, (B, Tn), generator=g)
    mask = torch.rand(B, Tn, generator=g) < 0.7
    mask[2] = False
    logp, logq = (torch.log_softmax(x.double(), -1) for x in (logits, ref_logits))
    want_sample = sample_kl(
        logp.gather(-1, targets[..., None])[..., 0], logq.gather(-1, targets[..., None])[..., 0], mask
    )
    want_exact = exact_token_kl(token_kl(logits, ref_logits), mask)
    got_sample, got_exact = masked_kls(logits, ref_logits, targets, mask, chunk=chunk)
    assert torch.equal(got_sample, want_sample) and torch.equal(got_exact, want_exact)
    assert float(got_exact[2]) == 0.0 and float(got_exact.min()) >= 0 and float(got_exact.max()) > 0.1


def test_mean_stderr():
    m, se = mean_stderr(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert m == 2.5
    assert se == pytest.approx(torch.tensor([1.0, 2.0, 3.0, 4.0]).std().item() / 2)
    m, se = mean_stderr(torch.tensor([2.0]))  # one value: no spread to measure, NaN (undefined), not 0
    assert m == 2.0 and math.isnan(se)
    with pytest.raises(ValueError, match="mean_stderr needs at least one value"):
        mean_stderr(torch.tensor([]))


def test_mean_stderr_of_huge_values_is_exact_arithmetics():
    """Values near 1e155 (a KL of a nearly degenerate policy, in float64) gave an infinite standard error: their
    squares overflow. Checked against Python's statistics module (exact fractions)."""
    import statistics

    for values in ([1e155, -1e155, 3e155], [1e200, -3e200, 2e199], [2.0**600, 1.0, -(2.0**599)]):
        m, se = mean_stderr(torch.tensor(values, dtype=torch.float64))
        assert m == pytest.approx(statistics.mean(values), rel=1e-12)
        assert se == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)), rel=1e-12)
    values = [1.7e308, 1.7e308, 1.0e308]  # their sum overflows
    assert mean_stderr(torch.tensor(values, dtype=torch.float64))[0] == pytest.approx(statistics.mean(values))
    m, se = mean_stderr(torch.tensor([1.0, math.inf], dtype=torch.float64))
    assert m == math.inf and math.isnan(se)  # an infinite KL stays infinite


def test_a_token_the_policy_cannot_emit_adds_nothing_and_one_the_reference_cannot_makes_it_infinite():
    """A masked logit (−inf) is a zero-probability token: ``0 log 0 = 0`` in ``KL(p ‖ q)`` (SHIQ_MATH §6), by hand
    on three tokens; a token with p > 0 and q = 0 makes the KL infinite."""
    inf = float("inf")
    logits = torch.tensor([[[0.0, 0.0, -inf]]], dtype=F64)  # p = (1/2, 1/2, 0)
    ref = torch.tensor([[[0.0, math.log(3.0), 0.0]]], dtype=F64)  # q = (1/5, 3/5, 1/5)
    want = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.6)
    assert token_kl(logits, ref).item() == pytest.approx(want, rel=1e-12)
    assert token_kl(ref, logits).item() == inf
    tokens, mask = torch.tensor([[1]]), torch.tensor([[True]])
    sample, exact = masked_kls(logits, ref, tokens, mask)
    assert exact.item() == pytest.approx(want, rel=1e-12)
    assert sample.item() == pytest.approx(math.log(0.5 / 0.6), rel=1e-12)


def test_the_exact_kl_of_a_distribution_to_itself_is_zero_never_negative():
    """``p`` and ``q`` one distribution, from logits shifted by a constant: the rounded terms summed to a few ulps
    below 0 (-1.2e-16), a negative KL printed. A KL is ``>= 0`` (Gibbs' inequality): it is 0 now."""
    x = torch.randn(8, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kl = kl_from_log_probs(torch.log_softmax(x, -1), torch.log_softmax(x + 0.3, -1))
    assert (kl >= 0).all() and kl.max() < 1e-15, kl
    # a "KL" further below 0 is no rounding but a bug (here a log q not normalised: log p + 0.1): kept, visible
    logp = torch.log_softmax(x, -1)
    assert torch.allclose(kl_from_log_probs(logp, logp + 0.1), torch.full((8,), -0.1, dtype=torch.float64))


def test_a_policy_distribution_of_nan_gives_a_nan_kl_not_zero():
    """A NaN logit (a diverged model) makes the policy's distribution NaN: its KL is NaN (undefined), which the
    evaluation refuses, not 0, which would read as the reference itself (SHIQ_MATH §6)."""
    nan = float("nan")
    logits = torch.tensor([[[nan, 0.0, 1.0]]], dtype=F64)
    ref = torch.zeros(1, 1, 3, dtype=F64)
    assert math.isnan(token_kl(logits, ref).item())
    assert math.isnan(masked_kls(logits, ref, torch.tensor([[1]]), torch.tensor([[True]]))[1].item())


def test_positions_off_the_mask_add_nothing_even_when_infinite():
    """``Σ_t m_t ρ_t`` and ``Σ_t m_t KL_t`` sum the masked positions only (SHIQ_MATH §6): a padded position whose
    log-probabilities are −inf, or whose KL is infinite (a token the reference masks there), adds nothing; a
    product ``inf · 0`` made the whole sequence's estimate NaN."""
    inf = float("inf")
    mask = torch.tensor([[True, True, False]])
    lp, lq = torch.tensor([[-1.0, -2.0, -inf]], dtype=F64), torch.tensor([[-1.5, -1.0, -inf]], dtype=F64)
    assert sample_kl(lp, lq, mask).item() == pytest.approx(-0.5)
    assert exact_token_kl(torch.tensor([[0.25, 0.5, inf]], dtype=F64), mask).item() == 0.75
