"""A test's ranks as processes: ``torch.multiprocessing``'s, forked from one server per test worker that has
imported torch, megatron-core and this project's training modules once.

``torch.multiprocessing.spawn`` starts each rank as a fresh interpreter, which imports all of them again:
about 4 s of CPU per rank, most of what a small two- or four-rank test costs (and the suite runs some sixty
of them). A forked rank starts with them imported; everything else is as under ``spawn``: a new process per
rank, the function and its arguments pickled, an exception in any rank raised here.
"""

import multiprocessing

import torch.multiprocessing as mp

# imported by the server before its first fork (a module that fails to import is imported by the rank itself)
PRELOAD = [
    "torch",
    "megatron.core",
    "megatron.core.models.gpt",
    "megatron.core.pipeline_parallel",
    "shiq_train.model",
    "shiq_train.trainer",
]


def spawn(fn, args=(), nprocs: int = 1) -> None:
    """``fn(rank, *args)`` in ``nprocs`` processes, as ``torch.multiprocessing.spawn(..., join=True)``."""
    multiprocessing.set_forkserver_preload(PRELOAD)  # (read when the server starts, at the first call)
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")
