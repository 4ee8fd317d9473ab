"""Human-rated movie-review snippets (Hutto & Gilbert, ICWSM 2014) for the sentiment demo task.

The ratings ship inside the ``vaderSentiment`` source archive as
``additional_resources/hutto_ICWSM_2014.tar.gz`` -> ``movieReviewSnippets_GroundTruth.txt``: tab-separated
``id, mean rating in [-4, 4], text``. They are read straight from the archive (nothing is extracted).
"""

from __future__ import annotations

import io
import math
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

from shiq_data.assets import vader_archive

INNER = "additional_resources/hutto_ICWSM_2014.tar.gz"
MEMBER = "movieReviewSnippets_GroundTruth.txt"
# The demo's instruction (configs/demo.yaml, data.instruction), before the opening words.
DEMO_INSTRUCTION = "Continue this movie review in one or two sentences: "


@dataclass(frozen=True)
class RatedText:
    id: int
    rating: float
    text: str


def parse_ratings(raw: str, source: str) -> list[RatedText]:
    """Parse ``id<TAB>rating<TAB>text`` lines; errors name the source, line and field."""
    rows, seen = [], {}  # id -> its line: an id given twice could land on both sides of the split
    for n, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(
                f"{source}, line {n}: expected 3 tab-separated fields (id, rating, text), got {len(parts)}"
            )
        try:
            rid = int(parts[0])
        except ValueError:
            raise ValueError(f"{source}, line {n}, field 'id': not an integer: {parts[0]!r}") from None
        if rid in seen:
            raise ValueError(f"{source}, line {n}, field 'id': {rid} is the id of line {seen[rid]} too")
        seen[rid] = n
        try:
            rating = float(parts[1])
        except ValueError:
            raise ValueError(f"{source}, line {n}, field 'rating': not a number: {parts[1]!r}") from None
        if not math.isfinite(rating):
            raise ValueError(f"{source}, line {n}, field 'rating': not finite: {parts[1]!r}")
        text = parts[2].strip()
        if not text:
            raise ValueError(f"{source}, line {n}, field 'text': empty")
        rows.append(RatedText(rid, rating, text))
    return rows


def load_movie_snippets(archive: str | Path) -> list[RatedText]:
    """All rated movie-review snippets from the ``vaderSentiment`` source archive."""
    archive = Path(archive)
    with tarfile.open(archive, "r:gz") as outer:
        inner_member = next((m for m in outer.getmembers() if m.name.endswith(INNER)), None)
        if inner_member is None:
            raise ValueError(f"{archive}: no member ending in {INNER}")
        inner_bytes = outer.extractfile(inner_member).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        member = next((m for m in inner.getmembers() if m.name.endswith(MEMBER)), None)
        if member is None:
            raise ValueError(f"{archive}!{INNER}: no member ending in {MEMBER}")
        raw = inner.extractfile(member).read().decode("utf-8")
    return parse_ratings(raw, f"{archive}!{member.name}")


def split_ids(rows: list[RatedText], *, held_out: float, seed: int) -> dict[str, list[int]]:
    """A seeded split of snippet ids into ``train`` and ``held_out`` (disjoint, sorted)."""
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be a fraction in (0, 1), got {held_out}")
    ids = sorted(r.id for r in rows)
    random.Random(seed).shuffle(ids)
    k = round(len(ids) * held_out)
    return {"train": sorted(ids[k:]), "held_out": sorted(ids[:k])}


def opening(text: str, n_words: int) -> str:
    """The first ``n_words`` words of a snippet: the prompt the policy continues."""
    return " ".join(text.split()[:n_words])


def movie_prompts(
    n: int, held_out: float = 0.2, words: int = 6, seed: int = 0, instruction: str = DEMO_INSTRUCTION
) -> tuple[list[str], list[str]]:
    """Held-out movie-review openings of the demo's split under ``seed``: ``(instruction + opening, opening)``
    for the first ``n`` held-out snippets (by id) longer than their opening, as the demo's prompts are (a
    snippet of ``words`` words or fewer would be its own opening, nothing left to continue). Not the demo's
    evaluation prompts, a seeded sample of the same snippets."""
    rows = load_movie_snippets(vader_archive())
    by_id = {r.id: r for r in rows}
    held = split_ids(rows, held_out=held_out, seed=seed)["held_out"]
    ids = [i for i in held if len(by_id[i].text.split()) > words][:n]
    openings = [opening(by_id[i].text, words) for i in ids]
    return [instruction + o for o in openings], openings
