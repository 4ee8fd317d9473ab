"""shiq-data show / stats / filter / dedup / split / mix on tiny GPT-2 buffers, each checked against pandas
(or a plain-Python computation) on the input JSONL records."""

import functools
import gzip
import hashlib
import json
import math
import random
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from data_cli_runs import run, write_jsonl
from hypothesis import given, settings
from hypothesis import strategies as st
from test_buffer import check_shards_by_size, stream_size

import shiq_data.buffer as buffer_module
from shiq_data.buffer import append_buffer, open_buffer, read_shard, write_buffer, write_shard_file
from shiq_data.curate.decontaminate import _bit_table as dc_bit_table
from shiq_data.curate.decontaminate import words
from shiq_data.curate.stats import buffer_stats, format_stats
from shiq_data.curate.where import sandbox
from shiq_data.readers import get_format
from shiq_data.tokenizers import load_tokenizer

REWARDS = [1.5, -1.0, 0.0, 0.25, 2.0, -0.5]  # exact in float32
WORDS = (
    "apple river stone cloud maple tiger violin garden copper ocean lantern meadow falcon pepper harbor "
    "cinder marble willow saddle quartz"
).split()
LONG = (
    " The quick brown fox jumps over the lazy dog while the old cat sleeps on the warm windowsill for the "
    "whole long summer afternoon, dreaming of fish."
)


def _records():
    rng = random.Random(0)

    def completion():
        return " " + " ".join(rng.sample(WORDS, 5))

    a = []
    for i, p in enumerate(
        ["What is the capital of France?", "Name a color.", "Tell me a joke.", "Count to three.", "Say hi."]
    ):
        for _ in range(1 + i % 3):
            a.append({"prompt": p, "completion": completion(), "reward": REWARDS[len(a) % 6]})
    a.append(dict(a[0], reward=2.0))  # the same text as row 0
    a.append({"prompt": "what is the  capital of FRANCE?", "completion": a[0]["completion"].upper(), "reward": -1.0})
    a.append({"prompt": "Describe a scene.", "completion": LONG, "reward": 1.0})
    a.append({"prompt": "Describe a scene.", "completion": LONG.replace("warm", "worm"), "reward": 0.5})  # near
    b = []
    for i, p in enumerate(["Translate cat.", "Name a color.", "What is 2+2?", "Give a number.", "Pick one.", "Why?"]):
        for _ in range(1 + i % 3):
            b.append({"prompt": p, "completion": completion(), "reward": REWARDS[(len(b) + 3) % 6]})
    return a, b


def read_rows(folder):
    m = json.loads((Path(folder) / "manifest.json").read_text())
    rows = []
    for s in m["shards"]:
        rows += read_shard(Path(folder) / s["file"]).to_pylist()
    return m, rows


def ids(folder):
    return [r["row_id"] for r in read_rows(folder)[1]]


