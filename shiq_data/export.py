"""A buffer as a shareable dataset folder (``shiq-data export BUFFER --out DIR --format hf|parquet|jsonl``).

- ``hf``: a ``datasets`` folder (``Dataset.save_to_disk``; open it with ``datasets.load_from_disk``),
  one record per row with the columns of :data:`EXPORT_COLUMNS`.
- ``parquet``: ``data.parquet`` with the same columns (one row group per shard).
- ``jsonl``: ``data.jsonl``, one ``{"prompt", "completion", "reward", "group", "source", ...extra}``
  record per row: prompt and completion as given (strings, or message lists), ``turn_rewards``
  instead of ``reward`` for per-turn rewards, the ``extra`` fields at the top level.

Each folder also holds a dataset card ``README.md`` (schema, row and token counts, the commands that
built the buffer, a licence field for the curator to fill in). ``shiq-data build jsonl|parquet|datasets``
reads every export back (:mod:`shiq_data.readers.generic`): the rows are tokenised again from their
text, so another tokenizer can be used. Reference statistics are not exported. Every row is checked as
``validate`` checks it before it is written (a damaged shard is refused, not published), a repeated ``row_id``
is refused too, and the folder is written atomically (:func:`shiq_data.io.atomic_dir`).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from shiq_data.buffer import MANIFEST, Buffer, buffer_fingerprint, open_buffer, refuse_inside_buffer
from shiq_data.io import atomic_dir, printable, progress_bar, type_name
from shiq_data.readers.encode import decode_text
from shiq_data.readers.generic import check_record
from shiq_data.schema import BASE_FIELDS, TEXT_FIELDS, check_slice, extra_field, parse_extra
from shiq_data.tokenizers import PIPELINE_FIELD
from shiq_data.validate import check_unique_ids

EXPORT_FORMATS = ("hf", "parquet", "jsonl")
EXPORT_COLUMNS = (*BASE_FIELDS, *TEXT_FIELDS)
DATA_FILE = {"parquet": "data.parquet", "jsonl": "data.jsonl"}
_RESERVED = ("prompt", "completion", "reward", "turn_rewards", "group", "source")  # keys of a JSONL record
_ROWS_PER_SLICE = 1024
_MEANING = {
    "row_id": "row name, unique in the buffer",
    "source": "where the row came from",
    "group_id": "completions of one prompt share it",
    "prompt_len": "number of leading prompt tokens",
    "tokens": "token ids",
    "action_mask": "true on the tokens the policy chose",
    "rewards": "per-token rewards (nonzero only on action tokens)",
    "prompt": "the prompt as given (a chat message list as its JSON text)",
    "completion": "the completion as given (a chat message list as its JSON text)",
    "reward": "the scalar reward as given",
    "turn_rewards": "per-turn rewards as given",
    "extra": "JSON object text of the input record's other fields",
}


def jsonl_record(row: dict, *, where: str) -> dict:
    """The JSONL record of a buffer row (see the module doc); ``ValueError`` naming ``where`` when the row has
    no prompt or completion text or an extra field has the name of a record key. A conversation without any
    reward gets reward 0."""
    for key in ("prompt", "completion"):
        if row[key] is None:
            raise ValueError(
                f"{where}: field {key!r}: null (the row keeps no text, e.g. it was mixed in from a buffer without "
                "text columns); export with --format parquet or hf, which keep the token columns"
            )
    record = {"prompt": decode_text(row["prompt"]), "completion": decode_text(row["completion"])}
    if row["turn_rewards"] is not None:
        record["turn_rewards"] = row["turn_rewards"]
    else:
        record["reward"] = row["reward"] if row["reward"] is not None else 0.0
    record["group"] = row["group_id"]
    record["source"] = row["source"]
    try:
        extra = parse_extra(row["extra"]) if row["extra"] is not None else {}
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{where}: field 'extra': not JSON text ({e})") from None
    except ValueError as e:
        raise ValueError(f"{where}: field '{extra_field(row['extra'])}': {e}") from None
    if not isinstance(extra, dict):
        raise ValueError(f"{where}: field 'extra': must be the JSON text of an object, got {type_name(extra)}")
    clash = [k for k in extra if k in _RESERVED]
    if clash:
        raise ValueError(
            f"{where}: field 'extra': holds {clash[0]!r}, a key of the JSONL record itself; export with "
            "--format parquet or hf, which keep 'extra' in a column of its own"
        )
    return {**record, **extra}


def _tables(buffer: Buffer) -> Iterator[tuple[Path, pa.Table]]:
    yield from zip(buffer.shard_paths, buffer.shard_columns(EXPORT_COLUMNS))


def _checked_slices(buffer: Buffer, tables, bar: tqdm) -> Iterator[tuple[Path, int, pa.Table]]:
    """``(shard, start, piece)``: the export columns of ``tables`` (``(shard, table)`` pairs) in slices of rows ``start``, ``start + 1``, ..., every
    row checked first as ``validate`` checks it (:func:`shiq_data.schema.check_slice`, against the manifest's
    vocabulary and ``next_group_id``): a shard replaced together with its checksum is refused naming the shard,
    row and field, and is not published. ``bar`` counts the rows."""
    vocab = buffer.manifest["tokenizer"].get("vocab_size")
    for shard, table in tables:
        for start in range(0, table.num_rows, _ROWS_PER_SLICE):
            piece = table.slice(start, _ROWS_PER_SLICE)
            check_slice(piece, start, vocab, shard, buffer.manifest["next_group_id"])
            yield shard, start, piece
            bar.update(piece.num_rows)


def _checked_tables(buffer: Buffer, bar: tqdm) -> list[pa.Table]:
    """The shards' export columns, every row checked first (:func:`_checked_slices`)."""
    tables = list(_tables(buffer))
    for _ in _checked_slices(buffer, tables, bar):
        pass
    return [table for _, table in tables]


