"""Choosing a loss by name: the bridge between the trainer's config and ``losses`` (SHIQ_MATH §3-§5).

``compute_loss`` takes the per-token statistics and the batch fields every loss may need and returns
the loss plus the per-step metrics the trainer logs. It holds no math of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shiq_train import losses as L

SHIQ_NAMES = {"shiq": "shiq", "shiq_init": "init", "shiq_ms": "ms", "shiq_tk": "tk"}
PAIR_NAMES = ("dpo", "mt_dpo", "copg", "mt_copg", "dro_v")
LOSS_NAMES = tuple(SHIQ_NAMES) + PAIR_NAMES


@dataclass
class LossConfig:
    """One loss of the family. ``mt_dpo`` / ``mt_copg`` are DPO / CoPG on multi-turn rows (§5)."""

    name: str = "shiq"
    beta: float = 0.1
    gamma: float = 1.0

    def __post_init__(self):
        if self.name not in LOSS_NAMES:
            raise ValueError(f"loss name must be one of {LOSS_NAMES}, got {self.name!r}")
        if not self.beta > 0:
            raise ValueError(f"loss beta must be > 0, got {self.beta}")
        if self.gamma != 1.0 and self.name not in SHIQ_NAMES:
            raise ValueError(f"gamma < 1 is only defined for the ShiQ family, not {self.name!r}")


def compute_loss(
    cfg: LossConfig,
    chosen_logits,
    logz,
    ref_chosen_logits,
    ref_logz,
    rewards,
    action_mask,
    group_ids=None,
    segment_ids=None,
):
    """The configured loss and its metrics.

    Args:
        chosen_logits, logz, ref_chosen_logits, ref_logz, rewards: ``[B, T]``; action_mask ``[B, T]`` bool.
        group_ids: ``[B]`` int, completions of one prompt (needed by the pair/group losses).
        segment_ids: ``[B, T]`` int for packed rows (ShiQ family only).
    Returns:
        ``(loss, metrics)``; metrics are detached floats: ``reward`` (mean return per trajectory),
        ``kl`` (mean sample estimate ``Σ_t ρ_t`` per trajectory, SHIQ_MATH §6), and for the ShiQ family
        ``abs_delta_mean`` / ``abs_delta_max`` over the positions in the loss.
    """
    stats = (chosen_logits, logz, ref_chosen_logits, ref_logz)
    metrics = {}
    if cfg.name in SHIQ_NAMES:
        variant = SHIQ_NAMES[cfg.name]
        loss = L.shiq_loss_packed(
            *stats, rewards, action_mask, segment_ids=segment_ids, beta=cfg.beta, gamma=cfg.gamma, variant=variant
        )
        with torch.no_grad():
            delta = L.shiq_td(
                *stats, rewards, action_mask, beta=cfg.beta, gamma=cfg.gamma, variant=variant, segment_ids=segment_ids
            )
            used = L.first_action_mask(action_mask, segment_ids) if variant == "tk" else action_mask
            d = delta[used].abs()
            metrics["abs_delta_mean"] = float(d.mean()) if d.numel() else 0.0
            metrics["abs_delta_max"] = float(d.max()) if d.numel() else 0.0
        traj_returns, traj_kl = _per_trajectory(stats, rewards, action_mask, segment_ids)
    else:
        if segment_ids is not None:
            raise ValueError(f"loss {cfg.name!r} needs one trajectory per row; packed batches are for the ShiQ family")
        if group_ids is None:
            raise ValueError(f"loss {cfg.name!r} needs group_ids (completions of one prompt)")
        returns = L.sequence_return(rewards, action_mask)
        if cfg.name in ("dpo", "mt_dpo"):
            w, l = L.preference_pairs(returns.detach(), group_ids)
            loss = L.dpo_loss(*stats, action_mask, w, l, beta=cfg.beta)
            metrics["pairs"] = float(w.numel())
        elif cfg.name in ("copg", "mt_copg"):
            loss = L.copg_loss(*stats, rewards, action_mask, group_ids, beta=cfg.beta)
        else:
            values = L.loo_soft_value(returns, group_ids, beta=cfg.beta)
            loss = L.dro_v_loss(*stats, rewards, action_mask, values, beta=cfg.beta)
        traj_returns = returns.detach()
        traj_kl = L.sequence_log_ratio(*stats, action_mask).detach()
    metrics["reward"] = float(traj_returns.mean()) if traj_returns.numel() else 0.0
    metrics["kl"] = float(traj_kl.mean()) if traj_kl.numel() else 0.0
    return loss, metrics


@torch.no_grad()
def _per_trajectory(stats, rewards, action_mask, segment_ids):
    """Return and log-ratio sums per trajectory (per segment when packed), over trajectories with an action."""
    c, z, cr, zr = (s.double() for s in stats)
    rho = ((c - z) - (cr - zr)) * action_mask
    r = rewards.double() * action_mask
    if segment_ids is None:
        has = action_mask.any(1)
        return r.sum(1)[has], rho.sum(1)[has]
    B = action_mask.shape[0]
    key = segment_ids.long() + (segment_ids.long().max() + 1) * torch.arange(B, device=segment_ids.device)[:, None]
    uniq, inv = torch.unique(key, return_inverse=True)
    sums = lambda x: torch.zeros(len(uniq), dtype=x.dtype, device=x.device).index_add(0, inv.flatten(), x.flatten())
    has = sums(action_mask.double()) > 0
    return sums(r)[has], sums(rho)[has]
