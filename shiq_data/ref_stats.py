"""Reference statistics for a replay buffer: the frozen model's ``c_ref`` and ``z_ref`` of every token.

ShiQ and its relatives need the reference model's chosen logit and log-partition at every position
(SHIQ_MATH §2). Computing them once, offline, lets training run without a second model in memory.
:func:`compute_ref_stats` runs a ``stats_fn`` over each shard in length-sorted, right-padded batches
and commits the two columns shard by shard (:func:`shiq_data.buffer.add_ref_columns`: atomic per
shard, the manifest records done shards), so a killed run resumes at the first unfinished shard.

``stats_fn(tokens [B, T] int64, attention_mask [B, T] bool) -> TokenStats`` with ``[B, T]`` float32
fields aligned like :func:`shiq_train.stats.causal_lm_stats` (position ``t`` = token ``t`` given the
tokens before it; position 0 is 0). With right padding a causal model's values at real positions
do not depend on the padding; values at padded positions are discarded.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from shiq_train.stats import TokenStats, causal_lm_stats

StatsFn = Callable[[torch.Tensor, torch.Tensor], TokenStats]

DEFAULT_BATCH_TOKENS = 2048
# Causal LMs whose logits are exactly ``last_hidden_state @ lm_head.weight.T`` (the Llama family the
# trainer imports); others go through their full logits.
CHUNKED_MODEL_TYPES = ("llama",)


def length_sorted_batches(lengths: list[int], max_batch_tokens: int) -> list[list[int]]:
    """Row indices grouped into batches of similar length whose padded size ``B * max(T)`` stays
    within ``max_batch_tokens`` (a longer row forms a batch of its own). Longest rows first."""
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]  # the batch's first row is its longest
        if current and (len(current) + 1) * width > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_right(token_lists: list, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [B, T] int64, attention_mask [B, T] bool)`` with each row left-aligned."""
    width = max(len(t) for t in token_lists)
    tokens = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(token_lists), width, dtype=torch.bool)
    for b, t in enumerate(token_lists):
        tokens[b, : len(t)] = torch.from_numpy(np.array(t, dtype=np.int64))
        mask[b, : len(t)] = True
    return tokens, mask


