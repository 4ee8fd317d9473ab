"""Replay buffer files: round trip against plain pyarrow, row checks, append, shard rewrite, kills."""

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from shiq_data.buffer import (
    _locked,
    add_ref_columns,
    append_buffer,
    open_buffer,
    replace_shard,
    shards_without_ref,
    write_buffer,
)
from shiq_data.io import RowError, exclusive_lock
from shiq_data.schema import INPUT_KEY, check_row, input_location
from shiq_data.validate import validate_buffer

TOK = {"name": "toy", "fingerprint": "f" * 64, "vocab_size": 50}
REPO = Path(__file__).resolve().parents[1]


def make_rows(n, seed=0, groups_of=2):
    """Random valid rows: prompt of 1-4 tokens, completion of 1-6, reward on the last action token."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        p, c = int(rng.integers(1, 5)), int(rng.integers(1, 7))
        rewards = [0.0] * (p + c)
        rewards[-1] = float(np.float32(rng.normal()))
        rows.append(
            {
                "row_id": f"r{seed}-{i}",
                "source": f"src{seed}",
                "group_id": i // groups_of,
                "prompt_len": p,
                "tokens": [int(t) for t in rng.integers(0, 50, p + c)],
                "action_mask": [False] * p + [True] * c,
                "rewards": rewards,
            }
        )
    return rows


def plain_read(folder):
    """All rows of a buffer read with nothing but pyarrow and json (the manifest's shard order)."""
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    out = []
    for s in manifest["shards"]:
        with pa.ipc.open_stream(pa.memory_map(str(Path(folder) / s["file"]))) as r:
            out += r.read_all().to_pylist()
    return out


def test_round_trip_equals_plain_pyarrow_and_datasets(tmp_path):
    rows = make_rows(23)
    buf = write_buffer(rows, tmp_path / "b", tokenizer_info=TOK, command=["test"], shard_rows=5, progress=False)
    got = plain_read(tmp_path / "b")
    assert got == rows  # float32 rewards were drawn as float32 values, so they survive exactly
    assert len(buf) == 23 and buf.table.num_rows == 23 and buf.row(7) == rows[7]
    assert len(buf.shard_paths) == 5  # 5 + 5 + 5 + 5 + 3
    m = buf.manifest
    assert m["rows"] == 23 and m["tokens"] == sum(len(r["tokens"]) for r in rows)
    assert m["action_tokens"] == sum(sum(r["action_mask"]) for r in rows)
    assert m["commands"][0]["argv"] == ["test"] and m["tokenizer"] == TOK and m["next_group_id"] == 12
    ds = buf.to_datasets()
    assert len(ds) == 23 and ds[7] == rows[7] and ds[22]["tokens"] == rows[22]["tokens"]
    import datasets

    assert datasets.Dataset.from_file(str(buf.shard_paths[1]))[0] == rows[5]
    assert validate_buffer(tmp_path / "b")["rows"] == 23


def test_table_is_zero_copy_memory_map(tmp_path):
    buf = write_buffer(make_rows(40), tmp_path / "b", tokenizer_info=TOK, command=["t"], shard_rows=10, progress=False)
    before = pa.total_allocated_bytes()
    table = buf.table
    assert table.num_rows == 40 and pa.total_allocated_bytes() == before


def test_missing_row_id_is_assigned(tmp_path):
    rows = make_rows(3)
    for r in rows:
        del r["row_id"]
    buf = write_buffer(rows, tmp_path / "b", tokenizer_info=TOK, command=["t"], progress=False)
    assert [r["row_id"] for r in plain_read(tmp_path / "b")] == ["b0-0", "b0-1", "b0-2"]
    assert len(buf) == 3


def test_row_key_becomes_a_row_id_with_the_command_prefix(tmp_path):
    """Readers name rows by ``row_key`` (unique within one input); two inputs with the same keys do not clash."""

    def keyed(seed):
        return [
            {**{k: v for k, v in r.items() if k != "row_id"}, "row_key": f"in.jsonl:{i + 1}:0"}
            for i, r in enumerate(make_rows(2, seed=seed))
        ]

    write_buffer(keyed(0), tmp_path / "b", tokenizer_info=TOK, command=["t"], progress=False)
    append_buffer(tmp_path / "b", keyed(1), command=["a"], progress=False)
    got = plain_read(tmp_path / "b")
    assert [r["row_id"] for r in got] == ["b0-in.jsonl:1:0", "b0-in.jsonl:2:0", "b1-in.jsonl:1:0", "b1-in.jsonl:2:0"]
    assert all("row_key" not in r for r in got) and validate_buffer(tmp_path / "b")["rows"] == 4


BAD_ROWS = [
    # (field, mutation, words in the message)
    ("action_mask", lambda r: r.update(action_mask=r["action_mask"][:-1]), "length"),
    ("rewards", lambda r: r.update(rewards=r["rewards"] + [0.0]), "length"),
    ("rewards", lambda r: r["rewards"].__setitem__(-1, float("nan")), "non-finite"),
    ("rewards", lambda r: r["rewards"].__setitem__(0, 1.0), "not an action"),
    (
        "action_mask",
        lambda r: r.update(action_mask=[False] * len(r["tokens"]), rewards=[0.0] * len(r["tokens"])),
        "no action token",
    ),
    ("action_mask", lambda r: r["action_mask"].__setitem__(0, True), "inside the prompt"),
    ("tokens", lambda r: r["tokens"].__setitem__(1, 50), "outside [0, 50)"),
    ("tokens", lambda r: r["tokens"].__setitem__(1, -1), "outside"),
    ("prompt_len", lambda r: r.update(prompt_len=0), "outside"),
    ("prompt_len", lambda r: r.update(prompt_len=len(r["tokens"])), "outside"),
    ("source", lambda r: r.pop("source"), "missing"),
    ("source", lambda r: r.update(source="in\ud800.jsonl"), "lone surrogate"),
    ("row_id", lambda r: r.update(row_id="r\udfff"), "lone surrogate"),
    ("group_id", lambda r: r.update(group_id="g"), "integer"),
    ("ref_logz", lambda r: r.update(ref_chosen_logits=[0.0] * len(r["tokens"])), "missing"),
    ("ref_logz", lambda r: r.update(ref_chosen_logits=[0.0] * len(r["tokens"]), ref_logz=[0.0]), "length"),
    (
        "ref_logz",
        lambda r: r.update(ref_chosen_logits=[0.0] * len(r["tokens"]), ref_logz=[1.0] + [0.0] * (len(r["tokens"]) - 1)),
        "position 0",
    ),
    ("tokens", lambda r: r.update(tokens=[r["tokens"][0], [1, 2], *r["tokens"][2:]]), "flat list"),
    ("rewards", lambda r: r.update(rewards=[[0.0, 1.0], *r["rewards"][1:]]), "flat list"),
    (  # float32's largest is 3.4e38: stored, 1e39 would read back as inf (a shard that validate refuses)
        "ref_chosen_logits",
        lambda r: r.update(
            ref_chosen_logits=[0.0] * (len(r["tokens"]) - 1) + [1e39], ref_logz=[0.0] * len(r["tokens"])
        ),
        "float32",
    ),
]


@pytest.mark.parametrize("field,mutate,words", BAD_ROWS)
def test_each_malformed_row_kind_is_rejected_with_file_row_field(tmp_path, field, mutate, words):
    rows = make_rows(6)
    rows[4]["tokens"][0] = 3  # any valid edit; row 4 is the one broken below
    mutate(rows[4])
    with pytest.raises(RowError) as e:
        write_buffer(
            rows, tmp_path / "b", tokenizer_info=TOK, command=["t"], shard_rows=2, progress=False, input_name="in.jsonl"
        )
    msg = str(e.value)
    assert (e.value.file, e.value.row, e.value.field) == ("in.jsonl", 4, field)
    assert "in.jsonl" in msg and "row 4" in msg and f"'{field}'" in msg and words in msg
    # shards 0 and 1 were already written: nothing of them may remain
    assert not (tmp_path / "b").exists() and list(tmp_path.iterdir()) == []


def test_check_row_accepts_a_valid_row_and_duplicate_ids_are_refused(tmp_path):
    check_row(make_rows(1)[0], vocab_size=50, file="f", row_index=0)
    rows = make_rows(3)
    rows[2]["row_id"] = rows[0]["row_id"]
    with pytest.raises(RowError, match="row 2: field 'row_id'.*not unique"):
        write_buffer(rows, tmp_path / "b", tokenizer_info=TOK, command=["t"], progress=False)
    assert not (tmp_path / "b").exists()


def located(rows, row_label="line"):
    """``rows`` as a reader gives them: without ``row_id``, each carrying its input location (line ``i + 1``)."""
    return [
        {
            **{k: v for k, v in r.items() if k != "row_id"},
            INPUT_KEY: input_location(
                "data/in.jsonl", i + 1 if row_label == "line" else i, row_label=row_label, fields={"rewards": "reward"}
            ),
        }
        for i, r in enumerate(rows)
    ]


def test_row_errors_name_the_input_location_a_reader_gives(tmp_path):
    """A token outside the vocabulary (no tokenizer output reaches it: vocab_size is len(tokenizer), so
    only rows built another way can) and a reward beyond float32 on input line 2 name that line."""
    rows = located(make_rows(3))
    rows[1]["tokens"] = [*rows[1]["tokens"][:-1], 50]
    with pytest.raises(RowError) as e:
        write_buffer(rows, tmp_path / "b", tokenizer_info=TOK, command=["t"], progress=False, input_name="x")
    assert (e.value.file, e.value.row, e.value.field) == ("data/in.jsonl", 2, "tokens")
    assert str(e.value).startswith("data/in.jsonl: line 2: field 'tokens': token id 50 at position ")
    assert str(e.value).endswith("is outside [0, 50) (output row 1)")
    rows = located(make_rows(3), row_label="row")
    rows[1]["rewards"] = [*rows[1]["rewards"][:-1], 1e300]
    with pytest.raises(
        RowError,
        match=r"^data/in.jsonl: row 1: field 'reward': reward 1e\+300 at position \d+ does not fit in float32 "
        r"\(output row 1, column 'rewards'\)$",
    ):
        write_buffer(rows, tmp_path / "b", tokenizer_info=TOK, command=["t"], progress=False)
    assert list(tmp_path.iterdir()) == []
    # appending: the output row counts this command's rows, the line is still the input's
    good = located(make_rows(2))
    write_buffer(good, tmp_path / "b", tokenizer_info=TOK, command=["t"], progress=False)
    assert all(INPUT_KEY in r for r in good)  # the caller's rows are left alone
    assert all(INPUT_KEY not in r for r in plain_read(tmp_path / "b"))  # and the location is not written
    assert plain_read(tmp_path / "b")[0]["row_id"] == "b0-0"
    rows = located(make_rows(3, seed=1))
    rows[2]["tokens"][0] = -1
    with pytest.raises(RowError, match=r"^data/in.jsonl: line 3: field 'tokens': token id -1 .*\(output row 2\)$"):
        append_buffer(tmp_path / "b", rows, command=["a"], progress=False)
    assert len(open_buffer(tmp_path / "b")) == 2


def test_existing_out_dir_is_refused(tmp_path, monkeypatch):
    (tmp_path / "b").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        write_buffer(make_rows(2), tmp_path / "b", tokenizer_info=TOK, command=["t"], progress=False)
    # a link to nowhere failed with a raw errno after the whole build
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError, match="is a symbolic link .* which does not exist"):
        write_buffer(make_rows(2), tmp_path / "dangling", tokenizer_info=TOK, command=["t"], progress=False)
    # another build that finished into the same --out first: its buffer stays, this one says so
    import shiq_data.buffer as B

    real = B.atomic_write_json

    def racing(path, *a, **k):  # the other build renames its folder into place while this one writes
        if Path(path).name == "manifest.json" and not (tmp_path / "c").exists():
            (tmp_path / "c").mkdir()
            (tmp_path / "c" / "theirs").write_text("x")
        return real(path, *a, **k)

    monkeypatch.setattr(B, "atomic_write_json", racing)
    with pytest.raises(FileExistsError, match="appeared while this build ran"):
        write_buffer(make_rows(2), tmp_path / "c", tokenizer_info=TOK, command=["t"], progress=False)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["theirs"]
    assert not list(tmp_path.glob(".c.building-*"))


