"""``shiq-train``: train a megatron-core GPT on a replay buffer from a Hydra config (``configs/train.yaml``).

One process (``shiq-train data.buffer=BUF out=RUN``) or many (``torchrun --nproc_per_node N -m shiq_train
...``; rank and world size come from torchrun's environment). The pieces, in order:

1. :func:`resolve_data_mode` — the data mode the loss's registry entry asks for (whole prompt groups for dpo,
   copg, dro_v_loo, mt_*; packed rows for the ShiQ family, dro_v and sft).
2. ``parallel.init_distributed`` — process groups (gloo on CPU, nccl on GPU), seed.
3. :func:`build_policy` — the model, with weights from ``init`` (random, SmolLM2, or a Hugging Face folder).
4. :func:`open_data_source` — this data-parallel rank's seeded, resumable sampler over the buffer.
5. ``Trainer.fit`` — steps, logs, checkpoints (resumes from the newest one in ``out``).

``loss=qsharp_value`` trains Q♯'s value model instead of the policy: :func:`run_value` (SHIQ_MATH §8).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import operator
import os
import shutil
import sys
import typing
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
import torch.distributed as dist
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from shiq_data.assets import config_dir
from shiq_data.buffer import open_buffer, read_manifest, refuse_inside_buffer
from shiq_data.cli_common import (
    EXIT_TERMINATED,
    Terminated,
    broken_pipe,
    fail,
    hide_library_progress_bars,
    interrupted,
    is_user_error,
    plural,
    progress_bars_shown,
    rank_zero,
    setup_logging,
    verbose,
)
from shiq_data.io import atomic_write_bytes, exclusive_lock, one_line, read_json_file, sha256_files
from shiq_data.ref_stats import ref_stats_dtype
from shiq_data.sampler import SEED_LIMIT, BufferSampler
from shiq_train import parallel, reference
from shiq_train.checkpoint import check_latest, latest_step_dir, read_meta
from shiq_train.config_paths import missing_buffer, missing_init
from shiq_train.hf_convert import (
    MODEL_TYPES,
    as_llama_config,
    hf_classes,
    import_llama,
    llama3_rope,
    load_causal_lm,
    model_config_from_llama,
)
from shiq_train.losses import sequence_return
from shiq_train.model import (
    RANDOM_START,
    ModelConfig,
    build_model_chunks,
    check_fp8_shapes,
    check_layout,
    check_runtime,
    draw_random_start,
    head_dim,
    resolved_transformer_impl,
    width_multiple,
)
from shiq_train.objectives import LOSS_NAMES, LOSSES, LossConfig
from shiq_train.qsharp_train import (
    LOCK_FILE,
    PROGRESS_FILE,
    RESUME_FILE,
    run_key_names,
    train_value_model,
    value_config_from_run,
)
from shiq_train.train_step import OptimizerConfig
from shiq_train.trainer import (
    LoggingConfig,
    SavedOnSigterm,
    TrainConfig,
    Trainer,
    frozen_copy,
    import_wandb,
    sigterm_stops_run,
)

log = logging.getLogger(__name__)

CONFIG_DIR = config_dir()
DATA_MODES = ("padded", "packed", "groups")
REF_COLUMNS = ("ref_chosen_logits", "ref_logz")
# model settings a checkpoint does not fix: kept from the model config when the shape comes from init
RUNTIME_FIELDS = (
    "init_method_std",
    "hidden_dropout",
    "attention_dropout",
    "params_dtype",
    "transformer_impl",
    "fp8",
    "logits_chunk_tokens",
    "recompute",
    "recompute_method",
    "recompute_num_layers",
    "sequence_parallel",
    "attention_backend",
    "compile",
)
# shape fields a Hugging Face checkpoint must agree on with the model config
SHAPE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "ffn_hidden_size",
    "vocab_size",
    "share_embeddings_and_output_weights",
    "rotary_base",
    "layernorm_epsilon",  # (not a shape, but the checkpoint's, and what its export records)
    "add_qkv_bias",  # (Qwen2's query/key/value biases)
    "kv_channels",  # (the heads' width, Qwen3's head_dim)
    "qk_layernorm",  # (Qwen3's query and key norms)
    "rope_scaling_factor",  # (Llama 3.1 and 3.2's rope_type llama3)
)
# keys no resumed run may change, not even with +resume.force=true, and why
FIXED_ON_RESUME = {
    "data.seed": "the rows' order is drawn from it, and the checkpoint holds the run's place in that order "
    "(data.seed follows seed unless given)",
}
# keys a resumed run may change without +resume.allow_changed: they do not change what a step computes
RESUME_SAFE_KEYS = (
    "out",
    "train.steps",
    "train.save_every",
    "train.log_every",
    "train.progress",
    "train.tensorboard",
    "logging.wandb",
    "logging.wandb_project",
    "logging.wandb_mode",
    "logging.level",  # which lines reach stderr
    "data.verify_checksums",  # whether shards are hashed before use: the same rows either way
    "train.cache_frozen_prefix",  # the same steps up to float rounding
    "train.share_prefixes",  # the same steps up to float rounding; absent from runs started before it existed
    "parallel.tp",  # checkpoints resume in any layout: the same steps up to float rounding
    "parallel.pp",
    "parallel.vpp",  # absent from runs started before it existed
    "model.recompute",  # memory features: the same steps (recompute exactly, sequence parallel up to rounding)
    "model.recompute_method",
    "model.recompute_num_layers",
    "model.sequence_parallel",
    "model.compile",  # the same steps up to float rounding; absent from runs started before it existed
    "model.attention_backend",  # the same steps up to float rounding; absent from runs started before it existed
    "parallel.cp",  # only 1 runs; absent from runs started before it existed
    "parallel.backend",  # the same steps up to float rounding (checkpoints load on the CPU); absent before it existed
    "parallel.timeout_minutes",  # how long a collective waits; absent before it existed
    "train.save_on_sigterm",  # when a checkpoint is written; absent from runs started before it existed
)
# keys absent from runs started before they existed, with the value those runs computed with
ABSENT_MEANS = {
    "train.loss_average": "micro_batch",
    "model.add_qkv_bias": False,
    "model.kv_channels": None,
    "model.qk_layernorm": False,
    "model.rope_scaling_factor": None,
}
GLOBAL_BATCH_KEY = "data.micro_batches_per_step"  # per data-parallel rank: may change with the number of ranks
RESUME_HELP = "+resume.allow_changed=[KEY,...] accepts changes to those keys, +resume.force=true any change"


class ConfigError(ValueError):
    """A config value that cannot work; the message names the option and the fix."""


def resolve_data_mode(loss_name: str, mode: str | None) -> tuple[str, str | None]:
    """``(mode, note)``: the data mode the loss needs, and a message when the config asked otherwise.

    Read off the loss's entry in ``objectives.LOSSES``: a loss with ``needs_groups`` compares
    completions of one prompt, so its micro-batches hold whole prompt groups; packed rows are only for
    losses with ``packed_ok``; the others read single rows (``padded`` unless asked otherwise).
    """
    if mode is not None and mode not in DATA_MODES:
        raise ConfigError(f"data.mode must be one of {DATA_MODES} (or null for the loss's default), got {mode!r}")
    if loss_name not in LOSSES:
        raise ConfigError(f"loss name must be one of {LOSS_NAMES}, got {loss_name!r}")
    spec = LOSSES[loss_name]
    if mode == "packed" and not spec.packed_ok:
        packed = [n for n, s in LOSSES.items() if s.packed_ok]
        hint = "data.mode=groups or null" if spec.needs_groups else "data.mode=padded or null"
        raise ConfigError(
            f"loss {loss_name!r} reads one trajectory per row, but data.mode=packed puts several in a row "
            f"(only {packed} read packed rows): use {hint}"
        )
    if spec.needs_groups:
        if mode not in (None, "groups"):
            return "groups", (
                f"loss {loss_name!r} compares completions of the same prompt, so it reads whole "
                f"prompt groups: using data.mode=groups instead of data.mode={mode}"
            )
        return "groups", None
    return mode or "padded", None


LLAMA_SHAPE = {  # what a checkpoint needs to export as (and be read back from) a Hugging Face Llama
    "gated_linear_unit": True,
    "activation": "silu",
    "normalization": "RMSNorm",
    "position_embedding_type": "rope",
    "add_bias_linear": False,
}


def check_llama_shaped(model_cfg) -> None:
    """Refuse, in one line naming each key, a model that is not Llama-shaped: its checkpoints could be neither
    exported nor evaluated (``shiq-eval`` reads them as Llama models)."""
    off = [f"model.{k}={getattr(model_cfg, k)!r}" for k, v in LLAMA_SHAPE.items() if getattr(model_cfg, k) != v]
    if off:
        want = ", ".join(f"{k}={v!r}" for k, v in LLAMA_SHAPE.items())
        raise ConfigError(
            f"{', '.join(off)}: model {model_cfg.name!r} is not Llama-shaped, which training needs (its checkpoints "
            f"are read as Llama models): use {want}"
        )


def llama_config_from_model(model_cfg):
    """A ``transformers.LlamaConfig`` with the shape of a :class:`~shiq_train.model.ModelConfig` (a
    ``Qwen2Config`` with ``add_qkv_bias``, a ``Qwen3Config`` with ``qk_layernorm``, without a sliding window; the
    heads' width ``kv_channels`` as ``head_dim``; ``rope_scaling_factor`` as Llama 3's ``rope_type`` 'llama3'), the
    inverse of ``hf_convert.model_config_from_llama``, so checkpoints export to Hugging Face. Both ``add_qkv_bias`` and ``qk_layernorm`` are refused: no Hugging Face
    model of this family computes them together (Qwen3's ``attention_bias`` also biases the output projection)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config  # heavy: transformers

    check_llama_shaped(model_cfg)
    if model_cfg.add_qkv_bias and model_cfg.qk_layernorm:
        raise ConfigError(
            f"model {model_cfg.name!r} has both add_qkv_bias and qk_layernorm: no Hugging Face model (Qwen2: the "
            "biases, Qwen3: the norms) computes both, so its checkpoints could not be exported; set one false"
        )
    shape = dict(
        vocab_size=model_cfg.vocab_size,
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.ffn_hidden_size or 4 * model_cfg.hidden_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        num_key_value_heads=model_cfg.num_query_groups or model_cfg.num_attention_heads,
        max_position_embeddings=model_cfg.max_sequence_length,
        rms_norm_eps=model_cfg.layernorm_epsilon,
        tie_word_embeddings=model_cfg.share_embeddings_and_output_weights,
        hidden_act="silu",
    )
    if model_cfg.kv_channels is not None or model_cfg.qk_layernorm:  # (Qwen3Config's own default head_dim is 128)
        shape["head_dim"] = head_dim(model_cfg)
    rope = {**llama3_rope(model_cfg.rope_scaling_factor), "rope_theta": float(model_cfg.rotary_base)}
    if model_cfg.qk_layernorm:
        return Qwen3Config(**shape, rope_parameters=rope, use_sliding_window=False, attention_bias=False)
    if model_cfg.add_qkv_bias:
        return Qwen2Config(**shape, rope_parameters=rope, use_sliding_window=False)
    # (plain RoPE given as rope_parameters: the config of rope_theta alone, field for field)
    return LlamaConfig(**shape, rope_parameters=rope, attention_bias=False, mlp_bias=False)


def read_llama_config(init: str):
    """The ``transformers.LlamaConfig`` of the Hugging Face folder ``init`` (a Mistral folder without a sliding
    window: the Llama config of the same model, :func:`shiq_train.hf_convert.as_llama_config`; a Qwen2 folder
    whose sliding window acts on no layer: its ``Qwen2Config``, a Qwen3 one likewise its ``Qwen3Config``); any
    other model type, or what the model would not compute (``model_config_from_llama``: another RoPE scaling than
    Llama 3's, biases), is refused naming the folder, as is a field transformers refuses (a string for a number)."""
    folder = Path(init)
    path = folder / "config.json"
    if (refusal := missing_init(init)) is not None:
        raise ConfigError(refusal)
    hf_config = read_json_file(path, ConfigError)
    if not isinstance(hf_config, dict):
        raise ConfigError(f"init={init!r}: {path} is not a JSON object")
    model_type = hf_config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"init={init!r}: {path} has model_type {model_type!r}; only Llama-family checkpoints "
            "(model_type 'llama', or 'mistral', 'qwen2' or 'qwen3' without a sliding window) can initialise the model"
        )
    from huggingface_hub.errors import StrictDataclassError  # (transformers' config validation)

    try:
        config = hf_classes(model_type)[0].from_pretrained(str(folder))
        return as_llama_config(config)  # (refuses what the model would not compute, such as another RoPE scaling)
    except (StrictDataclassError, ValueError, TypeError, ArithmeticError) as e:  # (a field transformers refuses too)
        raise ConfigError(f"init={init!r}: {path}: {one_line(e)}") from None


