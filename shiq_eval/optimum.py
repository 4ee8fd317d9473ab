"""A policy against the optimum of the KL-regularised objective (SHIQ_MATH §9).

- ``J(π) = E[R] − β·KL(π‖π_ref)`` at the policy's own ``β``, per prompt and averaged, with its
  standard error; the reference has ``J(π_ref) = E_{π_ref}[R]`` (KL 0).
- ``J*(x) = β log E_{y~π_ref(·|x)} exp(R(x, y)/β)``, the attainable optimum for a sequence-level
  reward, estimated from ``N`` reference samples per prompt by ``β log mean_i exp(R_i/β)``. The
  estimate is biased low for small ``N`` (Jensen), so :func:`j_star_curve` shows it as ``N`` grows.
- Differences between two policies on the same prompts are paired by prompt.
- Values that come in correlated clusters (the turns of one multi-turn scenario) get a standard
  error clustered by scenario (:func:`clustered_mean_stderr`), not one that treats them as independent.

Inputs are per-prompt arrays (numpy or anything ``np.asarray`` takes); everything is float64.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Sequence

import numpy as np


def _vector(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds non-finite values")
    return a


def check_beta(beta, name: str = "beta") -> float:
    """``beta`` as a float, or a ValueError naming ``name`` unless it is a finite real number > 0.

    A bool or a string is not a number; a one-element tensor is (read without importing torch). The same
    values as ``shiq_train.losses.check_beta``, which needs torch."""
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported
    tensor = torch is not None and isinstance(beta, torch.Tensor) and beta.numel() == 1 and beta.dtype != torch.bool
    number = isinstance(beta, numbers.Real) and not isinstance(beta, bool)
    value = float(beta) if number or tensor else math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {beta!r}")
    return value


def whole_number(x, name: str) -> int:
    """``x`` as an int, or a ValueError unless it is an integer (``2.0`` and ``np.int64(2)`` are; ``2.5`` is not)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not float(x).is_integer():
        raise ValueError(f"{name} must be a whole number, got {x!r}")
    return int(x)


def mean_stderr(values) -> tuple[float, float]:
    """Mean and standard error of the mean (``std(ddof=1)/sqrt(n)``, SHIQ_MATH §9; NaN for one value, whose spread is
    undefined: written as null, :func:`undefined_as_null`). The spread is taken of the values scaled to at most
    1 and scaled back, so values near 1e200 (J at a large β) give a finite one where their squares would
    overflow."""
    v = _vector(values, "values")
    scale = _scale(v)
    se = float((v / scale).std(ddof=1) / math.sqrt(v.size) * scale) if v.size > 1 else math.nan
    return _mean(v), se


ERROR_SUFFIXES = ("_stderr", "_se", "_sd", "_std")  # the keys of standard errors and deviations in results


def is_error_key(key) -> bool:
    """Whether a results key names a standard error or deviation (``stderr``, ``*_stderr``, ``*_se``,
    ``*_sd``, ``*_std``): the fields :func:`undefined_as_null` writes as null when they are undefined (NaN)."""
    return isinstance(key, str) and (key == "stderr" or key.endswith(ERROR_SUFFIXES))


