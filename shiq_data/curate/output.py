"""Writing a curated buffer: the kept rows of one or more parents, through the buffer's own writer, with lineage."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa

from shiq_data.buffer import Buffer, refuse_inside_buffer, shard_bytes_of, shard_rows_of, write_buffer
from shiq_data.curate.rows import CurationSource
from shiq_data.io import RowError
from shiq_data.tokenizers import CHAT_TEMPLATE_FIELD, PIPELINE_FIELD
from shiq_data.validate import check_unique_ids

MISSING = object()  # a parent's manifest without the field


def refuse_existing(out) -> Path:
    """``out`` as a path; ``FileExistsError`` if something is there already (checked before any work)."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"--out {out} already exists; choose a new folder")
    refuse_inside_buffer(out)
    return out


def write_curated(
    rows: Iterable[pa.Table],
    out,
    *,
    parents: list[CurationSource],
    command: list[str],
    curation: dict,
    ref_model: dict | None,
    progress: bool = False,
    nothing: str | None = None,
) -> Buffer:
    """Write ``rows`` (tables of stored columns, as :meth:`CurationSource.take` gives) as a new buffer at
    ``out`` with :func:`shiq_data.buffer.write_buffer` (atomic: a failure leaves nothing), the parents'
    tokenizer, the first parent's text setting (text columns or none), its rows and bytes per shard
    (:func:`shard_rows_of`, :func:`shard_bytes_of`), and ``parents`` (path, manifest sha256) and ``curation``
    recorded in the manifest (written after the last row, so the ``rows`` iterator may still add its counts to
    ``curation``). The tokenizer's pipeline
    fingerprint is kept only when every parent records it (rows of a buffer without it were cut by an unknown
    pipeline), the chat template's only when every parent records the same one. ``nothing``: the error when no
    row is left (the verb's own words; nothing is written). A ``row_id`` the new buffer would hold twice because a
    parent holds it twice (a shard edited together with its checksum) is named at that parent's shard and row, as
    ``validate`` names it, not at the new buffer's row; the parents are searched only then, at no cost to a
    buffer without one."""
    first = parents[0].manifest
    tokenizer_info = dict(first["tokenizer"])
    if any(p.pipeline_fingerprint is None for p in parents):
        tokenizer_info.pop(PIPELINE_FIELD, None)
    templates = [p.manifest["tokenizer"].get(CHAT_TEMPLATE_FIELD, MISSING) for p in parents]
    if any(t is MISSING or t != templates[0] for t in templates):  # unknown, or rows of several templates
        tokenizer_info.pop(CHAT_TEMPLATE_FIELD, None)
    shard_rows = shard_rows_of(first)
    try:
        return write_buffer(
            rows,
            out,
            tokenizer_info=tokenizer_info,
            command=command,
            shard_rows=shard_rows,
            shard_bytes=shard_bytes_of(first),
            progress=progress,
            input_name=", ".join(str(p.path) for p in parents),
            ref_model=ref_model,
            text_columns=parents[0].buffer.has_text,
            parents=[p.parent() for p in parents],
            curation=curation,
            # the parents' commands come first, so a later append's row ids b<k>-... never clash with kept ones
            prior_commands=[c for p in parents for c in p.manifest.get("commands", [])],
        )
    except RowError as e:
        if e.field == "row_id":
            for p in parents:
                check_unique_ids(p.buffer, Path(out))
        raise
    except ValueError as e:
        if nothing is not None and str(e).endswith("no rows to write"):
            raise ValueError(nothing) from None
        raise
