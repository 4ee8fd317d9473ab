"""The replay buffer's row schema and the checks every row must pass.

One row is one trajectory (a prompt and the tokens that followed it):

============================  ===================  ==============================================
column                        Arrow type           meaning
============================  ===================  ==============================================
``row_id``                    string               stable, unique within the buffer
``source``                    string               where the row came from (file, format, run)
``group_id``                  int64                completions of one prompt share it
``prompt_len``                int32                number of leading prompt tokens
``tokens``                    list<int32>          token ids, ``[T]``
``action_mask``               list<bool>           True on tokens the policy chose, ``[T]``
``rewards``                   list<float32>        nonzero only on action tokens, ``[T]``
``prompt``                    large_string         text columns (below), nullable
``completion``                large_string         nullable
``reward``                    float64              nullable
``turn_rewards``              list<float64>        nullable (and so are its items)
``extra``                     large_string         nullable
``ref_chosen_logits``         list<float32>        optional, SHIQ_MATH §2 ``c_ref``, ``[T]``
``ref_logz``                  list<float32>        optional, SHIQ_MATH §2 ``z_ref``, ``[T]``
============================  ===================  ==============================================

Reference statistics are aligned like :func:`shiq_train.stats.causal_lm_stats`: position ``t`` holds
the statistics of token ``t`` given tokens ``< t``; position 0, which nothing predicts, is 0. For the
same reason token 0 can never be an action: every row has ``1 <= prompt_len < T``.

Text columns (schema version 2; a buffer built with ``--no-text`` and every version-1 buffer has
none, and reading them gives nulls). They keep what the input said, so a buffer can be looked at,
filtered, re-tokenised and exported:

- ``prompt``, ``completion``: the text as given, a string itself, or for a list of chat messages
  its JSON text (``json.dumps(messages, ensure_ascii=False)``). A string that would read back as
  something else (the JSON text of a non-empty list of ``{"role", "content", ...}`` objects, or the
  JSON string literal of such a string) is kept as its JSON string literal, which reads back as the
  string (:func:`shiq_data.readers.encode.text_of`, :func:`~shiq_data.readers.encode.decode_text`).
  Buffers written before kept such a string as itself, and read it back as messages. Conversations (hh, multiturn, the binarized
  UltraFeedback form) keep the messages before the first action turn in ``prompt`` and the rest,
  from the first action turn on, in ``completion``: the completion's assistant turns are exactly
  the row's action turns.
- ``reward``: the scalar reward as given (null with per-turn rewards, or none at all).
- ``turn_rewards``: the per-turn rewards as given, one per action turn (items null for a turn
  without one), else null.
- ``extra``: the JSON object text of the input record's other fields (tags, scores, ...), null if none.

The tokens are a function of the text columns and the tokenizer
(:func:`shiq_data.readers.generic.encode_kept`): a string completion gives prompt ids + completion
ids + eos; a message-list completion goes through the chat template after the prompt (one user
message for a string), its assistant turns the actions.
"""

from __future__ import annotations

import hashlib
import json
import math
from decimal import Decimal
from numbers import Integral, Real

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shiq_data.io import DuplicateKey, RowError, lone_surrogate, no_duplicate_keys, type_name

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no text columns (they read as null)

BASE_FIELDS = ("row_id", "source", "group_id", "prompt_len", "tokens", "action_mask", "rewards")
TEXT_FIELDS = ("prompt", "completion", "reward", "turn_rewards", "extra")
REF_FIELDS = ("ref_chosen_logits", "ref_logz")
LIST_FIELDS = ("tokens", "action_mask", "rewards")
TEXT_TYPES = {
    "prompt": pa.large_string(),
    "completion": pa.large_string(),
    "reward": pa.float64(),
    "turn_rewards": pa.list_(pa.float64()),
    "extra": pa.large_string(),
}


def text_fields() -> list[pa.Field]:
    """The five nullable text columns, in their schema order."""
    return [pa.field(name, TEXT_TYPES[name], nullable=True) for name in TEXT_FIELDS]


