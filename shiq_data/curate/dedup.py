"""``shiq-data dedup``: drop rows whose text repeats an earlier row's; the first occurrence (buffer order) stays.

The text is the row's prompt, its completion, or both (``by``), from the text columns when the row has
them, else decoded from the prompt and action tokens (:meth:`CurationSource.texts`), compared after
:func:`shiq_data.curate.rows.normalise` (NFKC, lower case, white space collapsed).

- exact: rows with the same normalised text (a 16-byte blake2b hash of it) as an earlier row.
- near (``near=True``): also rows whose character 5-gram sets have an estimated Jaccard similarity of at
  least ``threshold`` with an earlier kept row: MinHash signatures (128 permutations, seed 1), candidates
  found by locality-sensitive hashing (rows sharing one of ``b`` bands of ``r`` signature values, with the
  ``(b, r)`` that ``datasketch.MinHashLSH`` picks for the threshold), each confirmed by its estimated
  similarity (the share of equal signature values, as ``MinHash.jaccard``): ``datasketch.MinHashLSH`` queried
  and filled with the kept rows as they come. A row whose signature equals an earlier row's is dropped without
  a pair: that pairing would always drop it (similarity 1; and if the earlier row was dropped, the kept row that
  dropped it is exactly as similar to this one).

Memory is bounded, not proportional to the buffer: three passes over the shards, one shard at a time.
Pass 1 writes each row's exact key (and, for ``near``, its band keys) to temporary Parquet tables and its
signature to a memory-mapped array (:class:`shiq_data.spill.Spill`, next to ``out``, removed afterwards);
DuckDB, with a fixed memory limit and spilling to disk beyond it, finds the rows that repeat an earlier key
(for ``near``: an earlier signature, which equal texts share) and numbers the buckets (a band and its key)
that two or more of the other rows share. Pass 2 walks those rows in order with their buckets and compares
each with the kept rows of its buckets only (each bucket's first kept row in a memory-mapped array, 9 bytes a
bucket; the rare further kept rows of a bucket, rows that share a band without being near, in memory), so a
cluster of ``k`` rows alike costs about ``k`` comparisons, not the ``k²/2`` pairs of its rows; it marks the
kept rows in a bitmap, one bit per row of the buffer (1.25 MB per 10 million rows), the only state held in
memory that grows with the buffer; pass 3 writes the kept rows shard by shard.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from shiq_data.buffer import Buffer
from shiq_data.curate.output import refuse_existing, write_curated
from shiq_data.curate.rows import CurationSource, normalise, text_key
from shiq_data.io import progress_bar
from shiq_data.spill import Bitmap, Spill

BY = ("row", "prompt", "completion")
NUM_PERM = 128
SHINGLE_CHARS = 5
SEED = 1
ENTRY_BATCH = 65_536  # (row, bucket) entries read at a time in pass 2 (16 bytes each)
PAIR_BATCH = 4_096  # pairs of rows compared at a time (their signatures: 8 MB)
SHINGLE_BATCH = 32_768  # shingles permuted at a time ([shingles, NUM_PERM] 32-bit values: 16 MB)
HASH_BATCH = 1 << 20  # shingles hashed at a time (their code points: 20 MB)
HASH_CACHE = 1 << 20  # shingle hashes remembered (cleared when full: about 130 MB)


def row_text(by: str, prompt: str, completion: str) -> tuple[str, ...]:
    """The text parts compared for ``by`` (row: prompt and completion)."""
    return {"prompt": (prompt,), "completion": (completion,), "row": (prompt, completion)}[by]


def shingle_strings(parts: tuple[str, ...]) -> set[str]:
    """Character ``SHINGLE_CHARS``-grams of the normalised parts (a shorter text is its own shingle)."""
    text = "\n".join(normalise(p) for p in parts)
    n = SHINGLE_CHARS
    return {text[i : i + n] for i in range(len(text) - n + 1)} if len(text) >= n else {text}


def shingles(parts: tuple[str, ...]) -> set[bytes]:
    """:func:`shingle_strings` as UTF-8 bytes (what the MinHash hashes)."""
    return {g.encode("utf-8") for g in shingle_strings(parts)}


class Signatures:
    """MinHash signatures of texts (``NUM_PERM`` permutations drawn once from ``SEED``) and the LSH banding
    ``(b, r)`` that ``datasketch.MinHashLSH`` chooses for ``threshold``."""

    def __init__(self, threshold: float):
        if not 0 < threshold <= 1:
            raise ValueError(f"--threshold must be in (0, 1], got {threshold}")
        from datasketch import MinHash, MinHashLSH  # heavy: imports scipy (0.5 s); only --near needs it

        # datasketch finds no bands above 0.98 at 128 permutations: above it, those of 0.98 (2 bands of 64
        # values) serve, which pair every two rows whose signatures differ in at most one value (1.0: none)
        lsh = MinHashLSH(threshold=min(threshold, 0.98), num_perm=NUM_PERM)
        self.threshold, self.b, self.r = threshold, lsh.b, lsh.r
        first = MinHash(num_perm=NUM_PERM, seed=SEED)
        if first.scheme != "affine32":  # (the pre-mix and 32-bit wrap below are that scheme's)
            raise RuntimeError(f"datasketch's MinHash uses scheme {first.scheme!r}; dedup --near expects 'affine32'")
        from datasketch.minhash import _fmix

        self.permutations, self.scheme = first.permutations, first.scheme
        self._fmix, self._width, self._dtype = _fmix, 32, first.hashvalues.dtype
        self._hashfunc = first.hashfunc
        self._known: dict[bytes, int] = {}

    def __call__(self, parts: tuple[str, ...]) -> np.ndarray:
        """The ``[NUM_PERM]`` signature of the text ``parts`` (:func:`shingles`), as ``datasketch.MinHash`` gives it."""
        return self.many([parts])[0]

    def many(self, texts: list[tuple[str, ...]]) -> np.ndarray:
        """The ``[len(texts), NUM_PERM]`` signatures of ``texts``, each what ``datasketch.MinHash.update_batch``
        gives for its shingles (its hash function, its 32-bit affine permutations after its pre-mix), computed
        for many texts at once: their shingles are windows of a numpy array of code points, each distinct
        shingle is hashed once (remembered across calls: a corpus repeats its 5-grams; at most
        :data:`HASH_CACHE` of them), and the permutations and minima are numpy operations, not one ``MinHash``
        object and one hash call per shingle. Memory is bounded by the batches' sizes, not by a text's length."""
        joined = ["\n".join(normalise(p) for p in parts) for parts in texts]
        out = np.empty((len(joined), NUM_PERM), dtype=self._dtype)
        counts = np.array([max(len(t) - SHINGLE_CHARS + 1, 1) for t in joined], dtype=np.int64)
        ends = np.cumsum(counts)
        first = 0
        while first < len(joined):  # texts holding about HASH_BATCH shingles at a time
            last = max(first + 1, int(np.searchsorted(ends, ends[first] - counts[first] + HASH_BATCH, "right")))
            hv = self._fmix(self._hashes(joined[first:last], counts[first:last]), self._width)
            self._minima(hv, counts[first:last], out[first:last])
            first = last
        return out

    def _hashes(self, texts: list[str], counts: np.ndarray) -> np.ndarray:
        """The hash function's value of each shingle of ``texts`` (``counts[k]`` of text ``k``, in order)."""
        n = SHINGLE_CHARS
        lengths = np.array([len(t) for t in texts], dtype=np.int64)
        offsets = np.cumsum(lengths) - lengths
        at = np.cumsum(counts) - counts  # each text's first shingle in the result
        hv = np.empty(int(counts.sum()), dtype=np.uint32)
        long = np.flatnonzero(lengths >= n)
        for k in np.flatnonzero(lengths < n).tolist():  # a text shorter than a shingle is its own shingle
            hv[at[k]] = self._hash(texts[k].encode("utf-32-le"))
        if len(long):
            points = np.frombuffer("".join(texts).encode("utf-32-le"), dtype="<u4")
            c = counts[long]
            within = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
            windows = np.lib.stride_tricks.sliding_window_view(points, n)[np.repeat(offsets[long], c) + within]
            grams = pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(4 * n), len(windows), [None, pa.py_buffer(np.ascontiguousarray(windows))]
            )
            encoded = pc.dictionary_encode(grams)
            distinct = np.array([self._hash(g) for g in encoded.dictionary.to_pylist()], dtype=np.uint32)
            hv[np.repeat(at[long], c) + within] = distinct[encoded.indices.to_numpy()]
        return hv

    def _hash(self, gram: bytes) -> int:
        """The hash function's value of a shingle given as UTF-32 code points (hashed as UTF-8)."""
        h = self._known.get(gram)
        if h is None:
            if len(self._known) >= HASH_CACHE:
                self._known.clear()
            h = self._known[gram] = self._hashfunc(gram.decode("utf-32-le").encode("utf-8"))
        return h

    def _minima(self, hv: np.ndarray, counts: np.ndarray, out: np.ndarray) -> None:
        """``out[k]``: the minimum of each permutation over the ``counts[k]`` shingle hashes ``hv`` of text ``k``.
        The ``[NUM_PERM, shingles]`` permuted values are made :data:`SHINGLE_BATCH` columns at a time whatever
        the texts' lengths, a text cut across several such blocks taking the least of each; a text longer than
        a block has its repeated hashes permuted once (a degenerate completion repeats a few 5-grams a million
        times; sorting every text's would cost more than it saves)."""
        ends = np.cumsum(counts)
        long = np.flatnonzero(counts > SHINGLE_BATCH)
        if len(long):
            pieces, last, counts = [], 0, counts.copy()
            for k in long.tolist():
                start = int(ends[k] - counts[k])
                distinct = np.unique(hv[start : ends[k]])
                pieces += [hv[last:start], distinct]
                counts[k], last = len(distinct), int(ends[k])
            hv = np.concatenate([*pieces, hv[last:]])
        a, b = (p.reshape(-1, 1) for p in self.permutations)  # [NUM_PERM, shingles]: minima along rows of memory
        ends = np.cumsum(counts)
        starts = ends - counts
        out[:] = np.iinfo(out.dtype).max
        for lo in range(0, len(hv), SHINGLE_BATCH):
            hi = min(lo + SHINGLE_BATCH, len(hv))
            first, last = int(np.searchsorted(ends, lo, "right")), int(np.searchsorted(starts, hi, "left"))
            at = np.maximum(starts[first:last], lo) - lo  # each text's first column in the block
            block = np.minimum.reduceat(a * hv[lo:hi] + b, at, axis=1).T  # [last - first, NUM_PERM]
            np.minimum(out[first:last], block, out=out[first:last])

    def bands(self, signature: np.ndarray) -> list[bytes]:
        """The ``b`` band keys of a signature: the bytes of values ``[k r, (k + 1) r)`` for band ``k``."""
        r = self.r
        return [signature[k * r : (k + 1) * r].tobytes() for k in range(self.b)]


