"""``shiq-data dedup``: drop rows whose text repeats an earlier row's; the first occurrence (buffer order) stays.

The text is the row's prompt, its completion, or both (``by``), from the text columns when the row has
them, else decoded from the prompt and action tokens (:meth:`CurationSource.texts`), compared after
:func:`shiq_data.curate.rows.normalise` (NFKC, lower case, white space collapsed).

- exact: rows with the same normalised text (a 16-byte blake2b hash of it).
- near (``near=True``): also rows whose character 5-gram sets have an estimated Jaccard similarity of at
  least ``threshold`` with an earlier kept row: MinHash signatures (128 permutations, seed 1) indexed
  by locality-sensitive hashing (``datasketch.MinHashLSH``), each candidate confirmed by its estimated
  similarity.
"""

from __future__ import annotations

from collections import Counter

from shiq_data.buffer import Buffer
from shiq_data.curate.output import refuse_existing, write_curated
from shiq_data.curate.rows import CurationSource, normalise, text_key

BY = ("row", "prompt", "completion")
NUM_PERM = 128
SHINGLE_CHARS = 5
SEED = 1


def row_text(by: str, prompt: str, completion: str) -> tuple[str, ...]:
    """The text parts compared for ``by`` (row: prompt and completion)."""
    return {"prompt": (prompt,), "completion": (completion,), "row": (prompt, completion)}[by]


def shingles(parts: tuple[str, ...]) -> set[bytes]:
    """Character ``SHINGLE_CHARS``-grams of the normalised parts (a shorter text is its own shingle)."""
    text = "\n".join(normalise(p) for p in parts)
    n = SHINGLE_CHARS
    grams = {text[i : i + n] for i in range(len(text) - n + 1)} if len(text) >= n else {text}
    return {g.encode("utf-8") for g in grams}


class NearDuplicates:
    """Rows seen so far, as MinHash signatures in an LSH index; :meth:`seen` tells whether a new row is
    within ``threshold`` (estimated Jaccard) of one of them, and remembers it if not."""

    def __init__(self, threshold: float):
        if not 0 < threshold <= 1:
            raise ValueError(f"--threshold must be in (0, 1], got {threshold}")
        from datasketch import MinHashLSH  # heavy: imports scipy (0.5 s); only --near needs it

        self.threshold = threshold
        self.lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self.kept: dict = {}  # key -> LeanMinHash of a kept row
        self.permutations = self.scheme = None  # drawn once from SEED, shared by every signature

    def seen(self, parts: tuple[str, ...]) -> bool:
        from datasketch import LeanMinHash, MinHash  # heavy: imports scipy; only --near needs it

        if self.permutations is None:
            m = MinHash(num_perm=NUM_PERM, seed=SEED)
            self.permutations, self.scheme = m.permutations, m.scheme
        else:
            m = MinHash(num_perm=NUM_PERM, seed=SEED, permutations=self.permutations, scheme=self.scheme)
        m.update_batch(list(shingles(parts)))
        for key in self.lsh.query(m):
            if m.jaccard(self.kept[key]) >= self.threshold:
                return True
        key = len(self.kept)
        lean = LeanMinHash(m)
        self.lsh.insert(key, lean)
        self.kept[key] = lean
        return False


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
    index = NearDuplicates(threshold) if near else None
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
    removed: Counter = Counter()

    def rows():
        hashes: set[bytes] = set()
        for table in source.shards():
            prompts, completions = source.texts(table)
            sources = table.column("source").to_pylist()
            keep = []
            for i, (p, c) in enumerate(zip(prompts, completions)):
                parts = row_text(by, p, c)
                key = text_key(*parts)
                duplicate = key in hashes or (index is not None and index.seen(parts))
                hashes.add(key)
                if duplicate:
                    removed[sources[i]] += 1
                else:
                    keep.append(i)
            curation["rows_read"] += table.num_rows
            curation["rows_kept"] += len(keep)
            curation["removed"] = dict(sorted(removed.items()))
            yield source.take(table, keep)

    buf = write_curated(
        rows(), out, parents=[source], command=command, curation=curation, ref_model=source.ref_model, progress=progress
    )
    return buf, curation
