"""Running ``shiq-data`` in the test's process as a user would from the shell, and writing its JSONL inputs."""

from __future__ import annotations

import json
from pathlib import Path

from shiq_data.cli import main


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """``records`` as a JSONL file at ``path`` (one object a line); returns ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run(capsys, *argv):
    """``shiq-data argv...`` (each turned into a string): ``(exit status, stdout, stderr)``."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err
