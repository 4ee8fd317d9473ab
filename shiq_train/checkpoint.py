"""Checkpoints of a megatron model + optimizer that resume exactly in the same layout and, optimizer state
included, under another tensor-, (virtual) pipeline- or data-parallel layout; and full-parameter gathering.

Layout on disk (one directory per saved step)::

    <dir>/step_00000010/meta.json                      step, parallel layout, user metadata
    <dir>/step_00000010/meta.json.sha256               its SHA-256, written before it and checked by every
                                                       reader (:func:`read_meta`)
    <dir>/step_00000010/rank_tp0_pp0_dp0.pt            this rank's parameter shards and their layout,
                                                       optimizer state by parameter name, scheduler
                                                       state, RNG states (CPU, CUDA, and megatron's
                                                       tracker), user state
    <dir>/step_00000010/rank_tp0_pp0_dp1.pt            another data-parallel rank's: scheduler, RNG and
                                                       user state, and its own slices of the
                                                       distributed optimizer's state (the parameters
                                                       and a replicated optimizer's state are its data-
                                                       parallel rank 0's, saved there once)
    <dir>/step_00000010/rank_tp0_pp0_dp0.pt.sha256     its SHA-256 (``sha256sum`` format), checked
                                                       before any rank reads the file, by one rank
                                                       (:func:`check_rank_files`)
    <dir>/latest                                       name of the newest complete step directory

A rank file records for every local parameter its full name in the TP=1, PP=1 model
(:func:`shiq_train.model.full_param_name`), its tensor-parallel split dimension and whether it is a
gated MLP's ``[gate; up]`` stack (:func:`shiq_train.model.tp_layout`), and holds the optimizer state
keyed by the local parameter name (:func:`optimizer_state_by_name`: AdamW's moments and step, the float32
master weights of a :class:`~shiq_train.train_step.MasterWeightOptimizer`). Data-parallel ranks hold the same
parameters and the default optimizer the same state, so only data-parallel rank 0 saves them; megatron's
distributed optimizer (``optimizer.distributed=true``) holds a slice of the master weights and moments on each
data-parallel rank, and each rank saves its own (``shiq_train.dist_optim.DistributedAdamW.state_by_name``):
nothing is gathered and every value is written once, by the rank that holds it. With virtual pipeline stages
(interleaved 1F1B) the model is this rank's list of chunks; a pipeline rank's file holds them all, each local
name prefixed by its chunk (``chunk1.decoder.layers.0...``, :func:`shiq_train.model.chunk_key`), and
``meta.json``'s layout records ``vpp``.

Resuming in the saved layout reads the rank's own file (and its data-parallel rank 0's parameters,
memory-mapped) and continues bit-for-bit, RNG included; the distributed optimizer takes its own slices back
as they are (no data moves between ranks), or, where they are not its own (the default optimizer resuming, or
other buffers), each parameter's slices put together. Under another layout every rank reads the saved
data-parallel rank 0 files (memory-mapped: only the tensors it needs are read), and the distributed
optimizer's slices from every data-parallel rank's file, puts each of its parameters and their optimizer
state together by full name, one parameter at a time, and cuts its own shard
(``shiq_train.weights.reshard_tensor``); scheduler, step, user state and torch's CPU (and CUDA)
generator come from the saved global rank 0. An exact RNG continuation across layouts does not exist
(megatron's tracker holds one stream per tensor-parallel rank), so the tracker keeps the states this run
seeded at start-up: dropout masks then differ from an uninterrupted run's, while dropout-free training
continues with the same losses up to float rounding. The user state should be the same on every rank (the
trainer's data position is). Files written before the layouts were recorded (format 1) resume in their own
layout only; format 2 (every rank's parameters, the distributed optimizer's state gathered on data-parallel
rank 0) resumes in any.

Modules' extra state is not saved: Transformer Engine keeps its FP8 scaling history (amax and scales) there as a
pickled object and unpickles it to restore it, while a checkpoint here is data only (read with
``weights_only=True``, nothing in it unpickled). An FP8 run therefore resumes with that history restarted from its
defaults.

Every file is written to a temporary name and renamed into place; ``latest`` moves only after every
rank has written (a barrier), so an interrupted save never becomes the resume point.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from shiq_data.io import (
    STEP_FOLDER,
    atomic_write,
    check_sha256,
    check_sha256_if_kept,
    check_step_folder,
    non_finite_as_null,
    one_line,
    read_json_file,
    step_folders,
    write_checksum,
)
from shiq_train.dist_optim import full_groups, is_sliced, merge_slices
from shiq_train.model import full_param_name, named_chunk_parameters, tp_layout
from shiq_train.parallel import device, device_type
from shiq_train.train_step import MasterWeightOptimizer
from shiq_train.weights import full_shape, rank_file_name, reshard_tensor, unshard_tensors


def _layout() -> dict:
    from megatron.core import parallel_state as ps  # heavy: megatron

    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size() or 1,
    }


def _rank_file(step_dir: Path, lay: dict) -> Path:
    return step_dir / rank_file_name(lay["tp_rank"], lay["pp_rank"], lay["dp_rank"])


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker  # heavy: megatron

    state = {
        "cpu": torch.get_rng_state(),
        "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker  # heavy: megatron

    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states({k: v.clone() for k, v in state["tracker"].items()})


# 3: what data-parallel ranks hold alike (parameters, the default optimizer's state) in data-parallel rank 0's
# files only, the distributed optimizer's state in every rank's own slices; 2: every rank's file holds its
# parameters and layouts, the optimizer state by parameter name (the distributed optimizer's gathered on
# data-parallel rank 0); 1: neither layouts nor names
FORMAT = 3
BY_NAME = (2, 3)  # the formats with parameter layouts and the optimizer state by name


def param_layout(model) -> dict[str, dict]:
    """``{local name: {"name": full name, "dim": partition dim or None, "glu": bool}}`` of every parameter of
    this rank's ``model`` (:func:`shiq_train.model.full_param_name`, :func:`shiq_train.model.tp_layout`):
    what a saved shard needs to be put back together under another layout. With virtual pipeline stages
    ``model`` is the list of this rank's chunks and the local names carry the chunk
    (:func:`shiq_train.model.chunk_key`); the full names are the whole model's either way."""
    out = {}
    for key, chunk, name, p in named_chunk_parameters(model):
        dim, glu = tp_layout(chunk, name, p)
        out[key] = {"name": full_param_name(chunk, name), "dim": dim, "glu": glu}
    return out


