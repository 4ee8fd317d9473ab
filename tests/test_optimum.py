"""J, J* and paired differences (SHIQ_MATH §9) against independent references: arbitrary-precision
arithmetic (mpmath), the closed form of J* for Gaussian rewards, and the statistics module."""

import math
import statistics

import mpmath
import numpy as np
import pytest

from shiq_eval.optimum import (
    clustered_mean_stderr,
    j_per_prompt,
    j_star,
    j_star_curve,
    j_value,
    mean_stderr,
    paired_difference,
    per_prompt,
    soft_value,
)


def _mp_soft_value(samples, beta):
    mpmath.mp.dps = 60
    total = mpmath.fsum(mpmath.exp(mpmath.mpf(float(r)) / mpmath.mpf(beta)) for r in samples)
    return float(mpmath.mpf(beta) * mpmath.log(total / len(samples)))


@pytest.mark.parametrize("beta", [1.0, 0.3, 0.05, 1e-2, 1e8, 1e15])
@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_soft_value_matches_arbitrary_precision(beta, scale):
    rng = np.random.default_rng(0)
    samples = rng.normal(size=7) * scale
    # R/beta up to ~1e5 (a plain exp overflows) and down to ~1e-15 (a plain exp rounds to 1: the value
    # then tends to the mean reward, which 1e15 got wrong by 0.05 before)
    assert soft_value(samples, beta) == pytest.approx(_mp_soft_value(samples, beta), rel=1e-12, abs=1e-9)
    assert samples.mean() <= soft_value(samples, beta) <= samples.max() + 1e-12  # between mean and max


def test_j_star_of_gaussian_rewards_converges_to_the_closed_form():
    """For R ~ N(mu, sigma^2), beta log E exp(R/beta) = mu + sigma^2 / (2 beta)."""
    rng = np.random.default_rng(1)
    mu, sigma, beta = 0.3, 0.5, 0.5
    truth = mu + sigma**2 / (2 * beta)
    rewards = rng.normal(mu, sigma, size=(40, 5000))
    est = j_star(rewards, beta)
    assert est.shape == (40,)
    assert abs(est.mean() - truth) < 0.01
    curve = j_star_curve(rewards, beta)
    assert [c["samples"] for c in curve][0] == 1 and curve[-1]["samples"] == 5000
    assert curve[-1]["j_star"] == pytest.approx(est.mean())
    # biased low for few samples (Jensen): one sample is the plain mean reward
    assert curve[0]["j_star"] == pytest.approx(rewards[:, 0].mean())
    assert curve[0]["j_star"] < curve[2]["j_star"] < truth


def test_j_and_paired_difference_against_the_statistics_module():
    rng = np.random.default_rng(2)
    r, k, r_ref = rng.normal(size=50), rng.exponential(size=50), rng.normal(size=50)
    beta = 0.3
    per = [ri - beta * ki for ri, ki in zip(r, k)]
    mean, se = j_value(r, k, beta)
    assert mean == pytest.approx(statistics.fmean(per))
    assert se == pytest.approx(statistics.stdev(per) / math.sqrt(50))
    diff = [a - b for a, b in zip(per, r_ref)]
    d, dse = paired_difference(j_per_prompt(r, k, beta), r_ref)
    assert d == pytest.approx(statistics.fmean(diff)) and dse == pytest.approx(statistics.stdev(diff) / math.sqrt(50))
    mean, se = mean_stderr([2.0])  # one value: its error undefined (NaN, null when written), not 0 (exact)
    assert mean == 2.0 and math.isnan(se)


def test_standard_errors_of_huge_values_are_finite():
    """J at β = 1e100 with KLs of 1e100 is about 1e200: its squares overflow float64, so the standard error was
    inf in the leaderboard's CSV. statistics.stdev works in exact fractions: the reference."""
    from shiq_eval.optimum import clustered_mean_stderr

    values = [1e200, -1e200, 3e199, 7e199]
    mean, se = mean_stderr(values)
    assert mean == pytest.approx(statistics.fmean(values))
    assert se == pytest.approx(statistics.stdev(values) / 2, rel=1e-12) and math.isfinite(se)
    # one value per cluster: the clustered error is the plain one
    assert clustered_mean_stderr(values, [0, 1, 2, 3])[1] == pytest.approx(se, rel=1e-12)
    assert mean_stderr([0.0, 0.0]) == (0.0, 0.0)
    big = [1.7e308, 1.7e308, 1.0e308]  # their sum overflows: the mean was inf
    assert mean_stderr(big)[0] == pytest.approx(statistics.mean(big), rel=1e-12)
    assert clustered_mean_stderr(big, [0, 0, 1])[0] == pytest.approx(statistics.mean(big), rel=1e-12)


