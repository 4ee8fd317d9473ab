"""The toy experiments (SHIQ_MATH §6-§7) against independent references.

References written here, not taken from shiq_eval.recipes.toys: closed forms for the bandit, a scalar
fixed point for a one-row grid, brute-force enumeration of action sequences for the unregularised
optimum, Monte Carlo for the reward collected, and the soft Bellman equation itself.
"""

import itertools
import json
import math
import os
import re

import numpy as np
import pandas as pd
import pytest
import torch

from shiq_data.cli_common import setup_logging
from shiq_eval.recipes import toys
from shiq_eval.recipes.toys import (
    BanditConfig,
    Grid,
    GridConfig,
    bandit_optimal,
    bandit_regret,
    bandit_value,
    method_loss,
    policy_value,
    reward_collected,
    run_bandit,
    run_grid,
    sample_trajectories,
    soft_value_iteration,
)

R = np.array([0.3, -1.0, 2.0, 0.5])


# ----------------------------------------------------------------------------------------------
# bandit


@pytest.mark.parametrize("beta", [0.1, 1.0, 3.0])
def test_bandit_regret_closed_forms(beta):
    K = len(R)
    pi_star = [math.exp(r / beta) for r in R]
    pi_star = np.array(pi_star) / sum(pi_star)
    # regret of π* is 0; of π_ref it is β log E_ref exp(r/β) − E_ref r (KL(π_ref‖π_ref) = 0)
    assert bandit_regret(np.log(pi_star), R, beta) == pytest.approx(0.0, abs=1e-12)
    ref = beta * math.log(sum(math.exp(r / beta) for r in R) / K) - sum(R) / K
    assert bandit_regret(np.zeros(K), R, beta) == pytest.approx(ref, rel=1e-12)
    # a greedy (deterministic) policy: J = r_max − β log K
    assert bandit_value(np.eye(K)[2], R, beta) == pytest.approx(2.0 - beta * math.log(K), rel=1e-12)
    # π* maximises J: random policies never beat it
    rng = np.random.default_rng(0)
    J_star = bandit_optimal(R, beta)[1]
    for _ in range(100):
        assert bandit_value(rng.dirichlet(np.ones(K)), R, beta) <= J_star + 1e-12


def test_bandit_shiq_loss_is_the_closed_form():
    """One-step bandit: ShiQ and ShiQ/tk are both mean_a (r(a) − β(ℓ(a) − ℓ_ref(a)))² (SHIQ_MATH §4)."""
    beta, theta = 0.5, torch.tensor([0.2, -0.3, 1.0, 0.0], dtype=torch.float64)
    arms = torch.tensor([[0], [2], [2], [3], [1]])
    r = torch.tensor(R)[arms]
    logits = theta.expand(5, 1, 4)
    mask = torch.ones_like(arms, dtype=torch.bool)
    want = ((r - beta * theta[arms]) ** 2).mean()
    for m in ("shiq", "shiq_tk"):
        got = method_loss(m, logits, arms, r, mask, torch.zeros(5, dtype=torch.long), beta=beta)
        assert float(got) == pytest.approx(float(want), rel=1e-6)  # token_stats works in float32


def test_bandit_shiq_converges():
    """A moderate run (1500 Adam steps, 1 seed): ShiQ's regret falls from 0.239 to below 1e-3."""
    out = run_bandit(BanditConfig(steps=1500, eval_every=100), "shiq", seed=0)
    assert out["regret"][0] > 0.2
    assert 0 <= out["regret"][-1] < 1e-3
    # ShiQ/tk is the same loss in a one-step bandit: identical curve for the same seed
    assert run_bandit(BanditConfig(steps=200, eval_every=100), "shiq_tk", seed=0)["regret"] == pytest.approx(
        run_bandit(BanditConfig(steps=200, eval_every=100), "shiq", seed=0)["regret"], rel=1e-12
    )


# ----------------------------------------------------------------------------------------------
# grid world: environment, value iteration, policy evaluation


