"""Seeded, resumable, data-parallel batches from a replay buffer.

The rows (or, in ``groups`` mode, the prompt groups) form an endless stream: the concatenation of
one permutation per epoch, epoch ``e`` shuffled by ``numpy.random.default_rng([seed, e])``. Each
optimizer step takes the next items of the stream for data-parallel rank 0, then rank 1, and so on,
so ranks see disjoint parts of the same permutation, every row appears exactly once per epoch across
ranks, and a step may straddle two epochs (batches are always full). Such a step takes the end of one
permutation and the start of the next, which may hold a row of that end again: the step then holds it twice
(on two ranks, or twice in one micro-batch; a repeated group is two groups), about G**2 / (6 N) rows at each
epoch boundary for G rows a step and N in the buffer. The state is the stream
position, so :meth:`BufferSampler.load_state_dict` continues with exactly the batches an
uninterrupted run would have produced. Neither the stream nor the state depends on ``dp_world``: a run
resumed with another number of data-parallel ranks and the same global batch (``dp_world *
micro_batches_per_step`` micro-batches) reads the same global batches, split differently over ranks.

Modes (all right-padded; padding has ``action_mask`` False, reward 0 and token ``pad_id``):

- ``padded``: ``rows_per_micro_batch`` trajectories per micro-batch, one per row.
- ``packed``: ``rows_per_micro_batch`` rows of at most ``max_tokens_per_row`` tokens, each holding
  several whole trajectories (greedy, in stream order; a trajectory is never split) and
  ``segment_ids`` ``[B, T]``: ``0, 0, …, 1, 1, …`` per trajectory, padding the next id after the last.
- ``groups``: whole prompt groups (all completions sharing a ``group_id``) fill each micro-batch up to
  ``rows_per_micro_batch`` rows, for the pair/group losses (DPO, CoPG; SHIQ_MATH §5); ``group_ids``
  are renumbered ``0..G-1`` within the micro-batch.

Every micro-batch holds ``lengths`` ``[B]`` (int64): each row's number of real tokens, the rest being padding
(what ``shiq_train.prefix_tree`` reads, and the trainer's tokens/s counts; a packed row's is the sum of its
trajectories'). In ``padded`` and ``groups`` modes each also holds ``buffer_rows`` ``[B]`` (int64): the buffer
index of each row (what ``shiq_train.prefix_cache`` looks rows up by).

Reading goes straight from the memory-mapped shards into the batch arrays (only the selected rows'
bytes are copied), so reader memory does not grow with the buffer's size. Opening a buffer reads its token
ids, action masks, rewards and list offsets once, to check every row (``shiq_data.schema.check_row_views``; about half a second
for 100M tokens).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from shiq_data.buffer import buffer_fingerprint
from shiq_data.schema import LIST_FIELDS, REF_FIELDS, ListView, check_row_views, refuse_nulls

MODES = ("padded", "packed", "groups")
STATE_VERSION = 1
# seeds are below this: numpy reads ``[s + 2**32, 0]`` as the 32-bit words ``[s, 1]`` (seed s's epoch 1)
SEED_LIMIT = 2**32
# items of the stream a packed or groups step cuts at a time (a few arrays of this many int64 each): a step's whole
# share of the stream, all ranks', was about 1.5 GiB on every rank at 1,024 ranks of 8 x 4 packed rows of 4096
# tokens over rows of 2..4 tokens; a bin longer than this is cut in a window grown to hold it
WINDOW_ITEMS = 1 << 20


class _RowReader:
    """Random access to rows of a buffer's record batches without copying them out of the memory map."""

    def __init__(self, buffer):
        self.with_ref = bool(buffer.has_ref_stats)
        names = LIST_FIELDS + (REF_FIELDS if self.with_ref else ())
        vocab = int(buffer.manifest["tokenizer"]["vocab_size"])
        self.chunks: list[dict[str, ListView]] = []
        starts, lengths, groups = [0], [], []
        self.shard_paths, self.shard_starts = list(buffer.shard_paths), []  # a row's shard, and its row there
        for k, table in enumerate(buffer.shard_columns(("group_id", *names))):  # never the text columns
            shard_start = starts[-1]
            self.shard_starts.append(shard_start)
            for batch in table.to_batches():
                refuse_nulls(
                    {n: batch.column(n) for n in ("group_id", *names)}, buffer.shard_paths[k], starts[-1] - shard_start
                )
                self.chunks.append({n: ListView(batch.column(n)) for n in names})
                check_row_views(self.chunks[-1], vocab, buffer.shard_paths[k], starts[-1] - shard_start)
                lengths.append(np.diff(self.chunks[-1]["tokens"].offsets))
                groups.append(batch.column("group_id").to_numpy())
                starts.append(starts[-1] + batch.num_rows)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.lengths = np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64)
        self.group_ids = np.concatenate(groups).astype(np.int64) if groups else np.zeros(0, np.int64)
        self.columns = names

    def where(self, i: int) -> tuple[Path, int]:
        """``(shard file, row within it)`` of the buffer's row ``i``."""
        k = int(np.searchsorted(self.shard_starts, i, side="right")) - 1
        return self.shard_paths[k], i - self.shard_starts[k]


