"""The training loop: steps, checkpoints, resume, logging. The math lives in ``losses``; the parallel
schedule in ``train_step``; this file only puts them in order.

A data source is any object with ``next_micro_batches() -> list[dict]`` (this data-parallel rank's
micro-batches for one optimizer step, dicts as described in ``shiq_train.train_step``) and
``state_dict()`` / ``load_state_dict()`` (so a resumed run continues the same data order). The state should
be the same on every rank (a ``BufferSampler``'s is its stream position): a run resumed under another
parallel layout gets the saved global rank 0's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from shiq_data.cli_common import EXIT_TERMINATED, LOG_LEVELS, Terminated, on_sigterm
from shiq_data.io import atomic_write_text, json_loads
from shiq_train import prefix_tree
from shiq_train.checkpoint import (
    check_latest,
    latest_step_dir,
    load_checkpoint,
    remove_temporaries,
    save_checkpoint,
    set_aside_later_steps,
)
from shiq_train.dist_optim import build_distributed
from shiq_train.model import build_model, build_model_chunks, model_chunks, unwrap
from shiq_train.objectives import LossConfig
from shiq_train.parallel import device
from shiq_train.prefix_cache import PrefixCache, suffix_only
from shiq_train.train_step import (
    OptimizerConfig,
    apply_optimizer_config,
    build_optimizer,
    forward_backward,
    objective_loss_fn,
    train_step,
)

logger = logging.getLogger(__name__)  # (``log`` below is a run's metrics log)

REFERENCES = ("precomputed", "online")
LOSS_AVERAGES = ("step", "micro_batch")
WANDB_MODES = ("offline", "online")
WANDB_INSTALL = "pip install 'shiq[wandb]' (the optional extra; or pip install wandb==0.31.0)"


@dataclass
class LoggingConfig:
    """Optional Weights & Biases logging next to metrics.jsonl and TensorBoard: ``wandb`` turns it on,
    ``wandb_mode`` ``offline`` (the default: no network; the run lands in ``OUT/wandb``, uploaded later by
    ``wandb sync``) or ``online``; ``wandb_project`` names the project. The package is an optional extra.
    ``level``: which progress and status lines reach stderr (DEBUG, INFO, WARNING or ERROR; Python ``logging``).
    """

    wandb: bool = False
    wandb_project: str = "shiq"
    wandb_mode: str = "offline"
    level: str = "INFO"

    def __post_init__(self):
        if self.wandb_mode not in WANDB_MODES:
            raise ValueError(f"logging.wandb_mode must be one of {WANDB_MODES}, got {self.wandb_mode!r}")
        if not isinstance(self.level, str) or self.level.upper() not in LOG_LEVELS:
            raise ValueError(f"logging.level must be one of {list(LOG_LEVELS)}, got {self.level!r}")


def import_wandb():
    """The ``wandb`` module, or a ``RuntimeError`` saying how to install it."""
    try:
        import wandb  # optional: only logging.wandb=true needs it
    except ImportError:
        raise RuntimeError(
            f"logging.wandb=true needs the package wandb, which is not installed: {WANDB_INSTALL}"
        ) from None
    return wandb


@dataclass
class TrainConfig:
    """``reference``: ``precomputed`` reads the reference statistics from the batch (the buffer's
    columns); ``online`` runs a frozen copy of the initial model on every micro-batch.
    ``trainable_last_layers``: -1 trains every parameter; ``N >= 1`` only the last ``N`` transformer
    layers and the final norm (embeddings frozen), a cheap fine-tune for CPU runs (0, nothing, is refused).
    ``eval_every``: 0 = never; ``N >= 1`` calls the ``evaluate`` hook of :meth:`Trainer.fit` after
    every ``N``-th optimizer step and after the final one.
    ``cache_frozen_prefix``: with ``trainable_last_layers = N >= 1``, compute the hidden states entering
    the first trainable layer once for every row of the buffer (``shiq_train.prefix_cache``) and run only
    the last ``N`` layers at each step; the same losses and parameters up to float rounding, much less
    compute. Needs a data source over a replay buffer (``BufferSampler``, ``padded`` or ``groups`` mode),
    tensor and pipeline parallel size 1 and no dropout; an online reference uses the cache too.
    ``save_on_sigterm``: SIGTERM (a scheduler's stop or preemption; ``torchrun`` passes it to every rank) lets
    the step under way finish, saves a checkpoint of it on every rank (the ranks agree on the step), and ends
    the run by :class:`SavedOnSigterm`; the same command resumes from there. A second SIGTERM ends the process
    at once, unless it comes within 5 seconds of the first (``SIGTERM_SAME_STOP_S``: Slurm and torchrun each
    pass on the same stop). ``false``: SIGTERM ends the process at once (the newest checkpoint is from ``save_every``).
    ``share_prefixes``: the rows of a micro-batch that begin with the same tokens (the completions of a
    prompt, prompts with the same system turn) run those tokens through the model once
    (``shiq_train.prefix_tree``): the same losses and parameters up to float rounding; a micro-batch whose
    trie would cost more than its rows (they share too little for the trie's dense attention) runs as rows.
    Needs ``padded`` or ``groups`` data from a ``BufferSampler``, tensor and pipeline parallel size 1, no
    dropout and megatron's local layers (:func:`shiq_train.prefix_tree.check_model`).
    ``loss_average``: what a step of several micro-batches (or data-parallel ranks) minimises. ``step``
    (default): the mean over all the step's loss terms (action positions, pairs, groups or trajectories,
    SHIQ_MATH §3), each micro-batch weighing by its number of terms (megatron's
    ``calculate_per_token_loss``); ``micro_batch``: the mean of the micro-batches' means, each weighing the
    same (megatron's default; e.g. one scenario per micro-batch, every scenario counting alike; a micro-batch
    with no term, groups without a pair of different rewards, counts as a loss of 0). The same with one
    micro-batch per step on one rank."""

    steps: int = 100
    save_every: int = 0  # 0: save only at the end
    log_every: int = 1
    reference: str = "precomputed"
    trainable_last_layers: int = -1
    tensorboard: bool = True
    progress: bool = True
    eval_every: int = 0  # 0: never
    cache_frozen_prefix: bool = False
    share_prefixes: bool = False
    loss_average: str = "step"
    save_on_sigterm: bool = True

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"train.steps must be >= 1, got {self.steps}")
        if self.save_every < 0:
            raise ValueError(f"train.save_every must be >= 0 (0: only at the end), got {self.save_every}")
        if self.log_every < 1:
            raise ValueError(f"train.log_every must be >= 1 (the last step is always logged), got {self.log_every}")
        if self.eval_every < 0:
            raise ValueError(f"train.eval_every must be >= 0 (0: never), got {self.eval_every}")
        if self.reference not in REFERENCES:
            raise ValueError(f"train.reference must be one of {REFERENCES}, got {self.reference!r}")
        if self.loss_average not in LOSS_AVERAGES:
            raise ValueError(f"train.loss_average must be one of {LOSS_AVERAGES}, got {self.loss_average!r}")
        for name in ("cache_frozen_prefix", "share_prefixes", "save_on_sigterm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"train.{name} must be true or false, got {getattr(self, name)!r}")
        k = self.trainable_last_layers
        if not (isinstance(k, int) and not isinstance(k, bool) and (k == -1 or k >= 1)):
            raise ValueError(
                f"train.trainable_last_layers must be -1 (train every parameter) or an integer >= 1 (the last N "
                f"layers and the final norm), got {k!r}" + (": 0 would train nothing" if k == 0 else "")
            )
        if self.cache_frozen_prefix and self.trainable_last_layers < 0:
            raise ValueError(
                "train.cache_frozen_prefix=true needs a frozen prefix: train.trainable_last_layers >= 1 "
                f"(got {self.trainable_last_layers})"
            )


def freeze_all_but_last_layers(model, n: int) -> int:
    """Keep ``requires_grad`` only on the last ``n`` decoder layers and the final norm; returns the
    number of trainable parameters on this rank (``model``: one model or this rank's list of chunks; layers
    are counted by megatron's global layer numbers). ``n = -1`` leaves everything trainable; ``n = 0`` freezes
    every parameter (Q♯'s value model then trains only its head)."""
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= -1):
        raise ValueError(f"trainable_last_layers must be -1 (every parameter) or an integer >= 0, got {n!r}")
    inners = [unwrap(c) for c in model_chunks(model)]
    if n > inners[0].config.num_layers:  # it would train every layer but not the embeddings: not what -1 means
        raise ValueError(
            f"train.trainable_last_layers={n} is more than the model's {inners[0].config.num_layers} layers "
            "(-1 trains every parameter)"
        )
    if n >= 0:
        for inner in inners:
            total_layers = inner.config.num_layers
            for name, p in inner.named_parameters():
                keep = False
                if name.startswith("decoder.layers."):
                    local = int(name.split(".")[2])
                    keep = inner.decoder.layers[local].layer_number > total_layers - n
                elif name.startswith("decoder.final_layernorm"):
                    keep = n > 0
                p.requires_grad_(keep)
    return sum(p.numel() for inner in inners for p in inner.parameters() if p.requires_grad)


def frozen_copy(model, model_cfg):
    """A second model of the same config and layout holding ``model``'s current weights, with no
    gradients: the online reference (megatron models cannot be deep-copied: they hold process groups).
    A list of chunks (virtual pipeline stages) gives a list of chunks."""
    if isinstance(model, list):
        refs = build_model_chunks(model_cfg)
        for ref, chunk in zip(refs, model, strict=True):
            ref.load_state_dict(unwrap(chunk).state_dict())
            ref.requires_grad_(False).eval()
        return refs
    ref = build_model(model_cfg)
    ref.load_state_dict(unwrap(model).state_dict())
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


def _capture_reference(ref_model, micro_batches):
    """Fill ``ref_chosen_logits`` / ``ref_logz`` of each micro-batch from the frozen reference
    (on the last pipeline stage, where the loss reads them)."""

    def capture(st, mb):
        mb["ref_chosen_logits"], mb["ref_logz"] = st.chosen_logits.detach(), st.logz.detach()
        return st.logz.sum() * 0.0, {}

    with torch.no_grad():
        forward_backward(ref_model, micro_batches, capture, forward_only=True)


def add_prefix_trees(micro_batches: list[dict], cost_ratio: float | None = None) -> list[dict]:
    """Put each micro-batch's :func:`shiq_train.prefix_tree.build` under ``prefix_tree`` (in place; None where,
    by ``cost_ratio``, the trie would cost more than the rows); returns them. Needs the ``lengths`` ``[B]`` a
    ``BufferSampler`` gives in ``padded`` and ``groups`` modes."""
    for mb in micro_batches:
        if mb.get("segment_ids") is not None or "lengths" not in mb:
            raise ValueError(
                "train.share_prefixes=true needs one trajectory per row with its length (data.mode=padded or "
                "groups from a replay buffer), not packed rows"
            )
        mb["prefix_tree"] = prefix_tree.build(mb["tokens"], mb["lengths"], cost_ratio=cost_ratio)
    return micro_batches


def _buffer_of(data):
    """The replay buffer a data source reads (a ``BufferSampler``'s, possibly wrapped in ``.source``), or None."""
    while data is not None and not hasattr(data, "buffer"):
        data = getattr(data, "source", None)
    return None if data is None else data.buffer


class Trainer:
    """``prefix_cache``: a :class:`shiq_train.prefix_cache.PrefixCache` of the buffer the data source
    reads, built by the caller (one cache can serve several trainers of models with the same frozen
    prefix); without it, ``cfg.cache_frozen_prefix`` builds one in :meth:`fit`.

    With ``opt_cfg.distributed`` the trainer wraps ``model`` in megatron's DistributedDataParallel
    (``self.model``; ``model`` stays reachable as its ``.module``) and steps megatron's distributed
    optimizer (``shiq_train.dist_optim``).

    With virtual pipeline stages ``model`` (and ``ref_model``) is the list of this rank's chunks
    (``shiq_train.model.build_model_chunks``); ``self.model`` is then a list too (of DDP wrappers with
    ``opt_cfg.distributed``), and so is the model the ``evaluate`` hook of :meth:`fit` receives
    (``shiq_train.checkpoint.gather_full_parameters`` takes either)."""

    def __init__(
        self,
        model,
        loss_cfg: LossConfig,
        opt_cfg: OptimizerConfig,
        cfg: TrainConfig,
        out_dir,
        ref_model=None,
        run_meta: dict | None = None,
        logging_cfg: LoggingConfig | None = None,
        prefix_cache: PrefixCache | None = None,
    ):
        if cfg.reference == "online" and ref_model is None:
            raise ValueError("train.reference=online needs a reference model")
        self.model, self.ref_model, self.cfg = model, ref_model, cfg
        self.prefix_cache = prefix_cache
        self.loss_cfg, self.opt_cfg = loss_cfg, opt_cfg
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.run_meta = run_meta or {}
        self.logging_cfg = logging_cfg or LoggingConfig()
        self.trainable = freeze_all_but_last_layers(model, cfg.trainable_last_layers)
        if ref_model is not None:
            for chunk in model_chunks(ref_model):
                chunk.requires_grad_(False)
        for chunk in model_chunks(model):  # read by forward_backward and, built next, megatron's DDP
            unwrap(chunk).config.calculate_per_token_loss = cfg.loss_average == "step"
        if opt_cfg.distributed:  # self.model becomes megatron's DDP wrapper (over the parameters trainable now)
            self.model, self.optimizer, self.scheduler = build_distributed(model, opt_cfg)
        else:
            self.optimizer, self.scheduler = build_optimizer(model, opt_cfg)
        if prefix_cache is not None:
            self._check_cache(prefix_cache)
        self._cost_ratio = None
        if cfg.share_prefixes:
            inners = [unwrap(c) for c in model_chunks(model)]
            if len(inners) > 1:
                raise ValueError("train.share_prefixes=true needs tensor and pipeline parallel size 1")
            prefix_tree.check_model(inners[0])
            self._cost_ratio = prefix_tree.cost_ratio(inners[0].config)
        self.loss_fn = objective_loss_fn(loss_cfg)

    def _check_cache(self, cache: PrefixCache) -> None:
        cache.check_model(self.model, self.cfg.trainable_last_layers)
        if self.cfg.reference == "online":  # the reference starts from the same cached states
            cache.check_model(self.ref_model, self.cfg.trainable_last_layers)

    @staticmethod
    def _suffix(model, cache: PrefixCache | None):
        """Within the block ``model`` runs only the layers after ``cache``'s prefix (all of them without one)."""
        if cache is None:
            return contextlib.nullcontext()
        return suffix_only(model, cache.n_frozen)

    def fit(
        self,
        data,
        evaluate: Callable[[int, object], dict | None] | None = None,
        on_start: Callable[[int], None] | None = None,
    ) -> list[dict]:
        """Train until ``cfg.steps``, resuming from the newest checkpoint in ``out_dir`` if any.

        ``evaluate(step, model)`` (optional) runs on every rank after the optimizer step of each
        multiple of ``cfg.eval_every`` and of the final step, once that step's checkpoint is written
        (an evaluated step always writes one). It runs inside ``torch.random.fork_rng`` with
        megatron's RNG tracker states and the model's train/eval mode restored afterwards, so its
        random draws never change training. A returned dict is logged on that step's line of
        ``metrics.jsonl`` as ``eval/<key>`` (and in the returned metrics). Steps at or before a
        resumed checkpoint are not evaluated again; a run killed
        while evaluating resumes from that step's checkpoint, which keeps the step's line of training metrics (the
        resume writes it, without the ``eval/`` keys).

        ``on_start(step)`` (optional) runs on every rank once the starting step is known (0, or the step of
        the checkpoint just loaded) and before anything is written to ``out_dir``: a start that fails
        earlier (an unreadable checkpoint, a model that does not fit it) leaves the run folder as it was.

        A run already at or past ``cfg.steps`` trains nothing and writes nothing (its metrics.jsonl, TensorBoard
        and checkpoints stay as they are) unless its log needs the repair a resume makes (:func:`_log_to_repair`).

        Returns the metrics of the steps run in this call (every rank gets the same numbers).
        """
        from megatron.core import parallel_state as ps  # heavy: megatron

        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        dp = ps.get_data_parallel_world_size()
        start, user = 0, None
        check_latest(self.ckpt_dir)
        if latest_step_dir(self.ckpt_dir) is not None:
            start, user = load_checkpoint(self.ckpt_dir, self.model, self.optimizer, self.scheduler)
            if not isinstance(user, dict) or "data" not in user:
                raise ValueError(
                    f"{latest_step_dir(self.ckpt_dir)}: its rank file holds no data position (user_state.data): the "
                    "checkpoint is damaged"
                )
            apply_optimizer_config(self.scheduler, self.opt_cfg)  # a change accepted on resume takes effect
            try:
                data.load_state_dict(user["data"])
            except ValueError as e:  # (settings a +resume.force let through: the sampler names what differs)
                raise ValueError(
                    f"{latest_step_dir(self.ckpt_dir)}: its data position cannot be resumed: {e}"
                ) from None
            if self.prefix_cache is not None:  # checked against the model given: its frozen layers are now loaded
                self._check_cache(self.prefix_cache)
        if rank0:  # a metrics.jsonl that cannot be resumed is refused before on_start writes the run folder
            _check_metrics_file(self.out_dir / "metrics.jsonl")
        if on_start is not None:
            on_start(start)
        if rank0:
            for path in remove_temporaries(self.ckpt_dir):  # of a save killed mid-write; none is under way now
                if path.name.startswith("step_"):
                    logger.warning(f"shiq-train: removed {path}, a checkpoint whose save was killed before its end")
        # (decided alike on every rank: a rank going on alone would wait for the others in sigterm_requests' last
        # agreement)
        if start >= self.cfg.steps and not _on_any_rank(
            rank0 and _log_to_repair(self.out_dir / "metrics.jsonl", start, user)
        ):
            return []  # nothing to train: the log is not rewritten, nor a TensorBoard file or W&B run added
        if rank0 and start:
            self._set_aside_later_steps(start)
        if self.prefix_cache is None and self.cfg.cache_frozen_prefix and start < self.cfg.steps:
            buffer = _buffer_of(data)
            if buffer is None:
                raise ValueError(
                    "train.cache_frozen_prefix=true needs a data source over a replay buffer (a BufferSampler)"
                )
            cache = PrefixCache.from_buffer(
                self.model,
                buffer,
                self.cfg.trainable_last_layers,
                progress=rank0 and self.cfg.progress,
            )
            self._check_cache(cache)
            self.prefix_cache = cache
        log = _MetricLog(
            self.out_dir, start, rank0, self.cfg.tensorboard, self.logging_cfg, self.run_meta.get("config")
        )
        saved_line = user.get("metrics") if isinstance(user, dict) else None
        if isinstance(saved_line, dict) and saved_line.get("step") == start and log.last_step < start:
            log.write(saved_line)  # killed between the checkpoint and its step's line (while evaluating it)
        history = []
        bar = tqdm(
            range(start, self.cfg.steps),
            initial=start,
            total=self.cfg.steps,
            desc=f"train {self.loss_cfg.name}",
            disable=not (rank0 and self.cfg.progress),
            dynamic_ncols=True,
        )

        def save(step: int, line: dict | None) -> None:
            save_checkpoint(
                self.ckpt_dir,
                step,
                self.model,
                self.optimizer,
                self.scheduler,
                user_state={"data": data.state_dict(), "metrics": line},
                meta={**self.run_meta, "loss": self.loss_cfg.__dict__},
            )

        try:
            with sigterm_requests(self.cfg.save_on_sigterm) as stop_requested:
                for step in bar:
                    t0 = time.perf_counter()
                    mbs = data.next_micro_batches()
                    if self.prefix_cache is not None:
                        self.prefix_cache.add_to(mbs)
                    if self.cfg.share_prefixes:
                        add_prefix_trees(mbs, self._cost_ratio)
                    if self.cfg.reference == "online":
                        with self._suffix(self.ref_model, self.prefix_cache):
                            _capture_reference(self.ref_model, mbs)
                    with self._suffix(self.model, self.prefix_cache):
                        metrics = train_step(
                            self.model, self.optimizer, self.scheduler, mbs, self.loss_fn, self.opt_cfg.clip_grad
                        )
                    # real tokens, not padding (a data source's micro-batch without lengths: every position)
                    tokens = sum(int(mb["lengths"].sum()) if "lengths" in mb else mb["tokens"].numel() for mb in mbs)
                    if dp > 1:  # every data-parallel rank's (their rows differ in length)
                        count = torch.tensor([tokens], dtype=torch.float64, device=device())
                        dist.all_reduce(count, group=ps.get_data_parallel_group())
                        tokens = int(count.item())
                    metrics["tokens"] = tokens
                    metrics["tokens_per_s"] = tokens / (time.perf_counter() - t0)
                    metrics["step"] = step + 1
                    history.append(metrics)
                    last = step + 1 == self.cfg.steps
                    evaluating = (
                        evaluate is not None
                        and self.cfg.eval_every > 0
                        and (last or (step + 1) % self.cfg.eval_every == 0)
                    )
                    logged = (step + 1) % self.cfg.log_every == 0 or last
                    # a non-finite loss or gradient norm has made the parameters NaN: its line is kept, nothing is saved
                    diverged = not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]))
                    if diverged or (logged and not evaluating):  # an evaluated step is logged once its evaluation is in
                        log.write(metrics)
                    if diverged:
                        raise RuntimeError(
                            f"training diverged at step {step + 1}: loss {metrics['loss']}, gradient norm "
                            f"{metrics['grad_norm']}; the step's line is kept in {self.out_dir / 'metrics.jsonl'} and its "
                            "parameters are not saved (the newest checkpoint, if any, is from before it)"
                        )
                    saving = last or evaluating or (self.cfg.save_every and (step + 1) % self.cfg.save_every == 0)
                    if saving:
                        # the step's line goes with it: a kill before the line is written (during the evaluation)
                        # has the resume write it, without the evaluation's keys
                        save(step + 1, dict(metrics) if logged else None)
                    if evaluating:
                        result = self._evaluate(evaluate, step + 1)
                        metrics.update({f"eval/{k}": v for k, v in (result or {}).items()})
                        if logged or result:
                            log.write(metrics)
                    if logged:
                        bar.set_postfix(loss=f"{metrics['loss']:.4g}", log_ratio=f"{metrics['log_ratio']:.3g}")
                    if stop_requested():  # a SIGTERM reached some rank: every rank saves this step, then stops
                        if not saving:
                            save(step + 1, dict(metrics) if logged else None)
                        raise SavedOnSigterm(step + 1, complete=last)
        except BaseException as e:
            log.close(failed=e)
            raise
        log.close()
        return history

    def _set_aside_later_steps(self, start: int) -> None:
        """Move the saved steps after the one resumed (``start``; ``checkpoints/latest`` wound back by hand) and
        their lines of ``metrics.jsonl`` into ``checkpoints/superseded_N`` (:func:`set_aside_later_steps`), saying
        so: the run's checkpoints and log then hold the history it continues alone."""
        path = self.out_dir / "metrics.jsonl"
        past = [ln for ln in _metric_lines(path) if json.loads(ln)["step"] > start] if path.is_file() else []
        moved = set_aside_later_steps(self.ckpt_dir, "".join(ln + "\n" for ln in past))
        if moved:
            logger.warning(
                f"shiq-train: {self.ckpt_dir} holds {', '.join(p.name for p in moved)} after step {start}, the one it "
                f"resumes from (latest): moved {'it' if len(moved) == 1 else 'them'}, with metrics.jsonl's lines past "
                f"step {start}, to {moved[0].parent}, out of the history it continues (delete it when it is not needed)"
            )

    def validation_loss(self, micro_batches: list[dict], prefix_cache: PrefixCache | None = None) -> float:
        """The training loss of the current model on ``micro_batches`` (e.g. one pass over a held-out
        buffer), without gradients or an update, as a training step of those micro-batches would report it
        (``loss_average``: the mean over all their loss terms, or of the micro-batches' means), in eval mode (no
        dropout; each module's mode is restored after). With ``reference="online"`` the reference statistics are
        filled in first.
        ``prefix_cache``: a :class:`PrefixCache` of the buffer the micro-batches come from (the held-out
        one, not the training buffer's), so that only the layers after its frozen prefix run (the same
        loss up to float rounding)."""
        if prefix_cache is not None:
            self._check_cache(prefix_cache)
            prefix_cache.add_to(micro_batches)
        if self.cfg.share_prefixes:
            add_prefix_trees(micro_batches, self._cost_ratio)
        if self.cfg.reference == "online":
            with self._suffix(self.ref_model, prefix_cache):
                _capture_reference(self.ref_model, micro_batches)
        with _modes_kept(self.model):  # in eval mode: no dropout, so the same model gives the same validation loss
            for chunk in model_chunks(self.model):
                chunk.eval()
            with torch.no_grad(), self._suffix(self.model, prefix_cache):
                loss, _ = forward_backward(self.model, micro_batches, self.loss_fn, forward_only=True)
        return float(loss)

    def _evaluate(self, evaluate, step: int) -> dict | None:
        """``evaluate(step, model)`` with every random state (torch's CPU and CUDA generators,
        megatron's tracker) and the model's train/eval mode as they were before it."""
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        tracker = get_cuda_rng_tracker()
        tracker_states = {k: v.clone() for k, v in tracker.get_states().items()}
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        try:
            with _modes_kept(self.model), torch.random.fork_rng(devices=devices):
                result = evaluate(step, self.model)
        finally:
            tracker.set_states(tracker_states)
        if result is not None and not isinstance(result, dict):
            raise TypeError(
                f"the evaluate hook returned {type(result).__name__} at step {step}: expected a dict or None"
            )
        return result