def _local_parameters(model) -> dict:
    """``{local name: parameter}`` of this rank's model or chunks (the names of :func:`param_layout`)."""
    return {key: p for key, _, _, p in named_chunk_parameters(model)}


def _optimizer_slots(model, optimizer) -> tuple[torch.optim.Optimizer, list[tuple[str, int]]]:
    """The torch optimizer doing the updates (a :class:`MasterWeightOptimizer`'s inner one) and, in its
    state_dict's index order, ``(local parameter name, param group)`` of every tensor it updates."""
    names = {id(p): n for n, p in _local_parameters(model).items()}
    inner = optimizer.inner if isinstance(optimizer, MasterWeightOptimizer) else optimizer
    if isinstance(optimizer, MasterWeightOptimizer):  # the inner optimizer updates the masters
        names = {id(m): names[id(p)] for p, m in zip(optimizer.params, optimizer.masters)}
    slots = []
    for g, group in enumerate(inner.param_groups):
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError("the optimizer updates a tensor that is not a parameter of the model")
            slots.append((names[id(p)], g))
    return inner, slots


def optimizer_state_by_name(model, optimizer) -> dict:
    """The optimizer's state keyed by this rank's local parameter names, so it can be reassembled by
    parameter under another layout: ``{"groups": [hyper-parameters of each param group], "params": {local
    name: {"group": g, "state": {key: value}, "master": float32 master weight (only with
    MasterWeightOptimizer)}}}``. For AdamW ``state`` holds ``exp_avg``, ``exp_avg_sq`` (each shaped like the
    parameter shard) and ``step``; a parameter the optimizer has not stepped yet has an empty ``state``.

    An optimizer whose state is sharded over data-parallel ranks provides its own form, this rank's part of it,
    with a ``state_by_name(model)`` method (and ``load_state_by_name(model, state)`` for
    :func:`load_optimizer_state_by_name`); :func:`save_checkpoint` saves it on every data-parallel rank, the
    default optimizer's state on data-parallel rank 0 only."""
    if hasattr(optimizer, "state_by_name"):
        return optimizer.state_by_name(model)
    inner, slots = _optimizer_slots(model, optimizer)
    sd = inner.state_dict()
    params = {name: {"group": g, "state": sd["state"].get(i, {})} for i, (name, g) in enumerate(slots)}
    if isinstance(optimizer, MasterWeightOptimizer):
        names = {id(p): n for n, p in _local_parameters(model).items()}
        for p, m in zip(optimizer.params, optimizer.masters):
            params[names[id(p)]]["master"] = m.detach().clone()
    groups = [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in sd["param_groups"]]
    return {"groups": groups, "params": params}


def load_optimizer_state_by_name(model, optimizer, state: dict) -> None:
    """Restore :func:`optimizer_state_by_name`'s form, whose tensors are this rank's shards (the saved ones,
    or resharded from another layout). A parameter without saved state (frozen when saved) starts afresh;
    master weights without a saved copy start from the (just loaded) parameter."""
    if hasattr(optimizer, "load_state_by_name"):
        optimizer.load_state_by_name(model, state)
        return
    inner, slots = _optimizer_slots(model, optimizer)
    sd = inner.state_dict()
    if len(state["groups"]) != len(sd["param_groups"]):
        raise ValueError(
            f"the checkpoint's optimizer has {len(state['groups'])} parameter groups, this one "
            f"{len(sd['param_groups'])} (a different optimizer?)"
        )
    restored = {}
    tensors = [p for group in inner.param_groups for p in group["params"]]  # in the order of ``slots``
    for i, (name, g) in enumerate(slots):
        saved = state["params"].get(name)
        if saved is None:
            continue
        if saved["group"] != g:
            raise ValueError(f"parameter {name} is in optimizer group {saved['group']} in the checkpoint, {g} here")
        for key, value in [*saved["state"].items(), ("master", saved.get("master"))]:
            # a moment of another shape would be read past its end by the fused AdamW kernel
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != tensors[i].shape:
                raise ValueError(
                    f"the checkpoint's optimizer state of parameter {name}: {key} has shape {list(value.shape)}, the "
                    f"parameter {list(tensors[i].shape)} (a damaged rank file)"
                )
        if saved["state"]:
            restored[i] = saved["state"]
    groups = [{**saved, "params": g["params"]} for saved, g in zip(state["groups"], sd["param_groups"])]
    inner.load_state_dict({"state": restored, "param_groups": groups})
    if isinstance(optimizer, MasterWeightOptimizer):
        names = {id(p): n for n, p in _local_parameters(model).items()}
        with torch.no_grad():
            for p, m in zip(optimizer.params, optimizer.masters):
                saved = state["params"].get(names[id(p)], {}).get("master")
                m.copy_(saved if saved is not None else p)