def _write_jsonl(buffer: Buffer, path: Path, bar: tqdm) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for shard, start, piece in _checked_slices(buffer, _tables(buffer), bar):
            for j, row in enumerate(piece.to_pylist()):
                i = start + j
                record = jsonl_record(row, where=f"{shard}: row {i}")
                # a record build would refuse (text edited by hand: an empty completion, a malformed message, a
                # reward beside turn rewards) is not published
                check_record(record, file=str(shard), row=i, row_label="row")
                f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _write_parquet(buffer: Buffer, path: Path, bar: tqdm) -> None:
    tables = _checked_tables(buffer, bar)
    with pq.ParquetWriter(str(path), tables[0].schema) as writer:
        for table in tables:
            writer.write_table(table)


def _write_hf(buffer: Buffer, folder: Path, bar: tqdm, progress: bool = True) -> None:
    import datasets  # heavy: only this export format needs it

    table = pa.concat_tables(_checked_tables(buffer, bar))  # the memory-mapped shards, not copied
    # the buffer's fingerprint names the data: without one, datasets would hash (and so copy) the whole table
    fingerprint = buffer_fingerprint(buffer.manifest)[:16]
    shown = datasets.utils.logging.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        datasets.Dataset(datasets.table.InMemoryTable(table), fingerprint=fingerprint).save_to_disk(str(folder))
    finally:
        if shown:
            datasets.enable_progress_bars()