def test_clustered_standard_errors_against_cluster_means_and_singletons():
    """Independent references: with one value per cluster the clustered standard error is the plain
    one (``statistics.stdev/√n``); with clusters of equal size it is the standard error of the cluster
    means; correlated clusters give a larger one than treating every value as independent."""
    rng = np.random.default_rng(5)
    v = rng.normal(size=24)
    mean, se = clustered_mean_stderr(v, [f"s{i}" for i in range(24)])
    assert mean == pytest.approx(statistics.fmean(v)) and se == pytest.approx(statistics.stdev(v) / math.sqrt(24))
    labels = [f"s{i // 4}" for i in range(24)]  # 6 scenarios of 4 turns
    means = [statistics.fmean(v[i : i + 4]) for i in range(0, 24, 4)]
    mean, se = clustered_mean_stderr(v, labels)
    assert mean == pytest.approx(statistics.fmean(v)) and se == pytest.approx(statistics.stdev(means) / math.sqrt(6))
    shared = np.repeat(rng.normal(size=6), 4) + 0.1 * rng.normal(size=24)  # turns of a scenario alike
    assert clustered_mean_stderr(shared, labels)[1] > 1.5 * mean_stderr(shared)[1]
    # paired by turn, clustered by scenario: the clustered standard error of the differences
    b = rng.normal(size=24)
    assert paired_difference(v, b, labels) == pytest.approx(clustered_mean_stderr(v - b, labels))
    mean, se = clustered_mean_stderr([1.0, 3.0], ["a", "a"])  # one cluster: no spread to measure (NaN)
    assert mean == 2.0 and math.isnan(se)
    with pytest.raises(ValueError, match="cluster labels"):
        clustered_mean_stderr([1.0, 2.0], ["a"])


def test_clustered_standard_error_of_clusters_of_unequal_sizes_by_an_explicit_loop():
    """SHIQ_MATH §9's ``se² = G/(G−1) · Σ_c (Σ_{i∈c} (v_i − v̄))² / N²`` written as a loop over the clusters, on
    clusters of 1, 2, 3 and 4 values whose labels interleave; the paired difference is the same on ``a_i − b_i``.
    The references above have one value a cluster or clusters of one size, where an error that weighs every
    cluster's mean alike, whatever its size, passed."""
    labels = ["a", "b", "c", "b", "d", "c", "d", "d", "c", "d"]
    a = [0.3, -1.2, 2.0, 0.7, 1.1, 1.9, 0.4, 0.8, 2.6, 0.1]
    b = [0.1, 0.0, 0.5, -0.4, 1.0, 0.3, 0.2, 0.9, 0.6, -0.3]

    def by_loop(values):
        mean = sum(values) / len(values)
        g = len(set(labels))
        total = sum(sum(v - mean for v, c in zip(values, labels) if c == name) ** 2 for name in set(labels))
        return mean, math.sqrt(g / (g - 1) * total) / len(values)

    assert clustered_mean_stderr(a, labels) == pytest.approx(by_loop(a), rel=1e-12)
    diffs = [x - y for x, y in zip(a, b)]
    assert paired_difference(a, b, labels) == pytest.approx(by_loop(diffs), rel=1e-12)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: j_value([1.0, 2.0], [0.1], 1.0), "same shape"),
        (lambda: j_value([1.0], [0.1], 0.0), "beta"),
        (lambda: soft_value([1.0, float("nan")], 1.0), "non-finite"),
        (lambda: j_star([1.0, 2.0], 1.0), r"\[prompts, samples\]"),
        (lambda: paired_difference([1.0, 2.0], [1.0]), "same prompts"),
        (lambda: j_star_curve([[1.0, 2.0]], 1.0, sizes=[3]), "out of range"),
        (lambda: j_star_curve([[1.0, 2.0]], 1.0, sizes=[2.0, 1.5]), "sample size must be a whole number"),
        (lambda: per_prompt([1.0, 2.0, 3.0, 4.0], 2.5), "samples_per_prompt must be a whole number"),
        (lambda: j_value([1.0], [0.1], True), "beta"),
        (lambda: j_value([1.0], [0.1], "0.5"), "beta"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_vader_gold_scorer_reads_sentiment():
    from shiq_eval.scorers import VaderScorer

    good, bad, flat = VaderScorer()(["", "", ""], ["a wonderful, moving film", "dull, boring and awful", "the"])
    assert -1.0 <= bad < 0.0 == flat < good <= 1.0


@pytest.mark.parametrize(
    "df, t95, t90", [(1, 12.706, 6.314), (2, 4.303, 2.920), (4, 2.776, 2.132), (9, 2.262, 1.833), (120, 1.980, 1.658)]
)
def test_t_quantile_is_students(df, t95, t90):
    """The two-sided Student t quantile that clustered standard errors over G clusters are multiplied by
    (G − 1 degrees of freedom), against a printed table's three decimals; 1.96 would cover about 88% at
    G = 5."""
    from shiq_eval import optimum

    assert optimum.t_quantile(df) == pytest.approx(t95, abs=5e-4)
    assert optimum.t_quantile(df, 0.9) == pytest.approx(t90, abs=5e-4)


def test_t_quantile_refuses_no_degrees_of_freedom():
    from shiq_eval import optimum

    with pytest.raises(ValueError, match="df >= 1"):
        optimum.t_quantile(0)


def test_null_as_undefined_reads_back_what_undefined_as_null_wrote_in_lists_under_error_keys():
    """undefined_as_null writes a NaN in a list under an error key (a curve of deviations) as null; reading the
    file back gave None there (a TypeError in arithmetic) where a lone null under the key gave NaN."""
    import json

    from shiq_eval.optimum import null_as_undefined, undefined_as_null

    row = {"reward_sd": [math.nan, 0.25], "J_se": math.nan, "curve": [{"j_star_stderr": math.nan}], "ids": [None]}
    back = null_as_undefined(json.loads(json.dumps(undefined_as_null(row))))
    assert math.isnan(back["reward_sd"][0]) and back["reward_sd"][1] == 0.25
    assert math.isnan(back["J_se"]) and math.isnan(back["curve"][0]["j_star_stderr"])
    assert back["ids"] == [None]  # a null under another key is left as it is
