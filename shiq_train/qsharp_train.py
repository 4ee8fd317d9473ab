"""Training Q♯'s value model from a replay buffer of reference samples (SHIQ_MATH §8).

:func:`train_value_model` builds a :class:`shiq_train.qsharp_value.MegatronValueModel` initialised
from the reference, runs AdamW steps of :func:`shiq_train.qsharp_value.distributional_value_loss` on
rows drawn by a seeded ``BufferSampler`` and saves the result with
:func:`shiq_train.qsharp_value.save_value_model` (load it for decoding with
:func:`shiq_train.qsharp_value.load_value_model`). :func:`value_config_from_run` reads the settings of a
``shiq-train loss=qsharp_value ...`` run (the Hydra config as a dict) into a :class:`ValueTrainConfig`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from shiq_data.buffer import open_buffer
from shiq_data.io import atomic_write_text, one_line
from shiq_data.sampler import BufferSampler
from shiq_train import parallel, prefix_tree
from shiq_train.checkpoint import read_rank_file, save_hashed
from shiq_train.hf_convert import import_llama, model_config_from_llama
from shiq_train.model import build_model, unwrap
from shiq_train.prefix_cache import PrefixCache, suffix_only
from shiq_train.qsharp_value import (
    CONFIG_FILE,
    MegatronValueModel,
    atom_support,
    qsharp_value_loss,
    returns_to_go,
    save_value_model,
)
from shiq_train.train_step import OptimizerConfig, decay_groups
from shiq_train.trainer import SavedOnSigterm, freeze_all_but_last_layers, sigterm_requests

logger = logging.getLogger(__name__)

# keys of a run's loss section that configure the value model (configs/loss/qsharp_value.yaml)
VALUE_LOSS_KEYS = ("name", "num_atoms", "v_min", "v_max", "gamma", "head_lr")


@dataclass
class ValueTrainConfig:
    """Training a :class:`MegatronValueModel` from a replay buffer (:func:`train_value_model`).

    ``v_min`` / ``v_max`` default to the smallest / largest return-to-go in the buffer. ``head_lr``
    defaults to ``lr``. ``trainable_last_layers``: -1 trains the whole trunk, ``N >= 0`` only its last
    ``N`` layers and final norm (the head always trains). Each step averages the loss of
    ``micro_batches_per_step`` micro-batches. AdamW (``adam_*``) with the learning-rate schedule of
    ``shiq_train.train_step.OptimizerConfig`` (linear warm-up over ``warmup_steps``, then cosine decay
    to ``min_lr / lr`` of each group's rate over ``decay_steps``; 0: constant). ``data_seed`` shuffles
    the buffer (default ``seed``). ``cache_frozen_prefix``: with ``trainable_last_layers >= 0``, the
    trunk's frozen prefix runs once per buffer row (``shiq_train.prefix_cache``), each step only the rest.
    ``share_prefixes``: the leading tokens a micro-batch's rows share run once (``shiq_train.prefix_tree``,
    which refuses dropout; a micro-batch whose trie would cost more than its rows runs as rows); the same
    steps up to float rounding.
    ``save_every``: 0 = never; ``N >= 1`` writes the run's state (``RESUME_FILE`` in the output folder: the
    trained parameters, the optimizer's and the sampler's state, the steps' metrics) after every ``N``-th step
    but the last, which the same call resumes from. ``save_on_sigterm``: SIGTERM lets the step under way finish,
    writes that state and raises ``shiq_train.trainer.SavedOnSigterm`` (``false``: SIGTERM ends the process at
    once). Neither changes the value model trained.
    """

    steps: int = 100
    rows_per_micro_batch: int = 8
    lr: float = 1e-5
    head_lr: float | None = None
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    num_atoms: int = 11
    v_min: float | None = None
    v_max: float | None = None
    gamma: float = 1.0
    trainable_last_layers: int = -1
    seed: int = 0
    max_tokens_per_row: int | None = None
    pad_id: int = 0
    progress: bool = True
    micro_batches_per_step: int = 1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay_steps: int = 0
    data_seed: int | None = None
    cache_frozen_prefix: bool = False
    share_prefixes: bool = False
    save_every: int = 0
    save_on_sigterm: bool = True

    def __post_init__(self):
        if self.steps < 1 or self.rows_per_micro_batch < 1:
            raise ValueError(
                f"value.steps ({self.steps}) and value.rows_per_micro_batch ({self.rows_per_micro_batch}) must be >= 1"
            )
        if not (self.lr > 0 and (self.head_lr is None or self.head_lr > 0)):
            raise ValueError(f"value.lr ({self.lr}) and value.head_lr ({self.head_lr}) must be > 0")
        if self.gamma != 1:  # β log E[exp(Σ_k γ^k r_k / β)] is not the soft optimum's value when γ < 1
            raise ValueError(
                f"value.gamma must be 1, got {self.gamma}: Q♯ guides the reference by "
                "E[exp(Z/β)] of the undiscounted return Z, the optimum of the KL-regularised objective "
                "(SHIQ_MATH §8); the return of a discounted sum gives another policy"
            )
        if not (isinstance(self.num_atoms, int) and self.num_atoms >= 2):
            raise ValueError(f"value.num_atoms must be an integer >= 2, got {self.num_atoms!r}")
        if self.micro_batches_per_step < 1:
            raise ValueError(f"value.micro_batches_per_step must be >= 1, got {self.micro_batches_per_step}")
        given = [v for v in (self.v_min, self.v_max) if v is not None]
        if not all(math.isfinite(v) for v in given) or (len(given) == 2 and not self.v_min < self.v_max):
            raise ValueError(f"value.v_min ({self.v_min}) and value.v_max ({self.v_max}) must be finite, v_min < v_max")
        self.schedule()  # checks min_lr, warmup_steps, decay_steps and the AdamW settings
        if not (isinstance(self.save_every, int) and not isinstance(self.save_every, bool) and self.save_every >= 0):
            raise ValueError(f"value.save_every must be an integer >= 0 (0: never), got {self.save_every!r}")
        for name in ("cache_frozen_prefix", "share_prefixes", "save_on_sigterm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"value.{name} must be true or false, got {getattr(self, name)!r}")
        k = self.trainable_last_layers
        if not (isinstance(k, int) and not isinstance(k, bool) and k >= -1):
            raise ValueError(
                f"value.trainable_last_layers must be -1 (the whole trunk) or an integer >= 0 (the last N layers; "
                f"0: the head only), got {k!r}"
            )
        if self.cache_frozen_prefix and self.trainable_last_layers < 0:
            raise ValueError(
                "value.cache_frozen_prefix needs a frozen prefix: trainable_last_layers >= 0 "
                f"(got {self.trainable_last_layers})"
            )

    def schedule(self) -> OptimizerConfig:
        """The learning-rate schedule (``OptimizerConfig.lr_at``) of the trunk's group; building it checks every
        AdamW setting as a policy run's ``OptimizerConfig`` does (``clip_grad >= 0``, betas in ``[0, 1)``, ...)."""
        return OptimizerConfig(
            lr=self.lr,
            min_lr=self.min_lr,
            weight_decay=self.weight_decay,
            adam_beta1=self.adam_beta1,
            adam_beta2=self.adam_beta2,
            adam_eps=self.adam_eps,
            clip_grad=self.clip_grad,
            warmup_steps=self.warmup_steps,
            decay_steps=self.decay_steps,
        )


