"""``dedup`` (exact and --near, out of core) keeps exactly the rows of straightforward in-memory references:
a Python dict of normalised texts for exact repeats, and for near duplicates both a naive O(n^2) loop of
``datasketch.MinHash.jaccard`` against every earlier kept row and datasketch's own ``MinHashLSH`` queried
and filled row by row."""

import re
import unicodedata

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shiq_data.buffer import open_buffer, write_buffer
from shiq_data.curate.dedup import Signatures, dedup_buffer

WORDS = (
    "apple river stone cloud maple tiger violin garden copper ocean lantern meadow falcon pepper harbor "
    "cinder marble willow saddle quartz"
).split()
THRESHOLD = 0.8
TOK = {"name": "t", "fingerprint": "f", "vocab_size": 50}  # the rows carry their text: nothing is decoded


def _norm(text):
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def _minhash(text):
    from datasketch import MinHash

    t = _norm(text)
    grams = {t[i : i + 5] for i in range(len(t) - 4)} if len(t) >= 5 else {t}
    m = MinHash(num_perm=128, seed=1)
    m.update_batch([g.encode() for g in grams])
    return m


def _texts(seed):
    """Completions in buffer order: chains A ~ B ~ C (A and C not near), exact repeats (case and spaces
    changed) of kept rows and of removed ones, and unrelated rows, interleaved."""
    rng = np.random.default_rng(seed)
    chains, out = [], []
    for _ in range(4):
        a = list(rng.choice(WORDS, 60))
        b = ["zz" + w for w in a[:6]] + a[6:]  # near a
        c = b[:-6] + ["qq" + w for w in b[-6:]]  # near b, not near a
        chains.append([" ".join(x) for x in (a, b, c)])
    for k, (a, b, c) in enumerate(chains):
        out += [a, " ".join(rng.choice(WORDS, 40)), b, c.upper(), "  " + a + " ", b.replace(" ", "   ")]
        if k % 2:
            out += [c, " ".join(rng.choice(WORDS, 3))]
    return out, chains


def _rows(texts):
    for i, t in enumerate(texts):
        yield {
            "source": "ab"[i % 2],
            "group_id": i,
            "prompt_len": 2,
            "tokens": [1, 2, 3, 4],
            "action_mask": [False, False, True, True],
            "rewards": [0.0, 0.0, 0.0, 1.0],
            "prompt": f"prompt {i % 3}",
            "completion": t,
        }


# seed 6: every near pair also shares an LSH band, so the naive loop and the LSH index agree; seed 5: some
# near pairs share no band, which the naive loop finds and the LSH index (so dedup) does not
@pytest.fixture(scope="module", params=[6, 5])
def buf(request, tmp_path_factory):
    texts, chains = _texts(request.param)
    path = tmp_path_factory.mktemp("dedup") / "buf"
    write_buffer(_rows(texts), path, tokenizer_info=TOK, command=["test"], shard_rows=3, progress=False)
    return path, texts, chains, request.param


def test_chains_are_what_the_test_needs(buf):
    chains = buf[2]
    for a, b, c in chains:
        ma, mb, mc = _minhash(a), _minhash(b), _minhash(c)
        assert ma.jaccard(mb) >= THRESHOLD and mb.jaccard(mc) >= THRESHOLD and ma.jaccard(mc) < THRESHOLD


def test_dedup_near_keeps_what_naive_minhash_and_datasketch_lsh_keep(buf, tmp_path):
    from datasketch import MinHashLSH

    path, texts, chains, seed = buf
    hashes = [_minhash(t) for t in texts]
    seen, naive = set(), []
    for j, t in enumerate(texts):  # naive: every earlier kept row, estimated Jaccard
        if _norm(t) not in seen and not any(hashes[i].jaccard(hashes[j]) >= THRESHOLD for i in naive):
            naive.append(j)
        seen.add(_norm(t))
    lsh, seen, by_lsh = MinHashLSH(threshold=THRESHOLD, num_perm=128), set(), []
    for j, t in enumerate(texts):  # datasketch's index, filled with the kept rows as they come
        exact = _norm(t) in seen
        seen.add(_norm(t))
        if exact or any(hashes[i].jaccard(hashes[j]) >= THRESHOLD for i in lsh.query(hashes[j])):
            continue
        lsh.insert(j, hashes[j])
        by_lsh.append(j)
    assert (naive == by_lsh) == (seed == 6)
    # the data exercises every rule: exact repeats, near ones, and a chain's C kept after its B went
    assert len(set(map(_norm, texts))) < len(texts) and len(by_lsh) < len(set(map(_norm, texts)))
    assert all(texts.index(c.upper()) in by_lsh for _, _, c in chains) or seed != 6

    out = tmp_path / "near"
    _, curation = dedup_buffer(path, out, by="completion", near=True, threshold=THRESHOLD, command=["test"])
    got = [r["completion"] for r in open_buffer(out).table.select(["completion"]).to_pylist()]
    assert got == [texts[j] for j in by_lsh]
    assert curation["rows_read"] == len(texts) and curation["rows_kept"] == len(by_lsh)
    dropped = [j for j in range(len(texts)) if j not in by_lsh]
    assert curation["removed"] == {s: sum("ab"[j % 2] == s for j in dropped) for s in "ab" if dropped}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["near"]  # the temporary tables are gone


