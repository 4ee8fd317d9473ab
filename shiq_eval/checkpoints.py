"""Training checkpoints as evaluation inputs: the step directories a ``shiq-train`` run saved, what
each records (method, step, Llama config, initial model, the buffer's tokenizer), and its weights as a
Hugging Face model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from shiq_data.buffer import read_manifest


class EvalInputError(ValueError):
    """A bad command-line input; the message names the file, line or option."""


def checkpoint_steps(path) -> list[Path]:
    """The step directories named by ``path``: itself if it holds ``meta.json``, else every
    ``step_*`` directory with a ``meta.json`` in ``path/checkpoints`` (or ``path``), in step order."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return [path]
    for folder in (path / "checkpoints", path):
        steps = sorted(p for p in folder.glob("step_*") if (p / "meta.json").is_file())
        if steps:
            return steps
    raise EvalInputError(
        f"{path}: not a checkpoint step directory (no meta.json) nor a run with saved steps "
        f"(no {path / 'checkpoints'}/step_*/meta.json)"
    )


def checkpoint_info(step_dir: Path) -> dict:
    """``{method, step, hf_config, init}`` of a step directory saved by ``shiq-train``."""
    meta_path = step_dir / "meta.json"
    try:
        info = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalInputError(f"{meta_path}: not valid JSON ({e}); the checkpoint is damaged") from None
    meta = info.get("meta", {}) if isinstance(info, dict) else None
    if not isinstance(meta, dict) or not isinstance(info.get("step"), int):
        raise EvalInputError(f"{meta_path}: expected an object with an integer 'step' and a 'meta' object")
    for field in ("loss", "hf_config"):
        if field not in meta:
            raise EvalInputError(f"{meta_path}: field meta.{field} is missing (was the run written by shiq-train?)")
    if not isinstance(meta["loss"], dict) or not isinstance(meta["loss"].get("name"), str):
        raise EvalInputError(f"{meta_path}: field meta.loss must be an object with a string 'name'")
    if not isinstance(meta["hf_config"], dict) or not isinstance(meta.get("config", {}), dict):
        raise EvalInputError(f"{meta_path}: fields meta.hf_config and meta.config must be objects")
    return {
        "method": meta["loss"]["name"],
        "step": int(info["step"]),
        "hf_config": meta["hf_config"],
        "init": meta.get("config", {}).get("init", "none"),
        "tokenizer": run_tokenizer(meta),
    }


def run_tokenizer(meta: dict) -> dict | None:
    """The tokenizer info of the buffer a run trained on: recorded in its checkpoints by shiq-train, or, for
    checkpoints saved before it was, read from that buffer's manifest if the buffer is still there."""
    if isinstance(meta.get("tokenizer"), dict):
        return meta["tokenizer"]
    buffer = ((meta.get("config") or {}).get("data") or {}).get("buffer")
    if isinstance(buffer, str) and (Path(buffer) / "manifest.json").is_file():
        return read_manifest(buffer)["tokenizer"]
    return None


def policy_from_checkpoint(step_dir: Path, hf_config: dict):
    """A ``transformers`` Llama holding a step directory's weights (``hf_config``: the Llama config it saved)."""
    from transformers import LlamaConfig  # heavy: transformers

    from shiq_train.export import hf_model_from_checkpoint  # heavy: torch

    return hf_model_from_checkpoint(step_dir, LlamaConfig.from_dict(hf_config))


def content_hash(path) -> str:
    """sha256 over the files under ``path`` (a file or a folder): each file's path relative to ``path``
    and its bytes, in sorted order. Names a model's weights in what it produced."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