def _write_keys(
    source: CurationSource, spill: Spill, by: str, signatures: Signatures | None, progress: bool = False
) -> tuple[int, np.ndarray | None]:
    """Pass 1: each row's index and exact key to table ``keys``; with ``signatures`` the key is a 16-byte hash
    of its signature instead, which it also writes to row ``idx`` of the memory-mapped array ``sigs``
    ``[rows, NUM_PERM]`` (returned; None without ``signatures``), and its band keys to table ``bands`` (the slow part of a near dedup: a bar shows it with ``progress``).
    Returns ``(rows read, sigs)``."""
    spill.declare("keys", pa.schema([("idx", pa.int64()), ("key", pa.binary())]))
    sig_array = None
    if signatures is not None:
        sig_array = spill.array("sigs", len(source) * NUM_PERM, np.uint64).reshape(len(source), NUM_PERM)
        spill.declare("bands", pa.schema([("idx", pa.int64()), ("band", pa.int32()), ("bkey", pa.binary())]))
    start = 0
    desc = "minhashing" if signatures else "hashing"
    with progress_bar(progress, total=len(source), desc=desc, unit=" rows") as bar:  # cleared if a shard is refused
        for table in source.shards():
            prompts, completions = source.texts(table, prompt=by != "completion", completion=by != "prompt")
            parts = [row_text(by, p, c) for p, c in zip(prompts, completions)]
            idx = np.arange(start, start + len(parts), dtype=np.int64)
            if signatures is None:
                keys = [text_key(*x) for x in parts]
            else:
                sigs = signatures.many(parts)
                keys = [hashlib.blake2b(s.tobytes(), digest_size=16).digest() for s in sigs]
            spill.append("keys", pa.table({"idx": idx, "key": pa.array(keys, pa.binary())}))
            if signatures is not None:
                sig_array[start : start + len(parts)] = sigs
                b = signatures.b
                spill.append(
                    "bands",
                    pa.table(
                        {
                            "idx": np.repeat(idx, b),
                            "band": np.tile(np.arange(b, dtype=np.int32), len(sigs)),
                            "bkey": pa.array([k for s in sigs for k in signatures.bands(s)], pa.binary()),
                        }
                    ),
                )
            start += len(parts)
            bar.update(len(parts))
    if sig_array is not None:  # written: read back read-only (clean pages the kernel may drop and read again)
        sig_array.flush()
        sig_array = np.load(spill.dir / "sigs.npy", mmap_mode="r").reshape(len(source), NUM_PERM)
    return start, sig_array


