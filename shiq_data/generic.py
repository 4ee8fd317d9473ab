"""Generic (prompt, completion, reward) rows from JSONL, Parquet or a ``datasets`` folder → buffer rows.

Each input record is ``{"prompt": str, "completion": str, "reward": number}`` with an optional
``"group"`` (any JSON value) naming the prompt group; without it, records with identical prompt
text form a group. The buffer row is ``tokens = prompt ids + completion ids (+ eos)`` (each part
tokenised on its own, without special tokens), ``action_mask`` True on the completion (and eos),
and the reward on the last action token (SHIQ_MATH §1: a sequence reward is the last token's).
Errors name the file, the line (JSONL, 1-based) or row (Parquet / datasets, 0-based) and the field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Iterator

from shiq_data.schema import RowError

_BATCH = 512  # records tokenised together (the fast tokenizers batch in Rust)


class _Groups:
    """Consecutive group ids in order of first appearance, keyed by explicit group or prompt text."""

    def __init__(self):
        self.ids: dict = {}

    def id(self, record: dict) -> int:
        if "group" in record and record["group"] is not None:
            key = ("group", json.dumps(record["group"], sort_keys=True, default=str))
        else:
            key = ("prompt", record["prompt"])
        return self.ids.setdefault(key, len(self.ids))


def check_record(record, *, file: str, row: int, row_label: str) -> None:
    """Raise :class:`RowError` unless ``record`` has a non-empty string prompt and completion and a finite reward."""
    if not isinstance(record, dict):
        raise RowError(file, row, "*", f"expected a JSON object, got {type(record).__name__}", row_label=row_label)
    for key in ("prompt", "completion"):
        if key not in record:
            raise RowError(file, row, key, "missing", row_label=row_label)
        if not isinstance(record[key], str):
            raise RowError(file, row, key, f"must be a string, got {type(record[key]).__name__}", row_label=row_label)
    if record["prompt"] == "":
        raise RowError(file, row, "prompt", "empty (the first token cannot be an action)", row_label=row_label)
    if record["completion"] == "":
        raise RowError(file, row, "completion", "empty completion", row_label=row_label)
    if "reward" not in record:
        raise RowError(file, row, "reward", "missing", row_label=row_label)
    r = record["reward"]
    if isinstance(r, bool) or not isinstance(r, (int, float)):
        raise RowError(file, row, "reward", f"must be a number, got {type(r).__name__}", row_label=row_label)
    if not math.isfinite(r):
        raise RowError(file, row, "reward", f"non-finite reward {r}", row_label=row_label)


def records_to_rows(records: Iterable[tuple[int, dict]], tokenizer, *, file: str, row_label: str,
                    source: str | None = None, add_eos: bool = True) -> Iterator[dict]:
    """Buffer rows (without ``row_id``) from ``(line or row number, record)`` pairs; see the module doc."""
    source = source or Path(file).name
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError(f"{file}: the tokenizer has no eos token; pass add_eos=False")
    groups = _Groups()
    batch: list[tuple[int, dict]] = []

    def flush():
        prompts = tokenizer([r["prompt"] for _, r in batch], add_special_tokens=False)["input_ids"]
        completions = tokenizer([r["completion"] for _, r in batch], add_special_tokens=False)["input_ids"]
        for (n, rec), p, c in zip(batch, prompts, completions):
            a = list(c) + ([eos] if add_eos else [])
            if not p:
                raise RowError(file, n, "prompt", "tokenises to no token", row_label=row_label)
            if not a:
                raise RowError(file, n, "completion", "tokenises to no token (empty completion)", row_label=row_label)
            rewards = [0.0] * (len(p) + len(a))
            rewards[-1] = float(rec["reward"])
            yield {"source": source, "group_id": groups.id(rec), "prompt_len": len(p), "tokens": list(p) + a,
                   "action_mask": [False] * len(p) + [True] * len(a), "rewards": rewards}

    for n, rec in records:
        check_record(rec, file=file, row=n, row_label=row_label)
        batch.append((n, rec))
        if len(batch) >= _BATCH:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def utf8_lines(f, path) -> Iterator[tuple[int, str]]:
    """``(line_number, text)`` of each line of the binary file ``f`` (1-based numbers); a line that is not
    valid UTF-8 raises :class:`RowError` naming ``path``, the line and the offending byte."""
    for line_no, raw in enumerate(f, 1):
        try:
            yield line_no, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RowError(path, line_no, "*", f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                                               "of the line)", row_label="line") from None


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, "rb") as f:
        for line_no, line in utf8_lines(f, path):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise RowError(path, line_no, "*", f"bad JSON ({e.msg} at column {e.colno})", row_label="line") from None


def _require_file(path, kind: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such {kind}")
    return path


def read_jsonl(path, tokenizer, *, source: str | None = None, add_eos: bool = True) -> Iterator[dict]:
    """Buffer rows from a JSONL file (one record per line, blank lines skipped)."""
    path = _require_file(path, "file")
    return records_to_rows(_jsonl_records(path), tokenizer, file=str(path), row_label="line", source=source,
                           add_eos=add_eos)


def _parquet_records(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    n = 0
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: row {n}: unreadable Parquet data ({e})") from None
        if batch is None:
            return
        for rec in batch.to_pylist():
            yield n, rec
            n += 1


def read_parquet(path, tokenizer, *, source: str | None = None, add_eos: bool = True) -> Iterator[dict]:
    """Buffer rows from a Parquet file with columns prompt, completion, reward (and optionally group)."""
    path = _require_file(path, "file")
    return records_to_rows(_parquet_records(path), tokenizer, file=str(path), row_label="row", source=source,
                           add_eos=add_eos)


def _datasets_records(path: Path) -> Iterator[tuple[int, dict]]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"{path}: a DatasetDict with splits {list(ds)}; pass one split's folder, e.g. "
                         f"{path / next(iter(ds))}")
    n = 0
    for batch in ds.iter(batch_size=1024):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield n, dict(zip(keys, values))
            n += 1


def read_datasets(path, tokenizer, *, source: str | None = None, add_eos: bool = True) -> Iterator[dict]:
    """Buffer rows from a folder written by ``datasets.Dataset.save_to_disk``."""
    path = _require_file(path, "folder")
    return records_to_rows(_datasets_records(path), tokenizer, file=str(path), row_label="row", source=source,
                           add_eos=add_eos)


READERS = {"jsonl": read_jsonl, "parquet": read_parquet, "datasets": read_datasets}
