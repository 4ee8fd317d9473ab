"""Schema version 2: rows keep the text the input gave (prompt, completion, reward, turn_rewards, extra);
version-1 buffers and --no-text buffers still open, sample, validate and append."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import cached_load_tokenizer
from data_cli_runs import write_jsonl

from shiq_data.buffer import add_ref_columns, open_buffer, write_buffer
from shiq_data.cli import main
from shiq_data.io import RowError
from shiq_data.sampler import BufferSampler
from shiq_data.schema import check_row
from shiq_data.validate import validate_buffer

pytestmark = pytest.mark.usefixtures("tokenizers_once")  # one tokenizer load per session

TEXT_TYPES = {  # what the schema promises, spelled out independently
    "prompt": pa.large_string(),
    "completion": pa.large_string(),
    "reward": pa.float64(),
    "turn_rewards": pa.list_(pa.float64()),
    "extra": pa.large_string(),
}
BASE = ["row_id", "source", "group_id", "prompt_len", "tokens", "action_mask", "rewards"]
RECORDS = [
    {"prompt": "Hello world", "completion": " and goodbye.", "reward": 1.5, "tags": ["greet"], "score": 0.7},
    {"prompt": "Q: 2+2?\nA:", "completion": " 4", "reward": 1, "group": "math"},
    {"prompt": "Hello world", "completion": " ünïcode", "reward": -0.25, "meta": {"lang": "fr"}},
]


def plain_shards(folder):
    """(manifest, [pyarrow tables]) read with nothing but json and pyarrow."""
    m = json.loads((Path(folder) / "manifest.json").read_text())
    tables = []
    for s in m["shards"]:
        with pa.ipc.open_stream(pa.memory_map(str(Path(folder) / s["file"]))) as r:
            tables.append(r.read_all())
    return m, tables


def build(args):
    return main([*args, "--no-progress"])


def test_build_keeps_the_text_of_each_generic_record(tmp_path, gpt2):
    inp = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    assert build(["build", "jsonl", str(inp), "--tokenizer", "gpt2", "--out", str(tmp_path / "b")]) == 0
    m, (table,) = plain_shards(tmp_path / "b")
    assert m["schema_version"] == 2 and m["text_columns"] is True
    assert table.schema.names == BASE + list(TEXT_TYPES)
    assert {n: table.schema.field(n).type for n in TEXT_TYPES} == TEXT_TYPES
    rows = table.to_pylist()
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in RECORDS]
    assert [r["completion"] for r in rows] == [r["completion"] for r in RECORDS]
    assert [r["reward"] for r in rows] == [1.5, 1.0, -0.25]
    assert [r["turn_rewards"] for r in rows] == [None, None, None]
    # the other fields, as JSON object text; "group" is the group, not an extra field
    assert [None if r["extra"] is None else json.loads(r["extra"]) for r in rows] == [
        {"tags": ["greet"], "score": 0.7},
        None,
        {"meta": {"lang": "fr"}},
    ]
    assert "ünïcode" in (tmp_path / "b" / m["shards"][0]["file"]).read_bytes().decode("utf-8", "replace")
    assert validate_buffer(tmp_path / "b")["rows"] == 3


def test_no_text_build_writes_token_columns_only_and_reads_text_as_null(tmp_path, gpt2, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    b = tmp_path / "b"
    assert build(["build", "jsonl", str(inp), "--tokenizer", "gpt2", "--out", str(b), "--no-text"]) == 0
    m, (table,) = plain_shards(b)
    assert m["schema_version"] == 2 and m["text_columns"] is False and table.schema.names == BASE
    buf = open_buffer(b)
    text = buf.columns(["prompt", "reward", "tokens"])
    assert text.column("prompt").null_count == 3 and text.column("reward").null_count == 3
    assert text.column("tokens").to_pylist() == table.column("tokens").to_pylist()
    assert buf.table.schema.names == BASE and buf.row(1) == table.slice(1, 1).to_pylist()[0]
    assert validate_buffer(b)["rows"] == 3
    capsys.readouterr()
    assert main(["info", str(b)]) == 0
    assert "schema      version 2, text columns no" in capsys.readouterr().out


def make_v1_buffer(folder: Path, rows: list[dict], vocab: int = 50257) -> Path:
    """A schema-version-1 buffer written the way version 1 wrote it, with pyarrow and json only."""
    folder.mkdir()
    schema = pa.schema(
        [
            pa.field("row_id", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("group_id", pa.int64(), nullable=False),
            pa.field("prompt_len", pa.int32(), nullable=False),
            pa.field("tokens", pa.list_(pa.int32()), nullable=False),
            pa.field("action_mask", pa.list_(pa.bool_()), nullable=False),
            pa.field("rewards", pa.list_(pa.float32()), nullable=False),
        ],
        metadata={"shiq_schema_version": "1"},
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    path = folder / "shard-00000.arrow"
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, schema) as w:
        w.write_table(table)
    n_tok = sum(len(r["tokens"]) for r in rows)
    n_act = sum(sum(r["action_mask"]) for r in rows)
    manifest = {
        "format": "shiq-replay-buffer",
        "schema_version": 1,
        "tokenizer": {
            "name": "gpt2",
            "fingerprint": cached_load_tokenizer("gpt2")[1]["fingerprint"],
            "vocab_size": vocab,
        },
        "rows": len(rows),
        "tokens": n_tok,
        "action_tokens": n_act,
        "next_group_id": max(r["group_id"] for r in rows) + 1,
        "shards": [
            {
                "file": path.name,
                "rows": len(rows),
                "tokens": n_tok,
                "action_tokens": n_act,
                "bytes": path.stat().st_size,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "has_ref": False,
            }
        ],
        "has_ref_stats": False,
        "ref_model": None,
        "ref_stats": None,
        "commands": [{"argv": ["shiq-data", "build"], "time": "t", "rows": len(rows), "shards": [path.name]}],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


V1_ROWS = [
    {
        "row_id": f"r{i}",
        "source": "old",
        "group_id": i // 2,
        "prompt_len": 2,
        "tokens": [10 + i, 20, 30, 40 + i],
        "action_mask": [False, False, True, True],
        "rewards": [0.0, 0.0, 0.0, float(i)],
    }
    for i in range(4)
]


def test_a_version_1_buffer_opens_samples_validates_and_appends_with_no_text(tmp_path, capsys, gpt2):
    b = make_v1_buffer(tmp_path / "v1", V1_ROWS)
    buf = open_buffer(b)
    assert not buf.has_text and len(buf) == 4
    assert buf.row(3) == V1_ROWS[3]
    text = buf.columns(["row_id", *TEXT_TYPES]).to_pylist()
    assert text == [{"row_id": r["row_id"], **dict.fromkeys(TEXT_TYPES)} for r in V1_ROWS]
    batch = BufferSampler(buf, rows_per_micro_batch=4, seed=0).next_micro_batches()[0]
    got = sorted(map(tuple, batch["tokens"].tolist()))
    assert got == sorted(tuple(r["tokens"]) for r in V1_ROWS)
    assert validate_buffer(b)["rows"] == 4
    inp = write_jsonl(tmp_path / "in.jsonl", RECORDS[:1])
    # appending text rows: refused in one line that says what to do; the buffer is untouched
    before = (b / "manifest.json").read_text()
    assert main(["append", str(b), "jsonl", str(inp), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "manifest.json" in err and "version-1" in err and "--no-text" in err
    assert (b / "manifest.json").read_text() == before
    # token columns only: appended, and the manifest becomes version 2 without text columns
    assert main(["append", str(b), "jsonl", str(inp), "--no-progress", "--no-text"]) == 0
    m, tables = plain_shards(b)
    assert m["schema_version"] == 2 and m["text_columns"] is False and m["rows"] == 5
    assert [t.schema.names for t in tables] == [BASE, BASE]
    assert validate_buffer(b)["rows"] == 5


def test_append_must_match_the_buffer_s_text_columns(tmp_path, capsys, gpt2):
    inp = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    text, plain = str(tmp_path / "text"), str(tmp_path / "plain")
    assert build(["build", "jsonl", str(inp), "--tokenizer", "gpt2", "--out", text]) == 0
    assert build(["build", "jsonl", str(inp), "--tokenizer", "gpt2", "--out", plain, "--no-text"]) == 0
    assert main(["append", text, "jsonl", str(inp), "--no-progress", "--no-text"]) == 2
    assert "keeps text columns; append without --no-text" in capsys.readouterr().err
    assert main(["append", plain, "jsonl", str(inp), "--no-progress"]) == 2
    assert "no text columns (built with --no-text); append with --no-text" in capsys.readouterr().err
    assert main(["append", text, "jsonl", str(inp), "--no-progress"]) == 0
    m, tables = plain_shards(text)
    assert [t.num_rows for t in tables] == [3, 3] and tables[1].column("prompt").to_pylist() == [
        r["prompt"] for r in RECORDS
    ]


def test_reference_statistics_keep_the_text_columns(tmp_path, gpt2):
    inp = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    b = tmp_path / "b"
    assert build(["build", "jsonl", str(inp), "--tokenizer", "gpt2", "--out", str(b)]) == 0
    before = plain_shards(b)[1][0]
    lengths = [len(t) for t in before.column("tokens").to_pylist()]
    add_ref_columns(
        b,
        0,
        [[0.0] * n for n in lengths],
        [[0.5 * (i > 0) for i in range(n)] for n in lengths],
        ref_model={"name": "m"},
    )
    m, (after,) = plain_shards(b)
    assert after.schema.names == before.schema.names + ["ref_chosen_logits", "ref_logz"]
    assert after.select(before.schema.names).equals(before)
    assert validate_buffer(b)["has_ref_stats"]


def test_the_sampler_reads_no_text_column(tmp_path, gpt2, monkeypatch):
    inp = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    b = tmp_path / "b"
    assert build(["build", "jsonl", str(inp), "--tokenizer", "gpt2", "--out", str(b)]) == 0
    buf = open_buffer(b)
    asked = []
    real = type(buf).shard_columns
    monkeypatch.setattr(type(buf), "shard_columns", lambda self, names: asked.append(list(names)) or real(self, names))
    sampler = BufferSampler(buf, rows_per_micro_batch=3, seed=1)
    batch = sampler.next_micro_batches()[0]
    assert asked and not {n for names in asked for n in names} & set(TEXT_TYPES)
    assert sorted(batch["rewards"].sum(dim=1).tolist()) == [-0.25, 1.0, 1.5]


def test_check_row_refuses_bad_text_columns():
    row = {**V1_ROWS[1], "prompt": "p", "completion": "c", "reward": 1.0, "turn_rewards": None, "extra": None}
    check_row(row, vocab_size=50, file="f", row_index=0)
    for field, value, words in [
        ("extra", "[1, 2]", "JSON text of an object"),
        ("extra", "{oops", "not valid JSON"),
        ("prompt", 3, "string or null"),
        ("reward", float("nan"), "finite number"),
        ("turn_rewards", [1.0, float("inf")], "item 1"),
    ]:
        with pytest.raises(RowError, match=rf"f: row 0: field '{field}': .*{words}"):
            check_row({**row, field: value}, vocab_size=50, file="f", row_index=0)


def test_write_buffer_keeps_text_only_when_asked_or_given(tmp_path):
    tok = {"name": "toy", "fingerprint": "f" * 64, "vocab_size": 50}
    with_text = [{**r, "prompt": f"p{i}", "completion": "c", "reward": 1.0} for i, r in enumerate(V1_ROWS)]
    a = write_buffer(with_text, tmp_path / "a", tokenizer_info=tok, command=["t"], progress=False)
    assert a.has_text and a.row(2)["prompt"] == "p2" and a.row(2)["extra"] is None
    b = write_buffer(V1_ROWS, tmp_path / "b", tokenizer_info=tok, command=["t"], progress=False)
    assert not b.has_text and b.schema.names == BASE
    c = write_buffer(with_text, tmp_path / "c", tokenizer_info=tok, command=["t"], progress=False, text_columns=False)
    assert not c.has_text and "prompt" not in c.row(0) and c.columns(["prompt"]).column(0).null_count == 4
    assert np.array_equal(c.row(0)["tokens"], V1_ROWS[0]["tokens"])


# ----------------------------------------------------------------------------------------------
# the chat readers keep the conversation: context before the first action turn in prompt, the rest in completion

HH = {
    "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A joke?\n\nAssistant: Why did the chicken cross?",
    "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A joke?\n\nAssistant: No.",
    "id": 7,
}


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_chat_readers_fill_the_text_columns(tmp_path, smollm2):
    write_jsonl(tmp_path / "hh.jsonl", [HH])
    mt = {
        "messages": [
            {"role": "user", "content": "Go"},
            {"role": "assistant", "content": "step 1", "reward": 0.5},
            {"role": "tool", "content": "ok"},
            {"role": "assistant", "content": "done"},
        ],
        "tag": "x",
    }
    write_jsonl(tmp_path / "mt.jsonl", [mt])
    uf = {
        "instruction": "Name a colour.",
        "source": "evol",
        "completions": [{"response": "Red.", "overall_score": 8, "model": "m1"}],
    }
    binarized = {
        "prompt": "Hi",
        "prompt_id": "p1",
        "chosen": msgs(("user", "Hi"), ("assistant", "Hello.")),
        "rejected": msgs(("user", "Hi"), ("assistant", "Go away.")),
        "messages": msgs(("user", "Hi"), ("assistant", "Hello.")),
        "score_chosen": 8,
        "score_rejected": 2,
    }
    write_jsonl(tmp_path / "uf.jsonl", [uf, binarized])
    for fmt, name in [("hh", "hh"), ("multiturn", "mt"), ("ultrafeedback", "uf")]:
        argv = ["build", fmt, str(tmp_path / f"{name}.jsonl"), "--tokenizer", "smollm2", "--out", str(tmp_path / name)]
        assert build(argv) == 0
    hh = plain_shards(tmp_path / "hh")[1][0].to_pylist()
    ctx = msgs(("user", "Hi"), ("assistant", "Hello!"), ("user", "A joke?"))
    assert [json.loads(r["prompt"]) for r in hh] == [ctx, ctx]
    assert [json.loads(r["completion"]) for r in hh] == [
        msgs(("assistant", "Why did the chicken cross?")),
        msgs(("assistant", "No.")),
    ]
    assert [r["reward"] for r in hh] == [1.0, -1.0] and [json.loads(r["extra"]) for r in hh] == [{"id": 7}] * 2
    (row,) = plain_shards(tmp_path / "mt")[1][0].to_pylist()
    assert json.loads(row["prompt"]) == mt["messages"][:1] and json.loads(row["completion"]) == mt["messages"][1:]
    assert row["reward"] is None and row["turn_rewards"] == [0.5, None] and json.loads(row["extra"]) == {"tag": "x"}
    row, chosen, rejected = plain_shards(tmp_path / "uf")[1][0].to_pylist()
    assert [json.loads(r["prompt"]) for r in (chosen, rejected)] == [msgs(("user", "Hi"))] * 2
    assert json.loads(chosen["completion"]) == msgs(("assistant", "Hello."))
    assert json.loads(rejected["completion"]) == msgs(("assistant", "Go away."))
    assert [chosen["reward"], rejected["reward"]] == [8.0, 2.0]
    assert json.loads(chosen["extra"]) == json.loads(rejected["extra"]) == {"prompt_id": "p1"}
    assert row["prompt"] == "Name a colour." and json.loads(row["completion"]) == msgs(("assistant", "Red."))
    assert row["reward"] == 8.0 and json.loads(row["extra"]) == {"source": "evol", "overall_score": 8, "model": "m1"}


def test_appending_the_same_rows_again_warns_or_is_refused(tmp_path, gpt2, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    other = write_jsonl(tmp_path / "other.jsonl", [{**RECORDS[0], "completion": " new"}, RECORDS[1]])
    b = str(tmp_path / "b")
    assert build(["build", "jsonl", str(inp), "--tokenizer", "gpt2", "--out", b]) == 0
    assert main(["append", b, "jsonl", str(other), "--no-progress", "--no-duplicates"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{other}: line 2: field 'completion': the same prompt and completion as row 'b0-1'" in err
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["rows"] == 3
    assert main(["append", b, "jsonl", str(inp), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: 3 appended row(s) repeat" in err
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["rows"] == 6 and m["commands"][-1]["duplicates"] == 3
    assert (
        main(
            [
                "append",
                b,
                "jsonl",
                str(write_jsonl(tmp_path / "new.jsonl", [{**RECORDS[0], "prompt": "x"}])),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "warning" not in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["commands"][-1]["duplicates"] == 0
