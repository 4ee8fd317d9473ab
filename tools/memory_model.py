"""Bytes per GPU and step time of a Llama-family model under a megatron-core layout (formulas only).

Used by ``tools/plan_memory.py`` (the table and ``--validate``) and by ``tests/test_plan_memory.py``; run as a
script, it only points to ``python tools/plan_memory.py --help`` (exit 0 with -h/--help, else 2).
Everything is per GPU, for the pipeline stage that needs the most memory, and counts bytes exactly
where the quantity is exact (parameters, gradients, optimizer state) and by formula where it is an
estimate (activations, logits).

- Parameters: the model's tensors on one stage and tensor-parallel rank (matrices split over TP,
  norms replicated; the embedding on the first stage, the output layer and final norm on the last).
- Gradients: one value per parameter in ``grad_dtype`` (megatron's DDP grad buffer: float32 with
  ``grad_reduce_in_fp32``, else the parameters' dtype; the shiq trainer's ``param.grad`` has the
  parameters' dtype).
- Optimizer state (AdamW): two float32 moments per parameter, plus a float32 master copy of each
  bf16 parameter. megatron's distributed optimizer (``megatron.core.optimizer.DistributedOptimizer``,
  ZeRO-1) shards exactly these (``shard_fp32_from_float16_groups`` and the ``exp_avg`` /
  ``exp_avg_sq`` shards) over the data- and context-parallel ranks; fp32 parameters get no master copy.
- Activations per layer and micro-batch (Korthikanti et al. 2022, "Reducing Activation Recomputation
  in Large Transformer Models"), split into the terms the options act on: the residual-stream terms
  (norm inputs, the inputs of the QKV and first MLP projections, dropout masks), replicated over
  TP unless sequence parallelism splits them; the tensor-parallel terms (Q, K, V, the attention
  output, the MLP's intermediate tensors), split over TP; the attention scores (``a·s²`` per
  sequence), split over TP and dropped by selective recomputation or a fused (flash) attention
  kernel. For a GPT layer (MLP 4h, GeLU, multi-head attention, dropout) the terms add up to the
  paper's ``s·b·h·(34 + 5·a·s/h)`` bytes; :func:`layer_activation_terms` generalises them to
  grouped-query attention and gated MLPs of width f. Full recomputation keeps each layer's input
  ``2·s·b·h`` (split by SP) plus, transiently, one layer's activations during its recomputation.
  1F1B keeps ``min(PP − stage, M)`` micro-batches in flight on a stage (with ``v`` virtual stages,
  ``(2·(PP − 1 − stage) + (v − 1)·PP + 1)/v`` micro-batches' worth: stage 0 ``PP·(1 + (PP − 1)/(PP·v))``).
- Token statistics (last stage; SHIQ_MATH §2, ``shiq_train.vocab_parallel``): the full path keeps the
  float32 softmax ``[tokens, V/TP]`` between forward and backward and, at its peak, also the
  logits in the parameters' dtype; ``logits_chunk_tokens = c > 0`` keeps only a ``[c, V/TP]`` chunk
  (logits and float32 buffer) at a time. Plus the per-token statistics of policy and reference
  (4 float32 per token).
- Only the last k layers training (``train.trainable_last_layers = k``): gradients and optimizer
  state for those layers (and the final norm) only, activations kept only by them (no gradient
  reaches the frozen prefix), the backward only through them and the output layer (its input gradient
  only: its weight is frozen).
- Step time: executed FLOPs / (GPUs · peak · utilisation) × pipeline bubble ``1 + (PP − 1)/(v·M)``,
  with FLOPs ``6·N·tokens`` (matrix parameters N, the output layer included, the input embedding
  not) plus attention ``12·L·h·s·tokens`` (forward and backward), plus a recomputed forward
  (full: ``2·N + 4·L·h·s`` per token; selective: the attention part ``4·L·h·s``), plus the
  reference model's forward when ``reference = online``. Attention FLOPs are counted over the
  whole ``s × s`` square, as megatron's own throughput formula does.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # SXM, dense bf16; FP8 GEMMs twice it (step_seconds)
GPU_MEMORY_GIB = {"H100": 81559 / 1024, "H200": 143771 / 1024}  # total memory as the driver reports it (MiB)


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder (gated SiLU MLP, RMSNorm, RoPE, no biases); ``head_dim`` None is ``hidden / heads``,
    ``qk_norm`` a norm of each query and key head (Qwen3: two replicated vectors of ``head_dim`` per layer)."""

    name: str
    num_layers: int
    hidden: int
    heads: int
    kv_groups: int
    ffn: int
    vocab: int
    tied: bool = False
    gated: bool = True
    head_dim: int | None = None
    qk_norm: bool = False

    @property
    def head_width(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @classmethod
    def from_model_config(cls, cfg) -> Shape:
        """From a ``shiq_train.model.ModelConfig``."""
        return cls(
            cfg.name,
            cfg.num_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_query_groups or cfg.num_attention_heads,
            cfg.ffn_hidden_size or 4 * cfg.hidden_size,
            cfg.vocab_size,
            cfg.share_embeddings_and_output_weights,
            cfg.gated_linear_unit,
            cfg.kv_channels,
            cfg.qk_layernorm,
        )


PRESETS = {
    "8B": Shape("Llama-3.1-8B", 32, 4096, 32, 8, 14336, 128256),
    "70B": Shape("Llama-3.1-70B", 80, 8192, 64, 8, 28672, 128256),
}


@dataclass(frozen=True)
class Layout:
    """Parallel layout and training settings of one run: sizes as megatron's (``dp`` the data-parallel
    size, ``vpp`` virtual stages per pipeline rank), ``micro_batches`` per step and data-parallel rank,
    ``trainable_layers`` as ``train.trainable_last_layers``, the rest as the model config's options."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    vpp: int = 1
    seq: int = 4096
    micro_batch: int = 1
    micro_batches: int = 8
    recompute: str = "none"  # none | selective | full
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    params_dtype: str = "bf16"
    grad_dtype: str = "fp32"
    fp8: bool = False
    fused_attention: bool = True  # flash / cuDNN attention (Transformer Engine): no a·s² scores kept
    dropout: bool = False
    logits_chunk_tokens: int = 0
    reference: str = "precomputed"  # precomputed | online (a frozen copy of the model on every GPU)
    trainable_layers: int = -1  # -1: every parameter; k >= 0: the last k layers and the final norm

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    def check(self, shape: Shape) -> None:
        for k in ("tp", "pp", "dp", "cp", "vpp", "seq", "micro_batch", "micro_batches"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.recompute not in ("none", "selective", "full"):
            raise ValueError(f"recompute must be none, selective or full, got {self.recompute!r}")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence parallelism needs tp > 1")
        if self.sequence_parallel and self.seq % self.tp:  # as shiq-train (model.check_layout)
            raise ValueError(f"sequence parallelism needs seq={self.seq} divisible by tp={self.tp}")
        if self.vpp > 1 and self.micro_batches % self.pp:  # as shiq-train (ParallelConfig.check_fits)
            raise ValueError(
                f"vpp={self.vpp} (the interleaved schedule) needs micro_batches={self.micro_batches} a multiple of "
                f"pp={self.pp}"
            )
        if shape.num_layers % (self.pp * self.vpp):
            raise ValueError(f"{shape.num_layers} layers do not split into pp*vpp = {self.pp * self.vpp} chunks")
        if self.logits_chunk_tokens < 0:
            raise ValueError(f"logits_chunk_tokens must be >= 0, got {self.logits_chunk_tokens}")
        if not -1 <= self.trainable_layers <= shape.num_layers:
            raise ValueError(f"trainable_layers must be -1 or in [0, {shape.num_layers}], got {self.trainable_layers}")
        if shape.heads % self.tp or shape.kv_groups % self.tp or shape.vocab % self.tp:
            raise ValueError(f"heads, KV groups and vocabulary of {shape.name} must be divisible by tp={self.tp}")


# ----------------------------------------------------------------------------------------------
# parameters, gradients, optimizer state (exact counts)


def layer_params(s: Shape) -> tuple[int, int]:
    """``(tensor-parallel-split, replicated)`` parameter counts of one decoder layer."""
    d = s.head_width
    qkv = s.hidden * (s.heads + 2 * s.kv_groups) * d
    proj = s.heads * d * s.hidden
    mlp = s.hidden * s.ffn * (3 if s.gated else 2)
    return qkv + proj + mlp, 2 * s.hidden + (2 * d if s.qk_norm else 0)


def total_params(s: Shape) -> int:
    """All parameters of the model (tied embeddings counted once)."""
    split, rep = layer_params(s)
    return s.num_layers * (split + rep) + s.vocab * s.hidden * (1 if s.tied else 2) + s.hidden


def stage_params(s: Shape, lay: Layout, stage: int) -> int:
    """Parameters held by one GPU of pipeline stage ``stage`` (all its virtual chunks)."""
    split, rep = layer_params(s)
    n = s.num_layers // lay.pp * (split // lay.tp + rep)
    first, last = stage == 0, stage == lay.pp - 1
    emb = s.vocab * s.hidden // lay.tp
    if first:
        n += emb
    if last:
        n += s.hidden  # final norm
        if not s.tied or not first:  # untied output layer, or the tied copy on the last stage
            n += emb
    return n


def stage_layers(s: Shape, lay: Layout, stage: int) -> tuple[int, int]:
    """``(layers, trainable layers)`` of a pipeline stage (its virtual chunks together)."""
    per = s.num_layers // lay.pp
    if lay.trainable_layers < 0:
        return per, per
    first_trainable = s.num_layers - lay.trainable_layers
    if lay.vpp == 1:
        idx = range(stage * per, (stage + 1) * per)
    else:  # chunk c of stage p holds global chunk c * pp + p
        chunk = per // lay.vpp
        idx = [(c * lay.pp + stage) * chunk + i for c in range(lay.vpp) for i in range(chunk)]
    return per, sum(i >= first_trainable for i in idx)


def stage_trainable_params(s: Shape, lay: Layout, stage: int) -> int:
    """Parameters with gradients and optimizer state on one GPU of ``stage``."""
    if lay.trainable_layers < 0:
        return stage_params(s, lay, stage)
    split, rep = layer_params(s)
    n = stage_layers(s, lay, stage)[1] * (split // lay.tp + rep)
    return n + (s.hidden if stage == lay.pp - 1 and lay.trainable_layers > 0 else 0)


def param_bytes(n: int, lay: Layout) -> int:
    return n * DTYPE_BYTES[lay.params_dtype]


def fp8_weight_bytes(s: Shape, lay: Layout) -> int:
    """FP8 (Transformer Engine, delayed scaling): an FP8 copy of every decoder GEMM weight and of its
    transpose, 2 bytes per such parameter (the embedding and output layer stay in bf16)."""
    return 2 * s.num_layers // lay.pp * (layer_params(s)[0] // lay.tp) if lay.fp8 else 0


def grad_bytes(n: int, lay: Layout) -> int:
    return n * DTYPE_BYTES[lay.grad_dtype]


def optimizer_bytes(n: int, lay: Layout) -> float:
    """AdamW: float32 exp_avg and exp_avg_sq, and a float32 master copy of non-fp32 parameters;
    divided over the data- and context-parallel ranks with the distributed optimizer (megatron's ZeRO-1 shards
    over its ``dp_cp`` group: context-parallel ranks hold the same parameters)."""
    per = 8 + (4 if lay.params_dtype != "fp32" else 0)
    return n * per / (lay.dp * lay.cp if lay.distributed_optimizer else 1)


# ----------------------------------------------------------------------------------------------
# activations (estimates)


def layer_activation_terms(s: Shape, seq: int, b: int, dropout: bool = True, act_bytes: int = 2) -> dict:
    """Bytes kept for the backward by one layer and one micro-batch (no parallelism), by term.

    ``residual``: norm inputs 2·2sbh, QKV and first-MLP inputs 2·2sbh, dropout masks 2·sbh;
    ``tensor_parallel``: Q (2sbq), K and V (2sbk each), attention output 2sbq, MLP intermediates
    (gated: fc1 output 2·2sbf, activation output 2sbf, fc2 input 2sbf; else 2sbf + 2sbf), and with query and
    key norms their inputs (2sbq + 2sbk); ``q = a·d`` is the attention's width and ``k = g·d`` the keys' (``d``
    the head width: ``q = h`` and ``k = h·g/a`` when ``d = h/a``);
    ``scores``: softmax output 2as²b (+ dropout mask as²b and output 2as²b with attention dropout).
    At 2 bytes per value; ``act_bytes`` scales them. GPT case (f = 4h, a = g, dropout): 34sbh + 5as²b.
    """
    sbh = seq * b * s.hidden
    sbf = seq * b * s.ffn
    sbq, sbk = seq * b * s.heads * s.head_width, seq * b * s.kv_groups * s.head_width
    residual = 4 * sbh + 4 * sbh + (2 * sbh if dropout else 0)
    mlp = (4 + 2 + 2) * sbf if s.gated else (2 + 2) * sbf
    tensor_parallel = 2 * sbq + 4 * sbk + 2 * sbq + mlp + ((2 * sbq + 2 * sbk) if s.qk_norm else 0)
    scores = (5 if dropout else 2) * s.heads * seq * seq * b
    k = act_bytes / 2
    return {"residual": residual * k, "tensor_parallel": tensor_parallel * k, "scores": scores * k}


def linear_input_terms(s: Shape, seq: int, b: int) -> tuple[float, float]:
    """``(residual, tensor_parallel)`` bytes of the four GEMM inputs at 2 bytes (what FP8 halves):
    QKV and fc1 inputs (residual stream), attention output (the attention's width) and fc2 input
    (tensor-parallel)."""
    sbh, sbf, sbq = seq * b * s.hidden, seq * b * s.ffn, seq * b * s.heads * s.head_width
    return 4 * sbh, 2 * sbq + 2 * sbf


def layer_activations(s: Shape, lay: Layout) -> float:
    """Bytes one layer keeps per micro-batch on one GPU under ``lay`` (no recomputation)."""
    act = DTYPE_BYTES[lay.params_dtype]
    seq = lay.seq // lay.cp
    t = layer_activation_terms(s, seq, lay.micro_batch, lay.dropout, act)
    res, tp_terms = t["residual"], t["tensor_parallel"]
    if lay.fp8:  # Transformer Engine keeps the GEMM inputs in FP8: 1 byte instead of act
        lin_res, lin_tp = linear_input_terms(s, seq, lay.micro_batch)
        res -= lin_res / 2 * (act - 1)
        tp_terms -= lin_tp / 2 * (act - 1)
    scores = 0.0 if (lay.fused_attention or lay.recompute == "selective") else t["scores"]
    return res / (lay.tp if lay.sequence_parallel else 1) + tp_terms / lay.tp + scores / lay.tp


def in_flight(lay: Layout, stage: int) -> float:
    """Micro-batches whose activations a stage holds at once under 1F1B: megatron's warm-up forwards plus
    one. Interleaved, a stage's warm-up is ``2·(PP − 1 − stage) + (v − 1)·PP`` chunk forwards of 1/v of its
    layers each (at most all ``M·v``), so stage 0 holds ``PP·(1 + (PP − 1)/(PP·v))`` micro-batches' worth
    (Narayanan et al. 2021) and the last stage ``((v − 1)·PP + 1)/v``."""
    if lay.pp == 1:
        return 1.0
    if lay.vpp == 1:
        return float(min(lay.pp - stage, lay.micro_batches))
    chunks = 2 * (lay.pp - 1 - stage) + (lay.vpp - 1) * lay.pp + 1
    return min(chunks, lay.micro_batches * lay.vpp) / lay.vpp


def stage_activations(s: Shape, lay: Layout, stage: int) -> float:
    """Activation bytes a stage keeps for the backward at the 1F1B peak (its trainable layers' and
    the embedding output / output layer input on the first / last stage), without the transient
    of :func:`recompute_transient`."""
    layers = stage_layers(s, lay, stage)[1]  # frozen layers (a prefix) keep nothing for the backward
    seq = lay.seq // lay.cp
    act = DTYPE_BYTES[lay.params_dtype]
    sbh = seq * lay.micro_batch * s.hidden * act / (lay.tp if lay.sequence_parallel else 1)
    per_mb = layers * (sbh if lay.recompute == "full" else layer_activations(s, lay))
    extra = (sbh if stage == 0 and lay.trainable_layers < 0 else 0.0) + (sbh if stage == lay.pp - 1 else 0.0)
    return in_flight(lay, stage) * (per_mb + extra)


def recompute_transient(s: Shape, lay: Layout) -> float:
    """Full recomputation: one layer's activations exist while that layer is recomputed."""
    return layer_activations(s, lay) if lay.recompute == "full" else 0.0


def stats_bytes(s: Shape, lay: Layout) -> float:
    """Last stage: the per-token statistics' peak (SHIQ_MATH §2) for one micro-batch in flight.

    Full logits: the float32 softmax ``[tokens, V/TP]`` and the logits in the activation dtype.
    Chunked: one ``[chunk, V/TP]`` chunk of both, plus the backward's float32 output-weight gradient
    accumulator ``[V/TP, H]`` and its cast to the weight's dtype. Both: c and z of policy and
    reference, 4 float32 per token."""
    tokens = lay.seq // lay.cp * lay.micro_batch
    v = s.vocab // lay.tp
    act = DTYPE_BYTES[lay.params_dtype]
    if lay.logits_chunk_tokens == 0:
        peak = tokens * v * (4 + act)
    else:
        peak = min(lay.logits_chunk_tokens, tokens) * v * (4 + act) + v * s.hidden * (4 + act)
    return peak + tokens * 4 * 4


# ----------------------------------------------------------------------------------------------
# the whole picture


@dataclass
class Plan:
    shape: Shape
    layout: Layout
    stage: int
    params: int
    param_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    reference_bytes: float
    activation_bytes: float
    stats_bytes: float
    flops: float
    step_s: float

    @property
    def total_bytes(self) -> float:
        return (
            self.param_bytes
            + self.grad_bytes
            + self.optimizer_bytes
            + self.reference_bytes
            + self.activation_bytes
            + self.stats_bytes
        )


def step_flop_parts(s: Shape, lay: Layout) -> tuple[float, float]:
    """Executed FLOPs of one optimizer step over all GPUs: ``(in the decoder layers' linear layers, the rest)``.
    The rest (attention's two products, the norms, the output layer) stays in bf16 under FP8, which runs the
    decoder layers' linear layers only (Transformer Engine's FP8 GEMMs)."""
    tokens = lay.dp * lay.micro_batches * lay.micro_batch * lay.seq
    split, rep = layer_params(s)
    L, out = s.num_layers, s.vocab * s.hidden  # the input embedding is a lookup; the output layer a GEMM
    attn_fwd = 4 * L * s.heads * s.head_width * lay.seq  # per token (QK^T and AV, the attention's width)
    lin, other = 2 * L * split, 2 * (L * rep + out + s.hidden) + attn_fwd  # the forward, per token
    fwd = (lin, other)
    # backward: twice the forward of the trainable layers; the output layer's input gradient, and its weight's
    # gradient only when it trains (train.trainable_last_layers freezes it)
    k = L if lay.trainable_layers < 0 else lay.trainable_layers
    bwd_lin, bwd_other = 2 * k * split, 2 * k * rep + attn_fwd * k / L
    out_bwd = 2 * out * (2 if lay.trainable_layers < 0 else 1)
    lin, other = lin + 2 * bwd_lin, other + 2 * bwd_other + out_bwd
    if lay.recompute == "full":  # the trainable layers' forward again
        lin, other = lin + bwd_lin, other + bwd_other
    elif lay.recompute == "selective":
        other += attn_fwd * k / L
    if lay.reference == "online":
        lin, other = lin + fwd[0], other + fwd[1]
    return lin * tokens, other * tokens


def step_flops(s: Shape, lay: Layout) -> float:
    """Executed FLOPs of one optimizer step over all GPUs."""
    return sum(step_flop_parts(s, lay))


def step_seconds(s: Shape, lay: Layout, gpu: str, utilisation: float) -> float:
    """The step's time at ``utilisation`` of the GPUs' bf16 peak, the FP8 GEMMs (``lay.fp8``) at twice it, with
    the pipeline's bubble."""
    lin, other = step_flop_parts(s, lay)
    peak = PEAK_TFLOPS[gpu] * 1e12
    bubble = 1 + (lay.pp - 1) / (lay.vpp * lay.micro_batches)
    return (lin / (2 if lay.fp8 else 1) + other) / (lay.gpus * peak * utilisation) * bubble


def plan(s: Shape, lay: Layout, gpu: str = "H100", utilisation: float = 0.4) -> Plan:
    """The stage with the largest total, with every term."""
    lay.check(s)
    if not 0 < utilisation <= 1:
        raise ValueError(f"utilisation must be in (0, 1], got {utilisation}")
    best = None
    for stage in range(lay.pp):
        n, trained = stage_params(s, lay, stage), stage_trainable_params(s, lay, stage)
        p = Plan(
            s,
            lay,
            stage,
            n,
            param_bytes(n, lay) + fp8_weight_bytes(s, lay),
            grad_bytes(trained, lay),
            optimizer_bytes(trained, lay),
            param_bytes(n, lay) if lay.reference == "online" else 0.0,
            stage_activations(s, lay, stage) + recompute_transient(s, lay),
            stats_bytes(s, lay) if stage == lay.pp - 1 else 0.0,
            step_flops(s, lay),
            step_seconds(s, lay, gpu, utilisation),
        )
        if best is None or p.total_bytes > best.total_bytes:
            best = p
    return best


def fits(p: Plan, gpu: str, reserve_gib: float = 6.0) -> bool:
    """Whether the plan's total leaves ``reserve_gib`` of the GPU free (CUDA context, NCCL and
    communication buffers, allocator fragmentation)."""
    return p.total_bytes <= (GPU_MEMORY_GIB[gpu] - reserve_gib) * GiB


if __name__ == "__main__":  # a library, not a command: point to the one that uses it
    import sys

    _asked = bool(set(sys.argv[1:]) & {"-h", "--help"})  # help to stdout, exit 0; anything else to stderr, exit 2
    print(
        "memory_model.py: a library of formulas, no command line; run: python tools/plan_memory.py --help",
        file=sys.stdout if _asked else sys.stderr,
    )
    sys.exit(0 if _asked else 2)