def model_config(section: dict, init: str, given: set[str] | None) -> ModelConfig:
    """The model to build. With ``init`` a Hugging Face folder and no model group chosen (``given``: the
    ``model.*`` keys set on the command line; None when a group was chosen), the folder's config.json
    decides the architecture and ``section`` only the settings a checkpoint does not fix
    (:data:`RUNTIME_FIELDS`) and the keys in ``given``. Otherwise ``section`` is the model as written."""
    if given is None or init in (None, "none", "smollm2"):
        return ModelConfig.from_dict(section)
    kept = {k: v for k, v in section.items() if k in RUNTIME_FIELDS or k in given}
    return model_config_from_llama(read_llama_config(init), **{"name": Path(init).name, **kept})


def load_init(init: str):
    """``(hf_state_dict, hf_config)`` of the initial weights, or ``(None, None)`` for ``init=none``.

    ``smollm2``: the packaged SmolLM2-135M-Instruct; anything else: a Hugging Face Llama (Mistral, Qwen2, Qwen3)
    folder (:func:`read_llama_config`).
    """
    if init in (None, "none"):
        return None, None
    if init != "smollm2":
        read_llama_config(init)  # a Llama folder, or a one-line refusal naming its model_type
    hf, _ = load_causal_lm(init, torch.float32)
    return hf.state_dict(), as_llama_config(hf.config)


def check_shape(model_cfg, hf_config, init: str) -> None:
    """Raise naming every shape field where the model config and the initial checkpoint disagree."""
    want = model_config_from_llama(hf_config)
    mine = {f: getattr(model_cfg, f) for f in SHAPE_FIELDS}
    mine["num_query_groups"] = model_cfg.num_query_groups or model_cfg.num_attention_heads
    mine["ffn_hidden_size"] = model_cfg.ffn_hidden_size or 4 * model_cfg.hidden_size
    mine["kv_channels"] = head_dim(model_cfg)
    want.kv_channels = head_dim(want)  # (null: the same width as hidden_size / num_attention_heads given)
    # an epsilon as the checkpoint's float32 holds it (SmolLM2's GGUF: 9.999999747e-06 for the config's 1e-05)
    same = {"layernorm_epsilon": lambda a, b: math.isclose(a, b, rel_tol=1e-6)}
    bad = [
        f"model.{f}={mine[f]} but the checkpoint has {getattr(want, f)}"
        for f in SHAPE_FIELDS
        if not same.get(f, operator.eq)(mine[f], getattr(want, f))
    ]
    if bad:
        raise ConfigError(
            f"init={init!r} does not fit model={model_cfg.name!r}: "
            + "; ".join(bad)
            + " (choose the matching model config, e.g. model=smollm2_135m for init=smollm2)"
        )


