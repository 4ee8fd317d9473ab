"""Full check of a replay buffer: manifest, shard checksums, schema and every row.

Shards are read one at a time and their rows checked in slices of 1024, on whole columns (converted to Python
rows only in a slice that may hold a bad row, to name it); the row ids (unique over the
buffer) and group ids (counted) of all rows go to a temporary Parquet table next to the buffer that DuckDB
checks within a fixed memory limit (:mod:`shiq_data.spill`), so memory does not grow with the buffer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from shiq_data.buffer import (
    MANIFEST,
    Buffer,
    _sha256_file,
    has_text_columns,
    read_manifest,
    read_shard,
    remove_unlisted_files_unless_locked,
)
from shiq_data.io import progress_bar
from shiq_data.schema import arrow_schema, check_slice
from shiq_data.spill import Spill

_ROWS_PER_SLICE = 1024  # rows checked at a time (bounded memory on big shards, also when converted to Python)
_ATTEMPTS = 3  # checks of a buffer whose manifest keeps changing under the check


def validate_buffer(path, *, vocab_size: int | None = None, cleanup: bool = False, progress: bool = False) -> dict:
    """Check the buffer at ``path``; return a summary dict, or raise ``ValueError`` / ``RowError``.

    Checks: the manifest's format and fields; every listed shard exists with the recorded size and
    sha256, has the schema :func:`shiq_data.schema.arrow_schema` (with the reference columns and the
    text columns when the manifest says so; a version-1 manifest has no text columns) and the recorded
    row, token and action-token counts; every row passes :func:`shiq_data.schema.check_row` against
    ``vocab_size`` (default: the manifest tokenizer's); ``row_id`` is unique and ``group_id <
    next_group_id``; the manifest totals add up. With ``cleanup``, files the manifest does not list
    (left by a killed append) are deleted first, under the buffer's lock; when another process holds
    it (an append or ``ref-stats`` is writing shards the manifest does not list yet) nothing is
    deleted, ``cleanup_skipped`` says why, and the check is read-only. A check that fails while the
    manifest changed under it (a writer committed) is
    repeated on the new manifest, up to three times in all.
    """
    path = Path(path)
    read_manifest(path)  # a clear error before touching anything when ``path`` is not a buffer
    removed, skipped = [], None
    if cleanup:
        removed, why = remove_unlisted_files_unless_locked(path)
        skipped = f"{why}; unlisted files were left in place" if why else None
    for attempt in range(_ATTEMPTS):
        manifest = read_manifest(path)
        try:
            result = _check_shards(path, manifest, vocab_size, progress)
            break
        except (ValueError, OSError):
            # A writer (append, ref-stats) committing while the shards were read can make a listed
            # shard vanish or change; check its new manifest instead. A broken buffer fails every time.
            if attempt + 1 == _ATTEMPTS or read_manifest(path) == manifest:
                raise
    return {"path": str(path), **result, "removed_files": removed, "cleanup_skipped": skipped}


ID_SCHEMA = pa.schema(
    [("pos", pa.int64()), ("shard", pa.int32()), ("row_id", pa.string())]
)  # what refuse_repeated_ids reads


def id_rows(pos: int, shard: int, row_ids) -> pa.Table:
    """The rows of an :data:`ID_SCHEMA` spill table for shard number ``shard``'s ``row_ids``, the first of them the
    buffer's row ``pos``."""
    n = len(row_ids)
    return pa.table({"pos": np.arange(pos, pos + n), "shard": np.full(n, shard, np.int32), "row_id": row_ids})


def refuse_repeated_ids(spill: Spill, table: str, path: Path, shards: list[dict]) -> None:
    """Refuse a ``row_id`` the spill's ``table`` (``pos``, ``shard``, ``row_id``: every row of the buffer at
    ``path``, its manifest's ``shards``) holds twice, naming the later row's shard and row."""
    ids = spill.table(table)
    repeat = spill.one(
        f"""SELECT shard, pos, row_id FROM {ids} n JOIN (SELECT row_id, min(pos) AS first FROM {ids} GROUP BY row_id) f
        USING (row_id) WHERE n.pos > f.first ORDER BY pos LIMIT 1"""
    )
    if repeat is not None:
        k, pos, rid = repeat
        raise not_unique(Path(path) / shards[k]["file"], pos - sum(s["rows"] for s in shards[:k]), rid)


def not_unique(shard: Path, row: int, row_id: str) -> ValueError:
    """The error for a ``row_id`` met again at ``row`` of ``shard`` (the later of the two rows), in validate's
    words, which every verb refusing a repeated id uses."""
    return ValueError(f"{shard}: row {row}: field 'row_id': {row_id!r} is not unique")


def check_unique_ids(buffer: Buffer, near: Path) -> None:
    """Refuse, as ``validate`` does, a buffer in which a ``row_id`` repeats (a shard edited together with its
    checksum), naming the later row's shard and row. The ids go to a :class:`~shiq_data.spill.Spill` beside
    ``near``, so memory does not grow with the buffer."""
    with Spill(near) as spill:
        spill.declare("ids", ID_SCHEMA)
        pos = 0
        for k, table in enumerate(buffer.shard_columns(["row_id"])):
            spill.append("ids", id_rows(pos, k, table.column("row_id")))
            pos += table.num_rows
        refuse_repeated_ids(spill, "ids", buffer.path, buffer.manifest["shards"])


def _check_shards(path: Path, manifest: dict, vocab_size: int | None, progress: bool) -> dict:
    """Every check of :func:`validate_buffer` against one manifest; the summary counts."""
    with Spill(path) as spill:
        return _check_rows(path, manifest, vocab_size, progress, spill)


def _check_rows(path: Path, manifest: dict, vocab_size: int | None, progress: bool, spill: Spill) -> dict:
    mpath = path / MANIFEST
    vocab = vocab_size if vocab_size is not None else manifest["tokenizer"].get("vocab_size")
    spill.declare(
        "ids",
        pa.schema([("pos", pa.int64()), ("shard", pa.int32()), ("row_id", pa.string()), ("group_id", pa.int64())]),
    )
    totals = {"rows": 0, "tokens": 0, "action_tokens": 0}
    shards = manifest["shards"]
    with progress_bar(progress, total=len(shards), desc="validating", unit=" shards") as bar:
        for k, entry in enumerate(shards):
            shard = path / entry["file"]
            if not shard.is_file():
                raise ValueError(f"{mpath}: shard {k} file {entry['file']!r} is missing")
            if shard.stat().st_size != entry["bytes"]:
                raise ValueError(f"{shard}: size {shard.stat().st_size} bytes, manifest says {entry['bytes']}")
            if _sha256_file(shard) != entry["sha256"]:
                raise ValueError(f"{shard}: sha256 differs from the manifest's (the file changed or is corrupt)")
            try:
                table = read_shard(shard)
            except Exception as e:  # pyarrow raises several error types on damaged files
                raise ValueError(f"{shard}: not a readable Arrow IPC stream ({e})") from None
            text = has_text_columns(manifest)
            want = arrow_schema(bool(entry["has_ref"]), text)
            if table.schema.names != want.names or [f.type for f in table.schema] != [f.type for f in want]:
                raise ValueError(
                    f"{shard}: schema {table.schema.names} does not match {want.names} "
                    f"(has_ref={entry['has_ref']}, text_columns={text})"
                )
            if table.num_rows != entry["rows"]:
                raise ValueError(f"{shard}: holds {table.num_rows} rows, manifest says {entry['rows']}")
            n_tokens = n_actions = 0
            for start in range(0, table.num_rows, _ROWS_PER_SLICE):
                piece = table.slice(start, _ROWS_PER_SLICE)
                tokens, actions = check_slice(piece, start, vocab, shard, manifest["next_group_id"])
                n_tokens += tokens
                n_actions += actions
                pos = totals["rows"] + start
                ids = {
                    "pos": np.arange(pos, pos + piece.num_rows),
                    "shard": np.full(piece.num_rows, k, np.int32),
                    "row_id": piece.column("row_id"),
                    "group_id": piece.column("group_id"),
                }
                spill.append("ids", pa.table(ids))
            for name, value in (("tokens", n_tokens), ("action_tokens", n_actions)):
                if value != entry[name]:
                    raise ValueError(f"{shard}: holds {value} {name}, manifest says {entry[name]}")
            totals["rows"] += table.num_rows
            totals["tokens"] += n_tokens
            totals["action_tokens"] += n_actions
            bar.update()
    ids = spill.table("ids")
    refuse_repeated_ids(spill, "ids", path, shards)
    (n_groups,) = spill.one(f"SELECT count(*) FROM (SELECT group_id FROM {ids} GROUP BY group_id)")
    for name, value in totals.items():
        if manifest.get(name) != value:
            raise ValueError(f"{mpath}: field {name!r} is {manifest.get(name)}, the shards hold {value}")
    return {
        **totals,
        "shards": len(shards),
        "groups": n_groups,
        "has_ref_stats": bool(shards) and all(s["has_ref"] for s in shards),
        "tokenizer": manifest["tokenizer"].get("name"),
    }