def test_added_and_curated_shards_take_the_buffers_rows_per_shard_not_its_first_shards(tmp_path):
    """A buffer of 5 rows (one shard of 5) made every later shard 5 rows: an append of 12 rows wrote 3 shards
    and a buffer curated from it likewise. The rows per shard asked for are kept in the manifest; a buffer
    written before that infers them from a full first shard, or takes the default."""
    from shiq_data.curate.filter import filter_buffer

    def shard_sizes(folder):
        return [s["rows"] for s in json.loads((folder / "manifest.json").read_text())["shards"]]

    small = tmp_path / "small"
    write_buffer(make_rows(5), small, tokenizer_info=TOK, command=["build"], progress=False)
    append_buffer(small, make_rows(12, seed=1), command=["append"], tokenizer_info=TOK, progress=False)
    assert shard_sizes(small) == [5, 12]
    filter_buffer(small, tmp_path / "f", "reward > -100", command=["filter"])
    assert shard_sizes(tmp_path / "f") == [17]
    asked = tmp_path / "asked"
    write_buffer(make_rows(5), asked, tokenizer_info=TOK, command=["build"], shard_rows=3, progress=False)
    append_buffer(asked, make_rows(4, seed=1), command=["append"], tokenizer_info=TOK, progress=False)
    assert shard_sizes(asked) == [3, 2, 3, 1]
    # as written before the manifest kept them: 5 rows built in one shard (the default then), then appends that
    # took its size (5, 5, 2); 5 rows built in shards of 3 (3, 2). Only the building command's full shards tell.
    for folder, asked, added in ((tmp_path / "old1", 4096, [7]), (tmp_path / "old2", 3, [3, 3, 1])):
        write_buffer(make_rows(5), folder, tokenizer_info=TOK, command=["build"], shard_rows=asked, progress=False)
        if asked == 4096:
            append_buffer(
                folder, make_rows(12, seed=1), command=["a"], tokenizer_info=TOK, shard_rows=5, progress=False
            )
            assert shard_sizes(folder) == [5, 5, 5, 2]
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest.pop("shard_rows") == asked
        (folder / "manifest.json").write_text(json.dumps(manifest))
        append_buffer(folder, make_rows(7, seed=2), command=["append"], tokenizer_info=TOK, progress=False)
        assert shard_sizes(folder)[-len(added) :] == added
        assert "shard_rows" not in json.loads((folder / "manifest.json").read_text())  # a guess is not kept