def save_checkpoint(
    directory,
    step: int,
    model,
    optimizer=None,
    scheduler=None,
    user_state: dict | None = None,
    meta: dict | None = None,
) -> Path:
    """Save this rank's part of the training state at ``step``; collective (every rank calls it).

    ``user_state`` (per rank, e.g. the data sampler's position) is returned by :func:`load_checkpoint`
    (under another layout, global rank 0's); ``meta`` (JSON-serialisable, e.g. the resolved config) goes to
    ``meta.json``. Returns the step directory.
    """
    directory = Path(directory)
    step_dir = directory / f"step_{step:08d}"
    lay = _layout()
    if dist.get_rank() == 0:
        step_dir.mkdir(parents=True, exist_ok=True)
    _barrier()
    first = lay["dp_rank"] == 0  # data-parallel replicas hold the same parameters: saved once
    # an optimizer with its own by-name form is sharded over data-parallel ranks: each saves its slices
    sharded = optimizer is not None and hasattr(optimizer, "state_by_name")
    state = {
        "format": FORMAT,
        "step": step,
        "layout": lay,
        "model": {n: p.detach().clone() for n, p in _local_parameters(model).items()} if first else {},
        "params": param_layout(model) if first else {},
        "optimizer": optimizer_state_by_name(model, optimizer)
        if optimizer is not None and (first or sharded)
        else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": _rng_state(),
        "user_state": user_state,
    }
    save_hashed(state, _rank_file(step_dir, lay))
    _barrier()
    if dist.get_rank() == 0:
        layout = {k: lay[k] for k in ("tp", "pp", "dp") + (("vpp",) if lay["vpp"] > 1 else ())}
        # the device the weights were drawn and trained on (a random start differs between them)
        info = {"step": step, "layout": layout, "device": device_type(), "meta": meta or {}}
        # standard JSON (read_meta refuses NaN/Infinity): an undefined number in the config, null
        text = json.dumps(non_finite_as_null(info), indent=2, allow_nan=False)
        # its checksum first: a save killed between the two leaves no meta.json (an unfinished save), never one
        # without its checksum; a step saved again (its first save finished but killed before ``latest`` moved,
        # the run resumed from the step before) holds the first save's meta.json, removed first, or such a kill
        # would leave it beside the new checksum, refused by every reader
        (step_dir / "meta.json").unlink(missing_ok=True)
        digest = hashlib.sha256(text.encode()).hexdigest()
        write_checksum(step_dir / "meta.json", digest)
        atomic_write(step_dir / "meta.json", lambda p: p.write_text(text))
        atomic_write(directory / "latest", lambda p: p.write_text(step_dir.name + "\n"))
    _barrier()
    return step_dir


def latest_step_dir(directory) -> Path | None:
    """The newest complete step directory under ``directory``, or None if nothing was saved."""
    marker = Path(directory) / "latest"
    if not marker.exists():
        return None
    name = marker.read_text(errors="replace").strip()
    if not STEP_FOLDER.fullmatch(name):
        raise ValueError(f"{marker}: names {name[:80]!r}, not a step folder (step_N) of {directory}")
    step_dir = Path(directory) / name
    if step_dir.is_symlink() or not step_dir.is_dir():
        raise ValueError(f"{marker}: {name!r} is not a step folder inside {directory}")
    return step_dir


def unfinished_steps(directory) -> list[Path]:
    """The step folders of the checkpoints folder ``directory`` after its ``latest`` step (all of them when
    there is none) without a ``meta.json``: saves killed before their end (:func:`save_checkpoint` writes it
    once every rank file is whole, and ``latest`` after it), never read. A folder without one before ``latest``
    is not such a save (a copy under way, a step put back by hand): it is not counted."""
    steps = step_folders(directory)
    latest = latest_step_dir(directory) if steps else None
    after = -1 if latest is None else int(latest.name[5:])
    return [p for p in steps if int(p.name[5:]) > after and not (p / "meta.json").exists()]


def later_steps(directory) -> list[Path]:
    """The saved step folders (with a ``meta.json``) of the checkpoints folder ``directory`` after its ``latest``
    step, in step order: steps of a history a resume from ``latest`` does not continue (the pointer wound back by
    hand to an earlier step), or a save killed between its ``meta.json`` and the pointer (a step it trains again)."""
    latest = latest_step_dir(directory)
    if latest is None:
        return []
    after = int(latest.name[5:])
    return [p for p in step_folders(directory) if int(p.name[5:]) > after and (p / "meta.json").exists()]


SUPERSEDED = "superseded_"  # + N: a checkpoints folder's steps of a history its run no longer continues


