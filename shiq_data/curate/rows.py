"""A buffer opened for curation: its shards with every stored column, each row's derived columns (what
``--where`` names; see :mod:`shiq_data.curate`) and its prompt and completion text.

Shards are read one at a time (memory-mapped), so a verb holds one shard's rows at a time; what it must
remember about every row goes to temporary tables on disk (:mod:`shiq_data.spill`), at most one bit per
row stays in memory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shiq_data.buffer import MANIFEST, open_buffer
from shiq_data.io import one_line
from shiq_data.readers.encode import given_text
from shiq_data.schema import REF_FIELDS, check_shard
from shiq_data.tokenizers import PIPELINE_FIELD, load_tokenizer, pipeline_mismatch

log = logging.getLogger(__name__)

# the text columns of schema version 2, when a shard has them
TEXT_FIELDS = ("prompt", "completion", "reward", "turn_rewards", "extra")
DERIVED = (
    "row_id",
    "source",
    "group_id",
    "tokens",
    "prompt_tokens",
    "completion_tokens",
    "reward",
    "has_ref",
    "prompt",
    "completion",
    "turn_rewards",
    "extra",
)
TEXT_COLUMNS = ("prompt", "completion")  # derived by decoding when the row has no text


def normalise(text: str) -> str:
    """``text`` for comparisons: Unicode NFKC, lower case, runs of white space as one space, no leading or
    trailing space."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def text_key(*parts: str) -> bytes:
    """A 16-byte hash of the normalised ``parts`` (:func:`normalise`), each after its length in bytes (a
    separator character could stand in the text itself: ``("a\\0", "b")`` and ``("a", "\\0b")`` are two keys)."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        b = normalise(p).encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    return h.digest()


@functools.lru_cache(maxsize=4)
def _load_tokenizer(name: str):
    """:func:`shiq_data.tokenizers.load_tokenizer`, once per process and name (the verbs only decode with it)."""
    return load_tokenizer(name)


def _flat(column) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(starts, lengths, flat values)`` of a list column (chunked or not) as numpy arrays."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(arr).to_numpy(zero_copy_only=False)
    starts = np.cumsum(lengths) - lengths
    return starts, lengths, flat


def _row_sums(column, dtype) -> tuple[np.ndarray, np.ndarray]:
    """``(lengths, per-row sums)`` of a list column, each row summed on its own (exact, no running sums)."""
    starts, lengths, flat = _flat(column)
    sums = np.zeros(len(lengths), dtype=dtype)
    full = lengths > 0
    if full.any():
        sums[full] = np.add.reduceat(flat.astype(dtype), starts[full])
    return lengths, sums


def _kind(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):  # one beyond int64 as a float (a column of numbers still); beyond that as text
        return "int" if -(2**63) <= value < 2**63 else "float" if abs(value) < 1e308 else "json"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return "json"


_ARROW_KIND = {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(), "str": pa.string(), "json": pa.string()}


def _extra_objects(table: pa.Table) -> list[dict]:
    """The ``extra`` column's JSON objects (``{}`` for a null or a non-object)."""
    if "extra" not in table.schema.names:
        return [{}] * table.num_rows
    out = []
    for text in table.column("extra").to_pylist():
        try:
            obj = json.loads(text) if text else {}
        except (ValueError, RecursionError):  # (JSONDecodeError; a number of 4,301 digits; nesting too deep)
            obj = {}
        out.append(obj if isinstance(obj, dict) else {})
    return out


