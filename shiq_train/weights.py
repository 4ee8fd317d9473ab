"""The tensor- and pipeline-parallel layout of a GPTModel's weights, in one place.

A full parameter set is the TP=1, PP=1 model with megatron's local layers. Under tensor parallelism
some parameters are split along one dimension (megatron's column-parallel layers on dim 0, row-parallel
on dim 1, the vocabulary on dim 0); the gated MLP's ``linear_fc1`` stacks ``[gate; up]`` and each rank
holds ``[gate_r; up_r]``. Under pipeline parallelism stage ``p`` holds the layers
``p * layers_per_stage ...`` under local numbers from 0, and the last stage a copy of the tied
embedding as ``output_layer.weight``. With virtual pipeline stages the same holds per virtual stage: chunk
``c`` of pipeline rank ``p`` is virtual stage ``c * pp + p`` of ``pp * vpp`` (``shiq_train.model``'s
``_stage`` passes it as ``pp_rank`` to :func:`full_name`). Checkpoints keep one file per (tp, pp, dp) rank, and resume
under another layout by reassembling each parameter (and its optimizer state) by full name
(:func:`reshard_tensor`).

``shiq_train.model`` (loading and gathering a built model), ``shiq_train.checkpoint`` and
``shiq_train.export`` (reassembling saved rank files) all read this module.
"""

from __future__ import annotations

import torch

# split dimension of each tensor-parallel parameter, by name suffix; every other parameter (norms,
# row-parallel biases, learned position embeddings) is replicated on all tensor-parallel ranks
TP_SPLIT_DIM = {
    "embedding.word_embeddings.weight": 0,
    "output_layer.weight": 0,
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_qkv.bias": 0,
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc1.weight": 0,
    "mlp.linear_fc1.bias": 0,
    "mlp.linear_fc2.weight": 1,
}
GATED_MLP = ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")  # [gate; up], halves split separately

# Transformer Engine layers fuse each pre-norm into the linear layer after it; full parameter sets
# (checkpoint exports, Hugging Face import/export) always use the local layers' names. The pairs are
# megatron-core's own (post_training/modelopt/gpt/state_dict_hooks.py:40, 49).
TE_FUSED_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
LAYER_PREFIX = "decoder.layers."
TIED_OUTPUT = "output_layer.weight"
EMBEDDING = "embedding.word_embeddings.weight"


def tp_split(name: str, gated: bool = True) -> tuple[int | None, bool]:
    """``(dim, glu)`` of parameter ``name``: the dimension it is split on across tensor-parallel ranks
    (None: replicated), and whether it is a gated MLP's ``[gate; up]`` stack (only if ``gated``)."""
    for suffix, dim in TP_SPLIT_DIM.items():
        if name == suffix or name.endswith("." + suffix):
            return dim, gated and name.endswith(GATED_MLP)
    return None, False


def full_shape(shape, dim: int | None, tp: int) -> tuple[int, ...]:
    """The single-process shape of a tensor-parallel shard of ``shape`` split on ``dim`` (None: not split)."""
    return tuple(n * tp if d == dim else n for d, n in enumerate(shape))


def shard_tensor(full: torch.Tensor, dim: int | None, glu: bool, tp: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s slice of ``full`` under the layout from :func:`tp_split`."""
    if dim is None or tp == 1:
        return full
    if glu:
        return torch.cat([h.chunk(tp, dim)[rank] for h in full.chunk(2, dim)], dim)
    return full.chunk(tp, dim)[rank]


def unshard_tensors(parts: list[torch.Tensor], dim: int | None, glu: bool) -> torch.Tensor:
    """Inverse of :func:`shard_tensor` given every rank's slice, in rank order."""
    if dim is None or len(parts) == 1:
        return parts[0]
    if glu:
        gates, ups = zip(*(p.chunk(2, dim) for p in parts))
        return torch.cat([torch.cat(gates, dim), torch.cat(ups, dim)], dim)
    return torch.cat(parts, dim)


def reshard_tensor(parts: list[torch.Tensor], dim: int | None, glu: bool, tp: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s slice, under ``tp`` tensor-parallel ranks, of the tensor whose slices under another
    tensor-parallel size are ``parts`` (in rank order; one part for a replicated tensor)."""
    return shard_tensor(unshard_tensors(parts, dim, glu), dim, glu, tp, rank)


def layers_per_stage(num_layers: int, pp: int) -> int:
    """Transformer layers on each of ``pp`` pipeline stages (megatron splits them evenly)."""
    if num_layers % pp:
        raise ValueError(f"num_layers={num_layers} does not split over pp={pp} pipeline stages")
    return num_layers // pp


def global_layer_index(local_index: int, pp_rank: int, per_stage: int) -> int:
    """Index in the whole model of layer ``local_index`` of pipeline stage ``pp_rank``."""
    return pp_rank * per_stage + local_index


def local_layer_name(name: str) -> str:
    """``name`` with a Transformer Engine fused-norm suffix replaced by the local layers' name."""
    for te, local in TE_FUSED_NORMS.items():
        if name.endswith("." + te):
            return name[: -len(te)] + local
    return name


def full_name(name: str, pp_rank: int, per_stage: int, tied: bool) -> str:
    """Name in the full (TP=1, PP=1, local layers) model of stage ``pp_rank``'s parameter ``name``:
    layers renumbered by :func:`global_layer_index`, the last stage's tied output copy named as the
    embedding, Transformer Engine fused-norm names as the local ones."""
    if name.startswith(LAYER_PREFIX):
        i, rest = name[len(LAYER_PREFIX) :].split(".", 1)
        return local_layer_name(f"{LAYER_PREFIX}{global_layer_index(int(i), pp_rank, per_stage)}.{rest}")
    if name == TIED_OUTPUT and tied:
        return EMBEDDING
    return name


def rank_file_name(tp_rank: int, pp_rank: int, dp_rank: int) -> str:
    """The checkpoint file of one rank inside a step directory."""
    return f"rank_tp{tp_rank}_pp{pp_rank}_dp{dp_rank}.pt"
