"""The console commands' entry points (``[project.scripts]``, and ``python -m``): each imports its command's
module and runs its ``main`` under a Ctrl-C that ends in the command's own line, ``PROG: interrupted``, with
status 130, as the commands end one once they run (``shiq_data.cli_common.run_command``). Before, a Ctrl-C in
the first seconds, while Python was still importing the command's modules (Hydra, torch, megatron-core: about
3 s for ``shiq-train``), printed a KeyboardInterrupt traceback of 20 to 50 lines through those imports.
``SHIQ_VERBOSE=1`` keeps the traceback. Standard library only: this module is what loads first.

Each package names its own commands (``shiq_train.launch``, ``shiq_eval.launch``); this module only runs them.
"""

from __future__ import annotations

import importlib
import os
import sys

EXIT_INTERRUPTED = 130  # 128 + SIGINT (shiq_data.cli_common's)
LOG_INTERVAL = "30"  # seconds between a progress bar's redraws when stderr is a file or a pipe


def progress_for_logs(environ=os.environ, stderr=None) -> None:
    """When stderr is not a terminal (``nohup``, a batch job's log, a pipe), every progress bar (the project's,
    and those of transformers and sentence-transformers: all tqdm) redraws at most every 30 s instead of ten
    times a second, so a log keeps a line a bar every 30 s, not every batch. Through tqdm's ``TQDM_MININTERVAL``
    (read once, as tqdm is imported: so set before the command's modules are), which a user's own setting
    overrides; a terminal keeps tqdm's default."""
    stderr = sys.stderr if stderr is None else stderr
    try:
        terminal = stderr.isatty()
    except (AttributeError, ValueError):  # (closed, or no stream)
        terminal = False
    if not terminal:
        environ.setdefault("TQDM_MININTERVAL", LOG_INTERVAL)


def run(prog: str, module: str) -> int | None:
    """``module.main()``'s status, ``module`` imported here; a ``KeyboardInterrupt`` that reaches this (in the
    imports, or not handled by the command) as ``PROG: interrupted`` on stderr and status 130."""
    progress_for_logs()
    try:
        return importlib.import_module(module).main()
    except KeyboardInterrupt:
        if os.environ.get("SHIQ_VERBOSE", "") not in ("", "0"):
            raise
        if (common := sys.modules.get("shiq_data.cli_common")) is not None:  # (a progress bar left open)
            common.close_progress_bars()
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def shiq_data() -> int | None:
    """``shiq-data``."""
    return run("shiq-data", "shiq_data.cli")