def value_config_from_run(cfg: dict, max_tokens_per_row: int | None = None) -> ValueTrainConfig:
    """The :class:`ValueTrainConfig` of a ``shiq-train loss=qsharp_value`` run (``cfg``: its resolved
    config as a dict). ``loss``: the atoms (``num_atoms``, ``v_min``, ``v_max``), ``gamma`` and
    ``head_lr``; ``train``: ``steps``, ``trainable_last_layers``, ``progress``, ``cache_frozen_prefix``,
    ``share_prefixes``; ``optimizer``: ``lr``,
    ``min_lr``, ``weight_decay``, ``adam_*``, ``clip_grad``, ``warmup_steps``, ``decay_steps``;
    ``data``: ``rows_per_micro_batch``, ``micro_batches_per_step``, ``seed``; ``seed``. Every row must
    fit in ``max_tokens_per_row`` tokens (the model's sequence length)."""
    loss = cfg["loss"]
    unknown = sorted(set(loss) - set(VALUE_LOSS_KEYS))
    if unknown:
        raise ValueError(
            f"unknown loss option(s) {unknown} for loss={loss.get('name')}; known: {list(VALUE_LOSS_KEYS)}"
        )
    opt, train, data = cfg["optimizer"], cfg["train"], cfg["data"]
    if opt.get("distributed"):
        raise ValueError(
            "optimizer.distributed=true: loss=qsharp_value trains in one process with its own optimizer; "
            "leave optimizer.distributed=false"
        )
    if train.get("loss_average", "step") != "step":
        raise ValueError(
            f"train.loss_average={train['loss_average']}: loss=qsharp_value averages its loss over every action of "
            "a step (train.loss_average=step)"
        )
    try:
        return _value_config(cfg, loss, opt, train, data, max_tokens_per_row)
    except ValueError as e:  # named as the run's keys, not ValueTrainConfig's (value.lr is optimizer.lr)
        raise ValueError(run_key_names(str(e))) from None


