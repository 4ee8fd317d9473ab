"""``shiq-data split``: a train and a test buffer with no prompt group (or prompt text) on both sides.

The units are the buffer's groups (``by="group"``: rows sharing a ``group_id``, kept whole) or its
prompts (``by="prompt"``: rows whose normalised prompt text is the same, see
:func:`shiq_data.curate.rows.normalise`). The units, in order of first appearance, are shuffled by
``numpy.random.default_rng(seed)``; the test side is the shortest prefix of that order holding at
least ``round(test_fraction * rows)`` rows (at least one unit, never all of them). The same buffer,
fraction and seed give the same split. A ``row_id`` the input holds twice is refused, as ``validate`` refuses it,
whichever sides its two rows would fall on.

Memory is bounded, not proportional to the buffer: each row's unit key goes to a temporary Parquet table
next to ``out`` (:class:`shiq_data.spill.Spill`, removed afterwards) where DuckDB, within a fixed memory
limit, numbers the units in order of first appearance and counts their rows; the unit sizes and the
shuffled order are numpy arrays in memory-mapped temporary files (``Generator.shuffle`` of ``0 .. units -
1`` in place: the same order as ``Generator.permutation``); what stays in memory is one bit per unit (on
the test side or not) and one bit per row (the same, per row), 1.25 MB per 10 million rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from shiq_data.curate.output import refuse_existing, write_curated
from shiq_data.curate.rows import CurationSource, text_key
from shiq_data.io import atomic_dir
from shiq_data.spill import Bitmap, Spill
from shiq_data.validate import ID_SCHEMA, id_rows, refuse_repeated_ids

BY = ("group", "prompt")
CHUNK = 1 << 20  # units read at a time from the memory-mapped arrays


def _unit_keys(source: CurationSource, table, by: str) -> pa.Array:
    if by == "group":
        return table.column("group_id").combine_chunks()
    prompts, _ = source.texts(table, completion=False)
    return pa.array([text_key(p) for p in prompts], pa.binary())


def _key_type(by: str) -> pa.DataType:
    return pa.int64() if by == "group" else pa.binary()


def _test_rows(source: CurationSource, spill: Spill, by: str, test_fraction: float, seed: int, path) -> tuple:
    """``(rows on the test side as a Bitmap, rows per side, units per side)`` (see the module doc). A ``row_id`` the
    input holds twice is refused (:func:`refuse_repeated_ids`, validate's words) whichever sides its rows would fall
    on: two buffers sharing an id are not a clean split either."""
    spill.declare("rows", pa.schema([("pos", pa.int64()), ("key", _key_type(by))]))
    spill.declare("ids", ID_SCHEMA)
    pos = 0
    for k, table in enumerate(source.shards()):
        keys = _unit_keys(source, table, by)
        n = len(keys)
        spill.append("rows", pa.table({"pos": np.arange(pos, pos + n), "key": keys}))
        spill.append("ids", id_rows(pos, k, table.column("row_id")))
        pos += n
    n_rows = pos
    refuse_repeated_ids(spill, "ids", path, source.manifest["shards"])
    rows = spill.table("rows")
    (n_units,) = spill.one(f"SELECT count(*) FROM (SELECT key FROM {rows} GROUP BY key)")
    if n_units < 2:
        raise ValueError(f"{path}: has {n_units} {by}(s); a split needs at least 2")
    sizes = spill.array("sizes", n_units)
    spill.declare("units", pa.schema([("key", _key_type(by)), ("unit", pa.int64())]))
    u = 0
    for batch in spill.query(f"SELECT key, count(*) FROM {rows} GROUP BY key ORDER BY min(pos)"):
        n = batch.num_rows
        sizes[u : u + n] = batch.column(1).to_numpy()
        spill.append("units", pa.table({"key": batch.column(0), "unit": np.arange(u, u + n)}))
        u += n
    order = spill.array("order", n_units)
    order[:] = np.arange(n_units)
    np.random.default_rng(seed).shuffle(order)
    target = max(1, round(test_fraction * n_rows))
    taken, total = n_units, 0  # the first position whose running row count reaches the target, plus one
    for start in range(0, n_units, CHUNK):
        running = total + np.cumsum(sizes[order[start : start + CHUNK]])
        k = int(np.searchsorted(running, target))
        if k < len(running):
            taken = start + k + 1
            break
        total = int(running[-1])
    taken = min(max(taken, 1), n_units - 1)
    test_units = Bitmap(n_units)
    test_count = 0
    for start in range(0, taken, CHUNK):
        chosen = np.asarray(order[start:taken][:CHUNK])
        test_units.set_many(chosen)
        test_count += int(sizes[chosen].sum())
    test_rows = Bitmap(n_rows)
    for batch in spill.query(f"SELECT r.pos, u.unit FROM {rows} r JOIN {spill.table('units')} u ON r.key = u.key"):
        on_test = test_units.get_many(batch.column(1).to_numpy())
        test_rows.set_many(batch.column(0).to_numpy()[on_test])
    del sizes, order  # unmapped before the spill folder goes
    counts = {"train": n_rows - test_count, "test": test_count}
    return test_rows, counts, {"train": n_units - taken, "test": taken}


def split_buffer(
    path, out, *, test_fraction: float, by: str = "group", seed: int = 0, command: list[str], progress: bool = False
) -> dict:
    """Write ``out/train`` and ``out/test`` (see the module doc); both appear together or not at all.
    Returns ``{"train": rows, "test": rows, "units": {"train": n, "test": n}}``."""
    if by not in BY:
        raise ValueError(f"--by {by!r}: expected one of {', '.join(BY)}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    out = refuse_existing(out)
    source = CurationSource(path)
    with Spill(out) as spill:
        test_rows, counts, units_per_side = _test_rows(source, spill, by, test_fraction, seed, path)

    def rows(side_is_test: bool):
        start = 0
        for table in source.shards():
            on_test = test_rows.get_many(np.arange(start, start + table.num_rows))
            start += table.num_rows
            yield source.take(table, np.flatnonzero(on_test == side_is_test))

    def fill(tmp: Path):
        for side in ("train", "test"):
            curation = {
                "verb": "split",
                "side": side,
                "by": by,
                "test_fraction": test_fraction,
                "seed": seed,
                "rows": counts[side],
                "units": units_per_side[side],
            }
            write_curated(
                rows(side == "test"),
                tmp / side,
                parents=[source],
                command=command,
                curation=curation,
                ref_model=source.ref_model,
                progress=progress,
            )

    atomic_dir(out, fill, option="--out")
    return {**counts, "units": units_per_side}
