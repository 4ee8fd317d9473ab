"""shiq-data retokenize (the same rows for another tokenizer) and export (hf, parquet, jsonl) read back by build."""

import hashlib
import json
import shlex
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from conftest import cached_load_tokenizer
from data_cli_runs import write_jsonl

import shiq_data.cli
from shiq_data.buffer import add_ref_columns, write_buffer
from shiq_data.cli import main

pytestmark = pytest.mark.usefixtures("tokenizers_once")  # one tokenizer load per session

TOKEN_COLUMNS = ["row_id", "source", "group_id", "prompt_len", "tokens", "action_mask", "rewards"]
TEXT_COLUMNS = ["prompt", "completion", "reward", "turn_rewards", "extra"]
STRINGS = [
    {"prompt": "Hello world", "completion": " and goodbye.", "reward": 1.5, "tags": ["a"]},
    {"prompt": "Q: 2+2?\nA:", "completion": " 4", "reward": 1.0},
    {"prompt": "Hello world", "completion": " again", "reward": -0.25, "group": "g"},
]
CHAT = [
    {"prompt": "What is 2+3?", "completion": [{"role": "assistant", "content": "It is 5."}], "reward": 1.5, "k": 1},
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "completion": [
            {"role": "assistant", "content": "add(2, 3)"},
            {"role": "tool", "content": "5"},
            {"role": "assistant", "content": "The sum is 5."},
        ],
        "reward": -0.5,
    },
]
MULTITURN = [
    {
        "messages": [
            {"role": "user", "content": "Go"},
            {"role": "assistant", "content": "step 1", "reward": 0.5},
            {"role": "tool", "content": "ok"},
            {"role": "assistant", "content": "done", "reward": 2.0},
        ],
        "group": "m",
    }
]
HH = [
    {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A joke?\n\nAssistant: Why did the chicken cross?",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A joke?\n\nAssistant: No.",
    }
]


def run(*argv):
    return main([*map(str, argv)])


def shard_frame(folder) -> tuple[dict, pd.DataFrame]:
    """(manifest, all rows as a pandas frame) read with json and pyarrow only."""
    m = json.loads((Path(folder) / "manifest.json").read_text())
    tables = []
    for s in m["shards"]:
        with pa.ipc.open_stream(pa.memory_map(str(Path(folder) / s["file"]))) as r:
            tables.append(r.read_all())
    return m, pa.concat_tables(tables).to_pandas()


def pylist(folder) -> list[dict]:
    m = json.loads((Path(folder) / "manifest.json").read_text())
    rows = []
    for s in m["shards"]:
        with pa.ipc.open_stream(pa.memory_map(str(Path(folder) / s["file"]))) as r:
            rows += r.read_all().to_pylist()
    return rows


def lists(frame, column):
    return [list(v) for v in frame[column]]


