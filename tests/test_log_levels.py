"""Progress and status lines go through Python logging at the level a command is given (``--log-level``,
``logging.level`` of shiq-train): INFO (the default) shows what the commands always showed, WARNING keeps
warnings only, DEBUG adds details, and a command's result on stdout is not affected.

Checked on ``shiq-eval run`` (its per-model progress lines, and the resolved suite at DEBUG, which is compared
with suite.json), ``shiq-data append`` (its warning about repeated rows, whatever side of the subcommand the
flag is on), the recipes' progress lines and the one-line refusal of a level that does not exist.
"""

import json
import logging

import pytest
from test_eval_cli import tiny_hf_folder  # (a tiny Llama folder with a word-level tokenizer)

from shiq_data.cli_common import setup_logging


@pytest.fixture(autouse=True)
def default_level():
    yield
    setup_logging("INFO")  # as every command's start would leave it


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    return tiny_hf_folder(tmp_path_factory.mktemp("tiny") / "init")


def eval_run(tmp_path, init, out, *level):
    from shiq_eval.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1}"}) + "\n" for i in range(3, 6)))
    args = ["run", str(init), "--reference", str(init), "--out", str(tmp_path / out), "--prompts", str(prompts)]
    return main([*args, "--scorer", "python:scorer_functions:length_and_letters", "--max-new-tokens", "3", *level])


def test_eval_progress_lines_follow_the_log_level(tmp_path, capsys, init):
    capsys.readouterr()
    assert eval_run(tmp_path, init, "info") == 0
    info = capsys.readouterr()
    lines = [line for line in info.err.splitlines() if "sample estimate" in line]
    assert len(lines) == 1 and lines[0].startswith("init (") and "step 0: reward" in lines[0], info.err
    assert "shiq-eval: 1 model and the reference on 3 prompts" in info.out  # the result line, on stdout

    assert eval_run(tmp_path, init, "warning", "--log-level", "WARNING") == 0
    quiet = capsys.readouterr()
    assert "sample estimate" not in quiet.err and "suite custom" not in quiet.err, quiet.err
    assert "shiq-eval: 1 model and the reference on 3 prompts" in quiet.out  # results are not logging

    assert eval_run(tmp_path, init, "debug", "--log-level", "debug") == 0
    debug = capsys.readouterr()
    suite = json.loads((tmp_path / "debug" / "suite.json").read_text())
    want = f"shiq-eval: suite custom ({suite['sha256']}): {json.dumps(suite['content'], sort_keys=True)}"
    assert want in debug.err.splitlines(), debug.err
    assert sum("sample estimate" in line for line in debug.err.splitlines()) == 1


def test_a_lone_process_with_a_rank_left_in_its_environment_reports_and_writes(tmp_path, capsys, init, monkeypatch):
    """A ``RANK`` without a ``WORLD_SIZE`` above 1 (a variable a job script left, no torchrun launch) is no rank of
    a launch: the lone process logs at the level given and writes its results, as rank 0 of a launch does (it
    logged errors only and wrote nothing, silently); the process group it would start is of rank 0."""
    from shiq_train.parallel import ParallelConfig, distributed

    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    capsys.readouterr()
    assert eval_run(tmp_path, init, "ranked") == 0
    got = capsys.readouterr()
    assert "shiq-eval: 1 model and the reference on 3 prompts" in got.out
    assert any("sample estimate" in line for line in got.err.splitlines()), got.err
    rows = json.loads((tmp_path / "ranked" / "results.json").read_text())
    assert len(rows) == 2  # the reference and the model
    import torch.distributed as dist

    with distributed(ParallelConfig(backend="gloo")):
        assert (dist.get_rank(), dist.get_world_size()) == (0, 1)


