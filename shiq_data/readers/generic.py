"""Generic (prompt, completion, reward) rows from JSONL, Parquet or a ``datasets`` folder → buffer rows.

Each input record is ``{"prompt": str, "completion": str, "reward": number}`` with an optional
``"group"`` (any JSON value) naming the prompt group; without it, records with identical prompts
form a group (:func:`group_key`: as the model reads them; a plain row and a chat row are never one). The
buffer row is ``tokens = prompt ids + completion ids (+ eos)`` (each part tokenised on its own, without
special tokens), ``action_mask`` True on the completion (and eos), and the reward on the last action token (SHIQ_MATH §1: a sequence reward is the last token's).

The completion may instead be a list of chat messages ``[{"role", "content"}, ...]`` (roles as in
:func:`shiq_data.chat.check_messages`, at least one assistant message): the row is then the
conversation prompt + completion rendered by the tokenizer's chat template, the prompt being one
user message (a string) or a list of messages. The action tokens are the completion's assistant
turns (content and end-of-turn token; assistant messages in the prompt are context) and the reward
sits on the last of them; or, given ``"turn_rewards"`` (one number or null per assistant turn of
the completion) instead of ``"reward"``, each turn's reward on its end-of-turn token. Both kinds go
through :func:`shiq_data.readers.encode.encode_record`.

Other public shapes, recognised by their fields:

- TRL preference pairs ``{"prompt", "chosen", "rejected"}`` (strings or message lists): two rows
  in one group of their own (unless ``"group"`` names one), chosen reward +1, rejected −1. TRL's implicit
  prompt, ``{"chosen", "rejected"}`` as two whole conversations (message lists): the prompt is the messages
  they share from the start (as TRL's ``extract_prompt`` takes it), each completion the rest of its
  conversation (:func:`implicit_prompt`).
- TRL unpaired preferences ``{"prompt", "completion", "label"}``: ``label`` true → reward +1,
  false → −1 (a ``"reward"`` field wins over ``label``, unless it is null: a table with both columns).
- Rows of a buffer exported by ``shiq-data export --format parquet|hf``: the record has the
  buffer's columns (``group_id``, ``tokens``, ``action_mask``, ``prompt_len``, ...); the text
  columns are read back (:func:`shiq_data.readers.encode.decode_text`) and tokenised again, the
  token columns ignored, ``group_id`` naming the group.
- Other field names: ``prompt_field``, ``completion_field``, ``reward_field`` (``--option``) say
  which fields hold the prompt, completion and reward; errors name those fields.

A non-empty string ``"source"`` field is the row's ``source`` (default the input's file name); given
``--source``, that names the rows and the field stays in ``extra`` with the record's other fields (as a
non-string one does; an empty one is dropped). The rows keep their text (:mod:`shiq_data.schema`): ``prompt`` and ``completion`` as
given, ``reward``, ``turn_rewards``, and in ``extra`` the record's other fields.

Errors name the file, the line (JSONL, 1-based) or row (Parquet / datasets, 0-based) and the field;
each row carries that location (:data:`shiq_data.schema.INPUT_KEY`) so the buffer's own row check
names it too (its ``rewards`` as the input's reward field).
"""

from __future__ import annotations

import json
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from shiq_data.chat import MessageError, check_messages
from shiq_data.io import RowError, iter_jsonl, type_name
from shiq_data.readers.encode import MESSAGES, decode_text, encode_record, extra_text, is_chat, text_columns
from shiq_data.schema import INPUT_KEY, GroupIds, fits_float32, input_location, is_finite_number, is_number

_BATCH = 512  # records tokenised together (the fast tokenizers batch in Rust)
BUFFER_ROW_FIELDS = frozenset(("group_id", "prompt_len", "tokens", "action_mask"))  # an exported buffer row
NAMES = {"prompt": "prompt", "completion": "completion", "reward": "reward"}