def test_dedup_exact_keeps_first_of_each_normalised_text(buf, tmp_path):
    path, texts = buf[:2]
    first = {}
    for j, t in enumerate(texts):
        first.setdefault((_norm(f"prompt {j % 3}"), _norm(t)), j)
    want = sorted(first.values())
    out = tmp_path / "exact"
    _, curation = dedup_buffer(path, out, by="row", command=["test"])
    got = [r["completion"] for r in open_buffer(out).table.select(["completion"]).to_pylist()]
    assert got == [texts[j] for j in want] and curation["rows_kept"] == len(want) < len(texts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exact"]


def test_dedup_near_of_thousands_of_rows_alike(tmp_path, capsys):
    """3,000 answers that differ in a number only, the way boilerplate repeats: about 4.5 million candidate pairs
    (each pair of rows shares a band). Their signatures were joined to every pair inside DuckDB's 64 MB, which ran
    out of memory (from 2,000 such rows); then every pair was written, sorted and read back (k²/2 for a cluster
    of k). Each row is now compared with the kept rows of its bands only: a few comparisons a row. It keeps what
    datasketch's LSH index, filled with the kept rows as they come, keeps (the naive loop keeps one: a few near
    pairs share no band)."""
    from datasketch import MinHashLSH

    base = "I am sorry, but I cannot help with that request; it may cause harm. Ask me something else. "
    texts = [base + f"(case {i})" for i in range(3000)]
    hashes = [_minhash(t) for t in texts]
    lsh, by_lsh = MinHashLSH(threshold=THRESHOLD, num_perm=128), []
    for j in range(len(texts)):
        if not any(hashes[i].jaccard(hashes[j]) >= THRESHOLD for i in lsh.query(hashes[j])):
            lsh.insert(j, hashes[j])
            by_lsh.append(j)
    assert 1 <= len(by_lsh) <= 10  # nearly all of them go
    path = tmp_path / "buf"
    write_buffer(_rows(texts), path, tokenizer_info=TOK, command=["test"], shard_rows=1000, progress=False)
    capsys.readouterr()
    out = tmp_path / "out"
    _, curation = dedup_buffer(path, out, by="completion", near=True, threshold=THRESHOLD, command=["t"], progress=True)
    assert open_buffer(out).table.column("completion").to_pylist() == [texts[j] for j in by_lsh]
    pairs = [int(m) for m in re.findall(r"near pairs: (\d+) pairs", capsys.readouterr().err)]
    bands = Signatures(THRESHOLD).b
    assert pairs and max(pairs) <= len(texts) * bands * len(by_lsh), pairs  # at most each band's kept rows a row


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 10_000),
    batch=st.sampled_from([1, 3, 8, 1000]),
    threshold=st.sampled_from([0.5, 0.8, 0.95]),
)
def test_dedup_near_keeps_what_datasketch_lsh_keeps_on_random_clusters(tmp_path_factory, seed, batch, threshold):
    """Random clusters of texts each a few words from its cluster's base (so rows alike, near and not near, in
    any order), read a few entries at a time (``ENTRY_BATCH``: a row's bands split over two reads, rows of one
    cluster decided within one read and across reads): the rows kept are those datasketch's LSH index keeps when
    queried and filled with the kept rows as they come."""
    from datasketch import MinHashLSH

    import shiq_data.curate.dedup as D

    rng = np.random.default_rng(seed)
    bases = [list(rng.choice(WORDS, int(rng.integers(4, 25)))) for _ in range(int(rng.integers(1, 5)))]
    texts = []
    for _ in range(int(rng.integers(2, 40))):
        words = list(bases[int(rng.integers(len(bases)))])
        for _ in range(int(rng.integers(0, 4))):
            words[int(rng.integers(len(words)))] = str(rng.choice(WORDS))
        texts.append(" ".join(words))
    hashes = [_minhash(t) for t in texts]
    lsh, keys, want = MinHashLSH(threshold=min(threshold, 0.98), num_perm=128), set(), []
    for j, h in enumerate(hashes):
        key = h.hashvalues.tobytes()
        if key in keys or any(hashes[i].jaccard(h) >= threshold for i in lsh.query(h)):
            keys.add(key)
            continue
        keys.add(key)
        lsh.insert(j, h)
        want.append(j)
    tmp = tmp_path_factory.mktemp("random")
    write_buffer(_rows(texts), tmp / "buf", tokenizer_info=TOK, command=["test"], shard_rows=7, progress=False)
    before, D.ENTRY_BATCH = D.ENTRY_BATCH, batch
    try:
        dedup_buffer(tmp / "buf", tmp / "out", by="completion", near=True, threshold=threshold, command=["t"])
    finally:
        D.ENTRY_BATCH = before
    assert open_buffer(tmp / "out").table.column("completion").to_pylist() == [texts[j] for j in want]