@pytest.mark.parametrize("setting", toys.GRID_SETTINGS)
def test_soft_value_iteration_satisfies_bellman_and_has_zero_regret(setting):
    cfg = GridConfig.make(setting)
    grid = Grid(cfg)
    Q, V, pi = soft_value_iteration(grid, cfg.beta, cfg.gamma)
    # soft Bellman equation, written out again (SHIQ_MATH §1)
    for s in range(grid.n_states):
        q = [grid.reward[s, a] + (cfg.gamma * V[grid.next[s, a]] if grid.next[s, a] >= 0 else 0.0) for a in range(4)]
        assert V[s] == pytest.approx(cfg.beta * math.log(sum(0.25 * math.exp(x / cfg.beta) for x in q)), abs=1e-9)
        assert pi[s] == pytest.approx(np.exp(np.array(q) / cfg.beta) / np.exp(np.array(q) / cfg.beta).sum(), abs=1e-9)
    # policy evaluation of π* gives V* (regret 0); any other policy has positive regret
    assert policy_value(grid, pi, cfg.beta, cfg.gamma) == pytest.approx(V, abs=1e-9)
    rng = np.random.default_rng(1)
    for _ in range(20):
        other = rng.dirichlet(np.ones(4), size=grid.n_states)
        assert policy_value(grid, other, cfg.beta, cfg.gamma)[grid.start] < V[grid.start]


def test_one_row_grid_hand_computed():
    """1x2 grid, start left, goal right: Right ends with reward G − p, the 3 other actions stay (−p).
    V = β log(¼ exp((G − p)/β) + ¾ exp((−p + γ V)/β)), a scalar fixed point solved by bisection."""
    G, p, beta, gamma = 7.0, 0.1, 0.5, 0.9
    cfg = GridConfig(width=2, height=1, start=0, goal=1, goal_reward=G, step_penalty=p, beta=beta, gamma=gamma)
    grid = Grid(cfg)
    f = lambda v: beta * math.log(0.25 * math.exp((G - p) / beta) + 0.75 * math.exp((-p + gamma * v) / beta)) - v
    lo, hi = -100.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
    _, V, pi = soft_value_iteration(grid, beta, gamma)
    assert V[0] == pytest.approx(lo, abs=1e-9)
    assert pi[0, 3] == pytest.approx(0.25 * math.exp((G - p) / beta) / math.exp(lo / beta), abs=1e-9)


def _simulate(cfg: GridConfig, seq) -> tuple[float, int | None]:
    """Discounted return of an action sequence in the deterministic grid, simulated from scratch,
    and the number of steps to the goal (None if the sequence never reaches it)."""
    row, col = divmod(cfg.start, cfg.width)
    got, ret = False, 0.0
    for t, a in enumerate(seq):
        dr, dc = [(-1, 0), (1, 0), (0, -1), (0, 1)][a]
        row, col = min(max(row + dr, 0), cfg.height - 1), min(max(col + dc, 0), cfg.width - 1)
        r = -cfg.step_penalty
        if row * cfg.width + col == cfg.treasure and not got:
            got, r = True, r + cfg.treasure_reward
        if row * cfg.width + col == cfg.goal:
            return ret + cfg.gamma**t * (r + cfg.goal_reward), t + 1
        ret += cfg.gamma**t * r
    return ret, None


def _best_open_loop_return(cfg: GridConfig, max_len: int) -> float:
    """Brute force: the best discounted return over all action sequences of length ``max_len``
    (open loop = closed loop in a deterministic MDP), or never reaching the goal."""
    best = -cfg.step_penalty / (1 - cfg.gamma)
    for seq in itertools.product(range(4), repeat=max_len):
        ret, n = _simulate(cfg, seq)
        if n is not None:
            best = max(best, ret)
    return best