class SavedOnSigterm(Terminated):
    """The run stopped on SIGTERM once the step it was on was saved (``TrainConfig.save_on_sigterm``)."""

    def __init__(self, step: int, complete: bool = False):
        super().__init__(step)
        self.step = step  # the step saved, where the same command resumes
        self.complete = complete  # the step was the run's last: nothing is left to resume


# a SIGTERM this soon after the first is the same stop (Slurm signals every process of a job step, and torchrun
# passes its own on to its workers: two, milliseconds apart); a later one ends the process at once
SIGTERM_SAME_STOP_S = 5.0


# when the SIGTERM that stops a run came (:func:`sigterm_stops_run`): one within SIGTERM_SAME_STOP_S of it is the same stop
_RUN_STOP: list[float] = []


def _terminate_run(signum, frame) -> None:
    """SIGTERM's handler within :func:`sigterm_stops_run`: raise Terminated, once a stop."""
    if _RUN_STOP:
        if time.monotonic() - _RUN_STOP[0] < SIGTERM_SAME_STOP_S:
            return  # the same stop passed on again (Slurm's and torchrun's): the cleanup under way goes on
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a stop asked for again, later: at once
        signal.raise_signal(signal.SIGTERM)
    _RUN_STOP.append(time.monotonic())
    raise Terminated()


