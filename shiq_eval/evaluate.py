"""Reward and KL of a policy on a fixed prompt set (SHIQ_MATH §6).

One pass per policy: sample completions (plain softmax: temperature 1, top-p 1, so the samples come
from the policy whose KL is reported), score them, then run the policy and the reference over
prompt + completion to get both KL estimators from the same sequences. When the policy holds the
reference's embeddings and first ``k`` decoder layers unchanged (a fine-tune of its last layers), the
policy does not run again (its logits are those sampling drew each token from) and only the reference's
layers after ``k`` do, over the completion tokens, from the hidden states sampling already computed
(:class:`SharedPrefixPolicy`).

With several samples per prompt (prompt-major: prompt ``i``'s ``s`` samples are completions ``i*s .. i*s+s-1``),
each mean's standard error is over prompts: a prompt's samples are averaged first, since they share the prompt
and are not independent draws (SHIQ_MATH §9).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch

from shiq_eval.generate import (
    HFPolicy,
    SamplingConfig,
    check_not_empty,
    cut_at_eos,
    generate_with_kls_in_batches,
    in_batches,
    left_padded,
)
from shiq_eval.kl import masked_kls, mean_stderr
from shiq_eval.optimum import whole_number
from shiq_eval.shared_layers import cache_from, decoder_from, inputs_of_layer, shared_prefix_layers


class SampledBatch(NamedTuple):
    """One batch of an evaluation (:func:`evaluate_samples`), what an interrupted one keeps: each completion's
    token ids (up to its first end-of-sequence token) and its two KL estimators (SHIQ_MATH §6)."""

    completions: list[list[int]]  # [B] token ids
    kl_sample: list[float]  # [B] float64
    kl_exact: list[float]  # [B] float64


@dataclass
class EvalResult:
    """Means of reward and both KL estimators (SHIQ_MATH §6), each with its standard error over prompts
    (a prompt's samples averaged first; SHIQ_MATH §9); ``n`` counts completions."""

    reward_mean: float
    reward_stderr: float
    kl_sample: float
    kl_sample_stderr: float
    kl_exact: float
    kl_exact_stderr: float
    n: int
    samples: list  # (prompt text, completion text, reward) of the first few prompts
    rewards: list | None = None  # every completion's reward, in prompt order (for paired comparisons)
    kls_exact: list | None = None  # every completion's exact per-token KL sum, in prompt order
    kls_sample: list | None = None  # every completion's sample KL estimate (log-ratio), in prompt order

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@torch.no_grad()
def sequence_kls(model, ref_model, prompt_ids, completion_ids, batch_size=16, pad_id=0):
    """Per-sequence KL estimates over the completion tokens: ``(sample [N], exact [N])`` (SHIQ_MATH §6).

    Rows are ``prompt + completion``, right-padded; position ``t``'s distribution comes from the
    logits at ``t − 1``. Only positions whose next token can be a completion token need the vocabulary:
    both models are asked for the logits of the batch's last ``T − s`` positions (``logits_to_keep``,
    ``s`` = the shortest prompt's length − 1), and :func:`shiq_eval.kl.masked_kls` runs the float64
    log-softmaxes at the completion tokens' positions only.
    """
    if len(prompt_ids) != len(completion_ids):  # (zip would drop the extra ones without a word)
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    for i, p in enumerate(prompt_ids):
        if not p:  # (its first completion token would have no position to be predicted from)
            raise ValueError(f"prompt {i} is empty")
    samples, exact = [torch.zeros(0, dtype=torch.float64)], [torch.zeros(0, dtype=torch.float64)]  # [0]: none
    for start in range(0, len(prompt_ids), batch_size):
        prompts = prompt_ids[start : start + batch_size]
        rows = [p + c for p, c in zip(prompts, completion_ids[start : start + batch_size])]
        T = max(len(r) for r in rows)
        tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), T), dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.bool)
        for i, (r, p) in enumerate(zip(rows, prompts)):
            tokens[i, : len(r)] = torch.tensor(r)
            attn[i, : len(r)] = 1
            mask[i, len(p) : len(r)] = True
        first = min(len(p) for p in prompts) - 1  # the first position that predicts a completion token
        keep = T - first  # logits of positions first .. T-1; the last one predicts nothing
        logits, ref_logits = (
            net(input_ids=tokens, attention_mask=attn, logits_to_keep=keep).logits[:, :-1] for net in (model, ref_model)
        )  # [B, T-1-first, V]
        sample, exact_kl = masked_kls(logits, ref_logits, tokens[:, first + 1 :], mask[:, first + 1 :])
        samples.append(sample)
        exact.append(exact_kl)
    return torch.cat(samples), torch.cat(exact)