def group_key(record: dict) -> tuple:
    """What makes a record's group: its explicit group, else its prompt as the model reads it (groups are
    numbered in order of first appearance of this key): the text of a plain prompt, or the chat context of a
    chat completion, where a string prompt is the user's message. So a plain row and a chat row of one prompt
    text are two groups (their prompts tokenise differently), and a string prompt and the same user message
    given as a list are one."""
    key = record.get("group_key")
    if key is not None:
        return key
    if record.get("group") is not None:
        return ("group", json.dumps(record["group"], sort_keys=True, default=str))
    prompt = record["prompt"]
    if is_chat(record):
        context = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return ("messages", json.dumps(context, sort_keys=True, default=str))
    if isinstance(prompt, str):
        return ("prompt", prompt)
    return ("messages", json.dumps(prompt, sort_keys=True, default=str))


def _named(field: str, names: dict) -> str:
    """``field`` (``completion[2].role``) with its leading record key replaced by the input's field name."""
    for key, name in names.items():
        if field == key or field.startswith((f"{key}[", f"{key}.")):
            return name + field[len(key) :]
    return field


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
            # a message's reward (the multiturn format's; an export of such rows keeps it beside turn_rewards)
            for i, m in enumerate(value):
                if "reward" in m and not (m["reward"] is None or is_finite_number(m["reward"])):
                    raise err(f"{key}[{i}].reward", f"must be a finite number or null, got {json.dumps(m['reward'])}")
                if m.get("reward") is not None and record.get("turn_rewards") is None:  # else dropped unsaid
                    raise err(
                        f"{key}[{i}].reward",
                        "a reward inside a message is read by the multiturn format; here give the completion's "
                        "'turn_rewards' (one per assistant turn) or its 'reward'",
                    )
        elif not isinstance(value, str):
            raise err(key, f"must be a string or {MESSAGES}, got {type_name(value)}")
    if not any(m["role"] == "assistant" for m in record["completion"]):
        raise err("completion", "no assistant message, so the row would have no action tokens")


def _check_turn_rewards(record: dict, err) -> None:
    turns = record["turn_rewards"]
    if not is_chat(record):
        raise err("turn_rewards", f"only a completion of {MESSAGES} can carry per-turn rewards")
    if not isinstance(turns, list):
        raise err("turn_rewards", f"must be a list (one reward or null per assistant turn), got {type_name(turns)}")
    for i, r in enumerate(turns):
        if r is not None and not is_finite_number(r):
            raise err(f"turn_rewards[{i}]", f"must be a finite number or null, got {str(r)[:40]}")
        if r is not None and not fits_float32(r):
            raise err(f"turn_rewards[{i}]", f"{float(r):.4g} does not fit in float32, which rewards are stored as")
    if record.get("reward") is not None:
        raise err("reward", "give either a reward or turn_rewards, not both")


def check_record(record, *, file: str, row: int, row_label: str, names: dict | None = None) -> None:
    """Raise :class:`RowError` unless ``record`` has a non-empty prompt and completion and a finite reward:
    both strings, or a completion of chat messages (with an assistant one) after a string or messages; a string
    completion of white space alone is empty, as an assistant turn of it is (:func:`shiq_data.readers.encode.encode_messages`);
    a chat completion may carry ``turn_rewards`` instead of the reward. ``names`` maps the record's keys
    to the input's field names, which errors use."""
    names = names or NAMES

    def err(field, problem):
        return RowError(file, row, _named(field, names), problem, row_label=row_label)

    if not isinstance(record, dict):
        raise err("*", f"expected a JSON object, got {type_name(record)}")
    for key in ("prompt", "completion"):
        if key not in record:
            raise err(key, "missing")
    if is_chat(record):
        _check_chat(record, err)
    else:
        for key in ("prompt", "completion"):
            if not isinstance(record[key], str):
                also = f" (or {MESSAGES} with a message-list completion)" if key == "prompt" else f" or {MESSAGES}"
                raise err(key, f"must be a string{also}, got {type_name(record[key])}")
    if record["prompt"] == "":
        raise err("prompt", "empty (the first token cannot be an action)")
    if record["completion"] == "":
        raise err("completion", "empty completion")
    if isinstance(record["completion"], str) and not record["completion"].strip():  # as an assistant turn of it
        raise err("completion", "empty completion (white space only, no text)")
    if record.get("turn_rewards") is not None:
        _check_turn_rewards(record, err)
        return
    if record.get("optional_reward") and record.get("reward") is None and is_chat(record):
        return  # an exported conversation that had no reward
    if "reward" not in record:
        raise err("reward", "missing")
    r = record["reward"]
    if not is_number(r):  # (a Decimal is one: a decimal Parquet column's)
        raise err("reward", f"must be a number, got {type_name(r)}")
    if isinstance(r, int) and not is_finite_number(r):
        raise err("reward", f"an integer of {len(str(abs(r)))} digits, too large for a float")
    if not is_finite_number(r):
        raise err("reward", f"non-finite reward {str(r)[:40]}")