def set_aside_later_steps(directory, log_lines: str = "") -> list[Path]:
    """Move :func:`later_steps` into a new folder ``directory/superseded_N`` (the first N free), with ``log_lines``
    (the run's ``metrics.jsonl`` lines past ``latest``, which a resume drops from its log) as its
    ``metrics.jsonl``, and return the steps where they now are, in step order (none: nothing moved). Call it when a resume from
    ``latest`` starts to train (on rank 0): the steps it saves would otherwise stand beside steps of another
    history, which ``shiq-eval run RUN`` reads as one run and a later resume may continue. Nothing is deleted: the
    folder's steps and log can be read (``shiq-eval run directory/superseded_N``) or removed by hand."""
    directory = Path(directory)
    later = later_steps(directory)
    if not later:
        return []
    n = 1
    while (directory / f"{SUPERSEDED}{n}").exists():
        n += 1
    aside = directory / f"{SUPERSEDED}{n}"
    aside.mkdir()
    if log_lines:  # (first: a kill before the steps are moved leaves them in place, still after latest)
        atomic_write(aside / "metrics.jsonl", lambda p: p.write_text(log_lines))
    for step in later:
        step.rename(aside / step.name)
    return [aside / step.name for step in later]


def check_latest(directory) -> None:
    """Refuse a checkpoint folder holding finished step folders but no ``latest`` pointer (deleted by hand, or
    a first save killed between its ``meta.json`` and the pointer): a run would take it for a new one, start
    over at step 0 beside the old steps and cut its ``metrics.jsonl`` back. Unfinished step folders
    (:func:`unfinished_steps`: a first save killed earlier) do not count: such a run starts over, and
    :func:`remove_temporaries` removes them."""
    directory = Path(directory)
    if not directory.is_dir() or (directory / "latest").exists():
        return
    unfinished = set(unfinished_steps(directory))
    steps = [p.name for p in step_folders(directory) if p not in unfinished]
    if steps:
        raise ValueError(
            f"{directory / 'latest'} is missing but {directory} holds {', '.join(steps[-3:])}: to resume, write the "
            f"newest step's name into it (echo {steps[-1]} > {directory / 'latest'}), or delete them to start over"
        )


def read_meta(step_dir) -> dict:
    """The ``meta.json`` of a step directory, checked: its SHA-256 against ``meta.json.sha256``
    (:func:`check_sha256`; a checkpoint saved before that checksum was written has none, and its ``meta.json`` is
    read as it is), ``step`` and ``layout`` (tp, pp, dp and, with virtual pipeline stages, vpp) integers,
    ``meta`` an object; ``ValueError`` naming the file otherwise."""
    path = Path(step_dir) / "meta.json"
    check_sha256_if_kept(path)
    info = read_json_file(path, hint="; the checkpoint is damaged")
    layout = info.get("layout") if isinstance(info, dict) else None
    if (
        not isinstance(info, dict)
        or not isinstance(info.get("step"), int)
        or not isinstance(layout, dict)
        or not all(isinstance(layout.get(k), int) and layout[k] >= 1 for k in ("tp", "pp", "dp"))
        or not (isinstance(layout.get("vpp", 1), int) and layout.get("vpp", 1) >= 1)
        or not isinstance(info.get("meta", {}), dict)
    ):
        raise ValueError(
            f"{path}: expected an object with an integer 'step', a 'layout' of integers tp, pp, dp and a "
            "'meta' object; the checkpoint is damaged"
        )
    check_step_folder(path, info["step"])
    return info


RANK_FILE_KEYS = ("step", "model", "optimizer", "scheduler", "rng", "user_state")


class _HashingWriter:
    """A file object that hashes what ``torch.save`` writes through it (no second read of the file)."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def save_hashed(obj, path: Path) -> str:
    """``torch.save(obj)`` to ``path`` atomically, then its SHA-256 to ``path.sha256`` (``sha256sum`` format);
    returns the digest. :func:`read_rank_file` checks it before unpickling a byte."""
    digest = {}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            w = _HashingWriter(f)
            torch.save(obj, w)
            digest["sha256"] = w.sha.hexdigest()

    atomic_write(path, write)
    write_checksum(path, digest["sha256"])
    return digest["sha256"]


def load_problem(e: Exception) -> str:
    """What ``torch.load(..., weights_only=True)`` refused, on one line; for a file of other objects than tensors
    and plain containers, that alone, without torch's advice to load it with ``weights_only=False`` (which would
    run whatever the file's pickle holds)."""
    text = str(e)
    if "Weights only load failed" not in text:
        return one_line(e, 200)
    # torch's own reason is the paragraph after its advice and before its pointer to the documentation
    reason = next(
        (p for p in text.split("\n\n")[1:] if p.strip() and "weights_only" not in p and "documentation" not in p), ""
    )
    detail = f": {one_line(reason.strip(), 160)}" if reason.strip() else ""
    return f"it holds objects other than tensors and plain containers, which are never unpickled{detail}"