def build_policy(model_cfg, init: str, seed: int):
    """The model for this rank with its initial weights (``init=none``: drawn from ``seed``, the same in every
    layout; :func:`shiq_train.model.draw_random_start`), and the Hugging Face config to export it with.
    With virtual pipeline stages (``parallel.vpp`` > 1) the model is the list of this rank's chunks."""
    state, hf_config = load_init(init)
    if hf_config is not None:
        check_shape(model_cfg, hf_config, init)
    chunks = build_model_chunks(model_cfg)
    model = chunks if len(chunks) > 1 else chunks[0]
    if state is not None:
        import_llama(model, state, hf_config)
    else:
        draw_random_start(model, seed)
    return model, hf_config if hf_config is not None else llama_config_from_model(model_cfg)


def buffer_columns(buffer) -> set[str]:
    """Column names of an opened replay buffer."""
    schema = getattr(buffer, "schema", None)
    if schema is None:
        raise ConfigError(f"cannot read the columns of buffer {buffer!r}")
    return set(schema.names)


class DeviceSource:
    """A data source whose micro-batch tensors are moved to this process's device."""

    def __init__(self, source, device: torch.device):
        self.source, self.device = source, device

    def next_micro_batches(self) -> list[dict]:
        return [
            {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in mb.items()}
            for mb in self.source.next_micro_batches()
        ]

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)


def open_data_source(
    data_cfg: dict, mode: str, reference: str, dp_rank: int, dp_world: int, max_tokens: int, width_multiple: int = 1
):
    """This data-parallel rank's sampler over ``data_cfg['buffer']``; checks the reference columns.
    ``max_tokens`` (the model's sequence length) bounds every row: longer trajectories are an error.
    ``width_multiple``: micro-batch widths are padded to a multiple of it (``shiq_train.model.width_multiple``:
    sequence parallelism, FP8)."""
    path = Path(data_cfg["buffer"])
    if (refusal := missing_buffer(data_cfg["buffer"])) is not None:
        raise ConfigError(refusal)
    buffer = open_buffer(path, verify_checksums=data_cfg.get("verify_checksums", True))
    missing = [c for c in REF_COLUMNS if c not in buffer_columns(buffer)]
    if reference == "precomputed" and missing:
        raise ConfigError(
            f"buffer {path} has no reference statistics (columns {missing} missing), but "
            "train.reference=precomputed: add them with shiq-train ref-stats BUFFER --model MODEL, or set "
            "train.reference=online"
        )
    return BufferSampler(
        buffer,
        rows_per_micro_batch=data_cfg["rows_per_micro_batch"],
        micro_batches_per_step=data_cfg["micro_batches_per_step"],
        seed=data_cfg["seed"],
        dp_rank=dp_rank,
        dp_world=dp_world,
        mode=mode,
        max_tokens_per_row=max_tokens,
        width_multiple=width_multiple,
    )


def check_buffer(buffer_dir, model_cfg, init: str) -> dict:
    """Refuse a buffer the model cannot read, before any work: its tokenizer must be the model's (``init``
    smollm2 or a Hugging Face folder with tokenizer files; ``reference.model_tokenizer_info``) and its
    vocabulary must fit in ``model.vocab_size``. Returns the buffer's manifest."""
    manifest = read_manifest(buffer_dir)
    tok = reference.model_tokenizer_info(init)
    role = f"model (init={init}, model.vocab_size={model_cfg.vocab_size})"
    reference.check_tokenizer_matches(manifest["tokenizer"], tok, model_cfg.vocab_size, buffer_dir, role=role)
    return manifest


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def check_buffer_fits(cfg: dict, model_cfg, reference_mode: str) -> None:
    """Refuse, in one line that says what to run, a buffer the configured model cannot train on for reasons a
    setting fixes: a randomly initialised model's vocabulary smaller than the buffer's tokenizer, a
    ``model.max_sequence_length`` shorter than the buffer's longest row, and ``train.reference=precomputed``
    on a buffer without reference statistics. (A checkpoint's tokenizer that is not the buffer's is refused
    by :func:`check_buffer`.)"""
    buffer_dir, init = cfg["data"]["buffer"], cfg["init"]
    problems, fixes = [], []
    tok = read_manifest(buffer_dir)["tokenizer"]
    if init in (None, "none") and model_cfg.vocab_size < int(tok["vocab_size"]):
        problems.append(
            f"its tokenizer {tok.get('name')!r} has {tok['vocab_size']} tokens but the model's vocabulary "
            f"(model.vocab_size) has only {model_cfg.vocab_size}"
        )
        fixes.append(f"model.vocab_size={_round_up(int(tok['vocab_size']), 128)}")
    buffer = open_buffer(buffer_dir, verify_checksums=cfg["data"].get("verify_checksums", True))
    longest = reference.longest_row(buffer)
    if longest > model_cfg.max_sequence_length:
        problems.append(
            f"its longest row has {longest} tokens but model.max_sequence_length={model_cfg.max_sequence_length}"
        )
        fixes.append(f"model.max_sequence_length={_round_up(longest, 64)}")
    missing = [c for c in REF_COLUMNS if c not in buffer_columns(buffer)]
    alternative = ""
    if reference_mode == "precomputed" and missing:
        problems.append(f"it has no reference statistics (columns {missing}) but train.reference=precomputed")
        fixes.append("train.reference=online")
        if init not in (None, "none"):
            alternative = f" (or first add the statistics: shiq-train ref-stats {buffer_dir} --model {init})"
    if problems:
        raise ConfigError(
            f"buffer {buffer_dir} does not fit this configuration: {'; '.join(problems)}. Run: shiq-train "
            f"data.buffer={buffer_dir} out={cfg['out']} {' '.join(fixes)} (and your other settings){alternative}"
        )


def check_pairs(buffer_dir, loss_name: str, verify_checksums: bool = True) -> None:
    """Refuse a pair loss (DPO, CoPG and their multi-turn forms; ``LossSpec.needs_pairs``) on a buffer whose
    prompt groups all hold one row, and DPO (``needs_preferences``: ties dropped) on one whose groups all hold a
    single return: no step would have a pair, so every step would train nothing (loss 0, gradient 0) and end as
    if it had. Read shard by shard: memory grows with the rows, not the tokens."""
    spec = LOSSES[loss_name]
    if not spec.needs_pairs:
        return
    buffer = open_buffer(buffer_dir, verify_checksums=verify_checksums)
    names = ["group_id", "rewards", "action_mask"] if spec.needs_preferences else ["group_id"]
    shards = buffer.shard_columns(names)
    ids = np.concatenate([t.column("group_id").to_numpy() for t in shards]) if shards else np.zeros(0, np.int64)
    _, group = np.unique(ids, return_inverse=True)  # [N] each row's group, numbered 0 ..
    if len(group) and group.max() + 1 == len(group):
        raise ConfigError(
            f"buffer {buffer_dir}: every prompt group has one row, but loss={loss_name} compares completions of "
            "one prompt (pairs within a group): build the buffer with several completions per prompt, or use a "
            "loss that reads single rows (shiq, dro_v)"
        )
    if spec.needs_preferences and len(group) and _all_groups_tied(shards, group):
        raise ConfigError(
            f"buffer {buffer_dir}: the completions of every prompt group have the same return, but loss={loss_name} "
            "learns from pairs of different returns (ties are dropped): score the buffer's completions, or use "
            "loss=copg or a loss that reads single rows (shiq, dro_v)"
        )


