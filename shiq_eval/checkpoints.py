"""Training checkpoints as evaluation inputs: the step directories a ``shiq-train`` run saved, what
each records (method, step, Llama config, initial model, the buffer's tokenizer), and its weights as a
Hugging Face model."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from shiq_data.cli_common import plural
from shiq_data.io import (
    check_sha256_if_kept,
    check_step_folder,
    check_weight_map,
    lone_surrogate,
    read_json_file,
    recorded_sha256,
    sha256_files,
    step_folders,
    type_name,
    weight_files,
)
from shiq_data.tokenizers import CHAT_TEMPLATE_FIELD, PIPELINE_FIELD

# What shiq-train export records about the run in a Hugging Face folder: shiq_train.export.EXPORT_RECORD,
# not imported here because that module loads torch, and reading checkpoints' metadata must not.
EXPORT_RECORD = "shiq_export.json"
# Policy losses that read no reference (shiq_train.objectives.LOSSES with needs_reference False, not imported
# here for the same reason): their config's loss.beta is unused, so the policy has no β and no J (SHIQ_MATH §5, §9).
NO_KL_WEIGHT = frozenset(["sft"])


class EvalInputError(ValueError):
    """A bad command-line input; the message names the file, line or option."""


def checkpoint_steps(path) -> list[Path]:
    """The step directories named by ``path``: itself if it holds ``meta.json``, else every
    ``step_*`` directory with a ``meta.json`` in ``path/checkpoints`` (or ``path``), in step order."""
    path = Path(path)
    if not path.exists():
        raise EvalInputError(f"{path}: no such file or folder")
    if not path.is_dir():
        raise EvalInputError(
            f"{path} is a file: give a checkpoint step folder, a shiq-train run folder or a Hugging Face model folder"
        )
    if (path / "meta.json").is_file():
        return [path]
    if steps := _run_steps(path)[0]:
        return steps
    if (path / "value_model.json").is_file():  # (its weights guide a model's decoding: they are no policy)
        raise EvalInputError(
            f"{path}: a Q♯ value model, not a policy: evaluate the reference's decoding it guides with --guide {path}"
        )
    raise EvalInputError(
        f"{path}: not a checkpoint step directory (no meta.json), a run with saved steps "
        f"(no {path / 'checkpoints'}/step_*/meta.json) nor a Hugging Face model folder (no config.json)"
    )


def _run_steps(path: Path) -> tuple[list[Path], list[Path]]:
    """``(saved, unsaved)`` step folders of the run ``path``: those of ``path/checkpoints`` (or of ``path``, its
    checkpoints folder) with a ``meta.json`` and those without one (a save under way or killed before its end:
    never read), in step order, from the first of the two folders that has a saved step."""
    for folder in (path / "checkpoints", path):
        try:
            steps = step_folders(folder)
        except ValueError as e:  # a linked step folder
            raise EvalInputError(str(e)) from None
        saved = [p for p in steps if (p / "meta.json").is_file()]
        if saved:
            return saved, [p for p in steps if p not in saved]
    return [], []


def unsaved_steps(path) -> list[Path]:
    """The step folders of the run ``path`` that :func:`checkpoint_steps` leaves out for want of a ``meta.json``;
    none for a step folder."""
    path = Path(path)
    return [] if (path / "meta.json").is_file() else _run_steps(path)[1]


def checkpoint_info(step_dir: Path) -> dict:
    """``{kind, path, method, beta, step, hf_config, init, tokenizer, files}`` of a step directory saved by
    ``shiq-train`` (``files``: the rank files the parameters are read from, data-parallel rank 0's)."""
    meta_path = step_dir / "meta.json"
    _as_input_error(check_sha256_if_kept, meta_path)
    info = read_json_file(meta_path, EvalInputError, "; the checkpoint is damaged")
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
    _as_input_error(check_step_folder, meta_path, info["step"])
    init = meta.get("config", {}).get("init", "none")
    if not (init is None or isinstance(init, str)):
        raise EvalInputError(f"{meta_path}: field meta.config.init must be a string or null, got {init!r}")
    if not _beta_ok(meta["loss"].get("beta")):
        raise EvalInputError(
            f"{meta_path}: field meta.loss.beta: must be a number > 0 or null, got {meta['loss']['beta']!r}"
        )
    return {
        "kind": "checkpoint",
        "path": step_dir,
        "method": meta["loss"]["name"],
        "beta": policy_beta(meta["loss"]),
        "step": int(info["step"]),
        "hf_config": meta["hf_config"],
        "init": init,
        "tokenizer": run_tokenizer(meta, meta_path),
        "files": sorted(step_dir.glob("rank_tp*_pp*_dp0.pt")),
    }


def check_step_weights(info: dict) -> dict:
    """``info`` (a :func:`checkpoint_info`) once its step folder holds weights: a step without rank files (a save
    cut short, or copied without them) is refused naming the folder, before any model is loaded or anything is
    written (it was refused only once the reference had been evaluated), as a Hugging Face folder without weights is."""
    if not info["files"]:
        raise EvalInputError(f"{info['path']}: a checkpoint step without weights (no rank_tp*_pp*_dp0.pt file)")
    return info


def hf_folder_info(folder: Path) -> dict:
    """The :func:`checkpoint_info` of a Hugging Face model folder: loss, beta, step, init and tokenizer from
    the record ``shiq-train export`` writes (method ``hf``, step 0 and no beta for any other folder)."""
    record_path = folder / EXPORT_RECORD
    record = {}
    if record_path.is_file():
        record = read_json_file(record_path, EvalInputError)
        if not isinstance(record, dict) or not isinstance(record.get("loss", {}), dict):
            raise EvalInputError(f"{record_path}: expected an object with a 'loss' object")
        _check_record(record_path, record)
    hf_config = read_json_file(folder / "config.json", EvalInputError)
    if not isinstance(hf_config, dict):
        raise EvalInputError(f"{folder / 'config.json'}: expected a JSON object, got {type_name(hf_config)}")
    _as_input_error(check_weight_map, folder)
    files = weight_files(folder)
    if not files:
        raise EvalInputError(f"{folder}: a Hugging Face folder without weights (no *.safetensors or *.bin file)")
    loss = record.get("loss", {})
    return {
        "kind": "hf",
        "export": bool(record),
        "sha256": _as_input_error(recorded_sha256, record_path, record.get("sha256")) if record else None,
        "path": folder,
        "method": loss.get("name", "hf"),
        "beta": policy_beta(loss),
        "step": int(record.get("step", 0)),
        "hf_config": hf_config,
        "init": record.get("init"),
        "tokenizer": record.get("tokenizer"),
        "files": files,
    }


def _as_input_error(check, *args):
    """``check(*args)`` (a shiq_data check of a file), its ``ValueError`` raised as an :class:`EvalInputError`."""
    try:
        return check(*args)
    except ValueError as e:
        raise EvalInputError(str(e)) from None


def _check_record(path: Path, record: dict) -> None:
    """The fields of an export record that evaluation reads, each of its kind: ``EvalInputError`` naming
    the file and field otherwise (a hand-edited record)."""
    loss, step = record.get("loss", {}), record.get("step", 0)
    problems = [
        ("step", "an integer >= 0", isinstance(step, int) and not isinstance(step, bool) and step >= 0),
        ("loss.name", "a string", isinstance(loss.get("name", "hf"), str)),
        ("loss.beta", "a number > 0 or null", _beta_ok(loss.get("beta"))),
        ("tokenizer", "an object or null", record.get("tokenizer") is None or isinstance(record["tokenizer"], dict)),
        ("init", "a string or null", record.get("init") is None or isinstance(record["init"], str)),
    ]
    for field, kind, ok in problems:
        if not ok:
            value = record.get(field) if "." not in field else loss.get(field.split(".")[1])
            raise EvalInputError(f"{path}: field {field!r}: must be {kind}, got {value!r}")


def policy_beta(loss: dict):
    """The KL weight β of the policy a recorded ``loss`` trained (SHIQ_MATH §9: its J is at this β): its
    ``beta``, or None for a loss that reads no reference (:data:`NO_KL_WEIGHT`: SFT), whose ``beta`` is unused."""
    return None if loss.get("name") in NO_KL_WEIGHT else loss.get("beta")


def _beta_ok(beta) -> bool:
    return beta is None or (isinstance(beta, (int, float)) and not isinstance(beta, bool) and 0 < beta < float("inf"))


def run_folder(path: Path) -> Path:
    """The run folder of what a CHECKPOINT argument names, absolute: RUN for RUN, RUN/checkpoints (a run's
    checkpoints folder, which :func:`checkpoint_steps` reads as the run) and RUN/checkpoints/step_N; else the
    folder itself (a Hugging Face model's)."""
    path = Path(os.path.abspath(path))
    if (path / "meta.json").is_file():
        path = path.parent
    elif (path / "config.json").is_file() or (path / "checkpoints").is_dir():
        return path  # (a model folder, or a run, whatever its name)
    return path.parent if path.name == "checkpoints" else path


def run_label(path: Path) -> str:
    """The default label of what a CHECKPOINT argument names: its run folder's name (:func:`run_folder`)."""
    return run_folder(path).name


def policy_infos(checkpoints: list[str], labels: list[str] | None) -> list[dict]:
    """One info per model to evaluate (:func:`checkpoint_info`, :func:`hf_folder_info`) with its ``run``
    label: ``labels`` one per CHECKPOINT argument, in order, else :func:`run_label`. One label may not name
    two different runs."""
    if labels and len(labels) != len(checkpoints):
        raise EvalInputError(
            f"--label is given {'once' if len(labels) == 1 else f'{len(labels)} times'} for {plural(len(checkpoints), 'CHECKPOINT argument')}: "
            "give one label "
            "per CHECKPOINT, in order"
        )
    for label in labels or []:  # (a row's run name: an empty one names no run)
        if not label.strip():
            raise EvalInputError(f"--label {label!r}: a run label must not be empty or blank")
        if lone_surrogate(label) is not None:  # (a byte of another encoding: results.json could not hold it)
            raise EvalInputError(f"--label {label!r}: a run label must be UTF-8 text")
    infos, owners, seen = [], {}, {}
    for i, arg in enumerate(checkpoints):
        path = Path(arg)
        if lone_surrogate(os.path.abspath(path)) is not None:  # (its rows record it, and the default label)
            raise EvalInputError(
                f"CHECKPOINT {arg!r}: the path is not UTF-8 text, which results.json could not record: rename the "
                "folder, or give a link to it of a UTF-8 name"
            )
        if (path / "config.json").is_file() and not (path / "meta.json").is_file():
            found = [hf_folder_info(path)]
        else:
            found = [check_step_weights(checkpoint_info(s)) for s in checkpoint_steps(path)]
        label = labels[i] if labels else run_label(path)
        if label == "reference":
            raise EvalInputError(f"{arg}: the label 'reference' is the reference model's; give another with --label")
        owner = run_folder(path)
        if owners.setdefault(label, owner) != owner:
            raise EvalInputError(
                f"{owners[label]} and {arg} would both be labelled {label!r}: give each CHECKPOINT a --label"
            )
        for info in found:  # else a model is evaluated, and listed, twice
            first = seen.setdefault(Path(info["path"]).resolve(), i)
            if first != i:
                raise EvalInputError(
                    f"CHECKPOINT {arg} holds {info['path']}, which {checkpoints[first]} names too: give each model once"
                )
        infos += [{**info, "run": label} for info in found]
    return infos


def model_sha256(files: list[Path]) -> str | None:
    """SHA-256 of a model's weight files read one after the other (None when there are none)."""
    return sha256_files(files) if files else None


def run_tokenizer(meta: dict, meta_path: Path) -> dict | None:
    """The tokenizer info of the buffer a run trained on, as shiq-train recorded it in its checkpoints (None in
    checkpoints saved before it did: the buffer's path they record is not followed); one that is not an object
    is refused naming ``meta_path`` (it was taken for a missing one, and the check skipped)."""
    tok = meta.get("tokenizer")
    if tok is not None and not isinstance(tok, dict):
        raise EvalInputError(f"{meta_path}: field meta.tokenizer must be null or an object, got {json.dumps(tok)[:80]}")
    return tok


def check_tokenizer_record(tok, path, field: str) -> dict | None:
    """``tok``, a recorded tokenizer info (None: none recorded), once it holds what the evaluation's tokenizer
    is compared on (``shiq_train.reference.check_tokenizer_matches``): a string ``fingerprint``, an integer
    ``vocab_size`` >= 1, and a string ``name`` and pipeline fingerprint and a string or null chat template
    fingerprint where given; :class:`EvalInputError` naming ``path`` and ``field`` otherwise (a damaged or
    hand-edited record, which failed there as a KeyError or was taken for a missing one)."""
    if tok is None:
        return None
    ok = (
        isinstance(tok, dict)
        and isinstance(tok.get("fingerprint"), str)
        and isinstance(tok.get("vocab_size"), int)
        and not isinstance(tok.get("vocab_size"), bool)
        and tok["vocab_size"] >= 1
        and isinstance(tok.get("name", ""), str)
        and isinstance(tok.get(PIPELINE_FIELD, ""), str)
        and isinstance(tok.get(CHAT_TEMPLATE_FIELD), (str, type(None)))
    )
    if not ok:
        raise EvalInputError(
            f"{path}: field {field} must be null or an object with a string 'fingerprint' and an integer "
            f"'vocab_size' >= 1 (the buffer's tokenizer), got {json.dumps(tok)[:80]}"
        )
    return tok


def hf_policy(info: dict):
    """The transformers model of a :func:`checkpoint_info` / :func:`hf_folder_info`."""
    if info["kind"] == "hf":
        import torch  # heavy: only shiq-eval run needs torch

        from shiq_train.hf_convert import load_causal_lm  # heavy: torch

        return load_causal_lm(str(info["path"]), torch.float32)[0]
    from shiq_train.export import hf_model_from_checkpoint  # heavy: torch

    return hf_model_from_checkpoint(info["path"], info["hf_config"])


def policy_from_checkpoint(step_dir: Path, hf_config: dict):
    """A ``transformers`` Llama holding a step directory's weights (``hf_config``: the Llama config it saved)."""
    from shiq_train.export import hf_model_from_checkpoint  # heavy: torch

    return hf_model_from_checkpoint(step_dir, hf_config)


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
