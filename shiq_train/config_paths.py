"""The folders a training configuration names, ``data.buffer`` and ``init``: whether each exists, in one
wording for the command line's early check (:mod:`shiq_train.command_line`, before seconds of imports) and the
run's own (:mod:`shiq_train.cli`, for a configuration given otherwise). Light: no torch, no Hydra."""

from __future__ import annotations

from pathlib import Path

INIT_NAMES = ("none", "smollm2")  # init values that name no folder: random weights, the packaged model


def missing_buffer(buffer: str) -> str | None:
    """The refusal of ``data.buffer`` when no file or folder is at ``buffer``; None when one is."""
    if Path(buffer).exists():
        return None
    return f"data.buffer={str(buffer)!r} does not exist (a replay buffer directory written by shiq_data)"


def missing_init(init: str) -> str | None:
    """The refusal of an ``init`` that is neither a name of :data:`INIT_NAMES` nor a folder holding a
    ``config.json`` (a Hugging Face model's); None otherwise."""
    path = Path(init) / "config.json"
    if init in INIT_NAMES or path.is_file():
        return None
    return f"init={init!r}: expected none, smollm2 or a Hugging Face model folder, but {path} does not exist"
