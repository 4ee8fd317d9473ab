"""One optimisation step of a megatron GPTModel on per-token-statistics losses.

Pieces a trainer composes (none holds global state beyond megatron's process groups):

- :func:`forward_backward` — megatron's ``get_forward_backward_func()`` schedule (no pipelining,
  1F1B, or interleaved 1F1B over model chunks) over a list of micro-batches; the last stage turns
  the model output into SHIQ_MATH §2 statistics (:func:`shiq_train.model.output_stats`) and calls a
  loss function of ``(TokenStats, micro_batch)``.
- :func:`finalize_grads` — the gradient reductions megatron's DDP/finalize would do: the tied
  embedding's two copies under pipeline parallelism, and the data-parallel mean.
- :func:`clip_grad_norm` — the global gradient norm over the tensor × pipeline layout (replicated
  parameters counted once) and clipping.
- :func:`build_optimizer` / :func:`train_step` — AdamW with linear warm-up and cosine decay
  (``OptimizerConfig.distributed``: megatron's DDP and distributed optimizer instead, built by
  ``shiq_train.dist_optim.build_distributed``; ``train_step`` runs either), in two phases
  (:func:`gradients`: forward, backward, reduction; :func:`update`: clipping, AdamW, schedule).

A micro-batch is a dict of ``[B, T]`` tensors: ``tokens`` (int64), ``action_mask`` (bool),
``rewards``, ``ref_chosen_logits``, ``ref_logz`` (float), optionally ``segment_ids`` ``[B, T]`` and
``group_ids`` ``[B]``. Position ``t`` holds token ``t`` and its statistics (predicted from ``t − 1``).
With ``prefix_hidden`` ``[T, B, H]`` (``shiq_train.prefix_cache``) the model starts from those hidden
states instead of embedding ``tokens`` (its decoder then runs only the layers after the cached prefix).
With ``prefix_tree`` (``shiq_train.prefix_tree``) the rows' shared leading tokens run once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from shiq_train.model import model_chunks, output_stats, stats_inputs, unwrap
from shiq_train.objectives import TERMS, TRAJECTORIES, compute_loss
from shiq_train.parallel import device
from shiq_train.stats import TokenStats

LossFn = Callable[[TokenStats, dict], "tuple[torch.Tensor, dict]"]
LOSS_SUM, WEIGHT = "_loss_sum", "_loss_weight"  # a weighted step's numerator and denominator, not logged
SUMMED = (TERMS, TRAJECTORIES, LOSS_SUM, WEIGHT, "pairs")  # metrics a step sums over micro-batches and ranks
# means over the step's trajectories or loss terms (when the loss counts them): each micro-batch's value weighs by
# its count of the metric named here
WEIGHED_BY = {"reward": TRAJECTORIES, "log_ratio": TRAJECTORIES, "abs_delta_mean": TERMS}
MAXED = ("abs_delta_max",)  # the largest over micro-batches and ranks (every other metric: the mean)


@dataclass
class OptimizerConfig:
    """AdamW with linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr``
    over ``decay_steps`` (0: constant after warm-up). ``clip_grad`` is the max global grad norm
    (0 disables). Norms, biases (1-D parameters) get no weight decay. With bf16 parameters and
    ``fp32_master_weights``, AdamW updates float32 copies that are rounded into the model after each
    step (updates smaller than bf16's resolution accumulate instead of vanishing).

    ``distributed``: train through megatron-core's DistributedDataParallel and distributed optimizer
    (``shiq_train.dist_optim``): gradients reduce-scattered from one contiguous buffer, AdamW state and
    float32 master weights sharded over the data-parallel ranks (ZeRO-1); the same updates as the default
    (per-parameter all-reduce, every rank holding the whole AdamW state). Needs ``fp32_master_weights``."""

    lr: float = 3e-4
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    decay_steps: int = 0
    fp32_master_weights: bool = True
    distributed: bool = False

    def __post_init__(self):
        if not 0 < self.lr < math.inf:
            raise ValueError(f"optimizer.lr must be finite and > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optimizer.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"optimizer.{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.adam_eps < math.inf:
            raise ValueError(f"optimizer.adam_eps must be finite and > 0, got {self.adam_eps}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"optimizer.weight_decay must be finite and >= 0, got {self.weight_decay}")
        if not 0 <= self.clip_grad < math.inf:
            raise ValueError(f"optimizer.clip_grad must be finite and >= 0 (0: no clipping), got {self.clip_grad}")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ValueError("optimizer.warmup_steps and decay_steps must be >= 0")
        for name in ("fp32_master_weights", "distributed"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"optimizer.{name} must be true or false, got {getattr(self, name)!r}")
        if self.distributed and not self.fp32_master_weights:
            raise ValueError(
                "optimizer.distributed=true always keeps float32 master weights (megatron's distributed "
                "optimizer): set optimizer.fp32_master_weights=true"
            )

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.decay_steps == 0:
            return self.lr
        t = min(1.0, (step - self.warmup_steps) / self.decay_steps)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * t))


class MasterWeightOptimizer:
    """An optimizer over float32 master copies of low-precision parameters.

    ``step()`` copies the model's gradients into the masters, steps the inner optimizer on them and
    rounds the masters back into the model. ``state_dict()`` holds the masters too (exact resume).
    """

    def __init__(self, params: list, make_inner):
        self.params = params
        self.masters = [p.detach().clone().float().requires_grad_(True) for p in params]
        self.inner = make_inner(self.masters)

    @property
    def param_groups(self):
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            p.grad = None if set_to_none else (p.grad.zero_() if p.grad is not None else None)
        self.inner.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self):
        for p, m in zip(self.params, self.masters):
            m.grad = None if p.grad is None else p.grad.float()
        self.inner.step()
        for p, m in zip(self.params, self.masters):
            p.copy_(m)

    def state_dict(self):
        return {"inner": self.inner.state_dict(), "masters": [m.detach().clone() for m in self.masters]}

    def load_state_dict(self, state):
        with torch.no_grad():
            for m, saved in zip(self.masters, state["masters"]):
                m.copy_(saved)
        self.inner.load_state_dict(state["inner"])


def decay_groups(params: list, weight_decay: float, **options) -> list[dict]:
    """AdamW parameter groups of ``params`` (each with ``options``, such as its ``lr``): ``weight_decay`` on the
    matrices, none on norms and biases (1-D parameters)."""
    return [
        {"params": [p for p in params if p.dim() > 1], "weight_decay": weight_decay, **options},
        {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0, **options},
    ]


def build_optimizer(model, cfg: OptimizerConfig):
    """``(optimizer, LambdaLR)`` over the trainable parameters of ``model`` (one model, or the list of this
    rank's chunks): AdamW, wrapped in a :class:`MasterWeightOptimizer` when some parameter is not float32 and
    ``fp32_master_weights``."""
    params = [p for p in _parameters(model) if p.requires_grad]

    def adamw(ps):
        return torch.optim.AdamW(
            decay_groups(ps, cfg.weight_decay),
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            fused=True,  # one kernel over every tensor, not a loop over them (tools/bench_adamw.py)
        )

    if cfg.fp32_master_weights and any(p.dtype != torch.float32 for p in params):
        opt = MasterWeightOptimizer(params, adamw)
        inner = opt.inner
    else:
        opt = inner = adamw(params)
    sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda step: cfg.lr_at(step) / cfg.lr)
    return opt, sched


def apply_optimizer_config(scheduler, cfg: OptimizerConfig) -> None:
    """Set the hyperparameters of ``cfg`` on a resumed optimizer: loading a checkpoint brings back the saved
    run's learning rate (the ``LambdaLR``'s base and each group's ``lr``), betas, eps and weight decay, so a
    change accepted on resume (``+resume.allow_changed=[optimizer.lr]``) would be logged and never applied.
    ``scheduler`` is the ``LambdaLR`` of :func:`build_optimizer` (or of ``shiq_train.dist_optim``), whose lambda
    reads ``cfg``; its step count is kept. The no-decay group (biases, norms) keeps a weight decay of 0
    (megatron's groups: ``wd_mult``). An unchanged ``cfg`` changes nothing, to the bit."""
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [cfg.lr] * len(groups)
    for i, (group, lam) in enumerate(zip(groups, scheduler.lr_lambdas)):
        group["lr"] = cfg.lr * lam(scheduler.last_epoch)  # LambdaLR's own formula at the resumed step
        group["betas"] = (cfg.adam_beta1, cfg.adam_beta2)
        group["eps"] = cfg.adam_eps
        mult = group.get("wd_mult", 1.0 if i == 0 else 0.0)  # build_optimizer: the decayed group first
        group["weight_decay"] = cfg.weight_decay * mult
    scheduler._last_lr = [g["lr"] for g in groups]


def objective_loss_fn(loss_cfg) -> LossFn:
    """Loss selected by config (:class:`shiq_train.objectives.LossConfig`) as a ``LossFn``."""

    def fn(st: TokenStats, mb: dict):
        ref_c, ref_z = mb.get("ref_chosen_logits"), mb.get("ref_logz")
        if ref_c is None and loss_cfg.spec.needs_reference:  # (sft: compute_loss takes none)
            raise ValueError(
                f"loss {loss_cfg.name!r} reads the reference statistics, but the micro-batch has no "
                "ref_chosen_logits: precompute them in the buffer (shiq-train ref-stats) or use train.reference=online"
            )
        return compute_loss(
            loss_cfg,
            st.chosen_logits,
            st.logz,
            ref_c,
            ref_z,
            mb["rewards"],
            mb["action_mask"],
            group_ids=mb.get("group_ids"),
            segment_ids=mb.get("segment_ids"),
        )

    fn.reads_actions_only = True  # every loss of the family (tests/test_position_stats.py)
    return fn


def _forward_step_func(loss_fn: LossFn, weighted: bool, unit_weight: bool):
    """megatron's ``forward_step_func`` for ``loss_fn``. ``weighted`` (``calculate_per_token_loss``): the
    loss function's mean times its ``loss_terms`` (1 if ``unit_weight``: a step of one micro-batch on one
    rank, whose mean is already the step's), with that count, megatron's three-value return."""

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        # a loss that reads only the actions' statistics: the output layer runs on those positions only
        positions = mb["action_mask"] if getattr(loss_fn, "reads_actions_only", False) else None
        inputs = stats_inputs(mb["tokens"], mb.get("segment_ids"), positions)
        tree = {"prefix_tree": mb["prefix_tree"]} if mb.get("prefix_tree") is not None else {}
        output = model(**inputs, decoder_input=mb.get("prefix_hidden"), **tree)

        def loss_func(output_tensor):
            st = output_stats(model, output_tensor, mb["tokens"], positions)
            loss, metrics = loss_fn(st, mb)
            if not weighted:
                # the schedule divides ``loss`` in place by the number of micro-batches: log a clone
                return loss, {"loss": loss.detach().clone(), **metrics}
            if TERMS not in metrics:
                raise ValueError(
                    "train.loss_average=step weighs each micro-batch by the number of terms its loss averages, "
                    f"but the loss function reports no {TERMS!r} metric"
                )
            n = 1 if unit_weight else int(metrics[TERMS])
            weight = torch.tensor(n, dtype=torch.int, device=loss.device)
            return loss * n, weight, {**metrics, LOSS_SUM: loss.detach() * n, WEIGHT: n}

        return output, loss_func

    return forward_step


def same_width(micro_batches: list[dict]) -> None:
    """Right-pad the micro-batches, in place, to the widest one's width ``T``, as the sampler pads (token 0,
    ``action_mask`` False, rewards and reference statistics 0, ``segment_ids`` a trailing segment of its own):
    every ``[B, T]`` tensor grows, others stay. Padding after a trajectory changes none of its statistics
    (causal attention) nor any loss (masked positions). In place, so that what a loss function writes into a
    micro-batch (the online reference's statistics) fits the padded one and reaches the caller.

    megatron's interleaved schedule needs it: with activations of different shapes it would exchange each
    shape before the activation, but its warm-up and steady-state calls do not pair up one to one across
    pipeline ranks, so the shape exchange waits for a call the other rank makes only later (a hang).
    Micro-batches with different numbers of rows (whole prompt groups) cannot be padded and are refused."""
    rows = sorted({int(mb["tokens"].shape[0]) for mb in micro_batches})
    if len(rows) > 1:
        raise ValueError(
            f"interleaved pipeline stages (parallel.vpp > 1) need the same number of rows in every micro-batch of a "
            f"step, got {rows}: data.mode=groups fills micro-batches with whole prompt groups; use parallel.vpp=1 "
            "or groups whose sizes add up to data.rows_per_micro_batch"
        )
    width = max(int(mb["tokens"].shape[1]) for mb in micro_batches)
    for mb in micro_batches:
        B, T = mb["tokens"].shape
        for key, v in list(mb.items()):
            if T < width and torch.is_tensor(v) and tuple(v.shape) == (B, T):
                fill = int(v.max()) + 1 if key == "segment_ids" else 0
                mb[key] = torch.cat([v, torch.full((B, width - T), fill, dtype=v.dtype, device=v.device)], 1)


def forward_backward(model, micro_batches: list[dict], loss_fn: LossFn, forward_only: bool = False):
    """Run megatron's schedule over ``micro_batches``; gradients accumulate in ``param.grad``.

    ``model`` is one model, or the list of this rank's chunks under virtual pipeline stages
    (``shiq_train.model.build_model_chunks``: megatron's interleaved schedule, on micro-batches padded to one
    width by :func:`same_width`).

    ``micro_batches`` are this data-parallel rank's share. What the step's loss is depends on the model's
    ``config.calculate_per_token_loss`` (the trainer sets it from ``train.loss_average``):

    - True (``step``): the mean over every term of the step (SHIQ_MATH §3): each micro-batch's loss weighs
      by its ``loss_terms`` (:func:`shiq_train.objectives.compute_loss`: action positions, pairs, groups or
      trajectories) over all micro-batches and data-parallel ranks. The gradients are those of that mean
      once :func:`finalize_grads` has summed them over the data-parallel ranks (megatron's DDP: its own
      finalize, inside the schedule). A step of one micro-batch on one rank weighs it 1: the same numbers,
      bit for bit, as the mean.
    - False (``micro_batch``, megatron's default): the mean of the micro-batches' losses (and of the ranks'),
      each micro-batch weighing the same whatever its number of terms.

    Returns ``(loss, metrics)`` on every rank, broadcast from the last pipeline stage: that loss, ``loss_terms``
    (and ``trajectories``, DPO's ``pairs``) summed over the step's micro-batches and ranks, ``reward`` and
    ``log_ratio`` as the means over the step's trajectories and ``abs_delta_mean`` over its loss terms (each
    micro-batch's weighing by its count, when the loss function reports it: :data:`WEIGHED_BY`),
    ``abs_delta_max`` as the largest over the step, and every other metric as the mean over micro-batches and
    ranks.
    """
    from megatron.core import parallel_state  # heavy: megatron
    from megatron.core.pipeline_parallel import get_forward_backward_func  # heavy: megatron
    from megatron.core.utils import get_model_config  # heavy: megatron

    chunks = model if isinstance(model, list) else None  # virtual pipeline stages: one iterator per chunk
    if chunks is not None and len(chunks) > 1:
        same_width(micro_batches)
    tokens = micro_batches[0]["tokens"]
    # Micro-batches of one step may differ in width (and, whole groups, in rows): megatron then sends each
    # activation's shape between pipeline stages before the activation (every stage sees the same batches).
    config = get_model_config(chunks[0] if chunks else model)
    config.variable_seq_lengths = len({tuple(mb["tokens"].shape) for mb in micro_batches}) > 1
    weighted = bool(getattr(config, "calculate_per_token_loss", False))
    dp = parallel_state.get_data_parallel_world_size()
    out = get_forward_backward_func()(
        forward_step_func=_forward_step_func(loss_fn, weighted, unit_weight=len(micro_batches) == 1 and dp == 1),
        data_iterator=[iter(micro_batches) for _ in chunks] if chunks else iter(micro_batches),
        model=model,
        num_microbatches=len(micro_batches),
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=forward_only,
    )
    keys = sorted(out[0]) if out else []
    vals = None
    if out:  # per key: the sum over micro-batches (_summed; weighed metrics times their counts), max or mean
        weighed = _summed(keys) & set(WEIGHED_BY)
        table = torch.tensor(
            [
                [float(d.get(k, 0)) * (float(d.get(WEIGHED_BY[k], 0)) if k in weighed else 1.0) for k in keys]
                for d in out
            ],
            dtype=torch.float64,
        )  # [micro-batches, keys]
        vals = torch.where(torch.tensor([k in MAXED for k in keys]), table.max(0).values, table.sum(0))
        vals /= torch.tensor([1.0 if k in _summed(keys) or k in MAXED else len(out) for k in keys], dtype=torch.float64)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        group = parallel_state.get_pipeline_model_parallel_group()
        src = parallel_state.get_pipeline_model_parallel_last_rank()
        obj = [(keys, vals)]
        dist.broadcast_object_list(obj, src=src, group=group)
        keys, vals = obj[0]
    if dp > 1:  # sums over data-parallel ranks, the largest of the maxima; the means' mean
        maxed = torch.tensor([k in MAXED for k in keys])
        group = parallel_state.get_data_parallel_group()
        summed, largest = vals.to(device(), copy=True), vals.to(device(), copy=True)  # (nccl: device tensors)
        dist.all_reduce(summed, group=group)
        if maxed.any():
            dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
        vals = torch.where(maxed, largest.cpu(), summed.cpu())
        vals /= torch.tensor([1.0 if k in _summed(keys) or k in MAXED else dp for k in keys], dtype=torch.float64)
    metrics = {k: float(v) for k, v in zip(keys, vals)}
    for k in _summed(keys) & set(WEIGHED_BY):  # the sums over the step's trajectories or terms, divided once
        metrics[k] = metrics[k] / metrics[WEIGHED_BY[k]] if metrics[WEIGHED_BY[k]] > 0 else 0.0
    if weighted:
        weight = metrics.pop(WEIGHT)
        metrics["loss"] = metrics.pop(LOSS_SUM) / weight if weight > 0 else 0.0
        if not forward_only and config.finalize_model_grads_func is None and weight > 0:
            # this rank's gradient is of Σ terms; finalize_grads averages over the dp ranks: × dp / Σ weights
            for p in _parameters(model):
                if p.grad is not None:
                    p.grad.mul_(dp / weight)
    return metrics["loss"], metrics


def _summed(keys) -> set:
    """The metrics of ``keys`` a step sums over micro-batches and ranks: :data:`SUMMED`, and those of
    :data:`WEIGHED_BY` (each times its micro-batch's count) when the loss reports their count."""
    return set(SUMMED) | {k for k in keys if k in WEIGHED_BY and WEIGHED_BY[k] in keys}


def finalize_grads(model) -> None:
    """Reduce gradients as megatron's DDP + ``finalize_model_grads`` would, without their buffers.

    1. Tied embeddings under pipeline parallelism: the first stage's embedding and the last stage's
       output copy each hold part of the gradient; all-reduce (sum) over the embedding group so both
       hold the full one (megatron ``finalize_model_grads._allreduce_word_embedding_grads``).
    2. Sequence parallelism: a parameter megatron marks ``sequence_parallel`` (the row-parallel layers'
       biases; Transformer Engine's norms) holds on each tensor-parallel rank the gradient of that rank's
       positions only; all-reduce (sum) over the tensor-parallel group (megatron
       ``finalize_model_grads._allreduce_non_tensor_model_parallel_grads``). The local layers' norms
       (``model.SequenceParallelNorm``) sum theirs in the backward and carry no such mark.
       The query and key norms (``model.qk_layernorm``) hold on each tensor-parallel rank the gradient of that
       rank's heads only; all-reduce (sum) likewise, with or without sequence parallelism (megatron
       ``finalize_model_grads`` sums every parameter named ``q_layernorm`` or ``k_layernorm``).
    3. Data parallelism: mean of every gradient over the data-parallel group.
    """
    from megatron.core import parallel_state  # heavy: megatron

    # the chunk holding the embedding (first) or the output layer (last); the model itself without chunks
    inner = [unwrap(c) for c in model_chunks(model) if unwrap(c).pre_process or unwrap(c).post_process]
    if (
        parallel_state.get_pipeline_model_parallel_world_size() > 1
        and inner
        and inner[0].share_embeddings_and_output_weights
        and parallel_state.is_rank_in_embedding_group()
    ):
        w = inner[0].shared_embedding_or_output_weight()
        if w is not None and w.grad is not None:
            dist.all_reduce(w.grad, group=parallel_state.get_embedding_group())
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        group = parallel_state.get_tensor_model_parallel_group()
        for c in model_chunks(model):
            config = unwrap(c).config
            for name, p in c.named_parameters():
                if p.grad is None:
                    continue
                split = getattr(config, "sequence_parallel", False) and getattr(p, "sequence_parallel", False)
                heads = getattr(config, "qk_layernorm", False) and ("q_layernorm" in name or "k_layernorm" in name)
                if split or heads:
                    dist.all_reduce(p.grad, group=group)
    dp = parallel_state.get_data_parallel_world_size()
    if dp > 1:
        group = parallel_state.get_data_parallel_group()
        for p in _parameters(model):
            if p.grad is not None:
                dist.all_reduce(p.grad, group=group)
                p.grad.div_(dp)


def _parameters(model):
    return (p for c in model_chunks(model) for p in c.parameters())


def grad_norm(model) -> float:
    """Global L2 norm of the gradients over tensor × pipeline ranks (each element counted once:
    tensor-parallel-replicated parameters on TP rank 0 only, the tied embedding's last-stage copy
    not at all)."""
    from megatron.core import parallel_state  # heavy: megatron

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    sq = torch.zeros((), dtype=torch.float64)
    for p in _parameters(model):
        if p.grad is None:
            continue
        if not getattr(p, "tensor_model_parallel", False) and tp_rank != 0:
            continue
        if getattr(p, "shared", False) and not parallel_state.is_pipeline_first_stage():
            continue
        sq += p.grad.detach().double().pow(2).sum().cpu()
    mp_size = (
        parallel_state.get_tensor_model_parallel_world_size() * parallel_state.get_pipeline_model_parallel_world_size()
    )
    if mp_size > 1:
        sq = sq.to(next(_parameters(model)).device)
        dist.all_reduce(sq, group=parallel_state.get_model_parallel_group())
    return float(sq.sqrt())


def clip_grad_norm(model, max_norm: float) -> float:
    """Scale gradients so their global norm is at most ``max_norm`` (0: no clipping); returns the
    norm before clipping."""
    norm = grad_norm(model)
    if max_norm > 0 and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for p in _parameters(model):
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm


def gradients(model, optimizer, micro_batches: list[dict], loss_fn: LossFn) -> tuple[float, dict]:
    """The first phase of :func:`train_step`: zero grads, forward/backward over ``micro_batches`` and the
    gradients' reduction over the data-parallel ranks (:func:`finalize_grads`; megatron's DDP reduces inside
    :func:`forward_backward`). Returns :func:`forward_backward`'s ``(loss, metrics)``."""
    optimizer.zero_grad(set_to_none=True)
    loss, metrics = forward_backward(model, micro_batches, loss_fn)
    if not getattr(optimizer, "finalizes_grads", False):
        finalize_grads(model)
    return loss, metrics


def update(model, optimizer, scheduler, clip_grad: float) -> float:
    """The second phase of :func:`train_step`, after :func:`gradients`: clip by the global gradient norm, the
    optimizer's step (the distributed optimizer's includes its clipping and the all-gather of the updated
    parameters), the LR schedule. Returns the norm before clipping."""
    if getattr(optimizer, "finalizes_grads", False):
        norm = optimizer.step()
    else:
        norm = clip_grad_norm(model, clip_grad)
        optimizer.step()
    scheduler.step()
    return norm


def train_step(model, optimizer, scheduler, micro_batches: list[dict], loss_fn: LossFn, clip_grad: float) -> dict:
    """Zero grads, forward/backward over ``micro_batches``, reduce (:func:`gradients`), clip, AdamW step, LR
    schedule (:func:`update`).

    Returns the metrics (``loss`` as :func:`forward_backward` defines it, ``loss_terms`` summed over the
    step, the loss function's others averaged over micro-batches),
    ``grad_norm`` (before clipping) and ``lr`` (the rate this step used). With the distributed optimizer
    (``shiq_train.dist_optim.DistributedAdamW``, ``optimizer.finalizes_grads``) megatron reduces the
    gradients inside ``forward_backward`` and the optimizer clips by the same global norm (its
    ``clip_grad``).
    """
    _, metrics = gradients(model, optimizer, micro_batches, loss_fn)
    lr = optimizer.param_groups[0]["lr"]
    norm = update(model, optimizer, scheduler, clip_grad)
    return {**metrics, "grad_norm": norm, "lr": lr}
