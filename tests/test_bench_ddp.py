"""tools/bench_ddp.py: the methods' order is reversed every other timed step (fake models, no process group)."""

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
        def step(mbs, loss_fn):
            calls.append(method)

        step.model = None
        return object(), step

    monkeypatch.setattr(B, "build", fake_build)
    monkeypatch.setattr(B, "state_bytes", lambda method, opt: 0)
    monkeypatch.setattr(B, "save_times", lambda *a: {})
    monkeypatch.setattr(shiq_train.parallel, "distributed", lambda **kw: contextlib.nullcontext())
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: None)
    monkeypatch.setattr(torch, "save", lambda obj, path: saved.update(obj))
    args = B.parse_args(["--dp", "2", "--reps", "3", "--threads", "1"])
    B.worker(0, 2, 0, args, str(tmp_path))
    a, b, c = B.METHODS
    assert calls[-12:] == [a, b, c] + [a, b, c] + [c, b, a] + [a, b, c]  # warm-up, then steps 0, 1 (reversed), 2
    assert all(len(saved["time"][m]) == 3 for m in B.METHODS)


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
