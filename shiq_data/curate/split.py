"""``shiq-data split``: a train and a test buffer with no prompt group (or prompt text) on both sides.

The units are the buffer's groups (``by="group"``: rows sharing a ``group_id``, kept whole) or its
prompts (``by="prompt"``: rows whose normalised prompt text is the same, see
:func:`shiq_data.curate.rows.normalise`). The units, in order of first appearance, are shuffled by
``numpy.random.default_rng(seed)``; the test side is the shortest prefix of that order holding at
least ``round(test_fraction * rows)`` rows (at least one unit, never all of them). The same buffer,
fraction and seed give the same split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shiq_data.curate.output import refuse_existing, write_curated
from shiq_data.curate.rows import CurationSource, text_key
from shiq_data.io import atomic_dir

BY = ("group", "prompt")


def _unit_keys(source: CurationSource, table, by: str) -> list:
    if by == "group":
        return table.column("group_id").to_pylist()
    prompts, _ = source.texts(table)
    return [text_key(p) for p in prompts]


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
    units: dict = {}  # unit key -> [index in first-appearance order, rows]
    row_units = []  # per shard, each row's unit index
    for table in source.shards():
        idx = []
        for key in _unit_keys(source, table, by):
            entry = units.setdefault(key, [len(units), 0])
            entry[1] += 1
            idx.append(entry[0])
        row_units.append(np.asarray(idx, dtype=np.int64))
    n_rows = len(source)
    sizes = np.zeros(len(units), dtype=np.int64)
    for index, count in units.values():
        sizes[index] = count
    if len(units) < 2:
        raise ValueError(f"{path}: has {len(units)} {by}(s); a split needs at least 2")
    order = np.random.default_rng(seed).permutation(len(units))
    target = max(1, round(test_fraction * n_rows))
    taken = int(np.searchsorted(np.cumsum(sizes[order]), target) + 1)
    taken = min(max(taken, 1), len(units) - 1)
    is_test = np.zeros(len(units), dtype=bool)
    is_test[order[:taken]] = True

    def rows(side_is_test: bool):
        for table, unit in zip(source.shards(), row_units):
            yield source.take(table, np.flatnonzero(is_test[unit] == side_is_test))

    counts = {"train": int(sizes[~is_test].sum()), "test": int(sizes[is_test].sum())}
    units_per_side = {"train": int((~is_test).sum()), "test": int(is_test.sum())}

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

    atomic_dir(out, fill)
    return {**counts, "units": units_per_side}
