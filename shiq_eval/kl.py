"""KL-to-reference estimators on generated samples (SHIQ_MATH §6).

Both estimate the sequence-level ``KL(π(·|x) ‖ π_ref(·|x))`` from completions ``y ~ π``:

- the sample estimate ``Σ_t ρ_t`` with ``ρ_t = log π(y_t|s_t) − log π_ref(y_t|s_t)``, from the
  per-token statistics alone;
- the per-token exact sum ``Σ_t KL(π(·|s_t) ‖ π_ref(·|s_t))``, which needs the full distributions at
  each visited state but has lower variance (the randomness of ``y_t`` itself is integrated out).
"""

from __future__ import annotations

import math

import torch


def sample_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence sample estimate ``Σ_t m_t ρ_t`` (SHIQ_MATH §6), ``[B]``.

    Args: logprobs, ref_logprobs ``[B, T]`` log-probabilities of the sampled tokens under π and
    π_ref (``c − z`` of SHIQ_MATH §2); mask ``[B, T]`` bool, True on generated tokens. A position off the mask
    adds nothing, whatever it holds (a padded position's ``−inf``).
    """
    return torch.where(mask, logprobs.double() - ref_logprobs.double(), 0.0).sum(-1)


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """``KL(π(·|s_t) ‖ π_ref(·|s_t))`` at every position from full logits (SHIQ_MATH §6), ``[B, T]``.

    Args: logits, ref_logits ``[B, T, V]`` (the distributions over the token at ``t + 1`` when they
    come straight from a causal LM: align them with the mask accordingly).
    """
    return kl_from_log_probs(torch.log_softmax(logits.double(), -1), torch.log_softmax(ref_logits.double(), -1))


ROUNDING = 1e-9  # a float64 sum over a vocabulary of 10^5 terms of at most 50 in size errs by well below this


def rounded_to_zero(kl: torch.Tensor) -> torch.Tensor:
    """``kl`` (exact KLs summed in float64) with the values a rounding error put just below 0 (down to
    ``-ROUNDING``) as 0: a KL is ``>= 0`` (Gibbs' inequality), and the sum falls a few ulps below it when the two
    distributions are one. A value further below is kept, visible: no rounding makes it, a bug does (a ``logq``
    not normalised). NaN and ``+inf`` are kept."""
    return torch.where((kl < 0) & (kl >= -ROUNDING), 0.0, kl)


def kl_from_log_probs(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ q) = Σ_a p(a) (log p(a) − log q(a))`` over the last dimension (SHIQ_MATH §6), ``[...]``.

    Args: logp, logq ``[..., V]`` normalised log-probabilities (a ``log_softmax``), float64 for the sums.
    A token ``p`` cannot emit (``log p = −inf``, a masked logit) adds 0, as ``0 log 0 = 0``; one ``q`` cannot
    emit and ``p`` can makes the KL ``+inf``; a NaN in ``p`` makes it NaN (undefined), not 0. A sum a rounding error
    put just below 0 (``p`` is ``q``) is 0 (:func:`rounded_to_zero`).
    """
    p = logp.exp()
    return rounded_to_zero(torch.where(p == 0, 0.0, p * (logp - logq)).sum(-1))


def masked_kls(
    logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, chunk: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both per-sequence estimators ``(sample [B], exact [B])`` (SHIQ_MATH §6) from the two models' logits:
    :func:`sample_kl` and :func:`exact_token_kl` of the float64 log-softmaxes, the same numbers bit for bit,
    with the vocabulary read only at the masked positions, ``chunk`` positions at a time (two float64
    ``[B, T, V]`` tensors and their temporaries would cost 5x the time in memory traffic).

    Args: logits, ref_logits ``[B, T, V]`` (position ``t``: the distributions over token ``t``); targets
    ``[B, T]`` the sampled tokens; mask ``[B, T]`` bool, True on generated tokens.
    """
    ratio = torch.zeros(mask.shape, dtype=torch.float64)  # [B, T] log π(y_t) − log π_ref(y_t), 0 off the mask
    kl = torch.zeros(mask.shape, dtype=torch.float64)  # [B, T] KL(π ‖ π_ref) at each position, 0 off the mask
    rows, cols = mask.nonzero(as_tuple=True)
    for s in range(0, len(rows), chunk):
        b, t = rows[s : s + chunk], cols[s : s + chunk]
        logp, logq = (torch.log_softmax(x[b, t].double(), -1) for x in (logits, ref_logits))  # [c, V]
        y = targets[b, t][:, None]  # [c, 1]
        ratio[b, t] = (logp.gather(-1, y) - logq.gather(-1, y))[:, 0]
        kl[b, t] = kl_from_log_probs(logp, logq)
    return sample_kl(ratio, torch.zeros_like(ratio), mask), exact_token_kl(kl, mask)


def exact_token_kl(token_kls: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence exact per-token sum ``Σ_t m_t KL(π(·|s_t) ‖ π_ref(·|s_t))`` (SHIQ_MATH §6), ``[B]``; a position
    off the mask adds nothing, whatever it holds (an infinite KL at a padded position)."""
    return torch.where(mask, token_kls.double(), 0.0).sum(-1)


def mean_stderr(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean of ``[N]`` per-sequence values (SHIQ_MATH §9; stderr NaN, undefined, when N = 1).
    Unlike :func:`shiq_eval.optimum.mean_stderr`, which refuses them, an infinite KL (a token the reference
    gives probability 0) is kept: the mean is then infinite, as the KL is, and its standard error NaN (undefined)."""
    v = values.double().flatten()
    n = v.numel()
    if n == 0:
        raise ValueError("mean_stderr needs at least one value")
    scale = 1.0
    largest = float(v.abs().max())
    if 2.0**500 < largest < math.inf:  # squares past 1e154 overflow float64: in a power of two near the largest
        scale = math.ldexp(1.0, math.frexp(largest)[1] - 1)  # the largest becomes 1 to 2
        v = v / scale
    se = float(v.std(unbiased=True)) * scale / math.sqrt(n) if n > 1 else math.nan
    return float(v.mean()) * scale, se
