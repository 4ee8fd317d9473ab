"""Replay buffers on disk: Arrow IPC stream shards plus a JSON manifest, written atomically.

Layout of a buffer folder::

    manifest.json          the commit point: lists every shard that belongs to the buffer
    shard-00000.arrow      Arrow IPC *stream* shards (schema in shiq_data.schema), one record batch each
    shard-00001.arrow
    shard-00000.r1.arrow   a shard rewritten with reference statistics (revision 1), see replace_shard
    .lock                  advisory lock taken by append / replace_shard

Stream-format shards are what ``datasets`` writes, so ``datasets.Dataset.from_file(shard)`` and plain
``pyarrow.ipc.open_stream(pyarrow.memory_map(shard))`` both read them zero-copy.

``manifest.json`` (plain JSON)::

    {"format": "shiq-replay-buffer", "schema_version": 2, "text_columns": bool,
     "tokenizer": {"name", "fingerprint", "pipeline_fingerprint", "vocab_size", ...},
     "rows", "tokens", "action_tokens", "next_group_id",
     "shards": [{"file", "rows", "tokens", "action_tokens", "bytes", "sha256", "has_ref"}],
     "has_ref_stats": bool, "ref_model": {...} | null,
     "ref_stats": {"ref_model": {...}, "done": [shard files with reference columns]} | null,
     "commands": [{"argv", "time", "rows", "shards"}], "created", "updated",
     "shard_rows": rows per shard asked for (absent from buffers written before it was kept: :func:`shard_rows_of`),
     "shard_bytes": the most bytes a shard's file may take unless it is one row (absent from buffers written before
                    it was kept: :func:`shard_bytes_of`),
     "retokenized_from": {"path", "fingerprint", ...} (only on a re-tokenised buffer)}

``tokenizer.pipeline_fingerprint`` (:func:`shiq_data.tokenizers.pipeline_fingerprint`: how the tokenizer cuts
text, which ``fingerprint`` does not see) is absent from buffers written before it was recorded; those are
checked on ``fingerprint`` alone, and an append keeps them without it.

``text_columns`` says whether the shards hold the text columns (:data:`shiq_data.schema.TEXT_FIELDS`).
Version-1 manifests (no text columns) still open, sample, train and validate; their text columns
read as null (:meth:`Buffer.columns`, :meth:`Buffer.shard_columns`). Appending to one writes shards
without text and upgrades the manifest to version 2 with ``text_columns`` false.

Atomicity. :func:`write_buffer` builds in a temporary folder next to the target and renames it into
place at the end: a failed or killed build leaves no buffer. :func:`append_buffer` writes new shards
under temporary names, renames them to their final names and then replaces ``manifest.json`` with
``os.replace``; old shards are never rewritten. :func:`replace_shard` writes the new version of a
shard under a new file name and switches the manifest to it the same way. Readers only look at the
shards the manifest lists; files it does not list (left by a killed append or rewrite) are removed by
the next append, rewrite or ``validate`` (all under the lock; ``validate`` skips the removal while
another process holds it).

Shard size. A shard ends at ``shard_rows`` rows or when its file would pass ``shard_bytes`` (default 256 MiB),
whichever comes first; a row larger than that is a shard alone (:class:`_ShardStream`). Shards of one buffer hold
different numbers of rows: readers take each shard's rows from the manifest or the shard, never from
``shard_rows``. Adding reference statistics (:func:`replace_shard`) grows a shard by 8 bytes a token, which may
take it past the bound it was written with.

Memory. Writing holds one shard's rows at a time (about ``shard_bytes`` of Arrow data at most, and rows given one
by one as Python objects only until they make :data:`ROWS_TO_ARROW_BYTES` of it). What must be remembered about
every row (its ``row_id``, unique in the buffer, and on an append the old rows' prompt and completion texts, to find
repeats) goes to temporary Parquet tables next to the output, which DuckDB joins after the last row
within a fixed memory limit (:class:`_RowLog`, :mod:`shiq_data.spill`), so neither grows with the buffer.

Resumable reference statistics: :func:`shards_without_ref` lists the shards still to do, and
:func:`add_ref_columns` (or :func:`replace_shard`) commits one shard at a time; a killed run
restarts from the shards the manifest does not yet mark as done.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import sys
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shiq_data.io import (
    RowError,
    atomic_write_json,
    exclusive_lock,
    fsync_dir,
    held_dir,
    make_parents,
    one_line,
    progress_bar,
    read_json_file,
    release_held,
    remove_created_dirs,
    remove_stale_hostless,
    sha256_files,
    sweep_held,
    this_host,
    type_name,
    unmade_folder,
)
from shiq_data.readers.encode import decode_text, given_text
from shiq_data.schema import (
    CHECKED_KEY,
    GROUP_ID_MAX,
    INPUT_KEY,
    LIST_FIELDS,
    READABLE_VERSIONS,
    REF_FIELDS,
    SCHEMA_VERSION,
    TEXT_FIELDS,
    TEXT_TYPES,
    arrow_schema,
    at_input,
    check_row,
    check_slice,
    row_has_ref,
)
from shiq_data.spill import Spill
from shiq_data.tokenizers import CHAT_TEMPLATE_FIELD, PIPELINE_FIELD, pipeline_mismatch

log = logging.getLogger(__name__)

FORMAT = "shiq-replay-buffer"
MANIFEST = "manifest.json"
LOCK = ".lock"
# (.fullmatch) what a manifest may list; groups: the shard's number, its revision (None for the first)
_SHARD_NAME = re.compile(r"shard-([0-9]{5})(?:\.r([0-9]+))?\.arrow")
# (.fullmatch) the files a write may leave: a shard (of any revision) renamed into place, or its temporary name;
# nothing else named like a shard (a user's shard-00001.arrow.bak) is the buffer's to remove
_SHARD_RE = re.compile(rf"\.?{_SHARD_NAME.pattern}(\.tmp)?")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
SHARD_NUMBER_MAX = 99999  # the shard numbers _SHARD_NAME allows (five digits)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _sha256_file(path: Path) -> str:
    return sha256_files([path])


def shard_file_name(index: int, revision: int = 0) -> str:
    """``shard-00007.arrow``, or ``shard-00007.r2.arrow`` for a rewritten shard."""
    return f"shard-{index:05d}.arrow" if revision == 0 else f"shard-{index:05d}.r{revision}.arrow"


def _list_array(values: list, dtype: np.dtype, pa_type) -> pa.ListArray:
    """A list<...> Arrow array from a list of 1-D sequences, built from one flat numpy buffer."""
    lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
    if int(lengths.sum()) > np.iinfo(np.int32).max:  # a list column's offsets are 32-bit: they would wrap
        raise ValueError(
            f"{int(lengths.sum())} values in one shard's column: more than 2**31 - 1; use fewer rows a shard"
        )
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([np.asarray(v, dtype=dtype) for v in values]) if values else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa_type))


def rows_to_table(rows: list[dict], with_ref: bool, text: bool = False) -> pa.Table:
    """A shard table (schema :func:`shiq_data.schema.arrow_schema`) from checked row dicts (a text column a
    row lacks is null)."""
    schema = arrow_schema(with_ref, text)
    cols = {
        "row_id": pa.array([r["row_id"] for r in rows], pa.string()),
        "source": pa.array([r["source"] for r in rows], pa.string()),
        "group_id": pa.array([int(r["group_id"]) for r in rows], pa.int64()),
        "prompt_len": pa.array([int(r["prompt_len"]) for r in rows], pa.int32()),
        "tokens": _list_array([r["tokens"] for r in rows], np.int32, pa.int32()),
        "action_mask": _list_array([r["action_mask"] for r in rows], np.bool_, pa.bool_()),
        "rewards": _list_array([r["rewards"] for r in rows], np.float32, pa.float32()),
    }
    if text:
        for name in TEXT_FIELDS:
            cols[name] = pa.array([r.get(name) for r in rows], TEXT_TYPES[name])
    if with_ref:
        for name in REF_FIELDS:
            cols[name] = _list_array([r[name] for r in rows], np.float32, pa.float32())
    return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)


def write_shard_file(table: pa.Table, path: Path) -> dict:
    """Write ``table`` as one Arrow stream record batch at ``path`` (fsynced); its manifest entry."""
    batch = table.combine_chunks().to_batches()
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for b in batch:
            writer.write_batch(b)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    lengths = pc.list_value_length(table.column("tokens"))
    n_actions = pc.sum(pc.cast(pc.list_flatten(table.column("action_mask")), pa.int64()))
    return {
        "file": path.name,
        "rows": table.num_rows,
        "tokens": int(pc.sum(lengths).as_py() or 0),
        "action_tokens": int(n_actions.as_py() or 0),
        "bytes": path.stat().st_size,
        "sha256": _sha256_file(path),
        "has_ref": all(n in table.schema.names for n in REF_FIELDS),
    }


def row_bits(table: pa.Table, null_items: Collection[str] = ()) -> np.ndarray:
    """``[rows]`` int64: at least the bits of Arrow data each row of ``table`` puts in a shard file
    (:func:`write_shard_file`), computed on whole columns: a fixed-width value's width, a string's UTF-8 bytes
    (:func:`pyarrow.compute.binary_length`) plus its offset, a list's offset plus its length
    (:func:`pyarrow.compute.list_value_length`) times its items' width, and a validity bit for every value (the
    file holds a column's bitmap only when the column has a null). A list column's items get their validity bit
    only when the column is in ``null_items`` or its items in ``table`` hold a null (the file then holds their
    bitmap for every item of the shard: see :meth:`_ShardStream._hold`). The rest of a file, the stream's framing,
    each buffer's padding to 8 bytes and the offsets' last entry, is at most :func:`shard_overhead`;
    :func:`shard_file_bytes` gives a file's exact size."""
    bits = np.zeros(table.num_rows, np.int64)
    for name, column in zip(table.schema.names, table.columns):
        kind = column.type
        if _is_list(kind):
            lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
            null_bit = int(name in null_items or pc.list_flatten(column).null_count > 0)
            bits += 1 + _offset_bits(kind) + lengths * (_item_bits(kind.value_type) + null_bit)
        elif _is_binary(kind):
            lengths = pc.binary_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
            bits += 1 + _offset_bits(kind) + 8 * lengths
        else:
            bits += 1 + _item_bits(kind)
    return bits


