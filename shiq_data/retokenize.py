"""The same rows for another tokenizer: a buffer rebuilt from its text columns (``shiq-data retokenize``).

Every row keeps its ``row_id``, ``source``, ``group_id`` and text columns; its tokens, action mask,
rewards and prompt length are computed again from the text by the readers' own encoder
(:func:`shiq_data.readers.generic.encode_kept`), so the result equals building the original input
with the new tokenizer. Reference statistics belong to the old tokens and are dropped. The new
manifest records where the rows came from: ``"retokenized_from": {"path", "fingerprint", "tokenizer",
"ref_stats_dropped"}`` (the parent's :func:`shiq_data.buffer.buffer_fingerprint`), and lists the
parent's commands before its own (the rows keep their ids, so a later append must not reuse a prefix).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from shiq_data.buffer import (
    MANIFEST,
    Buffer,
    buffer_fingerprint,
    open_buffer,
    shard_bytes_of,
    shard_rows_of,
    write_buffer,
)
from shiq_data.readers.generic import encode_kept
from shiq_data.schema import INPUT_KEY, TEXT_FIELDS, input_location

_ROWS_PER_SLICE = 1024  # rows converted to Python at a time


def _rows(buffer: Buffer, tokenizer) -> Iterator[dict]:
    eos = tokenizer.eos_token_id
    names = ["row_id", "source", "group_id", *TEXT_FIELDS]
    for path, table in zip(buffer.shard_paths, buffer.shard_columns(names)):
        for start in range(0, table.num_rows, _ROWS_PER_SLICE):
            for j, row in enumerate(table.slice(start, _ROWS_PER_SLICE).to_pylist()):
                i = start + j
                encoded = encode_kept(row, tokenizer, eos=eos, file=path, row_index=i)
                yield {**row, **encoded, INPUT_KEY: input_location(path, i, row_label="row", fields={})}


def retokenize_buffer(
    buffer_dir,
    out_dir,
    tokenizer,
    tokenizer_info: dict,
    *,
    command: list[str],
    shard_rows: int | None = None,
    shard_bytes: int | None = None,
    progress: bool = True,
) -> Buffer:
    """Write at ``out_dir`` the rows of the buffer at ``buffer_dir`` tokenised with ``tokenizer`` (see the
    module doc); ``ValueError`` for a buffer without text columns. ``shard_rows`` and ``shard_bytes``
    default to the parent's (:func:`shiq_data.buffer.shard_rows_of`, :func:`shiq_data.buffer.shard_bytes_of`)."""
    buffer = open_buffer(buffer_dir)
    if not buffer.has_text:
        why = "schema version 1" if buffer.manifest.get("schema_version") == 1 else "built with --no-text"
        raise ValueError(
            f"{Path(buffer_dir) / MANIFEST}: the buffer has no text columns ({why}), so there is no text to "
            "tokenise again; build a new buffer from its inputs with the new tokenizer"
        )
    shards = buffer.manifest["shards"]
    lineage = {
        "path": str(Path(buffer_dir).resolve()),
        "fingerprint": buffer_fingerprint(buffer.manifest),
        "tokenizer": buffer.manifest["tokenizer"].get("name"),
        "ref_stats_dropped": buffer.has_ref_stats or any(s["has_ref"] for s in shards),
    }
    return write_buffer(
        _rows(buffer, tokenizer),
        out_dir,
        tokenizer_info=tokenizer_info,
        command=command,
        shard_rows=shard_rows or shard_rows_of(buffer.manifest),
        shard_bytes=shard_bytes or shard_bytes_of(buffer.manifest),
        progress=progress,
        input_name=str(buffer_dir),
        text_columns=True,
        manifest_extra={"retokenized_from": lineage},
        prior_commands=buffer.manifest.get("commands", []),
    )