def evaluate_policy(
    model,
    ref_model,
    tokenizer,
    prompt_ids: list[list[int]],
    prompt_texts: list[str],
    scorer,
    *,
    batch_size=16,
    sampler=None,
    prompt_prefixes: PromptPrefixes | None = None,
    **options,
) -> EvalResult:
    """Reward and both KL estimators (SHIQ_MATH §6) of ``model`` against ``ref_model`` on the given prompts.

    ``model`` and ``ref_model`` answer ``model(input_ids=, attention_mask=).logits`` (transformers
    models, or :class:`shiq_eval.generate.MegatronLogits`); completions come from ``sampler`` (a
    policy of :mod:`shiq_eval.generate`; default ``HFPolicy(model)``), which must sample ``model``.
    ``prompt_texts`` are what the scorer sees as the prompt (e.g. the review's opening words);
    completions are decoded without special tokens. ``options`` are those of :func:`evaluate_samples`
    (``max_new_tokens``, ``seed``, ``keep_samples``, ``progress``, ``temperature``). ``temperature`` other
    than 1 samples a tempered policy; the KL estimators still compare ``model``'s own softmax with the
    reference's, at the states the tempered samples visit. Without ``sampler``, when the two models share
    their embeddings and first layers (:func:`shared_prefix_layers`), sampling and KL are one pass
    (:class:`SharedPrefixPolicy`): the same completions, the same estimators up to float rounding.
    ``prompt_prefixes`` (of ``ref_model``) then keeps the prompts' pass through those shared layers for the
    next policy evaluated on the same prompts: the same completions and KLs, bit for bit. ``model`` that is
    ``ref_model`` (the reference row) has both KLs exactly 0: its completions are sampled alone.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if model is ref_model:  # the reference itself: both estimators are 0 (SHIQ_MATH §6), not float noise either side

        def zero_kls(prompts, completions):
            zero = torch.zeros(len(completions), dtype=torch.float64)
            return zero, zero

        policy = sampler if sampler is not None else HFPolicy(model, eos_id=eos, pad_id=pad)
        return evaluate_samples(
            policy, zero_kls, tokenizer, prompt_ids, prompt_texts, scorer, batch_size=batch_size, **options
        )
    k = shared_prefix_layers(model, ref_model) if sampler is None else 0
    if k:  # one pass: the KL from the hidden states that sampling computed at layer k
        fused = SharedPrefixPolicy(model, ref_model, k, eos_id=eos, pad_id=pad, prompt_prefixes=prompt_prefixes)
        return evaluate_one_pass(fused, tokenizer, prompt_ids, prompt_texts, scorer, batch_size=batch_size, **options)
    policy = sampler if sampler is not None else HFPolicy(model, eos_id=eos, pad_id=pad)

    def kls(prompts, completions):
        return sequence_kls(model, ref_model, prompts, completions, batch_size, pad)

    return evaluate_samples(policy, kls, tokenizer, prompt_ids, prompt_texts, scorer, batch_size=batch_size, **options)


def evaluate_one_pass(policy, tokenizer, prompt_ids, prompt_texts, scorer, **options) -> EvalResult:
    """:func:`evaluate_samples` for a policy whose ``generate_with_kls(prompt_ids, cfg, progress)`` returns
    ``(completions, sample [N], exact [N])``: the KL estimators (SHIQ_MATH §6) read off the sampling pass itself."""
    return evaluate_samples(policy, None, tokenizer, prompt_ids, prompt_texts, scorer, **options)


class SharedPrefixPolicy:
    """Sampling from ``model`` (as :class:`shiq_eval.generate.HFPolicy`, the same completions under the
    same seeds) with both KL estimators against ``ref_model`` read off the same pass (SHIQ_MATH §6).

    The two models share their embeddings and first ``k`` decoder layers (:func:`shared_prefix_layers`),
    so the hidden states entering layer ``k`` are the same for both. The prompts' pass through those layers
    comes from a :class:`PromptPrefixes` of ``ref_model`` (``prompt_prefixes``, kept for the next policy;
    without it, one for each batch). Sampling keeps the policy's logits at every drawn token and the hidden
    states entering layer ``k`` at every sampled token (a hook on that layer's input, step by step through
    the KV cache). The reference's layers ``k ..`` then run once over the completion tokens, after their own
    pass over the prompt (from the store). That gives what :func:`sequence_kls` gets from two full passes,
    up to float rounding, for ``(L − k) / L`` of one reference pass over the completions only.
    """

    def __init__(self, model, ref_model, k: int, *, eos_id: int, pad_id: int | None = None, prompt_prefixes=None):
        n = len(model.model.layers)
        if not 1 <= k <= n:
            raise ValueError(f"k must be in 1..{n} (the shared decoder layers), got {k}")
        if prompt_prefixes is not None and prompt_prefixes.ref_model is not ref_model:
            raise ValueError("prompt_prefixes holds another reference model's layers")
        self.model, self.ref_model = model, ref_model
        self.sampler = HFPolicy(model, eos_id=eos_id, pad_id=pad_id, share_prefix=False)
        self.eos_id, self.k = int(eos_id), k
        self.decoder = decoder_from(model, k)  # the policy's layers k ..: its prompt pass
        self.ref_decoder = decoder_from(ref_model, k)  # the reference's layers k ..: its prompt and completion passes
        self.prefixes = prompt_prefixes

    def _prefill(self, store, ids, attn, positions):
        """The policy's prompt pass from the shared layers' stored output: layers ``k ..`` run on the hidden
        states entering layer ``k``; the cache gets the stored keys and values of layers ``0 .. k-1``."""
        kv, hidden = store.get(ids, attn, positions, self.k)  # k x (keys, values) [B, h, W, d]; [B, W, H]
        kv, last = _prompt_tail(self.model, self.decoder, kv, hidden, attn, positions, self.k)
        return filled_cache(self.model, kv), last

    def check_prompts(self, prompt_ids: list[list[int]], cfg: SamplingConfig) -> None:
        """:meth:`HFPolicy.check_prompts` of the policy sampled."""
        self.sampler.check_prompts(prompt_ids, cfg)

    @torch.no_grad()
    def generate_with_kls(
        self, prompt_ids: list[list[int]], cfg: SamplingConfig, progress: bool = False
    ) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
        """``(completions, sample [N], exact [N])``: ``HFPolicy.generate`` and, for those completions, the
        estimators :func:`sequence_kls` gives (float64 log-softmax, the same per-token sums). A prompt that would
        run past the model's ``max_position_embeddings`` is refused, as ``HFPolicy.generate`` refuses it."""
        self.check_prompts(prompt_ids, cfg)

        def batch_fn(batch, first, seed):  # (raw completions [B], sample [B], exact [B])
            store = self.prefixes if self.prefixes is not None else PromptPrefixes(self.ref_model)
            ids, attn, positions = left_padded(batch, self.sampler.pad_id)  # [B, W] each
            store.get(ids, attn, positions, self.k)  # before the hook below: the reference's pass is not for it
            logits = []  # [B, V] per drawn token: what each token was drawn from
            with inputs_of_layer(self.model, self.k) as captured:  # [B, W, H] at the prompt, then [B, 1, H] a token
                rows = self.sampler._generate_batch(
                    batch, cfg, seed, lambda *a: self._prefill(store, *a), keep_logits=logits
                )
            n = len(rows[0])
            if len(logits) != n or len(captured) != n:  # sampling ran another number of forward passes than tokens
                raise RuntimeError(f"sampling kept {len(logits)} and {len(captured)} passes for {n} tokens")
            ref_kv, ref_last = store.reference_tail(ids, attn, positions, self.k, self.ref_decoder)
            ref_logits = [ref_last[:, None]]  # [B, 1, V]: the reference at the prompt's last position
            if n > 1:  # positions W .. W+n-2 (the sampled tokens but the last) predict tokens 2 .. n
                out = self.ref_decoder(
                    inputs_embeds=torch.cat(captured[1:], 1),  # [B, n-1, H]
                    attention_mask=torch.cat([attn, torch.ones(len(rows), n - 1, dtype=attn.dtype)], 1),
                    position_ids=positions[:, -1:] + torch.arange(1, n),
                    cache=filled_cache(self.ref_model, ref_kv, first=self.k),
                    use_cache=True,
                )
                ref_logits.append(self.ref_model.lm_head(out.last_hidden_state))  # [B, n-1, V]
            mask = torch.zeros((len(rows), n), dtype=torch.bool)  # each completion up to its first EOS
            for j, row in enumerate(rows):
                mask[j, : len(cut_at_eos(row, self.eos_id))] = True
            return (rows, *masked_kls(torch.stack(logits, 1), torch.cat(ref_logits, 1), torch.tensor(rows), mask))

        return generate_with_kls_in_batches(prompt_ids, cfg, progress, self.eos_id, batch_fn)


