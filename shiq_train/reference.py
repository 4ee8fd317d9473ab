"""``shiq-train ref-stats``: run the frozen reference model over a buffer and store its statistics.

ShiQ and its relatives need the reference model's chosen logit and log-partition at every position
(SHIQ_MATH §2). This module builds and runs the model: :func:`hf_stats_fn` (a ``transformers`` causal
LM, chunked over the vocabulary for the Llama family), :func:`megatron_stats_fn` (a megatron
``GPTModel``), and :func:`load_reference` (``smollm2``, a Hugging Face folder, or a training
checkpoint's weights in that architecture). Walking the buffer shard by shard, resumably, is
:func:`shiq_data.ref_stats.compute_ref_stats`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import sys
from pathlib import Path

import pyarrow.compute as pc
import torch

from shiq_data.assets import smollm2_gguf
from shiq_data.buffer import open_buffer, refuse_other_reference
from shiq_data.cli_common import (
    THREADS_MAX,
    ArgumentParser,
    add_log_level_option,
    hide_library_progress_bars,
    int_at_least,
    progress_bars_shown,
    run_command,
    setup_logging,
)
from shiq_data.io import CHECKSUM_SUFFIX, one_line, sha256_files, weight_files
from shiq_data.ref_stats import DEFAULT_BATCH_TOKENS, StatsFn, compute_ref_stats, length_sorted_batches, pad_right
from shiq_data.tokenizers import (
    CHAT_TEMPLATE_FIELD,
    PIPELINE_FIELD,
    TOKENIZER_FILES,
    load_tokenizer,
    pipeline_mismatch,
    template_mismatch,
)
from shiq_train.checkpoint import latest_step_dir, read_meta
from shiq_train.export import hf_model_from_checkpoint
from shiq_train.hf_convert import hf_config_from_dict, load_causal_lm, model_config_from_llama
from shiq_train.model import DTYPES, forward_stats
from shiq_train.stats import causal_lm_stats
from shiq_train.vocab_parallel import chunked_causal_stats, chunked_token_stats

log = logging.getLogger(__name__)

# Causal LMs whose logits are exactly ``last_hidden_state @ lm_head.weight.T`` (the Llama family the
# trainer imports, Mistral, Qwen2 and Qwen3 included: no bias on the output layer); others go through their full
# logits.
CHUNKED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def hf_stats_fn(model, chunk_tokens: int = 256) -> StatsFn:
    """``stats_fn`` of a ``transformers`` causal LM (float32, no grad): ``(tokens [B, T], attention_mask
    [B, T] bool or 0/1 integers) -> (chosen [B, T], logz [B, T])`` (SHIQ_MATH §2).

    For Llama-family models (output layer without bias or logit scaling) the statistics come from the
    final hidden states and the output weight ``chunk_tokens`` positions at a time
    (:func:`shiq_train.vocab_parallel.chunked_causal_stats`), so the ``[B, T, V]`` logits are never
    held whole; other models go through their full logits (``causal_lm_stats``). Padded positions
    (attention mask False) are set to 0. Puts the model in eval mode. For the Llama family the function
    also has ``with_prefix(rows, shared, max_batch_tokens)``: the statistics of rows that share their
    first ``shared`` tokens, those run once (see :func:`shiq_data.ref_stats.rows_ref_stats`), and, without a
    sliding window, ``with_prefixes`` (several groups to a batch).
    """
    model.eval()
    head = model.get_output_embeddings()
    chunked = getattr(model.config, "model_type", None) in CHUNKED_MODEL_TYPES and getattr(head, "bias", None) is None

    def stats(tokens: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention_mask = attention_mask.bool()  # (0/1 integers, as transformers takes it, or bool)
        with torch.no_grad():
            if chunked:
                hidden = model.get_decoder()(input_ids=tokens, attention_mask=attention_mask.long()).last_hidden_state
                st = chunked_causal_stats(hidden, head.weight, tokens, chunk_tokens)
            else:
                logits = model(input_ids=tokens, attention_mask=attention_mask.long()).logits
                st = causal_lm_stats(logits, tokens)
        return (
            st.chosen_logits.float().masked_fill(~attention_mask, 0.0),
            st.logz.float().masked_fill(~attention_mask, 0.0),
        )

    if chunked:
        stats.with_prefix = _with_prefix(model.get_decoder(), head.weight, chunk_tokens)
        # a sliding window counts its width in cache places, which a batch's right-padded prefixes shift: a row
        # of a shorter prefix would see other tokens than its own forward pass; such a model runs each group alone
        if getattr(model.config, "sliding_window", None) is None:
            stats.with_prefixes = _with_prefixes(model.get_decoder(), head.weight, chunk_tokens, stats.with_prefix)
    return stats


def _with_prefixes(decoder, weight: torch.Tensor, chunk_tokens: int, one_group):
    """``with_prefixes(groups, max_batch_tokens)``, a generator: for each ``(rows, shared)`` of ``groups`` in
    order, what ``with_prefix(rows, shared, max_batch_tokens)`` returns. Small groups go several to a batch
    (about ``max_batch_tokens`` tokens: their prefixes right-padded side by side, then every row's remainder
    from its own group's keys and values), so short rows run in matrix products as large as whole rows do; a
    group too large to share a batch goes through ``one_group`` (``with_prefix``) alone."""

    def cost(groups) -> int:  # tokens of a batch of these groups, padding included
        width = max(max(len(r) - shared for r in rows) for rows, shared in groups)
        return len(groups) * max(shared for _, shared in groups) + sum(len(rows) for rows, _ in groups) * max(width, 1)

    @torch.no_grad()
    def run(groups) -> list:
        """The groups of one batch: prefixes ``[G, P]`` (right-padded), remainders ``[R, S]`` (right-padded)."""
        for rows, shared in groups:
            if not 1 <= shared <= min(len(r) for r in rows):
                raise ValueError(f"shared must be in 1..{min(len(r) for r in rows)} (the shortest row), got {shared}")
        prefix, pmask = pad_right([list(rows[0][:shared]) for rows, shared in groups])  # [G, P]
        out = decoder(input_ids=prefix, attention_mask=pmask.long(), use_cache=True)
        h_prefix, cache = out.last_hidden_state, out.cache  # [G, P, H]
        inside = chunked_token_stats(h_prefix[:, :-1], weight, prefix[:, 1:], chunk_tokens)  # positions 1 .. P-1
        owner = torch.tensor([g for g, (rows, _) in enumerate(groups) for _ in rows])  # [R] each row's group
        lens = torch.tensor([shared for _, shared in groups])[owner]  # [R] its prefix length
        rest = [list(r[shared:]) for rows, shared in groups for r in rows]  # possibly empty
        tokens, mask = pad_right([r or [0] for r in rest])  # [R, S]
        cache.batch_select_indices(owner)  # every row reads its own group's prefix keys and values
        S = tokens.shape[1]
        h_rest = decoder(
            input_ids=tokens,
            attention_mask=torch.cat([pmask[owner], mask], 1).long(),
            position_ids=lens[:, None] + torch.arange(S),
            cache=cache,
            use_cache=True,
        ).last_hidden_state  # [R, S, H]
        # position P + s is predicted by the hidden state at P + s - 1: the prefix's last, then the row's own
        before = torch.cat([h_prefix[owner, lens - 1][:, None], h_rest[:, :-1]], 1)
        st = chunked_token_stats(before, weight, tokens, chunk_tokens)  # [R, S]
        results, b = [], 0
        for g, (rows, shared) in enumerate(groups):
            results.append([_row_stats(inside, g, shared, st, b + i, len(rest[b + i])) for i in range(len(rows))])
            b += len(rows)
        return results

    def with_prefixes(groups, max_batch_tokens: int):
        batch: list = []
        for group in groups:
            if cost([group]) > max_batch_tokens:  # too large to share a batch: alone, its rows in batches
                if batch:
                    yield from run(batch)
                    batch = []
                yield one_group(*group, max_batch_tokens)
                continue
            if batch and cost([*batch, group]) > max_batch_tokens:
                yield from run(batch)
                batch = []
            batch.append(group)
        if batch:
            yield from run(batch)

    return with_prefixes


def _with_prefix(decoder, weight: torch.Tensor, chunk_tokens: int):
    """``with_prefix(rows, shared, max_batch_tokens) -> [(chosen [T_b], logz [T_b])]`` for rows (token id
    lists) that all begin with the same ``shared`` tokens: the decoder reads those once into a KV cache,
    then each row's remainder (in right-padded batches of at most ``max_batch_tokens`` remainder tokens)
    from a copy of that cache; position ``t`` = token ``t`` given the tokens before it, position 0 is 0."""

    @torch.no_grad()
    def with_prefix(rows: list, shared: int, max_batch_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if not 1 <= shared <= min(len(r) for r in rows):
            raise ValueError(f"shared must be in 1..{min(len(r) for r in rows)} (the shortest row), got {shared}")
        prefix = torch.as_tensor(list(rows[0][:shared]), dtype=torch.long)[None]  # [1, P]
        out = decoder(input_ids=prefix, use_cache=True)
        h_prefix, cache = out.last_hidden_state, out.cache  # [1, P, H]
        inside = chunked_token_stats(h_prefix[:, :-1], weight, prefix[:, 1:], chunk_tokens)  # positions 1 .. P-1
        results: list = [None] * len(rows)
        rest = [list(r[shared:]) for r in rows]  # each row after the prefix, possibly empty
        for batch in length_sorted_batches([max(len(r), 1) for r in rest], max_batch_tokens):
            tokens, mask = pad_right([rest[i] or [0] for i in batch])  # [B, S]
            B, S = tokens.shape
            ahead = copy.deepcopy(cache)
            ahead.batch_repeat_interleave(B)
            h_rest = decoder(
                input_ids=tokens,
                attention_mask=torch.cat([torch.ones(B, shared, dtype=torch.long), mask.long()], 1),
                position_ids=shared + torch.arange(S).expand(B, S),
                cache=ahead,
                use_cache=True,
            ).last_hidden_state  # [B, S, H]
            # position P + s is predicted by the hidden state at P + s - 1: the prefix's last, then the row's own
            before = torch.cat([h_prefix[:, -1:].expand(B, 1, -1), h_rest[:, :-1]], 1)
            st = chunked_token_stats(before, weight, tokens, chunk_tokens)  # positions P .. P + S - 1
            for b, i in enumerate(batch):
                results[i] = _row_stats(inside, 0, shared, st, b, len(rest[i]))
        return results

    return with_prefix


def _row_stats(inside, g: int, shared: int, own, b: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen [T], logz [T])`` of one row read with a shared prefix: 0 at position 0, then positions 1 ..
    ``shared`` − 1 from row ``g`` of the prefixes' statistics ``inside``, then the row's own ``n`` remainder
    positions from row ``b`` of ``own``."""
    return tuple(
        torch.cat([torch.zeros(1), part[g, : shared - 1].float(), mine[b, :n].float()])
        for part, mine in ((inside.chosen_logits, own.chosen_logits), (inside.logz, own.logz))
    )


def megatron_stats_fn(model) -> StatsFn:
    """``stats_fn`` of a single-stage megatron ``GPTModel`` (:func:`shiq_train.model.forward_stats`):
    ``(tokens [B, T], attention_mask [B, T]) -> (chosen [B, T], logz [B, T])`` (SHIQ_MATH §2).

    Its causal mask makes real positions independent of right padding; padded ones are set to 0.
    Call inside an initialised ``shiq_train.parallel.distributed()`` context.
    """
    model.eval()

    def stats(tokens: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention_mask = attention_mask.bool()  # (0/1 integers, as transformers takes it, or bool)
        with torch.no_grad():
            st = forward_stats(model, tokens)
        return (
            st.chosen_logits.float().masked_fill(~attention_mask, 0.0),
            st.logz.float().masked_fill(~attention_mask, 0.0),
        )

    return stats


def model_tokenizer_info(model: str | None) -> dict | None:
    """The tokenizer info (``shiq_data.tokenizers.load_tokenizer``) a model carries: ``smollm2``'s tokenizer, a
    Hugging Face folder's tokenizer files; None for a randomly initialised model (``none``) or a folder without
    tokenizer files (then only the vocabulary size can be checked)."""
    if model in (None, "none"):
        return None
    if model != "smollm2" and not any((Path(model) / f).is_file() for f in TOKENIZER_FILES):
        return None
    return load_tokenizer(model)[1]


def check_tokenizer_matches(
    buffer_info: dict, model_info: dict | None, model_vocab_size: int | None, buffer_dir, role: str = "reference model"
) -> None:
    """Refuse a model (``role`` names it in the message) whose tokenizer is not the one the buffer was built
    with, and one whose vocabulary is smaller than the buffer's tokenizer (its ids would index past the
    embedding). ``model_info`` None (no tokenizer known) or ``model_vocab_size`` None skip that check. A
    tokenizer of the same vocabulary with another pipeline (``shiq_data.tokenizers.pipeline_fingerprint``,
    when both record one) is a warning: the buffer's ids stay valid, but text the model's tokenizer encodes
    (prompts in evaluation) may be split otherwise than the buffer's rows were; so is another chat template
    (``chat_template_fingerprint``), which lays conversations out otherwise."""
    if model_info is not None and model_info["fingerprint"] != buffer_info["fingerprint"]:
        raise ValueError(
            f"{buffer_dir}: built with tokenizer {buffer_info.get('name')!r} (fingerprint "
            f"{buffer_info['fingerprint'][:12]}…) but the {role}'s tokenizer {model_info['name']!r} has "
            f"fingerprint {model_info['fingerprint'][:12]}…; use the model the buffer was tokenised for"
        )
    if model_info is not None and pipeline_mismatch(buffer_info, model_info):
        log.warning(
            f"{buffer_dir}: built with tokenizer {buffer_info.get('name')!r}, whose vocabulary the {role}'s "
            f"{model_info['name']!r} shares but not its pipeline (pipeline fingerprint "
            f"{buffer_info[PIPELINE_FIELD][:12]}… against {model_info[PIPELINE_FIELD][:12]}…): text it encodes may be "
            "split otherwise than the buffer's rows were"
        )
    if model_info is not None and template_mismatch(buffer_info, model_info):
        log.warning(
            f"{buffer_dir}: built with tokenizer {buffer_info.get('name')!r}, whose chat template the {role}'s "
            f"{model_info['name']!r} does not share (chat template fingerprint "
            f"{(buffer_info[CHAT_TEMPLATE_FIELD] or 'none')[:12]} against {(model_info[CHAT_TEMPLATE_FIELD] or 'none')[:12]}): "
            "conversations it renders (prompts in evaluation) are laid out otherwise than any of the buffer's "
            "rendered through a template were"
        )
    if model_vocab_size is not None and model_vocab_size < int(buffer_info["vocab_size"]):
        raise ValueError(
            f"{buffer_dir}: its tokenizer {buffer_info.get('name')!r} has {buffer_info['vocab_size']} tokens but the "
            f"{role}'s vocabulary has only {model_vocab_size}; use a model with at least that many"
        )


def _model_config(model: str):
    """The Hugging Face config of ``--model`` without loading its weights."""
    from transformers import AutoConfig  # heavy: only loading a model needs it

    if model == "smollm2":
        path = smollm2_gguf()
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoConfig.from_pretrained(str(model))


def model_name(model: str) -> str:
    """How a reference record names ``--model``: ``smollm2``, or the folder's resolved path."""
    return model if model == "smollm2" else str(Path(model).resolve())


def model_weight_files(model: str) -> list[Path]:
    """The weight files of a model named as ``init=``, ``--model`` and ``--reference`` name it: SmolLM2's GGUF
    file, or a Hugging Face folder's weight files (what a value model records of its reference, and what
    ``shiq-eval run`` hashes as the reference's)."""
    return [smollm2_gguf()] if model == "smollm2" else weight_files(Path(model))


def weights_sha256(folder) -> str:
    """What a reference record keeps of a model folder's weights: the SHA-256 of its weight files."""
    return sha256_files(weight_files(Path(folder)))


# config.json fields that do not change the model's logits: written by whichever transformers saved it, and
# the precision, which a reference record keeps as its ``dtype`` (the one the statistics were computed in)
_CONFIG_NOT_MODEL = ("transformers_version", "_name_or_path", "torch_dtype", "dtype")


def config_sha256(folder) -> str:
    """What a reference record keeps of a model folder's config.json: the SHA-256 of its fields (sorted, without
    :data:`_CONFIG_NOT_MODEL`), since the same weights under another config (rotary base or scaling, norm
    epsilon) give other logits. The folder's config must have been read already (by the model's loading)."""
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    fields = {k: v for k, v in config.items() if k not in _CONFIG_NOT_MODEL}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def require_model_folder(model: str) -> None:
    """Refuse a ``--model`` that is neither ``smollm2`` nor a folder with a config.json, naming the option (checked
    before its tokenizer is loaded, whose refusal would name a tokenizer and offer ``gpt2``, no model)."""
    if model != "smollm2" and not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {model!r}: expected smollm2 or a Hugging Face model folder, but "
            f"{Path(model) / 'config.json'} does not exist"
        )


def load_reference(model: str, megatron_checkpoint: str | None, tok_info: dict, dtype=torch.float32, before_load=None):
    """``(hf_model, ref_model_record)`` for ``--model`` (``smollm2`` or a Hugging Face folder), or, with
    ``megatron_checkpoint``, that model's architecture holding the weights of a training checkpoint
    (its newest step, or a step folder); the model's parameters in ``dtype``. The record names a folder by its
    path and the SHA-256 of its weights and of its config.json (a folder refilled or reconfigured since holds
    another model, whose statistics a buffer may not mix with the old ones). ``before_load(record)``, if given, is called with the record but the
    SHA-256 after the quick checks and before the slow reading of the weights (to refuse what the record
    already shows wrong)."""
    require_model_folder(model)
    record = {
        "model": model_name(model),
        "tokenizer": tok_info["fingerprint"],
    }
    if megatron_checkpoint:
        step_dir = Path(megatron_checkpoint)
        if not (step_dir / "meta.json").is_file():  # a run, or its checkpoints folder, rather than one step
            folder = step_dir / "checkpoints" if (step_dir / "checkpoints").is_dir() else step_dir
            step_dir = latest_step_dir(folder)
            if step_dir is None:
                raise FileNotFoundError(
                    f"--megatron-checkpoint {megatron_checkpoint}: no checkpoint step found (give a shiq-train run, "
                    "its checkpoints folder or a step folder)"
                )
        record["megatron_checkpoint"] = str(step_dir.resolve())
        config = _model_config(model)
        check_same_architecture(step_dir, config, model)
        check_same_tokenizer(step_dir, tok_info, model)
        if before_load is not None:
            before_load(dict(record))
        hf = hf_model_from_checkpoint(step_dir, config, dtype)  # (its rank files' checksums checked)
        sums = sorted(step_dir.glob(f"rank_*_dp0.pt{CHECKSUM_SUFFIX}"))  # each rank file's, checked just now
        digests = "".join(f.read_text(encoding="utf-8").split()[0].lower() + "\n" for f in sums)
        record["sha256"] = hashlib.sha256(digests.encode()).hexdigest()
        if model != "smollm2":  # the architecture's config: another rotary base is another model
            record["config_sha256"] = config_sha256(model)
        return hf, record
    if before_load is not None:
        before_load(dict(record))
    if model != "smollm2":  # the folder's weights, not only its path: a folder refilled since is another model
        record["sha256"] = weights_sha256(model)
    hf = load_causal_lm(model, dtype)[0]
    if model != "smollm2":  # and its config, read by the loading (the same weights under another config differ)
        record["config_sha256"] = config_sha256(model)
    return hf, record


_ARCHITECTURE = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",  # (Qwen3's may differ from hidden_size / num_attention_heads)
    "vocab_size",  # (the embedding's rows: another size cannot be read either)
    "tie_word_embeddings",  # (an output layer of its own, or the embedding's)
)


