"""``shiq-data mix``: a new buffer sampling whole prompt groups from several buffers by weight.

Input ``i`` with weight ``w_i`` gets ``r_i = round(rows * w_i / sum(w))`` rows: its groups, in order of
first appearance, are shuffled by ``numpy.random.default_rng([seed, i])`` and taken in that order until
they hold at least ``r_i`` rows (without replacement), or drawn uniformly at random, one at a time, until
they do (``replacement``; a group may come several times). Groups are never split, so an input may give
up to one group more than ``r_i``. Without ``rows`` the mix is as large as the inputs allow without
replacement: ``min_i(rows_i * sum(w) / w_i)``.

The output's group ids are ``0, 1, ...`` in order of appearance, one per (input, group, copy), so no two
inputs (or copies) share one; row ids become ``m<i>-<row id>`` (``m<i>c<k>-<row id>`` for the k-th
repeat: unique whatever the input's ids are, a mix's own ``...-copy1`` too). All inputs must share a tokenizer fingerprint (and pipeline fingerprint, among those recording one:
the mix records it only when every input does) and a system prompt setting, and all keep text columns or
none does. Reference statistics are kept when every input has them from the same reference
model, and dropped otherwise (the result says so).

Memory is bounded, not proportional to the inputs: each input's group ids go to a temporary Parquet table
next to ``out`` (:class:`shiq_data.spill.Spill`, removed afterwards) where DuckDB, within a fixed memory
limit, numbers the groups in order of first appearance and counts their rows; per group (its size, the
shuffled order, its copies and its first new group id) and per row (its group's number) the numbers are
numpy arrays in memory-mapped temporary files, not process memory (the order is ``Generator.shuffle`` of
``0 .. groups - 1`` in place: the same as ``Generator.permutation``).
"""

from __future__ import annotations

import math
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa

from shiq_data.buffer import MANIFEST, Buffer, same_reference
from shiq_data.cli_common import plural
from shiq_data.curate.output import refuse_existing, write_curated
from shiq_data.curate.rows import CurationSource
from shiq_data.schema import REF_FIELDS
from shiq_data.spill import Spill
from shiq_data.tokenizers import PIPELINE_FIELD

# seeds are below this: numpy reads ``[s + 2**32, 0]`` as the 32-bit words ``[s, 1]``, input 0 of seed s + 2**32 would
# be drawn as input 1 of seed s
SEED_LIMIT = 2**32

CHUNK = 1 << 20  # groups read at a time from the memory-mapped arrays


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


class _Groups:
    """The groups of input ``i`` (numbered ``0, 1, ...`` in order of first appearance): ``sizes`` (rows per
    group), ``unit`` (each row's group number), and after :meth:`draw` ``copies`` and ``first`` (the new
    group id of each group's first copy, counted within the input), all memory-mapped arrays of ``spill``."""

    def __init__(self, source: CurationSource, i: int, spill: Spill):
        self.spill, self.i = spill, i
        name = f"rows{i}"
        spill.declare(name, pa.schema([("pos", pa.int64()), ("group_id", pa.int64())]))
        pos = 0
        for table in source.shards():
            spill.append(name, pa.table({"pos": np.arange(pos, pos + table.num_rows), "group_id": table["group_id"]}))
            pos += table.num_rows
        rows = spill.table(name)
        (self.n,) = spill.one(f"SELECT count(*) FROM (SELECT group_id FROM {rows} GROUP BY group_id)")
        self.sizes = spill.array(f"sizes{i}", self.n)
        self.unit = spill.array(f"unit{i}", pos)
        spill.declare(f"groups{i}", pa.schema([("group_id", pa.int64()), ("unit", pa.int64())]))
        u = 0
        for batch in spill.query(f"SELECT group_id, count(*) FROM {rows} GROUP BY group_id ORDER BY min(pos)"):
            self.sizes[u : u + batch.num_rows] = batch.column(1).to_numpy()
            units = pa.table({"group_id": batch.column(0), "unit": np.arange(u, u + batch.num_rows)})
            spill.append(f"groups{i}", units)
            u += batch.num_rows
        groups = spill.table(f"groups{i}")
        for batch in spill.query(f"SELECT r.pos, g.unit FROM {rows} r JOIN {groups} g USING (group_id)"):
            self.unit[batch.column(0).to_numpy()] = batch.column(1).to_numpy()

    def draw(self, target: int, rng: np.random.Generator, replacement: bool) -> int:
        """Choose copies of groups holding at least ``target`` rows (see the module doc); the copies drawn."""
        self.copies = self.spill.array(f"copies{self.i}", self.n)
        total = 0
        if replacement:
            while total < target:
                u = int(rng.integers(self.n))
                self.copies[u] += 1
                total += int(self.sizes[u])
        else:
            order = self.spill.array(f"order{self.i}", self.n)
            order[:] = np.arange(self.n)
            rng.shuffle(order)
            for start in range(0, self.n if target > 0 else 0, CHUNK):
                chunk = np.asarray(order[start : start + CHUNK])
                running = total + np.cumsum(self.sizes[chunk])
                k = int(np.searchsorted(running, target))  # groups are taken until the rows reach the target
                self.copies[chunk[: k + 1]] = 1
                if k < len(chunk):
                    break
                total = int(running[-1])
            del order
        self.first = self.spill.array(f"first{self.i}", self.n)
        drawn = 0
        for start in range(0, self.n, CHUNK):
            c = np.asarray(self.copies[start : start + CHUNK])
            self.first[start : start + len(c)] = drawn + np.cumsum(c) - c
            drawn += int(c.sum())
        return drawn


