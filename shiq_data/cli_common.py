"""What every command of the project shares: bad input ends in one line and exit status 2, start-up is quiet,
and progress and status lines go through Python ``logging`` at a level the user sets.

A user error (a bad option, a missing, truncated or malformed file) ends a command with one line on stderr,
``PROG: error: MESSAGE`` (the message names the file, row or key), and exit status 2, never a traceback.
Setting ``SHIQ_VERBOSE=1`` shows the traceback instead, and the notices megatron-core prints at import about
optional dependencies it did not find (Apex, Transformer Engine, flash-attn), which are hidden otherwise.

Every module logs to ``log = logging.getLogger(__name__)``; :func:`setup_logging` (called by every command's
entry point with its ``--log-level``, or ``logging.level`` of ``shiq-train``) sends the records of the project's
packages at that level or above to stderr, one line each, the message alone. INFO (the default) shows the
progress and status lines; WARNING keeps warnings only; DEBUG adds details. What a command prints as its
result (tables, JSON, the line saying where its outputs went) goes to stdout and is not logging. A log line or
error written while a progress bar is drawn starts on a line of its own: the bar is wiped first (and drawn again
below a log line; closed before an error).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pickle
import select
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from shiq_data.io import one_line

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C
EXIT_BROKEN_PIPE = 141  # what a shell reports for a command stopped by SIGPIPE (128 + 13)
EXIT_TERMINATED = 143  # what a shell reports for a command stopped by SIGTERM (128 + 15)
# messages of the warnings megatron-core gives at import when an optional accelerator library is absent
OPTIONAL_DEPENDENCY_NOTICES = (
    r".*(Apex is not installed|Transformer Engine and Apex are not installed|Transformer Engine is not installed"
    r"|[Ff]lash.?[Aa]ttn|[Ff]lash[Aa]ttention|full scope is deprecated)"
)
QUIET_LOGGERS = ("megatron", "megatron_fsdp")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# the project's packages, and the module run as the program (python -m shiq_eval.cli logs as __main__)
PROJECT_LOGGERS = ("shiq_data", "shiq_train", "shiq_eval", "__main__")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose refusal of a command line is one line too, like every other user error:
    ``PROG: error: MESSAGE (see PROG --help)`` and exit status 2, without the usage argparse prints first (a
    dozen lines for a command of many options, the error last). The parsers of its subcommands are of this
    class too (``add_subparsers`` makes them of their parent's class)."""

    _innermost = None  # the last parser to read a command line: a subcommand's, inside its parent's reading

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        ArgumentParser._innermost = self
        namespace, extras = super().parse_known_args(args, namespace)
        self._left_over = list(extras)  # what this parser did not recognise (a subcommand's, for its parent)
        return namespace, extras

    def parse_args(self, args=None, namespace=None):
        """argparse's, except that unknown options after a subcommand are refused by the subcommand's parser,
        whose ``--help`` lists the options it takes (argparse's top-level refusal sent the user to the list of
        subcommands); one before the subcommand stays the top level's."""
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            inner = ArgumentParser._innermost
            blamed = inner if inner is not None and inner is not self and inner._left_over == extras else self
            blamed.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace


