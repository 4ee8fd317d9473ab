"""One assistant turn at a time with the ground-truth history: per-turn answers of a causal LM on a
BFCL entry, scored by the checker, with the exact per-token KL to a reference (SHIQ_MATH §6).

For every turn ``k`` of an entry the model is shown the ground-truth conversation up to that turn
(system prompt with the function docs, the earlier turns' ground-truth calls, tool results and
end-of-turn texts, this turn's user message) and writes one assistant message. The message is parsed
as a list of calls (:func:`shiq_eval.bfcl.parse.decode_calls`; anything else is an empty turn) and
the answers of all turns are checked together by :func:`shiq_eval.bfcl.checker.check_trajectory`:
``turn_rewards_reset[k]`` (turn ``k`` run from the ground-truth state) is the per-turn accuracy, and
``turn_rewards`` the cumulative turn reward of the same answers.

The prompts of successive turns are token-prefixes of one rendering of the ground-truth
conversation, so each model keeps one KV cache per entry: it reads the conversation once, chunk by
chunk up to each turn's answer, and its cache is cut back to the prompt after every answer. The
same pass gives the model's log-likelihood of the ground-truth answer of every turn.
"""

from __future__ import annotations

import torch

from shiq_data.chat import assistant_spans
from shiq_eval.bfcl.checker import check_trajectory
from shiq_eval.bfcl.parse import decode_calls
from shiq_eval.bfcl.rollout import ScriptedPolicy, rollout_entry
from shiq_eval.generate import SamplingConfig, sample_next
from shiq_eval.kl import exact_token_kl, token_kl


def ground_truth_trajectory(entry: dict, compact: bool = False) -> dict:
    """The entry's ground truth rolled out as a conversation (:func:`shiq_eval.bfcl.rollout.rollout_entry`
    with the scripted ground truth: all calls of a turn in one assistant message, then the end-of-turn text;
    ``compact``: shorter function docs, :func:`shiq_eval.bfcl.rollout.compact_docs`)."""
    return rollout_entry(entry, ScriptedPolicy.ground_truth(entry), compact=compact)


def turn_positions(tokenizer, trajectory: dict) -> tuple[list[int], list[tuple[int, int]]]:
    """``(ids [T], spans)``: the token ids of the whole conversation and, for each turn ``k``, the span
    ``[start, end)`` of the action tokens of its first assistant message (``ids[:start]`` is the prompt
    the model answers at turn ``k``; ``end - 1`` is its end-of-turn token)."""
    ids, spans = assistant_spans(tokenizer, trajectory["messages"])
    first: dict[int, tuple[int, int]] = {}
    for k, span in zip(trajectory["assistant_turns"], spans):
        first.setdefault(k, span)
    n = max(first) + 1 if first else 0
    if sorted(first) != list(range(n)):
        raise ValueError(f"{trajectory.get('id', '?')}: a turn has no assistant message (turns {sorted(first)})")
    return ids, [first[k] for k in range(n)]


