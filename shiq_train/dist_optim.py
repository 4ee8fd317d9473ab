"""Data parallelism through megatron-core's own DistributedDataParallel and distributed optimizer (ZeRO-1).

Selected by ``optimizer.distributed=true`` (:class:`shiq_train.train_step.OptimizerConfig`):

- :func:`build_distributed` wraps the model in megatron's ``DistributedDataParallel``: gradients
  accumulate in one contiguous float32 buffer per dtype, and megatron's ``finalize_model_grads``
  (run by the schedule at the end of ``forward_backward``) reduce-scatters it over the data-parallel
  group, so each rank ends up with the data-parallel mean of the gradient slice it owns (and the tied
  embedding's two copies summed under pipeline parallelism).
- :class:`DistributedAdamW` steps megatron's ``DistributedOptimizer``: AdamW moments and float32 master
  weights exist only for this rank's slice (about ``1/dp`` of the parameters); the optimizer computes the
  global gradient norm (each element once, as :func:`shiq_train.train_step.grad_norm`), clips by it and
  all-gathers the updated parameters. Weight decay skips 1-D parameters; the learning rate follows
  ``OptimizerConfig.lr_at`` through a ``LambdaLR``, as in :func:`shiq_train.train_step.build_optimizer`.
- :meth:`DistributedAdamW.state_by_name` is what a checkpoint saves: each data-parallel rank's own slices of
  the master weights and moments, written by that rank alone (nothing gathered; each value saved once).
  :meth:`DistributedAdamW.state_dict` holds the state as full per-parameter tensors (this tensor/pipeline
  rank's shape, independent of the data-parallel size), gathered on data-parallel rank 0.

:func:`optimizer_state_bytes` measures what the optimizer holds on this rank, with either optimizer.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from shiq_train.model import model_chunks, named_chunk_parameters, unwrap
from shiq_train.parallel import device
from shiq_train.train_step import MasterWeightOptimizer, OptimizerConfig

STATE_FORMAT = "shiq/distributed-adamw/full-per-parameter/v1"
SHARDED_FORMAT = "shiq/distributed-adamw/data-parallel-slices/v1"  # state_by_name: this rank's slices only
STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")  # float32 master weight and the AdamW moments
GATHER_CHUNK = 1 << 26  # values a collective of the optimizer state moves at once (256 MiB of float32)


def megatron_adamw(ddps: list, cfg: OptimizerConfig, bf16: bool, distributed: bool):
    """megatron-core's AdamW over the ``DistributedDataParallel`` models ``ddps``, with ``cfg``'s settings (weight
    decay, betas, epsilon, clipping) and no weight decay on 1-D parameters, as :func:`build_distributed` and the
    non-distributed optimizer of ``shiq_train.train_step`` use them; ``distributed``: megatron's distributed
    optimizer, else its plain one (float32 masters for bfloat16 parameters either way). The learning rate is
    ``cfg.lr``; a caller with a schedule sets it."""
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig  # heavy: megatron
    from megatron.core.optimizer import ParamKey, ParamPredicate, get_megatron_optimizer  # heavy: megatron
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride  # heavy: megatron

    mcfg = MegatronOptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed,
    )
    no_decay = ParamKey(predicate=ParamPredicate(name="dim_le_1", fn=lambda p: p.dim() <= 1))
    megatron = get_megatron_optimizer(mcfg, ddps, config_overrides={no_decay: ParamGroupOverride(wd_mult=0.0)})
    for group in megatron.param_groups:  # megatron's own scheduler would apply wd_mult; we have none
        group["weight_decay"] = cfg.weight_decay * group["wd_mult"]
    return megatron


def build_distributed(model, cfg: OptimizerConfig):
    """``(ddp_model, optimizer, scheduler)`` for ``model`` (this rank's stage and shard, trainable parameters
    already chosen: the buffers cover the parameters with ``requires_grad``).

    ``ddp_model`` is megatron's ``DistributedDataParallel`` (use it in place of ``model``; it holds
    ``model`` as ``.module``); its transformer config gets ``no_sync_func`` and ``finalize_model_grads_func``
    so that :func:`shiq_train.train_step.forward_backward` reduces the gradients. Parameters are float32 or
    bfloat16 (those get float32 masters); gradients are accumulated and reduced in float32.

    With virtual pipeline stages ``model`` is the list of this rank's chunks: each is wrapped in its own
    ``DistributedDataParallel`` (``ddp_model`` is then the list of them, as megatron trains chunks) and one
    distributed optimizer covers all their buffers.
    """
    from megatron.core.distributed import (  # heavy: megatron
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    chunks = [unwrap(c) for c in model_chunks(model)]
    dtypes = {p.dtype for c in chunks for p in c.parameters() if p.requires_grad}
    if dtypes - {torch.float32, torch.bfloat16}:
        raise ValueError(
            f"optimizer.distributed=true needs float32 or bfloat16 parameters, got {sorted(map(str, dtypes))}"
        )
    bf16 = torch.bfloat16 in dtypes  # (norm weights stay float32 in a bfloat16 model)
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    ddps = [DistributedDataParallel(c.config, ddp_cfg, c) for c in chunks]
    for c in chunks:  # the schedule reads the first chunk's config; every chunk's says the same
        c.config.no_sync_func = [d.no_sync for d in ddps] if len(ddps) > 1 else ddps[0].no_sync
        c.config.finalize_model_grads_func = finalize_model_grads
    megatron = megatron_adamw(ddps, cfg, bf16, distributed=True)
    ddp = ddps if isinstance(model, list) else ddps[0]
    opt = DistributedAdamW(ddp, megatron)
    sched = torch.optim.lr_scheduler.LambdaLR(opt.torch_optimizer, lambda step: cfg.lr_at(step) / cfg.lr)
    return ddp, opt, sched


def adam_step(inner: dict) -> int:
    """The step count of the Adam that megatron-core's distributed optimizer wraps, from its ``state_dict()``
    ``inner``: torch's Adam keeps it per parameter (a tensor in each ``state`` entry), Transformer Engine's and
    Apex's fused Adam (which megatron-core 0.16.1 takes whenever either imports) per parameter group (an int,
    in the groups that hold parameters), as megatron's own ``DistributedOptimizer.state_dict`` reads it. The
    per-parameter counts win where there are any: after a resume torch's groups also hold the saved ``step``,
    which torch's Adam never advances. 0 before the first step; a RuntimeError if the counts differ."""
    steps = {int(s["step"]) for s in inner["state"].values() if "step" in s}
    if not steps:
        steps = {int(g["step"]) for g in inner["param_groups"] if g.get("params") and "step" in g}
    if len(steps) > 1:
        raise RuntimeError(f"AdamW's step counts differ between parameters: {sorted(steps)}")
    return steps.pop() if steps else 0


