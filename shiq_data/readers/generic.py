"""Generic (prompt, completion, reward) rows from JSONL, Parquet or a ``datasets`` folder → buffer rows.

Each input record is ``{"prompt": str, "completion": str, "reward": number}`` with an optional
``"group"`` (any JSON value) naming the prompt group; without it, records with identical prompt
text form a group. The buffer row is ``tokens = prompt ids + completion ids (+ eos)`` (each part
tokenised on its own, without special tokens), ``action_mask`` True on the completion (and eos),
and the reward on the last action token (SHIQ_MATH §1: a sequence reward is the last token's).

The completion may instead be a list of chat messages ``[{"role", "content"}, ...]`` (roles as in
:func:`shiq_data.chat.check_messages`, at least one assistant message): the row is then the
conversation prompt + completion rendered by the tokenizer's chat template, the prompt being one
user message (a string) or a list of messages. The action tokens are the completion's assistant
turns (content and end-of-turn token; assistant messages in the prompt are context) and the reward
sits on the last of them. Both kinds go through :func:`shiq_data.readers.encode.encode_record`.

Errors name the file, the line (JSONL, 1-based) or row (Parquet / datasets, 0-based) and the field;
each row carries that location (:data:`shiq_data.schema.INPUT_KEY`) so the buffer's own row check
names it too (its ``rewards`` as the input's ``reward``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from shiq_data.chat import MessageError, check_messages
from shiq_data.io import RowError, iter_jsonl
from shiq_data.readers.encode import MESSAGES, encode_record, is_chat
from shiq_data.schema import INPUT_KEY, input_location, is_finite_number

_BATCH = 512  # records tokenised together (the fast tokenizers batch in Rust)


class _Groups:
    """Consecutive group ids in order of first appearance, keyed by explicit group or prompt text."""

    def __init__(self):
        self.ids: dict = {}

    def id(self, record: dict) -> int:
        if "group" in record and record["group"] is not None:
            key = ("group", json.dumps(record["group"], sort_keys=True, default=str))
        elif isinstance(record["prompt"], str):
            key = ("prompt", record["prompt"])
        else:
            key = ("messages", json.dumps(record["prompt"], sort_keys=True, default=str))
        return self.ids.setdefault(key, len(self.ids))


def _check_chat(record: dict, err) -> None:
    """Raise ``err(field, problem)`` unless the prompt is a string or messages and the completion is
    messages with an assistant turn."""
    prompt = record["prompt"]
    for key, value in (("prompt", prompt), ("completion", record["completion"])):
        if isinstance(value, list):
            try:
                check_messages(value, key)
            except MessageError as e:
                raise err(e.field, e.problem) from None
        elif not isinstance(value, str):
            raise err(key, f"must be a string or {MESSAGES}, got {type(value).__name__}")
    if not any(m["role"] == "assistant" for m in record["completion"]):
        raise err("completion", "no assistant message, so the row would have no action tokens")


def check_record(record, *, file: str, row: int, row_label: str) -> None:
    """Raise :class:`RowError` unless ``record`` has a non-empty prompt and completion and a finite reward:
    both strings, or a completion of chat messages (with an assistant one) after a string or messages."""

    def err(field, problem):
        return RowError(file, row, field, problem, row_label=row_label)

    if not isinstance(record, dict):
        raise err("*", f"expected a JSON object, got {type(record).__name__}")
    for key in ("prompt", "completion"):
        if key not in record:
            raise err(key, "missing")
    if is_chat(record):
        _check_chat(record, err)
    else:
        for key in ("prompt", "completion"):
            if not isinstance(record[key], str):
                also = f" (or {MESSAGES} with a message-list completion)" if key == "prompt" else f" or {MESSAGES}"
                raise err(key, f"must be a string{also}, got {type(record[key]).__name__}")
    if record["prompt"] == "":
        raise err("prompt", "empty (the first token cannot be an action)")
    if record["completion"] == "":
        raise err("completion", "empty completion")
    if "reward" not in record:
        raise err("reward", "missing")
    r = record["reward"]
    if isinstance(r, bool) or not isinstance(r, (int, float)):
        raise err("reward", f"must be a number, got {type(r).__name__}")
    if not is_finite_number(r):  # also an integer too large for a float
        raise err("reward", f"non-finite reward {str(r)[:40]}")


def records_to_rows(
    records: Iterable[tuple[int, dict]],
    tokenizer,
    *,
    file: str,
    row_label: str,
    source: str | None = None,
    add_eos: bool = True,
) -> Iterator[dict]:
    """Buffer rows (without ``row_id``) from ``(line or row number, record)`` pairs; see the module doc.
    ``add_eos`` applies to string completions (a chat completion ends with the template's end of turn)."""
    source = source or Path(file).name
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError(f"{file}: the tokenizer has no eos token; pass add_eos=False")
    groups = _Groups()
    batch: list[tuple[int, dict]] = []
    where = {"file": file, "row_label": row_label, "eos": eos if add_eos else None}

    def flush():
        texts = [r for _, r in batch if not is_chat(r)]
        prompts = completions = []
        if texts:
            prompts = tokenizer([r["prompt"] for r in texts], add_special_tokens=False)["input_ids"]
            completions = tokenizer([r["completion"] for r in texts], add_special_tokens=False)["input_ids"]
        text_ids = zip(prompts, completions)
        for n, rec in batch:
            ids = None if is_chat(rec) else next(text_ids)
            yield {
                "source": source,
                "group_id": groups.id(rec),
                **encode_record(rec, tokenizer, row=n, ids=ids, **where),
                INPUT_KEY: input_location(file, n, row_label=row_label, fields={"rewards": "reward"}),
            }

    for n, rec in records:
        check_record(rec, file=file, row=n, row_label=row_label)
        batch.append((n, rec))
        if len(batch) >= _BATCH:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def _require_file(path, kind: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such {kind}")
    return path


def read_jsonl(path, tokenizer, *, source: str | None = None, add_eos: bool = True) -> Iterator[dict]:
    """Buffer rows from a JSONL file (one record per line, blank lines skipped)."""
    path = _require_file(path, "file")
    return records_to_rows(
        iter_jsonl(path), tokenizer, file=str(path), row_label="line", source=source, add_eos=add_eos
    )


def _parquet_records(path: Path) -> Iterator[tuple[int, dict]]:
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
    return records_to_rows(
        _parquet_records(path), tokenizer, file=str(path), row_label="row", source=source, add_eos=add_eos
    )


def _datasets_records(path: Path) -> Iterator[tuple[int, dict]]:
    import datasets  # heavy: only the datasets format needs it

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(
            f"{path}: a DatasetDict with splits {list(ds)}; pass one split's folder, e.g. {path / next(iter(ds))}"
        )
    n = 0
    for batch in ds.iter(batch_size=1024):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield n, dict(zip(keys, values))
            n += 1


def read_datasets(path, tokenizer, *, source: str | None = None, add_eos: bool = True) -> Iterator[dict]:
    """Buffer rows from a folder written by ``datasets.Dataset.save_to_disk``."""
    path = _require_file(path, "folder")
    return records_to_rows(
        _datasets_records(path), tokenizer, file=str(path), row_label="row", source=source, add_eos=add_eos
    )