class _CachedLM:
    """A Hugging Face causal LM reading one token sequence into a KV cache, chunk by chunk."""

    def __init__(self, model):
        from transformers import DynamicCache  # heavy: transformers, only when a model runs

        self.model, self.cache, self.length = model, DynamicCache(), 0

    def feed(self, tokens: list[int], keep: list[int]) -> torch.Tensor:
        """Append ``tokens`` to the cache; logits ``[len(keep), V]`` (float64) at the given offsets into
        ``tokens`` (each predicts the token after it)."""
        x = torch.tensor([tokens], dtype=torch.long)
        out = self.model.model(input_ids=x, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.length += len(tokens)
        h = out.last_hidden_state[0, keep]
        return self.model.lm_head(h).double()

    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens of the cache."""
        self.cache.crop(length - self.length)  # a negative count removes that many tokens from the end
        self.length = length


@torch.no_grad()
def answer_turns(
    model,
    tokenizer,
    entry: dict,
    trajectory: dict | None = None,
    *,
    ref_model=None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
) -> dict:
    """``model``'s answer to every turn of ``entry`` given the ground-truth history, checked.

    Args:
        model, ref_model: Hugging Face causal LMs with ``.model`` (the decoder) and ``.lm_head``
            (Llama-style); ``ref_model`` None: no KL (0 for every turn).
        trajectory: the ground-truth conversation (:func:`ground_truth_trajectory`, computed if None).
        temperature: 0 greedy, else sampling at that temperature (top-p 1), seeded by ``seed`` and the turn.
    Returns ``{"answers": [str] per turn, "decoded_turns", "tokens": [[int]] generated per turn,
    "kl": [float] per turn (Σ over the generated tokens of KL(π(·|s_t) ‖ π_ref(·|s_t)), exact over the
    vocabulary), "gt_nll": [float] per turn (minus the log-likelihood of the ground-truth answer, its
    end-of-turn token included), "gt_tokens": [int] per turn}`` plus the checker's fields (``valid``,
    ``turn_rewards``, ``turn_rewards_reset``, ...).
    """
    traj = ground_truth_trajectory(entry) if trajectory is None else trajectory
    ids, spans = turn_positions(tokenizer, traj)
    eos = tokenizer.eos_token_id
    policy = _CachedLM(model)
    ref = _CachedLM(ref_model) if ref_model is not None else None
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0)
    out = {"answers": [], "decoded_turns": [], "tokens": [], "kl": [], "gt_nll": [], "gt_tokens": []}
    pending = None  # the ground-truth answer of the previous turn, still to be scored
    gt_logp = []

    def feed_to(end: int, with_ref: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Read ``ids[policy.length:end]``; logits at the last position (and at the positions of the
        pending ground-truth answer, whose log-likelihood is collected)."""
        start = policy.length
        chunk = ids[start:end]
        keep = [len(chunk) - 1]
        targets = []
        if pending is not None:
            s, e = pending
            # position p predicts token p + 1: positions s-1 .. e-2 predict the answer s .. e-1;
            # s - 1 was read with the previous chunk (its logits are kept there)
            keep = [p - start for p in range(max(s, start), e - 1)] + keep
            targets = ids[max(s, start) + 1 : e]
        logits = policy.feed(chunk, keep)
        if targets:
            gt_logp.append(torch.log_softmax(logits[:-1], -1)[torch.arange(len(targets)), targets])
        ref_logits = ref.feed(chunk, [len(chunk) - 1]) if ref is not None and with_ref else None
        return logits[-1], ref_logits[-1] if ref_logits is not None else None

    for k, (s, e) in enumerate(spans):
        last, ref_last = feed_to(s)
        if pending is not None:
            out["gt_nll"].append(-float(torch.cat(gt_logp).sum()))
            gt_logp.clear()
        # the first token of the ground-truth answer is predicted by position s - 1
        gt_logp.append(torch.log_softmax(last, -1)[ids[s]].reshape(1))
        pending = (s, e)
        # generate the answer
        generator = torch.Generator().manual_seed(seed * 1_000_003 + k)
        states, tokens = [last], []
        while True:
            tok = int(sample_next(states[-1][None], cfg, generator)[0])
            tokens.append(tok)
            if tok == eos or len(tokens) >= max_new_tokens:
                break
            states.append(policy.feed([tok], [0])[0])
        kl = 0.0
        if ref is not None:
            ref_states = [ref_last]
            if len(tokens) > 1:
                ref_states += list(ref.feed(tokens[:-1], list(range(len(tokens) - 1))))
            mask = torch.ones(1, len(tokens), dtype=torch.bool)
            kl = float(exact_token_kl(token_kl(torch.stack(states)[None], torch.stack(ref_states)[None]), mask)[0])
            ref.crop(s)
        policy.crop(s)
        answer = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        calls = decode_calls(answer)
        out["answers"].append(answer)
        out["tokens"].append(tokens)
        out["decoded_turns"].append([calls] if calls else [])
        out["kl"].append(kl)
        out["gt_tokens"].append(e - s)
    if pending is not None:
        feed_to(pending[1], with_ref=False)
        out["gt_nll"].append(-float(torch.cat(gt_logp).sum()))
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    out["over_context"] = bool(context and spans and spans[-1][0] + max_new_tokens > context)
    return {**check_trajectory(entry, out["decoded_turns"]), **out}