@contextlib.contextmanager
def sigterm_stops_run() -> Iterator[None]:
    """Within the block (a command that holds a run folder: its lock, a folder it made), SIGTERM raises
    :class:`~shiq_data.cli_common.Terminated` instead of ending the process at once, so that the lock is
    released and a half-made run folder removed on the way out (SIGTERM's own action left both behind when it
    came while the run started). While steps run, :func:`sigterm_requests` takes SIGTERM over. A SIGTERM within
    ``SIGTERM_SAME_STOP_S`` seconds of the one that stops the run (Slurm's and torchrun's, two for one stop) is
    ignored, so that it does not cut the cleanup short; a later one ends the process at once. Off the main
    thread, or where SIGTERM is handled already, a no-op (:func:`~shiq_data.cli_common.on_sigterm`)."""
    _RUN_STOP.clear()
    try:
        with on_sigterm(_terminate_run):
            yield
    finally:
        _RUN_STOP.clear()


@contextlib.contextmanager
def sigterm_requests(enabled: bool) -> Iterator[Callable[[], bool]]:
    """While training (``TrainConfig.save_on_sigterm``): a first SIGTERM only records a request; a second within
    ``SIGTERM_SAME_STOP_S`` seconds is the same stop (Slurm's and torchrun's), one after that ends the process
    at once (SIGTERM's default action); the yielded ``requested()`` tells
    every rank alike whether any rank got one (a maximum over the ranks: a one-number all-reduce each call when
    there are several, so the ranks save the same step). Off the main thread, or where the caller handles
    SIGTERM already, SIGTERM keeps its action. A request that no ``requested()`` saw (it came after the last)
    raises :class:`~shiq_data.cli_common.Terminated` at the block's end, on every rank (one more all-reduce
    there): a caller that trains several runs stops too. Not ``enabled``: SIGTERM keeps its action and
    ``requested()`` is False, with no all-reduce. Within :func:`sigterm_stops_run` the block takes SIGTERM over
    and gives it back at its end, with the time of a request it recorded (the same stop's second SIGTERM, once
    the block has ended, does not cut the run's end short)."""
    first: list[float] = []  # when the first SIGTERM came: a list, appended to without a lock (a handler that
    # takes one, as threading.Event.set does, waits for it forever when a second SIGTERM interrupts it there)
    seen = threading.Event()
    previous = None
    if enabled and threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, _terminate_run):

            def record(signum, frame):
                if not first:
                    first.append(time.monotonic())
                elif time.monotonic() - first[0] >= SIGTERM_SAME_STOP_S:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.raise_signal(signal.SIGTERM)

            previous = signal.signal(signal.SIGTERM, record)

    def requested() -> bool:
        if not enabled:
            return False
        flag = _on_any_rank(bool(first))
        if flag:
            seen.set()
        return flag

    failed = False
    try:
        yield requested
    except BaseException:
        failed = True
        raise
    finally:
        if previous is not None:
            if previous is _terminate_run and first and not _RUN_STOP:
                _RUN_STOP.append(first[0])  # (the stop's repeat is ignored, as it was here)
            signal.signal(signal.SIGTERM, previous)
        # one more agreement (every rank is here alike: ``seen`` is the same on all): a request that reached one
        # rank after the last ``requested()`` stops every rank, not that one alone
        if not failed and not seen.is_set() and requested():
            raise Terminated()