def test_a_stray_folder_in_a_buffer_is_removed_or_named_not_errno_21(tmp_path):
    """A folder ``.junk.tmp`` or ``shard-00009.arrow`` in a buffer (copied in, made by another tool) ended
    validate's cleanup and append in a raw ``[Errno 21] Is a directory``: a temporary folder is now removed like
    a temporary file; a folder named like a shard, which no write makes, is refused naming it, and nothing is
    removed."""
    b = tmp_path / "b"
    buf = write_buffer(make_rows(4), b, tokenizer_info=TOK, command=["t"], progress=False)
    (b / ".junk.tmp" / "sub").mkdir(parents=True)
    (b / ".junk.tmp" / "sub" / "f").write_text("x")
    report = validate_buffer(b, cleanup=True)
    assert report["rows"] == 4 and report["removed_files"] == [".junk.tmp"] and not (b / ".junk.tmp").exists()
    (b / "shard-00009.arrow").mkdir()
    (b / ".left.tmp").write_text("x")
    for act in (
        lambda: validate_buffer(b, cleanup=True),
        lambda: append_buffer(b, make_rows(1, seed=2), command=["a"], progress=False),
    ):
        with pytest.raises(ValueError, match=rf"^{b / 'shard-00009.arrow'}: a folder named like a shard"):
            act()
        assert (b / "shard-00009.arrow").is_dir() and (b / ".left.tmp").is_file()  # nothing removed
    assert len(open_buffer(b)) == 4 and buf.shard_paths[0].exists()
    (b / "shard-00009.arrow").rmdir()
    assert len(append_buffer(b, make_rows(1, seed=2), command=["a"], progress=False)) == 5


def test_append_keeps_old_shard_bytes_and_offsets_groups(tmp_path):
    b = tmp_path / "b"
    write_buffer(make_rows(7, seed=0), b, tokenizer_info=TOK, command=["build"], shard_rows=3, progress=False)
    old = {p.name: p.read_bytes() for p in b.glob("shard-*")}
    new_rows = make_rows(5, seed=1)
    buf = append_buffer(b, new_rows, command=["append"], tokenizer_info=TOK, progress=False)
    for name, data in old.items():
        assert (b / name).read_bytes() == data
    got = plain_read(b)
    assert len(got) == 12 == len(buf)
    assert got[:7] == make_rows(7, seed=0)
    # old groups 0..3 (7 rows in pairs); new rows' groups 0,0,1,1,2 become 4,4,5,5,6
    assert [r["group_id"] for r in got[7:]] == [4, 4, 5, 5, 6]
    assert [{k: v for k, v in r.items() if k != "group_id"} for r in got[7:]] == [
        {k: v for k, v in r.items() if k != "group_id"} for r in new_rows
    ]
    assert [c["argv"] for c in buf.manifest["commands"]] == [["build"], ["append"]]
    assert validate_buffer(b)["groups"] == 7


def test_group_ids_beyond_int64_are_refused_naming_the_row_and_leave_no_buffer(tmp_path):
    top = 2**63 - 2  # the largest group id whose next one (the manifest's next_group_id) is still an int64
    rows = make_rows(2)
    rows[1]["group_id"] = top
    write_buffer(rows, tmp_path / "b", tokenizer_info=TOK, command=["build"], progress=False)
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["next_group_id"] == 2**63 - 1
    assert [r["group_id"] for r in plain_read(tmp_path / "b")] == [0, top]
    for gid in (2**63 - 1, 2**63, 2**64):  # a buffer that does not open again, or an OverflowError naming no row
        rows = make_rows(2)
        rows[1]["group_id"] = gid
        with pytest.raises(RowError) as e:
            write_buffer(rows, tmp_path / "c", tokenizer_info=TOK, command=["build"], progress=False)
        assert (e.value.row, e.value.field) == (1, "group_id")
        assert not (tmp_path / "c").exists()
    write_buffer(make_rows(2), tmp_path / "d", tokenizer_info=TOK, command=["build"], progress=False)
    before = (tmp_path / "d" / "manifest.json").read_bytes()
    rows = make_rows(2, seed=1)
    rows[1]["group_id"] = top  # fits alone, not after the buffer's next_group_id (1) is added to it
    with pytest.raises(RowError) as e:
        append_buffer(tmp_path / "d", rows, command=["append"], progress=False)
    assert (e.value.row, e.value.field) == (1, "group_id")
    assert (tmp_path / "d" / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "d").iterdir() if p.name != ".lock") == [
        "manifest.json",
        "shard-00000.arrow",
    ]


def test_an_append_past_shard_99999_is_refused_and_leaves_the_buffer_readable(tmp_path):
    b = tmp_path / "b"
    write_buffer(make_rows(2), b, tokenizer_info=TOK, command=["build"], progress=False)
    manifest = json.loads((b / "manifest.json").read_text())
    os.rename(b / "shard-00000.arrow", b / "shard-99999.arrow")  # the last number a five-digit name holds
    manifest["shards"][0]["file"] = manifest["commands"][0]["shards"][0] = "shard-99999.arrow"
    (b / "manifest.json").write_text(json.dumps(manifest))
    before = (b / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match="shard-99999.arrow"):
        append_buffer(b, make_rows(2, seed=1), command=["append"], progress=False)
    assert (b / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in b.iterdir() if p.name != ".lock") == ["manifest.json", "shard-99999.arrow"]
    assert len(open_buffer(b)) == 2 and plain_read(b) == make_rows(2)


def test_append_refuses_other_tokenizer_and_duplicate_ids(tmp_path):
    b = tmp_path / "b"
    write_buffer(make_rows(4), b, tokenizer_info=TOK, command=["t"], progress=False)
    manifest = (b / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match="tokenizer mismatch.*'toy'.*'other'"):
        append_buffer(
            b, make_rows(2, seed=5), command=["a"], tokenizer_info={**TOK, "name": "other", "fingerprint": "0" * 64}
        )
    with pytest.raises(RowError, match="row 0: field 'row_id'.*not unique"):
        append_buffer(b, make_rows(2), command=["a"], progress=False)  # same ids as the buffer's rows
    assert (b / "manifest.json").read_bytes() == manifest
    # the same vocabulary and pipeline, another special token as eos (base and instruct tokenizers differ so)
    e = tmp_path / "e"
    write_buffer(make_rows(4), e, tokenizer_info={**TOK, "eos_id": 1, "pad_id": 1}, command=["t"], progress=False)
    with pytest.raises(ValueError, match=r"tokenizer mismatch in field 'tokenizer.eos_id': .* end in 1, .* in 0"):
        append_buffer(e, make_rows(2, seed=5), command=["a"], tokenizer_info={**TOK, "eos_id": 0, "pad_id": 1})
    # another pad token: never stored in rows, so appended as before
    append_buffer(e, make_rows(2, seed=5), command=["a"], tokenizer_info={**TOK, "eos_id": 1, "pad_id": 0})
    assert sorted(p.name for p in b.iterdir() if not p.name.startswith(".")) == ["manifest.json", "shard-00000.arrow"]


def test_validate_detects_corruption(tmp_path):
    b = tmp_path / "b"
    buf = write_buffer(make_rows(4), b, tokenizer_info=TOK, command=["t"], progress=False)
    data = bytearray(buf.shard_paths[0].read_bytes())
    data[-20] ^= 0xFF
    buf.shard_paths[0].write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-00000.arrow: sha256"):
        validate_buffer(b)


