"""tools/bench_data.py: the random-batch read rate warms both sides up alike (no model, no files)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import bench_data as B  # noqa: E402

ROWS, LEN = 4, 8  # a batch: 4 rows of 8 real tokens


class SlowFirst:
    """Every call 10 ms, the first 300 ms more: a one-off cost, as a first call pays."""

    def __init__(self):
        self.calls = 0

    def tick(self):
        time.sleep(0.01 + (0.3 if self.calls == 0 else 0.0))
        self.calls += 1


class FakeSampler(SlowFirst):
    def __init__(self, buf, rows_per_micro_batch, seed, pad_id):
        super().__init__()

    def next_micro_batches(self):
        self.tick()
        return [{"tokens": torch.ones(ROWS, LEN, dtype=torch.int64)}]


class FakeDataset(SlowFirst):
    def __len__(self):
        return 100

    def __getitem__(self, idx):
        self.tick()
        return {k: [[1] * LEN for _ in idx] for k in ("tokens", "action_mask", "rewards")}


def test_read_rate_warms_up_both_sides_alike(monkeypatch):
    """Both sides cost the same per batch and pay the same first-call cost: their rates agree. (The datasets side
    used to be timed from its first, cold call, the buffer's sampler after an untimed one.)"""
    import shiq_data.sampler

    monkeypatch.setattr(shiq_data.sampler, "BufferSampler", FakeSampler)
    ds = FakeDataset()
    ours, theirs = B.bench_read(None, ds, ROWS, steps=3, pad_id=-1)
    assert ds.calls == 4  # 3 timed batches and one untimed
    assert 0.5 < ours / theirs < 2.0, (ours, theirs)