def read_rank_file(
    path: Path, keys: tuple[str, ...] = RANK_FILE_KEYS, mmap: bool = False, checked: bool = False
) -> dict:
    """One rank's saved state, its SHA-256 checked (:func:`check_sha256`; ``checked``: already, by
    :func:`check_rank_files`), read with ``weights_only=True`` (only tensors and plain containers are
    rebuilt: never arbitrary pickled objects; ``pickle`` is named here only for the error it raises); a
    missing, truncated or foreign file (one without ``keys``; reading parameters needs only ``model``)
    is a ``ValueError`` naming it. ``mmap`` maps the tensors instead of reading them (each is read when
    first touched)."""
    if not checked:
        check_sha256(path)
    try:
        # on the CPU whatever device a tensor was saved from (a GPU of the saving machine); copied into place later
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: the checkpoint is incomplete") from None
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable checkpoint file ({load_problem(e)})") from None
    if not isinstance(state, dict) or any(k not in state for k in keys) or not isinstance(state["model"], dict):
        raise ValueError(f"{path}: not a checkpoint written by shiq_train (expected the keys {list(keys)})")
    return state


def assign_files(sizes: list[int], world: int) -> list[int]:
    """The rank that checks each file of ``sizes`` (bytes): the largest first, each to the rank with the fewest
    bytes so far (the lowest of them on a tie), so that every file is checked once and the ranks share the
    work; the same answer on every rank, which all list the same files."""
    load, owner = [0] * world, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i], load[r] = r, load[r] + max(sizes[i], 1)
    return owner


def check_rank_files(step_dir: Path, saved: dict, every: bool) -> None:
    """Check the SHA-256 of the rank files a load reads (:func:`check_sha256`), each once, the ranks sharing
    the files (:func:`assign_files`), before any rank reads one; collective. ``saved``: the checkpoint's
    layout; ``every``: all its files (a load in the saved layout, or one with an optimizer, whose slices may be
    in every file), else the data-parallel rank 0 files only (the parameters). A file that fails stops every
    rank with the same one-line ``ValueError`` (each rank hashing every file it read put the whole checkpoint
    through every rank's disk reads, once per rank)."""
    files = [
        step_dir / rank_file_name(t, p, d)
        for p in range(saved["pp"])
        for t in range(saved["tp"])
        for d in range(saved["dp"] if every else 1)
    ]
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [[f.stat().st_size if f.is_file() and not f.is_symlink() else 0 for f in files] if rank == 0 else None]
    dist.broadcast_object_list(sizes, src=0)  # rank 0's: every rank shares out the same way (nodes may see others)
    sizes = sizes[0]
    problem = None
    for f, owner in zip(files, assign_files(sizes, world)):
        if owner == rank and problem is None:
            try:
                check_sha256(f)
            except ValueError as e:
                problem = str(e)
            except OSError as e:  # unreadable (EIO on a damaged disk, a folder in its place): also on every rank
                problem = f"{e.filename or f}: cannot be read to check its sha256 ({e.strerror or e}): the checkpoint is damaged"
    stop_together(problem)


def stop_together(problem: Exception | str | None) -> None:
    """Collective: every rank raises the lowest failing rank's ``problem`` as the same one-line ``ValueError``,
    or none raises. A rank that raised alone (a stage whose file does not fit, slices it alone merges) would
    leave the others waiting in their next collective, under NCCL until ``parallel.timeout_minutes``."""
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, None if problem is None else str(problem))
    first = next((p for p in problems if p is not None), None)
    if first is not None:
        raise ValueError(first)


@contextmanager
def failing_together():
    """Run the ``with`` body, then :func:`stop_together` with the ``ValueError`` it raised, if any: every rank
    enters the block, so every rank reaches the collective whether its own work failed or not. Another exception
    (host memory running out in a copy, a bug) stops the others too: its rank raises it as it was, the others a
    ``ValueError`` naming that rank and the error."""
    problem = own = None
    try:
        yield
    except ValueError as e:
        problem = e
    except Exception as e:
        problem, own = f"rank {dist.get_rank()} stopped loading the checkpoint: {type(e).__name__}: {e}", e
    try:
        stop_together(problem)
    except ValueError:
        if own is not None:
            raise own from None
        raise


def _does_not_fit(step_dir, what: str) -> ValueError:
    return ValueError(
        f"checkpoint {step_dir} does not fit this model: {what} (a different model config? the saved one is in "
        f"{Path(step_dir) / 'meta.json'})"
    )


def _check_names(step_dir, saved: set[str], model: set[str]) -> None:
    if saved != model:
        only_saved, only_model = sorted(saved - model), sorted(model - saved)
        raise _does_not_fit(
            step_dir, f"parameters only in the checkpoint {only_saved[:4]}, only in the model {only_model[:4]}"
        )


def _slice_pieces(step_dir: Path, dp: int, tp_rank: int, pp_rank: int, first: dict) -> dict[str, list[dict]]:
    """``{local name: [its distributed-optimizer slice entry of each data-parallel rank holding one]}`` of one saved
    tensor/pipeline rank (``first``: its data-parallel rank 0 file, read; the others are memory-mapped)."""
    pieces: dict[str, list[dict]] = {}
    for dp_rank in range(dp):
        path = step_dir / rank_file_name(tp_rank, pp_rank, dp_rank)
        other = first if dp_rank == 0 else read_rank_file(path, mmap=True, checked=True)
        if other.get("step") != first.get("step"):
            raise ValueError(
                f"{path}: saved at step {other.get('step')}, data-parallel rank 0's file at step {first.get('step')}: "
                "the checkpoint is damaged"
            )
        opt = other["optimizer"]
        if not is_sliced(opt) or not isinstance(opt.get("params"), dict):
            raise ValueError(
                f"{path}: no distributed-optimizer slices beside data-parallel rank 0's: the checkpoint is damaged"
            )
        for local, entry in opt["params"].items():
            pieces.setdefault(local, []).append(entry)
    return pieces


