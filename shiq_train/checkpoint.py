"""Checkpoints of a megatron model + optimizer that resume exactly, and full-parameter gathering.

Layout on disk (one directory per saved step)::

    <dir>/step_00000010/meta.json                      step, parallel layout, user metadata
    <dir>/step_00000010/rank_tp0_pp0_dp0.pt            this rank's parameter shards, optimizer and
                                                       scheduler state, RNG states (CPU, CUDA, and
                                                       megatron's tracker), user state
    <dir>/latest                                       name of the newest complete step directory

Every file is written to a temporary name and renamed into place; ``latest`` moves only after every
rank has written (a barrier), so an interrupted save never becomes the resume point. Resuming needs
the same (tp, pp, dp) layout; to change layout, load the parameters gathered by
:func:`gather_full_parameters` with :func:`shiq_train.model.load_full_parameters` (optimizer state
then starts afresh).
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
import torch.distributed as dist

from shiq_data.io import atomic_write
from shiq_train.model import full_param_name, tp_layout, unwrap
from shiq_train.weights import rank_file_name, unshard_tensors


def _layout() -> dict:
    from megatron.core import parallel_state as ps  # heavy: megatron

    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(),
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

    ``user_state`` (per rank, e.g. the data sampler's position) is returned by :func:`load_checkpoint`;
    ``meta`` (JSON-serialisable, e.g. the resolved config) goes to ``meta.json``. Returns the step
    directory.
    """
    directory = Path(directory)
    step_dir = directory / f"step_{step:08d}"
    lay = _layout()
    if dist.get_rank() == 0:
        step_dir.mkdir(parents=True, exist_ok=True)
    _barrier()
    state = {
        "step": step,
        "layout": lay,
        "model": {n: p.detach().clone() for n, p in unwrap(model).named_parameters()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": _rng_state(),
        "user_state": user_state,
    }
    atomic_write(_rank_file(step_dir, lay), lambda p: torch.save(state, p))
    _barrier()
    if dist.get_rank() == 0:
        info = {"step": step, "layout": {k: lay[k] for k in ("tp", "pp", "dp")}, "meta": meta or {}}
        atomic_write(step_dir / "meta.json", lambda p: p.write_text(json.dumps(info, indent=2)))
        atomic_write(directory / "latest", lambda p: p.write_text(step_dir.name + "\n"))
    _barrier()
    return step_dir


_STEP_DIR = re.compile(r"^step_\d+$")


def latest_step_dir(directory) -> Path | None:
    """The newest complete step directory under ``directory``, or None if nothing was saved."""
    marker = Path(directory) / "latest"
    if not marker.exists():
        return None
    name = marker.read_text(errors="replace").strip()
    if not _STEP_DIR.match(name):
        raise ValueError(f"{marker}: names {name[:80]!r}, not a step folder (step_N) of {directory}")
    step_dir = Path(directory) / name
    if step_dir.is_symlink() or not step_dir.is_dir():
        raise ValueError(f"{marker}: {name!r} is not a step folder inside {directory}")
    return step_dir


def read_meta(step_dir) -> dict:
    """The ``meta.json`` of a step directory, checked: ``step`` and ``layout`` (tp, pp, dp) integers, ``meta``
    an object; ``ValueError`` naming the file otherwise."""
    path = Path(step_dir) / "meta.json"
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the checkpoint is damaged") from None
    layout = info.get("layout") if isinstance(info, dict) else None
    if (
        not isinstance(info, dict)
        or not isinstance(info.get("step"), int)
        or not isinstance(layout, dict)
        or not all(isinstance(layout.get(k), int) for k in ("tp", "pp", "dp"))
        or not isinstance(info.get("meta", {}), dict)
    ):
        raise ValueError(
            f"{path}: expected an object with an integer 'step', a 'layout' of integers tp, pp, dp and a "
            "'meta' object; the checkpoint is damaged"
        )
    return info


RANK_FILE_KEYS = ("step", "model", "optimizer", "scheduler", "rng", "user_state")


def read_rank_file(path: Path, keys: tuple[str, ...] = RANK_FILE_KEYS) -> dict:
    """One rank's saved state, read with ``weights_only=True`` (never unpickles arbitrary objects); a
    missing, truncated or foreign file (one without ``keys``; reading parameters needs only ``model``)
    is a ``ValueError`` naming it."""
    try:
        state = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: the checkpoint is incomplete") from None
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
        msg = " ".join(str(e).split())[:200]
        raise ValueError(f"{path}: not a readable checkpoint file ({msg})") from None
    if not isinstance(state, dict) or any(k not in state for k in keys) or not isinstance(state["model"], dict):
        raise ValueError(f"{path}: not a checkpoint written by shiq_train (expected the keys {list(keys)})")
    return state


def load_checkpoint(directory, model, optimizer=None, scheduler=None, step_dir=None) -> tuple[int, dict | None]:
    """Restore what :func:`save_checkpoint` saved (the ``latest`` step unless ``step_dir`` is given).

    Restores parameters, optimizer and scheduler state and every RNG state, so that training
    continues bit-for-bit as if uninterrupted. Returns ``(step, user_state)``.
    """
    step_dir = Path(step_dir) if step_dir is not None else latest_step_dir(directory)
    if step_dir is None:
        raise FileNotFoundError(f"no checkpoint in {directory}: {Path(directory) / 'latest'} does not exist")
    lay = _layout()
    saved = read_meta(step_dir)["layout"]
    if any(saved[k] != lay[k] for k in ("tp", "pp", "dp")):
        raise ValueError(
            f"checkpoint {step_dir} was saved with tp={saved['tp']} pp={saved['pp']} dp={saved['dp']}, but this "
            f"run uses tp={lay['tp']} pp={lay['pp']} dp={lay['dp']}; resume with the saved layout, or load "
            "gathered full parameters with shiq_train.model.load_full_parameters (fresh optimizer state)"
        )
    state = read_rank_file(_rank_file(step_dir, lay))
    params = dict(unwrap(model).named_parameters())
    if set(params) != set(state["model"]):
        raise ValueError(
            f"checkpoint {step_dir} holds parameters {sorted(set(state['model']) ^ set(params))} "
            "that do not match the model (different model config?)"
        )
    for n, p in params.items():
        if tuple(state["model"][n].shape) != tuple(p.shape):
            raise ValueError(
                f"checkpoint {step_dir}: parameter {n} has shape {tuple(state['model'][n].shape)} but the model's "
                f"is {tuple(p.shape)} (different model config?)"
            )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state["model"][n])
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state["step"], state["user_state"]


def gather_full_parameters(model) -> dict[str, torch.Tensor] | None:
    """Every parameter of the whole model, unsharded and named as in a TP=1, PP=1 model, on global
    rank 0 (None elsewhere); collective. Feeds Hugging Face export and layout changes."""
    from megatron.core import parallel_state as ps  # heavy: megatron

    local = []
    if ps.get_data_parallel_rank() == 0:
        for name, p in unwrap(model).named_parameters():
            dim, glu = tp_layout(model, name, p)
            local.append(
                (full_param_name(model, name), dim, glu, ps.get_tensor_model_parallel_rank(), p.detach().cpu())
            )
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
