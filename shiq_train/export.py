"""Offline access to checkpoints: full parameters from the per-rank files, and Hugging Face export.

Evaluation and export should not need the training layout's processes: this reads every rank file of
a step directory written by :func:`shiq_train.checkpoint.save_checkpoint`, and reassembles the TP=1,
PP=1 parameter set with the layout of ``shiq_train.weights`` (the one :func:`shiq_train.model.tp_layout`
checks against megatron's parameters).
"""

from __future__ import annotations

from pathlib import Path

import torch

from shiq_train import weights as W
from shiq_train.checkpoint import read_meta, read_rank_file
from shiq_train.hf_convert import LlamaShape, megatron_to_llama


def full_parameters_from_checkpoint(step_dir, num_layers: int, tied: bool = True) -> dict[str, torch.Tensor]:
    """The full (TP=1, PP=1) parameter set saved in ``step_dir``, from its rank files alone.

    Loads with ``weights_only=True`` (``shiq_train.checkpoint.read_rank_file``). Only data-parallel rank 0's files are read (the others hold
    the same parameters). The layout (split dimensions, layer numbers, file names) is
    ``shiq_train.weights``'s.
    """
    step_dir = Path(step_dir)
    info = read_meta(step_dir)
    tp, pp = info["layout"]["tp"], info["layout"]["pp"]
    try:
        per_stage = W.layers_per_stage(num_layers, pp)
    except ValueError as e:
        raise ValueError(f"{step_dir}: {e}") from None
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            path = step_dir / W.rank_file_name(tp_rank, pp_rank, 0)
            params = read_rank_file(path, keys=("model",))["model"]  # weights_only: never unpickles arbitrary objects
            for name, value in params.items():
                if name == W.TIED_OUTPUT and tied:
                    continue  # the last stage's copy of the tied embedding
                parts.setdefault(W.full_name(name, pp_rank, per_stage, tied), {})[tp_rank] = value
    full = {}
    for name, shards in parts.items():
        dim, glu = W.tp_split(name)
        full[name] = W.unshard_tensors([shards[r] for r in range(tp)] if dim is not None else [shards[0]], dim, glu)
    return full


def hf_model_from_checkpoint(step_dir, hf_config, dtype=torch.float32):
    """A ``transformers.LlamaForCausalLM`` holding the weights of a checkpoint step directory."""
    from transformers import LlamaForCausalLM  # heavy: only export needs it

    shape = LlamaShape.from_hf_config(hf_config)
    full = full_parameters_from_checkpoint(step_dir, shape.num_layers, shape.tied)
    model = LlamaForCausalLM(hf_config).to(dtype)
    sd = megatron_to_llama(full, shape)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=not shape.tied)
    return model.eval()
