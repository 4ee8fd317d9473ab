"""Reference statistics for a replay buffer: the frozen model's ``c_ref`` and ``z_ref`` of every token.

ShiQ and its relatives need the reference model's chosen logit and log-partition at every position
(SHIQ_MATH §2). Computing them once, offline, lets training run without a second model in memory.
This module is the buffer side: :func:`compute_ref_stats` runs a ``stats_fn`` over each shard in
length-sorted, right-padded batches and commits the two columns shard by shard
(:func:`shiq_data.buffer.add_ref_columns`: atomic per shard, the manifest records done shards), so a
killed run resumes at the first unfinished shard. Building and running the model is
``shiq_train.reference`` (the ``shiq-train ref-stats`` command).

``stats_fn(tokens [B, T] int64, attention_mask [B, T] bool) -> (chosen [B, T], logz [B, T])``, torch
tensors or numpy arrays, aligned like ``shiq_train.stats.causal_lm_stats`` (position ``t`` = token
``t`` given the tokens before it; position 0 is 0). With right padding a causal model's values at
real positions do not depend on the padding; values at padded positions are discarded.

Rows of one group (several completions of a prompt; a trajectory and its edits) begin with the same
tokens. A ``stats_fn`` with a ``with_prefix(rows, shared, max_batch_tokens)`` attribute (a KV-cache
capable model: ``shiq_train.reference.hf_stats_fn``) runs those ``shared`` tokens once per group and
each row's remainder from their cache; its values are the same up to float rounding. With a
``with_prefixes(groups, max_batch_tokens)`` generator too, small groups share a batch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from shiq_data.buffer import REF_DEFAULT_DTYPE, add_ref_columns, open_buffer, read_shard, shards_without_ref
from shiq_data.io import progress_bar
from shiq_data.schema import check_rows

Stats = torch.Tensor | np.ndarray
StatsFn = Callable[[torch.Tensor, torch.Tensor], tuple[Stats, Stats]]

DEFAULT_BATCH_TOKENS = 2048
MIN_SHARED_TOKENS = 32  # a group's common prefix shorter than this is not worth a pass of its own
DEFAULT_DTYPE = REF_DEFAULT_DTYPE  # what buffers that record no dtype were computed in


def ref_stats_dtype(manifest: dict) -> str:
    """The dtype (``float32``, ``bfloat16``) the reference statistics of a buffer were computed in, as its
    manifest's ``ref_model.dtype`` records it; :data:`DEFAULT_DTYPE` for buffers that record none."""
    model = manifest.get("ref_model")
    dtype = model.get("dtype") if isinstance(model, dict) else None
    return dtype if isinstance(dtype, str) else DEFAULT_DTYPE


