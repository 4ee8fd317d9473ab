"""Running a script of ``tools/`` as a user does, and reading the Markdown table it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def run_tool(name: str, *args: str, timeout: float = 600) -> str:
    """``python tools/<name> args...``: its standard output, once it has exited with status 0."""
    out = subprocess.run([sys.executable, str(TOOLS / name), *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def table_rows(text: str) -> list[list[str]]:
    """The cells of every row of the Markdown tables in ``text``, header rows included, separators left out."""
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| ") and not re.fullmatch(r"\|[-:| ]+\|", line.strip())
    ]
