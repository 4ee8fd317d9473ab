"""Building megatron-core's GPTModel from a config, and per-token statistics from its output.

:class:`ModelConfig` is mirrored by the Hydra group ``configs/model/`` (``tiny.yaml``,
``smollm2_135m.yaml``). :func:`build_model` turns it into a :class:`ShiQGPTModel` (a ``GPTModel``
that can hand back final hidden states instead of logits, for chunked statistics) for the current
pipeline stage. On CPU it uses the local layer spec with RMSNorm, CPU initialisation and no CUDA
fusions; on GPU it can use the Transformer Engine spec (required for FP8).

:func:`forward_stats` runs the model and returns the SHIQ_MATH §2 statistics of every token,
``[B, T]``: from the output layer's vocab-parallel logits, which the model turns into statistics
itself when given ``labels`` (:func:`stats_inputs`), or chunked from hidden states
(``shiq_train.vocab_parallel``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import numbers
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from shiq_train import vocab_parallel as vp
from shiq_train import weights as W
from shiq_train.parallel import apply_cpu_adaptations
from shiq_train.stats import TokenStats

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
FP8_FORMATS = (None, "hybrid", "e4m3")
RECOMPUTE = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
ATTENTION_BACKENDS = ("auto", "sdpa", "megatron")
COMPILE_BACKEND = "inductor"  # torch.compile's backend for model.compile (tests trace with "aot_eager": no codegen)


def _is_real(x) -> bool:
    """A real number (an int or a float), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x) -> bool:
    """A Python int, not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class ModelConfig:
    """A Llama-style decoder (what SmolLM2 is), in megatron-core's vocabulary.

    Defaults are the tiny test model. ``num_query_groups=None`` means multi-head attention;
    ``ffn_hidden_size=None`` means ``4 * hidden_size``. ``logits_chunk_tokens > 0`` makes the model
    return final hidden states and :func:`forward_stats` compute the statistics that many tokens at
    a time from the output weight (never holding ``[tokens, V]`` logits); 0 uses full
    vocab-parallel logits.

    ``add_qkv_bias``: a bias on the query, key and value projections only (megatron-core's ``add_qkv_bias``:
    the fused ``linear_qkv`` gets one, interleaved per query group as its weight), as Qwen2 has; the
    attention's output projection and the MLP stay without (``add_bias_linear`` gives every linear layer one).

    ``kv_channels``: the width of each attention head (megatron-core's ``kv_channels``, a Hugging Face config's
    ``head_dim``); null means ``hidden_size / num_attention_heads`` (then a whole number). Qwen3-0.6B's is 128
    with 16 heads of a hidden size of 1024: the query projection is ``heads * kv_channels`` wide, not
    ``hidden_size``.

    ``qk_layernorm``: a norm of each query and key head (``normalization`` over its ``kv_channels`` values with
    ``layernorm_epsilon``, one weight shared by the heads) after the projection and before the rotary
    embedding, as Qwen3 has (megatron-core's ``qk_layernorm``: ``self_attention.q_layernorm`` and
    ``k_layernorm``).

    ``rope_scaling_factor``: null for plain RoPE; a number >= 1 scales the rotary frequencies as Llama 3.1 and
    3.2 do (a Hugging Face config's ``rope_type`` ``llama3`` with that ``factor``): the frequencies whose
    wavelength exceeds 8192 positions divided by it, those under 8192 / 4 = 2048 kept, those between
    interpolated (megatron-core's ``rope_scaling``, whose ``low_freq_factor`` 1, ``high_freq_factor`` 4 and
    ``original_max_position_embeddings`` 8192 are fixed). Llama 3.1's is 8, Llama 3.2's 32.

    Memory features (megatron-core's; they change memory and time, not the result):

    - ``recompute``: activation recomputation. ``none`` keeps every activation for the backward;
      ``selective`` recomputes the core attention (the ``[B, heads, T, T]`` scores and softmax) in the
      backward instead of storing it (megatron ``recompute_granularity="selective"``); ``full`` keeps
      only each checkpointed unit's input and reruns the whole unit in the backward
      (``recompute_granularity="full"``).
    - ``recompute_method`` (``full`` only): ``uniform`` checkpoints every group of
      ``recompute_num_layers`` consecutive layers; ``block`` recomputes the first
      ``recompute_num_layers`` layers of each pipeline stage and keeps the others' activations.
    - ``recompute_num_layers`` (``full`` only): see ``recompute_method``; an integer >= 1.
    - ``sequence_parallel``: with tensor parallelism, the layer norms, dropouts and residual stream
      hold ``T/tp`` of the sequence on each rank (all-gather before, reduce-scatter after each
      tensor-parallel block) instead of all ``T`` replicated; needs ``parallel.tp > 1`` and
      ``max_sequence_length`` (and each micro-batch's width) divisible by tp.

    Speed (the same result up to float rounding):

    - ``compile``: run every decoder layer's forward through ``torch.compile`` (``dynamic=True``, so
      micro-batches of other widths reuse the compiled code). The module tree and its parameter names
      stay the same (``nn.Module.compile``), so checkpoints and the weight layout are unchanged. The
      first steps pay the compilation; measured in the README's throughput section. Local layers only,
      without dropout and without ``recompute=full`` (refused with the fix).
    - ``attention_backend``: the core attention of the local layers. ``sdpa``: torch's
      ``scaled_dot_product_attention`` (``shiq_train.attention``; no ``[B, heads, T, T]`` scores kept,
      faster on CPU, measured in the README's throughput section); ``megatron``: megatron-core's
      ``DotProductAttention``; ``auto``: ``sdpa`` unless ``attention_dropout > 0`` (only megatron's has
      attention dropout). The Transformer Engine layers bring their own attention (``auto`` there).
    """

    name: str = "tiny"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = None
    ffn_hidden_size: int | None = None
    vocab_size: int = 128
    max_sequence_length: int = 16
    normalization: str = "RMSNorm"
    layernorm_epsilon: float = 1e-5
    gated_linear_unit: bool = True
    activation: str = "silu"
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    kv_channels: int | None = None
    qk_layernorm: bool = False
    position_embedding_type: str = "rope"
    rotary_base: float = 10000
    rope_scaling_factor: float | None = None
    share_embeddings_and_output_weights: bool = True
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    params_dtype: str = "float32"
    transformer_impl: str = "auto"
    fp8: str | None = None
    logits_chunk_tokens: int = 0
    recompute: str = "none"
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    sequence_parallel: bool = False
    compile: bool = False
    attention_backend: str = "auto"

    def __post_init__(self):
        def bad(field, value, want):
            raise ValueError(f"model.{field} = {value!r} is not valid: {want}")

        for f in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_sequence_length"):
            if not (_is_int(getattr(self, f)) and getattr(self, f) >= 1):
                bad(f, getattr(self, f), "expected an integer >= 1")
        k = self.kv_channels
        if k is not None and not (_is_int(k) and k >= 1):
            bad("kv_channels", k, "an integer >= 1 (null: hidden_size / num_attention_heads)")
        if k is None and self.hidden_size % self.num_attention_heads:
            bad(
                "hidden_size",
                self.hidden_size,
                f"must be divisible by num_attention_heads={self.num_attention_heads} (or set model.kv_channels)",
            )
        q = self.num_query_groups
        if q is not None and not (_is_int(q) and q >= 1):
            bad("num_query_groups", q, "an integer >= 1 (null: one per attention head)")
        if q is not None and self.num_attention_heads % q:
            bad("num_query_groups", q, f"must divide num_attention_heads={self.num_attention_heads}")
        f = self.ffn_hidden_size
        if f is not None and not (_is_int(f) and f >= 1):
            bad("ffn_hidden_size", f, "an integer >= 1 (null: 4 * hidden_size)")
        for name in ("hidden_dropout", "attention_dropout"):
            v = getattr(self, name)
            if not (_is_real(v) and 0 <= v < 1):
                bad(name, v, "a probability in [0, 1)")
        if not (
            _is_real(self.layernorm_epsilon) and math.isfinite(self.layernorm_epsilon) and self.layernorm_epsilon > 0
        ):
            bad("layernorm_epsilon", self.layernorm_epsilon, "a finite number > 0")
        if not (_is_real(self.init_method_std) and math.isfinite(self.init_method_std) and self.init_method_std > 0):
            bad("init_method_std", self.init_method_std, "a finite number > 0")
        if not (_is_real(self.rotary_base) and math.isfinite(self.rotary_base) and self.rotary_base > 0):
            bad("rotary_base", self.rotary_base, "a finite number > 0")
        factor = self.rope_scaling_factor
        if factor is not None and not (_is_real(factor) and math.isfinite(factor) and factor >= 1):
            bad("rope_scaling_factor", factor, "a finite number >= 1 (Llama 3's scaled RoPE), or null (plain RoPE)")
        if factor is not None and self.position_embedding_type != "rope":
            bad("rope_scaling_factor", factor, "scales rotary embeddings: needs position_embedding_type 'rope'")
        if self.activation not in ACTIVATIONS:
            bad("activation", self.activation, f"one of {sorted(ACTIVATIONS)}")
        if self.params_dtype not in DTYPES:
            bad("params_dtype", self.params_dtype, f"one of {sorted(DTYPES)}")
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            bad("transformer_impl", self.transformer_impl, f"one of {TRANSFORMER_IMPLS}")
        if self.fp8 not in FP8_FORMATS:
            bad("fp8", self.fp8, f"one of {FP8_FORMATS} (null for no FP8)")
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            bad("normalization", self.normalization, "'RMSNorm' or 'LayerNorm'")
        if self.position_embedding_type not in ("rope", "learned_absolute"):
            bad("position_embedding_type", self.position_embedding_type, "'rope' or 'learned_absolute'")
        if not (_is_int(self.logits_chunk_tokens) and self.logits_chunk_tokens >= 0):
            bad("logits_chunk_tokens", self.logits_chunk_tokens, "an integer >= 0 (0: full logits)")
        if self.recompute not in RECOMPUTE:
            bad("recompute", self.recompute, f"one of {RECOMPUTE}")
        if self.recompute_method not in RECOMPUTE_METHODS:
            bad("recompute_method", self.recompute_method, f"one of {RECOMPUTE_METHODS} (used with recompute=full)")
        n = self.recompute_num_layers
        if not (_is_int(n) and 1 <= n <= self.num_layers):
            bad(
                "recompute_num_layers", n, f"an integer in [1, num_layers={self.num_layers}] (used with recompute=full)"
            )
        if not isinstance(self.sequence_parallel, bool):
            bad("sequence_parallel", self.sequence_parallel, "true or false")
        if not isinstance(self.add_qkv_bias, bool):
            bad("add_qkv_bias", self.add_qkv_bias, "true or false")
        if not isinstance(self.qk_layernorm, bool):
            bad("qk_layernorm", self.qk_layernorm, "true or false")
        if not isinstance(self.compile, bool):
            bad("compile", self.compile, "true or false")
        if self.compile and (self.hidden_dropout or self.attention_dropout):
            bad(
                "compile",
                self.compile,
                "compiled layers draw other dropout masks than eager ones: set the dropouts to 0",
            )
        if self.attention_backend not in ATTENTION_BACKENDS:
            bad("attention_backend", self.attention_backend, f"one of {ATTENTION_BACKENDS}")
        if self.attention_backend == "sdpa" and self.attention_dropout:
            bad(
                "attention_backend",
                self.attention_backend,
                "sdpa has no attention dropout: use megatron (or auto) with model.attention_dropout > 0",
            )
        if self.compile and self.recompute == "full":
            bad(
                "compile",
                self.compile,
                "not with recompute=full (megatron's layer checkpointing); use recompute=selective",
            )

    @classmethod
    def from_dict(cls, d: Any) -> ModelConfig:
        """From a plain dict or an OmegaConf node (``cfg.model`` of a Hydra config); unknown keys raise."""
        if isinstance(d, DictConfig):
            d = OmegaConf.to_container(d, resolve=True)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def head_dim(cfg: ModelConfig) -> int:
    """The width of each attention head: ``cfg.kv_channels``, or ``hidden_size / num_attention_heads``."""
    return cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads


def resolved_transformer_impl(cfg: ModelConfig) -> str:
    """``cfg.transformer_impl`` with ``auto`` resolved: the Transformer Engine layers on a CUDA machine
    with Transformer Engine installed, the local layers everywhere else."""
    if cfg.transformer_impl != "auto":
        return cfg.transformer_impl
    has_te = importlib.util.find_spec("transformer_engine") is not None
    return "transformer_engine" if (has_te and torch.cuda.is_available()) else "local"


def resolved_attention_backend(cfg: ModelConfig) -> str:
    """``cfg.attention_backend`` with ``auto`` resolved: ``sdpa`` without attention dropout, else ``megatron``."""
    if cfg.attention_backend != "auto":
        return cfg.attention_backend
    return "megatron" if cfg.attention_dropout else "sdpa"


def check_runtime(cfg: ModelConfig) -> None:
    """Fail at start-up, with the fix, when the config asks for what this machine cannot run."""
    has_te = importlib.util.find_spec("transformer_engine") is not None
    has_gpu = torch.cuda.is_available()
    impl = resolved_transformer_impl(cfg)
    if cfg.fp8 is not None:
        missing = [what for what, ok in (("a CUDA GPU", has_gpu), ("Transformer Engine", has_te)) if not ok]
        if missing:
            raise RuntimeError(
                f"model.fp8={cfg.fp8!r} needs a CUDA GPU with FP8 support (compute capability 8.9 or newer: Ada, Hopper) and "
                f"Transformer Engine; missing here: {' and '.join(missing)}. Set model.fp8=null to train "
                "without FP8 (bf16 or fp32 via model.params_dtype)"
                + (
                    "; on the GPU machine install Transformer Engine with `pip install 'shiq[fp8]'`."
                    if not has_te
                    else "."
                )
            )
        capability = torch.cuda.get_device_capability()
        if capability < FP8_CAPABILITY:
            raise RuntimeError(
                f"model.fp8={cfg.fp8!r} needs a GPU with FP8 tensor cores (compute capability "
                f"{'.'.join(map(str, FP8_CAPABILITY))} or newer: Ada, Hopper); this is {torch.cuda.get_device_name()} "
                f"({'.'.join(map(str, capability))}). Set model.fp8=null to train in bf16 (model.params_dtype=bfloat16)."
            )
        if impl != "transformer_engine":
            raise RuntimeError(
                f"model.fp8={cfg.fp8!r} needs model.transformer_impl=transformer_engine or auto "
                f"(got {cfg.transformer_impl!r}): FP8 GEMMs exist only in Transformer Engine layers."
            )
        check_fp8_shapes(cfg)
    if cfg.compile and impl != "local":
        raise RuntimeError(
            "model.compile=true compiles megatron's local layers; the Transformer Engine layers bring their own "
            "fused kernels: set model.compile=false, or model.transformer_impl=local to compile"
        )
    if cfg.attention_backend != "auto" and impl != "local":
        raise RuntimeError(
            f"model.attention_backend={cfg.attention_backend} picks the core attention of megatron's local layers; "
            "the Transformer Engine layers bring their own: set model.attention_backend=auto"
        )
    if impl == "transformer_engine" and not (has_te and has_gpu):
        raise RuntimeError(
            "model.transformer_impl=transformer_engine needs a CUDA GPU and Transformer Engine "
            f"(GPU available: {has_gpu}, transformer_engine installed: {has_te}). "
            "Use model.transformer_impl=auto or local on CPU."
        )


FP8_CAPABILITY = (8, 9)  # the first CUDA compute capability with FP8 tensor cores (Ada; Hopper is 9.0)
FP8_WIDTH = 16  # Transformer Engine's FP8 GEMMs: the input features (and, in the weight gradient, the tokens) % 16
FP8_ROWS = 8  # ... and the rows (tokens of the forward's input, output features of a weight) % 8


def width_multiple(cfg: ModelConfig, tp: int = 1) -> int:
    """The multiple every micro-batch's width ``T`` is padded to for ``cfg`` at tensor-parallel size ``tp``.

    Sequence parallelism splits the ``B·T`` tokens over the tp ranks: ``T`` divisible by tp. FP8 (Transformer
    Engine's FP8 GEMMs) needs the tokens of each GEMM a multiple of 16 (their weight gradient reduces over them)
    and each rank's share of them under sequence parallelism (the input a layer casts to FP8 before gathering
    the sequence) a multiple of 8: ``T`` divisible by ``lcm(16, 8·tp)`` then, by 16 without sequence
    parallelism; whatever the number of rows ``B``. Padding after a trajectory changes none of its statistics."""
    sp = tp if cfg.sequence_parallel else 1
    if cfg.fp8 is None:
        return sp
    return math.lcm(FP8_WIDTH, FP8_ROWS * sp)


def check_fp8_shapes(cfg: ModelConfig, tp: int = 1) -> None:
    """With ``model.fp8``, refuse (RuntimeError, one line naming the setting) sizes Transformer Engine's FP8 GEMMs
    cannot run at tensor-parallel size ``tp``: every linear layer's input features on a rank divisible by 16 and
    its output features by 8 (``hidden_size``, ``ffn_hidden_size``, the attention width and the query-key-value
    width, each split over tp where the layer is), and ``max_sequence_length`` a multiple of :func:`width_multiple` (the padded widths
    stay within it). Nothing to check without FP8."""
    if cfg.fp8 is None:
        return
    ffn = cfg.ffn_hidden_size or 4 * cfg.hidden_size
    width = head_dim(cfg)
    groups = cfg.num_query_groups or cfg.num_attention_heads
    on = f" / parallel.tp={tp}" if tp > 1 else ""
    attention = ("model.hidden_size", cfg.hidden_size)  # the attention output projection's input
    if cfg.kv_channels is not None:  # (heads of their own width: num_attention_heads * kv_channels wide)
        attention = (f"the attention width num_attention_heads * kv_channels = {cfg.num_attention_heads} * {width}",
                     cfg.num_attention_heads * width)  # fmt: skip
    sizes = [
        ("model.hidden_size", cfg.hidden_size, 1, FP8_WIDTH),
        (*attention, tp, FP8_WIDTH),
        ("model.ffn_hidden_size", ffn, tp, FP8_WIDTH),
        (
            "the query-key-value width (num_attention_heads + 2 * num_query_groups) * head_dim = "
            f"({cfg.num_attention_heads} + 2 * {groups}) * {width}",
            (cfg.num_attention_heads + 2 * groups) * width,
            tp,
            FP8_ROWS,
        ),
    ]
    for what, size, split, multiple in sizes:
        if size % split == 0 and (size // split) % multiple:  # a size tp does not divide: megatron names it
            shown = f"{what}={size}" + (on if split > 1 else "")
            raise RuntimeError(
                f"model.fp8={cfg.fp8!r}: Transformer Engine's FP8 GEMMs need {shown} divisible by {multiple}; "
                f"choose sizes that are multiples of {multiple * split} or set model.fp8=null"
            )
    multiple = width_multiple(cfg, tp)
    if cfg.max_sequence_length % multiple:
        raise RuntimeError(
            f"model.fp8={cfg.fp8!r} pads every micro-batch's width to a multiple of {multiple} (Transformer Engine's "
            f"FP8 GEMMs), which model.max_sequence_length={cfg.max_sequence_length} is not: use "
            f"model.max_sequence_length={-(-cfg.max_sequence_length // multiple) * multiple} or model.fp8=null"
        )


def check_layout(cfg: ModelConfig, tp: int, pp: int, vpp: int, tp_option: str = "parallel.tp") -> None:
    """A ValueError naming the ``model.`` key whose value the parallel layout cannot split: the vocabulary,
    heads, query groups and MLP width over ``tp`` ranks, the layers over ``pp * vpp`` stages, and with
    ``recompute=full`` and ``recompute_method=uniform`` a stage's layers into groups of
    ``recompute_num_layers`` (megatron-core's loop would index past the stage's last layer), and
    ``sequence_parallel`` without tensor parallelism or with a sequence length ``tp`` does not divide. Checked
    before megatron-core's own config, whose messages name no key, and by ``shiq-train`` before any process
    group starts; each message says what would work, naming the tensor-parallel size ``tp_option`` (a command's
    ``--tp``: a model whose vocabulary is read from its weights cannot be padded, so that hint is then left out)."""
    groups = cfg.num_query_groups or cfg.num_attention_heads

    def divisors(n: int) -> str:
        ds = [str(d) for d in range(1, n + 1) if n % d == 0]
        return ", ".join(ds[:-1]) + f" or {ds[-1]}" if len(ds) > 1 else ds[0]

    for field, value, by, what, hint in [
        (
            "vocab_size",
            cfg.vocab_size,
            tp,
            "tensor-parallel size",
            f" (parallel.tp; or pad the vocabulary to {-(-cfg.vocab_size // tp) * tp})"
            if tp_option == "parallel.tp"
            else f" ({tp_option}: a size that divides it)",
        ),
        ("num_attention_heads", cfg.num_attention_heads, tp, "tensor-parallel size", ""),
        ("num_query_groups", groups, tp, "tensor-parallel size", ""),
        ("ffn_hidden_size", cfg.ffn_hidden_size or 4 * cfg.hidden_size, tp, "tensor-parallel size", ""),
        ("num_layers", cfg.num_layers, pp * vpp, "number of (virtual) pipeline stages", ""),
    ]:
        if value % by:
            key = tp_option if by == tp and field != "num_layers" else "parallel.pp × parallel.vpp"
            hint = hint or f" ({key}: {divisors(value)} divide it)"
            raise ValueError(f"model.{field}={value} must be divisible by the {what} {by}{hint}")
    if cfg.sequence_parallel and tp == 1:
        raise ValueError(
            "model.sequence_parallel=true needs tensor parallelism (parallel.tp > 1); set it false for tp=1"
        )
    if cfg.sequence_parallel and cfg.max_sequence_length % tp:
        raise ValueError(
            f"model.sequence_parallel=true needs model.max_sequence_length={cfg.max_sequence_length} divisible by "
            f"the tensor-parallel size {tp} (e.g. {-(-cfg.max_sequence_length // tp) * tp})"
        )
    per_stage = cfg.num_layers // (pp * vpp)
    if cfg.recompute == "full" and cfg.recompute_method == "uniform" and per_stage % cfg.recompute_num_layers:
        raise ValueError(
            f"model.recompute_num_layers={cfg.recompute_num_layers} must divide the {per_stage} layers of a pipeline "
            "stage with model.recompute_method=uniform (it checkpoints groups of that many layers); or use "
            "model.recompute_method=block"
        )


def transformer_config(cfg: ModelConfig):
    """megatron ``TransformerConfig`` for ``cfg`` and the initialised model-parallel layout."""
    from megatron.core import parallel_state  # heavy: megatron
    from megatron.core.transformer.transformer_config import TransformerConfig  # heavy: megatron

    check_runtime(cfg)
    tp = pp = 1
    vpp = None
    if parallel_state.model_parallel_is_initialized():
        tp = parallel_state.get_tensor_model_parallel_world_size()
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    check_layout(cfg, tp, pp, vpp or 1)
    dtype = DTYPES[cfg.params_dtype]
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.layernorm_epsilon,
        gated_linear_unit=cfg.gated_linear_unit,
        activation_func=ACTIVATIONS[cfg.activation],
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias,
        kv_channels=cfg.kv_channels,
        qk_layernorm=cfg.qk_layernorm,
        init_method_std=cfg.init_method_std,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        transformer_impl=resolved_transformer_impl(cfg),
    )
    if cfg.fp8 is not None:
        check_fp8_shapes(cfg, tp)
        kwargs.update(fp8=cfg.fp8, fp8_recipe="delayed")
    if cfg.recompute == "selective":
        kwargs.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif cfg.recompute == "full":
        kwargs.update(
            recompute_granularity="full",
            recompute_method=cfg.recompute_method,
            recompute_num_layers=cfg.recompute_num_layers,
        )
    if cfg.sequence_parallel:  # (check_layout: with tp > 1, of a length it divides)
        kwargs.update(sequence_parallel=True)
    if not on_gpu:  # these fusions call CUDA kernels (megatron-cpu.md)
        kwargs.update(
            bias_activation_fusion=False,
            apply_rope_fusion=False,
            masked_softmax_fusion=False,
            bias_dropout_fusion=False,
            gradient_accumulation_fusion=False,
            persist_layer_norm=False,
        )
    with warnings.catch_warnings():
        if kwargs["transformer_impl"] == "local":  # advice for Transformer Engine's fused attention, not ours
            warnings.filterwarnings("ignore", message="If you are using transformer_engine as the transformer impl")
        return TransformerConfig(**kwargs)


def layer_spec(cfg: ModelConfig):
    """Transformer Engine spec when asked for or when ``auto`` finds a GPU with Transformer Engine,
    else the local spec with ``cfg.normalization`` and the core attention of
    :func:`resolved_attention_backend` (megatron's ``DotProductAttention`` or
    :class:`shiq_train.attention.SDPACoreAttention`); with ``cfg.qk_layernorm``, the query and key norms."""
    from megatron.core.models.gpt import gpt_layer_specs as specs  # heavy: megatron

    if resolved_transformer_impl(cfg) == "transformer_engine":
        return specs.get_gpt_layer_with_transformer_engine_spec(fp8=cfg.fp8, qk_layernorm=cfg.qk_layernorm)
    spec = specs.get_gpt_layer_local_spec(normalization=cfg.normalization, qk_layernorm=cfg.qk_layernorm)
    if resolved_attention_backend(cfg) == "megatron":
        return spec
    from shiq_train.attention import SDPACoreAttention  # heavy: megatron

    attn = spec.submodules.self_attention
    attn = replace(attn, submodules=replace(attn.submodules, core_attention=SDPACoreAttention))
    return replace(spec, submodules=replace(spec.submodules, self_attention=attn))


def _tp_summed(param: torch.Tensor) -> torch.Tensor:
    """``param`` as is, with its gradient summed over the tensor-parallel group in the backward."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region  # heavy: megatron

    return copy_to_tensor_model_parallel_region(param)


class _SequenceParallelRMSNorm(torch.nn.RMSNorm):
    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, _tp_summed(self.weight), self.eps)


class _SequenceParallelLayerNorm(torch.nn.LayerNorm):
    def forward(self, x):
        bias = None if self.bias is None else _tp_summed(self.bias)
        return F.layer_norm(x, self.normalized_shape, _tp_summed(self.weight), bias, self.eps)


class SequenceParallelNorm:
    """torch ``RMSNorm`` / ``LayerNorm`` for the local layers under sequence parallelism.

    megatron's local norm refuses ``sequence_parallel`` because each tensor-parallel rank then
    normalises only its ``T/tp`` positions, so the weight's gradient on a rank is a partial sum.
    Here the norm weight (and bias) pass through ``copy_to_tensor_model_parallel_region`` (identity
    forward, all-reduce over the tensor-parallel group in the backward): every rank gets the full
    gradient, as Transformer Engine's norms with megatron's grad finalisation give. Parameter names
    are those of the plain norm (``weight``, ``bias``). Built like megatron's norms:
    ``SequenceParallelNorm(config, hidden_size, eps)``.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        norm = _SequenceParallelRMSNorm if config.normalization == "RMSNorm" else _SequenceParallelLayerNorm
        return norm(hidden_size, eps=eps)


class HeadNorm:
    """torch ``RMSNorm`` / ``LayerNorm`` of each query or key head for the local layers under sequence
    parallelism (megatron's local norm refuses ``sequence_parallel``, though the heads are not split over the
    sequence): each tensor-parallel rank normalises its own heads at every position, so its weight's gradient
    is the sum over those heads, which ``train_step.finalize_grads`` (as megatron's ``finalize_model_grads``)
    sums over the tensor-parallel group. Built like megatron's norms: ``HeadNorm(config, hidden_size, eps)``."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        norm = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        return norm(hidden_size, eps=eps)


def block_spec(cfg: ModelConfig, tc, vp_stage: int | None = None):
    """What ``GPTModel`` builds its decoder from: :func:`layer_spec`, or, for sequence parallelism
    with the local layers, the block of this stage's (virtual stage's) layers with
    :class:`SequenceParallelNorm` as every norm (the layers' and the final one), and :class:`HeadNorm` as the
    query and key norms (``qk_layernorm``)."""
    spec = layer_spec(cfg)
    if not (tc.sequence_parallel and resolved_transformer_impl(cfg) == "local"):
        return spec
    from megatron.core.transformer.transformer_block import (  # heavy: megatron
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    sub = replace(spec.submodules, input_layernorm=SequenceParallelNorm, pre_mlp_layernorm=SequenceParallelNorm)
    if cfg.qk_layernorm:
        attn = sub.self_attention
        heads = replace(attn.submodules, q_layernorm=HeadNorm, k_layernorm=HeadNorm)
        sub = replace(sub, self_attention=replace(attn, submodules=heads))
    layer = replace(spec, submodules=sub)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(tc, vp_stage), layer_norm=SequenceParallelNorm
    )


@functools.cache
def _gpt_model_class():
    from megatron.core.models.gpt import GPTModel  # heavy: megatron

    class ShiQGPTModel(GPTModel):
        """``GPTModel`` that, with ``return_hidden=True``, returns the final (normed) hidden states
        ``[B, T, H]`` instead of logits on the last pipeline stage (gathered over the sequence
        shards under sequence parallelism); parameters and state-dict keys
        are GPTModel's. :meth:`output_weight` is the ``[V/tp, H]`` matrix the logits would use."""

        return_hidden: bool = False
        _tree = None  # the PrefixTree of the forward under way (forward(..., prefix_tree=...))

        def forward(self, input_ids, *args, prefix_tree=None, **kwargs):
            """megatron's forward; with ``prefix_tree`` (``shiq_train.prefix_tree``, keyword arguments only)
            the rows' shared leading tokens run once: the decoder sees the tree's ``N`` nodes as one
            sequence (``input_ids`` or ``decoder_input`` packed, the tree's mask and depths), and the
            output is computed from the states read back into the rows' ``[T, B, H]`` layout."""
            tp = self.config.tensor_model_parallel_size
            if self.config.sequence_parallel and input_ids is not None and input_ids.shape[1] % tp:
                raise ValueError(
                    f"model.sequence_parallel=true splits the sequence over the {tp} tensor-parallel ranks: "
                    f"tokens [B, T] = {tuple(input_ids.shape)} need T divisible by {tp} (pad the batch)"
                )
            if prefix_tree is None:
                return super().forward(input_ids, *args, **kwargs)
            if args:
                raise ValueError("prefix_tree (train.share_prefixes) takes the forward's other arguments by keyword")
            from shiq_train import prefix_tree as trie  # the module, its name taken by the argument

            trie.check_model(self)
            dec = kwargs.pop("decoder_input", None)
            if dec is not None:  # [T, B, H] -> [N, 1, H]
                dec = prefix_tree.pack(dec.transpose(0, 1))[:, None]
            kwargs.update(
                position_ids=prefix_tree.depth[None],  # [1, N]
                attention_mask=prefix_tree.mask,  # [1, 1, N, N]
                decoder_input=dec,
            )
            self._tree = prefix_tree
            try:
                return super().forward(prefix_tree.pack(input_ids)[None], **kwargs)
            finally:
                self._tree = None

        def _preprocess(self, *args, **kwargs):
            out = super()._preprocess(*args, **kwargs)
            if self._tree is None or out[1] is None:
                return out
            # rotary embeddings at each node's depth, not at its index in the packed sequence: [N, 1, 1, d]
            depth = self._tree.depth
            table = self.rotary_pos_emb(int(depth.max()) + 1)
            return (out[0], table[depth], *out[2:])

        def _postprocess(self, hidden_states, *args, **kwargs):
            if self._tree is not None:  # [N, 1, H] -> the rows' [T, B, H]
                hidden_states = self._tree.unpack(hidden_states[:, 0]).transpose(0, 1)
            inference = kwargs.get("inference_context") is not None and not self.training
            plain = self.post_process and not inference and self.config.mtp_num_layers is None
            positions, labels = kwargs.get("loss_mask"), kwargs.get("labels")
            if plain and not self.return_hidden and self.stats_from_labels and positions is not None:
                if labels is None:
                    raise ValueError("loss_mask (the positions whose statistics are read) needs labels=tokens")
                return self._position_stats(hidden_states, labels, positions)
            if self.return_hidden and plain:
                if self.config.sequence_parallel:  # [T/tp, B, H] -> [T, B, H]
                    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region  # heavy: megatron

                    # backward: keep this rank's slice of the gradient; the chunked statistics have
                    # already summed it over the tensor-parallel group (a reduce-scatter would sum twice)
                    hidden_states = gather_from_sequence_parallel_region(
                        hidden_states, tensor_parallel_output_grad=False
                    )
                return hidden_states.transpose(0, 1).contiguous()
            return super()._postprocess(hidden_states, *args, **kwargs)

        def _position_stats(self, hidden_states, tokens, positions):
            """``forward(..., labels=tokens, loss_mask=positions)``: the SHIQ_MATH §2 statistics ``[B, T, 2]``
            of the tokens where ``positions`` ``[B, T]`` (bool) is True, zero elsewhere, from the output
            layer run on only the hidden states that predict them (position ``t − 1`` predicts token
            ``t``). A loss that reads only the actions' statistics (every loss of the family) skips the
            output layer's forward and backward over prompt and tool tokens. The statistics equal the full
            output's (``tests/test_parallel_parity.py``); that the losses read no others is
            ``tests/test_position_stats.py``."""
            if self.config.sequence_parallel:  # [T/tp, B, H] -> [T, B, H]; backward as in return_hidden
                from megatron.core.tensor_parallel import gather_from_sequence_parallel_region  # heavy: megatron

                hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
            T, B, _ = hidden_states.shape
            if positions.shape != (B, T) or positions.dtype != torch.bool:
                raise ValueError(
                    f"loss_mask must be a bool [B, T] = {(B, T)}, got {positions.dtype} {tuple(positions.shape)}"
                )
            group = vp.tensor_parallel_group()
            hidden = hidden_states.transpose(0, 1)  # [B, T, H]
            return vp.position_causal_stats(hidden, self.output_weight(), tokens, positions, 0, group, self.vocab_size)

        stats_from_labels: bool = True

        def compute_language_model_loss(self, labels, logits):
            """``forward(..., labels=tokens)`` returns, instead of megatron's cross-entropy, the SHIQ_MATH §2
            statistics of ``tokens`` ``[B, T]`` (position ``t`` predicted from ``t − 1``; position 0 is
            zero) as ``[B, T, 2]`` float32 (chosen logit, log-partition), read straight from the output
            layer's ``[T, B, V/tp]`` logits: ``labels=None`` would first copy them to ``[B, T, V/tp]``.
            With ``stats_from_labels = False``, megatron's cross-entropy (an SFT loss, for comparison)."""
            if not self.stats_from_labels:
                return super().compute_language_model_loss(labels, logits)
            st = vp.seq_first_causal_stats(logits, labels, vp.tensor_parallel_group(), self.vocab_size)
            return torch.stack([st.chosen_logits, st.logz], -1)

        def output_weight(self) -> torch.Tensor:
            if self.share_embeddings_and_output_weights:
                return self.shared_embedding_or_output_weight()
            return self.output_layer.weight

    return ShiQGPTModel


def build_model(
    cfg: ModelConfig, pre_process: bool | None = None, post_process: bool | None = None, vp_stage: int | None = None
):
    """A ``ShiQGPTModel`` for this process's pipeline stage (and tensor-parallel shard).

    Call after :func:`shiq_train.parallel.init_distributed` (and ``set_seed`` for reproducible
    weights). Without a GPU, applies the CPU adaptations first. Vocab-parallel logits are returned
    ungathered (``parallel_output=True``): ``[B, T, V/tp]``. With virtual pipeline stages, ``vp_stage``
    picks the chunk (see :func:`build_model_chunks`).
    """
    from megatron.core import parallel_state  # heavy: megatron

    apply_cpu_adaptations()
    tc = transformer_config(cfg)
    if tc.params_dtype != torch.float32:
        quiet_mixed_norm_warning()
    vpp = tc.virtual_pipeline_model_parallel_size or 1
    if vpp > 1 and vp_stage is None:
        raise ValueError(
            f"with {vpp} virtual pipeline stages a rank holds {vpp} model chunks: build them with build_model_chunks"
        )
    stage = dict(ignore_virtual=vpp == 1, vp_stage=vp_stage)
    if pre_process is None:
        pre_process = (
            parallel_state.is_pipeline_first_stage(**stage) if parallel_state.model_parallel_is_initialized() else True
        )
    if post_process is None:
        post_process = (
            parallel_state.is_pipeline_last_stage(**stage) if parallel_state.model_parallel_is_initialized() else True
        )
    model = _gpt_model_class()(
        config=tc,
        transformer_layer_spec=block_spec(cfg, tc, vp_stage),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
        position_embedding_type=cfg.position_embedding_type,
        rotary_base=cfg.rotary_base,
        rope_scaling=cfg.rope_scaling_factor is not None,
        rope_scaling_factor=cfg.rope_scaling_factor or 8.0,  # (megatron's default, unused without rope_scaling)
        vp_stage=vp_stage,
    )
    model.return_hidden = cfg.logits_chunk_tokens > 0
    model.logits_chunk_tokens = cfg.logits_chunk_tokens
    if cfg.compile:
        compile_layers(model)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


MIXED_NORM_WARNING = "Mismatch dtype between input and weight"


def quiet_mixed_norm_warning() -> None:
    """Hide the warning torch gives at a bfloat16 model's first step, "Mismatch dtype between input and weight:
    input dtype = c10::BFloat16, weight dtype = float, Cannot dispatch to fused implementation", from the local
    layers' norms, whose weights megatron-core keeps in float32 (it builds them without ``params_dtype``).
    Harmless: torch then normalises the bfloat16 input in float32, scales it by the float32 weight and rounds the
    result once to bfloat16, the input's dtype; what a mixed-precision norm (Transformer Engine's, Apex's)
    computes, and closer to the float32 result than the all-bfloat16 kernel it names. Only that message from
    ``torch.nn.functional`` is hidden."""
    warnings.filterwarnings("ignore", message=MIXED_NORM_WARNING, category=UserWarning, module="torch.nn.functional")


def compile_layers(model) -> None:
    """``model.compile``: every decoder layer's forward through ``torch.compile`` (``dynamic=True``),
    in place (``nn.Module.compile``), so parameter names and the module tree stay as they were."""
    for layer in unwrap(model).decoder.layers:
        layer.compile(dynamic=True, backend=COMPILE_BACKEND)


def build_model_chunks(cfg: ModelConfig) -> list:
    """This rank's model chunks: one :func:`build_model` per virtual pipeline stage (chunk ``c`` of
    pipeline rank ``p`` holds the layers of virtual stage ``c * pp + p``; the embedding sits in chunk 0
    of the first rank, the output layer in the last chunk of the last rank), or ``[build_model(cfg)]``
    without virtual stages. ``train_step.forward_backward`` takes the list."""
    from megatron.core import parallel_state  # heavy: megatron

    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
    if vpp == 1:
        return [build_model(cfg)]
    return [build_model(cfg, vp_stage=c) for c in range(vpp)]


def causal_mask(seq_len: int, device=None) -> torch.Tensor:
    """megatron's boolean attention mask ``[1, 1, T, T]``: True where attention is *blocked*."""
    return torch.triu(torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)


def packed_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask ``[B, 1, T, T]`` for packed rows (``segment_ids`` ``[B, T]``):
    True where attention is blocked, i.e. at future positions and across segments, so packed
    trajectories never see each other. Every position still sees itself (no empty softmax row)."""
    T = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (~same | causal_mask(T, segment_ids.device)[0]).unsqueeze(1)


def packed_position_ids(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 at each segment start ``[B, T]`` (segments are contiguous runs)."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def model_inputs(tokens: torch.Tensor, segment_ids: torch.Tensor | None = None) -> dict:
    """``input_ids``, ``position_ids`` and the explicit attention mask for ``tokens`` ``[B, T]``:
    plain causal, or block-diagonal causal with per-segment positions when ``segment_ids`` is given."""
    B, T = tokens.shape
    if segment_ids is not None:
        return {
            "input_ids": tokens,
            "position_ids": packed_position_ids(segment_ids),
            "attention_mask": packed_causal_mask(segment_ids),
        }
    pos = torch.arange(T, device=tokens.device).unsqueeze(0).expand(B, T)
    return {"input_ids": tokens, "position_ids": pos, "attention_mask": causal_mask(T, tokens.device)}


def unwrap(model):
    """The ``ShiQGPTModel`` inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def model_chunks(model) -> list:
    """This rank's model chunks: ``model`` itself if it is a list (virtual pipeline stages,
    :func:`build_model_chunks`), else ``[model]``."""
    return model if isinstance(model, list) else [model]


def chunk_key(model, chunk: int, name: str) -> str:
    """The name of local parameter ``name`` of chunk ``chunk`` among all of this rank's parameters: ``name``
    itself with one chunk, ``chunk{c}.name`` with several (each chunk numbers its layers from 0)."""
    return name if len(model_chunks(model)) == 1 else f"chunk{chunk}.{name}"


def named_chunk_parameters(model) -> list[tuple[str, object, str, torch.nn.Parameter]]:
    """``(key, chunk, local name, parameter)`` of every parameter of this rank's model or chunks; ``key``
    (:func:`chunk_key`) is unique on the rank and names the parameter in checkpoints and optimizer state."""
    return [
        (chunk_key(model, c, name), chunk, name, p)
        for c, chunk in enumerate(model_chunks(model))
        for name, p in unwrap(chunk).named_parameters()
    ]


def output_stats(
    model, output: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor | None = None
) -> TokenStats:
    """SHIQ_MATH §2 statistics aligned with ``tokens`` ``[B, T]`` from the last stage's output.

    The model is run with ``labels=tokens`` (:func:`stats_inputs`): ``output`` is then the statistics
    ``[B, T, 2]`` (see ``ShiQGPTModel.compute_language_model_loss``) or, when the model returns
    hidden states (``logits_chunk_tokens > 0``), ``[B, T, H]``, turned into statistics a chunk of
    tokens at a time. Position ``t`` holds token ``t``'s statistics, predicted from position
    ``t − 1``; position 0 is zero. With ``positions`` ``[B, T]`` (bool; given to :func:`stats_inputs`
    too), only those positions' statistics are computed, the others are zero.
    """
    inner = unwrap(model)
    if inner.return_hidden:
        group = vp.tensor_parallel_group()
        if positions is None:
            return vp.chunked_causal_stats(
                output, inner.output_weight(), tokens, inner.logits_chunk_tokens, group, inner.vocab_size
            )
        chunk = inner.logits_chunk_tokens
        stats = vp.position_causal_stats(
            output, inner.output_weight(), tokens, positions, chunk, group, inner.vocab_size
        )
        return TokenStats(stats[..., 0], stats[..., 1])
    if output.shape != (*tokens.shape, 2):
        raise ValueError(
            f"expected statistics [B, T, 2] = {(*tokens.shape, 2)} from a model run with "
            f"labels=tokens (stats_inputs), got {tuple(output.shape)}"
        )
    return TokenStats(output[..., 0], output[..., 1])


def stats_inputs(
    tokens: torch.Tensor, segment_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None
) -> dict:
    """:func:`model_inputs` plus ``labels=tokens``: the model's output is then what
    :func:`output_stats` turns into statistics; with ``positions`` ``[B, T]`` (bool, as megatron's
    ``loss_mask``), of those positions only (``ShiQGPTModel._position_stats``)."""
    extra = {} if positions is None else {"loss_mask": positions}
    return {**model_inputs(tokens, segment_ids), "labels": tokens, **extra}


def forward_stats(model, tokens: torch.Tensor, segment_ids: torch.Tensor | None = None) -> TokenStats:
    """Run a whole (single-stage) model on ``tokens`` ``[B, T]`` (packed rows if ``segment_ids``)
    and return its :class:`TokenStats`."""
    return output_stats(model, model(**stats_inputs(tokens, segment_ids)), tokens)


# ----------------------------------------------------------------------------------------------
# one full (TP=1, PP=1) set of parameters <-> this rank's shards


def _stage(model) -> tuple[int, int]:
    """``(pipeline rank, layers per stage)`` of the stage ``model`` holds (with virtual pipeline stages:
    the chunk's virtual stage and layers per chunk)."""
    from megatron.core import parallel_state  # heavy: megatron

    inner = unwrap(model)
    config = inner.config
    pp = config.pipeline_model_parallel_size
    pp_rank = parallel_state.get_pipeline_model_parallel_rank() if pp > 1 else 0
    vpp = config.virtual_pipeline_model_parallel_size or 1
    if vpp > 1:  # chunk c of rank p: virtual stage c * pp + p of pp * vpp equal ones
        return inner.vp_stage * pp + pp_rank, W.layers_per_stage(config.num_layers, pp * vpp)
    return pp_rank, W.layers_per_stage(config.num_layers, pp)


def full_param_name(model, name: str) -> str:
    """Name of local parameter ``name`` in the single-stage model with local layers
    (:func:`shiq_train.weights.full_name`); checked against megatron's own layer numbers."""
    inner = unwrap(model)
    out = W.full_name(name, *_stage(model), inner.share_embeddings_and_output_weights)
    if name.startswith(W.LAYER_PREFIX):
        layer = inner.decoder.layers[int(name[len(W.LAYER_PREFIX) :].split(".", 1)[0])]
        if not out.startswith(f"{W.LAYER_PREFIX}{layer.layer_number - 1}."):
            raise ValueError(f"{name}: megatron numbers this layer {layer.layer_number - 1}, not as in {out}")
    return out


def tp_layout(model, name: str, param) -> tuple[int | None, bool]:
    """``(partition_dim, glu)`` of a parameter from :func:`shiq_train.weights.tp_split`: ``partition_dim``
    None if replicated across tensor parallel ranks; ``glu`` True for ``linear_fc1`` of a gated MLP,
    whose ``[gate; up]`` halves are split separately. Checked against megatron's attributes."""
    dim, glu = W.tp_split(name, unwrap(model).config.gated_linear_unit)
    megatron_dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
    if dim != megatron_dim:
        raise ValueError(f"{name}: megatron splits it on dim {megatron_dim}, shiq_train.weights says {dim}")
    return dim, glu


RANDOM_START = "per-weight-name-v1"  # how init=none draws the weights (a checkpoint's meta records it)


def _weight_init(config, full: str):
    """megatron-core's initialiser of the weight matrix named ``full`` (in the single-stage model): its own
    choice per kind of layer (the embeddings', the output projections' scaled one, or the plain one)."""
    if full.startswith("embedding."):
        return config.embedding_init_method
    if full.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return config.output_layer_init_method
    if full.endswith(("linear_qkv.weight", "linear_fc1.weight")) or full == "output_layer.weight":
        return config.init_method
    raise ValueError(f"{full}: no initialiser known for this weight (init=none)")


def draw_random_start(model, seed: int) -> None:
    """``init=none``: draw every weight matrix of ``model`` (one model, or this rank's chunks) whole, at its
    single-process shape, with megatron-core's initialiser for its kind, from a generator seeded by ``seed`` and
    the weight's full name (:func:`full_param_name`), then keep this rank's tensor-parallel shard: the same
    random start in every layout (tp, pp, vpp) and on every device. megatron-core itself draws the start per
    pipeline stage (a stage does not draw the layers before it: PP=2 started from another model than one
    process) and, on a GPU, per tensor-parallel rank. Vectors (norm weights, biases) keep megatron-core's
    constant values, the same everywhere; one that is not constant is refused rather than left per layout.
    Each rank draws its weights' full shapes (a whole embedding on every tensor-parallel rank) one at a time."""
    from megatron.core import parallel_state  # heavy: megatron

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    for _, chunk, name, p in named_chunk_parameters(model):
        full = full_param_name(chunk, name)
        if p.dim() < 2:
            if p.numel() and not bool((p == p.reshape(-1)[0]).all()):
                raise ValueError(f"{full}: megatron-core drew this vector at random; init=none cannot redraw it")
            continue
        dim, glu = tp_layout(chunk, name, p)
        shape = W.full_shape(p.shape, dim, tp)
        digest = hashlib.sha256(f"{seed}/{full}".encode()).digest()
        weight = torch.empty(shape, dtype=torch.float32)
        _weight_init(unwrap(chunk).config, full)(
            weight, generator=torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        )
        with torch.no_grad():
            p.copy_(W.shard_tensor(weight, dim, glu, tp, rank))


def load_full_parameters(model, full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's shard of every parameter from ``full`` (named as in a TP=1, PP=1 model) into
    ``model`` (one model, or the list of this rank's chunks)."""
    from megatron.core import parallel_state  # heavy: megatron

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    for _, chunk, name, p in named_chunk_parameters(model):
        key = full_param_name(chunk, name)
        if key not in full:
            raise KeyError(f"parameter {key!r} (local {name!r}) is missing from the full parameter set")
        dim, glu = tp_layout(chunk, name, p)
        value = W.shard_tensor(full[key], dim, glu, tp, rank)
        if value.shape != p.shape:
            raise ValueError(f"{key}: shard shape {tuple(value.shape)} != parameter shape {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(value)
