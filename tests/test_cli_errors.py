"""Bad input through every command: exit status 2, one line on stderr naming the file, row or key, no traceback.

Each case runs the command as a user would (``python -m ...`` in a subprocess, this checkout first on the path)
on files made here: one tiny buffer, damaged copies of it, and damaged run folders. The warnings and notices
megatron-core prints at import about optional libraries would break the one-line rule, so the cases that build a
model also check that start-up is quiet.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shiq_data.buffer import write_buffer

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = {"name": "test", "fingerprint": "0", "vocab_size": 128}

COMMANDS = {
    "shiq-data": ["-m", "shiq_data"],
    "shiq-train": ["-m", "shiq_train"],
    "shiq-eval": ["-m", "shiq_eval.cli"],
    "shiq-demo": ["-m", "shiq_eval.recipes.demo"],
    "shiq-toys": ["-m", "shiq_eval.recipes.toys"],
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every bad input of the corpus, under one folder."""
    d = tmp_path_factory.mktemp("bad")
    rows = [
        {
            "group_id": i // 2,
            "prompt_len": 2,
            "source": "t",
            "tokens": [1, 2, 3, 4 + i],
            "action_mask": [False, False, True, True],
            "rewards": [0.0, 0.0, 0.0, float(i)],
            "ref_chosen_logits": [0.0] * 4,
            "ref_logz": [0.0] * 4,
        }
        for i in range(4)
    ]
    write_buffer(rows, d / "buf", tokenizer_info=TOKENIZER, command=["test"], progress=False)
    shutil.copytree(d / "buf", d / "badtypes")
    manifest = json.loads((d / "badtypes" / "manifest.json").read_text())
    manifest["rows"] = "four"
    (d / "badtypes" / "manifest.json").write_text(json.dumps(manifest))

    (d / "big.jsonl").write_text('{"prompt": "a", "completion": " b", "reward": ' + "9" * 400 + "}\n")

    # run folders: a truncated rank file, and a meta.json that is not JSON
    for name in ("truncated", "garbage"):
        step = d / name / "checkpoints" / "step_00000001"
        step.mkdir(parents=True)
        meta = {"step": 1, "layout": {"tp": 1, "pp": 1, "dp": 1}, "meta": {"loss": {"name": "shiq"}, "hf_config": {}}}
        (step / "meta.json").write_text(json.dumps(meta) if name == "truncated" else "{not json")
        (step / "rank_tp0_pp0_dp0.pt").write_bytes(b"PK\x03\x04 truncated")
        digest = hashlib.sha256(b"PK\x03\x04 truncated").hexdigest()  # its checksum fits: the file is what's cut
        (step / "rank_tp0_pp0_dp0.pt.sha256").write_text(f"{digest}  rank_tp0_pp0_dp0.pt\n")
        (d / name / "checkpoints" / "latest").write_text("step_00000001\n")
    good = d / "evalrun" / "checkpoints" / "step_00000001"
    good.mkdir(parents=True)
    meta = {"loss": {"name": "shiq"}, "hf_config": {"vocab_size": 128}, "config": {"init": "none"}}
    (good / "meta.json").write_text(json.dumps({"step": 1, "layout": {"tp": 1, "pp": 1, "dp": 1}, "meta": meta}))
    (good / "rank_tp0_pp0_dp0.pt").write_bytes(b"")  # a placeholder: the refusals below come before weights are read
    (d / "rm.safetensors").write_text("this is not a safetensors file")
    (d / "prompts.jsonl").write_text('{"prompt": "a"}\n')
    (d / "afile").write_text("not a folder")
    (d / "bad_suite.yaml").write_text("prompts: [1\n")  # YAML cut short
    (d / "nonutf8.jsonl").write_bytes(b'{"prompt": "a"}\n{"prompt": "b\xff"}\n')
    (d / "twice.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b", "prompt": "c"}\n')  # (the last won)
    (d / "listcfg").mkdir()  # a Hugging Face folder whose config.json is a JSON list
    (d / "emptydir").mkdir()  # a folder without a model (or tokenizer) in it
    (d / "listcfg" / "config.json").write_text("[]")
    (d / "listcfg" / "model.safetensors").write_bytes(b"x")
    return d