def undefined_as_null(obj):
    """``obj`` (JSON-like: dicts, lists, tuples) with every NaN under an error key (:func:`is_error_key`), or
    in a list under one (a curve of deviations), as None: an undefined standard error or deviation (one
    prompt, one scenario, one seed) is null in JSON and empty in CSV, never 0 (a zero-width interval). Any
    other NaN is left, for the writer to refuse."""
    if isinstance(obj, dict):
        return {k: _nan_as_none(v) if is_error_key(k) else undefined_as_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [undefined_as_null(v) for v in obj]
    return obj


def _nan_as_none(value):
    """An error key's value with its NaN (or its list's NaNs) as None."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_nan_as_none(v) for v in value]
    return undefined_as_null(value)


def null_as_undefined(obj):
    """The inverse of :func:`undefined_as_null` for a file read back: None under an error key (or in a list under
    one) as NaN, so arithmetic on it gives NaN (undefined), not a TypeError. A 0.0 of an older file stays 0.0."""
    if isinstance(obj, dict):
        return {k: _none_as_nan(v) if is_error_key(k) else null_as_undefined(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [null_as_undefined(v) for v in obj]
    return obj


def _none_as_nan(value):
    """An error key's value read back with its None (or its list's Nones, as :func:`_nan_as_none` wrote them) as NaN."""
    if value is None:
        return math.nan
    if isinstance(value, list):
        return [_none_as_nan(v) for v in value]
    return null_as_undefined(value)


def error_text(se, fmt: str = ".3f") -> str:
    """A standard error as text: ``–`` where it is undefined (NaN, or None as read from a file), as the
    Markdown tables show an error over one prompt, scenario or seed."""
    return "–" if se is None or math.isnan(se) else format(se, fmt)


def t_quantile(df: int, level: float = 0.95) -> float:
    """Student's t quantile with ``df`` degrees of freedom that a two-sided ``level`` interval spans, in standard
    errors (12.71 for 1, 4.30 for 2, 2.78 for 4, toward 1.96): what a standard error clustered over ``G``
    clusters is multiplied by, with ``G − 1`` (SHIQ_MATH §9); ±1.96 of it covers about 88% at ``G = 5``.
    scipy's ``t.ppf``."""
    from scipy.stats import t  # heavy: only reports need it

    df = whole_number(df, "df")
    if df < 1 or not 0 < level < 1:
        raise ValueError(f"t_quantile needs df >= 1 and 0 < level < 1, got df {df}, level {level}")
    return float(t.ppf(0.5 + level / 2, df))


def _mean(v: np.ndarray) -> float:
    """The mean of ``v``; where its sum could overflow (values past 1e300), of ``v / max |v|``, scaled back."""
    scale = _scale(v)
    return float(v.mean()) if scale < 1e300 else float((v / scale).mean() * scale)


def _scale(v: np.ndarray) -> float:
    """``max |v|``, or 1 when that is 0: what values are divided by before they are squared."""
    m = float(np.abs(v).max())
    return m if m > 0 else 1.0


def clustered_mean_stderr(values, clusters) -> tuple[float, float]:
    """Mean of ``values [N]`` and its standard error when values of one cluster (``clusters [N]``: any
    hashable labels, e.g. the turns of one multi-turn scenario) may be correlated and clusters are
    independent (SHIQ_MATH §9): ``se² = G/(G−1) · Σ_c (Σ_{i∈c} (v_i − v̄))² / N²`` over ``G`` clusters;
    NaN (undefined) for one cluster. With one value per cluster it is :func:`mean_stderr`'s; with clusters of equal
    size, the standard error of the cluster means."""
    v = _vector(values, "values")
    labels = list(clusters)
    if len(labels) != v.size:
        raise ValueError(f"{v.size} values but {len(labels)} cluster labels")
    codes: dict = {}
    idx = np.array([codes.setdefault(c, len(codes)) for c in labels])  # [N] cluster numbers
    g = len(codes)
    mean = _mean(v)
    if g < 2:
        return mean, math.nan
    scale = _scale(v)
    sums = np.bincount(idx, weights=(v - mean) / scale, minlength=g)  # [G], scaled as in mean_stderr
    return mean, float(math.sqrt(g / (g - 1) * float((sums**2).sum())) / v.size * scale)


def per_prompt(values, samples_per_prompt: int) -> np.ndarray:
    """Per-completion values in prompt-major order ``[P * s]`` (prompt ``i``'s ``s`` samples at
    ``i*s .. i*s+s-1``) as per-prompt means ``[P]``: the unit that paired differences and standard errors
    over prompts use (SHIQ_MATH §9)."""
    v = _vector(values, "values")
    s = whole_number(samples_per_prompt, "samples_per_prompt")
    if s < 1 or v.size % s:
        raise ValueError(f"{v.size} values do not split into prompts of {samples_per_prompt} samples each")
    return v.reshape(-1, s).mean(1)