def kept_rows(
    source: CurationSource, spill: Spill, by: str, signatures: Signatures | None, progress: bool = False
) -> Bitmap:
    """Passes 1 and 2 (see the module doc): a bitmap of the rows ``dedup`` keeps."""
    n, sigs = _write_keys(source, spill, by, signatures, progress)
    kept = Bitmap(n, fill=True)
    keys = spill.table("keys")
    firsts = f"SELECT key, min(idx) AS first FROM {keys} GROUP BY key"
    repeats = f"SELECT k.idx FROM {keys} k JOIN ({firsts}) f ON k.key = f.key WHERE k.idx > f.first"
    for batch in spill.query(repeats):
        kept.clear_many(batch.column(0).to_numpy())
    if signatures is not None:
        # (with signatures, the keys were the signatures': a repeat of an earlier signature was dropped, see the
        # module doc, and only the rows first with their signature have bands to compare)
        _near(kept, sigs, spill, firsts, signatures.threshold, progress)
    return kept


class _Buckets:
    """The kept rows of each bucket so far: ``first[bucket]`` its first kept row + 1 (0: none yet; a
    memory-mapped array), ``more[bucket]`` its further kept rows (flagged in ``has_more``, memory-mapped)."""

    def __init__(self, spill: Spill, n: int):
        self.first = spill.array("bucket_first", n)
        self.has_more = spill.array("bucket_has_more", n, np.bool_)
        self.more: dict[int, list[int]] = {}

    def add(self, rows: np.ndarray, buckets: np.ndarray) -> None:
        """Record the kept ``rows`` (entries in order of rows) in their ``buckets``."""
        new, at = np.unique(buckets, return_index=True)  # each bucket's first entry: its earliest row here
        empty = self.first[new] == 0
        self.first[new[empty]] = rows[at[empty]] + 1
        rest = np.ones(len(rows), bool)
        rest[at[empty]] = False
        for row, bucket in zip(rows[rest].tolist(), buckets[rest].tolist()):
            self.more.setdefault(bucket, []).append(row)
            self.has_more[bucket] = True