def norm(s: pd.Series) -> pd.Series:
    return s.str.lower().str.split().str.join(" ")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Buffers ``ab`` (a.jsonl then b.jsonl appended, sources 'a' and 'b', 4-row shards), ``a`` and ``b``,
    and ``df``: the input records in buffer order, with their row ids and (source, prompt) groups."""
    root = tmp_path_factory.mktemp("curate")
    recs_a, recs_b = _records()
    fa, fb = write_jsonl(root / "a.jsonl", recs_a), write_jsonl(root / "b.jsonl", recs_b)
    tok, info = load_tokenizer("gpt2")
    read = get_format("jsonl").read
    common = {"tokenizer_info": info, "command": ["test"], "shard_rows": 4, "progress": False}
    write_buffer(read(fa, tok, source="a"), root / "ab", **common)  # row ids b0-<line index>
    append_buffer(root / "ab", read(fb, tok, source="b"), command=["test"], progress=False)  # b1-<index>
    write_buffer(read(fa, tok, source="a"), root / "a", **common)
    write_buffer(read(fb, tok, source="b"), root / "b", **common)
    da = pd.read_json(fa, lines=True).assign(source="a")
    db = pd.read_json(fb, lines=True).assign(source="b")
    da["row_id"] = [f"b0-{i}" for i in range(len(da))]
    db["row_id"] = [f"b1-{i}" for i in range(len(db))]
    df = pd.concat([da, db], ignore_index=True)
    df["group"] = df["source"] + "|" + df["prompt"]
    return {"root": root, "ab": root / "ab", "a": root / "a", "b": root / "b", "df": df, "tok": tok}


def test_filter_keeps_exactly_the_rows_pandas_keeps(data, tmp_path, capsys):
    df = data["df"]
    cases = [
        ("reward > 0 AND source = 'a'", df[(df.reward > 0) & (df.source == "a")]),
        ("reward <= 0 OR prompt = 'Name a color.'", df[(df.reward <= 0) | (df.prompt == "Name a color.")]),
        ("completion LIKE '%apple%'", df[df.completion.str.contains("apple")]),
        # a trailing comment ended in "syntax error at or near 0": it hid the query's closing parenthesis
        ("reward > 0 -- the positive rows", df[df.reward > 0]),
    ]
    for k, (expr, want) in enumerate(cases):
        out = tmp_path / f"f{k}"
        code, stdout, err = run(capsys, "filter", data["ab"], "--where", expr, "--out", out, "--no-progress")
        assert code == 0, err
        assert f"kept {len(want)} of {len(df)} rows" in stdout
        m, rows = read_rows(out)
        assert [r["row_id"] for r in rows] == want.row_id.tolist()
        # the rows themselves: decoded text and reward match the input records
        tok = data["tok"]
        for r, (_, rec) in zip(rows, want.iterrows()):
            p = r["prompt_len"]
            assert tok.decode(r["tokens"][:p]) == rec.prompt and r["rewards"][-1] == rec.reward
        assert m["parents"][0]["path"] == str(data["ab"].resolve())
        sha = hashlib.sha256((data["ab"] / "manifest.json").read_bytes()).hexdigest()
        assert m["parents"][0]["manifest_sha256"] == sha
        assert m["curation"] == {"verb": "filter", "where": expr, "rows_read": len(df), "rows_kept": len(want)}
        assert m["commands"][-1]["argv"][1:3] == ["filter", str(data["ab"])]


def test_outputs_inside_a_buffer_folder_are_refused(data, tmp_path, capsys):
    """A buffer's folder is its own: a curated buffer, an export, a retokenized copy, a split, a mix, the rows
    decontaminate drops or plots written into it would be neither listed nor checked by it. Each is refused
    before any work, the buffer left as it was."""
    b = data["a"]
    against = write_jsonl(
        tmp_path / "against.jsonl", [{"prompt": "none of the rows here holds a run of these eight words"}]
    )
    before = sorted(p.relative_to(b) for p in b.rglob("*"))
    for argv in [
        ["filter", b, "--where", "reward > 0", "--out", b / "sub"],
        ["dedup", b, "--out", b / "deep" / "d"],
        ["export", b, "--format", "jsonl", "--out", b / "e"],
        ["retokenize", b, "--tokenizer", "gpt2", "--out", b / "r"],
        ["split", b, "--test-fraction", "0.5", "--out", b / "s"],
        ["mix", f"{data['b']}:1", f"{b}:1", "--out", b / "m"],
        ["decontaminate", b, "--against", against, "--out", tmp_path / "dc", "--dropped", b / "dropped.jsonl"],
        ["stats", b, "--plot", b],
        ["stats", b, "--plot", b / "plots"],
    ]:
        code, _, err = run(capsys, *argv)
        option = {"stats": "--plot", "decontaminate": "--dropped"}.get(argv[0], "--out")
        where = "is the buffer" if argv[-1] == b else f"is inside the buffer {b.resolve()}"
        assert code == 2 and f"{option} {argv[-1]} {where}: choose a folder outside it" in err, (argv, err)
    assert sorted(p.relative_to(b) for p in b.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["against.jsonl"]  # nor any output beside it
    # a manifest.json of another kind (a web app's, a model cache's) is no buffer
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "manifest.json").write_text('{"name": "my app", "format": "web"}')
    code, _, err = run(
        capsys, "filter", b, "--where", "reward > 0", "--out", tmp_path / "site" / "sub", "--no-progress"
    )
    assert code == 0, err


def test_filter_on_lengths_matches_token_counts(data, tmp_path, capsys):
    df, tok = data["df"], data["tok"]
    n_completion = df.completion.map(lambda c: len(tok(c)["input_ids"]) + 1)  # + eos
    n_prompt = df.prompt.map(lambda c: len(tok(c)["input_ids"]))
    want = df[(n_completion >= 7) & (n_prompt + n_completion < 12)]
    assert 0 < len(want) < len(df)
    out = tmp_path / "f"
    expr = "completion_tokens >= 7 AND tokens < 12"
    assert run(capsys, "filter", data["ab"], "--where", expr, "--out", out, "--no-progress")[0] == 0
    assert ids(out) == want.row_id.tolist()


BAD_WHERE = [
    ("reward >", "syntax error"),
    ("(select count(*) from read_csv('/etc/passwd')) > 0", "subqueries are not allowed"),
    ("reward > 0; select 1", "syntax error"),
    ("true) UNION SELECT 1 --", "syntax error"),  # (a comment ends at the expression's line: the query's ")" stays)
    ("true) UNION SELECT (1", "single SQL boolean expression"),
    ("true) UNION SELECT 1 /*", "unterminated /* comment"),
    ("nope > 1", 'column "nope" not found'),
    ("reward", "must be a boolean expression"),
    ("count(*) > 1", "aggregate functions"),
    ("exists (select 1 from rows)", "subqueries are not allowed"),
    ("read_text('/etc/passwd') is not null", "table function"),
    ("COLUMNS(*) IS NOT NULL", "COLUMNS(...) are not allowed"),  # one keep column per column: a KeyError
    # rows b0-0 (no value) and b0-1 (two) of the first shard: as many values as rows, kept b0-0 for b0-1's first
    ("unnest(CASE row_id WHEN 'b0-0' THEN []::BOOLEAN[] WHEN 'b0-1' THEN [true, false] ELSE [false] END)", "unnest"),
    ("generate_subscripts([1, 2], 1) = 1", "generate_subscripts gives several values per row"),
    # a clause after the expression: rows grouped or sampled, so the values are no longer one per row
    ("true) AS keep FROM rows GROUP BY ALL --", "syntax error"),  # (the tree check refuses it too: below)
    ("true) AS keep FROM rows TABLESAMPLE 50% --", "syntax error"),
    ("true) AS keep FROM rows TABLESAMPLE 50% UNION ALL SELECT (true", "single SQL boolean expression"),
    ("NOT " * 600 + "true", "nested too deep"),  # (a RecursionError, in a line that did not say --where)
]


@pytest.mark.parametrize(
    "expr",
    [
        "true) UNION SELECT 1 --",
        "true) AS keep FROM rows GROUP BY ALL --",
        "true) AS keep FROM rows TABLESAMPLE 50% --",
    ],
)
def test_a_clause_after_the_expression_is_refused_by_the_tree_check_as_well(monkeypatch, expr):
    """The expression stands on lines of its own in the query, so a trailing ``--`` comment no longer hides the
    query's closing parenthesis (a syntax error: BAD_WHERE). The check of the parsed tree, which refused these
    clauses when it could, stays as a second guard: with the query on one line again, it refuses each."""
    import shiq_data.curate.where as W

    monkeypatch.setattr(W, "_QUERY", "SELECT ({expr}) AS keep FROM " + W.TABLE)
    with pytest.raises(ValueError, match="must be a single SQL boolean expression over the row's columns"):
        W.Where(expr)


@pytest.mark.parametrize("expr,says", BAD_WHERE)
def test_bad_where_is_one_line_exit_2_and_writes_nothing(data, tmp_path, capsys, expr, says):
    out = tmp_path / "never"
    code, stdout, err = run(capsys, "filter", data["ab"], "--where", expr, "--out", out, "--no-progress")
    assert code == 2
    assert err.startswith("shiq-data: error: --where") and says in err and err.count("\n") == 1, err
    assert "Traceback" not in err and not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("verb", ["filter", "stats"])
def test_a_where_that_fails_on_one_shards_values_names_the_shard(data, tmp_path, capsys, verb):
    """An expression that fails on the values of a later shard only (a cast of source b's prompts, the
    buffer's later shards) named --where but not where it failed. It now names the shard's file."""
    expr = "CASE WHEN source = 'a' THEN reward > 0 ELSE CAST(prompt AS INTEGER) > 0 END"
    m = json.loads((data["ab"] / "manifest.json").read_text())
    first_b = next(  # the first shard holding a row of source b, by pyarrow
        s["file"] for s in m["shards"] if "b" in read_shard(data["ab"] / s["file"]).column("source").to_pylist()
    )
    assert first_b != m["shards"][0]["file"]  # a later shard: the expression runs on the first ones
    out = ["--out", tmp_path / "f", "--no-progress"] if verb == "filter" else []
    code, _, err = run(capsys, verb, data["ab"], "--where", expr, *out)
    assert code == 2 and err.count("\n") == 1 and "Conversion Error" in err, err
    assert f"on the rows of {data['ab'] / first_b} (columns:" in err, err
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("verb", ["filter", "stats", "show"])
def test_a_where_naming_an_extra_key_that_fails_on_the_first_shard_names_that_shard(tmp_path, capsys, verb):
    """Reading the kinds of the extra keys (the whole buffer, on the first shard's view) left the shard being
    read set to the last one: stats and show named the last shard for a value that failed in the first."""
    recs = [{"prompt": "p", "completion": "abc" if i < 2 else "12", "reward": 1, "lang": "en"} for i in range(6)]
    src = write_jsonl(tmp_path / "e.jsonl", recs)
    buf = tmp_path / "e"
    assert (
        run(capsys, "build", "jsonl", src, "--tokenizer", "gpt2", "--shard-rows", 2, "--out", buf, "--no-progress")[0]
        == 0
    )
    m = json.loads((buf / "manifest.json").read_text())
    assert len(m["shards"]) == 3
    out = ["--out", tmp_path / "f", "--no-progress"] if verb == "filter" else []
    code, _, err = run(capsys, verb, buf, "--where", "lang = 'en' AND CAST(completion AS INTEGER) > 0", *out)
    assert code == 2 and err.count("\n") == 1 and "Conversion Error" in err, err
    assert f"on the rows of {buf / m['shards'][0]['file']} (columns:" in err, err


@pytest.mark.parametrize("verb", ["stats", "show"])
def test_an_empty_where_is_refused_by_stats_and_show_as_by_filter(data, capsys, verb):
    """--where "" (an unset shell variable) gave the statistics or rows of the whole buffer as if no --where was
    given, while filter and a --where of one space refuse it."""
    for expr in ("", " "):
        code, stdout, err = run(capsys, verb, data["ab"], "--where", expr)
        assert code == 2 and stdout == "" and err.count("\n") == 1, (expr, stdout, err)
        assert err.startswith("shiq-data: error: --where: empty expression"), err


def test_file_access_refused_end_to_end_and_by_the_connection(data, tmp_path):
    exe = Path(sys.executable).with_name("shiq-data")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "shiq_data"]
    expr = "(select count(*) from read_csv('/etc/passwd')) > 0"
    proc = subprocess.run(
        [*cmd, "stats", str(data["ab"]), "--where", expr], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    # the connection itself refuses files, and its configuration cannot be switched back
    con = sandbox()
    with pytest.raises(Exception, match="disabled by configuration"):
        con.sql("SELECT * FROM read_csv('/etc/passwd')").fetchall()
    with pytest.raises(Exception, match="locked"):
        con.execute("SET enable_external_access = true")
    with pytest.raises(Exception, match="disabled by configuration"):
        con.sql(f"COPY (SELECT 1) TO '{tmp_path / 'x.csv'}'").fetchall()
    assert not (tmp_path / "x.csv").exists()


def test_dedup_exact_removes_what_pandas_drop_duplicates_removes(data, tmp_path, capsys):
    df = data["df"].assign(p=lambda d: norm(d.prompt), c=lambda d: norm(d.completion))
    for by, subset in (("row", ["p", "c"]), ("prompt", ["p"]), ("completion", ["c"])):
        keep = df.drop_duplicates(subset=subset)
        removed = df[~df.index.isin(keep.index)].groupby("source").size().to_dict()
        out = tmp_path / by
        code, stdout, err = run(capsys, "dedup", data["ab"], "--by", by, "--out", out, "--no-progress")
        assert code == 0, err
        assert ids(out) == keep.row_id.tolist()
        m = json.loads((out / "manifest.json").read_text())
        assert m["curation"]["removed"] == removed and m["curation"]["mode"] == "exact"
        assert f"kept {len(keep)} of {len(df)} rows" in stdout
        assert ", ".join(f"{k}: {v}" for k, v in sorted(removed.items())) in stdout
    assert len(df) - len(df.drop_duplicates(subset=["p", "c"])) == 2  # the data has what it should


def test_dedup_keeps_rows_whose_prompt_and_completion_only_split_alike(tmp_path, capsys):
    """The key of a row's texts joined its normalised parts with a NUL character, which a text may hold itself:
    prompt 'q a<NUL>' + completion 'b' and prompt 'q a' + completion '<NUL>b' were one key, and the second row,
    no duplicate, was dropped. Each part is now kept apart by its length."""
    records = [
        {"prompt": "Question a\u0000", "completion": " b", "reward": 1.0},
        {"prompt": "Question a", "completion": "\u0000b", "reward": 1.0},
        {"prompt": "question A", "completion": "\u0000b", "reward": 0.5},  # a duplicate of the second row
    ]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    assert run(capsys, "build", "jsonl", src, "--tokenizer", "gpt2", "--out", tmp_path / "b", "--no-progress")[0] == 0
    code, stdout, err = run(capsys, "dedup", tmp_path / "b", "--out", tmp_path / "d", "--no-progress")
    assert code == 0, err
    assert ids(tmp_path / "d") == ["b0-0", "b0-1"], stdout


def _grams(text, n=5):
    t = " ".join(text.lower().split())
    return {t[i : i + n] for i in range(len(t) - n + 1)}


def test_dedup_near_matches_exact_jaccard(data, tmp_path, capsys):
    df = data["df"]
    grams = [_grams(c) for c in df.completion]
    threshold = 0.8
    kept = []
    for i, g in enumerate(grams):  # greedy, in order, exact Jaccard
        if not any(len(g & grams[j]) / len(g | grams[j]) >= threshold for j in kept):
            kept.append(i)
    # the data is far from the threshold either way, so MinHash's estimate cannot flip a verdict
    sims = [len(grams[i] & grams[j]) / len(grams[i] | grams[j]) for i in range(len(df)) for j in range(i)]
    assert all(s >= 0.9 or s <= 0.6 for s in sims)
    want = df.iloc[kept]
    assert len(want) < len(df.drop_duplicates(subset=["completion"]))  # near finds more than exact
    out = tmp_path / "near"
    args = ["dedup", data["ab"], "--by", "completion", "--near", "--threshold", threshold, "--out", out]
    code, stdout, err = run(capsys, *args, "--no-progress")
    assert code == 0, err
    assert ids(out) == want.row_id.tolist()
    m = json.loads((out / "manifest.json").read_text())
    assert m["curation"]["threshold"] == threshold and m["curation"]["mode"] == "near"
    assert m["curation"]["removed"] == df.drop(want.index).groupby("source").size().to_dict()
    assert "threshold 0.8" in stdout
    # threshold 1 (in the documented range; datasketch has no bands for it): the rows whose n-gram sets equal
    # an earlier kept row's are removed (a pair at Jaccard 0.9 agrees on all 128 values with odds 0.9**128)
    kept = []
    for i, g in enumerate(grams):
        if not any(g == grams[j] for j in kept):
            kept.append(i)
    args[args.index("--threshold") + 1], args[-1] = 1, tmp_path / "near1"
    code, _, err = run(capsys, *args)  # with its progress: the minhashing pass had none, only the writing
    assert code == 0, err
    assert ids(tmp_path / "near1") == df.iloc[kept].row_id.tolist()
    assert "minhashing: 100%" in err and f"{len(df)}/{len(df)}" in err, err
    # --threshold without --near was ignored silently (exact deduplication has no threshold): refused
    args = ["dedup", data["ab"], "--threshold", 0.5, "--out", tmp_path / "exact", "--no-progress"]
    code, _, err = run(capsys, *args)
    assert code == 2 and "--threshold 0.5 applies to near duplicates: add --near" in err
    assert not (tmp_path / "exact").exists()


def test_split_has_no_shared_group_or_prompt_and_sizes_add_up(data, tmp_path, capsys):
    df = data["df"].set_index("row_id")
    n = len(df)
    for by, unit in (("group", df.group), ("prompt", norm(df.prompt))):
        out = tmp_path / by
        code, stdout, err = run(
            capsys, "split", data["ab"], "--test-fraction", 0.3, "--by", by, "--seed", 3, "--out", out, "--no-progress"
        )
        assert code == 0, err
        train, test = ids(out / "train"), ids(out / "test")
        assert sorted(train + test) == sorted(df.index) and not set(train) & set(test)
        assert not set(unit[train]) & set(unit[test])
        biggest = unit.value_counts().max()
        assert round(0.3 * n) <= len(test) < round(0.3 * n) + biggest
        units = unit[test].nunique()  # counted by pandas; one of a kind is said in the singular
        assert f"{out}/test {len(test)} rows ({units} {by}{'s' * (units != 1)})" in stdout
        for side in ("train", "test"):
            m = json.loads((out / side / "manifest.json").read_text())
            assert m["curation"]["side"] == side and m["parents"][0]["path"] == str(data["ab"].resolve())
            # input order is kept within a side
            assert ids(out / side) == [i for i in df.index if i in set(ids(out / side))]
    # deterministic for a seed; another seed gives another split
    again, other = tmp_path / "again", tmp_path / "other"
    for out, seed in ((again, 3), (other, 4)):
        assert (
            run(capsys, "split", data["ab"], "--test-fraction", 0.3, "--seed", seed, "--out", out, "--no-progress")[0]
            == 0
        )
    assert ids(again / "test") == ids(tmp_path / "group" / "test")
    assert ids(other / "test") != ids(again / "test")


def test_split_refuses_bad_fraction_and_existing_out(data, tmp_path, capsys):
    code, _, err = run(capsys, "split", data["ab"], "--test-fraction", 1.5, "--out", tmp_path / "s")
    assert code == 2 and "--test-fraction" in err and err.count("\n") == 1
    (tmp_path / "s").mkdir()
    code, _, err = run(capsys, "split", data["ab"], "--test-fraction", 0.5, "--out", tmp_path / "s")
    assert code == 2 and "already exists" in err


def _groups_by_input(df):
    """original row id -> the row ids of its (source, prompt) group."""
    members = df.groupby("group").row_id.apply(frozenset)
    return {rid: members[g] for rid, g in zip(df.row_id, df.group)}


def _check_mix(out, df_by_input):
    """Every output group is one whole input group (one copy); returns rows per input."""
    m, rows = read_rows(out)
    by_group: dict = {}
    for r in rows:
        i, _, old = r["row_id"].partition("-")  # m<i>-<id>, or m<i>c<k>-<id> for the k-th repeat
        by_group.setdefault(r["group_id"], []).append((int(i[1:].partition("c")[0]), old))
    per_input = [0] * len(df_by_input)
    for gid, members in by_group.items():
        assert len({i for i, _ in members}) == 1, f"group {gid} mixes inputs"
        i = members[0][0]
        whole = _groups_by_input(df_by_input[i])
        assert frozenset(o for _, o in members) == whole[members[0][1]], f"group {gid} is not a whole input group"
        assert len(members) == len(whole[members[0][1]])
        per_input[i] += len(members)
    assert m["next_group_id"] == max(by_group) + 1 and sorted(by_group) == list(range(len(by_group)))
    return m, per_input


def test_mix_takes_whole_groups_by_weight(data, tmp_path, capsys):
    df = data["df"]
    da = df[df.source == "a"].assign(row_id=lambda d: [f"b0-{k}" for k in range(len(d))])
    db = df[df.source == "b"].assign(row_id=lambda d: [f"b0-{k}" for k in range(len(d))])
    biggest = [d.groupby("group").size().max() for d in (da, db)]
    out = tmp_path / "mix"
    code, stdout, err = run(
        capsys, "mix", f"{data['a']}:1", f"{data['b']}:3", "--rows", 12, "--out", out, "--no-progress"
    )
    assert code == 0, err
    m, per_input = _check_mix(out, [da, db])
    for got, target, big in zip(per_input, (3, 9), biggest):
        assert target <= got < target + big
    assert [p["path"] for p in m["parents"]] == [str(data["a"].resolve()), str(data["b"].resolve())]
    assert m["curation"]["rows_per_input"] == per_input and f"{sum(per_input)} rows" in stdout
    # without --rows: as large as the inputs allow without replacement (b is used up)
    for name, weight in (("all", 1), ("huge_weights", 1e308)):  # weights are relative: 1e308 each is 1:1 too
        out = tmp_path / name
        code, _, err = run(
            capsys, "mix", f"{data['a']}:{weight}", f"{data['b']}:{weight}", "--out", out, "--no-progress"
        )
        assert code == 0, err
        _, per_input = _check_mix(out, [da, db])
        assert per_input[1] == len(db) and len(db) <= per_input[0] < len(db) + biggest[0]
    # more rows than an input has: refused without replacement, copies with it
    code, _, err = run(capsys, "mix", f"{data['a']}:1", f"{data['b']}:1", "--rows", 40, "--out", tmp_path / "x")
    assert code == 2 and "--replacement" in err and not (tmp_path / "x").exists()
    # a --rows that rounds every share to no row: it said 'no rows to write', as if the inputs were empty
    code, _, err = run(capsys, "mix", f"{data['a']}:1", f"{data['b']}:1", "--rows", 1, "--out", tmp_path / "x")
    assert code == 2 and "--rows 1 over weights 1, 1 gives every input" in err and "raise --rows" in err, err
    assert not (tmp_path / "x").exists()
    out = tmp_path / "rep"
    args = ["mix", f"{data['a']}:1", f"{data['b']}:1", "--rows", 40, "--replacement", "--seed", 1, "--out", out]
    assert run(capsys, *args, "--no-progress")[0] == 0
    _, per_input = _check_mix(out, [da, db])
    assert all(20 <= got < 20 + big for got, big in zip(per_input, biggest))
    assert any(re.match(r"m[01]c1-", r) for r in ids(out))
    # a mix of that mix, with replacement again: a copy's id named like an earlier copy's (m0-X-copy1, the copy
    # of m0-X, and the row m0-X-copy1 itself) made the output refuse itself, blaming the input
    again = tmp_path / "rep2"
    remix = ["mix", f"{out}:1", "--rows", 200, "--replacement", "--seed", 3, "--out", again, "--no-progress"]
    assert run(capsys, *remix)[0] == 0
    twice = ids(again)
    assert len(set(twice)) == len(twice) and any(re.match(r"m0c\d+-m[01]c1-", r) for r in twice)
    # with replacement nothing bounds --rows but the disk: a mix that cannot fit is refused before drawing
    # (a mistyped 10**20 drew groups one at a time for hours), nothing left beside --out
    before = sorted(tmp_path.iterdir())
    code, _, err = run(capsys, *args[:4], 10**20, *args[5:-1], tmp_path / "huge")
    assert code == 2 and "a mix of 100000000000000000000 rows would need about" in err and "GiB free" in err
    assert sorted(tmp_path.iterdir()) == before


def test_mix_of_many_inputs_lists_them_a_line_each(data, tmp_path, capsys):
    """Its summary named every input in one line (fifty inputs: one line of thousands of characters): up to four
    stay in the line, more are listed one a line under it, each with the rows and groups the manifest records."""
    specs = [f"{data['a']}:1", f"{data['b']}:2", f"{data['a']}:3", f"{data['b']}:4", f"{data['a']}:5"]
    code, stdout, err = run(
        capsys, "mix", *specs, "--rows", 30, "--replacement", "--out", tmp_path / "m", "--no-progress"
    )
    assert code == 0, err
    c = json.loads((tmp_path / "m" / "manifest.json").read_text())["curation"]
    lines = stdout.splitlines()
    assert lines[0] == f"shiq-data: mixed into {tmp_path / 'm'}: {sum(c['rows_per_input'])} rows from 5 inputs:"
    expected = [
        f"  {spec.rsplit(':', 1)[0]} x{spec.rsplit(':', 1)[1]}: {r} row{'' if r == 1 else 's'} ({g} group{'' if g == 1 else 's'})"
        for spec, r, g in zip(specs, c["rows_per_input"], c["groups_per_input"])
    ]
    assert lines[1:6] == expected
    code, stdout, err = run(
        capsys, "mix", *specs[:4], "--rows", 30, "--replacement", "--out", tmp_path / "m4", "--no-progress"
    )
    assert code == 0 and stdout.count("\n") == 1 and " x4: " in stdout  # four: one line, as before


def test_mix_without_rows_is_as_large_as_the_exact_weights_allow(tmp_path, capsys):
    """Without --rows the mix holds min_i(rows_i * sum(w) / w_i) rows, in exact arithmetic: in floats 39 rows at
    weights 3:2 gave 39 / 0.6 = 64.99999999999999, a mix of 64 rows (38 + 26) where 65 (39 + 26) fit."""
    from fractions import Fraction

    records = [{"prompt": f"Prompt {k}.", "completion": " ok", "reward": 0.0} for k in range(39)]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    buf = tmp_path / "b"
    assert run(capsys, "build", "jsonl", src, "--tokenizer", "gpt2", "--out", buf, "--no-progress")[0] == 0
    for weights in [(3, 2), (0.3, 0.2), (1, 1, 1)]:
        out = tmp_path / "mix" / "-".join(map(str, weights))
        code, _, err = run(capsys, "mix", *(f"{buf}:{w}" for w in weights), "--out", out, "--no-progress")
        assert code == 0, err
        total_weight = sum(Fraction(str(w)) for w in weights)
        want_total = min(int(39 * total_weight / Fraction(str(w))) for w in weights)
        want = [round(want_total * Fraction(str(w)) / total_weight) for w in weights]  # (groups of one row each)
        m, rows = read_rows(out)
        assert m["curation"]["rows_per_input"] == want and len(rows) == sum(want) == want_total, (weights, want)


def test_mix_reads_decimal_weights_as_the_decimals_given(tmp_path, capsys):
    """Weights are the decimals given: 0.1:0.3 is 1:3. Taken at their binary float values (0.1 a little above
    1/10, 0.3 a little below 3/10) 10 and 30 rows made a mix of 39 rows (10 + 29) where all 40 fit."""
    bufs = []
    for name, n in (("a", 10), ("b", 30)):
        records = [{"prompt": f"Prompt {name} {k}.", "completion": " ok", "reward": 0.0} for k in range(n)]
        src = write_jsonl(tmp_path / f"{name}.jsonl", records)
        bufs.append(tmp_path / name)
        assert run(capsys, "build", "jsonl", src, "--tokenizer", "gpt2", "--out", bufs[-1], "--no-progress")[0] == 0
    out = tmp_path / "mix"
    code, _, err = run(capsys, "mix", f"{bufs[0]}:0.1", f"{bufs[1]}:0.3", "--out", out, "--no-progress")
    assert code == 0, err
    m, rows = read_rows(out)
    assert m["curation"]["rows_per_input"] == [10, 30] and len(rows) == 40


def test_mix_warns_of_rows_that_several_inputs_share(data, tmp_path, capsys):
    """Inputs that share rows (a buffer and a filtered copy of it, a buffer given twice) gave a mix holding
    them twice, silently. The count of prompt-completion pairs found in more than one input is warned of and
    kept in the manifest; inputs with no row in common are not warned of."""
    df = data["df"]
    da, db = df[df.source == "a"], df[df.source == "b"]
    pairs = lambda d: set(zip(d.prompt, d.completion))  # noqa: E731  (the same text, the same tokens)
    cases = [
        ("twice", [f"{data['a']}:1", f"{data['a']}:1"], len(pairs(da))),  # every row of a, from both inputs
        ("apart", [f"{data['a']}:1", f"{data['b']}:1"], len(pairs(da) & pairs(db))),
    ]
    for name, inputs, want in cases:
        code, _, err = run(capsys, "mix", *inputs, "--out", tmp_path / name, "--no-progress")
        assert code == 0, err
        assert read_rows(tmp_path / name)[0]["curation"]["pairs_in_several_inputs"] == want
        if want:
            assert f"warning: {want} prompt-completion pairs came from more than one input" in err, err
        else:
            assert "warning" not in err, err
    assert len(pairs(da)) > 1  # (the first case warns)


def test_mix_refuses_another_tokenizer(data, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(data["b"], other)
    m = json.loads((other / "manifest.json").read_text())
    m["tokenizer"]["fingerprint"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(m))
    code, _, err = run(capsys, "mix", f"{data['a']}:1", f"{other}:1", "--out", tmp_path / "x")
    assert code == 2 and "tokenizer" in err and err.count("\n") == 1 and not (tmp_path / "x").exists()
    code, _, err = run(capsys, "mix", f"{data['a']}", "--out", tmp_path / "x")
    assert code == 2 and "BUFFER:WEIGHT" in err


def _mix_is_refused(capsys, tmp_path, first, second, words):
    """``mix first:1 second:1`` (and the other order) exits 2 with one line naming both inputs; nothing written."""
    before = sorted(p.name for p in tmp_path.iterdir())
    for x, y in ((first, second), (second, first)):
        code, out, err = run(capsys, "mix", f"{x}:1", f"{y}:1", "--out", tmp_path / "x", "--no-progress")
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert "manifest.json" in err and str(x) in err and str(y) in err and words in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_mix_refuses_inputs_with_and_without_text_columns(data, tmp_path, capsys):
    fb = data["root"] / "b.jsonl"
    tok, info = load_tokenizer("gpt2")
    plain = tmp_path / "plain"
    read = get_format("jsonl").read(fb, tok, source="b")
    write_buffer(read, plain, tokenizer_info=info, command=["t"], progress=False, text_columns=False)
    assert json.loads((plain / "manifest.json").read_text())["text_columns"] is False
    assert json.loads((data["a"] / "manifest.json").read_text())["text_columns"] is True
    _mix_is_refused(capsys, tmp_path, data["a"], plain, "text columns")


def test_mix_refuses_inputs_of_another_system_prompt(data, tmp_path, capsys):
    other = tmp_path / "off"
    shutil.copytree(data["b"], other)
    m = json.loads((other / "manifest.json").read_text())
    assert m["tokenizer"]["system_prompt"]["setting"] == "template"
    m["tokenizer"]["system_prompt"] = {"setting": "off", "text": ""}
    (other / "manifest.json").write_text(json.dumps(m))
    _mix_is_refused(capsys, tmp_path, data["a"], other, "--system-prompt off")


def test_mix_names_long_system_prompts_with_their_quotes(data, tmp_path, capsys):
    """Two long system prompt texts are shown by their first 60 characters inside quotes and ``…`` (the repr
    was cut at 60 characters, its closing quote lost: ``(text 'You are ... Hug)``)."""
    inputs = []
    for name, letter in (("long-a", "a"), ("long-b", "b")):
        inputs.append(tmp_path / name)
        shutil.copytree(data["b"], inputs[-1])
        m = json.loads((inputs[-1] / "manifest.json").read_text())
        m["tokenizer"]["system_prompt"] = {"setting": "TEXT", "text": letter * 80}
        (inputs[-1] / "manifest.json").write_text(json.dumps(m))
    _mix_is_refused(capsys, tmp_path, *inputs, "--system-prompt TEXT")
    _, _, err = run(capsys, "mix", f"{inputs[0]}:1", f"{inputs[1]}:1", "--out", tmp_path / "x", "--no-progress")
    assert f"(text {'b' * 60!r}…)" in err and f"(text {'a' * 60!r}…)" in err, err


def test_stats_match_pandas(data, tmp_path, capsys):
    df, tok = data["df"], data["tok"]
    df = df.assign(
        tokens=[len(tok(p)["input_ids"]) + len(tok(c)["input_ids"]) + 1 for p, c in zip(df.prompt, df.completion)]
    )
    stats, _ = buffer_stats(data["ab"])
    assert stats["rows"] == len(df)
    for name, part in [("all", df), *df.groupby("source")]:
        s = stats["all"] if name == "all" else stats["sources"][name]
        assert s["rows"] == len(part) and s["groups"] == part.group.nunique()
        for key, fn in (("mean", "mean"), ("std", "std"), ("min", "min"), ("max", "max")):
            assert s["reward"][key] == pytest.approx(getattr(part.reward, fn)(), abs=1e-12)
            assert s["tokens"][key] == pytest.approx(getattr(part.tokens, fn)(), abs=1e-12)
        assert s["tokens"]["p95"] == pytest.approx(part.tokens.quantile(0.95))
        assert s["ref_share"] == 0
    assert stats["group_sizes"] == df.groupby("group").size().value_counts().sort_index().to_dict()
    where, _ = buffer_stats(data["ab"], "source = 'b' AND reward > 0")
    assert where["rows"] == len(df[(df.source == "b") & (df.reward > 0)])
    code, stdout, err = run(capsys, "stats", data["ab"], "--plot", tmp_path / "plots")
    assert code == 0, err
    assert f"({len(df)} rows)" in stdout and "group sizes" in stdout
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["completion_tokens.png", "group_sizes.png", "reward.png", "tokens.png"]
    assert all((tmp_path / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    # no row matches: no empty histograms (and none of matplotlib's warnings about them)
    code, stdout, err = run(capsys, "stats", data["ab"], "--where", "reward > 1e9", "--plot", tmp_path / "none")
    assert code == 0 and err == "" and "no rows, where reward > 1e9: no histograms written" in stdout
    assert not (tmp_path / "none").exists()


def test_stats_names_a_plot_folder_that_cannot_be_written(data, tmp_path, capsys, monkeypatch):
    """A --plot folder the system will not make (no permission, a read-only file system) ended in the bare OS
    error, "[Errno 13] Permission denied: '...'", naming no option."""
    import shiq_data.curate.stats as S

    real = S.files_together

    def locked(folder, *args, **kwargs):
        if Path(folder) == tmp_path / "locked":
            raise PermissionError(13, "Permission denied", str(folder))
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(S, "files_together", locked)
    code, _, err = run(capsys, "stats", data["ab"], "--plot", tmp_path / "locked")
    assert (
        code == 2
        and err == f"shiq-data: error: --plot {tmp_path / 'locked'}: cannot write the histograms (Permission denied)\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_show_marks_actions_and_rewards(data, capsys):
    df = data["df"]
    rec = df.iloc[0]
    code, stdout, err = run(capsys, "show", data["ab"], "--id", "b0-0")
    assert code == 0, err
    assert f"{rec.prompt}⟦{rec.completion}<|endoftext|>⟨r={rec.reward:+.4g}⟩⟧" in stdout
    assert "row b0-0  source a" in stdout
    code, stdout, _ = run(capsys, "show", data["ab"], "--rows", 2, "--where", "reward < 0")
    assert code == 0 and stdout.count("\nrow ") + stdout.startswith("row ") == 2
    negative = df[df.reward < 0].iloc[:2]
    for _, r in negative.iterrows():
        assert f"row {r.row_id} " in stdout
    code, stdout, _ = run(capsys, "show", data["ab"], "--where", "reward > 100")
    assert code == 0 and stdout.startswith("shiq-data: no row of") and "row b" not in stdout
    code, _, err = run(capsys, "show", data["ab"], "--id", "nope")
    assert code == 2 and "no row with row_id 'nope'" in err


def test_text_columns_are_used_when_a_shard_has_them(data, tmp_path, capsys):
    """A buffer whose shards carry schema-2 text columns that differ from its tokens (written here by hand):
    reward, prompt and the keys of extra come from them."""
    buf = tmp_path / "text"
    shutil.copytree(data["b"], buf)
    m = json.loads((buf / "manifest.json").read_text())
    df = data["df"][data["df"].source == "b"].reset_index(drop=True)
    offset = 0
    for entry in m["shards"]:
        t = read_shard(buf / entry["file"])
        part = df.iloc[offset : offset + t.num_rows]
        offset += t.num_rows
        cols = {
            "prompt": pa.array([f"P{k}" for k in part.index], pa.large_string()),
            "completion": pa.array(part.completion.tolist(), pa.large_string()),
            "reward": pa.array((-part.reward).tolist(), pa.float64()),  # the opposite of the token rewards
            "turn_rewards": pa.nulls(len(part), pa.list_(pa.float64())),
            "extra": pa.array([json.dumps({"lang": "fr" if k % 2 else "en", "score": k}) for k in part.index]),
        }
        t = t.drop_columns([c for c in cols if c in t.column_names])  # the writer's own text columns, replaced
        for name, col in cols.items():
            t = t.append_column(name, col)
        tmp = buf / f".{entry['file']}.new"
        new = write_shard_file(t, tmp)
        tmp.replace(buf / entry["file"])
        entry.update(sha256=new["sha256"], bytes=new["bytes"])
    (buf / "manifest.json").write_text(json.dumps(m))
    cases = [
        ("reward > 0", df[df.reward < 0]),
        ("lang = 'fr' AND score >= 4", df[(df.index % 2 == 1) & (df.index >= 4)]),
        ("prompt = 'P3'", df.iloc[[3]]),
    ]
    for k, (expr, want) in enumerate(cases):
        out = tmp_path / f"f{k}"
        code, _, err = run(capsys, "filter", buf, "--where", expr, "--out", out, "--no-progress")
        assert code == 0, err
        assert ids(out) == [f"b0-{i}" for i in want.index]
    stats, _ = buffer_stats(buf)
    assert stats["all"]["reward"]["mean"] == pytest.approx(-df.reward.mean())
    # dedup compares the stored prompts (all different), not the decoded tokens (which repeat)
    assert df.prompt.duplicated().any()
    assert run(capsys, "dedup", buf, "--by", "prompt", "--out", tmp_path / "d", "--no-progress")[0] == 0
    assert ids(tmp_path / "d") == [f"b0-{i}" for i in df.index]


def test_reference_statistics_are_kept(data, tmp_path, capsys):
    src = open_buffer(data["b"])
    rng = np.random.default_rng(0)
    rows = []
    for r in src.table.to_pylist():
        n = len(r["tokens"])
        c, z = rng.normal(size=n).astype(np.float32), rng.normal(size=n).astype(np.float32)
        c[0] = z[0] = 0
        rows.append({**r, "ref_chosen_logits": c.tolist(), "ref_logz": z.tolist()})
    ref = tmp_path / "ref"
    write_buffer(rows, ref, tokenizer_info=src.tokenizer_info, command=["t"], ref_model={"name": "toy"}, progress=False)
    by_id = {r["row_id"]: r for r in rows}
    out = tmp_path / "f"
    assert run(capsys, "filter", ref, "--where", "reward > 0 AND has_ref", "--out", out, "--no-progress")[0] == 0
    m, kept = read_rows(out)
    assert m["has_ref_stats"] and m["ref_model"] == {"name": "toy"} and kept
    df = data["df"]
    assert len(kept) == len(df[(df.source == "b") & (df.reward > 0)])
    for r in kept:
        assert r["ref_chosen_logits"] == by_id[r["row_id"]]["ref_chosen_logits"]
        assert r["ref_logz"] == by_id[r["row_id"]]["ref_logz"]
    stats, _ = buffer_stats(ref)
    assert stats["all"]["ref_share"] == 1.0
    # split keeps them; a mix with a buffer without them drops them and says so
    assert run(capsys, "split", ref, "--test-fraction", 0.5, "--out", tmp_path / "s", "--no-progress")[0] == 0
    assert open_buffer(tmp_path / "s" / "test").has_ref_stats
    code, stdout, _ = run(capsys, "mix", f"{ref}:1", f"{data['a']}:1", "--out", tmp_path / "m", "--no-progress")
    assert code == 0 and "reference statistics dropped" in stdout
    assert not open_buffer(tmp_path / "m").has_ref_stats


def test_option_values_out_of_range_are_refused_by_name(data, tmp_path, capsys):
    """A negative seed reached numpy as "expected non-negative integer"; --shard-rows 0 was taken as the default."""
    for argv, needle in [
        (["split", data["a"], "--test-fraction", 0.3, "--seed", -1], "argument --seed: must be >= 0, got -1"),
        (["mix", f"{data['a']}:1", "--seed", "x"], "argument --seed: expected an integer, got 'x'"),
        (["mix", f"{data['a']}:1", "--seed", 2**32], f"argument --seed: must be in 0..{2**32 - 1}, got {2**32}"),
        (
            ["retokenize", data["a"], "--tokenizer", "gpt2", "--shard-rows", 0],
            f"argument --shard-rows: must be in 1..{2**63 - 1}, got 0",
        ),
        (
            ["build", "jsonl", "in.jsonl", "--tokenizer", "gpt2", "--shard-rows", -3],
            f"argument --shard-rows: must be in 1..{2**63 - 1}, got -3",
        ),
    ]:
        with pytest.raises(SystemExit) as e:
            run(capsys, *argv, "--out", tmp_path / "x")
        assert e.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    for rows in (0, -1):  # show printed one row for either
        with pytest.raises(SystemExit) as e:
            run(capsys, "show", data["a"], "--rows", rows)
        assert e.value.code == 2 and f"argument --rows: must be >= 1, got {rows}" in capsys.readouterr().err


def test_extra_integers_beyond_int64_are_numbers_to_where(tmp_path, capsys):
    """An ``extra`` integer beyond int64 ("score": 10**30) built fine, then every --where on the buffer ended in
    "OverflowError: Python int too large to convert to C long": such a key is now a float column (and one
    beyond the float range, text)."""
    rows = [{"prompt": "p", "completion": f" c{i}", "reward": 1.0, "score": s} for i, s in enumerate([10**30, 2, 0])]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert run(capsys, "build", "jsonl", src, "--tokenizer", "gpt2", "--out", tmp_path / "b", "--no-progress")[0] == 0
    code, _, err = run(
        capsys, "filter", tmp_path / "b", "--where", "score > 1", "--out", tmp_path / "f", "--no-progress"
    )
    assert code == 0, err
    assert len(open_buffer(tmp_path / "f")) == 2
    stats, _ = buffer_stats(tmp_path / "b", "score > 1e29")
    assert stats["all"]["rows"] == 1


def test_extra_keys_that_differ_only_in_case_are_not_where_columns(tmp_path, capsys, caplog):
    """SQL names are case-insensitive: with extra keys "Lang" and "lang" in one buffer, DuckDB read every
    reference to either as the first, so --where "lang = 'fr'" matched no row while three have lang "fr". Both
    keys are now left out with a warning naming them, and a --where naming one is refused (unknown column);
    the other keys and columns still work."""
    rows = [
        {"prompt": "p", "completion": f" c{i}", "reward": 1.0, **({"Lang": "EN"} if i % 2 else {"lang": "fr"}), "n": i}
        for i in range(6)
    ]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert run(capsys, "build", "jsonl", src, "--tokenizer", "gpt2", "--out", tmp_path / "b", "--no-progress")[0] == 0
    with caplog.at_level("WARNING"):
        code, _, err = run(
            capsys, "filter", tmp_path / "b", "--where", "lang = 'fr'", "--out", tmp_path / "f", "--no-progress"
        )
    assert code == 2 and "lang" in err and not (tmp_path / "f").exists()
    assert f"shiq-data: warning: {tmp_path / 'b'}: extra keys 'Lang', 'lang' differ only in case" in caplog.text + err
    stats, _ = buffer_stats(tmp_path / "b", "n >= 3")  # pandas on the input: rows 3, 4 and 5
    assert stats["all"]["rows"] == sum(r["n"] >= 3 for r in rows) == 3


def test_extra_keys_named_like_columns_are_warned_of_and_reachable(tmp_path, capsys, caplog):
    """An input field named like a column of every row ("tokens", "has_ref") was hidden from --where without a
    word: "tokens > 100" read the row's token count. Warned of now, with how to reach the field."""
    rows = [
        {"prompt": "p", "completion": f" c{i}", "reward": 1.0, "tokens": 999 * (i == 2), "has_ref": True}
        for i in range(4)
    ]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert run(capsys, "build", "jsonl", src, "--tokenizer", "gpt2", "--out", tmp_path / "b", "--no-progress")[0] == 0
    with caplog.at_level("WARNING"):
        stats, _ = buffer_stats(tmp_path / "b", "tokens > 100 OR has_ref")
    assert stats["all"]["rows"] == 0  # the columns: every row has a few tokens, none reference statistics
    said = caplog.text + capsys.readouterr().err  # (prefixed as the other warnings of shiq-data)
    assert f"shiq-data: warning: {tmp_path / 'b'}: extra keys 'has_ref', 'tokens' are named like columns" in said
    stats, _ = buffer_stats(tmp_path / "b", "json_extract_string(extra, '$.tokens') = '999'")
    assert stats["all"]["rows"] == sum(r["tokens"] == 999 for r in rows) == 1


def _damage_first_shard(src, dst, change, shard: int = 0):
    """A copy of the buffer ``src`` whose first shard (or shard ``shard``) is rewritten by ``change(table)`` with
    its checksum and size updated in the manifest: damage the checksums cannot see."""
    import hashlib
    import shutil

    import pyarrow as pa

    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    entry = manifest["shards"][shard]
    path = dst / entry["file"]
    table = change(pa.ipc.open_stream(pa.py_buffer(path.read_bytes())).read_all())
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    entry["bytes"], entry["sha256"] = path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _set_first_token(t, value: int):
    import pyarrow as pa

    tokens = t.column("tokens").to_pylist()
    tokens[0][0] = value
    return t.set_column(t.schema.names.index("tokens"), "tokens", pa.array(tokens, t.schema.field("tokens").type))


def _set_list(t, name: str, row: int, change):
    import pyarrow as pa

    values = t.column(name).to_pylist()
    values[row] = change(values[row])
    return t.set_column(t.schema.names.index(name), name, pa.array(values, t.schema.field(name).type))


def _set_scalar(t, name: str, row: int, value):
    import pyarrow as pa

    values = t.column(name).to_pylist()
    values[row] = value
    field = t.schema.field(name).with_nullable(True)  # (a null, as another writer could store it)
    return t.set_column(t.schema.names.index(name), field, pa.array(values, field.type))


def test_curation_refuses_a_shard_that_does_not_match_its_manifest(tmp_path, capsys):
    """A shard rewritten with its checksum: a column missing or of another type ended in a traceback (stats,
    show, filter) or an unnamed Arrow error; per-token lists of the wrong length or a prompt longer than the
    row were written into new buffers that validate then refused. Each is now one line naming the shard or the
    row and field, and nothing is written. Export published such rows (in every format): it now checks each row
    as validate does."""
    import pyarrow as pa

    rows = [{"prompt": f"p{i}", "completion": f" c{i} d", "reward": float(i)} for i in range(4)]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert run(capsys, "build", "jsonl", src, "--tokenizer", "gpt2", "--out", tmp_path / "b", "--no-progress")[0] == 0

    def short_mask(t):
        mask = t.column("action_mask").to_pylist()
        mask[0] = mask[0][:-1]
        return t.set_column(t.schema.names.index("action_mask"), "action_mask", pa.array(mask, pa.list_(pa.bool_())))

    def long_prompt(t):
        n = t.column("prompt_len").to_pylist()
        n[1] = 999
        return t.set_column(
            t.schema.names.index("prompt_len"), "prompt_len", pa.array(n, t.schema.field("prompt_len").type)
        )

    cases = [
        ("nocol", lambda t: t.drop_columns(["rewards"]), "column 'rewards' is missing, the buffer's schema says"),
        (
            "rtype",
            lambda t: t.set_column(t.schema.names.index("reward"), "reward", pa.array(["x"] * 4)),
            "column 'reward' is string",
        ),
        ("mask", short_mask, "field 'action_mask': length 5 differs from tokens' length 6"),
        ("plen", long_prompt, "field 'prompt_len': 999 is outside [1, 6) (at least one prompt token and one"),
        ("vocab", lambda t: _set_first_token(t, 10**6), "field 'tokens': token id 1000000"),
        (
            "noact",
            lambda t: _set_list(t, "action_mask", 2, lambda m: [False] * len(m)),
            "field 'action_mask': no action",
        ),
        ("nan", lambda t: _set_list(t, "rewards", 2, lambda r: r[:-1] + [math.nan]), "field 'rewards': non-finite"),
        (
            "inside",
            lambda t: _set_list(t, "action_mask", 2, lambda m: [False, True] + m[2:]),
            "action token at position 1, inside the prompt",
        ),
        (
            "offact",
            lambda t: _set_list(t, "rewards", 2, lambda r: [0.0, 1.0] + r[2:]),
            "nonzero reward 1.0 at position 1, which is not an action",
        ),
        ("group", lambda t: _set_scalar(t, "group_id", 2, -5), "field 'group_id': must be >= 0, got -5"),
        ("nullid", lambda t: _set_scalar(t, "row_id", 2, None), "field 'row_id': must be a string, got null"),
    ]
    for name, change, needle in cases:
        buf = _damage_first_shard(tmp_path / "b", tmp_path / name, change)
        # export checks every row as validate does; the curation verbs check every stored column, so a buffer
        # they write is one validate takes (a row without an action, a NaN reward, a negative group, an action in
        # the prompt went through filter, dedup, split and mix, and mix wrote a null row id as the text 'None')
        verbs = [["export", buf, "--format", fmt] for fmt in ("jsonl", "parquet", "hf")]
        verbs += [["filter", buf, "--where", "reward >= 0"], ["dedup", buf], ["split", buf, "--test-fraction", 0.5]]
        verbs += [["mix", f"{buf}:1"], ["stats", buf], ["show", buf]]
        for verb in verbs:
            folder = tmp_path / f"{name}-{'-'.join(map(str, verb[::2]))}"
            out = ["--out", folder, "--no-progress"] if verb[0] not in ("stats", "show") else []
            code, _, err = run(capsys, *verb, *out)
            assert code == 2 and needle in err and "Traceback" not in err, (name, verb, err)
            assert len(err.strip().splitlines()) == 1, err
            if name not in ("nocol", "rtype"):  # the shard's own row
                assert f"{buf / json.loads((buf / 'manifest.json').read_text())['shards'][0]['file']}: row " in err
                assert f": row {dict(plen=1, vocab=0, mask=0).get(name, 2)}: field" in err, err
            assert not folder.exists()
            assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(name + "-")) == [], verb


def test_a_killed_commands_spill_folder_is_removed_by_the_next_one_in_that_folder(tmp_path, capsys, data):
    """A curation command killed (kill -9, or SIGTERM, which Python does not clean up after) left its
    ``.NAME.spill-…`` folder beside its output until a command wrote that same output again; now the next
    curation command of this machine that works in the folder removes it, whatever output it writes, and not a
    live command's (its lock held, whatever its pid says) or another machine's."""
    import os
    import socket
    import subprocess

    gone = int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    )
    host = socket.gethostname().replace("-", "_")
    dead = tmp_path / f".killed.spill-{host}-{gone}-1a2b3c4d"
    kept = [
        tmp_path / f".running.spill-{host}-{os.getpid()}-1a2b3c4d",  # a live command
        tmp_path / f".other.spill-{host}x-{gone}-1a2b3c4d",  # another machine's: its pid means nothing here
    ]
    for folder in (dead, *kept):
        (folder / "duckdb").mkdir(parents=True)
    # a command of another container of this host name (its own pid numbering: its pid is gone here) holds its
    # folder's lock, and stays; a folder whose lock nobody holds is an orphan whatever its pid names
    import fcntl

    (tmp_path / f".kept.spill-{gone}-9a8b7c6d").mkdir()  # an earlier release's, named without a host: its pid
    other_ns = tmp_path / f".container.spill-{host}-{gone}-5e6f7a8b"
    orphan = tmp_path / f".orphan.spill-{host}-{os.getpid()}-5e6f7a8b"
    for folder in (other_ns, orphan):
        folder.mkdir()
        (tmp_path / f"{folder.name}.held").write_text("")  # its lock file, beside it
    held = os.open(tmp_path / f"{other_ns.name}.held", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        argv = ["filter", data["a"], "--where", "reward > 0", "--out", tmp_path / "kept", "--no-progress"]
        assert run(capsys, *argv)[0] == 0
    finally:
        os.close(held)
    kept_names = ["kept", other_ns.name, f"{other_ns.name}.held", *(p.name for p in kept)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept_names)


def test_stats_name_each_source_whole(tmp_path, capsys):
    """Source names were cut to 20 characters: two sources of one long prefix printed as two rows of one name."""
    rows = [
        {"prompt": "p", "completion": " a b", "reward": 1.0, "source": "dataset-2024-batch-0001"},
        {"prompt": "p", "completion": " a", "reward": -1.0, "source": "dataset-2024-batch-0002"},
    ]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert run(capsys, "build", "jsonl", src, "--tokenizer", "gpt2", "--out", tmp_path / "b", "--no-progress")[0] == 0
    code, out, _ = run(capsys, "stats", tmp_path / "b")
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(("source", "(all", "dataset"))}
    assert code == 0 and {"dataset-2024-batch-0001", "dataset-2024-batch-0002"} <= set(lines), out
    assert lines["dataset-2024-batch-0001"].split()[8] == "1" and lines["dataset-2024-batch-0002"].split()[8] == "-1"
    assert len({len(line) for line in lines.values()}) == 1, out  # the columns aligned


def test_stats_align_sources_of_wide_characters(tmp_path, capsys):
    """A Chinese, Japanese or emoji source name takes two terminal columns a character: padded by its count of
    characters, its row's numbers stood left of the others' (the columns misaligned on screen). Marks drawn on
    the character before them (an accent, Thai vowel and tone marks) and an emoji's skin tone take none."""
    names = ["日本語のソース", "😀😀😀", "short", "cafe\u0301", "ที่นี่", "👍🏽ok"]
    columns = [14, 6, 5, 4, 2, 4]  # as a terminal draws them, counted by hand
    rows = [{"prompt": "p", "completion": " a", "reward": 1.0, "source": n} for n in names]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert run(capsys, "build", "jsonl", src, "--tokenizer", "gpt2", "--out", tmp_path / "b", "--no-progress")[0] == 0
    code, out, _ = run(capsys, "stats", tmp_path / "b")
    table = out.splitlines()[1:-1]  # the header and the rows
    assert code == 0 and len(table) == 2 + len(names), out
    overall = len(table[1])  # the overall row, in ASCII: as wide on screen as it is long
    width = dict(zip(names, columns))
    for line in table[2:]:  # every source row (in name order) as wide on screen as it
        name = next(n for n in width if line.startswith(n + " "))
        assert width[name] + len(line) - len(name) == overall, (name, out)
    from shiq_data.curate.stats import display_width

    assert [display_width(n) for n in names] == columns


def test_stats_keep_a_source_named_all_apart_from_the_overall_row(tmp_path, capsys):
    """The table's overall row was labelled ``all``: a source of that name printed a second ``all`` row, the two
    told apart only in the JSON. The overall row is ``(all sources)`` now, and a source that could read as it
    (or as another name: quoted, empty, spaced, with a control character or a zero-width space) is shown as a
    JSON string."""
    rows = [
        {"prompt": "p", "completion": " a b c", "reward": 1.0, "source": "all"},
        {"prompt": "q", "completion": " a", "reward": -1.0, "source": "(all sources)"},
        {"prompt": "r", "completion": " a b", "reward": 0.5, "source": " spaced\x1b[2J"},
        {"prompt": "s", "completion": " b", "reward": 0.0, "source": "web"},
        {"prompt": "t", "completion": " c", "reward": 0.0, "source": "web\u200b"},  # a zero-width space: reads as web
    ]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert run(capsys, "build", "jsonl", src, "--tokenizer", "gpt2", "--out", tmp_path / "b", "--no-progress")[0] == 0
    code, out, _ = run(capsys, "stats", tmp_path / "b")
    assert code == 0
    table = out.splitlines()[2:-1]  # below the title and the header, above the group sizes
    labels = [line[:20].rstrip() for line in table]
    assert labels == ["(all sources)", '" spaced\\u001b[2J"', '"(all sources)"', "all", "web", '"web\\u200b"'], out
    assert [line.split()[-10] for line in table] == ["5", "1", "1", "1", "1", "1"]  # the rows column
    assert table[0].split()[-5:-2] == ["0.1", "0.742", "-1"] and table[3].split()[-5] == "1"  # reward mean, std, min
    assert "\x1b" not in out and len({len(line) for line in table}) == 1  # nothing for the terminal; aligned


def test_stats_leave_one_rows_spread_undefined_and_show_a_median_between_lengths(tmp_path, capsys):
    """A source of one row has no sample standard deviation (ddof 1; pandas gives NaN): null in the statistics,
    "-" in the table, where 0 claimed a spread of nothing. A median between two lengths is shown as it is
    (9.5 read as 10 before)."""
    rows = [
        {"prompt": "p", "completion": " one", "reward": 1.0, "source": "single"},
        {"prompt": "p", "completion": " a b", "reward": 0.5, "source": "pair"},
        {"prompt": "p", "completion": " a b c", "reward": 0.0, "source": "pair"},
    ]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert run(capsys, "build", "jsonl", src, "--tokenizer", "gpt2", "--out", tmp_path / "b", "--no-progress")[0] == 0
    stats, _ = buffer_stats(tmp_path / "b")
    single, pair = stats["sources"]["single"], stats["sources"]["pair"]
    assert single["reward"]["std"] is None and math.isnan(pd.Series([1.0]).std())
    assert pair["reward"]["std"] == pytest.approx(pd.Series([0.5, 0.0]).std())
    code, out, _ = run(capsys, "stats", tmp_path / "b")
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("single"))
    assert line.split()[7] == "-"  # the std column
    median = pair["tokens"]["p50"]
    assert median == pytest.approx(pd.Series([pair["tokens"]["min"], pair["tokens"]["max"]]).median())
    assert f"/{median:g}/" in next(x for x in out.splitlines() if x.startswith("pair")) and median % 1 == 0.5


def test_curation_refuses_extra_text_and_export_a_repeated_row_id_that_validate_refuses(tmp_path, capsys):
    """A shard rewritten with its checksum: an ``extra`` holding NaN or not an object was
    copied by filter, dedup, split and mix into a buffer validate refused, and export published a buffer whose
    ``row_id`` repeats. Each verb now refuses as validate does: exit status 2, one line naming the input shard,
    row and field, nothing written."""
    rows = [{"prompt": f"p{i}", "completion": f" c{i} d", "reward": float(i)} for i in range(4)]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert run(capsys, "build", "jsonl", src, "--tokenizer", "gpt2", "--out", tmp_path / "b", "--no-progress")[0] == 0
    cases = [
        ("nan", lambda t: _set_scalar(t, "extra", 2, '{"a": NaN}'), 2, "extra", "holds NaN"),
        ("list", lambda t: _set_scalar(t, "extra", 2, "[1]"), 2, "extra", "must be the JSON text of an object"),
    ]
    curate = [["filter", "--where", "reward >= 0"], ["dedup"], ["split", "--test-fraction", 0.5], ["mix"]]
    for name, change, row, field, needle in cases:
        buf = _damage_first_shard(tmp_path / "b", tmp_path / name, change)
        assert run(capsys, "validate", buf)[0] == 2
        shard = buf / json.loads((buf / "manifest.json").read_text())["shards"][0]["file"]
        for verb, *opts in curate:
            folder = tmp_path / f"{name}-{verb}"
            code, _, err = run(
                capsys, verb, f"{buf}:1" if verb == "mix" else buf, *opts, "--out", folder, "--no-progress"
            )
            assert code == 2 and f"{shard}: row {row}: field {field!r}: " in err and needle in err, (name, verb, err)
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
            assert not folder.exists()
    ids = _damage_first_shard(tmp_path / "b", tmp_path / "ids", lambda t: _set_scalar(t, "row_id", 3, t["row_id"][1]))
    code, _, err = run(capsys, "validate", ids)
    assert code == 2 and "is not unique" in err, err
    shard = ids / json.loads((ids / "manifest.json").read_text())["shards"][0]["file"]
    for fmt in ("jsonl", "parquet", "hf"):
        code, _, err = run(capsys, "export", ids, "--format", fmt, "--out", tmp_path / f"ids-{fmt}", "--no-progress")
        assert code == 2 and f"{shard}: row 3: field 'row_id': " in err and "is not unique" in err, (fmt, err)
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / f"ids-{fmt}").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_curation_parses_each_distinct_extra_text_of_a_shard_once(tmp_path, monkeypatch):
    """The curation verbs' check of a shard parsed every row's ``extra`` in Python (half of filter's time on 200,000
    short rows mixed with replacement); each distinct text is parsed once, and a bad one is still named at the
    first row holding it."""
    from shiq_data import schema as R
    from shiq_data.schema import extra_problem

    texts = ['{"k": 1}', '{"k": 2}', None, '{"k": 1}', '{"k": 3}', '{"k": 2}', '{"k": 1}', None]
    good = [
        {
            "row_id": f"r{i}",
            "source": "s",
            "group_id": i,
            "prompt_len": 1,
            "tokens": [1, 2, 3],
            "action_mask": [False, True, True],
            "rewards": [0.0, 0.0, 1.0],
            "prompt": "p",
            "completion": "c",
            "extra": text,
        }
        for i, text in enumerate(texts)
    ]
    tok = {"name": "toy", "fingerprint": "f" * 64, "vocab_size": 50}
    write_buffer(good, tmp_path / "b", tokenizer_info=tok, command=["t"], progress=False)
    (shard,) = open_buffer(tmp_path / "b").shard_paths
    parsed = []
    monkeypatch.setattr(R, "extra_problem", lambda t: parsed.append(t) or extra_problem(t))
    R.check_shard(read_shard(shard), 50, shard)
    assert sorted(parsed) == ['{"k": 1}', '{"k": 2}', '{"k": 3}']  # (by hand: three distinct texts, two nulls)
    bad = read_shard(shard)
    bad = bad.set_column(bad.schema.get_field_index("extra"), "extra", pa.array(texts[:5] + ["[1]", None, "[1]"]))
    with pytest.raises(ValueError, match=rf"{re.escape(str(shard))}: row 5: field 'extra': must be the JSON text"):
        R.check_shard(bad, 50, shard)


def _three_shards_and_a_repeated_id(tmp_path, capsys):
    """A buffer ``b`` of 6 rows in 3 shards, and its copy ``ids`` whose third shard's row 1 holds the first row's
    id (the shard's checksum updated); returns ``(ids, the repeated id)``."""
    rows = [{"prompt": f"p{i}", "completion": f" c{i} d", "reward": float(i)} for i in range(6)]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    build = ["build", "jsonl", src, "--tokenizer", "gpt2", "--shard-rows", 2, "--out", tmp_path / "b"]
    assert run(capsys, *build, "--no-progress")[0] == 0
    first = json.loads((tmp_path / "b" / "manifest.json").read_text())["shards"][0]["file"]
    first_id = pa.ipc.open_stream(pa.py_buffer((tmp_path / "b" / first).read_bytes())).read_all()["row_id"][0]
    ids = _damage_first_shard(tmp_path / "b", tmp_path / "ids", lambda t: _set_scalar(t, "row_id", 1, first_id), 2)
    return ids, first_id


def test_curation_names_the_input_shard_and_row_of_a_repeated_row_id(tmp_path, capsys):
    """A row id of a later shard set to an earlier row's (the shard's checksum updated): filter, dedup and mix
    named the buffer folder and the new buffer's row (``b: row 5: field 'row_id'``); they now name the input shard
    and the later row as validate and export do, and write nothing (split too:
    ``test_split_refuses_a_repeated_row_id_whichever_sides_its_rows_fall_on``)."""
    buf, first_id = _three_shards_and_a_repeated_id(tmp_path, capsys)
    shard = buf / json.loads((buf / "manifest.json").read_text())["shards"][2]["file"]
    want = f"{shard}: row 1: field 'row_id': {first_id.as_py()!r} is not unique"
    code, _, err = run(capsys, "validate", buf)
    assert code == 2 and want in err, err
    curate = [["filter", "--where", "reward >= 0"], ["dedup"], ["mix"]]
    for verb, *opts in curate:
        folder = tmp_path / f"ids-{verb}"
        code, _, err = run(capsys, verb, f"{buf}:1" if verb == "mix" else buf, *opts, "--out", folder, "--no-progress")
        assert code == 2 and want in err, (verb, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert not folder.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_stats_and_show_refuse_a_repeated_row_id_as_validate_does(tmp_path, capsys):
    """A later shard's row id set to the first row's (the shard's checksum updated): validate, filter and export
    refused the buffer, stats summarised it (6 rows) and ``show --id`` printed both rows. stats now refuses it
    (it reads every row id anyway), and so does ``show --id`` of the repeated id, each naming the later row's shard
    and row as validate does: exit status 2, one line."""
    buf, first_id = _three_shards_and_a_repeated_id(tmp_path, capsys)
    shard = buf / json.loads((buf / "manifest.json").read_text())["shards"][2]["file"]
    want = f"{shard}: row 1: field 'row_id': {first_id.as_py()!r} is not unique"
    for args in (["stats"], ["stats", "--where", "reward > 100"], ["show", "--id", first_id.as_py()]):
        code, out, err = run(capsys, args[0], buf, *args[1:])
        assert code == 2 and want in err, (args, out, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert run(capsys, "show", buf, "--rows", 1)[0] == 0  # the first row only: the buffer is not read further
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in buf.iterdir() if p.name.startswith(".")) == []


def test_split_refuses_a_repeated_row_id_whichever_sides_its_rows_fall_on(tmp_path, capsys):
    """A later shard's row id set to the first row's: split refused it only when both rows fell on one side (that
    side's buffer would hold the id twice) and wrote two buffers sharing the id when they fell apart. It now refuses
    the input at every seed, naming the later row's shard and row as validate does, and writes nothing."""
    buf, first_id = _three_shards_and_a_repeated_id(tmp_path, capsys)
    shard = buf / json.loads((buf / "manifest.json").read_text())["shards"][2]["file"]
    want = f"{shard}: row 1: field 'row_id': {first_id.as_py()!r} is not unique"
    for seed in (0, 5):  # (by group, 6 groups: the two rows fall apart at seed 0, on one side at seed 5)
        folder = tmp_path / f"split-{seed}"
        code, out, err = run(
            capsys, "split", buf, "--test-fraction", 0.5, "--seed", seed, "--out", folder, "--no-progress"
        )
        assert code == 2 and want in err, (seed, out, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert not folder.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_curation_and_export_clear_their_progress_bars_before_an_error(tmp_path, capsys):
    """A refused input row (a repeated row id, found after the rows were read; an extra field holding NaN, found
    while they were) left filter, dedup, mix, decontaminate and export's bar ('building ids-filter: 6 rows [...]') on the
    line above the error; the bar is cleared now, the error on a clean line (a terminal shows what follows a
    line's last carriage return), and kept on success (dedup's finished hashing pass is kept too)."""
    ids, first_id = _three_shards_and_a_repeated_id(tmp_path, capsys)
    nan = _damage_first_shard(tmp_path / "b", tmp_path / "nan", lambda t: _set_scalar(t, "extra", 1, '{"a": NaN}'), 1)
    (tmp_path / "against.jsonl").write_text(
        json.dumps({"prompt": "nothing alike here at all, not one word of it in any row"}) + "\n"
    )
    verbs = [
        ["filter", "--where", "reward >= 0"],
        ["dedup"],
        ["mix"],
        ["decontaminate", "--against", tmp_path / "against.jsonl"],
        ["export", "--format", "jsonl"],
    ]
    for buf in (ids, nan):
        for verb, *opts in verbs:
            folder = tmp_path / f"{buf.name}-{verb}"
            code, _, err = run(capsys, verb, f"{buf}:1" if verb == "mix" else buf, *opts, "--out", folder)
            shown = [line.rsplit("\r", 1)[-1] for line in err.rstrip("\n").split("\n")]
            if verb == "dedup" and buf is ids:  # the hashing pass, finished, is kept; the bar of the rows written not
                assert shown[0].startswith("hashing: 100%") and len(shown) == 2, err
                shown = shown[1:]
            assert code == 2 and len(shown) == 1 and shown[0].startswith("shiq-data: error: "), (buf.name, verb, err)
            assert "\r" in err or buf is nan, err  # a bar was drawn, then cleared (NaN: refused before a verb's)
    code, _, err = run(capsys, "filter", tmp_path / "b", "--where", "reward >= 0", "--out", tmp_path / "kept")
    assert code == 0 and err.rstrip("\n").rsplit("\r", 1)[-1].startswith("building kept: 6 rows"), err


def test_extra_nested_too_deep_is_named_with_its_shard_row_and_field(tmp_path, capsys):
    """An ``extra`` nested 50,000 deep ended validate, export and the curation verbs in "maximum recursion depth
    exceeded", naming no file (json's RecursionError): it is now bad JSON of that shard's row, field 'extra'."""
    rows = [{"prompt": f"p{i}", "completion": f" c{i} d", "reward": float(i)} for i in range(4)]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert run(capsys, "build", "jsonl", src, "--tokenizer", "gpt2", "--out", tmp_path / "b", "--no-progress")[0] == 0
    deep = '{"a": ' + "[" * 50_000 + "]" * 50_000 + "}"
    buf = _damage_first_shard(tmp_path / "b", tmp_path / "deep", lambda t: _set_scalar(t, "extra", 1, deep))
    shard = buf / json.loads((buf / "manifest.json").read_text())["shards"][0]["file"]
    verbs = [
        ["validate", buf, "--no-progress"],
        ["export", buf, "--format", "jsonl", "--out", tmp_path / "x", "--no-progress"],
    ]
    verbs += [["filter", buf, "--where", "reward >= 0", "--out", tmp_path / "f", "--no-progress"]]
    for verb in verbs:
        code, _, err = run(capsys, *verb)
        assert code == 2 and f"{shard}: row 1: field 'extra': not valid JSON (nested too deep)" in err, (verb, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "f").exists()


def test_show_and_info_print_the_datas_control_characters_escaped(tmp_path, capsys):
    """A completion, a source or an extra value holding an escape sequence (``\\x1b[2J`` clears the screen,
    ``\\x1b]0;…\\x07`` retitles the terminal, ``\\x9b`` is the C1 introducer) was printed raw by ``shiq-data show``,
    and a manifest's tokenizer name and recorded arguments by ``shiq-data info``: each control character is
    now printed as ``\\xNN``; the line breaks and tabs of a row's text are kept."""
    rows = [{"prompt": "say", "completion": " hi\x1b[2J there\n\tnext\x9b", "reward": 1.0, "note": "n\x1b]0;t\x07"}]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    build = ["build", "jsonl", src, "--tokenizer", "gpt2", "--source", "s\x1b[1m", "--out", tmp_path / "b"]
    assert run(capsys, *build, "--no-progress")[0] == 0
    code, out, _ = run(capsys, "show", tmp_path / "b")
    assert code == 0
    assert " hi\\x1b[2J there\n\tnext\\x9b" in out and "source s\\x1b[1m " in out, out
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", out), repr(out)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    manifest["tokenizer"]["name"] = "gpt2\x1b]0;owned\x07"
    manifest["commands"][0]["argv"].append("--x=\x1b[31mred\n")
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    code, out, _ = run(capsys, "info", tmp_path / "b")
    assert code == 0 and "gpt2\\x1b]0;owned\\x07" in out and "--x=\\x1b[31mred\\x0a" in out, out
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]", out), repr(out)


def test_info_prints_a_curated_buffers_parents_and_curation(data, tmp_path, capsys):
    """``shiq-data info`` of a curated buffer names its inputs (path, rows, manifest SHA-256) and what the verb
    recorded (here filter's ids file: its SHA-256, not its ids), read back from the manifest as written; a
    buffer built from rows has neither line, and a hand-edited manifest's odd entries print, not fail."""
    listed = tmp_path / "ids.txt"
    listed.write_text("b0-1\nnot-there\n")
    out = tmp_path / "kept"
    code, _, err = run(
        capsys, "filter", data["ab"], "--ids", listed, "--where", "reward > -9", "--out", out, "--no-progress"
    )
    assert code == 0, err
    code, text, _ = run(capsys, "info", out)
    parent = hashlib.sha256((Path(data["ab"]) / "manifest.json").read_bytes()).hexdigest()[:16]
    rows = json.loads((Path(data["ab"]) / "manifest.json").read_text())["rows"]
    assert code == 0 and f"\nparent      {data['ab']}  ({rows} rows, manifest sha256 {parent})\n" in text, text
    curation = json.loads(text.split("\ncuration    ", 1)[1])
    assert curation["verb"] == "filter" and curation["where"] == "reward > -9"
    assert curation["ids"] == {
        "file": str(listed),
        "sha256": hashlib.sha256(listed.read_bytes()).hexdigest(),
        "lines": 2,
        "ids": 2,
        "not_in_buffer": 1,
    }
    code, text, _ = run(capsys, "info", data["ab"])
    assert code == 0 and "\nparent " not in text and "\ncuration " not in text
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["parents"] = ["hand\x1b[2Jwritten", 3]
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, text, _ = run(capsys, "info", out)
    assert code == 0 and "parent      hand\\x1b[2Jwritten\nparent      3\n" in text, text


def test_show_prints_the_datas_direction_overrides_escaped(tmp_path, capsys):
    """A completion or a source holding a bidirectional override, embedding, isolate or mark (U+202E shows what
    follows it right to left) was printed raw by ``shiq-data show``, so the terminal showed the rest of the
    line reordered: each is now printed as ``\\uNNNN``, as stats escapes it; line breaks and tabs are kept."""
    marks = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
    rows = [{"prompt": "say", "completion": f" hi\u202eevil\n\t{marks}end", "reward": 1.0}]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    build = ["build", "jsonl", src, "--tokenizer", "gpt2", "--source", "s\u2067x", "--out", tmp_path / "b"]
    assert run(capsys, *build, "--no-progress")[0] == 0
    code, out, _ = run(capsys, "show", tmp_path / "b")
    escaped = "".join(f"\\u{ord(c):04x}" for c in marks)
    assert code == 0 and f" hi\\u202eevil\n\t{escaped}end" in out and "source s\\u2067x " in out, out
    assert not re.search("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]", out), repr(out)


# ---------------------------------------------------------------------------------------------------------------
# decontaminate: brute force over word tuples (sets of every run of each length), against the input records


def _word_runs(text: str) -> list[str]:
    """Runs of letters, digits, ``_`` and combining marks (category M), character by character."""
    out, cur = [], ""
    for ch in text:
        if ch.isalnum() or ch == "_" or unicodedata.category(ch).startswith("M"):
            cur += ch
        else:
            out += [cur] if cur else []
            cur = ""
    return out + ([cur] if cur else [])


def _unspaced(ch: str) -> bool:
    """Whether ``ch`` is a character of a script written without spaces (Han, kana, Thai...)."""
    return any(
        a <= ord(ch) <= b
        for a, b in [(0xE00, 0xEFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x3005, 0x3007), (0x3040, 0x30FF)]
        + [(0x31F0, 0x31FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3134F)]
    )


def _words(text: str) -> list[str]:
    """Runs of letters, digits, ``_`` and their marks, but each Han, kana, Thai... character (a script without
    spaces) a word of its own; the marks before a run's first letter or digit (none to mark) left out."""
    out = []
    for w in _word_runs(unicodedata.normalize("NFKC", text).casefold()):
        for piece in re.findall(
            r"[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3005-\u3007\u3040-\u30ff\u31f0-\u31ff"
            r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]|[^\u0e00-\u0eff"
            r"\u1000-\u109f\u1780-\u17ff\u3005-\u3007\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf"
            r"\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]+",
            w,
        ):
            while piece and unicodedata.category(piece[0]).startswith("M") and not _unspaced(piece[0]):
                piece = piece[1:]  # (a Thai mark is a character of a script without spaces: a word of its own)
            out += [piece] if piece else []
    return out


def _tuples(ws, n):
    return {tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)}


def _brute_force(rows: list[str], evaluation: list, ngram: int, min_words: int | None) -> list[bool]:
    """Whether each row text holds a run of words an evaluation text holds (see shiq_data.curate.decontaminate):
    each evaluation text a string, or a list of its messages (runs within a message)."""
    runs: dict[int, set] = {}
    for text in evaluation:
        for message in [text] if isinstance(text, str) else text:
            ws = _words(message)
            n = min(len(ws), ngram)
            if len(ws) >= (min(8, ngram) if min_words is None else min_words):
                runs.setdefault(n, set()).update(_tuples(ws, n))
    return [any(_tuples(_words(t), n) & r for n, r in runs.items()) for t in rows]


EVALUATION = [  # (JSON line, its text as the reference reads it)
    (
        {"prompt": "Tell me: the quick brown fox JUMPS, over the hill"},
        "Tell me: the quick brown fox JUMPS, over the hill",
    ),
    ("What is the capital of France", "What is the capital of France"),
    (
        {"prompt": [[{"role": "user", "content": "Count to three."}], [{"role": "user", "content": "then stop"}]]},
        ["Count to three.", "then stop"],  # runs within a message: "count to three" whole, "then stop" too short
    ),
    ({"prompt": "Say hi."}, "Say hi."),  # 2 words: under --min-words 3, skipped
    ({"prompt": "nothing here matches any row at all, surely", "id": 7}, "nothing here matches any row at all, surely"),
]


def test_decontaminate_drops_exactly_the_rows_a_brute_force_search_drops(data, tmp_path, capsys):
    df = data["df"]
    against = write_jsonl(tmp_path / "eval.jsonl", [line for line, _ in EVALUATION])
    texts = [t for _, t in EVALUATION]
    for by in ("row", "prompt", "completion"):
        row_text = {"row": df.prompt + "\n" + df.completion, "prompt": df.prompt, "completion": df.completion}[by]
        bad = _brute_force(row_text.tolist(), texts, ngram=4, min_words=3)
        keep = df[[not b for b in bad]]
        removed = df[bad].groupby("source").size().to_dict()
        out, dropped = tmp_path / by, tmp_path / f"{by}.dropped.jsonl"
        argv = ["decontaminate", data["ab"], "--against", against, "--by", by, "--ngram", 4, "--min-words", 3]
        code, stdout, err = run(capsys, *argv, "--dropped", dropped, "--out", out, "--no-progress")
        assert code == 0, err
        assert 0 < len(keep) < len(df), by  # the data drops some rows and keeps others
        assert ids(out) == keep.row_id.tolist(), by
        c = json.loads((out / "manifest.json").read_text())["curation"]
        assert c["removed"] == removed and c["rows_read"] == len(df) and c["rows_kept"] == len(keep)
        assert c["evaluation_texts"] == 5 and c["evaluation_texts_too_short"] == 1 and c["ngram"] == 4
        assert c["against"][0]["sha256"] == hashlib.sha256(against.read_bytes()).hexdigest()
        # the texts found: the brute force asked of each evaluation text alone
        found = sum(any(_brute_force(row_text.tolist(), [t], 4, 3)) for t in texts)
        assert c["evaluation_texts_matched"] == found and f"{found} of the evaluation texts found" in stdout
        listed = [json.loads(x) for x in dropped.read_text().splitlines()]
        assert [x["row_id"] for x in listed] == df[bad].row_id.tolist()
        for x in listed:  # each names words of its row that an evaluation text holds
            ws = tuple(x["words"].split())
            assert " ".join(ws) in " ".join(_words(row_text[df.row_id == x["row_id"]].iloc[0]))
            messages = [m for t in texts for m in ([t] if isinstance(t, str) else t)]
            assert any(" ".join(ws) in " ".join(_words(m)) for m in messages), x
        assert f"kept {len(keep)} of {len(df)} rows" in stdout and "1 text under 3 words skipped" in stdout


def test_decontaminate_against_a_buffer_and_a_bfcl_question_field(data, tmp_path, capsys):
    """A buffer's prompts as the evaluation texts (as a held-out split of it would be), and BFCL-shaped
    records whose question is a list of turns of chat messages, chosen by --field."""
    df = data["df"]
    b_prompts = df[df.source == "b"].prompt.tolist()
    bad = _brute_force((df.prompt + "\n" + df.completion).tolist(), b_prompts, ngram=13, min_words=1)
    code, _, err = run(
        capsys,
        "decontaminate",
        data["ab"],
        "--against",
        data["b"],
        "--min-words",
        1,
        "--out",
        tmp_path / "o",
        "--no-progress",
    )
    assert code == 0, err
    assert ids(tmp_path / "o") == df[[not b for b in bad]].row_id.tolist() and set(df[bad].source) == {"a", "b"}
    c = json.loads((tmp_path / "o" / "manifest.json").read_text())["curation"]
    assert c["against"][0]["texts"] == len(b_prompts) and "manifest_sha256" in c["against"][0]
    bfcl = [{"id": "multi_turn_base_0", "question": [[{"role": "user", "content": "Describe a scene, please."}]]}]
    against = write_jsonl(tmp_path / "bfcl.jsonl", bfcl)
    code, stdout, err = run(
        capsys,
        "decontaminate",
        data["ab"],
        "--against",
        against,
        "--field",
        "question",
        "--by",
        "prompt",
        "--ngram",
        3,
        "--out",
        tmp_path / "q",
        "--no-progress",
    )
    assert code == 0, err
    assert ids(tmp_path / "q") == df[df.prompt != "Describe a scene."].row_id.tolist(), stdout


@pytest.mark.parametrize(
    "lines, extra, says",
    [
        (None, [], "--against {d}/missing.jsonl: no such file or folder"),
        (['{"prompt": "a b c d e f g h"}', '{"text": "x"}'], [], "line 2: no field 'prompt' (choose it with --field)"),
        (['{"prompt": "a b c d e f g h"', ""], [], "line 1: not valid JSON (Expecting ',' delimiter at column 29)"),
        # a line cut inside a string: its line end read as a control character, or as the JSON's line 2
        (['{"prompt": "a b c d'], [], "line 1: not valid JSON (Unterminated string starting at column 12)"),
        (['{"prompt": '], [], "line 1: not valid JSON (Expecting value at column 12)"),
        (['{"prompt": {"x": 1}}'], [], "line 1: field 'prompt' holds no text"),
        (["null"], [], "line 1: expected a string, chat messages or an object, got null"),  # (not NoneType)
        (['"too short"'], [], "the evaluation text is shorter than --min-words 8 words"),
        (['"What is the capital of France"'], ["--ngram", "1"], "shares a run of words with the evaluation texts"),
    ],
)
def test_decontaminate_refuses_in_one_line_and_writes_nothing(data, tmp_path, capsys, lines, extra, says):
    against = tmp_path / "missing.jsonl"
    if lines is not None:
        against = tmp_path / "eval.jsonl"
        against.write_text("\n".join(lines) + "\n")
    if "shares a run" in says:  # every row: a buffer against its own rows, word by word
        extra = [*extra, "--against", data["ab"], "--against-by", "row", "--min-words", "1"]
    out = tmp_path / "out"
    code, _, err = run(capsys, "decontaminate", data["ab"], "--against", against, *extra, "--out", out, "--no-progress")
    assert code == 2 and err.count("\n") == 1 and says.format(d=tmp_path) in err, err
    assert not out.exists()


def test_decontaminate_names_an_against_path_that_is_neither_a_file_nor_a_folder(data, tmp_path, capsys):
    """``--against /dev/null`` (a device, which exists) was refused as "no such file or folder"; it is now
    refused as not a regular file or folder, in one line naming the path, and nothing is written."""
    out = tmp_path / "out"
    code, _, err = run(capsys, "decontaminate", data["ab"], "--against", "/dev/null", "--out", out, "--no-progress")
    assert code == 2 and err.count("\n") == 1 and "--against /dev/null: not a regular file or folder" in err, err
    assert "Traceback" not in err and not out.exists()


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(st.lists(st.sampled_from("abcd"), max_size=12), max_size=6),
    evaluation=st.lists(st.lists(st.sampled_from("abcde"), max_size=9), min_size=1, max_size=4),
    ngram=st.integers(1, 6),
    min_words=st.integers(1, 6),
)
def test_the_rows_found_are_the_brute_force_rows_for_any_words(rows, evaluation, ngram, min_words):
    """Every row's runs of each length at once, none across two rows (a four-letter vocabulary makes runs repeat
    within and across rows): the rows found, and their first matching words, against word tuples."""
    from shiq_data.curate.decontaminate import EvaluationRuns, WordHashes, contaminated

    texts = [" ".join(e) for e in evaluation]
    want = _brute_force([" ".join(r) for r in rows], texts, ngram, min_words)
    runs = EvaluationRuns(texts, ngram, min_words)
    if not runs.lengths:
        assert not any(want)
        return
    first = contaminated(rows, runs, WordHashes())
    assert sorted(first) == [i for i, b in enumerate(want) if b]
    for i, found in first.items():
        assert any(
            set(_tuples(found.split(), len(found.split()))) & _tuples(_words(t), len(found.split())) for t in texts
        )
        assert found in " ".join(rows[i])


@functools.cache
def _old_word_pattern() -> re.Pattern:
    """The word pattern as first written (letter, then (letter or mark)* in one alternation): the reference
    :func:`words` is held to."""
    from shiq_data.curate.decontaminate import UNSPACED

    marks = [
        c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)).startswith("M") and not _unspaced(chr(c))
    ]
    spans, start = [], marks[0]
    for prev, c in zip(marks, marks[1:] + [-1]):
        if c != prev + 1:
            spans.append(f"\\U{start:08x}" + (f"-\\U{prev:08x}" if prev != start else ""))
            start = c
    return re.compile(f"[{UNSPACED}]|[^\\W{UNSPACED}](?:[^\\W{UNSPACED}]|[{''.join(spans)}])*")