def _overlapping(spans, c0: int, c1: int):
    """``(start, item, a, b)`` for each ``(start, end, item)`` of ``spans`` (ranges of the optimizer state's flat
    vector) that overlaps the piece ``[c0, c1)``: the overlap is ``[a, b)``, in flat coordinates."""
    for start, end, item in spans:
        a, b = max(start, c0), min(end, c1)
        if a < b:
            yield start, item, a, b


class DistributedAdamW:
    """megatron's distributed optimizer behind the interface :func:`shiq_train.train_step.train_step` uses.

    ``step()`` clips by the global gradient norm and updates (the gradients were reduced by
    ``forward_backward``); it returns that norm, taken before clipping. ``state_dict()`` and
    ``load_state_dict()`` are collective over the data-parallel group (every rank calls them, as
    checkpoints do).
    """

    finalizes_grads = True  # train_step: the reduce and the clipping are the optimizer's

    def __init__(self, ddp_model, megatron_optimizer):
        if len(megatron_optimizer.chained_optimizers) != 1:
            raise ValueError("optimizer.distributed=true supports dense models only (no expert parallelism)")
        self.model = ddp_model
        self.megatron = megatron_optimizer
        self.dist = megatron_optimizer.chained_optimizers[0]  # the DistributedOptimizer
        # names as checkpoints key them (chunk-prefixed with several chunks: shiq_train.model.chunk_key)
        self.named = [(key, p) for key, _, _, p in named_chunk_parameters(ddp_model) if p.requires_grad]

    @property
    def param_groups(self):
        return self.megatron.param_groups

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The AdamW over this rank's master-weight slices (the learning-rate schedule drives its groups)."""
        return self.dist.optimizer

    def zero_grad(self, set_to_none: bool = True) -> None:
        for chunk in model_chunks(self.model):
            chunk.zero_grad_buffer()
        self.megatron.zero_grad(set_to_none)

    def step(self) -> float:
        ok, norm, _ = self.megatron.step()
        if not ok:  # without a loss scaler megatron never skips a step; a skip would be silent divergence
            raise RuntimeError("megatron's distributed optimizer skipped the step (non-finite gradients)")
        return float(norm)

    # -- state -------------------------------------------------------------------------------------

    def _group(self):
        return self.dist.data_parallel_group

    def _slice(self, p):
        """``(start, end)`` of ``p.view(-1)`` whose optimizer state lives on this rank, or None."""
        if p not in self.dist.model_param_group_index_map:
            return None
        r = self.dist._get_model_param_range_map(p)["param"]
        return r.start, r.end

    def _owned(self, offsets):
        """``(start, end, states)`` per trainable parameter with a slice on this rank: the slice's place in the flat
        vector of :meth:`_flat` and megatron's live master weight and moments of it."""
        for (_, p), off in zip(self.named, offsets):
            sl = self._slice(p)
            if sl is not None:
                yield off + sl[0], off + sl[1], self.dist._get_main_param_and_optimizer_states(p)

    def _flat(self):
        """Offsets of each trainable parameter in one flat vector of them all, and its length."""
        offsets, n = [], 0
        for _, p in self.named:
            offsets.append(n)
            n += p.numel()
        return offsets, n

    @torch.no_grad()
    def state_dict(self) -> dict:
        """``{"format", "groups", "state"}``: ``groups`` megatron's parameter groups (learning rate, betas,
        weight decay, step count); ``state`` on data-parallel rank 0 maps each trainable parameter's name (as
        checkpoints key them: ``shiq_train.model.named_chunk_parameters``) to full float32 tensors of its shape
        in host memory: ``param`` (the master weight), ``exp_avg``, ``exp_avg_sq``; None on the other
        data-parallel ranks. The slices travel in pieces of :data:`GATHER_CHUNK` values: a rank's device holds
        one piece, not the whole state (three float32 copies of the model: 90 GiB at 8B)."""
        group = self._group()
        offsets, n = self._flat()
        owned = list(self._owned(offsets))
        spans = [(off, off + p.numel(), name) for (name, p), off in zip(self.named, offsets)]
        root, rank0 = dist.get_global_rank(group, 0), dist.get_rank(group) == 0
        state = None
        if rank0:
            state = {name: {k: torch.empty(p.shape, dtype=torch.float32) for k in STATE_KEYS} for name, p in self.named}
        piece = torch.empty(min(n, GATHER_CHUNK), dtype=torch.float32, device=device())  # nccl: on the GPU
        for k in STATE_KEYS:
            for c0 in range(0, n, GATHER_CHUNK):
                c1 = min(n, c0 + GATHER_CHUNK)
                part = piece[: c1 - c0].zero_()
                for start, live, a, b in _overlapping(owned, c0, c1):
                    part[a - c0 : b - c0] = live[k].detach().view(-1)[a - start : b - start].float()
                dist.reduce(part, dst=root, group=group)  # slices do not overlap: the sum is a gather
                if rank0:
                    host = part.cpu()
                    for off, name, a, b in _overlapping(spans, c0, c1):
                        state[name][k].view(-1)[a - off : b - off] = host[a - c0 : b - c0]
        return {"format": STATE_FORMAT, "groups": self._groups(), "state": state}

    def _groups(self) -> list[dict]:
        """The AdamW parameter groups without their parameters, each with the step count (as megatron's
        ``DistributedOptimizer.state_dict``, which fails on a rank holding no state, e.g. a frozen stage)."""
        inner = self.torch_optimizer.state_dict()
        step = adam_step(inner)
        return [{**{k: v for k, v in g.items() if k != "params"}, "step": step} for g in inner["param_groups"]]

    @torch.no_grad()
    def load_state_dict(self, saved: dict, problem: str | None = None) -> None:
        """Restore :meth:`state_dict`'s output (data-parallel rank 0's ``state`` reaches the others); ``problem``:
        what data-parallel rank 0 already found wrong with it (refused on every rank, as what it checks here)."""
        if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
            raise ValueError(
                "the checkpoint's optimizer state was not written by optimizer.distributed=true "
                f"(expected format {STATE_FORMAT!r}); resume with the optimizer it was saved with"
            )
        group = self._group()
        offsets, n = self._flat()
        state = saved["state"]
        if dist.get_rank(group) == 0:
            problem = problem or self._check(state)
        root = dist.get_global_rank(group, 0)
        bad = torch.tensor([problem is not None], dtype=torch.int32, device=device())
        dist.broadcast(bad, src=root, group=group)  # every rank stops, not only the one that read the state
        if bad.item():
            raise ValueError(
                problem or "the checkpoint's optimizer state does not fit the model (see data-parallel rank 0)"
            )
        self._allocate(saved["groups"])
        owned = list(self._owned(offsets))
        spans = [(off, off + p.numel(), name) for (name, p), off in zip(self.named, offsets)]
        piece = torch.empty(min(n, GATHER_CHUNK), dtype=torch.float32, device=device())
        for k in STATE_KEYS:  # in pieces, as state_dict gathers them
            for c0 in range(0, n, GATHER_CHUNK):
                c1 = min(n, c0 + GATHER_CHUNK)
                part = piece[: c1 - c0]
                if dist.get_rank(group) == 0:
                    for off, name, a, b in _overlapping(spans, c0, c1):
                        part[a - c0 : b - c0] = state[name][k].reshape(-1)[a - off : b - off]
                dist.broadcast(part, src=root, group=group)
                for start, live, a, b in _overlapping(owned, c0, c1):
                    live[k].view(-1)[a - start : b - start].copy_(part[a - c0 : b - c0])

    def state_by_name(self, model) -> dict:
        """What a checkpoint saves of this optimizer on this rank (``shiq_train.checkpoint.optimizer_state_by_name``):
        this data-parallel rank's own slices, no collective. ``{"groups": [...], "params": {name: entry}}``, each
        group carrying ``format`` (:data:`SHARDED_FORMAT`) so that the form is recognised. Every trainable
        parameter with a slice here has an entry: ``group`` (0: weight decay, 1: none), ``master`` and
        ``state``'s ``exp_avg`` / ``exp_avg_sq`` (float32, flat, in host memory) for the elements
        ``slice = [start, end)`` of the flattened parameter (this tensor/pipeline rank's ``shape``), and ``step``;
        ``master`` is None for a float32 parameter, which is its own master (megatron's is a view of it), so the
        checkpoint's parameters hold it.
        The slices of a parameter over the data-parallel ranks cover it once; :func:`merge_slices` puts them
        together under another layout (``shiq_train.checkpoint``)."""
        groups = self._groups()
        step = float(groups[0]["step"]) if groups else 0.0
        params = {}
        for name, p in self.named:
            sl = self._slice(p)
            if sl is None:
                continue
            live = self.dist._get_main_param_and_optimizer_states(p)
            flat = {k: live[k].detach().reshape(-1).to("cpu", torch.float32, copy=True) for k in STATE_KEYS[1:]}
            if p.dtype != torch.float32:
                flat["param"] = live["param"].detach().reshape(-1).to("cpu", torch.float32, copy=True)
            params[name] = {
                "group": 0 if p.dim() > 1 else 1,
                "state": {"exp_avg": flat["exp_avg"], "exp_avg_sq": flat["exp_avg_sq"], "step": torch.tensor(step)},
                "master": flat.get("param"),
                "slice": [sl[0], sl[1]],
                "shape": list(p.shape),
            }
        return {"groups": [{**g, "format": SHARDED_FORMAT} for g in groups], "params": params}

    def holds_slices(self, state: dict) -> bool:
        """Whether ``state`` (:meth:`state_by_name`'s form) holds exactly this rank's slices: the same trainable
        parameters, shapes and ranges, so it loads here as it is (the saved layout, with the same buffers)."""
        entries = state.get("params") if isinstance(state, dict) else None
        if not is_sliced(state) or not isinstance(entries, dict):
            return False
        own = {name: (p, self._slice(p)) for name, p in self.named if self._slice(p) is not None}
        if set(entries) != set(own):
            return False
        return all(
            _holds_slice(entries[name], list(p.shape), sl[1] - sl[0])
            and list(entries[name].get("slice") or []) == list(sl)
            for name, (p, sl) in own.items()
        )

    def load_state_by_name(self, model, state: dict) -> None:
        """Restore this rank's own slices (:meth:`state_by_name` as saved, which must hold them: see
        :meth:`holds_slices`), the full per-parameter form (:func:`merge_slices`' of another layout's slices, or a
        checkpoint of an earlier release), or the default optimizer's (``optimizer.distributed=false``:
        :func:`shiq_train.checkpoint.optimizer_state_by_name`, see :meth:`_from_plain`); collective. Any other state
        is refused on every rank."""
        groups = state.get("groups") or []
        entries = state.get("params") or {}
        if is_sliced(state):
            self._load_slices(state)
            return
        if groups and all(g.get("format") == STATE_FORMAT for g in groups):
            groups = [{k: v for k, v in g.items() if k != "format"} for g in groups]
            params = dict(self.named)
            full = {}
            for name, e in entries.items():
                master = e.get("master")
                if master is None and name in params and params[name].dtype == torch.float32:
                    master = params[name].detach().float().cpu()  # its own master, loaded as the parameter
                full[name] = {"param": master, **{k: e.get("state", {}).get(k) for k in STATE_KEYS[1:]}}
            problem = None
        elif groups and not any("format" in g for g in groups):
            problem = _plain_problem(groups, entries, dict(self.named))
            groups, full = self._from_plain(entries)
        else:
            groups, full, problem = None, None, None  # refused by load_state_dict, naming the cause
        self.load_state_dict({"format": STATE_FORMAT, "groups": groups, "state": full} if groups else {}, problem)

    @torch.no_grad()
    def _load_slices(self, state: dict) -> None:
        """Copy this rank's saved slices into place (no data moves between ranks); refused on every data-parallel
        rank if any of them does not hold its own slices."""
        fits = torch.tensor([int(self.holds_slices(state))], dtype=torch.int32, device=device())
        dist.all_reduce(fits, op=dist.ReduceOp.MIN, group=self._group())
        if not fits.item():
            raise ValueError(
                "the checkpoint's optimizer slices are not this layout's (another data-parallel size, or other "
                "trainable parameters): put them together first (shiq_train.checkpoint)"
            )
        self._allocate([{k: v for k, v in g.items() if k != "format"} for g in state["groups"]])
        for name, p in self.named:
            if name in state["params"]:
                live = self.dist._get_main_param_and_optimizer_states(p)
                for k, saved in _slice_tensors(state["params"][name]).items():
                    live[k].view(-1).copy_(saved)

    def _allocate(self, groups: list[dict]) -> None:
        """Load the parameter groups ``groups`` (hyper-parameters, step count) into megatron's optimizer, which
        allocates this rank's slices of the state."""
        self.dist.load_state_dict({"optimizer": {"param_groups": groups}})
        # megatron (0.16.1 distrib_optimizer.py:821-825, torch AdamW without Apex/TE) gives every parameter
        # the same ``step`` tensor, which AdamW then increments once per parameter: one tensor each
        for s in self.torch_optimizer.state.values():
            if "step" in s:  # (Transformer Engine's and Apex's fused Adam count in the groups instead)
                s["step"] = s["step"].clone()

    def _from_plain(self, entries: dict) -> tuple[list[dict], dict | None]:
        """``(groups, state)`` of :meth:`load_state_dict` from the default optimizer's by-name ``entries`` (its
        AdamW run on whole parameters, the same update; checked by :func:`_plain_problem`): each parameter's
        moments as saved, and its master weight the saved float32 copy (a bfloat16 parameter's) or else the
        parameter as just loaded (a float32 parameter is its own master). The groups are this optimizer's own
        (their hyper-parameters come from the configuration, as on any resume) with the saved step count. ``state`` is built on data-parallel rank 0 only (None elsewhere),
        the one rank whose state :meth:`load_state_dict` reads."""
        steps = [
            float(e["state"]["step"])
            for e in entries.values()
            if isinstance(e, dict) and isinstance(e.get("state"), dict) and "step" in e["state"]
        ]
        groups = [{**g, "step": int(max(steps, default=0))} for g in self._groups()]
        if dist.get_rank(self._group()) != 0:
            return groups, None
        shapes = dict(self.named)
        full = {}
        for name, e in entries.items():
            saved = e.get("state") if isinstance(e, dict) and isinstance(e.get("state"), dict) else {}
            p = shapes.get(name)
            master = e.get("master") if isinstance(e, dict) else None
            if master is None and p is not None:
                master = p.detach().float().cpu()
            full[name] = {"param": master, **{k: saved.get(k) for k in STATE_KEYS[1:]}}
        return groups, full

    def _check(self, state) -> str | None:
        """What is wrong with data-parallel rank 0's saved ``state`` for these parameters, or None."""
        names = [name for name, _ in self.named]
        if not isinstance(state, dict) or set(state) != set(names):
            have = set(state) if isinstance(state, dict) else set()
            return (
                "the checkpoint's optimizer state covers other parameters than the trainable ones "
                f"(missing {sorted(set(names) - have)}, extra {sorted(have - set(names))})"
            )
        for name, p in self.named:
            for k in STATE_KEYS:
                t = state[name].get(k) if isinstance(state[name], dict) else None
                if not torch.is_tensor(t) or tuple(t.shape) != tuple(p.shape):
                    shape = tuple(t.shape) if torch.is_tensor(t) else None
                    return (
                        f"the checkpoint's optimizer state {name}.{k} has shape {shape}, the parameter {tuple(p.shape)}"
                    )
        return None


