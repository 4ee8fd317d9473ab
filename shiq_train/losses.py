"""The ShiQ loss family and its baselines, as pure functions of per-token statistics.

Every function takes the four per-token statistics of SHIQ_MATH §2 -- chosen logit ``c``, log-partition
``z`` of the trained model, and the same two for the frozen reference -- plus rewards and the action
mask, all ``[B, T]``. Position ``t`` of a row holds the statistics of token ``t`` (predicted from
position ``t-1``); ``action_mask[b, t]`` is True where that token was chosen by the policy. Nothing
here knows about models, parallelism or data loading. Statistics read off a causal LM
(``shiq_train.stats.causal_lm_stats``) are zero at position 0, which nothing predicts: a row then starts with its
prompt, never with an action (any position may be an action when the caller gives the statistics, as a bandit's).

Losses are computed in float32 (or float64 if given): bf16 statistics are upcast first.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

SHIQ_VARIANTS = ("shiq", "init", "ms", "tk")


# ----------------------------------------------------------------------------------------------
# input checks


def _check_inputs(named: dict[str, torch.Tensor], rewards, action_mask, beta, gamma, segment_ids=None):
    """Raise ValueError naming the first problem with the loss inputs."""
    shape = action_mask.shape
    if action_mask.dtype != torch.bool:
        raise ValueError(f"action_mask must be a bool tensor, got dtype {action_mask.dtype}")
    if action_mask.dim() != 2:
        raise ValueError(f"inputs must be [B, T]; action_mask has shape {tuple(shape)}")
    for name, x in ({**named, "rewards": rewards} if rewards is not None else named).items():
        if x.shape != shape:
            raise ValueError(f"shape mismatch: {name} has shape {tuple(x.shape)} but action_mask has {tuple(shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            bad = torch.nonzero(~torch.isfinite(x))[0].tolist()
            raise ValueError(f"{name} has a non-finite value at [row, position] = {bad}")
    off_action = (rewards != 0) & ~action_mask if rewards is not None else None
    if off_action is not None and bool(off_action.any()):
        bad = torch.nonzero(off_action)[0].tolist()
        raise ValueError(
            f"rewards has a nonzero value on a non-action position at [row, position] = {bad}: "
            "rewards must sit on action tokens (SHIQ_MATH §2)"
        )
    check_beta(beta)
    if not (_is_number(gamma) and 0.0 <= gamma <= 1.0):
        raise ValueError(f"gamma must be a number in [0, 1], got {gamma!r}")
    if segment_ids is not None:
        if segment_ids.shape != shape:
            raise ValueError(
                f"shape mismatch: segment_ids has shape {tuple(segment_ids.shape)} but action_mask has {tuple(shape)}"
            )
        if segment_ids.is_floating_point() or segment_ids.dtype == torch.bool:
            raise ValueError(f"segment_ids must be an integer tensor, got dtype {segment_ids.dtype}")
        if bool((segment_ids < 0).any()):
            raise ValueError("segment_ids must be non-negative")
        if shape[1] > 1 and bool((segment_ids[:, 1:] < segment_ids[:, :-1]).any()):
            row = torch.nonzero((segment_ids[:, 1:] < segment_ids[:, :-1]).any(1))[0].item()
            raise ValueError(
                f"segment_ids must be non-decreasing along each row (each trajectory a contiguous "
                f"run); row {row} is not"
            )


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_beta(beta, name: str = "beta") -> float:
    """``beta`` as a float, or a ValueError naming ``name`` unless it is a finite real number > 0.

    A bool or a string is not a number; a one-element tensor is. ``shiq_eval.optimum.check_beta`` accepts
    the same values without importing torch (``tests/test_losses.py`` holds them to it)."""
    one = isinstance(beta, torch.Tensor) and beta.numel() == 1 and not beta.dtype == torch.bool
    value = float(beta.detach() if one else beta) if _is_number(beta) or one else math.nan  # (detached: no warning)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {beta!r}")
    return value


def _scalar(beta):
    """A checked β as a scalar: a one-element tensor as a 0-d tensor (its gradient kept), a number as it is."""
    return beta.reshape(()) if isinstance(beta, torch.Tensor) else beta


def _check_vector(
    name: str, x: torch.Tensor, *, length: int | None = None, integer: bool, index_below: int | None = None
) -> None:
    """A 1-D vector of the sequence-level losses: ``length`` entries if given; integer (row indices
    below ``index_below`` if given) or finite floats."""
    if x.dim() != 1 or (length is not None and x.shape[0] != length):
        want = f"[{length}] (one entry per row)" if length is not None else "1-D"
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if integer:
        if x.is_floating_point() or x.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got dtype {x.dtype}")
        if index_below is not None and x.numel() and not bool(((x >= 0) & (x < index_below)).all()):
            raise ValueError(f"{name} holds a row index outside [0, {index_below})")
    elif not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has a non-finite value at row {torch.nonzero(~torch.isfinite(x))[0].item()}")


def _check_stats(stats: tuple, rewards, action_mask, beta) -> int:
    """:func:`_check_inputs` for the sequence-level baselines (``gamma`` plays no part); the batch size."""
    names = ("chosen_logits", "logz", "ref_chosen_logits", "ref_logz")
    _check_inputs(dict(zip(names, stats)), rewards, action_mask, beta, 1.0)
    return action_mask.shape[0]


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# ----------------------------------------------------------------------------------------------
# trajectory bookkeeping over masked, possibly packed rows


def _segments(action_mask: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """Segment id of every position, ``[B, T]`` int64 (all zeros for unpacked rows)."""
    if segment_ids is None:
        return torch.zeros(action_mask.shape, dtype=torch.long, device=action_mask.device)
    return segment_ids.long()


def suffix_sum(
    x: torch.Tensor, action_mask: torch.Tensor, segment_ids: torch.Tensor | None = None, gamma: float = 1.0
) -> torch.Tensor:
    """Discounted suffix sums over the action positions of each trajectory (SHIQ_MATH §2-§3).

    ``out[b, t] = Σ_{k ≥ t, action, same trajectory} γ^{n(t,k)} x[b, k]`` where ``n(t, k)`` counts the
    actions between ``t`` and ``k`` (so non-action tokens between turns do not discount).

    Args:
        x: ``[B, T]`` float, zero wherever it should not count.
        action_mask: ``[B, T]`` bool.
        segment_ids: ``[B, T]`` int, non-decreasing per row, or None (one trajectory per row).
        gamma: discount in [0, 1].
    Returns:
        ``[B, T]``; values at non-action positions are meaningless (callers mask them).
    """
    x = x * action_mask
    seg = _segments(action_mask, segment_ids)
    if gamma == 1.0:
        # total up to the end of the trajectory minus the prefix before t; accumulated in float64
        # so long rows do not lose precision to cancellation.
        cs = x.double().cumsum(-1)
        last = torch.searchsorted(seg.contiguous(), seg.contiguous(), right=True) - 1  # [B, T]
        return (cs.gather(1, last) - cs + x.double()).to(x.dtype)
    # gamma < 1: a reverse scan, carrying the return of the next action of the same trajectory.
    B, T = x.shape
    if T == 0:  # rows of no token: nothing to sum
        return x
    carry = torch.zeros(B, dtype=x.dtype, device=x.device)
    cols = []
    for t in range(T - 1, -1, -1):
        if t < T - 1:
            carry = torch.where(seg[:, t] == seg[:, t + 1], carry, torch.zeros_like(carry))
        g = x[:, t] + gamma * carry
        carry = torch.where(action_mask[:, t], g, carry)
        cols.append(g)
    return torch.stack(cols[::-1], dim=1)


def next_action_index(action_mask: torch.Tensor, segment_ids: torch.Tensor | None = None):
    """Index of the next action of the same trajectory, ``[B, T]`` int64, and whether it exists: "the next
    state" of an action (SHIQ_MATH §2), read by ShiQ/ms (§4)."""
    B, T = action_mask.shape
    seg = _segments(action_mask, segment_ids)
    pos = torch.arange(T, device=action_mask.device).expand(B, T)
    at = torch.where(action_mask, pos, torch.full_like(pos, T))
    nxt_incl = at.flip(1).cummin(1).values.flip(1)  # first action at or after t
    nxt = torch.cat([nxt_incl[:, 1:], torch.full_like(pos[:, :1], T)], dim=1)
    exists = nxt < T
    nxt_c = nxt.clamp(max=T - 1)
    exists = exists & (seg.gather(1, nxt_c) == seg)
    return nxt_c, exists