def arrow_schema(with_ref: bool, text: bool = False) -> pa.Schema:
    """The Arrow schema of a buffer shard: the base columns, the text columns when ``text``, then the two
    reference-statistics columns when ``with_ref``."""
    fields = [
        pa.field("row_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("group_id", pa.int64(), nullable=False),
        pa.field("prompt_len", pa.int32(), nullable=False),
        pa.field("tokens", pa.list_(pa.int32()), nullable=False),
        pa.field("action_mask", pa.list_(pa.bool_()), nullable=False),
        pa.field("rewards", pa.list_(pa.float32()), nullable=False),
    ]
    if text:
        fields += text_fields()
    if with_ref:
        fields += [pa.field(name, pa.list_(pa.float32()), nullable=False) for name in REF_FIELDS]
    return pa.schema(fields, metadata={"shiq_schema_version": str(SCHEMA_VERSION)})


INPUT_KEY = "_input"  # private row key: where in the input a reader's row came from (never written)
CHECKED_KEY = "_checked"  # private row key: the vocabulary size check_row passed the row for (never written)
# the largest group id a buffer holds: int64, and the manifest's next_group_id (one more) must be too
GROUP_ID_MAX = 2**63 - 2


def input_location(file, row: int, *, row_label: str = "line", fields: dict | None = None, group=None) -> dict:
    """The value a reader puts under :data:`INPUT_KEY` on a row: the input ``file``, its ``row`` (a line
    number, or a row number with ``row_label="row"``) and ``fields``, buffer column -> input field that
    holds it (e.g. ``{"rewards": "reward"}``). The buffer pops it and names it in row errors.
    ``group``: what makes the row's group in the whole input (a string, an integer or a tuple of them, e.g.
    the prompt text): the reader numbers groups in order of first appearance of this key (:class:`GroupIds`),
    and so does a parallel build (:mod:`shiq_data.readers.parallel`), which reads the input in chunks."""
    return {"file": str(file), "row": row, "row_label": row_label, "fields": dict(fields or {}), "group": group}


def group_digest(key) -> bytes:
    """The 16-byte BLAKE2b digest of a group key (a string, an integer or a tuple of them, e.g. the prompt
    text): :class:`GroupIds` keeps it instead of the key, so what a reader holds per distinct group does
    not grow with the prompt's length. ``repr`` of such a key is the same in every process and run and
    differs between different keys. Two different keys share a digest with probability about
    ``n**2 / 2**129`` among ``n`` distinct keys (below 1e-20 for a billion groups), far below the chance
    of a hardware error, so a build numbers its groups exactly as by the keys themselves."""
    return hashlib.blake2b(repr(key).encode(), digest_size=16).digest()


class GroupIds:
    """Group ids ``0, 1, ...`` in order of first appearance of their key (:func:`input_location`'s
    ``group``), holding a fixed amount per distinct group (its :func:`group_digest`). Called with a
    key, its group id."""

    def __init__(self):
        self.ids: dict[bytes, int] = {}

    def __call__(self, key) -> int:
        return self.ids.setdefault(group_digest(key), len(self.ids))


def at_input(error: RowError, location: dict, row_index: int) -> RowError:
    """``error`` (a :func:`check_row` error about output row ``row_index``) named at its input
    ``location`` (:func:`input_location`): the file, line or row, and the input field when known."""
    field = location["fields"].get(error.field, error.field)
    column = f", column '{error.field}'" if field != error.field else ""
    return RowError(
        location["file"],
        location["row"],
        field,
        f"{error.problem} (output row {row_index}{column})",
        row_label=location["row_label"],
    )


def _is_int(x) -> bool:
    if type(x) is int:  # the usual case, answered without the abstract-class check below
        return True
    return isinstance(x, (Integral, np.integer)) and not isinstance(x, (bool, np.bool_))


def _as_array(row: dict, name: str, kind: str, err) -> np.ndarray:
    """The list field ``name`` as a 1-D numpy array of ``kind`` ('i' ints, 'b' bools, 'f' floats)."""
    value = row[name]
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
        raise err(name, f"must be a list, got {type_name(value)}")
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):  # numpy's own words for a ragged list ([1, [2, 3]]) name no row or field
        raise err(name, "must be a flat list of numbers, got nested lists of different lengths") from None
    if arr.ndim != 1:
        raise err(name, f"must be a flat list, got shape {arr.shape}")
    if arr.size == 0:
        return arr
    ok = {"i": arr.dtype.kind in "iu", "b": arr.dtype.kind == "b", "f": arr.dtype.kind in "iuf"}[kind]
    if not ok:
        want = {"i": "integers", "b": "booleans", "f": "numbers"}[kind]
        raise err(name, f"must hold {want}, got dtype {arr.dtype}")
    return arr


