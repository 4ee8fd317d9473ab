"""``shiq-data stats`` summaries stay within DuckDB's memory limit on many rows of one source; running out of it is one line."""

import numpy as np
import pyarrow as pa
import pytest

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


@pytest.mark.parametrize(
    "verb",
    [
        ["stats"],
        ["filter", "--where", "reward > 0"],
        ["dedup"],
        ["split", "--test-fraction", "0.5"],
        ["mix", "--rows", "20"],
        ["validate", "--no-progress"],
    ],
)
def test_duckdb_running_out_of_its_memory_limit_is_one_line(tmp_path, capsys, monkeypatch, verb):
    """DuckDB running out of its memory limit (a 1 MB one here; a sort of many rows in the fixed 64 MB) ended the
    command in a traceback with exit status 1; it is one line saying what ran out and that no setting raises the
    limit, exit status 2, and nothing is left beside the buffer."""
    from data_cli_runs import run

    from shiq_data import spill
    from shiq_data.buffer import write_buffer

    rows = []
    for i in range(40):
        n = 3 + i % 4
        rows.append(
            {
                "row_id": f"r{i}",
                "source": f"s{i % 3}",
                "group_id": i // 2,
                "prompt_len": 2,
                "tokens": [(i + j) % 50 for j in range(n)],
                "action_mask": [j >= 2 for j in range(n)],
                "rewards": [0.0] * (n - 1) + [float(i % 5) - 2],
                "prompt": f"prompt {i}",
                "completion": f"completion {i % 7}",
            }
        )
    tok = {"name": "toy", "fingerprint": "f" * 64, "vocab_size": 50}
    write_buffer(rows, tmp_path / "b", tokenizer_info=tok, command=["t"], progress=False)
    monkeypatch.setattr(spill, "MEMORY_LIMIT", "1MB")
    argv = ["mix", f"{tmp_path / 'b'}:1", *verb[1:]] if verb[0] == "mix" else [verb[0], tmp_path / "b", *verb[1:]]
    if verb[0] not in ("stats", "validate"):
        argv += ["--out", tmp_path / "out", "--no-progress"]
    code, _, err = run(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "DuckDB ran out of the 1MB memory limit" in err and "no option or setting raises it" in err
    assert "SET memory_limit" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert not any("spill" in p.name for p in (tmp_path / "b").iterdir())  # (the work tables are removed)
    import duckdb

    monkeypatch.setenv("SHIQ_VERBOSE", "1")  # the traceback, with DuckDB's own error as the cause
    with pytest.raises(spill.SpillMemoryError) as raised:
        run(capsys, *argv)
    assert isinstance(raised.value.__cause__, duckdb.OutOfMemoryException)
