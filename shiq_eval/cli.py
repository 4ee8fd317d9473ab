"""shiq-eval run: reward and KL (SHIQ_MATH §6) of a series of training checkpoints, as a table and plots.

Each CHECKPOINT is a shiq-train run directory (every saved step in RUN/checkpoints/) or one step
directory (RUN/checkpoints/step_00000040). A checkpoint becomes a Hugging Face model (exported by
shiq_train.export.hf_model_from_checkpoint, with the Llama config the run saved); its method name is
the run's loss name and its step the checkpoint's step. Every policy is sampled on the same prompts
with the same seed, scored by a saved regression reward model, and compared with the reference (the
run's initial model) by both KL estimators. Outputs in --out: results.csv, results.json (with a few
sample completions), reward_vs_kl.png, reward_vs_step.png.

With --guide VALUE_DIR --beta B, the reference guided by a Q♯ value model (trained by shiq-train
loss=qsharp_value; SHIQ_MATH §8) is evaluated the same way, as one more row, method qsharp: sampled
from the reference's top-k tokens reweighted by the value model, its KL the exact per-token KL of the
guided distribution to the reference at the visited states. The checkpoints may then be omitted.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path

from shiq_data.assets import VADER_SDIST
from shiq_data.cli_common import quiet_optional_dependencies, run_command
from shiq_data.tokenizers import fingerprint
from shiq_eval.bfcl import cli as bfcl_cli
from shiq_eval.checkpoints import EvalInputError, checkpoint_info, checkpoint_steps, policy_from_checkpoint
from shiq_eval.moviereviews import movie_prompts
from shiq_eval.report import plot_curves, write_table


def check_tokenizers(steps: list[Path], infos: list[dict], tokenizer, ref_model) -> None:
    """Refuse, before any sampling, an evaluation tokenizer that is not the one the runs' buffers were built
    with, or a reference or policy whose vocabulary is smaller than that tokenizer's."""
    from shiq_train.reference import check_tokenizer_matches  # heavy: torch

    mine = {"name": getattr(tokenizer, "name_or_path", "") or "?", "fingerprint": fingerprint(tokenizer)}
    for step_dir, info in zip(steps, infos):
        if info["tokenizer"] is None:
            continue
        vocab = [v for v in (info["hf_config"].get("vocab_size"), ref_model.config.vocab_size) if isinstance(v, int)]
        check_tokenizer_matches(
            info["tokenizer"],
            mine,
            min(vocab) if vocab else None,
            f"the buffer of {step_dir}",
            role="evaluation model (--reference, --tokenizer)",
        )