class PromptPrefixes:
    """The first ``k`` decoder layers of ``ref_model`` over batches of prompts, run once and kept for every policy
    that holds those layers unchanged (:class:`SharedPrefixPolicy`): per batch (keyed by its token ids and
    ``k``), the keys and values of layers ``0 .. k-1`` and the hidden states entering layer ``k``; and, once a
    policy's KL has asked for them, the reference's own layers ``k ..`` over the prompts (their keys and values,
    the last position's logits). A policy computing them itself would get the same bits: the same weights on
    the same inputs, in the same shapes. Nothing is dropped: about ``L · 2 · B · h_kv · W · d`` floats and ``B · V``
    logits a batch (about 430 MB for the main job's 160 held-out prompts in SmolLM2-135M), so it suits a fixed
    prompt set evaluated for many policies."""

    def __init__(self, ref_model):
        self.ref_model = ref_model
        self._kept: dict = {}
        self._tails: dict = {}

    @staticmethod
    def _key(ids, attn, k):
        return (k, tuple(ids.shape), ids.numpy().tobytes(), attn.numpy().tobytes())

    @torch.no_grad()
    def get(self, ids, attn, positions, k: int):
        """``(kv, hidden)``: ``kv[i] = (keys, values)`` ``[B, h, W, d]`` of layer ``i < k`` and ``hidden``
        ``[B, W, H]`` entering layer ``k``, for the left-padded prompts ``ids`` ``[B, W]``."""
        from transformers import DynamicCache  # heavy: transformers, only when a model runs

        key = self._key(ids, attn, k)
        if key not in self._kept:
            cache = DynamicCache(config=self.ref_model.config)
            with inputs_of_layer(self.ref_model, k, stop=True) as seen:  # layers 0 .. k-1 only
                self.ref_model.model(input_ids=ids, attention_mask=attn, position_ids=positions, cache=cache)
            self._kept[key] = ([(layer.keys, layer.values) for layer in cache.layers[:k]], seen[0])
        return self._kept[key]

    @torch.no_grad()
    def reference_tail(self, ids, attn, positions, k: int, decoder):
        """``(kv, logits)``: every layer's ``(keys, values)`` ``[B, h, W, d]`` of the reference over the
        prompts (layers ``k ..`` run by ``decoder``, :func:`decoder_from` ``(ref_model, k)``, on :meth:`get`'s
        hidden states), and its logits ``[B, V]`` at the last position."""
        key = self._key(ids, attn, k)
        if key not in self._tails:
            self._tails[key] = _prompt_tail(
                self.ref_model, decoder, *self.get(ids, attn, positions, k), attn, positions, k
            )
        return self._tails[key]