def _float32_values(values: np.ndarray, field: str, what: str, err) -> np.ndarray:
    """``values`` as float64, once each is finite and within float32's range (the column's storage: a larger
    one would read back as inf); else ``err(field, ...)`` naming the first that is not and its position."""
    vf = values.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(vf) | (np.abs(vf) > FLOAT32_MAX))
    if bad.size:
        k = int(bad[0])
        if not np.isfinite(vf[k]):
            raise err(field, f"non-finite {what} {vf[k]} at position {k}")
        raise err(field, f"{what} {vf[k]} at position {k} does not fit in float32")
    return vf


def check_row(row: dict, *, vocab_size: int | None, file: str, row_index: int) -> None:
    """Raise :class:`RowError` naming ``file``, ``row_index`` and the field if ``row`` is not a valid buffer row.

    Rejects: a missing field; wrong types; ``tokens``/``action_mask``/``rewards`` (and the reference
    columns, when either is present) of different lengths; a token id outside ``[0, vocab_size)``;
    ``prompt_len`` outside ``[1, T)``; an action token inside the prompt; no action token; a
    non-finite reward or a nonzero reward on a non-action token; non-finite reference statistics or a
    nonzero one at position 0; a text column (when present) of the wrong type, a non-finite ``reward``
    or turn reward, or an ``extra`` that is not the JSON text of an object; a string that is not Unicode
    text (a lone surrogate).
    """

    def err(field, problem):
        return RowError(file, row_index, field, problem)

    if not isinstance(row, dict):
        raise err("*", f"a row must be a dict, got {type_name(row)}")
    for name in BASE_FIELDS:
        if name not in row:
            raise err(name, "missing")
    present_ref = [n for n in REF_FIELDS if n in row]
    if len(present_ref) == 1:
        missing = next(n for n in REF_FIELDS if n not in row)
        raise err(missing, f"missing (the row has {present_ref[0]}; both reference columns go together)")
    for name in ("row_id", "source"):
        if not isinstance(row[name], str):
            raise err(name, f"must be a string, got {type_name(row[name])}")
        _check_unicode(row[name], name, err)
    if not row["row_id"]:
        raise err("row_id", "must not be empty")
    for name in ("group_id", "prompt_len"):
        if not _is_int(row[name]):
            raise err(name, f"must be an integer, got {type_name(row[name])}")
    if row["group_id"] < 0:
        raise err("group_id", f"must be >= 0, got {row['group_id']}")
    if row["group_id"] > GROUP_ID_MAX:
        raise err(
            "group_id", f"must be at most 2**63 - 2 (int64, and one more numbers the next group), got {row['group_id']}"
        )

    tokens = _as_array(row, "tokens", "i", err)
    mask = _as_array(row, "action_mask", "b", err)
    rewards = _as_array(row, "rewards", "f", err)
    refs = {n: _as_array(row, n, "f", err) for n in present_ref}
    n = len(tokens)
    for name, arr in [("action_mask", mask), ("rewards", rewards), *refs.items()]:
        if len(arr) != n:
            raise err(name, f"length {len(arr)} differs from tokens' length {n}")
    top = int(tokens.max()) if n else 0
    if n and (int(tokens.min()) < 0 or (vocab_size is not None and top >= vocab_size)):
        bad = int(np.flatnonzero((tokens < 0) | (tokens >= (vocab_size or INT64_MAX)))[0])
        raise err("tokens", f"token id {int(tokens[bad])} at position {bad} is outside [0, {vocab_size})")
    if n and top > INT32_MAX:
        raise err("tokens", "token ids must fit in int32")
    p = int(row["prompt_len"])
    if not 1 <= p < max(n, 1):
        raise err("prompt_len", f"{p} is outside [1, {n}) (at least one prompt token and one completion token)")
    if mask.size and mask[:p].any():
        raise err(
            "action_mask",
            f"action token at position {int(np.flatnonzero(mask[:p])[0])}, inside the prompt (prompt_len {p})",
        )
    if not mask.size or not mask.any():
        raise err("action_mask", "no action token (empty completion)")
    if rewards.size:
        rf = _float32_values(rewards, "rewards", "reward", err)
        off = (rf != 0) & ~mask
        if off.any():
            bad = int(np.flatnonzero(off)[0])
            raise err("rewards", f"nonzero reward {rf[bad]} at position {bad}, which is not an action token")
    for name, arr in refs.items():
        af = _float32_values(arr, name, "value", err)
        if af[0] != 0:
            raise err(name, f"position 0 must be 0 (nothing predicts the first token), got {af[0]}")
    _check_text(row, err)