@pytest.mark.parametrize("treasure", [None, 3])
def test_small_beta_value_iteration_matches_brute_force(treasure):
    """3x2 grid (start 0, goal 2, treasure at 3 = bottom-left): as β → 0 the regularised optimum
    approaches the best return over all action sequences, within max − β log 4 / (1 − γ) ≤ V ≤ max,
    and the greedy path of π* attains that best return."""
    beta, gamma = 1e-3, 0.9
    cfg = GridConfig(
        width=3,
        height=2,
        start=0,
        goal=2,
        goal_reward=3.0,
        treasure=treasure,
        treasure_reward=4.0 if treasure else 0.0,
        beta=beta,
        gamma=gamma,
    )
    best = _best_open_loop_return(cfg, max_len=7)
    grid = Grid(cfg)
    _, V, pi = soft_value_iteration(grid, beta, gamma)
    assert best - beta * math.log(4) / (1 - gamma) <= V[grid.start] <= best + 1e-12
    s, path = grid.start, []
    while s >= 0 and len(path) < 10:
        a = int(pi[s].argmax())
        path.append(a)
        s = grid.next[s, a]
    ret, n = _simulate(cfg, path)
    assert n == len(path) and ret == pytest.approx(best, abs=1e-12)
    # the treasure detour (4 steps instead of 2) is worth it here: π* collects 4 + 3
    assert reward_collected(grid, pi, 20) == pytest.approx(3.0 + (4.0 if treasure else 0.0), abs=1e-3)


def test_reward_collected_matches_monte_carlo():
    cfg = GridConfig.make("fine_grained")
    grid = Grid(cfg)
    uniform = np.full((grid.n_states, 4), 0.25)
    _, _, r, m = sample_trajectories(grid, uniform, 20000, cfg.horizon, np.random.default_rng(0))
    collected = ((r + cfg.step_penalty) * m).sum(1)  # rewards minus the step penalty
    se = collected.std(ddof=1) / math.sqrt(len(collected))
    assert abs(collected.mean() - reward_collected(grid, uniform, cfg.horizon)) < 4 * se


@pytest.mark.parametrize("method", ["shiq", "shiq_ms", "shiq_tk", "copg"])
def test_grid_losses_vanish_at_optimal_logits(method):
    """At ℓ = Q*/β (the shifted-Q optimum, ℓ_ref = 0), the ShiQ residuals and the discounted CoPG
    residuals are 0 on complete trajectories: rewards, γ and the γ^t weighting are placed right."""
    cfg = GridConfig.make("fine_grained")
    grid = Grid(cfg)
    Q, _, pi = soft_value_iteration(grid, cfg.beta, cfg.gamma)
    s, a, r, m = (torch.from_numpy(x) for x in sample_trajectories(grid, pi, 40, 200, np.random.default_rng(0)))
    done = ~m[:, -1]  # reached the goal: no truncation
    s, a, r, m = s[done], a[done], r[done], m[done]
    theta = torch.from_numpy(Q / cfg.beta)
    groups = torch.arange(len(s)) // 2
    loss = method_loss(method, theta[s], a, r, m, groups, beta=cfg.beta, gamma=cfg.gamma)
    assert float(loss) < 1e-9  # float32 statistics (token_stats)
    # and not at the reference logits
    assert (
        float(method_loss(method, torch.zeros_like(theta)[s], a, r, m, groups, beta=cfg.beta, gamma=cfg.gamma)) > 1e-3
    )


def test_grid_shiq_learns():
    """600 steps, 1 seed, fine-grained setting: ShiQ's regret falls from 2.24 to < 0.1 and it collects
    the treasure and the goal (> 6.5 of the 6.93 π* collects)."""
    out = run_grid(GridConfig.make("fine_grained", steps=600, eval_every=100), "shiq", seed=0)
    assert out["regret"][0] > 2.0 and out["regret"][-1] < 0.1
    assert out["reward"][-1] > 6.5