def _prompt_tail(model, decoder, kv, hidden, attn, positions, k: int):
    """``(kv, logits)`` of ``model`` over left-padded prompts from the hidden states ``[B, W, H]`` entering layer
    ``k``: its layers ``k ..`` run by ``decoder`` (:func:`decoder_from` ``(model, k)``); ``kv`` then holds every
    layer's ``(keys, values)`` (those given for layers ``0 .. k-1``, then its own), and ``logits`` ``[B, V]`` are
    the last position's, as ``logits_to_keep=1`` computes them."""
    out = decoder(
        inputs_embeds=hidden, attention_mask=attn, position_ids=positions, cache=cache_from(k), use_cache=True
    )
    tail = [(layer.keys, layer.values) for layer in out.cache.layers[k:]]
    return kv + tail, model.lm_head(out.last_hidden_state[:, -1:])[:, -1]


def filled_cache(model, kv, first: int = 0):
    """A KV cache of ``model`` holding ``kv[i] = (keys, values)`` for layer ``i`` (:func:`cache_from`
    ``(first)`` when ``first`` > 0: layers ``first ..`` only, for :func:`decoder_from` ``(model, first)``).
    The cache grows by concatenation, so the tensors given stay as they are."""
    from transformers import DynamicCache  # heavy: transformers, only when a model runs

    cache = cache_from(first) if first else DynamicCache(config=model.config)
    for i, (keys, values) in enumerate(kv):
        if i >= first:
            cache.update(keys, values, i)
    return cache


