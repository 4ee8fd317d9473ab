"""The entry points of ``shiq-eval`` and the recipes' commands (``shiq_data.launch``: a Ctrl-C at start-up ends
in one line)."""

from __future__ import annotations

from shiq_data.launch import run


def shiq_eval() -> int | None:
    """``shiq-eval`` (``shiq_eval.cli``)."""
    return run("shiq-eval", "shiq_eval.cli")


def shiq_demo() -> int | None:
    """``shiq-demo`` (``shiq_eval.recipes.demo``)."""
    return run("shiq-demo", "shiq_eval.recipes.demo")


def shiq_bfcl() -> int | None:
    """``shiq-bfcl`` (``shiq_eval.recipes.bfcl``)."""
    return run("shiq-bfcl", "shiq_eval.recipes.bfcl")


def shiq_toys() -> int | None:
    """``shiq-toys`` (``shiq_eval.recipes.toys``)."""
    return run("shiq-toys", "shiq_eval.recipes.toys")
