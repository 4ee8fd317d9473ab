"""``shiq-data build/append --workers N``: the same buffer as one process, byte for byte, and the same errors."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from data_cli_runs import run, write_jsonl

import shiq_data.readers.parallel as parallel
from shiq_data.buffer import open_buffer

pytestmark = pytest.mark.usefixtures("tokenizers_once")


def records(n: int, start: int = 0) -> list[dict]:
    """Generic records in every shape the jsonl reader takes: prompts repeated far apart (their groups span
    many chunks), explicit groups, TRL pairs and labels, extra fields."""
    out = []
    for i in range(start, start + n):
        prompt = f"Question {i % 23}: what is {i % 23} times seven?"
        if i % 10 == 3:
            out.append({"prompt": prompt, "chosen": f" {7 * (i % 23)}", "rejected": " no idea", "source": "pairs"})
        elif i % 10 == 7:
            out.append({"prompt": f"Is {i} even?", "completion": " yes" if i % 2 else " no", "label": i % 2 == 0})
        else:
            rec = {"prompt": prompt, "completion": f" answer {i} " * (1 + i % 4), "reward": (i % 11) / 3 - 1}
            rec.update(source=["alpha", "beta"][i % 2], score=i % 5, tags=[f"t{i % 3}"])
            if i % 13 == 0:
                rec["group"] = f"g{i % 3}"
            out.append(rec)
    return out


def same_buffer(a: Path, b: Path) -> None:
    """Every shard of ``a`` equals ``b``'s byte for byte; the manifests are equal but for the command lines
    and times they record."""
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert [s["file"] for s in ma["shards"]] == [s["file"] for s in mb["shards"]]
    for s in ma["shards"]:
        assert (a / s["file"]).read_bytes() == (b / s["file"]).read_bytes(), s["file"]

    def strip(m):
        m = {k: v for k, v in m.items() if k not in ("created", "updated")}
        m["commands"] = [{k: v for k, v in c.items() if k not in ("argv", "time")} for c in m["commands"]]
        return m

    assert strip(ma) == strip(mb)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(parallel, "CHUNK", 16)  # many chunks in flight, out of order completions possible


def test_build_with_two_workers_equals_one(tmp_path, capsys, small_chunks):
    inp = write_jsonl(tmp_path / "in.jsonl", records(300))
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"w{workers}"
        code, stdout, err = run(
            capsys, "build", "jsonl", inp, "--tokenizer", "gpt2", "--out", outs[workers], "--shard-rows", 64,
            "--workers", workers, "--no-progress",
        )  # fmt: skip
        assert code == 0, err
    same_buffer(outs[1], outs[2])
    m = json.loads((outs[2] / "manifest.json").read_text())
    # 300 records, 30 of them pairs: 330 rows; groups: 23 prompts + 3 explicit groups + 30 "Is i even?" prompts
    # + 30 pairs (each its own group)
    assert m["rows"] == 330 and len(m["shards"]) == 6 and m["next_group_id"] == 23 + 3 + 30 + 30
    assert m["commands"][0]["argv"][-3:] == ["--workers", "2", "--no-progress"]


def test_long_prompts_are_numbered_as_pandas_factorizes_them(tmp_path, capsys, small_chunks):
    """Groups are numbered by a digest of the prompt, not the prompt: 3,000-character prompts differing only in
    their last characters, repeated far apart (across chunks), get the group ids ``pd.factorize`` gives the
    input's prompt column (first appearance order), in one process and with two workers."""
    base = "a long shared prefix " * 150
    recs = [{"prompt": f"{base}{(7 * i) % 11}", "completion": f" c{i}", "reward": i % 3 - 1.0} for i in range(60)]
    inp = write_jsonl(tmp_path / "in.jsonl", recs)
    want = pd.factorize(pd.read_json(inp, lines=True, dtype=False)["prompt"])[0].tolist()
    assert len(set(want)) == 11 and want[:11] == list(range(11)) and len(recs[0]["prompt"]) > 3000
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        code, _, err = run(
            capsys, "build", "jsonl", inp, "--tokenizer", "gpt2", "--out", out, "--workers", workers, "--no-progress"
        )
        assert code == 0, err
        assert open_buffer(out).columns(["group_id"]).column("group_id").to_pylist() == want


def test_append_with_two_workers_equals_one(tmp_path, capsys, small_chunks):
    first = write_jsonl(tmp_path / "a.jsonl", records(40))
    more = write_jsonl(tmp_path / "b.jsonl", records(120, start=35))  # repeats 5 rows of the buffer
    base = tmp_path / "base"
    assert run(capsys, "build", "jsonl", first, "--tokenizer", "gpt2", "--out", base, "--no-progress")[0] == 0
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"w{workers}"
        shutil.copytree(base, outs[workers])
        code, _, err = run(capsys, "append", outs[workers], "jsonl", more, "--workers", workers, "--no-progress")
        assert code == 0, err
        assert "5 appended row(s) repeat" in err  # the records 35..39 (none a pair)
    same_buffer(outs[1], outs[2])