def case(command, args, *names):
    return pytest.param(command, args, names, id=f"{command} {' '.join(args)}"[:60])


CASES = [
    case(
        "shiq-data",
        ["build", "jsonl", "{d}/big.jsonl", "--tokenizer", "gpt2", "--out", "{d}/x", "--no-progress"],
        "big.jsonl",
        "reward",
    ),
    case("shiq-data", ["info", "{d}/badtypes"], "manifest.json", "'rows'"),
    # FORMAT left out: argparse took the file for it and asked for INPUT, saying nothing of FORMAT
    case(
        "shiq-data",
        ["build", "{d}/big.jsonl", "--tokenizer", "gpt2", "--out", "{d}/x"],
        "argument FORMAT: '{d}/big.jsonl' is not an input format (datasets, hh, jsonl,",
        "give FORMAT, then INPUT",
    ),
    case(
        "shiq-data",
        ["build", "datasets", "{d}/big.jsonl", "--tokenizer", "gpt2", "--out", "{d}/x", "--no-progress"],
        "{d}/big.jsonl: not a folder; 'build datasets' reads a folder written by datasets' save_to_disk",
    ),
    case(
        "shiq-data",
        ["build", "jsonl", "{d}/big.jsonl", "--tokenizer", "{d}/listcfg", "--out", "{d}/x", "--no-progress"],
        "tokenizer '{d}/listcfg': {d}/listcfg holds no tokenizer files",
    ),
    case("shiq-data", ["validate", "{d}/missing"], "{d}/missing"),
    case("shiq-train", ["data.buffer={d}/buf", "out={d}/r", "optimizer.lr=abc"], "optimizer.lr"),
    case("shiq-train", ["data.buffer={d}/buf", "out={d}/r", "train.steps=-1"], "train.steps"),
    case(
        "shiq-train", ["data.buffer={d}/buf", "out={d}/r", "data.rows_per_micro_batch=x"], "data.rows_per_micro_batch"
    ),
    case("shiq-train", ["data.buffer={d}/buf", "out={d}/r", "foo=1"], "command line: foo: no such setting"),
    case("shiq-train", ["data.buffer={d}/buf", "out={d}/r", "loss=nope"], "loss/nope"),
    case("shiq-train", ["data.buffer={d}/buf", "out={d}/r", "train.steps=[1"], "[1"),
    case("shiq-train", ["data.buffer={d}/missing", "out={d}/r"], "{d}/missing"),
    case("shiq-train", ["data.buffer={d}/buf", "out={d}/buf"], "out={d}/buf is the buffer: choose a folder outside it"),
    case(
        "shiq-train",
        ["data.buffer={d}/buf", "out={d}/buf/run"],
        "out={d}/buf/run is inside the buffer {d}/buf: choose a folder outside it",
    ),
    case(  # Q♯'s value model trains by another path: refused there too
        "shiq-train",
        ["loss=qsharp_value", "init=smollm2", "data.buffer={d}/buf", "out={d}/buf/run"],
        "out={d}/buf/run is inside the buffer {d}/buf: choose a folder outside it",
    ),
    case("shiq-train", ["data.buffer={d}/buf", "out={d}/afile"], "out={d}/afile is a file"),
    case("shiq-train", ["data.buffer={d}/buf", "out={d}/r", "=5"], "argument '=5' has no key: expected key=value"),
    case("shiq-train", ["data.buffer={d}/buf", "out={d}/r", "~loss"], "the section 'loss' was removed"),
    case("shiq-train", ["data.buffer={d}/buf", "out={d}/r", "data=x"], "'data' is a section of options"),
    case("shiq-train", ["data.buffer={d}/badtypes", "out={d}/r"], "manifest.json", "'rows'"),
    case(
        "shiq-train",
        ["data.buffer={d}/buf", "out={d}/truncated", "+resume.force=true", "model.max_sequence_length=8"],
        "rank_tp0_pp0_dp0.pt",
    ),
    case(
        "shiq-train",
        ["data.buffer={d}/buf", "out={d}/garbage", "+resume.force=true", "model.max_sequence_length=8"],
        "meta.json",
    ),
    case("shiq-train", ["ref-stats", "{d}/missing", "--model", "smollm2"], "{d}/missing"),
    case("shiq-train", ["ref-stats", "{d}/badtypes", "--model", "smollm2"], "manifest.json", "'rows'"),
    # a missing model folder was refused as a tokenizer ("tokenizer '...': expected 'gpt2', 'smollm2' or ...")
    case("shiq-train", ["ref-stats", "{d}/buf", "--model", "{d}/nomodel"], "--model '{d}/nomodel'", "config.json"),
    case("shiq-train", ["ref-stats", "{d}/buf", "--model", "{d}/emptydir"], "--model '{d}/emptydir'", "config.json"),
    case(
        "shiq-eval",
        [
            "run",
            "{d}/garbage",
            "--out",
            "{d}/o",
            "--prompts",
            "{d}/prompts.jsonl",
            "--reward-model",
            "{d}/rm.safetensors",
        ],
        "meta.json",
    ),
    case(
        "shiq-eval",
        [
            "run",
            "{d}/evalrun",
            "--out",
            "{d}/o",
            "--prompts",
            "{d}/prompts.jsonl",
            "--reward-model",
            "{d}/rm.safetensors",
        ]
        + ["--reference", "{d}/nomodel"],
        "rm.safetensors",
    ),
    case(
        "shiq-eval",
        ["run", "{d}/listcfg", "--out", "{d}/o", "--prompts", "{d}/prompts.jsonl", "--reward-model", "{d}/rm.st"],
        "{d}/listcfg/config.json: expected a JSON object, got list",
    ),
    case(
        "shiq-eval",
        ["run", "{d}/evalrun", "--out", "{d}/o", "--suite", "{d}/bad_suite.yaml"],
        "{d}/bad_suite.yaml: not valid YAML (",
        "at line 2, column 1",
    ),
    case(
        "shiq-eval",
        ["run", "{d}/evalrun", "--out", "{d}/o", "--prompts", "{d}/nonutf8.jsonl", "--scorer", "vader"]
        + ["--reference", "{d}/nomodel"],
        "{d}/nonutf8.jsonl: line 2: field '*': not valid UTF-8 (byte 0xff",
    ),
    case(
        "shiq-eval",
        ["run", "{d}/evalrun", "--out", "{d}/o", "--prompts", "{d}/twice.jsonl", "--scorer", "vader"]
        + ["--reference", "{d}/nomodel"],
        "{d}/twice.jsonl, line 2: not valid JSON (key 'prompt' given twice in one JSON object",
    ),
    case("shiq-eval", ["bfcl", "report", "{d}/missing.jsonl"], "missing.jsonl"),
    case("shiq-demo", ["--out", "{d}/demo", "train.steps=abc"], "train.steps"),
    case("shiq-demo", ["--out", "{d}/demo", "train.nope=1"], "train.nope"),
    case("shiq-toys", ["bandit", "--quick", "--out", "{d}/afile"], "--out {d}/afile is a file: give a folder"),
    case("shiq-data", ["stats", "{d}/buf", "--plot", "{d}/afile"], "--plot {d}/afile is a file"),
    case("shiq-eval", ["leaderboard", "{d}/evalrun", "--out", "{d}/afile"], "--out {d}/afile is a file"),
    # argparse's own refusals: one line too, naming the option and where its help is (no usage block first)
    case("shiq-eval", ["run", "{d}/evalrun", "--out", "{d}/afile/sub"], "--out", "{d}/afile is a file, not a folder"),
    case(
        "shiq-eval", ["bfcl", "prompts", "--limit", "0", "--out", "{d}/x"], "--limit", "shiq-eval bfcl prompts --help"
    ),
    case("shiq-data", ["nope"], "invalid choice: 'nope'", "see shiq-data --help"),
    case("shiq-demo", ["--out", "{d}/afile/sub"], "{d}/afile is a file, not a folder"),
    case("shiq-toys", ["bandit", "--out", ""], "--out: must name a folder"),
    case("shiq-train", ["export"], "required: RUN", "see shiq-train export --help"),
    # an unknown option after a subcommand: refused by the subcommand, whose --help lists its options
    case("shiq-eval", ["run", "{d}/evalrun", "--out", "{d}/x", "--bogus"], "see shiq-eval run --help", "--bogus"),
    case("shiq-data", ["stats", "{d}/buf", "--bogus"], "shiq-data stats: error: unrecognized arguments: --bogus"),
    case(
        "shiq-data",
        ["--bogus", "stats", "{d}/buf"],
        "shiq-data: error: unrecognized arguments: --bogus (see shiq-data --",
    ),
]


