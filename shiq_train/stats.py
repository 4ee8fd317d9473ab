"""Per-token statistics from full logits: the one primitive every loss needs (SHIQ_MATH §2).

This is the reference implementation: it materialises ``[B, T, V]`` logits. The vocab-parallel and
chunked versions used by the trainer must agree with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenStats:
    """Chosen logit ``c`` and log-partition ``z`` of every position, both ``[B, T]`` float32."""

    chosen_logits: torch.Tensor
    logz: torch.Tensor

    @property
    def logprobs(self) -> torch.Tensor:
        """``log π(y_t | s_t) = c_t − z_t``, ``[B, T]``."""
        return self.chosen_logits - self.logz


def token_stats(logits: torch.Tensor, targets: torch.Tensor) -> TokenStats:
    """Chosen logit and log-partition of each target token (SHIQ_MATH §2).

    Args:
        logits: ``[B, T, V]`` any float dtype; ``logits[b, t]`` scores ``targets[b, t]``.
        targets: ``[B, T]`` int64 token ids.
    Returns:
        :class:`TokenStats` with ``[B, T]`` float32 tensors (float64 for float64 logits). Lower-precision
        logits are upcast to float32 before the max-shifted log-sum-exp, so bf16 inputs with large
        magnitudes stay exact to float32 rounding.
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [B, T, V] and targets [B, T]; got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[-1]):
        raise ValueError(f"targets hold token ids outside [0, {logits.shape[-1]})")
    x = logits if logits.dtype == torch.float64 else logits.float()
    chosen = x.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return TokenStats(chosen_logits=chosen, logz=torch.logsumexp(x, dim=-1))


def causal_lm_stats(logits: torch.Tensor, tokens: torch.Tensor) -> TokenStats:
    """Statistics aligned with ``tokens`` for a causal LM's logits.

    ``logits[b, t]`` predicts ``tokens[b, t + 1]``; the result at position ``t`` belongs to token ``t``
    (position 0, which no logit predicts, is zero). Shapes: logits ``[B, T, V]``, tokens ``[B, T]``.
    """
    st = token_stats(logits[:, :-1], tokens[:, 1:])
    pad = st.chosen_logits.new_zeros(tokens.shape[0], 1)
    return TokenStats(torch.cat([pad, st.chosen_logits], 1), torch.cat([pad, st.logz], 1))
