"""Shared test settings: seeded per test, single-threaded torch so tests behave the same on 2 cores."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
# one torch thread in the commands tests start too (unless they set their own): with two test workers on
# two cores, a command's second thread only competes with the other worker (the quick main job took
# 1.34x as long with two threads beside a busy core as with one)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


import random  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

_TOKENIZERS: dict = {}


@pytest.fixture(autouse=True)
def _seeded(request):
    """Every test starts from one random state of its own, wherever and in whatever order it runs: Python's,
    numpy's and torch's generators are seeded from the test's id. A test's random inputs are then the same on
    every machine and worker split (it cannot pass here and fail in CI on other draws). ``SHIQ_TEST_SEED=K``
    shifts every seed by K, to try a test on other draws."""
    seed = (zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("SHIQ_TEST_SEED", "0"))) % 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cached_load_tokenizer(name):
    """``shiq_data.tokenizers.load_tokenizer``, once per name and test session (each command would load it
    again). The tokenizer is shared: a test that changes it (``--system-prompt``) must not use this."""
    from shiq_data.tokenizers import load_tokenizer

    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = load_tokenizer(name)
    return _TOKENIZERS[name]


@pytest.fixture
def tokenizers_once(monkeypatch):
    """``shiq-data`` commands in this test load each tokenizer from the session cache."""
    import shiq_data.cli

    monkeypatch.setattr(shiq_data.cli, "load_tokenizer", cached_load_tokenizer)


@pytest.fixture(scope="module")
def gpt2():
    return cached_load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def smollm2():
    from shiq_data.assets import AssetMissing

    try:
        return cached_load_tokenizer("smollm2")
    except AssetMissing as e:
        pytest.skip(str(e))


def pytest_sessionstart(session):
    """Under pytest-xdist, each test worker starts its fork server (tests/ranks.py) before any test: in the
    worker's own environment, not that of the first test to need it."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import ranks

        ranks.start_server()
