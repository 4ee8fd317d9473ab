"""The console commands' entry points (``shiq_data.launch``): a Ctrl-C while a command's modules are still being
imported ends in the command's line, ``PROG: interrupted``, status 130, as one while it runs does; before, Python
printed a KeyboardInterrupt traceback through the imports (20 to 50 lines in the first seconds of shiq-train)."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _ctrl_c_able():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # (a shell's background job starts with Ctrl-C ignored)


def start(args: list[str], tmp_path: Path, **env) -> subprocess.Popen:
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "SHIQ_VERBOSE": "", **env}
    return subprocess.Popen(
        [sys.executable, *args], cwd=tmp_path, env=environ, stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_able
    )


def interrupt_when(proc: subprocess.Popen, ready) -> str:
    """SIGINT to ``proc`` once ``ready()`` holds; its stderr once it has ended."""
    deadline = time.monotonic() + 60
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=60)[1]


def test_a_ctrl_c_while_the_commands_module_is_imported_ends_in_its_line(tmp_path):
    """A command module that is still importing (here one that waits at import, as torch's import takes seconds)
    when Ctrl-C comes: the one line and status 130; with SHIQ_VERBOSE=1 the traceback, as every command keeps it."""
    ready = tmp_path / "importing"
    (tmp_path / "slow_command.py").write_text(
        f"import pathlib, time\npathlib.Path({str(ready)!r}).write_text('')\ntime.sleep(60)\n\ndef main():\n    return 0\n"
    )
    launch = "import sys; from shiq_data.launch import run; sys.exit(run('shiq-x', 'slow_command'))"
    for verbose in ("", "1"):
        ready.unlink(missing_ok=True)
        proc = start(["-c", launch], tmp_path, SHIQ_VERBOSE=verbose)
        err = interrupt_when(proc, ready.exists)
        if verbose:
            assert "Traceback" in err and "KeyboardInterrupt" in err and proc.returncode != 0, err
        else:
            assert (err, proc.returncode) == ("shiq-x: interrupted\n", 130)


def test_shiq_train_interrupted_in_its_first_second_ends_in_one_line(tmp_path):
    """``shiq-train`` spends its first seconds importing Hydra and composing its configuration (2.7 s here before
    it refuses a missing buffer): a Ctrl-C half a second in printed 40 lines of traceback. (The buffer folder
    exists, so that the command is not refused before the Ctrl-C: a missing one is now refused with the command
    line's checks, in its first second.)"""
    (tmp_path / "buf").mkdir()
    proc = start(["-m", "shiq_train", f"data.buffer={tmp_path / 'buf'}", f"out={tmp_path / 'run'}"], tmp_path)
    t0 = time.monotonic()
    err = interrupt_when(proc, lambda: time.monotonic() - t0 > 0.5)
    assert (err, proc.returncode) == ("shiq-train: interrupted\n", 130)
    assert not (tmp_path / "run").exists()


def test_every_console_command_runs_its_module_through_the_launcher(monkeypatch):
    """Each ``[project.scripts]`` entry is a function of its package's ``launch`` module that runs, through
    ``shiq_data.launch.run``, the command's module, one with a ``main``, under the command's own name."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert sorted(scripts) == ["shiq-bfcl", "shiq-data", "shiq-demo", "shiq-eval", "shiq-toys", "shiq-train"]
    for prog, target in scripts.items():
        module, _, name = target.partition(":")
        assert module.endswith(".launch"), target
        launch = importlib.import_module(module)
        ran = []
        monkeypatch.setattr(launch, "run", lambda p, m: ran.append((p, m)) or 0)
        assert getattr(launch, name)() == 0
        assert len(ran) == 1 and ran[0][0] == prog, (target, ran)
        assert callable(importlib.import_module(ran[0][1]).main), ran


def test_progress_bars_redraw_every_30_seconds_into_a_log_and_as_tqdm_does_on_a_terminal(tmp_path):
    """A command whose stderr is a file or a pipe (``nohup``, a batch job) wrote a progress bar's line ten times
    a second into its log; it now makes its bars (tqdm's, whoever draws them) redraw at most every 30 s there. A
    terminal keeps tqdm's default (0.1 s), and a user's own ``TQDM_MININTERVAL`` wins."""
    interval = _interval_of(
        tmp_path, "bar_command", "    from tqdm import tqdm\n\n    print(tqdm(range(2)).mininterval, file=sys.stdout)\n"
    )
    assert interval(subprocess.PIPE) == 30.0
    with open(tmp_path / "log", "w") as log:
        assert interval(log) == 30.0
    assert interval(subprocess.PIPE, TQDM_MININTERVAL="2") == 2.0
    assert _on_a_terminal(interval) == 0.1


def test_the_projects_own_bars_take_the_interval_a_log_is_given(tmp_path):
    """shiq-data's row bars (build, append, validate, ...) and shiq-train ref-stats' ask tqdm for a redraw every
    1 s (``shiq_data.io.progress_bar``), and a bar's own ``mininterval`` wins over ``TQDM_MININTERVAL``: into a log
    they still redrew every second. The log's 30 s (or the user's interval) now wins; a terminal keeps their 1 s."""
    interval = _interval_of(
        tmp_path,
        "rows_command",
        "    from shiq_data.io import progress_bar\n\n"
        "    with progress_bar(True, total=2, mininterval=1.0, file=sys.stderr) as bar:\n"
        "        print(bar.mininterval, file=sys.stdout)\n",
    )
    assert interval(subprocess.PIPE) == 30.0
    assert interval(subprocess.PIPE, TQDM_MININTERVAL="5") == 5.0
    assert _on_a_terminal(interval) == 1.0


def _interval_of(tmp_path: Path, name: str, main_body: str):
    """``interval(stderr, **env)``: the ``mininterval`` a bar made by the module ``name`` (a ``main`` printing it,
    ``main_body``) has when run through the launcher with ``stderr`` (a pipe, a file, a terminal) and ``env``
    added to an environment without ``TQDM_MININTERVAL``."""
    (tmp_path / f"{name}.py").write_text(f"import sys\n\ndef main():\n{main_body}    return 0\n")
    launch = f"import sys; from shiq_data.launch import run; sys.exit(run('shiq-x', {name!r}))"
    env = {k: v for k, v in os.environ.items() if k != "TQDM_MININTERVAL"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO)])

    def interval(stderr, **extra) -> float:
        out = subprocess.run(
            [sys.executable, "-c", launch], cwd=tmp_path, env={**env, **extra}, stdout=subprocess.PIPE, stderr=stderr
        )
        assert out.returncode == 0
        return float(out.stdout.split()[-1])

    return interval


def _on_a_terminal(interval) -> float:
    import pty

    controller, terminal = pty.openpty()
    try:
        return interval(terminal)
    finally:
        os.close(controller)
        os.close(terminal)


def test_a_ctrl_c_while_the_command_line_is_composed_waits_for_its_end(monkeypatch):
    """A Ctrl-C inside OmegaConf's merge, as Hydra composes the configuration for the command line's checks,
    became OmegaConf's own UnboundLocalError, a traceback of 60 lines (seen once in a loaded run of the test
    above). The composition now finishes, and the Ctrl-C is raised after it, as a KeyboardInterrupt."""
    import hydra

    from shiq_train import command_line

    real, finished = hydra.compose, []

    def compose(*args, **kwargs):  # Ctrl-C arrives in the middle of the first composition (once: a second
        if not finished:  # Ctrl-C is raised at once, so that a start that hangs can be stopped)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # (a handler runs between bytecodes: here, had it raised)
        cfg = real(*args, **kwargs)
        finished.append(True)
        return cfg

    monkeypatch.setattr(hydra, "compose", compose)
    try:
        command_line.hydra_error(["out=x"])
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the Ctrl-C was lost")
    assert finished == [True, True]  # both compositions ran to their end