@contextlib.contextmanager
def _modes_kept(model):
    """Each module of ``model`` (one model, or this rank's chunks) back in its train/eval mode after the block."""
    modes = [(m, m.training) for chunk in model_chunks(model) for m in chunk.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _check_metrics_file(path: Path) -> None:
    """Refuse (``ValueError`` naming it) a run's ``metrics.jsonl`` that is not a file of metrics records."""
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} is not a file: remove it, or train in a new out folder")
    if path.exists():
        _metric_lines(path)


def _on_any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (a one-number all-reduce when there are several), so every rank takes
    the same path."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    count = torch.tensor([int(flag)], dtype=torch.int32, device=device())
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return bool(count.item())


def _log_to_repair(path: Path, start: int, user) -> bool:
    """Whether resuming at step ``start`` changes the run's ``metrics.jsonl`` ``path`` (:class:`_MetricLog`):
    lines past ``start`` or a last line cut short to drop, or the line of the checkpoint's step to write, which
    its user state ``user`` holds and the log lacks (a kill between the checkpoint and the line)."""
    kept = [ln for ln in _metric_lines(path) if json.loads(ln)["step"] <= start] if path.is_file() else []
    if path.is_file() and path.read_text(errors="replace") != "".join(ln + "\n" for ln in kept):
        return True
    line = user.get("metrics") if isinstance(user, dict) else None
    last = max((json.loads(ln)["step"] for ln in kept), default=0)
    return isinstance(line, dict) and line.get("step") == start and last < start