# letters and marks of the BMP and beyond it, a script without spaces and its marks (Thai), ligatures and letters
# NFKC or case folding changes ("ﬁ", "ß", "İ", "Ⅻ", full-width), digits, "_", separators
_TRICKY = (
    "aZ_9 \n\t.,-'\u00e9e\u0301\u0300\u20dd\u093f\u0915\u094d\u064e\u0e01\u0e31\u0e48\u6f22\u3005\u30ab\u3099"
    "\ufb01\u00df\u0130\u216b\uff21\uff11\u2028\U0001d165\U0001d16d\U000110b9\U00011000\U0001e944\U00020000"
    "\U0001d400\U00010400\U000e0100\u0345\u0399\u03c2"
)


@settings(max_examples=400, deadline=None)
@given(st.text(st.sampled_from(_TRICKY) | st.characters(), max_size=40))
def test_words_are_the_words_of_the_first_pattern(text):
    """The words (an ASCII text's by its own pattern, another's by letters then marks each followed by letters)
    are exactly the first pattern's, on any text: marks beyond the BMP, marks with no letter before them, scripts
    without spaces, letters NFKC or case folding turns into ASCII or out of it."""
    want = _old_word_pattern().findall(unicodedata.normalize("NFKC", text).casefold())
    assert words(text) == want
    assert words(text.upper()) == _old_word_pattern().findall(unicodedata.normalize("NFKC", text.upper()).casefold())