def run_key_names(message: str) -> str:
    """``message`` with ValueTrainConfig's ``value.<field>`` named as a shiq-train run's key (``optimizer.lr``)."""
    return re.sub(r"value\.(\w+)", lambda m: RUN_KEYS.get(m[1], m[0]), message)


# ValueTrainConfig's fields as a shiq-train run's configuration names them
RUN_KEYS = {name: f"loss.{name}" for name in ("num_atoms", "v_min", "v_max", "head_lr", "gamma")}
RUN_KEYS |= {name: f"optimizer.{name}" for name in ("lr", "min_lr", "warmup_steps", "decay_steps", "weight_decay")}
RUN_KEYS |= {name: f"train.{name}" for name in ("steps", "trainable_last_layers", "cache_frozen_prefix")}
RUN_KEYS |= {"share_prefixes": "train.share_prefixes", "rows_per_micro_batch": "data.rows_per_micro_batch"}
RUN_KEYS |= {"micro_batches_per_step": "data.micro_batches_per_step", "save_every": "train.save_every"}
RUN_KEYS |= {"save_on_sigterm": "train.save_on_sigterm", "seed": "seed", "data_seed": "data.seed"}
RUN_KEYS |= {name: f"optimizer.{name}" for name in ("adam_beta1", "adam_beta2", "adam_eps", "clip_grad")}


def _setting(section: dict, prefix: str, key: str, kind, default=None, optional: bool = False):
    """``section[key]`` (``default`` when absent) as ``kind``, or a ``ValueError`` naming the run's key
    (``loss.num_atoms=2.5: expected an integer``): int is an integer (not true/false), float any number,
    bool true or false; ``optional``: null too. (``int(2.5)`` would train a model of 2 atoms, ``float([1])``
    end in a traceback.)"""
    value = section.get(key, default)
    if optional and value is None:
        return None
    fits = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
    }[kind]
    if not fits:
        kind_name = {int: "an integer", float: "a number", bool: "true or false"}[kind]
        raise ValueError(
            f"{prefix}{'.' if prefix else ''}{key}={value!r}: expected {kind_name}{' or null' if optional else ''}"
        )
    return kind(value)