def length_sorted_batches(lengths: list[int], max_batch_tokens: int) -> list[list[int]]:
    """Row indices grouped into batches of similar length whose padded size ``B * max(T)`` stays
    within ``max_batch_tokens`` (a longer row forms a batch of its own). Longest rows first."""
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]  # the batch's first row is its longest
        if current and (len(current) + 1) * width > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_right(token_lists: list, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [B, T] int64, attention_mask [B, T] bool)`` with each row left-aligned."""
    width = max(len(t) for t in token_lists)
    tokens = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(token_lists), width, dtype=torch.bool)
    for b, t in enumerate(token_lists):
        tokens[b, : len(t)] = torch.from_numpy(np.array(t, dtype=np.int64))
        mask[b, : len(t)] = True
    return tokens, mask


def _float32(values: Stats) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float32)


def common_prefix(rows: list) -> int:
    """The number of leading tokens all ``rows`` share."""
    n = min(len(r) for r in rows)
    first = np.asarray(rows[0][:n])
    for r in rows[1:]:
        differ = np.nonzero(np.asarray(r[:n]) != first[:n])[0]
        n = int(differ[0]) if differ.size else n
    return n


def rows_ref_stats(
    token_lists: list,
    stats_fn: StatsFn,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
    on_batch: Callable[[int], None] | None = None,
    groups: list[int] | None = None,
    shard=None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per row, ``(c_ref [T], z_ref [T])`` float32 numpy arrays from ``stats_fn`` (SHIQ_MATH §2).

    ``groups`` (a group id per row): when ``stats_fn`` has ``with_prefix``, the rows of a group whose
    common prefix has at least :data:`MIN_SHARED_TOKENS` tokens go through it (the prefix once per group;
    through ``with_prefixes``, several groups to a batch, when ``stats_fn`` has it);
    the other rows through ``stats_fn`` in length-sorted batches. ``on_batch(n_tokens)`` is called after
    each batch or group (progress reporting). ``shard``: the file the rows are read from, named with a row's
    number in its errors.
    """
    chosen: list = [None] * len(token_lists)
    logz: list = [None] * len(token_lists)
    lengths = [len(t) for t in token_lists]

    def keep(i: int, ci: np.ndarray, zi: np.ndarray) -> None:
        ci, zi = ci[: lengths[i]].copy(), zi[: lengths[i]].copy()
        if not (np.isfinite(ci).all() and np.isfinite(zi).all()):
            if shard is not None:
                raise ValueError(f"{shard}: row {i}: stats_fn returned non-finite reference statistics")
            raise ValueError(f"stats_fn returned non-finite reference statistics for row {i}")
        ci[0] = zi[0] = 0.0  # nothing predicts the first token
        chosen[i], logz[i] = ci, zi

    rest = list(range(len(token_lists)))
    if groups is not None and hasattr(stats_fn, "with_prefix"):
        members: dict[int, list[int]] = {}
        for i, g in enumerate(groups):
            members.setdefault(int(g), []).append(i)
        rest, shared_groups = [], []
        for idx in members.values():
            rows = [token_lists[i] for i in idx]
            shared = common_prefix(rows) if len(idx) > 1 else 0
            if shared < MIN_SHARED_TOKENS:
                rest += idx
            else:
                shared_groups.append((idx, rows, shared))
        if hasattr(stats_fn, "with_prefixes"):  # several small groups to a batch
            results = stats_fn.with_prefixes([(rows, shared) for _, rows, shared in shared_groups], max_batch_tokens)
        else:
            results = (stats_fn.with_prefix(rows, shared, max_batch_tokens) for _, rows, shared in shared_groups)
        for (idx, _, _), values in zip(shared_groups, results, strict=True):
            for i, (c, z) in zip(idx, values, strict=True):
                keep(i, _float32(c), _float32(z))
            if on_batch is not None:
                on_batch(sum(lengths[i] for i in idx))
    for batch in length_sorted_batches([lengths[i] for i in rest], max_batch_tokens):
        batch = [rest[b] for b in batch]
        tokens, mask = pad_right([token_lists[i] for i in batch])
        c, z = (_float32(v) for v in stats_fn(tokens, mask))
        for name, value in (("chosen_logits", c), ("logz", z)):
            if tuple(value.shape) != tuple(tokens.shape):
                raise ValueError(
                    f"stats_fn returned {name} of shape {tuple(value.shape)} for tokens {tuple(tokens.shape)}"
                )
        for b, i in enumerate(batch):
            keep(i, c[b], z[b])
        if on_batch is not None:
            on_batch(int(mask.sum()))
    return chosen, logz


def compute_ref_stats(
    buffer_dir,
    stats_fn: StatsFn,
    *,
    ref_model: dict,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
    progress: bool = True,
    dtype: str = DEFAULT_DTYPE,
) -> list[int]:
    """Add ``ref_chosen_logits`` / ``ref_logz`` to every shard of a buffer that lacks them.

    Each shard is committed atomically as soon as it is done (``manifest.json`` records it under
    ``ref_stats.done``), so re-running after a kill continues with the first unfinished shard.
    ``ref_model`` (JSON-able, e.g. ``{"name": "smollm2", "fingerprint": ...}``) is recorded in the
    manifest together with ``dtype``, the precision ``stats_fn``'s model runs in (training in another
    ``params_dtype`` is refused by ``shiq-train``); a buffer holding another model's statistics is refused.
    Returns the shard indices computed by this call.
    """
    ref_model = {**ref_model, "dtype": dtype}
    buffer = open_buffer(buffer_dir)
    todo = shards_without_ref(buffer_dir, ref_model)
    entries = buffer.manifest["shards"]
    bar_total = sum(entries[i]["tokens"] for i in todo)
    desc = f"reference statistics {Path(buffer_dir).name}"
    with progress_bar(  # cleared if a shard is refused, so the error starts on a clean line
        bool(progress and todo),
        total=bar_total,
        desc=desc,
        unit=" tok",
        unit_scale=True,
        file=sys.stderr,
        mininterval=1.0,
    ) as bar:
        for i in todo:
            path = Path(buffer_dir) / entries[i]["file"]
            table = read_shard(path)
            check_rows({"tokens": table.column("tokens")}, int(buffer.manifest["tokenizer"]["vocab_size"]), path)
            chosen, logz = rows_ref_stats(
                list(table.column("tokens").to_numpy(zero_copy_only=False)),
                stats_fn,
                max_batch_tokens,
                on_batch=bar.update if progress else None,
                groups=table.column("group_id").to_pylist(),
                shard=path,
            )
            add_ref_columns(buffer_dir, i, chosen, logz, ref_model=ref_model)
    return todo