def test_dedup_near_rows_of_one_signature_cost_no_pairs(tmp_path, capsys):
    """2,000 texts that differ (so no exact repeat) but have one set of 5-grams, the way a repeated phrase
    does: one MinHash signature. Each pair of them used to be a candidate (2,005,950 pairs); a row whose
    signature repeats an earlier row's is now dropped without a pair. The rows kept are datasketch's LSH index's
    and the naive loop's, including where the cluster's first row is itself dropped by an earlier near row
    (its twins then go through that row). Only the rows of other signatures make pairs."""
    from datasketch import MinHashLSH

    rng = np.random.default_rng(0)
    words = " ".join(rng.choice(WORDS, 30))
    near_first = words + " ha ha ha end!"  # near the cluster below, and before it
    texts = [near_first] + [words + " ha" * k + " end" for k in range(4, 2004)]
    texts += [" ".join(rng.choice(WORDS, 30)) for _ in range(3)] + ["ha " * k + "bye" for k in range(3, 103)]
    hashes = [_minhash(t) for t in texts]
    assert len({_norm(t) for t in texts}) == len(texts)  # no exact repeats
    assert len({h.hashvalues.tobytes() for h in hashes}) == 1 + 1 + 3 + 1  # 6 signatures, 2,104 rows
    assert hashes[0].jaccard(hashes[1]) >= THRESHOLD  # the cluster's first row goes through an earlier row
    naive = []
    for j in range(len(texts)):
        if not any(hashes[i].jaccard(hashes[j]) >= THRESHOLD for i in naive):
            naive.append(j)
    lsh, by_lsh = MinHashLSH(threshold=THRESHOLD, num_perm=128), []
    for j in range(len(texts)):
        if not any(hashes[i].jaccard(hashes[j]) >= THRESHOLD for i in lsh.query(hashes[j])):
            lsh.insert(j, hashes[j])
            by_lsh.append(j)
    assert naive == by_lsh and 1 not in naive and len(naive) == 5
    path = tmp_path / "buf"
    write_buffer(_rows(texts), path, tokenizer_info=TOK, command=["test"], shard_rows=500, progress=False)
    capsys.readouterr()
    out = tmp_path / "out"
    _, curation = dedup_buffer(path, out, by="completion", near=True, threshold=THRESHOLD, command=["t"], progress=True)
    assert open_buffer(out).table.column("completion").to_pylist() == [texts[j] for j in naive]
    assert curation["rows_kept"] == len(naive)
    err = capsys.readouterr().err
    pairs = [int(m) for m in re.findall(r"near pairs: (\d+) pairs", err)]
    assert pairs and max(pairs) <= 15, err[-2000:]  # at most a pair per two of the 6 signatures


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), batch=st.sampled_from([1, 5, 1000]), threshold=st.sampled_from([0.5, 0.8]))
def test_dedup_near_compares_with_every_kept_row_of_each_band(tmp_path_factory, seed, batch, threshold, monkeypatch):
    """Signatures drawn to share bands without being near (each a base signature with a random share of its
    values replaced), so that a band holds several kept rows and a row is near only a later one of them: the rows
    kept are those of a loop over every earlier kept row sharing a band (exact repeats of a signature dropped)."""
    import shiq_data.curate.dedup as D

    rng = np.random.default_rng(seed)
    bases = rng.integers(0, 2**32, (int(rng.integers(1, 4)), 128), dtype=np.uint64)
    sigs = []
    for _ in range(int(rng.integers(2, 60))):
        sig = bases[int(rng.integers(len(bases)))].copy()
        replaced = rng.random(128) < rng.choice([0.0, 0.1, 0.3, 0.6])
        sig[replaced] = rng.integers(0, 4, int(replaced.sum()))  # few values: repeats between rows too
        sigs.append(sig)
    signatures = D.Signatures(threshold)
    want, seen = [], set()
    for j, sig in enumerate(sigs):
        bands = set(enumerate(signatures.bands(sig)))
        repeat = sig.tobytes() in seen
        seen.add(sig.tobytes())
        if repeat or any(
            bands & set(enumerate(signatures.bands(sigs[i]))) and (sigs[i] == sig).mean() >= threshold for i in want
        ):
            continue
        want.append(j)
    monkeypatch.setattr(D.Signatures, "many", lambda self, texts: np.array([sigs[int(p[0].split()[1])] for p in texts]))
    monkeypatch.setattr(D, "ENTRY_BATCH", batch)
    tmp = tmp_path_factory.mktemp("sigs")
    texts = [f"row {k}" for k in range(len(sigs))]
    write_buffer(_rows(texts), tmp / "buf", tokenizer_info=TOK, command=["test"], shard_rows=7, progress=False)
    dedup_buffer(tmp / "buf", tmp / "out", by="completion", near=True, threshold=threshold, command=["t"])
    assert open_buffer(tmp / "out").table.column("completion").to_pylist() == [texts[j] for j in want]


