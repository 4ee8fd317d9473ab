"""``shiq-data validate`` checks a slice of clean rows on whole columns, and the rows one by one only where a row
may be bad, so that the first bad row and field are named as before."""

import math

import numpy as np
import pyarrow as pa
import pytest

from shiq_data import schema
from shiq_data import validate as V
from shiq_data.io import RowError
from shiq_data.schema import arrow_schema, check_group_id, check_row, clean_slice_counts

VOCAB, NEXT_GROUP = 100, 10


def _rows():
    """Five valid rows with text and reference columns (a null text column, null turn rewards among them)."""
    rows = []
    for i, (p, c) in enumerate([(2, 3), (1, 1), (3, 2), (4, 5), (2, 2)]):
        n = p + c
        rewards = [0.0] * n
        rewards[-1] = float(i) - 2
        rows.append(
            {
                "row_id": f"b0-{i}",
                "source": "s",
                "group_id": i // 2,
                "prompt_len": p,
                "tokens": [(7 * i + j) % VOCAB for j in range(n)],
                "action_mask": [j >= p for j in range(n)],
                "rewards": rewards,
                "prompt": f"prompt {i}" if i != 2 else None,
                "completion": "a completion",
                "reward": float(i) if i != 3 else None,
                "turn_rewards": [1.0, None] if i == 1 else None,
                "extra": '{"k": 1}' if i % 2 else None,
                "ref_chosen_logits": [0.0] + [0.5] * (n - 1),
                "ref_logz": [0.0] + [1.5] * (n - 1),
            }
        )
    return rows


def _table(rows):
    schema = arrow_schema(True, True)
    schema = pa.schema([f.with_nullable(True) for f in schema])  # (a null, as another writer could store it)
    return pa.Table.from_pylist(rows, schema=schema)


def _set(name, row, value):
    def change(rows):
        rows[row][name] = value(rows[row]) if callable(value) else value
        return rows

    return change


def _item(name, row, position, value):
    def change(rows):
        rows[row][name] = list(rows[row][name])
        rows[row][name][position] = value
        return rows

    return change


DAMAGES = {
    "token beyond the vocabulary": _item("tokens", 1, 0, VOCAB),
    "negative token": _item("tokens", 3, 2, -1),
    "short action mask": _set("action_mask", 2, lambda r: r["action_mask"][:-1]),
    "long rewards": _set("rewards", 0, lambda r: r["rewards"] + [0.0]),
    "short reference": _set("ref_logz", 4, lambda r: r["ref_logz"][:-1]),
    "prompt_len 0": _set("prompt_len", 1, 0),
    "prompt_len the whole row": _set("prompt_len", 3, 9),
    "action in the prompt": _item("action_mask", 3, 1, True),
    "no action": _set("action_mask", 1, lambda r: [False] * len(r["tokens"])),
    "non-finite reward": _item("rewards", 2, 4, math.nan),
    "reward off the actions": _item("rewards", 4, 0, 1.0),
    "empty row id": _set("row_id", 2, ""),
    "null row id": _set("row_id", 0, None),
    "null token": _item("tokens", 2, 1, None),
    "group id at next_group_id": _set("group_id", 4, NEXT_GROUP),
    "negative group id": _set("group_id", 1, -1),
    "reference at position 0": _item("ref_chosen_logits", 3, 0, 0.25),
    "infinite reference": _item("ref_logz", 0, 2, math.inf),
    "non-finite scalar reward": _set("reward", 2, math.nan),
    "infinite turn reward": _set("turn_rewards", 4, [1.0, math.inf]),
    "extra not JSON": _set("extra", 0, "{oops"),
    "extra not an object": _set("extra", 3, "[1, 2]"),
}

SLICES = [(0, 5), (1, 2), (2, 3), (4, 1)]


def _row_by_row_passes(piece: pa.Table) -> bool:
    """The check validate made of every row before (check_row and check_group_id on the Python rows)."""
    try:
        for i, row in enumerate(piece.to_pylist()):
            check_row(row, vocab_size=VOCAB, file="s", row_index=i)
            check_group_id(row, NEXT_GROUP, "s", i)
    except (RowError, ValueError):
        return False
    return True


