"""``shiq-data filter``: keep the rows of a buffer where a SQL boolean expression is true, whose row id a file
lists (``--ids``) or does not list (``--exclude-ids``), or both."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

from shiq_data.buffer import Buffer
from shiq_data.curate.ids import RowIds
from shiq_data.curate.output import refuse_existing, write_curated
from shiq_data.curate.rows import TEXT_COLUMNS, CurationSource
from shiq_data.curate.where import Where, shown

log = logging.getLogger(__name__)
HELD_SHARDS = 1024  # memory-mapped shards held for one id lookup at most (the system's mappings are finite)


def selected(source: CurationSource, where: Where | None) -> Iterator[tuple]:
    """``(shard table, indices of its rows where the expression holds)`` for each shard (all rows without
    ``where``)."""
    for table in source.shards():
        if where is None:
            yield table, np.arange(table.num_rows)
            continue
        view = source.view(table, text=where.needs(TEXT_COLUMNS), extra_keys=where.needs_extra_keys())
        yield table, np.flatnonzero(where.mask(view, source.shard_path))


def filter_buffer(
    path,
    out,
    expr: str | None = None,
    *,
    ids: str | None = None,
    exclude_ids: str | None = None,
    command: list[str],
    progress: bool = False,
) -> tuple[Buffer, int, int]:
    """Write the rows of the buffer at ``path`` where ``expr`` holds, whose ``row_id`` is listed in the file
    ``ids`` and not in the file ``exclude_ids`` (:class:`RowIds`; each condition only when given, at least one
    given) as a new buffer at ``out``; ``(new buffer, rows kept, rows read)``. The listed ids no row of the buffer
    has are counted in a warning."""
    if expr is None and ids is None and exclude_ids is None:
        raise ValueError("filter: give --where EXPR, --ids FILE or --exclude-ids FILE (the rows to keep)")
    if ids is not None and exclude_ids is not None:
        raise ValueError(
            f"--ids {ids} and --exclude-ids {exclude_ids}: give one of them (the rows to keep, or to drop)"
        )
    out = refuse_existing(out)
    where = Where(expr) if expr is not None else None
    listed = RowIds(ids, "--ids") if ids is not None else None
    if exclude_ids is not None:
        listed = RowIds(exclude_ids, "--exclude-ids")
    source = CurationSource(path)
    if where is not None:
        for table in source.shards():  # a wrong column or type fails here, before anything is written
            view = source.view(table.slice(0, 0), text=where.needs(TEXT_COLUMNS), extra_keys=where.needs_extra_keys())
            where.mask(view)
            break
        source.warn_of_shadowed_keys(where.columns)
    curation = {"verb": "filter", "where": expr, "rows_read": 0, "rows_kept": 0}
    key = "ids" if ids is not None else "exclude_ids"

    def rows():
        held, n = [], 0  # shards (with the rows --where keeps) waiting for one RowIds.members call
        for table, keep in selected(source, where):
            curation["rows_read"] += table.num_rows
            if listed is None:
                curation["rows_kept"] += len(keep)
                yield source.take(table, keep)
                continue
            held.append((table, keep))
            n += table.num_rows
            if listed.enough(n) or len(held) >= HELD_SHARDS:
                yield from matched(held)
                held, n = [], 0
        if held:
            yield from matched(held)
        if listed is not None:  # (before write_curated's own end: also when no row is left)
            curation[key] = listed.record()
            missing, first = listed.missing()
            if missing:
                log.warning(
                    f"shiq-data: warning: {listed.label}: {missing:,} of {len(listed):,} listed row "
                    f"{'id' if len(listed) == 1 else 'ids'} "
                    f"{'is' if missing == 1 else 'are'} not in {path} (first: {first!r})"
                )

    def matched(held):
        members = listed.members([table.column("row_id") for table, _ in held])
        for (table, keep), member in zip(held, members):
            keep = keep[member[keep] if ids is not None else ~member[keep]]
            curation["rows_kept"] += len(keep)
            yield source.take(table, keep)

    given = [f"--where {shown(expr, True)}"] if expr is not None else []
    given += [listed.label] if listed is not None else []
    buf = write_curated(
        rows(),
        out,
        parents=[source],
        command=command,
        curation=curation,
        ref_model=source.ref_model,
        progress=progress,
        nothing=f"{' and '.join(given)}: no row of {path} {'is left' if exclude_ids else 'matches'}; nothing written",
    )
    return buf, curation["rows_kept"], curation["rows_read"]