def test_validate_rejects_a_bad_row_written_by_someone_else(tmp_path):
    """A shard written by plain pyarrow with a reward on a prompt token, manifest fixed up by hand."""
    b = tmp_path / "b"
    write_buffer(make_rows(3), b, tokenizer_info=TOK, command=["t"], progress=False)
    rows = plain_read(b)
    rows[2]["rewards"][0] = 2.0
    from shiq_data.schema import arrow_schema

    table = pa.Table.from_pylist(rows, schema=arrow_schema(False))
    with pa.OSFile(str(b / "shard-00000.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    import hashlib

    m = json.loads((b / "manifest.json").read_text())
    m["shards"][0].update(
        sha256=hashlib.sha256((b / "shard-00000.arrow").read_bytes()).hexdigest(),
        bytes=(b / "shard-00000.arrow").stat().st_size,
    )
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RowError, match=r"shard-00000.arrow: row 2: field 'rewards'"):
        validate_buffer(b)


def test_validate_cleanup_leaves_unlisted_files_while_a_writer_holds_the_lock(tmp_path):
    """An append or shard rewrite renames its new shard into place before the manifest lists it:
    validate must not delete that file while the writer holds the lock; unlocked, it cleans up."""
    b = tmp_path / "b"
    buf = write_buffer(make_rows(4), b, tokenizer_info=TOK, command=["t"], progress=False)
    unlisted = [b / "shard-00001.arrow", b / "shard-00000.r1.arrow", b / ".shard-00002.arrow.tmp"]
    for p in unlisted:
        p.write_bytes(buf.shard_paths[0].read_bytes())
    with _locked(b):  # exactly what append_buffer and replace_shard hold while writing
        report = validate_buffer(b, cleanup=True)
        assert report["rows"] == 4 and report["removed_files"] == []
        assert ".lock" in report["cleanup_skipped"] and "left in place" in report["cleanup_skipped"]
        assert all(p.exists() for p in unlisted)
    kept = b / "shard-00000.arrow.bak"  # a user's copy beside the shards: named like one, written by no write
    kept.write_bytes(b"a copy")
    report = validate_buffer(b, cleanup=True)
    assert sorted(report["removed_files"]) == sorted(p.name for p in unlisted) and report["cleanup_skipped"] is None
    assert not any(p.exists() for p in unlisted) and buf.shard_paths[0].exists()
    assert kept.read_bytes() == b"a copy"  # was deleted with the stray shards
    assert len(append_buffer(b, make_rows(1, seed=2), command=["a"], progress=False)) == 5  # the lock is free again


def test_the_lock_waits_says_so_or_says_why_not(tmp_path, capfd):
    """exclusive_lock (the buffer's lock and the model cache's): a second holder in another process waits,
    after one line on stderr, until the first lets go; with wait=False it does not wait but is told why."""
    lock = tmp_path / ".lock"
    holder = subprocess.Popen(  # holds the lock until its stdin closes
        [
            sys.executable,
            "-c",
            f"import sys\nfrom shiq_data.io import exclusive_lock\n"
            f"with exclusive_lock({str(lock)!r}):\n    print('held', flush=True)\n    sys.stdin.read()",
        ],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with exclusive_lock(lock, wait=False, holder="the other test process") as why:
        assert why == f"{lock} is held by the other test process"
    threading.Timer(0.5, holder.stdin.close).start()  # lets go while this process waits
    with exclusive_lock(lock, "waiting for the holder") as why:
        assert why is None
    assert capfd.readouterr().err == "waiting for the holder\n" and holder.wait(timeout=30) == 0
    with exclusive_lock(lock, "not printed", wait=False) as why:
        assert why is None
    assert capfd.readouterr().err == ""
    with exclusive_lock(tmp_path / "absent" / ".lock", wait=False) as why:
        assert why.startswith(f"cannot open {tmp_path / 'absent' / '.lock'} (")
    with pytest.raises(FileNotFoundError), exclusive_lock(tmp_path / "absent" / ".lock"):
        pass
    assert not (tmp_path / "absent").exists()  # nothing made on the way


def test_validate_rechecks_when_a_writer_commits_during_the_check(tmp_path, monkeypatch):
    """ref-stats replacing shard 0 (new file, old one deleted) while validate reads: the check that
    saw the vanished file is repeated on the new manifest, and the buffer is reported valid."""
    import shiq_data.validate as V

    b = tmp_path / "b"
    rows = make_rows(5)
    write_buffer(rows, b, tokenizer_info=TOK, command=["t"], shard_rows=3, progress=False)
    real, calls = V._sha256_file, []

    def sha_then_commit(path):
        digest = real(path)
        if not calls:  # the first shard has been hashed: a writer now replaces it
            add_ref_columns(
                b,
                0,
                [[0.0] * len(r["tokens"]) for r in rows[:3]],
                [[0.0] * len(r["tokens"]) for r in rows[:3]],
                ref_model={"name": "ref"},
            )
        calls.append(path)
        return digest

    monkeypatch.setattr(V, "_sha256_file", sha_then_commit)
    report = validate_buffer(b)
    assert report["rows"] == 5 and not (b / "shard-00000.arrow").exists()
    assert calls[0].name == "shard-00000.arrow" and "shard-00000.r1.arrow" in [c.name for c in calls]
    # a broken buffer still fails (the manifest does not change under the check)
    monkeypatch.setattr(V, "_sha256_file", real)
    (b / "shard-00001.arrow").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="shard-00001.arrow: size"):
        validate_buffer(b)


def test_add_ref_columns_reads_the_shard_under_the_lock_and_hashes_it_once(tmp_path, monkeypatch):
    """add_ref_columns read the shard's manifest entry and rows before taking the buffer's lock, and the rewrite
    read them again under it: a ref-stats run committing the same shard in between (another process) deleted
    the file about to be read, a bare FileNotFoundError. They are read and checked once, under the lock, where
    no other writer can commit."""
    import shiq_data.buffer as B

    b = tmp_path / "b"
    rows = make_rows(5)
    write_buffer(rows, b, tokenizer_info=TOK, command=["t"], shard_rows=3, progress=False)
    ref = [[0.0] * len(r["tokens"]) for r in rows[:3]]
    real_read, real_verify, competed, hashed = B.read_shard, B.verify_shard, [], []

    def read_while_another_writes(path, *a, **k):
        with B._locked(b, wait=False) as why:
            free = why is None
        if free and not competed:  # the lock is free: another ref-stats commits this shard now
            competed.append(path.name)
            add_ref_columns(b, 0, ref, ref, ref_model={"name": "ref"})
        return real_read(path, *a, **k)

    def verify(path, entry):
        hashed.append(path.name)
        return real_verify(path, entry)

    monkeypatch.setattr(B, "read_shard", read_while_another_writes)
    monkeypatch.setattr(B, "verify_shard", verify)
    add_ref_columns(b, 0, ref, ref, ref_model={"name": "ref"})
    assert competed == [] and hashed == ["shard-00000.arrow"]
    assert [s["file"] for s in B.read_manifest(b)["shards"]][0] == "shard-00000.r1.arrow"


def test_add_ref_columns_shard_by_shard(tmp_path):
    b = tmp_path / "b"
    rows = make_rows(5)
    write_buffer(rows, b, tokenizer_info=TOK, command=["t"], shard_rows=3, progress=False)
    model = {"name": "ref", "sha256": "abc"}
    assert shards_without_ref(b, model) == [0, 1]
    ref_c = [[0.0] + [float(i + t) for t in range(1, len(r["tokens"]))] for i, r in enumerate(rows)]
    ref_z = [[0.0] + [float(-t) for t in range(1, len(r["tokens"]))] for r in rows]
    add_ref_columns(b, 0, ref_c[:3], ref_z[:3], ref_model=model)
    buf = open_buffer(b)
    assert shards_without_ref(b, model) == [1] and not buf.has_ref_stats
    assert "ref_logz" not in buf.table.schema.names and len(buf.table) == 5  # common columns only
    assert validate_buffer(b)["rows"] == 5
    with pytest.raises(ValueError, match="refusing to mix|not .*build a new buffer"):
        add_ref_columns(b, 1, ref_c[3:], ref_z[3:], ref_model={"name": "other"})
    add_ref_columns(b, 1, ref_c[3:], ref_z[3:], ref_model=model)
    buf = open_buffer(b)
    assert buf.has_ref_stats and buf.manifest["ref_stats"]["done"] == ["shard-00000.r1.arrow", "shard-00001.r1.arrow"]
    got = plain_read(b)
    assert [r["ref_chosen_logits"] for r in got] == ref_c and [r["ref_logz"] for r in got] == ref_z
    assert [{k: r[k] for k in rows[0]} for r in got] == rows
    assert sorted(p.name for p in b.glob("shard-*")) == ["shard-00000.r1.arrow", "shard-00001.r1.arrow"]
    assert validate_buffer(b)["has_ref_stats"]


def test_a_shard_rewritten_again_keeps_its_file_when_the_manifest_lacks_its_revision(tmp_path):
    b = tmp_path / "b"
    rows = make_rows(3)
    write_buffer(rows, b, tokenizer_info=TOK, command=["t"], progress=False)
    zeros = [[0.0] * len(r["tokens"]) for r in rows]
    add_ref_columns(b, 0, zeros, zeros, ref_model={"name": "ref"})
    manifest = json.loads((b / "manifest.json").read_text())
    assert manifest["shards"][0]["file"] == "shard-00000.r1.arrow"
    del manifest["shards"][0]["revision"]  # the file's name still says revision 1
    (b / "manifest.json").write_text(json.dumps(manifest))
    ones = [[0.0] + [1.0] * (len(r["tokens"]) - 1) for r in rows]
    add_ref_columns(b, 0, ones, ones, ref_model={"name": "ref"})
    listed = json.loads((b / "manifest.json").read_text())["shards"][0]["file"]
    assert (b / listed).is_file() and listed != "shard-00000.r1.arrow"
    assert [r["ref_logz"] for r in plain_read(b)] == ones
    assert [{k: r[k] for k in rows[0]} for r in plain_read(b)] == rows


def test_statistics_are_not_added_beside_those_of_an_unrecorded_model(tmp_path):
    """Rows written with reference columns but no ref_model record hold some model's statistics; ref-stats then
    skipped their shards and filled the others with its own model's, one buffer of two references. It is
    refused, naming a shard that holds them; a buffer whose statistics are recorded completes as before."""
    rows = make_rows(5)
    ref = [{**r, "ref_chosen_logits": [0.0] * len(r["tokens"]), "ref_logz": [0.0] * len(r["tokens"])} for r in rows]
    b = tmp_path / "b"
    write_buffer(ref[:3], b, tokenizer_info=TOK, command=["t"], shard_rows=3, progress=False)  # no ref_model
    append_buffer(b, rows[3:], command=["t"], progress=False)  # a shard without statistics
    model = {"model": "smollm2", "dtype": "float32"}
    assert [s["has_ref"] for s in json.loads((b / "manifest.json").read_text())["shards"]] == [
        True,
        False,
    ]  # by the manifest
    with pytest.raises(ValueError, match=r"shard-00000.arrow hold reference statistics of no recorded model"):
        shards_without_ref(b, model)
    with pytest.raises(ValueError, match=r"shard-00000.arrow hold reference statistics of no recorded model"):
        add_ref_columns(
            b,
            1,
            [[0.0] * len(r["tokens"]) for r in rows[3:]],
            [[0.0] * len(r["tokens"]) for r in rows[3:]],
            ref_model=model,
        )
    assert not any(
        s.get("revision") for s in json.loads((b / "manifest.json").read_text())["shards"]
    )  # nothing replaced
    c = tmp_path / "c"
    write_buffer(ref[:3], c, tokenizer_info=TOK, command=["t"], shard_rows=3, progress=False, ref_model=model)
    append_buffer(c, rows[3:], command=["t"], progress=False)
    assert shards_without_ref(c, model) == [1]


def test_statistics_of_another_reference_name_the_fields_that_differ(tmp_path):
    """ref-stats --dtype bfloat16 on a buffer of float32 statistics printed both records whole (two dicts with
    the tokenizer's whole sha256), leaving the reader to find the field that differs."""
    b = tmp_path / "b"
    rows = make_rows(3)
    write_buffer(rows, b, tokenizer_info=TOK, command=["t"], progress=False)
    model = {"model": "smollm2", "tokenizer": "f" * 64, "dtype": "float32"}
    ref = [[0.0] * len(r["tokens"]) for r in rows]
    add_ref_columns(b, 0, ref, ref, ref_model=model)
    with pytest.raises(ValueError) as e:
        shards_without_ref(b, {**model, "dtype": "bfloat16"})
    assert str(e.value) == (
        f"{b / 'manifest.json'}: holds reference statistics of 'smollm2' with ref_model.dtype 'float32', not "
        "'bfloat16'; build a new buffer for another reference model (or --dtype float32)"
    )
    with pytest.raises(ValueError, match="with ref_model.model 'smollm2', not 'other'; build a new buffer") as e:
        shards_without_ref(b, {**model, "model": "other"})
    assert "f" * 64 not in str(e.value)


def test_replace_shard_refuses_changed_rows(tmp_path):
    b = tmp_path / "b"
    buf = write_buffer(make_rows(3), b, tokenizer_info=TOK, command=["t"], progress=False)
    t = buf.shard_tables[0]
    changed = t.set_column(
        t.schema.get_field_index("group_id"), t.schema.field("group_id"), pa.array([9, 9, 9], pa.int64())
    )
    with pytest.raises(ValueError, match="base columns"):
        replace_shard(b, 0, changed)


# --- kills: a child process is SIGKILLed in the middle of a write -------------------------------

CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from tests.test_buffer import make_rows, TOK
    from shiq_data.buffer import write_buffer, append_buffer
    mode, folder = sys.argv[1], sys.argv[2]
    def slow_rows():
        for i, r in enumerate(make_rows(40, seed=7)):
            if i == 12:
                print("WRITING", flush=True)  # shards 0..3 (3 rows each) are on disk by now
                time.sleep(60)
            yield r
    if mode == "build":
        write_buffer(slow_rows(), folder, tokenizer_info=TOK, command=["kill"], shard_rows=3, progress=False)
    else:
        append_buffer(folder, slow_rows(), command=["kill"], shard_rows=3, progress=False)
""")


def run_and_kill(tmp_path, mode, folder):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=str(REPO)))
    proc = subprocess.Popen([sys.executable, str(script), mode, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_killed_build_leaves_no_buffer(tmp_path):
    run_and_kill(tmp_path, "build", tmp_path / "b")
    assert not (tmp_path / "b").exists()
    leftovers = [p for p in tmp_path.glob(".b.building-*") if p.is_dir()]
    assert len(leftovers) == 1 and list(leftovers[0].glob("shard-*"))  # the kill happened mid-write
    assert (tmp_path / f"{leftovers[0].name}.held").is_file()  # its lock file, free since the kill
    # the next build of the same folder clears the dead build's temporary folder
    write_buffer(make_rows(2), tmp_path / "b", tokenizer_info=TOK, command=["t"], progress=False)
    assert not list(tmp_path.glob(".b.building-*")) and len(open_buffer(tmp_path / "b")) == 2


def test_killed_append_leaves_the_old_buffer(tmp_path):
    b = tmp_path / "b"
    write_buffer(make_rows(5), b, tokenizer_info=TOK, command=["t"], shard_rows=3, progress=False)
    before = {p.name: p.read_bytes() for p in b.iterdir() if not p.name.startswith(".")}
    run_and_kill(tmp_path, "append", b)
    assert list(b.glob(".shard-*.tmp"))  # new shards were being written
    after = {p.name: p.read_bytes() for p in b.iterdir() if not p.name.startswith(".")}
    assert after == before
    assert plain_read(b) == make_rows(5) and validate_buffer(b)["rows"] == 5
    assert validate_buffer(b, cleanup=True)["removed_files"]
    assert not list(b.glob(".shard-*"))
    assert len(append_buffer(b, make_rows(2, seed=3), command=["a"], progress=False)) == 7


def test_a_failed_append_commit_leaves_the_old_buffer(tmp_path, monkeypatch):
    import shiq_data.buffer as B
    import shiq_data.io as io

    b = tmp_path / "b"
    write_buffer(make_rows(5), b, tokenizer_info=TOK, command=["t"], shard_rows=3, progress=False)
    before = {p.name: p.read_bytes() for p in b.iterdir() if p.name != ".lock"}

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(B, "atomic_write_json", no_space)  # the manifest cannot be written
        with pytest.raises(OSError, match="No space"):
            append_buffer(b, make_rows(4, seed=1), command=["a"], tokenizer_info=TOK, progress=False)
    assert {p.name: p.read_bytes() for p in b.iterdir() if p.name != ".lock"} == before
    assert plain_read(b) == make_rows(5) and validate_buffer(b)["removed_files"] == []
    # the manifest was replaced and only flushing the folder failed: the append is committed, its shards stay
    real = io.fsync_dir
    calls = []

    def flush_fails_once(path):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        real(path)

    with monkeypatch.context() as m:
        m.setattr(io, "fsync_dir", flush_fails_once)  # atomic_write's flush after its rename
        with pytest.raises(OSError, match="Input/output"):
            append_buffer(b, make_rows(4, seed=1), command=["a"], tokenizer_info=TOK, progress=False)
    assert plain_read(b)[5:] == [{**r, "group_id": r["group_id"] + 3} for r in make_rows(4, seed=1)]
    assert validate_buffer(b)["rows"] == 9


def test_an_append_failing_mid_shard_leaves_no_partial_file(tmp_path, monkeypatch):
    import shiq_data.buffer as B

    b = tmp_path / "b"
    write_buffer(make_rows(5), b, tokenizer_info=TOK, command=["t"], shard_rows=3, progress=False)
    before = {p.name: p.read_bytes() for p in b.iterdir() if p.name != ".lock"}
    real, calls = B.write_shard_file, []

    def disk_fills(table, path):  # the second new shard: half its bytes land, then the disk is full
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(b"\xff" * 100)
            raise OSError(28, "No space left on device")
        return real(table, path)

    monkeypatch.setattr(B, "write_shard_file", disk_fills)
    with pytest.raises(OSError, match="No space"):
        append_buffer(b, make_rows(6, seed=1), command=["a"], shard_rows=3, progress=False)
    assert {p.name: p.read_bytes() for p in b.iterdir() if p.name != ".lock"} == before


def test_atomic_dir_removes_what_a_killed_fill_left(tmp_path):
    """A killed ``export`` or ``split`` left its temporary folder beside the output for good (91 MB for a
    killed export of 200,000 rows); the next write of the same folder on this machine removes it, not the
    temporary folder of a process still at work."""
    from shiq_data.io import atomic_dir, this_host

    folder = tmp_path / "out"
    code = (
        "import os, signal, sys; from pathlib import Path; from shiq_data.io import atomic_dir; "
        "atomic_dir(Path(sys.argv[1]), lambda t: ((t / 'half').write_text('1'), os.kill(os.getpid(), signal.SIGKILL)))"
    )
    killed = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=REPO)
    assert killed.returncode == -signal.SIGKILL
    (left,) = tmp_path.glob(".out.*.tmp")
    assert (left / "half").exists()
    alive = tmp_path / f".out.{this_host()}-{os.getpid()}-abc.tmp"  # a process at work on it (this one)
    alive.mkdir()
    atomic_dir(folder, lambda t: (t / "whole").write_text("1"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "out"] and (folder / "whole").exists()


def test_a_temporary_folder_is_judged_by_its_lock_not_by_the_pid_in_its_name(tmp_path):
    """A temporary folder named by a pid that is gone here can belong to a live process of another container of
    the same host name (its own pid numbering): a pid check removed it under that process. Its lock, held by the
    process while it lives (whatever kills it), decides; a lock file left without its folder goes too."""
    from shiq_data.io import atomic_dir, files_together, this_host

    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    host = this_host()
    child = subprocess.Popen(  # holds the lock of each folder it names, as a live writer does, until told to stop
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys\nfds = [os.open(p, os.O_RDWR) for p in sys.argv[1:]]\n"
            "[fcntl.flock(f, fcntl.LOCK_EX) for f in fds]\nprint('held', flush=True)\nsys.stdin.read()",
            *(
                str(tmp_path / f"{n}.held")
                for n in (f".out.{host}-{gone}-ab12cd34.tmp", f".staged-{host}-{gone}-ab12cd34.tmp")
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    names = {}
    for kind, name in (("fill", f".out.{host}-{gone}-ab12cd34.tmp"), ("stage", f".staged-{host}-{gone}-ab12cd34.tmp")):
        (tmp_path / name).mkdir()
        (tmp_path / f"{name}.held").touch()
        names[kind] = name
    try:
        assert child.stdout.readline().strip() == "held"
        (tmp_path / f".staged-{host}-{os.getpid()}-0f0f0f0f.tmp.held").touch()  # its folder gone, its lock free
        atomic_dir(tmp_path / "out", lambda t: (t / "whole").write_text("1"))
        with files_together(tmp_path, owns=["a.txt"]) as stage:
            (stage / "a.txt").write_text("new")
        live = sorted([*names.values(), *(f"{n}.held" for n in names.values())])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*live, "out", "a.txt"])
    finally:
        child.communicate("")
    # the holder gone, the next writes remove what it left
    atomic_dir(tmp_path / "out", lambda t: (t / "whole").write_text("2"), replace=True)
    with files_together(tmp_path, owns=["a.txt"]) as stage:
        (stage / "a.txt").write_text("newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "out"]


def test_a_sweep_between_a_lock_files_making_and_its_locking_leaves_the_writer_locked(tmp_path, monkeypatch):
    """A sweep of another process that met a writer's lock file before the writer locked it took it for an
    orphan's and removed it: the writer went on with a lock on a removed file, its folder judged by its pid again
    (another container's sweep would remove it). The writer now sees that and locks a file of another name."""
    import fcntl

    from shiq_data import io

    host, real, swept = io.this_host(), fcntl.flock, []

    def flock(fd, op):
        if not swept:  # the worst moment: the lock file made, not yet locked
            swept.append(sorted(p.name for p in tmp_path.iterdir()))
            io.sweep_held(tmp_path, f".x.{glob.escape(host)}-*.tmp")
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    folder, fd = io.held_dir(tmp_path, f".x.{host}-{os.getpid()}", ".tmp")
    monkeypatch.undo()
    lock = tmp_path / f"{folder.name}.held"
    assert swept[0] != [] and swept[0][0] != lock.name  # the first lock file was swept; this is another
    other = os.open(lock, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):  # held by the writer
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(other)
    io.sweep_held(tmp_path, f".x.{glob.escape(host)}-*.tmp")
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name, lock.name]
    io.release_held(folder, fd)
    assert list(tmp_path.iterdir()) == []


def test_where_the_file_system_has_no_flock_a_temporary_folder_is_judged_by_its_pid(tmp_path, monkeypatch):
    """Some network file systems refuse flock (ENOLCK): the folder is then made without a lock file and a sweep
    judges it by the pid in its name, as before locks; another error of flock is raised, no lock file left."""
    import errno
    import fcntl

    from shiq_data import io

    host = io.this_host()

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    folder, fd = io.held_dir(tmp_path, f".x.{host}-{os.getpid()}", ".tmp")
    assert fd is None and [p.name for p in tmp_path.iterdir()] == [folder.name]
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    dead = tmp_path / f".x.{host}-{gone}-0a0a0a0a.tmp"
    dead.mkdir()
    io.sweep_held(tmp_path, f".x.{glob.escape(host)}-*.tmp")  # this process's stays, the one of a gone pid goes
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]
    io.release_held(folder, fd)

    def broken(fd, op):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(OSError, match="Input/output error"):
        io.held_dir(tmp_path, f".x.{host}-{os.getpid()}", ".tmp")
    assert list(tmp_path.iterdir()) == []