def _check_unicode(text: str, field: str, err) -> None:
    """Raise ``err(field, problem)`` if ``text`` cannot be encoded as UTF-8 (it holds a lone surrogate)."""
    at = lone_surrogate(text)
    if at is not None:
        raise err(field, f"not Unicode text (a lone surrogate {text[at]!r} at character {at})")


def _check_text(row: dict, err) -> None:
    """Raise ``err(field, problem)`` if a text column present in ``row`` has the wrong type or value."""
    for name in ("prompt", "completion", "extra"):
        value = row.get(name)
        if value is not None and not isinstance(value, str):
            raise err(name, f"must be a string or null, got {type_name(value)}")
        if value is not None:
            _check_unicode(value, name, err)
    reward = row.get("reward")
    if reward is not None and not is_finite_number(reward):
        raise err("reward", f"must be a finite number or null, got {str(reward)[:40]}")
    turns = row.get("turn_rewards")
    if turns is not None:
        if isinstance(turns, (str, bytes, dict)) or not hasattr(turns, "__iter__"):
            raise err("turn_rewards", f"must be a list or null, got {type_name(turns)}")
        bad = next((i for i, r in enumerate(turns) if r is not None and not is_finite_number(r)), None)
        if bad is not None:
            raise err("turn_rewards", f"item {bad} must be a finite number or null, got {str(turns[bad])[:40]}")
    extra = row.get("extra")
    if extra is not None and (problem := extra_problem(extra)) is not None:
        raise err(extra_field(extra), problem)


def extra_problem(extra: str) -> str | None:
    """What is wrong with an ``extra`` text (not JSON, what :func:`parse_extra` refuses, not an object), or
    None: the one judgement of ``validate`` and of the curation verbs, which copy ``extra`` unparsed."""
    try:
        parsed = parse_extra(extra)
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg})"
    except ValueError as e:
        return str(e)
    if not isinstance(parsed, dict):
        return f"must be the JSON text of an object, got {type_name(parsed)}"
    return None


def extra_field(extra: str) -> str:
    """The field an error of the ``extra`` text names: ``extra.KEY`` for the first key of its object whose value
    holds NaN or Infinity (an input record's own field, kept in ``extra``), else ``extra``."""

    def holds(value) -> bool:
        if isinstance(value, float):
            return not math.isfinite(value)
        values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        return any(holds(v) for v in values)

    try:
        parsed = json.loads(extra)  # (NaN, Infinity and 1e999 read as floats here)
        key = next((k for k, v in parsed.items() if holds(v)), None) if isinstance(parsed, dict) else None
    except (ValueError, RecursionError):
        key = None
    return "extra" if key is None else f"extra.{key}"


class _NonFinite(ValueError):
    pass