def run_case(files, command, args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONWARNINGS", None)  # start-up must be quiet by itself
    env.pop("SHIQ_VERBOSE", None)
    argv = [a.format(d=files) for a in args]
    cmd = [sys.executable, *COMMANDS[command], *argv]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=files, env=env, timeout=300)


@pytest.fixture(scope="module")
def results(files):
    """Every case's finished process, run two at a time (each is mostly interpreter and import start-up)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {c.id: pool.submit(run_case, files, *c.values[:2]) for c in CASES}
        return {k: f.result() for k, f in futures.items()}


@pytest.mark.parametrize("command,args,names", CASES)
def test_bad_input_is_one_line_and_exit_status_2(request, files, results, command, args, names):
    proc = results[request.node.callspec.id]
    err = proc.stderr.strip()
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and len(err.splitlines()) == 1, err[-3000:]
    prog = "shiq-train ref-stats" if args[0] == "ref-stats" else command + (" bfcl" if args[0] == "bfcl" else "")
    # argparse names the subcommand whose options it refused (shiq-eval run: error: argument --out: ...)
    assert re.match(rf"{re.escape(prog)}( [a-z-]+)?: error: ", err), err
    for name in names:
        assert name.format(d=files) in err, err
    assert not (files / "r").exists() and not (files / "x").exists() and not (files / "demo").exists()


def test_verbose_shows_the_traceback(files):
    env = {**os.environ, "PYTHONPATH": str(REPO), "SHIQ_VERBOSE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "shiq_data", "info", str(files / "badtypes")], capture_output=True, text=True, env=env
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "'rows'" in proc.stderr


@pytest.mark.parametrize(
    "command, args, option",
    [
        ("shiq-toys", ["bandit", "--quick", "--out", "{d}/afile/x"], "--out"),
        ("shiq-data", ["build", "jsonl", "{d}/big.jsonl", "--tokenizer", "gpt2", "--out", "{d}/afile/sub"], "--out"),
        ("shiq-data", ["stats", "{d}/buf", "--plot", "{d}/afile/sub"], "--plot"),
        ("shiq-eval", ["leaderboard", "{d}/evalrun", "--out", "{d}/afile/sub"], "--out"),
    ],
)
def test_an_output_under_a_file_is_refused_before_any_work(files, command, args, option):
    """An output path below a file was refused by the operating system at the first write: "[Errno 20] Not a
    directory" naming a temporary folder (build), or after the whole work was done and printed (stats --plot).
    It is now an argument error naming the file, before anything runs."""
    proc = run_case(files, command, args)
    lines = proc.stderr.strip().splitlines()
    bad = [a for a in args if "afile/" in a][0].format(d=files)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and f"argument {option}: {bad}: {files / 'afile'} is a file, not a folder (see " in lines[0]
    assert proc.stdout == ""  # nothing ran (stats printed its whole table first)