def test_a_new_buffer_is_readable_by_others_as_every_result(tmp_path):
    """The build folder (0700, as its temporary folder is made) became the buffer without its mode widened."""
    old = os.umask(0o022)
    try:
        write_buffer(make_rows(2), tmp_path / "b", tokenizer_info=TOK, command=["t"], progress=False)
    finally:
        os.umask(old)
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o755


def test_atomic_dir_replacing_a_folder_never_loses_it(tmp_path, monkeypatch):
    """``atomic_dir(replace=True)`` (a model export, a value model, the converted model cache) deleted the old
    folder before renaming the new one into place: a failure between the two lost both. The old one is now
    renamed aside and removed only once the new one is in place; on a failed rename it is put back."""
    import shiq_data.io as io

    folder = tmp_path / "model"
    io.atomic_dir(folder, lambda t: (t / "w").write_text("old"))

    def fill(t):
        (t / "w").write_text("new")

    real_rename = os.rename

    def rename_fails_into_place(src, dst):
        if Path(dst) == folder and ".old" not in Path(src).name:
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    with monkeypatch.context() as m:
        m.setattr(io.os, "rename", rename_fails_into_place)
        with pytest.raises(OSError, match="No space"):
            io.atomic_dir(folder, fill, replace=True)
    assert (folder / "w").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with pytest.raises(RuntimeError, match="fill failed"):
        io.atomic_dir(folder, lambda t: (_ for _ in ()).throw(RuntimeError("fill failed")), replace=True)
    assert (folder / "w").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    io.atomic_dir(folder, fill, replace=True)
    assert (folder / "w").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # a link or a file in its place is refused before any work (renamed aside, it was replaced silently)
    (tmp_path / "link").symlink_to(folder)
    (tmp_path / "file").write_text("x")
    for name, what in (("link", "a link"), ("file", "a file")):
        with pytest.raises(ValueError, match=f"{tmp_path / name} is {what}, not a folder to replace"):
            io.atomic_dir(tmp_path / name, fill, replace=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "link", "model"]
    assert (tmp_path / "link").resolve() == folder and (tmp_path / "file").read_text() == "x"
    # another process writing the folder meanwhile: the put-back fails, and the error says where the old one is

    def another_writer(src, dst):
        real_rename(src, dst)
        if Path(src) == folder:  # (set aside): another process makes the folder now
            (folder / "theirs").mkdir(parents=True)

    with monkeypatch.context() as m:
        m.setattr(io.os, "rename", another_writer)
        with pytest.raises(OSError, match=r"could not be replaced .* the folder it replaces is kept as .*\.old"):
            io.atomic_dir(folder, fill, replace=True)
    kept = [p for p in tmp_path.iterdir() if p.name.endswith(".old")]
    assert len(kept) == 1 and (kept[0] / "w").read_text() == "new"