def _corrupt(recs: list[dict], kind: str) -> tuple[list[str], str]:
    """JSONL lines of ``recs`` with line 150 broken; what the error must name."""
    lines = [json.dumps(r) for r in recs]
    if kind == "reader":  # found by the reader, in a worker
        lines[149] = json.dumps({"prompt": "p", "completion": " c", "reward": "high"})
        return lines, "in.jsonl: line 150: field 'reward': must be a number, got str"
    if kind == "row check":  # found by the buffer's row check (beyond float32), in the main process
        lines[149] = json.dumps({"prompt": "p", "completion": " c", "reward": 1e39})
        return lines, "in.jsonl: line 150: field 'reward': reward 1e+39 at position 2 does not fit in float32"
    lines[149] = '{"prompt": "p", "completion": '  # bad JSON: found while reading, in the main process
    return lines, "in.jsonl: line 150: field '*': not valid JSON"


@pytest.mark.parametrize("kind", ["reader", "row check", "json"])
def test_bad_row_gives_the_one_process_error(tmp_path, capsys, small_chunks, kind):
    lines, says = _corrupt(records(300), kind)
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    errors = []
    for workers in (1, 2):
        out = tmp_path / "sub" / f"w{workers}"
        code, stdout, err = run(
            capsys, "build", "jsonl", inp, "--tokenizer", "gpt2", "--out", out, "--workers", workers, "--no-progress"
        )
        assert code == 2 and stdout == ""
        assert len(err.strip().splitlines()) == 1 and err.startswith("shiq-data: error: ") and says in err, err
        assert not (tmp_path / "sub").exists()  # nothing half-written, not even the parent folder
        errors.append(err)
    assert errors[0] == errors[1]


def test_workers_must_be_positive(tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", records(3))
    code, _, err = run(capsys, "build", "jsonl", inp, "--tokenizer", "gpt2", "--out", tmp_path / "o", "--workers", 0)
    assert code == 2 and "--workers must be at least 1, got 0" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("workers", [1025, 10**20])
def test_workers_past_the_limit_are_refused_naming_the_option(tmp_path, capsys, workers):
    """--workers of 10**20 ended in 'OverflowError: Python int too large to convert to C int', naming no option
    (and 2**31 - 1 would have started that many processes): refused before any is started, nothing written."""
    inp = write_jsonl(tmp_path / "in.jsonl", records(3))
    code, _, err = run(
        capsys, "build", "jsonl", inp, "--tokenizer", "gpt2", "--out", tmp_path / "o", "--workers", workers
    )
    assert (
        code == 2
        and err == f"shiq-data: error: --workers must be at most 1024 (processes started at once), got {workers}\n"
    )
    assert not (tmp_path / "o").exists()


def test_chat_formats_with_two_workers_equal_one(tmp_path, capsys, smollm2, monkeypatch):
    """hh (a group per line), multiturn (groups by a "group" field across chunks)."""
    monkeypatch.setattr(parallel, "CHUNK", 4)
    hh = [
        {"chosen": f"\n\nHuman: add {i} and 1\n\nAssistant: {i + 1}", "rejected": f"\n\nHuman: add {i} and 1\n\n"
         f"Assistant: {i}", "id": i}
        for i in range(24)
    ]  # fmt: skip
    mt = [
        {
            "messages": [
                {"role": "user", "content": f"count to {i % 5}"},
                {"role": "assistant", "content": " ".join(map(str, range(i % 5 + 1))), "reward": i / 7},
            ],
            **({"group": f"c{i % 5}"} if i % 3 else {}),
        }
        for i in range(30)
    ]
    for fmt, recs in (("hh", hh), ("multiturn", mt)):
        inp = write_jsonl(tmp_path / f"{fmt}.jsonl", recs)
        for workers in (1, 2):
            out = tmp_path / f"{fmt}-{workers}"
            code, _, err = run(
                capsys, "build", fmt, inp, "--tokenizer", "smollm2", "--out", out, "--workers", workers, "--no-progress"
            )
            assert code == 0, err
        same_buffer(tmp_path / f"{fmt}-1", tmp_path / f"{fmt}-2")


@pytest.mark.parametrize(
    "first", [{"prompt": "p", "completion": " c", "reward": "high"}, {"prompt": "p<|endoftext|>", "completion": " c"}]
)
def test_a_bad_line_before_an_unreadable_one_is_named_with_workers(tmp_path, capsys, small_chunks, first):
    """With --workers, a line the input could not be read past (bad JSON) dropped the records of its chunk read
    before it, so a bad record among them went unreported and the later line was named; one process names it."""
    lines = [json.dumps(r) for r in records(300)]
    lines[149] = json.dumps({"reward": 1.0, **first})
    lines[151] = '{"prompt": "p", "completion": '  # lines 145..160 are one chunk
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    field = "reward" if first.get("reward") == "high" else "prompt"
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        code, stdout, err = run(
            capsys, "build", "jsonl", inp, "--tokenizer", "gpt2", "--out", out, "--workers", workers, "--no-progress"
        )
        assert code == 2 and len(err.strip().splitlines()) == 1 and not out.exists(), err
        assert f"in.jsonl: line 150: field '{field}': " in err, (workers, err)
