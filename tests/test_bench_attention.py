"""tools/bench_attention.py: the three contestants hold the same weights (tiny model, in-process)."""

from __future__ import annotations

import sys
import warnings

import pytest
from tool_runs import TOOLS

sys.path.insert(0, str(TOOLS))

import bench_attention as BA  # noqa: E402


def test_contestants_compute_the_same_loss():
    import torch

    from shiq_train import parallel
    from shiq_train.attention import SDPACoreAttention

    warnings.filterwarnings("ignore")
    threads = torch.get_num_threads()
    try:
        with parallel.distributed(seed=0):
            models = BA.build("tiny")
            assert list(models) == list(BA.CONTESTANTS)
            layer = models["sdpa attention"][0].decoder.layers[0]
            assert isinstance(layer.self_attention.core_attention, SDPACoreAttention)
            args = BA.parse_args(["--rounds", "2", "--profile", "--top", "3"])
            res = BA.run_shape(models, 2, 16, args, models["transformers"][0].config.vocab_size)
    finally:
        torch.set_num_threads(threads)
    # transformers' own cross-entropy is the reference for the megatron models' statistics
    want = res["losses"]["transformers"]
    for c in BA.CONTESTANTS:
        assert res["losses"][c] == pytest.approx(want, rel=1e-5), c
        assert len(res["seconds"][c]) == 2 and all(s > 0 for s in res["seconds"][c])
        assert len(res["profiles"][c]) == 3