def _system_prompt(source: CurationSource) -> dict:
    """The ``--system-prompt`` setting a buffer's rows were rendered with (the template's default when its
    manifest records none)."""
    return source.manifest["tokenizer"].get("system_prompt") or {"setting": "template"}


def _describe(system: dict) -> str:
    """A recorded system prompt setting in words: ``--system-prompt off (text '')``; a text over 60 characters
    is shown by its first 60 and ``…`` (its quotes kept)."""
    setting = system["setting"] if system["setting"] in ("template", "off") else "TEXT"
    if "text" not in system:
        return f"--system-prompt {setting}"
    text = system["text"]
    shown = repr(text) if text is None or len(text) <= 60 else f"{text[:60]!r}…"
    return f"--system-prompt {setting} (text {shown})"


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
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"--seed must be in [0, 2**32), got {seed} (a larger one repeats a smaller seed's draws)")
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
        if s.buffer.has_text != first.buffer.has_text:
            with_text, without = (s, first) if s.buffer.has_text else (first, s)
            raise ValueError(
                f"{without.path / MANIFEST}: the buffer has no text columns (schema version 1 or built with "
                f"--no-text), {with_text.path} keeps them; only buffers that both keep or both lack text can be mixed"
            )
        a, b = _system_prompt(s), _system_prompt(first)
        if a["setting"] != b["setting"] or ("text" in a and "text" in b and a["text"] != b["text"]):
            raise ValueError(
                f"{s.path / MANIFEST}: rendered with {_describe(a)}, {first.path} with "
                f"{_describe(b)}; only buffers of one system prompt setting can be mixed"
            )
    # buffers written before the pipeline fingerprint was recorded lack it: the others must agree on it
    piped = [s for s in sources if s.pipeline_fingerprint is not None]
    for s in piped[1:]:
        if s.pipeline_fingerprint != piped[0].pipeline_fingerprint:
            p = piped[0]
            raise ValueError(
                f"{s.path / MANIFEST}: field 'tokenizer.{PIPELINE_FIELD}': tokenizer "
                f"{s.manifest['tokenizer'].get('name')!r} (pipeline fingerprint {s.pipeline_fingerprint[:12]}…) "
                f"has another pipeline (it may split text differently) than {p.path}'s {p.manifest['tokenizer'].get('name')!r} "
                f"(pipeline fingerprint {p.pipeline_fingerprint[:12]}…); only buffers of one tokenizer can be mixed"
            )
    with Spill(out) as spill:
        return _mix(parsed, sources, out, rows, replacement, seed, command, progress, spill)


def _token_hashes(spill: Spill, table: pa.Table) -> pa.Array:
    """A 64-bit hash of each row's tokens (its prompt and completion as the model reads them), by DuckDB, in
    no particular order."""
    spill.con.register("part", table.select(["tokens"]))
    try:
        return spill.con.sql("SELECT hash(tokens) AS key FROM part").to_arrow_table().column("key").combine_chunks()
    finally:
        spill.con.unregister("part")


def _check_space(sources, targets: list[int], out) -> None:
    """Refuse a mix whose shards would not fit the free space where ``out`` goes (each input's rows at its
    own shards' bytes per row): ``--rows`` with ``--replacement`` has no other bound, and a mistyped one
    would otherwise draw groups for hours before the disk ran out."""
    need = 0.0
    for s, t in zip(sources, targets):
        shards = s.manifest["shards"]
        rows = sum(e["rows"] for e in shards)
        need += t * (sum(e["bytes"] for e in shards) / rows if rows else 0.0)
    where = Path(out).resolve().parent
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise ValueError(
            f"a mix of {sum(targets)} rows would need about {need / 2**30:,.1f} GiB of shards, {where} has "
            f"{free / 2**30:,.1f} GiB free; lower --rows (or free space)"
        )