def test_retokenize_gpt2_into_smollm2_equals_building_with_smollm2(tmp_path, gpt2, smollm2, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", STRINGS)
    assert run("build", "jsonl", inp, "--tokenizer", "gpt2", "--out", tmp_path / "g", "--no-progress") == 0
    assert run("build", "jsonl", inp, "--tokenizer", "smollm2", "--out", tmp_path / "s", "--no-progress") == 0
    # reference statistics on the parent: dropped by retokenize, and the manifest says so
    m_g, g = shard_frame(tmp_path / "g")
    n = [len(t) for t in g["tokens"]]
    add_ref_columns(tmp_path / "g", 0, [[0.0] * k for k in n], [[0.0] * k for k in n], ref_model={"name": "r"})
    m_g, g = shard_frame(tmp_path / "g")
    out = tmp_path / "r"
    assert run("retokenize", tmp_path / "g", "--tokenizer", "smollm2", "--out", out, "--no-progress") == 0
    assert str(out) in capsys.readouterr().out
    m_r, r = shard_frame(out)
    m_s, s = shard_frame(tmp_path / "s")
    for col in ("prompt_len", "group_id", "row_id", "source", "prompt", "completion", "reward", "extra"):
        assert r[col].tolist() == s[col].tolist(), col
    for col in ("tokens", "action_mask", "rewards"):
        assert lists(r, col) == lists(s, col), col
    assert lists(r, "tokens") != lists(g, "tokens")  # the tokenizer did change
    assert "ref_logz" not in r.columns and m_r["has_ref_stats"] is False
    assert m_r["tokenizer"]["fingerprint"] == smollm2[1]["fingerprint"] == m_s["tokenizer"]["fingerprint"]
    parent = hashlib.sha256(
        "\n".join([m_g["tokenizer"]["fingerprint"], *(x["sha256"] for x in m_g["shards"])]).encode()
    )
    assert m_r["retokenized_from"] == {
        "path": str((tmp_path / "g").resolve()),
        "fingerprint": parent.hexdigest(),
        "tokenizer": "gpt2",
        "ref_stats_dropped": True,
    }
    assert run("validate", out, "--no-progress") == 0


def test_retokenize_chat_rows_reproduces_their_tokens(tmp_path, smollm2, capsys):
    """A SmolLM2 buffer of chat, multi-turn and HH rows tokenised again with SmolLM2 gives the same rows;
    with GPT-2 (no chat template) it stops with one line naming the shard, row and column."""
    b = tmp_path / "b"
    assert (
        run(
            "build",
            "jsonl",
            write_jsonl(tmp_path / "c.jsonl", CHAT),
            "--tokenizer",
            "smollm2",
            "--out",
            b,
            "--no-progress",
        )
        == 0
    )
    assert run("append", b, "multiturn", write_jsonl(tmp_path / "m.jsonl", MULTITURN), "--no-progress") == 0
    assert run("append", b, "hh", write_jsonl(tmp_path / "h.jsonl", HH), "--no-progress") == 0
    assert run("retokenize", b, "--tokenizer", "smollm2", "--out", tmp_path / "r", "--no-progress") == 0
    orig, again = pylist(b), pylist(tmp_path / "r")
    assert len(orig) == 5 and orig == again
    # the parent's commands come first, so appending the same multi-turn file again makes new row ids
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert [c["argv"][1] for c in m["commands"]] == ["build", "append", "append", "retokenize"]
    assert run("append", tmp_path / "r", "multiturn", tmp_path / "m.jsonl", "--no-progress") == 0
    ids = [r["row_id"] for r in pylist(tmp_path / "r")]
    assert len(ids) == len(set(ids)) == 6
    capsys.readouterr()
    assert run("retokenize", b, "--tokenizer", "gpt2", "--out", tmp_path / "g", "--no-progress") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shard-00000.arrow: row 0: field 'completion'" in err
    assert "chat template" in err and not (tmp_path / "g").exists()


def test_retokenize_refuses_a_buffer_without_text(tmp_path, gpt2, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", STRINGS)
    assert run("build", "jsonl", inp, "--tokenizer", "gpt2", "--out", tmp_path / "b", "--no-text", "--no-progress") == 0
    assert run("retokenize", tmp_path / "b", "--tokenizer", "gpt2", "--out", tmp_path / "r", "--no-progress") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "manifest.json: the buffer has no text columns (built with --no-text)" in err
    assert not (tmp_path / "r").exists()
    assert run("export", tmp_path / "b", "--format", "jsonl", "--out", tmp_path / "e") == 2
    assert "no text columns" in capsys.readouterr().err and not (tmp_path / "e").exists()


@pytest.fixture(scope="module")
def mixed_buffer(tmp_path_factory, smollm2):
    """String, chat, multi-turn (per-turn rewards) and HH rows in one SmolLM2 buffer of three shards."""
    d = tmp_path_factory.mktemp("mixed")
    b = d / "b"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shiq_data.cli, "load_tokenizer", cached_load_tokenizer)
        return _build_mixed(d, b)


def _build_mixed(d, b):
    inp = write_jsonl(d / "in.jsonl", STRINGS + CHAT)
    assert run("build", "jsonl", inp, "--tokenizer", "smollm2", "--out", b, "--no-progress") == 0
    assert run("append", b, "multiturn", write_jsonl(d / "m.jsonl", MULTITURN), "--no-progress") == 0
    assert run("append", b, "hh", write_jsonl(d / "h.jsonl", HH), "--no-progress") == 0
    return b


def same_partition(a, b) -> bool:
    return pd.factorize(pd.Series(list(a)))[0].tolist() == pd.factorize(pd.Series(list(b)))[0].tolist()


@pytest.mark.parametrize(
    "fmt,reader,data",
    [("jsonl", "jsonl", "data.jsonl"), ("parquet", "parquet", "data.parquet"), ("hf", "datasets", "")],
)
def test_export_then_build_gives_the_same_rows(tmp_path, mixed_buffer, fmt, reader, data, capsys):
    out = tmp_path / "e"
    assert run("export", mixed_buffer, "--format", fmt, "--out", out) == 0
    shown = capsys.readouterr()
    assert str(out) in shown.out
    _, orig = shard_frame(mixed_buffer)
    assert f"export {fmt}: 100%" in shown.err and f"{len(orig)}/{len(orig)} [" in shown.err  # the rows' bar
    # the files themselves, read with pandas / datasets
    if fmt == "jsonl":
        frame = pd.read_json(out / data, lines=True)
        assert frame["group"].tolist() == orig["group_id"].tolist()
        assert frame["source"].tolist() == orig["source"].tolist()
        assert frame.loc[0, "tags"] == ["a"] and frame.loc[3, "k"] == 1  # the extra fields, at the top level
        assert frame.loc[5, "turn_rewards"] == [0.5, 2.0] and frame.loc[5, "completion"][0]["reward"] == 0.5
    elif fmt == "parquet":
        frame = pd.read_parquet(out / data)
        assert frame["tokens"].map(list).tolist() == orig["tokens"].map(list).tolist()
        assert frame["completion"].tolist() == orig["completion"].tolist()
    else:
        import datasets

        ds = datasets.load_from_disk(str(out))
        assert ds.num_rows == len(orig) and ds["tokens"] == orig["tokens"].map(list).tolist()
        assert ds["prompt"] == orig["prompt"].tolist() and ds["reward"][:5] == orig["reward"][:5].tolist()
    card = (out / "README.md").read_text()
    assert "license:" in card and f"rows: {len(orig)}" in card and "shiq-data build jsonl" in card
    assert "append" in card and "multiturn" in card  # the lineage: every command that built the buffer
    # build reads the export back: the same tokens, rewards, groups, sources and text
    rebuilt = tmp_path / "rebuilt"
    assert run("build", reader, out / data, "--tokenizer", "smollm2", "--out", rebuilt, "--no-progress") == 0
    _, again = shard_frame(rebuilt)
    assert len(again) == len(orig)
    for col in ("tokens", "action_mask", "rewards"):
        assert lists(again, col) == lists(orig, col), col
    assert again["prompt_len"].tolist() == orig["prompt_len"].tolist()
    assert same_partition(again["group_id"], orig["group_id"])
    assert again["source"].tolist() == orig["source"].tolist()
    for col in ("prompt", "completion", "extra"):
        assert again[col].tolist() == orig[col].tolist(), col
    assert (
        again["turn_rewards"].map(lambda v: None if v is None else list(v)).tolist()
        == orig["turn_rewards"].map(lambda v: None if v is None else list(v)).tolist()
    )


def test_export_refuses_an_existing_folder_and_a_clashing_extra_field(tmp_path, gpt2, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", [{**STRINGS[1], "meta": {"source_url": "x"}}])
    assert run("build", "jsonl", inp, "--tokenizer", "gpt2", "--out", tmp_path / "b", "--no-progress") == 0
    (tmp_path / "taken").mkdir()
    assert run("export", tmp_path / "b", "--format", "parquet", "--out", tmp_path / "taken", "--no-progress") == 2
    assert "already exists" in capsys.readouterr().err
    # an input record whose non-string "source" field stays in extra cannot be flattened into a JSONL record
    inp2 = write_jsonl(tmp_path / "in2.jsonl", [{**STRINGS[1], "source": 3}])
    assert run("build", "jsonl", inp2, "--tokenizer", "gpt2", "--out", tmp_path / "b2", "--no-progress") == 0
    assert run("export", tmp_path / "b2", "--format", "jsonl", "--out", tmp_path / "e", "--no-progress") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "row 0: field 'extra'" in err and "'source'" in err
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e.*"))
    # the folders a failed export made for its --out are gone with it; one that was there stays
    assert run("export", tmp_path / "b2", "--format", "jsonl", "--out", tmp_path / "new" / "deeper" / "e") == 2
    assert not (tmp_path / "new").exists()
    assert run("export", tmp_path / "b2", "--format", "jsonl", "--out", tmp_path / "taken" / "e") == 2
    assert (tmp_path / "taken").is_dir()


def test_progress_bars_follow_no_progress_and_the_log_level(tmp_path, gpt2, capsys):
    """--log-level WARNING or ERROR shows no progress bar (its help says the level decides which progress lines
    appear); export --format hf has --no-progress for datasets' own bar."""
    inp = write_jsonl(tmp_path / "in.jsonl", [STRINGS[1]] * 3)
    assert run("build", "jsonl", inp, "--tokenizer", "gpt2", "--out", tmp_path / "b", "--no-progress") == 0
    capsys.readouterr()
    assert run("export", tmp_path / "b", "--format", "hf", "--out", tmp_path / "shown") == 0
    err = capsys.readouterr().err
    assert "Saving the dataset" in err and "export hf: 100%" in err  # datasets' bar and the rows', by default
    for i, quiet in enumerate((["--no-progress"], ["--log-level", "ERROR"])):
        assert run("export", tmp_path / "b", "--format", "hf", "--out", tmp_path / f"quiet{i}", *quiet) == 0
        err = capsys.readouterr().err
        assert "Saving the dataset" not in err and "export hf" not in err
    for verb in (
        ["validate", tmp_path / "b"],
        ["filter", tmp_path / "b", "--where", "reward > -9", "--out", tmp_path / "f"],
    ):
        assert (
            run(*verb) == 0 and "\r" in capsys.readouterr().err
        )  # a bar by default (tqdm redraws it with a carriage return)
        shutil.rmtree(tmp_path / "f", ignore_errors=True)
        assert run(*verb, "--log-level", "ERROR") == 0
        assert "\r" not in capsys.readouterr().err


def toy_row(i: int, text: bool = True) -> dict:
    """Buffer row ``i`` of a toy vocabulary: two tokens, its reward on the second; with its text columns."""
    out = {
        "row_id": f"r{i}",
        "source": "s",
        "group_id": i,
        "prompt_len": 1,
        "tokens": [3, 4],
        "action_mask": [False, True],
        "rewards": [0.0, 1.0],
    }
    return {**out, "prompt": "p", "completion": "c", "reward": 1.0} if text else out


def test_jsonl_export_of_a_row_without_text_is_one_line_error(tmp_path, capsys):
    """A buffer with text columns whose row 1 has none (as an earlier mix of buffers with and without text
    wrote them): the JSONL export names the shard, the row and the field, and writes nothing."""

    buf = tmp_path / "b"
    tok = {"name": "toy", "fingerprint": "f" * 64, "vocab_size": 50}
    write_buffer([toy_row(0), toy_row(1, text=False)], buf, tokenizer_info=tok, command=["t"], progress=False)
    table = pa.ipc.open_stream(pa.memory_map(str(buf / "shard-00000.arrow"))).read_all()
    assert table.column("prompt").to_pylist() == ["p", None]  # the input, as plain pyarrow reads it
    assert run("export", buf, "--format", "jsonl", "--out", tmp_path / "e", "--no-progress") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{buf / 'shard-00000.arrow'}: row 1: field 'prompt': null" in err and "--format parquet" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
def test_export_refuses_a_group_id_validate_refuses(tmp_path, capsys, fmt):
    """A row whose group_id is not below the manifest's next_group_id (a shard edited with its checksum), which
    validate refuses, was published by export; it is now refused naming the shard, row and field, and nothing
    is written."""
    from data_cli_runs import rewrite_shard

    rows = [toy_row(i) for i in range(3)]
    buf = tmp_path / "b"
    tok = {"name": "toy", "fingerprint": "f" * 64, "vocab_size": 50}
    write_buffer(rows, buf, tokenizer_info=tok, command=["t"], progress=False)
    rewrite_shard(buf, 0, lambda rows: rows[1].update(group_id=7))
    assert run("validate", buf, "--no-progress") == 2
    assert "row 1: field 'group_id'" in capsys.readouterr().err
    assert run("export", buf, "--format", fmt, "--out", tmp_path / "e", "--no-progress") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{buf / 'shard-00000.arrow'}: row 1: field 'group_id': 7 >= the manifest's next_group_id 3" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


@pytest.mark.parametrize(
    "extra,needle",
    [
        ("[1, 2]", "'extra': must be the JSON text of an object, got list"),
        ("{nope", "'extra': not JSON text"),
        # exported as Infinity before; the key that holds it is named
        ('{"lang": "fr", "score": Infinity}', "'extra.score': holds Infinity, which standard JSON cannot hold"),
        ('{"a": [1, {"b": NaN}]}', "'extra.a': holds NaN"),
        (
            '{"score": 1e999}',
            "'extra.score': holds Infinity",
        ),  # a number beyond float range, as an exported JSONL may hold it
    ],
)
def test_a_hand_edited_extra_column_is_named_when_exported(extra, needle):
    """``extra`` as a shard written by hand may hold it: one line naming the shard, row and field."""
    from shiq_data.export import jsonl_record

    row = {"prompt": "a", "completion": " b", "turn_rewards": None, "reward": 1.0, "group_id": 0, "source": "s"}
    assert jsonl_record({**row, "extra": '{"lang": "fr"}'}, where="x")["lang"] == "fr"
    with pytest.raises(ValueError, match=f"shard-00000.arrow: row 3: field {needle}"):
        jsonl_record({**row, "extra": extra}, where="shard-00000.arrow: row 3")


@pytest.mark.parametrize("value,name", [("1e999", "Infinity"), ("-1e999", "-Infinity"), ("NaN", "NaN")])
def test_a_non_finite_number_in_an_extra_field_is_refused_at_build(tmp_path, capsys, value, name):
    """Python's JSON reads 1e999 as inf and writes it back as ``Infinity``, which no other JSON reader
    accepts: the buffer would carry it into every export. Refused at build, naming file, line and field (the
    input's own field, kept in ``extra``: it was named ``extra`` alone)."""
    src = tmp_path / "in.jsonl"
    src.write_text(
        '{"prompt": "a b", "completion": " c", "reward": 1.0}\n'
        f'{{"prompt": "a", "completion": " d", "reward": 0.5, "score": {value}}}\n'
    )
    assert run("build", "jsonl", src, "--tokenizer", "gpt2", "--out", tmp_path / "b", "--no-progress") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"in.jsonl: line 2: field 'extra.score': holds {name}," in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


JSON_LOOKING = [
    {"prompt": "Echo this JSON", "completion": '[{"role": "assistant", "content": "x"}]', "reward": 1.0},
    {"prompt": '[{"role": "user", "content": "What is 2+2?"}]', "completion": "four", "reward": 0.5},
    {"prompt": '"[{\\"role\\": \\"user\\", \\"content\\": \\"q\\"}]"', "completion": '"quoted"', "reward": 0.0},
]


def test_text_that_reads_as_a_chat_keeps_its_tokens_through_retokenize_and_export(tmp_path, gpt2, capsys):
    """A completion that is the JSON text of a message list (a model answering in JSON) was read back as a chat:
    retokenize rendered it through the chat template (20 tokens became 37) or failed, and export wrote a list
    that build then refused. Such text is kept as its JSON string literal and reads back as the string."""
    inp = write_jsonl(tmp_path / "in.jsonl", JSON_LOOKING)
    assert run("build", "jsonl", inp, "--tokenizer", "gpt2", "--out", tmp_path / "b", "--no-progress") == 0
    assert run("retokenize", tmp_path / "b", "--tokenizer", "gpt2", "--out", tmp_path / "r", "--no-progress") == 0
    _, b = shard_frame(tmp_path / "b")
    _, r = shard_frame(tmp_path / "r")
    for col in ("tokens", "action_mask"):
        assert lists(r, col) == lists(b, col), col
    assert run("export", tmp_path / "b", "--format", "jsonl", "--out", tmp_path / "x") == 0
    exported = [json.loads(line) for line in (tmp_path / "x" / "data.jsonl").read_text().splitlines()]
    assert [(e["prompt"], e["completion"]) for e in exported] == [(j["prompt"], j["completion"]) for j in JSON_LOOKING]


def test_text_columns_read_back_what_was_written():
    """decode_text(text_of(v)) == v for strings of every shape near the chat form, and message lists."""
    from hypothesis import given
    from hypothesis import strategies as st

    from shiq_data.readers.encode import decode_text, text_of

    chat = json.dumps([{"role": "user", "content": "hi"}])
    near = st.sampled_from([chat, json.dumps(chat), json.dumps(json.dumps(chat)), '"', '""', "[", "[]", '"x"'])

    @given(st.one_of(near, st.text(), st.builds(lambda a, b: a + b, near, st.text())))
    def roundtrip(value):
        assert decode_text(text_of(value)) == value

    roundtrip()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "[]"}]
    assert decode_text(text_of(messages)) == messages and text_of("plain") == "plain"