def check_same_architecture(step_dir: Path, config, model: str) -> None:
    """Refuse a ``--megatron-checkpoint`` whose run trained another architecture (its ``meta.hf_config``) than
    ``--model``'s ``config``, naming the model type, sizes (the vocabulary's too), tied output layer and rotary embeddings
    that differ: its weights cannot be read into that model (the error would otherwise come from the loading, and
    read as a damaged checkpoint or an edited meta.json)."""
    saved = (read_meta(step_dir).get("meta") or {}).get("hf_config")
    if not isinstance(saved, dict):
        return  # (hf_model_from_checkpoint names what is wrong with the weights)
    differ = [
        f"{k} {saved.get(k)} against {getattr(config, k, None)}"
        for k in _ARCHITECTURE
        if saved.get(k) is not None and saved.get(k) != getattr(config, k, None)
    ]
    kind = getattr(config, "model_type", None)
    kind = "llama" if kind == "mistral" else kind  # (a run records a Mistral folder as the Llama model it is)
    if isinstance(saved.get("model_type"), str) and kind is not None and saved["model_type"] != kind:
        differ.insert(0, f"model_type {saved['model_type']!r} against {kind!r}")  # (Qwen3's norms, Qwen2's biases)
    differ += _rope_differences(saved, config)
    if differ:
        raise ValueError(
            f"--megatron-checkpoint {step_dir}: its run trained another model than --model {model} "
            f"({', '.join(differ)}): give as --model the model the run started from"
        )