def _plain_problem(groups: list, entries: dict, params: dict) -> str | None:
    """What keeps the default optimizer's by-name state (``groups``, ``entries``) from becoming the distributed
    optimizer's for the trainable ``params`` (name: parameter), or None: it must be AdamW's (its two groups,
    decayed parameters of more than one dimension first, each with betas and eps), and every parameter must
    hold both moments and the one step count that the distributed optimizer keeps for them all (a parameter
    skipped by some steps, or never stepped, has its own). Parameter names and shapes are checked by
    :meth:`DistributedAdamW._check` after."""
    resume_plain = "; resume with optimizer.distributed=false"
    if len(groups) != 2 or not all("betas" in g and "eps" in g for g in groups):
        return f"the checkpoint's optimizer state is not the default optimizer's AdamW (its parameter groups){resume_plain}"
    steps = set()
    for name, p in params.items():
        e = entries.get(name)
        if not isinstance(e, dict):
            continue  # (named by _check)
        state = e.get("state") if isinstance(e.get("state"), dict) else {}
        if e.get("group") != (0 if p.dim() > 1 else 1):
            return f"the checkpoint's optimizer state puts parameter {name} in group {e.get('group')!r}{resume_plain}"
        missing = [k for k in ("exp_avg", "exp_avg_sq", "step") if k not in state]
        if missing:
            return (
                f"the checkpoint's optimizer state of parameter {name} has no {', '.join(missing)} (never stepped, "
                f"or not AdamW's), which the distributed optimizer cannot start from{resume_plain}"
            )
        steps.add(float(state["step"]))
    if len(steps) > 1:
        return (
            f"the checkpoint's AdamW step counts differ between parameters ({', '.join(f'{x:g}' for x in sorted(steps))}): "
            f"the distributed optimizer keeps one for all{resume_plain}"
        )
    return None


