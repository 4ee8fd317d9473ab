"""``shiq-data stats`` summaries stay within DuckDB's memory limit on many rows of one source."""

import numpy as np
import pyarrow as pa

from shiq_data.curate import stats
from shiq_data.spill import Spill


def test_summaries_of_many_rows_within_a_small_memory_limit(tmp_path):
    """100,000 rows of one source in an 8 MB limit: the per-source deviations once grouped the joined rows by every column
    of the first pass and ran out of memory (a million rows in the default 64 MB did too). The summaries
    are checked against numpy's."""
    n = 100_000
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, 10, n)
    completion = rng.integers(1, 10, n)
    reward = rng.choice([-1.0, 0.0, 1.0, 2.0], n)
    source = np.full(n, "a")
    table = pa.table(
        {
            "source": source,
            "group_id": np.arange(n) // 3,
            "tokens": prompt + completion,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "reward": reward,
            "has_ref": np.zeros(n, bool),
        }
    )
    with Spill(tmp_path / "out", memory_limit="8MB") as spill:
        spill.declare("rows", stats._SCHEMA)
        spill.append("rows", table)
        found = stats.summarise(spill)
    assert found["rows"] == n
    for name, keep in (("all", np.ones(n, bool)), ("a", source == "a")):
        summary = found["all"] if name == "all" else found["sources"][name]
        assert summary["rows"] == keep.sum()
        for column, values in (("tokens", prompt + completion), ("reward", reward)):
            x = values[keep].astype(float)
            assert np.isclose(summary[column]["mean"], x.mean())
            assert np.isclose(summary[column]["std"], x.std(ddof=1))
            assert summary[column]["min"] == x.min() and summary[column]["max"] == x.max()
            assert summary[column]["p50"] == np.percentile(x, 50)
