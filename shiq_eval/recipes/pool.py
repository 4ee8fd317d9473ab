"""Worker processes a recipe starts and stops itself, Ctrl-C included.

Ctrl-C reaches every process of the terminal's process group: a ``ProcessPoolExecutor``'s workers were
interrupted mid-task too, and the ``with`` block's exit then waited on them, at times for good (and a second
Ctrl-C left them running, orphaned). Workers of :func:`worker_pool` ignore SIGINT; the caller, interrupted,
terminates them and cancels the queued work, then goes on with its ``KeyboardInterrupt`` (one line and
status 130 from the command). Only the standard library is imported here: a spawned worker imports this
module to run its initializer.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A ``ProcessPoolExecutor`` of ``workers`` spawned processes that ignore Ctrl-C. When the block ends by an
    exception (Ctrl-C, an error of the caller's), the workers are terminated instead of waited for, and the
    executor fails the tasks left (a broken pool); a second Ctrl-C is ignored while that happens. Submit
    tasks and wait on their futures: ``map``'s results, left unread, cancel their futures, which the
    executor's thread then fails in vain (``InvalidStateError``, printed). Otherwise the pool shuts down as
    usual, once every task is done."""
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_ignore_sigint)
    try:
        yield pool
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):  # the command is ending, its own line says so: not twice
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        for process in list(pool._processes.values()):  # (the executor's own record of its workers)
            process.terminate()
        pool.shutdown(wait=False)
        raise
    pool.shutdown(wait=True)