def turn_start_mask(action_mask: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T]`` bool: True on the first action of every turn (SHIQ_MATH §4, ShiQ/tk).

    A turn is a maximal run of action positions in a row, cut at segment boundaries when packed: an
    action starts a turn when the position before it is not an action of the same trajectory. A
    single-turn row has one turn start, its first action.
    """
    seg = _segments(action_mask, segment_ids)
    prev_is_action = torch.zeros_like(action_mask)
    prev_is_action[:, 1:] = action_mask[:, :-1] & (seg[:, 1:] == seg[:, :-1])
    return action_mask & ~prev_is_action


# ----------------------------------------------------------------------------------------------
# ShiQ and its ablations


def loss_positions(action_mask: torch.Tensor, segment_ids: torch.Tensor | None = None, variant: str = "shiq"):
    """``[B, T]`` bool: the positions whose residual enters the ShiQ loss (SHIQ_MATH §3-§4): every
    action, or for ``"tk"`` the first action of every turn (:func:`turn_start_mask`)."""
    return turn_start_mask(action_mask, segment_ids) if variant == "tk" else action_mask


def shiq_td(
    chosen_logits,
    logz,
    ref_chosen_logits,
    ref_logz,
    rewards,
    action_mask,
    *,
    beta,
    gamma=1.0,
    variant="shiq",
    segment_ids=None,
):
    """Per-token residuals ``δ`` of ShiQ and its ablations (SHIQ_MATH §3-§4), ``[B, T]``.

    shiq: ``δ_t = G_t − β(z_t − z_ref_t)`` with ``G_t = Σ_{k≥t} γ^{k−t}(r_k − β ρ_k)``   (§3)
    init: ``δ_t = G_t − β z_t``                                                           (§4)
    ms:   ``δ_t = r_t + γ β(z_{t'} − z_ref_{t'}) − β(c_t − c_ref_t)``, t' the next action  (§4)
    tk:   the ``shiq`` residual, kept on the first action of every turn only             (§4)

    Arguments as for :func:`shiq_loss` (and checked the same way). Values at positions outside
    :func:`loss_positions` are zero.
    """
    if variant not in SHIQ_VARIANTS:
        raise ValueError(f"variant must be one of {SHIQ_VARIANTS}, got {variant!r}")
    named = {"chosen_logits": chosen_logits, "logz": logz, "ref_chosen_logits": ref_chosen_logits, "ref_logz": ref_logz}
    _check_inputs(named, rewards, action_mask, beta, gamma, segment_ids)
    c, z, c_ref, z_ref, r = (_float(t) for t in (chosen_logits, logz, ref_chosen_logits, ref_logz, rewards))
    m = action_mask
    if variant == "ms":
        nxt, has_next = next_action_index(m, segment_ids)
        shaped_next = torch.where(has_next, (z - z_ref).gather(1, nxt), torch.zeros_like(z))
        delta = r + gamma * beta * shaped_next - beta * (c - c_ref)
        return delta * m
    rho = (c - z) - (c_ref - z_ref)
    G = suffix_sum(r - beta * rho, m, segment_ids, gamma)
    if variant == "init":
        delta = G - beta * z
    else:
        delta = G - beta * (z - z_ref)
    return delta * loss_positions(m, segment_ids, variant)


def mean_square(delta: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The ShiQ reduction (SHIQ_MATH §3): ``Σ δ² / (number of positions)`` for ``delta`` ``[B, T]``, zero
    outside ``positions`` ``[B, T]`` bool; zero (with a gradient path) when there is no position."""
    return (delta * delta).sum() / positions.sum().clamp(min=1)