@pytest.mark.parametrize("batch", [1, 1000])
def test_dedup_near_finds_a_row_near_the_second_kept_row_of_a_band(tmp_path, batch, monkeypatch):
    """Rows a and b share band 0 only (not near: kept both, a first); c shares band 0 with both and is near b
    alone, one value off in each of b's other bands (so it shares none of them). c is dropped: a band's further
    kept rows count, not only its first, whether c is read with them or after."""
    import shiq_data.curate.dedup as D

    signatures = D.Signatures(0.8)
    r = signatures.r
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2**32, (2, 128), dtype=np.uint64)
    b[:r] = a[:r]  # band 0 shared
    c = b.copy()
    c[r::r][: signatures.b - 1] += 1  # one value off in each other band
    d = a.copy()
    d[:r] += 1  # near a, sharing its other bands: a row after c in the bands' order, so c is not read last
    sigs = [a, b, c, d]
    bands = [set(enumerate(signatures.bands(x))) for x in sigs[:3]]
    assert bands[0] & bands[1] == bands[1] & bands[2] == bands[0] & bands[2] and len(bands[0] & bands[1]) == 1
    assert (a == b).mean() < 0.8 <= (b == c).mean() and (a == c).mean() < 0.8
    monkeypatch.setattr(D.Signatures, "many", lambda self, texts: np.array([sigs[int(p[0].split()[1])] for p in texts]))
    monkeypatch.setattr(D, "ENTRY_BATCH", batch)
    texts = [f"row {k}" for k in range(4)]
    write_buffer(_rows(texts), tmp_path / "buf", tokenizer_info=TOK, command=["test"], shard_rows=7, progress=False)
    dedup_buffer(tmp_path / "buf", tmp_path / "out", by="completion", near=True, threshold=0.8, command=["t"])
    assert open_buffer(tmp_path / "out").table.column("completion").to_pylist() == ["row 0", "row 1"]