def test_tables_of_buffer_rows_write_the_same_buffer_as_row_dicts(tmp_path):
    """write_buffer/append_buffer given Arrow tables of rows (as the curation verbs give them), mixed with row
    dicts and cut anywhere, write the rows the dicts alone write, at the same shard boundaries; duplicate row
    ids and token ids beyond the vocabulary or negative are still refused."""
    rows = make_rows(23)
    common = {"tokenizer_info": TOK, "command": ["t"], "shard_rows": 5, "progress": False}
    write_buffer(rows, tmp_path / "dicts", **common)
    table = pa.Table.from_pylist(plain_read(tmp_path / "dicts"))
    items = [table.slice(0, 3), *rows[3:6], table.slice(6, 9), rows[15], table.slice(16, 7)]
    write_buffer(items, tmp_path / "mixed", **common)
    assert plain_read(tmp_path / "mixed") == plain_read(tmp_path / "dicts")
    for name in ("dicts", "mixed"):
        m = json.loads((tmp_path / name / "manifest.json").read_text())
        assert [s["rows"] for s in m["shards"]] == [5, 5, 5, 5, 3] and m["next_group_id"] == 12
    # appended as a table: group ids offset like appended dicts
    append_buffer(tmp_path / "dicts", make_rows(4, seed=1), command=["t"], progress=False)
    append_buffer(tmp_path / "mixed", [pa.Table.from_pylist(make_rows(4, seed=1))], command=["t"], progress=False)
    assert plain_read(tmp_path / "mixed") == plain_read(tmp_path / "dicts")
    bad = table.slice(0, 4).set_column(0, "row_id", pa.array(["a", "b", "c", "a"]))
    with pytest.raises(RowError, match="row 3: field 'row_id'.*'a' is not unique"):
        write_buffer([bad], tmp_path / "dup", **common)
    top = max(max(r["tokens"]) for r in rows)
    with pytest.raises(ValueError, match=rf"token id {top} is outside \[0, 10\)"):
        write_buffer([table], tmp_path / "vocab", **{**common, "tokenizer_info": {**TOK, "vocab_size": 10}})
    # a negative token id (a crafted or damaged table): refused too, not written (it was, being below the vocabulary)
    tokens = table.column("tokens").to_pylist()
    tokens[2] = [tokens[2][0], -3, *tokens[2][2:]]
    negative = table.set_column(
        table.schema.get_field_index("tokens"), "tokens", pa.array(tokens, pa.list_(pa.int32()))
    )
    with pytest.raises(ValueError, match=r"token id -3 is negative"):
        write_buffer([negative], tmp_path / "negative", **common)
    assert not any((tmp_path / n).exists() for n in ("dup", "vocab", "negative"))