def check_same_tokenizer(step_dir: Path, tok_info: dict, model: str) -> None:
    """Refuse a ``--megatron-checkpoint`` whose run trained on another tokenizer (its ``meta.tokenizer``'s
    fingerprint) than ``--model``'s, which is the buffer's: its weights learned other token ids, and the
    statistics would be computed, and stored, without a word."""
    saved = (read_meta(step_dir).get("meta") or {}).get("tokenizer")
    if not isinstance(saved, dict) or saved.get("fingerprint") in (None, tok_info["fingerprint"]):
        return  # (a run that recorded no tokenizer: the architecture check is all there is)
    raise ValueError(
        f"--megatron-checkpoint {step_dir}: its run trained on tokenizer {saved.get('name')!r} (fingerprint "
        f"{str(saved['fingerprint'])[:12]}…), not on --model {model}'s and the buffer's {tok_info.get('name')!r} "
        f"(fingerprint {str(tok_info['fingerprint'])[:12]}…): give a run trained on a buffer of this tokenizer"
    )


def _rope_differences(saved: dict, config) -> list[str]:
    """How the rotary embeddings of a run's recorded ``hf_config`` (``saved``) and of ``--model``'s ``config``
    differ (their base ``rope_theta``, Llama 3's scaling factor): the weights would read, and the logits be
    another model's. Nothing when either config is one the import refuses (that refusal names it)."""
    try:
        theirs, mine = model_config_from_llama(hf_config_from_dict(saved)), model_config_from_llama(config)
    except (ValueError, TypeError):
        return []
    out = []
    if theirs.rotary_base != mine.rotary_base:
        out.append(f"rope_theta {theirs.rotary_base:g} against {mine.rotary_base:g}")
    if theirs.rope_scaling_factor != mine.rope_scaling_factor:
        kind = {None: "none"}
        out.append(
            f"llama3 rope scaling factor {kind.get(theirs.rope_scaling_factor, theirs.rope_scaling_factor)} against "
            f"{kind.get(mine.rope_scaling_factor, mine.rope_scaling_factor)}"
        )
    return out