def rows_ref_stats(
    token_lists: list,
    stats_fn: StatsFn,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per row, ``(c_ref [T], z_ref [T])`` float32 numpy arrays from ``stats_fn`` (SHIQ_MATH §2).

    ``on_batch(n_tokens)`` is called after each batch (progress reporting).
    """
    chosen: list = [None] * len(token_lists)
    logz: list = [None] * len(token_lists)
    lengths = [len(t) for t in token_lists]
    for batch in length_sorted_batches(lengths, max_batch_tokens):
        tokens, mask = pad_right([token_lists[i] for i in batch])
        st = stats_fn(tokens, mask)
        for name in ("chosen_logits", "logz"):
            value = getattr(st, name)
            if tuple(value.shape) != tuple(tokens.shape):
                raise ValueError(
                    f"stats_fn returned {name} of shape {tuple(value.shape)} for tokens {tuple(tokens.shape)}"
                )
        c = st.chosen_logits.detach().float().cpu().numpy()
        z = st.logz.detach().float().cpu().numpy()
        for b, i in enumerate(batch):
            n = lengths[i]
            ci, zi = c[b, :n].copy(), z[b, :n].copy()
            if not (np.isfinite(ci).all() and np.isfinite(zi).all()):
                raise ValueError(f"stats_fn returned non-finite reference statistics for row {i}")
            ci[0] = zi[0] = 0.0  # nothing predicts the first token
            chosen[i], logz[i] = ci, zi
        if on_batch is not None:
            on_batch(int(mask.sum()))
    return chosen, logz


def compute_ref_stats(
    buffer_dir,
    stats_fn: StatsFn,
    *,
    ref_model: dict,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
    progress: bool = True,
) -> list[int]:
    """Add ``ref_chosen_logits`` / ``ref_logz`` to every shard of a buffer that lacks them.

    Each shard is committed atomically as soon as it is done (``manifest.json`` records it under
    ``ref_stats.done``), so re-running after a kill continues with the first unfinished shard.
    ``ref_model`` (JSON-able, e.g. ``{"name": "smollm2", "fingerprint": ...}``) is recorded in the
    manifest; a buffer holding another model's statistics is refused. Returns the shard indices
    computed by this call.
    """
    from shiq_data.buffer import add_ref_columns, open_buffer, read_shard, shards_without_ref

    buffer = open_buffer(buffer_dir)
    todo = shards_without_ref(buffer_dir, ref_model)
    entries = buffer.manifest["shards"]
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(
            total=sum(entries[i]["tokens"] for i in todo),
            desc=f"reference statistics {Path(buffer_dir).name}",
            unit=" tok",
            unit_scale=True,
            file=sys.stderr,
            mininterval=1.0,
        )
    try:
        for i in todo:
            path = Path(buffer_dir) / entries[i]["file"]
            token_lists = read_shard(path).column("tokens").to_numpy(zero_copy_only=False)
            chosen, logz = rows_ref_stats(
                list(token_lists), stats_fn, max_batch_tokens, on_batch=bar.update if bar is not None else None
            )
            add_ref_columns(buffer_dir, i, chosen, logz, ref_model=ref_model)
    finally:
        if bar is not None:
            bar.close()
    return todo


# ----------------------------------------------------------------------------------------------
# statistics functions


def hf_stats_fn(model, chunk_tokens: int = 256) -> StatsFn:
    """``stats_fn`` of a ``transformers`` causal LM (float32, no grad).

    For Llama-family models (output layer without bias or logit scaling) the statistics come from the
    final hidden states and the output weight ``chunk_tokens`` positions at a time
    (:func:`shiq_train.vocab_parallel.chunked_causal_stats`), so the ``[B, T, V]`` logits are never
    held whole; other models go through their full logits (``causal_lm_stats``). Padded positions
    (attention mask False) are set to 0. Puts the model in eval mode.
    """
    from shiq_train.vocab_parallel import chunked_causal_stats

    model.eval()
    head = model.get_output_embeddings()
    chunked = getattr(model.config, "model_type", None) in CHUNKED_MODEL_TYPES and getattr(head, "bias", None) is None

    def stats(tokens: torch.Tensor, attention_mask: torch.Tensor) -> TokenStats:
        with torch.no_grad():
            if chunked:
                hidden = model.get_decoder()(input_ids=tokens, attention_mask=attention_mask.long()).last_hidden_state
                st = chunked_causal_stats(hidden, head.weight, tokens, chunk_tokens)
            else:
                logits = model(input_ids=tokens, attention_mask=attention_mask.long()).logits
                st = causal_lm_stats(logits, tokens)
        return TokenStats(
            st.chosen_logits.float().masked_fill(~attention_mask, 0.0),
            st.logz.float().masked_fill(~attention_mask, 0.0),
        )

    return stats


def megatron_stats_fn(model) -> StatsFn:
    """``stats_fn`` of a single-stage megatron ``GPTModel`` (:func:`shiq_train.model.forward_stats`).

    Its causal mask makes real positions independent of right padding; padded ones are set to 0.
    Call inside an initialised ``shiq_train.parallel.distributed()`` context.
    """
    from shiq_train.model import forward_stats

    model.eval()

    def stats(tokens: torch.Tensor, attention_mask: torch.Tensor) -> TokenStats:
        with torch.no_grad():
            st = forward_stats(model, tokens)
        return TokenStats(
            st.chosen_logits.float().masked_fill(~attention_mask, 0.0),
            st.logz.float().masked_fill(~attention_mask, 0.0),
        )

    return stats


# ----------------------------------------------------------------------------------------------
# command line


def check_tokenizer_matches(buffer_info: dict, model_info: dict, model_vocab_size: int | None, buffer_dir) -> None:
    """Refuse a reference model whose tokenizer is not the one the buffer was built with (and, once the
    model is loaded, one whose vocabulary is smaller than the tokenizer's)."""
    if model_info["fingerprint"] != buffer_info["fingerprint"]:
        raise ValueError(
            f"{buffer_dir}: built with tokenizer {buffer_info['name']!r} (fingerprint "
            f"{buffer_info['fingerprint'][:12]}…) but the reference model's tokenizer {model_info['name']!r} has "
            f"fingerprint {model_info['fingerprint'][:12]}…; use the model the buffer was tokenised for"
        )
    if model_vocab_size is not None and model_vocab_size < int(buffer_info["vocab_size"]):
        raise ValueError(
            f"{buffer_dir}: the tokenizer has {buffer_info['vocab_size']} tokens but the reference "
            f"model's vocabulary has only {model_vocab_size}"
        )


def _model_config(model: str):
    """The Hugging Face config of ``--model`` without loading its weights."""
    from transformers import AutoConfig

    if model == "smollm2":
        from shiq_data.assets import smollm2_gguf

        path = smollm2_gguf()
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoConfig.from_pretrained(str(model))


def load_reference(model: str, megatron_checkpoint: str | None, tok_info: dict):
    """``(hf_model, ref_model_record)`` for ``--model`` (``smollm2`` or a Hugging Face folder), or, with
    ``megatron_checkpoint``, that model's architecture holding the weights of a training checkpoint
    (its newest step, or a step folder)."""
    if model != "smollm2" and not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {model!r}: expected smollm2 or a Hugging Face model folder, but "
            f"{Path(model) / 'config.json'} does not exist"
        )
    record = {
        "model": model if model == "smollm2" else str(Path(model).resolve()),
        "tokenizer": tok_info["fingerprint"],
    }
    if megatron_checkpoint:
        from shiq_train.checkpoint import latest_step_dir
        from shiq_train.export import hf_model_from_checkpoint

        step_dir = Path(megatron_checkpoint)
        if not list(step_dir.glob("rank_*.pt")):  # a training folder rather than one step
            step_dir = latest_step_dir(step_dir)
            if step_dir is None:
                raise FileNotFoundError(f"--megatron-checkpoint {megatron_checkpoint}: no checkpoint step found")
        record["megatron_checkpoint"] = str(step_dir.resolve())
        return hf_model_from_checkpoint(step_dir, _model_config(model)), record
    if model == "smollm2":
        from shiq_train.hf_convert import load_smollm2

        return load_smollm2(torch.float32)[0], record
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32), record


