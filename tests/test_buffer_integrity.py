"""What a buffer or run folder says cannot lead outside it, and corrupted shards are never used or rewritten.

Each test tampers with files the way a crafted or damaged download would, and checks that every entry
point refuses with a one-line error naming the file and the entry, and that nothing was changed.
"""

import hashlib
import json
import os
from pathlib import Path

import pytest
from test_buffer import TOK, make_rows

from shiq_data import buffer as B
from shiq_data.buffer import add_ref_columns, append_buffer, open_buffer, read_manifest, write_buffer
from shiq_data.cli import main
from shiq_data.validate import validate_buffer
from shiq_train.checkpoint import latest_step_dir


def _build(folder, n=6, seed=0):
    write_buffer(make_rows(n, seed=seed), folder, tokenizer_info=TOK, command=["test"], progress=False, shard_rows=3)
    return folder


def _edit_manifest(folder, edit):
    path = Path(folder) / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _files(folder):
    return {p.name: _sha(p) for p in Path(folder).iterdir() if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize(
    "name",
    [
        "../other/shard-00000.arrow",
        "/etc/passwd",
        "sub/shard-00000.arrow",
        "x.arrow",
        7,
        "shard-00000.arrow\n",  # "$" matched before a final newline: validate then deleted the real shard
        "shard-\u0660\u0660\u0660\u0660\u0660.arrow",  # digits, but not ASCII ones
    ],
)
def test_a_shard_name_outside_the_folder_is_refused_everywhere(tmp_path, name):
    a, other = _build(tmp_path / "a"), _build(tmp_path / "other", seed=1)
    victim = dict(_files(other))
    _edit_manifest(a, lambda m: m["shards"][0].update(file=name))
    if isinstance(name, str) and "/" not in name:  # a file of that name beside the real one
        (a / name).write_bytes((a / "shard-00000.arrow").read_bytes())
    mine = _files(a)
    for call in (
        lambda: read_manifest(a),
        lambda: open_buffer(a),
        lambda: validate_buffer(a, cleanup=True),
        lambda: add_ref_columns(a, 0, [[0.0] * 3] * 3, [[0.0] * 3] * 3, ref_model={"name": "x"}),
        lambda: append_buffer(a, make_rows(2, seed=5), tokenizer_info=TOK, command=["t"], progress=False),
    ):
        with pytest.raises(ValueError, match=r"manifest\.json: shards\[0\]\.file"):
            call()
    assert _files(other) == victim  # the other buffer was not touched
    assert _files(a) == mine  # nor this one (validate's cleanup deleted nothing)


@pytest.mark.parametrize("linked", [("f.pt",), ("f.pt.sha256",), ("f.pt", "f.pt.sha256")])
def test_a_linked_checkpoint_file_or_checksum_is_refused(tmp_path, linked):
    """A rank file (or Q♯ value model) and its ``.sha256`` are plain files of their folder: a link, even to a
    file its checksum matches, could read any file outside the run."""
    from shiq_train.checkpoint import check_sha256

    outside, step = tmp_path / "outside", tmp_path / "run" / "step"
    outside.mkdir()
    step.mkdir(parents=True)
    for folder in (outside, step):
        (folder / "f.pt").write_bytes(b"weights")
        (folder / "f.pt.sha256").write_text(f"{hashlib.sha256(b'weights').hexdigest()}  f.pt\n")
    check_sha256(outside / "f.pt")  # the files themselves pass
    check_sha256(step / "f.pt")
    for name in linked:
        (step / name).unlink()
        os.symlink(outside / name, step / name)
    with pytest.raises(ValueError, match=rf"{step / linked[0]} is a link; a checkpoint's files must be plain files"):
        check_sha256(step / "f.pt")


def test_a_symlinked_shard_is_refused(tmp_path):
    a, other = _build(tmp_path / "a"), _build(tmp_path / "other", seed=1)
    first = read_manifest(a)["shards"][0]["file"]
    (a / first).unlink()
    os.symlink(other / first, a / first)
    with pytest.raises(ValueError, match=r"shards\[0\]\.file: .* is a link"):
        open_buffer(a)


def test_a_lock_file_linked_out_of_the_buffer_is_refused_and_makes_nothing_there(tmp_path):
    a = _build(tmp_path / "a")
    outside = tmp_path / "elsewhere" / "made"
    outside.parent.mkdir()
    (a / ".lock").symlink_to(outside)
    before = _files(a)
    with pytest.raises(OSError, match="symbolic link"):
        append_buffer(a, make_rows(2, seed=1), command=["a"], progress=False)
    assert not os.path.lexists(outside) and os.listdir(outside.parent) == []
    assert _files(a) == before and os.path.islink(a / ".lock")


def test_a_shard_replaced_by_a_named_pipe_is_refused_not_waited_on(tmp_path):
    import subprocess
    import sys
    import textwrap

    a = _build(tmp_path / "a")
    (a / "shard-00001.arrow").unlink()
    os.mkfifo(a / "shard-00001.arrow")  # reading it would wait for a writer that never comes
    before = sorted(p.name for p in a.iterdir())
    child = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]
        from test_buffer import make_rows
        from shiq_data.buffer import append_buffer
        try:
            append_buffer({str(a)!r}, make_rows(2, seed=1), command=["a"], progress=False)
        except ValueError as e:
            print(e)
    """)
    try:
        out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=20).stdout
    except subprocess.TimeoutExpired:
        pytest.fail("append waited on the named pipe")
    assert f"{a / 'shard-00001.arrow'}: listed in" in out and "not a regular file" in out
    assert sorted(p.name for p in a.iterdir() if p.name != ".lock") == before


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda m: m.update(rows="12"), "'rows'"),
        (lambda m: m.update(shards={"a": 1}), "'shards'"),
        (lambda m: m["shards"][1].update(rows=-1), r"shards\[1\]\.rows"),
        (lambda m: m["shards"][0].update(sha256="abc"), r"shards\[0\]\.sha256"),
        (lambda m: m["shards"][0].update(has_ref="no"), r"shards\[0\]\.has_ref"),
        (lambda m: m.update(tokenizer="gpt2"), "'tokenizer'"),
        (lambda m: m.update(next_group_id=10**400), "'next_group_id'"),
        (lambda m: m["tokenizer"].update(vocab_size=0), r"'tokenizer.vocab_size' must be >= 1, got 0"),
        (lambda m: m.update(shard_bytes=0), r"field 'shard_bytes' must be an integer >= 1, got 0"),
        (lambda m: m.update(shard_bytes="1024"), r"field 'shard_bytes' must be an integer >= 1, got '1024'"),
        (lambda m: m.update(shard_bytes=True), r"field 'shard_bytes' must be an integer >= 1, got True"),
        (lambda m: m.update(shard_bytes=1.5), r"field 'shard_bytes' must be an integer >= 1, got 1.5"),
    ],
)
def test_manifest_fields_of_the_wrong_type_give_a_named_error(tmp_path, edit, field):
    a = _build(tmp_path / "a")
    _edit_manifest(a, edit)
    with pytest.raises(ValueError, match=field):
        open_buffer(a)


def _drop(key):
    """An edit removing ``key`` (a dotted path, ``shards.0.bytes``) from the manifest."""

    def edit(m):
        *parents, last = key.split(".")
        for k in parents:
            m = m[int(k)] if isinstance(m, list) else m[k]
        del m[last]

    return edit


@pytest.mark.parametrize(
    "edit, field",
    [
        (_drop("shards.0.bytes"), "shards[0].bytes: missing"),
        (_drop("shards.1.action_tokens"), "shards[1].action_tokens: missing"),
        (_drop("action_tokens"), "field 'action_tokens' missing"),
        (_drop("commands"), "field 'commands' missing"),
        (_drop("tokenizer.name"), "field 'tokenizer.name' missing"),
        (lambda m: m["shards"][0].update(bytes="12"), "shards[0].bytes: must be"),
        (lambda m: m.update(rows=m["rows"] + 1), "field 'rows' is 7, its shards' 'rows' add up to 6"),
        (lambda m: m.update(tokens=m["tokens"] - 1), "field 'tokens' is"),
        (lambda m: m.update(action_tokens=0), "field 'action_tokens' is 0"),
        (lambda m: m.update(has_ref_stats=True), "field 'has_ref_stats' is true, but not every shard has"),
        (lambda m: m["shards"].append(dict(m["shards"][0])), "shards[2].file: 'shard-00000.arrow' repeats"),
        (lambda m: m["shards"][1].update(file="shard-00000.r1.arrow"), "shards[1].file: 'shard-00000.r1.arrow'"),
        # (without shard_rows, an append reads the rows per shard from the command that wrote the first shard)
        (lambda m: (m.pop("shard_rows"), m["commands"][0].update(shards=5)), "field 'commands' must be"),
        (lambda m: m.update(shard_bytes=-1), "field 'shard_bytes' must be an integer >= 1, got -1"),
    ],
)
def test_a_manifest_missing_a_field_or_with_wrong_totals_is_one_line_everywhere(tmp_path, capsys, edit, field):
    a = _build(tmp_path / "a")
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "a", "completion": "b", "reward": 1}) + "\n")
    _edit_manifest(a, edit)
    before = _files(a)
    out = tmp_path / "export"
    for argv in (
        ["validate", a, "--no-progress"],
        ["info", a],
        ["append", a, "jsonl", inp, "--no-progress"],
        ["export", a, "--format", "parquet", "--out", out],
    ):
        assert main([str(x) for x in argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{a / 'manifest.json'}: " in err and field in err, (argv, err)
    assert _files(a) == before and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "in.jsonl"]


def _corrupt(folder, index=0):
    path = Path(folder) / read_manifest(folder)["shards"][index]["file"]
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # inside the last record batch's data: Arrow still reads it
    path.write_bytes(bytes(data))
    return path


def test_a_corrupted_shard_is_refused_before_use_and_never_rewritten(tmp_path):
    a = _build(tmp_path / "a")
    path = _corrupt(a)
    before = _files(a)
    with pytest.raises(ValueError, match=r"sha256 .* differs"):
        open_buffer(a)
    with pytest.raises(ValueError, match=r"sha256 .* differs"):
        add_ref_columns(a, 0, [[0.0] * 8] * 3, [[0.0] * 8] * 3, ref_model={"name": "x"})
    with pytest.raises(ValueError, match=r"sha256 .* differs"):
        append_buffer(a, make_rows(2, seed=5), tokenizer_info=TOK, command=["t"], progress=False)
    assert _files(a) == before  # the corrupted shard kept its recorded (now wrong) checksum
    assert read_manifest(a)["shards"][0]["sha256"] != _sha(path)
    # the explicit opt-out reads it anyway
    assert len(open_buffer(a, verify_checksums=False)) == 6


def test_each_shard_is_hashed_once_per_process(tmp_path, monkeypatch):
    a = _build(tmp_path / "a")
    calls = []
    real = B._sha256_file
    monkeypatch.setattr(B, "_VERIFIED", {})
    monkeypatch.setattr(B, "_sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    open_buffer(a)
    open_buffer(a)
    assert sorted(calls) == sorted(s["file"] for s in read_manifest(a)["shards"])
    _corrupt(a, 1)  # a changed file is hashed again (its size or modification time moved)
    os.utime(Path(a) / read_manifest(a)["shards"][1]["file"], ns=(1, 1))
    with pytest.raises(ValueError, match="differs"):
        open_buffer(a)


def test_a_shard_changed_with_its_modification_time_put_back_is_hashed_again(tmp_path, monkeypatch):
    """The verdict cache keyed on path, size and modification time: a shard rewritten in place at the same size
    with its modification time put back (``cp -p``, ``rsync -t``, ``touch -r``, a restore) was taken as checked.
    The key has the file's inode change time too, which no one can set back."""
    a = _build(tmp_path / "a")
    monkeypatch.setattr(B, "_VERIFIED", {})
    open_buffer(a)
    path = Path(a) / read_manifest(a)["shards"][0]["file"]
    st = path.stat()
    _corrupt(a, 0)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    with pytest.raises(ValueError, match="differs"):
        open_buffer(a)