def _is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind)


def _is_binary(kind: pa.DataType) -> bool:
    return any(
        is_(kind)
        for is_ in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
    )


def _offset_bits(kind: pa.DataType) -> int:
    """Bits of one offset of a list or string column of ``kind`` (64 for the large kinds)."""
    large = pa.types.is_large_list(kind) or pa.types.is_large_string(kind) or pa.types.is_large_binary(kind)
    return 64 if large else 32


def _item_bits(kind: pa.DataType) -> int:
    """Bits of a value of the fixed-width ``kind`` (1 for a boolean); ``TypeError`` for another kind (no buffer schema
    has one)."""
    if pa.types.is_boolean(kind) or pa.types.is_integer(kind) or pa.types.is_floating(kind):
        return kind.bit_width
    raise TypeError(f"no shard size for values of {kind}")


def _buffers(column, kind: pa.DataType, n: int) -> list[int]:
    """The bytes of each Arrow buffer a shard file holds for ``column`` (chunked or not; ``n`` values of ``kind``)
    written compactly: its bitmap (none without a null), offsets, values, and a list's items' buffers."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out = [(n + 7) // 8 if any(c.null_count for c in chunks) else 0]
    if _is_list(kind):
        items = pa.chunked_array([c.flatten() for c in chunks], kind.value_type)  # (a null list holds no items)
        return out + [(n + 1) * _offset_bits(kind) // 8, *_buffers(items, kind.value_type, len(items))]
    if _is_binary(kind):
        data = pc.sum(pc.binary_length(column)).as_py() or 0
        return out + [(n + 1) * _offset_bits(kind) // 8, data]
    return out + [(n * _item_bits(kind) + 7) // 8]


def _body_bytes(table: pa.Table) -> int:
    """The bytes of ``table``'s record batch body as a shard file holds it (each buffer padded to 8 bytes)."""
    sizes = [b for column in table.columns for b in _buffers(column, column.type, table.num_rows)]
    return sum((b + 7) // 8 * 8 for b in sizes)


_FRAMING: dict[pa.Schema, int] = {}


def shard_file_bytes(table: pa.Table) -> int:
    """The exact size of the file :func:`write_shard_file` writes for ``table`` (at least one row) once made compact
    (:func:`compact_table`): its record batch's body (:func:`_body_bytes`, from the columns' lengths, nothing
    written) and the stream's framing, the same for every batch of a schema (measured once on a row of it)."""
    schema = table.schema
    if schema not in _FRAMING:
        one = pa.table(
            [pa.array([[] if _is_list(f.type) else "" if _is_binary(f.type) else 0], f.type) for f in schema],
            schema=schema,
        )
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, schema) as writer:
            writer.write_table(one)
        _FRAMING[schema] = len(sink.getvalue()) - _body_bytes(one)
    return _FRAMING[schema] + _body_bytes(table)


def compact_table(table: pa.Table) -> pa.Table:
    """``table`` as one chunk of new buffers holding only its rows (a slice of a larger array is written by Arrow with
    up to 56 bytes of the array beyond the slice in a buffer's padding, a size :func:`shard_file_bytes` does not
    foresee)."""
    return pa.Table.from_arrays(
        [pa.concat_arrays(c.chunks) if c.num_chunks else pa.array([], c.type) for c in table.columns],
        schema=table.schema,
    )