def _from_buffer_row(rec: dict, err) -> dict:
    """The record of a row exported from a buffer: its text columns decoded, its group id the group."""
    out = {"group_key": ("group", json.dumps(rec["group_id"], default=str)), "optional_reward": True}
    for key in ("prompt", "completion"):
        value = rec.get(key)
        if value is None:
            raise err(key, "null: this row was exported from a buffer without text columns, so it cannot be rebuilt")
        out[key] = decode_text(value) if isinstance(value, str) else value
    extra = rec.get("extra")
    if extra is not None and not isinstance(extra, str):
        raise err("extra", f"must be the JSON text of an object or null, got {type_name(extra)}")
    for key in ("reward", "turn_rewards"):
        if rec.get(key) is not None:
            out[key] = rec[key]
    if "reward" not in out and "turn_rewards" not in out:
        out["reward"] = None
    out["source"] = rec.get("source") if isinstance(rec.get("source"), str) else None
    out["extra"] = extra
    return out


def canonical_records(
    rec, *, fields: dict, file: str, row: int, row_label: str, source_given: bool = False
) -> list[dict]:
    """The (prompt, completion, reward) records of one input record in any shape the generic formats
    recognise (see the module doc): one, or two for a preference pair. Each carries ``names`` (record key
    -> input field, for errors), ``source`` (str or None), ``extra`` (JSON text or None) and maybe
    ``group_key``. ``source_given``: the rows are named by ``--source``, so a ``source`` field stays in ``extra``."""

    def err(field, problem):
        return RowError(file, row, field, problem, row_label=row_label)

    if not isinstance(rec, dict):
        raise err("*", f"expected a JSON object, got {type_name(rec)}")
    if BUFFER_ROW_FIELDS <= rec.keys():
        return [{**_from_buffer_row(rec, err), "names": NAMES}]
    pf, cf, rf = fields["prompt"], fields["completion"], fields["reward"]
    source = rec.get("source") if isinstance(rec.get("source"), str) else None
    kept = source_given and bool(source)  # a source --source replaces: kept in extra (an empty one says nothing)
    consumed = {pf, "group", "turn_rewards", *(("source",) if source is not None and not kept else ())}
    source = source or None
    base = {k: rec[k] for k in ("group", "turn_rewards") if k in rec}
    if pf in rec:
        base["prompt"] = rec[pf]
    base["source"] = source
    if cf not in rec and "chosen" in rec and "rejected" in rec:
        kinds = [isinstance(rec[k], list) for k in ("chosen", "rejected") if isinstance(rec[k], (str, list))]
        if kinds == [True, False] or kinds == [False, True]:  # one group, prompts tokenised two ways
            chat, text = ("chosen", "rejected") if kinds[0] else ("rejected", "chosen")
            raise err(text, f"a string, but {chat!r} is {MESSAGES}: a pair's completions must be of one kind")
        extra = extra_text(rec, consumed | {"chosen", "rejected"})
        if rec.get("group") is None:
            base["group_key"] = ("pair", row)
        completions = {key: rec[key] for key in ("chosen", "rejected")}
        prompt_name = pf
        # TRL's implicit prompt: the shared leading messages (a null prompt too: Parquet's for a row without one)
        if rec.get(pf) is None and kinds == [True, True]:
            base["prompt"], completions["chosen"], completions["rejected"] = implicit_prompt(
                rec["chosen"], rec["rejected"], err
            )
            prompt_name = "chosen"  # (the prompt's messages are chosen's first ones)
        return [
            {
                **base,
                "completion": completions[key],
                "reward": reward,
                "extra": extra,
                "names": {**NAMES, "prompt": prompt_name, "completion": key, "reward": key},
            }
            for key, reward in (("chosen", 1.0), ("rejected", -1.0))
        ]
    if cf not in rec and ("chosen" in rec) != ("rejected" in rec):  # half a TRL pair
        given, other = ("chosen", "rejected") if "chosen" in rec else ("rejected", "chosen")
        raise err(other, f"missing: a preference pair needs {given!r} and {other!r} (or give {cf!r})")
    names = {"prompt": pf, "completion": cf, "reward": rf}
    out = dict(base)
    if cf in rec:
        out["completion"] = rec[cf]
    consumed |= {cf, rf}
    if rf in rec and not (rec[rf] is None and "label" in rec):  # (a null reward column beside a label: the label)
        out["reward"] = rec[rf]
    elif "label" in rec:
        label = rec["label"]
        if not isinstance(label, bool):
            shown = (
                json.dumps(label)[:40] if isinstance(label, (str, int, float)) or label is None else type_name(label)
            )
            raise err("label", f"must be true or false, got {shown}")
        out["reward"] = 1.0 if label else -1.0
        names["reward"] = "label"
        consumed.add("label")
    out["extra"] = extra_text(rec, consumed)
    out["names"] = names
    return [out]