def test_curation_compares_the_text_as_given_whichever_way_it_was_kept():
    """A JSON-answer completion kept as itself (buffers of before) or as its JSON string literal (now) is one
    text to dedup, append's duplicate check and the curation verbs; a message list stays its JSON text."""
    from shiq_data.buffer import text_key
    from shiq_data.readers.encode import given_text, text_of

    answer = '[{"role": "assistant", "content": "x"}]'
    assert text_of(answer) != answer and given_text(text_of(answer)) == answer == given_text(answer)
    assert text_key("p", answer) == text_key("p", text_of(answer)) != text_key("p", "other")
    messages = [{"role": "user", "content": "hi"}]
    assert given_text(text_of(messages)) == text_of(messages) and given_text(None) is None


def test_where_sees_the_text_as_given_not_its_stored_string_literal(tmp_path, gpt2, capsys):
    """``--where`` names ``prompt`` and ``completion`` as the input gave them, as dedup compares them: a completion
    that is a message list's JSON text (kept as its JSON string literal) is matched by that JSON text."""
    inp = write_jsonl(tmp_path / "in.jsonl", JSON_LOOKING)
    assert run("build", "jsonl", inp, "--tokenizer", "gpt2", "--out", tmp_path / "b", "--no-progress") == 0
    where = "completion LIKE '[{%' OR completion = '\"quoted\"'"
    assert run("filter", tmp_path / "b", "--where", where, "--out", tmp_path / "f", "--no-progress") == 0
    _, kept = shard_frame(tmp_path / "f")
    assert kept.row_id.tolist() == ["b0-0", "b0-2"]
    capsys.readouterr()


