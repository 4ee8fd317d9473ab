"""tools/bench_train.py: the statistics' memory is measured from the process's size when they start."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_train as B  # noqa: E402


def test_an_earlier_higher_peak_hides_nothing():
    big = np.ones(256 * 2**20, dtype=np.uint8)  # an earlier peak, as importing torch makes one
    del big
    mib = B.peak_increase_mib(lambda: np.ones(64 * 2**20, dtype=np.uint8).sum())
    # the peak since the process started (ru_maxrss) read about 0 here: the 64 MiB stayed under the earlier peak
    assert 56 < mib < 100, mib


def test_the_timed_passes_alternate_their_order():
    """Every pass ran the methods in one order (the baseline always after the chunked step); every other pass
    is now reversed, as in the other benchmarks."""
    names = ["a", "b", "c"]
    assert [B.pass_order(names, rep) for rep in range(3)] == [names, ["c", "b", "a"], names]
