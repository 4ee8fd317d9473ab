"""tools/bench_ddp.py: the methods' order is reversed every other timed step, each step is timed in its two phases
(forward+backward+reduction, update), and the methods' losses must agree step for step (fake models, no process
group; one tiny real run at DP=2)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import bench_ddp as B  # noqa: E402


def test_the_order_is_reversed_every_other_step(monkeypatch, tmp_path):
    """The default (per-parameter) used to step first in every round (A B C A B C): the order could favour it."""
    import torch
    import torch.distributed

    import shiq_train.parallel

    calls, saved = [], {}

    def fake_build(method, args, dtype):
        def gradients(mbs, loss_fn):
            calls.append(method)
            return 1.0

        return object(), B.Step(gradients, lambda: calls.append(f"{method} update"))

    monkeypatch.setattr(B, "build", fake_build)
    monkeypatch.setattr(B, "state_bytes", lambda method, opt: 0)
    monkeypatch.setattr(B, "save_times", lambda *a: {})
    monkeypatch.setattr(shiq_train.parallel, "distributed", lambda **kw: contextlib.nullcontext())
    monkeypatch.setattr(shiq_train.parallel, "set_seed", lambda seed: None)
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: None)
    monkeypatch.setattr(torch, "save", lambda obj, path: saved.update(obj))
    args = B.parse_args(["--dp", "2", "--reps", "3", "--threads", "1"])
    B.worker(0, 2, 0, args, str(tmp_path))
    calls = [x for x in calls if not x.endswith(" update")]  # (each method's update follows its gradients)
    a, b, c = B.METHODS
    assert calls[-12:] == [a, b, c] + [a, b, c] + [c, b, a] + [a, b, c]  # warm-up, then steps 0, 1 (reversed), 2
    assert all(len(saved["time"][m][ph]) == 3 for m in B.METHODS for ph in B.PHASES)


def test_each_step_times_its_two_phases_apart(monkeypatch, tmp_path):
    """A step used to be timed whole: its ratio mixed the reduction strategy with the optimizer implementation
    (torch's fused AdamW in per-parameter, megatron's loop over the tensors in the other two)."""
    import torch
    import torch.distributed

    import shiq_train.parallel

    clock, saved = [0.0], {}
    cost = {"per-parameter": (2.0, 1.0), "megatron DDP": (3.0, 5.0), "distributed": (4.0, 7.0)}

    def fake_build(method, args, dtype):
        def gradients(mbs, loss_fn):
            clock[0] += cost[method][0]
            return 1.0

        return object(), B.Step(gradients, lambda: clock.__setitem__(0, clock[0] + cost[method][1]))

    monkeypatch.setattr(B, "build", fake_build)
    monkeypatch.setattr(B, "state_bytes", lambda method, opt: 0)
    monkeypatch.setattr(B, "save_times", lambda *a: {})
    monkeypatch.setattr(B.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(shiq_train.parallel, "distributed", lambda **kw: contextlib.nullcontext())
    monkeypatch.setattr(shiq_train.parallel, "set_seed", lambda seed: None)
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: None)
    monkeypatch.setattr(torch, "save", lambda obj, path: saved.update(obj))
    B.worker(0, 2, 0, B.parse_args(["--dp", "2", "--reps", "2", "--threads", "1"]), str(tmp_path))
    for m, (grads, update) in cost.items():
        assert saved["time"][m] == {"gradients": [grads, grads], "update": [update, update]}


def test_checkpoint_saves_alternate(monkeypatch, tmp_path):
    """The default's saves all used to come before the distributed optimizer's: its first, cold save and the
    order fell on it alone."""
    import torch
    import torch.distributed

    import shiq_train.checkpoint

    calls = []

    def fake_save(folder, step, model, opt):
        calls.append(folder.name)
        step_dir = folder / f"step_{step}"
        step_dir.mkdir(parents=True)
        (step_dir / "rank_0.pt").write_bytes(b"x" * 8)
        return step_dir

    monkeypatch.setattr(shiq_train.checkpoint, "save_checkpoint", fake_save)
    monkeypatch.setattr(B, "state_bytes", lambda method, opt: 4)
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: None)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 0)
    args = B.parse_args(["--dp", "1", "--reps", "3", "--threads", "1"])
    held = {"per-parameter": (torch.nn.Linear(2, 2), None), "distributed": (torch.nn.Linear(2, 2), None)}
    out = B.save_times(held, args, str(tmp_path))
    a, b = "ckpt_per-parameter", "ckpt_distributed"
    assert calls == [a, b, b, a, a, b]
    for m in held:
        assert len(out[m]["seconds"]) == 3 and out[m]["files"] == {"rank_0.pt": 8}
        assert out[m]["weights"] == 6 * 4 and out[m]["state"] == 4


def _fake_worker_run(monkeypatch, tmp_path, loss_of):
    """``B.main`` at DP=2 with :func:`B.worker` in this process (fake models whose step ``k`` of ``method``
    returns ``loss_of(method, k)``) for both ranks: what it returns."""
    import torch
    import torch.distributed
    import torch.multiprocessing

    import shiq_train.parallel

    def fake_build(method, args, dtype):
        done = []

        def gradients(mbs, loss_fn):
            done.append(None)
            return loss_of(method, len(done) - 1)

        return object(), B.Step(gradients, lambda: None)

    monkeypatch.setattr(B, "build", fake_build)
    monkeypatch.setattr(B, "state_bytes", lambda method, opt: 4)
    ckpt = {"seconds": [0.1], "files": {"rank_0.pt": 8}, "weights": 4, "state": 4}
    monkeypatch.setattr(B, "save_times", lambda *a: {"per-parameter": ckpt, "distributed": ckpt})
    monkeypatch.setattr(shiq_train.parallel, "distributed", lambda **kw: contextlib.nullcontext())
    monkeypatch.setattr(shiq_train.parallel, "set_seed", lambda seed: None)
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: None)

    def spawn(fn, args, nprocs, join):
        for rank in range(nprocs):
            fn(rank, *args)

    monkeypatch.setattr(torch.multiprocessing, "spawn", spawn)
    return B.main(["--dp", "2", "--reps", "3", "--threads", "1"])


def test_a_method_whose_loss_differs_gets_no_time_table(monkeypatch, tmp_path, capsys):
    """The methods used to start from different weights and nothing compared their losses: a time table was
    printed whatever they computed."""
    off = lambda method, k: 2.0 + (1e-3 if method == "distributed" and k == 2 else 0.0)  # noqa: E731
    assert _fake_worker_run(monkeypatch, tmp_path, off) == 1
    out, err = capsys.readouterr()
    assert "median s" not in out.split("median s/save")[-1] and "losses agree" not in out
    line = [x for x in err.splitlines() if "losses differ" in x]
    assert len(line) == 1 and "per-parameter" in line[0] and "distributed" in line[0] and "at step 2" in line[0]


def test_agreeing_losses_print_the_largest_difference(monkeypatch, tmp_path, capsys):
    near = lambda method, k: 2.0 - 0.1 * k + (4e-6 if method == "megatron DDP" else 0.0)  # noqa: E731
    assert _fake_worker_run(monkeypatch, tmp_path, near) == 0
    out = capsys.readouterr().out
    header = (
        "| DP | method | forward+backward+reduction, median s | / per-parameter | update, median s | / per-parameter "
    )
    assert header + "| whole step, median s | / per-parameter |" in out
    rows = [x for x in out.splitlines() if x.startswith("| 2 | ") and x.count("|") == 9]
    assert [r.split(" | ")[1] for r in rows] == list(B.METHODS)
    assert [c.strip(" |") for c in rows[0].split(" | ")][3::2] == ["1.00x"] * 3  # each phase's ratio to itself
    assert "losses agree across methods: max |diff| = 4e-06 over 4 steps" in out


def test_the_losses_are_checked_on_every_rank():
    assert B.check_losses({m: [3.0, 2.0] for m in B.METHODS}) == (0.0, None)
    diff, line = B.check_losses({"per-parameter": [3.0, 2.0], "megatron DDP": [3.1, 2.0], "distributed": [3.0, 2.0]})
    assert line.startswith("losses differ across methods: per-parameter 3 and megatron DDP 3.1 at step 0 (warm-up)")
    assert B.check_losses({"per-parameter": [1.0], "megatron DDP": [float("nan")], "distributed": [1.0]})[1]


def test_a_tiny_real_run_agrees(capsys):
    """Three real methods at DP=2 (gloo processes): the same starting weights and AdamW settings, the same losses."""
    assert (
        B.main(
            [
                "--dp",
                "2",
                "--reps",
                "1",
                "--hidden",
                "32",
                "--heads",
                "2",
                "--layers",
                "1",
                "--vocab",
                "64",
                "--seq",
                "8",
                "--batch",
                "2",
                "--micro-batches",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "losses agree across methods: max |diff| = " in out and "over 2 steps" in out