def shiq_loss(
    chosen_logits: torch.Tensor,
    logz: torch.Tensor,
    ref_chosen_logits: torch.Tensor,
    ref_logz: torch.Tensor,
    rewards: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    beta: float,
    gamma: float = 1.0,
    variant: str = "shiq",
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """ShiQ loss and its ablations (SHIQ_MATH §3, §4), on padded or packed rows.

    Args:
        chosen_logits, logz: ``[B, T]`` trained model's chosen logit ``c`` and log-partition ``z``.
        ref_chosen_logits, ref_logz: ``[B, T]`` the reference model's ``c_ref``, ``z_ref``.
        rewards: ``[B, T]`` per-token rewards, zero off action positions.
        action_mask: ``[B, T]`` bool, True on actions (gaps allowed: multi-turn rows).
        beta: KL temperature ``β > 0``.
        gamma: discount in [0, 1], counted per action.
        variant: ``"shiq"`` (§3), ``"init"``, ``"ms"`` or ``"tk"`` (§4).
        segment_ids: ``[B, T]`` int for packed rows, non-decreasing along each row: positions sharing
            an id are one trajectory. Suffix sums and "next action" never cross a segment boundary, so
            the result equals the loss on the unpacked trajectories. None: one trajectory per row.
    Returns:
        Scalar ``Σ m δ² / Σ m`` over action positions; for ``"tk"`` the mean of ``δ²`` over turn
        starts (one per trajectory on single-turn rows). Zero if there is no action at all.
    """
    delta = shiq_td(
        chosen_logits,
        logz,
        ref_chosen_logits,
        ref_logz,
        rewards,
        action_mask,
        beta=beta,
        gamma=gamma,
        variant=variant,
        segment_ids=segment_ids,
    )
    return mean_square(delta, loss_positions(action_mask, segment_ids, variant))


# ----------------------------------------------------------------------------------------------
# baselines (SHIQ_MATH §5): sequence-level losses built from the same per-token statistics


def sft_loss(chosen_logits, logz, action_mask) -> torch.Tensor:
    """Supervised fine-tuning (SHIQ_MATH §5): ``−Σ_t m_t (c_t − z_t) / Σ_t m_t``, the mean negative
    log-likelihood of the action tokens (the cross-entropy of the data's assistant turns).

    It reads neither rewards nor the reference: a supervised baseline, trained on the data it should
    imitate (e.g. only the ground-truth trajectories). Args: chosen_logits, logz ``[B, T]``;
    action_mask ``[B, T]`` bool (the positions of packed rows count alike). Returns a scalar, zero (with
    a gradient path) when there is no action. Raises ValueError naming the input on a shape mismatch, a
    mask that is not bool, statistics that are not floating or not finite.
    """
    _check_inputs({"chosen_logits": chosen_logits, "logz": logz}, None, action_mask, 1.0, 1.0)
    nll = -(_float(chosen_logits) - _float(logz)) * action_mask
    return nll.sum() / max(int(action_mask.sum()), 1)


def sequence_log_ratio(chosen_logits, logz, ref_chosen_logits, ref_logz, action_mask) -> torch.Tensor:
    """``Λ(x, y) = Σ_t m_t ρ_t``, ``[B]`` (SHIQ_MATH §5), summed over every action of the row."""
    c, z, c_ref, z_ref = (_float(t) for t in (chosen_logits, logz, ref_chosen_logits, ref_logz))
    rho = (c - z) - (c_ref - z_ref)
    return (rho * action_mask).sum(-1)


def sequence_return(rewards, action_mask) -> torch.Tensor:
    """``R(x, y) = Σ_t m_t r_t``, ``[B]``: the sequence reward, or the cumulative turn reward (SHIQ_MATH §5)."""
    return (_float(rewards) * action_mask).sum(-1)


def check_group_batch(stats: tuple, rewards, action_mask, group_ids, beta) -> None:
    """The checks every group loss (DPO, CoPG, ``dro_v_loo``; SHIQ_MATH §5) makes of its micro-batch before
    anything is computed from it: the four statistics and ``rewards`` ``[B, T]`` finite floats, rewards on
    action positions only, ``action_mask`` bool, ``beta`` finite > 0, ``group_ids`` ``[B]`` integers.
    Every row has an action: a row without one (return 0, log-ratio 0) would otherwise enter the pairs and
    groups as a completion. Raises ValueError naming the first problem (DPO reads rewards only through the pairs
    they order, so a NaN reward would otherwise drop a pair silently)."""
    B = _check_stats(stats, rewards, action_mask, beta)
    _check_vector("group_ids", group_ids, length=B, integer=True)
    _check_every_row_acts(action_mask)


def _check_every_row_acts(action_mask: torch.Tensor) -> None:
    empty = torch.nonzero(~action_mask.any(-1)).flatten()
    if empty.numel():
        raise ValueError(
            f"action_mask: row {int(empty[0])} has no action position (a group loss reads whole completions)"
        )


def preference_pairs(returns: torch.Tensor, group_ids: torch.Tensor):
    """All (winner, loser) row pairs within each group, by ``1[R_i > R_j]`` (ties dropped): the pairs of DPO and
    multi-turn DPO (SHIQ_MATH §5), preferred = larger return, deterministic as in §7.

    Args: returns ``[B]``, group_ids ``[B]``. Returns two ``[P]`` int64 index tensors.
    """
    same = group_ids[:, None] == group_ids[None, :]
    better = returns[:, None] > returns[None, :]
    w, l = torch.nonzero(same & better, as_tuple=True)
    return w, l


def group_pairs(group_ids: torch.Tensor):
    """All unordered pairs ``i > j`` of rows in the same group, as two ``[P]`` index tensors (CoPG, SHIQ_MATH §5)."""
    B = group_ids.shape[0]
    same = group_ids[:, None] == group_ids[None, :]
    lower = torch.ones(B, B, dtype=torch.bool, device=group_ids.device).tril(-1)
    i, j = torch.nonzero(same & lower, as_tuple=True)
    return i, j


def dpo_loss(chosen_logits, logz, ref_chosen_logits, ref_logz, action_mask, winners, losers, *, beta):
    """DPO (SHIQ_MATH §5): mean over pairs of ``−log σ(β(Λ(x,y_w) − Λ(x,y_l)))``.

    Multi-turn DPO (§5) is the same function on multi-turn rows: ``Λ`` sums every assistant token of
    every turn, and the pairs come from :func:`preference_pairs` on the cumulative turn reward.

    Args:
        chosen_logits, logz, ref_chosen_logits, ref_logz: ``[B, T]``.
        action_mask: ``[B, T]`` bool; every row has an action (a row without one is refused, as in
            :func:`check_group_batch`).
        winners, losers: ``[P]`` row indices of preferred / dispreferred trajectories.
    """
    B = _check_stats((chosen_logits, logz, ref_chosen_logits, ref_logz), None, action_mask, beta)
    _check_every_row_acts(action_mask)
    for name, x in (("winners", winners), ("losers", losers)):
        _check_vector(name, x, integer=True, index_below=B)
    if winners.shape != losers.shape:
        raise ValueError(f"winners and losers must pair up: shapes {tuple(winners.shape)} and {tuple(losers.shape)}")
    if winners.numel() == 0:
        return _float(chosen_logits).sum() * 0.0
    lam = sequence_log_ratio(chosen_logits, logz, ref_chosen_logits, ref_logz, action_mask)
    return -F.logsigmoid(beta * (lam[winners] - lam[losers])).mean()


def copg_loss(chosen_logits, logz, ref_chosen_logits, ref_logz, rewards, action_mask, group_ids, *, beta):
    """CoPG (SHIQ_MATH §5): ``(R_β(x,y_i) − R_β(x,y_j))²`` averaged over a group's pairs ``i > j``,
    then over groups that have a pair. ``R_β = Σ m r − β Λ``; gradients flow through both sides.

    Multi-turn CoPG (§5) is the same function on multi-turn rows (``R`` = cumulative turn reward).

    Args: the four statistics, rewards ``[B, T]``, action_mask ``[B, T]`` (every row with an action),
    group_ids ``[B]`` int; checked by :func:`check_group_batch`.
    """
    check_group_batch((chosen_logits, logz, ref_chosen_logits, ref_logz), rewards, action_mask, group_ids, beta)
    lam = sequence_log_ratio(chosen_logits, logz, ref_chosen_logits, ref_logz, action_mask)
    reg_return = sequence_return(rewards, action_mask) - _scalar(beta) * lam  # [B] (a one-element tensor β too)
    i, j = group_pairs(group_ids)
    if i.numel() == 0:
        return reg_return.sum() * 0.0
    sq = (reg_return[i] - reg_return[j]) ** 2
    _, g = torch.unique(group_ids[i], return_inverse=True)
    per_group = torch.zeros(int(g.max()) + 1, dtype=sq.dtype, device=sq.device).index_add(0, g, sq)
    count = torch.zeros_like(per_group).index_add(0, g, torch.ones_like(sq))
    return (per_group / count).mean()


def loo_soft_value(returns: torch.Tensor, group_ids: torch.Tensor, *, beta: float) -> torch.Tensor:
    """The value of the group variant ``dro_v_loo`` (SHIQ_MATH §5), ``[B]``, no gradient.

    DRO's optimal value is ``V*(x) = β log E_{y~π_ref} exp(R(x,y)/β)``. For completions sampled from
    the reference, each row's estimate is that log-mean-exp over the *other* completions of its
    group (leave-one-out, so a row's own reward does not leak into its baseline). A row alone in
    its group falls back to the leave-one-out estimate over the whole batch, and a batch of one row
    to ``V = 0`` (``dro_v``'s value: the right one when rewards are centred, as the main job's are; its own
    return would cancel it whatever the reward). Only meaningful on
    groups of reference samples, and biased low for small groups (Jensen).

    Args: returns ``[B]`` finite floats, group_ids ``[B]`` int, beta finite > 0 (ValueError otherwise).
    """
    check_beta(beta)
    if not returns.is_floating_point():  # the value is returned in returns' dtype: an integer one would truncate it
        raise ValueError(f"returns must be a floating-point tensor, got dtype {returns.dtype}")
    _check_vector("returns", returns, integer=False)
    _check_vector("group_ids", group_ids, length=returns.shape[0], integer=True)
    beta = _scalar(beta)
    R = returns.detach()
    B = R.shape[0]
    same = group_ids[:, None] == group_ids[None, :]
    other = ~torch.eye(B, dtype=torch.bool, device=R.device)
    peers = same & other
    alone = ~peers.any(1)
    peers = torch.where(alone[:, None], other, peers)
    if B == 1:
        return torch.zeros_like(R)
    # in float64, shifted by each row's largest peer return: at a large β, (R − max) / β keeps the digits that
    # R / β in float32 loses (β 1e6 was 3% off)
    b = beta.detach().double() if isinstance(beta, torch.Tensor) else float(beta)
    R64 = R.double()[None, :].expand(B, B)
    top = torch.where(peers, R64, -math.inf).max(1).values  # [B]
    scaled = torch.where(peers, (R64 - top[:, None]) / b, -math.inf)
    return (top + b * (torch.logsumexp(scaled, dim=1) - torch.log(peers.sum(1).double()))).to(R.dtype)


def trajectory_sums(x: torch.Tensor, action_mask: torch.Tensor, segment_ids: torch.Tensor | None = None):
    """``Σ_t m_t x_t`` per trajectory, ``[N]`` (``R`` and ``Λ`` of SHIQ_MATH §5): one entry per trajectory that has an action, rows in
    order and, on packed rows (``segment_ids`` ``[B, T]``), segments in order within a row."""
    x = _float(x) * action_mask
    if segment_ids is None or segment_ids.numel() == 0:
        return x.sum(-1)[action_mask.any(-1)]
    seg = segment_ids.long()
    key = seg + (seg.max() + 1) * torch.arange(seg.shape[0], device=seg.device)[:, None]
    uniq, inv = torch.unique(key, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=x.dtype, device=x.device).index_add(0, inv.flatten(), x.flatten())
    n_actions = torch.zeros(len(uniq), device=x.device).index_add(0, inv.flatten(), action_mask.flatten().float())
    return sums[n_actions > 0]


def dro_v_loss(
    chosen_logits,
    logz,
    ref_chosen_logits,
    ref_logz,
    rewards,
    action_mask,
    values=None,
    *,
    beta,
    segment_ids=None,
):
    """DRO-V (SHIQ_MATH §5): mean over trajectories of ``½ (R(x,y) − V(x) − β Λ(x,y))²``.

    ``values=None`` is the project's ``dro_v``, the paper's single-trajectory, single-network DRO as
    reconstructed in §5: ``V ≡ 0``, so the loss is ``½ (R − β Λ)²`` per trajectory and needs no other
    completion of the prompt, no reference sample and no value model. Its minimiser is not ``π*`` in
    general: with data weights ``w(y)`` over a prompt's completions it is the policy whose residuals
    satisfy ``w(y) (R(y) − β log π(y)/π_ref(y)) = κ π(y)`` for one scalar ``κ`` per prompt, fixed by
    normalisation; ``κ = 0`` and ``π = π*`` exactly when ``E_{π_ref} exp(R/β) = 1`` (``V*(x) = 0``).

    With ``values`` ``[B]`` (one trajectory per row): ``V(x)`` of each row, a learned value (its
    gradient flows) or :func:`loo_soft_value` (the group variant ``dro_v_loo``).

    Args:
        chosen_logits, logz, ref_chosen_logits, ref_logz: ``[B, T]`` per-token statistics (§2).
        rewards: ``[B, T]`` per-token rewards, zero off action positions (``R`` is their sum).
        action_mask: ``[B, T]`` bool.
        values: ``[B]`` float or None (``V ≡ 0``).
        beta: KL temperature ``β > 0``.
        segment_ids: ``[B, T]`` int for packed rows (only with ``values=None``), as in :func:`shiq_loss`.
    Returns:
        Scalar mean over the trajectories that have an action; zero (with a gradient path) if none has.
    """
    B = _check_stats((chosen_logits, logz, ref_chosen_logits, ref_logz), rewards, action_mask, beta)
    if segment_ids is not None:
        if values is not None:
            raise ValueError("dro_v_loss: values are per row, so they cannot be combined with packed segment_ids")
        _check_inputs({}, None, action_mask, beta, 1.0, segment_ids)
    if values is not None:
        _check_vector("values", values, length=B, integer=False)
    c, z, c_ref, z_ref = (_float(t) for t in (chosen_logits, logz, ref_chosen_logits, ref_logz))
    rho = (c - z) - (c_ref - z_ref)
    lam = trajectory_sums(rho, action_mask, segment_ids)
    R = trajectory_sums(rewards, action_mask, segment_ids)
    delta = R - beta * lam
    if values is not None:
        delta = delta - _float(values)[action_mask.any(-1)]
    return 0.5 * (delta * delta).sum() / max(delta.numel(), 1)
