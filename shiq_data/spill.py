"""Out-of-core work tables for what a command must remember about every row of a buffer (duplicate texts,
repeated row ids, near-duplicate candidates).

A :class:`Spill` is a temporary folder next to the command's output (removed when the command ends, and, if a
killed process left it, by the next command of this machine that makes one in that folder: :func:`sweep`)
holding Parquet tables that the caller appends to a batch at a time, and a DuckDB connection that queries them with its memory limited to
:data:`MEMORY_LIMIT`: its joins, aggregations and sorts spill to that folder beyond the limit. What a
command holds in memory for such work is then the limit plus one batch, whatever the buffer's size. A
:meth:`Spill.array` is a numpy array in a memory-mapped file of that folder (its pages are page cache the
kernel can write back and drop, not process memory). A :class:`Bitmap` holds one bit per row (1.25 MB per
10 million rows), the one thing a command keeps in memory that grows with the buffer.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shiq_data.io import held_dir, release_held, remove_stale_hostless, sweep_held, this_host

MEMORY_LIMIT = "64MB"  # DuckDB's working memory; beyond it, its operators spill to the spill folder
BATCH_ROWS = 8192  # rows per batch read back from a query
# rows per Parquet row group of a spilled table: DuckDB holds a row group's column chunks while it scans one,
# so a table appended in one piece (a million rows) must not become one row group the memory limit cannot hold
ROW_GROUP_ROWS = 65_536


def sweep(folder: Path, host: str, name: str | None = None) -> None:
    """Remove the spill folders in ``folder`` of this machine's commands that are gone: those whose lock can be
    taken (:func:`shiq_data.io.sweep_held`), and for the output ``name`` the folders of releases that named no
    host (``.NAME.spill-PID-hex``), judged by their pid."""
    if name is not None:
        remove_stale_hostless(folder, f".{name}.spill-")
    sweep_held(folder, f".*.spill-{glob.escape(host)}-*")


class SpillMemoryError(RuntimeError):
    """DuckDB ran out of a :class:`Spill`'s memory limit (a user error: one line, exit status 2)."""