def test_a_shard_column_of_more_than_int32_values_is_refused_not_wrapped():
    """A list column's offsets are 32-bit: a shard of 2**31 tokens or more wrapped them silently (the rows then
    read each other's tokens). It is refused, before any array is built (the lists are only counted here)."""
    import numpy as np

    from shiq_data.buffer import _list_array

    class Sized:  # a list of this length, never materialised
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    with pytest.raises(ValueError, match=r"2147483648 values in one shard's column: more than 2\*\*31 - 1"):
        _list_array([Sized(2**30), Sized(2**30)], np.int32, pa.int32())
    assert _list_array([[1, 2], [3]], np.int32, pa.int32()).to_pylist() == [[1, 2], [3]]


@pytest.mark.parametrize("where", ["locking", "removing"])
def test_a_ctrl_c_while_a_temporary_folder_is_made_or_removed_leaves_no_lock_file(tmp_path, monkeypatch, where):
    """A Ctrl-C of a parallel build left '.buf.spill-HOST-PID-HEX.held' beside the input: it came while the lock
    file was locked (before its folder existed) or while the folder was removed (before the lock file was)."""
    import fcntl
    import shutil

    from shiq_data import io as shiq_io

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    if where == "locking":
        monkeypatch.setattr(fcntl, "flock", interrupted)
        with pytest.raises(KeyboardInterrupt):
            shiq_io.held_dir(tmp_path, ".buf.spill-host-1")
    else:
        folder, fd = shiq_io.held_dir(tmp_path, ".buf.spill-host-1")
        assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name, f"{folder.name}.held"]
        monkeypatch.setattr(shutil, "rmtree", interrupted)
        with pytest.raises(KeyboardInterrupt):
            shiq_io.release_held(folder, fd)
        folder.rmdir()  # (what the interrupted removal left: the folder, not its lock)
    assert list(tmp_path.iterdir()) == []


# --- shards bounded by size ----------------------------------------------------------------------------------------


