"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` for megatron's local layers.

megatron-core's local core attention (``DotProductAttention``) materialises the ``[B, heads, T, T]``
scores with ``baddbmm``, masks them (``-10000`` where blocked), takes a softmax and multiplies by the
values, keeping scores and probabilities for the backward. :class:`SDPACoreAttention` computes the same
``softmax(q kᵀ · scale + mask) v`` with torch's fused kernel (on CPU a flash-attention kernel that keeps
only one log-sum-exp per query for the backward). It takes ``DotProductAttention``'s constructor and
forward arguments, so the layer spec can name either (``ModelConfig.attention_backend``).

Masks follow megatron: ``attention_mask`` is boolean, True where attention is *blocked*, ``[1 or B, 1,
Tq, Tk]`` (plain causal, block-diagonal causal for packed rows, or the last rows of a causal mask when
sampling with megatron's KV cache). The plain square causal mask runs as ``is_causal=True``, any other
as SDPA's boolean mask (True where *allowed*, hence the negation). A blocked score contributes
``exp(-10000 - max) = 0`` to megatron's softmax and ``exp(-inf) = 0`` to SDPA's, so both give the same
result up to float rounding as long as every query sees at least one key (true of every mask above).
Grouped-query attention (fewer key/value heads than query heads) uses ``enable_gqa=True``. Under tensor
parallelism the module sees this rank's heads only, as megatron's does.

Not supported (refused when the module is built): attention dropout (megatron draws its masks from its
own RNG tracker; use ``attention_backend=megatron``), context parallelism, sliding-window attention,
softmax variants other than the plain one, and packed ``thd`` sequences (``packed_seq_params``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPACoreAttention(MegatronModule):
    """Drop-in for megatron's local ``DotProductAttention`` (the ``core_attention`` of a layer spec).

    ``forward(query [Tq, B, heads, d], key [Tk, B, groups, d], value [Tk, B, groups, d], attention_mask)``
    returns the context ``[Tq, B, heads * d]``, the layout megatron's output projection takes.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        unsupported = [
            ("attention dropout", dropout != 0),
            ("context parallelism", config.context_parallel_size != 1),
            ("sliding-window attention", config.window_size is not None),
            (f"softmax_type={config.softmax_type!r}", config.softmax_type != "vanilla"),
        ]
        for what, present in unsupported:
            if present:
                raise ValueError(
                    f"model.attention_backend=sdpa does not support {what}: set model.attention_backend=megatron"
                )
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        # megatron's apply_query_key_layer_scaling divides the scale by the layer number and multiplies the
        # scores back by it before the softmax: the same scale
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError(
                "model.attention_backend=sdpa takes packed rows as a block-diagonal attention_mask, "
                "not packed_seq_params or an attention bias: set model.attention_backend=megatron"
            )
        Tq, B, heads, d = query.shape
        Tk = key.shape[0]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [B, heads or groups, T, d]
        causal, mask = self._mask(attention_mask, Tq, Tk)
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale, enable_gqa=k.shape[1] != heads
        )  # [B, heads, Tq, d]
        return context.permute(2, 0, 1, 3).reshape(Tq, B, heads * d)

    def _mask(self, attention_mask: torch.Tensor | None, Tq: int, Tk: int) -> tuple[bool, torch.Tensor | None]:
        """``(is_causal, SDPA boolean mask or None)`` for megatron's ``attention_mask`` (True = blocked).

        Without a mask, megatron's module applies its own causal mask for a causal layer with more
        than one query (``FusedScaleMaskSoftmax``) and none otherwise (one query against a KV cache)."""
        if attention_mask is None:
            causal = self.attn_mask_type == AttnMaskType.causal and Tq > 1
            if causal and Tq != Tk:
                raise ValueError(f"a causal layer without attention_mask needs as many queries as keys, got {Tq}, {Tk}")
            return causal, None
        if attention_mask.dtype != torch.bool:
            raise ValueError(f"attention_mask must be boolean (True where blocked), got {attention_mask.dtype}")
        if Tq == Tk and attention_mask.shape[0] == 1 and _is_plain_causal(attention_mask):
            return True, None
        return False, ~attention_mask


def _is_plain_causal(mask: torch.Tensor) -> bool:
    """Whether ``mask`` ``[1, 1, T, T]`` blocks exactly the positions after each query."""
    T = mask.shape[-1]
    if mask.shape != (1, 1, T, T):
        return False
    return torch.equal(mask[0, 0], torch.ones(T, T, dtype=torch.bool, device=mask.device).triu_(1))