class CurationSource:
    """The buffer at ``path`` (checksums verified), read shard by shard for the curation verbs."""

    def __init__(self, path):
        self.path = Path(path)
        self.buffer = open_buffer(self.path)
        data = (self.path / MANIFEST).read_bytes()
        if json.loads(data) != self.buffer.manifest:
            raise ValueError(f"{self.path / MANIFEST}: changed while it was read (an append is running?); try again")
        self.manifest_sha256 = hashlib.sha256(data).hexdigest()
        self.manifest = self.buffer.manifest
        self.keep_ref = self.buffer.has_ref_stats  # rows keep reference columns only when every shard has them
        self._tokenizer = None
        self._extra_kinds: dict[str, str] | None = None
        self._checked: set[int] = set()  # shards whose rows check_shard passed (a verb may read them twice)
        self.shard_path = None  # the file of the shard shards() last gave

    def __len__(self) -> int:
        return len(self.buffer)

    @property
    def fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    @property
    def pipeline_fingerprint(self) -> str | None:
        """The tokenizer's pipeline fingerprint, None for a buffer written before it was recorded."""
        return self.manifest["tokenizer"].get(PIPELINE_FIELD)

    def parent(self) -> dict:
        """This buffer as a ``parents`` entry: resolved path, sha256 of its manifest, rows, tokenizer fingerprint
        (and pipeline fingerprint, when the buffer records one)."""
        entry = {
            "path": str(self.path.resolve()),
            "manifest_sha256": self.manifest_sha256,
            "rows": len(self),
            "tokenizer_fingerprint": self.fingerprint,
        }
        if self.pipeline_fingerprint is not None:
            entry["tokenizer_pipeline_fingerprint"] = self.pipeline_fingerprint
        return entry

    @property
    def tokenizer(self):
        """The buffer's tokenizer (loaded on first use), checked against the manifest's fingerprint and its
        pipeline fingerprint (when the manifest records one)."""
        if self._tokenizer is None:
            name = self.manifest["tokenizer"].get("name", "")
            try:
                tok, info = _load_tokenizer(name)
            except (OSError, ValueError) as e:  # a missing folder, or one transformers cannot read
                raise ValueError(
                    f"{self.path / MANIFEST}: field 'tokenizer.name': the buffer's tokenizer {name!r} cannot be loaded "
                    f"({one_line(e, 160)})"
                ) from None
            if info["fingerprint"] != self.fingerprint:
                raise ValueError(
                    f"{self.path / MANIFEST}: tokenizer {name!r} loads with fingerprint {info['fingerprint'][:12]}…, "
                    f"the buffer records {self.fingerprint[:12]}…"
                )
            if pipeline_mismatch(self.manifest["tokenizer"], info):
                raise ValueError(
                    f"{self.path / MANIFEST}: field 'tokenizer.{PIPELINE_FIELD}': tokenizer {name!r} loads with "
                    f"pipeline fingerprint {info[PIPELINE_FIELD][:12]}…, the buffer records "
                    f"{self.pipeline_fingerprint[:12]}… (same vocabulary, another pipeline: it may split text differently)"
                )
            self._tokenizer = tok
        return self._tokenizer

    def shards(self) -> Iterator[pa.Table]:
        """Each shard with every stored column, checked against the manifest (:meth:`Buffer.checked_shards`) and
        its rows by :func:`check_shard` (once per shard); :attr:`shard_path` is its file meanwhile."""
        vocab = int(self.manifest["tokenizer"]["vocab_size"])
        for k, (path, table) in enumerate(zip(self.buffer.shard_paths, self.buffer.checked_shards())):
            if k not in self._checked:
                check_shard(table, vocab, path)
                self._checked.add(k)
            self.shard_path = path
            yield table

    def warn_of_shadowed_keys(self, columns: set[str]) -> None:
        """Warn when the ``extra`` objects of the first shard have a key named like one of ``columns`` (the
        derived columns a ``--where`` names, such as ``tokens``): the expression reads the column, not the
        input's field of that name, which the warning says how to reach. One shard is looked at, so the
        check costs little however large the buffer."""
        names = {c.lower() for c in columns if c.lower() in DERIVED}
        first = next(iter(self.shards()), None) if names else None  # (no shard read for an expression without)
        if first is None:
            return
        if shadowed := sorted({k for obj in _extra_objects(first) for k in obj if k.lower() in names}):
            log.warning(
                f"shiq-data: warning: {self.path}: extra keys {', '.join(map(repr, shadowed))} are named like columns of every row, "
                "which --where reads under those names: reach the keys with json_extract_string(extra, '$.KEY')"
            )

    def extra_kinds(self) -> dict[str, str]:
        """Top-level keys of the ``extra`` objects -> their column kind (bool, int, float, str, or json for
        mixed or nested values), over the whole buffer; keys named like a derived column, and keys that differ
        from another only in case (SQL names are case-insensitive: a warning names them), are left out."""
        if self._extra_kinds is None:
            seen: dict[str, set] = {}
            reading = self.shard_path  # (a verb's own pass may be on a shard: it must still name that one)
            for table in self.shards():
                for obj in _extra_objects(table):
                    for key, value in obj.items():
                        seen.setdefault(key, set()).add(_kind(value))
            self.shard_path = reading
            kinds = {}
            folded: dict[str, list[str]] = {}  # SQL names are case-insensitive: "Lang" and "lang" are one
            for key in seen:
                folded.setdefault(key.lower(), []).append(key)
            for same in (keys for keys in folded.values() if len(keys) > 1):
                log.warning(
                    f"shiq-data: warning: {self.path}: extra keys {', '.join(map(repr, sorted(same)))} differ only in case, which "
                    "--where cannot tell apart: they are left out of its columns"
                )
            for key, ks in seen.items():
                if key.lower() in DERIVED or len(folded[key.lower()]) > 1:
                    continue
                ks.discard(None)
                if len(ks) == 1:
                    kinds[key] = ks.pop()
                else:
                    kinds[key] = "str" if not ks else "float" if ks == {"int", "float"} else "json"
            self._extra_kinds = kinds
        return self._extra_kinds

    def view(self, table: pa.Table, *, text: bool = False, extra_keys: bool = True) -> pa.Table:
        """The derived columns (see :mod:`shiq_data.curate`) of a shard's rows; ``prompt`` and ``completion``
        only with ``text`` (they may need decoding), the top-level keys of ``extra`` only with ``extra_keys``
        (they are parsed from its JSON text)."""
        n = table.num_rows
        names = table.schema.names
        lengths, reward_sum = _row_sums(table.column("rewards"), np.float64)
        _, actions = _row_sums(table.column("action_mask"), np.int64)
        reward = pa.array(reward_sum, pa.float64())
        if "reward" in names:  # the scalar reward as given, where the row has one
            reward = pc.coalesce(pc.cast(table.column("reward").combine_chunks(), pa.float64()), reward)
        cols = {
            "row_id": table.column("row_id"),
            "source": table.column("source"),
            "group_id": table.column("group_id"),
            "tokens": pa.array(lengths, pa.int64()),
            "prompt_tokens": pc.cast(table.column("prompt_len"), pa.int64()),
            "completion_tokens": pa.array(actions, pa.int64()),
            "reward": reward,
            "has_ref": pa.array(np.full(n, all(f in names for f in REF_FIELDS)), pa.bool_()),
        }
        if text:
            prompts, completions = self.texts(table)
            cols["prompt"] = pa.array(prompts, pa.string())
            cols["completion"] = pa.array(completions, pa.string())
        for name, typ in (("turn_rewards", pa.list_(pa.float64())), ("extra", pa.string())):
            cols[name] = pc.cast(table.column(name), typ) if name in names else pa.nulls(n, typ)
        kinds = self.extra_kinds() if extra_keys else {}
        if kinds:
            objs = _extra_objects(table)
            for key, kind in kinds.items():
                values = [o.get(key) for o in objs]
                if kind == "json":
                    values = [None if v is None else json.dumps(v) for v in values]
                elif kind == "float":
                    values = [None if v is None else float(v) for v in values]
                cols[key] = pa.array(values, _ARROW_KIND[kind])
        return pa.table(cols)

    def texts(
        self, table: pa.Table, *, prompt: bool = True, completion: bool = True
    ) -> tuple[list[str | None], list[str | None]]:
        """Each row's prompt and completion: the text columns as given (:func:`given_text`; a chat-message
        list is JSON text),
        else the decoded prompt tokens and the decoded action tokens (special tokens left out). Without
        ``prompt`` (or ``completion``) that side is None for every row, neither read nor decoded (a verb
        comparing prompts only does not decode completions of thousands of tokens)."""
        n = table.num_rows
        names = table.schema.names

        def given(name: str, wanted: bool) -> list:
            if wanted and name in names:
                return [given_text(t) for t in table.column(name).to_pylist()]
            return [None] * n

        prompts, completions = given("prompt", prompt), given("completion", completion)
        todo_p = [i for i in range(n) if prompts[i] is None] if prompt else []
        todo_c = [i for i in range(n) if completions[i] is None] if completion else []
        if todo_p or todo_c:
            starts, lengths, tokens = _flat(table.column("tokens"))
            tok = self.tokenizer
            if todo_p:
                plen = table.column("prompt_len").to_numpy()
                p_ids = [tokens[starts[i] : starts[i] + plen[i]].tolist() for i in todo_p]
                for i, text in zip(todo_p, tok.batch_decode(p_ids, skip_special_tokens=True)):
                    prompts[i] = text
            if todo_c:
                _, _, mask = _flat(table.column("action_mask"))
                c_ids = []
                for i in todo_c:
                    s, e = starts[i], starts[i] + lengths[i]
                    c_ids.append(tokens[s:e][mask[s:e].astype(bool)].tolist())
                for i, text in zip(todo_c, tok.batch_decode(c_ids, skip_special_tokens=True)):
                    completions[i] = text
        return prompts, completions

    def take(self, table: pa.Table, indices) -> pa.Table:
        """Rows ``indices`` of a shard with every stored column (reference statistics dropped unless every shard
        of the buffer has them), as :func:`shiq_data.buffer.write_buffer` takes them."""
        if not self.keep_ref:
            table = table.drop_columns([f for f in REF_FIELDS if f in table.schema.names])
        return table.take(pa.array(np.asarray(indices, dtype=np.int64)))

    @property
    def ref_model(self) -> dict | None:
        return self.manifest.get("ref_model") if self.keep_ref else None