def _slices_where(step_dir: Path, tp_rank: int, pp_rank: int) -> str:
    return f"{step_dir / rank_file_name(tp_rank, pp_rank, 0).replace('_dp0.pt', '_dp*.pt')}"


class _SavedLayout:
    """The data-parallel rank 0 files of a checkpoint saved under another layout, indexed by full parameter
    name: each parameter's tensor-parallel shards and optimizer state, and :meth:`shard` to cut this rank's
    shard of any of them (``shiq_train.weights.reshard_tensor``). The distributed optimizer's slices (saved
    by every data-parallel rank) are put together one parameter at a time, when it is cut."""

    def __init__(self, step_dir: Path, saved: dict, optimizer: bool = True):
        # ``optimizer``: the optimizer state is wanted; without it only the data-parallel rank 0 files are
        # read (the only ones :func:`check_rank_files` checked then): never the other ranks' slices
        self.step_dir, self.tp = step_dir, saved["tp"]
        self.entries: dict[str, dict] = {}
        self.first = None
        self.steps: set[int] = set()  # the saved optimizer groups' step counts (a frozen stage's are 0)
        for pp_rank in range(saved["pp"]):
            for tp_rank in range(saved["tp"]):
                path = step_dir / rank_file_name(tp_rank, pp_rank, 0)
                state = read_rank_file(path, mmap=True, checked=True)
                if state.get("format") not in BY_NAME or not isinstance(state.get("params"), dict):
                    raise ValueError(
                        f"{path}: written without the parameter layouts (an older shiq_train), so it resumes only "
                        f"in its own layout tp={saved['tp']} pp={saved['pp']} dp={saved['dp']}"
                    )
                if self.first is None:  # global rank 0's file
                    self.first = state
                if state["optimizer"] and (state["optimizer"].get("params") or {}):
                    self.steps |= {int(g.get("step", 0)) for g in state["optimizer"].get("groups") or []}
                opt = (state["optimizer"] or {}).get("params", {}) if optimizer else {}
                if optimizer and is_sliced(state["optimizer"]):
                    where = _slices_where(step_dir, tp_rank, pp_rank)
                    opt = {
                        k: (v, where) for k, v in _slice_pieces(step_dir, saved["dp"], tp_rank, pp_rank, state).items()
                    }
                for local, info in state["params"].items():
                    # the tied embedding's last-stage copy comes after the first stage's (equal) one
                    e = self.entries.setdefault(info["name"], {"dim": info["dim"], "glu": info["glu"], "shards": {}})
                    if (info["dim"], info["glu"]) != (e["dim"], e["glu"]):
                        raise ValueError(f"{path}: {info['name']} has two tensor-parallel layouts in the checkpoint")
                    e["shards"].setdefault(tp_rank, (state["model"][local], opt.get(local)))

    def full_shape(self, name: str) -> tuple[int, ...]:
        e = self.entries[name]
        return full_shape(e["shards"][0][0].shape, e["dim"], self.tp if e["dim"] is not None else 1)

    def shard(self, name: str, tp: int, rank: int, pick) -> torch.Tensor:
        """This rank's shard of ``pick(param shard, optimizer entry)`` of every saved tensor-parallel rank."""
        e = self.entries[name]
        parts = [pick(*e["shards"][r]) for r in range(self.tp if e["dim"] is not None else 1)]
        return reshard_tensor(parts, e["dim"], e["glu"], tp, rank)

    def optimizer_groups(self) -> list[dict]:
        """The saved optimizer's parameter groups, as the full per-parameter state's (what :meth:`optimizer_state` gives)."""
        opt = self.first["optimizer"] or {}
        groups = opt.get("groups", [])
        if is_sliced(opt) and self.steps:  # global rank 0 may hold a frozen stage, whose groups say step 0
            groups = [{**g, "step": max(self.steps)} for g in groups]
        return full_groups(groups) if is_sliced(opt) else groups

    def optimizer_state(self, name: str, tp: int, rank: int) -> dict | None:
        """The by-name optimizer entry of parameter ``name`` cut for this rank: tensors shaped like the
        parameter shard resharded, others (``step``) taken from tensor-parallel rank 0."""
        e = self.entries[name]
        saved = {}  # tensor-parallel rank: its entry (the distributed optimizer's slices put together)
        for r in range(self.tp if e["dim"] is not None else 1):
            param, entry = e["shards"][r]
            saved[r] = (param, merge_slices(name, *entry) if isinstance(entry, tuple) else entry)
        param0, entry0 = saved[0]
        if entry0 is None:
            return None

        def cut(pick) -> torch.Tensor:
            return reshard_tensor([pick(saved[r][1]) for r in sorted(saved)], e["dim"], e["glu"], tp, rank)

        out = {"group": entry0["group"], "state": {}}
        for key, value in entry0["state"].items():
            per_element = isinstance(value, torch.Tensor) and value.shape == param0.shape and value.dim() > 0
            out["state"][key] = (  # a copy: the optimizer updates it in place, never the mapped file
                cut(lambda o, k=key: o["state"][k]).clone()
                if per_element
                else (value.clone() if isinstance(value, torch.Tensor) else value)
            )
        if entry0.get("master") is not None:
            out["master"] = cut(lambda o: o["master"]).clone()
        return out


