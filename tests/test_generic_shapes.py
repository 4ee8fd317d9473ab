"""The generic readers recognise TRL's public shapes and map other field names (hand-computed expectations)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_cli_runs import write_jsonl

from shiq_data.cli import main

pytestmark = pytest.mark.usefixtures("tokenizers_once")  # one tokenizer load per session

GPT2_EOS = 50256


def rows_of(folder):
    m = json.loads((folder / "manifest.json").read_text())
    out = []
    for s in m["shards"]:
        with pa.ipc.open_stream(pa.memory_map(str(folder / s["file"]))) as r:
            out += r.read_all().to_pylist()
    return out


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def expect(tok, prompt, completion, reward):
    """The row a (prompt, completion, reward) record must give: prompt ids + completion ids + eos, the
    completion and eos the actions, the reward on eos."""
    p, c = ids(tok, prompt), ids(tok, completion) + [GPT2_EOS]
    return {
        "prompt_len": len(p),
        "tokens": p + c,
        "action_mask": [False] * len(p) + [True] * len(c),
        "rewards": [0.0] * (len(p) + len(c) - 1) + [reward],
    }


def build(tmp_path, fmt, inp, *options):
    out = tmp_path / f"b-{fmt}-{inp.stem}"
    argv = ["build", fmt, str(inp), "--tokenizer", "gpt2", "--out", str(out), "--no-progress"]
    for o in options:
        argv += ["--option", o]
    return main(argv), out


KEYS = ("prompt_len", "tokens", "action_mask", "rewards")


def test_trl_preference_pairs_give_two_rows_in_one_group(tmp_path, gpt2):
    tok, _ = gpt2
    pairs = [
        {"prompt": "Sky?", "chosen": " Blue.", "rejected": " Green.", "id": 1},
        {"prompt": "Sky?", "chosen": " Grey.", "rejected": " Red."},  # same prompt, its own pair group
    ]
    rc, out = build(tmp_path, "jsonl", write_jsonl(tmp_path / "pairs.jsonl", pairs))
    assert rc == 0
    rows = rows_of(out)
    want = [("Sky?", " Blue.", 1.0), ("Sky?", " Green.", -1.0), ("Sky?", " Grey.", 1.0), ("Sky?", " Red.", -1.0)]
    assert [{k: r[k] for k in KEYS} for r in rows] == [expect(tok, *w) for w in want]
    assert [r["group_id"] for r in rows] == [0, 0, 1, 1]
    assert [r["completion"] for r in rows] == [" Blue.", " Green.", " Grey.", " Red."]
    assert [r["reward"] for r in rows] == [1.0, -1.0, 1.0, -1.0]
    assert [r["extra"] for r in rows] == ['{"id": 1}', '{"id": 1}', None, None]
    # Parquet holds the same shape
    pq.write_table(
        pa.Table.from_pylist([{k: p.get(k) for k in ("prompt", "chosen", "rejected")} for p in pairs]),
        tmp_path / "pairs.parquet",
    )
    rc, out2 = build(tmp_path, "parquet", tmp_path / "pairs.parquet")
    assert rc == 0 and [{k: r[k] for k in KEYS} for r in rows_of(out2)] == [expect(tok, *w) for w in want]


@pytest.mark.parametrize("given,other", [("chosen", "rejected"), ("rejected", "chosen")])
def test_half_a_preference_pair_names_the_missing_side(tmp_path, gpt2, capsys, given, other):
    """A pair without 'rejected' (or 'chosen') was told its 'completion' was missing."""
    pairs = [{"prompt": "Sky?", "chosen": " Blue.", "rejected": " Red."}, {"prompt": "Sky?", given: " Grey."}]
    bad = write_jsonl(tmp_path / "half.jsonl", pairs)
    rc, out = build(tmp_path, "jsonl", bad)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{bad}: line 2: field {other!r}: missing: a preference pair needs {given!r} and {other!r}" in err, err
    assert not out.exists()


def test_trl_unpaired_labels_become_plus_or_minus_one(tmp_path, gpt2, capsys):
    tok, _ = gpt2
    recs = [
        {"prompt": "2+2=", "completion": " 4", "label": True},
        {"prompt": "2+2=", "completion": " 5", "label": False},
        {"prompt": "3+3=", "completion": " 6", "label": False, "reward": 0.5},  # a reward wins over the label
        {"prompt": "3+3=", "completion": " 7", "label": False, "reward": None},  # unless null (a table's empty cell)
    ]
    rc, out = build(tmp_path, "jsonl", write_jsonl(tmp_path / "kto.jsonl", recs))
    assert rc == 0
    rows = rows_of(out)
    want = [("2+2=", " 4", 1.0), ("2+2=", " 5", -1.0), ("3+3=", " 6", 0.5), ("3+3=", " 7", -1.0)]
    assert [{k: r[k] for k in KEYS} for r in rows] == [expect(tok, *w) for w in want]
    assert [r["group_id"] for r in rows] == [0, 0, 1, 1]
    assert [r["extra"] for r in rows] == [None, None, '{"label": false}', None]
    for label, shown in (("yes", '"yes"'), (None, "null"), (1, "1"), ({"a": 1}, "dict")):  # as the input wrote it
        bad = write_jsonl(tmp_path / "bad.jsonl", [recs[0], {"prompt": "a", "completion": " b", "label": label}])
        assert build(tmp_path, "jsonl", bad)[0] == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.endswith(
            f"{bad}: line 2: field 'label': must be true or false, got {shown}"
        ), err


def test_field_options_map_other_names_and_errors_name_them(tmp_path, gpt2, capsys):
    tok, _ = gpt2
    recs = [
        {"question": "Capital of France?", "answer": " Paris.", "score": 0.9, "source": "geo"},
        {"question": "Capital of Spain?", "answer": " Madrid.", "score": 0.8},
    ]
    opts = ("prompt_field=question", "completion_field=answer", "reward_field=score")
    rc, out = build(tmp_path, "jsonl", write_jsonl(tmp_path / "qa.jsonl", recs), *opts)
    assert rc == 0
    rows = rows_of(out)
    want = [("Capital of France?", " Paris.", 0.9), ("Capital of Spain?", " Madrid.", 0.8)]
    got = [{k: r[k] for k in KEYS} for r in rows]
    for g, w in zip(got, [expect(tok, *w) for w in want]):
        assert g["tokens"] == w["tokens"] and g["action_mask"] == w["action_mask"]
        assert g["rewards"] == pytest.approx(w["rewards"])
    assert [r["source"] for r in rows] == ["geo", "qa.jsonl"]  # a string "source" field names the row's source
    assert [r["prompt"] for r in rows] == ["Capital of France?", "Capital of Spain?"] and rows[0]["extra"] is None
    # as the README writes it: one --option followed by the three settings builds the same rows
    one = tmp_path / "one_option"
    argv = ["build", "jsonl", str(tmp_path / "qa.jsonl"), "--tokenizer", "gpt2", "--option", *opts, "--out", str(one)]
    assert main([*argv, "--no-progress"]) == 0
    assert [{k: r[k] for k in KEYS} for r in rows_of(one)] == [{k: r[k] for k in KEYS} for r in rows]
    bad = write_jsonl(tmp_path / "qa_bad.jsonl", [recs[0], {"question": "x", "answer": "", "score": 1}])
    assert build(tmp_path, "jsonl", bad, *opts)[0] == 2
    err = capsys.readouterr().err.strip()
    assert f"{bad}: line 2: field 'answer': empty completion" in err
    missing = write_jsonl(tmp_path / "qa_missing.jsonl", [{"question": "x", "answer": " y"}])
    assert build(tmp_path, "jsonl", missing, *opts)[0] == 2
    assert "line 1: field 'score': missing" in capsys.readouterr().err
    assert build(tmp_path, "jsonl", missing, "prompt_fieldd=question")[0] == 2
    assert "unknown option" in capsys.readouterr().err
    # two options naming one field: every prompt was read as its own completion, the real one kept in extra
    assert build(tmp_path, "jsonl", missing, "prompt_field=question", "completion_field=question")[0] == 2
    assert "--option prompt_field and completion_field name the same input field 'question'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "later", ['{"prompt": "q", "completion": " a", "reward": "high"}', '{"prompt": "q", '], ids=["field", "json"]
)
def test_the_first_bad_line_is_named_not_a_later_one(tmp_path, gpt2, capsys, later):
    """A line whose text could not be tokenised (a control token's text) was only found when its batch of 512
    records was encoded, so a bad field or bad JSON a few lines further down was named instead of it."""
    lines = [json.dumps({"prompt": f"q{i}", "completion": f" a{i}", "reward": 1.0}) for i in range(5)]
    lines[1] = json.dumps({"prompt": "q<|endoftext|>", "completion": " a", "reward": 1.0})
    lines[3] = later
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    rc, out = build(tmp_path, "jsonl", bad)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{bad}: line 2: field 'prompt': contains '<|endoftext|>'" in err, err
    assert not out.exists()


@pytest.mark.parametrize("chat", ["chosen", "rejected"])
def test_a_pair_of_a_string_and_messages_is_refused(tmp_path, gpt2, capsys, chat):
    """A pair whose one side was a message list and the other a string gave a chat row and a plain row in one
    group: their prompts tokenise differently (the template's turns, or not), so a loss comparing them compared
    completions of two different prompts."""
    text = "rejected" if chat == "chosen" else "chosen"
    pair = {"prompt": "Sky?", chat: [{"role": "assistant", "content": "Blue."}], text: " Red."}
    bad = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "Sky?", "chosen": " Blue.", "rejected": " Red."}, pair])
    rc, out = build(tmp_path, "jsonl", bad)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{bad}: line 2: field {text!r}: a string, but {chat!r} is a list of chat messages" in err, err
    assert not out.exists()


def test_trl_implicit_prompt_pairs_take_the_shared_leading_messages_as_prompt(tmp_path, smollm2, capsys):
    """TRL's implicit prompt (``{"chosen", "rejected"}`` as two whole conversations, no ``prompt``) was refused
    ("field 'prompt': missing"). The prompt is the messages both begin with, each completion the rest: every row is
    its whole conversation as the template renders it, its own messages after the shared ones the actions."""
    tok, _ = smollm2
    system, user = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky colour? 🌤"}
    chosen = [system, user, {"role": "assistant", "content": "Blue."}]
    rejected = [system, user, {"role": "assistant", "content": "Green."}, {"role": "user", "content": "Sure?"}]
    rejected += [{"role": "assistant", "content": "No."}]
    out = tmp_path / "b"
    argv = ["build", "jsonl", str(write_jsonl(tmp_path / "p.jsonl", [{"chosen": chosen, "rejected": rejected}]))]
    assert main([*argv, "--tokenizer", "smollm2", "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    rows = rows_of(out)
    assert [r["group_id"] for r in rows] == [0, 0] and [r["reward"] for r in rows] == [1.0, -1.0]
    for row, conversation in zip(rows, (chosen, rejected)):
        whole = tok(tok.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)["input_ids"]
        assert row["tokens"] == whole[: len(row["tokens"])] and tok.decode(whole[len(row["tokens"]) :]).strip() == ""
        prompt = tok(tok.apply_chat_template(conversation[:2], tokenize=False, add_generation_prompt=True))
        assert row["prompt_len"] == len(prompt["input_ids"])  # the actions start after the shared messages
        actions = [t for t, a in zip(row["tokens"], row["action_mask"]) if a]
        want = "".join(m["content"] + "<|im_end|>" for m in conversation[2:] if m["role"] == "assistant")
        assert tok.decode(actions) == want
        last = max(i for i, a in enumerate(row["action_mask"]) if a)  # the last assistant message's <|im_end|>
        assert row["rewards"][last] == row["reward"] and sum(map(abs, row["rewards"])) == 1.0
    # refused in one line: a pair that shares nothing, one whose conversation is the other's start
    for n, (pair, needle) in enumerate(
        [
            ({"chosen": chosen, "rejected": [user, *chosen[2:]]}, "field 'chosen': shares no leading message"),
            ({"chosen": chosen[:2], "rejected": chosen}, "field 'chosen': is the start of the other conversation"),
        ]
    ):
        bad = write_jsonl(tmp_path / f"bad{n}.jsonl", [pair])
        rc = main(
            ["build", "jsonl", str(bad), "--tokenizer", "smollm2", "--out", str(tmp_path / f"o{n}"), "--no-progress"]
        )
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and f"{bad}: line 1: {needle}" in err, err


def test_trl_implicit_prompt_pairs_from_parquet_take_their_shared_messages(tmp_path, smollm2, capsys):
    """From Parquet, an implicit-prompt pair (no prompt) was refused: a file whose other rows have a prompt
    gives it a null one ("field 'prompt': must be a string"), and its columns' structs give every message their
    fields, null where it has none, so the same system and user messages, in two columns of other structs (a
    tool call in a rejected turn), shared nothing ("shares no leading message"). Each builds as from JSON lines."""
    system, user = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky colour?"}
    chosen = [system, user, {"role": "assistant", "content": "Blue."}]
    call = [{"type": "function", "function": {"name": "look", "arguments": "{}"}}]
    rejected = [system, user, {"role": "assistant", "content": "Green.", "tool_calls": call}]
    explicit = {"prompt": [user], "chosen": [chosen[-1]], "rejected": [{"role": "assistant", "content": "Red."}]}
    implicit = {"chosen": chosen, "rejected": rejected}
    want = tmp_path / "want"
    src = write_jsonl(tmp_path / "p.jsonl", [explicit, implicit])
    assert main(["build", "jsonl", str(src), "--tokenizer", "smollm2", "--out", str(want), "--no-progress"]) == 0
    table = pa.Table.from_pylist([{**explicit}, {"prompt": None, **implicit}])
    assert table.schema.field("chosen").type != table.schema.field("rejected").type  # (tool_calls: rejected's only)
    pq.write_table(table, tmp_path / "p.parquet")
    out = tmp_path / "b"
    rc = main(["build", "parquet", str(tmp_path / "p.parquet"), "--tokenizer", "smollm2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    got, expected = rows_of(out), rows_of(want)
    keys = ("tokens", "action_mask", "rewards", "prompt_len", "group_id")
    assert [{k: r[k] for k in keys} for r in got] == [{k: r[k] for k in keys} for r in expected]
