"""Runs of a recipe side by side, one process each, the machine's cores shared among them (``--jobs``).

A run of a small model does not use several CPU threads fully (small matrix products, sampling one token at
a time), so single-threaded runs side by side can finish sooner than the same runs one after the other with
every thread; ``tools/bench_jobs.py`` measures by how much. Each run keeps its own folder, resumes as it
would alone, and writes its output (progress bars, log lines) to ``<folder>/run.log``; the parent says
when each stage of each run finishes, read from the run's ``stages.json``. :func:`run_each` is what the
recipes call: this for ``--jobs`` above 1, the runs one after the other in the calling process for 1."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path

import torch

from shiq_data.cli_common import (
    PROCESSES_MAX,
    hide_library_progress_bars,
    plural,
    progress_bars_shown,
    quiet_optional_dependencies,
    setup_logging,
)
from shiq_data.launch import LOG_INTERVAL
from shiq_eval.recipes.pool import worker_pool

LOG_NAME = "run.log"


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_job(jobs: int, available: int | None = None) -> int:
    """Torch threads for each of ``jobs`` processes sharing ``available`` cores (at least 1); ``--jobs`` outside
    1..:data:`PROCESSES_MAX` is refused."""
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    if jobs > PROCESSES_MAX:
        raise ValueError(f"--jobs must be at most {PROCESSES_MAX} (runs side by side, one process each), got {jobs}")
    return max(1, (cores() if available is None else available) // jobs)


def _job(target: str, args: tuple, folder: str, threads: int, log_level: str) -> None:
    """In the worker: ``module:function`` ``target`` called with ``args`` on ``threads`` torch threads, its
    output (the module's import included) appended to ``folder/run.log``."""
    torch.set_num_threads(threads)
    Path(folder).mkdir(parents=True, exist_ok=True)
    with open(Path(folder) / LOG_NAME, "a", buffering=1) as log:
        sys.stdout = sys.stderr = log
        quiet_optional_dependencies()
        setup_logging(log_level)
        if not progress_bars_shown(log_level):  # the job's own bars are its args'; the libraries' are hidden here
            hide_library_progress_bars()
        _resolve(target)(*args)


def _resolve(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _finished(folder: Path) -> dict:
    try:
        return json.loads((folder / "stages.json").read_text())["done"]
    except (OSError, ValueError, KeyError):  # not written yet, or being replaced
        return {}


@contextlib.contextmanager
def _log_interval():
    """While the block runs, the processes it starts (the jobs, whose output goes to their run.log) redraw their
    progress bars as into any log (:func:`shiq_data.launch.progress_for_logs`), whatever the command's own stderr
    is: tqdm reads ``TQDM_MININTERVAL`` as a process imports it, so it is given in the environment they start
    with. A user's own setting is kept; the command's environment is as it was after the block."""
    added = "TQDM_MININTERVAL" not in os.environ
    os.environ.setdefault("TQDM_MININTERVAL", LOG_INTERVAL)
    try:
        yield
    finally:
        if added:
            os.environ.pop("TQDM_MININTERVAL", None)


def run_side_by_side(
    target: str,
    jobs_args: list[tuple[str, Path, tuple]],
    jobs: int,
    log: Callable[[str], None],
    *,
    log_level: str = "INFO",
    poll_seconds: float = 10.0,
) -> None:
    """The function ``target`` (``"module:function"``, imported in each worker) called with ``args`` for each
    ``(name, folder, args)`` of ``jobs_args``, ``jobs`` processes at a time, each with
    :func:`threads_per_job` torch threads (the cores shared among ``min(jobs, runs)``) and its output in ``folder/run.log``. ``log`` gets a line when the
    jobs start, when a stage of one finishes (``folder/stages.json``) and when one ends. Every job runs to its
    end even when another fails; then the first failure (in ``jobs_args`` order) is raised again, its job
    named, as the same kind of error where it can be."""
    threads = threads_per_job(min(jobs, max(1, len(jobs_args))))  # the runs that go at once share the cores
    seen = {name: set(_finished(Path(folder))) for name, folder, _ in jobs_args}
    errors: dict[str, BaseException] = {}
    with _log_interval(), worker_pool(jobs) as pool:
        running = {}
        for name, folder, args in jobs_args:
            running[pool.submit(_job, target, args, str(folder), threads, log_level)] = (name, Path(folder))
        log(
            f"{plural(len(jobs_args), 'run')}, {min(jobs, len(jobs_args))} at a time with {plural(threads, 'thread')} each; "
            f"their output: <run>/{LOG_NAME}"
        )
        while running:
            done, _ = wait(running, timeout=poll_seconds, return_when=FIRST_COMPLETED)
            for name, folder in running.values():
                for stage, seconds in _finished(folder).items():
                    if stage not in seen[name]:
                        seen[name].add(stage)
                        log(f"{name}: {stage} finished ({seconds:.0f} s)")
            for future in done:
                name, folder = running.pop(future)
                if (error := future.exception()) is not None:
                    errors[name] = error
                    log(f"{name}: failed ({type(error).__name__}: {error}); see {folder / LOG_NAME}")
                else:
                    log(f"{name}: done")
    for name, _, _ in jobs_args:
        if name in errors:
            _raise_named(name, errors[name])


def _raise_named(name: str, error: BaseException) -> None:
    """Raise ``error`` again with its run's ``name`` before its message, as the same kind of error where it can
    be (an error type built from other arguments is raised as it was)."""
    try:
        named = type(error)(f"{name}: {error}")
    except Exception:
        raise error from None
    raise named from error


def run_each(
    target: str, jobs_args: list[tuple[str, Path, tuple]], jobs: int, log: Callable[[str], None], **kwargs
) -> None:
    """Each ``(name, folder, args)`` of ``jobs_args`` run by ``target``: one after the other in this process
    (its output where this process writes, after a line naming it; the first failure stops them, raised again with its run named) when
    ``jobs`` is 1, else :func:`run_side_by_side` (``kwargs`` go there)."""
    threads_per_job(jobs)  # refuses jobs < 1
    if jobs > 1:
        run_side_by_side(target, jobs_args, jobs, log, **kwargs)
        return
    for i, (name, folder, args) in enumerate(jobs_args):
        log(f"{name}: starting ({folder}; run {i + 1} of {len(jobs_args)})")  # (its stages' lines do not name it)
        try:
            _resolve(target)(*args)
        except Exception as error:  # named as side by side (Ctrl-C, a BaseException, goes as it is)
            _raise_named(name, error)
        log(f"{name}: done ({folder})")
