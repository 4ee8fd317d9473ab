"""What the buffer writer and ``validate`` remember per row (row ids, old rows' texts) is checked out of core
(temporary Parquet tables joined by DuckDB): the verdicts equal plain Python ones on the rows, the first
offending row is named, nothing is committed on an error and no temporary folder is left behind."""

import json

import pyarrow as pa
import pytest

from shiq_data.buffer import append_buffer, open_buffer, read_shard, write_buffer, write_shard_file
from shiq_data.io import RowError
from shiq_data.validate import validate_buffer

TOK = {"name": "t", "fingerprint": "f", "vocab_size": 50}


def rows(n, *, start=0, texts=None):
    """``n`` valid rows with ids ``r<start + i>``, texts ``texts[i]`` (prompt, completion) or unique ones."""
    out = []
    for i in range(n):
        p, c = texts[i] if texts else (f"p{start + i}", f"c{start + i}")
        out.append(
            {
                "row_id": f"r{start + i}",
                "source": "s",
                "group_id": (start + i) // 3,
                "prompt_len": 1,
                "tokens": [1, 2, 3],
                "action_mask": [False, True, True],
                "rewards": [0.0, 0.0, 1.0],
                "prompt": p,
                "completion": c,
            }
        )
    return out


def files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != ".lock")  # the lock file an append creates


def test_append_counts_and_refuses_repeated_texts_like_a_python_dict(tmp_path):
    old = [("a", "x"), ("b", "y"), ("a", "x"), ("c", None), ("d", "z")]
    new = [("q", "w"), ("b", "y"), ("c", None), ("a", "x"), ("e", "e"), ("d", "z")]
    first = {}
    for k, (p, c) in enumerate(old):
        if c is not None:
            first.setdefault((p, c), f"r{k}")
    repeats = [(k, first[t]) for k, t in enumerate(new) if t in first]
    assert [k for k, _ in repeats] == [1, 3, 5]
    buf = tmp_path / "b"
    write_buffer(rows(5, texts=old), buf, tokenizer_info=TOK, command=["t"], shard_rows=2, progress=False)
    before = files(buf), (buf / "manifest.json").read_bytes()
    with pytest.raises(RowError) as e:
        append_buffer(
            buf, rows(6, start=5, texts=new), command=["t"], progress=False, input_name="in", refuse_duplicates=True
        )
    assert (e.value.file, e.value.row, e.value.field) == ("in", repeats[0][0], "completion")
    assert f"as row {repeats[0][1]!r} of the buffer" in str(e.value)
    assert (files(buf), (buf / "manifest.json").read_bytes()) == before and files(tmp_path) == ["b"]
    got = append_buffer(buf, rows(6, start=5, texts=new), command=["t"], progress=False, shard_rows=4)
    assert got.manifest["commands"][-1]["duplicates"] == len(repeats) and len(got) == 11
    assert files(tmp_path) == ["b"]


def test_repeated_row_ids_are_named_at_their_first_repeat(tmp_path):
    new = rows(7, start=3)
    new[4]["row_id"] = "r1"  # an old row's id, output row 4
    new[5]["row_id"] = new[2]["row_id"]  # an earlier new row's id, output row 5
    buf = tmp_path / "b"
    write_buffer(rows(3), buf, tokenizer_info=TOK, command=["t"], shard_rows=2, progress=False)
    before = files(buf)
    with pytest.raises(RowError, match="row 4: field 'row_id': 'r1' is not unique"):
        append_buffer(buf, new, command=["t"], progress=False, shard_rows=2)
    assert files(buf) == before and len(open_buffer(buf)) == 3
    with pytest.raises(RowError, match="row 5: field 'row_id': 'r5' is not unique"):
        write_buffer(new, tmp_path / "c", tokenizer_info=TOK, command=["t"], shard_rows=2, progress=False)
    assert files(tmp_path) == ["b"]


def test_validate_counts_groups_and_names_a_repeated_id(tmp_path):
    buf = tmp_path / "b"
    data = rows(7)
    write_buffer(data, buf, tokenizer_info=TOK, command=["t"], shard_rows=3, progress=False)
    summary = validate_buffer(buf)
    assert summary["groups"] == len({r["group_id"] for r in data}) == 3 and summary["rows"] == 7
    # shard 1's second row (row 4 of the buffer) takes row 2's id
    m = json.loads((buf / "manifest.json").read_text())
    path = buf / m["shards"][1]["file"]
    table = read_shard(path)
    ids = table.column("row_id").to_pylist()
    ids[1] = "r2"
    table = table.set_column(0, "row_id", pa.array(ids))
    path.unlink()
    m["shards"][1] = {**m["shards"][1], **write_shard_file(table, path), "file": path.name}
    (buf / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=rf"{path.name}: row 1: field 'row_id': 'r2' is not unique"):
        validate_buffer(buf)
    assert files(tmp_path) == ["b"]