def _row_returns(table, rows: int = 1024) -> np.ndarray:
    """``[N]`` float32: each row's return of a shard's columns as training computes it (``losses.sequence_return``
    on the padded float32 rows, so that a tie there, which DPO drops, is a tie here), ``rows`` rows at a time."""
    out = []
    for start in range(0, table.num_rows, rows):
        part = table.slice(start, rows)
        lengths = pc.list_value_length(part.column("rewards")).to_numpy()  # [n]
        at = (
            np.repeat(np.arange(len(lengths)), lengths),
            np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths),
        )  # (row, position) of each flattened token
        rewards = np.zeros((len(lengths), lengths.max(initial=0)), np.float32)  # [n, T]
        mask = np.zeros(rewards.shape, bool)  # [n, T]
        rewards[at] = pc.list_flatten(part.column("rewards")).to_numpy()
        mask[at] = pc.list_flatten(part.column("action_mask")).to_numpy(zero_copy_only=False)
        out.append(sequence_return(torch.from_numpy(rewards), torch.from_numpy(mask)).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _all_groups_tied(shards, group) -> bool:
    """Whether every group's rows (``group`` ``[N]``, over the rows of ``shards`` in order) have one return."""
    returns = np.concatenate([_row_returns(t) for t in shards])  # [N] float32
    high = np.full(group.max() + 1, -np.inf, np.float32)
    low = np.full(group.max() + 1, np.inf, np.float32)
    np.maximum.at(high, group, returns)
    np.minimum.at(low, group, returns)
    return bool((high == low).all())


def check_ref_stats_dtype(manifest: dict, model_cfg, reference_mode: str, buffer_dir) -> None:
    """Refuse precomputed reference statistics computed in another precision than ``model.params_dtype``:
    the trained model would differ from its reference before the first update (SHIQ_MATH §2)."""
    have = ref_stats_dtype(manifest)
    if reference_mode == "precomputed" and have != model_cfg.params_dtype:
        raise ConfigError(
            f"{buffer_dir}: its reference statistics were computed in {have} but model.params_dtype="
            f"{model_cfg.params_dtype}: train with model.params_dtype={have} or train.reference=online, or compute "
            f"the statistics in {model_cfg.params_dtype} on a buffer built without them (shiq-train ref-stats "
            f"BUFFER --model MODEL --dtype {model_cfg.params_dtype})"
        )


def reference_mismatch(manifest: dict, init: str, reference_mode: str, buffer_dir) -> str | None:
    """What to warn of when precomputed reference statistics come from another model than ``init`` (SHIQ_MATH
    §2: the loss regularises towards the model of the statistics, which then differs from the trained model
    before the first update), or None. Statistics of a training checkpoint are not compared (``init`` may be
    anything there). A warning, not a refusal: a run may start from one model and be held to another."""
    record = manifest.get("ref_model") if reference_mode == "precomputed" else None
    if not isinstance(record, dict) or record.get("megatron_checkpoint") or not isinstance(record.get("model"), str):
        return None
    model = record["model"]
    if init in (None, "none"):
        start = "init=none starts from random weights"
    elif reference.model_name(init) == model or _same_weights(init, record):
        return None
    else:
        start = f"init={init} is another model"
    return (
        f"{buffer_dir}: its reference statistics were computed with {model}, but {start}: the loss holds the trained "
        "model to that reference (train.reference=online holds it to init)"
    )


def _same_weights(init: str, record: dict) -> bool:
    """Whether the folder ``init`` holds the weights whose SHA-256 the reference record keeps (a copy of the
    model at another path)."""
    if init == "smollm2" or not isinstance(record.get("sha256"), str) or not Path(init).is_dir():
        return False
    try:
        return reference.weights_sha256(init) == record["sha256"]
    except (OSError, ValueError):
        return False


def resume_options(section) -> tuple[set[str], bool]:
    """``(allowed, force)`` from the command line's ``+resume.allow_changed=[KEY,...]`` and ``+resume.force=true``."""
    if section is None:
        return set(), False
    if not isinstance(section, dict) or set(section) - {"allow_changed", "force"}:
        raise ConfigError(f"unknown resume option in {section!r}: {RESUME_HELP}")
    allowed = section.get("allow_changed", [])
    allowed = [allowed] if isinstance(allowed, str) else allowed
    if not isinstance(allowed, list) or not all(isinstance(k, str) for k in allowed):
        raise ConfigError(f"resume.allow_changed must be a list of dotted keys, got {allowed!r}: {RESUME_HELP}")
    force = section.get("force", False)
    if not isinstance(force, bool):
        raise ConfigError(f"resume.force must be true or false, got {force!r}")
    return set(allowed), force


def _flat(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (empty dicts stay values)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _comparable(cfg: dict) -> dict:
    flat = _flat(cfg)
    for key in ("out", "data.buffer"):  # the same folder spelled another way is no change
        if isinstance(flat.get(key), str):
            flat[key] = str(Path(flat[key]).resolve())
    return flat


def _check_out(out: Path) -> None:
    """Refuse an ``out`` that is a file, a buffer or a folder inside one, or a folder holding other things than a
    run (a home folder): training would write its config, checkpoints and logs among them."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file: give a folder for the run")
    _refuse_out_in_buffer(out)
    held = [p for p in out.iterdir() if p.name != LOCK_NAME] if out.is_dir() else []
    if held and not any((out / n).exists() for n in ("config.yaml", "checkpoints")):
        raise ConfigError(
            f"out={out} holds files but is not a shiq-train run folder (no config.yaml, no checkpoints): give a new "
            "or empty folder"
        )


def _refuse_out_in_buffer(out: Path) -> None:
    """Refuse ``out=`` a buffer or a folder inside one: the buffer's folder is its own (``validate`` would delete
    what its manifest does not list)."""
    try:
        refuse_inside_buffer(out, "out=", itself=True)
    except ValueError as e:
        raise ConfigError(str(e).replace("out= ", "out=", 1)) from None


def _logged_steps(out: Path) -> int:
    """How many steps ``out/metrics.jsonl`` logs (0 if it is absent; a file that is not a log counts as one)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    if not path.is_file():
        return 1  # (refused by the trainer, naming it)
    return sum(1 for line in path.read_text(errors="replace").splitlines() if line.strip())


def damaged_config(path: Path, out: Path, what: str) -> ConfigError:
    """The refusal of a run's saved configuration ``path`` that is cut short or damaged (``what``: how), saying
    where the same configuration is kept: the ``meta.json`` of ``out``'s newest checkpoint, if it holds one."""
    try:
        step_dir = latest_step_dir(out / "checkpoints")
        kept = step_dir is not None and isinstance(read_meta(step_dir).get("meta", {}).get("config"), dict)
    except (ValueError, OSError):
        kept = False
    fix = (
        f"restore it from the 'config' of the 'meta' object in {step_dir / 'meta.json'} (the configuration its "
        "checkpoint was saved with), or use another out="
        if kept
        else "restore it from a copy, or use another out="
    )
    return ConfigError(f"{path}: {what}: the file looks truncated or damaged; {fix}")


def check_resume_config(
    out: Path,
    cfg: dict,
    allowed: set[str],
    force: bool,
    dp: tuple[int, int] | None = None,
    why: str = "resuming would mix the two",
    saved_micro_batches: int | None = None,
) -> list[str]:
    """Compare the configuration ``cfg`` of a resumed run with ``out/config.yaml`` (the one it was started
    with); raise naming every differing key unless each is in :data:`RESUME_SAFE_KEYS` or ``allowed``, or
    ``force``, and a key of :data:`FIXED_ON_RESUME` whatever is allowed. Returns the differing keys.

    ``dp``: the data-parallel size the checkpoint was saved with and this run's. A step's global batch is
    ``dp * data.micro_batches_per_step`` micro-batches, read in the same stream order whatever ``dp`` is, so
    ``data.micro_batches_per_step`` may change exactly when the global batch stays; a global batch that
    changes (a new ``dp`` with the old value) is a change of that key, with the value that keeps it.
    ``saved_micro_batches``: that key's value in the checkpoint's own configuration, which pairs with its ``dp``
    (``config.yaml`` may be a later start's, one stopped before it saved a checkpoint)."""
    path = out / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise damaged_config(path, out, f"not valid YAML ({one_line(e, 200)})") from None
    if saved is not None and not isinstance(saved, dict):
        raise damaged_config(path, out, f"expected a mapping of options, got {type(saved).__name__}")
    sections = [k for k, v in cfg.items() if isinstance(v, dict) and v]
    lost = [k for k in sections if not isinstance((saved or {}).get(k), dict)]
    if saved is not None and not force and 2 * len(lost) > len(sections):  # (an older release lacks a few keys)
        raise damaged_config(path, out, f"it lacks {len(lost)} of the {len(sections)} sections ({', '.join(lost)})")
    if saved is None:
        if force:
            return []
        raise ConfigError(
            f"{out} holds checkpoints but no config.yaml to compare this configuration with: use another out=, "
            "or +resume.force=true to resume with this configuration"
        )
    old, new = _comparable(saved), _comparable(cfg)
    old = {**{k: v for k, v in ABSENT_MEANS.items() if k in new}, **old}
    if isinstance(saved_micro_batches, int) and not isinstance(saved_micro_batches, bool) and saved_micro_batches >= 1:
        old[GLOBAL_BATCH_KEY] = saved_micro_batches
    unknown = sorted(allowed - old.keys() - new.keys())
    if unknown:  # a misspelt key would otherwise accept nothing, silently
        raise ConfigError(
            f"+resume.allow_changed names {unknown[0]!r}, which is not a key of this run's configuration "
            "(dotted keys such as loss.beta; +resume.force=true accepts any change)"
        )
    unset = object()
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, unset) != new.get(k, unset))
    notes = {}
    m_old, m_new = old.get(GLOBAL_BATCH_KEY), new.get(GLOBAL_BATCH_KEY)
    if dp is not None and isinstance(m_old, int) and isinstance(m_new, int):
        if dp[0] * m_old == dp[1] * m_new:
            changed = [k for k in changed if k != GLOBAL_BATCH_KEY]
        else:
            changed = sorted({*changed, GLOBAL_BATCH_KEY})
            keep = f"{GLOBAL_BATCH_KEY}={dp[0] * m_old // dp[1]} keeps it" if dp[0] * m_old % dp[1] == 0 else ""
            notes[GLOBAL_BATCH_KEY] = (
                f" (a global batch of {dp[0]} x {m_old} micro-batches saved, {dp[1]} x {m_new} now over "
                f"data-parallel ranks{'; ' + keep if keep else ''})"
            )
    fixed = [k for k in changed if k in FIXED_ON_RESUME and k in old and k in new]
    if fixed:  # (the sampler refused it anyway, later and without naming the key)
        k = fixed[0]
        raise ConfigError(
            f"{path}: the run in {out} was started with {k}={old[k]!r:.40} and this configuration gives "
            f"{new[k]!r:.40}: {FIXED_ON_RESUME[k]}; no option resumes with another value: rerun with the saved "
            "one or use another out="
        )
    refused = [k for k in changed if k not in RESUME_SAFE_KEYS and k not in allowed]
    if refused and not force:

        def show(v):
            return "(unset)" if v is unset else repr(v)[:40]

        def diff(k):
            if k == GLOBAL_BATCH_KEY and m_old == m_new:  # the key as saved: the number of ranks changed
                return f"{k}={m_new} over {dp[0]} -> {dp[1]} data-parallel ranks{notes.get(k, '')}"
            return f"{k} {show(old.get(k, unset))} -> {show(new.get(k, unset))}{notes.get(k, '')}"

        diffs = ", ".join(diff(k) for k in refused)
        raise ConfigError(
            f"{path}: the run in {out} was started with another configuration ({diffs}); {why}: rerun with the "
            f"saved values, use another out=, or accept the change with "
            f"+resume.allow_changed=[{','.join(refused)}] (+resume.force=true accepts any change)"
        )
    return changed


