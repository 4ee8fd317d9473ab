"""``shiq-data decontaminate``: drop the rows that share a run of words with an evaluation set.

Texts are compared as words: Unicode NFKC, case-folded, then the runs of letters, digits and underscores
with their combining marks (``\\w`` and category M: white space and punctuation only separate words), each character of a script written without spaces
(Chinese, Japanese, Thai...) a word of its own. A row is contaminated when its text (``by``: prompt, completion
or both, as :class:`~shiq_data.curate.rows.CurationSource` gives it; a stored chat-message list by its
messages' text) contains ``ngram`` consecutive words (default 13) that also stand consecutively in one message
of an evaluation text; a message shorter than ``ngram`` words counts whole, as one run of its own length, when
it has at least ``min_words`` words (default 8, or ``ngram`` when that is fewer). An evaluation text none of whose
messages counts is skipped (and counted): it would match common phrases.

The evaluation texts come from files (``--against``): JSON lines (one record a line: a string, chat messages,
or an object whose ``field``, default ``prompt``, holds a string, a message list or a list of them, as BFCL's
``question``), a JSON file holding a list of such records, a text file (``.txt``: one text a non-empty line),
any of them gzipped (``.gz``), or a buffer folder (its prompts, or its rows' text with ``--against-by``:
whatever ``by`` reads).

Each run of words is kept as a 64-bit hash: a polynomial over the words' own 64-bit hashes (BLAKE2b), so a
false match needs a 64-bit collision. The evaluation set is held in memory: 13 to 14 bytes a run (its hash, its
text's index and a table of 8 to 16 bits a run that rules out most of a row's runs without a search; a 100-word
message has 88 runs of 13 words) once sorted, about 30 while they are read and sorted,
the texts themselves included (200,000 texts of 50 words: 7.6 million runs, 424 MB at the peak against 172 MB
for a small set). The buffer is read one shard at a time, and a shard's rows' words a slice of rows at a time
(:data:`SLICE_BYTES` of text); only the dropped rows' list (with ``dropped``) grows with it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
import tempfile
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from shiq_data.buffer import MANIFEST, Buffer, refuse_inside_buffer
from shiq_data.cli_common import plural
from shiq_data.curate.output import refuse_existing, write_curated
from shiq_data.curate.rows import CurationSource
from shiq_data.io import (
    fsync_dir,
    json_loads,
    make_parents,
    open_binary,
    readable_lines,
    remove_created_dirs,
    sha256_files,
    type_name,
    utf8_lines,
)

BY = ("row", "prompt", "completion")
NGRAM = 13  # words in a run (13-gram overlap, the usual test of evaluation contamination)
MIN_WORDS = 8  # an evaluation text shorter than NGRAM counts whole from this many words
SLICE_BYTES = 4_000_000  # bytes of text of a shard's rows compared at once (their words take several times as much)
MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd: the polynomial hash of a run of word hashes, mod 2**64
# scripts written without spaces between words (Han, kana, Thai, Lao, Myanmar, Khmer): each character a word, as
# character n-grams are the usual unit for them (``\w+`` would make a whole clause one word, so that a 13-word run
# is 13 clauses, and most texts fall under --min-words)
UNSPACED = (
    "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3005-\u3007\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf"
    "\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
)


@functools.cache
def _word_pattern() -> re.Pattern:
    """Words: a character of :data:`UNSPACED`, or a ``\\w`` character and the run of ``\\w`` characters and
    combining marks after it (Unicode category M, which ``\\w`` leaves out: Devanagari's vowel signs and virama,
    Arabic's vowel marks, an accent NFKC has no precomposed letter for), so that a mark neither splits its word
    nor is dropped from it; a mark with no letter before it (at the start of a text, after a space) marks nothing
    and only separates, as punctuation. Built on first use (a pass over the code points, 0.1 s)."""
    unspaced = re.compile(f"[{UNSPACED}]")
    marks = [
        c
        for c in range(sys.maxunicode + 1)
        if unicodedata.category(chr(c)).startswith("M") and not unspaced.match(chr(c))
    ]

    def spans(cs: list[int]) -> str:
        out, start = [], cs[0]
        for prev, c in zip(cs, cs[1:] + [-1]):
            if c != prev + 1:
                out.append(f"\\U{start:08x}" + (f"-\\U{prev:08x}" if prev != start else ""))
                start = c
        return "".join(out)

    # a word's letters, then its marks each followed by letters: the same words as (letter or mark)*, as marks are
    # never \w, but the letters run in one fast repeat and the marks are tried only where the letters stop. A mark
    # beyond U+FFFF is looked up in a list of ranges (the BMP's in a table), so it is tried only at such a character.
    bmp, astral = spans([c for c in marks if c <= 0xFFFF]), spans([c for c in marks if c > 0xFFFF])
    letter = f"[^\\W{UNSPACED}]"
    mark = f"(?:[{bmp}]|(?=[\\U00010000-\\U0010ffff])[{astral}])"
    return re.compile(f"{letter}+(?:{mark}{letter}*)*|[{UNSPACED}]")


_ASCII_WORD = re.compile("[a-z0-9_]+")  # the words of an ASCII text (no mark, no UNSPACED character) once lowered


def words(text: str) -> list[str]:
    """The words of ``text`` as compared: NFKC, case-folded, runs of ``\\w`` characters with their combining
    marks (:func:`_word_pattern`), and each character of a script written without spaces (:data:`UNSPACED`:
    Chinese, Japanese, Thai...) a word of its own."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _ASCII_WORD.findall(text) if text.isascii() else _word_pattern().findall(text)


def message_parts(value) -> list[str]:
    """The texts of a string, a chat message (its ``content``), a content part (its ``text``) or a list of any
    of them, one a message; ``[]`` where there is none."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        inner = value.get("content", value.get("text"))
        return message_parts(inner) if inner is not None else []
    if isinstance(value, list):
        return [t for item in value for t in message_parts(item)]
    return []


def row_parts(text: str) -> list[str]:
    """A buffer row's text column as compared: a stored message list's (JSON text: a list of objects with a
    ``role``) messages, one each, else the text itself. Other JSON (a completion that is a JSON object,
    ``{"text": ..., "reason": ...}``) is compared whole: taking only its ``text`` or ``content`` would hide the
    rest of its words."""
    if text.startswith("["):
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
            parts = message_parts(value)
            if parts:
                return parts
    return [text]


def by_parts(by: str, prompt: str, completion: str) -> list[str]:
    """The texts (:func:`row_parts`) of a buffer row's prompt, completion or both (``by``)."""
    return (row_parts(prompt) if by != "completion" else []) + (row_parts(completion) if by != "prompt" else [])


class WordHashes:
    """64-bit hashes of words, remembered (a corpus repeats its words)."""

    def __init__(self):
        self.known: dict[str, int] = {}

    def __call__(self, ws: list[str]) -> np.ndarray:
        known = self.known
        # bounded (about 160 MB): a stream of distinct words (numbers, ids) would grow it for ever
        if len(known) > 1_000_000:
            known.clear()
        out = np.empty(len(ws), dtype=np.uint64)
        for i, w in enumerate(ws):
            h = known.get(w)
            if h is None:
                h = known[w] = int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little")
            out[i] = h
        return out


def run_hashes(word_hashes: np.ndarray, length: int) -> np.ndarray:
    """``[n - length + 1]`` hashes of every run of ``length`` consecutive words of ``word_hashes`` ``[n]``."""
    n = len(word_hashes) - length + 1
    if n <= 0:
        return np.empty(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = word_hashes[:n].copy()
        for k in range(1, length):
            h = h * MULTIPLIER + word_hashes[k : k + n]
    return h


def _kind(path: Path) -> str:
    """``.json``, ``.txt`` or JSON lines (any other name) of an evaluation file, a ``.gz`` ending aside (in any
    case: ``EVAL.JSON`` is a JSON file)."""
    name = path.name.lower()
    return Path(name.removesuffix(".gz")).suffix


def _lines(path: Path):
    """``(line number, text)`` of a (gzip) text file: a byte-order mark opening it left out, a line that is not
    UTF-8 refused naming the file and the line, a file that cannot be read to its end (a cut ``.gz``) named."""
    with open_binary(path) as f:
        yield from readable_lines(utf8_lines(f, f"--against {path}"), f"--against {path}")


def _records(path: Path, field: str):
    """``(line or item number, record)`` of a JSON lines or JSON file."""
    if _kind(path) == ".json":
        text = "".join(line for _, line in _lines(path))
        try:
            value = json_loads(text)
        except RecursionError:
            raise ValueError(f"--against {path}: not valid JSON (nested too deep)") from None
        except ValueError as e:
            raise ValueError(f"--against {path}: not valid JSON ({e})") from None
        if not isinstance(value, list):
            raise ValueError(f"--against {path}: expected a JSON list of records (or JSON lines in a .jsonl file)")
        yield from enumerate(value, 1)
        return
    for number, line in _lines(path):
        if line.strip():
            try:  # (without its line end, as iter_jsonl: a line cut inside a string is an unterminated string)
                yield number, json_loads(line.rstrip("\r\n"))
            except RecursionError:
                raise ValueError(f"--against {path}: line {number}: not valid JSON (nested too deep)") from None
            except json.JSONDecodeError as e:  # (its own "line 1 column N": the column of this line)
                why = f"{e.msg.removesuffix(' at')} at column {e.colno}"
                raise ValueError(f"--against {path}: line {number}: not valid JSON ({why})") from None
            except ValueError as e:
                raise ValueError(f"--against {path}: line {number}: not valid JSON ({e})") from None


def evaluation_texts(path, field: str = "prompt", by: str = "prompt") -> tuple[list[list[str]], dict]:
    """The evaluation texts of one ``--against`` input (see the module doc), each as its messages' texts (a
    plain text: itself alone), and its record for the manifest (path, SHA-256 of the file or of a buffer's
    manifest, texts)."""
    path = Path(path)
    if path.is_dir():
        if not (path / MANIFEST).is_file():
            raise ValueError(f"--against {path}: a folder that is not a buffer (no {MANIFEST})")
        source = CurationSource(path)
        texts = []
        for table in source.shards():
            prompts, completions = source.texts(table, prompt=by != "completion", completion=by != "prompt")
            texts += [by_parts(by, p, c) for p, c in zip(prompts, completions)]
        return texts, {"path": str(path.resolve()), "manifest_sha256": source.manifest_sha256, "texts": len(texts)}
    if not path.exists():
        raise ValueError(f"--against {path}: no such file or folder")
    if not path.is_file():  # /dev/null, a pipe, a socket
        raise ValueError(f"--against {path}: not a regular file or folder")
    if _kind(path) == ".txt":
        # only line breaks (\n, \r\n, \r: text_lines) end a text (str.splitlines would also cut at a form feed,
        # U+2028, U+0085...)
        lines = (line.removesuffix("\n").removesuffix("\r") for _, line in _lines(path))
        texts = [[t] for t in lines if t.strip()]
    else:
        texts = []
        for number, record in _records(path, field):
            where = f"--against {path}: {'item' if _kind(path) == '.json' else 'line'} {number}"
            try:
                text = _record_text(record, field, where)
            except RecursionError:  # (lists nested past Python's limit, which JSON itself allows)
                raise ValueError(f"{where}: nested too deep") from None
            texts.append(text)
    return texts, {"path": str(path.resolve()), "sha256": sha256_files([path]), "texts": len(texts)}


def _record_text(record, field: str, where: str) -> list[str]:
    """The texts of one evaluation record (see :func:`evaluation_texts`); ``where`` names it in errors."""
    if isinstance(record, dict):
        if field not in record:
            raise ValueError(f"{where}: no field {field!r} (choose it with --field)")
        text = message_parts(record[field])
        if not text:
            raise ValueError(f"{where}: field {field!r} holds no text (a string or chat messages)")
        return text
    if isinstance(record, str):
        return [record]
    if isinstance(record, list) and (text := message_parts(record)):
        return text  # a line that is a chat-message list itself
    raise ValueError(f"{where}: expected a string, chat messages or an object, got {type_name(record)}")


class EvaluationRuns:
    """The hashed runs of words of the evaluation texts, by run length, with the text each came from. A text
    given as several messages (a list of strings) has the runs of each message, none across two: what stands
    between two messages in a row (a chat template's role names, or nothing) is not the evaluation's; a text
    whose every message is under ``min_words`` words is skipped (counted in ``skipped``)."""

    def __init__(self, texts: list[list[str] | str], ngram: int = NGRAM, min_words: int = MIN_WORDS):
        self.ngram, self.min_words = ngram, min_words
        hashes = WordHashes()
        by_length: dict[int, tuple[list, list]] = {}
        self.skipped = 0
        for i, text in enumerate(texts):
            # (a message under min_words never counts, also above --ngram: "shortest evaluation text that counts")
            parts = [ws for ws in map(words, [text] if isinstance(text, str) else text) if len(ws) >= min_words]
            if not parts:
                self.skipped += 1
            for ws in parts:
                length = min(len(ws), ngram)
                runs = np.unique(run_hashes(hashes(ws), length))
                h, owner = by_length.setdefault(length, ([], []))
                h.append(runs)
                owner.append((i, len(runs)))  # (an array per text would cost about 100 bytes more a text)
        self.lengths: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.filters: dict[int, tuple[np.ndarray, np.uint64]] = {}
        for length in sorted(by_length):  # each list freed as it is joined: about 28 bytes a run at the peak
            h, owner = by_length.pop(length)
            h = np.concatenate(h)
            texts_of, counts = np.array(owner, dtype=np.int64).reshape(-1, 2).T
            del owner
            order = np.argsort(h, kind="stable")
            h = h[order]
            self.lengths[length] = (h, np.repeat(texts_of.astype(np.int32), counts)[order])
            del order
            self.filters[length] = _bit_table(h)
        self.texts = len(texts)
        self.matched = np.zeros(len(texts), dtype=bool)

    def hits(self, runs: np.ndarray, length: int) -> np.ndarray:
        """``[len(runs)]`` bool: which of ``runs`` (hashes of runs of ``length`` words) an evaluation text holds;
        the texts they come from are marked matched."""
        table, owner = self.lengths[length]
        bits, shift = self.filters[length]
        # only the runs whose bit is set are searched for (about one in eight that no text holds: a search is
        # a cache miss at each of its twenty-odd steps, the bit one); a set bit is no match, a clear one rules it out
        slot = runs >> shift
        maybe = np.flatnonzero(
            (bits[(slot >> np.uint64(3)).astype(np.intp)] >> (slot & np.uint64(7)).astype(np.uint8)) & 1
        )
        hit = np.zeros(len(runs), dtype=bool)
        if len(maybe):
            wanted = runs[maybe]
            at = np.searchsorted(table, wanted)
            inside = at < len(table)
            hit[maybe[inside]] = table[at[inside]] == wanted[inside]
        if hit.any():  # every text holding a matched run (one run may stand in several texts: a range of the table)
            found = np.unique(runs[hit])
            lo, hi = np.searchsorted(table, found, "left"), np.searchsorted(table, found, "right")
            n = hi - lo
            at = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n) + np.repeat(lo, n)
            self.matched[owner[at]] = True
        return hit


def _bit_table(table: np.ndarray) -> tuple[np.ndarray, np.uint64]:
    """``(bits, shift)``: a table of 8 to 16 bits a run (1 to 2 bytes) for the sorted run hashes ``table``, the
    bit of each hash's top bits (``hash >> shift``) set, so that a run whose bit is clear is no run of ``table``."""
    k = max(3, int(np.ceil(np.log2(max(8 * len(table), 8)))))
    shift = np.uint64(64 - k)
    slot = table >> shift  # sorted, as the table
    byte = slot >> np.uint64(3)
    value = (np.uint8(1) << (slot & np.uint64(7)).astype(np.uint8)).astype(np.uint8)
    bits = np.zeros(1 << (k - 3), dtype=np.uint8)
    if len(table):
        first = np.flatnonzero(np.r_[True, byte[1:] != byte[:-1]])
        bits[byte[first].astype(np.intp)] = np.bitwise_or.reduceat(value, first)
    return bits, shift


def contaminated(row_words: list[list[str]], runs: EvaluationRuns, hashes: WordHashes) -> dict[int, str]:
    """``{row index: its first run of words that an evaluation text holds}`` for the rows (lists of
    :func:`words`) that hold one: every row's runs of each evaluation length at once, none across two rows."""
    starts = np.cumsum([0] + [len(ws) for ws in row_words])
    flat = hashes([w for ws in row_words for w in ws])
    row_of = np.repeat(np.arange(len(row_words)), np.diff(starts))
    first: dict[int, str] = {}
    for length in runs.lengths:
        h = run_hashes(flat, length)
        if not len(h):
            continue
        pos = np.arange(len(h))
        inside = row_of[pos] == row_of[pos + length - 1]  # a run within one row
        hit = np.zeros(len(h), dtype=bool)
        hit[inside] = runs.hits(h[inside], length)
        for p in np.flatnonzero(hit):
            r = int(row_of[p])
            if r not in first:
                s = int(p - starts[r])
                first[r] = " ".join(row_words[r][s : s + length])
    return first


def _slices(table, by: str) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive rows of a shard whose text (``by``) is at most :data:`SLICE_BYTES` bytes
    together (a longer row alone), as stored text columns give it, else 4 bytes a token: the rows' words are held
    one slice at a time, so memory does not grow with the shard (a row's words never depend on another row)."""
    names = table.schema.names
    size = np.zeros(table.num_rows, dtype=np.int64)
    for name, wanted in (("prompt", by != "completion"), ("completion", by != "prompt")):
        if wanted and name in names:
            size += pc.binary_length(table.column(name)).fill_null(0).to_numpy(zero_copy_only=False)
    if not ({"prompt", "completion"} <= set(names)) and "tokens" in names:  # decoded from tokens
        size += 4 * pc.list_value_length(table.column("tokens")).fill_null(0).to_numpy(zero_copy_only=False)
    out, start, total = [], 0, 0
    for i, n in enumerate(size.tolist()):
        if total and total + n > SLICE_BYTES:
            out.append((start, i))
            start, total = i, 0
        total += n
    if start < table.num_rows:
        out.append((start, table.num_rows))
    return out


def decontaminate_buffer(
    path,
    out,
    against: list,
    *,
    by: str = "row",
    field: str = "prompt",
    against_by: str = "prompt",
    ngram: int = NGRAM,
    min_words: int | None = None,
    dropped=None,
    command: list[str],
    progress: bool = False,
) -> tuple[Buffer, dict]:
    """Write the rows of the buffer at ``path`` that share no run of words with the evaluation texts of
    ``against`` (files or buffer folders, see the module doc) as a new buffer at ``out``; ``(new buffer, curation
    record)``. ``dropped``: a JSON lines file to write each dropped row's id, source and first matching words to."""
    if by not in BY or against_by not in BY:
        raise ValueError(f"--by and --against-by take one of {', '.join(BY)}")
    if min_words is None:  # not given: 8 words, or --ngram when that is fewer
        min_words = min(MIN_WORDS, ngram)
    if ngram < 1 or min_words < 1:
        raise ValueError(f"--ngram ({ngram}) and --min-words ({min_words}) must be at least 1")
    out = refuse_existing(out)
    if dropped is not None:
        if Path(dropped).exists():
            raise FileExistsError(f"--dropped {dropped} already exists; choose a new file")
        refuse_inside_buffer(dropped, "--dropped")
        d, o = Path(dropped).resolve(), out.resolve()
        if d == o or o in d.parents:  # it would be written into the new buffer (or over it) once that is made
            raise ValueError(f"--dropped {dropped} is inside --out {out}: choose a file outside it")
    staged = _stage(dropped) if dropped is not None else None  # refuses an unwritable place before any work
    try:
        return _decontaminate(
            path, out, against, by, field, against_by, ngram, min_words, dropped, staged, command, progress
        )
    finally:
        if staged is not None:
            tmp, made = staged
            if tmp.exists():  # not renamed into place: a failure, Ctrl-C
                tmp.unlink()
                remove_created_dirs(made)


def _stage(dropped) -> tuple[Path, list[Path]]:
    """A temporary file beside ``dropped`` (its missing folders made), and the folders made; a ValueError
    naming ``--dropped`` where it cannot be written."""
    path = Path(dropped)
    try:
        made = make_parents(path)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise ValueError(f"--dropped {dropped}: cannot be written ({e.strerror}: {e.filename})") from None
    os.close(fd)
    return Path(name), made


def _decontaminate(path, out, against, by, field, against_by, ngram, min_words, dropped, staged, command, progress):
    seen: dict[Path, str] = {}
    for item in against:  # twice, its texts would count twice in the manifest and the message
        if (key := Path(item).resolve()) in seen:
            raise ValueError(f"--against {item}: given twice (as {seen[key]}); give each evaluation input once")
        seen[key] = str(item)
    source = CurationSource(path)  # a missing or broken buffer is refused before the evaluation texts are read
    texts, inputs = [], []
    for item in against:
        t, record = evaluation_texts(item, field, against_by)
        texts += t
        inputs.append(record)
    if not texts:
        raise ValueError(f"--against {', '.join(map(str, against))}: no evaluation text")
    runs = EvaluationRuns(texts, ngram, min_words)
    if not runs.lengths:
        raise ValueError(
            f"--against: {'the evaluation text' if len(texts) == 1 else f'every one of the {len(texts)} evaluation texts'}"
            f" is shorter than --min-words {plural(min_words, 'word')}"
        )
    curation = {
        "verb": "decontaminate",
        "by": by,
        "ngram": ngram,
        "min_words": min_words,
        "against": inputs,
        "evaluation_texts": len(texts),
        "evaluation_texts_too_short": runs.skipped,
        "evaluation_texts_matched": 0,
        "rows_read": 0,
        "rows_kept": 0,
        "removed": {},
    }
    removed: Counter = Counter()
    hashes = WordHashes()
    lines: list[str] = []

    def rows():
        for table in source.shards():
            first: dict[int, str] = {}
            for start, stop in _slices(table, by):
                prompts, completions = source.texts(
                    table.slice(start, stop - start), prompt=by != "completion", completion=by != "prompt"
                )
                found = contaminated(
                    [words("\n".join(by_parts(by, p, c))) for p, c in zip(prompts, completions)], runs, hashes
                )
                del prompts, completions
                first.update((start + r, ws) for r, ws in found.items())
            bad = np.array(sorted(first), dtype=np.int64)
            keep = np.setdiff1d(np.arange(table.num_rows), bad)
            ids, sources = table.column("row_id").to_pylist(), table.column("source").to_pylist()
            for r in bad.tolist():
                removed[sources[r]] += 1
                lines.append(json.dumps({"row_id": ids[r], "source": sources[r], "words": first[r]}))
            curation["rows_read"] += table.num_rows
            curation["rows_kept"] += len(keep)
            curation["removed"] = dict(sorted(removed.items()))
            curation["evaluation_texts_matched"] = int(runs.matched.sum())
            yield source.take(table, keep)
        if staged is not None:  # written in full before the buffer is committed: then only a rename is left
            staged[0].write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            os.chmod(staged[0], 0o644)

    buf = write_curated(
        rows(),
        out,
        parents=[source],
        command=command,
        curation=curation,
        ref_model=source.ref_model,
        progress=progress,
        nothing=f"every row of {path} shares a run of words with the evaluation texts; nothing written",
    )
    if staged is not None:
        os.replace(staged[0], dropped)
        fsync_dir(Path(dropped).parent)
    return buf, curation