def implicit_prompt(chosen: list, rejected: list, err) -> tuple[list, list, list]:
    """``(prompt, chosen, rejected)`` of a TRL pair given as two whole conversations: the prompt the messages
    both begin with, each completion what follows (TRL's ``extract_prompt``). A pair that shares no leading
    message, or one whose conversation is the other's start (a completion would be empty), is refused by
    ``err(field, problem)``."""
    n = 0
    while n < min(len(chosen), len(rejected)) and _same_message(chosen[n], rejected[n]):
        n += 1
    if n == 0:
        raise err("chosen", "shares no leading message with 'rejected': give the pair's 'prompt'")
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if n == len(messages):
            raise err(key, f"is the start of the other conversation: nothing of its own after the {n} shared messages")
    return chosen[:n], chosen[n:], rejected[n:]


def _same_message(a, b) -> bool:
    """Whether two messages are one, a null field as an absent one (Parquet gives a message every field of its
    column's struct, null where that message has none, and two columns may have other structs)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: v for k, v in a.items() if v is not None} == {k: v for k, v in b.items() if v is not None}
    return a == b


def records_to_rows(
    records: Iterable[tuple[int, dict]],
    tokenizer,
    *,
    file: str,
    row_label: str,
    source: str | None = None,
    add_eos: bool = True,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    reward_field: str = "reward",
) -> Iterator[dict]:
    """Buffer rows (without ``row_id``) from ``(line or row number, record)`` pairs; see the module doc.
    ``add_eos`` applies to string completions (a chat completion ends with the template's end of turn)."""
    fields = {"prompt": prompt_field, "completion": completion_field, "reward": reward_field}
    for name, value in fields.items():
        if not isinstance(value, str) or not value:
            raise ValueError(f"--option {name}_field: expected a field name, got {value!r}")
    named = [f"{name}_field" for name, value in fields.items() if list(fields.values()).count(value) > 1]
    if named:  # completion_field=prompt read every prompt as its own completion
        raise ValueError(f"--option {' and '.join(named)} name the same input field {fields[named[0][:-6]]!r}")
    default_source = Path(file).name
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError(f"{file}: the tokenizer has no eos token; pass add_eos=False")
    group_id = GroupIds()  # group_key -> consecutive group id, by first appearance
    batch: list[tuple[int, dict]] = []
    where = {"file": file, "row_label": row_label, "eos": eos if add_eos else None}

    def flush(batch):
        texts = [r for _, r in batch if not is_chat(r)]
        prompts = completions = []
        if texts:
            prompts = tokenizer([r["prompt"] for r in texts], add_special_tokens=False)["input_ids"]
            completions = tokenizer([r["completion"] for r in texts], add_special_tokens=False)["input_ids"]
        text_ids = zip(prompts, completions)
        for n, rec in batch:
            ids = None if is_chat(rec) else next(text_ids)
            try:
                encoded = encode_record(rec, tokenizer, row=n, ids=ids, **where)
            except RowError as e:
                raise RowError(file, n, _named(e.field, rec["names"]), e.problem, row_label=row_label) from None
            key = group_key(rec)
            yield {
                "source": source or rec["source"] or default_source,
                "group_id": group_id(key),
                **encoded,
                **text_columns(
                    rec["prompt"],
                    rec["completion"],
                    reward=rec.get("reward"),
                    turn_rewards=rec.get("turn_rewards"),
                    extra=rec["extra"],
                ),
                INPUT_KEY: input_location(  # (per-turn rewards: an error in them names that field)
                    file,
                    n,
                    row_label=row_label,
                    fields={
                        "rewards": "turn_rewards" if rec.get("turn_rewards") is not None else rec["names"]["reward"]
                    },
                    group=key,
                ),
            }

    try:
        for n, rec in records:
            for c in canonical_records(
                rec, fields=fields, file=file, row=n, row_label=row_label, source_given=bool(source)
            ):
                check_record(c, file=file, row=n, row_label=row_label, names=c["names"])
                batch.append((n, c))
            if len(batch) >= _BATCH:
                ready, batch = batch, []
                yield from flush(ready)
    except ValueError:  # a bad record or line: the batch before it first, so an error in it is named first
        ready, batch = batch, []
        yield from flush(ready)
        raise
    if batch:
        yield from flush(batch)


def _require_file(path, kind: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such {kind}")
    return path


@dataclass(frozen=True)
class FileReader:
    """The reader of one generic input kind. Called, the buffer rows of the input ``path`` (see the module doc;
    ``*_field`` name the fields holding the prompt, completion and reward; ``records``: the input's ``(line or
    row, record)`` pairs when read already, a parallel build giving each worker a chunk of them); errors name
    the input and the line or row. :meth:`records` gives those pairs. The input must exist (checked at the
    call, not lazily) unless its ``records`` are given."""

    kind: str  # what the input is: "file" or "folder"
    row_label: str  # what its records are counted in: "line" (1-based) or "row" (0-based)
    all_records: Callable[[Path], Iterator[tuple[int, dict]]]  # every (line or row, record) of an existing input

    def records(self, path) -> Iterator[tuple[int, dict]]:
        """``(line or row, record)`` of the input, which must exist."""
        return self.all_records(_require_file(path, self.kind))

    def __call__(
        self,
        path,
        tokenizer,
        *,
        source: str | None = None,
        add_eos: bool = True,
        prompt_field: str = "prompt",
        completion_field: str = "completion",
        reward_field: str = "reward",
        records: Iterable[tuple[int, dict]] | None = None,
    ) -> Iterator[dict]:
        if records is None:
            path = _require_file(path, self.kind)
            records = self.all_records(path)
        else:  # (read already by the caller: a worker of a parallel build may not see a pipe such as /dev/fd/63)
            path = Path(path)
        fields = {"prompt_field": prompt_field, "completion_field": completion_field, "reward_field": reward_field}
        return records_to_rows(
            records, tokenizer, file=str(path), row_label=self.row_label, source=source, add_eos=add_eos, **fields
        )


def _refuse_pipe(path: Path) -> None:
    """Refuse a pipe or socket (``<(cat rows.parquet)``, a FIFO): Parquet's metadata sits at the end of the file,
    which is read by seeking (pyarrow's own message was 'lseek failed')."""
    if stat.S_ISFIFO(mode := path.stat().st_mode) or stat.S_ISSOCK(mode):
        raise ValueError(f"{path}: Parquet is read by seeking; give a file, not a pipe")


def _parquet_records(path: Path) -> Iterator[tuple[int, dict]]:
    _refuse_pipe(path)
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


def _check_saved_dataset(path: Path) -> None:
    """Refuse a ``save_to_disk`` folder whose ``state.json`` data files or ``dataset_dict.json`` splits name
    anything but a file or folder inside it: ``datasets.load_from_disk`` joins them unchecked, so a folder
    passed on could make the build read files elsewhere."""
    for name, key in (("state.json", "_data_files"), ("dataset_dict.json", "splits")):
        meta = path / name
        if not meta.is_file():
            continue
        try:
            entries = json.loads(meta.read_text(encoding="utf-8")).get(key, [])
        except (ValueError, RecursionError, AttributeError) as e:  # (JSONDecodeError, UnicodeDecodeError: ValueErrors)
            raise ValueError(f"{meta}: not a JSON object ({e})") from None
        entries = entries if isinstance(entries, list) else [entries]
        names = [e.get("filename") if isinstance(e, dict) else e for e in entries]
        folder = path.resolve()
        for n in names:
            if not isinstance(n, str) or not n or Path(n).is_absolute() or (folder / n).resolve().parent != folder:
                raise ValueError(f"{meta}: field {key!r}: {n!r} is not a name inside {path}")


def _no_data_files(path: Path) -> bool:
    """Whether a ``save_to_disk`` folder's ``state.json`` lists no data file (how datasets saves zero rows)."""
    state = path / "state.json"
    return state.is_file() and json.loads(state.read_text(encoding="utf-8")).get("_data_files") == []


def _load_saved(path: Path):
    """``datasets.load_from_disk(path)``; a data file that is damaged or missing is named with the folder
    (pyarrow's own message names neither: "Expected to read 680 metadata bytes, but only read 292")."""
    import datasets

    try:
        return datasets.load_from_disk(str(path))
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable saved dataset ({type(e).__name__}: {e})") from None


def _datasets_records(path: Path) -> Iterator[tuple[int, dict]]:
    import datasets  # heavy: only the datasets format needs it

    if not Path(path).is_dir():  # (datasets' own message calls a file a directory)
        raise ValueError(
            f"{path}: not a folder; 'build datasets' reads a folder written by datasets' save_to_disk "
            "(a JSONL or Parquet file: build jsonl or build parquet)"
        )
    if not any((path / name).is_file() for name in ("state.json", "dataset_dict.json")):
        raise ValueError(
            f"{path}: not a saved dataset (no state.json or dataset_dict.json); 'build datasets' reads a folder "
            "written by datasets' save_to_disk or shiq-data export --format hf"
        )
    _check_saved_dataset(path)
    if (path / "dataset_dict.json").is_file():  # refused before loading: a split's state.json is not checked here
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits") or ["SPLIT"]
        splits = splits if isinstance(splits, list) else [splits]
        raise ValueError(
            f"{path}: a DatasetDict with splits {splits}; pass one split's folder, e.g. {path / splits[0]}"
        )
    if _no_data_files(path):
        return  # an empty dataset (ds.select([]).save_to_disk): datasets' own load fails on it with an IndexError
    ds = _load_saved(path)
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


read_jsonl = FileReader("file", "line", iter_jsonl)  # a JSONL file, one record per line, blank lines skipped
read_parquet = FileReader("file", "row", _parquet_records)  # a Parquet file (columns prompt, completion, reward...)
read_datasets = FileReader("folder", "row", _datasets_records)  # a folder written by datasets.Dataset.save_to_disk
jsonl_records, parquet_records, datasets_records = read_jsonl.records, read_parquet.records, read_datasets.records


def encode_kept(row: dict, tokenizer, *, eos: int | None, file, row_index: int, row_label: str = "row") -> dict:
    """``tokens``, ``action_mask``, ``rewards`` and ``prompt_len`` of a buffer row's text columns with
    ``tokenizer``, as the readers encode them (:func:`encode_record`; ``eos`` ends a string completion).
    Errors name ``file``, the row and the column."""
    for name in ("prompt", "completion"):
        if row.get(name) is None:
            raise RowError(file, row_index, name, "null: the row keeps no text to tokenise", row_label=row_label)
    record = {
        "prompt": decode_text(row["prompt"]),
        "completion": decode_text(row["completion"]),
        "reward": row.get("reward"),
        "turn_rewards": row.get("turn_rewards"),
    }
    if not is_chat(record):
        if isinstance(record["prompt"], list):
            raise RowError(
                file, row_index, "completion", "a string completion after a message-list prompt", row_label=row_label
            )
        record["reward"] = record["reward"] or 0.0
    # what build refuses is refused here too (an empty completion would be its end-of-text token alone, a reward
    # beside turn rewards one of them dropped); a conversation may have no reward, as export writes it
    check_record({**record, "optional_reward": True}, file=str(file), row=row_index, row_label=row_label)
    return encode_record(record, tokenizer, file=str(file), row=row_index, row_label=row_label, eos=eos)
