"""``shiq-data show``: rows decoded with the buffer's tokenizer, action spans and rewards marked.

A row prints as a header (row id, source, group, lengths, scalar reward) and its decoded tokens, the
action tokens inside ``⟦ ⟧`` and each nonzero per-token reward as ``⟨r=+1.5⟩`` right after the token it
sits on. Special tokens are shown (they are part of what the model sees). Control characters of the data
(an escape sequence in a completion) are shown escaped, ``\\x1b``, not sent to the terminal, and so are its
bidirectional marks, embeddings, overrides and isolates (U+061C, U+200E, U+200F, U+202A-U+202E, U+2066-U+2069:
``\\u202e``), which would show what follows them reordered; line breaks and tabs of the text are kept.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shiq_data.curate.filter import Selection, row_ids
from shiq_data.curate.rows import CurationSource
from shiq_data.curate.where import Where, shown
from shiq_data.io import printable
from shiq_data.validate import not_unique

OPEN, CLOSE = "⟦", "⟧"


def render(tokens, action_mask, rewards, tokenizer) -> str:
    """The decoded row ``[T]`` with action spans in ``⟦ ⟧`` and ``⟨r=…⟩`` after each rewarded token."""
    tokens = list(tokens)
    mask = np.asarray(action_mask, dtype=bool)
    rewards = np.asarray(rewards, dtype=np.float64)
    n = len(tokens)
    cuts = {0, n}
    cuts.update(int(t) for t in np.flatnonzero(mask[1:] != mask[:-1]) + 1)
    cuts.update(int(t) + 1 for t in np.flatnonzero(rewards))
    cuts = sorted(cuts)
    out, inside = [], False
    for s, e in zip(cuts[:-1], cuts[1:]):
        if mask[s] != inside:
            out.append(OPEN if mask[s] else CLOSE)
            inside = bool(mask[s])
        out.append(printable(tokenizer.decode(tokens[s:e]), keep="\n\t"))  # data, not terminal commands
        if rewards[e - 1] != 0:
            out.append(f"⟨r={rewards[e - 1]:+.4g}⟩")
    if inside:
        out.append(CLOSE)
    return "".join(out)


def _matching(chosen: Selection, row_id: str | None) -> Iterator[tuple[dict, dict]]:
    """``(stored row, derived columns)`` of the rows to show, in buffer order."""
    source = chosen.source
    if chosen.where is not None:
        source.warn_of_shadowed_keys(chosen.where.columns)
    found = 0  # rows with the id ``row_id`` so far, where ``where`` holds or not
    for table, keep in chosen:
        if row_id is not None:
            same = np.flatnonzero(pc.equal(table.column("row_id"), row_id).to_numpy())
            if found + len(same) > 1:  # a second row with the id: which one was asked for is unknown
                raise not_unique(source.shard_path, int(same[1 - found]), row_id)
            found += len(same)
            keep = np.intersect1d(keep, same)
        if not len(keep):
            continue
        part = table.take(pa.array(keep, pa.int64()))
        view = source.view(part, extra_keys=False).to_pylist()
        yield from zip(part.to_pylist(), view)


def show_rows(
    path,
    *,
    rows: int = 5,
    row_id: str | None = None,
    where: str | None = None,
    ids: str | None = None,
    exclude_ids: str | None = None,
) -> list[str]:
    """The first ``rows`` rows of the buffer at ``path`` where ``where`` holds and whose ``row_id`` the file ``ids``
    lists or ``exclude_ids`` does not list (each condition only when given; the lists as ``filter`` reads them,
    :class:`Selection`), or the row ``row_id`` (not with a list), each rendered as a header line and its decoded
    tokens (:func:`render`). A ``row_id`` the buffer holds twice is refused, in validate's words, when it is the one
    asked for (every shard is read for it anyway); the first ``rows`` rows are shown without reading the rest of
    the buffer, but for the row ids of every shard when a list is given (for the warning of the listed ids the
    buffer lacks, as ``filter`` gives it)."""
    if row_id is not None and (ids is not None or exclude_ids is not None):
        option, file = ("--ids", ids) if ids is not None else ("--exclude-ids", exclude_ids)
        raise ValueError(f"--id {row_id} and {option} {file}: give one of them (one row, or the rows of a list)")
    listed = row_ids(ids, exclude_ids)
    source = CurationSource(path)
    chosen = Selection(source, Where(where) if where is not None else None, listed)
    blocks = []
    for row, d in _matching(chosen, row_id):
        head = (  # the stored texts with their control characters escaped, line breaks too: one header line
            f"row {printable(d['row_id'])}  source {printable(d['source'])}  group {d['group_id']}  tokens {d['tokens']} "
            f"(prompt {d['prompt_tokens']}, actions {d['completion_tokens']})  reward {d['reward']:+.4g}"
            + ("  [reference statistics]" if d["has_ref"] else "")
        )
        if d.get("extra") is not None:
            head += f"\n  extra {printable(d['extra'])}"
        blocks.append(head + "\n" + render(row["tokens"], row["action_mask"], row["rewards"], source.tokenizer))
        if row_id is None and len(blocks) >= rows:
            break
    chosen.finish()  # (the shards after the last row shown: their row ids only)
    chosen.warn_of_missing(path)
    if row_id is not None and not blocks:
        raise ValueError(f"{path}: no row with row_id {row_id!r}" + (f" where {shown(where)}" if where else ""))
    return blocks