@pytest.mark.parametrize("pointer", ["../../elsewhere", "/tmp", "step_1/../../x", "step_abc", ""])
def test_a_checkpoint_pointer_outside_the_run_is_refused(tmp_path, pointer):
    ckpt = tmp_path / "run" / "checkpoints"
    (ckpt / "step_00000001").mkdir(parents=True)
    (ckpt / "latest").write_text(pointer + "\n")
    with pytest.raises(ValueError, match="latest: "):
        latest_step_dir(ckpt)
    (ckpt / "latest").write_text("step_00000001\n")
    assert latest_step_dir(ckpt) == ckpt / "step_00000001"


def test_garbage_with_its_checksum_and_a_non_utf8_manifest_are_named(tmp_path, capsys):
    """A shard replaced by bytes that are not Arrow, its checksum updated, and a manifest that is not UTF-8:
    every command names the file (pyarrow and the codec named neither)."""
    a = _build(tmp_path / "a")
    m = read_manifest(a)
    path = a / m["shards"][0]["file"]
    path.write_bytes(b"not an arrow stream at all" * 30)
    m["shards"][0].update(sha256=_sha(path), bytes=path.stat().st_size)
    (a / "manifest.json").write_text(json.dumps(m))
    for argv in (["show", a], ["stats", a], ["filter", a, "--where", "reward > 0", "--out", tmp_path / "f"]):
        assert main([str(x) for x in argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{path}: not a readable Arrow shard" in err, (argv, err)
    (a / "manifest.json").write_bytes(b'{"format": "\xff"}')
    assert main(["info", str(a)]) == 2
    assert f"{a / 'manifest.json'}: not valid JSON" in capsys.readouterr().err


def test_append_with_another_tokenizer_says_so_first(tmp_path, capsys):
    """Another vocabulary was reported as a --system-prompt difference the user never passed."""
    from data_cli_runs import run, write_jsonl

    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "Say hi.", "completion": " hi", "reward": 1.0}])
    assert run(capsys, "build", "jsonl", rows, "--tokenizer", "gpt2", "--out", tmp_path / "b")[0] == 0
    code, _, err = run(capsys, "append", tmp_path / "b", "jsonl", rows, "--tokenizer", "smollm2")
    assert code == 2 and "tokenizer mismatch: the buffer was built with 'gpt2', --tokenizer 'smollm2'" in err
    assert "system" not in err


