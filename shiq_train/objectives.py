"""The registry of losses: the bridge between the trainer's config and ``losses`` (SHIQ_MATH §3-§5, §8).

``LOSSES`` holds one :class:`LossSpec` per loss name: what the loss reads (whole prompt groups, packed
rows, reference statistics) and how it is computed. The trainer's command line reads the spec to
choose the data mode; adding a loss is one entry here (plus its ``configs/loss/<name>.yaml``).
``compute_loss`` takes the per-token statistics and the batch fields every loss may need and returns
the loss plus the per-step metrics the trainer logs. It holds no math of its own. One entry,
``qsharp_value``, trains Q♯'s value model instead of the policy (``trains="value"``, SHIQ_MATH §8): the
command line hands it to ``shiq_train.qsharp_train``, and the policy trainer refuses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from shiq_train import losses as L

TERMS = "loss_terms"  # the metric: how many terms the loss averages (SHIQ_MATH §3, §5)
TRAJECTORIES = "trajectories"  # the metric: how many trajectories ``reward`` and ``log_ratio`` average


def _dpo(beta, stats, rewards, action_mask, group_ids, returns):
    """DPO (SHIQ_MATH §5) over every (better, worse) pair of a group, by return; logs the pair count.
    Its terms: the pairs."""
    w, l = L.preference_pairs(returns.detach(), group_ids)
    return L.dpo_loss(*stats, action_mask, w, l, beta=beta), {"pairs": float(w.numel()), TERMS: int(w.numel())}


def _copg(beta, stats, rewards, action_mask, group_ids, returns):
    """CoPG (SHIQ_MATH §5) over every pair of a group. Its terms: the groups that have a pair."""
    i, _ = L.group_pairs(group_ids)
    groups = int(torch.unique(group_ids[i]).numel())
    return L.copg_loss(*stats, rewards, action_mask, group_ids, beta=beta), {TERMS: groups}


def _dro_v(beta, stats, rewards, action_mask, segment_ids):
    """The paper's single-trajectory DRO as reconstructed in SHIQ_MATH §5: one network, ``V ≡ 0``.
    Its terms: the trajectories that have an action."""
    n = int(L.trajectory_sums(action_mask, action_mask, segment_ids).numel())
    return L.dro_v_loss(*stats, rewards, action_mask, beta=beta, segment_ids=segment_ids), {TERMS: n}


def _sft(beta, stats, rewards, action_mask, segment_ids):
    """Supervised fine-tuning (SHIQ_MATH §5): mean NLL of the action tokens; ``beta`` and rewards unused.
    Its terms: the action tokens."""
    return L.sft_loss(stats[0], stats[1], action_mask), {TERMS: int(action_mask.sum())}


def _dro_v_loo(beta, stats, rewards, action_mask, group_ids, returns):
    """DRO-V (SHIQ_MATH §5) with the leave-one-out soft value of the group as ``V(x)``. Its terms: the
    rows that have an action."""
    values = L.loo_soft_value(returns, group_ids, beta=beta)
    n = int(action_mask.any(-1).sum())
    return L.dro_v_loss(*stats, rewards, action_mask, values, beta=beta), {TERMS: n}


GroupLossFn = Callable[..., "tuple[torch.Tensor, dict]"]
TrajectoryLossFn = Callable[..., "tuple[torch.Tensor, dict]"]
TRAINS = ("policy", "value")


@dataclass(frozen=True)
class LossSpec:
    """One loss of the family.

    ``needs_groups``: compares completions of one prompt, so micro-batches must hold whole prompt
    groups (with ``group_ids``). ``needs_pairs``: its terms are pairs of a group's rows (DPO, CoPG), so a buffer
    whose groups all hold one row gives it nothing to learn from. ``needs_preferences``: its pairs are ordered by
    return and ties dropped (DPO), so a buffer without two returns differing within a group gives it none either.
    ``packed_ok``: works on packed rows (several trajectories per row).
    ``needs_reference``: reads the reference statistics ``c_ref``, ``z_ref``. ``needs_rewards``: reads the
    rewards (a loss that does not may be given none). ``variant``: the
    ``losses.shiq_loss`` variant of a ShiQ-family loss. ``group_loss``: for a group loss,
    ``fn(beta, stats, rewards, action_mask, group_ids, returns) -> (loss, extra metrics)``.
    ``trajectory_loss``: for a sequence-level loss on single trajectories,
    ``fn(beta, stats, rewards, action_mask, segment_ids) -> (loss, extra metrics)``. The extra metrics of
    both hold ``loss_terms`` (:data:`TERMS`): how many terms the loss is the mean of.
    ``trains``: ``"policy"`` (the trainer's model, through ``compute_loss``) or ``"value"`` (Q♯'s value
    model, SHIQ_MATH §8, trained by ``shiq_train.qsharp_train``; neither a variant nor a group loss).
    """

    name: str
    description: str
    needs_groups: bool = False
    needs_pairs: bool = False
    needs_preferences: bool = False
    packed_ok: bool = False
    needs_reference: bool = True
    needs_rewards: bool = True
    variant: str | None = None
    group_loss: GroupLossFn | None = None
    trajectory_loss: TrajectoryLossFn | None = None
    trains: str = "policy"

    def __post_init__(self):
        if self.trains not in TRAINS:
            raise ValueError(f"loss {self.name!r}: trains must be one of {TRAINS}, got {self.trains!r}")
        if self.trains == "value":
            if (
                self.variant
                or self.group_loss
                or self.trajectory_loss
                or self.needs_groups
                or self.packed_ok
                or self.needs_reference
            ):
                raise ValueError(f"loss {self.name!r} trains a value model: it has no variant, group loss or flags")
            return
        if sum(x is not None for x in (self.variant, self.group_loss, self.trajectory_loss)) != 1:
            raise ValueError(
                f"loss {self.name!r}: give exactly one of variant (ShiQ family), group_loss and trajectory_loss"
            )
        if self.group_loss is not None and (not self.needs_groups or self.packed_ok):
            raise ValueError(f"loss {self.name!r}: a group loss reads whole prompt groups, never packed rows")


def _shiq(name, variant, description):
    return LossSpec(name, description, packed_ok=True, variant=variant)


def _group(name, fn, description, pairs=False):
    preferences = fn is _dpo  # (its pairs come from preference_pairs: ties dropped)
    return LossSpec(
        name, description, needs_groups=True, needs_pairs=pairs, needs_preferences=preferences, group_loss=fn
    )


LOSSES: dict[str, LossSpec] = {
    s.name: s
    for s in (
        _shiq("shiq", "shiq", "ShiQ, the full loss: multi-step, reference-centred, token-level (§3)"),
        _shiq("shiq_init", "init", "ShiQ without reward shaping (§4)"),
        _shiq("shiq_ms", "ms", "ShiQ single-step consistency (§4)"),
        _shiq("shiq_tk", "tk", "ShiQ on the first action of every turn only (§4)"),
        _group("dpo", _dpo, "DPO on pairs of a prompt's completions, preferred = larger return (§5)", pairs=True),
        _group("mt_dpo", _dpo, "multi-turn DPO: DPO on whole trajectories, cumulative turn reward (§5)", pairs=True),
        _group("copg", _copg, "CoPG over all pairs of a prompt's completions (§5)", pairs=True),
        _group("mt_copg", _copg, "multi-turn CoPG: CoPG with the cumulative turn reward (§5)", pairs=True),
        LossSpec(
            "dro_v",
            "the paper's single-trajectory DRO, reconstructed: ½(R − βΛ)², V ≡ 0, one network (§5)",
            packed_ok=True,
            trajectory_loss=_dro_v,
        ),
        _group("dro_v_loo", _dro_v_loo, "DRO-V with the leave-one-out soft value of the prompt's group (§5)"),
        LossSpec(
            "sft",
            "supervised fine-tuning: mean NLL of the action tokens, no reward, no reference (§5)",
            packed_ok=True,
            needs_reference=False,
            needs_rewards=False,
            trajectory_loss=_sft,
        ),
        LossSpec(
            "qsharp_value",
            "Q♯ value model: the reference's return distribution over atoms, for guided decoding (§8)",
            needs_reference=False,
            needs_rewards=False,  # returns-to-go of the buffer's rewards, read by shiq_train.qsharp_train
            trains="value",
        ),
    )
}
LOSS_NAMES = tuple(LOSSES)


@dataclass
class LossConfig:
    """One loss of the family, by its name in :data:`LOSSES`."""

    name: str = "shiq"
    beta: float = 0.1
    gamma: float = 1.0

    def __post_init__(self):
        if self.name not in LOSSES:
            raise ValueError(f"loss name must be one of {LOSS_NAMES}, got {self.name!r}")
        if LOSSES[self.name].trains != "policy":
            raise ValueError(
                f"loss {self.name!r} trains a {LOSSES[self.name].trains} model, not the policy: train it with "
                f"shiq-train loss={self.name} init=REFERENCE (shiq_train.qsharp_train), not with the policy trainer"
            )
        L.check_beta(self.beta, "loss.beta")
        if not (L._is_number(self.gamma) and 0.0 <= self.gamma <= 1.0):
            raise ValueError(f"loss.gamma must be a number in [0, 1], got {self.gamma!r}")
        if self.gamma != 1.0 and LOSSES[self.name].variant is None:
            raise ValueError(f"gamma < 1 is only defined for the ShiQ family, not {self.name!r}")

    @property
    def spec(self) -> LossSpec:
        return LOSSES[self.name]


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
        chosen_logits, logz, ref_chosen_logits, ref_logz, rewards: ``[B, T]``; action_mask ``[B, T]`` bool. A
            loss that reads no reference statistics (``needs_reference``: sft) or no rewards (``needs_rewards``)
            may be given None for them.
        group_ids: ``[B]`` int, completions of one prompt (required by the losses with ``needs_groups``).
        segment_ids: ``[B, T]`` int for packed rows (only the losses with ``packed_ok``).
    Returns:
        ``(loss, metrics)``; ``metrics["loss_terms"]`` (an int) is the number of terms ``loss`` is the mean of
        (action positions in the loss for the ShiQ family and SFT, pairs for DPO, groups with a pair for
        CoPG, trajectories with an action for DRO-V), with which a step of several micro-batches weighs
        them (``shiq_train.train_step.forward_backward``); the other metrics are detached floats:
        ``reward`` (mean return per trajectory),
        ``log_ratio`` (mean over trajectories of ``Λ = Σ_t m_t ρ_t``, SHIQ_MATH §2, §5, on the batch's
        rows), and for the ShiQ family ``abs_delta_mean`` / ``abs_delta_max`` over the positions in the
        loss. ``log_ratio`` is not KL(π‖π_ref): it is the sample estimate of that KL (§6) only on rows
        sampled from π; on buffer rows sampled from π_ref it estimates −KL(π_ref‖π). ``trajectories`` (an
        int, :data:`TRAJECTORIES`) counts the trajectories those two average, with which a step of several
        micro-batches or ranks weighs them (``shiq_train.train_step.forward_backward``).
    """
    spec = cfg.spec
    if ref_chosen_logits is None or ref_logz is None:
        if spec.needs_reference:
            raise ValueError(f"loss {cfg.name!r} reads the reference statistics: give ref_chosen_logits and ref_logz")
        ref_chosen_logits, ref_logz = chosen_logits.detach(), logz.detach()  # the policy's own: Λ is 0 in the logs
    if rewards is None:
        if spec.needs_rewards:
            raise ValueError(f"loss {cfg.name!r} reads the rewards: give rewards [B, T]")
        rewards = torch.zeros_like(chosen_logits, dtype=torch.float32)
    stats = (chosen_logits, logz, ref_chosen_logits, ref_logz)
    if segment_ids is not None and not spec.packed_ok:
        raise ValueError(
            f"loss {cfg.name!r} needs one trajectory per row, but the micro-batch is packed (segment_ids): "
            f"packed rows are for {[n for n, s in LOSSES.items() if s.packed_ok]}"
        )
    if spec.needs_groups and group_ids is None:
        raise ValueError(
            f"loss {cfg.name!r} needs group_ids (completions of one prompt): give it micro-batches of whole "
            "prompt groups (data.mode=groups)"
        )
    metrics = {}
    if spec.variant is not None:
        delta = L.shiq_td(
            *stats, rewards, action_mask, beta=cfg.beta, gamma=cfg.gamma, variant=spec.variant, segment_ids=segment_ids
        )
        used = L.loss_positions(action_mask, segment_ids, spec.variant)
        loss = L.mean_square(delta, used)
        d = delta.detach()[used].abs()
        metrics["abs_delta_mean"] = float(d.mean()) if d.numel() else 0.0
        metrics["abs_delta_max"] = float(d.max()) if d.numel() else 0.0
        metrics[TERMS] = int(used.sum())
        traj_returns, traj_log_ratio = _per_trajectory(stats, rewards, action_mask, segment_ids)
    elif spec.trajectory_loss is not None:
        loss, extra = spec.trajectory_loss(cfg.beta, stats, rewards, action_mask, segment_ids)
        metrics.update(extra)
        traj_returns, traj_log_ratio = _per_trajectory(stats, rewards, action_mask, segment_ids)
    else:
        L.check_group_batch(stats, rewards, action_mask, group_ids, cfg.beta)
        returns = L.sequence_return(rewards, action_mask)
        loss, extra = spec.group_loss(cfg.beta, stats, rewards, action_mask, group_ids, returns)
        metrics.update(extra)
        traj_returns = returns.detach()  # every row has an action (check_group_batch)
        traj_log_ratio = L.sequence_log_ratio(*stats, action_mask).detach()
    metrics["reward"] = float(traj_returns.mean()) if traj_returns.numel() else 0.0
    metrics["log_ratio"] = float(traj_log_ratio.mean()) if traj_log_ratio.numel() else 0.0
    metrics[TRAJECTORIES] = int(traj_returns.numel())
    return loss, metrics


@torch.no_grad()
def _per_trajectory(stats, rewards, action_mask, segment_ids):
    """Return and log-ratio sums per trajectory (per segment when packed), over trajectories with an action."""
    c, z, cr, zr = (s.double() for s in stats)
    rho = ((c - z) - (cr - zr)) * action_mask
    r = rewards.double() * action_mask
    if segment_ids is None or segment_ids.numel() == 0:  # (an empty packed micro-batch: no trajectory)
        has = action_mask.any(1)
        return r.sum(1)[has], rho.sum(1)[has]
    B = action_mask.shape[0]
    key = segment_ids.long() + (segment_ids.long().max() + 1) * torch.arange(B, device=segment_ids.device)[:, None]
    uniq, inv = torch.unique(key, return_inverse=True)
    sums = lambda x: torch.zeros(len(uniq), dtype=x.dtype, device=x.device).index_add(0, inv.flatten(), x.flatten())
    has = sums(action_mask.double()) > 0
    return sums(r)[has], sums(rho)[has]