@pytest.mark.parametrize(
    "text,needle",
    [
        ({"completion": ""}, "field 'completion': empty completion"),
        # an AttributeError ('int' object has no attribute 'strip') before the messages were checked
        (
            {"completion": json.dumps([{"role": "assistant", "content": 5}])},
            "field 'completion[0].content': expected a string, got int",
        ),
        (
            {"completion": json.dumps([{"role": "assistant", "content": "a"}]), "turn_rewards": [1.0]},
            "field 'reward': give either a reward or turn_rewards, not both",
        ),
    ],
)
def test_retokenize_refuses_the_text_build_refuses(tmp_path, smollm2, capsys, text, needle):
    """A shard written by hand whose text columns build would refuse: an empty completion became a row whose only
    action is the end-of-text token, a reward beside turn rewards lost one of them, and a message whose content is
    not text ended in a traceback. Refused as build refuses
    them, in one line naming the shard, row and field, with nothing written."""
    row = {"row_id": "r0", "source": "s", "group_id": 0, "prompt_len": 1, "tokens": [3, 4]}
    row.update(action_mask=[False, True], rewards=[0.0, 1.0], prompt="q", reward=1.0, **text)
    buf = tmp_path / "b"
    info = {"name": "smollm2", "fingerprint": smollm2[1]["fingerprint"], "vocab_size": smollm2[1]["vocab_size"]}
    write_buffer([row], buf, tokenizer_info=info, command=["t"], progress=False)
    assert run("retokenize", buf, "--tokenizer", "smollm2", "--out", tmp_path / "r") == 2
    err = capsys.readouterr().err
    # the bar ('building r: 0 rows [...]') cleared, the error on a clean line (what follows a line's last '\r')
    shown = [line.rsplit("\r", 1)[-1] for line in err.rstrip("\n").split("\n")]
    assert len(shown) == 1 and "Traceback" not in err and "\r" in err, err
    assert f"shard-00000.arrow: row 0: {needle}" in shown[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_jsonl_export_refuses_the_text_build_refuses(tmp_path, capsys):
    """A shard whose text columns were written by hand with an empty completion was exported to a JSONL file that
    build then refused; export refuses it instead, naming the shard, row and field, and writes nothing."""
    row = {**toy_row(0), "completion": ""}
    buf = tmp_path / "b"
    tok = {"name": "toy", "fingerprint": "f" * 64, "vocab_size": 50}
    write_buffer([row], buf, tokenizer_info=tok, command=["t"], progress=False)
    assert run("export", buf, "--format", "jsonl", "--out", tmp_path / "e") == 2
    err = capsys.readouterr().err
    # the bar ('export jsonl: 0%|...') cleared, the error on a clean line (what follows a line's last '\r')
    shown = [line.rsplit("\r", 1)[-1] for line in err.rstrip("\n").split("\n")]
    assert len(shown) == 1 and "Traceback" not in err and "\r" in err, err
    assert f"{buf / 'shard-00000.arrow'}: row 0: field 'completion': empty completion" in shown[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_the_card_lineage_gives_each_command_as_it_reruns(tmp_path, gpt2, capsys):
    """The card's lineage joined each recorded command's words with spaces: a --where expression lost its quotes
    (`--where reward > 0 AND source <> 'x'`, which a shell reads as redirections), where `shiq-data info` quotes it."""
    inp = write_jsonl(tmp_path / "in.jsonl", [STRINGS[1]])
    assert run("build", "jsonl", inp, "--tokenizer", "gpt2", "--out", tmp_path / "b", "--no-progress") == 0
    where = "reward > -5 AND source <> 'x`y'"
    assert run("filter", tmp_path / "b", "--where", where, "--out", tmp_path / "f", "--no-progress") == 0
    assert run("export", tmp_path / "f", "--format", "jsonl", "--out", tmp_path / "e", "--no-progress") == 0
    card = (tmp_path / "e" / "README.md").read_text()
    line = [x for x in card.splitlines() if " filter " in x][0]
    span = line.split("rows: ", 1)[1]
    assert span.startswith("`` ") and span.endswith(" ``"), line
    assert shlex.split(span[3:-3])[2:] == [
        str(tmp_path / "b"),
        "--where",
        where,
        "--out",
        str(tmp_path / "f"),
        "--no-progress",
    ]