def _load_resharded(step_dir: Path, saved: dict, lay: dict, model, optimizer) -> dict:
    """Load a checkpoint saved under the layout ``saved`` into this rank's shards; returns global rank 0's file."""
    layout = param_layout(model)
    stages = [None] * dist.get_world_size()  # the whole model's names: this rank holds one stage's
    dist.all_gather_object(stages, sorted({info["name"] for info in layout.values()}))
    params = _local_parameters(model)
    tp, rank = lay["tp"], lay["tp_rank"]
    with failing_together():  # each stage checks its own parameters and merges their slices
        src = _SavedLayout(step_dir, saved, optimizer is not None)
        _check_names(step_dir, set(src.entries), set().union(*stages))
        by_name = {"groups": src.optimizer_groups(), "params": {}}
        for local, info in layout.items():
            name, e = info["name"], src.entries[info["name"]]
            if (e["dim"], e["glu"]) != (info["dim"], info["glu"]):
                raise _does_not_fit(step_dir, f"{name} is split on dim {e['dim']} there, on dim {info['dim']} here")
            want = full_shape(params[local].shape, info["dim"], tp if info["dim"] is not None else 1)
            if src.full_shape(name) != want:
                raise _does_not_fit(step_dir, f"{name} has shape {list(src.full_shape(name))} there, {list(want)} here")
            with torch.no_grad():
                params[local].copy_(src.shard(name, tp, rank, lambda p, o: p))
            entry = src.optimizer_state(name, tp, rank)
            if entry is not None:
                by_name["params"][local] = entry
    with failing_together():  # each stage's own parameters' state (another grouping)
        if optimizer is not None and src.first["optimizer"] is not None:
            load_optimizer_state_by_name(model, optimizer, by_name)
    return src.first


def _sliced_state(step_dir: Path, dp: int, lay: dict, optimizer, state: dict) -> dict:
    """The distributed optimizer's state to load on this rank from a checkpoint of this layout: its own saved
    slices when every rank's are its optimizer's (the same data-parallel size, buffers and trainable parameters:
    nothing moves between ranks), else each parameter put together from every data-parallel rank's slices (the
    full per-parameter form; only where it is read: every rank for the default optimizer, data-parallel rank 0
    for the distributed one, which hands it to the others)."""
    own = state["optimizer"]
    holds = getattr(optimizer, "holds_slices", None)
    fits = torch.tensor([int(holds is not None and holds(own))], dtype=torch.int32, device=device())
    dist.all_reduce(fits, op=dist.ReduceOp.MIN)  # every rank takes the same path
    if fits.item():
        return own
    where = _slices_where(step_dir, lay["tp_rank"], lay["pp_rank"])
    merged = {"groups": full_groups(own["groups"]), "params": {}}
    # every rank stops with a rank that failed (the distributed optimizer's other data-parallel ranks wait for
    # rank 0's merge; another tensor or pipeline rank's slices may be the damaged ones)
    with failing_together():
        if holds is None or lay["dp_rank"] == 0:
            first = (
                state
                if lay["dp_rank"] == 0
                else read_rank_file(_rank_file(step_dir, {**lay, "dp_rank": 0}), mmap=True, checked=True)
            )
            pieces = _slice_pieces(step_dir, dp, lay["tp_rank"], lay["pp_rank"], first)
            merged["params"] = {k: merge_slices(k, v, where) for k, v in pieces.items()}
    return merged


