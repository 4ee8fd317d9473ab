"""``shiq-data filter``: keep the rows of a buffer where a SQL boolean expression is true, whose row id a file
lists (``--ids``) or does not list (``--exclude-ids``), or both. The selection (:class:`Selection`) is also what
``show`` and ``stats`` look at."""

from __future__ import annotations

import itertools
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


def row_ids(ids: str | None, exclude_ids: str | None) -> RowIds | None:
    """The list of ``--ids FILE`` or ``--exclude-ids FILE`` (:class:`RowIds`; None without either); both
    together are refused."""
    if ids is not None and exclude_ids is not None:
        raise ValueError(
            f"--ids {ids} and --exclude-ids {exclude_ids}: give one of them (the rows to keep, or to drop)"
        )
    if ids is not None:
        return RowIds(ids, "--ids")
    return RowIds(exclude_ids, "--exclude-ids") if exclude_ids is not None else None


class Selection:
    """``(shard table, indices of its rows)`` for each shard of ``source`` in order: the rows where ``where`` holds
    (:func:`selected`) whose ``row_id`` ``listed`` lists (``--ids``) or does not list (``--exclude-ids``), every
    row without either. The ids of several shards are looked up in one :meth:`RowIds.members` call (as many rows
    as the list has ids, :meth:`RowIds.enough`), so a shard comes out once the lookup of its batch is done."""

    def __init__(self, source: CurationSource, where: Where | None, listed: RowIds | None):
        self.source, self.where, self.listed = source, where, listed
        self.matched = 0  # shards whose row ids have been looked up

    def __iter__(self) -> Iterator[tuple]:
        if self.listed is None:
            yield from selected(self.source, self.where)
            return
        for held in self._batches(selected(self.source, self.where)):
            members = self.listed.members([table.column("row_id") for table, _ in held])
            self.matched += len(held)
            for (table, keep), member in zip(held, members):
                yield table, keep[member[keep] if self.listed.option == "--ids" else ~member[keep]]

    def _batches(self, shards: Iterator[tuple]) -> Iterator[list[tuple]]:
        """``shards`` (tuples, a shard's table first) gathered for one :meth:`RowIds.members` call each: as many
        rows as the list has ids, or :data:`HELD_SHARDS` shards."""
        held, n = [], 0
        for item in shards:
            held.append(item)
            n += item[0].num_rows
            if self.listed.enough(n) or len(held) >= HELD_SHARDS:
                yield held
                held, n = [], 0
        if held:
            yield held

    def finish(self) -> None:
        """Look up the row ids of the shards an iteration stopped before (their ``row_id`` column only, no
        ``--where``), so that :meth:`warn_of_missing` counts the listed ids over the whole buffer."""
        if self.listed is None:
            return
        for held in self._batches((table,) for table in itertools.islice(self.source.shards(), self.matched, None)):
            self.listed.members([table.column("row_id") for (table,) in held])
            self.matched += len(held)

    def warn_of_missing(self, path) -> None:
        """Warn of the listed ids no row of the buffer (``path``, as given) has: nothing without a list, or when
        every listed id is there."""
        missing, first = self.listed.missing() if self.listed is not None else (0, None)
        if missing:
            n = len(self.listed)
            log.warning(
                f"shiq-data: warning: {self.listed.label}: {missing:,} of {n:,} listed row "
                f"{'id' if n == 1 else 'ids'} {'is' if missing == 1 else 'are'} not in {path} "
                f"(first: {first!r})"
            )


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
    out = refuse_existing(out)
    where = Where(expr) if expr is not None else None
    listed = row_ids(ids, exclude_ids)
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
        chosen = Selection(source, where, listed)
        for table, keep in chosen:
            curation["rows_read"] += table.num_rows
            curation["rows_kept"] += len(keep)
            yield source.take(table, keep)
        if listed is not None:  # (before write_curated's own end: also when no row is left)
            curation[key] = listed.record()
            chosen.warn_of_missing(path)

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