def outermost_missing(path: Path) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist (what creating ``path`` would create
    first), or None if ``path`` exists."""
    return next((p for p in [*reversed(path.parents), path] if not p.exists()), None)


def start_state(out: Path) -> tuple[Path | None, set[str] | None]:
    """What a failed start may remove (:func:`remove_half_made_run`): the outermost folder it will create for
    ``out``, or, when ``out`` exists, the names it holds now."""
    created = outermost_missing(out)
    return created, ({p.name for p in out.iterdir()} if created is None and out.is_dir() else None)


def remove_half_made_run(state: tuple[Path | None, set[str] | None], out: Path) -> None:
    """After a failed start: remove what it made (:func:`start_state`: the outermost folder it created for
    ``out``, else the files and folders it added to an existing ``out``) unless the run got as far as a
    logged step or a checkpoint. Folders and files that existed before are never touched."""
    created, before = state
    metrics = out / "metrics.jsonl"
    if (out / "checkpoints" / "latest").exists() or (metrics.is_file() and metrics.stat().st_size > 0):
        return
    if created is not None:
        if created.exists():
            shutil.rmtree(created, ignore_errors=True)
        return
    for p in out.iterdir() if before is not None and out.is_dir() else ():
        if p.name not in before:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _fits(value, kind) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is type(None):
        return value is None
    return isinstance(value, kind) if isinstance(kind, type) else True


def check_types(cls, section: dict, prefix: str) -> None:
    """Refuse a value of the wrong type for a dataclass field (``optimizer.lr=abc``), naming the key."""
    hints = typing.get_type_hints(cls)
    for key, value in section.items():
        kinds = typing.get_args(hints[key]) or (hints[key],) if key in hints else ()
        if kinds and not any(_fits(value, k) for k in kinds):
            names = " or ".join("null" if k is type(None) else getattr(k, "__name__", str(k)) for k in kinds)
            raise ConfigError(f"{prefix}.{key}={value!r}: expected {names}")


def _dataclass_from(cls, section: dict, prefix: str):
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"unknown {prefix} option(s) {unknown}; known: {sorted(known)}")
    check_types(cls, section, prefix)
    return cls(**section)


# a policy run's settings the value trainer does not read, with what it does in their place
VALUE_RUN_UNREAD = {"logging.wandb": False, "train.log_every": 1}


def run_value(cfg: dict, model_keys: set[str] | None = None, model_overrides: set[str] | None = None) -> Path:
    """Train Q♯'s value model (a loss whose registry entry has ``trains="value"``, SHIQ_MATH §8) with the
    run's settings (``qsharp_train.value_config_from_run``) in one process; returns ``out``, written as
    ``shiq_train.qsharp_value.load_value_model`` reads it, with the resolved config in value_model.json."""
    name = cfg["loss"]["name"]
    if cfg["init"] in (None, "none"):
        raise ConfigError(
            f"loss={name} starts the value model from the reference: give init=smollm2 or a Hugging Face Llama folder"
        )
    check_plain_options(cfg)  # (a negative seed: numpy's "expected non-negative integer", naming no key)
    for key, means in VALUE_RUN_UNREAD.items():
        section, option = key.split(".")
        if (cfg.get(section) or {}).get(option, means) != means:
            raise ConfigError(
                f"{key}={cfg[section][option]!r}: loss={name} does not read it (it logs every step to the value "
                f"model's metrics.jsonl only); leave it at {means!r}"
            )
    sizes = {k: cfg["parallel"].get(k, 1) for k in ("tp", "pp", "cp", "vpp")}  # (cp, vpp: else silently unused)
    if any(v != 1 for v in sizes.values()) or int(os.environ.get("WORLD_SIZE", 1)) != 1:
        given = ", ".join(f"parallel.{k}={v}" for k, v in sizes.items() if v != 1)
        raise ConfigError(
            f"loss={name} trains in one process: parallel.tp=1, parallel.pp=1, parallel.cp=1, parallel.vpp=1 and "
            f"no torchrun" + (f" (got {given})" if given else "")
        )
    try:  # one process, no process group: only whether the machine has what parallel.backend asks for
        parallel.ParallelConfig(backend=cfg["parallel"].get("backend", "auto")).resolved_backend()
    except (ValueError, RuntimeError) as e:
        raise ConfigError(str(e)) from None
    if cfg["data"].get("mode") not in (None, "padded"):
        raise ConfigError(f"loss={name} reads one trajectory per row: data.mode must be null or padded")
    _refuse_out_in_buffer(Path(cfg["out"]))
    if (refusal := missing_buffer(cfg["data"]["buffer"])) is not None:
        raise ConfigError(refusal)
    out = Path(cfg["out"])
    created = start_state(out)  # what is removed again if this start fails before a step is done
    # the run folder's lock, released however this ends (SIGTERM too: sigterm_stops_run)
    with sigterm_stops_run(), contextlib.ExitStack() as held:
        if not out.is_symlink() and (out.is_dir() or not out.exists()):  # (else train_value_model refuses it)
            lock_run_folder(held, out)  # two runs into one folder would write each other's steps and state
        try:
            return _run_value(cfg, name, model_keys, model_overrides)
        except SavedOnSigterm:  # (a step was done and saved: the folder is the run's, to resume or its model)
            raise
        except BaseException:  # removed unless a step was done
            progress = out / PROGRESS_FILE
            if not (out / RESUME_FILE).is_file() and not (progress.is_file() and progress.stat().st_size > 0):
                remove_half_made_run(created, out)
            raise


def _run_value(cfg: dict, name: str, model_keys: set[str] | None, model_overrides: set[str] | None) -> Path:
    """:func:`run_value` once the run folder is this run's: the model, the buffer's checks and the training."""
    model_cfg = model_config(cfg["model"], cfg["init"], model_keys)
    # the run's own settings first: refused in a moment, not after the reference's weights are loaded
    value_cfg = value_config_from_run(cfg, model_cfg.max_sequence_length)
    check_min_lr(value_cfg)
    level = _dataclass_from(LoggingConfig, cfg.get("logging") or {}, "logging").level
    state, hf_config = load_init(cfg["init"])
    check_shape(model_cfg, hf_config, cfg["init"])
    # the value model learns the returns of the buffer's ids under the reference: the same tokenizer, as a policy run
    manifest = check_buffer(cfg["data"]["buffer"], model_cfg, cfg["init"])
    # the trunk is the reference's own model (train_value_model builds it from init's config, in float32, without
    # dropout): a model.* setting given for it would not be used, and value_model.json records what was built
    built = model_config_from_llama(hf_config, name=model_cfg.name, max_sequence_length=model_cfg.max_sequence_length)
    unused = [
        k
        for k in sorted(model_keys if model_keys is not None else model_overrides or ())
        if k in built.to_dict() and getattr(model_cfg, k) != getattr(built, k)
    ]
    if unused:
        raise ConfigError(
            f"loss={name} builds its value model from init's config.json as it is: "
            f"{', '.join(f'model.{k}={getattr(model_cfg, k)!r}' for k in unused)} would not be used; leave "
            f"{'it' if len(unused) == 1 else 'them'} out"
        )
    if not progress_bars_shown(level):  # WARNING or ERROR: warnings only, no bar (as a policy run's)
        value_cfg = dataclasses.replace(value_cfg, progress=False)
    cfg = {**cfg, "model": built.to_dict()}
    try:
        out = train_value_model(
            cfg["data"]["buffer"],
            cfg["out"],
            state,
            hf_config,
            value_cfg,
            meta={  # what shiq-eval run --guide checks the reference and the tokenizer against
                "config": cfg,
                "reference_sha256": sha256_files(reference.model_weight_files(cfg["init"])),
                "tokenizer": manifest["tokenizer"],
            },
            verify_checksums=cfg["data"].get("verify_checksums", True),
        )
    except ValueError as e:  # (value.v_min is the run's loss.v_min)
        raise ValueError(run_key_names(str(e))) from None
    print(
        f"shiq-train: {name} on {cfg['data']['buffer']}: {plural(value_cfg.steps, 'step')}; value model in {out} "
        f"(metrics in {out / 'metrics.jsonl'}; use it with shiq-eval run --guide {out} --beta B)"
    )
    return out


def check_min_lr(opt) -> None:
    """Refuse an ``optimizer.min_lr`` that no step would reach: with ``decay_steps`` 0 the rate stays ``lr``."""
    if opt.min_lr != 0 and opt.decay_steps == 0:
        raise ConfigError(
            f"optimizer.min_lr={opt.min_lr} is never reached with optimizer.decay_steps=0 (the learning rate stays "
            "optimizer.lr after warm-up): give optimizer.decay_steps, the steps of the cosine decay to min_lr, or "
            "leave min_lr at 0"
        )


def check_plain_options(cfg: dict) -> None:
    """The options outside the dataclass sections: integers where integers are needed, paths as strings."""
    sizes = {k: v for k, v in (cfg.get("parallel") or {}).items() if k != "backend"}  # (backend: a name)
    ints = {"seed": cfg.get("seed"), **{f"parallel.{k}": v for k, v in sizes.items()}}
    data = cfg.get("data") or {}
    ints.update({f"data.{k}": data.get(k) for k in ("rows_per_micro_batch", "micro_batches_per_step", "seed")})
    for key, value in ints.items():
        low = 0 if "seed" in key else 1  # (numpy refuses a negative seed, without naming it)
        if not _fits(value, int) or not low <= value < 2**63:
            raise ConfigError(f"{key}={value!r}: expected an integer >= {low}")
    if ints["data.seed"] >= SEED_LIMIT:  # (the sampler's epochs are drawn from [data.seed, epoch])
        raise ConfigError(
            f"data.seed={ints['data.seed']}: expected an integer below 2**32 = {SEED_LIMIT} (a larger one repeats the "
            "order of a smaller seed; data.seed follows seed unless given)"
        )
    for key, value in (("out", cfg.get("out")), ("data.buffer", data.get("buffer"))):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}={value!r}: expected a path")
    if cfg.get("init") is not None and not isinstance(cfg["init"], str):  # (init=3: a folder named 3, unquoted)
        raise ConfigError(
            f"init={cfg['init']!r}: expected none, smollm2 or a Hugging Face model folder (a folder named like a "
            "number or true/false in quotes: init=\"'3'\")"
        )
    if not isinstance(data.get("verify_checksums", True), bool):
        raise ConfigError(f"data.verify_checksums={data['verify_checksums']!r}: expected true or false")


def check_packed_layers(mode: str, model_cfg) -> None:
    """Refuse ``data.mode=packed`` unless the layers are megatron's local ones: packed rows keep their
    trajectories apart by a block-diagonal attention mask, which Transformer Engine's layers (causal mask type)
    ignore, so each trajectory would attend to the ones packed before it."""
    impl = resolved_transformer_impl(model_cfg)
    if mode == "packed" and impl != "local":
        chosen = (
            "auto, which picks Transformer Engine on this machine" if model_cfg.transformer_impl == "auto" else impl
        )
        raise ConfigError(
            f"data.mode=packed needs megatron's local layers, but model.transformer_impl={chosen}: Transformer "
            "Engine's attention ignores the block-diagonal mask that keeps packed trajectories apart; set "
            "data.mode=padded or model.transformer_impl=local"
        )


def parallel_config(section: dict, model_cfg, micro_batches: int) -> parallel.ParallelConfig:
    """The layout of ``parallel.*`` (tp, pp, cp, vpp, backend), refused in one line naming the key if it cannot
    run this model, step, machine or number of processes (``ParallelConfig.check_fits``,
    ``parallel.check_context_parallel``, ``model.check_layout``, ``ParallelConfig.resolved_backend``; torchrun's
    ``WORLD_SIZE`` a multiple of tp x pp), before any process group or run folder is made."""
    try:
        par = parallel.ParallelConfig(
            section["tp"],
            section["pp"],
            section.get("cp", 1),
            section.get("vpp", 1),
            section.get("backend", "auto"),
            section.get("timeout_minutes", 30.0),
        )
        par.check_fits(model_cfg.num_layers, micro_batches)
        parallel.check_context_parallel(par.context_parallel_size)
        tp, pp, vpp = (
            par.tensor_model_parallel_size,
            par.pipeline_model_parallel_size,
            par.virtual_pipeline_model_parallel_size,
        )
        check_layout(model_cfg, tp, pp, vpp)
        par.resolved_backend()
    except (ValueError, RuntimeError) as e:
        raise ConfigError(str(e)) from None
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isascii() and world.isdigit() and int(world) % (tp * pp):
        raise ConfigError(
            f"parallel.tp x parallel.pp = {tp} x {pp} needs a multiple of {tp * pp} processes, but this run has "
            f"{world} (WORLD_SIZE): start it with torchrun --nproc-per-node {tp * pp}, or a multiple"
        )
    return par


def run(cfg: dict, model_keys: set[str] | None = None, model_overrides: set[str] | None = None) -> Path:
    """Train as configured (``cfg``: the resolved config as a plain dict); returns the run directory.

    ``model_keys``: the ``model.*`` keys set on the command line when no model group was chosen, so an
    ``init`` folder decides the architecture (:func:`model_config`); None takes ``cfg['model']`` as is.
    ``model_overrides``: the ``model.*`` keys set on the command line whether or not a model group was chosen."""
    spec = LOSSES.get(cfg["loss"].get("name"))
    if spec is not None and spec.trains == "value":  # Q♯'s value model, not the policy
        return run_value(cfg, model_keys, model_overrides)
    logging_cfg = _dataclass_from(LoggingConfig, cfg.get("logging") or {}, "logging")
    if logging_cfg.wandb:
        import_wandb()  # installed, or one line saying how, before any work

    allowed, force = resume_options(cfg.get("resume"))
    cfg = {k: v for k, v in cfg.items() if k != "resume"}  # how to start, not what the run is
    check_plain_options(cfg)
    check_types(ModelConfig, {k: v for k, v in cfg["model"].items() if k in ModelConfig.__dataclass_fields__}, "model")
    model_cfg = model_config(cfg["model"], cfg["init"], model_keys)
    check_llama_shaped(model_cfg)  # before any process group or folder: build_policy needs it
    try:
        check_runtime(model_cfg)
    except RuntimeError as e:
        raise ConfigError(str(e)) from None
    par = parallel_config(cfg["parallel"], model_cfg, cfg["data"]["micro_batches_per_step"])
    try:
        check_fp8_shapes(model_cfg, par.tensor_model_parallel_size)
    except RuntimeError as e:
        raise ConfigError(str(e)) from None
    loss_cfg = _dataclass_from(LossConfig, cfg["loss"], "loss")
    opt_cfg = _dataclass_from(OptimizerConfig, cfg["optimizer"], "optimizer")
    check_min_lr(opt_cfg)
    train_cfg = _dataclass_from(TrainConfig, cfg["train"], "train")
    if not progress_bars_shown(logging_cfg.level):  # WARNING or ERROR: warnings only, no bar
        train_cfg = dataclasses.replace(train_cfg, progress=False)
    mode, note = resolve_data_mode(loss_cfg.name, cfg["data"].get("mode"))
    check_packed_layers(mode, model_cfg)
    if train_cfg.share_prefixes and (
        mode == "packed"
        or par.tensor_model_parallel_size > 1
        or par.pipeline_model_parallel_size > 1
        or model_cfg.hidden_dropout > 0
        or model_cfg.attention_dropout > 0
        or resolved_transformer_impl(model_cfg) != "local"
    ):
        raise ConfigError(
            "train.share_prefixes=true needs one trajectory per row (data.mode=padded or groups), tensor and "
            "pipeline parallel size 1, no dropout and megatron's local layers (got "
            f"data.mode={mode}, parallel.tp={par.tensor_model_parallel_size}, "
            f"parallel.pp={par.pipeline_model_parallel_size}, model.hidden_dropout={model_cfg.hidden_dropout}, "
            f"model.attention_dropout={model_cfg.attention_dropout}, "
            f"model.transformer_impl={resolved_transformer_impl(model_cfg)}): set train.share_prefixes=false"
        )
    if train_cfg.cache_frozen_prefix and mode == "packed":  # (else refused once the cache is built: a buffer pass)
        raise ConfigError(
            "train.cache_frozen_prefix=true does not support packed rows (data.mode=packed): use data.mode=padded or "
            "groups, or set train.cache_frozen_prefix=false"
        )
    if (refusal := missing_buffer(cfg["data"]["buffer"])) is not None:  # before starting process groups
        raise ConfigError(refusal)
    # (the buffer's reference statistics only matter to a loss that reads them: sft reads none)
    ref_mode = train_cfg.reference if loss_cfg.spec.needs_reference else None
    check_buffer_fits(cfg, model_cfg, ref_mode)
    check_pairs(cfg["data"]["buffer"], loss_cfg.name, cfg["data"].get("verify_checksums", True))
    manifest = check_buffer(cfg["data"]["buffer"], model_cfg, cfg["init"])
    check_ref_stats_dtype(manifest, model_cfg, ref_mode, cfg["data"]["buffer"])
    if (mismatch := reference_mismatch(manifest, cfg["init"], ref_mode, cfg["data"]["buffer"])) and rank_zero():
        log.warning(f"shiq-train: {mismatch}")
    cfg = {**cfg, "model": model_cfg.to_dict(), "data": {**cfg["data"], "mode": mode}}
    log.debug(f"shiq-train: resolved config {json.dumps(cfg, sort_keys=True, default=str)}")
    out = Path(cfg["out"])
    created = start_state(out)  # what is removed again if this start fails before a step is done
    _check_out(out)
    # the run folder's lock, released however this ends (SIGTERM too: sigterm_stops_run)
    with sigterm_stops_run(), contextlib.ExitStack() as held:
        if rank_zero():
            lock_run_folder(held, out)
        try:
            check_latest(out / "checkpoints")  # (the trainer checks it too; here before any work)
            saved_step = latest_step_dir(out / "checkpoints")
            if saved_step is not None:
                saved = read_meta(saved_step)
                tp_pp = cfg["parallel"]["tp"] * cfg["parallel"]["pp"]
                dp = (saved["layout"]["dp"], max(1, int(os.environ.get("WORLD_SIZE", 1)) // tp_pp))
                saved_cfg = saved.get("meta", {}).get("config")  # (read_meta: meta is an object)
                saved_data = saved_cfg.get("data") if isinstance(saved_cfg, dict) else None
                m = saved_data.get("micro_batches_per_step") if isinstance(saved_data, dict) else None
                check_resume_config(out, cfg, allowed, force, dp, saved_micro_batches=m)
                if not force:  # (+resume.force=true accepts any change, this one too)
                    check_online_reference_start(cfg, saved)
            elif (out / "config.yaml").is_file() and (logged := _logged_steps(out)):  # stopped before a checkpoint
                why = f"a new start would replace its log of {plural(logged, 'step')}"
                check_resume_config(out, cfg, allowed, force, why=why)
            return _train(cfg, out, par, model_cfg, loss_cfg, opt_cfg, train_cfg, logging_cfg, mode, note, manifest)
        except BaseException:  # (a Ctrl-C or SIGTERM while megatron is imported or the process groups start too)
            if rank_zero():  # (the other ranks' checks fail alike; in training, rank 0 alone writes the folder)
                remove_half_made_run(created, out)
            raise


LOCK_NAME = LOCK_FILE  # ".lock": held (flock) by the run training into the folder


def check_online_reference_start(cfg: dict, saved: dict) -> None:
    """Refuse to resume a run whose online reference would change: with ``init=none`` and
    ``train.reference=online`` the reference is rebuilt from the seeded random start, which is the same in every
    layout and on every device (:func:`shiq_train.model.draw_random_start`) but was drawn otherwise by releases
    before it, whose checkpoints do not record ``random_start``. ``saved``: the checkpoint's ``meta.json``.
    Every other start loads its reference."""
    if cfg["init"] not in (None, "none") or cfg["train"].get("reference") != "online":
        return
    meta = saved.get("meta")
    if not isinstance(meta, dict) or meta.get("random_start") != RANDOM_START:
        raise ConfigError(
            "the checkpoint was saved by an earlier shiq-train, which drew the random start (init=none) otherwise: "
            "the online reference, rebuilt from it, would be another model; start the run again in another out= "
            "(or keep training it with the release that began it)"
        )


def lock_run_folder(held: contextlib.ExitStack, out: Path) -> None:
    """Make ``out`` and hold an exclusive lock on ``out/.lock`` in ``held`` (``shiq_data.io.exclusive_lock``;
    released when ``held`` closes, or when the process ends), or a ``ConfigError`` if another run holds it:
    two runs into one folder would pass the resume check before either saved a checkpoint, then write each
    other's steps into one run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a folder without write permission, a path under /proc
        raise ConfigError(f"out={out}: cannot be made ({e.strerror}: {e.filename})") from None
    why = held.enter_context(exclusive_lock(out / LOCK_NAME, wait=False, holder="another shiq-train run"))
    if why is not None:
        raise ConfigError(f"out={out}: {why}, training into this folder: wait for it to end, or use another out=")