def _no_constant(name: str):
    raise _NonFinite(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 written as a number: read as inf, written back as Infinity
        raise _NonFinite("Infinity" if value > 0 else "-Infinity")
    return value


def parse_extra(text: str):
    """``json.loads`` of an ``extra`` text, refusing ``NaN``/``Infinity`` (what Python's JSON writes for a
    number out of float range, such as ``1e999``, and what no other JSON reader accepts) with a
    ``ValueError`` saying so, and so a key given twice in one object (JSON keeps the last, silently); nesting too deep for Python is a ``ValueError`` too (a ``RecursionError`` names no
    file, row or field where the caller catches ``ValueError`` to name them)."""
    try:
        return json.loads(
            text, parse_constant=_no_constant, parse_float=_finite_float, object_pairs_hook=no_duplicate_keys
        )
    except DuplicateKey as e:
        raise ValueError(f"key {e.key!r} given twice in one JSON object (which would win is a guess)") from None
    except _NonFinite as e:
        raise ValueError(non_finite_json(e.args[0])) from None
    except RecursionError:
        raise ValueError("not valid JSON (nested too deep)") from None


def non_finite_json(name: str) -> str:
    why = " (a number beyond float range, such as 1e999, reads as Infinity)" if "Infinity" in name else ""
    return f"holds {name}, which standard JSON cannot hold{why}"


def row_has_ref(row: dict) -> bool:
    """True if the row carries the reference-statistics columns."""
    return all(n in row for n in REF_FIELDS)


# the largest magnitude a result file's number may have (a reward, KL, β): sums and products of such values
# stay finite, where at 1e308 a mean or β·KL overflowed to inf
VALUE_MAX = 1e100


def is_bounded_number(x) -> bool:
    """:func:`is_finite_number` within ``[-VALUE_MAX, VALUE_MAX]``."""
    return is_finite_number(x) and abs(x) <= VALUE_MAX


FLOAT32_MAX = float(np.finfo(np.float32).max)  # rewards are stored as float32
INT32_MAX = int(np.iinfo(np.int32).max)  # token ids are stored as int32
INT64_MAX = int(np.iinfo(np.int64).max)


def fits_float32(x) -> bool:
    """A finite number (:func:`is_finite_number`) that float32, the rewards' storage, holds."""
    return is_finite_number(x) and abs(float(x)) <= FLOAT32_MAX


def is_finite_number(x) -> bool:
    """A real, finite number (bools excluded); a ``Decimal`` too (a decimal Parquet or SQL column's value)."""
    if not is_number(x):
        return False
    try:
        return math.isfinite(x)
    except (OverflowError, ValueError):  # an integer beyond the float range; a signalling-NaN Decimal
        return False


def is_number(x) -> bool:
    """A real number or a ``Decimal`` (which ``numbers`` does not count as Real), not a bool."""
    if type(x) in (float, int):  # the usual case, answered without the abstract-class checks below
        return True
    return isinstance(x, (Real, Decimal, np.floating, np.integer)) and not isinstance(x, (bool, np.bool_))


# ----------------------------------------------------------------------------------------------
# rows of a shard, checked as flat Arrow columns (what training, the curation verbs, validate, export and
# ref-stats read)


class ListView:
    """Zero-copy numpy views of one list<…> or large_list<…> column chunk: offsets and flat values (or a bitmap
    for bools)."""

    def __init__(self, arr: pa.ListArray):
        if arr.null_count:
            raise ValueError("list columns must not hold nulls")
        width = np.int64 if pa.types.is_large_list(arr.type) else np.int32  # (a large_list's offsets are 64-bit)
        self.offsets = np.frombuffer(arr.buffers()[1], dtype=width)[arr.offset : arr.offset + len(arr) + 1]
        values = arr.values
        self.is_bool = pa.types.is_boolean(values.type)
        if self.is_bool:
            self.bits = np.frombuffer(values.buffers()[1], dtype=np.uint8)
            self.bit_offset = values.offset
        else:
            self.values = values.to_numpy(zero_copy_only=True)

    def get(self, i: int) -> np.ndarray:
        """The ``i``-th list as a numpy array (a view for numbers, a small unpacked copy for bools)."""
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        if not self.is_bool:
            return self.values[s:e]
        a, b = self.bit_offset + s, self.bit_offset + e
        unpacked = np.unpackbits(self.bits[a >> 3 : (b + 7) >> 3], bitorder="little")
        return unpacked[a & 7 : (a & 7) + (e - s)].astype(bool)


def refuse_nulls(columns: dict[str, pa.Array], shard, first_row: int = 0) -> None:
    """Refuse, naming the shard, row and field, a null in ``columns`` (a row's value, or an item of a list
    column's row): no writer of a buffer stores one, and the zero-copy reads of the sampler and ``ref-stats``
    would meet it as pyarrow's own error, or read the bit under a null action flag as the flag."""
    for name, arr in columns.items():
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        if arr.null_count:
            row = int(pc.index(arr.is_null(), True).as_py())
            raise ValueError(
                f"{shard}: row {first_row + row}: field {name!r}: null (shiq-data validate lists every bad row)"
            )
        if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
            items = arr.flatten()
            if items.null_count:
                at = int(pc.index(items.is_null(), True).as_py())
                row = int(pc.list_parent_indices(arr)[at].as_py())
                start = int(arr.offsets[row].as_py()) - int(arr.offsets[0].as_py())
                raise ValueError(
                    f"{shard}: row {first_row + row}: field {name!r}: null at position {at - start} "
                    "(shiq-data validate lists every bad row)"
                )


def check_rows(columns: dict[str, pa.ListArray], vocab: int, shard, first_row: int = 0) -> None:
    """:func:`check_row_views` on Arrow list columns (``tokens`` and any other per-token ones) of one shard,
    after :func:`refuse_nulls`."""
    columns = {n: a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for n, a in columns.items()}
    refuse_nulls(columns, shard, first_row)
    check_row_views({n: ListView(a) for n, a in columns.items()}, vocab, shard, first_row)


def check_row_views(chunk: dict[str, ListView], vocab: int, shard, first_row: int) -> None:
    """Refuse, naming the shard, row and field, a row that training cannot use as it is: token ids outside
    ``[0, vocab)``, other per-token columns of another length than its tokens, fewer than 2 tokens, an
    action at position 0 (nothing predicts it) or none at all, a non-finite reward or reference statistic.
    Such a row comes from a shard edited after it was written, checksum included; the embedding lookup or the
    batch's copy would meet it as an opaque error, the loss as a NaN or a silently dropped row. Only what
    training reads is checked here (vectorised, per record batch); ``shiq-data validate`` checks every field
    of every row."""
    tokens = chunk["tokens"]
    n = np.diff(tokens.offsets)
    for name, view in chunk.items():
        if name != "tokens" and not np.array_equal(np.diff(view.offsets), n):
            r = int(np.flatnonzero(np.diff(view.offsets) != n)[0])
            raise ValueError(
                f"{shard}: row {first_row + r}: field {name!r}: {int(np.diff(view.offsets)[r])} values for "
                f"{int(n[r])} tokens (shiq-data validate lists every bad row)"
            )

    def refuse(bad: np.ndarray, field: str, problem: str):  # bad: [rows] bool, the first True is named
        raise ValueError(
            f"{shard}: row {first_row + int(np.flatnonzero(bad)[0])}: field {field!r}: {problem} "
            "(shiq-data validate lists every bad row)"
        )

    if (n < 2).any():
        refuse(n < 2, "tokens", "fewer than 2 tokens (at least one prompt token and one completion token)")
    if "action_mask" in chunk:
        m = chunk["action_mask"]
        lo, hi = m.bit_offset + int(m.offsets[0]), m.bit_offset + int(m.offsets[-1])
        bits = np.unpackbits(m.bits[lo >> 3 : (hi + 7) >> 3], bitorder="little")[lo & 7 : (lo & 7) + hi - lo]
        starts = m.offsets - m.offsets[0]
        if bits[starts[:-1]].any():  # every row has a first token (n >= 2 above)
            refuse(bits[starts[:-1]].astype(bool), "action_mask", "action token at position 0")
        actions = np.diff(np.concatenate([[0], np.cumsum(bits, dtype=np.int64)])[starts])
        if (actions == 0).any():
            refuse(actions == 0, "action_mask", "no action token (empty completion)")
    for name in ("rewards", *REF_FIELDS):  # (the reference statistics: what train.reference=precomputed reads)
        if name not in chunk:
            continue
        r = chunk[name]
        finite = np.isfinite(r.values[r.offsets[0] : r.offsets[-1]])
        if not finite.all():
            at = int(np.flatnonzero(~finite)[0]) + int(r.offsets[0])  # a flat index: its row is named
            refuse(np.arange(len(n)) == np.searchsorted(r.offsets, at, side="right") - 1, name, "non-finite")
    flat = tokens.values[tokens.offsets[0] : tokens.offsets[-1]]
    if flat.size and (flat.min() < 0 or flat.max() >= vocab):
        at = int(np.flatnonzero((flat < 0) | (flat >= vocab))[0]) + int(tokens.offsets[0])
        r = int(np.searchsorted(tokens.offsets, at, side="right")) - 1
        raise ValueError(
            f"{shard}: row {first_row + r}: field 'tokens': token id {int(tokens.values[at])} outside [0, {vocab}) "
            "of the buffer's tokenizer (shiq-data validate lists every bad row)"
        )


def check_shard(table: pa.Table, vocab: int, shard) -> None:
    """Refuse, naming the shard, row and field, a stored row that ``validate`` refuses (a shard edited together
    with its checksum), so that no curation verb copies it into a new buffer: a null anywhere in the stored
    columns, an empty ``row_id``, a negative ``group_id``, a ``prompt_len`` outside ``[1, tokens)``, an action
    inside the prompt, a nonzero reward off the actions, a reference statistic that is not finite or is nonzero
    at position 0, and what training refuses (:func:`check_rows`: per-token lengths, token ids outside the
    vocabulary, no action, a non-finite reward), and an ``extra`` text ``validate`` refuses
    (:func:`extra_problem`). Vectorised but for ``extra`` (each distinct text parsed once): a few passes over the
    shard's flat columns. The other text columns, and group ids against the manifest, are checked by
    :func:`clean_slice_counts`, which ``validate``, ``export`` and ``ref-stats`` run on top of this."""

    def refuse(row, field: str, problem: str):
        raise ValueError(f"{shard}: row {row}: field {field!r}: {problem} (shiq-data validate lists every bad row)")

    def first(bad: np.ndarray) -> int:  # [rows] or [tokens] bool: the first True
        return int(np.flatnonzero(bad)[0])

    lists = [*LIST_FIELDS, *(f for f in REF_FIELDS if f in table.schema.names)]
    for name in ("row_id", "source", "group_id", "prompt_len", *lists):
        col = table.column(name)
        if col.null_count:
            kind = {"row_id": "a string", "source": "a string"}.get(name, "a list" if name in lists else "an integer")
            refuse(first(pc.is_null(col).to_numpy(zero_copy_only=False)), name, f"must be {kind}, got null")
        if name in lists and (inner := pc.list_flatten(col)).null_count:
            at = first(pc.is_null(inner).to_numpy(zero_copy_only=False))
            refuse(
                first(np.cumsum(pc.list_value_length(col).to_numpy(zero_copy_only=False)) > at), name, "a null value"
            )
    if (empty := pc.equal(pc.utf8_length(table.column("row_id")), 0).to_numpy(zero_copy_only=False)).any():
        refuse(first(empty), "row_id", "empty")
    group = table.column("group_id").to_numpy()
    if (group < 0).any():
        refuse(r := first(group < 0), "group_id", f"must be >= 0, got {group[r]}")
    n = pc.list_value_length(table.column("tokens")).to_numpy(zero_copy_only=False).astype(np.int64)
    for name in lists[1:]:
        other = pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False)
        if (other != n).any():
            refuse(r := first(other != n), name, f"length {other[r]} differs from tokens' length {n[r]}")
    p = table.column("prompt_len").to_numpy().astype(np.int64)
    if (bad := (p < 1) | (p >= n)).any():
        r = first(bad)
        refuse(r, "prompt_len", f"{p[r]} is outside [1, {n[r]}) (at least one prompt token and one completion token)")
    check_rows({name: table.column(name) for name in lists}, vocab, shard)
    if "extra" in table.schema.names:  # copied as text: NaN, a non-object, bad JSON would reach the new buffer
        # each distinct text is judged once (rows mixed with replacement, or a few kinds of extra, repeat them);
        # the rows are gone through only to name the first one holding a bad text
        extra = table.column("extra")
        bad = {t: why for t in pc.unique(extra.drop_null()).to_pylist() if (why := extra_problem(t)) is not None}
        if bad:
            r, text = next((r, t) for r, t in enumerate(extra.to_pylist()) if t in bad)
            refuse(r, "extra", bad[text])
    row_of = np.repeat(np.arange(len(n)), n)  # [tokens] the row of each flat position, and its place in the row
    pos = np.arange(row_of.size) - np.repeat(np.cumsum(n) - n, n)
    mask = pc.list_flatten(table.column("action_mask")).to_numpy(zero_copy_only=False)
    flat = {name: pc.list_flatten(table.column(name)).to_numpy(zero_copy_only=False) for name in lists[2:]}

    def refuse_at(bad_flat: np.ndarray, field: str, problem):  # problem(position, value of field there)
        at = first(bad_flat)
        refuse(row_of[at], field, problem(int(pos[at]), flat.get(field, mask)[at]))

    if (inside := mask & (pos < p[row_of])).any():
        prompt = p[row_of[first(inside)]]
        refuse_at(
            inside, "action_mask", lambda t, _: f"action token at position {t}, inside the prompt (prompt_len {prompt})"
        )
    if (off := (flat["rewards"] != 0) & ~mask).any():
        refuse_at(off, "rewards", lambda t, v: f"nonzero reward {v} at position {t}, which is not an action token")
    for name in REF_FIELDS:
        if name in flat and (bad := ~np.isfinite(flat[name])).any():
            refuse_at(bad, name, lambda t, v: f"non-finite value {v} at position {t}")
        if name in flat and (bad := (pos == 0) & (flat[name] != 0)).any():
            refuse_at(bad, name, lambda t, v: f"position 0 must be 0 (nothing predicts the first token), got {v}")


