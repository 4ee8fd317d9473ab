"""``shiq-data filter``: keep the rows of a buffer where a SQL boolean expression is true."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from shiq_data.buffer import Buffer
from shiq_data.curate.output import refuse_existing, write_curated
from shiq_data.curate.rows import TEXT_COLUMNS, CurationSource
from shiq_data.curate.where import Where, shown


def selected(source: CurationSource, where: Where | None) -> Iterator[tuple]:
    """``(shard table, indices of its rows where the expression holds)`` for each shard (all rows without
    ``where``)."""
    for table in source.shards():
        if where is None:
            yield table, np.arange(table.num_rows)
            continue
        view = source.view(table, text=where.needs(TEXT_COLUMNS), extra_keys=where.needs_extra_keys())
        yield table, np.flatnonzero(where.mask(view, source.shard_path))


def filter_buffer(path, out, expr: str, *, command: list[str], progress: bool = False) -> tuple[Buffer, int, int]:
    """Write the rows of the buffer at ``path`` where ``expr`` holds as a new buffer at ``out``;
    ``(new buffer, rows kept, rows read)``."""
    out = refuse_existing(out)
    where = Where(expr)
    source = CurationSource(path)
    for table in source.shards():  # a wrong column or type fails here, before anything is written
        where.mask(source.view(table.slice(0, 0), text=where.needs(TEXT_COLUMNS), extra_keys=where.needs_extra_keys()))
        break
    source.warn_of_shadowed_keys(where.columns)
    curation = {"verb": "filter", "where": expr, "rows_read": 0, "rows_kept": 0}

    def rows():
        for table, keep in selected(source, where):
            curation["rows_read"] += table.num_rows
            curation["rows_kept"] += len(keep)
            yield source.take(table, keep)

    buf = write_curated(
        rows(),
        out,
        parents=[source],
        command=command,
        curation=curation,
        ref_model=source.ref_model,
        progress=progress,
        nothing=f"--where {shown(expr, True)}: no row of {path} matches; nothing written",
    )
    return buf, curation["rows_kept"], curation["rows_read"]
