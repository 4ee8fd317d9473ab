"""tools/bench_data.py: the random-batch read rate warms both sides up alike, and the build and read rounds
alternate which side goes first (no model, no files)."""

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


def test_every_datasets_batch_has_the_rows_of_a_sampler_batch(monkeypatch):
    """More batches than the dataset has rows: the datasets side wraps round and still reads ``batch_rows`` rows a
    batch, as the sampler's batches hold (its batch at the end of the rows used to hold only what was left: 2 of 4
    here)."""
    import shiq_data.sampler

    sizes = []

    class Ten(FakeDataset):
        def __len__(self):
            return 10

        def __getitem__(self, idx):
            sizes.append(len(idx))
            assert all(0 <= i < 10 for i in idx)
            return super().__getitem__(idx)

        def tick(self):
            pass

    monkeypatch.setattr(shiq_data.sampler, "BufferSampler", FakeSampler)
    monkeypatch.setattr(FakeSampler, "tick", lambda self: None)
    B.bench_read(None, Ten(), ROWS, steps=5, pad_id=-1)
    assert sizes == [ROWS] * 6  # one untimed batch, 5 timed: 24 rows of 10, so every row is read twice or more


def test_the_build_and_read_rounds_alternate_which_side_goes_first(monkeypatch, capsys):
    """shiq_data used to build and read first in every round: the order could favour either side."""
    import shiq_data.tokenizers

    builds, reads = [], []

    class Buf:
        manifest = {"tokens": 10}

        def __len__(self):
            return 5

    def fake_build(jsonl, work, tokenizer, info, tag="0", order=B.SIDES):
        builds.append(order)
        return Buf(), [0] * 5, 1.0, 1.0

    def fake_read(buf, ds, batch_rows, steps, pad_id, order=B.SIDES):
        reads.append(order)
        return 1.0, 1.0

    monkeypatch.setattr(shiq_data.tokenizers, "load_tokenizer", lambda name: (None, {}))
    monkeypatch.setattr(B, "bench_build", fake_build)
    monkeypatch.setattr(B, "bench_read", fake_read)
    mem = {"tokens": 1, "rows": 1, "rss_anon_peak_mb": 1.0, "rss_anon_growth_mb": 0.0, "vm_hwm_mb": 1.0, "epoch_s": 1.0}
    monkeypatch.setattr(B, "bench_memory", lambda *a: mem)
    assert B.main(["--part", "buffer", "--tokens", "11000", "--repeat", "3"]) == 0
    ab, ba = ("shiq_data", "datasets"), ("datasets", "shiq_data")
    assert builds == [ab, ba, ab] and reads == [ab, ba, ab]
    assert "shiq_data then datasets in even runs, datasets then shiq_data in odd ones" in capsys.readouterr().out


def test_read_runs_the_sides_in_the_order_given(monkeypatch):
    import shiq_data.sampler

    log = []

    class LoggedSampler(FakeSampler):
        def tick(self):
            log.append("shiq_data")

    class LoggedDataset(FakeDataset):
        def tick(self):
            log.append("datasets")

    monkeypatch.setattr(shiq_data.sampler, "BufferSampler", LoggedSampler)
    B.bench_read(None, LoggedDataset(), ROWS, steps=2, pad_id=-1, order=("datasets", "shiq_data"))
    assert log == ["datasets"] * 3 + ["shiq_data"] * 3


def test_build_runs_the_sides_in_the_order_given(monkeypatch, tmp_path):
    import datasets

    import shiq_data.buffer
    import shiq_data.readers.generic

    log = []

    class FakeDs:
        def map(self, *a, **k):
            log.append("datasets")
            return "ds"

    monkeypatch.setattr(shiq_data.readers.generic, "read_jsonl", lambda jsonl, tokenizer: iter(()))
    monkeypatch.setattr(shiq_data.buffer, "write_buffer", lambda *a, **k: log.append("shiq_data") or "buf")
    monkeypatch.setattr(datasets.Dataset, "from_json", staticmethod(lambda *a, **k: FakeDs()))
    for order in (("datasets", "shiq_data"), ("shiq_data", "datasets")):
        log.clear()
        buf, ds, ours, theirs = B.bench_build(tmp_path / "x.jsonl", tmp_path, None, {"eos_id": 0}, order=order)
        assert log == list(order) and (buf, ds) == ("buf", "ds") and ours >= 0 and theirs >= 0
