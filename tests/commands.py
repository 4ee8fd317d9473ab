"""A command run as ``subprocess.run`` runs it, but forked from the test worker's server (:mod:`ranks`), which
has imported torch, megatron-core and the training modules once.

A fresh interpreter spends about 4 s of CPU importing them before ``shiq-train`` reads its command line; the
suite runs such commands some hundred times. The forked process is otherwise the command's own: its argument
list, environment, working folder, standard streams (files here, as pipes are: not a terminal), exit status
and exit handlers. What it cannot show is what happens at import time, the start-up warnings of the
libraries above: tests of a quiet start-up, and of signals sent to the process, start a real interpreter.
"""

import atexit
import io
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

from ranks import as_caller, start_server


def run(cmd: list[str], *, env: dict, cwd, timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)`` for ``cmd``
    = ``[sys.executable, "-m", MODULE, *args]`` or ``[sys.executable, SCRIPT, *args]``."""
    if cmd[0] != sys.executable or len(cmd) < 2 or cmd[1].startswith("-") and cmd[1] != "-m":
        raise ValueError(f"commands.run: not a python -m MODULE or python SCRIPT command: {cmd[:3]}")
    start_server()
    with tempfile.TemporaryDirectory() as d:
        out, err = os.path.join(d, "stdout"), os.path.join(d, "stderr")
        proc = multiprocessing.get_context("forkserver").Process(
            target=_main, args=(cmd[1:], dict(env), str(cwd), out, err)
        )
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(cmd, timeout)
        texts = [Path(p).read_text(encoding="utf-8") if os.path.exists(p) else "" for p in (out, err)]  # (died first)
        return subprocess.CompletedProcess(cmd, proc.exitcode, *texts)


def _main(argv: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    """In the forked process: the command's streams, environment and folder, then its ``__main__``."""
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for path, fd in ((out, 1), (err, 2)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8")
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace", line_buffering=True
    )
    as_caller(env, cwd)
    warnings.resetwarnings()  # as a fresh interpreter: the defaults, then PYTHONWARNINGS
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    for category in (PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)
    if env.get("PYTHONWARNINGS"):
        warnings._processoptions(env["PYTHONWARNINGS"].split(","))
    if env.get("OMP_NUM_THREADS"):
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    code = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
