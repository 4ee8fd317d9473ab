"""stats, split and mix read their out-of-core tables back in small batches and chunks (forced here to a few
rows, so every multi-batch path runs) and still give what a plain in-memory computation on the rows gives:
pandas for the statistics, numpy's permutation over the groups for split, and the in-memory group draw
for mix."""

from collections import Counter

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import shiq_data.curate.mix
import shiq_data.curate.split
import shiq_data.spill
from shiq_data.buffer import open_buffer, write_buffer
from shiq_data.curate.mix import mix_buffers
from shiq_data.curate.split import split_buffer
from shiq_data.curate.stats import buffer_stats

TOK = {"name": "t", "fingerprint": "f", "vocab_size": 50}
SOURCES = ("forum", "wiki", "chat")


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    group = 0
    for i in range(n):
        if rng.random() < 0.4:
            group += 1
        p, c = int(rng.integers(1, 6)), int(rng.integers(1, 9))
        reward = float(np.float32(rng.normal()))
        yield {
            "row_id": f"r{i}",
            "source": SOURCES[int(rng.integers(3))],
            "group_id": group if i % 7 else 1,  # group 1 comes back later in the buffer
            "prompt_len": p,
            "tokens": [1] * (p + c),
            "action_mask": [False] * p + [True] * c,
            "rewards": [0.0] * (p + c - 1) + [reward],
            "prompt": f"p{group}",
            "completion": f"c{i}",
        }


@pytest.fixture(scope="module")
def buf(tmp_path_factory):
    path = tmp_path_factory.mktemp("ooc") / "buf"
    write_buffer(_rows(61), path, tokenizer_info=TOK, command=["t"], shard_rows=9, progress=False)
    df = pd.DataFrame(list(_rows(61)))
    df["n_tokens"] = df.tokens.map(len)
    df["reward"] = df.rewards.map(lambda r: r[-1])
    return path, df


@pytest.fixture
def small_batches(monkeypatch):
    monkeypatch.setattr(shiq_data.spill, "BATCH_ROWS", 5)
    monkeypatch.setattr(shiq_data.curate.split, "CHUNK", 2)
    monkeypatch.setattr(shiq_data.curate.mix, "CHUNK", 2)


def test_stats_match_pandas_across_batches(buf, small_batches):
    path, df = buf
    stats, hists = buffer_stats(path, histograms=True)
    for name, part in [("all", df), *df.groupby("source")]:
        s = stats["all"] if name == "all" else stats["sources"][name]
        assert s["rows"] == len(part) and s["groups"] == part.group_id.nunique()
        for key, column in (("tokens", "n_tokens"), ("prompt_tokens", "prompt_len"), ("reward", "reward")):
            x = part[column].astype(float)
            want = {"mean": x.mean(), "std": x.std(), "min": x.min(), "max": x.max()}
            want.update(p50=x.quantile(0.5), p95=x.quantile(0.95))
            assert s[key] == pytest.approx(want, abs=1e-12)
    assert stats["group_sizes"] == dict(Counter(df.group_id.value_counts().tolist()))
    for source, part in df.groupby("source"):
        counts, edges = hists["reward"][source]
        assert counts.tolist() == np.histogram(part.reward, bins=30)[0].tolist()
        assert edges.tolist() == pytest.approx(np.histogram(part.reward, bins=30)[1].tolist())


def _ids(folder):
    t = open_buffer(folder).table
    return t.column("row_id").to_pylist(), t.column("group_id").to_pylist()


def test_split_matches_a_permutation_of_the_groups(buf, small_batches, tmp_path):
    path, df = buf
    units, _ = pd.factorize(df.group_id)  # first appearance order
    sizes = np.bincount(units)
    order = np.random.default_rng(4).permutation(len(sizes))
    taken = int(np.searchsorted(np.cumsum(sizes[order]), round(0.3 * len(df))) + 1)
    test = np.isin(units, order[:taken])
    got = split_buffer(path, tmp_path / "s", test_fraction=0.3, seed=4, command=["t"])
    assert _ids(tmp_path / "s" / "test")[0] == df.row_id[test].tolist()
    assert _ids(tmp_path / "s" / "train")[0] == df.row_id[~test].tolist()
    assert got == {
        "train": int((~test).sum()),
        "test": int(test.sum()),
        "units": {"train": len(sizes) - taken, "test": taken},
    }


def _reference_mix(dfs, targets, seed, replacement):
    """The mix computed in memory: group sizes in a dict, the draw, new group ids by first appearance."""
    out, new_group = [], {}
    for i, (df, target) in enumerate(zip(dfs, targets)):
        sizes = df.group_id.value_counts(sort=False).reindex(pd.unique(df.group_id)).to_dict()
        groups, rng, copies, total = list(sizes), np.random.default_rng([seed, i]), Counter(), 0
        if replacement:
            while total < target:
                g = groups[int(rng.integers(len(groups)))]
                copies[g] += 1
                total += sizes[g]
        else:
            for j in rng.permutation(len(groups)):
                if total >= target:
                    break
                copies[groups[j]] = 1
                total += sizes[groups[j]]
        for rid, g in zip(df.row_id, df.group_id):
            for k in range(copies[g]):
                out.append(
                    (f"m{i}" + (f"c{k}" if k else "") + f"-{rid}", new_group.setdefault((i, g, k), len(new_group)))
                )
    return [r for r, _ in out], [g for _, g in out]


@pytest.mark.parametrize("replacement", [False, True])
def test_mix_matches_the_in_memory_draw(buf, small_batches, tmp_path, replacement):
    path, df = buf
    rows = 150 if replacement else 50
    mix_buffers([f"{path}:1", f"{path}:2"], tmp_path / "m", rows=rows, replacement=replacement, seed=3, command=["t"])
    targets = [round(rows / 3), round(rows * 2 / 3)]
    want = _reference_mix([df, df], targets, 3, replacement)
    assert _ids(tmp_path / "m") == want
    assert any(r.startswith("m0c1-") for r in want[0]) == replacement


def test_a_table_appended_in_one_piece_is_queried_within_the_memory_limit(tmp_path):
    """A million row ids appended at once (``mix --replacement --rows 1000000`` logs them so) became one
    Parquet row group, whose column chunks DuckDB holds while scanning: the repeated-id query of a buffer
    build then ran out of its 64 MB. Written in row groups of ``ROW_GROUP_ROWS``, it runs."""
    import pyarrow as pa

    from shiq_data.spill import ROW_GROUP_ROWS, Spill

    n = 1_000_000
    with Spill(tmp_path / "out") as spill:
        spill.declare("t", pa.schema([("i", pa.int64()), ("row_id", pa.string())]))
        spill.append("t", pa.table({"i": np.arange(n), "row_id": [f"m0-b0-{i % 5000}-copy{i}" for i in range(n)]}))
        t = spill.table("t")
        firsts = f"SELECT row_id, min(i) AS first FROM {t} GROUP BY row_id"
        got = spill.one(
            f"SELECT min(i) FROM (SELECT n.i FROM {t} n JOIN ({firsts}) f ON n.row_id = f.row_id WHERE n.i > f.first "
            f"UNION ALL SELECT i FROM {t} WHERE row_id IN (SELECT row_id FROM {t} WHERE i < 0))"
        )
        assert got == (None,)  # no id repeats
        assert pq.ParquetFile(spill.dir / "t.parquet").metadata.num_row_groups == -(-n // ROW_GROUP_ROWS)