@settings(max_examples=200, deadline=None)
@given(
    table=st.lists(st.integers(0, 2**64 - 1), max_size=300),
    others=st.lists(st.integers(0, 2**64 - 1), max_size=300),
    pick=st.lists(st.integers(0, 10**6), max_size=50),
)
def test_the_runs_a_text_holds_are_found_past_the_bit_table(table, others, pick):
    """hits(): the runs whose bit is clear are not searched for; every run the table holds is still found (and
    its texts marked), none it does not, as by a plain membership test. Hashes close together share bits."""
    from shiq_data.curate.decontaminate import EvaluationRuns

    runs = EvaluationRuns([], 13, 8)
    h = np.sort(np.array(table + [t ^ 1 for t in table[:5]], dtype=np.uint64))
    runs.lengths[13] = (h, np.arange(len(h), dtype=np.int32) % 3)
    runs.filters[13] = dc_bit_table(h)
    runs.matched = np.zeros(3, dtype=bool)
    asked = others + [table[p % len(table)] for p in pick if table] + [t + 1 for t in table[:9] if t < 2**64 - 1]
    asked = np.array(asked, dtype=np.uint64)
    want = np.isin(asked, h)
    assert runs.hits(asked, 13).tolist() == want.tolist()
    assert sorted(np.flatnonzero(runs.matched)) == sorted({int(i % 3) for i in np.flatnonzero(np.isin(h, asked[want]))})


