"""An input read by several processes (``shiq-data build/append --workers N``), giving the rows one process gives.

The main process reads the input's records (JSONL lines, Parquet or ``datasets`` rows: the format's
``records``) and hands them, :data:`CHUNK` at a time, to ``workers`` processes, which turn them into rows
with the format's reader (tokenising is the cost) and check them. The chunks come back in input order, and
each row gets the group id the reader gives it when one process reads the whole input: groups are numbered
in order of first appearance of their key (the ``group`` of :func:`shiq_data.schema.input_location`). So a
buffer written from these rows is the one a single process writes: the same shards byte for byte, the same
manifest apart from the command line it records.

A bad record in a worker is raised in the main process after the rows before it, with the same one-line
message (file, line or row, field) as in one process; the workers are then stopped.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import islice

from shiq_data.cli_common import on_sigterm, sigint_deferred, sigterm_deferred
from shiq_data.readers import Format
from shiq_data.schema import CHECKED_KEY, INPUT_KEY, GroupIds, check_row

CHUNK = 256  # records per task: small enough to keep every worker busy, large enough to batch the tokenizer

_WORKER: dict = {}  # what each worker process reads with, set once by _start


START_DELAY = "SHIQ_TEST_WORKER_START_DELAY"  # seconds a worker spends unpickling its start-up state (tests)


class _StartDelay:
    """Unpickled in a worker as a call of ``time.sleep(seconds)``: put before the tokenizer in the start-up
    state, it holds the worker (and the main process, writing the rest of that state to it) in start-up, so a
    test can stop the command there for certain."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __reduce__(self):
        return time.sleep, (self.seconds,)


def _start_delay() -> _StartDelay | None:
    """A :class:`_StartDelay` of :data:`START_DELAY` seconds when that variable is set, else None."""
    seconds = os.environ.get(START_DELAY)
    return _StartDelay(float(seconds)) if seconds else None


def _start(delay, read, path, tokenizer, options: dict, vocab_size: int | None) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one chunk at a time: no Rust thread pool beside the others
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the caller stops us
    _WORKER.update(read=read, path=path, tokenizer=tokenizer, options=options, vocab_size=vocab_size)


def _portable(e: Exception) -> Exception:
    """``e`` if it survives pickling (to be raised in the main process), else a ``ValueError`` with its message."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return ValueError(str(e))


def _read_chunk(records: list) -> tuple[list[dict], Exception | None]:
    """The rows of ``records`` (in a worker) and the error that stopped the reader, if any. Rows that pass
    :func:`check_row` are marked :data:`shiq_data.schema.CHECKED_KEY`; the main process checks the others itself, and so raises
    exactly the error one process would."""
    w, rows = _WORKER, []
    try:
        for row in w["read"](w["path"], w["tokenizer"], records=records, **w["options"]):
            try:
                check_row({"row_id": "-", **row}, vocab_size=w["vocab_size"], file="", row_index=0)
                row[CHECKED_KEY] = w["vocab_size"]
            except ValueError:
                pass
            rows.append(row)
    except Exception as e:
        return rows, _portable(e)
    return rows, None


PRELOAD = ["shiq_data.readers.parallel", "transformers"]  # imported once by the fork server


def _context():
    """Workers forked from a fork server: a fresh single-threaded interpreter that has imported
    :data:`PRELOAD` once, so a worker starts in well under a second and shares no threads, locks or
    memory with the caller. Forking the caller itself (a process with a tokenizer's thread pool, torch's
    and a test runner's threads, several GiB of model) can leave a child holding a lock no thread will
    release, or one the kernel's out-of-memory killer picks because it appears as large as its parent; the
    tokenizer and reader reach the workers pickled instead (a fast tokenizer pickles in milliseconds)."""
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" not in methods:  # Windows: spawn, the only one there
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _start_server(ctx) -> None:
    """Start the fork server of ``ctx`` (if it is not running) with SIGINT blocked, which it keeps, and so do the
    workers it forks: Ctrl-C reaches the whole process group, and the server, importing :data:`PRELOAD` (a
    second or so), or a worker, before its start-up ignores SIGINT (:func:`_start`), printed a
    ``KeyboardInterrupt`` traceback after the command's line. The command alone handles Ctrl-C: it stops them.
    Blocked, not ignored, in this process: a Ctrl-C meanwhile is delivered here once the server has started."""
    if ctx.get_start_method() != "forkserver" or not hasattr(signal, "pthread_sigmask"):
        return
    from multiprocessing import forkserver, resource_tracker

    resource_tracker.ensure_running()  # first: its own start unblocks SIGINT
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def parallel_rows(
    form: Format, path, tokenizer, options: dict, workers: int, *, vocab_size: int | None = None, chunk: int = 0
) -> Iterator[dict]:
    """The rows of ``form.read(path, tokenizer, **options)``, in the same order with the same group ids,
    tokenised by ``workers`` processes. ``vocab_size``: the buffer's, for the workers' row checks (rows
    they pass carry :data:`shiq_data.schema.CHECKED_KEY`, which :mod:`shiq_data.buffer` honours and drops).
    ``chunk``: records per task (default :data:`CHUNK`)."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    records = form.records(path)
    group_id = GroupIds()  # group key -> group id over the whole input
    pending: deque = deque()
    failed: Exception | None = None  # the input could not be read further (raised after the rows before it)
    with on_sigterm():  # a kill of the command stops its workers too (they were left running, orphaned)
        ctx = _context()
        pool = ProcessPoolExecutor(
            workers,
            mp_context=ctx,
            initializer=_start,
            initargs=(_start_delay(), form.read, path, tokenizer, options, vocab_size),
        )
        try:
            with sigterm_deferred(), sigint_deferred():  # not stopped half started
                _start_server(ctx)
            done = False
            while True:
                while not done and failed is None and len(pending) < 2 * workers:
                    batch = []
                    try:
                        for record in islice(records, chunk or CHUNK):
                            batch.append(record)
                    except Exception as e:  # the records before it are read first, as one process reads them
                        failed = e
                    if not batch:
                        done = True
                        break
                    with sigterm_deferred(), sigint_deferred():  # a submit may start a worker: not stopped half started
                        pending.append(pool.submit(_read_chunk, batch))
                if not pending:
                    break
                rows, error = pending.popleft().result()
                for row in rows:
                    location = row[INPUT_KEY]
                    if location.get("group") is None:
                        raise RuntimeError(
                            f"format {form.name!r}: its reader gives no group key (input_location group)"
                        )
                    row["group_id"] = group_id(location["group"])
                    yield row
                if error is not None:
                    raise error
            if failed is not None:
                raise failed
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
