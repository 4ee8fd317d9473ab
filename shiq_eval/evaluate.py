"""Reward and KL of a policy on a fixed prompt set (SHIQ_MATH §6).

One pass per policy: sample completions (plain softmax: temperature 1, top-p 1, so the samples come
from the policy whose KL is reported), score them, then run the policy and the reference over
prompt + completion to get both KL estimators from the same sequences. When the policy holds the
reference's embeddings and first ``k`` decoder layers unchanged (a fine-tune of its last layers), that
second pass starts at layer ``k`` from the hidden states sampling already computed: only the layers
after ``k`` run again, once for each model.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from shiq_eval.generate import HFPolicy, SamplingConfig, cut_at_eos, generate_in_batches, left_padded
from shiq_eval.kl import exact_token_kl, kl_from_log_probs, mean_stderr, sample_kl
from shiq_eval.shared_layers import cache_from, decoder_from, inputs_of_layer, shared_prefix_layers


@dataclass
class EvalResult:
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


def _log_probs(model, tokens, attn, keep: int) -> torch.Tensor:
    """float64 log-softmax of ``model``'s logits at the last ``keep`` positions, ``[B, keep, V]``."""
    return torch.log_softmax(model(input_ids=tokens, attention_mask=attn, logits_to_keep=keep).logits.double(), -1)


@torch.no_grad()
def sequence_kls(model, ref_model, prompt_ids, completion_ids, batch_size=16, pad_id=0):
    """Per-sequence KL estimates over the completion tokens: ``(sample [N], exact [N])`` (SHIQ_MATH §6).

    Rows are ``prompt + completion``, right-padded; position ``t``'s distribution comes from the
    logits at ``t − 1``. Only positions whose next token can be a completion token need the vocabulary:
    both models are asked for the logits of the batch's last ``T − s`` positions (``logits_to_keep``,
    ``s`` = the shortest prompt's length − 1), and each log-softmax runs once, in float64, on those.
    """
    samples, exact = [], []
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
        first = max(min(len(p) for p in prompts) - 1, 0)  # the first position that predicts a completion token
        keep = T - first  # logits of positions first .. T-1; the last one predicts nothing
        logp, logq = (_log_probs(net, tokens, attn, keep)[:, :-1] for net in (model, ref_model))  # [B, T-1-first, V]
        targets, m = tokens[:, first + 1 :, None], mask[:, first + 1 :]
        samples.append(sample_kl(logp.gather(-1, targets)[..., 0], logq.gather(-1, targets)[..., 0], m))
        exact.append(exact_token_kl(kl_from_log_probs(logp, logq), m))
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
    """Reward and both KL estimators of ``model`` against ``ref_model`` on the given prompts.

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
    next policy evaluated on the same prompts: the same completions and KLs, bit for bit.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
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
    ``(completions, sample [N], exact [N])``: the KL estimators read off the sampling pass itself."""
    kls = {}

    def generate(prompts, cfg, progress=False):
        completions, kls["sample"], kls["exact"] = policy.generate_with_kls(prompts, cfg, progress)
        return completions

    return evaluate_samples(
        SimpleNamespace(generate=generate),
        lambda prompts, completions: (kls["sample"], kls["exact"]),
        tokenizer,
        prompt_ids,
        prompt_texts,
        scorer,
        **options,
    )