def test_decontaminate_holds_the_words_of_a_slice_of_a_shard_at_once(tmp_path, capsys, monkeypatch):
    """A shard's rows are compared a slice at a time (SLICE_BYTES of text, a longer row alone): every slice under
    the bound, the rows' text never held for a whole shard, and the same rows dropped, the same --dropped file and
    the same record as with the shard in one slice."""
    import shiq_data.curate.decontaminate as dc

    rng = random.Random(5)
    vocab = [f"w{i}" for i in range(40)]
    evaluation = [" ".join(rng.choices(vocab, k=15)) for _ in range(6)]
    records = []
    for i in range(30):
        text = " ".join(rng.choices(vocab, k=rng.randint(3, 30)))
        if i % 4 == 0:
            text += " " + evaluation[i % 6]
        records.append({"prompt": f"q{i}", "completion": " " + text, "reward": 0.0})
    src = write_jsonl(tmp_path / "in.jsonl", records)
    argv = ["build", "jsonl", src, "--tokenizer", "gpt2", "--shard-rows", 16, "--out", tmp_path / "b", "--no-progress"]
    assert run(capsys, *argv)[0] == 0
    against = write_jsonl(tmp_path / "eval.jsonl", evaluation)
    seen = []
    real = dc.contaminated

    def counting(row_words, runs, hashes):
        seen.append(len(row_words))
        return real(row_words, runs, hashes)

    monkeypatch.setattr(dc, "contaminated", counting)
    results = []
    for bound in (10**9, 200, 1):
        monkeypatch.setattr(dc, "SLICE_BYTES", bound)
        seen.clear()
        out, dropped = tmp_path / f"o{bound}", tmp_path / f"d{bound}.jsonl"
        argv = ["decontaminate", tmp_path / "b", "--against", against, "--dropped", dropped, "--out", out]
        code, stdout, err = run(capsys, *argv, "--no-progress")
        assert code == 0, err
        manifest = json.loads((out / "manifest.json").read_text())
        results.append(
            (
                ids(out),
                dropped.read_text(),
                manifest["curation"],
                stdout.replace(str(out), "OUT").replace(str(dropped), "D"),
            )
        )
        if bound == 10**9:
            assert seen == [16, 14]
        elif bound == 1:
            assert seen == [1] * 30
        else:
            assert len(seen) > 2 and max(seen) < 16 and sum(seen) == 30
    assert results[0][0] and len(results[0][0]) < 30
    assert results[1] == results[0] and results[2] == results[0]


