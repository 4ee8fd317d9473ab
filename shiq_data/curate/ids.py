"""``--ids FILE`` and ``--exclude-ids FILE``: a list of row ids, one a line, that ``shiq-data filter`` keeps or
drops.

The file is UTF-8 text (``-``: standard input), one ``row_id`` a line, read as a stream: what stays in memory
is the distinct ids (as Arrow strings) and the file's SHA-256. A line's end (``\\n``, ``\\r\\n`` as a file written
on Windows has, or a lone ``\\r`` as an old Mac's: :func:`shiq_data.io.text_lines`) is not part of its id, nor is a byte-order mark opening the file; nothing
else is stripped, so an id with a space at an end is that id. A duplicate line is harmless. Refused, naming the file and the line: a line that is not UTF-8
(a ``row_id`` is Unicode text) and a blank line (empty or white space only: a ``row_id`` is never empty, and
the buffer's writer gives every row an id of the form ``b<k>-...``); a file that lists no id at all is refused
too (an empty list is more likely a failed step before than a wish to keep nothing or to drop nothing).

Shards' rows are matched with :func:`pyarrow.compute.index_in` against the distinct ids, several shards a
call when the list is long (the call builds its hash table of the ids every time), which also tells which
listed ids the buffer holds: those it does not are counted for a warning (the list may be stale).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shiq_data.io import RowError, read_to, text_lines

CHUNK = 65_536  # ids turned into an Arrow array at a time (Python strings held for at most this many)


class RowIds:
    """The distinct row ids listed in ``path`` (``-``: standard input), given to ``option`` (``--ids`` or
    ``--exclude-ids``); :meth:`member` matches a shard's rows against them and notes which ids were seen."""

    def __init__(self, path: str, option: str):
        self.path, self.option = str(path), option
        self.label = f"{option} {self.path}"
        digest = hashlib.sha256()
        chunks: list[pa.Array] = []
        pending: list[str] = []
        self.lines = 0
        f = sys.stdin.buffer if self.path == "-" else self._open()
        try:
            for self.lines, raw in enumerate(text_lines(f), 1):
                digest.update(raw)
                if self.lines == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark opens the file
                    raw = raw[3:]
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise RowError(
                        self.label,
                        self.lines,
                        "row_id",
                        f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)",
                        row_label="line",
                    ) from None
                text = text.removesuffix("\n").removesuffix("\r")  # (\n, \r\n or \r)
                if not text.strip():
                    raise RowError(
                        self.label, self.lines, "row_id", "blank (one row id a line, no blank lines)", row_label="line"
                    )
                pending.append(text)
                if len(pending) >= CHUNK:
                    chunks.append(pc.unique(pa.array(pending, pa.string())))
                    pending = []
        except OSError as e:  # a read error midway (a pipe's, a disk's)
            raise ValueError(f"{self.label}: cannot be read {read_to(self.lines)} ({e.strerror or e})") from None
        finally:
            if f is not sys.stdin.buffer:
                f.close()
        chunks.append(pa.array(pending, pa.string()))
        self.ids = pc.unique(pa.concat_arrays(chunks))  # in the order of their first line
        if not len(self.ids):
            raise ValueError(f"{self.label}: lists no row id (one row id a line)")
        self.sha256 = digest.hexdigest()
        self.seen = np.zeros(len(self.ids), dtype=bool)

    def _open(self):
        path = Path(self.path)
        if path.is_dir():
            raise ValueError(f"{self.label} is a folder: give a file of row ids, one a line")
        try:
            return open(path, "rb")
        except OSError as e:
            raise ValueError(f"{self.label}: cannot be read ({e.strerror or e})") from None

    def __len__(self) -> int:
        return len(self.ids)

    def members(self, columns: list) -> list[np.ndarray]:
        """``[N_i]`` bool for each of ``columns`` (shards' ``row_id`` columns): which rows are listed; the listed
        ids among them are noted as seen (:meth:`missing`). One :func:`pyarrow.compute.index_in` over them all:
        it builds its hash table of the listed ids at every call (about 0.17 s a million ids), so a caller gives
        shards enough rows together to outweigh that (:meth:`enough`) rather than one shard a call."""
        at = pc.index_in(
            pa.chunked_array([c for col in columns for c in pa.chunked_array(col).chunks], pa.string()),
            value_set=self.ids,
        )
        at = at.combine_chunks() if isinstance(at, pa.ChunkedArray) else at
        found = at.is_valid().to_numpy(zero_copy_only=False)
        self.seen[at.drop_null().to_numpy(zero_copy_only=False)] = True
        return np.split(found, np.cumsum([len(col) for col in columns])[:-1])

    def enough(self, rows: int) -> bool:
        """Whether ``rows`` rows are worth one :meth:`members` call: as many as the listed ids (so the hash
        table's cost is at most the lookups', and the calls over a buffer ``1 + rows / ids``)."""
        return rows >= len(self.ids)

    def missing(self) -> tuple[int, str | None]:
        """``(how many listed ids no row matched so far, the first of them in the file's order)``."""
        unseen = np.flatnonzero(~self.seen)
        return len(unseen), (self.ids[int(unseen[0])].as_py() if len(unseen) else None)

    def record(self) -> dict:
        """What the manifest's ``curation`` keeps of the list: the file as given, its SHA-256 (of its bytes as
        read), its lines and distinct ids, and how many of those the buffer did not hold."""
        return {
            "file": self.path,
            "sha256": self.sha256,
            "lines": self.lines,
            "ids": len(self.ids),
            "not_in_buffer": self.missing()[0],
        }
