"""Worker processes a recipe starts and stops itself, Ctrl-C included.

Ctrl-C reaches every process of the terminal's process group: a ``ProcessPoolExecutor``'s workers were
interrupted mid-task too (or while importing torch, each a traceback), and the ``with`` block's exit then
waited on them, at times for good (and a second Ctrl-C left them running, orphaned). The workers of
:func:`worker_pool` are started with SIGINT ignored, which a new Python process keeps (it installs its
``KeyboardInterrupt`` handler only where the signal is not ignored), so they never see it; the caller,
interrupted, terminates them, then goes on with its ``KeyboardInterrupt`` (one line and status 130 from the
command).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.context import SpawnContext, SpawnProcess


class _DeafProcess(SpawnProcess):
    """A spawned process that ignores SIGINT from its first instruction on."""

    def start(self) -> None:
        if threading.current_thread() is not threading.main_thread():  # (signals are the main thread's)
            return super().start()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited through the new interpreter's exec
        try:
            super().start()
        finally:
            signal.signal(signal.SIGINT, previous)


class _DeafContext(SpawnContext):
    Process = _DeafProcess


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A ``ProcessPoolExecutor`` of ``workers`` spawned processes that ignore Ctrl-C. When the block ends by an
    exception (Ctrl-C, an error of the caller's), the workers are terminated instead of waited for, and the
    executor fails the tasks left (a broken pool); a second Ctrl-C is ignored while that happens. Submit
    tasks and wait on their futures: ``map``'s results, left unread, cancel their futures, which the
    executor's thread then fails in vain (``InvalidStateError``, printed). Otherwise the pool shuts down as
    usual, once every task is done."""
    pool = ProcessPoolExecutor(workers, mp_context=_DeafContext())
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