def clean_slice_counts(piece: pa.Table, vocab: int, next_group_id: int) -> tuple[int, int] | None:
    """``(tokens, action tokens)`` of ``piece`` (rows of a shard of the buffer's schema) when every row passes
    :func:`check_row` and has a ``group_id`` below ``next_group_id`` (:func:`check_group_id`), checked
    on whole columns at once (:func:`check_shard`, then the rules it leaves out); None when a row may not, and the
    caller then checks the rows one by one with its own row checks, which name the first bad row and field. A row
    by row check of a million short rows took over a minute."""
    try:
        if piece.num_rows == 0:
            return 0, 0
        check_shard(piece, vocab, "")  # a ValueError (caught below) for a row it refuses
        names = piece.schema.names
        for name in ("row_id", "source", "prompt", "completion", "extra"):
            if name in names:
                piece.column(name).validate(full=True)  # UTF-8 (no lone surrogate)
        groups = piece.column("group_id").to_numpy()
        if groups.max() > GROUP_ID_MAX or groups.max() >= next_group_id:
            return None
        for name in ("reward", "turn_rewards"):  # null allowed, else finite
            if name in names:
                column = piece.column(name)
                values = pc.list_flatten(column) if pa.types.is_list(column.type) else column
                if not np.isfinite(values.drop_null().to_numpy()).all():
                    return None
        tokens = pc.sum(pc.list_value_length(piece.column("tokens"))).as_py()
        actions = pc.sum(pc.cast(pc.list_flatten(piece.column("action_mask")), pa.int64())).as_py()
        return int(tokens), int(actions or 0)
    except (pa.ArrowException, ValueError, TypeError, UnicodeError):  # anything unexpected: the row by row check
        return None