def _near(kept: Bitmap, sigs: np.ndarray, spill: Spill, firsts: str, threshold: float, progress: bool) -> None:
    """Pass 2 of a near dedup (see the module doc): clear in ``kept`` each row near (estimated similarity of
    its signature in ``sigs`` at least ``threshold``) a kept row before it that shares one of its buckets."""
    bands = f"SELECT * FROM {spill.table('bands')} WHERE idx IN (SELECT first FROM ({firsts}))"
    shared = f"SELECT band, bkey FROM ({bands}) GROUP BY band, bkey HAVING count(*) > 1"
    # the shared buckets, numbered, grouped once: counted here and joined to their entries below
    s = spill.materialize("shared_buckets", f"SELECT band, bkey, row_number() OVER () - 1 AS bucket FROM ({shared})")
    (count,) = spill.one(f"SELECT count(*) FROM {s}")
    entries = f"""
        WITH b AS ({bands})
        SELECT b.idx AS j, s.bucket FROM b JOIN {s} s ON b.band = s.band AND b.bkey = s.bkey ORDER BY j"""
    buckets = _Buckets(spill, count)
    bar = tqdm(desc="near pairs", unit=" pairs", disable=not progress)

    def near(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        bar.update(len(i))
        out = np.zeros(len(i), bool)
        for k in range(0, len(i), PAIR_BATCH):  # two signatures of 1 KB read for a pair
            at = slice(k, k + PAIR_BATCH)
            out[at] = (sigs[i[at]] == sigs[j[at]]).sum(axis=1) / float(NUM_PERM) >= threshold
        return out

    def decide(j: np.ndarray, b: np.ndarray) -> None:
        """The rows of the entries ``(j, b)`` (whole rows, in order; every earlier row decided)."""
        # against the kept rows of earlier batches: each bucket's first kept row, then its further ones
        first = buckets.first[b].astype(np.int64) - 1
        hit = np.zeros(len(j), bool)
        hit[first >= 0] = near(first[first >= 0], j[first >= 0])
        for e in np.flatnonzero(buckets.has_more[b] & ~hit):
            others = np.asarray(buckets.more[int(b[e])])
            hit[e] = near(others, np.full(len(others), j[e])).any()
        dropped = set(np.unique(j[hit]).tolist())
        # against the rows of this batch kept before them, in order: only buckets two of its rows share count
        live = ~np.isin(j, list(dropped))
        _, inverse, counts = np.unique(b[live], return_inverse=True, return_counts=True)
        twice = np.flatnonzero(live)[counts[inverse] > 1]
        here: dict[int, list[int]] = {}  # bucket: the rows of this batch kept in it
        rows, starts = np.unique(j[twice], return_index=True)
        for row, entry in zip(rows.tolist(), np.split(b[twice], starts[1:])):
            others = sorted({i for bucket in entry.tolist() for i in here.get(bucket, ())})
            if others and near(np.asarray(others), np.full(len(others), row)).any():
                dropped.add(row)
                continue
            for bucket in entry.tolist():
                here.setdefault(bucket, []).append(row)
        kept.clear_many(np.fromiter(dropped, np.int64, len(dropped)))
        stays = ~np.isin(j, list(dropped))
        buckets.add(j[stays], b[stays])

    with bar:
        j, b = np.zeros(0, np.int64), np.zeros(0, np.int64)
        for batch in spill.query(entries, batch_rows=ENTRY_BATCH):
            j = np.concatenate([j, batch.column("j").to_numpy()])
            b = np.concatenate([b, batch.column("bucket").to_numpy()])
            cut = int(np.searchsorted(j, j[-1]))  # the last row's entries may go on in the next batch
            decide(j[:cut], b[:cut])
            j, b = j[cut:], b[cut:]
        decide(j, b)


def dedup_buffer(
    path,
    out,
    *,
    by: str = "row",
    near: bool = False,
    threshold: float = 0.8,
    command: list[str],
    progress: bool = False,
) -> tuple[Buffer, dict]:
    """Write the buffer at ``path`` without its duplicate rows (see the module doc) as a new buffer at
    ``out``; ``(new buffer, curation record)``, the record (also in the new manifest under ``curation``)
    holding the rows read and kept and the rows removed per source."""
    if by not in BY:
        raise ValueError(f"--by {by!r}: expected one of {', '.join(BY)}")
    out = refuse_existing(out)
    signatures = Signatures(threshold) if near else None
    source = CurationSource(path)
    curation = {
        "verb": "dedup",
        "by": by,
        "mode": "near" if near else "exact",
        "threshold": threshold if near else None,
        "num_perm": NUM_PERM if near else None,
        "shingle_chars": SHINGLE_CHARS if near else None,
        "rows_read": 0,
        "rows_kept": 0,
        "removed": {},
    }
    with Spill(out) as spill:
        kept = kept_rows(source, spill, by, signatures, progress)
    removed: Counter = Counter()

    def rows():
        start = 0
        for table in source.shards():
            keep = kept.indices(start, table.num_rows)
            dropped = np.ones(table.num_rows, dtype=bool)
            dropped[keep] = False
            removed.update(table.column("source").take(pa.array(np.flatnonzero(dropped))).to_pylist())
            start += table.num_rows
            curation["rows_read"] += table.num_rows
            curation["rows_kept"] += len(keep)
            curation["removed"] = dict(sorted(removed.items()))
            yield source.take(table, keep)

    buf = write_curated(
        rows(), out, parents=[source], command=command, curation=curation, ref_model=source.ref_model, progress=progress
    )
    return buf, curation