@pytest.mark.parametrize("end", ["\n", "\r\n", ""])
def test_a_jsonl_line_cut_inside_a_string_is_called_unterminated(tmp_path, end):
    """A line cut short inside a string (a copy stopped half-way) was parsed with its line end, which json took for
    a control character inside the string: "Invalid control character at at column 21", its "at" doubled."""
    from shiq_data.io import RowError, iter_jsonl

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "completion": "b", "reward": 1.0}\n{"prompt": "Question' + end, newline="")
    with pytest.raises(RowError) as e:
        list(iter_jsonl(rows))
    assert str(e.value) == f"{rows}: line 2: field '*': not valid JSON (Unterminated string starting at column 12)"
    rows.write_text('{"prompt": "a\tb", "completion": "c", "reward": 1.0}' + end, newline="")  # a tab, unescaped
    with pytest.raises(RowError) as e:
        list(iter_jsonl(rows))
    assert str(e.value) == f"{rows}: line 1: field '*': not valid JSON (Invalid control character at column 14)"


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"rows": 1' + "0" * 5000 + "}"])
def test_json_too_deep_or_a_number_too_long_is_named_with_its_file(tmp_path, text):
    """Nesting deeper than Python's recursion limit, or an integer of more than 4300 digits, gave a message
    naming no file (json's RecursionError or ValueError): now the JSONL line, the manifest and a results file
    are named like any other bad JSON."""
    from shiq_data.io import RowError, iter_jsonl
    from shiq_eval.leaderboard import read_results

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "completion": "b", "reward": 1.0}\n' + text + "\n")
    with pytest.raises(RowError, match=rf"{rows}: line 2: .*not valid JSON"):
        list(iter_jsonl(rows))
    a = _build(tmp_path / "a")
    (a / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match=rf"{a / 'manifest.json'}: not valid JSON"):
        open_buffer(a)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.json").write_text(text)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'r' / 'results.json'}: not valid JSON"):
        read_results([tmp_path / "r"])
    # every other JSON file read: a step's meta.json (training and evaluation), an export's record and
    # config.json, a value model's config, a prompts file, an init folder's config.json, a recipe's file
    from shiq_eval.checkpoints import checkpoint_info, hf_folder_info
    from shiq_eval.cli import read_prompts_jsonl
    from shiq_eval.recipes.common import read_json
    from shiq_train.checkpoint import read_meta
    from shiq_train.cli import read_llama_config
    from shiq_train.hf_convert import check_export_weights
    from shiq_train.qsharp_value import _read_config

    step = tmp_path / "step_0000001"
    step.mkdir()
    (step / "meta.json").write_text(text)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(text)
    (tmp_path / "shiq_export.json").write_text(text)
    (tmp_path / "prompts.jsonl").write_text(text + "\n")
    cases = [
        (read_meta, step, step / "meta.json"),
        (checkpoint_info, step, step / "meta.json"),
        (hf_folder_info, hf, hf / "config.json"),
        (check_export_weights, tmp_path, tmp_path / "shiq_export.json"),
        (_read_config, hf / "config.json", hf / "config.json"),
        (read_prompts_jsonl, tmp_path / "prompts.jsonl", tmp_path / "prompts.jsonl"),
        (read_llama_config, str(hf), hf / "config.json"),
        (read_json, hf / "config.json", hf / "config.json"),
    ]
    for read, arg, named in cases:
        with pytest.raises(ValueError, match=rf"{named}.*not valid JSON"):
            read(arg)


