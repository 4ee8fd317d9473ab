"""The training command line and packed-row attention.

Packed rows: a block-diagonal causal mask (``shiq_train.model.model_inputs`` with ``segment_ids``)
must give every trajectory of a packed row exactly the per-token statistics it has when run alone.
"""

import warnings

import pytest
import torch

from shiq_train import model as M
from shiq_train import parallel


@pytest.fixture
def dist1():
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=3):
        yield


def test_packed_row_stats_equal_rows_run_separately(dist1):
    model = M.build_model(M.ModelConfig(vocab_size=128, max_sequence_length=16)).eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 128, (1, 5), generator=g), torch.randint(0, 128, (1, 7), generator=g)
    c = torch.randint(0, 128, (1, 9), generator=g)
    pad = torch.zeros(1, 4, dtype=torch.long)
    packed = torch.cat([torch.cat([a, b, pad], 1), torch.cat([c, a, pad[:, :2]], 1)])
    seg = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 9 + [1] * 5 + [2] * 2])
    with torch.no_grad():
        st = M.forward_stats(model, packed, seg)
        alone = {k: M.forward_stats(model, x) for k, x in {"a": a, "b": b, "c": c}.items()}
        unmasked = M.forward_stats(model, packed)
    # position 0 of a segment holds a prediction from the previous segment: compare from 1 on
    for row, start, key, n in [(0, 0, "a", 5), (0, 5, "b", 7), (1, 0, "c", 9), (1, 9, "a", 5)]:
        for got, want in [(st.chosen_logits, alone[key].chosen_logits), (st.logz, alone[key].logz)]:
            torch.testing.assert_close(got[row, start + 1:start + n], want[0, 1:], rtol=1e-5, atol=1e-5)
    # without the block mask the second trajectory would see the first one
    assert (unmasked.logz[0, 6:12] - alone["b"].logz[0, 1:]).abs().max() > 1e-4
    assert M.packed_position_ids(seg)[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]