def _value_config(cfg, loss, opt, train, data, max_tokens_per_row) -> ValueTrainConfig:
    seed = _setting(cfg, "", "seed", int)
    return ValueTrainConfig(
        steps=_setting(train, "train", "steps", int),
        rows_per_micro_batch=_setting(data, "data", "rows_per_micro_batch", int),
        micro_batches_per_step=_setting(data, "data", "micro_batches_per_step", int, 1),
        lr=_setting(opt, "optimizer", "lr", float),
        head_lr=_setting(loss, "loss", "head_lr", float, optional=True),
        weight_decay=_setting(opt, "optimizer", "weight_decay", float),
        clip_grad=_setting(opt, "optimizer", "clip_grad", float),
        adam_beta1=_setting(opt, "optimizer", "adam_beta1", float),
        adam_beta2=_setting(opt, "optimizer", "adam_beta2", float),
        adam_eps=_setting(opt, "optimizer", "adam_eps", float),
        min_lr=_setting(opt, "optimizer", "min_lr", float),
        warmup_steps=_setting(opt, "optimizer", "warmup_steps", int),
        decay_steps=_setting(opt, "optimizer", "decay_steps", int),
        num_atoms=_setting(loss, "loss", "num_atoms", int, 11),
        v_min=_setting(loss, "loss", "v_min", float, optional=True),
        v_max=_setting(loss, "loss", "v_max", float, optional=True),
        gamma=_setting(loss, "loss", "gamma", float, 1.0),
        trainable_last_layers=_setting(train, "train", "trainable_last_layers", int),
        seed=seed,
        data_seed=_setting(data, "data", "seed", int, seed),
        max_tokens_per_row=max_tokens_per_row,
        progress=_setting(train, "train", "progress", bool, True),
        cache_frozen_prefix=_setting(train, "train", "cache_frozen_prefix", bool, False),
        share_prefixes=_setting(train, "train", "share_prefixes", bool, False),
        save_every=_setting(train, "train", "save_every", int, 0),
        save_on_sigterm=_setting(train, "train", "save_on_sigterm", bool, True),
    )


def action_weights(micro_batches: list[dict]) -> list[float]:
    """Each micro-batch's share of the step's actions, ``n_i / Σ n`` (``1 / M`` each if none has an action):
    ``Σ_i w_i L_i`` of the micro-batches' mean value losses is the mean over every action of the step
    (SHIQ_MATH §8); one micro-batch weighs exactly 1."""
    actions = [int(mb["action_mask"].sum()) for mb in micro_batches]
    total = sum(actions)
    return [n / total if total else 1 / len(actions) for n in actions]


def value_optimizer(head: list, trunk: list, cfg: ValueTrainConfig) -> torch.optim.AdamW:
    """AdamW over the value head (at ``cfg.head_lr``, default ``cfg.lr``) and the trainable trunk (``cfg.lr``),
    with ``cfg.weight_decay`` on matrices only: norms and biases (1-D parameters) get none, as in a policy run's
    optimizer (:func:`shiq_train.train_step.decay_groups`)."""
    groups = [
        g
        for params, lr in ((head, cfg.head_lr or cfg.lr), (trunk, cfg.lr))
        for g in decay_groups(params, cfg.weight_decay, lr=lr)
        if g["params"]  # (a trunk with nothing trainable: no group)
    ]
    return torch.optim.AdamW(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, fused=True)


def buffer_return_range(sampler, gamma: float = 1.0) -> tuple[float, float]:
    """Smallest and largest return-to-go (SHIQ_MATH §8) over the action positions of one epoch of ``sampler``
    (a ``shiq_data.sampler.BufferSampler``; its stream position is restored afterwards); equal for a constant
    return."""
    state = sampler.state_dict()
    lo, hi = math.inf, -math.inf
    seen = 0
    while seen < len(sampler.buffer):
        for mb in sampler.next_micro_batches():
            m = mb["action_mask"]
            z = returns_to_go(mb["rewards"], m, gamma, mb.get("segment_ids"))[m]
            if z.numel():
                lo, hi = min(lo, float(z.min())), max(hi, float(z.max()))
            seen += mb["tokens"].shape[0]
    sampler.load_state_dict(state)
    if lo == math.inf:
        raise ValueError(f"buffer {sampler.buffer.path} has no action positions")
    return lo, hi


