"""Reward and KL of a policy on a fixed prompt set (SHIQ_MATH §6).

One pass per policy: sample completions (plain softmax: temperature 1, top-p 1, so the samples come
from the policy whose KL is reported), score them, then run the policy and the reference over
prompt + completion to get both KL estimators from the same sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shiq_eval.generate import HFPolicy, SamplingConfig
from shiq_eval.kl import exact_token_kl, kl_from_log_probs, mean_stderr, sample_kl


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
    reference's, at the states the tempered samples visit.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    policy = sampler if sampler is not None else HFPolicy(model, eos_id=eos, pad_id=pad)

    def kls(prompts, completions):
        return sequence_kls(model, ref_model, prompts, completions, batch_size, pad)

    return evaluate_samples(policy, kls, tokenizer, prompt_ids, prompt_texts, scorer, batch_size=batch_size, **options)


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