class SharedPrefixPolicy:
    """Sampling from ``model`` (as :class:`shiq_eval.generate.HFPolicy`, the same completions under the
    same seeds) with both KL estimators against ``ref_model`` read off the same pass (SHIQ_MATH §6).

    The two models share their embeddings and first ``k`` decoder layers (:func:`shared_prefix_layers`),
    so the hidden states entering layer ``k`` are the same for both. Sampling keeps them (a hook on that
    layer's input, step by step through the KV cache); afterwards each model's own layers ``k ..`` run once
    over prompt + completion from there, which gives exactly what :func:`sequence_kls` gets from two full
    passes, for ``(L − k) / L`` of one pass each. Rows keep sampling's left padding and position ids.
    With ``prompt_prefixes`` (a :class:`PromptPrefixes` of ``ref_model``), the prompts' pass through the
    shared layers is read from there instead of run again (computed on first use).
    """

    def __init__(self, model, ref_model, k: int, *, eos_id: int, pad_id: int | None = None, prompt_prefixes=None):
        n = len(model.model.layers)
        if not 1 <= k <= n:
            raise ValueError(f"k must be in 1..{n} (the shared decoder layers), got {k}")
        if prompt_prefixes is not None and prompt_prefixes.ref_model is not ref_model:
            raise ValueError("prompt_prefixes holds another reference model's layers")
        self.model, self.sampler = model, HFPolicy(model, eos_id=eos_id, pad_id=pad_id, share_prefix=False)
        self.eos_id, self.k = int(eos_id), k
        self.decoder = decoder_from(model, k)  # the policy's layers k ..: its prompt pass and its KL tail
        self.tails = [_tail(model, self.decoder), _tail(ref_model, decoder_from(ref_model, k))]
        self.prefixes = prompt_prefixes

    def _prefill(self, ids, attn, positions):
        """The policy's prompt pass from the shared layers' stored output: layers ``k ..`` run on the hidden
        states entering layer ``k``; the cache gets the stored keys and values of layers ``0 .. k-1``."""
        from transformers import DynamicCache  # heavy: transformers, only when a model runs

        kv, hidden = self.prefixes.get(ids, attn, positions, self.k)  # k x (keys, values) [B, h, W, d]; [B, W, H]
        out = self.decoder(
            inputs_embeds=hidden, attention_mask=attn, position_ids=positions, cache=cache_from(self.k), use_cache=True
        )
        kv = kv + [(layer.keys, layer.values) for layer in out.cache.layers[self.k :]]
        cache = DynamicCache(config=self.model.config)  # every layer's prompt keys and values, as one pass leaves them
        for i, (keys, values) in enumerate(kv):
            cache.update(keys, values, i)
        return cache, self.model.lm_head(out.last_hidden_state[:, -1:])[:, -1]  # as logits_to_keep=1 computes them

    @torch.no_grad()
    def generate_with_kls(
        self, prompt_ids: list[list[int]], cfg: SamplingConfig, progress: bool = False
    ) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
        """``(completions, sample [N], exact [N])``: ``HFPolicy.generate`` and, for those completions, the
        estimators :func:`sequence_kls` gives (float64 log-softmax, the same per-token sums)."""
        sample, exact = [], []

        def batch_fn(batch, first, seed):
            prefill = None
            if self.prefixes is not None:  # read (or run) the shared layers first: the reference's pass is not
                self.prefixes.get(*left_padded(batch, self.sampler.pad_id), self.k)  # for the hook below to see
                prefill = self._prefill
            with inputs_of_layer(self.model, self.k) as captured:  # [B, W, H] at the prompt, then [B, 1, H] a token
                rows = self.sampler._generate_batch(batch, cfg, seed, prefill)
            hidden = torch.cat(captured, 1)  # [B, W + n - 1, H]: prompt and every sampled token but the last
            W, n = max(len(p) for p in batch), len(rows[0])
            if hidden.shape[1] != W + n - 1:  # sampling ran another number of forward passes than tokens
                raise RuntimeError(f"sampling kept {hidden.shape[1]} positions at layer {self.k}, expected {W + n - 1}")
            attn = torch.zeros(hidden.shape[:2], dtype=torch.long)  # left padding, as sampling had it
            for j, p in enumerate(batch):
                attn[j, W - len(p) :] = 1
            positions = (attn.cumsum(-1) - 1).clamp(min=0)
            targets = torch.tensor(rows, dtype=torch.long)[..., None]  # [B, n, 1]
            mask = torch.zeros((len(rows), n), dtype=torch.bool)  # each completion up to its first EOS
            for j, row in enumerate(rows):
                mask[j, : len(cut_at_eos(row, self.eos_id))] = True
            # positions W-1 .. W+n-2 predict the n sampled tokens
            logp, logq = (
                torch.log_softmax(tail(hidden, attn, positions, n).double(), -1) for tail in self.tails
            )  # [B, n, V]
            sample.append(sample_kl(logp.gather(-1, targets)[..., 0], logq.gather(-1, targets)[..., 0], mask))
            exact.append(exact_token_kl(kl_from_log_probs(logp, logq), mask))
            return rows

        completions = generate_in_batches(prompt_ids, cfg, progress, self.eos_id, batch_fn)
        empty = torch.zeros(0, dtype=torch.float64)
        return completions, torch.cat(sample) if sample else empty, torch.cat(exact) if exact else empty