def _mix(parsed, sources, out, rows, replacement, seed, command, progress, spill) -> tuple[Buffer, dict]:
    weights = [w for _, w in parsed]
    # exact, each weight the decimal it was given as (its shortest repr: 0.1 is 1/10, not the float's binary
    # value, which gave 10 and 30 rows at 0.1:0.3 a mix of 39): in floats 39 / (3 / 5) is 64.99999999999999, a
    # mix one row short, and two weights of 1e308 would sum to infinity
    exact = [Fraction(repr(w)) for w in weights]
    total_weight = sum(exact)
    groups = [_Groups(s, i, spill) for i, s in enumerate(sources)]
    if rows is not None:
        total = int(rows)
    else:
        total = math.floor(min(len(s) * total_weight / w for s, w in zip(sources, exact)))
    targets = [round(total * w / total_weight) for w in exact]
    if not any(targets):  # (every share rounds to no row: the inputs are not empty)
        raise ValueError(
            f"--rows {total} over weights {', '.join(f'{w:g}' for w in weights)} gives every input round(rows * w / "
            "sum(w)) = 0 rows: raise --rows"
        )
    if not replacement:
        for s, t in zip(sources, targets):
            if t > len(s):
                raise ValueError(
                    f"{s.path}: has {plural(len(s), 'row')}, the mix asks for {t}; lower --rows or pass --replacement"
                )
    _check_space(sources, targets, out)
    drawn = [g.draw(t, np.random.default_rng([seed, i]), replacement) for i, (g, t) in enumerate(zip(groups, targets))]
    ref_models = [s.ref_model if s.keep_ref else None for s in sources]
    # one reference model throughout (a record with its weights' sha256 stands for those written before it)
    ref_model = next((m for m in ref_models if isinstance(m, dict) and "sha256" in m), ref_models[0])
    keep_ref = all(s.keep_ref for s in sources) and all(same_reference(m, ref_model) for m in ref_models)
    curation = {
        "verb": "mix",
        "inputs": [{"path": str(Path(p).resolve()), "weight": w} for p, w in parsed],
        "rows_asked": total,
        "replacement": replacement,
        "seed": seed,
        "rows_per_input": [0] * len(sources),
        "groups_per_input": drawn,
        "ref_stats_dropped": any(s.keep_ref for s in sources) and not keep_ref,
    }

    spill.declare("keys", pa.schema([("input", pa.int32()), ("key", pa.uint64())]))

    def out_rows():
        offset = 0  # new group ids before input i's
        for i, (source, g) in enumerate(zip(sources, groups)):
            start = 0
            for table in source.shards():
                if not keep_ref:
                    table = table.drop_columns([f for f in REF_FIELDS if f in table.schema.names])
                unit = np.asarray(g.unit[start : start + table.num_rows])
                start += table.num_rows
                copies = np.asarray(g.copies[unit])
                take = np.repeat(np.arange(table.num_rows), copies)
                if not len(take):
                    continue
                k = np.arange(len(take)) - np.repeat(np.cumsum(copies) - copies, copies)  # each copy's number
                group_ids = (offset + np.asarray(g.first[unit])[take] + k).tolist()
                ids = table.column("row_id").to_pylist()
                row_ids = [f"m{i}{f'c{c}' if c else ''}-{ids[j]}" for j, c in zip(take.tolist(), k.tolist())]
                part = source.take(table, take)
                names = part.schema.names
                part = part.set_column(names.index("row_id"), "row_id", pa.array(row_ids, pa.string()))
                part = part.set_column(names.index("group_id"), "group_id", pa.array(group_ids, pa.int64()))
                curation["rows_per_input"][i] += len(take)
                spill.append(
                    "keys",
                    pa.table({"input": pa.array([i] * len(part), pa.int32()), "key": _token_hashes(spill, part)}),
                )
                yield part
            offset += drawn[i]
        # rows whose tokens another input gave too (one input curated from another, a buffer given twice):
        # the mix holds them more than once, as it holds a group drawn twice with replacement
        keys = spill.table("keys")
        (curation["pairs_in_several_inputs"],) = spill.one(
            f"SELECT count(*) FROM (SELECT key FROM {keys} GROUP BY key HAVING count(DISTINCT input) > 1)"
        )

    buf = write_curated(
        out_rows(),
        out,
        parents=sources,
        command=command,
        curation=curation,
        ref_model=ref_model if keep_ref else None,
        progress=progress,
    )
    return buf, curation