def _metric_lines(path: Path) -> list[str]:
    """The non-empty lines of a run's ``metrics.jsonl``, each checked to be a JSON object with an integer
    ``step``: ``ValueError`` naming the file and line otherwise (the file is cut back only after that). A last
    line cut short (a kill while it was written) is dropped: the checkpoint, not the log, is what resumes."""
    numbered = [(n, ln) for n, ln in enumerate(path.read_text(errors="replace").split("\n"), 1) if ln.strip()]
    lines = []
    for n, line in numbered:
        try:
            record = json_loads(line)  # (a key given twice is no record: which 'step' it means is a guess)
        except (ValueError, RecursionError):  # (JSONDecodeError, a key twice; a number of 4,301 digits; nesting)
            if n == numbered[-1][0] and line.lstrip().startswith("{") and not line.rstrip().endswith("}"):
                continue
            record = None
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(
                f"{path}: line {n}: not a metrics record (a JSON object with an integer 'step'): {line[:60]!r}; "
                "remove the line, or train in a new out folder"
            )
        lines.append(line)
    return lines


WANDB_RUN_ID = "wandb_run.json"  # in the run folder: the W&B run a resume logs to, and the folder it logged from


def _wandb_run_id(out_dir: Path) -> str | None:
    """The W&B run id a run folder recorded (``WANDB_RUN_ID``), or None: none recorded, one recorded by the
    folder this was copied or moved from (its resume would log into that folder's W&B run), or not an id (a new
    W&B run is started, said in one line)."""
    path = out_dir / WANDB_RUN_ID
    if not path.is_file():
        return None
    try:
        record = json_loads(path.read_text(errors="replace"))  # (a key given twice: not a record)
    except (ValueError, RecursionError):
        record = None
    run_id = record.get("id") if isinstance(record, dict) else None
    if not isinstance(run_id, str) or re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id) is None:
        logger.warning(f"{path}: not a W&B run record: the resume starts a new W&B run")
        return None
    if record.get("folder") != str(out_dir.resolve()):
        logger.info(f"{path}: written in {record.get('folder')!r}, not here: the resume starts a new W&B run")
        return None
    return run_id