def test_data_warning_shows_at_warning_and_not_at_error(tmp_path, capsys, tokenizers_once):
    from shiq_data.cli import main

    rows = [{"prompt": "Hello world", "completion": " again", "reward": 1.0}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    buf = str(tmp_path / "buf")
    assert (
        main(["build", "jsonl", str(tmp_path / "a.jsonl"), "--tokenizer", "gpt2", "--out", buf, "--no-progress"]) == 0
    )
    append = ["append", buf, "jsonl", str(tmp_path / "a.jsonl"), "--no-progress"]
    capsys.readouterr()
    for level, shown in [(["--log-level", "WARNING"], True), (["--log-level", "ERROR"], False), ([], True)]:
        assert main([*append, *level]) == 0
        res = capsys.readouterr()
        assert ("shiq-data: warning: 1 appended row(s) repeat" in res.err) == shown, (level, res.err)
        assert f"shiq-data: appended {tmp_path / 'a.jsonl'} to {buf}" in res.out
    assert main(["--log-level", "ERROR", *append]) == 0  # before the subcommand too
    assert "repeat" not in capsys.readouterr().err


def test_recipe_progress_lines_and_bad_levels(capsys):
    from shiq_data.cli import main
    from shiq_eval.recipes.common import logger

    log = logger("shiq-demo", "shiq_eval.recipes.demo")
    setup_logging("INFO")
    log("reward model: held-out Pearson r = 0.5")
    setup_logging("WARNING")
    log("not shown")
    assert capsys.readouterr().err == "[shiq-demo] reward model: held-out Pearson r = 0.5\n"
    assert logging.getLogger("shiq_eval.recipes.demo").getEffectiveLevel() == logging.WARNING
    # a module run with python -m logs as __main__: its lines follow the level too
    main_log = logger("shiq-bfcl", "__main__")
    main_log("not shown either")
    setup_logging("INFO")
    main_log("data: done earlier, skipped")
    assert capsys.readouterr().err == "[shiq-bfcl] data: done earlier, skipped\n"

    with pytest.raises(SystemExit) as done:
        main(["info", "x", "--log-level", "LOUD"])
    assert done.value.code == 2 and "--log-level: invalid choice: 'LOUD'" in capsys.readouterr().err

    from shiq_train.trainer import LoggingConfig

    assert LoggingConfig(level="debug").level == "debug"
    with pytest.raises(ValueError, match=r"logging.level must be one of \['DEBUG', 'INFO', 'WARNING', 'ERROR'\]"):
        LoggingConfig(level="LOUD")


def shown_lines(err: str) -> list[str]:
    """What a terminal shows of ``err``: each line's text after its last carriage return (a bar redraws
    itself over its line with one)."""
    return [line.rsplit("\r", 1)[-1] for line in err.rstrip("\n").split("\n")]


@pytest.mark.parametrize("verb", ["build", "append"])
def test_a_warning_in_the_middle_of_a_progress_bar_is_a_line_of_its_own(
    tmp_path, capsys, smollm2, tokenizers_once, verb
):
    """A warning logged while build's or append's bar was drawn (a message key the chat template may leave out)
    was written after the bar's text on its line ('building b: 0 rows [...]shiq-data: warning: ...'); the bar is
    now wiped first and drawn again below the warning, where it goes on to its last count."""
    from shiq_data.cli import main

    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    rows = [{"prompt": "Hi", "completion": [{"role": "assistant", "content": "a", "tool_calls": [call]}], "reward": 1}]
    inp = tmp_path / "tc.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    buf = tmp_path / "b"
    if verb == "append":
        plain = tmp_path / "plain.jsonl"
        plain.write_text(json.dumps({"prompt": "Hi", "completion": "a", "reward": 1}) + "\n")
        assert main(["build", "jsonl", str(plain), "--tokenizer", "smollm2", "--out", str(buf)]) == 0
        capsys.readouterr()
        argv, bar = ["append", str(buf), "jsonl", str(inp)], "appending to b: "
    else:
        argv, bar = ["build", "jsonl", str(inp), "--tokenizer", "smollm2", "--out", str(buf)], "building b: "
    assert main(argv) == 0
    err = capsys.readouterr().err
    shown = shown_lines(err)
    warned = [line for line in shown if "warning" in line]
    assert len(warned) == 1 and warned[0].startswith("shiq-data: warning: "), err
    assert bar in err.split("warning")[0], err  # the bar was on screen when the warning came
    assert shown[-1].startswith(bar + "3 rows"), err  # and it is kept, with its last count, below the warning


def test_an_error_after_a_bar_left_open_starts_on_a_clean_line(capsys):
    """A bar updated by hand and left open when its work raised (``shiq-data dedup``'s 'near pairs', stopped by
    an error or Ctrl-C) had the command's error written after its text; the bar is now wiped before the error
    line."""
    import sys

    from tqdm.auto import tqdm

    from shiq_data.cli_common import run_command

    def work():
        bar = tqdm(desc="near pairs", unit=" pairs", file=sys.stderr)
        bar.update(2)
        raise ValueError("shard-00001.arrow: sha256 differs")

    assert run_command("shiq-data", work) == 2
    err = capsys.readouterr().err
    assert "near pairs" in err and shown_lines(err) == ["shiq-data: error: shard-00001.arrow: sha256 differs"], err


def test_a_library_warning_in_the_middle_of_a_progress_bar_is_a_line_of_its_own(tmp_path):
    """A Python warning a library gives while a command's bar is drawn (torch's at a training's first step) was
    written after the bar's text on its line ('train sft:   0%|...|/.../functional.py:3006: UserWarning: ...');
    once a command has set up its logging, the bar is wiped first and drawn again below the warning."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "warns.py"
    script.write_text(
        "import sys, warnings\n"
        "from tqdm.auto import tqdm\n"
        "from shiq_data.cli_common import setup_logging\n"
        "setup_logging('INFO')\n"
        "for step in tqdm(range(2), desc='train sft', file=sys.stderr):\n"
        "    if step == 0:\n"
        "        warnings.warn('a library warning')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    shown = shown_lines(res.stderr)
    warned = [line for line in shown if "UserWarning" in line]
    assert len(warned) == 1 and "train sft" not in warned[0], res.stderr
    assert "train sft" in res.stderr.split("UserWarning")[0] and shown[-1].startswith("train sft: 100%"), res.stderr


def test_a_bar_made_or_closed_by_another_thread_meanwhile_does_not_end_a_log_line(capsys, monkeypatch):
    """tqdm's list of open bars is a set another thread changes when it makes or closes a bar; reading it just
    then raised 'Set changed size during iteration' out of the log call, which ended the command as an error.
    The list is read again, and a line is never lost to it."""
    import sys

    from tqdm.auto import tqdm

    bar = tqdm(total=3, desc="work", file=sys.stderr)
    try:
        calls = []

        class Changing:  # the set as another thread leaves it: changed while read, twice
            def __iter__(self):
                calls.append(1)
                if len(calls) <= 2:
                    raise RuntimeError("Set changed size during iteration")
                return iter([bar])

        monkeypatch.setattr(type(bar), "_instances", Changing())
        setup_logging("INFO")
        logging.getLogger("shiq_data.test").warning("shiq-data: warning: a line")
        assert len(calls) == 3
        shown = shown_lines(capsys.readouterr().err)
        assert "shiq-data: warning: a line" in shown  # on a line of its own: the bar was wiped first
    finally:
        monkeypatch.undo()  # (tqdm's own set back, for the bar's close to leave it)
        bar.close()
