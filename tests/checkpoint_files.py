"""Writing a checkpoint's files in tests as ``shiq_train.checkpoint`` writes them."""

from __future__ import annotations

import hashlib
from pathlib import Path


def write_meta(path: Path, text: str) -> None:
    """``path`` (a step's ``meta.json``) holding ``text``, with the checksum ``meta.json.sha256`` beside it that
    ``save_checkpoint`` writes: a test of what ``read_meta`` refuses in the content reaches that check (an edit
    that leaves the checksum as it was is refused by it first)."""
    path.write_text(text)
    path.with_name(path.name + ".sha256").write_text(f"{hashlib.sha256(text.encode()).hexdigest()}  {path.name}\n")
