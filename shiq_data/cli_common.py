"""What every command of the project shares: bad input ends in one line and exit status 2, and start-up is quiet.

A user error (a bad option, a missing, truncated or malformed file) ends a command with one line on stderr,
``PROG: error: MESSAGE`` (the message names the file, row or key), and exit status 2, never a traceback.
Setting ``SHIQ_VERBOSE=1`` shows the traceback instead, and the notices megatron-core prints at import about
optional dependencies it did not find (Apex, Transformer Engine, flash-attn), which are hidden otherwise.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import warnings
from collections.abc import Callable

EXIT_USER_ERROR = 2
# messages of the warnings megatron-core gives at import when an optional accelerator library is absent
OPTIONAL_DEPENDENCY_NOTICES = (
    r".*(Apex is not installed|Transformer Engine and Apex are not installed|Transformer Engine is not installed"
    r"|[Ff]lash.?[Aa]ttn|[Ff]lash[Aa]ttention|full scope is deprecated)"
)
QUIET_LOGGERS = ("megatron", "megatron_fsdp")


def verbose() -> bool:
    """True when ``SHIQ_VERBOSE`` is set to anything but empty or 0."""
    return os.environ.get("SHIQ_VERBOSE", "") not in ("", "0")


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` is what bad input raises: a value or type the code refused, a file that cannot be read or
    parsed (including torch's and safetensors' reader errors), a number too large to convert."""
    return isinstance(e, (ValueError, OSError, RuntimeError, OverflowError, EOFError, pickle.UnpicklingError)) or type(
        e
    ).__name__ in ("SafetensorError", "HeaderTooLarge")


def error_line(prog: str, e: BaseException | str) -> str:
    """``PROG: error: MESSAGE`` on one line (the message's line breaks and runs of spaces collapsed)."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, BaseException) and not isinstance(e, (ValueError, OSError, RuntimeError)):
        text = f"{type(e).__name__}: {text}"  # e.g. OverflowError: int too large to convert to float
    return f"{prog}: error: {text}"


def fail(prog: str, e: BaseException | str) -> int:
    """Print :func:`error_line` to stderr; the exit status for it (2)."""
    print(error_line(prog, e), file=sys.stderr)
    return EXIT_USER_ERROR


def run_command(prog: str, fn: Callable[..., int | None], *args) -> int:
    """``fn(*args)`` with user errors (:func:`is_user_error`) turned into one line and exit status 2;
    anything else (a bug) keeps its traceback, as does everything with ``SHIQ_VERBOSE=1``."""
    try:
        return int(fn(*args) or 0)
    except Exception as e:
        if verbose() or not is_user_error(e):
            raise
        return fail(prog, e)


def quiet_optional_dependencies() -> None:
    """Hide megatron-core's import-time notices about optional libraries it did not find (warnings and
    INFO logs), unless ``SHIQ_VERBOSE=1``. Call before importing megatron."""
    if verbose():
        return
    warnings.filterwarnings("ignore", message=OPTIONAL_DEPENDENCY_NOTICES)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