class PromptPrefixes:
    """The first ``k`` decoder layers of ``ref_model`` over batches of prompts, run once and kept for every policy
    that holds those layers unchanged (:class:`SharedPrefixPolicy`): per batch (keyed by its token ids and
    ``k``), the keys and values of layers ``0 .. k-1`` and the hidden states entering layer ``k``. A policy
    computing them itself would get the same bits: the same weights on the same inputs, in the same shapes.
    Nothing is dropped: about ``k · 2 · B · h_kv · W · d`` floats a batch (64 MB for 32 prompts of 54 tokens at
    k = 24 in SmolLM2-135M, 320 MB for the main job's 160 held-out prompts), so it suits a fixed prompt set
    evaluated for many policies."""

    def __init__(self, ref_model):
        self.ref_model = ref_model
        self._kept: dict = {}

    @torch.no_grad()
    def get(self, ids, attn, positions, k: int):
        """``(kv, hidden)``: ``kv[i] = (keys, values)`` ``[B, h, W, d]`` of layer ``i < k`` and ``hidden``
        ``[B, W, H]`` entering layer ``k``, for the left-padded prompts ``ids`` ``[B, W]``."""
        from transformers import DynamicCache  # heavy: transformers, only when a model runs

        key = (k, tuple(ids.shape), ids.numpy().tobytes(), attn.numpy().tobytes())
        if key not in self._kept:
            cache = DynamicCache(config=self.ref_model.config)
            with inputs_of_layer(self.ref_model, k, stop=True) as seen:  # layers 0 .. k-1 only
                self.ref_model.model(input_ids=ids, attention_mask=attn, position_ids=positions, cache=cache)
            self._kept[key] = ([(layer.keys, layer.values) for layer in cache.layers[:k]], seen[0])
        return self._kept[key]


def _tail(model, inner):
    """``fn(hidden [B, T, H], attention_mask [B, T], position_ids [B, T], keep) -> logits [B, keep, V]``:
    ``model`` from the input of decoder layer ``k`` on (``inner``, its :func:`shiq_eval.shared_layers.decoder_from`
    ``(model, k)``, then its output layer), logits of the last ``keep`` positions."""

    def run(hidden, attn, positions, keep):
        out = inner(inputs_embeds=hidden, attention_mask=attn, position_ids=positions, use_cache=False)
        return model.lm_head(out.last_hidden_state[:, -keep:])

    return run


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
) -> EvalResult:
    """The evaluation every policy shares (SHIQ_MATH §6): completions from ``policy.generate`` at
    ``temperature`` (default 1, so the samples come from the policy whose KL is reported), top-p 1,
    decoded without special tokens and scored by ``scorer(prompt_texts, texts)``;
    ``kls(prompt_ids, completions) -> (sample [N], exact [N])`` gives the two KL estimators."""
    cfg = SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0, batch_size=batch_size, seed=seed
    )
    completions = policy.generate(prompt_ids, cfg, progress=progress)
    texts = [tokenizer.decode(c, skip_special_tokens=True).strip() for c in completions]
    rewards = torch.tensor(scorer(prompt_texts, texts), dtype=torch.float64)
    ks, ke = kls(prompt_ids, completions)
    r, rse = mean_stderr(rewards)
    a, ase = mean_stderr(ks)
    b, bse = mean_stderr(ke)
    shown = [(prompt_texts[i], texts[i], float(rewards[i])) for i in range(min(keep_samples, len(texts)))]
    return EvalResult(r, rse, a, ase, b, bse, len(texts), shown, rewards.tolist(), ke.tolist(), ks.tolist())