class BufferSampler:
    """Micro-batches of one data-parallel rank over a :class:`shiq_data.buffer.Buffer` (see the module doc).

    Args:
        buffer: an opened buffer.
        rows_per_micro_batch: ``B``: trajectories (``padded``), packed rows (``packed``) or at most this
            many rows of whole groups (``groups``) per micro-batch.
        micro_batches_per_step: micro-batches returned by each :meth:`next_micro_batches` call.
        seed: shuffling seed, ``0 <= seed < 2**32`` (epoch ``e`` uses ``default_rng([seed, e])``; numpy
            reads a larger seed as two 32-bit words, so seed ``s + 2**32`` would repeat seed ``s``'s epoch 1).
        dp_rank, dp_world: this rank and the number of data-parallel ranks.
        mode: ``"padded"``, ``"packed"`` or ``"groups"``.
        max_tokens_per_row: packed row width (default: the longest trajectory); in the other modes an
            upper bound every trajectory must respect (a longer one is an error, never truncated).
        pad_id: token id of padding positions.
        width_multiple: every micro-batch's width ``T`` is rounded up to a multiple of this (more
            padding); sequence parallelism needs widths divisible by the tensor-parallel size.
    """

    def __init__(
        self,
        buffer,
        *,
        rows_per_micro_batch: int,
        micro_batches_per_step: int = 1,
        seed: int = 0,
        dp_rank: int = 0,
        dp_world: int = 1,
        mode: str = "padded",
        max_tokens_per_row: int | None = None,
        pad_id: int = 0,
        width_multiple: int = 1,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if rows_per_micro_batch < 1 or micro_batches_per_step < 1:
            raise ValueError(
                f"rows_per_micro_batch ({rows_per_micro_batch}) and micro_batches_per_step "
                f"({micro_batches_per_step}) must be >= 1"
            )
        if not (isinstance(width_multiple, int) and width_multiple >= 1):
            raise ValueError(f"width_multiple must be an integer >= 1, got {width_multiple!r}")
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank must be in [0, dp_world={dp_world}), got {dp_rank}")
        if not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**32), got {seed} (a larger one repeats a smaller seed's order)")
        if len(buffer) == 0:
            raise ValueError(f"buffer {buffer.path} has no rows")
        self.buffer, self.mode, self.seed = buffer, mode, int(seed)
        self.rows_per_micro_batch, self.micro_batches_per_step = int(rows_per_micro_batch), int(micro_batches_per_step)
        self.dp_rank, self.dp_world, self.pad_id = int(dp_rank), int(dp_world), int(pad_id)
        self.width_multiple = width_multiple
        self._reader = _RowReader(buffer)
        lengths = self._reader.lengths
        longest = int(lengths.max())
        self.max_tokens_per_row = int(max_tokens_per_row) if max_tokens_per_row is not None else longest
        if longest > self.max_tokens_per_row:
            i = int(np.argmax(lengths > self.max_tokens_per_row))
            shard, row = self._reader.where(i)
            raise ValueError(
                f"{shard}: row {row}: field 'tokens': {int(lengths[i])} tokens, more than "
                f"max_tokens_per_row={self.max_tokens_per_row} ({int((lengths > self.max_tokens_per_row).sum())} "
                "such rows in the buffer); raise max_tokens_per_row or leave those rows out of the buffer"
            )
        if mode == "groups":
            # group k's rows are _group_order[_group_first[k]:][:_group_sizes[k]] (buffer order), k numbering the
            # group ids in increasing order: three arrays, not one array object per group (splitting 1M groups of
            # 4 rows into arrays took about 10 s and 200 MB on every rank)
            order = np.argsort(self._reader.group_ids, kind="stable")
            sorted_ids = self._reader.group_ids[order]
            first = np.flatnonzero(np.concatenate(([True], sorted_ids[1:] != sorted_ids[:-1])))
            ids = sorted_ids[first]
            del sorted_ids
            self._group_order, self._group_first = order, first
            sizes = np.diff(np.append(first, len(order)))
            if sizes.max() > self.rows_per_micro_batch:
                g = int(np.argmax(sizes))
                raise ValueError(
                    f"buffer {buffer.path}: group {int(ids[g])} has {int(sizes[g])} rows, more than "
                    f"rows_per_micro_batch={self.rows_per_micro_batch}; groups are never split"
                )
            self._group_sizes = sizes
            self._units = len(ids)
        else:
            self._units = len(buffer)
        self._mean_size = float(self._group_sizes.mean() if mode == "groups" else lengths.mean())
        # 100000 rows on a buffer of 8 took every row 12,500 times in each micro-batch; in groups mode the value
        # bounds the rows of the whole groups taken, which repeat a group once every row and one more group fit
        room = len(buffer) + (int(self._group_sizes.min()) - 1 if mode == "groups" else 0)
        if self.rows_per_micro_batch > room:
            raise ValueError(
                f"rows_per_micro_batch={rows_per_micro_batch} (shiq-train's data.rows_per_micro_batch) is more than "
                f"the {len(buffer)} rows of buffer {buffer.path}"
                + (f" and its smallest group less one ({room})" if room != len(buffer) else "")
                + ": a micro-batch would hold rows more than once"
            )
        # a packed row stops only when the next trajectory (at most the longest) does not fit: it holds more than
        # max_tokens_per_row - longest tokens, so a micro-batch holding more than the buffer's repeats rows
        total = int(lengths.sum())
        if mode == "packed" and self.rows_per_micro_batch * (self.max_tokens_per_row - longest + 1) > total:
            raise ValueError(
                f"rows_per_micro_batch={rows_per_micro_batch} packed rows of max_tokens_per_row="
                f"{self.max_tokens_per_row} tokens (shiq-train's data.rows_per_micro_batch and "
                f"model.max_sequence_length) hold more than the {total} tokens of buffer {buffer.path}: a micro-batch "
                "would hold rows more than once; use fewer or narrower packed rows, or data.mode=padded"
            )
        self._epoch, self._position = 0, 0
        self._perm_epoch, self._perm = -1, None

    # --- the stream ---------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Epoch of the next item of the stream (0-based)."""
        return self._epoch

    def _stream(self, n: int) -> np.ndarray:
        """The next ``n`` items of the stream (slices of the epoch permutations), without taking them."""
        epoch, position, parts = self._epoch, self._position, []
        while n > 0:
            if self._perm_epoch != epoch:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self._units)
                self._perm_epoch = epoch
            parts.append(self._perm[position : position + n])
            n -= len(parts[-1])
            epoch, position = epoch + 1, 0
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _advance(self, n: int) -> None:
        """Take the next ``n`` items of the stream."""
        epochs, self._position = divmod(self._position + n, self._units)
        self._epoch += epochs

    def _bins(self, sizes: np.ndarray, cap: int, count: int, keep: range) -> list[np.ndarray]:
        """Take the next ``count`` bins of the stream, each the next items while their ``sizes`` sum to at most
        ``cap`` (every size is at most ``cap``, so a bin holds at least one item); return the items of the bins
        numbered in ``keep``. Greedy in stream order, the bins' ends found for a window of items at once: an item
        ``i`` starting a bin ends it before ``searchsorted(cum, cum[i] + cap, "right") - 1``."""
        kept, made, limit = [], 0, WINDOW_ITEMS
        per_bin = cap / self._mean_size + 1  # items a bin holds, about; a short window is simply extended
        while made < count:
            window = self._stream(min(int((count - made) * per_bin * 1.1) + 16, limit))
            cum = np.concatenate(([0], np.cumsum(sizes[window])))
            ends = np.searchsorted(cum, cum[:-1] + cap, side="right") - 1
            i, n = 0, len(window)
            # a bin ending at the window's end may go on past it: the next window starts with it
            while made < count and (end := int(ends[i])) < n:
                if made in keep:
                    kept.append(window[i:end])
                i, made = end, made + 1
            if i == 0:  # not one whole bin in the window: a longer one
                per_bin, limit = per_bin * 2, max(limit, 2 * n)
            self._advance(i)
        return kept

    # --- batches ------------------------------------------------------------------------------
    def next_micro_batches(self) -> list[dict]:
        """This rank's ``micro_batches_per_step`` micro-batches of the next step (dicts of tensors).

        Every rank takes the whole step's items of the stream (rank 0's micro-batches, then rank 1's, ...)
        and materialises its own: packed rows and groups are cut in one pass over the step's items."""
        B, M, W, rank = self.rows_per_micro_batch, self.micro_batches_per_step, self.dp_world, self.dp_rank
        if self.mode == "padded":
            items = self._stream(W * M * B)[rank * M * B : (rank + 1) * M * B]
            self._advance(W * M * B)
            layouts = [[[r] for r in items[m * B : (m + 1) * B].tolist()] for m in range(M)]
        elif self.mode == "packed":
            rows = self._bins(
                self._reader.lengths, self.max_tokens_per_row, W * M * B, range(rank * M * B, (rank + 1) * M * B)
            )
            layouts = [[r.tolist() for r in rows[m * B : (m + 1) * B]] for m in range(M)]
        else:
            groups = self._bins(self._group_sizes, B, W * M, range(rank * M, (rank + 1) * M))
            layouts = [self._group_rows(g) for g in groups]
        return [self._materialise(layout) for layout in layouts]

    def _group_rows(self, groups: np.ndarray) -> list[list[int]]:
        """``[row index, group number within the micro-batch]`` per output row of a micro-batch of ``groups``."""
        out = []
        for n, k in enumerate(groups.tolist()):
            start = self._group_first[k]
            out += [[r, n] for r in self._group_order[start : start + self._group_sizes[k]].tolist()]
        return out

    def _materialise(self, layout: list[list[int]]) -> dict:
        """Tensors for a micro-batch; ``layout[b]`` lists the rows of output row ``b`` (one unless packed;
        in groups mode ``[row, group number]``)."""
        reader = self._reader
        if self.mode == "groups":
            group_numbers = [g for _, g in layout]
            layout = [[r] for r, _ in layout]
        B = len(layout)
        rows = np.fromiter((r for rs in layout for r in rs), dtype=np.int64)
        chunk_of = np.searchsorted(reader.starts, rows, side="right") - 1
        local = (rows - reader.starts[chunk_of]).tolist()
        lengths = reader.lengths[rows]
        out_row = np.repeat(np.arange(B), [len(rs) for rs in layout])
        T = int(np.bincount(out_row, weights=lengths, minlength=B).max())
        T = -(-T // self.width_multiple) * self.width_multiple
        tokens = np.full((B, T), self.pad_id, dtype=np.int64)
        mask = np.zeros((B, T), dtype=bool)
        rewards = np.zeros((B, T), dtype=np.float32)
        dense = [("tokens", tokens), ("rewards", rewards)]
        dense += [(n, np.zeros((B, T), dtype=np.float32)) for n in REF_FIELDS] if reader.with_ref else []
        segments = np.zeros((B, T), dtype=np.int64) if self.mode == "packed" else None
        at, prev_b, k = 0, -1, 0
        for b, c, i, n in zip(out_row.tolist(), chunk_of.tolist(), local, lengths.tolist()):
            if b != prev_b:
                if segments is not None and prev_b >= 0:
                    segments[prev_b, at:] = k  # padding: its own trailing segment
                at, prev_b, k = 0, b, 0
            chunk = reader.chunks[c]
            for name, dst in dense:
                view = chunk[name]
                s = view.offsets[i]
                dst[b, at : at + n] = view.values[s : s + n]
            mask[b, at : at + n] = chunk["action_mask"].get(i)
            if segments is not None:
                segments[b, at : at + n] = k
            at, k = at + n, k + 1
        if segments is not None:
            segments[prev_b, at:] = k
        out = {
            "tokens": torch.from_numpy(tokens),
            "action_mask": torch.from_numpy(mask),
            "rewards": torch.from_numpy(rewards),
        }
        out.update({n: torch.from_numpy(a) for n, a in dense[2:]})
        if self.mode == "packed":
            out["segment_ids"] = torch.from_numpy(segments)
        elif self.mode == "groups":
            out["group_ids"] = torch.tensor(group_numbers, dtype=torch.int64)
        else:
            out["group_ids"] = torch.from_numpy(reader.group_ids[rows])
        if self.mode != "packed":
            out["buffer_rows"] = torch.from_numpy(rows.copy())
        out["lengths"] = torch.from_numpy(np.bincount(out_row, weights=lengths, minlength=B).astype(np.int64))
        return out

    def __iter__(self) -> Iterator[list[dict]]:
        while True:
            yield self.next_micro_batches()

    # --- resuming -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The stream position (JSON-able); the same for every rank."""
        return {
            "version": STATE_VERSION,
            "mode": self.mode,
            "seed": self.seed,
            "units": self._units,
            "rows": len(self.buffer),
            "epoch": self._epoch,
            "position": self._position,
            "buffer": buffer_fingerprint(self.buffer.manifest),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from :meth:`state_dict`); refuses a state of another buffer, mode or seed."""
        mine = self.state_dict()
        # the buffer first: one rebuilt at its path (of any size) is named as such, not as a count that differs
        if "buffer" in state and state["buffer"] != mine["buffer"]:  # (states saved before it was kept: not checked)
            raise ValueError(
                f"sampler state does not match this sampler: the buffer {self.buffer.path} holds other shards than "
                "when the state was saved (another buffer written at its path, or one whose reference statistics "
                "were added since): train in a new out folder"
            )
        for key in ("version", "mode", "seed", "units", "rows"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"sampler state does not match this sampler: {key} is {state.get(key)!r} in the "
                    f"state, {mine[key]!r} here (buffer {self.buffer.path})"
                )
        if not 0 <= int(state["position"]) < self._units or int(state["epoch"]) < 0:
            raise ValueError(
                f"sampler state has position {state['position']} / epoch {state['epoch']} outside [0, {self._units})"
            )
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
