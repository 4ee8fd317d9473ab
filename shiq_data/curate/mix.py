"""``shiq-data mix``: a new buffer sampling whole prompt groups from several buffers by weight.

Input ``i`` with weight ``w_i`` gets ``r_i = round(rows * w_i / sum(w))`` rows: its groups, in order of
first appearance, are shuffled by ``numpy.random.default_rng([seed, i])`` and taken in that order until
they hold at least ``r_i`` rows (without replacement), or drawn uniformly at random, one at a time, until
they do (``replacement``; a group may come several times). Groups are never split, so an input may give
up to one group more than ``r_i``. Without ``rows`` the mix is as large as the inputs allow without
replacement: ``min_i(rows_i * sum(w) / w_i)``.

The output's group ids are ``0, 1, ...`` in order of appearance, one per (input, group, copy), so no two
inputs (or copies) share one; row ids become ``m<i>-<row id>`` (``m<i>-<row id>-copy<k>`` for the k-th
repeat). All inputs must share a tokenizer fingerprint. Reference statistics are kept when every input
has them from the same reference model, and dropped otherwise (the result says so).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from shiq_data.buffer import MANIFEST, Buffer
from shiq_data.curate.output import refuse_existing, write_curated
from shiq_data.curate.rows import CurationSource
from shiq_data.schema import REF_FIELDS


def parse_spec(spec: str) -> tuple[str, float]:
    """``PATH:WEIGHT`` -> ``(path, weight)``; the weight a positive number."""
    path, sep, weight = spec.rpartition(":")
    try:
        w = float(weight)
    except ValueError:
        w = float("nan")
    if not sep or not path or not w > 0 or w == float("inf"):
        raise ValueError(f"{spec!r}: expected BUFFER:WEIGHT with a positive weight, e.g. buffers/hh:0.7")
    return path, w


def _group_sizes(source: CurationSource) -> dict[int, int]:
    """group id -> rows, in order of first appearance."""
    sizes: dict[int, int] = {}
    for table in source.shards():
        for g in table.column("group_id").to_pylist():
            sizes[g] = sizes.get(g, 0) + 1
    return sizes


def _draw(sizes: dict[int, int], target: int, rng: np.random.Generator, replacement: bool) -> Counter:
    """group id -> copies, holding at least ``target`` rows (see the module doc)."""
    groups = list(sizes)
    counts: Counter = Counter()
    total = 0
    if replacement:
        while total < target:
            g = groups[int(rng.integers(len(groups)))]
            counts[g] += 1
            total += sizes[g]
        return counts
    for j in rng.permutation(len(groups)):
        if total >= target:
            break
        counts[groups[j]] = 1
        total += sizes[groups[j]]
    return counts


def mix_buffers(
    specs: list[str],
    out,
    *,
    rows: int | None = None,
    replacement: bool = False,
    seed: int = 0,
    command: list[str],
    progress: bool = False,
) -> tuple[Buffer, dict]:
    """Write the mix of ``specs`` (``BUFFER:WEIGHT`` strings) at ``out``; ``(new buffer, curation record)``."""
    if not specs:
        raise ValueError("mix: give at least one BUFFER:WEIGHT")
    parsed = [parse_spec(s) for s in specs]
    if rows is not None and rows < 1:
        raise ValueError(f"--rows must be >= 1, got {rows}")
    out = refuse_existing(out)
    sources = [CurationSource(p) for p, _ in parsed]
    first = sources[0]
    for s in sources[1:]:
        if s.fingerprint != first.fingerprint:
            raise ValueError(
                f"{s.path / MANIFEST}: tokenizer {s.manifest['tokenizer'].get('name')!r} (fingerprint "
                f"{s.fingerprint[:12]}…) differs from {first.path}'s {first.manifest['tokenizer'].get('name')!r} "
                f"(fingerprint {first.fingerprint[:12]}…); only buffers of one tokenizer can be mixed"
            )
    weights = np.array([w for _, w in parsed], dtype=np.float64)
    share = weights / weights.sum()
    sizes = [_group_sizes(s) for s in sources]
    have = np.array([len(s) for s in sources], dtype=np.float64)
    total = int(rows) if rows is not None else int(np.floor((have / share).min()))
    targets = [int(round(total * p)) for p in share]
    if not replacement:
        for s, t in zip(sources, targets):
            if t > len(s):
                raise ValueError(
                    f"{s.path}: has {len(s)} rows, the mix asks for {t}; lower --rows or pass --replacement"
                )
    draws = [
        _draw(sz, t, np.random.default_rng([seed, i]), replacement) for i, (sz, t) in enumerate(zip(sizes, targets))
    ]
    ref_models = [s.ref_model if s.keep_ref else None for s in sources]
    keep_ref = all(s.keep_ref for s in sources) and all(m == ref_models[0] for m in ref_models)
    curation = {
        "verb": "mix",
        "inputs": [{"path": str(Path(p).resolve()), "weight": w} for p, w in parsed],
        "rows_asked": total,
        "replacement": replacement,
        "seed": seed,
        "rows_per_input": [0] * len(sources),
        "groups_per_input": [sum(d.values()) for d in draws],
        "ref_stats_dropped": any(s.keep_ref for s in sources) and not keep_ref,
    }

    def out_rows():
        new_group: dict[tuple, int] = {}
        for i, (source, draw) in enumerate(zip(sources, draws)):
            for table in source.shards():
                if not keep_ref:
                    table = table.drop_columns([f for f in REF_FIELDS if f in table.schema.names])
                groups, ids = table.column("group_id").to_pylist(), table.column("row_id").to_pylist()
                take, row_ids, group_ids = [], [], []
                for j, old_gid in enumerate(groups):
                    for k in range(draw.get(old_gid, 0)):
                        take.append(j)
                        row_ids.append(f"m{i}-{ids[j]}" + (f"-copy{k}" if k else ""))
                        group_ids.append(new_group.setdefault((i, old_gid, k), len(new_group)))
                if not take:
                    continue
                part = source.take(table, take)
                names = part.schema.names
                part = part.set_column(names.index("row_id"), "row_id", pa.array(row_ids, pa.string()))
                part = part.set_column(names.index("group_id"), "group_id", pa.array(group_ids, pa.int64()))
                curation["rows_per_input"][i] += len(take)
                yield part

    buf = write_curated(
        out_rows(),
        out,
        parents=sources,
        command=command,
        curation=curation,
        ref_model=ref_models[0] if keep_ref else None,
        progress=progress,
    )
    return buf, curation