def longest_row(buffer) -> int:
    """The token count of the longest trajectory of ``buffer`` (an opened buffer, or its folder)."""
    buffer = open_buffer(buffer) if isinstance(buffer, (str, Path)) else buffer
    lengths = [pc.max(pc.list_value_length(t.column("tokens"))).as_py() for t in buffer.shard_tables]
    return max([n for n in lengths if n is not None], default=0)


def context_warning(buffer_dir, hf_config, model: str) -> str | None:
    """What to warn of when the buffer's longest row is longer than the reference's ``max_position_embeddings``:
    rotary positions go on past it, but the model was not trained there (a config that stretches its context,
    or a run trained longer, may read them well). None otherwise, or when the config gives no length."""
    limit = getattr(hf_config, "max_position_embeddings", None)
    longest = longest_row(buffer_dir)
    if not isinstance(limit, int) or longest <= limit:
        return None
    return (
        f"{buffer_dir}: its longest row has {longest} tokens, more than the {limit} positions of {model} "
        "(max_position_embeddings): the statistics past them come from positions the model may never have read"
    )


def refuse_unreadable_rows(model, buffer_dir, name: str) -> None:
    """Refuse (``ValueError`` naming the shard, row and field) a buffer whose longest row ``model`` cannot read at
    all: learned absolute position embeddings (GPT-2's) end at ``max_position_embeddings``, where rotary ones go
    on. Tried on that row's length with the model's body (no output layer), before any shard is computed: the
    batch holding the row would otherwise end the run in torch's IndexError, after the shards before it."""
    buffer = open_buffer(buffer_dir, verify_checksums=False)  # (checked by the caller's open_buffer)
    longest, where = 0, None
    for path, table in zip(buffer.shard_paths, buffer.shard_tables):
        lengths = pc.list_value_length(table.column("tokens")).to_numpy(zero_copy_only=False)
        if len(lengths) and int(lengths.max()) > longest:
            longest, where = int(lengths.max()), (path, int(lengths.argmax()))
    try:
        with torch.no_grad():
            model.base_model(input_ids=torch.zeros(1, longest, dtype=torch.long))
    except (IndexError, RuntimeError) as e:
        limit = getattr(model.config, "max_position_embeddings", None)
        raise ValueError(
            f"{where[0]}: row {where[1]}: field 'tokens': {longest} tokens, more than {name} can read (its "
            f"max_position_embeddings is {limit}: {one_line(e, 100)}); give a model of at least that many positions"
        ) from None