def _slice_tensors(entry: dict) -> dict:
    """``{"param" (unless the parameter is its own master), "exp_avg", "exp_avg_sq"}`` of one
    :meth:`DistributedAdamW.state_by_name` entry."""
    state = entry.get("state") if isinstance(entry.get("state"), dict) else {}
    out = {"exp_avg": state.get("exp_avg"), "exp_avg_sq": state.get("exp_avg_sq")}
    return out if entry.get("master") is None else {"param": entry["master"], **out}


def _holds_slice(entry, shape: list, n: int) -> bool:
    """Whether ``entry`` is a slice entry of a parameter of ``shape`` holding ``n`` values of each tensor and a step."""
    if not isinstance(entry, dict) or list(entry.get("shape") or []) != list(shape):
        return False
    step = entry["state"].get("step") if isinstance(entry.get("state"), dict) else None
    tensors = _slice_tensors(entry).values()
    return torch.is_tensor(step) and all(torch.is_tensor(t) and t.dim() == 1 and t.numel() == n for t in tensors)


def is_sliced(state) -> bool:
    """Whether the by-name optimizer ``state`` holds data-parallel slices (:meth:`DistributedAdamW.state_by_name`)."""
    groups = state.get("groups") if isinstance(state, dict) else None
    return bool(groups) and all(isinstance(g, dict) and g.get("format") == SHARDED_FORMAT for g in groups)


