"""Running ``shiq-data`` in the test's process as a user would from the shell, writing its JSONL inputs, and
editing a buffer's shard by hand."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa

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


def rewrite_shard(buffer_dir: Path, k: int, edit) -> None:
    """Rewrite shard ``k`` by plain pyarrow with ``edit(rows)`` applied, its checksum and size fixed up by hand
    (what a hand-edited shard looks like to every check but a row's)."""
    manifest = json.loads((buffer_dir / "manifest.json").read_text())
    path = buffer_dir / manifest["shards"][k]["file"]
    with pa.memory_map(str(path)) as f:
        table = pa.ipc.open_stream(f).read_all()
    rows = table.to_pylist()
    edit(rows)
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(pa.Table.from_pylist(rows, schema=table.schema))
    manifest["shards"][k].update(sha256=hashlib.sha256(path.read_bytes()).hexdigest(), bytes=path.stat().st_size)
    (buffer_dir / "manifest.json").write_text(json.dumps(manifest))