def long_rows(n, seed=0, huge=None, huge_tokens=30_000):
    """Valid rows of 150 to 1,200 tokens with every text column (non-ASCII prompt text, an ``extra`` object on some,
    turn rewards on some, null ones from row 20 on), and at index ``huge`` a row of ``huge_tokens`` tokens."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        t = huge_tokens if i == huge else int(rng.integers(150, 1200))
        p = int(rng.integers(1, 50))
        rewards = [0.0] * t
        rewards[-1] = float(np.float32(rng.normal()))
        rows.append(
            {
                "row_id": f"r{seed}-{i}",
                "source": "long" if i % 3 else "lång",
                "group_id": i // 2,
                "prompt_len": p,
                "tokens": [int(x) for x in rng.integers(0, 50, t)],
                "action_mask": [False] * p + [True] * (t - p),
                "rewards": rewards,
                "prompt": "ünïcødé 漢字 " * int(rng.integers(0, 300)),
                "completion": "words " * int(rng.integers(0, 400)),
                "reward": rewards[-1] if i % 2 else None,
                "turn_rewards": None if i % 4 else [rewards[-1], None] if i >= 20 else [rewards[-1]],  # a null item
                "extra": json.dumps({"k": i, "tag": "é" * (i % 7)}) if i % 3 else None,
            }
        )
    return rows


def read_stream(path) -> pa.Table:
    with pa.ipc.open_stream(pa.memory_map(str(path))) as reader:
        return reader.read_all()


def stream_size(table: pa.Table) -> int:
    """Bytes of ``table`` written as one Arrow stream record batch, as a shard file holds it."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.combine_chunks().to_batches():
            writer.write_batch(batch)
    return len(sink.getvalue())


def check_shards_by_size(folder, bound: int, shard_rows: int, files=None) -> list[pa.Table]:
    """Every shard of the buffer at ``folder`` (or only the ones named in ``files``), read with pyarrow alone: its
    file is at most ``bound`` bytes unless it holds one row, and, unless it is the last or holds ``shard_rows``
    rows, it would pass the bound with the next shard's first row (the cut is at the last row that fits). The file
    size is what is bounded: it is the table's Arrow buffers (``table.nbytes``, checked not to exceed it) plus the
    stream's framing, and it is what a reader maps and a curation verb reads whole. Returns the shards' tables."""
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    names = [s["file"] for s in manifest["shards"] if files is None or s["file"] in files]
    tables = [read_stream(Path(folder) / name) for name in names]
    for k, (name, table) in enumerate(zip(names, tables)):
        size = (Path(folder) / name).stat().st_size
        assert table.nbytes <= size
        assert size <= bound or table.num_rows == 1, (name, size, bound, table.num_rows)
        if k + 1 < len(tables) and table.num_rows < shard_rows:
            more = pa.concat_tables([table, tables[k + 1].slice(0, 1)])
            assert stream_size(more) > bound, (name, "the next row would have fit")
    return tables


def test_a_build_cuts_shards_by_size_and_a_row_larger_than_the_bound_is_a_shard_alone(tmp_path, monkeypatch):
    """Rows of long documents made huge shards: a shard ended at --shard-rows rows only. Now a shard also ends
    before its file would pass ``shard_bytes`` (64 KiB here; rows of 1.5 to 15 KB), a row larger than that (30,000
    tokens, about 270 KB) alone; the rows given one by one are turned into Arrow tables a bounded batch at a
    time, never a whole shard's rows held as Python objects. Rows and order as given (pyarrow on the input)."""
    import shiq_data.buffer as buffer_module

    batches = []
    to_table = buffer_module.rows_to_table

    def recording(rows, *args, **kwargs):
        table = to_table(rows, *args, **kwargs)
        batches.append((len(rows), table.nbytes))
        return table

    monkeypatch.setattr(buffer_module, "rows_to_table", recording)
    rows = long_rows(60, huge=37)
    bound = 64 * 1024
    buf = write_buffer(
        rows, tmp_path / "b", tokenizer_info=TOK, command=["t"], shard_rows=10_000, shard_bytes=bound, progress=False
    )
    tables = check_shards_by_size(buf.path, bound, 10_000)
    assert len(tables) >= 8 and len({t.num_rows for t in tables}) > 1  # unequal shards
    alone = [t for t in tables if t.column("row_id")[0].as_py() == "r0-37"]
    assert len(alone) == 1 and alone[0].num_rows == 1 and stream_size(alone[0]) > bound
    assert buf.manifest["shard_bytes"] == bound and buf.manifest["shard_rows"] == 10_000
    want = pa.Table.from_pylist(rows)  # the input as plain pyarrow reads it
    got = pa.concat_tables(tables)
    assert got.num_rows == want.num_rows
    for name in want.column_names:
        assert got.column(name).to_pylist() == want.column(name).to_pylist(), name
    # Python rows went to Arrow a batch at a time: at most the bound's worth and one row more
    largest = max(stream_size(t) for t in tables)
    assert batches and all(n == 1 or size <= bound + largest for n, size in batches), batches
    assert max(n for n, _ in batches) < len(rows) // 4


def test_the_size_bound_is_kept_in_the_manifest_and_an_append_keeps_the_buffers(tmp_path):
    """The manifest records ``shard_bytes`` next to ``shard_rows`` (256 MiB unless asked), an append cuts its
    shards by the buffer's bound unless given another, and a manifest written before the field (shards bounded
    by rows alone) opens, reads as the default and keeps no guess of it."""
    from shiq_data.buffer import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_ROWS, shard_bytes_of

    plain = write_buffer(make_rows(5), tmp_path / "plain", tokenizer_info=TOK, command=["t"], progress=False)
    assert plain.manifest["shard_bytes"] == DEFAULT_SHARD_BYTES == 256 * 2**20 == shard_bytes_of(plain.manifest)
    for bad in (0, 1.5, 2**63):  # nothing a manifest could not record
        with pytest.raises(ValueError, match=r"shard_bytes must be an integer in \[1, 2\*\*63\)"):
            write_buffer(make_rows(5), tmp_path / "bad", tokenizer_info=TOK, command=["t"], shard_bytes=bad)
        assert not (tmp_path / "bad").exists()
    bound = 48 * 1024
    folder = tmp_path / "b"
    write_buffer(long_rows(12), folder, tokenizer_info=TOK, command=["t"], shard_bytes=bound, progress=False)
    before = [s["file"] for s in json.loads((folder / "manifest.json").read_text())["shards"]]
    added = long_rows(30, seed=1)
    buf = append_buffer(folder, added, command=["a"], tokenizer_info=TOK, progress=False)
    assert buf.manifest["shard_bytes"] == bound and shard_bytes_of(buf.manifest) == bound
    new = [s["file"] for s in buf.manifest["shards"] if s["file"] not in before]
    tables = check_shards_by_size(folder, bound, DEFAULT_SHARD_ROWS, files=new)
    assert len(tables) >= 3
    assert pa.concat_tables(tables).column("row_id").to_pylist() == [r["row_id"] for r in added]
    # an append asking for another bound cuts its own shards by it, and leaves the buffer's
    buf = append_buffer(
        folder, long_rows(8, seed=2), command=["a"], tokenizer_info=TOK, shard_bytes=10**6, progress=False
    )
    assert buf.manifest["shard_bytes"] == bound and buf.manifest["shards"][-1]["rows"] == 8
    # a manifest without the field: the default, and none written by an append
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["shard_bytes"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert shard_bytes_of(open_buffer(folder).manifest) == DEFAULT_SHARD_BYTES
    buf = append_buffer(folder, long_rows(20, seed=3), command=["a"], tokenizer_info=TOK, progress=False)
    assert buf.manifest["shards"][-1]["rows"] == 20  # 20 long rows are far below 256 MiB: one shard
    assert "shard_bytes" not in buf.manifest and len(open_buffer(folder)) == 12 + 30 + 8 + 20
    assert validate_buffer(folder)["rows"] == 70


def test_a_set_whose_staging_folder_cannot_be_made_leaves_no_folder_it_made(tmp_path, monkeypatch):
    """files_together makes ``out`` and its missing parents, and removes them on failure: a failure while its
    staging folder was made (no space, no inodes) came before that clean-up and left them."""
    from shiq_data import io

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "held_dir", no_space)
    with pytest.raises(OSError, match="No space left"):
        with io.files_together(tmp_path / "a" / "b", owns=["x.txt"]) as stage:
            (stage / "x.txt").write_text("never")
    assert list(tmp_path.iterdir()) == []