def run(args: argparse.Namespace) -> int:
    """Compute, check and report."""
    buffer = open_buffer(args.buffer)
    if args.threads:
        torch.set_num_threads(args.threads)
    require_model_folder(args.model)
    _, tok_info = load_tokenizer(args.model)
    check_tokenizer_matches(buffer.tokenizer_info, tok_info, None, args.buffer)  # before the slow model load

    # a buffer of another reference's statistics (name, checkpoint, dtype) is refused before the slow model load
    # too, and once the weights are read, one of other weights (their SHA-256)
    def refuse_other(record: dict) -> None:
        refuse_other_reference(args.buffer, {**record, "dtype": args.dtype})

    hf, record = load_reference(args.model, args.megatron_checkpoint, tok_info, DTYPES[args.dtype], refuse_other)
    check_tokenizer_matches(buffer.tokenizer_info, None, int(hf.config.vocab_size), args.buffer)  # its vocabulary
    if not args.megatron_checkpoint and (warning := context_warning(args.buffer, hf.config, args.model)):
        refuse_unreadable_rows(hf, args.buffer, args.model)
        log.warning(f"shiq-train ref-stats: {warning}")  # (a checkpoint may have trained longer than its --model)
    done = compute_ref_stats(
        args.buffer,
        hf_stats_fn(hf),
        ref_model=record,
        max_batch_tokens=args.batch_tokens,
        progress=not args.no_progress,
        dtype=args.dtype,
    )
    final = open_buffer(args.buffer)
    print(
        f"{args.buffer}: reference statistics of {record['model']} computed for {len(done)} shard{'s' * (len(done) != 1)}; "
        f"{sum(s['has_ref'] for s in final.manifest['shards'])}/{len(final.manifest['shards'])} shards have them"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="shiq-train ref-stats",
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
        help="take the weights from this shiq-train run or its checkpoints folder (the newest step), or a step folder; "
        "--model then gives the architecture and tokenizer",
    )
    p.add_argument(
        "--batch-tokens",
        type=int_at_least(1),
        default=DEFAULT_BATCH_TOKENS,
        help="padded tokens per forward pass (batch rows x longest row); default %(default)s",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="precision to run the reference in, recorded in the manifest; it must be the model.params_dtype "
        "of the training that reads the statistics (default %(default)s)",
    )
    p.add_argument(
        "--threads", type=int_at_least(0, THREADS_MAX), default=0, help="torch CPU threads (default 0: torch's choice)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_log_level_option(p)
    return p


def main(argv: list[str]) -> int:
    """``shiq-train ref-stats BUFFER --model ...``: errors are one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "log_level", "INFO"))
    if not progress_bars_shown(getattr(args, "log_level", "INFO")):  # WARNING or ERROR: warnings only
        args.no_progress = True
    if args.no_progress:
        hide_library_progress_bars()
    return run_command("shiq-train ref-stats", run, args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