def run_cli(args: argparse.Namespace) -> int:
    """``shiq-data ref-stats``: compute, check and report."""
    from shiq_data.buffer import open_buffer

    buffer = open_buffer(args.buffer)
    if args.threads:
        torch.set_num_threads(args.threads)
    from shiq_data.tokenizers import load_tokenizer

    _, tok_info = load_tokenizer(args.model)
    check_tokenizer_matches(buffer.tokenizer_info, tok_info, None, args.buffer)  # before the slow model load
    hf, record = load_reference(args.model, args.megatron_checkpoint, tok_info)
    check_tokenizer_matches(buffer.tokenizer_info, tok_info, int(hf.config.vocab_size), args.buffer)
    done = compute_ref_stats(
        args.buffer,
        hf_stats_fn(hf),
        ref_model=record,
        max_batch_tokens=args.batch_tokens,
        progress=not args.no_progress,
    )
    final = open_buffer(args.buffer)
    print(
        f"{args.buffer}: reference statistics of {record['model']} computed for {len(done)} shard(s); "
        f"{sum(s['has_ref'] for s in final.manifest['shards'])}/{len(final.manifest['shards'])} shards have them"
    )
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``ref-stats`` on a ``shiq-data`` subparsers object; the handler is ``run_cli``."""
    p = subparsers.add_parser(
        "ref-stats",
        help="add the frozen reference model's per-token statistics to a buffer (resumable)",
        description="Run the reference model over every shard of BUFFER and store its chosen logit and "
        "log-partition of each token (SHIQ_MATH §2) as the columns ref_chosen_logits and ref_logz. "
        "Shards are committed one at a time: re-running after an interruption continues with the "
        "first unfinished shard. The model's tokenizer must be the buffer's.",
    )
    p.add_argument("buffer", metavar="BUFFER", help="replay buffer folder (has manifest.json)")
    p.add_argument(
        "--model",
        required=True,
        help="reference model: 'smollm2' (the packaged SmolLM2-135M-Instruct) or a Hugging Face model folder",
    )
    p.add_argument(
        "--megatron-checkpoint",
        metavar="DIR",
        default=None,
        help="take the weights from this shiq-train checkpoint folder (its newest step) or step folder; "
        "--model then gives the architecture and tokenizer",
    )
    p.add_argument(
        "--batch-tokens",
        type=int,
        default=DEFAULT_BATCH_TOKENS,
        help="padded tokens per forward pass (batch rows x longest row); default %(default)s",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_cli)
    return p


def main(argv=None) -> int:
    """``python -m shiq_data.ref_stats BUFFER --model ...`` (the same as ``shiq-data ref-stats``)."""
    parser = argparse.ArgumentParser(prog="shiq-data")
    sub = parser.add_subparsers(dest="command", required=True)
    add_cli(sub)
    args = parser.parse_args(["ref-stats", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"shiq-data ref-stats: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
