"""Checks of the tools' option values, as ``type=`` functions of their parsers, and how a tool ends on Ctrl-C.

A function refuses a value with ValueError; the parser then prints one line naming the option, the value and
what the function accepts (its name), and exits with status 2. Ctrl-C ends a tool as it ends a shiq command:
one line, ``TOOL: interrupted`` (status 130: Python ends an uncaught ``KeyboardInterrupt`` by the signal),
the traceback only with ``SHIQ_VERBOSE=1``; a reader of its output that went away (``TOOL | head -1``) ends it
quietly with status 141, as a tool stopped by SIGPIPE.
"""

from __future__ import annotations

import atexit
import math
import os
import sys
from pathlib import Path

from shiq_data.cli_common import (
    THREADS_MAX,  # (what shiq-train and shiq-data accept)
    broken_pipe,
    stdout_gone,
    verbose,
)


def _stop_if_unread(e: BrokenPipeError) -> None:
    """A tool whose reader went away (``TOOL | head -1``) ends here, quietly with SIGPIPE's status (141), as the
    shiq commands do; else (``SHIQ_VERBOSE=1``, a broken pipe elsewhere) this returns."""
    if not verbose() and stdout_gone():
        sys.stderr.flush()
        os._exit(broken_pipe(Path(sys.argv[0]).name, e))  # (Python's own exit would give 1, or 120 at the flush)


def _interrupted(kind, value, tb, _hook=sys.excepthook) -> None:
    if issubclass(kind, KeyboardInterrupt) and not verbose():
        print(f"{Path(sys.argv[0]).name}: interrupted", file=sys.stderr)
        return
    if issubclass(kind, BrokenPipeError):  # a write to stdout while the tool ran
        _stop_if_unread(value)
    _hook(kind, value, tb)


def _flush_stdout() -> None:
    """The last flush of stdout (what a tool printed into a pipe's buffer), before Python's own at exit."""
    try:
        sys.stdout.flush()
    except BrokenPipeError as e:
        _stop_if_unread(e)
    except (OSError, ValueError):  # (closed, or not a file): Python's own flush says so
        pass


sys.excepthook = _interrupted  # every tool imports this module
atexit.register(_flush_stdout)

SIZE_MAX = 10**9  # beyond every size the tools can run; larger values overflow torch's and numpy's integers
PROCESSES_MAX = 64  # processes a tool starts at once on one machine


def _named(name: str):
    """Sets the function's ``__name__``: what the parser's refusal says is accepted."""

    def name_it(fn):
        fn.__name__ = name
        return fn

    return name_it


def integer(low: int, high: int = SIZE_MAX):
    """Integers in ``low..high``."""

    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise ValueError(text)
        return value

    return _named(f"integer in {low}..{high}")(parse)


count = integer(1)
count_or_zero = integer(0)
threads = integer(1, THREADS_MAX)
processes = integer(1, PROCESSES_MAX)


@_named(f"layer count (-1: all, else 1..{SIZE_MAX})")
def layers_or_all(text: str) -> int:
    """-1 (every layer) or a layer count."""
    value = int(text)
    if value != -1 and not 1 <= value <= SIZE_MAX:
        raise ValueError(text)
    return value


@_named("fraction in (0, 1]")
def fraction(text: str) -> float:
    """A number in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError(text)
    return value


@_named("finite number > 0")
def positive_number(text: str) -> float:
    """A finite number > 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(text)
    return value


@_named("list of ROWSxTOKENS (comma-separated, rows >= 1, tokens >= 2)")
def shapes(text: str) -> list[tuple[int, int]]:
    """``ROWSxTOKENS`` pairs, comma-separated: rows >= 1, tokens >= 2 (a next token to predict)."""
    out = []
    for item in text.split(","):
        rows, _, tokens = item.strip().lower().partition("x")
        shape = (int(rows), int(tokens))
        if not (1 <= shape[0] <= SIZE_MAX and 2 <= shape[1] <= SIZE_MAX):
            raise ValueError(text)
        out.append(shape)
    return out


@_named("replay buffer folder (one with a manifest.json)")
def buffer_folder(text: str) -> str:
    """A replay buffer's folder (one holding a manifest.json)."""
    if not (text.strip() and (Path(text) / "manifest.json").is_file()):
        raise ValueError(text)
    return text


@_named("checkout folder (one with shiq_data/__init__.py)")
def checkout(text: str) -> str:
    """A folder holding the package shiq_data."""
    if not (text.strip() and (Path(text) / "shiq_data" / "__init__.py").is_file()):
        raise ValueError(text)
    return text


@_named("output file (a path in an existing folder, not a folder)")
def output_file(text: str) -> str:
    """A file to write: not a folder, in a folder that exists."""
    if not text.strip() or os.path.isdir(text) or not os.path.isdir(os.path.dirname(os.path.abspath(text))):
        raise ValueError(text)
    return text


def movie_prompt_count() -> int:
    """How many held-out movie prompts there are (``shiq_eval.moviereviews.movie_prompts``)."""
    from shiq_eval.moviereviews import movie_prompts

    return len(movie_prompts(SIZE_MAX)[0])


def add_model_shape(parser, *, vocab: int, seq: int, vocab_note: str = "") -> None:
    """The options of a small GPT a benchmark builds: --hidden, --layers, --heads, --vocab, --seq, --batch
    (``vocab`` and ``seq`` their defaults; check them with :func:`check_model_shape`)."""
    parser.add_argument("--hidden", type=count, default=256, help="hidden size (default 256)")
    parser.add_argument("--layers", type=count, default=4, help="transformer layers (default 4)")
    parser.add_argument("--heads", type=count, default=4, help="attention heads (default 4)")
    parser.add_argument("--vocab", type=count, default=vocab, help=f"vocabulary size (default {vocab}{vocab_note})")
    parser.add_argument("--seq", type=integer(2), default=seq, help=f"tokens per row (default {seq})")
    parser.add_argument("--batch", type=count, default=4, help="rows per micro-batch (default 4)")


def check_model_shape(parser, args) -> None:
    """Refuse (the parser's one-line error) a hidden size that is not --heads times an even head size (RoPE
    rotates pairs of a head's dimensions)."""
    if args.hidden % args.heads or args.hidden // args.heads % 2:
        parser.error(f"--hidden {args.hidden} must be --heads {args.heads} times an even head size")