def verbose() -> bool:
    """True when ``SHIQ_VERBOSE`` is set to anything but empty or 0."""
    return os.environ.get("SHIQ_VERBOSE", "") not in ("", "0")


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` is what bad input raises: a value or type the code refused, a file that cannot be read or
    parsed (including torch's and safetensors' reader errors), a number too large to convert."""
    return isinstance(e, (ValueError, OSError, RuntimeError, OverflowError, EOFError, pickle.UnpicklingError)) or type(
        e
    ).__name__ in ("SafetensorError", "HeaderTooLarge")


def error_message(e: BaseException | str) -> str:
    """The MESSAGE of :func:`error_line`: ``e``'s on one line (:func:`one_line`), after its type's name when
    that is not a value, OS or runtime error."""
    text = one_line(e) or type(e).__name__
    if isinstance(e, BaseException) and not isinstance(e, (ValueError, OSError, RuntimeError)):
        text = f"{type(e).__name__}: {text}"  # e.g. OverflowError: int too large to convert to float
    return text


def error_line(prog: str, e: BaseException | str) -> str:
    """``PROG: error: MESSAGE`` on one line (:func:`error_message`)."""
    return f"{prog}: error: {error_message(e)}"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where a command has workers or temporary folders to clean up first (:func:`on_sigterm`);
    :func:`run_command` then says so and ends with status 143, as a shell reports SIGTERM."""


@contextlib.contextmanager
def on_sigterm(handler=None) -> Iterator[None]:
    """Within the block, SIGTERM (``kill PID``, a scheduler's stop) raises :class:`Terminated` in the main thread
    instead of ending the process at once, so that the block's cleanup (a worker pool: its processes, left
    running otherwise; a temporary folder) runs first. Only where the main thread waits in Python (a pool's
    results): a handler cannot run while it blocks in C. Elsewhere, or when SIGTERM is handled already, a no-op.
    ``handler``: another signal handler that raises it (``shiq_train.trainer.sigterm_stops_run``'s)."""
    previous = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        previous = signal.signal(signal.SIGTERM, handler or _raise_terminated)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# within sigterm_deferred: how deep, and whether SIGTERM came; whether the handler raised Terminated (run_command)
_DEFERRED = {"depth": 0, "pending": False, "raised": False}


@contextlib.contextmanager
def sigterm_deferred() -> Iterator[None]:
    """Within the block, the :class:`Terminated` of a SIGTERM (:func:`on_sigterm`) waits for the block's end,
    then is raised (in place of any other exception of the block): for work that must not be cut in the
    middle, such as a worker pool starting a process (stopped between the fork and the pool's record of it,
    the worker is left unpickling its start-up state from a parent gone, and prints a traceback). A second
    SIGTERM within the block is raised at once, so a block that hangs can still be stopped."""
    _DEFERRED["depth"] += 1
    try:
        yield
    finally:
        _DEFERRED["depth"] -= 1
        if not _DEFERRED["depth"] and _DEFERRED["pending"]:
            _DEFERRED["pending"] = False
            raise Terminated()


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Within the block, the ``KeyboardInterrupt`` of Ctrl-C waits for the block's end, then is raised (in place
    of any other exception of the block), as :func:`sigterm_deferred` does for SIGTERM: a worker pool starting
    a process is not stopped between writing the worker its start-up state and recording it (the worker, left
    reading a cut state, printed a traceback after the command's line). A second Ctrl-C within the block is
    raised at once. Only in the main thread, where Python's own handler is in place; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    came = []

    def defer(signum, frame):
        if came:  # a second Ctrl-C does not wait (a start that hangs)
            raise KeyboardInterrupt
        came.append(signum)

    signal.signal(signal.SIGINT, defer)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if came:
            raise KeyboardInterrupt


def _raise_terminated(signum, frame):
    if _DEFERRED["depth"] and not _DEFERRED["pending"]:  # a second SIGTERM does not wait (a start that hangs)
        _DEFERRED["pending"] = True
        return
    _DEFERRED["pending"] = False
    _DEFERRED["raised"] = True  # (DuckDB, running a query, reports it as its own error: run_command reads this)
    raise Terminated()


def query_interrupted(e: BaseException) -> bool:
    """Whether ``e`` (or an error it was raised from) is DuckDB's report of a signal that came during one of its
    queries: DuckDB takes the ``KeyboardInterrupt`` of Ctrl-C (or the :class:`Terminated` of SIGTERM) and raises
    ``RuntimeError('Query interrupted')`` (``duckdb.InterruptException`` in other versions) in its place."""
    duckdb = sys.modules.get("duckdb")
    interrupt = getattr(duckdb, "InterruptException", ()) if duckdb is not None else ()
    for _ in range(16):  # (a chain of causes is short; never a cycle followed for ever)
        if e is None:
            return False
        if (interrupt and isinstance(e, interrupt)) or (type(e) is RuntimeError and str(e) == "Query interrupted"):
            return True
        e = e.__cause__ or e.__context__
    return False


def _open_bars() -> list:
    """The tqdm bars open now (of tqdm's class and of its subclasses, such as ``tqdm.auto``'s, each of which may
    keep its own list) that draw on stdout or stderr; none when tqdm was never imported."""
    std = sys.modules.get("tqdm.std")
    if std is None:
        return []
    classes, todo = [], [std.tqdm]
    while todo:
        cls = todo.pop()
        classes.append(cls)
        todo += cls.__subclasses__()
    bars = {id(b): b for cls in classes for b in _instances(cls)}
    terminal = (sys.stdout, sys.stderr)
    return [b for b in bars.values() if hasattr(b, "start_t") and not b.disable and b.fp in terminal]


def _instances(cls) -> list:
    """The bars ``cls`` itself lists (tqdm's ``_instances``, a set another thread's new or closed bar changes
    under tqdm's lock, not ours); read again when such a change interrupts the reading (Python's "Set changed
    size during iteration"), and none if it keeps changing: a log line is then written without the wipe, never
    lost to the error."""
    for _ in range(10):
        try:
            return list(cls.__dict__.get("_instances", ()))
        except RuntimeError:
            continue
    return []


@contextlib.contextmanager
def bars_cleared() -> Iterator[None]:
    """Within the block, the progress bars on screen (:func:`_open_bars`) are wiped from their line, and drawn
    again after it: a line written to stderr inside (a warning in the middle of a build) then starts on a line
    of its own, rather than after a bar's text, and the bar goes on below it."""
    bars = _open_bars()
    if not bars:
        yield
        return
    lock = type(bars[0]).get_lock()
    with lock:
        for bar in bars:
            bar.clear(nolock=True)
        try:
            yield
        finally:
            for bar in bars:
                bar.refresh(nolock=True)


def close_progress_bars() -> None:
    """Wipe and close the progress bars still open (a loop left by an error or Ctrl-C), so that the command's
    last line (its error, ``interrupted``) starts on a clean line, not after a half-drawn bar."""
    for bar in _open_bars():
        bar.leave = False
        bar.close()


def interrupted(prog: str, hint: str = "") -> int:
    """Print ``PROG: interrupted`` (then ``hint``) to stderr, for Ctrl-C; the exit status for it (130)."""
    close_progress_bars()
    print(f"{prog}: interrupted{hint}", file=sys.stderr)
    return EXIT_INTERRUPTED


def fail(prog: str, e: BaseException | str) -> int:
    """Print :func:`error_line` to stderr (after closing any progress bar left open); the exit status for it
    (2)."""
    close_progress_bars()
    print(error_line(prog, e), file=sys.stderr)
    return EXIT_USER_ERROR


def stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has gone away (polled: the pipe reports an error or a hang-up)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor (captured), no poll on this platform
        return False


def broken_pipe(prog: str, e: BrokenPipeError) -> int:
    """The exit status for a ``BrokenPipeError``: when the reader of stdout went away (:func:`stdout_gone`),
    stdout is pointed at /dev/null (so the flush at exit cannot fail again) and the status is a tool's stopped
    by SIGPIPE (141), quietly; a broken pipe elsewhere (a worker, a socket) is an error like any other (one
    line, 2); with ``SHIQ_VERBOSE=1`` it is re-raised."""
    if verbose():
        raise e
    if not stdout_gone():
        return fail(prog, e)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def run_command(prog: str, fn: Callable[..., int | None], *args, hint: str = "") -> int:
    """``fn(*args)`` with user errors (:func:`is_user_error`) turned into one line and exit status 2;
    anything else (a bug) keeps its traceback, as does everything with ``SHIQ_VERBOSE=1``. When the reader of
    stdout goes away (``CMD | head``, :func:`stdout_gone`), the command stops quietly with status 141, as a tool
    stopped by SIGPIPE; a broken pipe elsewhere is an error like any other. Ctrl-C (``KeyboardInterrupt``, or
    the error DuckDB raises for it during a query, or a user error raised in its wake: :func:`query_interrupted`;
    a bug raised in its wake keeps its traceback) prints ``PROG: interrupted`` and gives status 130, as a shell
    reports SIGINT (what it leaves is what each command says of a kill: its writes are atomic); ``hint`` follows
    that line, and SIGTERM's."""
    _DEFERRED["raised"] = False
    try:
        status = int(fn(*args) or 0)
        sys.stdout.flush()  # here, not at exit: a reader that went away is then seen below
        return status
    except KeyboardInterrupt as e:
        if verbose():
            raise
        return _stopped(prog, isinstance(e, Terminated), hint)
    except BrokenPipeError as e:
        return broken_pipe(prog, e)
    except Exception as e:
        # Ctrl-C (or SIGTERM) in a DuckDB query: not bad input (a bug raised in its wake keeps its traceback)
        if not verbose() and is_user_error(e) and query_interrupted(e):
            return _stopped(prog, _DEFERRED["raised"], hint)
        if verbose() or not is_user_error(e):
            raise
        return fail(prog, e)


def _stopped(prog: str, terminated: bool, hint: str) -> int:
    """The line and status of a command stopped by SIGTERM (``terminated``: cleaned up, the status a shell gives
    a process SIGTERM ended, 143) or by Ctrl-C (:func:`interrupted`, 130)."""
    if terminated:
        close_progress_bars()
        print(f"{prog}: terminated{hint}", file=sys.stderr)
        return EXIT_TERMINATED
    return interrupted(prog, hint)


def quiet_optional_dependencies() -> None:
    """Hide megatron-core's import-time notices about optional libraries it did not find (warnings and
    INFO logs), unless ``SHIQ_VERBOSE=1``. Call before importing megatron."""
    if verbose():
        return
    warnings.filterwarnings("ignore", message=OPTIONAL_DEPENDENCY_NOTICES)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class _StderrHandler(logging.StreamHandler):
    """Writes each record to what ``sys.stderr`` is at that moment (so a redirected or captured stderr gets it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # always the current sys.stderr
        pass

    def emit(self, record):
        with bars_cleared():  # a warning in the middle of a progress bar gets a line of its own
            super().emit(record)


def log_level(level: str | int) -> int:
    """The ``logging`` level of a name in :data:`LOG_LEVELS` (any case) or a number; ValueError naming the
    choices otherwise."""
    if isinstance(level, int) and not isinstance(level, bool):
        return level
    if isinstance(level, str) and level.upper() in LOG_LEVELS:
        return getattr(logging, level.upper())
    raise ValueError(f"log level {level!r}: expected one of {', '.join(LOG_LEVELS)}")


def _show_warning_clear_of_bars(message, category, filename, lineno, file=None, line=None):
    """Python's ``warnings.showwarning``, with the progress bars on screen wiped first and drawn again after
    (:func:`bars_cleared`): a library's warning in the middle of a bar (torch's, at a training's first step)
    was written after the bar's text on its line."""
    with bars_cleared():
        _show_warning_clear_of_bars.shown(message, category, filename, lineno, file, line)


def setup_logging(level: str | int = "INFO") -> None:
    """Send the log records of the project's packages (and of ``__main__``, a module of theirs run with
    ``python -m``) at ``level`` or above to stderr, one line each (the message alone); calling it again
    changes the level. Python warnings shown from then on start on a line of their own when a progress bar is
    drawn (:func:`_show_warning_clear_of_bars`)."""
    if warnings.showwarning is not _show_warning_clear_of_bars:
        _show_warning_clear_of_bars.shown = warnings.showwarning
        warnings.showwarning = _show_warning_clear_of_bars
    number = log_level(level)
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(number)
        logger.propagate = False  # not twice through a root handler (Hydra sets one on stdout)
        if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 row``, ``2 rows``: a count and its noun, in the singular for one (``words`` for an irregular plural,
    ``word + "s"`` otherwise)."""
    return f"{n} {word}" if n == 1 else f"{n} {words or word + 's'}"


def progress_bars_shown(level: str | int) -> bool:
    """Whether a command run at log ``level`` draws progress bars: INFO (the default) and DEBUG do; WARNING and
    ERROR keep warnings only, so no bar either (the project's, or transformers' "Loading weights")."""
    return log_level(level) <= logging.INFO


def hide_library_progress_bars() -> None:
    """Turn off the progress bars transformers and huggingface_hub draw themselves ("Loading weights", "Writing
    model shards"), for a command asked for none (``--no-progress``, ``--quiet``, a log level above INFO)."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


def check_output_files(inputs, outputs: dict, overwrite: bool = True) -> None:
    """Refuse, before anything is written, output files (``{option: path or None}``) that are an input, the
    same file as another output, or an existing folder: a command would otherwise replace its own input or
    write one output and then fail on the next; a file inside a buffer folder, which the buffer neither lists
    nor keeps (``shiq-data validate`` removes it); without ``overwrite``, any existing file too (the command's
    ``--overwrite`` replaces it)."""
    from shiq_data.buffer import refuse_inside_buffer  # heavy: pyarrow, only for a command that writes

    seen = {}
    ins = {os.path.realpath(p) for p in inputs}
    for option, path in outputs.items():
        if path is None:
            continue
        real = os.path.realpath(path)
        if real in ins:
            raise ValueError(f"{option} {path} is also an input of this command: give another file")
        if real in seen:
            raise ValueError(f"{option} {path} is also given to {seen[real]}: give each output its own file")
        if os.path.isdir(path):
            raise ValueError(f"{option} {path} is a folder: give a file")
        refuse_inside_buffer(path, option)
        if not overwrite and os.path.lexists(path):
            raise ValueError(f"{option} {path} exists: give a new file, or --overwrite to replace it")
        seen[real] = option


def folder_path(text: str) -> str:
    """An argparse ``type`` for an output folder: refuses the empty string, which ``Path`` reads as the
    current folder (argparse names the option in its refusal). A path with a ``..`` is resolved first:
    ``RUN/x/..`` is ``RUN``, and the checks of what a folder holds must see that folder, not a ``RUN/x`` that
    does not exist yet."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder, got an empty string")
    path = str(Path(text).resolve()) if ".." in Path(text).parts else text
    _refuse_file_in_the_way(Path(path))
    return path


def _refuse_file_in_the_way(path: Path) -> None:
    """An output path whose nearest existing ancestor is a file (``afile/sub``): refused here, naming that file,
    rather than by the operating system at the first write ("Not a directory", after the work). An ancestor that
    cannot be looked at (no permission) ends the check: the write will say what is wrong."""
    for parent in path.absolute().parents:  # nearest first
        try:
            if not parent.exists():
                continue
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{path}: {parent} is a file, not a folder")
        except OSError:
            pass
        return


def file_path(text: str) -> str:
    """An argparse ``type`` for an output file: refuses the empty string (argparse names the option)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a file, got an empty string")
    _refuse_file_in_the_way(Path(text))
    return text


def int_at_least(low: int, high: int | None = None):
    """An argparse ``type``: an integer >= ``low`` (and <= ``high`` when given; argparse names the option in
    its refusal)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {_range(low, high)}, got {value}")
        return value

    parse.__name__ = f"integer {_range(low, high)}"
    return parse


def _range(low: int, high: int | None) -> str:
    return f">= {low}" if high is None else f"in {low}..{high}"


THREADS_MAX = 1024  # torch's thread pools crash far beyond the cores a machine has
PROCESSES_MAX = 1024  # processes a command starts at once (--workers, --jobs: a number past a C int overflowed)


def rank_zero() -> bool:
    """Whether this process is rank 0 of a ``torchrun`` launch (``RANK``), or runs alone (``WORLD_SIZE`` unset or
    1, whatever a ``RANK`` left in the environment says): the one that reports and writes what every rank computes
    alike."""
    return int(os.environ.get("WORLD_SIZE", 1)) <= 1 or int(os.environ.get("RANK", 0)) == 0


def add_log_level_option(parser: argparse.ArgumentParser) -> None:
    """``--log-level LEVEL`` on ``parser`` and on each of its subcommands' parsers (before or after the
    subcommand's name); read it with ``getattr(args, "log_level", "INFO")``."""
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += [p for p in action.choices.values() if p.add_help]
    for p in parsers:
        p.add_argument(
            "--log-level",
            type=str.upper,
            choices=LOG_LEVELS,
            default=argparse.SUPPRESS,
            help="which progress and status lines appear on stderr: DEBUG (more detail), INFO (default), "
            "WARNING (warnings only) or ERROR",
        )