def check_group_id(row: dict, next_group_id: int, shard, i: int) -> None:
    """Refuse a checked ``row`` (row ``i`` of ``shard``) whose ``group_id`` is not below the manifest's
    ``next_group_id`` (the id an append gives its first new group, which would join it)."""
    if row["group_id"] >= next_group_id:
        raise ValueError(
            f"{shard}: row {i}: field 'group_id': {row['group_id']} >= the manifest's next_group_id {next_group_id}"
        )


def check_slice(piece: pa.Table, start: int, vocab: int, shard, next_group_id: int | None = None) -> tuple[int, int]:
    """Check every row of ``piece`` (rows ``start``, ``start + 1``, ... of ``shard``) as :func:`check_row` does,
    and, given the manifest's ``next_group_id``, its group id against it (:func:`check_group_id`), as ``validate``
    and ``export`` do (``ref-stats``' rewrite of a shard gives none); return its ``(tokens, action tokens)``. The
    rows are checked on whole columns (:func:`clean_slice_counts`); only a slice that may hold a bad row is
    checked row by row, which raises naming the first bad row and field."""
    counts = clean_slice_counts(piece, vocab, GROUP_ID_MAX + 1 if next_group_id is None else next_group_id)
    if counts is not None:  # every row passes: no row needs converting to Python
        return counts
    n_tokens = n_actions = 0
    for j, row in enumerate(piece.to_pylist()):
        check_row(row, vocab_size=vocab, file=str(shard), row_index=start + j)
        if next_group_id is not None:
            check_group_id(row, next_group_id, shard, start + j)
        n_tokens += len(row["tokens"])
        n_actions += sum(row["action_mask"])
    return n_tokens, n_actions