def shard_overhead(schema: pa.Schema) -> int:
    """Bytes a shard file of ``schema`` takes beyond its rows' :func:`row_bits` (rounded up to bytes), at most: the
    stream's schema message, its record batch's metadata and end marker (measured on an empty batch, plus 64 for
    the fields an empty batch leaves out), and per Arrow buffer 7 bytes of padding to 8, a bitmap's last byte and an
    offsets buffer's last entry (16 bytes counted)."""
    empty = pa.record_batch([pa.array([], f.type) for f in schema], schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(empty)
    return len(sink.getvalue()) + 64 + 16 * sum(_buffer_count(f.type) for f in schema)


def _buffer_count(kind: pa.DataType) -> int:
    """Arrow buffers of a column of ``kind``: validity, offsets, values, and its items' for a list."""
    if _is_list(kind):
        return 2 + _buffer_count(kind.value_type)
    return 3 if _is_binary(kind) else 2


def read_shard(path: Path) -> pa.Table:
    """A shard as a pyarrow Table backed by a memory map of the file (no copy); ``ValueError`` naming the file
    when it is not a valid Arrow stream (damaged, or replaced together with its checksum; its text columns
    must be UTF-8, which Arrow does not check on reading)."""
    source = pa.memory_map(str(path), "r")  # (a missing file, no permission: the system's error, as it is)
    try:
        with pa.ipc.open_stream(source) as reader:
            table = reader.read_all()
        table.validate(full=True)  # offsets in range, strings UTF-8 (30 ms per 100 MB)
        return table
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:  # Arrow's OSError without errno: a truncated file
        if isinstance(e, OSError) and e.errno is not None:  # the system's (a read error): not the file's content
            raise
        raise ValueError(f"{path}: not a readable Arrow shard ({one_line(e, 160)}); the buffer is damaged") from None


def has_text_columns(manifest: dict) -> bool:
    """Whether the buffer's shards hold the text columns (never for a version-1 manifest)."""
    return manifest.get("schema_version") != 1 and manifest.get("text_columns") is True


def buffer_fingerprint(manifest: dict) -> str:
    """sha256 of the buffer's content: its tokenizer fingerprint and its shards' sha256 in order (two buffers
    with the same fingerprint hold the same rows)."""
    parts = [manifest["tokenizer"]["fingerprint"], *(s["sha256"] for s in manifest["shards"])]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class Buffer:
    """An opened replay buffer (see :func:`open_buffer`). Reading never copies shard data into memory.

    ``schema`` is what the shards hold (the text columns only when ``has_text``), and so what :attr:`table`
    and :meth:`row` give; :meth:`columns` and :meth:`shard_columns` read only the columns asked for, and
    give the text columns of a buffer without them (version 1, ``--no-text``) as nulls.
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self.shard_paths = [self.path / s["file"] for s in manifest["shards"]]
        self.has_ref_stats = bool(manifest["shards"]) and all(s["has_ref"] for s in manifest["shards"])
        self.has_text = has_text_columns(manifest)
        self.schema = arrow_schema(self.has_ref_stats, self.has_text)
        self._shard_tables: list[pa.Table] | None = None
        self._table: pa.Table | None = None

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    def __repr__(self) -> str:
        return f"Buffer({str(self.path)!r}, rows={len(self)}, tokens={self.manifest['tokens']})"

    @property
    def tokenizer_info(self) -> dict:
        return dict(self.manifest["tokenizer"])

    @property
    def shard_tables(self) -> list[pa.Table]:
        """One memory-mapped table per shard, restricted to the buffer's common columns."""
        if self._shard_tables is None:
            self._shard_tables = [t.select(self.schema.names) for t in self.checked_shards()]
        return self._shard_tables

    def checked_shards(self) -> Iterator[pa.Table]:
        """Each shard as a memory-mapped table with every stored column, its number of rows and the buffer's
        columns (of the buffer's types) checked against the manifest: a shard replaced together with its checksum
        is named, not read as rows."""
        for p, entry in zip(self.shard_paths, self.manifest["shards"]):
            t = read_shard(p)
            if t.num_rows != entry["rows"]:
                raise ValueError(f"{p}: holds {t.num_rows} rows, manifest says {entry['rows']}; the buffer is damaged")
            for f in self.schema:
                if f.name not in t.schema.names or column_kind(t.schema.field(f.name).type) != column_kind(f.type):
                    got = t.schema.field(f.name).type if f.name in t.schema.names else "missing"
                    raise ValueError(
                        f"{p}: column {f.name!r} is {got}, the buffer's schema says {f.type} "
                        f"({self.path / MANIFEST}); the buffer is damaged"
                    )
            yield t

    def shard_columns(self, names) -> list[pa.Table]:
        """One memory-mapped table per shard holding only the columns ``names`` (nothing else is read); a
        text column the shards lack (version 1, ``--no-text``) is all null."""
        names = list(names)
        unknown = [n for n in names if n not in self.schema.names and n not in TEXT_FIELDS]
        if unknown:
            raise ValueError(f"{self.path}: no columns {unknown} (it has {self.schema.names + list(TEXT_FIELDS)})")
        out = []
        for t in self.shard_tables:
            cols = [
                t.column(n) if n in t.schema.names else pa.chunked_array([pa.nulls(t.num_rows, TEXT_TYPES[n])])
                for n in names
            ]
            out.append(pa.Table.from_arrays(cols, names=names))
        return out

    def columns(self, names) -> pa.Table:
        """All rows' columns ``names`` as one table (:meth:`shard_columns` concatenated, without copying)."""
        tables = self.shard_columns(names)
        if tables:
            return pa.concat_tables(tables)
        types = {f.name: f.type for f in arrow_schema(True, True)}
        return pa.schema([pa.field(n, types[n]) for n in names]).empty_table()

    @property
    def table(self) -> pa.Table:
        """All rows as one pyarrow Table: the shards' memory-mapped record batches, concatenated without copying."""
        if self._table is None:
            tables = self.shard_tables
            self._table = pa.concat_tables(tables) if tables else self.schema.empty_table()
        return self._table

    def row(self, i: int) -> dict:
        """Row ``i`` as a dict of Python values and lists."""
        if not -len(self) <= i < len(self):
            raise IndexError(
                f"row {i} out of range for a buffer of {len(self)} row{'s' * (len(self) != 1)} ({self.path})"
            )
        return self.table.slice(i % len(self), 1).to_pylist()[0]

    def to_datasets(self):
        """The rows as a ``datasets.Dataset`` memory-mapping the shard files (no copy)."""
        import datasets  # heavy: only this conversion needs it

        parts = []
        for p in self.shard_paths:
            ds = datasets.Dataset.from_file(str(p))
            extra = [c for c in ds.column_names if c not in self.schema.names]
            parts.append(ds.remove_columns(extra) if extra else ds)
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def read_manifest(buffer_dir) -> dict:
    """The parsed ``manifest.json`` of a buffer folder, with its format and version checked."""
    path = Path(buffer_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {buffer_dir} is not a replay buffer (no manifest)")
    manifest = read_json_file(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: field 'format' must be {FORMAT!r}")
    version = manifest.get("schema_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise ValueError(
            f"{path}: field 'schema_version' is {version!r}; this code reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    if version >= 2 and not isinstance(manifest.get("text_columns"), bool):
        raise ValueError(f"{path}: field 'text_columns' must be true or false, got {manifest.get('text_columns')!r}")
    for key in ("tokenizer", "rows", "tokens", "action_tokens", "shards", "next_group_id", "commands"):
        if key not in manifest:
            raise ValueError(f"{path}: field {key!r} missing")
    _check_manifest_types(path, manifest)
    return manifest


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63


DEFAULT_SHARD_ROWS = 4096
MIB = 2**20
DEFAULT_SHARD_BYTES = 256 * MIB  # a shard's file at most (its rows' Arrow data and the stream's framing)


def shard_rows_of(manifest: dict) -> int:
    """The rows per shard a buffer was written with, for the shards added to it or to a buffer curated from it:
    its manifest's ``shard_rows``. For a buffer written before that was kept (whose appends took their size
    from its first shard), the first shard's rows when the command that wrote it wrote more (so it is full),
    else at least :data:`DEFAULT_SHARD_ROWS` (a buffer begun with 5 rows does not make every later shard 5 rows)."""
    if _is_count(manifest.get("shard_rows")) and manifest["shard_rows"] >= 1:
        return manifest["shard_rows"]
    if not manifest["shards"]:
        return DEFAULT_SHARD_ROWS
    first = manifest["shards"][0]
    # the last command listing it wrote it (a curated buffer's commands start with its parent's, same file names)
    wrote = [
        c.get("shards")
        for c in manifest["commands"]
        if isinstance(c, dict) and first["file"] in (c.get("shards") or [])
    ]
    full = bool(wrote) and len(wrote[-1]) > 1
    return max(int(first["rows"]), 1) if full else max(int(first["rows"]), DEFAULT_SHARD_ROWS)


def shard_bytes_of(manifest: dict) -> int:
    """The bytes a shard of a buffer may take (:func:`write_buffer`'s ``shard_bytes``), for the shards added to it
    or to a buffer curated from it: its manifest's ``shard_bytes``, or :data:`DEFAULT_SHARD_BYTES` for a buffer
    written before that was kept (whose shards were bounded by rows alone)."""
    value = manifest.get("shard_bytes")
    return value if _is_count(value) and value >= 1 else DEFAULT_SHARD_BYTES


def _check_manifest_types(path: Path, manifest: dict) -> None:
    """Raise ``ValueError`` naming ``path`` and the field unless every field this code reads is present (every
    schema version has them) with the right type, the totals are the sums over the shards, and every shard
    entry names a distinct plain shard file inside the buffer folder (no ``..``, no absolute path, no
    symlink leading out)."""
    for key in ("rows", "tokens", "action_tokens", "next_group_id"):
        if not _is_count(manifest[key]):
            raise ValueError(f"{path}: field {key!r} must be an integer in [0, 2**63), got {manifest[key]!r:.40}")
    if "shard_rows" in manifest and not (_is_count(manifest["shard_rows"]) and manifest["shard_rows"] >= 1):
        raise ValueError(f"{path}: field 'shard_rows' must be an integer >= 1, got {manifest['shard_rows']!r:.40}")
    if "shard_bytes" in manifest and not (_is_count(manifest["shard_bytes"]) and manifest["shard_bytes"] >= 1):
        raise ValueError(f"{path}: field 'shard_bytes' must be an integer >= 1, got {manifest['shard_bytes']!r:.40}")
    tok = manifest["tokenizer"]
    if not isinstance(tok, dict) or not _is_count(tok.get("vocab_size")) or not isinstance(tok.get("fingerprint"), str):
        raise ValueError(f"{path}: field 'tokenizer' must be an object with 'vocab_size' and 'fingerprint'")
    if tok["vocab_size"] < 1:  # (0 read as "no limit" where token ids are checked)
        raise ValueError(f"{path}: field 'tokenizer.vocab_size' must be >= 1, got {tok['vocab_size']}")
    if PIPELINE_FIELD in tok and not isinstance(tok[PIPELINE_FIELD], str):  # optional: older buffers lack it
        raise ValueError(
            f"{path}: field 'tokenizer.{PIPELINE_FIELD}' must be a string, got {tok[PIPELINE_FIELD]!r:.40}"
        )
    if not isinstance(tok.get(CHAT_TEMPLATE_FIELD), (str, type(None))):  # optional; null: no chat template
        raise ValueError(
            f"{path}: field 'tokenizer.{CHAT_TEMPLATE_FIELD}' must be a string or null, "
            f"got {tok[CHAT_TEMPLATE_FIELD]!r:.40}"
        )
    if "name" not in tok:
        raise ValueError(f"{path}: field 'tokenizer.name' missing")
    if not isinstance(tok["name"], str):
        raise ValueError(f"{path}: field 'tokenizer.name' must be a string, got {tok['name']!r:.40}")
    system = tok.get("system_prompt", {"setting": "template"})
    if not (
        isinstance(system, dict)
        and isinstance(system.get("setting"), str)
        and isinstance(system.get("text", ""), (str, type(None)))
    ):
        raise ValueError(f"{path}: field 'tokenizer.system_prompt' must be an object with a string 'setting'")
    commands = manifest["commands"]
    if not isinstance(commands, list) or not all(
        isinstance(c, dict)
        and isinstance(c.get("argv", []), list)
        and all(isinstance(a, str) for a in c.get("argv", []))
        and isinstance(c.get("shards", []), list)
        and all(isinstance(f, str) for f in c.get("shards", []))
        for c in commands
    ):
        raise ValueError(
            f"{path}: field 'commands' must be a list of objects whose 'argv' and 'shards' are lists of strings"
        )
    for key in ("ref_model", "ref_stats"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise ValueError(f"{path}: field {key!r} must be an object or null, got {type_name(manifest[key])}")
    done = (manifest.get("ref_stats") or {}).get("done", [])
    if not isinstance(done, list) or not all(isinstance(f, str) for f in done):
        raise ValueError(f"{path}: field 'ref_stats.done' must be a list of shard file names")
    if not isinstance(manifest["shards"], list):
        raise ValueError(f"{path}: field 'shards' must be a list, got {type_name(manifest['shards'])}")
    folder = path.parent.resolve()
    numbers: dict[str, int] = {}  # shard number -> index of the entry listing it
    for i, entry in enumerate(manifest["shards"]):
        where = f"{path}: shards[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be an object, got {type_name(entry)}")
        name = entry.get("file")
        if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name):
            raise ValueError(
                f"{where}.file: {name!r} is not a shard file name (shard-NNNNN.arrow or shard-NNNNN.rN.arrow)"
            )
        if name[6:11] in numbers:
            j = numbers[name[6:11]]
            raise ValueError(
                f"{where}.file: {name!r} repeats shard number {name[6:11]} of shards[{j}] "
                f"({manifest['shards'][j]['file']!r}); each shard is listed once"
            )
        numbers[name[6:11]] = i
        target = path.parent / name
        if target.is_symlink() or (target.exists() and target.resolve().parent != folder):
            raise ValueError(f"{where}.file: {name!r} is a link; shard files must be plain files inside {path.parent}")
        for key in ("rows", "tokens", "action_tokens", "bytes", "sha256", "has_ref"):
            if key not in entry:
                raise ValueError(f"{where}.{key}: missing")
        for key in ("rows", "tokens", "action_tokens", "bytes"):
            if not _is_count(entry[key]):
                raise ValueError(f"{where}.{key}: must be a non-negative integer, got {entry[key]!r:.40}")
        if "revision" in entry and not _is_count(entry["revision"]):
            raise ValueError(f"{where}.revision: must be a non-negative integer, got {entry['revision']!r:.40}")
        if not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
            raise ValueError(f"{where}.sha256: must be 64 lowercase hex digits, got {entry.get('sha256')!r}")
        if not isinstance(entry.get("has_ref"), bool):
            raise ValueError(f"{where}.has_ref: must be true or false, got {entry.get('has_ref')!r}")
    for key, total in _totals(manifest["shards"]).items():
        if manifest[key] != total:
            raise ValueError(f"{path}: field {key!r} is {manifest[key]}, its shards' {key!r} add up to {total}")
    every = all(s["has_ref"] for s in manifest["shards"])
    if manifest["shards"] and "has_ref_stats" in manifest and manifest["has_ref_stats"] is not every:
        raise ValueError(
            f"{path}: field 'has_ref_stats' is {json.dumps(manifest['has_ref_stats'])}, but "
            f"{'every' if every else 'not every'} shard has reference statistics (has_ref)"
        )


_VERIFIED: dict[tuple, bool] = {}  # (real path, inode, size, mtime_ns, ctime_ns, sha256) -> checked, per process


def verify_shard(path: Path, entry: dict) -> None:
    """Raise ``ValueError`` unless the file at ``path`` has the sha256 its manifest ``entry`` records.

    The hash is streamed; a verdict is cached per process for the file's (path, inode, size, modification
    and inode change times: a rewrite with its modification time put back still moves the change time), so
    each shard is hashed once however often it is opened. :func:`open_buffer` calls this for every
    shard before any data is used unless ``verify_checksums=False``.
    """
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):  # a folder, or a named pipe, which reading would wait on for ever
        raise ValueError(f"{path}: listed in {path.parent / MANIFEST} but not a regular file; the buffer is damaged")
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, entry["sha256"])
    if key in _VERIFIED:
        return
    actual = _sha256_file(path)
    if actual != entry["sha256"]:
        raise ValueError(
            f"{path}: sha256 {actual[:12]}... differs from {entry['sha256'][:12]}... recorded in {path.parent / MANIFEST}: "
            "the shard is corrupted or was changed outside shiq-data; nothing was read from it"
        )
    _VERIFIED[key] = True


def open_buffer(path, *, verify_checksums: bool = True) -> Buffer:
    """Open the replay buffer folder ``path`` for reading (shards are memory-mapped on first use).

    Every shard's sha256 is checked against the manifest first (once per process and file; see
    :func:`verify_shard`); ``verify_checksums=False`` skips that for buffers verified already.
    """
    path = Path(path)
    manifest = read_manifest(path)
    for s in manifest["shards"]:
        if not (path / s["file"]).is_file():
            raise FileNotFoundError(f"{path / s['file']} listed in {path / MANIFEST} is missing")
        if verify_checksums:
            verify_shard(path / s["file"], s)
    return Buffer(path, manifest)


def _locked(buffer_dir: Path, wait: bool = True):
    """An exclusive advisory lock on the buffer folder (appends and rewrites are serialised).

    Yields None once the lock is held. With ``wait=False`` it does not wait: it yields why the lock
    could not be taken (another process holds it, or the lock file cannot be opened) instead.
    """
    return exclusive_lock(buffer_dir / LOCK, wait=wait, holder="another process (an append or ref-stats run)")


def remove_unlisted_files_unless_locked(buffer_dir) -> tuple[list[str], str | None]:
    """:func:`remove_unlisted_files` under the buffer's lock, taken without waiting: ``(removed file
    names, None)``, or ``([], why)`` when the lock is not available; then nothing is removed, since the
    files another writer's manifest does not list yet are its new shards.

    The manifest is read under the lock, so shards committed by a writer that just finished stay.
    """
    buffer_dir = Path(buffer_dir)
    with _locked(buffer_dir, wait=False) as why:
        if why is not None:
            return [], why
        return remove_unlisted_files(buffer_dir, read_manifest(buffer_dir)), None


def remove_unlisted_files(buffer_dir, manifest: dict | None = None) -> list[str]:
    """Delete shard and temporary files the manifest does not list (left by a killed write); their names.

    The caller must hold the buffer's lock (:func:`_locked`): a running append or rewrite has files the
    manifest does not list yet."""
    buffer_dir = Path(buffer_dir)
    manifest = manifest or read_manifest(buffer_dir)
    listed = {s["file"] for s in manifest["shards"]}
    stray = [
        p
        for p in sorted(buffer_dir.iterdir())
        if p.name not in listed
        and p.name not in (MANIFEST, LOCK)
        and (_SHARD_RE.fullmatch(p.name) or (p.name.startswith(".") and p.name.endswith(".tmp")))
    ]
    for p in stray:  # checked before anything is removed: no write makes a folder named like a shard
        if p.is_dir() and not p.is_symlink() and _SHARD_RE.fullmatch(p.name):
            raise ValueError(
                f"{p}: a folder named like a shard, which the manifest does not list and no write of a buffer "
                "makes; move it out of the buffer"
            )
    for p in stray:  # a temporary folder (copied in, or left by another tool) goes like a temporary file
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return [p.name for p in stray]


def _with_row_id(row: dict, prefix: str, index: int) -> dict:
    """``row`` with ``row_id`` = ``prefix`` + its ``row_key`` (a name the reader gives it, unique within one
    input, e.g. ``mt.jsonl:3:0``), or ``prefix`` + ``index`` without one; ``row_key`` itself is dropped."""
    row = dict(row)
    key = row.pop("row_key", None)
    row["row_id"] = f"{prefix}{index if key is None else key}"
    return row


class _RowLog:
    """The row ids (and prompt and completion text keys, :func:`text_key`) of a buffer's old rows and of the
    rows a build or an append adds, kept out of core (:class:`shiq_data.spill.Spill`: temporary Parquet
    tables, joined by DuckDB within a fixed memory limit), so what the writer holds does not grow with the
    buffer. :meth:`check` finds, after the last row, the first new row whose id repeats one, or whose text
    repeats an old row's."""

    def __init__(self, spill: Spill, old: Buffer | None = None, text: bool = False):
        self.spill = spill
        spill.declare("old", pa.schema([("pos", pa.int64()), ("row_id", pa.string()), ("key", pa.binary())]))
        spill.declare(
            "new",
            pa.schema([("i", pa.int64()), ("row_id", pa.string()), ("key", pa.binary()), ("location", pa.string())]),
        )
        self.old_texts = 0  # old rows with text (new rows' texts are compared only when there are some)
        pos = 0
        for t in old.shard_columns(["row_id", "prompt", "completion"]) if old is not None else []:
            ids, prompts, completions = (t.column(n).to_pylist() for n in ("row_id", "prompt", "completion"))
            keys = [text_key(p, c) if text and c is not None else None for p, c in zip(prompts, completions)]
            self.old_texts += sum(k is not None for k in keys)
            spill.append("old", pa.table({"pos": np.arange(pos, pos + len(ids)), "row_id": ids, "key": keys}))
            pos += len(ids)
        self.pending: list[tuple] = []

    def add(self, i: int, row_id: str, key: bytes | None = None, location: dict | None = None) -> None:
        where = (
            None if location is None else json.dumps({k: location[k] for k in ("file", "row", "row_label", "fields")})
        )
        self.pending.append((i, row_id, key, where))
        if len(self.pending) >= 8192:
            self._write()

    def add_ids(self, first: int, row_ids: list) -> None:
        """Rows ``first, first + 1, ...`` with ids ``row_ids`` (no text compared, no input location)."""
        self._write()
        n = len(row_ids)
        self.spill.append(
            "new",
            pa.table({"i": np.arange(first, first + n), "row_id": row_ids})
            .append_column("key", pa.nulls(n, pa.binary()))
            .append_column("location", pa.nulls(n, pa.string())),
        )

    def _write(self) -> None:
        if self.pending:
            i, ids, keys, where = zip(*self.pending)
            self.spill.append("new", pa.table({"i": i, "row_id": ids, "key": keys, "location": where}))
            self.pending = []

    def check(self, input_name: str, refuse_duplicates: bool) -> int:
        """Raise :class:`RowError` for the first new row whose ``row_id`` an old row or an earlier new row has,
        or, with ``refuse_duplicates``, whose prompt and completion text an old row has (the earlier of the
        two; the row id first); the number of new rows repeating an old row's text otherwise."""
        self._write()
        new, old = self.spill.table("new"), self.spill.table("old")
        firsts = f"SELECT row_id, min(i) AS first FROM {new} GROUP BY row_id"
        (bad_id,) = self.spill.one(
            f"""SELECT min(i) FROM (
                SELECT n.i FROM {new} n JOIN ({firsts}) f ON n.row_id = f.row_id WHERE n.i > f.first
                UNION ALL SELECT i FROM {new} WHERE row_id IN (SELECT row_id FROM {old}))"""
        )
        texts = f"""SELECT n.i, n.row_id, o.old_id FROM {new} n JOIN (
            SELECT key, arg_min(row_id, pos) AS old_id FROM {old} WHERE key IS NOT NULL GROUP BY key) o
            ON n.key = o.key"""
        repeated = 0
        if self.old_texts and refuse_duplicates:
            first = self.spill.one(f"SELECT i, old_id FROM ({texts}) ORDER BY i LIMIT 1")
            if first is not None and (bad_id is None or first[0] < bad_id):
                i, old_id = first
                problem = f"the same prompt and completion as row {old_id!r} of the buffer (refused: --no-duplicates)"
                raise self._error(input_name, i, "completion", problem)
        elif self.old_texts:
            (repeated,) = self.spill.one(f"SELECT count(*) FROM ({texts})")
        if bad_id is not None:
            (rid,) = self.spill.one(f"SELECT row_id FROM {new} WHERE i = {int(bad_id)}")
            raise self._error(input_name, bad_id, "row_id", f"{rid!r} is not unique in the buffer")
        return repeated

    def _error(self, input_name: str, i: int, field: str, problem: str) -> RowError:
        """The error about new row ``i``, named at its input location when it has one."""
        (where,) = self.spill.one(f"SELECT location FROM {self.spill.table('new')} WHERE i = {int(i)}")
        error = RowError(input_name, i, field, problem)
        return error if where is None else at_input(error, json.loads(where), i)


class _ShardStream:
    """Checks rows one by one and writes them as shards of ``shard_rows`` rows or of ``shard_bytes`` bytes of file,
    whichever comes first (a row larger than that alone); :meth:`add_table` takes rows of a buffer as an Arrow table
    instead (a curated buffer's rows: checked when they were first written).

    Rows given one by one are held as Python objects only until their data, estimated from their lengths, reaches
    :data:`ROWS_TO_ARROW_BYTES` (or ``shard_bytes``, or the rows make ``shard_rows``): they are then an Arrow table,
    held with each row's :func:`row_bits`, and a shard is cut from the tables held at the last row that fits
    (:meth:`_cut`), once a row past it is held (or at the end). So a shard's file never exceeds ``shard_bytes`` unless
    it is one row, and the stream holds about a shard's data, the table it was last given and one batch of Python
    rows."""

    def __init__(
        self,
        out_dir: Path,
        *,
        first_shard: int,
        shard_rows: int,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        vocab_size,
        input_name: str,
        group_offset: int,
        row_id_prefix: str,
        log: _RowLog,
        temp_names: bool,
        text: bool | None,
        refuse_duplicates: bool = False,
    ):
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
        if not (_is_count(shard_bytes) and shard_bytes >= 1):  # (what a manifest may record)
            raise ValueError(f"shard_bytes must be an integer in [1, 2**63), got {shard_bytes!r}")
        self.out_dir, self.next_shard, self.shard_rows = out_dir, first_shard, shard_rows
        self.shard_bytes = shard_bytes
        self.vocab_size, self.input_name = vocab_size, input_name
        self.group_offset, self.row_id_prefix, self.log = group_offset, row_id_prefix, log
        self.temp_names = temp_names
        self.text = text  # None: decided by the first row (it carries a text column or not)
        self.refuse_duplicates = refuse_duplicates
        self.duplicates = 0  # new rows repeating an old row's text (known after finish)
        self.with_ref: bool | None = None
        self.pending: list[dict] = []  # rows after self.held, as Python objects
        self.pending_bytes = 0  # their estimated Arrow data (_row_estimate)
        self.held: list[tuple[pa.Table, np.ndarray]] = []  # rows not written yet, as shard tables with their row_bits
        self.held_rows = self.held_bits = 0
        self.null_items: set[str] = set()  # list columns whose items held a null: their bitmap is counted
        self.overhead: int | None = None  # shard_overhead of the shards' schema
        self.entries: list[dict] = []
        self.written: list[Path] = []
        self.max_group = group_offset - 1
        self.n = 0
        self.warned_keys: set[str] = set()  # message keys warned of (_warn_of_unrendered_keys)

    def add(self, row: dict) -> None:
        i = self.n
        location = checked = None
        if isinstance(row, dict) and (INPUT_KEY in row or CHECKED_KEY in row):
            row = dict(row)
            location = row.pop(INPUT_KEY, None)
            checked = row.pop(CHECKED_KEY, None)
        if isinstance(row, dict) and "row_id" not in row:
            row = _with_row_id(row, self.row_id_prefix, i)
        if isinstance(row, dict):
            row = self._text_columns(row)
        try:
            self._check(row, i, checked=checked is not None and checked == self.vocab_size)
        except RowError as e:
            if location is None:
                raise
            raise at_input(e, location, i) from None
        if i < KEY_CHECK_ROWS:
            self._warn_of_unrendered_keys(row, location)
        compare = self.log.old_texts and row.get("completion") is not None
        self.log.add(i, row["row_id"], text_key(row["prompt"], row["completion"]) if compare else None, location)
        gid = int(row["group_id"]) + self.group_offset
        if gid > GROUP_ID_MAX:
            error = RowError(
                self.input_name,
                i,
                "group_id",
                f"{row['group_id']} plus the buffer's next_group_id {self.group_offset} is beyond 2**63 - 2 (int64)",
            )
            raise error if location is None else at_input(error, location, i)
        self.max_group = max(self.max_group, gid)
        self.pending.append({**row, "group_id": gid})
        self.pending_bytes += _row_estimate(row)
        self.n += 1
        if len(self.pending) + self.held_rows >= self.shard_rows or self.pending_bytes >= min(
            self.shard_bytes, ROWS_TO_ARROW_BYTES
        ):
            self._hold_pending()
            self._cut()

    def _warn_of_unrendered_keys(self, row: dict, location: dict | None) -> None:
        """Warn, once per key and write, of a message key other than role and content in a chat row's text (a
        ``tool_calls``, a ``name``): the chat template is handed it, and SmolLM2's, like many, leaves it out of
        the tokens. Read in the main process from the rows' text, on the first :data:`KEY_CHECK_ROWS` rows."""
        for field in ("prompt", "completion"):
            text = row.get(field)
            messages = decode_text(text) if isinstance(text, str) and text.startswith("[") else None
            for j, m in enumerate(messages if isinstance(messages, list) else []):
                for key in sorted(m.keys() - {"role", "content", "reward"} - self.warned_keys):
                    self.warned_keys.add(key)
                    where = f"{location['file']}: {location['row_label']} {location['row']}: " if location else ""
                    log.warning(
                        f"shiq-data: warning: {where}{field}[{j}].{key}: handed to the chat template with its message "
                        "and kept in the row's text, but a template that does not use it (SmolLM2's reads role and "
                        "content only) leaves it out of the tokens; `shiq-data show` displays them (said once per key)"
                    )

    def add_table(self, table: pa.Table) -> None:
        """Add the rows of ``table``, rows of a buffer with its stored columns (they are not checked one by one
        again, only their row ids, group ids, token range and columns)."""
        if self.log.old_texts:  # appending to a buffer whose texts are compared row by row
            for row in table.to_pylist():
                self.add(row)
            return
        names = table.schema.names
        if self.text is None:
            self.text = any(name in names for name in TEXT_FIELDS)
        has_ref = all(name in names for name in REF_FIELDS)
        if self.with_ref is None:
            self.with_ref = has_ref
        elif has_ref != self.with_ref:
            problem = "present in some rows and not others" if has_ref else "missing (earlier rows carry them)"
            raise RowError(self.input_name, self.n, REF_FIELDS[0], problem)
        schema = arrow_schema(bool(self.with_ref), bool(self.text))
        cols = [
            table.column(f.name) if f.name in names else pa.nulls(table.num_rows, f.type) for f in schema
        ]  # a text column the rows lack is null
        try:
            table = pa.Table.from_arrays(cols, names=schema.names).cast(schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
            raise ValueError(f"{self.input_name}: rows of another kind than a buffer's ({one_line(e, 160)})") from None
        check_lengths(table, self.input_name, self.n)
        row_ids = table.column("row_id").to_pylist()
        for k, rid in enumerate(row_ids):
            if not rid:
                raise RowError(self.input_name, self.n + k, "row_id", f"{rid!r} is not unique in the buffer")
        self.log.add_ids(self.n, row_ids)
        if table.num_rows:
            lo, hi = pc.min_max(table.column("group_id")).values()
            if lo.as_py() < 0:
                raise ValueError(f"{self.input_name}: group ids must be >= 0, got {lo.as_py()}")
            if hi.as_py() > GROUP_ID_MAX - self.group_offset:
                raise ValueError(
                    f"{self.input_name}: group id {hi.as_py()} plus the buffer's next_group_id {self.group_offset} "
                    "is beyond 2**63 - 2 (int64)"
                )
            least, top = (v.as_py() for v in pc.min_max(pc.list_flatten(table.column("tokens"))).values())
            if least is not None and least < 0:
                raise ValueError(f"{self.input_name}: token id {least} is negative")
            if self.vocab_size is not None and top is not None and top >= self.vocab_size:
                raise ValueError(f"{self.input_name}: token id {top} is outside [0, {self.vocab_size})")
            if self.group_offset:
                gids = pc.add(table.column("group_id"), self.group_offset)
                table = table.set_column(schema.names.index("group_id"), schema.field("group_id"), gids)
            self.max_group = max(self.max_group, hi.as_py() + self.group_offset)
        self._hold_pending()
        self._hold(table)
        self.n += table.num_rows
        self._cut()

    def _text_columns(self, row: dict) -> dict:
        """``row`` with every text column (null when it lacks one) if the stream keeps text, else without them."""
        if self.text is None:
            self.text = any(name in row for name in TEXT_FIELDS)
        if self.text:
            return {**row, **{name: row.get(name) for name in TEXT_FIELDS}}
        return {k: v for k, v in row.items() if k not in TEXT_FIELDS}

    def _check(self, row: dict, i: int, checked: bool = False) -> None:
        """Raise :class:`RowError` naming the input and output row ``i`` unless ``row`` is a valid row that
        fits this stream (reference columns like the earlier rows'; a repeated ``row_id`` is found by
        :meth:`finish`). ``checked``: the row passed :func:`check_row` already (in a worker of a parallel
        build)."""
        if not checked:
            check_row(row, vocab_size=self.vocab_size, file=self.input_name, row_index=i)
        has_ref = row_has_ref(row)
        if self.with_ref is None:
            self.with_ref = has_ref
        elif has_ref != self.with_ref:
            field = REF_FIELDS[0]
            raise RowError(
                self.input_name,
                i,
                field,
                "present in some rows and not others"
                if has_ref
                else "missing (earlier rows carry reference statistics)",
            )

    def finish(self) -> None:
        """Write the rows held and check the row ids and texts of all rows (:meth:`_RowLog.check`)."""
        self._hold_pending()
        self._cut(final=True)
        self.duplicates = self.log.check(self.input_name, self.refuse_duplicates)

    def _hold_pending(self) -> None:
        """The rows held as Python objects, held as a shard table instead."""
        if self.pending:
            table = rows_to_table(self.pending, bool(self.with_ref), bool(self.text))
            self.pending, self.pending_bytes = [], 0
            self._hold(table)

    def _hold(self, table: pa.Table) -> None:
        """Hold ``table`` (rows of the shards' schema) after the rows held, with its rows' :func:`row_bits`. A list
        column whose items hold a null for the first time gets its items' validity bits counted in every row held
        from then on (a shard's bitmap covers all its items as soon as one of them is null)."""
        if not table.num_rows:
            return
        lists = [f.name for f in table.schema if _is_list(f.type)]
        new = {n for n in lists if n not in self.null_items and pc.list_flatten(table.column(n)).null_count}
        if new:
            self.null_items |= new
            self.held = [(t, row_bits(t, self.null_items)) for t, _ in self.held]
            self.held_bits = sum(int(b.sum()) for _, b in self.held)
        bits = row_bits(table, self.null_items)
        self.held.append((table, bits))
        self.held_rows += table.num_rows
        self.held_bits += int(bits.sum())

    def _cut(self, final: bool = False) -> None:
        """Write shards from the rows held while they hold more than a shard: ``shard_rows`` rows, or more rows than
        fit in a file of ``shard_bytes`` (the rows up to the last that fits are a shard; a first row that does not fit
        is one alone). With ``final``, the rows left are written too. The rows' :func:`row_bits` (never less than
        what they take) tell when to look and which rows fit surely; the exact size of the file
        (:func:`shard_file_bytes`) then finds the last row that fits, searched from there."""
        while self.held_rows:
            if self.overhead is None:
                self.overhead = shard_overhead(self.held[0][0].schema)
            room = 8 * (self.shard_bytes - self.overhead)  # the bits of rows surely within the bound
            if not final and self.held_rows < self.shard_rows and self.held_bits <= room:
                return  # the next rows may fit in this shard still
            bits = np.concatenate([b for _, b in self.held])
            held = pa.concat_tables([t for t, _ in self.held])
            top = min(self.held_rows, self.shard_rows)
            k = max(1, min(int(np.searchsorted(np.cumsum(bits), room, side="right")), top))
            step = 1
            while k < top:  # the last row that fits: galloping up from k, then back
                more = min(k + step, top)
                if shard_file_bytes(held.slice(0, more)) <= self.shard_bytes:
                    k, step = more, step * 2
                else:
                    top, step = more - 1, 1
            if not final and k == self.held_rows < self.shard_rows:
                return  # every row held fits: the next may too
            self._write(held.slice(0, k))
            rest, bits = held.slice(k), bits[k:]
            self.held = [(rest, bits)] if rest.num_rows else []
            self.held_rows, self.held_bits = rest.num_rows, int(bits.sum())

    def _write(self, table: pa.Table) -> None:
        if self.next_shard > SHARD_NUMBER_MAX:  # a longer number is no shard file name a manifest may list
            raise ValueError(
                f"{self.out_dir}: shard {self.next_shard} would be past shard-{SHARD_NUMBER_MAX}.arrow, the last a "
                "buffer can list; write the rows into a new buffer (or one with more rows per shard)"
            )
        name = shard_file_name(self.next_shard)
        path = self.out_dir / (f".{name}.tmp" if self.temp_names else name)
        self.written.append(path)  # before it is written: a failure half-way removes what landed of it
        entry = write_shard_file(compact_table(table), path)  # (its size as shard_file_bytes counts it)
        entry["file"] = name
        self.entries.append(entry)
        self.next_shard += 1
        # Arrow's allocator (mimalloc) keeps what the copies of a shard freed, and a write of many shards grew from
        # shard to shard (decontaminate writing six 256 MiB shards peaked at 2.03 GB, 1.73 GB with this)
        pa.default_memory_pool().release_unused()


# rows given one by one are held as Python objects (some 10 times their Arrow size: a token is an int object and a
# list slot) until their estimated Arrow data reaches this, then as an Arrow table (_ShardStream)
ROWS_TO_ARROW_BYTES = 16 * MIB


def _row_estimate(row: dict) -> int:
    """A row's Arrow data in bytes, roughly and cheaply (from its lengths): 4 bytes an item of its per-token lists,
    its text's characters, 8 bytes a turn reward, 64 for the rest."""
    size = 64 + 4 * sum(len(row[n]) for n in (*LIST_FIELDS, *REF_FIELDS) if row.get(n) is not None)
    size += sum(len(row[n]) for n in ("prompt", "completion", "extra") if isinstance(row.get(n), str))
    turns = row.get("turn_rewards")
    return size + (8 * len(turns) if isinstance(turns, list) else 0)


def _rows_bar(enabled: bool, desc: str):
    """The rows' progress bar (:func:`shiq_data.io.progress_bar`: cleared if the block raises), when ``enabled``."""
    return progress_bar(enabled, desc=desc, unit=" rows", file=sys.stderr, mininterval=1.0)


def _feed(stream: _ShardStream, rows: Iterable[dict | pa.Table], bar) -> None:
    """Add ``rows`` (row dicts, or tables of buffer rows) to ``stream``, counting them on ``bar``."""
    for item in rows:
        if isinstance(item, pa.Table):
            stream.add_table(item)
            bar.update(item.num_rows)
        else:
            stream.add(item)
            bar.update(1)


def _totals(shards: list[dict]) -> dict:
    return {
        "rows": sum(s["rows"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "action_tokens": sum(s["action_tokens"] for s in shards),
    }


def _check_tokenizer_info(info: dict) -> None:
    missing = [k for k in ("name", "fingerprint", "vocab_size") if k not in info]
    if missing:
        raise ValueError(f"tokenizer_info lacks {missing} (load_tokenizer returns a complete one)")


def _remove_stale_build_dirs(out_dir: Path, host: str) -> None:
    """Remove the temporary build folders for ``out_dir`` whose building process is gone (killed builds): this
    machine's whose lock can be taken (:func:`shiq_data.io.sweep_held`), and those of releases that named no host
    (``.NAME.building-PID-hex``), judged by their pid."""
    remove_stale_hostless(out_dir.parent, f".{out_dir.name}.building-")
    sweep_held(out_dir.parent, f".{glob.escape(out_dir.name)}.building-{glob.escape(host)}-*")


def write_buffer(
    rows: Iterable[dict | pa.Table],
    out_dir,
    *,
    tokenizer_info: dict,
    command: list[str],
    shard_rows: int = DEFAULT_SHARD_ROWS,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    input_name: str = "<rows>",
    ref_model: dict | None = None,
    parents: list[dict] | None = None,
    curation: dict | None = None,
    text_columns: bool | None = None,
    manifest_extra: dict | None = None,
    prior_commands: list[dict] | None = None,
) -> Buffer:
    """Build a new buffer at ``out_dir`` from ``rows`` (dicts as in :mod:`shiq_data.schema`, or Arrow tables
    of rows taken from buffers, with their stored columns: these are not checked row by row again).

    Rows may omit ``row_id``: it becomes ``b0-<row_key>`` when the row has a ``row_key`` (a name unique
    within the input), else ``b0-<index>``. Every row is checked with
    :func:`shiq_data.schema.check_row` against ``tokenizer_info['vocab_size']``; errors name
    ``input_name`` and the row index, or, for a row carrying its input location under
    :data:`shiq_data.schema.INPUT_KEY` (the readers' rows do; it is not written), that file, its line
    or row and the input field, then the output row index. The build happens in a temporary folder
    next to ``out_dir`` that is renamed into place at the end; on any error it is removed and
    ``out_dir`` does not appear.
    ``ref_model`` describes the reference model when the rows carry reference statistics.
    ``parents`` (the buffers the rows were taken from, see :mod:`shiq_data.curate`) and ``curation``
    (what was done to them), when given, are recorded in the manifest under those keys.
    ``text_columns``: keep the text columns (a row lacking one gets null) or drop them; by default the
    buffer keeps them if the first row carries any. ``manifest_extra``: more manifest fields (lineage).
    ``prior_commands``: the commands that built the buffer the rows come from, listed before this one
    (rows keeping their ``row_id`` s ``b<k>-...`` then never clash with a later append's).
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; choose a new --out folder")
    if out_dir.is_symlink():  # a link to nowhere: the rename at the end would fail, after the whole build
        raise FileExistsError(
            f"{out_dir} is a symbolic link (to {os.readlink(out_dir)}, which does not exist): choose a new --out folder"
        )
    refuse_inside_buffer(out_dir)
    _check_tokenizer_info(tokenizer_info)
    try:
        created = make_parents(out_dir)
    except OSError as e:
        raise unmade_folder("--out", out_dir, e) from None
    host = this_host()
    try:
        _remove_stale_build_dirs(out_dir, host)
        try:
            tmp, held = held_dir(out_dir.parent, f".{out_dir.name}.building-{host}-{os.getpid()}")
        except OSError as e:
            raise unmade_folder("--out", out_dir, e) from None
    except BaseException:
        remove_created_dirs(created)
        raise
    try:
        with Spill(out_dir) as spill:
            stream = _ShardStream(
                tmp,
                first_shard=0,
                shard_rows=shard_rows,
                shard_bytes=shard_bytes,
                vocab_size=tokenizer_info["vocab_size"],
                input_name=input_name,
                group_offset=0,
                row_id_prefix="b0-",
                log=_RowLog(spill),
                temp_names=False,
                text=text_columns,
            )
            with _rows_bar(progress, f"building {out_dir.name}") as bar:  # cleared if the rows are refused
                _feed(stream, rows, bar)
                stream.finish()
                if stream.n == 0:
                    raise ValueError(f"{input_name}: no rows to write")
        now = _now()
        manifest = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "text_columns": bool(stream.text),
            "tokenizer": dict(tokenizer_info),
            **_totals(stream.entries),
            "next_group_id": stream.max_group + 1,
            "shards": stream.entries,
            "has_ref_stats": bool(stream.with_ref),
            "ref_model": ref_model if stream.with_ref else None,
            "ref_stats": (
                {"ref_model": ref_model, "done": [e["file"] for e in stream.entries]} if stream.with_ref else None
            ),
            "commands": list(prior_commands or [])
            + [{"argv": list(command), "time": now, "rows": stream.n, "shards": [e["file"] for e in stream.entries]}],
            "created": now,
            "updated": now,
            "shard_rows": shard_rows,
            "shard_bytes": shard_bytes,
            **(manifest_extra or {}),
        }
        if parents is not None:
            manifest.update(parents=parents, curation=curation)
        atomic_write_json(tmp / MANIFEST, manifest, indent=1)
        os.chmod(tmp, 0o755)  # shared like every result (held_dir makes it 0700)
        fsync_dir(tmp)
        try:
            os.rename(tmp, out_dir)  # fails if out_dir appeared meanwhile: never overwrite a buffer
        except OSError as e:
            if not (out_dir.exists() or out_dir.is_symlink()):
                raise
            raise FileExistsError(
                f"{out_dir} appeared while this build ran (another build into the same --out?): it is left as it is, "
                "and this build's rows are discarded"
            ) from e
        fsync_dir(out_dir.parent)
    except BaseException:
        release_held(tmp, held)
        remove_created_dirs(created)
        raise
    release_held(tmp, held)  # (its lock: the folder is the buffer now)
    return open_buffer(out_dir)


def refuse_inside_buffer(out, option: str = "--out", itself: bool = False) -> None:
    """Refuse an output path inside a buffer folder (an ancestor, or with ``itself`` the path too, holds a
    buffer's ``manifest.json``; a file of that name of another kind does not count): the folder is the
    buffer's, and what is written there is neither listed nor checked by it."""
    path = Path(out).resolve()
    for folder in ([path] if itself else []) + list(path.parents):
        if _is_buffer_manifest(folder / MANIFEST):
            where = "is the buffer" if folder == path else f"is inside the buffer {folder}"
            raise ValueError(f"{option} {out} {where}: choose a folder outside it")


def _is_buffer_manifest(path: Path) -> bool:
    """Whether ``path`` is a readable JSON object of this project's buffer format."""
    if not path.is_file():
        return False
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def column_kind(t: pa.DataType) -> pa.DataType:
    """A column type up to its offsets' width (``large_string`` is ``string``, a ``large_list`` a ``list``): the
    kinds of values a shard must hold, which writers of different versions store either way."""
    if pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.list_(column_kind(t.value_type))
    return t


def check_lengths(table: pa.Table, input_name: str, first_row: int) -> None:
    """Refuse rows of a buffer's columns (``add_table``'s, not checked one by one) whose per-token lists are not
    as long as ``tokens``, or whose ``prompt_len`` is outside ``[1, len(tokens))``: written as they are, they
    would make a buffer that ``validate`` refuses. The error names the row's place in what is being written and
    its ``row_id`` (a curation verb's output keeps the input's ids). Vectorised: a pass over the list offsets."""
    n = pc.list_value_length(table.column("tokens")).to_numpy(zero_copy_only=False)

    def refuse(k: int, field: str, problem: str):
        rid = table.column("row_id")[k].as_py()
        raise RowError(input_name, first_row + k, field, f"{problem} (row_id {rid!r})")

    for name in ("action_mask", "rewards", *(f for f in REF_FIELDS if f in table.schema.names)):
        other = pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(other != n)
        if bad.size:
            k = int(bad[0])
            refuse(k, name, f"length {other[k]} differs from tokens' length {n[k]}")
    prompt = table.column("prompt_len").to_numpy(zero_copy_only=False)
    bad = np.flatnonzero((prompt < 1) | (prompt >= n))
    if bad.size:  # as check_row: at least one prompt token and one completion token
        k = int(bad[0])
        refuse(
            k, "prompt_len", f"{prompt[k]} is outside [1, {n[k]}) (at least one prompt token and one completion token)"
        )


KEY_CHECK_ROWS = 1000  # rows of a write whose messages are looked at for keys a chat template may not render


def text_key(prompt: str | None, completion: str) -> bytes:
    """What two rows with the same prompt and completion text (as given: ``readers.encode.given_text``) share
    (a sha256 digest)."""
    given = [given_text(prompt), given_text(completion)]
    return hashlib.sha256(json.dumps(given, ensure_ascii=False).encode()).digest()


def append_buffer(
    buffer_dir,
    rows: Iterable[dict],
    *,
    command: list[str],
    tokenizer_info: dict | None = None,
    shard_rows: int | None = None,
    shard_bytes: int | None = None,
    progress: bool = True,
    input_name: str = "<rows>",
    ref_model: dict | None = None,
    text_columns: bool | None = None,
    refuse_duplicates: bool = False,
) -> Buffer:
    """Add ``rows`` to an existing buffer as new shards; returns the reopened buffer.

    ``tokenizer_info``, when given, must have the buffer's tokenizer fingerprint, and its pipeline fingerprint
    when both record one (a buffer without it keeps none: its old rows' pipeline is unknown). New ``group_id`` s
    are offset by the manifest's ``next_group_id`` so groups stay unique; missing ``row_id`` s become
    ``b<k>-<row_key>`` or ``b<k>-<index>`` for the k-th command (see :func:`write_buffer`), so rows of
    two inputs with the same file name do not clash. The new shards are committed by replacing
    ``manifest.json``; old shards are not touched. ``shard_rows`` defaults to the buffer's (:func:`shard_rows_of`).
    The new shards have text columns when the buffer does (``text_columns``, when given, must say the
    same: ``ValueError`` otherwise). The manifest written is version 2, so appending to a version-1
    buffer (no text columns) upgrades it. New rows with the prompt and completion text of a row already
    in the buffer (:func:`text_key`) are counted in the command's manifest entry (``"duplicates"``),
    or refused with ``refuse_duplicates`` (:class:`RowError` naming the input row). Row ids and texts are
    compared after the last row (:class:`_RowLog`), before anything is committed.
    """
    buffer_dir = Path(buffer_dir)
    with _locked(buffer_dir):
        manifest = read_manifest(buffer_dir)
        remove_unlisted_files(buffer_dir, manifest)
        text = has_text_columns(manifest)
        if text_columns is not None and bool(text_columns) != text:
            raise ValueError(_text_mismatch(buffer_dir / MANIFEST, manifest))
        if tokenizer_info is not None:
            _check_tokenizer_info(tokenizer_info)
            have = manifest["tokenizer"]
            if tokenizer_info["fingerprint"] != have["fingerprint"]:
                raise ValueError(
                    f"{buffer_dir / MANIFEST}: tokenizer mismatch: the buffer was built with {have['name']!r} "
                    f"(fingerprint {have['fingerprint'][:12]}…), the new rows with {tokenizer_info['name']!r} "
                    f"(fingerprint {tokenizer_info['fingerprint'][:12]}…)"
                )
            if pipeline_mismatch(have, tokenizer_info):
                raise ValueError(
                    f"{buffer_dir / MANIFEST}: tokenizer mismatch in field 'tokenizer.{PIPELINE_FIELD}': the buffer "
                    f"was built with {have['name']!r} (pipeline fingerprint {have[PIPELINE_FIELD][:12]}…), the new "
                    f"rows with {tokenizer_info['name']!r} (pipeline fingerprint "
                    f"{tokenizer_info[PIPELINE_FIELD][:12]}…): same vocabulary, another pipeline that may split text differently "
                    "(normalizer, pre-tokenizer, model options or flags such as add_prefix_space)"
                )
            if "eos_id" in have and "eos_id" in tokenizer_info and have["eos_id"] != tokenizer_info["eos_id"]:
                raise ValueError(  # (neither fingerprint covers which special token ends a completion)
                    f"{buffer_dir / MANIFEST}: tokenizer mismatch in field 'tokenizer.eos_id': the buffer's completions "
                    f"end in {have['eos_id']}, the new rows' tokenizer's in {tokenizer_info['eos_id']} (its "
                    "tokenizer_config.json names another eos token)"
                )
        for entry in manifest["shards"]:
            verify_shard(buffer_dir / entry["file"], entry)
        old = Buffer(buffer_dir, manifest)
        if shard_rows is None:
            shard_rows = shard_rows_of(manifest)
        if shard_bytes is None:
            shard_bytes = shard_bytes_of(manifest)
        k = len(manifest["commands"])
        with Spill(buffer_dir) as spill:
            stream = _ShardStream(
                buffer_dir,
                first_shard=_next_shard_index(manifest),
                shard_rows=shard_rows,
                shard_bytes=shard_bytes,
                vocab_size=manifest["tokenizer"]["vocab_size"],
                input_name=input_name,
                group_offset=int(manifest["next_group_id"]),
                row_id_prefix=f"b{k}-",
                log=_RowLog(spill, old, text),
                temp_names=True,
                text=text,
                refuse_duplicates=refuse_duplicates,
            )
            try:
                with _rows_bar(progress, f"appending to {buffer_dir.name}") as bar:  # cleared if the rows are refused
                    _feed(stream, rows, bar)
                    stream.finish()
                    if stream.n == 0:
                        raise ValueError(f"{input_name}: no rows to append")
                    recorded = manifest.get("ref_model")
                    if (
                        stream.with_ref
                        and recorded is not None
                        and not (ref_model and same_reference(recorded, ref_model))
                    ):
                        raise ValueError(
                            f"{input_name}: the new rows' reference model {ref_model} differs from the "
                            f"buffer's {manifest['ref_model']}"
                        )
                for path, entry in zip(stream.written, stream.entries):
                    os.rename(path, buffer_dir / entry["file"])
                fsync_dir(buffer_dir)
            except BaseException:
                for p in stream.written + [buffer_dir / e["file"] for e in stream.entries]:
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                raise
        shards = manifest["shards"] + stream.entries
        now = _now()
        new = {
            **manifest,
            "schema_version": SCHEMA_VERSION,
            "text_columns": text,
            **_totals(shards),
            "shards": shards,
            "next_group_id": stream.max_group + 1,
            "has_ref_stats": all(s["has_ref"] for s in shards),
            "commands": manifest["commands"]
            + [
                {
                    "argv": list(command),
                    "time": now,
                    "rows": stream.n,
                    "shards": [e["file"] for e in stream.entries],
                    **({"duplicates": stream.duplicates} if text else {}),
                }
            ],
            "updated": now,
        }
        if stream.with_ref:
            new["ref_model"] = ref_model
            done = (manifest.get("ref_stats") or {}).get("done", [])
            new["ref_stats"] = {"ref_model": ref_model, "done": done + [e["file"] for e in stream.entries]}
        try:
            atomic_write_json(buffer_dir / MANIFEST, new, indent=1)  # the commit point
        except BaseException:
            _remove_uncommitted(buffer_dir, [e["file"] for e in stream.entries])
            raise
    return open_buffer(buffer_dir)


def _remove_uncommitted(buffer_dir: Path, files: list[str]) -> None:
    """After a failed manifest write, delete the new shard ``files`` unless the manifest on disk lists them
    (the rename went through and only flushing the folder failed: they are committed)."""
    try:
        listed = {s.get("file") for s in json.loads((buffer_dir / MANIFEST).read_text())["shards"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # the manifest cannot be read: keep the files (the next append or validate removes strays)
    for name in files:
        if name not in listed:
            (buffer_dir / name).unlink(missing_ok=True)


def _text_mismatch(path: Path, manifest: dict) -> str:
    """Why rows with (or without) text columns cannot be appended to the buffer of ``manifest``."""
    if manifest.get("schema_version") == 1:
        return (
            f"{path}: a schema-version-1 buffer has no text columns; append with --no-text (token columns "
            "only), or build a new buffer from the inputs to keep the text"
        )
    if has_text_columns(manifest):
        return f"{path}: the buffer keeps text columns; append without --no-text"
    return f"{path}: the buffer has no text columns (built with --no-text); append with --no-text"


def _next_shard_index(manifest: dict) -> int:
    nums = [int(s["file"][6:11]) for s in manifest["shards"]]
    return max(nums) + 1 if nums else 0


# what a reference record keeps of a model folder's files: its weights' and its config.json's SHA-256
CONTENT_KEYS = ("sha256", "config_sha256")
# the precision of reference statistics whose record names none (written before the dtype was recorded)
REF_DEFAULT_DTYPE = "float32"


def same_reference(recorded: dict | None, ref_model: dict | None) -> bool:
    """Whether two records of a reference model (``ref_model`` of a manifest) name the same model: equal, or
    equal but for a SHA-256 of its files (:data:`CONTENT_KEYS`) that only one of them has (records written
    before it was kept lack it); a record without ``dtype`` is one of :data:`REF_DEFAULT_DTYPE`."""
    if recorded is None or ref_model is None or recorded == ref_model:
        return True
    return _but_weights(recorded) == _but_weights(ref_model) and all(
        k not in recorded or k not in ref_model or recorded[k] == ref_model[k] for k in CONTENT_KEYS
    )


def _but_weights(record: dict) -> dict:
    return {"dtype": REF_DEFAULT_DTYPE, **{k: v for k, v in record.items() if k not in CONTENT_KEYS}}


def _other_reference(buffer_dir, recorded: dict, ref_model: dict) -> ValueError:
    if _but_weights(recorded) == _but_weights(ref_model):
        changed = " and ".join(
            {"sha256": "weights", "config_sha256": "config.json"}[k]
            for k in CONTENT_KEYS
            if k in recorded and k in ref_model and recorded[k] != ref_model[k]
        )
        return ValueError(
            f"{Path(buffer_dir) / MANIFEST}: holds reference statistics of {recorded.get('model')} whose {changed} "
            f"{'has' if changed == 'config.json' else 'have'} changed since (another sha256): build a new buffer for "
            "the model that folder holds now"
        )
    recorded, ref_model = _but_weights(recorded), _but_weights(ref_model)
    fields = [k for k in dict.fromkeys([*recorded, *ref_model]) if recorded.get(k) != ref_model.get(k)]
    differ = ", ".join(f"ref_model.{k} {recorded.get(k)!r}, not {ref_model.get(k)!r}" for k in fields)
    hint = f" (or --dtype {recorded['dtype']})" if fields == ["dtype"] and recorded.get("dtype") else ""
    return ValueError(
        f"{Path(buffer_dir) / MANIFEST}: holds reference statistics"
        + (f" of {recorded['model']!r}" if recorded.get("model") else "")
        + f" with {differ}; "
        f"build a new buffer for another reference model{hint}"
    )


def refuse_other_reference(buffer_dir, ref_model: dict) -> None:
    """Refuse (``ValueError``, as :func:`shards_without_ref` would) a buffer holding the statistics of a
    reference that differs from ``ref_model`` in more than the SHA-256 of its weights: what can be told before
    the reference model is loaded (``shiq-train ref-stats`` checks its name, tokenizer, checkpoint and dtype
    first, and the weights' SHA-256 once they are read)."""
    recorded = read_manifest(buffer_dir).get("ref_model")
    if recorded is not None and _but_weights(recorded) != _but_weights(ref_model):
        raise _other_reference(buffer_dir, recorded, ref_model)


def shards_without_ref(buffer_dir, ref_model: dict | None = None) -> list[int]:
    """Indices of the shards that still lack reference statistics (all of them if ``ref_model`` differs
    from the one already recorded, which :func:`replace_shard` would refuse to mix)."""
    manifest = read_manifest(buffer_dir)
    recorded = manifest.get("ref_model")
    if not same_reference(recorded, ref_model):
        raise _other_reference(buffer_dir, recorded, ref_model)
    _refuse_unrecorded_reference(buffer_dir, manifest, ref_model)
    return [i for i, s in enumerate(manifest["shards"]) if not s["has_ref"]]


def _refuse_unrecorded_reference(buffer_dir, manifest: dict, ref_model: dict | None, but: int | None = None) -> None:
    """Refuse to add ``ref_model``'s statistics beside shards (other than shard ``but``) that hold statistics of
    no recorded model (rows written with reference columns and no ``ref_model``): whose they are is unknown."""
    held = [s["file"] for i, s in enumerate(manifest["shards"]) if s["has_ref"] and i != but]
    if ref_model is not None and manifest.get("ref_model") is None and held:
        raise ValueError(
            f"{Path(buffer_dir) / MANIFEST}: {held[0]}{' and others' if len(held) > 1 else ''} hold reference "
            "statistics of no recorded model (field 'ref_model' is missing), so they cannot be told to be "
            f"{ref_model.get('model') or ref_model.get('name') or 'this model'}'s: build a new buffer without reference "
            "columns, or write it with its ref_model"
        )


CHECK_BATCH_ROWS = 1024  # rows :func:`replace_shard` checks at a time (as Python objects only where one may be bad)


def replace_shard(buffer_dir, shard_index: int, table: pa.Table, *, ref_model: dict | None = None) -> dict:
    """Replace shard ``shard_index`` (position in the manifest's list) by ``table``; its new manifest entry.

    Meant for adding the reference columns: ``table`` must hold the same rows (the base columns equal
    the old shard's) and conform to :func:`shiq_data.schema.arrow_schema`. Every row is checked as
    :func:`shiq_data.schema.check_row` checks it, on whole columns 1024 rows at a time (row by row only in a
    slice that may hold a bad row, naming the first bad row and field). The
    new version is written to a new file (``shard-XXXXX.rN.arrow``, via a ``.tmp`` name and
    ``os.replace``), then ``manifest.json`` is replaced atomically to point at it and record the
    shard in ``ref_stats.done``, then the old file is deleted. A kill at any moment leaves either the
    old or the new shard listed, both complete.
    """
    return _rewrite_shard(buffer_dir, shard_index, lambda old, manifest: table, ref_model=ref_model)


def _rewrite_shard(
    buffer_dir, shard_index: int, make: Callable[[pa.Table, dict], pa.Table], *, ref_model: dict | None
) -> dict:
    """:func:`replace_shard` by ``make(old shard, manifest)``, called under the buffer's lock once the old shard
    is checked against its checksum and read (the same version the replacement is checked against)."""
    buffer_dir = Path(buffer_dir)
    with _locked(buffer_dir):
        manifest = read_manifest(buffer_dir)
        remove_unlisted_files(buffer_dir, manifest)
        shards = manifest["shards"]
        if not 0 <= shard_index < len(shards):
            raise IndexError(f"{buffer_dir / MANIFEST}: no shard {shard_index} (it lists {len(shards)})")
        entry = shards[shard_index]
        old_path = buffer_dir / entry["file"]
        verify_shard(old_path, entry)  # never give a corrupted shard a fresh, valid checksum
        old = read_shard(old_path)
        table = make(old, manifest)
        with_ref = all(n in table.schema.names for n in REF_FIELDS)
        want = arrow_schema(with_ref, has_text_columns(manifest))
        if table.schema.names != want.names or [f.type for f in table.schema] != [f.type for f in want]:
            raise ValueError(
                f"replacement for {old_path.name}: schema must be {want.names} with types "
                f"{[str(f.type) for f in want]}, got {table.schema}"
            )
        table = table.cast(want)
        keep = [n for n in want.names if n not in REF_FIELDS]
        if table.num_rows != old.num_rows or not table.select(keep).equals(old.select(keep)):
            raise ValueError(
                f"replacement for {old_path.name}: its base columns {keep} must equal "
                "the shard's (only the reference columns may change)"
            )
        if with_ref:
            recorded = manifest.get("ref_model")
            if not same_reference(recorded, ref_model):
                raise _other_reference(buffer_dir, recorded, ref_model)
            _refuse_unrecorded_reference(buffer_dir, manifest, ref_model, but=shard_index)
        vocab = manifest["tokenizer"]["vocab_size"]
        for start in range(0, table.num_rows, CHECK_BATCH_ROWS):  # (a whole shard's rows as Python objects, in a
            check_slice(table.slice(start, CHECK_BATCH_ROWS), start, vocab, old_path)  # bad one: ~130 bytes a token)
        # past the file's own revision too: a manifest whose field says less (edited, or without it) must not
        # make the new file's name the old one's, which the commit would then delete
        named = _SHARD_NAME.fullmatch(entry["file"])  # (the manifest's names were checked when it was read)
        revision = max(int(entry.get("revision", 0)), int(named[2] or 0)) + 1
        name = shard_file_name(int(named[1]), revision)
        tmp = buffer_dir / f".{name}.tmp"
        try:
            new_entry = write_shard_file(table, tmp)
            os.replace(tmp, buffer_dir / name)
            fsync_dir(buffer_dir)
        finally:
            if tmp.exists():
                tmp.unlink()
        new_entry.update(file=name, revision=revision)
        new_shards = [*shards[:shard_index], new_entry, *shards[shard_index + 1 :]]
        new = {
            **manifest,
            "shards": new_shards,
            **_totals(new_shards),
            "has_ref_stats": all(s["has_ref"] for s in new_shards),
            "updated": _now(),
        }
        if with_ref:
            model = ref_model if ref_model is not None else manifest.get("ref_model")
            done = [f for f in (manifest.get("ref_stats") or {}).get("done", []) if f != entry["file"]]
            new["ref_model"] = model
            new["ref_stats"] = {"ref_model": model, "done": done + [name]}
        try:
            atomic_write_json(buffer_dir / MANIFEST, new, indent=1)  # the commit point
        except BaseException:
            _remove_uncommitted(buffer_dir, [name])
            raise
        old_path.unlink(missing_ok=True)
    return new_entry


def add_ref_columns(buffer_dir, shard_index: int, ref_chosen_logits: list, ref_logz: list, *, ref_model: dict) -> dict:
    """Commit reference statistics for one shard: per row, ``[T]`` arrays aligned with the row's tokens
    (position ``t`` = statistics of token ``t``, position 0 = 0; SHIQ_MATH §2). See :func:`replace_shard`; the
    shard's other columns are read under the buffer's lock, as the rewrite checks them."""

    def with_ref(old: pa.Table, manifest: dict) -> pa.Table:
        text = has_text_columns(manifest)
        keep = arrow_schema(False, text).names
        if len(ref_chosen_logits) != old.num_rows or len(ref_logz) != old.num_rows:
            raise ValueError(
                f"shard {shard_index} of {buffer_dir} has {old.num_rows} rows; got "
                f"{len(ref_chosen_logits)} ref_chosen_logits and {len(ref_logz)} ref_logz rows"
            )
        return pa.Table.from_arrays(
            [old.column(n).combine_chunks() for n in keep]
            + [
                _list_array(ref_chosen_logits, np.float32, pa.float32()),
                _list_array(ref_logz, np.float32, pa.float32()),
            ],
            schema=arrow_schema(True, text),
        )

    return _rewrite_shard(buffer_dir, shard_index, with_ref, ref_model=ref_model)