class Spill:
    """A context manager: a temporary folder ``.<name>.spill-<host>-<pid>-<random>`` next to ``near`` (in the system's
    temporary folder when that one cannot be written), Parquet tables in it and a DuckDB connection with
    ``memory_limit`` (default :data:`MEMORY_LIMIT`) and its ``temp_directory`` inside it; the folder is removed on
    exit. DuckDB running out of the limit in the block (a query whose operators cannot spill enough) is then a
    :class:`SpillMemoryError` saying so in one line, not DuckDB's own error, whose advice (``SET memory_limit``) no
    user of a command can follow."""

    def __init__(self, near, memory_limit: str | None = None):
        memory_limit = memory_limit or MEMORY_LIMIT
        self.memory_limit = memory_limit
        near = Path(near).absolute()
        folder = near.parent
        while not folder.is_dir():  # the output's parents may not exist yet: the nearest one that does
            folder = folder.parent
        host = this_host()
        # the folders of this machine's killed commands (a kill -9, SIGTERM, the OOM killer)
        sweep(folder, host, near.name)
        self._held = None
        try:
            self.dir, self._held = held_dir(folder, f".{near.name}.spill-{host}-{os.getpid()}")
        except OSError:
            self.dir = Path(tempfile.mkdtemp(prefix=f"{near.name}.spill-"))
        try:
            self.con = duckdb.connect(
                ":memory:",
                config={
                    "memory_limit": memory_limit,
                    "temp_directory": str(self.dir / "duckdb"),
                    "threads": 1,
                    "preserve_insertion_order": False,
                    "autoinstall_known_extensions": False,
                    "autoload_known_extensions": False,
                },
            )
        except BaseException:  # (Ctrl-C included) before the caller's ``with`` could remove the folder
            self._remove()
            raise
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._schemas: dict[str, pa.Schema] = {}

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close()
        if isinstance(error, duckdb.OutOfMemoryException):
            first = str(error).strip().splitlines()[0] if str(error).strip() else "out of memory"
            raise SpillMemoryError(
                f"DuckDB ran out of the {self.memory_limit} memory limit of this command's work tables ({first}); "
                "the limit is fixed (no option or setting raises it): run the command on fewer rows, e.g. on parts "
                "of the buffer written by shiq-data filter --where"
            ) from error  # (its traceback, with SHIQ_VERBOSE=1)

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers = {}
        self.con.close()
        self._remove()

    def _remove(self) -> None:
        release_held(self.dir, self._held)
        self._held = None

    def declare(self, name: str, schema: pa.Schema) -> None:
        """Start table ``name`` with ``schema`` (so it exists, empty, even if nothing is appended)."""
        self._schemas[name] = schema
        self._writers[name] = pq.ParquetWriter(str(self.dir / f"{name}.parquet"), schema, compression="none")

    def append(self, name: str, table: pa.Table | pa.RecordBatch) -> None:
        """Append the rows of ``table`` (the declared schema's columns) to table ``name``."""
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if table.num_rows:
            table = table.select(self._schemas[name].names).cast(self._schemas[name])
            self._writers[name].write_table(table, row_group_size=ROW_GROUP_ROWS)

    def table(self, name: str) -> str:
        """SQL naming table ``name`` (closed for appending on first use)."""
        writer = self._writers.pop(name, None)
        if writer is not None:
            writer.close()
        path = str(self.dir / f"{name}.parquet").replace("'", "''")
        return f"read_parquet('{path}')"

    def materialize(self, name: str, sql: str) -> str:
        """Table ``name`` holding the result of ``sql``, computed once (a Parquet file of the spill folder), as
        :meth:`table` names it."""
        path = str(self.dir / f"{name}.parquet").replace("'", "''")
        self.con.execute(f"COPY ({sql}) TO '{path}' (FORMAT parquet, COMPRESSION uncompressed)")
        return self.table(name)

    def query(self, sql: str, batch_rows: int | None = None) -> Iterator[pa.RecordBatch]:
        """The result of ``sql`` as record batches of up to ``batch_rows`` (default :data:`BATCH_ROWS`) rows,
        streamed."""
        reader = self.con.sql(sql).to_arrow_reader(batch_rows or BATCH_ROWS)
        yield from reader

    def array(self, name: str, n: int, dtype=np.int64) -> np.ndarray:
        """A zeroed ``[n]`` array of ``dtype`` in the memory-mapped file ``<name>.npy`` of the spill folder."""
        return np.lib.format.open_memmap(self.dir / f"{name}.npy", mode="w+", dtype=dtype, shape=(n,))

    def one(self, sql: str) -> tuple | None:
        """The first row of the result of ``sql`` (None if it has none), the result read to its end."""
        rows = self.con.execute(sql).fetchall()
        return rows[0] if rows else None


class Bitmap:
    """One bit per item ``0 .. n - 1``, all set (``fill``) or all clear at first."""

    def __init__(self, n: int, fill: bool = False):
        self.n = n
        self.bits = np.full((n + 7) // 8, 0xFF if fill else 0, dtype=np.uint8)

    def clear(self, i: int) -> None:
        self.bits[i >> 3] &= ~np.uint8(1 << (i & 7))

    def set_many(self, items: np.ndarray) -> None:
        """Set the bits of ``items`` (an integer array)."""
        items = np.asarray(items, dtype=np.int64)
        np.bitwise_or.at(self.bits, items >> 3, (1 << (items & 7)).astype(np.uint8))

    def clear_many(self, items: np.ndarray) -> None:
        """Clear the bits of ``items`` (an integer array)."""
        items = np.asarray(items, dtype=np.int64)
        np.bitwise_and.at(self.bits, items >> 3, ~(1 << (items & 7)).astype(np.uint8))

    def __getitem__(self, i: int) -> bool:
        return bool(self.bits[i >> 3] >> (i & 7) & 1)

    def get_many(self, items: np.ndarray) -> np.ndarray:
        """The bits of ``items`` (an integer array) as booleans."""
        items = np.asarray(items, dtype=np.int64)
        return (self.bits[items >> 3] >> (items & 7) & 1).astype(bool)

    def indices(self, start: int, n: int) -> np.ndarray:
        """The set items among ``start .. start + n - 1``, counted from ``start``."""
        return np.flatnonzero(self.get_many(np.arange(start, start + n)))
