"""A test's ranks as processes: ``torch.multiprocessing``'s, forked from one server per test worker that has
imported torch, megatron-core and this project's training modules once.

``torch.multiprocessing.spawn`` starts each rank as a fresh interpreter, which imports all of them again:
about 4 s of CPU per rank, most of what a small two- or four-rank test costs. A forked rank starts with them imported; everything else is as under ``spawn``: a new process per
rank, the function and its arguments pickled, an exception in any rank raised here.
"""

import multiprocessing
import multiprocessing.forkserver
import os

import torch.multiprocessing as mp

# imported by the server before its first fork (a module that fails to import is imported by the rank itself);
# shiq-data's parallel build uses the same server (one per process), and imports the last two
PRELOAD = [
    "torch",
    "megatron.core",
    "megatron.core.models.gpt",
    "megatron.core.pipeline_parallel",
    "shiq_train.model",
    "shiq_train.trainer",
    "shiq_data.readers.parallel",
    "transformers",
]


def start_server() -> None:
    """Starts the server, with :data:`PRELOAD`, unless it runs: the test session does it before any test,
    whose environment (a test's ``monkeypatch.setenv``) it would otherwise keep."""
    multiprocessing.set_forkserver_preload(PRELOAD)
    multiprocessing.forkserver.ensure_running()


def spawn(fn, args=(), nprocs: int = 1) -> None:
    """``fn(rank, *args)`` in ``nprocs`` processes, as ``torch.multiprocessing.spawn(..., join=True)``: in this
    process's environment and working folder (not the server's)."""
    start_server()
    context = (dict(os.environ), os.getcwd(), fn, args)
    mp.start_processes(_in_context, args=context, nprocs=nprocs, join=True, start_method="forkserver")


def _in_context(rank: int, env: dict, cwd: str, fn, args: tuple) -> None:
    as_caller(env, cwd)
    fn(rank, *args)


def as_caller(env: dict, cwd: str) -> None:
    """In a forked process: the caller's environment and working folder in place of the server's."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