def check_reward_model_file(path) -> None:
    """Refuse, before any model is loaded, a ``--reward-model`` file that is not safetensors."""
    from safetensors import SafetensorError, safe_open  # heavy: only shiq-eval run reads a head

    try:
        with safe_open(str(path), "np") as f:
            keys = set(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise EvalInputError(
            f"--reward-model {path}: not a safetensors file ({' '.join(str(e).split())[:120]}); expected a head "
            "saved by RegressionRewardModel.save"
        ) from None
    if not {"weight", "bias"} <= keys:
        raise EvalInputError(
            f"--reward-model {path}: holds tensors {sorted(keys)}, not the 'weight' and 'bias' of a head saved by "
            "RegressionRewardModel.save"
        )


def read_prompts_jsonl(path) -> tuple[list[str], list[str]]:
    """``(policy_prompts, scorer_prompts)`` from a JSONL file: one object per line with ``prompt``
    (the text the policy continues) and optionally ``scorer_prompt`` (what the reward model reads
    before the completion; default: ``prompt``)."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"--prompts {path}: no such file")
    prompts, shown = [], []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalInputError(f"{path}, line {i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise EvalInputError(f"{path}, line {i}: field 'prompt' must be a non-empty string")
        shown_text = row.get("scorer_prompt", row["prompt"])
        if not isinstance(shown_text, str):
            raise EvalInputError(f"{path}, line {i}: field 'scorer_prompt' must be a string")
        prompts.append(row["prompt"])
        shown.append(shown_text)
    if not prompts:
        raise EvalInputError(f"{path}: no prompts")
    return prompts, shown


def prompt_set_sha256(prompts: list[str], shown: list[str]) -> str:
    """SHA-256 of the exact prompt set (policy prompt and scorer prompt of every item, in order), so
    two result tables can be checked to come from the same prompts."""
    return hashlib.sha256(json.dumps([[p, s] for p, s in zip(prompts, shown)], ensure_ascii=False).encode()).hexdigest()


def encode_prompts(tokenizer, prompts: list[str], chat: bool) -> list[list[int]]:
    """Token ids of each prompt, through the tokenizer's chat template (user turn + generation
    prompt) when ``chat``."""
    if chat:
        return [
            list(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
            for p in prompts
        ]
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def load_reference(spec: str):
    """``(model, tokenizer)`` for ``smollm2`` or a Hugging Face folder (tokenizer None if it has none)."""
    import torch  # heavy: only shiq-eval run needs torch

    from shiq_train.hf_convert import load_causal_lm  # heavy: torch

    folder = Path(spec)
    if spec != "smollm2" and not (folder / "config.json").is_file():
        raise EvalInputError(
            f"--reference {spec}: expected smollm2 or a Hugging Face model folder "
            f"({folder / 'config.json'} does not exist)"
        )
    return load_causal_lm(spec, torch.float32)


class HFEngine:
    """Checkpoints as transformers models (exported from the saved megatron shards)."""

    def __init__(self, ref_model, tokenizer):
        self.ref_model = ref_model

    def reference(self):
        """``(logits model, sampler)`` of the reference (sampler None: ``HFPolicy`` of the model)."""
        return self.ref_model, None

    def policy(self, step_dir: Path, hf_config: dict):
        return policy_from_checkpoint(step_dir, hf_config), None


class MegatronEngine:
    """Checkpoints as megatron-core models, sampled with :class:`shiq_eval.generate.MegatronPolicy`
    and scored with :class:`shiq_eval.generate.MegatronLogits`, in the tensor-parallel layout of the
    process group (``--tp``); the reference is imported from its Hugging Face weights. Call inside
    ``shiq_train.parallel.distributed``."""

    def __init__(self, ref_model, tokenizer):
        from megatron.core import parallel_state as ps  # heavy: only --engine megatron needs megatron

        from shiq_eval.generate import MegatronLogits, MegatronPolicy  # heavy: torch
        from shiq_train import hf_convert as H  # heavy: torch

        tp = ps.get_tensor_model_parallel_world_size()
        heads = (ref_model.config.num_attention_heads, ref_model.config.num_key_value_heads)
        if any(h % tp for h in heads):
            raise EvalInputError(
                f"--tp {tp} does not divide the model's {heads[0]} attention heads and {heads[1]} "
                "key-value heads: choose a tensor-parallel size that divides both"
            )
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        ref = self._build(ref_model.config)
        H.import_llama(ref, ref_model.state_dict(), ref_model.config)
        self._ref = (MegatronLogits(ref), MegatronPolicy(ref, eos_id=self.eos, pad_id=self.pad))
        self._policy = (None, None)  # (architecture, model): reloaded per checkpoint, rebuilt per architecture

    @staticmethod
    def _build(hf_config):
        from shiq_train import hf_convert as H  # heavy: torch
        from shiq_train.model import build_model  # heavy: torch

        return build_model(H.model_config_from_llama(hf_config, params_dtype="float32", logits_chunk_tokens=0))

    def reference(self):
        return self._ref

    def policy(self, step_dir: Path, hf_config: dict):
        from transformers import LlamaConfig  # heavy: transformers

        from shiq_eval.generate import MegatronLogits, MegatronPolicy  # heavy: torch
        from shiq_train.export import full_parameters_from_checkpoint  # heavy: torch
        from shiq_train.hf_convert import LlamaShape  # heavy: torch
        from shiq_train.model import load_full_parameters  # heavy: torch

        config = LlamaConfig.from_dict(hf_config)
        if self._policy[0] != hf_config:
            self._policy = (hf_config, self._build(config))
        model = self._policy[1]
        shape = LlamaShape.from_hf_config(config)
        load_full_parameters(model, full_parameters_from_checkpoint(step_dir, shape.num_layers, shape.tied))
        return MegatronLogits(model), MegatronPolicy(model, eos_id=self.eos, pad_id=self.pad)


def engine_context(args):
    """The process group the engine needs: none for ``hf``; for ``megatron`` one tensor-parallel group
    of ``--tp`` ranks (a lone process for 1, else torchrun with ``--nproc_per_node`` equal to it)."""
    if args.engine == "hf":
        if args.tp != 1:
            raise EvalInputError(f"--tp {args.tp} needs --engine megatron")
        return contextlib.nullcontext()
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world != args.tp:
        raise EvalInputError(
            f"--engine megatron --tp {args.tp} runs on exactly {args.tp} processes, got "
            f"{world}: launch with torchrun --nproc_per_node {args.tp}"
        )
    from shiq_train import parallel  # heavy: torch

    return parallel.distributed(parallel.ParallelConfig(args.tp, 1), seed=args.seed)


def guide_info(path) -> dict:
    """``{steps, init}`` of a Q♯ value-model folder written by ``shiq-train loss=qsharp_value``
    (read from its value_model.json, without loading the weights)."""
    path = Path(path)
    config = path / "value_model.json"
    if not config.is_file():
        raise EvalInputError(
            f"--guide {path}: {config} does not exist (a folder written by shiq-train loss=qsharp_value)"
        )
    try:
        info = json.loads(config.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalInputError(f"{config}: not valid JSON ({e.msg})") from None
    if not isinstance(info, dict) or info.get("format") != "shiq-qsharp-value":
        raise EvalInputError(f"{config}: field 'format' must be 'shiq-qsharp-value'")
    return {"steps": int(info.get("steps", 0)), "init": info.get("config", {}).get("init", "none")}


def check_guide_args(args) -> None:
    """--guide needs --beta > 0 and --top-k >= 1, and the hf engine; --beta needs --guide."""
    if args.guide is None:
        if args.beta is not None:
            raise EvalInputError("--beta is the KL weight of Q♯ guidance: give it with --guide VALUE_DIR")
        if not args.checkpoints:
            raise EvalInputError("nothing to evaluate: give CHECKPOINT directories and/or --guide VALUE_DIR --beta B")
        return
    if args.beta is None or not (0 < args.beta < float("inf")):
        raise EvalInputError(f"--guide needs --beta B, a finite KL weight > 0 (got {args.beta})")
    if args.top_k < 1:
        raise EvalInputError(f"--top-k must be >= 1, got {args.top_k}")
    if args.engine != "hf":
        raise EvalInputError("--guide decodes with transformers models: use --engine hf")


def evaluate_guide(args, ref_model, tokenizer, prompt_ids, shown, scorer, kw):
    """Reward and KL (an ``EvalResult``) of the reference guided by the value model in ``args.guide``."""
    from shiq_eval.qsharp import GuidedPolicy, evaluate_guided_policy  # heavy: torch
    from shiq_train.qsharp_value import load_value_model  # heavy: torch

    value = load_value_model(args.guide)
    if value.config.vocab_size != ref_model.config.vocab_size:
        raise EvalInputError(
            f"--guide {args.guide}: the value model has {value.config.vocab_size} token ids but the reference "
            f"{ref_model.config.vocab_size}; train it from this reference (shiq-train loss=qsharp_value init=...)"
        )
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    policy = GuidedPolicy(ref_model, value, value.atoms, args.beta, top_k=args.top_k, eos_id=eos, pad_id=pad)
    return evaluate_guided_policy(policy, tokenizer, prompt_ids, shown, scorer, **kw)


def run(args) -> list[dict]:
    """Evaluate the reference and every checkpoint; write the table and plots; returns the rows."""
    from shiq_data.reward_head import RegressionRewardModel, minilm_encoder  # heavy: torch
    from shiq_eval.evaluate import evaluate_policy  # heavy: torch

    check_guide_args(args)
    steps = [s for c in args.checkpoints for s in checkpoint_steps(c)]
    infos = [checkpoint_info(s) for s in steps]
    guide_inits = {guide_info(args.guide)["init"]} if args.guide is not None else set()
    reference = args.reference
    if reference is None:
        inits = sorted({i["init"] for i in infos} | guide_inits)
        if len(inits) != 1 or inits[0] in (None, "none"):
            raise EvalInputError(
                f"the runs were initialised from {inits}: give the reference model with "
                "--reference (smollm2 or a Hugging Face folder)"
            )
        reference = inits[0]
    if not Path(args.reward_model).is_file():
        raise EvalInputError(
            f"--reward-model {args.reward_model}: no such file (a head saved by "
            "shiq_eval.scorers.RegressionRewardModel.save)"
        )
    if args.prompts is not None:  # every input checked before a model is loaded
        prompts, shown = read_prompts_jsonl(args.prompts)
        source = str(Path(args.prompts).resolve())
    else:
        prompts, shown = movie_prompts(args.movie_prompts)
        source = f"movie-held-out ({VADER_SDIST}, seed 0, first {len(prompts)})"
    check_reward_model_file(args.reward_model)
    context = engine_context(args)
    ref_model, tokenizer = load_reference(reference)
    if args.tokenizer is not None:
        from transformers import AutoTokenizer  # heavy: transformers

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if tokenizer is None:
        raise EvalInputError(f"the reference {reference} has no tokenizer: give one with --tokenizer FOLDER")
    check_tokenizers(steps, infos, tokenizer, ref_model)
    prompt_set = {"prompt_set": source, "prompt_set_sha256": prompt_set_sha256(prompts, shown)}
    prompt_ids = encode_prompts(tokenizer, prompts, args.chat)
    scorer = RegressionRewardModel.load(args.reward_model, minilm_encoder())
    lead = int(os.environ.get("RANK", 0)) == 0  # under torchrun, rank 0 reports and writes
    kw = dict(
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed, progress=lead and not args.quiet
    )
    with context:
        engine = (HFEngine if args.engine == "hf" else MegatronEngine)(ref_model, tokenizer)
        ref_logits, ref_sampler = engine.reference()
        ref_row = {
            "method": "reference",
            "step": 0,
            "checkpoint": str(reference),
            "engine": args.engine,
            **prompt_set,
            **evaluate_policy(
                ref_logits, ref_logits, tokenizer, prompt_ids, shown, scorer, sampler=ref_sampler, **kw
            ).as_dict(),
        }
        rows = []
        for step_dir, info in zip(steps, infos):
            logits, sampler = engine.policy(step_dir, info["hf_config"])
            res = evaluate_policy(logits, ref_logits, tokenizer, prompt_ids, shown, scorer, sampler=sampler, **kw)
            rows.append(
                {
                    "method": info["method"],
                    "step": info["step"],
                    "checkpoint": str(step_dir),
                    "engine": args.engine,
                    **prompt_set,
                    **res.as_dict(),
                }
            )
            if lead and not args.quiet:
                print(
                    f"{info['method']} step {info['step']}: reward {res.reward_mean:.4g} ± {res.reward_stderr:.2g}, "
                    f"KL {res.kl_exact:.4g} (sample estimate {res.kl_sample:.4g})",
                    file=sys.stderr,
                )
        if args.guide is not None:  # Q♯: the reference guided by a value model (SHIQ_MATH §8)
            res = evaluate_guide(args, ref_model, tokenizer, prompt_ids, shown, scorer, kw)
            rows.append(
                {
                    "method": "qsharp",
                    "step": guide_info(args.guide)["steps"],
                    "checkpoint": str(args.guide),
                    "engine": args.engine,
                    **prompt_set,
                    **res.as_dict(),
                    "beta": args.beta,
                    "top_k": args.top_k,
                }
            )
            if lead and not args.quiet:
                print(
                    f"qsharp (beta {args.beta}, top-k {args.top_k}): reward {res.reward_mean:.4g} ± "
                    f"{res.reward_stderr:.2g}, KL {res.kl_exact:.4g} (sample estimate {res.kl_sample:.4g})",
                    file=sys.stderr,
                )
    if not lead:
        return [ref_row] + rows
    out = Path(args.out)
    csv_path, json_path = write_table([ref_row] + rows, out)
    plots = plot_curves(rows, out, reference=ref_row)
    print(
        f"shiq-eval: {len(rows)} checkpoints on {len(prompts)} prompts ({args.engine} engine); wrote {csv_path}, "
        f"{json_path}, " + ", ".join(str(p) for p in plots)
    )
    return [ref_row] + rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shiq-eval", description="Evaluate shiq-train checkpoints (SHIQ_MATH §6).")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run",
        help="reward and KL of a series of checkpoints: table and plots",
        description=__doc__,  # plain text: it is the --help text
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument(
        "checkpoints",
        nargs="*",
        metavar="CHECKPOINT",
        help="shiq-train run directories or step directories (several runs: one curve per method)",
    )
    r.add_argument("--guide", metavar="VALUE_DIR", help="also evaluate Q♯ guided decoding with this value model")
    r.add_argument("--beta", type=float, help="KL weight of the Q♯ guidance (with --guide)")
    r.add_argument("--top-k", type=int, default=20, help="Q♯ candidates per token (with --guide; default 20)")
    r.add_argument("--out", required=True, help="output directory for results.csv/json and the plots")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help='JSONL of prompts: {"prompt": ..., "scorer_prompt": ... (optional)}')
    src.add_argument(
        "--movie-prompts",
        type=int,
        metavar="N",
        help="the first N held-out movie-review openings of the demo (vaderSentiment archive)",
    )
    r.add_argument(
        "--reward-model",
        required=True,
        help="regression reward-model head (safetensors from RegressionRewardModel.save), on MiniLM",
    )
    r.add_argument(
        "--reference", help="reference model for the KL: smollm2 or a Hugging Face folder (default: the runs' init)"
    )
    r.add_argument("--tokenizer", help="Hugging Face tokenizer folder (default: the reference's)")
    r.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    r.add_argument("--max-new-tokens", type=int, default=32, help="completion length limit (default 32)")
    r.add_argument("--batch-size", type=int, default=16, help="generation batch size (default 16)")
    r.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every policy (default 0)")
    r.add_argument(
        "--engine",
        choices=["hf", "megatron"],
        default="hf",
        help="hf: checkpoints exported to transformers (default, fastest on CPU); megatron: the "
        "trained megatron-core model itself, with its static KV cache",
    )
    r.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel size of --engine megatron (run under torchrun --nproc_per_node TP)",
    )
    r.add_argument("--quiet", action="store_true", help="no progress bars or per-checkpoint lines")
    sub.add_parser(
        "bfcl",
        add_help=False,
        help="BFCL-V3 multi-turn: check-ground-truth, rollout, report, to-buffer (see shiq-eval bfcl --help)",
    )
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bfcl"]:  # the BFCL commands parse their own arguments
        return bfcl_cli.main(argv[1:], prog="shiq-eval bfcl")
    args = build_parser().parse_args(argv)
    quiet_optional_dependencies()
    return run_command("shiq-eval", _run_command, args)


def _run_command(args) -> int:
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