def test_decontaminate_reads_a_json_completion_whole(tmp_path, capsys):
    """A completion that is a JSON object (not a stored message list) is compared with all its words: its
    ``text`` key alone would hide an evaluation text copied into another key."""
    text = "the quick brown fox jumps over the lazy dog while the old cat sleeps near the warm fire tonight"
    records = [
        {"prompt": "Answer in JSON.", "completion": json.dumps({"text": "yes", "reason": text}), "reward": 0.0},
        {"prompt": "Say x.", "completion": " y", "reward": 0.0},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    assert run(capsys, "build", "jsonl", src, "--tokenizer", "gpt2", "--out", tmp_path / "b", "--no-progress")[0] == 0
    against = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": text}])
    code, stdout, err = run(
        capsys, "decontaminate", tmp_path / "b", "--against", against, "--out", tmp_path / "o", "--no-progress"
    )
    assert code == 0, err
    assert "kept 1 of 2 rows" in stdout, stdout
    assert ids(tmp_path / "o") == ["b0-1"]  # the JSON completion's row went


@pytest.mark.parametrize(
    "where, says",
    [
        ("{out}/dropped.jsonl", "--dropped {out}/dropped.jsonl is inside --out {out}: choose a file outside it"),
        ("{out}", "--dropped {out} is inside --out {out}: choose a file outside it"),
        ("{d}/a-file/dropped.jsonl", "--dropped {d}/a-file/dropped.jsonl: cannot be written"),
    ],
)
def test_decontaminate_refuses_a_dropped_file_it_cannot_write_before_writing_anything(
    data, tmp_path, capsys, where, says
):
    """--dropped inside (or at) --out would land in the new buffer, or fail once the buffer is written; a place
    that cannot be written fails after the buffer was written: all are refused first, and nothing is left."""
    (tmp_path / "a-file").write_text("x")
    against = write_jsonl(tmp_path / "eval.jsonl", ["What is the capital of France"])
    out = tmp_path / "out"
    dropped = where.format(out=out, d=tmp_path)
    code, _, err = run(
        capsys,
        "decontaminate",
        data["ab"],
        "--against",
        against,
        "--ngram",
        4,
        "--min-words",
        3,
        "--dropped",
        dropped,
        "--out",
        out,
        "--no-progress",
    )
    assert code == 2 and err.count("\n") == 1 and says.format(out=out, d=tmp_path) in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "eval.jsonl"]


def test_decontaminate_reads_chinese_and_japanese_by_character(tmp_path, capsys):
    """Chinese and Japanese have no spaces: as runs of \\w a clause was one word, so with the defaults these
    evaluation texts (two and one such words) were skipped as under --min-words and the copied prompts kept."""
    zh = "请计算一个半径为五厘米的圆的面积，并给出详细的解题步骤和最终答案。"
    ja = "東京から大阪までの新幹線の所要時間と料金を詳しく教えてください。"
    records = [
        {"prompt": "前言：" + zh[:-1] + "谢谢", "completion": " 好的", "reward": 0.0},
        {"prompt": "質問：" + ja, "completion": " はい", "reward": 0.0},
        {"prompt": "今天天气很好，我们去公园散步吧。", "completion": " 好", "reward": 0.0},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    assert run(capsys, "build", "jsonl", src, "--tokenizer", "gpt2", "--out", tmp_path / "b", "--no-progress")[0] == 0
    against = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": zh}, {"prompt": ja}])
    code, stdout, err = run(
        capsys, "decontaminate", tmp_path / "b", "--against", against, "--out", tmp_path / "o", "--no-progress"
    )
    assert code == 0, err
    assert "kept 1 of 3 rows" in stdout and "2 of the evaluation texts found" in stdout and "skipped" not in stdout
    assert ids(tmp_path / "o") == ["b0-2"]  # the two rows copying an evaluation text went, the third stays


def test_decontaminate_keeps_combining_marks_inside_their_words(tmp_path, capsys):
    """A combining mark (a Devanagari vowel sign or virama, an Arabic vowel mark) is part of its word: \\w left it
    out, so words were cut at each mark and the marks dropped, a Hindi text of 3 words read as 13 and the row
    below, another sentence with the same consonants, matched it. Against the brute-force reference."""
    hi = "किताब मेरी है"  # "the book is mine": 3 words, 13 consonants
    other = "कोतीब मारु हो"  # other words, the same consonants
    ar = "كَتَبَ الوَلَدُ الدَّرْسَ"  # 3 words
    rows = [other, "मैं कहता हूँ " + hi + " और", "كتب الولد الدرس", "قال: " + ar]
    assert len(_words(hi)) == 3 and len(_words(ar)) == 3
    records = [{"prompt": p, "completion": " ok", "reward": 0.0} for p in rows]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    assert run(capsys, "build", "jsonl", src, "--tokenizer", "gpt2", "--out", tmp_path / "b", "--no-progress")[0] == 0
    against = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": hi}, {"prompt": ar}])
    out = tmp_path / "o"
    code, stdout, err = run(
        capsys, "decontaminate", tmp_path / "b", "--against", against, "--min-words", "3", "--out", out, "--no-progress"
    )
    assert code == 0, err
    want = _brute_force([p + "\n ok" for p in rows], [hi, ar], 13, 3)
    assert want == [False, True, False, True]
    assert ids(out) == [f"b0-{i}" for i, w in enumerate(want) if not w]


def test_decontaminate_reads_a_mark_with_no_letter_before_it_as_a_separator(tmp_path, capsys):
    """A combining mark at the start of a text, after a space or after a character of a script without spaces
    marks no letter of the word after it: it was read as that word's start ("\u0301the" another word than
    "the"), so a row holding the evaluation text after a stray accent was kept. Against the brute-force
    reference."""
    assert words("\u0301the cat, \u20ddsat 漢\u0301on") == ["the", "cat", "sat", "漢", "on"]
    assert words("नमस्ते \u093fदुनिया") == ["नमस्ते", "दुनिया"]  # (its marks inside a word stay)
    ev = "the cat sat on the mat"
    rows = ["\u0301the cat sat on the mat", "the \u0301cat sat \u20ddon the mat", "the cat sat on a mat"]
    records = [{"prompt": p, "completion": " ok", "reward": 0.0} for p in rows]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    assert run(capsys, "build", "jsonl", src, "--tokenizer", "gpt2", "--out", tmp_path / "b", "--no-progress")[0] == 0
    against = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": ev}])
    out = tmp_path / "o"
    code, _, err = run(
        capsys, "decontaminate", tmp_path / "b", "--against", against, "--min-words", "6", "--out", out, "--no-progress"
    )
    assert code == 0, err
    want = _brute_force([p + "\n ok" for p in rows], [ev], 13, 6)
    assert want == [True, True, False]
    assert ids(out) == [f"b0-{i}" for i, w in enumerate(want) if not w]


@pytest.mark.parametrize("separator", ["\u2028", "\x0c", "\x85", "\x1e"])
def test_decontaminate_reads_a_txt_line_whole_whatever_characters_it_holds(tmp_path, capsys, separator):
    """A .txt evaluation file is a text a line, but a line was cut at every character Python's splitlines
    takes for a line end (a form feed, U+2028, U+0085...): one text counted as two, and a run of words across
    the cut was not found. Only line breaks (LF, CRLF, CR) end a text now."""
    records = [
        {"prompt": "gamma delta epsilon zeta", "completion": " x", "reward": 0.0},
        {"prompt": "nothing alike here", "completion": " y", "reward": 0.0},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    assert run(capsys, "build", "jsonl", src, "--tokenizer", "gpt2", "--out", tmp_path / "b", "--no-progress")[0] == 0
    text = f"alpha beta gamma delta{separator}epsilon zeta eta theta\r\nsecond text of this file\rthird one\n"
    (tmp_path / "eval.txt").write_bytes(text.encode("utf-8"))
    argv = ["decontaminate", tmp_path / "b", "--against", tmp_path / "eval.txt", "--ngram", 4, "--min-words", 2]
    code, stdout, err = run(capsys, *argv, "--out", tmp_path / "o", "--no-progress")
    assert code == 0, err
    c = json.loads((tmp_path / "o" / "manifest.json").read_text())["curation"]
    assert c["evaluation_texts"] == 3 and c["against"][0]["texts"] == 3, c
    assert c["rows_kept"] == 1 and c["evaluation_texts_matched"] == 1, c
    assert ids(tmp_path / "o") == ["b0-1"]  # the row holding words across the separator went


def test_decontaminate_min_words_above_ngram_is_the_shortest_text_that_counts(tmp_path, capsys):
    """--min-words 8 --ngram 3: a text of 5 words is under 8 words, so it is skipped, as the help and the
    message say (it counted, while the message said texts under 8 words were skipped)."""
    records = [
        {"prompt": "the quick brown fox jumps", "completion": " x", "reward": 0.0},
        {"prompt": "say hi", "completion": " y", "reward": 0.0},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    assert run(capsys, "build", "jsonl", src, "--tokenizer", "gpt2", "--out", tmp_path / "b", "--no-progress")[0] == 0
    (tmp_path / "eval.txt").write_text("the quick brown fox jumps\nthe quick brown fox jumps over the lazy dog\n")
    argv = ["decontaminate", tmp_path / "b", "--against", tmp_path / "eval.txt", "--ngram", 3, "--min-words", 8]
    code, stdout, err = run(capsys, *argv, "--out", tmp_path / "o", "--no-progress")
    assert code == 0, err
    assert "1 text under 8 words skipped" in stdout and "kept 1 of 2 rows" in stdout, stdout
    c = json.loads((tmp_path / "o" / "manifest.json").read_text())["curation"]
    assert c["evaluation_texts_too_short"] == 1 and c["evaluation_texts_matched"] == 1
    assert ids(tmp_path / "o") == ["b0-1"]  # the row sharing the long text's 3-grams went


@pytest.mark.parametrize(
    "name, content",
    [
        ("eval.json", b'\xef\xbb\xbf[{"prompt": "What is the capital of France"}]'),
        ("eval.jsonl", b'\xef\xbb\xbf{"prompt": "What is the capital of France"}\n'),
        ("eval.txt", b"\xef\xbb\xbfWhat is the capital of France\r\n\r\n"),
        ("eval.jsonl.gz", gzip.compress(b'{"prompt": "What is the capital of France"}\n')),
        ("EVAL.JSON", b'[{"prompt": "What is the capital of France"}]'),
        ("Eval.Txt.GZ", gzip.compress(b"What is the capital of France\n")),
        ("eval-jsonl", gzip.compress(b'{"prompt": "What is the capital of France"}\n')),
    ],
    ids=["json", "jsonl", "txt", "jsonl.gz", "JSON", "Txt.GZ", "gzip-unnamed"],
)
def test_decontaminate_reads_a_byte_order_mark_and_gzip(data, tmp_path, capsys, name, content):
    """Windows tools open a file with a byte-order mark (build's readers leave it out; JSON refused it), and
    evaluation sets ship gzipped (it ended in a line naming neither file nor line). A name's ending counts in
    any case (``EVAL.JSON`` was read as JSON lines, ``.GZ`` not decompressed), and gzip is known by its bytes."""
    (tmp_path / name).write_bytes(content)
    out = tmp_path / "out"
    argv = ["decontaminate", data["ab"], "--against", tmp_path / name, "--ngram", 4, "--min-words", 3]
    code, stdout, err = run(capsys, *argv, "--out", out, "--no-progress")
    assert code == 0, err
    assert "1 of the evaluation texts found" in stdout, stdout


@pytest.mark.parametrize("name", ["eval.jsonl.gz", "eval.txt.gz", "eval.json.gz"])
@pytest.mark.parametrize("damage", ["cut", "not gzip"])
def test_decontaminate_names_an_evaluation_file_whose_gzip_is_cut_or_damaged(data, tmp_path, capsys, name, damage):
    """A cut or damaged gzipped evaluation file ended in gzip's own words ('EOFError: Compressed file ended
    ...', 'Not a gzipped file'), naming no file; build's readers name it. It is now named, in one line."""
    whole = gzip.compress(b'{"prompt": "What is the capital of France"}\n' * 2000)
    (tmp_path / name).write_bytes(whole[: len(whole) // 2] if damage == "cut" else b"plain text, no gzip")
    argv = ["decontaminate", data["ab"], "--against", tmp_path / name, "--ngram", 4, "--min-words", 3]
    code, _, err = run(capsys, *argv, "--out", tmp_path / "out", "--no-progress")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    where = "past line" if damage == "cut" else "from its start"  # (not gzip: line 0 was named)
    assert err.startswith(f"shiq-data: error: --against {tmp_path / name}: cannot be read {where}"), err
    assert not (tmp_path / "out").exists()


def test_decontaminate_names_the_file_and_line_that_is_not_utf8(data, tmp_path, capsys):
    (tmp_path / "eval.txt").write_bytes(b"What is the capital of France\nbad \xff byte\n")
    code, _, err = run(
        capsys,
        "decontaminate",
        data["ab"],
        "--against",
        tmp_path / "eval.txt",
        "--out",
        tmp_path / "o",
        "--no-progress",
    )
    assert code == 2 and err.count("\n") == 1 and f"--against {tmp_path / 'eval.txt'}: line 2" in err, err
    assert "not valid UTF-8" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "name, content, where",
    [
        ("eval.jsonl", '{"prompt": "a"}\n{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "line 2"),
        ("eval.json", '[{"prompt": "a"}, ' + "[" * 100_000 + "]" * 100_000 + "]", ""),
        ("eval.jsonl", '{"prompt": ' + "[" * 990 + '"deep"' + "]" * 990 + "}\n", "line 1"),
        ("eval.jsonl", "[" * 990 + '"deep"' + "]" * 990 + "\n", "line 1"),
    ],
    ids=["jsonl-parse", "json-parse", "field-messages", "line-messages"],
)
def test_decontaminate_names_the_file_and_line_of_json_nested_too_deep(data, tmp_path, capsys, name, content, where):
    """JSON nested past Python's recursion limit ended in 'maximum recursion depth exceeded ...', naming neither
    the evaluation file nor its line (JSON too deep to parse, or lists too deep to take the text out of)."""
    (tmp_path / name).write_text(content)
    argv = ["decontaminate", data["ab"], "--against", tmp_path / name, "--out", tmp_path / "o", "--no-progress"]
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"shiq-data: error: --against {tmp_path / name}: {where}"), err
    assert "nested too deep" in err and not (tmp_path / "o").exists(), err


def test_decontaminate_refuses_a_missing_buffer_before_reading_the_evaluation_texts(tmp_path, capsys):
    """The buffer is checked first: reading and hashing a large evaluation set took seconds (14 s for 200,000
    texts) before a mistyped buffer path was reported, and a bad evaluation file hid that the buffer is missing."""
    (tmp_path / "eval.jsonl").write_text('{"prompt": "a b c d e f g h"}\n{"text": "x"}\n')
    code, _, err = run(
        capsys, "decontaminate", tmp_path / "nosuch", "--against", tmp_path / "eval.jsonl", "--out", tmp_path / "o"
    )
    assert code == 2 and err.count("\n") == 1 and "nosuch is not a replay buffer" in err, err


def test_decontaminate_refuses_an_evaluation_input_given_twice(data, tmp_path, capsys):
    """Given twice, a file's texts counted twice (evaluation_texts, evaluation_texts_matched, against)."""
    against = write_jsonl(tmp_path / "eval.jsonl", ["What is the capital of France"])
    twice = [against, tmp_path / "." / "eval.jsonl"]
    argv = ["decontaminate", data["ab"], "--against", *twice, "--ngram", 4, "--min-words", 3]
    code, _, err = run(capsys, *argv, "--out", tmp_path / "o", "--no-progress")
    assert code == 2 and err.count("\n") == 1 and "given twice" in err, err
    assert not (tmp_path / "o").exists()


def test_decontaminate_reads_a_json_line_that_is_a_message_list(data, tmp_path, capsys):
    against = write_jsonl(tmp_path / "eval.jsonl", [[{"role": "user", "content": "What is the capital of France"}]])
    argv = ["decontaminate", data["ab"], "--against", against, "--ngram", 4, "--min-words", 3]
    code, stdout, err = run(capsys, *argv, "--out", tmp_path / "o", "--no-progress")
    assert code == 0 and "1 of the evaluation texts found" in stdout, err


def test_decontaminate_gives_one_answer_with_or_without_text_columns_and_folds_case(tmp_path, capsys):
    """A chat buffer built without its text columns decodes its prompts with the template's role names between
    the messages ("system ... user ..."): runs never cross two messages of an evaluation text, so its rows are
    dropped as the text buffer's are (the joined conversation matched only the latter). Case is folded: STRASSE
    is Straße."""
    rows = [
        {
            "prompt": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is the boiling point of water?"},
            ],
            "completion": [{"role": "assistant", "content": "100 C on the STRASSE."}],
            "reward": 1,
        },
        {
            "prompt": [{"role": "user", "content": "Name a planet, please."}],
            "completion": [{"role": "assistant", "content": "Mars."}],
            "reward": 0,
        },
    ]
    inp = write_jsonl(tmp_path / "chat.jsonl", rows)
    question = [
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the boiling point of water?"},
        ]
    ]
    against = write_jsonl(tmp_path / "q.jsonl", [{"question": question}, {"question": "on the Straße"}])
    for text in ([], ["--no-text"]):
        buf = tmp_path / f"b{len(text)}"
        assert (
            run(capsys, "build", "jsonl", inp, "--tokenizer", "smollm2", "--out", buf, *text, "--no-progress")[0] == 0
        )
        for args, found in ((["--field", "question"], 2), (["--field", "question", "--by", "completion"], 1)):
            out = tmp_path / f"o{len(text)}{len(args)}"
            code, stdout, err = run(
                capsys,
                "decontaminate",
                buf,
                "--against",
                against,
                *args,
                "--min-words",
                3,
                "--out",
                out,
                "--no-progress",
            )
            assert code == 0, err
            assert ids(out) == ["b0-1"] and f"{found} of the evaluation texts found" in stdout, (text, args, stdout)


def test_a_long_where_is_shown_by_its_start_and_length(data, tmp_path, capsys):
    """A --where of thousands of row ids (a 120 KB list, the longest one argument a shell passes) was echoed
    whole in filter's status line and in an error's one line; both now show its start and its length."""
    df = data["df"]
    wanted = df.row_id.tolist()[::3]
    listed = wanted + [f"none-{i}" for i in range(3000)]
    expr = "row_id IN (" + ", ".join(f"'{i}'" for i in listed) + ")"
    code, stdout, err = run(capsys, "filter", data["ab"], "--where", expr, "--out", tmp_path / "f", "--no-progress")
    assert code == 0, err
    assert ids(tmp_path / "f") == df[df.row_id.isin(wanted)].row_id.tolist()
    line = f"kept {len(wanted)} of {len(df)} rows where {expr[:100]}... ({len(expr):,} characters)\n"
    assert stdout.endswith(line) and len(stdout) < 400, stdout[:500]
    code, stdout, err = run(capsys, "filter", data["ab"], "--where", expr + " AND nope", "--out", tmp_path / "g")
    assert code == 2 and err.count("\n") == 1 and len(err) < 600, err[:700]
    assert (
        err.startswith(f"shiq-data: error: --where {expr[:100]!r}... ({len(expr) + 9:,} characters): ")
        and "nope" in err
    )
    code, stdout, err = run(capsys, "stats", data["ab"], "--where", expr)
    assert code == 0 and f"where {expr[:100]}... ({len(expr):,} characters))" in stdout and len(stdout) < 4000
    none = "row_id IN (" + ", ".join(f"'none-{i}'" for i in range(3000)) + ")"  # no row: nothing written
    code, stdout, err = run(capsys, "filter", data["ab"], "--where", none, "--out", tmp_path / "h")
    assert code == 2 and err.count("\n") == 1 and len(err) < 600, err[:700]
    assert f"--where {none[:100]!r}... ({len(none):,} characters): no row of" in err
    deep = "NOT " * 900 + "true"  # (its syntax tree nested past Python's limit, within DuckDB's)
    code, stdout, err = run(capsys, "filter", data["ab"], "--where", deep, "--out", tmp_path / "i")
    assert (
        code == 2
        and err == f"shiq-data: error: --where {deep[:100]!r}... ({len(deep):,} characters): nested too deep\n"
    )
    deeper = "NOT " * 2000 + "true"  # (past DuckDB's own limit, whose advice is a SET no user can give)
    code, stdout, err = run(capsys, "filter", data["ab"], "--where", deeper, "--out", tmp_path / "j")
    assert code == 2 and err.count("\n") == 1 and "SET" not in err, err[-300:]
    assert err.endswith(" characters): nested too deep (DuckDB's parser takes at most 1000 levels)\n")


def _ids_file(path, lines, end="\n"):
    """``lines`` written to ``path`` as bytes, each ended by ``end``; returns ``path``."""
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + end.encode() for line in lines))
    return path