def _train(cfg, out, par, model_cfg, loss_cfg, opt_cfg, train_cfg, logging_cfg, mode, note, manifest) -> Path:
    """:func:`run` once the configuration is checked and the run folder is this run's: the training itself."""
    from megatron.core import parallel_state as ps  # heavy: megatron

    parallel.init_distributed(par, seed=cfg["seed"])
    try:
        rank0 = dist.get_rank() == 0
        if note and rank0:
            log.info(f"shiq-train: {note}")
        source = open_data_source(
            cfg["data"],
            mode,
            train_cfg.reference if loss_cfg.spec.needs_reference else None,
            ps.get_data_parallel_rank(),
            ps.get_data_parallel_world_size(),
            model_cfg.max_sequence_length,
            width_multiple(model_cfg, par.tensor_model_parallel_size),
        )
        model, hf_config = build_policy(model_cfg, cfg["init"], cfg["seed"])
        ref = frozen_copy(model, model_cfg) if train_cfg.reference == "online" else None

        started = []  # the step training starts from (on_start's)

        def on_start(step: int) -> None:  # the checkpoint (if any) loaded: only now is the run folder written
            started.append(step)
            if rank0:
                out.mkdir(parents=True, exist_ok=True)
                restart = not step and (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size
                if step < train_cfg.steps or not (out / "config.yaml").is_file():  # else nothing trains with cfg
                    atomic_write_bytes(out / "config.yaml", yaml.safe_dump(cfg, sort_keys=False).encode())
                if step:
                    log.info(f"shiq-train: resumed from step {step} ({latest_step_dir(out / 'checkpoints')})")
                elif restart:
                    log.info(f"shiq-train: {out} has no checkpoint: training again from step 0 (its metrics.jsonl too)")

        meta = {"config": cfg, "hf_config": hf_config.to_dict(), "tokenizer": manifest["tokenizer"]}
        if cfg["init"] in (None, "none"):
            meta["random_start"] = RANDOM_START
        trainer = Trainer(
            model, loss_cfg, opt_cfg, train_cfg, out, ref_model=ref, run_meta=meta, logging_cfg=logging_cfg
        )
        history = trainer.fit(DeviceSource(source, parallel.device()), on_start=on_start)
        if rank0:
            at = started[-1] if started else train_cfg.steps
            if history:
                last = f"loss {history[-1]['loss']:.4g}"
            elif at > train_cfg.steps:  # a resume past what is asked trains nothing: say so, not "complete"
                last = f"nothing trained: the run is at step {at}, past train.steps={train_cfg.steps}"
            else:
                last = "already complete"
            if not history:
                log.warning(nothing_trained(out, at, train_cfg.steps))
            print(
                f"shiq-train: {loss_cfg.name} on {cfg['data']['buffer']}: {plural(train_cfg.steps, 'step')} ({last}); "
                f"metrics in {out / 'metrics.jsonl'}, checkpoints in {out / 'checkpoints'}"
            )
    finally:
        parallel.destroy_distributed()
    return out


def nothing_trained(out: Path, at: int, steps: int) -> str:
    """The line a resumed run already at step ``at`` >= ``train.steps`` (``steps``) ends with on stderr: it trained
    nothing, its files left as they were but for a metrics.jsonl a kill left to repair (a rerun of a finished
    command, a scheduler's retry, exits 0 all the same), and what continues it."""
    return (
        f"shiq-train: nothing trained: the run in {out} is already at step {at} >= train.steps={steps}; "
        f"train.steps={at + 1} or more continues it"
    )


def model_keys_given(overrides: list[str]) -> set[str] | None:
    """The ``model.*`` keys among Hydra command-line ``overrides``, or None if a model group was chosen."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    if "model" in keys:
        return None
    return {k[len("model.") :] for k in keys if k.startswith("model.")}


def _task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig  # heavy: hydra, only the command line needs it

    try:
        overrides = list(HydraConfig.get().overrides.task)
        keys = model_keys_given(overrides)
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        level = _dataclass_from(LoggingConfig, plain.get("logging") or {}, "logging").level
        setup_logging(level)
        # WARNING or ERROR: warnings only (the training bar: run, run_value); train.progress=false: no bar at all
        if not progress_bars_shown(level) or (plain.get("train") or {}).get("progress", True) is False:
            hide_library_progress_bars()
        run(plain, keys, model_keys_given([o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "model"]))
        sys.stdout.flush()  # here, not at exit: a reader that went away is then seen below
    except KeyboardInterrupt as e:
        if verbose():
            raise
        if isinstance(e, Terminated):  # SIGTERM; the step it saved, if it saved one, is where the rerun resumes
            if rank_zero():  # the ranks stop alike: one line, not one per process
                print(f"shiq-train: terminated{terminated_where(e)}", file=sys.stderr)
            sys.exit(EXIT_TERMINATED)
        sys.exit(
            interrupted("shiq-train", " (the same command resumes the run from its last checkpoint, if it saved one)")
        )
    except BrokenPipeError as e:  # the reader of stdout went away (shiq-train ... | head), or another pipe broke
        sys.exit(broken_pipe("shiq-train", e))
    except MissingMandatoryValue as e:
        key = getattr(e, "full_key", "") or str(e)
        _fail(
            f"missing value for {key}: give it on the command line "
            "(shiq-train data.buffer=BUFFER out=RUN ...; see --help)"
        )
    except Exception as e:
        if verbose() or not is_user_error(e):
            raise
        _fail(e)


def terminated_where(e: Terminated) -> str:
    """What a run stopped by SIGTERM saved, for its one line (a stop that saved no step: where a rerun starts)."""
    if not isinstance(e, SavedOnSigterm):
        return " (the same command resumes the run from its last checkpoint, if it saved one)"
    if e.complete:
        return f" after saving step {e.step} (SIGTERM), the run's last: the run is complete"
    return f" after saving step {e.step} (SIGTERM); the same command resumes the run there"


def _fail(message) -> None:
    sys.exit(fail("shiq-train", message))