@pytest.mark.parametrize("damage", [None, *DAMAGES])
def test_the_column_check_passes_exactly_the_slices_the_row_check_passes(damage):
    rows = _rows()
    table = _table(DAMAGES[damage](rows) if damage else rows)
    for start, length in SLICES:
        piece = table.slice(start, length)
        counts = clean_slice_counts(piece, VOCAB, NEXT_GROUP)
        clean = _row_by_row_passes(piece)
        assert (counts is not None) == clean, (damage, start, length)
        if clean:  # hand counts of the slice's tokens and action tokens
            got = piece.to_pylist()
            assert counts == (sum(len(r["tokens"]) for r in got), sum(sum(r["action_mask"]) for r in got))
    if damage:
        assert clean_slice_counts(table, VOCAB, NEXT_GROUP) is None


def test_validate_converts_no_row_of_a_clean_buffer(tmp_path, monkeypatch):
    """A clean buffer is checked without a row by row pass (a damaged one: the parametrised test above and
    the curation tests of hand-edited shards)."""
    from shiq_data.buffer import write_buffer

    info = {"name": "t", "fingerprint": "f", "vocab_size": VOCAB}
    rows = [{k: v for k, v in r.items() if not k.startswith("ref_")} for r in _rows()]
    write_buffer(rows, tmp_path / "b", tokenizer_info=info, command=["t"], progress=False, shard_rows=2)
    calls = []
    monkeypatch.setattr(schema, "check_row", lambda *a, **k: calls.append(1) or check_row(*a, **k))
    report = V.validate_buffer(tmp_path / "b")
    assert report["rows"] == 5 and report["tokens"] == sum(len(r["tokens"]) for r in rows)
    assert report["groups"] == 3 and calls == []
    assert np.sum([sum(r["action_mask"]) for r in rows]) == report["action_tokens"]


def _clean_buffer(path, shard_rows=2):
    """The rows of :func:`_rows` (every one with its text, no per-turn rewards, which a JSONL record of a plain
    text completion cannot carry, no reference columns) as a buffer at ``path``."""
    from shiq_data.buffer import write_buffer

    rows = [{k: v for k, v in r.items() if not k.startswith("ref_")} for r in _rows()]
    for r in rows:
        r.update(prompt=r["prompt"] or "a prompt", turn_rewards=None)
    info = {"name": "t", "fingerprint": "f", "vocab_size": VOCAB}
    write_buffer(rows, path, tokenizer_info=info, command=["t"], progress=False, shard_rows=shard_rows)
    return rows


def _count_row_checks(monkeypatch) -> list:
    """Count every call of the row by row check (:func:`shiq_data.schema.check_slice`'s)."""
    calls = []
    counted = lambda *a, **k: calls.append(1) or check_row(*a, **k)  # noqa: E731
    monkeypatch.setattr(schema, "check_row", counted)
    return calls


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
def test_export_converts_no_row_of_a_clean_buffer_and_names_a_bad_one(tmp_path, monkeypatch, fmt):
    """export checks its rows as validate does: a clean buffer on whole columns (it checked every row in Python,
    about 74 µs a row), a damaged shard row by row, refused naming the shard, row and field, nothing written."""
    import json

    import pyarrow.parquet as pq
    from data_cli_runs import rewrite_shard

    from shiq_data.export import export_buffer

    rows = _clean_buffer(tmp_path / "b")
    calls = _count_row_checks(monkeypatch)
    export_buffer(tmp_path / "b", tmp_path / "e", fmt, progress=False)
    assert calls == []
    if fmt == "jsonl":
        got = [json.loads(line) for line in (tmp_path / "e" / "data.jsonl").read_text().splitlines()]
        assert [(g["prompt"], g["group"]) for g in got] == [(r["prompt"], r["group_id"]) for r in rows]
    elif fmt == "parquet":
        assert pq.read_table(tmp_path / "e" / "data.parquet").column("tokens").to_pylist() == [
            r["tokens"] for r in rows
        ]
    rewrite_shard(tmp_path / "b", 1, lambda shard: shard[1].update(tokens=[1, VOCAB + 3, 2, 3, 4, 5, 6, 7, 8]))
    shard = tmp_path / "b" / json.loads((tmp_path / "b" / "manifest.json").read_text())["shards"][1]["file"]
    with pytest.raises(RowError, match=f"{shard}: row 1: field 'tokens': token id {VOCAB + 3} at position 1"):
        export_buffer(tmp_path / "b", tmp_path / "e2", fmt, progress=False)
    assert not (tmp_path / "e2").exists() and calls != []