def test_epochs_protocol_passes_over_the_data_once_per_epoch(monkeypatch):
    """The paper's protocol (App. D.2): every pass covers each pair exactly once in mini-batches of 30
    trajectories (the last one smaller), and is evaluated at its end; with 150 pairs, epoch e is step
    10·e of the default protocol (same mini-batches, same seed)."""
    seen = []
    real = toys.method_loss

    def spy(method, logits, actions, rewards, mask, group_ids, **kw):
        seen.append(int(group_ids.numel()))
        return real(method, logits, actions, rewards, mask, group_ids, **kw)

    monkeypatch.setattr(toys, "method_loss", spy)
    cfg = GridConfig.make("fine_grained", n_pairs=20, epochs=3, horizon=20)
    out = run_grid(cfg, "shiq", seed=0)
    assert seen == [30, 10] * 3  # 20 pairs = 40 trajectories per pass
    assert out["steps"] == [0, 2, 4, 6]
    monkeypatch.setattr(toys, "method_loss", real)
    by_epoch = run_grid(GridConfig.make("fine_grained", epochs=2, horizon=20), "copg", seed=1)
    by_step = run_grid(GridConfig.make("fine_grained", steps=20, eval_every=10, horizon=20), "copg", seed=1)
    assert by_epoch["steps"] == by_step["steps"] == [0, 10, 20]
    assert by_epoch["regret"] == by_step["regret"] and by_epoch["reward"] == by_step["reward"]


def test_aggregate_spread_is_the_sample_sd_over_seeds(tmp_path):
    """The spread over seeds is the sample standard deviation (ddof 1), at every evaluation and at the
    end, computed here with pandas / numpy on the input curves; one seed measures no spread: NaN in memory (pandas
    too), null in the JSON file, where it was 0 (a band of no width, read as exact)."""
    rng = np.random.default_rng(3)
    regret, reward = rng.gamma(2.0, 0.1, (5, 7)), rng.normal(5.0, 1.0, (5, 7))
    runs = [
        {"steps": list(range(0, 70, 10)), "regret": g.tolist(), "reward": w.tolist()} for g, w in zip(regret, reward)
    ]
    out = toys.aggregate(runs, ["regret", "reward"])
    for name, arr in (("regret", regret), ("reward", reward)):
        sd = pd.DataFrame(arr).std().to_numpy()  # pandas: ddof 1 by default
        np.testing.assert_allclose(sd, arr.std(0, ddof=1), rtol=1e-12)
        np.testing.assert_allclose(out[f"{name}_std"], sd, rtol=1e-12)
        assert out[f"final_{name}_std"] == pytest.approx(np.std(out[f"final_{name}_per_seed"], ddof=1), rel=1e-12)
        assert out[f"final_{name}_std"] == pytest.approx(sd[-1], rel=1e-12)
        np.testing.assert_allclose(out[f"{name}_mean"], arr.mean(0), rtol=1e-12)
        assert out[f"final_{name}"] == pytest.approx(arr[:, -1].mean(), rel=1e-12)
    one = toys.aggregate(runs[:1], ["regret", "reward"])
    assert np.isnan(pd.DataFrame(regret[:1]).std().to_numpy()).all()  # pandas: undefined too
    assert math.isnan(one["final_regret_std"]) and np.isnan(one["reward_std"]).all() and len(one["reward_std"]) == 7
    assert one["regret_mean"] == pytest.approx(regret[0].tolist())
    path = tmp_path / "one.json"
    toys.write_json(str(path), {"methods": {"shiq": one}})
    written = json.loads(path.read_text())["methods"]["shiq"]
    assert written["final_regret_std"] is None and written["reward_std"] == [None] * 7
    assert written["final_regret"] == pytest.approx(one["final_regret"])


def test_aggregate_keeps_every_seeds_curve(tmp_path):
    """RESULTS.md reads paired differences between methods and per-seed crossings at every evaluation, not
    only at the end: the JSON kept each seed's value at the final step alone, so those statements could not
    be traced to the command's output. Every seed's curve is kept, in seed order."""
    rng = np.random.default_rng(4)
    a, b = rng.gamma(2.0, 0.1, (5, 6)), rng.gamma(2.0, 0.1, (5, 6))
    runs_a, runs_b = ([{"steps": list(range(6)), "regret": row.tolist()} for row in arr] for arr in (a, b))
    out_a, out_b = toys.aggregate(runs_a, ["regret"]), toys.aggregate(runs_b, ["regret"])
    assert out_a["regret_per_seed"] == a.tolist()
    assert [c[-1] for c in out_a["regret_per_seed"]] == out_a["final_regret_per_seed"]
    path = tmp_path / "a.json"
    toys.write_json(str(path), {"methods": {"shiq": out_a, "copg": out_b}})
    written = json.loads(path.read_text())["methods"]
    d = np.array(written["shiq"]["regret_per_seed"]) - np.array(written["copg"]["regret_per_seed"])
    np.testing.assert_allclose(d[:, 3], a[:, 3] - b[:, 3], rtol=1e-12)  # a paired difference mid-curve