def test_signatures_are_datasketch_minhash_of_each_text(monkeypatch):
    """``Signatures.many`` gives each text exactly ``datasketch.MinHash.update_batch`` of its shingles (texts
    shorter than a shingle, empty ones, non-BMP and NUL characters, a shingle repeated in a text), also when
    the texts are hashed and permuted a few at a time and the remembered hashes are dropped between them."""
    from datasketch import MinHash

    import shiq_data.curate.dedup as D

    rng = np.random.default_rng(3)
    words = WORDS + ["épée", "漢字", "😀x", "a\x00", "Ⅻ"]
    texts = [
        (" ".join(rng.choice(words, rng.integers(0, 80))), " ".join(rng.choice(words, rng.integers(0, 9))))
        for _ in range(200)
    ] + [("", ""), ("a", ""), ("abc", ""), ("ab\x00", ""), ("ab", ""), ("abcde", ""), ("aaaaaaaaaaaa", "")]
    for batches in [(1 << 20, 32_768, 1 << 20), (97, 50, 10)]:
        monkeypatch.setattr(D, "HASH_BATCH", batches[0])
        monkeypatch.setattr(D, "SHINGLE_BATCH", batches[1])
        monkeypatch.setattr(D, "HASH_CACHE", batches[2])
        got = Signatures(THRESHOLD).many(texts)
        for (p, c), sig in zip(texts, got, strict=True):  # a signature for each text
            t = _norm(p) + "\n" + _norm(c)  # (the parts normalised each, joined by a line break)
            m = MinHash(num_perm=128, seed=1)
            m.update_batch([t[i : i + 5].encode() for i in range(len(t) - 4)] if len(t) >= 5 else [t.encode()])
            assert sig.dtype == np.uint32 and (sig == m.hashvalues).all(), (p, c)


def test_signatures_permute_each_texts_distinct_hashes_in_bounded_blocks(monkeypatch):
    """The permuted values (``[NUM_PERM, shingles]``) of one long text were made at once, whatever its length
    (2 GB for a completion of two million characters repeating a few 5-grams, where datasketch's MinHash held
    48 MB): the values are now made in blocks of at most ``SHINGLE_BATCH`` columns, a text spanning blocks
    taking the least of each, and a text longer than a block has its repeated hashes permuted once (here the
    two long texts); the signatures are still datasketch's."""
    from datasketch import MinHash

    import shiq_data.curate.dedup as D

    monkeypatch.setattr(D, "SHINGLE_BATCH", 64)
    widths = []

    class Spy(np.ndarray):  # the permutations' multipliers, noting how many columns each block permutes
        def __mul__(self, other):
            widths.append(np.shape(other)[-1])
            return np.asarray(self) * other

    sig = Signatures(THRESHOLD)
    sig.permutations = (sig.permutations[0].view(Spy), sig.permutations[1])
    rng = np.random.default_rng(0)
    texts = [("ab " * 20_000, ""), (" ".join(rng.choice(WORDS, 300)), ""), ("abc", "")]
    got = sig.many(texts)
    for (p, c), s in zip(texts, got, strict=True):
        t = _norm(p) + "\n" + _norm(c)
        m = MinHash(num_perm=128, seed=1)
        m.update_batch([t[i : i + 5].encode() for i in range(len(t) - 4)] if len(t) >= 5 else [t.encode()])
        assert (s == m.hashvalues).all()
    distinct = [
        len({t[i : i + 5] for i in range(len(t) - 4)} or {t}) for t in (_norm(p) + "\n" + _norm(c) for p, c in texts)
    ]
    assert max(widths) <= 64 and sum(widths) == sum(distinct), (widths, distinct)


def test_dedup_near_hashes_each_distinct_shingle_once(tmp_path, monkeypatch):
    """A near dedup hashes (SHA-1, datasketch's hash function) each distinct shingle of the buffer once, not
    each shingle of each row: a corpus repeats its 5-grams, 300 rows of 60 words of a 20-word vocabulary here
    (some 105,000 shingles, a few hundred distinct). The rows kept are those of the naive datasketch loop."""
    import hashlib
    import types

    import datasketch.hashfunc

    calls = []
    sha1 = hashlib.sha1
    monkeypatch.setattr(
        datasketch.hashfunc, "hashlib", types.SimpleNamespace(sha1=lambda data: calls.append(data) or sha1(data))
    )
    rng = np.random.default_rng(5)
    texts = [" ".join(rng.choice(WORDS, 60)) for _ in range(300)]
    texts[100] = texts[7].replace("apple", "APPLE  ")  # a repeat after normalisation
    write_buffer(_rows(texts), tmp_path / "buf", tokenizer_info=TOK, command=["test"], shard_rows=64, progress=False)
    dedup_buffer(tmp_path / "buf", tmp_path / "out", by="completion", near=True, threshold=THRESHOLD, command=["t"])
    distinct = {t[i : i + 5] for t in map(_norm, texts) for i in range(len(t) - 4)}
    assert sorted(calls) == sorted(g.encode() for g in distinct)
    kept = []
    for t in texts:
        m = _minhash(t)
        if not any(m.jaccard(k) >= THRESHOLD for k in kept):
            kept.append(m)
    assert len(open_buffer(tmp_path / "out")) == len(kept) < len(texts)