class _MetricLog:
    """``metrics.jsonl`` (one JSON object a logged step), TensorBoard scalars and, with ``logging.wandb``,
    Weights & Biases (offline by default), on rank 0 only.

    On resume, lines past the resumed step are dropped so the file reads as one uninterrupted run.
    """

    def __init__(
        self,
        out_dir: Path,
        start_step: int,
        active: bool,
        tensorboard: bool,
        logging_cfg: LoggingConfig | None = None,
        config: dict | None = None,
    ):
        self.active = active
        self.tb = None
        self.wandb = None
        self.last_step = 0  # the last step with a line in the file (after the lines past the resumed step go)
        if not active:
            self.last_step = start_step  # (other ranks write nothing)
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        if self.path.exists():
            kept = [(ln, step) for ln in _metric_lines(self.path) if (step := json.loads(ln)["step"]) <= start_step]
            atomic_write_text(self.path, "".join(ln + "\n" for ln, _ in kept))
            self.last_step = max([step for _, step in kept], default=0)
        self.file = self.path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # heavy: tensorboard, only when logging to it

            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
        if logging_cfg is not None and logging_cfg.wandb:
            wandb = import_wandb()
            earlier = _wandb_run_id(out_dir) if start_step else None  # a resume continues the run's W&B run
            self.wandb = wandb.init(
                project=logging_cfg.wandb_project,
                name=out_dir.name,
                dir=str(out_dir),
                mode=logging_cfg.wandb_mode,
                config=config or {},
                **({"id": earlier, "resume": "allow"} if earlier else {}),
            )
            if getattr(self.wandb, "id", None) != earlier:
                record = {"id": self.wandb.id, "folder": str(out_dir.resolve())}
                atomic_write_text(out_dir / WANDB_RUN_ID, json.dumps(record) + "\n")

    def write(self, metrics: dict):
        if not self.active:
            return
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k if k.startswith("eval/") else f"train/{k}", v, metrics["step"])
        if self.wandb is not None:
            scalars = {k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}
            self.wandb.log(
                {k if k.startswith("eval/") else f"train/{k}": v for k, v in scalars.items()}, step=metrics["step"]
            )

    def close(self, failed: BaseException | bool = False):
        """``failed``: what the run stopped on (a W&B run is then marked failed, not finished: exit code 1; a stop
        on SIGTERM gets the process's status, 143, and one saved for the same command to resume it is marked
        preempting, W&B's record of a run to be resumed; one whose step saved was the run's last finishes as a
        whole run: nothing is left to resume)."""
        if isinstance(failed, SavedOnSigterm) and failed.complete:
            failed = False
        if self.active:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                if isinstance(failed, SavedOnSigterm):
                    self.wandb.mark_preempting()
                code = EXIT_TERMINATED if isinstance(failed, Terminated) else 1
                self.wandb.finish(**({"exit_code": code} if failed else {}))
