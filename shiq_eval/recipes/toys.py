"""The paper's two toy experiments (SHIQ_MATH §7): an offline bandit (Fig. 1) and a grid world (Fig. 2).

Every method trains a tabular / linear policy through the library losses of ``shiq_train.losses``: the
policy's logits are turned into the per-token statistics of SHIQ_MATH §2 (chosen logit ``c`` and
log-partition ``z``, by :func:`shiq_train.stats.token_stats`; the reference is uniform, i.e. zero
logits, ``c_ref = 0``, ``z_ref = log |A|``), laid out as ``[B, T]`` rows with an action mask, exactly
as an LLM batch would be. Evaluation is exact (SHIQ_MATH §6): the regularised value
``J(π) = E_π[Σ_t γ^t (r_t − β KL(π(·|s_t) ‖ π_ref(·|s_t)))]`` by enumeration (bandit) or by solving the
policy-evaluation linear system (grid), and the regret ``J(π*) − J(π)``.

Usage::

    python -m shiq_eval.recipes.toys all --out runs/toys          # both experiments, default settings
    python -m shiq_eval.recipes.toys bandit --out DIR --quick     # seconds, for tests
    python -m shiq_eval.recipes.toys gridworld --protocol epochs --out DIR   # the paper's 1 / 10 epochs

Outputs: ``DIR/bandit.{json,png}``, ``DIR/gridworld.{json,png}`` (written atomically).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from shiq_data.buffer import refuse_inside_buffer
from shiq_data.cli_common import (
    PROCESSES_MAX,
    ArgumentParser,
    add_log_level_option,
    folder_path,
    int_at_least,
    progress_bars_shown,
    run_command,
    setup_logging,
)
from shiq_data.io import atomic_write_bytes, atomic_write_json
from shiq_eval.optimum import undefined_as_null
from shiq_eval.recipes.pool import worker_pool
from shiq_train.losses import copg_loss, dpo_loss, preference_pairs, shiq_loss
from shiq_train.stats import token_stats

log = logging.getLogger(__name__)

BANDIT_METHODS = ("shiq", "shiq_tk", "copg", "dpo")
GRID_METHODS = ("shiq", "shiq_init", "shiq_ms", "shiq_tk", "copg", "dpo")
GRID_SETTINGS = ("final_reward", "fine_grained")
SHIQ_VARIANT = {"shiq": "shiq", "shiq_init": "init", "shiq_ms": "ms", "shiq_tk": "tk"}
COLORS = {"shiq": "C0", "shiq_tk": "C1", "shiq_init": "C4", "shiq_ms": "C5", "copg": "C2", "dpo": "C3"}


# ----------------------------------------------------------------------------------------------
# shared: the library losses on [B, T] rows of a tabular policy


def row_stats(logits: torch.Tensor, actions: torch.Tensor):
    """Per-token statistics (SHIQ_MATH §2) of rows ``[B, T]`` whose logits are ``[B, T, A]``.

    Returns ``c, z, c_ref, z_ref``, all ``[B, T]``; the reference policy is uniform (zero logits).
    """
    st = token_stats(logits, actions)
    c_ref = torch.zeros_like(st.chosen_logits)
    z_ref = torch.full_like(st.logz, math.log(logits.shape[-1]))
    return st.chosen_logits, st.logz, c_ref, z_ref


def method_loss(method, logits, actions, rewards, mask, group_ids, *, beta, gamma=1.0):
    """Loss of ``method`` on a batch of rows, through ``shiq_train.losses``.

    Args:
        logits: ``[B, T, A]`` policy logits at each position; actions ``[B, T]`` int64;
        rewards: ``[B, T]`` per-step rewards (zero off actions); mask ``[B, T]`` bool;
        group_ids: ``[B]`` int, the pair / group of each row (CoPG, DPO; ignored by ShiQ).
        gamma: discount. ShiQ takes it directly (SHIQ_MATH §2-§4). The sequence-level losses (§5) are
            undiscounted sums, so for ``gamma < 1`` their inputs are weighted by ``γ^t`` (all four
            statistics and the rewards are linear in ``ρ_t`` and ``r_t``, so this gives
            ``Λ = Σ γ^t ρ_t`` and ``R = Σ γ^t r_t``, the discounted sequence objective whose optimum is
            the same ``π*``: ``β Σ γ^t ρ*_t = Σ γ^t r_t − V*(s_0)`` by telescoping).
    """
    c, z, c_ref, z_ref = row_stats(logits, actions)
    if method in SHIQ_VARIANT:
        return shiq_loss(c, z, c_ref, z_ref, rewards, mask, beta=beta, gamma=gamma, variant=SHIQ_VARIANT[method])
    if gamma != 1.0:
        w = gamma ** torch.arange(c.shape[1], dtype=c.dtype)
        c, z, c_ref, z_ref, rewards = (x * w for x in (c, z, c_ref, z_ref, rewards))
    if method == "copg":
        return copg_loss(c, z, c_ref, z_ref, rewards, mask, group_ids, beta=beta)
    if method == "dpo":
        winners, losers = preference_pairs((rewards * mask).sum(-1), group_ids)  # 1[R > R'], ties dropped
        return dpo_loss(c, z, c_ref, z_ref, mask, winners, losers, beta=beta)
    raise ValueError(f"unknown method {method!r}")


# ----------------------------------------------------------------------------------------------
# offline bandit (SHIQ_MATH §7, paper §3.1 / App. D.1)


@dataclass
class BanditConfig:
    """Offline K-armed bandit. The paper's numbers were lost in conversion; these are our choices."""

    n_arms: int = 10
    beta: float = 0.1
    reward_seed: int = 0  # rewards r_k ~ U[0, 1] drawn once from this seed (fixed across runs)
    center_rewards: bool = False  # probe: subtract the mean reward (same π*, different absolute logits)
    n_pairs: int = 500  # dataset: pairs (a, a') with a ~ mu1, a' ~ mu2
    mu1: str = "mu1_k ∝ k + 1 (favours high indices)"
    mu2: str = "mu2_k ∝ K - k (favours low indices)"
    batch_pairs: int = 32
    lr: float = 0.02
    steps: int = 2000
    eval_every: int = 20
    seeds: int = 5

    def rewards(self) -> np.ndarray:
        r = np.random.default_rng(self.reward_seed).uniform(0.0, 1.0, self.n_arms).round(3)
        return r - r.mean() if self.center_rewards else r

    def sampling(self) -> tuple[np.ndarray, np.ndarray]:
        k = np.arange(self.n_arms, dtype=float)
        return (k + 1) / (k + 1).sum(), (self.n_arms - k) / (self.n_arms - k).sum()