def merge_slices(name: str, pieces: list[dict], where: str) -> dict:
    """One parameter's full by-name entry (``master``, or None where the parameter is its own, ``exp_avg``,
    ``exp_avg_sq`` of its ``shape``, ``step``, ``group``) from its :meth:`DistributedAdamW.state_by_name` entries of
    every data-parallel rank (``pieces``), which must cover the parameter exactly once; ``where`` (the files) names a damaged checkpoint in the ``ValueError``."""
    shape = list(pieces[0].get("shape") or [])
    n = math.prod(shape)
    spans = sorted((tuple(e.get("slice") or (0, 0)), i) for i, e in enumerate(pieces))
    covered = 0
    for (a, b), i in spans:
        if a != covered or b <= a or not _holds_slice(pieces[i], shape, b - a):
            break
        covered = b
    masters = {e.get("master") is None for e in pieces}
    if covered != n or len({e.get("group") for e in pieces}) != 1 or len(masters) != 1:
        raise ValueError(
            f"{where}: the distributed optimizer's slices of {name} do not cover it once (shape {shape}, slices "
            f"{[list(s) for s, _ in spans]}): the checkpoint is damaged"
        )
    full = {k: torch.empty(n, dtype=torch.float32) for k in _slice_tensors(pieces[0])}
    for (a, b), i in spans:
        for k, t in _slice_tensors(pieces[i]).items():
            full[k][a:b] = t
    state = {k: full[k].view(shape) for k in STATE_KEYS[1:]}
    state["step"] = pieces[0]["state"]["step"].clone()
    return {
        "group": pieces[0]["group"],
        "state": state,
        "master": full["param"].view(shape) if "param" in full else None,
    }


def full_groups(groups: list[dict]) -> list[dict]:
    """The groups of :meth:`DistributedAdamW.state_by_name` as the full per-parameter form's (:func:`merge_slices`)."""
    return [{**g, "format": STATE_FORMAT} for g in groups]


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state on this rank: AdamW's tensors (moments, step counts) and float32 master
    weights that are copies (not the model's own float32 parameters)."""
    if isinstance(optimizer, DistributedAdamW):
        inner, masters = (
            optimizer.torch_optimizer,
            [m for g in optimizer.dist.shard_fp32_from_float16_groups for m in g if m is not None],
        )
    elif isinstance(optimizer, MasterWeightOptimizer):
        inner, masters = optimizer.inner, optimizer.masters
    else:
        inner, masters = optimizer, []
    moments = [t for s in inner.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in moments + list(masters))
