"""The ``shiq-train`` command's entry point (``shiq_data.launch``: a Ctrl-C at start-up ends in one line)."""

from __future__ import annotations

from shiq_data.launch import run


def shiq_train() -> int | None:
    """``shiq-train`` (``shiq_train.command_line``)."""
    return run("shiq-train", "shiq_train.command_line")