def evaluate_samples(
    policy,
    kls,
    tokenizer,
    prompt_ids: list[list[int]],
    prompt_texts: list[str],
    scorer,
    *,
    max_new_tokens=32,
    batch_size=16,
    seed=0,
    keep_samples=4,
    progress=True,
    temperature=1.0,
    samples_per_prompt=1,
    journal=None,
) -> EvalResult:
    """The evaluation every policy shares (SHIQ_MATH §6): completions from ``policy.generate`` at
    ``temperature`` (default 1, so the samples come from the policy whose KL is reported), top-p 1,
    decoded without special tokens and scored by ``scorer(prompt_texts, texts)``;
    ``kls(prompt_ids, completions) -> (sample [N], exact [N])`` gives the two KL estimators (None: the policy's
    ``generate_with_kls`` gives them with the completions, :func:`evaluate_one_pass`).

    Sampling and KLs go batch by batch (:func:`shiq_eval.generate.in_batches`): batch ``i`` is sampled alone under
    seed ``seed + i``, which is the policy's batch ``i`` of the whole set, bit for bit, and its KLs computed at
    once; each batch's :class:`SampledBatch` is given to ``journal`` (``get(i, batch)``, ``put(i, batch,
    result)``), which may hand back the batches an interrupted evaluation finished. The scorer reads every
    completion at the end.

    ``prompt_ids`` holds each prompt ``samples_per_prompt`` times in a row (prompt-major, as ``shiq-eval run``
    repeats them; ``policy.generate`` keeps that order): the reported means and standard errors are over
    prompts, of each prompt's mean over its samples (SHIQ_MATH §9). With one sample per prompt they are the
    plain mean and standard error over completions."""
    s = _check_prompt_major(prompt_ids, samples_per_prompt)
    check_not_empty(prompt_ids)  # before any batch is sampled
    cfg = SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0, batch_size=batch_size, seed=seed
    )
    if hasattr(policy, "check_prompts"):  # over all prompts, naming one by its index among them (not its batch's)
        policy.check_prompts(prompt_ids, cfg)

    def run_batch(batch: list[list[int]], first: int, seed: int) -> SampledBatch:
        alone = dataclasses.replace(cfg, seed=seed)  # one batch under its own seed: the whole set's batch i
        if kls is None:
            completions, sample, exact = policy.generate_with_kls(batch, alone)
        else:
            completions = policy.generate(batch, alone)
            sample, exact = kls(batch, completions)
        sample, exact = (
            _per_completion(f"the {k} KL estimates", v, len(completions), first).tolist()
            for k, v in (("sample", sample), ("exact", exact))
        )
        return SampledBatch([list(map(int, c)) for c in completions], sample, exact)

    batches = in_batches(prompt_ids, cfg, progress, run_batch, journal)
    completions = [c for b in batches for c in b.completions]  # [N]
    ks, ke = (
        torch.tensor([v for b in batches for v in getattr(b, k)], dtype=torch.float64) for k in SampledBatch._fields[1:]
    )
    texts = [tokenizer.decode(c, skip_special_tokens=True).strip() for c in completions]
    rewards = _per_completion("the scorer's rewards", scorer(prompt_texts, texts), len(texts))
    r, rse = _over_prompts(rewards, s)
    a, ase = _over_prompts(ks, s)
    b, bse = _over_prompts(ke, s)
    shown = [(prompt_texts[i], texts[i], float(rewards[i])) for i in range(min(keep_samples, len(texts)))]
    return EvalResult(r, rse, a, ase, b, bse, len(texts), shown, rewards.tolist(), ke.tolist(), ks.tolist())