# ----------------------------------------------------------------------------------------------
# the CLI


def _finite(x):
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    return not isinstance(x, float) or math.isfinite(x)


def test_quick_cli_writes_json_and_plots(tmp_path, capsys):
    assert toys.main(["all", "--quick", "--out", str(tmp_path)]) == 0
    first = capsys.readouterr()
    assert str(tmp_path) in first.out and "bandit: 100%" in first.err  # the bar of INFO, the default
    bandit = json.loads((tmp_path / "bandit.json").read_text())
    assert set(bandit["methods"]) == {"shiq", "shiq_tk", "copg", "dpo"} and "config" in bandit
    for res in bandit["methods"].values():
        assert isinstance(res["final_regret"], float) and len(res["regret_mean"]) == len(res["steps"])
    grid = json.loads((tmp_path / "gridworld.json").read_text())
    assert set(grid["settings"]) == {"final_reward", "fine_grained"}
    for block in grid["settings"].values():
        assert set(block["methods"]) == {"shiq", "shiq_init", "shiq_ms", "shiq_tk", "copg", "dpo"}
        assert "config" in block
        for res in block["methods"].values():
            assert isinstance(res["final_regret"], float) and isinstance(res["final_reward"], float)
            assert len(res["regret_mean"]) == len(res["reward_std"]) == len(res["steps"])
    assert _finite(bandit) and _finite(grid)
    for png in ("bandit.png", "gridworld.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    # a second run of other settings into the folder replaced the first's results without a word (a smoke run
    # over a full one): refused, nothing touched
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    assert toys.main(["bandit", "--quick", "--seeds", "3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (
        f"--out {tmp_path} holds bandit.json, bandit.png of an earlier run with other settings: give --overwrite" in err
    )
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before
    # the same command again runs nothing and keeps the results (it was refused until --overwrite)
    assert toys.main(["all", "--quick", "--out", str(tmp_path)]) == 0
    again = capsys.readouterr()
    assert f"nothing run: {tmp_path} holds the results of these settings" in again.out
    assert "bandit: kept" in again.err and "gridworld: kept" in again.err and "%|" not in again.err
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before
    # `all` stopped during the grid world (bandit written, the grid world's plot not): the same command keeps the
    # bandit's results and runs the grid world (it was refused, and --overwrite ran the bandit again)
    (tmp_path / "gridworld.png").unlink()
    assert toys.main(["all", "--quick", "--out", str(tmp_path)]) == 0
    resumed = capsys.readouterr()
    assert "bandit: kept" in resumed.err and "gridworld: 100%" in resumed.err and "bandit: 100%" not in resumed.err
    assert f"wrote {tmp_path / 'gridworld.json'}, {tmp_path / 'gridworld.png'} in " in resumed.out
    assert {f: (tmp_path / f).read_bytes() for f in ("bandit.json", "bandit.png")} == {
        f: before[f] for f in ("bandit.json", "bandit.png")
    }
    assert json.loads((tmp_path / "gridworld.json").read_text()) == grid  # (seeded: the same results)
    assert (tmp_path / "gridworld.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a grid world of other settings beside the bandit's: refused, naming its files only
    assert toys.main(["all", "--quick", "--n-pairs", "30", "--out", str(tmp_path)]) == 2
    assert "holds gridworld.json, gridworld.png of an earlier run with other settings" in capsys.readouterr().err
    # a plot without its JSON: no settings to compare, said as such (it was "with other settings")
    (tmp_path / "bandit.json").unlink()
    assert toys.main(["bandit", "--quick", "--out", str(tmp_path)]) == 2
    assert (
        "holds bandit.png of an earlier run whose settings cannot be read: give --overwrite" in capsys.readouterr().err
    )
    argv = ["bandit", "--quick", "--seeds", "3", "--overwrite", "--out", str(tmp_path), "--log-level", "WARNING"]
    assert toys.main(argv) == 0
    assert json.loads((tmp_path / "bandit.json").read_text())["config"]["seeds"] == 3
    assert "%|" not in capsys.readouterr().err  # warnings only: no bar
    setup_logging("INFO")  # as the next command's start would leave it


def test_epochs_cli_reports_every_epoch(tmp_path, capsys):
    assert toys.main(["gridworld", "--protocol", "epochs", "--quick", "--n-pairs", "30", "--out", str(tmp_path)]) == 0
    grid = json.loads((tmp_path / "gridworld.json").read_text())
    for block in grid["settings"].values():
        assert block["config"]["epochs"] == 2 and block["config"]["batches_per_epoch"] == 2
        for res in block["methods"].values():
            assert res["steps"] == [0, 2, 4] and set(res["at_epoch"]) == {"1", "2"}
            assert res["at_epoch"]["2"]["reward"] == res["final_reward"]
            assert res["at_epoch"]["1"]["regret_std"] == res["regret_std"][1]
    assert (tmp_path / "gridworld.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for bad, message in (
        (["bandit", "--protocol", "epochs"], "--protocol epochs applies to the gridworld experiment only"),
        (["gridworld", "--epochs", "3"], "--epochs needs --protocol epochs"),
        (["gridworld", "--protocol", "epochs", "--steps", "5"], "--steps does not apply to --protocol epochs"),
    ):
        with pytest.raises(SystemExit) as e:
            toys.main([*bad, "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"shiq-toys: error: {message}" in err, err


@pytest.mark.slow
def test_default_grid_final_reward_all_methods_reach_goal():
    """Full-length runs, 1 seed: every method ends near the goal-reaching optimum (reward ≈ 7)."""
    cfg = GridConfig.make("final_reward")
    for m in toys.GRID_METHODS:
        assert run_grid(cfg, m, seed=0)["reward"][-1] > 6.8, m


def test_ctrl_c_stops_the_workers_and_the_command_at_once(tmp_path):
    """Ctrl-C reached the pool's workers too, and shiq-toys then waited on them, at times for good, and a second
    Ctrl-C left them running, orphaned, after a traceback. Now one line, status 130, and no worker left."""
    import contextlib
    import signal
    import subprocess
    import sys
    import time

    exe = [sys.executable, "-m", "shiq_eval.recipes.toys"]
    proc = subprocess.Popen(
        [*exe, "all", "--workers", "2", "--out", str(tmp_path / "out")],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, signalled as a terminal does
        env={**os.environ, "SHIQ_VERBOSE": "0", "OMP_NUM_THREADS": "1"},
    )

    def workers() -> list[str]:
        found = subprocess.run(["pgrep", "-f", "-g", str(proc.pid), "spawn_main"], capture_output=True, text=True)
        return found.stdout.split()

    deadline = time.monotonic() + 120
    while len(workers()) < 2:  # the workers are up and have their tasks
        assert proc.poll() is None and time.monotonic() < deadline, "the command ended before it could be stopped"
        time.sleep(0.1)
    time.sleep(0.3)  # (while they import torch: a worker interrupted there printed its traceback)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):  # pressed twice, as people do (and `timeout -s INT` signals)
        os.killpg(proc.pid, signal.SIGINT)
    try:
        err = proc.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:  # a hang (the old failure): nothing left behind by the test
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 130, err[-3000:]
    lines = [
        ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "run/s" not in ln and "s/run" not in ln
    ]
    assert lines[-1] == "shiq-toys: interrupted" and "Traceback" not in err, err[-3000:]
    deadline = time.monotonic() + 10  # (the multiprocessing resource tracker ends once its parent has)
    while subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True).stdout and time.monotonic() < deadline:
        time.sleep(0.1)
    assert subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True).stdout == b""  # no worker left


def test_an_option_of_the_other_experiment_is_refused(tmp_path, capsys):
    """--n-pairs sets the grid world's data and --center-rewards the bandit's rewards: given to the other
    experiment alone, each was ignored without a word (a bandit run with "--n-pairs 50" used its 500 pairs)."""
    for bad, message in (
        (["bandit", "--n-pairs", "50"], "--n-pairs applies to the gridworld experiment only"),
        (["gridworld", "--center-rewards"], "--center-rewards applies to the bandit experiment only"),
    ):
        with pytest.raises(SystemExit) as e:
            toys.main([*bad, "--quick", "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"shiq-toys: error: {message}" in err, err
        assert not os.listdir(tmp_path)


# each count option's largest value (the help texts say it)
COUNT_MAX = {"--seeds": 10_000, "--steps": 1_000_000, "--epochs": 1_000, "--n-pairs": 100_000}


@pytest.mark.parametrize("flag", ["--seeds", "--steps", "--epochs", "--n-pairs"])
def test_a_count_below_one_is_named_with_its_value(tmp_path, capsys, flag):
    """ "--seeds and --steps must be >= 1" named neither the one given nor its value."""
    argv = ["gridworld", flag, "0", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        toys.main([*argv, "--protocol", "epochs"] if flag == "--epochs" else argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"shiq-toys: error: argument {flag}: must be in 1..{COUNT_MAX[flag]}, got 0" in err
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("flag", ["--seeds", "--steps", "--epochs"])
def test_a_count_beyond_its_bound_is_refused_naming_the_option(tmp_path, capsys, flag):
    """--seeds, --steps and --epochs had no upper bound: a huge --seeds built its job list until memory ran out (a
    MemoryError traceback), a huge --steps or --epochs ran for ever. Each is refused past its bound, before any
    run, and its help says the bound."""
    for n in (COUNT_MAX[flag] + 1, 10**20):
        # (--center-rewards, refused for the grid world once the line is parsed: a count let through fails fast)
        argv = ["gridworld", flag, str(n), "--center-rewards", "--out", str(tmp_path / "out")]
        with pytest.raises(SystemExit) as e:
            toys.main([*argv, "--protocol", "epochs"] if flag == "--epochs" else argv)
        err = capsys.readouterr().err
        assert e.value.code == 2, err
        assert err.strip().splitlines()[-1] == (
            f"shiq-toys: error: argument {flag}: must be in 1..{COUNT_MAX[flag]}, got {n} (see shiq-toys --help)"
        )
        assert "Traceback" not in err and not os.listdir(tmp_path)
    with pytest.raises(SystemExit):
        toys.main(["--help"])
    blocks = re.split(r"\n(?=  -)", capsys.readouterr().out)  # an option's help starts its line with "  -"
    block = next(" ".join(b.split()) for b in blocks if b.lstrip().startswith(f"{flag} "))
    assert f"at most {COUNT_MAX[flag]:,})" in block, block


def test_workers_beyond_the_process_bound_are_refused_naming_the_option(tmp_path, capsys):
    """--workers 10**20 reached the worker pool, whose OverflowError ("Python int too large to convert to C
    int") named no option, after the progress bar had started."""
    for n in ("1025", str(10**20)):
        with pytest.raises(SystemExit) as e:
            toys.main(["bandit", "--workers", n, "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"shiq-toys: error: argument --workers: must be in 1..1024, got {n}" in err, err
        assert not os.listdir(tmp_path)


def test_a_data_set_beyond_memory_is_refused_naming_the_option(tmp_path, capsys):
    """--n-pairs 10**11 asked numpy for 43.7 TiB of trajectories: a MemoryError traceback, status 1."""
    with pytest.raises(SystemExit) as e:
        toys.main(["gridworld", "--quick", "--n-pairs", str(10**11), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --n-pairs: must be in 1..100000, got 100000000000" in err, err
    assert "Traceback" not in err and not os.listdir(tmp_path)
