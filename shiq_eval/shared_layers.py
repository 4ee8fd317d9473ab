"""A policy and its reference that share their first layers, run once for both.

A policy fine-tuned in its last layers (embeddings frozen) holds the reference's embeddings and first
``k`` decoder layers bit for bit, so the hidden states entering layer ``k`` are the same for both models
on the same tokens. An evaluation that runs both (sampling, then the KL to the reference) needs the
first ``k`` layers once: :func:`shared_prefix_layers` finds ``k``, :func:`inputs_of_layer` keeps the hidden
states entering layer ``k`` while the policy runs, and :func:`decoder_from` runs a model from there
(with :func:`cache_from` as its KV cache when it reads chunk by chunk). Hugging Face causal LMs of the
Llama layout (``.model.embed_tokens``, ``.model.layers``, ``.model.norm``, ``.model.rotary_emb``,
``.lm_head``).
"""

from __future__ import annotations

import copy
import functools
from contextlib import contextmanager

import torch


@torch.no_grad()
def shared_prefix_layers(model, ref_model) -> int:
    """How many leading decoder layers two Hugging Face causal LMs hold alike bit for bit, embeddings and
    rotary frequencies included; 0 when those differ, the configurations differ in anything but the
    weights (where each was read from aside), or a model is not of that shape."""
    try:
        a, b = model.model, ref_model.model
        pairs = [(a.embed_tokens, b.embed_tokens), (a.rotary_emb, b.rotary_emb)]
        layers = list(zip(a.layers, b.layers))
    except AttributeError:
        return 0
    if type(model) is not type(ref_model) or _computed(model.config) != _computed(ref_model.config):
        return 0

    def same(x, y) -> bool:
        sx, sy = x.state_dict(), y.state_dict()
        return sx.keys() == sy.keys() and all(torch.equal(sx[n], sy[n]) for n in sx)

    if not all(same(x, y) for x, y in pairs):
        return 0
    k = 0
    while k < len(layers) and same(*layers[k]):
        k += 1
    return k


# config fields that say where a model was read from or which transformers wrote it, not what it computes
_NOT_COMPUTED = ("_name_or_path", "transformers_version")


def _computed(config) -> dict:
    """``config``'s fields but :data:`_NOT_COMPUTED` (two folders of one model differ in those)."""
    return {k: v for k, v in config.to_dict().items() if k not in _NOT_COMPUTED}


class _Stopped(Exception):
    """Raised by :func:`inputs_of_layer`'s hook with ``stop=True``, caught by its block."""


@contextmanager
def inputs_of_layer(model, k: int, stop: bool = False):
    """Within the block, a list that receives the hidden states ``[B, T, H]`` entering decoder layer ``k``
    of ``model`` on every forward pass (the final norm's input when ``k`` is the number of layers).
    ``stop``: the forward pass ends there (layers ``k ..`` do not run; the block's statement that ran it
    is cut short, and the block ends)."""
    layers = model.model.layers
    if not 0 <= k <= len(layers):
        raise ValueError(f"k must be in 0..{len(layers)}, got {k}")
    seen: list[torch.Tensor] = []

    def keep(module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])
        if stop:
            raise _Stopped

    hook = (layers[k] if k < len(layers) else model.model.norm).register_forward_pre_hook(keep, with_kwargs=True)
    try:
        yield seen
    except _Stopped:
        pass
    finally:
        hook.remove()


def decoder_from(model, k: int):
    """``model``'s decoder from the input of layer ``k`` on: a module of the decoder's class that takes
    ``inputs_embeds`` (the hidden states entering layer ``k``), runs layers ``k ..`` and the final norm, and
    shares every parameter with ``model`` (nothing is copied). Its layers keep their indices ``k ..``, so a
    KV cache for it is :func:`cache_from` ``(k)``."""
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(model.model.layers) - k
    with torch.device("meta"):
        inner = type(model.model)(cfg)  # only its forward is used: every submodule is model's own
    inner.embed_tokens, inner.norm, inner.rotary_emb = (
        model.model.embed_tokens,
        model.model.norm,
        model.model.rotary_emb,
    )
    inner.layers = torch.nn.ModuleList(list(model.model.layers)[k:])
    return inner.eval()


def cache_from(first: int):
    """A KV cache for :func:`decoder_from` ``(model, first)``: a ``transformers.DynamicCache`` whose entries
    ``0 .. first-1`` stay empty, so lengths and mask sizes are read from layer ``first`` on."""
    return _cache_class()(first)


@functools.cache
def _cache_class():
    from transformers import DynamicCache  # heavy: only a model reading chunk by chunk needs it

    class CacheFrom(DynamicCache):
        def __init__(self, first: int):
            super().__init__()
            self.first = int(first)

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return super().get_seq_length(max(layer_idx, self.first))

        def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
            return super().get_mask_sizes(query_length, max(layer_idx, self.first))

        def get_query_offset(self, layer_idx: int = 0) -> int:
            return super().get_query_offset(max(layer_idx, self.first))

    return CacheFrom