def test_a_shard_with_invalid_utf8_text_is_refused_even_with_a_matching_checksum(tmp_path, capsys):
    """A shard edited together with its checksum so that a string (a row id) holds invalid UTF-8: Arrow reads
    such strings without a check, and validate named no file ("'utf-8' codec can't decode") while filter copied
    the bytes into a new buffer with a fresh checksum. Refused now, naming the shard, nothing written."""
    a = _build(tmp_path / "a")
    entry = read_manifest(a)["shards"][0]
    path = Path(a) / entry["file"]
    data = path.read_bytes()
    at = data.index(b"r0-1")
    path.write_bytes(data[:at] + b"\xff" + data[at + 1 :])
    _edit_manifest(a, lambda m: m["shards"][0].update(sha256=_sha(path)))
    with pytest.raises(ValueError, match=rf"{path}: not a readable Arrow shard .*the buffer is damaged"):
        B.read_shard(path)
    for argv in (["validate", str(a)], ["filter", str(a), "--where", "reward > -100", "--out", str(tmp_path / "f")]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert str(path) in err and "not a readable Arrow shard" in err, err
    assert not (tmp_path / "f").exists()


def test_a_truncated_shard_read_without_its_checksum_is_named(tmp_path):
    """With checksums off (``verify_checksums=False``, ``data.verify_checksums=false``) a truncated shard reached
    Arrow's reader, whose error named no file ("Expected to be able to read 1864 bytes for message body")."""
    a = _build(tmp_path / "a")
    path = Path(a) / read_manifest(a)["shards"][0]["file"]
    whole = path.read_bytes()
    for keep in range(8, len(whole), max(1, len(whole) // 40)):  # inside headers, schema and record batches
        path.write_bytes(whole[:keep])
        with pytest.raises(ValueError, match=rf"{path}: not a readable Arrow shard .*the buffer is damaged"):
            B.open_buffer(a, verify_checksums=False).columns(["tokens"])
    path.unlink()  # the system's errors stay what they are: not the file's content
    with pytest.raises(FileNotFoundError):
        B.read_shard(path)


def test_a_manifest_tokenizer_that_cannot_be_loaded_is_named_as_its_field(tmp_path, capsys):
    """A manifest whose tokenizer.name is a folder transformers cannot read gave transformers' own message
    ("Couldn't instantiate the backend tokenizer ...") naming neither the manifest nor the field."""
    a = _build(tmp_path / "a")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "tokenizer_config.json").write_text("{}")
    _edit_manifest(a, lambda m: m["tokenizer"].update(name=str(tmp_path / "empty")))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "completion": "b", "reward": 1.0}\n')
    for argv in (["show", str(a)], ["append", str(a), "jsonl", str(rows)]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"{a / 'manifest.json'}: field 'tokenizer.name'" in err and "cannot be loaded" in err, err


def test_append_to_a_manifest_with_an_edited_vocabulary_size_names_the_manifest(tmp_path, capsys):
    """A manifest whose tokenizer.vocab_size was lowered by hand: append blamed the input row ("field 'tokens'")
    for the manifest's number. Now the manifest's field is named, and nothing is appended."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "completion": " b", "reward": 1.0}\n')
    a = tmp_path / "a"
    assert main(["build", "jsonl", str(rows), "--tokenizer", "gpt2", "--out", str(a), "--no-progress"]) == 0
    _edit_manifest(a, lambda m: m["tokenizer"].update(vocab_size=10))
    before = _files(a)
    capsys.readouterr()
    assert main(["append", str(a), "jsonl", str(rows), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{a / 'manifest.json'}: field 'tokenizer.vocab_size' is 10, but its tokenizer" in err, err
    assert _files(a) == before


def test_a_json_key_given_twice_is_refused_naming_the_file_and_key(tmp_path, capsys):
    """JSON keeps the last of a key given twice, silently: a manifest with a second "tokenizer" object, a shard
    entry's "sha256" given twice, a results row's "mean_reward" twice and an ``extra`` with "a" twice were all
    read as the last one. Each is now refused naming the file (and row) and the key."""
    from data_cli_runs import rewrite_shard, run, write_jsonl

    from shiq_eval.leaderboard import read_results

    a = _build(tmp_path / "a")
    m = json.loads((a / "manifest.json").read_text())
    text = json.dumps(m)  # (one line: the keys below are found by their text)
    tok = json.dumps(m["tokenizer"])
    first = m["shards"][0]["sha256"]
    cases = {
        "tokenizer": text.replace(f'"tokenizer": {tok}', f'"tokenizer": {{"name": "other"}}, "tokenizer": {tok}'),
        "sha256": text.replace(f'"sha256": "{first}"', f'"sha256": "{"0" * 64}", "sha256": "{first}"'),
    }
    for key, damaged in cases.items():
        assert damaged != text and json.loads(damaged) == m  # what the last-wins reading saw: the manifest itself
        (a / "manifest.json").write_text(damaged)
        code, _, err = run(capsys, "validate", a, "--no-progress")
        assert code == 2 and f"{a / 'manifest.json'}: key {key!r} given twice in one JSON object" in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.json").write_text('[{"mean_reward": 9.0, "mean_reward": 1.0}]')
    with pytest.raises(ValueError, match=rf"{tmp_path / 'r' / 'results.json'}: key 'mean_reward' given twice"):
        read_results([tmp_path / "r"])
    src = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "p", "completion": " c d", "reward": 1.0}])
    assert run(capsys, "build", "jsonl", src, "--tokenizer", "gpt2", "--out", tmp_path / "b", "--no-progress")[0] == 0

    def twice(rows):
        rows[0]["extra"] = '{"a": 1, "a": 2}'

    rewrite_shard(tmp_path / "b", 0, twice)
    shard = tmp_path / "b" / json.loads((tmp_path / "b" / "manifest.json").read_text())["shards"][0]["file"]
    code, _, err = run(capsys, "validate", tmp_path / "b", "--no-progress")
    assert code == 2 and f"{shard}: row 0: field 'extra': key 'a' given twice in one JSON object" in err, err


def test_a_json_file_written_with_nan_or_infinity_is_refused_naming_the_field(tmp_path):
    """``atomic_write_json`` wrote ``NaN`` and ``Infinity``, which standard JSON cannot hold (other readers, and
    this project's own checks of an ``extra`` text, refuse them): it now refuses the value, naming the file and
    the field, and writes nothing."""
    import math
    import re

    from shiq_data.io import atomic_write_json

    for bad, field in (({"rows": [{"loss": 1.0}, {"loss": math.nan}]}, "rows[1].loss"), ([math.inf], "[0]")):
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'r.json'}: field {field!r}: not a finite number")):
            atomic_write_json(tmp_path / "r.json", bad)
        assert list(tmp_path.iterdir()) == []
    atomic_write_json(tmp_path / "r.json", {"a": None, "b": 1e308})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": None, "b": 1e308}


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("shape", ['{{"rows": {}}}', "[1, {}]", '{{"a": [{{"b": {}}}], "c": 1}}'])
def test_json_nan_or_infinity_is_refused_naming_the_file_and_the_constant(tmp_path, capsys, constant, shape):
    """Python's ``json`` reads ``NaN``, ``Infinity`` and ``-Infinity``, which are not JSON: a manifest, a
    meta.json, a results file or a config given by the user holding one was read (a NaN where a number is
    checked passes every comparison unseen), while other readers refuse the file. Each is now refused in one
    line naming the file and the constant, however deep it is nested."""
    import re

    from shiq_data.io import read_json_file
    from shiq_eval.leaderboard import read_results
    from shiq_train.checkpoint import read_meta

    text = shape.format(constant)
    path = tmp_path / "x.json"
    path.write_text(text)
    with pytest.raises(KeyError) as e:
        read_json_file(path, KeyError, hint="; make it again")
    where = f"line 1 column {text.index(constant) + 1}"  # (json's own way of naming a place: 1-based)
    assert e.value.args[0] == f"{path}: not valid JSON ({constant} is not a JSON number: {where}); make it again"
    # its place is the constant's, not a string's that holds the word (an escaped quote in it included)
    path.write_text('{"note": "NaN \\" Infinity",\n "x": [1,\n  ' + constant + "]}")
    with pytest.raises(ValueError, match=re.escape(f"({constant} is not a JSON number: line 3 column 3)")):
        read_json_file(path)
    a = _build(tmp_path / "a")
    (a / "manifest.json").write_text(text)
    assert main(["info", str(a)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{a / 'manifest.json'}: not valid JSON ({constant} is not" in err, err
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.json").write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'r' / 'results.json'}: not valid JSON ({constant} ")):
        read_results([tmp_path / "r"])
    step = tmp_path / "step_0000001"
    step.mkdir()
    (step / "meta.json").write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{step / 'meta.json'}: not valid JSON ({constant} is not a")):
        read_meta(step)
    # a string that holds the word is text, not the constant; a finite number is read as before
    path.write_text('{"a": "NaN", "b": [-1.5e300, 2]}')
    assert read_json_file(path) == {"a": "NaN", "b": [-1.5e300, 2]}


def test_a_checkpoint_layout_that_is_not_whole_numbers_is_refused(tmp_path):
    """A checkpoint's rank files are named from its meta.json layout (rank_tp{T}_pp{P}_dp{D}.pt): a layout
    holding a path ("../x"), a float or a number below 1 is refused naming the file, before any file is named
    from it."""
    import re

    from shiq_train.checkpoint import read_meta

    step = tmp_path / "step_00000002"
    step.mkdir()
    good = {"step": 2, "layout": {"tp": 1, "pp": 2, "dp": 1}, "meta": {}}
    (step / "meta.json").write_text(json.dumps(good))
    assert read_meta(step)["layout"] == {"tp": 1, "pp": 2, "dp": 1}
    for key, value in [("tp", "../x"), ("pp", 1.0), ("dp", 0), ("vpp", "2"), ("tp", None)]:
        (step / "meta.json").write_text(json.dumps({**good, "layout": {**good["layout"], key: value}}))
        with pytest.raises(ValueError, match="^" + re.escape(f"{step / 'meta.json'}: expected an object with an")):
            read_meta(step)


def test_a_checkpoint_meta_is_written_with_null_for_an_undefined_number(tmp_path):
    """A checkpoint's meta.json and a value model's value_model.json (its ``last`` metrics: a diverged loss)
    were written with ``json.dumps``' default, ``NaN``/``Infinity``, which their readers now refuse: an
    undefined number is written as null, so the checkpoint resumes and the value model loads (that one:
    test_qsharp.py)."""
    import math

    from shiq_train import model as M
    from shiq_train import parallel
    from shiq_train.checkpoint import read_meta, save_checkpoint

    cfg = M.ModelConfig(
        num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32, vocab_size=32, max_sequence_length=8
    )
    with parallel.distributed(seed=0):
        step = save_checkpoint(tmp_path, 1, M.build_model(cfg), meta={"config": {"lr": math.nan}, "loss": math.inf})
    text = (step / "meta.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert read_meta(step)["meta"] == {"config": {"lr": None}, "loss": None}
    from shiq_data.io import non_finite_as_null

    assert non_finite_as_null({"a": [1.0, math.nan, (math.inf, -math.inf)], "b": "NaN", "c": 2}) == {
        "a": [1.0, None, [None, None]],
        "b": "NaN",
        "c": 2,
    }


@pytest.mark.parametrize("kind", ["list", "large_list"])
def test_list_views_read_both_offset_widths_as_pyarrow_does(kind):
    """A shard whose list columns are large_list (64-bit offsets, as other Arrow writers may store them) passes
    the column checks, but its offsets were read as 32-bit numbers: every row but the first read wrong (a
    training run then refused it as 'fewer than 2 tokens'). Each row now reads as pyarrow reads it, sliced too."""
    import pyarrow as pa

    from shiq_data.schema import ListView

    rows = [[1, 2, 3], [4], [5, 6], [], [7, 8, 9, 10]]
    arr = pa.array(rows, type=pa.list_(pa.int32()) if kind == "list" else pa.large_list(pa.int32()))
    for view_of in (arr, arr.slice(1, 3)):
        view = ListView(view_of)
        assert [view.get(i).tolist() for i in range(len(view_of))] == view_of.to_pylist()
    flags = pa.array(
        [[True, False], [False, False, True]],
        type=pa.list_(pa.bool_()) if kind == "list" else pa.large_list(pa.bool_()),
    )
    assert [ListView(flags).get(i).tolist() for i in range(2)] == flags.to_pylist()