def _copied(value):
    """``value`` (tensors in plain containers) with every tensor copied out of its memory-mapped file."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(v) for v in value)
    return value


def _load_same_layout(step_dir: Path, lay: dict, dp: int, model, optimizer) -> dict:
    """Load this rank's own file: parameters and optimizer state exactly as saved (format 3: the parameters, and
    the default optimizer's state, from data-parallel rank 0's file, memory-mapped)."""
    with failing_together():  # each tensor and pipeline rank reads and checks its own files
        state = read_rank_file(_rank_file(step_dir, lay), checked=True)
        fmt, opt = state.get("format"), state["optimizer"]
        first = None
        if lay["dp_rank"] and (fmt == 3 or (fmt == 2 and optimizer is not None and opt is None)):
            # format 2: an optimizer sharded over data-parallel ranks saved its by-name state on data-parallel rank 0
            first = read_rank_file(_rank_file(step_dir, {**lay, "dp_rank": 0}), mmap=True, checked=True)
        weights = first["model"] if fmt == 3 and first is not None else state["model"]
        params = _local_parameters(model)
        _check_names(step_dir, set(weights), set(params))
        for n, p in params.items():
            if tuple(weights[n].shape) != tuple(p.shape):
                raise _does_not_fit(
                    step_dir, f"parameter {n} has shape {list(weights[n].shape)} there, {list(p.shape)} here"
                )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    if optimizer is not None and opt is None and first is not None:  # copies: the optimizer updates them in place
        opt = state["optimizer"] = _copied(first["optimizer"])
    if optimizer is not None and opt is not None and fmt in BY_NAME and is_sliced(opt):
        opt = _sliced_state(step_dir, dp, lay, optimizer, state)
    with failing_together():  # each tensor and pipeline rank's own state (another grouping, a damaged moment)
        if optimizer is not None and opt is not None:
            if fmt in BY_NAME:
                load_optimizer_state_by_name(model, optimizer, opt)
            else:  # format 1: torch's own state_dict, parameters by index
                optimizer.load_state_dict(opt)
    return state


def remove_temporaries(directory) -> list[Path]:
    """Remove what a save killed mid-write left in the checkpoints folder ``directory``: the step folders it
    did not finish (:func:`unfinished_steps`) and the temporary files in the others (``atomic_write``'s
    ``.NAME.XXXX.tmp``: a rank file's can be gigabytes); returns them. Call it when no save is under way (a
    run's start, on rank 0)."""
    directory = Path(directory)
    unfinished = unfinished_steps(directory)
    for step in unfinished:
        shutil.rmtree(step)
    folders = [directory, *step_folders(directory)] if directory.is_dir() else []
    stale = [p for folder in folders for p in folder.glob(".*.tmp") if p.is_file() or p.is_symlink()]
    for path in stale:
        path.unlink(missing_ok=True)
    return unfinished + stale


def load_checkpoint(directory, model, optimizer=None, scheduler=None, step_dir=None) -> tuple[int, dict | None]:
    """Restore what :func:`save_checkpoint` saved (the ``latest`` step unless ``step_dir`` is given), in any
    tensor-, pipeline- and data-parallel layout. Returns ``(step, user_state)``.

    In the saved layout: parameters, optimizer and scheduler state and every RNG state, so that training
    continues bit-for-bit as if uninterrupted. In another layout: parameters and optimizer state (moments,
    step, master weights) reassembled by parameter name and cut for this rank; scheduler, user state and
    torch's generators from the saved global rank 0; megatron's RNG tracker as this run seeded it (see the
    module doc).
    """
    with failing_together():  # each rank reads the pointer and meta.json itself (a node may see another folder)
        step_dir = Path(step_dir) if step_dir is not None else latest_step_dir(directory)
        if step_dir is None:
            raise FileNotFoundError(f"no checkpoint in {directory}: {Path(directory) / 'latest'} does not exist")
        meta = read_meta(step_dir)
    read = [None] * dist.get_world_size()
    dist.all_gather_object(read, (str(step_dir), step_dir.name, json.dumps(meta, sort_keys=True)))
    other = next((r for r, x in enumerate(read) if x[1:] != read[0][1:]), None)
    if other is not None:  # every rank decides the same: the layout read decides how each loads
        raise ValueError(
            f"rank {other} read {read[other][0]}/meta.json, rank 0 {read[0][0]}/meta.json, and they differ: every "
            "rank must see the same checkpoints folder (a folder not shared between nodes? one being written?)"
        )
    lay = _layout()
    saved = meta["layout"]
    same = all(saved[k] == lay[k] for k in ("tp", "pp", "dp")) and saved.get("vpp", 1) == lay["vpp"]
    check_rank_files(step_dir, saved, every=same or optimizer is not None)
    if same:
        state = _load_same_layout(step_dir, lay, saved["dp"], model, optimizer)
        # every rank resumes from its own file: one of another step (a copied file) would desynchronise the ranks
        stop_together(
            f"{_rank_file(step_dir, lay)}: saved at step {state.get('step')}, not {meta['step']} as {step_dir / 'meta.json'}"
            if state.get("step") != meta["step"]
            else None
        )
    else:
        state = _load_resharded(step_dir, saved, lay, model, optimizer)
    if isinstance(optimizer, MasterWeightOptimizer) and state["optimizer"] is None:
        with torch.no_grad():  # no saved optimizer state: the masters start from the loaded parameters
            for p, m in zip(optimizer.params, optimizer.masters):
                m.copy_(p)
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if same:
        _set_rng_state(state["rng"])
    else:  # one generator state for every rank, as after set_seed; the tracker keeps this run's seeding
        torch.set_rng_state(state["rng"]["cpu"])
        if torch.cuda.is_available() and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
    return state["step"], state["user_state"]


def gather_full_parameters(model) -> dict[str, torch.Tensor] | None:
    """Every parameter of the whole model (``model``: this rank's model or list of chunks), unsharded and
    named as in a TP=1, PP=1 model, on global rank 0 (None elsewhere); collective. Feeds Hugging Face export and evaluation."""
    from megatron.core import parallel_state as ps  # heavy: megatron

    local = []
    if ps.get_data_parallel_rank() == 0:
        for _, chunk, name, p in named_chunk_parameters(model):
            dim, glu = tp_layout(chunk, name, p)
            local.append(
                (full_param_name(chunk, name), dim, glu, ps.get_tensor_model_parallel_rank(), p.detach().cpu())
            )
    if dist.get_world_size() == 1:  # nothing to send: copies, as gather_object's pickling would make
        everything = [[(*item[:4], item[4].clone()) for item in local]]
    else:
        everything = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(local, everything, dst=0)
    if dist.get_rank() != 0:
        return None
    parts: dict[str, dict] = {}
    for rank_items in everything:
        for key, dim, glu, tp_rank, t in rank_items:
            parts.setdefault(key, {"dim": dim, "glu": glu, "shards": {}})["shards"].setdefault(tp_rank, t)
    tp = ps.get_tensor_model_parallel_world_size()
    return {
        k: unshard_tensors(
            [v["shards"][r] for r in range(tp)] if v["dim"] is not None else [v["shards"][0]], v["dim"], v["glu"]
        )
        for k, v in parts.items()
    }
