"""Offline access to checkpoints: full parameters from the per-rank files, and Hugging Face export.

Evaluation and export should not need the training layout's processes: this reads every rank file of
a step directory written by :func:`shiq_train.checkpoint.save_checkpoint`, and reassembles the TP=1,
PP=1 parameter set with the layout of ``shiq_train.weights`` (the one :func:`shiq_train.model.tp_layout`
checks against megatron's parameters). ``shiq-train export RUN [--step N] --hf OUT`` (:func:`main`) writes
a step as a Hugging Face folder: config.json, model.safetensors, the tokenizer files, and
``shiq_export.json`` (the run's loss, beta, step, init and tokenizer record, read by ``shiq-eval run``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from shiq_data.cli_common import (
    ArgumentParser,
    add_log_level_option,
    folder_path,
    hide_library_progress_bars,
    on_sigterm,
    progress_bars_shown,
    run_command,
    setup_logging,
)
from shiq_data.io import atomic_dir, atomic_write_json, one_line, recorded_folder, sha256_files, step_folders
from shiq_data.tokenizers import BUILTIN_TOKENIZERS, PIPELINE_FIELD, load_tokenizer, pipeline_mismatch
from shiq_train import weights as W
from shiq_train.checkpoint import latest_step_dir, read_meta, read_rank_file
from shiq_train.hf_convert import (
    EXPORT_RECORD,
    LlamaShape,
    ReadKeys,
    causal_lm_class,
    hf_config_from_dict,
    megatron_to_llama,
    model_config_from_llama,
    save_llama,
)
from shiq_train.losses import check_beta

log = logging.getLogger(__name__)


def full_parameters_from_checkpoint(step_dir, num_layers: int, tied: bool = True) -> dict[str, torch.Tensor]:
    """The full (TP=1, PP=1) parameter set saved in ``step_dir``, from its rank files alone.

    Loads with ``weights_only=True`` (``shiq_train.checkpoint.read_rank_file``). Only data-parallel rank 0's files are read (the others hold
    the same parameters). A rank file records each parameter's full name (with virtual pipeline stages,
    the only way to tell a chunk's layers apart); files without the record are named by
    ``shiq_train.weights``'s layout (split dimensions, layer numbers, file names). With ``tied``, an output layer
    in the file of the embedding (an untied run read as tied: it was dropped) is a ``ValueError`` naming the file.
    """
    step_dir = Path(step_dir)
    info = read_meta(step_dir)
    tp, pp = info["layout"]["tp"], info["layout"]["pp"]
    try:
        per_stage = W.layers_per_stage(num_layers, pp * info["layout"].get("vpp", 1))
    except ValueError as e:
        raise ValueError(f"{step_dir}: {e}") from None
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            path = step_dir / W.rank_file_name(tp_rank, pp_rank, 0)
            state = read_rank_file(path, keys=("model",))  # weights_only: never unpickles arbitrary objects
            recorded = state.get("params") if isinstance(state.get("params"), dict) else {}
            embedding = any(n == W.EMBEDDING or n.endswith("." + W.EMBEDDING) for n in state["model"])
            for name, value in state["model"].items():
                if tied and (name == W.TIED_OUTPUT or name.endswith("." + W.TIED_OUTPUT)):
                    # a tied model's output layer is a copy on the last stage, never beside the embedding, and
                    # recorded under the embedding's full name (an untied one's under its own)
                    own = isinstance(recorded.get(name), dict) and recorded[name].get("name") == W.TIED_OUTPUT
                    if embedding or own:
                        where = "beside the embedding" if embedding else f"(recorded as {W.TIED_OUTPUT})"
                        raise ValueError(
                            f"{path}: holds an output layer of its own {where}, but meta.hf_config in "
                            "its meta.json has tie_word_embeddings true: the checkpoint is damaged or its meta.json "
                            "was edited"
                        )
                    continue  # the last stage's copy of the tied embedding
                full = recorded[name]["name"] if name in recorded else W.full_name(name, pp_rank, per_stage, tied)
                parts.setdefault(full, {})[tp_rank] = value
    beyond = sorted({int(n.split(".")[2]) for n in parts if n.startswith("decoder.layers.")} - set(range(num_layers)))
    if beyond:  # else a config with fewer layers (a meta.json edited) loads a truncated model without a word
        raise ValueError(
            f"{step_dir}: its rank files hold layers {beyond[:3]}{'...' if len(beyond) > 3 else ''} beyond the "
            f"{num_layers} of meta.hf_config in its meta.json: the checkpoint is damaged or its meta.json was edited"
        )
    full = {}
    for name, shards in parts.items():
        dim, glu = W.tp_split(name)
        full[name] = W.unshard_tensors([shards[r] for r in range(tp)] if dim is not None else [shards[0]], dim, glu)
    return full


def llama_config(hf_config: dict, step_dir):
    """``transformers.LlamaConfig`` of the ``meta.hf_config`` a step directory saved (``Qwen2Config`` or
    ``Qwen3Config`` when it records model_type 'qwen2' or 'qwen3', :func:`shiq_train.hf_convert.hf_config_from_dict`; checked
    as an import checks one, :func:`shiq_train.hf_convert.model_config_from_llama`: no sliding window that acts, no
    head_dim or vocab_size of 0); ``ValueError`` naming its meta.json when transformers or that check refuses it (a
    hand-edited field)."""
    from huggingface_hub.errors import StrictDataclassError  # (transformers' config validation)

    try:
        config = hf_config_from_dict(hf_config)
        model_config_from_llama(config)  # (a window that acts; what no model has: heads or a vocabulary of no width)
        return config
    except (StrictDataclassError, ValueError, TypeError, ArithmeticError) as e:
        raise ValueError(f"{Path(step_dir) / 'meta.json'}: field meta.hf_config: {one_line(e, 300)}") from None


def hf_model_from_checkpoint(step_dir, hf_config, dtype=torch.float32):
    """A ``transformers.LlamaForCausalLM`` holding the weights of a checkpoint step directory (``hf_config``:
    a ``LlamaConfig``, or the dict its meta.json saved; a ``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM`` for a
    Qwen2 or Qwen3 config). Weights that
    do not fit the config (a meta.json edited, or another run's) are refused in one line naming the step
    directory."""
    if isinstance(hf_config, dict):
        hf_config = llama_config(hf_config, step_dir)
    shape = LlamaShape.from_hf_config(hf_config)
    model_class = causal_lm_class(hf_config)
    sd = megatron_to_llama(fitting_parameters(step_dir, shape), shape)
    try:
        with torch.device("meta"):  # the config's shapes, checked before any memory is taken for them
            skeleton = model_class(hf_config)
        skeleton.load_state_dict(sd, strict=not shape.tied, assign=True)
        del skeleton
        model = model_class(hf_config).to(dtype)
        model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=not shape.tied)
    except (KeyError, RuntimeError) as e:  # a missing weight name; a shape that differs
        raise _misfit(step_dir, e) from None
    return model.eval()


def _misfit(step_dir, e: Exception) -> ValueError:
    return ValueError(
        f"{step_dir}: its weights do not fit meta.hf_config in its meta.json ({one_line(e, 200)}): "
        "the checkpoint is damaged or its meta.json was edited"
    )


def fitting_parameters(step_dir, shape: LlamaShape) -> dict[str, torch.Tensor]:
    """:func:`full_parameters_from_checkpoint` of a step directory read with the Llama ``shape`` of its
    meta.hf_config, once its weights hold exactly what that shape names: ``ValueError`` naming the step directory
    when they lack one (a Llama run read as Qwen3: its query and key norms) or hold one it has no place for (a
    Qwen2 run's biases read as Llama's would be dropped without a word)."""
    try:
        full = ReadKeys(full_parameters_from_checkpoint(step_dir, shape.num_layers, shape.tied))
        megatron_to_llama(full, shape)
        if full.unused():
            raise KeyError(f"weights its hf_config has no place for: {full.unused()[:3]}")
    except KeyError as e:  # a weight the config names and the checkpoint lacks, or the other way round
        raise _misfit(step_dir, e) from None
    return dict(full)


def step_dir_of(run, step: int | None = None) -> Path:
    """The step directory of ``run`` to export: ``run`` itself if it is one, else the step ``step`` (default: the
    newest) of ``run/checkpoints``, or of ``run`` when it is that checkpoints folder (as ``shiq-eval run`` and
    ``ref-stats --megatron-checkpoint`` read it); ``ValueError`` naming what exists otherwise."""
    run = Path(run)
    if (run / "meta.json").is_file():
        saved = read_meta(run)["step"]
        if step is not None and step != saved:
            raise ValueError(f"{run} is the checkpoint of step {saved}, not {step}: give its run folder with --step")
        return run
    folder = run / "checkpoints"
    if not folder.is_dir() and (run / "latest").is_file():  # RUN/checkpoints itself
        folder = run
    if not folder.is_dir() and (run / "value_model.json").is_file():  # (loss=qsharp_value: weights that guide one)
        raise ValueError(
            f"{run}: a Q♯ value model, not a policy run: it has no checkpoint to export; guide the reference's "
            f"decoding with it (shiq-eval run --guide {run})"
        )
    if step is None:
        found = latest_step_dir(folder)
        if found is None:
            raise ValueError(f"{run}: no checkpoint ({folder / 'latest'} does not exist); expected a shiq-train run")
        return found
    saved = [p for p in step_folders(folder) if (p / "meta.json").is_file()]
    found = folder / f"step_{step:08d}"
    if found not in saved:
        steps = [int(p.name[5:]) for p in saved]
        raise ValueError(f"{run}: no checkpoint of step {step} in {folder} (saved steps: {steps})")
    return found


def export_tokenizer(meta: dict, step_dir: Path, tokenizer: str | None):
    """The tokenizer to ship with the export: ``tokenizer`` (a folder, gpt2 or smollm2) or the one the run's
    buffer was built with (recorded in the checkpoint); it must have the recorded fingerprint (another pipeline
    fingerprint, when both record one, is a warning)."""
    record = meta.get("tokenizer")
    name = tokenizer or (record or {}).get("name")
    if name is None:
        raise ValueError(f"{step_dir / 'meta.json'}: records no tokenizer: give one with --tokenizer FOLDER")
    if not isinstance(name, str):
        raise ValueError(f"{step_dir / 'meta.json'}: field meta.tokenizer.name must be a string, got {name!r}")
    if tokenizer is None and name not in BUILTIN_TOKENIZERS:
        raise ValueError(recorded_folder(step_dir / "meta.json", "tokenizer", name, "--tokenizer"))
    try:
        tok, info = load_tokenizer(name)
    except (OSError, ValueError) as e:
        if tokenizer is not None:  # (the option's own folder: naming it again would not help)
            raise ValueError(f"--tokenizer {name}: cannot be loaded ({one_line(e, 160)})") from None
        raise ValueError(
            f"the run's tokenizer {name!r} cannot be loaded ({one_line(e, 160)}): give it with --tokenizer FOLDER"
        ) from None
    if record is not None and info["fingerprint"] != record.get("fingerprint"):
        raise ValueError(
            f"--tokenizer {name}: fingerprint {info['fingerprint'][:12]}… but the run trained on a buffer built with "
            f"{record.get('name')!r} (fingerprint {str(record.get('fingerprint'))[:12]}…); give that tokenizer"
        )
    if record is not None and pipeline_mismatch(record, info):
        log.warning(
            f"--tokenizer {name}: the vocabulary of the buffer's {record.get('name')!r} but another pipeline "
            f"(pipeline fingerprint {info[PIPELINE_FIELD][:12]}… against {record[PIPELINE_FIELD][:12]}…): the exported "
            "folder's tokenizer may split text otherwise than the training rows were"
        )
    return tok


def export_hf(step_dir, out, tokenizer: str | None = None, overwrite: bool = False) -> Path:
    """Write the checkpoint ``step_dir`` as a Hugging Face folder ``out`` (complete or absent): the Llama (Qwen2, Qwen3)
    config the run saved, float32 safetensors, the tokenizer (:func:`export_tokenizer`, its eos and pad ids
    in the config) and ``shiq_export.json`` (the run, step, loss, and the SHA-256 of each weight file, which
    shiq-eval checks before loading them). Loads with ``transformers.AutoModelForCausalLM``."""

    step_dir, out = Path(step_dir), Path(out)
    run = step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir.parent
    info = read_meta(step_dir)
    meta = info.get("meta", {})
    _check_out(out, run, overwrite, (meta.get("config") or {}).get("init"))
    if not isinstance(meta.get("hf_config"), dict):
        raise ValueError(
            f"{step_dir / 'meta.json'}: field meta.hf_config is missing (was the run written by shiq-train?)"
        )
    loss = meta.get("loss", {})  # copied into the export's record, which shiq-eval reads
    if not (isinstance(loss, dict) and isinstance(loss.get("name", ""), str)):
        raise ValueError(f"{step_dir / 'meta.json'}: field meta.loss must be an object with a string 'name'")
    if loss.get("beta") is not None:
        check_beta(loss["beta"], f"{step_dir / 'meta.json'}: field meta.loss.beta")
    tok = export_tokenizer(meta, step_dir, tokenizer)
    config = llama_config(meta["hf_config"], step_dir)
    config.eos_token_id = tok.eos_token_id
    config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if tok.bos_token_id is not None:
        config.bos_token_id = tok.bos_token_id
    elif (meta.get("config") or {}).get("init") in (None, "none"):
        # A run from no initial model saved the config of its shape (LlamaConfig's default bos_token_id 1): no
        # model ships it, and the tokenizer has no BOS (Qwen2.5's), so the export names none. A run from a
        # Hugging Face folder keeps the bos_token_id that folder's config ships.
        config.bos_token_id = None
    model = hf_model_from_checkpoint(step_dir, config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    record = {
        "format": "shiq-hf-export",
        "run": run.name,
        "step": info["step"],
        "loss": loss,
        "init": (meta.get("config") or {}).get("init"),
        "tokenizer": meta.get("tokenizer"),
        "checkpoint": str(step_dir.resolve()),
    }

    def fill(tmp: Path) -> None:
        save_llama(model, tmp)
        tok.save_pretrained(tmp)
        weights = sorted(tmp.glob("*.safetensors"))  # checked by shiq-eval before it loads them
        atomic_write_json(tmp / EXPORT_RECORD, {**record, "sha256": {w.name: sha256_files([w]) for w in weights}})

    return atomic_dir(out, fill, replace=True, option="--hf")  # (a folder the system will not make: named so)


def _check_out(out: Path, run: Path, overwrite: bool, init=None) -> None:
    """Refuse an ``out`` inside a buffer or inside the run's ``checkpoints`` (its step folders), one that exists
    (unless ``overwrite``), and with ``overwrite`` any ``out`` but an earlier export (``RUN/hf`` may be one):
    never the run folder or one holding it, nor the run's initial model ``init`` (an earlier export the run
    trained from, which evaluation then reads as its reference; a relative ``init`` is read from the current
    folder, as training and evaluation read it), a file or any other folder, which replacing would delete."""
    from shiq_data.buffer import refuse_inside_buffer

    refuse_inside_buffer(out, "--hf", itself=True)
    o, r = out.resolve(), run.resolve()
    if o.is_relative_to(r / "checkpoints"):
        raise ValueError(f"--hf {out} is inside the run's checkpoints {run / 'checkpoints'}: give another folder")
    if not out.exists():
        return
    if not overwrite:
        raise ValueError(f"--hf {out} exists: give a new folder, or --overwrite to replace it")
    if out.is_symlink():  # replacing it would replace a link, not an export (atomic_dir refuses one, at the end)
        raise ValueError(f"--hf {out} is a symbolic link (to {o}): give the folder itself, or a new one")
    if r.is_relative_to(o):  # (a folder inside the run is replaced only if it is an earlier export, below)
        where = "is" if o == r else "holds"
        raise ValueError(
            f"--hf {out} {where} the run folder {run}: --overwrite would delete the run; give another folder"
        )
    if isinstance(init, str) and Path(init).exists() and Path(init).resolve() == o:
        raise ValueError(
            f"--hf {out} is the model the run started from (its init): replacing it would change the run's "
            "reference; give another folder"
        )
    if not (out / EXPORT_RECORD).is_file():
        raise ValueError(
            f"--hf {out} exists and is not an earlier export (no {EXPORT_RECORD}): --overwrite replaces only those; "
            "give a new folder"
        )


HELP = """shiq-train export: a checkpoint of a shiq-train run as a Hugging Face model folder.

