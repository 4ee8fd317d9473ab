"""Q♯ guided decoding: the frozen reference reweighted by a distributional value model (SHIQ_MATH §8).

At every step the reference's top-k next tokens are the candidates; the value model scores each
candidate (the prefix with the candidate appended) as a categorical distribution over return atoms,
and the candidates are sampled from

    guided_logit(a) = ℓ_ref(a) + log Σ_j p_θ(z_j | s, a) exp(z_j / β)

(:func:`guided_logits`). By default only the candidates' logits are changed: the next token is drawn
from the reference's full softmax with the guidance term added to the top-k logits and a term of 0
for every other token (:func:`guided_log_probs`); ``restrict_to_top_k=True`` samples among the
candidates only, which costs ``−log(top-k reference mass)`` of KL per token even without guidance.
A term of 0 for the other tokens is neutral only when the returns are centred (a value of 0 for an
average continuation): with rewards that are all positive, say, the candidates are favoured over the
rest of the vocabulary by the value model's scale alone. With the exact return distribution of the
reference and ``top_k`` the whole vocabulary both modes are the KL-regularised optimum ``π*`` of
SHIQ_MATH §1. A ShiQ-trained policy samples the same target with a plain softmax; Q♯ pays a second
model pass per token instead.

:class:`GuidedPolicy` implements the sampling interface of :mod:`shiq_eval.generate`; its
:meth:`GuidedPolicy.sequence_kls` gives the SHIQ_MATH §6 KL estimators of the guided policy against
the reference on its own samples, and :func:`evaluate_guided_policy` reward and KL like
:func:`shiq_eval.evaluate.evaluate_policy` does for a trained policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from shiq_eval.evaluate import EvalResult, evaluate_one_pass
from shiq_eval.generate import (
    SamplingConfig,
    check_positions,
    generate_with_kls_in_batches,
    lm_forward,
    read_prompts,
    sample_next,
)
from shiq_eval.kl import rounded_to_zero
from shiq_eval.optimum import check_beta

CANDIDATE_CHUNK = 64  # candidates the value model scores in one pass (all of them when top_k is at most this)


def guided_logits(
    ref_logits: torch.Tensor, atom_logits: torch.Tensor, atoms: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """Q♯ logits of K candidates (SHIQ_MATH §8): ``ref_logits + log Σ_a softmax(atom_logits)_a exp(atoms_a / β)``.

    Args:
        ref_logits: ``[B, K]`` reference logits of the candidates.
        atom_logits: ``[B, K, A]`` unnormalised value-model outputs for prefix + candidate.
        atoms: ``[A]`` return atoms.
        beta: KL weight ``β > 0`` (the reference code's ``eta`` is ``1/β``).
    Returns:
        ``[B, K]``, float64 if any input is float64, else float32. Computed as a log-sum-exp in float64
        (``log_softmax(atom_logits) + atoms/β``), so huge ``atoms/β`` cannot overflow there.
    Raises:
        ValueError naming the argument on a shape mismatch, a non-finite input or ``beta <= 0``, and naming
        ``beta`` when the result does not fit the output's dtype.
    """
    beta = check_beta(beta)
    for name, t, dims in (("ref_logits", ref_logits, 2), ("atom_logits", atom_logits, 3), ("atoms", atoms, 1)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != dims:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating tensor with {dims} dimensions, got {shape}")
    if atom_logits.shape[:2] != ref_logits.shape:
        raise ValueError(
            f"atom_logits {tuple(atom_logits.shape)} must be [B, K, A] with [B, K] = ref_logits {tuple(ref_logits.shape)}"
        )
    if atoms.shape[0] == 0:
        raise ValueError("atoms is empty: a return distribution needs at least one atom")
    if atoms.shape[0] != atom_logits.shape[2]:
        raise ValueError(f"atoms has {atoms.shape[0]} entries but atom_logits has A = {atom_logits.shape[2]}")
    for name, t in (("ref_logits", ref_logits), ("atom_logits", atom_logits), ("atoms", atoms)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} has non-finite values")
    out_dtype = torch.float64 if torch.float64 in (ref_logits.dtype, atom_logits.dtype, atoms.dtype) else torch.float32
    log_p = torch.log_softmax(atom_logits.double(), -1)
    scaled = atoms.double().to(atom_logits.device) / float(beta)
    out = (ref_logits.double() + torch.logsumexp(log_p + scaled, -1)).to(out_dtype)
    if not torch.isfinite(out).all():  # atoms / β beyond float32 (or float64): a β too small for these returns
        raise ValueError(
            f"beta={beta:g} is too small for atoms up to {float(atoms.abs().max()):g}: the guided logits overflow "
            f"{str(out_dtype).removeprefix('torch.')} (give float64 inputs, or a larger beta)"
        )
    return out


def guided_log_probs(
    ref_logits: torch.Tensor, candidates: torch.Tensor, guided: torch.Tensor, *, restrict_to_top_k: bool = False
) -> torch.Tensor:
    """Log-probabilities ``[B, V]`` float64 of the Q♯ next-token distribution (SHIQ_MATH §8).

    Default: ``log_softmax`` of the reference logits with the candidates' logits replaced by their
    guided logits, i.e. the guidance term ``log Σ_j p_θ(z_j|s,a) exp(z_j/β)`` added to the top-k only
    and 0 for every other token (neutral only if the returns are centred). ``restrict_to_top_k``:
    ``log_softmax`` over the candidates' guided logits, ``-inf`` for every other token.

    Args:
        ref_logits: ``[B, V]`` reference logits.
        candidates: ``[B, K]`` token ids of the candidates (distinct per row).
        guided: ``[B, K]`` their guided logits (:func:`guided_logits`).
    """
    base = ref_logits.double()
    if restrict_to_top_k:
        base = torch.full_like(base, -math.inf)
    return torch.log_softmax(base.scatter(-1, candidates, guided.double()), -1)


@dataclass
class GuidedSteps:
    """Per-step record of one batch of guided decoding (``n`` steps, ``K`` candidates, ``A`` atoms).

    ``tokens`` ``[B, n]`` (the pad id after a row ended), ``active`` ``[B, n]`` bool (the step belongs to
    the row's completion), ``logp`` / ``ref_logp`` ``[B, n]`` float64 log-probabilities of the taken
    token under the guided policy (temperature 1) and the full reference, ``kl`` ``[B, n]`` float64 exact
    ``KL(π_g(·|s) ‖ π_ref(·|s))`` over the vocabulary; when recorded, ``candidates`` ``[B, n, K]``,
    ``ref_top`` ``[B, n, K]``, ``atom_logits`` ``[B, n, K, A]``, ``guided`` ``[B, n, K]`` (the candidates'
    guided logits) and ``policy_logp`` ``[B, n, V]`` float64 (the guided policy's log-probabilities at
    temperature 1, :func:`guided_log_probs`)."""

    tokens: torch.Tensor
    active: torch.Tensor
    logp: torch.Tensor
    ref_logp: torch.Tensor
    kl: torch.Tensor
    candidates: torch.Tensor | None = None
    ref_top: torch.Tensor | None = None
    atom_logits: torch.Tensor | None = None
    guided: torch.Tensor | None = None
    policy_logp: torch.Tensor | None = None


class GuidedPolicy:
    """The reference guided by a distributional value model (SHIQ_MATH §8), as a policy of
    :mod:`shiq_eval.generate`: ``generate(prompt_ids, SamplingConfig(...))``, token ids in, completion
    ids out, batch ``i`` sampled under seed ``cfg.seed + i``.

    Args:
        ref_model: a Hugging Face causal LM (``model(input_ids, attention_mask, position_ids, cache,
            use_cache, logits_to_keep).logits``), the frozen reference.
        value_model: ``value_model(input_ids=[B, L], attention_mask=, position_ids=[B, L], cache=) -> [B, L, A]``
            atom logits with a Hugging Face KV cache (``attention_mask`` an additive ``[B, 1, L, P + L]`` mask,
            or a ``[B, P + L]`` padding mask or None while the prompts are read), and
            ``.config`` for the cache (``shiq_train.qsharp_value.HFValueModel``, from
            ``shiq_train.qsharp_value.load_value_model``).
        atoms: ``[A]`` the value model's atoms.
        beta: the KL weight ``β`` (smaller: greedier towards high value).
        top_k: candidates per step (the reference's most likely tokens).
        eos_id, pad_id: end-of-sequence and padding ids (pad defaults to eos).
        restrict_to_top_k: sample among the candidates only. Default False: every other token keeps
            its reference logit (a guidance term of 0, neutral only if the returns are centred), see
            :func:`guided_log_probs`.
        share_prefix: both models read the leading tokens every prompt of a batch shares once, and a
            repeated prompt once (``shiq_eval.generate.read_prompts``: the same attention, in float rounding).

    Both models first read the prompts into their KV caches (``share_prefix``). Each step then runs the
    reference on the new token (step 0: its logits at the prompts' end) and the value trunk on
    ``[new token, k candidates]`` (step 0: the candidates alone; beyond :data:`CANDIDATE_CHUNK` candidates, in
    passes of that many, the new token with the first) over the value trunk's cached prefix: a
    candidate attends to the prefix and to itself only (a diagonal mask among candidates) and sits at the
    position after the prefix, so it is scored exactly as ``prefix + candidate`` would be; the candidates'
    cache entries are dropped after the pass. Prompts are left-padded (after the leading tokens they share);
    padding is masked out of every attention.
    Sampling applies ``cfg.temperature`` / ``cfg.top_p`` to the guided next-token distribution (the
    whole vocabulary, or the candidates with ``restrict_to_top_k``).
    """

    def __init__(
        self,
        ref_model,
        value_model,
        atoms,
        beta: float,
        *,
        top_k: int = 20,
        eos_id: int,
        pad_id=None,
        restrict_to_top_k: bool = False,
        share_prefix: bool = True,
    ):
        if not (isinstance(top_k, int) and top_k >= 1):
            raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
        self.beta = check_beta(beta)
        self.atoms = torch.as_tensor(atoms, dtype=torch.float64)
        if self.atoms.dim() != 1 or self.atoms.numel() == 0 or not torch.isfinite(self.atoms).all():
            raise ValueError(f"atoms must be a finite, non-empty 1-D tensor [A], got {self.atoms.tolist()}")
        # the atoms the value model was trained on (HFValueModel keeps them), compared at its precision
        own = getattr(value_model, "atoms", None)
        if isinstance(own, torch.Tensor) and not (
            own.shape == self.atoms.shape
            and torch.allclose(  # to a few roundings of the model's dtype (a linspace in float32 or float64)
                own.detach().cpu().double(),
                self.atoms,
                rtol=4 * torch.finfo(own.dtype).eps,
                atol=4 * torch.finfo(own.dtype).eps * float(self.atoms.abs().max()),
            )
        ):
            raise ValueError(
                f"atoms {self.atoms.tolist()} are not the value model's own {own.tolist()}: its outputs are "
                "probabilities of those returns"
            )
        # the value model scores the reference's candidates by token id: another vocabulary is another
        # tokenizer (SHIQ_MATH §8), and an id past its embeddings an IndexError deep in torch
        vocab = [getattr(getattr(m, "config", None), "vocab_size", None) for m in (ref_model, value_model)]
        if all(isinstance(n, int) for n in vocab) and vocab[0] != vocab[1]:
            raise ValueError(
                f"the value model has {vocab[1]} token ids but the reference {vocab[0]}: it scores the "
                "reference's tokens, so train it from this reference (shiq-train loss=qsharp_value init=...)"
            )
        self.ref_model = ref_model.eval()
        self.value_model = value_model.eval()
        self.top_k = int(top_k)
        self.eos_id = int(eos_id)
        self.pad_id = int(eos_id if pad_id is None else pad_id)
        self.restrict_to_top_k = bool(restrict_to_top_k)
        self.share_prefix = bool(share_prefix)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], cfg: SamplingConfig, progress: bool = False) -> list[list[int]]:
        """Completion token ids per prompt (see ``shiq_eval.generate.generate_in_batches`` for batches and seeds)."""
        return self.generate_with_kls(prompt_ids, cfg, progress)[0]

    def check_prompts(self, prompt_ids: list[list[int]], cfg: SamplingConfig) -> None:
        """Refuse a prompt whose tokens plus ``cfg.max_new_tokens`` pass either model's ``max_position_embeddings``."""
        check_positions(prompt_ids, cfg, [self.ref_model, self.value_model])

    @torch.no_grad()
    def generate_with_kls(
        self, prompt_ids: list[list[int]], cfg: SamplingConfig, progress: bool = False
    ) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
        """``(completions, sample [N], exact [N])``: :meth:`generate`, and the KL estimators that
        :meth:`sequence_kls` gives for those completions (SHIQ_MATH §6), read off the sampling pass itself
        (``sequence_kls`` teacher-forces the completions through the same steps: this saves that second
        pass). The estimators are those of the temperature-1 guided policy at the visited states, whatever
        ``cfg.temperature`` and ``cfg.top_p`` sampled. A prompt whose tokens plus ``cfg.max_new_tokens`` pass
        either model's ``max_position_embeddings`` is refused, as ``HFPolicy.generate`` refuses it."""
        self.check_prompts(prompt_ids, cfg)

        def batch_fn(batch, first, seed):  # (raw completions [B], sample [B], exact [B])
            steps = self.decode(batch, cfg, generator=torch.Generator().manual_seed(seed))
            return (steps.tokens.tolist(), *_kl_sums(steps))

        return generate_with_kls_in_batches(prompt_ids, cfg, progress, self.eos_id, batch_fn)

    @torch.no_grad()
    def sequence_kls(
        self, prompt_ids: list[list[int]], completion_ids: list[list[int]], batch_size: int = 16
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence KL of the guided policy (temperature 1) to the reference over the completion
        tokens: ``(sample [N], exact [N])`` float64, as ``shiq_eval.evaluate.sequence_kls`` (SHIQ_MATH §6).

        The completions are teacher-forced through the same steps as sampling. ``exact`` sums
        ``Σ_a π_g(a|s) log(π_g(a|s) / π_ref(a|s))`` over the vocabulary at the visited states (``π_ref``
        the full reference softmax); ``sample`` sums ``log π_g(y_t|s_t) − log π_ref(y_t|s_t)``. With
        ``restrict_to_top_k`` it is ``-inf`` for a completion with a token outside the candidates (which
        that policy cannot produce).
        """
        if len(prompt_ids) != len(completion_ids):
            raise ValueError(
                f"{len(prompt_ids)} prompts but {len(completion_ids)} completions: one completion per prompt"
            )
        empty = torch.zeros(0, dtype=torch.float64)
        samples, exact = [empty], [empty]
        for start in range(0, len(prompt_ids), batch_size):
            batch = prompt_ids[start : start + batch_size]
            forced = completion_ids[start : start + batch_size]
            width = max([len(c) for c in forced] + [1])
            s, e = _kl_sums(self.decode(batch, SamplingConfig(max_new_tokens=width), forced=forced))
            samples.append(s)
            exact.append(e)
        return torch.cat(samples), torch.cat(exact)

    @torch.no_grad()
    def decode(
        self,
        batch: list[list[int]],
        cfg: SamplingConfig,
        *,
        generator: torch.Generator | None = None,
        forced: list[list[int]] | None = None,
        record: bool = False,
    ) -> GuidedSteps:
        """Run guided decoding on one batch of prompts for at most ``cfg.max_new_tokens`` steps.

        Tokens are drawn with ``sample_next`` (``generator``), or taken from ``forced`` (one completion
        per prompt; a row is active while its forced completion lasts). Sampled rows stop at ``eos_id``.
        ``record`` keeps the candidates, their reference logits, atom logits and guided logits.
        """
        from transformers import DynamicCache  # heavy: only decoding needs it

        device = next(self.ref_model.parameters()).device
        B = len(batch)
        for j, p in enumerate(batch):
            if not p:
                raise ValueError(f"prompt {j} of the batch is empty")
        if forced is not None:
            forced_len = torch.tensor([len(c) for c in forced], device=device)
            n_steps = int(forced_len.max()) if len(forced) else 0
            forced_t = torch.full((B, max(n_steps, 1)), self.pad_id, dtype=torch.long, device=device)
            for j, c in enumerate(forced):
                forced_t[j, : len(c)] = torch.tensor(c, dtype=torch.long)
        else:
            n_steps = cfg.max_new_tokens

        def value_forward(ids, mask, positions, cache):
            cache = DynamicCache(config=self.value_model.config) if cache is None else cache
            self.value_model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache)
            return cache, None

        # both models read the prompts alike (shared leading tokens once, repeated prompts once): the same
        # cache layout and padding mask ``attn`` [B, P]; each step then adds one position
        share = dict(share_prefix=self.share_prefix, device=device)
        ref_forward = partial(lm_forward, self.ref_model)
        ref_cache, ref_logits, attn, positions = read_prompts(ref_forward, batch, self.pad_id, **share)
        value_cache, _, _, _ = read_prompts(value_forward, batch, self.pad_id, **share)
        atoms = self.atoms.to(device)
        new_ids = new_pos = torch.zeros((B, 0), dtype=torch.long, device=device)  # read: nothing new at step 0
        next_pos = positions[:, -1] + 1  # [B] position of the next token of each row
        done = torch.zeros(B, dtype=torch.bool, device=device)
        cols = {
            k: []
            for k in ("tokens", "active", "logp", "ref_logp", "kl", "cand", "ref_top", "atoms", "guided", "policy")
        }
        for step in range(n_steps):
            if step:  # the new token (step 0: the prompts' last position, read above)
                ref_cache, ref_logits = ref_forward(new_ids, attn, new_pos, ref_cache)
            ref_logp_all = torch.log_softmax(ref_logits.double(), -1)  # [B, V]
            k = min(self.top_k, ref_logits.shape[-1])
            ref_top, cand = ref_logits.float().topk(k, dim=-1)  # [B, K]
            atom_logits = torch.cat(  # in chunks: a value pass over K candidates holds a [L + K, P + L + K] mask
                [
                    self._score_candidates(
                        new_ids[:, : new_ids.shape[1] * (c == 0)],  # the new token once, with the first chunk
                        new_pos[:, : new_pos.shape[1] * (c == 0)],
                        attn,
                        cand[:, c : c + CANDIDATE_CHUNK],
                        next_pos,
                        value_cache,
                    )
                    for c in range(0, k, CANDIDATE_CHUNK)
                ],
                1,
            )
            guided = guided_logits(ref_top, atom_logits, atoms, beta=self.beta).double()  # [B, K]
            logp_g = guided_log_probs(ref_logits, cand, guided, restrict_to_top_k=self.restrict_to_top_k)  # [B, V]
            if forced is None:
                active = ~done
                if self.restrict_to_top_k:  # draw among the K candidates
                    pick = sample_next((guided - guided.max(-1, keepdim=True).values).float(), cfg, generator)
                    token = cand.gather(-1, pick[:, None])[:, 0]
                else:
                    token = sample_next(logp_g.float(), cfg, generator)
            else:
                active = step < forced_len
                token = forced_t[:, step]
            lp = logp_g.gather(-1, token[:, None])[:, 0]
            token = torch.where(active, token, torch.full_like(token, self.pad_id))
            cols["tokens"].append(token)
            cols["active"].append(active)
            cols["logp"].append(lp)
            cols["ref_logp"].append(ref_logp_all.gather(-1, token[:, None])[:, 0])
            p_g = logp_g.exp()  # 0 where log p_g = -inf: those tokens add nothing to the KL
            # an exact KL is >= 0: the rounded sum falls a few ulps below 0 when π_g is π_ref (a β so large the
            # guidance vanishes), read as 0; a value further below stays visible (shiq_eval.kl.rounded_to_zero)
            cols["kl"].append(rounded_to_zero(torch.where(p_g > 0, p_g * (logp_g - ref_logp_all), 0.0).sum(-1)))
            if record:
                cols["cand"].append(cand)
                cols["ref_top"].append(ref_top)
                cols["atoms"].append(atom_logits)
                cols["guided"].append(guided)
                cols["policy"].append(logp_g)
            if forced is None:
                done |= active & (token == self.eos_id)
                if bool(done.all()):
                    break
            new_ids, new_pos = token[:, None], next_pos[:, None]
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], -1)
            next_pos = next_pos + 1

        def stack(key, empty_shape, dtype):
            return torch.stack(cols[key], 1) if cols[key] else torch.zeros(empty_shape, dtype=dtype, device=device)

        out = GuidedSteps(
            tokens=stack("tokens", (B, 0), torch.long),
            active=stack("active", (B, 0), torch.bool),
            logp=stack("logp", (B, 0), torch.float64),
            ref_logp=stack("ref_logp", (B, 0), torch.float64),
            kl=stack("kl", (B, 0), torch.float64),
        )
        if record and cols["cand"]:
            out.candidates, out.ref_top = stack("cand", (), None), stack("ref_top", (), None)
            out.atom_logits, out.guided = stack("atoms", (), None), stack("guided", (), None)
            out.policy_logp = stack("policy", (), None)
        return out

    def _score_candidates(self, new_ids, new_pos, attn, cand, next_pos, cache) -> torch.Tensor:
        """Atom logits ``[B, K, A]`` of ``prefix + candidate`` for every candidate, in one value pass.

        ``new_ids`` / ``new_pos`` ``[B, L]``: the prefix tokens the value cache does not hold yet (none at
        the first step, ``L = 0``, then the last token); ``attn`` ``[B, P + L]`` the prefix's
        padding mask; ``cand`` ``[B, K]``; ``next_pos`` ``[B]`` the candidates' position.
        """
        B, L = new_ids.shape
        K = cand.shape[1]
        P = attn.shape[1] - L
        device = new_ids.device
        valid = attn.bool()  # [B, P + L] keys of the prefix
        q_prefix = torch.arange(P, P + L, device=device)
        key_prefix = torch.arange(P + L, device=device)
        causal = key_prefix[None, :] <= q_prefix[:, None]  # [L, P + L]
        prefix_rows = (causal[None] & valid[:, None, :]) | (key_prefix[None, None, :] == q_prefix[None, :, None])
        prefix_rows = torch.cat([prefix_rows, torch.zeros(B, L, K, dtype=torch.bool, device=device)], -1)
        cand_rows = torch.cat(
            [valid[:, None, :].expand(B, K, P + L), torch.eye(K, dtype=torch.bool, device=device).expand(B, K, K)], -1
        )
        allowed = torch.cat([prefix_rows, cand_rows], 1)[:, None]  # [B, 1, L + K, P + L + K]
        dtype = next(self.value_model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        out = self.value_model(
            input_ids=torch.cat([new_ids, cand], 1),
            attention_mask=mask,
            position_ids=torch.cat([new_pos, next_pos[:, None].expand(B, K)], 1),
            cache=cache,
        )  # [B, L + K, A]
        cache.crop(-K)  # keep the prefix only
        return out[:, L:].float()


def _kl_sums(steps: GuidedSteps) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(Σ_t log π_g(y_t|s_t) − log π_ref(y_t|s_t), Σ_t KL_t)`` over the active steps, ``([B], [B])``:
    the sample and exact KL estimators of SHIQ_MATH §6."""
    return (
        torch.where(steps.active, steps.logp - steps.ref_logp, 0.0).sum(-1),
        torch.where(steps.active, steps.kl, 0.0).sum(-1),
    )


def evaluate_guided_policy(
    policy: GuidedPolicy, tokenizer, prompt_ids: list[list[int]], prompt_texts: list[str], scorer, **options
) -> EvalResult:
    """Reward and both KL estimators of a guided policy against its reference (SHIQ_MATH §6, §8), the
    counterpart of ``shiq_eval.evaluate.evaluate_policy``: completions sampled at top-p 1 (temperature 1
    unless ``temperature`` says otherwise), scored by ``scorer(prompt_texts, completion_texts)``; the KL
    estimators are those of the temperature-1 guided policy at the visited states, read off the sampling
    pass (:meth:`GuidedPolicy.generate_with_kls`). ``options`` are those of
    :func:`shiq_eval.evaluate.evaluate_samples` (``max_new_tokens``, ``batch_size``, ``seed``,
    ``keep_samples``, ``progress``, ``temperature``)."""
    return evaluate_one_pass(policy, tokenizer, prompt_ids, prompt_texts, scorer, **options)