def bandit_value(pi: np.ndarray, r: np.ndarray, beta: float) -> float:
    """``J(π) = Σ_a π(a) r(a) − β KL(π ‖ π_ref)``, π_ref uniform (SHIQ_MATH §6)."""
    pi = np.asarray(pi, dtype=float)
    nz = pi > 0
    kl = float((pi[nz] * np.log(pi[nz] * len(pi))).sum())
    return float(pi @ r) - beta * kl


def bandit_optimal(r: np.ndarray, beta: float) -> tuple[np.ndarray, float]:
    """``π* ∝ π_ref exp(r/β)`` and ``J(π*) = β log E_ref exp(r/β)`` (SHIQ_MATH §1, §6)."""
    x = r / beta
    pi = np.exp(x - x.max())
    return pi / pi.sum(), float(beta * (x.max() + np.log(np.exp(x - x.max()).mean())))


def bandit_regret(logits: np.ndarray, r: np.ndarray, beta: float) -> float:
    """Exact regret ``J(π*) − J(softmax(logits))`` (SHIQ_MATH §6)."""
    x = np.asarray(logits, dtype=float)
    pi = np.exp(x - x.max())
    return bandit_optimal(r, beta)[1] - bandit_value(pi / pi.sum(), r, beta)


def run_bandit(cfg: BanditConfig, method: str, seed: int) -> dict:
    """Train one method from the reference logits; return the regret curve."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    r = cfg.rewards()
    mu1, mu2 = cfg.sampling()
    arms = np.stack([rng.choice(cfg.n_arms, cfg.n_pairs, p=mu1), rng.choice(cfg.n_arms, cfg.n_pairs, p=mu2)], 1)
    r_t = torch.tensor(r)
    theta = torch.zeros(cfg.n_arms, dtype=torch.float64, requires_grad=True)  # logits, init = reference
    opt = torch.optim.Adam([theta], lr=cfg.lr)
    steps, regret = [0], [bandit_regret(theta.detach().numpy(), r, cfg.beta)]
    order = np.empty(0, dtype=int)
    for step in range(1, cfg.steps + 1):
        if len(order) < cfg.batch_pairs:
            order = np.concatenate([order, rng.permutation(cfg.n_pairs)])
        idx, order = order[: cfg.batch_pairs], order[cfg.batch_pairs :]
        # every arm of the batch is a row of length 1; ShiQ reads them as single rewarded arms,
        # CoPG / DPO as the pairs they were drawn in (group id = pair index)
        a = torch.from_numpy(arms[idx].reshape(-1, 1))
        group = torch.arange(len(idx)).repeat_interleave(2)
        logits = theta.expand(a.shape[0], 1, cfg.n_arms)
        loss = method_loss(method, logits, a, r_t[a], torch.ones_like(a, dtype=torch.bool), group, beta=cfg.beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            steps.append(step)
            regret.append(bandit_regret(theta.detach().numpy(), r, cfg.beta))
    return {"steps": steps, "regret": regret}


# ----------------------------------------------------------------------------------------------
# grid world (SHIQ_MATH §7, paper §3.2 / App. D.2)

MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))  # Up, Down, Left, Right
# Most (good, bad) pairs a grid-world data set may hold: its arrays and their batches take about 6 KB a pair
# (about 1 GB a run at this bound, in every worker); far more ended in numpy's MemoryError, a traceback
N_PAIRS_MAX = 100_000


@dataclass
class GridConfig:
    """Grid world; cells numbered row-major from the top-left. Our choices (the paper's were lost)."""

    setting: str = "final_reward"
    width: int = 5
    height: int = 5
    start: int = 0  # top-left
    goal: int = 4  # top-right; reaching it ends the episode
    goal_reward: float = 7.0
    treasure: int | None = None  # cell of the intermediate reward (fine_grained: bottom-left, off the path)
    treasure_reward: float = 0.0
    step_penalty: float = 0.1  # paid on every step
    beta: float = 0.2
    gamma: float = 0.9
    horizon: int = 60  # data trajectories and the reward-collected evaluation are truncated here
    n_pairs: int = 150  # (good from π*, bad from uniform) pairs
    good_policy: str = "optimal"  # probe "goal_only": good data from π* of the same grid with the treasure worth 0
    batch: int = 30  # trajectories per mini-batch (15 pairs)
    lr: float = 0.05
    steps: int = 2000
    eval_every: int = 20
    epochs: int | None = None  # the paper's protocol (App. D.2): this many passes over the data, replacing steps
    seeds: int = 5

    @classmethod
    def make(cls, setting: str, **kw) -> GridConfig:
        if setting == "final_reward":
            return cls(setting=setting, goal_reward=7.0, **kw)
        if setting == "fine_grained":
            cfg = cls(setting=setting, goal_reward=3.0, treasure_reward=4.0, **kw)
            cfg.treasure = cfg.width * (cfg.height - 1)
            return cfg
        raise ValueError(f"unknown setting {setting!r}")


class Grid:
    """Tabular MDP of a :class:`GridConfig`: augmented state ``s = flag · n_cells + cell``.

    ``next[s, a]`` is the next state (−1 when the episode ends at the goal), ``reward[s, a]`` the full
    reward (step penalty included), ``collect[s, a]`` the treasure + goal part only. Moving into a
    wall leaves the agent in place.
    """

    def __init__(self, cfg: GridConfig):
        self.cfg = cfg
        n_cells = cfg.width * cfg.height
        n_flags = 2 if cfg.treasure is not None else 1
        self.n_states, self.start = n_cells * n_flags, cfg.start
        self.next = np.full((self.n_states, 4), -1)
        self.collect = np.zeros((self.n_states, 4))
        for flag in range(n_flags):
            for cell in range(n_cells):
                row, col = divmod(cell, cfg.width)
                for a, (dr, dc) in enumerate(MOVES):
                    r2, c2 = min(max(row + dr, 0), cfg.height - 1), min(max(col + dc, 0), cfg.width - 1)
                    cell2, flag2, s = r2 * cfg.width + c2, flag, flag * n_cells + cell
                    if cell2 == cfg.treasure and flag == 0:
                        self.collect[s, a] += cfg.treasure_reward
                        flag2 = 1
                    if cell2 == cfg.goal:
                        self.collect[s, a] += cfg.goal_reward
                    else:
                        self.next[s, a] = flag2 * n_cells + cell2
        self.reward = self.collect - cfg.step_penalty

    def transition_matrix(self, pi: np.ndarray) -> np.ndarray:
        """``P_π[s, s'] = Σ_a π(a|s) 1[next(s, a) = s']`` (sub-stochastic: the goal exits)."""
        P = np.zeros((self.n_states, self.n_states))
        rows, acts = np.nonzero(self.next >= 0)
        np.add.at(P, (rows, self.next[rows, acts]), pi[rows, acts])
        return P


def soft_value_iteration(grid: Grid, beta: float, gamma: float, tol: float = 1e-12):
    """Regularised value iteration (SHIQ_MATH §1, §7), π_ref uniform.

    ``Q(s,a) = r(s,a) + γ V(s')``, ``V(s) = β log Σ_a π_ref(a|s) exp(Q(s,a)/β)``, ``V = 0`` after the
    goal; iterated to a sup-norm change below ``tol`` (a γ-contraction). Returns ``Q, V, π*`` with
    ``π* = softmax(Q/β)``.
    """
    V = np.zeros(grid.n_states)
    for _ in range(100_000):
        Q = grid.reward + gamma * np.where(grid.next >= 0, V[grid.next], 0.0)
        m = Q.max(1)
        V_new = m + beta * np.log(np.exp((Q - m[:, None]) / beta).mean(1))
        done = np.abs(V_new - V).max() < tol
        V = V_new
        if done:
            break
    Q = grid.reward + gamma * np.where(grid.next >= 0, V[grid.next], 0.0)
    pi = np.exp((Q - Q.max(1, keepdims=True)) / beta)
    return Q, V, pi / pi.sum(1, keepdims=True)


def policy_value(grid: Grid, pi: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """Regularised discounted value of π at every state (SHIQ_MATH §6), by a linear solve.

    ``V^π = (I − γ P_π)^{-1} r_π`` with ``r_π(s) = Σ_a π(a|s) (r(s,a) − β log(π(a|s)/π_ref(a|s)))``.
    """
    logratio = np.log(np.clip(pi, 1e-300, None) * pi.shape[1])
    r_pi = (pi * (grid.reward - beta * logratio)).sum(1)
    return np.linalg.solve(np.eye(grid.n_states) - gamma * grid.transition_matrix(pi), r_pi)


def reward_collected(grid: Grid, pi: np.ndarray, horizon: int) -> float:
    """Expected undiscounted treasure + goal reward over ``horizon`` steps from the start (no step
    penalty), by propagating the state distribution (SHIQ_MATH §6 "reward", exact)."""
    P, r = grid.transition_matrix(pi), (pi * grid.collect).sum(1)
    d = np.zeros(grid.n_states)
    d[grid.start] = 1.0
    total = 0.0
    for _ in range(horizon):
        total += d @ r
        d = d @ P
    return float(total)


def sample_trajectories(grid: Grid, pi: np.ndarray, n: int, horizon: int, rng: np.random.Generator):
    """``n`` trajectories of π from the start, truncated at ``horizon``, as padded ``[n, horizon]``
    arrays ``states, actions, rewards, mask`` (rewards on the action that earns them)."""
    states = np.zeros((n, horizon), dtype=np.int64)
    actions = np.zeros((n, horizon), dtype=np.int64)
    rewards = np.zeros((n, horizon))
    mask = np.zeros((n, horizon), dtype=bool)
    s = np.full(n, grid.start)
    alive = np.ones(n, dtype=bool)
    for t in range(horizon):
        cum = pi[s].cumsum(1)
        a = (rng.random(n)[:, None] > cum).sum(1).clip(max=3)
        states[alive, t], actions[alive, t] = s[alive], a[alive]
        rewards[alive, t], mask[alive, t] = grid.reward[s, a][alive], True
        s2 = grid.next[s, a]
        alive &= s2 >= 0
        s = np.where(alive, s2, 0)
    return states, actions, rewards, mask


def good_policy(cfg: GridConfig) -> np.ndarray:
    """The policy that generates the "good" data: ``π*`` (default), or for the ``goal_only`` probe the
    regularised optimum of the same grid with the treasure worth nothing (it heads for the goal)."""
    if cfg.good_policy == "optimal":
        return soft_value_iteration(Grid(cfg), cfg.beta, cfg.gamma)[2]
    if cfg.good_policy == "goal_only":
        return soft_value_iteration(Grid(dataclasses.replace(cfg, treasure_reward=0.0)), cfg.beta, cfg.gamma)[2]
    raise ValueError(f"unknown good_policy {cfg.good_policy!r}")


def batches_per_epoch(cfg: GridConfig) -> int:
    """Mini-batches in one pass over the ``n_pairs`` (good, bad) pairs, the last one possibly smaller."""
    return -(-cfg.n_pairs // (cfg.batch // 2))


def run_grid(cfg: GridConfig, method: str, seed: int) -> dict:
    """Train one method from the reference (zero) logits; return regret / reward-collected curves.

    Default: ``cfg.steps`` mini-batches drawn from successive random permutations of the pairs,
    evaluated every ``cfg.eval_every`` steps. With ``cfg.epochs`` (the paper's protocol): that many
    passes over the data, each a fresh permutation cut into mini-batches of ``cfg.batch`` trajectories,
    evaluated at the end of every pass. When ``batch / 2`` divides ``n_pairs`` both draw the same
    mini-batches, so epoch ``e`` equals step ``e · batches_per_epoch`` of the default protocol.
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    grid = Grid(cfg)
    _, V_star, pi_star = soft_value_iteration(grid, cfg.beta, cfg.gamma)
    uniform = np.full_like(pi_star, 0.25)
    pi_good = good_policy(cfg) if cfg.good_policy != "optimal" else pi_star
    good = sample_trajectories(grid, pi_good, cfg.n_pairs, cfg.horizon, rng)
    bad = sample_trajectories(grid, uniform, cfg.n_pairs, cfg.horizon, rng)
    # row 2i = good_i, row 2i+1 = bad_i: CoPG / DPO read (2i, 2i+1) as a pair, ShiQ reads single rows
    data = [torch.from_numpy(np.stack([g, b], 1).reshape(2 * cfg.n_pairs, cfg.horizon)) for g, b in zip(good, bad)]
    states, actions, rewards, mask = data
    # linear policy on one-hot states = one logit row per state, initialised at the reference (zeros)
    theta = torch.zeros(grid.n_states, 4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=cfg.lr)

    def evaluate():
        pi = torch.softmax(theta.detach(), -1).numpy()
        J = policy_value(grid, pi, cfg.beta, cfg.gamma)[grid.start]
        return float(V_star[grid.start] - J), reward_collected(grid, pi, cfg.horizon)

    pairs_per_batch = cfg.batch // 2
    steps, curves = [0], [evaluate()]
    n_steps = cfg.steps if cfg.epochs is None else cfg.epochs * batches_per_epoch(cfg)
    order = np.empty(0, dtype=int)
    for step in range(1, n_steps + 1):
        if cfg.epochs is not None:
            if len(order) == 0:
                order = rng.permutation(cfg.n_pairs)  # one pass; its last mini-batch may be smaller
        elif len(order) < pairs_per_batch:
            order = np.concatenate([order, rng.permutation(cfg.n_pairs)])
        idx, order = order[:pairs_per_batch], order[pairs_per_batch:]
        rows = torch.from_numpy(np.stack([2 * idx, 2 * idx + 1], 1).reshape(-1))
        T = int(mask[rows].sum(1).max())
        s, a, r, m = states[rows, :T], actions[rows, :T], rewards[rows, :T], mask[rows, :T]
        group = torch.arange(len(idx)).repeat_interleave(2)
        loss = method_loss(method, theta[s], a, r, m, group, beta=cfg.beta, gamma=cfg.gamma)
        opt.zero_grad()
        loss.backward()
        opt.step()
        at_eval = step % cfg.eval_every == 0 if cfg.epochs is None else len(order) == 0
        if at_eval or step == n_steps:
            steps.append(step)
            curves.append(evaluate())
    regret, collected = (list(x) for x in zip(*curves))
    return {"steps": steps, "regret": regret, "reward": collected}


# ----------------------------------------------------------------------------------------------
# running, aggregating, plotting


def _run(job):
    kind, cfg, method, seed = job
    torch.set_num_threads(1)
    return job, (run_bandit if kind == "bandit" else run_grid)(cfg, method, seed)


def run_jobs(jobs, workers: int, desc: str, progress: bool = True):
    """Run ``(kind, cfg, method, seed)`` jobs, in ``workers`` processes when > 1, with a progress bar (unless
    not ``progress``)."""
    results = {}
    with tqdm(total=len(jobs), desc=desc, unit="run", file=sys.stderr, disable=not progress) as bar:
        if workers <= 1:
            for job in jobs:
                j, res = _run(job)
                results[(j[0], getattr(j[1], "setting", ""), j[2], j[3])] = res
                bar.update()
        else:
            with worker_pool(workers) as ex:
                futures = [ex.submit(_run, job) for job in jobs]  # (not ex.map: see worker_pool)
                for j, res in (f.result() for f in futures):
                    results[(j[0], getattr(j[1], "setting", ""), j[2], j[3])] = res
                    bar.update()
    return results


def seed_sd(arr: np.ndarray) -> np.ndarray:
    """The seeds' sample standard deviation (ddof 1) of ``arr [seeds, ...]`` along the seed axis; NaN for one
    seed, which measures no spread (undefined, as the recipes' ``seed_stats``; null in the JSON files, no band
    in the plots)."""
    arr = np.asarray(arr, dtype=np.float64)
    return arr.std(0, ddof=1) if arr.shape[0] > 1 else np.full(arr.shape[1:], np.nan)


def aggregate(runs: list[dict], keys) -> dict:
    """Mean / sample standard deviation (ddof 1, :func:`seed_sd`) over seeds of each curve, plus final
    values and every seed's curve (``{name}_per_seed``, ``[seeds][evaluations]``, in seed order, so
    paired differences between methods and per-seed crossings can be read from the JSON at any
    evaluation, not only at the end)."""
    out = {"steps": runs[0]["steps"]}
    for k in keys:
        arr = np.array([r[k] for r in runs])
        name = "regret" if k == "regret" else "reward"
        sd = seed_sd(arr)
        out[f"final_{name}"] = float(arr[:, -1].mean())
        out[f"final_{name}_std"] = float(sd[-1])
        out[f"final_{name}_per_seed"] = arr[:, -1].tolist()
        out[f"initial_{name}"] = float(arr[:, 0].mean())
        out[f"{name}_mean"] = arr.mean(0).tolist()
        out[f"{name}_std"] = sd.tolist()
        out[f"{name}_per_seed"] = arr.tolist()
    return out


def write_json(path: str, obj) -> None:
    """``obj`` as JSON at ``path``, atomically; an undefined deviation (one seed) as null."""
    atomic_write_json(path, undefined_as_null(obj), indent=1)


def save_figure(fig, path: str, dpi: int = 100) -> None:
    import matplotlib.pyplot as plt  # heavy: only plotting needs it

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _band(ax, res, name, method, label=None, ls="-", per_x=1):
    x = np.array(res["steps"]) / per_x
    mu, sd = np.array(res[f"{name}_mean"]), np.array(res[f"{name}_std"])
    ax.plot(x, mu, color=COLORS[method], label=label or method, ls=ls, lw=1.5)
    ax.fill_between(x, mu - sd, mu + sd, color=COLORS[method], alpha=0.2, lw=0)


def plot_bandit(methods: dict, cfg: BanditConfig, path: str) -> None:
    import matplotlib  # heavy: only plotting needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, res in methods.items():
        # ShiQ/tk is the same loss as ShiQ in a one-step bandit: dashed so both stay visible
        _band(
            ax,
            res,
            "regret",
            m,
            label="shiq_tk (= shiq here)" if m == "shiq_tk" else m,
            ls="--" if m == "shiq_tk" else "-",
        )
    ax.set_yscale("symlog", linthresh=1e-4)  # log above 1e-4, linear down to 0 (regret reaches ~1e-11)
    ax.set_ylim(bottom=0)
    ax.set(
        xlabel="gradient step",
        ylabel=r"regret $J(\pi^*)-J(\pi)$ (symlog)",
        title=f"Offline {cfg.n_arms}-armed bandit, β={cfg.beta} (mean ± std, {cfg.seeds} seeds)",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_grid(settings: dict, path: str) -> None:
    import matplotlib  # heavy: only plotting needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    cfg0 = settings[next(iter(settings))]["config"]
    per_x = cfg0["batches_per_epoch"] if cfg0["epochs"] else 1  # the epochs protocol plots against epochs
    for row, (setting, block) in enumerate(settings.items()):
        cfg = block["config"]
        for m, res in block["methods"].items():
            ls = "--" if m == "shiq_init" else "-"  # with a uniform reference it nearly overlays shiq
            _band(axes[row, 0], res, "regret", m, ls=ls, per_x=per_x)
            _band(axes[row, 1], res, "reward", m, ls=ls, per_x=per_x)
        axes[row, 0].set_yscale("symlog", linthresh=1e-4)
        axes[row, 0].set_ylim(bottom=0)
        axes[row, 0].set(ylabel=r"regret $J(\pi^*)-J(\pi)$ (symlog)", title=f"{setting}: regret")
        axes[row, 1].axhline(block["optimal_reward"], color="k", ls=":", lw=1, label=r"$\pi^*$")
        axes[row, 1].set(ylabel=f"reward collected in {cfg['horizon']} steps", title=f"{setting}: reward collected")
        for ax in axes[row]:
            ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=8, ncol=2)
    for ax in axes[1]:
        ax.set_xlabel(f"epoch ({per_x} mini-batches of {cfg0['batch']})" if cfg0["epochs"] else "gradient step")
    if cfg0["epochs"]:
        axes[1, 0].set_xticks(range(cfg0["epochs"] + 1))
    probe = "" if cfg0["good_policy"] == "optimal" else f", good data from the {cfg0['good_policy']} policy"
    data = f", {2 * cfg0['n_pairs']} trajectories" if cfg0["epochs"] else ""
    fig.suptitle(
        f"Grid world {cfg0['width']}x{cfg0['height']}, β={cfg0['beta']}, γ={cfg0['gamma']} "
        f"(mean ± std over {cfg0['seeds']} seeds{probe}{data})"
    )
    save_figure(fig, path)


def bandit_experiment(out: str, cfg: BanditConfig, workers: int, progress: bool = True) -> dict:
    jobs = [("bandit", cfg, m, s) for m in BANDIT_METHODS for s in range(cfg.seeds)]
    res = run_jobs(jobs, workers, "bandit", progress)
    methods = {m: aggregate([res[("bandit", "", m, s)] for s in range(cfg.seeds)], ["regret"]) for m in BANDIT_METHODS}
    r = cfg.rewards()
    config = dataclasses.asdict(cfg) | {
        "rewards": r.tolist(),
        "mu1_probs": cfg.sampling()[0].tolist(),
        "mu2_probs": cfg.sampling()[1].tolist(),
        "optimal_value": bandit_optimal(r, cfg.beta)[1],
        "optimizer": "Adam",
        "reference": "uniform",
        "source": "our choices: the paper's numeric values (App. D.1) were lost in its text conversion",
        "note": "shiq_tk equals shiq in a one-step bandit (SHIQ_MATH §4); DPO pairs labelled 1[r(a) > r(a')], ties dropped",
    }
    obj = {"methods": methods, "config": config}
    write_json(os.path.join(out, "bandit.json"), obj)
    plot_bandit(methods, cfg, os.path.join(out, "bandit.png"))
    return obj


def grid_experiment(out: str, cfgs: dict[str, GridConfig], workers: int, progress: bool = True) -> dict:
    jobs = [("grid", cfg, m, s) for cfg in cfgs.values() for m in GRID_METHODS for s in range(cfg.seeds)]
    res = run_jobs(jobs, workers, "gridworld", progress)
    settings = {}
    for name, cfg in cfgs.items():
        grid = Grid(cfg)
        _, V, pi_star = soft_value_iteration(grid, cfg.beta, cfg.gamma)
        methods = {
            m: aggregate([res[("grid", name, m, s)] for s in range(cfg.seeds)], ["regret", "reward"])
            for m in GRID_METHODS
        }
        pi_good = good_policy(cfg)
        config = dataclasses.asdict(cfg) | {
            "actions": "Up, Down, Left, Right (a wall leaves the agent in place)",
            "n_states": grid.n_states,
            "optimizer": "Adam",
            "policy": "linear on one-hot states, zero init (= uniform reference)",
            "source": "our choices: the paper's numeric values (App. D.2) were lost in its text conversion",
            "data": "n_pairs trajectories from pi* (good) + n_pairs from uniform (bad); CoPG/DPO: (good, bad) pairs; "
            "ShiQ variants: all rows as single trajectories with per-step rewards",
            "dpo_preference": "1[discounted return of a > of b], ties dropped",
            "sequence_losses_discount": "CoPG/DPO statistics and rewards weighted by gamma^t (see method_loss)",
            "truncation": "a trajectory cut at the horizon ends there for every loss (no bootstrap): "
            "a small bias for the token-level ShiQ targets near the cut",
            "batches_per_epoch": batches_per_epoch(cfg),
        }
        if cfg.epochs:
            # the paper's protocol: results after each pass over the data (epoch e = evaluation e)
            for agg in methods.values():
                agg["at_epoch"] = {
                    str(e): {k: agg[f"{k}_mean"][e] for k in ("regret", "reward")}
                    | {f"{k}_std": agg[f"{k}_std"][e] for k in ("regret", "reward")}
                    for e in range(1, cfg.epochs + 1)
                }
        settings[name] = {
            "methods": methods,
            "config": config,
            "optimal_value": float(V[grid.start]),
            "optimal_reward": reward_collected(grid, pi_star, cfg.horizon),
            "uniform_reward": reward_collected(grid, np.full_like(pi_star, 0.25), cfg.horizon),
            "good_policy_reward": reward_collected(grid, pi_good, cfg.horizon),
            "good_policy_regret": float(V[grid.start] - policy_value(grid, pi_good, cfg.beta, cfg.gamma)[grid.start]),
        }
    obj = {"settings": settings}
    write_json(os.path.join(out, "gridworld.json"), obj)
    plot_grid(settings, os.path.join(out, "gridworld.png"))
    return obj


# Bounds of the runs' sizes (--seeds, --steps, --epochs), each far past its default (5 seeds, 2000 steps, 10
# epochs): a huge --seeds built its job list until memory ran out (a MemoryError traceback), a huge --steps or
# --epochs ran for ever
SEEDS_MAX = 10_000
STEPS_MAX = 1_000_000
EPOCHS_MAX = 1_000  # (the epochs protocol's plot has a tick per epoch)


def main(argv=None) -> int:
    p = ArgumentParser(
        prog="shiq-toys",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="defaults (recorded in the JSON 'config'):\n"
        "  bandit     K=10 arms, r ~ U[0,1] (fixed), uniform π_ref, β=0.1, 500 pairs (a~μ1, a'~μ2),\n"
        "             Adam lr 0.02, 32 pairs per step, 2000 steps, 5 seeds\n"
        "  gridworld  5x5, start 0 (top-left), goal 4 (top-right), treasure 20 (bottom-left),\n"
        "             step penalty 0.1, β=0.2, γ=0.9, horizon 60, 150 (π*, uniform) pairs,\n"
        "             linear policy, Adam lr 0.05, 30 trajectories per step, 2000 steps, 5 seeds\n"
        "metrics: exact regret J(π*) − J(π) (SHIQ_MATH §6); gridworld also the exact expected\n"
        "treasure + goal reward collected in 60 steps. A full default 'all' takes a few minutes on 2 cores.\n"
        "--protocol epochs (gridworld): the paper's 1 and 10 passes over the data in mini-batches of 30\n"
        "(150 pairs: 10 mini-batches per pass), evaluated after every pass; plotted against epochs.",
        description="The paper's toy experiments (SHIQ_MATH §7), trained through shiq_train.losses with "
        "exact regret. bandit: offline K-armed bandit (Fig. 1; shiq, shiq_tk, copg, dpo). "
        "gridworld: grid MDP, settings final_reward and fine_grained (Fig. 2; shiq, shiq_init, "
        "shiq_ms, shiq_tk, copg, dpo). all: both. Writes DIR/{bandit,gridworld}.{json,png}.",
    )
    p.add_argument("experiment", choices=("bandit", "gridworld", "all"))
    p.add_argument("--out", default="runs/toys", type=folder_path, help="output directory (created; default runs/toys)")
    p.add_argument("--quick", action="store_true", help="2 seeds, few steps: a smoke run in seconds")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="run again and replace the results of an earlier run in --out (one of other settings is refused "
        "otherwise; one of the same settings is kept)",
    )
    p.add_argument(
        "--seeds",
        type=int_at_least(1, SEEDS_MAX),
        default=None,
        help=f"seeds per method (default 5; quick: 2; at most {SEEDS_MAX:,})",
    )
    p.add_argument(
        "--steps",
        type=int_at_least(1, STEPS_MAX),
        default=None,
        help="gradient steps per run, overrides both experiments' defaults "
        f"(bandit {BanditConfig.steps}, gridworld {GridConfig.steps}; quick: 60; at most {STEPS_MAX:,})",
    )
    p.add_argument(
        "--center-rewards",
        action="store_true",
        help="probe (bandit): subtract the mean arm reward; π* is unchanged, the absolute logits ShiQ "
        "must learn (r/β) are smaller",
    )
    p.add_argument(
        "--good-policy",
        choices=("optimal", "goal_only"),
        default="optimal",
        help="probe (gridworld): 'goal_only' generates the good trajectories with the optimum of the "
        "grid whose treasure is worth 0, so no demonstration shows the detour (default: optimal)",
    )
    p.add_argument(
        "--protocol",
        choices=("steps", "epochs"),
        default="steps",
        help="gridworld: 'steps' (default) trains --steps mini-batches; 'epochs' is the paper's protocol "
        "(App. D.2): --epochs passes over the data in mini-batches of 30, evaluated after every pass, so "
        "one run gives the 1-epoch and 10-epoch results",
    )
    p.add_argument(
        "--epochs",
        type=int_at_least(1, EPOCHS_MAX),
        default=None,
        help=f"passes over the data with --protocol epochs (default 10, at most {EPOCHS_MAX:,})",
    )
    p.add_argument(
        "--n-pairs",
        type=int_at_least(1, N_PAIRS_MAX),
        default=None,
        help=f"gridworld: (good, bad) trajectory pairs in the data set (default {GridConfig.n_pairs}, at most "
        f"{N_PAIRS_MAX:,}: about 6 KB of memory a pair in each run)",
    )
    p.add_argument(
        "--workers",
        type=int_at_least(1, PROCESSES_MAX),  # (10**20 ended in the pool's OverflowError, naming no option)
        default=min(2, os.cpu_count() or 1),
        help=f"parallel processes (default min(2, cores), at most {PROCESSES_MAX}; quick runs in-process)",
    )
    add_log_level_option(p)
    args = p.parse_args(argv)
    setup_logging(getattr(args, "log_level", "INFO"))
    args.progress = progress_bars_shown(getattr(args, "log_level", "INFO"))  # none above INFO
    return run_command("shiq-toys", _main, args, p)


def _main(args, p) -> int:
    overrides = {}
    if args.quick:
        overrides = {"seeds": 2, "steps": 60, "eval_every": 10}
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    if args.steps is not None:
        overrides["steps"] = args.steps
    grid_overrides = {}
    if args.protocol == "epochs":
        if args.experiment != "gridworld":
            p.error("--protocol epochs applies to the gridworld experiment only")
        if args.steps is not None:
            p.error("--steps does not apply to --protocol epochs (use --epochs)")
        grid_overrides["epochs"] = args.epochs if args.epochs is not None else (2 if args.quick else 10)
    elif args.epochs is not None:
        p.error("--epochs needs --protocol epochs")
    if args.n_pairs is not None:
        grid_overrides["n_pairs"] = args.n_pairs
    if args.good_policy != "optimal" and args.experiment == "bandit":
        p.error("--good-policy applies to the gridworld experiment only")
    if args.n_pairs is not None and args.experiment == "bandit":
        p.error("--n-pairs applies to the gridworld experiment only")
    if args.center_rewards and args.experiment == "gridworld":
        p.error("--center-rewards applies to the bandit experiment only")
    workers = 1 if args.quick else args.workers
    refuse_inside_buffer(args.out, "--out", itself=True)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file: give a folder")
    grid_kw = {k: v for k, v in overrides.items() if not (k == "steps" and "epochs" in grid_overrides)}
    settings = {  # each experiment of the command: its configuration(s)
        "bandit": {"": BanditConfig(**overrides, center_rewards=args.center_rewards)},
        "gridworld": {
            s: GridConfig.make(s, **grid_kw, **grid_overrides, good_policy=args.good_policy) for s in GRID_SETTINGS
        },
    }
    kinds = [k for k in settings if args.experiment in (k, "all")]
    kept, earlier, unread = [], [], False
    for kind in [] if args.overwrite else kinds:
        found = [f"{kind}.{ext}" for ext in ("json", "png") if os.path.exists(os.path.join(args.out, f"{kind}.{ext}"))]
        same = same_settings(os.path.join(args.out, f"{kind}.json"), kind, settings[kind]) if found else False
        if same and len(found) == 2:  # (a run stopped after its JSON, before its plot, runs again)
            kept.append(kind)
        elif found and not same:
            earlier += found
            unread |= same is None
    if earlier:
        which = "whose settings cannot be read" if unread else "with other settings"
        raise ValueError(
            f"--out {args.out} holds {', '.join(earlier)} of an earlier run {which}: give --overwrite to replace "
            "them, or another --out"
        )
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    written = []
    for kind in kinds:
        if kind in kept:
            log.info(
                f"{kind}: kept, {os.path.join(args.out, kind + '.json')} holds the results of these settings "
                "(--overwrite runs it again)"
            )
        elif kind == "bandit":
            bandit_experiment(args.out, settings[kind][""], workers, args.progress)
        else:
            grid_experiment(args.out, settings[kind], workers, args.progress)
        written += [] if kind in kept else [f"{kind}.json", f"{kind}.png"]
    if written:
        print(f"wrote {', '.join(os.path.join(args.out, w) for w in written)} in {time.time() - t0:.1f} s")
    else:
        print(f"nothing run: {args.out} holds the results of these settings (--overwrite runs them again)")
    return 0


def same_settings(path: str, kind: str, cfgs: dict) -> bool | None:
    """Whether ``path``, an earlier run's ``bandit.json`` or ``gridworld.json``, holds the results of ``cfgs``
    (``{"": BanditConfig}``, or ``{setting: GridConfig}`` for every setting): each configuration's fields as its
    JSON ``config`` records them; None for a file that cannot be read as one (absent, not JSON, other keys)."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
        blocks = {"": obj} if kind == "bandit" else obj["settings"]
        if set(blocks) != set(cfgs):
            return False
        for name, cfg in cfgs.items():
            want = json.loads(json.dumps(dataclasses.asdict(cfg)))
            recorded = blocks[name]["config"]
            if {k: recorded.get(k) for k in want} != want:
                return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return True


if __name__ == "__main__":
    sys.exit(main())