def test_filter_ids_and_exclude_ids_keep_the_rows_pandas_keeps(data, tmp_path, capsys):
    """--ids keeps the listed rows, --exclude-ids drops them, each alone or with --where (every condition given
    holds); the rows kept are pandas' on the input records, and the manifest records the file, not its ids."""
    df = data["df"]
    listed = ["b1-3", "b0-0", "b0-5", "b1-0", "b0-5", "b1-7"]  # out of order, one twice
    f = _ids_file(tmp_path / "ids.txt", listed, end="\r\n")  # a file written on Windows
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    cases = [
        (["--ids", f], df[df.row_id.isin(listed)]),
        (["--exclude-ids", f], df[~df.row_id.isin(listed)]),
        (["--ids", f, "--where", "reward > 0"], df[df.row_id.isin(listed) & (df.reward > 0)]),
        (["--where", "source = 'a'", "--exclude-ids", f], df[~df.row_id.isin(listed) & (df.source == "a")]),
    ]
    for k, (options, want) in enumerate(cases):
        out = tmp_path / f"f{k}"
        code, stdout, err = run(capsys, "filter", data["ab"], *options, "--out", out, "--no-progress")
        assert code == 0 and err == "", err
        assert ids(out) == want.row_id.tolist() and 0 < len(want) < len(df), options
        key = "ids" if "--ids" in options else "exclude_ids"
        which = f"listed in {f}" if key == "ids" else f"not listed in {f}"
        where = options[options.index("--where") + 1] if "--where" in options else None
        assert stdout.endswith(f"kept {len(want)} of {len(df)} rows {which}" + (f" where {where}\n" if where else "\n"))
        m = json.loads((out / "manifest.json").read_text())
        assert m["curation"] == {
            "verb": "filter",
            "where": where,
            "rows_read": len(df),
            "rows_kept": len(want),
            key: {"file": str(f), "sha256": sha, "lines": 6, "ids": 5, "not_in_buffer": 0},
        }