Writes OUT with config.json (the Llama, Qwen2 or Qwen3 config the run saved), model.safetensors (float32), the tokenizer
files of the buffer the run trained on (or --tokenizer, which must have the same fingerprint) and
shiq_export.json (the run's loss, beta, step and initial model, which shiq-eval run reads).
transformers.AutoModelForCausalLM.from_pretrained(OUT) loads it; its logits are the trained model's.
OUT is written completely or not at all.
"""


def named(what: str):
    """An argparse ``type`` for a path read (or a built-in name): refuses the empty string, which ``Path`` reads
    as the current folder (argparse names the option in its refusal, saying it must name ``what``)."""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"must name {what}, got an empty string")
        return text

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="shiq-train export", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "run",
        metavar="RUN",
        type=named("a run folder"),
        help="a shiq-train run folder (or its checkpoints folder, or one of its step folders)",
    )
    p.add_argument("--step", type=int, help="the checkpoint step to export (default: the newest)")
    p.add_argument(
        "--hf",
        required=True,
        type=folder_path,
        metavar="OUT",
        help="output folder (must not exist, unless --overwrite)",
    )
    p.add_argument(
        "--tokenizer",
        type=named("a tokenizer folder, gpt2 or smollm2"),
        help="tokenizer folder, gpt2 or smollm2 (default: the one the run recorded when it "
        "is gpt2 or smollm2; a folder is named here, as a path read from a file is not followed)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it is an earlier export (it holds shiq_export.json); never the run folder or a folder "
        "holding it",
    )
    add_log_level_option(p)
    return p


def _export(args) -> int:
    step_dir = step_dir_of(args.run, args.step)
    out = export_hf(step_dir, args.hf, args.tokenizer, args.overwrite)
    print(f"shiq-train export: {step_dir} -> {out} (a Hugging Face folder: AutoModelForCausalLM.from_pretrained)")
    return 0


def main(argv: list[str]) -> int:
    """``shiq-train export RUN [--step N] --hf OUT``: errors are one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "log_level", "INFO"))
    if not progress_bars_shown(getattr(args, "log_level", "INFO")):  # WARNING or ERROR: warnings only
        hide_library_progress_bars()
    with on_sigterm():  # a kill (SIGTERM) removes the temporary folder, as Ctrl-C does, then ends with status 143
        return run_command("shiq-train export", _export, args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