RESUME_FILE = "resume.pt"  # in a value run's output folder while it trains: what the same call resumes from
PROGRESS_FILE = "metrics.partial.jsonl"  # there too while it trains: a line a step, to follow the run (tail -f)
# there too while shiq-train trains into it: held (flock) by that run (shiq_train.cli.run_value); the value model's
# folder that replaces the run's at its end keeps the same file, so the lock holds until the run ends
LOCK_FILE = ".lock"
# settings that do not change the value model trained: free to change between a run and its resume
RESUME_FREE = ("progress", "save_every", "save_on_sigterm")


def resume_key(cfg: ValueTrainConfig, atoms: torch.Tensor, meta: dict | None, hf_config) -> str:
    """What a saved state must have been trained with to be resumed: the settings that shape the training
    (``cfg`` but ``RESUME_FREE``), the atoms, the trunk's Hugging Face config (it builds the model) and the
    reference's SHA-256 if ``meta`` records it, as JSON."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE}
    reference = (meta or {}).get("reference_sha256")
    trunk = json.loads(hf_config.to_json_string(use_diff=False))
    trunk.pop("_name_or_path", None)  # where it was read from, not what it builds
    return json.dumps(
        {"settings": settings, "atoms": [float(a) for a in atoms], "reference": reference, "trunk": trunk},
        sort_keys=True,
    )


def _trained(model) -> dict[str, torch.nn.Parameter]:
    """The parameters ``model`` trains (the head, the trunk's trainable layers), by name: taken outside
    ``suffix_only`` (which renumbers the decoder's layers while it narrows them), so a state saved inside it
    names them as the resume, which loads it outside it."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_resume_state(out: Path, step: int, key: str, params, opt, lr_schedule, sampler, history: list) -> None:
    """Write ``out/RESUME_FILE`` (its SHA-256 beside it): what :func:`load_resume_state` resumes at ``step``;
    ``params``: the trained parameters by name (:func:`_trained`)."""
    state = {
        "step": step,
        "key": key,
        "model": {n: p.detach().cpu().clone() for n, p in params.items()},
        "optimizer": opt.state_dict(),
        "lr_schedule": lr_schedule.state_dict(),
        "sampler": sampler.state_dict(),
        "history": json.dumps(history),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_hashed(state, out / RESUME_FILE)


def _key_changes(saved: str, key: str) -> str:
    """`` (value.FIELD: SAVED saved, NOW now, ...)``: what differs between two :func:`resume_key` strings (settings
    named as ValueTrainConfig's fields, :func:`run_key_names` names them as a run's keys), or ``""`` when ``saved``
    is not one."""
    try:
        old, new = json.loads(saved), json.loads(key)
        changes = [
            f"value.{k}: {old['settings'].get(k)!r} saved, {v!r} now"
            for k, v in new["settings"].items()
            if old["settings"].get(k) != v
        ]
        changes += [f"the {k}" for k in ("atoms", "reference", "trunk") if old[k] != new[k]]
    except (ValueError, TypeError, KeyError, AttributeError):
        return ""
    return f" ({'; '.join(changes)})" if changes else ""


def load_resume_state(out: Path, key: str, params, opt, lr_schedule, sampler, steps: int) -> tuple[int, list]:
    """Load ``out/RESUME_FILE`` (SHA-256 checked, ``weights_only``) into ``params``, the optimizer, schedule and
    sampler; returns the step it was saved at and the steps' metrics so far. A state of other settings (``key``)
    or a damaged file is a ``ValueError`` naming the file."""
    path = out / RESUME_FILE
    state = read_rank_file(path, keys=("step", "key", "model", "optimizer", "lr_schedule", "sampler", "history"))
    if state["key"] != key:
        raise ValueError(
            f"{path}: the value run saved there trained with other settings, atoms or reference"
            f"{_key_changes(state['key'], key)}; rerun it as it was, or delete {path} to train from step 0"
        )
    saved = state["model"]
    step = state["step"]
    if set(saved) != set(params) or any(tuple(saved[n].shape) != tuple(params[n].shape) for n in params):
        raise ValueError(f"{path}: its parameters are not this value model's; delete it to train from step 0")
    if not (isinstance(step, int) and 0 < step < steps):
        raise ValueError(f"{path}: step {step!r} is not a step before the last ({steps}); delete it to train again")
    try:
        history = json.loads(state["history"])
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
        opt.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        sampler.load_state_dict(state["sampler"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(
            f"{path}: not a state this run can resume ({one_line(e, 200)}); delete it to train from step 0"
        ) from None
    if not (isinstance(history, list) and len(history) == step):
        raise ValueError(f"{path}: its metrics are not {step} steps'; delete it to train from step 0")
    return step, history


def train_value_model(
    buffer_path,
    out_dir,
    hf_state_dict,
    hf_config,
    cfg: ValueTrainConfig,
    meta: dict | None = None,
    *,
    verify_checksums: bool = True,
    prefix_cache: PrefixCache | None = None,
) -> Path:
    """Train a :class:`MegatronValueModel` on a replay buffer of reference samples and save it (SHIQ_MATH §8).

    The trunk is a megatron GPT with the shape of ``hf_config`` initialised from ``hf_state_dict``
    (the reference; ``shiq_train.cli.load_init(init)`` gives both). Each of ``cfg.steps`` AdamW steps
    takes ``cfg.micro_batches_per_step`` micro-batches of ``cfg.rows_per_micro_batch`` rows (``tokens``,
    ``action_mask``, ``rewards``) from a seeded ``BufferSampler`` and minimises
    :func:`distributional_value_loss` against the rows' returns-to-go, the mean over all the step's actions
    (each micro-batch's mean weighed by its number of actions). Runs in one process (TP = PP = 1;
    initialises ``torch.distributed`` itself if needed). Writes ``out_dir`` atomically
    (:func:`save_value_model`, with ``meta`` added to ``value_model.json``) and a ``metrics.jsonl``
    inside it, replacing an earlier value model there (any other non-empty folder is refused); while it trains,
    ``PROGRESS_FILE`` there gets each step's metrics line as the step ends (the resumed steps' first, on a resume);
    returns ``out_dir`` (a symbolic link is refused before any work). The buffer's shards are hashed against the manifest first unless
    ``verify_checksums`` is False. ``prefix_cache``: the frozen-prefix cache of this buffer for
    ``cfg.trainable_last_layers`` built by the caller (e.g. shared with the policies' trainers); without it,
    ``cfg.cache_frozen_prefix`` builds one from the trunk.
    """
    out = Path(out_dir)
    if out.is_symlink():  # (save_value_model replaces the folder atomically: it refuses a link, after training)
        raise ValueError(f"{out} is a link, not a folder to replace: give the folder it points to, or a new one")
    # (a folder of a run under way holds its progress file, and its resume state once one is saved)
    if out.exists() and (
        not out.is_dir()
        or (
            any(p.name not in (PROGRESS_FILE, LOCK_FILE) for p in out.iterdir())
            and not (out / CONFIG_FILE).is_file()
            and not (out / RESUME_FILE).is_file()
        )
    ):
        raise ValueError(
            f"{out} exists and is not a value-model folder (no {CONFIG_FILE}); it would be replaced: choose a new folder"
        )
    buffer = open_buffer(buffer_path, verify_checksums=verify_checksums)
    vocab = int(buffer.tokenizer_info.get("vocab_size", 0))
    if vocab > hf_config.vocab_size:
        raise ValueError(
            f"buffer {buffer_path}: its tokenizer has {vocab} token ids but the reference model only "
            f"{hf_config.vocab_size}; build the buffer with the reference's tokenizer"
        )
    sampler = BufferSampler(
        buffer,
        rows_per_micro_batch=cfg.rows_per_micro_batch,
        micro_batches_per_step=cfg.micro_batches_per_step,
        seed=cfg.seed if cfg.data_seed is None else cfg.data_seed,
        max_tokens_per_row=cfg.max_tokens_per_row,
        pad_id=cfg.pad_id,
    )
    v_min, v_max = cfg.v_min, cfg.v_max
    if v_min is None or v_max is None:
        lo, hi = buffer_return_range(sampler, cfg.gamma)
        widened = v_min is None and v_max is None and lo == hi
        if widened:  # a constant return: any support around it
            lo, hi = lo - 1.0, hi + 1.0
        # the one given must still leave room for the other, read from the buffer: say where that came from
        if v_min is not None and not v_min < hi:
            raise ValueError(
                f"value.v_min={v_min:g} is not below value.v_max={hi:g}, the largest return-to-go in buffer "
                f"{buffer_path}: give value.v_max too (above value.v_min), or leave value.v_min to the buffer"
            )
        if v_max is not None and not lo < v_max:
            raise ValueError(
                f"value.v_max={v_max:g} is not above value.v_min={lo:g}, the smallest return-to-go in buffer "
                f"{buffer_path}: give value.v_min too (below value.v_max), or leave value.v_max to the buffer"
            )
        v_min = lo if v_min is None else v_min
        v_max = hi if v_max is None else v_max
    try:
        atoms = atom_support(v_min, v_max, cfg.num_atoms)
    except ValueError as e:  # (say which bound came from where: the keys, or the buffer's returns)
        read = [f"value.{k}" for k in ("v_min", "v_max") if getattr(cfg, k) is None]
        given = [f"value.{k}" for k in ("v_min", "v_max") if getattr(cfg, k) is not None]
        one = ", widened by 1 either side of its one return" if read and widened else ""
        where = [f"{' and '.join(given)} given"] if given else []
        where += [f"{' and '.join(read)} from the returns-to-go of buffer {buffer_path}{one}"] if read else []
        raise ValueError(f"{e} ({'; '.join(where)})") from None
    context = contextlib.nullcontext() if dist.is_initialized() else parallel.distributed(seed=cfg.seed)
    history = []
    with context:
        from megatron.core import parallel_state as ps  # heavy: only training needs megatron

        if dist.get_world_size() != 1 or ps.get_tensor_model_parallel_world_size() != 1:
            raise ValueError("train_value_model runs in a single process (world size 1, no model parallelism)")
        parallel.set_seed(cfg.seed)
        model_cfg = model_config_from_llama(hf_config)
        trunk = build_model(model_cfg)
        import_llama(trunk, hf_state_dict, hf_config)
        model = MegatronValueModel(trunk, cfg.num_atoms).to(parallel.device())
        freeze_all_but_last_layers(trunk, cfg.trainable_last_layers)
        if prefix_cache is None and cfg.cache_frozen_prefix:
            prefix_cache = PrefixCache.from_buffer(trunk, buffer, cfg.trainable_last_layers, progress=cfg.progress)
        if prefix_cache is not None:
            prefix_cache.check_model(trunk, cfg.trainable_last_layers)
        narrowed = suffix_only(trunk, prefix_cache.n_frozen) if prefix_cache is not None else contextlib.nullcontext()
        opt = value_optimizer(list(model.head.parameters()), [p for p in trunk.parameters() if p.requires_grad], cfg)
        schedule = cfg.schedule()
        lr_schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: schedule.lr_at(step) / schedule.lr)
        model.train()
        ratio = None
        if cfg.share_prefixes:
            prefix_tree.check_model(unwrap(model.trunk))
            ratio = prefix_tree.cost_ratio(unwrap(model.trunk).config)
        key, start, stopped, trained = resume_key(cfg, atoms, meta, hf_config), 0, False, _trained(model)
        if (out / RESUME_FILE).is_file():
            start, history = load_resume_state(out, key, trained, opt, lr_schedule, sampler, cfg.steps)
            logger.info(f"train value: resumed from step {start} ({out / RESUME_FILE})")
        bar = tqdm(
            range(start, cfg.steps), initial=start, total=cfg.steps, desc="train value", disable=not cfg.progress
        )
        out.mkdir(parents=True, exist_ok=True)
        progress = out / PROGRESS_FILE  # the steps so far (a resumed run's too), then a line a step
        atomic_write_text(progress, "".join(json.dumps(h) + "\n" for h in history))
        # a SIGTERM during the final save waits for its end, as one during a step does
        with sigterm_requests(cfg.save_on_sigterm) as stop_requested:
            with narrowed:  # the trunk runs only the layers after a cached prefix
                for step in bar:
                    mbs = sampler.next_micro_batches()
                    opt.zero_grad(set_to_none=True)
                    sums: dict[str, float] = {}
                    # the step's loss is the mean over all its actions (SHIQ_MATH §8): a micro-batch weighs by its
                    # share of them (one micro-batch: weight 1, the mean itself)
                    rows = [len(mb["tokens"]) for mb in mbs]  # reward is a mean over rows: weighed by them
                    for mb, w, r in zip(mbs, action_weights(mbs), rows, strict=True):
                        mb = {k: v.to(parallel.device()) for k, v in mb.items()}
                        cached = prefix_cache.gather(mb) if prefix_cache is not None else None
                        tree = prefix_tree.build(mb["tokens"], mb["lengths"], cost_ratio=ratio) if ratio else None
                        logits = model(mb["tokens"], mb.get("segment_ids"), decoder_input=cached, prefix_tree=tree)
                        loss, metrics = qsharp_value_loss(logits, mb, atoms, cfg.gamma)
                        (loss * w).backward()
                        for k, v in metrics.items():  # value_ce (the step's loss) and the other means over actions: w
                            sums[k] = sums.get(k, 0.0) + v * (r / sum(rows) if k == "reward" else w)
                    if cfg.clip_grad > 0:
                        torch.nn.utils.clip_grad_norm_(
                            [p for g in opt.param_groups for p in g["params"]], cfg.clip_grad
                        )
                    opt.step()
                    lr_schedule.step()
                    history.append({"step": step + 1, **sums})
                    with progress.open("a", encoding="utf-8") as f:
                        f.write(json.dumps(history[-1]) + "\n")
                    stopped = stop_requested()  # a SIGTERM: this step is saved, then the run stops
                    # after the last step the value model itself is saved, below; the loop ends by itself there, not
                    # by a break, which would leave the bar one step short of its total
                    if step + 1 < cfg.steps:
                        if stopped or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                            save_resume_state(out, step + 1, key, trained, opt, lr_schedule, sampler, history)
                        if stopped:
                            raise SavedOnSigterm(step + 1)
            info = {"steps": cfg.steps, "train": asdict(cfg), "model_config": model_cfg.to_dict(), "last": history[-1]}
            # (the whole trunk again, not narrowed)
            # the run's lock file goes into the new folder: the lock held on it stays held on out_dir once that is
            # replaced, so another run cannot take the folder while this one finishes (shiq_train.cli.run_value)
            save_value_model(
                out_dir, model, atoms, hf_config, meta={**info, **(meta or {})}, history=history, carry=(LOCK_FILE,)
            )
            if stopped or stop_requested():  # the run is complete: the caller stops too
                raise SavedOnSigterm(cfg.steps, complete=True)
    return Path(out_dir)
