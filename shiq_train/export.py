"""Offline access to checkpoints: full parameters from the per-rank files, and Hugging Face export.

Evaluation and export should not need the training layout's processes: this reads every rank file of
a step directory written by :func:`shiq_train.checkpoint.save_checkpoint`, and reassembles the TP=1,
PP=1 parameter set with megatron's tensor-parallel conventions (the same ones
:func:`shiq_train.model.tp_layout` reads off the parameters).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from shiq_train.model import local_layer_name, unshard_tensors

# megatron's partition dim by parameter name (``tensor_model_parallel`` parameters); others replicated
_TP_DIM = [
    (r"embedding\.word_embeddings\.weight$", 0, False),
    (r"output_layer\.weight$", 0, False),
    (r"self_attention\.linear_qkv\.weight$", 0, False),
    (r"self_attention\.linear_proj\.weight$", 1, False),
    (r"mlp\.linear_fc1\.weight$", 0, True),
    (r"mlp\.linear_fc2\.weight$", 1, False),
]


def _layout_of(name: str):
    for pattern, dim, glu in _TP_DIM:
        if re.search(pattern, name):
            return dim, glu
    return None, False


def full_parameters_from_checkpoint(step_dir, num_layers: int, tied: bool = True) -> dict[str, torch.Tensor]:
    """The full (TP=1, PP=1) parameter set saved in ``step_dir``, from its rank files alone.

    Loads with ``weights_only=True``. Only data-parallel rank 0's files are read (the others hold
    the same parameters).
    """
    step_dir = Path(step_dir)
    info = json.loads((step_dir / "meta.json").read_text())
    tp, pp = info["layout"]["tp"], info["layout"]["pp"]
    if num_layers % pp:
        raise ValueError(f"{step_dir}: num_layers={num_layers} does not split over pp={pp} stages")
    per_stage = num_layers // pp
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            path = step_dir / f"rank_tp{tp_rank}_pp{pp_rank}_dp0.pt"
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing: the checkpoint is incomplete")
            params = torch.load(path, weights_only=True)["model"]
            for name, value in params.items():
                if name.startswith("decoder.layers."):
                    i, rest = name[len("decoder.layers.") :].split(".", 1)
                    name = local_layer_name(f"decoder.layers.{int(i) + pp_rank * per_stage}.{rest}")
                elif name == "output_layer.weight" and tied:
                    continue  # the last stage's copy of the tied embedding
                parts.setdefault(name, {})[tp_rank] = value
    full = {}
    for name, shards in parts.items():
        dim, glu = _layout_of(name)
        full[name] = unshard_tensors([shards[r] for r in range(tp)] if dim is not None else [shards[0]], dim, glu)
    return full


def hf_model_from_checkpoint(step_dir, hf_config, dtype=torch.float32):
    """A ``transformers.LlamaForCausalLM`` holding the weights of a checkpoint step directory."""
    from transformers import LlamaForCausalLM

    from shiq_train.hf_convert import LlamaShape, megatron_to_llama

    shape = LlamaShape.from_hf_config(hf_config)
    full = full_parameters_from_checkpoint(step_dir, shape.num_layers, shape.tied)
    model = LlamaForCausalLM(hf_config).to(dtype)
    sd = megatron_to_llama(full, shape)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=not shape.tied)
    return model.eval()
