"""Shared test settings: deterministic, single-threaded torch so tests behave the same on 2 cores."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(1)