def j_per_prompt(rewards, kls, beta) -> np.ndarray:
    """``J_i = R_i − β·KL_i`` per prompt (SHIQ_MATH §9), ``[N]``: ``rewards`` and ``kls`` ``[N]``, one
    (sample-mean) reward and one KL per prompt."""
    r, k = _vector(rewards, "rewards"), _vector(kls, "kls")
    if r.shape != k.shape:
        raise ValueError(f"rewards {r.shape} and kls {k.shape} must have the same shape")
    return r - check_beta(beta) * k


def j_value(rewards, kls, beta) -> tuple[float, float]:
    """``J = mean_i (R_i − β·KL_i)`` and its standard error over prompts (SHIQ_MATH §9)."""
    return mean_stderr(j_per_prompt(rewards, kls, beta))


def paired_difference(a, b, clusters=None) -> tuple[float, float]:
    """``mean(a − b)`` and its standard error, paired by prompt (``a[i]``, ``b[i]`` on prompt ``i``);
    with ``clusters``, clustered as in :func:`clustered_mean_stderr` (SHIQ_MATH §9)."""
    a, b = _vector(a, "a"), _vector(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same prompts: shapes {a.shape} and {b.shape}")
    return mean_stderr(a - b) if clusters is None else clustered_mean_stderr(a - b, clusters)


def soft_value(samples, beta) -> float:
    """``β log mean_i exp(R_i/β)`` of one prompt's reference rewards ``[N]``, by log-sum-exp (SHIQ_MATH §9):
    ``m + β log1p(mean_i expm1((R_i − m)/β))`` with ``m = max R``, which neither overflows for small ``β``
    nor rounds ``exp`` of a tiny argument to 1 for large ``β`` (where the value tends to ``mean R``)."""
    r = _vector(samples, "samples")
    beta = check_beta(beta)
    m = r.max()
    return float(m + beta * np.log1p(np.mean(np.expm1((r - m) / beta))))


def j_star(ref_rewards, beta) -> np.ndarray:
    """Per-prompt ``J*(x)`` estimates from reference samples ``ref_rewards`` ``[P, N]`` (SHIQ_MATH §9), ``[P]``."""
    r = np.asarray(ref_rewards, dtype=np.float64)
    if r.ndim != 2 or 0 in r.shape:
        raise ValueError(f"ref_rewards must be [prompts, samples], got shape {r.shape}")
    return np.array([soft_value(row, beta) for row in r])


def j_star_curve(ref_rewards, beta, sizes: Sequence[int] | None = None) -> list[dict]:
    """How the ``J*`` estimate moves with the number of reference samples: for each ``n`` in ``sizes``
    (default 1, 2, 4, ... up to ``N``), the mean over prompts of the estimate from the first ``n``
    samples, with its standard error over prompts (SHIQ_MATH §9). A converged estimate changes little between the
    last sizes; a still-rising one says ``N`` is too small (the estimate is biased low)."""
    r = np.asarray(ref_rewards, dtype=np.float64)
    if r.ndim != 2 or 0 in r.shape:
        raise ValueError(f"ref_rewards must be [prompts, samples], got shape {r.shape}")
    n_max = r.shape[1]
    if sizes is None:
        sizes = sorted({min(2**k, n_max) for k in range(int(math.log2(n_max)) + 2)})
    out = []
    for n in sizes:
        n = whole_number(n, "sample size")
        if not 1 <= n <= n_max:
            raise ValueError(f"sample size {n} out of range 1..{n_max}")
        mean, se = mean_stderr(j_star(r[:, :n], beta))
        out.append({"samples": int(n), "j_star": mean, "j_star_stderr": se})
    return out
