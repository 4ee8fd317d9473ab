"""Sampling from a policy, batched, with a KV cache: the one interface evaluation needs.

A policy is anything with ``generate(prompt_ids, cfg) -> completion_ids`` and ``eos_id``. ``HFPolicy``
wraps a Hugging Face causal LM (a decoding loop through its KV cache); ``MegatronPolicy`` samples the
trainer's megatron-core ``GPTModel`` directly, tensor-parallel shards included, with megatron's
static KV cache. Token ids in, token ids out: chat templating belongs to the caller, so the same
prompts reach every model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from shiq_data.ref_stats import common_prefix
from shiq_eval.suite import TEMPERATURE_MIN
from shiq_train.model import causal_mask, model_inputs, unwrap


@dataclass
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 1.0  # 0 means greedy; else finite and at least TEMPERATURE_MIN
    top_p: float = 1.0
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature == 0 or TEMPERATURE_MIN <= self.temperature < math.inf):  # (NaN fails both)
            raise ValueError(
                f"temperature must be 0 (greedy) or a finite number >= {TEMPERATURE_MIN:g}, got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def in_batches(items: list, cfg: SamplingConfig, progress: bool, run_batch, journal=None) -> list:
    """The batches every policy's sampling and every evaluation go through: ``items`` in batches of
    ``cfg.batch_size``, in order, batch ``i`` run as ``run_batch(batch, first, seed)`` under seed ``cfg.seed + i``
    (``first`` the index of its first item), so a batch's result depends on nothing else that runs. With ``journal``
    (``get(i, batch)``: batch ``i``'s result saved earlier, or None; ``put(i, batch, result)``), a batch the journal
    has is not run, and each one run is given to it: a run interrupted part-way resumes at its first batch not
    saved. Returns the batches' results, in order."""
    out = []
    starts = range(0, len(items), cfg.batch_size)
    for i, start in enumerate(tqdm(starts, desc="generate", disable=not progress)):
        batch = items[start : start + cfg.batch_size]
        result = journal.get(i, batch) if journal is not None else None
        if result is None:
            result = run_batch(batch, start, cfg.seed + i)
            if journal is not None:
                journal.put(i, batch, result)
        out.append(result)
    return out


def check_not_empty(prompt_ids: list[list[int]]) -> None:
    """Refuse (``ValueError`` naming it) an empty prompt, before any batch is sampled."""
    empty = next((j for j, p in enumerate(prompt_ids) if not p), None)
    if empty is not None:
        raise ValueError(f"prompt {empty} is empty")


def generate_in_batches(
    prompt_ids: list[list[int]], cfg: SamplingConfig, progress: bool, eos_id: int, generate_batch
) -> list[list[int]]:
    """What every policy's ``generate`` promises: batches of ``cfg.batch_size`` in order, batch ``i`` sampled
    under seed ``cfg.seed + i`` (:func:`in_batches`: so results do not depend on what else runs, and one batch
    sampled alone under ``cfg.seed + i`` is batch ``i``), empty prompts refused, each completion cut after its first
    end-of-sequence token (kept). ``generate_batch(batch, first, seed)`` returns the raw completion ids of one
    batch whose first prompt has index ``first``."""
    check_not_empty(prompt_ids)

    def run_batch(batch, first, seed):
        return [cut_at_eos(row, eos_id) for row in generate_batch(batch, first, seed)]

    return [row for rows in in_batches(prompt_ids, cfg, progress, run_batch) for row in rows]


def generate_with_kls_in_batches(
    prompt_ids: list[list[int]], cfg: SamplingConfig, progress: bool, eos_id: int, generate_batch
) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """:func:`generate_in_batches` for a sampling pass that also gives each completion's KL estimators
    (SHIQ_MATH §6): ``generate_batch(batch, first, seed)`` returns ``(raw completion ids [B], sample [B], exact
    [B])``; returns ``(completions, sample [N], exact [N])`` float64."""
    check_not_empty(prompt_ids)

    def run_batch(batch, first, seed):
        rows, sample, exact = generate_batch(batch, first, seed)
        return [cut_at_eos(row, eos_id) for row in rows], sample, exact

    batches = in_batches(prompt_ids, cfg, progress, run_batch)
    if not batches:
        return [], torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    completions, sample, exact = zip(*batches)
    return [row for rows in completions for row in rows], torch.cat(sample), torch.cat(exact)


def cut_at_eos(row: list[int], eos_id: int) -> list[int]:
    """``row`` up to and including its first ``eos_id`` (all of it when there is none)."""
    return row[: row.index(eos_id) + 1] if eos_id in row else row


def overlong_prompt(prompt_ids: list[list[int]], max_new_tokens: int, limits: list) -> tuple[int, int] | None:
    """``(index, limit)`` of the first prompt whose tokens plus ``max_new_tokens`` pass the smallest of ``limits``
    (the models' ``max_position_embeddings``; those that are not integers are not known), or None: past that
    limit come positions a model never learnt."""
    limit = min((n for n in limits if isinstance(n, int) and not isinstance(n, bool)), default=None)
    if limit is None:
        return None
    return next(((j, limit) for j, p in enumerate(prompt_ids) if len(p) + max_new_tokens > limit), None)


def check_positions(prompt_ids: list[list[int]], cfg: SamplingConfig, models) -> None:
    """Refuse (one-line ``ValueError`` naming the prompt) a prompt :func:`overlong_prompt` finds for ``models``."""
    limits = [getattr(getattr(m, "config", None), "max_position_embeddings", None) for m in models]
    found = overlong_prompt(prompt_ids, cfg.max_new_tokens, limits)
    if found is not None:
        j, limit = found
        whose = "the models'" if len(models) > 1 else "the model's"
        raise ValueError(
            f"prompt {j} of the {len(prompt_ids)} sampled (each prompt once per sample): {len(prompt_ids[j])} tokens "
            f"+ max_new_tokens {cfg.max_new_tokens} exceed {whose} max_position_embeddings {limit}"
        )


class HFPolicy:
    """A Hugging Face causal LM as a policy. Prompts are left-padded within a batch; the prompt is read in one
    pass, then each new token through the model's KV cache, and every token is drawn by :func:`sample_next`
    under a generator seeded per batch (the draw function :class:`MegatronPolicy` uses too).

    With ``share_prefix`` (the default), a prompt that comes several times in a batch (several completions of
    one prompt) is read once, and the leading tokens that every prompt of a batch shares (a system turn and an
    instruction, say) are read once, their keys and values copied to every row (:meth:`_read_prompts`): the
    same attention, in float rounding; the main job's prompts share 34 of their 46 to 54 tokens, which makes
    its sampling 1.38x faster (``tools/bench_generate.py``)."""

    def __init__(self, model, eos_id: int, pad_id: int | None = None, share_prefix: bool = True):
        self.model = model.eval()
        self.eos_id = int(eos_id)
        self.pad_id = int(eos_id if pad_id is None else pad_id)
        self.share_prefix = share_prefix and not sliding_window_acts(model.config)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], cfg: SamplingConfig, progress: bool = False) -> list[list[int]]:
        """Completion token ids per prompt (see :func:`generate_in_batches` for batching and seeds)."""
        self.check_prompts(prompt_ids, cfg)
        return generate_in_batches(
            prompt_ids, cfg, progress, self.eos_id, lambda batch, first, seed: self._generate_batch(batch, cfg, seed)
        )

    def check_prompts(self, prompt_ids: list[list[int]], cfg: SamplingConfig) -> None:
        """Refuse a prompt whose tokens plus ``cfg.max_new_tokens`` pass the model's ``max_position_embeddings``
        (every policy has this check: an evaluation that samples batch by batch runs it once over all prompts,
        so the prompt is named by its index among them)."""
        check_positions(prompt_ids, cfg, [self.model])

    def _read_prompts(self, batch: list[list[int]]):
        """``(cache, logits [B, V], attention_mask, position_ids)`` after the prompts: :func:`read_prompts`."""
        return read_prompts(partial(lm_forward, self.model), batch, self.pad_id, share_prefix=self.share_prefix)

    def _read_distinct(self, batch: list[list[int]]):
        """:meth:`_read_prompts` without looking for repeated prompts: :func:`read_distinct`."""
        return read_distinct(partial(lm_forward, self.model), batch, self.pad_id, share_prefix=self.share_prefix)

    def _generate_batch(
        self, batch: list[list[int]], cfg: SamplingConfig, seed: int, prefill=None, keep_logits: list | None = None
    ) -> list[list[int]]:
        """Raw completions of one batch (rows end at ``cfg.max_new_tokens`` or pad after their EOS; the batch
        stops early once every row has ended). ``prefill(ids [B, W], attention_mask [B, W], position_ids [B, W])
        -> (cache, logits [B, V])`` reads the left-padded prompts in place of one plain forward pass (it must
        return what that pass would: the KV cache of every layer and the last position's logits).
        ``keep_logits`` receives the model's logits ``[B, V]`` each token was drawn from (before temperature)."""
        B = len(batch)
        if prefill is None:
            cache, logits, attn, positions = self._read_prompts(batch)
        else:
            ids, attn, positions = left_padded(batch, self.pad_id)
            cache, logits = prefill(ids, attn, positions)
        generator = torch.Generator().manual_seed(seed)
        done = torch.zeros(B, dtype=torch.bool)
        pos = positions[:, -1:] + 1  # [B, 1]
        drawn = []
        for step in range(cfg.max_new_tokens):
            if keep_logits is not None:
                keep_logits.append(logits)
            token = sample_next(logits, cfg, generator).masked_fill(done, self.pad_id)  # [B]
            drawn.append(token)
            done |= token == self.eos_id
            if step == cfg.max_new_tokens - 1 or bool(done.all()):
                break
            attn = torch.cat([attn, torch.ones(B, 1, dtype=attn.dtype)], 1)
            out = self.model(
                input_ids=token[:, None], attention_mask=attn, position_ids=pos, cache=cache, use_cache=True
            )
            cache, logits, pos = out.cache, out.logits[:, -1], pos + 1
        return torch.stack(drawn, 1).tolist()