def _code(argv: list) -> str:
    """A recorded command line as a Markdown code span that reruns it: quoted for the shell as ``shiq-data info``
    prints it (words joined by spaces lost the quotes of a ``--where`` expression), its control characters escaped,
    and fenced by one more backtick than the longest run in it."""
    text = printable(shlex.join(map(str, argv)))
    fence = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if "`" in text else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def dataset_card(buffer: Buffer, fmt: str, name: str) -> str:
    """The ``README.md`` of an export: YAML front matter (licence left empty for the curator), contents,
    schema, and the buffer's lineage (the commands that built it)."""
    m = buffer.manifest
    tok = m["tokenizer"]
    groups = len({g for t in buffer.shard_columns(["group_id"]) for g in t.column("group_id").to_pylist()})
    files = {"hf": "the datasets folder itself (datasets.load_from_disk)", **DATA_FILE}[fmt]
    types = {f.name: str(f.type) for t in buffer.shard_columns(EXPORT_COLUMNS)[:1] for f in t.schema}
    lines = [
        "---",
        'license: ""  # to be filled in by the curator before sharing',
        "---",
        f"# {name}",
        "",
        f"A replay buffer of the shiq toolkit exported with `shiq-data export --format {fmt}`.",
        "",
        "## Contents",
        "",
        f"- rows: {m['rows']}, prompt groups: {groups}",
        f"- tokens: {m['tokens']} (action tokens: {m.get('action_tokens', '?')})",
        f"- tokenizer: {tok.get('name')} (vocabulary {tok['vocab_size']}, fingerprint {tok['fingerprint']}"
        + (f", pipeline fingerprint {tok[PIPELINE_FIELD]})" if tok.get(PIPELINE_FIELD) else ")"),
        f"- buffer fingerprint: {buffer_fingerprint(m)}",
        f"- text columns: {'yes' if buffer.has_text else 'no (the rows cannot be rebuilt from text)'}",
        f"- data: {files}",
        "- reference statistics: not exported",
        "",
        "`shiq-data build jsonl|parquet|datasets` reads this export back, tokenising the text again."
        if buffer.has_text
        else "The rows keep no text, so `shiq-data build` cannot read this export back.",
        "",
        "## Schema",
        "",
    ]
    if fmt == "jsonl":
        lines += [
            "One JSON object per line: `prompt`, `completion` (strings, or chat message lists), `reward` (or",
            "`turn_rewards`, one per assistant turn of the completion), `group` (the group id), `source`,",
            "and the input record's other fields.",
        ]
    else:
        lines += ["| column | type | meaning |", "|---|---|---|"]
        lines += [f"| {c} | {types.get(c, '?')} | {_MEANING[c]} |" for c in EXPORT_COLUMNS]
    lines += ["", "## Lineage", ""]
    lines += [f"- {c.get('time')}: +{c.get('rows')} rows: {_code(c.get('argv', []))}" for c in m.get("commands", [])]
    if m.get("retokenized_from"):
        lines.append(f"- retokenized from: {json.dumps(m['retokenized_from'])}")
    return "\n".join(lines) + "\n"


def export_buffer(buffer_dir, out_dir, fmt: str, progress: bool = True) -> Buffer:
    """Write the buffer at ``buffer_dir`` as a dataset folder ``out_dir`` in format ``fmt`` (see the module
    doc); refuses an existing ``out_dir``, and ``jsonl`` for a buffer without text columns. Returns the
    opened buffer. ``progress``: a bar of the rows checked and written (and the hf format's own)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"--format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"--out {out_dir} already exists; choose a new folder")
    refuse_inside_buffer(out_dir)
    buffer = open_buffer(buffer_dir)
    if fmt == "jsonl" and not buffer.has_text:
        raise ValueError(
            f"{Path(buffer_dir) / MANIFEST}: the buffer has no text columns (schema version 1 or built with "
            "--no-text); a JSONL export holds text: use --format parquet or hf for the token columns"
        )
    if not buffer.manifest["shards"]:
        raise ValueError(f"{Path(buffer_dir) / MANIFEST}: the buffer has no rows to export")

    def fill(tmp: Path) -> None:
        # the rows checked (and, for jsonl, written); the hf format's own bar then shows its writing
        # (cleared if a row is refused, so the error starts on a clean line)
        with progress_bar(progress, total=len(buffer), desc=f"export {fmt}", unit=" rows") as bar:
            if fmt == "hf":
                _write_hf(buffer, tmp, bar, progress)
            elif fmt == "parquet":
                _write_parquet(buffer, tmp / DATA_FILE["parquet"], bar)
            else:
                _write_jsonl(buffer, tmp / DATA_FILE["jsonl"], bar)
            check_unique_ids(buffer, out_dir)  # after the rows' own checks, in validate's order
        (tmp / "README.md").write_text(dataset_card(buffer, fmt, out_dir.name), encoding="utf-8")

    atomic_dir(out_dir, fill, option="--out")
    return buffer