def _per_completion(what: str, values, n: int, first: int = 0) -> torch.Tensor:
    """``values`` as a float64 ``[n]`` tensor, one finite value per completion, or a ValueError saying which
    is wrong (by its index among all completions, ``first`` that of ``values[0]``): a scorer that drops a
    completion, or returns NaN, would otherwise give a plausible mean over the wrong completions."""
    try:
        v = torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{what} are not a list of numbers ({e})") from None
    if v.dim() != 1 or v.shape[0] != n:
        raise ValueError(
            f"{what} hold {tuple(v.shape)} values for {n} completions: one number per completion is needed"
        )
    bad = torch.nonzero(~torch.isfinite(v))
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"{what} hold a non-finite value ({float(v[i])}) for completion {first + i}")
    return v


def _check_prompt_major(prompt_ids: list[list[int]], samples_per_prompt) -> int:
    """``samples_per_prompt`` as an int, once ``prompt_ids`` is checked to hold each prompt that many times in a
    row (prompt ``i``'s samples at ``i*s .. i*s+s-1``)."""
    s = whole_number(samples_per_prompt, "samples_per_prompt")  # (2.5 was taken for 2)
    if s < 1 or len(prompt_ids) % s:
        raise ValueError(f"{len(prompt_ids)} prompts do not split into groups of samples_per_prompt={s}")
    for i in range(0, len(prompt_ids), s):
        if any(list(prompt_ids[j]) != list(prompt_ids[i]) for j in range(i + 1, i + s)):
            raise ValueError(
                f"prompts {i} .. {i + s - 1} differ: with samples_per_prompt={s}, each prompt must appear {s} times "
                "in a row (prompt-major)"
            )
    return s


def _over_prompts(values: torch.Tensor, s: int) -> tuple[float, float]:
    """Mean and standard error over prompts (SHIQ_MATH §9) of per-completion ``values [P*s]`` in prompt-major
    order: each prompt's ``s`` values averaged first, so that its samples count as one unit, not ``s``
    independent ones."""
    return mean_stderr(values.double().reshape(-1, s).mean(1))