def lm_forward(model, ids, attn, positions, cache):
    """A Hugging Face causal LM over ``ids`` ``[B, S]`` after ``cache`` (None: a new one): ``(cache, logits
    [B, V])`` at the last position (with the model bound, :func:`read_prompts`' ``forward``)."""
    out = model(
        input_ids=ids, attention_mask=attn, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
    )
    return out.cache, out.logits[:, -1]


def sliding_window_acts(config) -> bool:
    """Whether some attention layer of the transformers ``config`` sees only a sliding window of the keys (Mistral
    v0.1, Gemma 2 and 3, Qwen with ``use_sliding_window``). Such a model does not read shared prompt tokens once
    (:func:`read_distinct`'s ``[shared | padding | own]`` layout): transformers measures its window in cache
    positions, padding included, so a row would attend to other tokens than it does alone; one left-padded pass
    gives the model's own attention."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool):
        return False
    kinds = getattr(config, "layer_types", None)
    return kinds is None or any(kind != "full_attention" for kind in kinds)


def read_prompts(forward, batch: list[list[int]], pad_id: int, *, share_prefix: bool = True, device=None):
    """Read a batch of prompts into a KV cache: ``(cache, last [B, ...] or None, attention_mask [B, W],
    position_ids [B, S])``, ``S`` the tokens of the last pass and ``W`` all the cache's positions.

    ``forward(input_ids [B, S], attention_mask [B, P + S] or None, position_ids [B, S] or None, cache)`` runs a
    model over ``S`` new tokens after the ``P`` that ``cache`` holds (None: it makes a new cache) and returns
    ``(cache, its output at the last position [B, ...] or None)``. Without ``share_prefix``: one pass over
    the left-padded batch. With it (the default), a prompt that comes several times in the batch is read once
    and its cache, output, mask and positions copied to every row that repeats it, and the leading tokens all
    distinct prompts share are read once (:func:`read_distinct`): the same attention, in float rounding."""
    if not share_prefix:
        return read_distinct(forward, batch, pad_id, share_prefix=False, device=device)
    first: dict[tuple, int] = {}
    rows = [first.setdefault(tuple(p), len(first)) for p in batch]  # row j repeats distinct prompt rows[j]
    if len(first) == len(batch):
        return read_distinct(forward, batch, pad_id, device=device)
    cache, last, attn, positions = read_distinct(forward, [list(p) for p in first], pad_id, device=device)
    index = torch.tensor(rows, device=device)
    cache.reorder_cache(index)  # [D, h, W, d] -> [B, h, W, d] in every layer
    return cache, None if last is None else last[index], attn[index], positions[index]


def read_distinct(forward, batch: list[list[int]], pad_id: int, *, share_prefix: bool = True, device=None):
    """:func:`read_prompts` for a batch, repeated prompts or not: one pass over it left-padded; or, with
    ``share_prefix``, the ``C`` leading tokens every prompt shares (all but the shortest prompt's last) once as a
    batch of one, their keys and values repeated for every row, then each row's rest, left-padded after them
    (``[C shared | padding | own tokens]``; positions continue at ``C``, the padding masked)."""
    B = len(batch)
    shared = common_prefix(batch) if share_prefix and B > 1 else 0
    shared = min(shared, min(len(p) for p in batch) - 1)  # every row reads a token of its own last
    if shared < 1:
        ids, attn, positions = left_padded(batch, pad_id, device)
        cache, last = forward(ids, attn, positions, None)
        return cache, last, attn, positions
    cache, _ = forward(torch.tensor([batch[0][:shared]], device=device), None, None, None)
    cache.batch_repeat_interleave(B)  # [1, h, C, d] -> [B, h, C, d] in every layer
    ids, own, positions = left_padded([p[shared:] for p in batch], pad_id, device)  # [B, S]
    attn = torch.cat([torch.ones(B, shared, dtype=own.dtype, device=device), own], 1)  # [B, C + S]
    cache, last = forward(ids, attn, positions + shared, cache)
    return cache, last, attn, positions + shared


def left_padded(batch: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask, position_ids)``, each ``[B, W]`` (on ``device``): the prompts left-padded to the
    longest, the padding masked and given no position."""
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((len(batch), width), dtype=torch.long, device=device)
    for j, p in enumerate(batch):
        ids[j, width - len(p) :] = torch.tensor(p)
        attn[j, width - len(p) :] = 1
    return ids, attn, (attn.cumsum(-1) - 1).clamp(min=0)


def sample_next(
    logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None, u: torch.Tensor | None = None
) -> torch.Tensor:
    """One token per row from ``logits`` ``[B, V]``: argmax when ``cfg.temperature == 0``, else a draw
    from ``softmax(logits / temperature)`` restricted to the nucleus, the smallest set of most likely
    tokens whose probability reaches ``cfg.top_p`` (renormalised), at ``u`` (:func:`draw`). Returns ``[B]``
    int64."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # the most likely token always stays (mass_before 0)
        sorted_logits = sorted_logits.masked_fill(mass_before >= cfg.top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return draw(logits.softmax(dim=-1), generator, u)


def uniforms(rows: int, generator: torch.Generator, device=None) -> torch.Tensor:
    """The ``[rows, 1]`` float64 uniform numbers :func:`draw` inverts at, one per row, from ``generator``."""
    return torch.rand(rows, 1, generator=generator, dtype=torch.float64, device=device)


def draw(probs: torch.Tensor, generator: torch.Generator | None, u: torch.Tensor | None = None) -> torch.Tensor:
    """One index per row of ``probs`` ``[B, V]`` (rows summing to about 1), index ``i`` with probability
    ``probs[:, i]``, by inverting the cumulative distribution (in float64) at one uniform number per row
    (``u`` ``[B, 1]`` float64, by default :func:`uniforms` of ``generator``): the same law as
    ``torch.multinomial(probs, 1)``, without its ``V`` random numbers per row (on 2 CPU threads, 37 ms per draw
    for a batch of 32 over a 49k vocabulary, against 1 ms). Returns ``[B]`` int64."""
    cdf = probs.double().cumsum(-1)  # [B, V]
    total = cdf[:, -1]
    if not bool(torch.isfinite(total).all()) or bool((total <= 0).any()):
        raise ValueError("draw: a row of probabilities is NaN, infinite or all zero")
    if u is None:
        u = uniforms(probs.shape[0], generator, probs.device)
    picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0]  # the first index whose cdf exceeds u
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)  # rounding at u ~ 1: the last possible index
    return torch.minimum(picked, last)


class MegatronPolicy:
    """A megatron-core ``GPTModel`` (as built by :func:`shiq_train.model.build_model`) as a policy.

    Sampling runs the model with megatron's ``StaticInferenceContext`` (a KV cache per layer) the
    way megatron's own static engine does: prompts are right-padded, decoding starts at the shortest
    prompt, and a row keeps its own prompt tokens until its prompt ends, so no row ever attends to
    padding and positions are exact. Under tensor parallelism every rank of the group calls
    ``generate`` with the same prompts; logits are gathered over the vocabulary shards and the
    token drawn on tensor-parallel rank 0 is broadcast, so all ranks return the same completions.
    Pipeline parallelism is refused (sample from a ``pp=1`` layout, or export to Hugging Face with
    :mod:`shiq_train.export`). ``vocab_size`` (default: the model's) excludes padded vocabulary rows.

    Each row's ``t``-th token is drawn at the uniform number :class:`HFPolicy` draws it at (the row's entry of
    the generator's ``t``-th batch of :func:`uniforms`), whatever the lengths of the other prompts of its
    batch: the two engines sample the same completions up to float rounding of the logits.
    """

    def __init__(self, model, eos_id: int, pad_id: int | None = None, vocab_size: int | None = None):
        self.model = unwrap(model)
        self.eos_id = int(eos_id)
        self.pad_id = int(eos_id if pad_id is None else pad_id)
        self.vocab_size = int(vocab_size or self.model.vocab_size)
        self.max_context = int(self.model.max_sequence_length)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], cfg: SamplingConfig, progress: bool = False) -> list[list[int]]:
        """Completion token ids per prompt (see :func:`generate_in_batches` for batching and seeds)."""
        from megatron.core import parallel_state as ps  # heavy: only megatron models need it

        if ps.model_parallel_is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
            raise ValueError(
                "MegatronPolicy: sampling under pipeline parallelism is not supported; build the "
                "model with pp=1 (tensor parallelism is fine) or export it to Hugging Face "
                "(shiq_train.export) and use HFPolicy"
            )
        was_training = self.model.training
        self.model.eval()
        try:
            return generate_in_batches(
                prompt_ids,
                cfg,
                progress,
                self.eos_id,
                lambda batch, first, seed: self._generate_batch(batch, first, cfg, seed),
            )
        finally:
            self.model.train(was_training)

    def check_prompts(self, prompt_ids: list[list[int]], cfg: SamplingConfig, first: int = 0) -> None:
        """Refuse a prompt whose tokens plus ``cfg.max_new_tokens`` pass the model's ``max_sequence_length``, named
        by its index (``first``: that of ``prompt_ids[0]`` among all the prompts sampled)."""
        for j, p in enumerate(prompt_ids):
            if len(p) + cfg.max_new_tokens > self.max_context:
                raise ValueError(
                    f"prompt {first + j}: {len(p)} tokens + max_new_tokens {cfg.max_new_tokens} exceed "
                    f"the model's max_sequence_length {self.max_context}"
                )

    def _generate_batch(self, batch: list[list[int]], first: int, cfg: SamplingConfig, seed: int) -> list[list[int]]:
        from megatron.core import parallel_state as ps  # heavy: only megatron models need it
        from megatron.core.inference.contexts import StaticInferenceContext  # heavy: megatron

        self.check_prompts(batch, cfg, first)
        device = next(self.model.parameters()).device
        B = len(batch)
        lens = torch.tensor([len(p) for p in batch], device=device)
        width = int(lens.max()) + cfg.max_new_tokens
        tokens = torch.full((B, width), self.pad_id, dtype=torch.long, device=device)
        for j, p in enumerate(batch):
            tokens[j, : len(p)] = torch.tensor(p, dtype=torch.long)
        ends = lens + cfg.max_new_tokens  # exclusive end of each row's completion
        positions = torch.arange(width, device=device)
        in_prompt = positions.unsqueeze(0) < lens.unsqueeze(1)  # [B, width]
        mask = causal_mask(width, device)
        context = StaticInferenceContext(B, width)
        generator = torch.Generator().manual_seed(seed)  # on the CPU, as HFPolicy's: a GPU's stream is another
        # as HFPolicy: the t-th token of every row at the t-th [B, 1] uniforms of the generator; a row whose prompt
        # is d tokens longer than the shortest draws its t-th token d positions later
        first = int(lens.min())
        u = torch.empty(width - first, B, 1, dtype=torch.float64, device=device)  # u[t]: the t-th uniforms
        rows = torch.arange(B, device=device)
        tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
        done = torch.zeros(B, dtype=torch.bool, device=device)
        start = 0
        for end in range(first, width):  # draw the token at position `end` from tokens[:, :end]
            if start > 0:
                context.enable_decode_mode()
            logits = self.model(
                tokens[:, start:end],
                positions[start:end].expand(B, -1),
                mask[..., start:end, :end],
                inference_context=context,
                runtime_gather_output=True,
            )  # [B, n, V]
            context.increment_sequence_len_offset(end - start)
            start = end
            at = None  # (greedy: no draw)
            if cfg.temperature > 0:
                u[end - first] = uniforms(B, generator).to(device)
                at = u[(end - lens).clamp(min=0), rows]  # [B, 1]: each row's completion token here (in its prompt: 0)
            drawn = sample_next(logits[:, -1, : self.vocab_size], cfg, None, at)
            if tp > 1:  # identical logits give identical draws; broadcasting makes it certain
                dist.broadcast(
                    drawn, src=ps.get_tensor_model_parallel_src_rank(), group=ps.get_tensor_model_parallel_group()
                )
            generating = ~in_prompt[:, end] & ~done & (end < ends)
            tokens[:, end] = torch.where(
                in_prompt[:, end], tokens[:, end], torch.where(generating, drawn, torch.full_like(drawn, self.pad_id))
            )
            done |= generating & (drawn == self.eos_id)
            if bool((done | (end + 1 >= ends)).all()):
                break
        return [tokens[j, int(lens[j]) : int(ends[j])].tolist() for j in range(B)]


class MegatronLogits:
    """A megatron-core ``GPTModel`` answering the call transformers models answer:
    ``model(input_ids=[B, T], attention_mask=[B, T], logits_to_keep=0).logits`` -> ``[B, T, V]`` float32
    (the last ``k`` positions, ``[B, k, V]``, for ``logits_to_keep=k > 0``), on the device of ``input_ids``
    (the model runs on its own).

    For the KL estimators (:func:`shiq_eval.evaluate.sequence_kls`). Rows must be right-padded: the
    causal mask then keeps every real position independent of the padding after it, and
    ``attention_mask`` is not needed. Logits are gathered over tensor-parallel shards (every rank of
    the group gets them whole); ``vocab_size`` (default: the model's) drops padded vocabulary rows.
    Build the model with ``logits_chunk_tokens=0`` (a chunked model returns hidden states).
    """

    def __init__(self, model, vocab_size: int | None = None):
        self.model = unwrap(model)
        if getattr(self.model, "return_hidden", False):
            raise ValueError(
                "MegatronLogits needs a model built with logits_chunk_tokens=0 (this one returns hidden states)"
            )
        self.vocab_size = int(vocab_size or self.model.vocab_size)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0):
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.model(**model_inputs(input_ids.to(device)), runtime_gather_output=True)
        finally:
            self.model.train(was_training)
        logits = logits[:, -logits_to_keep:] if logits_to_keep else logits  # the last positions, as transformers
        return SimpleNamespace(logits=logits[..., : self.vocab_size].float().to(input_ids.device))