def test_filter_ids_from_stdin_and_ids_as_they_are(data, tmp_path, capsys, monkeypatch):
    """``-`` reads the ids from standard input; a byte-order mark opening the file and a last line without its
    line break are read as such, but a space around an id is part of it (so that id is not in the buffer)."""
    import io

    df = data["df"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xef\xbb\xbfb0-2\nb1-1 \nb1-4")))
    code, stdout, err = run(capsys, "filter", data["ab"], "--ids", "-", "--out", tmp_path / "f", "--no-progress")
    assert code == 0, err
    assert ids(tmp_path / "f") == df[df.row_id.isin(["b0-2", "b1-4"])].row_id.tolist()
    assert err == f"shiq-data: warning: --ids -: 1 of 3 listed row ids is not in {data['ab']} (first: 'b1-1 ')\n"


def test_filter_ids_warns_of_listed_ids_the_buffer_lacks(data, tmp_path, capsys):
    """A stale list (ids of rows since dropped) still filters; stderr says how many listed ids are not in the
    buffer and the first of them in the file's order, and the manifest counts them."""
    df = data["df"]
    listed = ["gone-1", "b0-1", "gone-2", "b1-2", "gone-1"]
    f = _ids_file(tmp_path / "stale.txt", listed)
    for option, want in [("--ids", df[df.row_id.isin(listed)]), ("--exclude-ids", df[~df.row_id.isin(listed)])]:
        out = tmp_path / option.strip("-")
        code, stdout, err = run(capsys, "filter", data["ab"], option, f, "--out", out, "--no-progress")
        assert code == 0 and ids(out) == want.row_id.tolist()
        assert (
            err
            == f"shiq-data: warning: {option} {f}: 2 of 4 listed row ids are not in {data['ab']} (first: 'gone-1')\n"
        )
        record = json.loads((out / "manifest.json").read_text())["curation"][option.strip("-").replace("-", "_")]
        assert record["ids"] == 4 and record["lines"] == 5 and record["not_in_buffer"] == 2


def test_filter_ids_that_match_nothing_write_nothing(data, tmp_path, capsys):
    """No listed row (or none left once --where or --exclude-ids has its say): the usual 'nothing written', exit 2,
    after the warning of the ids the buffer lacks."""
    df = data["df"]
    gone = _ids_file(tmp_path / "gone.txt", ["gone-1", "gone-2"])
    every = _ids_file(tmp_path / "every.txt", df.row_id.tolist())
    some = _ids_file(tmp_path / "some.txt", df[df.reward > 0].row_id.tolist())
    for options, end in [
        (["--ids", gone], f"--ids {gone}: no row of {data['ab']} matches; nothing written\n"),
        (["--exclude-ids", every], f"--exclude-ids {every}: no row of {data['ab']} is left; nothing written\n"),
        (
            ["--ids", some, "--where", "reward <= 0"],
            f"--where 'reward <= 0' and --ids {some}: no row of {data['ab']} matches; nothing written\n",
        ),
    ]:
        out = tmp_path / "out"
        code, stdout, err = run(capsys, "filter", data["ab"], *options, "--out", out, "--no-progress")
        assert code == 2 and not out.exists() and stdout == "", err
        assert err.endswith("shiq-data: error: " + end), err
        assert err.count("\n") == (2 if options[1] == gone else 1), err
    assert not list(tmp_path.glob(".out*"))  # no build folder left either


def test_filter_ids_errors_name_the_file_and_line(data, tmp_path, capsys):
    """A list that could never match as given, or a command line without a condition, is refused in one line
    naming the file and line: exit status 2, no output folder, no traceback."""
    good = _ids_file(tmp_path / "good.txt", ["b0-1"])
    blank = _ids_file(tmp_path / "blank.txt", ["b0-1", "", "b0-2"])
    spaces = _ids_file(tmp_path / "spaces.txt", ["b0-1", "b0-2", " \t"])
    crlf_blank = _ids_file(tmp_path / "crlf.txt", ["b0-1", "b0-2", "b0-3", ""], end="\r\n")
    latin1 = _ids_file(tmp_path / "latin1.txt", ["b0-1", "caf\xe9".encode("latin-1")])
    surrogate = _ids_file(tmp_path / "surrogate.txt", [b"b0-\xed\xa0\x80"])  # an encoded lone surrogate
    empty = _ids_file(tmp_path / "empty.txt", [])
    cases = [
        (["--ids", blank], f"--ids {blank}: line 2: field 'row_id': blank (one row id a line, no blank lines)"),
        (["--exclude-ids", spaces], f"--exclude-ids {spaces}: line 3: field 'row_id': blank ("),
        (["--ids", crlf_blank, "--where", "reward > 0"], f"--ids {crlf_blank}: line 4: field 'row_id': blank ("),
        (["--ids", latin1], f"--ids {latin1}: line 2: field 'row_id': not valid UTF-8 (byte 0xe9 at byte 4 of"),
        (["--ids", surrogate], f"--ids {surrogate}: line 1: field 'row_id': not valid UTF-8 (byte 0xed at byte 4"),
        (["--ids", empty], f"--ids {empty}: lists no row id (one row id a line)"),
        (["--ids", tmp_path / "none.txt"], f"--ids {tmp_path / 'none.txt'}: cannot be read (No such file or"),
        (["--exclude-ids", tmp_path], f"--exclude-ids {tmp_path} is a folder: give a file of row ids"),
        (["--ids", good, "--exclude-ids", good], f"--ids {good} and --exclude-ids {good}: give one of them"),
        ([], "filter: give --where EXPR, --ids FILE or --exclude-ids FILE (the rows to keep)"),
        (["--ids", good, "--where", "nope > 0"], "--where 'nope > 0': "),
    ]
    for options, start in cases:
        out = tmp_path / "out"
        code, stdout, err = run(capsys, "filter", data["ab"], *options, "--out", out, "--no-progress")
        assert code == 2 and stdout == "" and not out.exists(), (options, err)
        assert err.startswith("shiq-data: error: " + start) and err.count("\n") == 1, (options, err)
        assert "Traceback" not in err
    (tmp_path / "out").mkdir()  # an existing --out is refused before the list is read
    code, _, err = run(capsys, "filter", data["ab"], "--ids", blank, "--out", tmp_path / "out", "--no-progress")
    assert code == 2 and err == f"shiq-data: error: --out {tmp_path / 'out'} already exists; choose a new folder\n"


def _shown_ids(stdout):
    """The row ids of the rows ``show`` printed, in its order."""
    return re.findall(r"(?m)^row (\S+)  source ", stdout)


def test_show_ids_and_exclude_ids_print_the_listed_rows_in_buffer_order(data, tmp_path, capsys):
    """show --ids prints the listed rows the buffer has, in buffer order whatever the file's, the first --rows of
    them; --exclude-ids the others; with --where both conditions hold. The warning of the listed id the buffer
    lacks counts over the whole buffer even when show stops after its first rows."""
    df = data["df"]
    f = _ids_file(tmp_path / "flagged.txt", ["b1-3", "b0-0", "gone-1", "b0-5", "b1-0", "b0-0"])
    warning = f"shiq-data: warning: --ids {f}: 1 of 5 listed row ids is not in {data['ab']} (first: 'gone-1')\n"
    code, stdout, err = run(capsys, "show", data["ab"], "--ids", f, "--rows", 100)
    assert code == 0 and err == warning, err
    assert _shown_ids(stdout) == ["b0-0", "b0-5", "b1-0", "b1-3"]
    for row_id in ["b0-0", "b0-5", "b1-0", "b1-3"]:
        rec = df[df.row_id == row_id].iloc[0]
        assert f"row {row_id}  source {rec.source}  " in stdout and f"{rec.prompt}⟦{rec.completion}" in stdout
    # the first two only: b1-0 and b1-3 sit in shards after the last row shown, yet are not counted missing
    code, stdout, err = run(capsys, "show", data["ab"], "--ids", f, "--rows", 2)
    assert code == 0 and err == warning and _shown_ids(stdout) == ["b0-0", "b0-5"], err
    listed = ["b1-3", "b0-0", "gone-1", "b0-5", "b1-0"]
    want = df[~df.row_id.isin(listed) & (df.reward > 0)].row_id.tolist()[:3]
    assert len(want) == 3
    code, stdout, err = run(capsys, "show", data["ab"], "--exclude-ids", f, "--where", "reward > 0", "--rows", 3)
    assert code == 0 and _shown_ids(stdout) == want, (stdout, want)
    assert err == warning.replace("--ids", "--exclude-ids")
    gone = _ids_file(tmp_path / "gone.txt", ["gone-1"])
    code, stdout, err = run(capsys, "show", data["ab"], "--ids", gone)
    assert code == 0 and stdout == f"shiq-data: no row of {data['ab']} to show listed in {gone}\n"
    assert err == f"shiq-data: warning: --ids {gone}: 1 of 1 listed row id is not in {data['ab']} (first: 'gone-1')\n"


def test_stats_ids_and_exclude_ids_summarise_the_rows_pandas_selects(data, tmp_path, capsys):
    """stats --ids summarises the listed rows, --exclude-ids the others, each with --where by AND: rows, groups,
    lengths and rewards per source and overall equal pandas' on the input records of those rows."""
    df, tok = data["df"], data["tok"]
    df = df.assign(
        tokens=[len(tok(p)["input_ids"]) + len(tok(c)["input_ids"]) + 1 for p, c in zip(df.prompt, df.completion)]
    )
    listed = ["b1-3", "b0-0", "gone-1", "b0-5", "b1-0", "b1-7", "b0-2"]
    f = _ids_file(tmp_path / "flagged.txt", listed)
    cases = [
        ({"ids": str(f)}, df[df.row_id.isin(listed)]),
        ({"exclude_ids": str(f)}, df[~df.row_id.isin(listed)]),
        ({"ids": str(f), "where": "reward > 0"}, df[df.row_id.isin(listed) & (df.reward > 0)]),
        ({"exclude_ids": str(f), "where": "source = 'b'"}, df[~df.row_id.isin(listed) & (df.source == "b")]),
    ]
    for options, want in cases:
        assert 1 < len(want) < len(df) and want.source.nunique() == 2 or "where" in options, options
        stats, _ = buffer_stats(data["ab"], **options)
        assert stats["rows"] == len(want), options
        assert stats["group_sizes"] == want.groupby("group").size().value_counts().sort_index().to_dict()
        assert sorted(stats["sources"]) == sorted(want.source.unique())
        for name, part in [("all", want), *want.groupby("source")]:
            s = stats["all"] if name == "all" else stats["sources"][name]
            assert s["rows"] == len(part) and s["groups"] == part.group.nunique(), (options, name)
            for key, fn in (("mean", "mean"), ("min", "min"), ("max", "max")):
                assert s["reward"][key] == pytest.approx(getattr(part.reward, fn)(), abs=1e-12), (options, name)
                assert s["tokens"][key] == pytest.approx(getattr(part.tokens, fn)(), abs=1e-12), (options, name)
            if len(part) > 1:
                assert s["reward"]["std"] == pytest.approx(part.reward.std(), abs=1e-12)
            assert s["tokens"]["p50"] == pytest.approx(part.tokens.median())
    assert len(df[df.row_id.isin(listed)]) == 6  # by hand: every listed id but gone-1
    capsys.readouterr()  # (the warnings of the calls above)
    code, stdout, err = run(capsys, "stats", data["ab"], "--ids", f, "--where", "reward > 0")
    n = len(df[df.row_id.isin(listed) & (df.reward > 0)])
    assert code == 0 and stdout.startswith(
        f"shiq-data: stats of {data['ab']} ({n} rows listed in {f}, where reward > 0)\n"
    )
    assert err == f"shiq-data: warning: --ids {f}: 1 of 7 listed row ids is not in {data['ab']} (first: 'gone-1')\n"
    code, stdout, err = run(capsys, "stats", data["ab"], "--exclude-ids", f)
    assert code == 0 and f"({len(df) - 6} rows not listed in {f})" in stdout


@pytest.mark.parametrize("verb", ["show", "stats"])
def test_show_and_stats_refuse_ids_as_filter_does(data, tmp_path, capsys, verb):
    """Both lists together, show's --id with a list, and a list filter refuses (empty, a blank line, not UTF-8, a
    folder): one line naming the option and file (and line), exit status 2, nothing printed."""
    good = _ids_file(tmp_path / "good.txt", ["b0-1"])
    empty = _ids_file(tmp_path / "empty.txt", [])
    blank = _ids_file(tmp_path / "blank.txt", ["b0-1", "", "b0-2"])
    latin1 = _ids_file(tmp_path / "latin1.txt", ["caf\xe9".encode("latin-1")])
    cases = [
        (["--ids", good, "--exclude-ids", good], f"--ids {good} and --exclude-ids {good}: give one of them"),
        (["--ids", empty], f"--ids {empty}: lists no row id (one row id a line)"),
        (["--exclude-ids", empty, "--where", "reward > 0"], f"--exclude-ids {empty}: lists no row id"),
        (["--ids", blank], f"--ids {blank}: line 2: field 'row_id': blank (one row id a line, no blank lines)"),
        (["--ids", latin1], f"--ids {latin1}: line 1: field 'row_id': not valid UTF-8 (byte 0xe9 at byte 4 of"),
        (["--exclude-ids", tmp_path], f"--exclude-ids {tmp_path} is a folder: give a file of row ids"),
    ]
    if verb == "show":
        cases += [
            (["--id", "b0-1", "--ids", good], f"--id b0-1 and --ids {good}: give one of them"),
            (["--exclude-ids", good, "--id", "b0-1"], f"--id b0-1 and --exclude-ids {good}: give one of them"),
        ]
    for options, start in cases:
        code, stdout, err = run(capsys, verb, data["ab"], *options)
        assert code == 2 and stdout == "", (options, err)
        assert err.startswith("shiq-data: error: " + start) and err.count("\n") == 1, (options, err)
        assert "Traceback" not in err


def test_filter_ids_at_scale(tmp_path, capsys, monkeypatch):
    """200,000 listed ids (a labelling pass's, most of them of rows not in this part of the data) against a
    buffer of 20,000 rows in 7 shards: read as a stream, the rows kept and dropped are exactly Python's set
    membership, and the stale ids are counted. The list's hash table (built anew by every ``index_in`` call,
    about 0.17 s a million ids) is built once for the whole buffer, not once per shard; with a list of 10 ids
    it is built per shard, as that is then cheap."""
    import pyarrow.compute as pc

    import shiq_data.curate.ids as ids_module

    calls, index_in = [], pc.index_in
    monkeypatch.setattr(ids_module.pc, "index_in", lambda *a, **k: calls.append(1) or index_in(*a, **k))
    n = 20_000
    _, info = load_tokenizer("gpt2")
    rows = (
        {
            "source": "s",
            "group_id": i,
            "prompt_len": 1,
            "tokens": [1, 2, 3 + i % 7],
            "action_mask": [False, True, True],
            "rewards": [0.0, 0.0, float(i % 3 - 1)],
        }
        for i in range(n)
    )
    buf = tmp_path / "big"
    write_buffer(rows, buf, tokenizer_info=info, command=["test"], shard_rows=3000, progress=False)
    rng = random.Random(0)
    present = [f"b0-{i}" for i in rng.sample(range(n), n // 4)]
    listed = present + [f"b9-{i}" for i in range(200_000 - len(present))]
    rng.shuffle(listed)
    f = _ids_file(tmp_path / "ids.txt", listed)
    all_ids = ids(buf)
    wanted = set(listed)
    code, stdout, err = run(capsys, "filter", buf, "--ids", f, "--out", tmp_path / "keep", "--no-progress")
    assert code == 0 and ids(tmp_path / "keep") == [i for i in all_ids if i in wanted]
    first_gone = next(i for i in listed if i.startswith("b9-"))
    assert (
        err
        == f"shiq-data: warning: --ids {f}: 195,000 of 200,000 listed row ids are not in {buf} (first: {first_gone!r})\n"
    )
    code, stdout, err = run(
        capsys, "filter", buf, "--exclude-ids", f, "--where", "reward > 0", "--out", tmp_path / "drop", "--no-progress"
    )
    assert code == 0, err
    m, kept = read_rows(tmp_path / "drop")
    assert [r["row_id"] for r in kept] == [i for k, i in enumerate(all_ids) if i not in wanted and k % 3 == 2]
    assert m["curation"]["exclude_ids"]["ids"] == 200_000 and m["curation"]["rows_read"] == n
    assert len(calls) == 2  # one a command
    few = _ids_file(tmp_path / "few.txt", [f"b0-{i}" for i in range(0, n, n // 10)])
    code, _, err = run(capsys, "filter", buf, "--ids", few, "--out", tmp_path / "few", "--no-progress")
    assert code == 0 and ids(tmp_path / "few") == [f"b0-{i}" for i in range(0, n, n // 10)], err
    assert len(calls) == 2 + 7  # one a shard
    import shiq_data.curate.filter as filter_module

    monkeypatch.setattr(filter_module, "HELD_SHARDS", 3)  # a lookup holds at most this many mapped shards
    code, _, err = run(capsys, "filter", buf, "--ids", f, "--out", tmp_path / "held", "--no-progress")
    assert code == 0 and ids(tmp_path / "held") == ids(tmp_path / "keep"), err
    assert len(calls) == 2 + 7 + 3  # shards 1-3, 4-6, 7


@pytest.mark.parametrize(
    ("argv", "decoded"),
    [
        (["split", "--by", "prompt", "--test-fraction", "0.5"], {"prompt"}),
        (["dedup", "--by", "prompt"], {"prompt"}),
        (["dedup", "--by", "completion"], {"completion"}),
        (["dedup"], {"prompt", "completion"}),
        (["decontaminate", "--by", "prompt", "--against", "EVAL"], {"prompt"}),
        (["decontaminate", "--by", "completion", "--against", "EVAL"], {"completion"}),
    ],
)
def test_verbs_decode_only_the_text_they_compare(tmp_path, capsys, monkeypatch, argv, decoded):
    """A buffer without text columns is compared by its decoded tokens: a verb comparing prompts decodes the
    prompt tokens alone, not the (long) completions too, and one comparing completions decodes only those.
    The rows kept are those the text compared gives."""
    import shiq_data.curate.rows as rows_module

    tok, info = load_tokenizer("gpt2")
    prompts = ["the cat sat on the mat", "a dog ran far away", "the cat sat on the mat"]
    completions = [" and then it slept for a long time in the sun", " yes", " and then it slept for a long time"]
    rows = []
    for i, (p, c) in enumerate(zip(prompts * 4, completions * 4)):
        p_ids, c_ids = tok.encode(p), tok.encode(c + f" number {i // 3}")
        ids = p_ids + c_ids
        rows.append(
            {
                "source": "s",
                "group_id": i,
                "prompt_len": len(p_ids),
                "tokens": ids,
                "action_mask": [False] * len(p_ids) + [True] * len(c_ids),
                "rewards": [0.0] * len(ids),
            }
        )
    buf = tmp_path / "buf"
    write_buffer(rows, buf, tokenizer_info=info, command=["test"], text_columns=False, progress=False)
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text("the cat sat on the mat\nand then it slept for a long time\n")
    seen = set()

    class Spy:
        def __init__(self, tok):
            self.tok = tok

        def batch_decode(self, ids, **kw):
            texts = self.tok.batch_decode(ids, **kw)
            seen.update("prompt" if t.startswith(("the cat", "a dog")) else "completion" for t in texts)
            return texts

    load = rows_module._load_tokenizer
    monkeypatch.setattr(rows_module, "_load_tokenizer", lambda name: (Spy(load(name)[0]), load(name)[1]))
    args = [str(eval_file) if a == "EVAL" else a for a in argv]
    extra = ["--min-words", "6", "--ngram", "6"] if argv[0] == "decontaminate" else []
    code, _, err = run(capsys, args[0], buf, *args[1:], *extra, "--out", tmp_path / "out", "--no-progress")
    assert code == 0, err
    assert seen == decoded
    if argv[:3] == ["dedup", "--by", "prompt"]:
        assert len(open_buffer(tmp_path / "out")) == 2
    if argv[0] == "decontaminate":
        assert len(open_buffer(tmp_path / "out")) == 4  # (the rows whose compared text holds a 6-word run)


# --- shards bounded by size ----------------------------------------------------------------------------------------


def _long_records(n, seed=0, huge=None):
    """JSONL records of long documents (50 to 600 words of completion, some 1.5-5 KB of Arrow data a row), the
    one at index ``huge`` of 20,000 words."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = 20_000 if i == huge else rng.randint(50, 600)
        out.append(
            {
                "prompt": f"Document {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(5, 40))),
                "completion": " " + " ".join(rng.choices(WORDS, k=k)),
                "reward": REWARDS[i % 6],
                "lang": rng.choice(["en", "fr"]),
            }
        )
    return out


def _same_rows(want: pd.DataFrame, tables) -> None:
    """The rows of ``tables`` (a buffer's shards read by pyarrow) are ``want``'s records, in order."""
    got = pa.concat_tables(tables)
    assert got.column("prompt").to_pylist() == want.prompt.tolist()
    assert got.column("completion").to_pylist() == want.completion.tolist()
    assert got.column("reward").to_pylist() == want.reward.astype(float).tolist()
    assert [json.loads(e)["lang"] for e in got.column("extra").to_pylist()] == want.lang.tolist()


def test_build_filter_and_retokenize_cut_shards_by_shard_mib(tmp_path, capsys):
    """--shard-mib bounds a shard's file besides --shard-rows: on build (rows one by one), on a curated write
    (filter: the kept rows of each shard as tables, packed again up to the bound) and on retokenize, which take
    the parent's bound unless given one. Shards read with pyarrow alone; rows and order as pandas reads the input."""
    src = write_jsonl(tmp_path / "docs.jsonl", _long_records(90))
    df = pd.read_json(src, lines=True)
    bound = 64 * 1024
    argv = ["build", "jsonl", src, "--tokenizer", "gpt2", "--shard-rows", 1000, "--shard-mib", 0.0625]
    assert run(capsys, *argv, "--out", tmp_path / "b", "--no-progress")[0] == 0
    tables = check_shards_by_size(tmp_path / "b", bound, 1000)
    assert len(tables) >= 4 and open_buffer(tmp_path / "b").manifest["shard_bytes"] == bound
    _same_rows(df, tables)
    code, _, err = run(
        capsys, "filter", tmp_path / "b", "--where", "reward > 0", "--out", tmp_path / "f", "--no-progress"
    )
    assert code == 0, err
    assert open_buffer(tmp_path / "f").manifest["shard_bytes"] == bound
    kept = check_shards_by_size(tmp_path / "f", bound, 1000)
    assert len(kept) < len(tables)  # the kept rows of several shards share one
    _same_rows(df[df.reward > 0], kept)
    for extra, want in (([], bound), (["--shard-mib", 0.03125], 32 * 1024)):
        out = tmp_path / f"r{want}"
        code, _, err = run(
            capsys, "retokenize", tmp_path / "b", "--tokenizer", "gpt2", "--out", out, *extra, "--no-progress"
        )
        assert code == 0, err
        assert open_buffer(out).manifest["shard_bytes"] == want
        _same_rows(df, check_shards_by_size(out, want, 1000))


def test_a_buffer_of_shards_above_the_bound_is_curated_into_shards_within_it(tmp_path, capsys, monkeypatch):
    """A buffer written before the bound (one shard of every row, no ``shard_bytes`` in its manifest) is read as
    one of the default bound (made 64 KiB here): a curation verb's output is cut by it from the kept rows of that
    shard, one table, and a row larger than the bound is a shard alone."""
    src = write_jsonl(tmp_path / "docs.jsonl", _long_records(80, seed=1, huge=41))
    df = pd.read_json(src, lines=True)
    argv = ["build", "jsonl", src, "--tokenizer", "gpt2", "--shard-rows", 1000, "--out", tmp_path / "old"]
    assert run(capsys, *argv, "--no-progress")[0] == 0
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 1 and manifest["shards"][0]["bytes"] > 500_000
    del manifest["shard_bytes"]
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    bound = 64 * 1024
    monkeypatch.setattr(buffer_module, "DEFAULT_SHARD_BYTES", bound)
    leaked = write_jsonl(tmp_path / "eval.jsonl", [" ".join(df.completion[10].split()[:20])])  # row 10's words
    for verb, where, want in (
        ("filter", ["--where", "lang = 'en' OR tokens > 10000"], df[(df.lang == "en") | (df.index == 41)]),
        ("decontaminate", ["--against", leaked], df.drop(index=10)),
    ):
        out = tmp_path / verb
        code, _, err = run(capsys, verb, tmp_path / "old", *where, "--out", out, "--no-progress")
        assert code == 0, err
        assert open_buffer(out).manifest["shard_bytes"] == bound
        tables = check_shards_by_size(out, bound, 1000)
        assert len(tables) >= 5
        alone = [t for t in tables if "Document 41:" in t.column("prompt")[0].as_py()]
        assert len(alone) == 1 and alone[0].num_rows == 1 and stream_size(alone[0]) > bound
        _same_rows(want, tables)


def test_stats_columns_stay_aligned_for_long_rows_and_large_counts():
    """A buffer of rows of a million tokens printed its median as 1e+06 and, its cell wider than the column, pushed
    the columns after it out of line with their headings: each column now widens to its widest value."""
    one = {
        "rows": 12_345_678,
        "groups": 9_876_543,
        "tokens": {"mean": 1_000_000.5, "p50": 1_000_000.0, "max": 2_000_001},
        "prompt_tokens": {"mean": 10.0},
        "completion_tokens": {"mean": 999_990.5, "max": 2_000_000},
        "reward": {"mean": 0.5, "std": 0.25, "min": -1.0, "max": 2.0},
        "ref_share": 1.0,
    }
    table = format_stats({"rows": 1, "all": one, "sources": {"s": one}, "group_sizes": {1: 3}}, "title")
    head, overall, source = table.splitlines()[1:4]
    assert "1000000.5/1000000/2000001" in overall and "e+" not in overall
    for heading in ("rows", "groups", "tokens mean/p50/max", "actions mean/max", "reward mean", "ref"):
        end = head.index(heading) + len(heading)  # right-aligned: every value ends under its heading's end
        assert end == len(overall) or overall[end] == " ", heading
        assert overall[end - 1] != " " and source[end - 1] != " ", heading
    assert overall.split()[2:4] == ["12345678", "9876543"] and overall.endswith("100%")
