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
same pass gives the model's log-likelihood of the ground-truth answer of every turn. When the model is a
fine-tune of the reference's last layers (:func:`shiq_eval.shared_layers.shared_prefix_layers`), the
reference runs only those layers, on the hidden states the model computed at the first of them.

Decoding one token reads every weight of the model once, so on a CPU one answer at a time is bound by
memory, not arithmetic: :func:`answer_turns_batch` answers several entries in lockstep (turn ``k`` of
each at the same time). Each entry reads its conversation into a cache of its own, unpadded (long
prompts read padded, through an explicit attention mask, cost more than batching saves); only the
answers are decoded as one batch, from a right-padded copy of the entries' caches, each row masked
from the others' tokens and padding (``tools/bench_bfcl_eval.py`` measures batch sizes).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from shiq_data.chat import assistant_spans
from shiq_eval.bfcl.checker import check_trajectory
from shiq_eval.bfcl.parse import decode_calls
from shiq_eval.bfcl.rollout import ScriptedPolicy, rollout_entry
from shiq_eval.generate import SamplingConfig, sample_next
from shiq_eval.kl import exact_token_kl, token_kl
from shiq_eval.shared_layers import cache_from, decoder_from, inputs_of_layer, shared_prefix_layers


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


class _BatchLM:
    """A Hugging Face causal LM reading ``B`` token sequences into one KV cache, chunk by chunk, in lockstep.

    Each :meth:`feed` appends one chunk per row; the chunks are right-padded to the longest, and the
    padding is masked out of attention (``mask``) and takes no position (``pos``: real tokens per row),
    so a row's logits are those of its tokens alone, whatever its neighbours hold. A row with ``B = 1``
    and no padding runs exactly as a single sequence does.
    """

    def __init__(self, model, batch: int, start: int = 0, capture: int | None = None):
        """``start`` > 0: the model from decoder layer ``start`` on (:func:`shiq_eval.shared_layers.decoder_from`),
        fed the hidden states ``[n, H]`` entering that layer instead of token ids. ``capture``: keep the hidden
        states entering that layer during each :meth:`feed` (``self.captured``, ``[B, C, H]``)."""
        from transformers import DynamicCache  # heavy: transformers, only when a model runs

        self.model, self.start, self.capture, self.captured = model, start, capture, None
        self.decoder = model.model if start == 0 else decoder_from(model, start)
        self.cache = DynamicCache() if start == 0 else cache_from(start)
        self.mask = torch.zeros(batch, 0, dtype=torch.long)  # [B, L]: 1 where the cache holds a real token
        self.pos = torch.zeros(batch, dtype=torch.long)  # [B]: real tokens read per row

    @property
    def length(self) -> int:
        """Positions in the cache, padding included."""
        return self.mask.shape[1]

    def feed(self, chunks: list, keep: list[list[int]]) -> list[torch.Tensor]:
        """Append ``chunks[b]`` (token ids; hidden states ``[n, H]`` when the model starts past layer 0) to row
        ``b`` (an empty chunk: nothing); for each row, the logits ``[len(keep[b]), V]`` (float64) at the given
        offsets into its chunk (each predicts the token after it)."""
        B, C = len(chunks), max(map(len, chunks))
        self.captured = None
        if C == 0:
            return [torch.zeros(0, self.model.config.vocab_size, dtype=torch.float64) for _ in range(B)]
        if self.start:
            x = torch.zeros(B, C, self.model.config.hidden_size)  # [B, C, H]
        else:
            x = torch.zeros(B, C, dtype=torch.long)  # [B, C]
        real = torch.zeros(B, C, dtype=torch.long)
        for b, c in enumerate(chunks):
            if len(c):
                x[b, : len(c)] = torch.as_tensor(c, dtype=x.dtype)
                real[b, : len(c)] = 1
        position_ids = self.pos[:, None] + torch.arange(C)[None]  # [B, C]; padding: past the row's end, masked
        self.mask = torch.cat([self.mask, real], 1)
        padded = bool((self.mask == 0).any())
        watch = inputs_of_layer(self.model, self.capture) if self.capture is not None else nullcontext([])
        with watch as seen:
            out = self.decoder(
                **({"inputs_embeds": x} if self.start else {"input_ids": x}),
                attention_mask=self.mask if padded else None,
                position_ids=position_ids,
                cache=self.cache,
                use_cache=True,
            )
        if self.capture is not None:
            self.captured = seen[0]  # [B, C, H]
        self.cache = out.cache
        self.pos += real.sum(1)
        h = out.last_hidden_state  # [B, C, D]
        return [self.model.lm_head(h[b, k]).double() for b, k in enumerate(keep)]

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions of the cache (padding included)."""
        self.cache.crop(length - self.length)  # a negative count removes that many positions from the end
        self.mask = self.mask[:, :length]
        self.pos = self.mask.sum(1)

    @classmethod
    def stack(cls, rows: list[_BatchLM]) -> _BatchLM:
        """The readers ``rows`` (one row each, of the same model and first layer) as one batch: copies of their
        caches right-padded to the longest and stacked (theirs stay as they are), the padding masked and
        given no position."""
        first, L = rows[0], max(r.length for r in rows)
        out = cls.__new__(cls)
        out.model, out.start, out.capture, out.captured, out.decoder = (
            first.model,
            first.start,
            first.capture,
            None,
            first.decoder,
        )
        from transformers import DynamicCache

        out.cache = DynamicCache() if first.start == 0 else cache_from(first.start)
        for i, layer in enumerate(first.cache.layers):
            if not layer.is_initialized:  # the layers before ``start``
                continue
            k0, v0 = layer.keys, layer.values  # [1, h, L_0, d]
            keys = k0.new_zeros(len(rows), *k0.shape[1:-2], L, k0.shape[-1])  # [B, h, L, d], zeros at padding
            values = v0.new_zeros(len(rows), *v0.shape[1:-2], L, v0.shape[-1])
            for b, r in enumerate(rows):
                k, v = r.cache.layers[i].keys[0], r.cache.layers[i].values[0]  # [h, L_b, d]
                keys[b, ..., : k.shape[-2], :], values[b, ..., : v.shape[-2], :] = k, v
            out.cache.update(keys, values, i)
        out.mask = torch.cat([F.pad(r.mask, (0, L - r.length)) for r in rows])  # [B, L]
        out.pos = torch.cat([r.pos for r in rows])
        return out


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
    return answer_turns_batch(
        model,
        tokenizer,
        [entry],
        [trajectory],
        ref_model=ref_model,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seeds=[seed],
    )[0]


@torch.no_grad()
def answer_turns_batch(
    model,
    tokenizer,
    entries: list[dict],
    trajectories: list[dict | None] | None = None,
    *,
    ref_model=None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seeds: list[int] | None = None,
) -> list[dict]:
    """:func:`answer_turns` for several entries at once (one result per entry, in order): the entries
    are answered in lockstep, turn ``k`` of every entry at the same time, so that each decoding step reads
    the weights once for the whole batch. Each entry reads its conversation alone (no padding); the answers
    are decoded in one batch where each row sees only its own tokens (padding is masked and takes no
    position), so the results are those of :func:`answer_turns` on each entry alone, up to floating-point
    rounding."""
    B = len(entries)
    trajs = [
        ground_truth_trajectory(e) if t is None else t
        for e, t in zip(entries, trajectories if trajectories is not None else [None] * B)
    ]
    seeds = list(seeds) if seeds is not None else [0] * B
    rows = [turn_positions(tokenizer, t) for t in trajs]  # (ids [T_b], spans_b)
    eos = tokenizer.eos_token_id
    # a fine-tune of the reference's last layers: the reference runs only its own layers, on the hidden
    # states the policy computed at the first of them
    shared = shared_prefix_layers(model, ref_model) if ref_model is not None else 0
    # one reader per entry: prompts are read unpadded, the answers decoded as a batch (_BatchLM.stack)
    policy = [_BatchLM(model, 1, capture=shared or None) for _ in range(B)]
    ref = [_BatchLM(ref_model, 1, start=shared) for _ in range(B)] if ref_model is not None else None
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0)
    outs = [
        {"answers": [], "decoded_turns": [], "tokens": [], "kl": [], "gt_nll": [], "gt_tokens": []} for _ in entries
    ]
    pending: list[tuple[int, int] | None] = [None] * B  # each row's ground-truth answer still to be scored
    gt_logp: list[list[torch.Tensor]] = [[] for _ in range(B)]

    def feed_to(ends: list[int | None], with_ref: list[bool]) -> tuple[list, list]:
        """Read ``ids_b[pos_b:ends[b]]`` into row ``b`` (None: nothing); logits at each row's last position
        (and at the positions of its pending ground-truth answer, whose log-likelihood is collected)."""
        chunks, keeps, targets = [], [], []
        for b, end in enumerate(ends):
            ids, start = rows[b][0], int(policy[b].pos[0])
            chunk = ids[start:end] if end is not None else []
            keep, tg = ([len(chunk) - 1] if chunk else []), []
            if chunk and pending[b] is not None:
                s, e = pending[b]
                # position p predicts token p + 1: positions s-1 .. e-2 predict the answer s .. e-1;
                # s - 1 was read with the previous chunk (its logits are kept there)
                keep = [p - start for p in range(max(s, start), e - 1)] + keep
                tg = ids[max(s, start) + 1 : e]
            chunks.append(chunk)
            keeps.append(keep)
            targets.append(tg)
        logits = [policy[b].feed([c], [k])[0] for b, (c, k) in enumerate(zip(chunks, keeps))]
        for b, tg in enumerate(targets):
            if tg:
                gt_logp[b].append(torch.log_softmax(logits[b][:-1], -1)[torch.arange(len(tg)), tg])
        ref_logits = [None] * B
        if ref is not None:
            for b, (c, w) in enumerate(zip(chunks, with_ref)):
                if w and c:
                    x = policy[b].captured[0, : len(c)] if shared else c
                    ref_logits[b] = ref[b].feed([x], [[len(c) - 1]])[0]
        lasts = [lg[-1] if len(lg) else None for lg in logits]
        return lasts, [lg[-1] if lg is not None and len(lg) else None for lg in ref_logits]

    n_turns = [len(spans) for _, spans in rows]
    for k in range(max(n_turns) + 1):
        # rows answering turn k read up to its prompt; rows past their last turn read the last ground-truth
        # answer (its log-likelihood) once, then nothing
        answering = [k < n for n in n_turns]
        ends = [
            rows[b][1][k][0] if answering[b] else (pending[b][1] if k == n_turns[b] and pending[b] else None)
            for b in range(B)
        ]
        lasts, ref_lasts = feed_to(ends, answering)
        for b in range(B):
            if ends[b] is not None and pending[b] is not None:
                outs[b]["gt_nll"].append(-float(torch.cat(gt_logp[b]).sum()))
                gt_logp[b].clear()
                pending[b] = None
        if not any(answering):
            break
        for b in range(B):
            if answering[b]:
                s, e = rows[b][1][k]
                # the first token of the ground-truth answer is predicted by position s - 1
                gt_logp[b].append(torch.log_softmax(lasts[b], -1)[rows[b][0][s]].reshape(1))
                pending[b] = (s, e)
        # generate the answers, every answering row one token per step, from a batched copy of their caches
        act = [b for b in range(B) if answering[b]]
        batch = _BatchLM.stack([policy[b] for b in act])
        # (modulo 2**64, what a torch seed holds: a large seed overflowed it; a smaller one draws as before)
        generators = [torch.Generator().manual_seed((seeds[b] * 1_000_003 + k) % 2**64) for b in range(B)]
        states = [[lasts[b]] if answering[b] else [] for b in range(B)]
        tokens: list[list[int]] = [[] for _ in range(B)]
        fed: list[list[torch.Tensor]] = [[] for _ in range(B)]  # with shared layers: each fed token's [H] there
        writing = list(answering)
        while any(writing):
            for b in act:
                if writing[b]:
                    tok = int(sample_next(states[b][-1][None], cfg, generators[b])[0])
                    tokens[b].append(tok)
                    writing[b] = not (tok == eos or len(tokens[b]) >= max_new_tokens)
            if not any(writing):
                break
            step = batch.feed(
                [[tokens[b][-1]] if writing[b] else [] for b in act], [[0] if writing[b] else [] for b in act]
            )
            for j, b in enumerate(act):
                if writing[b]:
                    states[b].append(step[j][0])
                    if shared:
                        fed[b].append(batch.captured[j, 0])
        del batch  # the entries' own caches still end at the prompt
        kls = [0.0] * B
        if ref is not None:
            for b in act:
                # every answer token but the last was fed back to the policy: the reference reads the same
                answer = (torch.stack(fed[b]) if fed[b] else []) if shared else tokens[b][:-1]
                ref_length = ref[b].length
                more = ref[b].feed([answer], [list(range(len(tokens[b]) - 1))])[0]
                ref[b].crop(ref_length)
                ref_states = [ref_lasts[b], *more]
                mask = torch.ones(1, len(tokens[b]), dtype=torch.bool)
                kl = exact_token_kl(token_kl(torch.stack(states[b])[None], torch.stack(ref_states)[None]), mask)
                kls[b] = float(kl[0])
        for b in range(B):
            if not answering[b]:
                continue
            s, e = rows[b][1][k]
            answer = tokenizer.decode(tokens[b], skip_special_tokens=True).strip()
            calls = decode_calls(answer)
            outs[b]["answers"].append(answer)
            outs[b]["tokens"].append(tokens[b])
            outs[b]["decoded_turns"].append([calls] if calls else [])
            outs[b]["kl"].append(kls[b])
            outs[b]["gt_tokens"].append(e - s)
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    results = []
    for entry, out, (_, spans) in zip(entries, outs, rows):
        out["over_context"] = bool(context and spans and spans[-1][0] + max_new_tokens > context)
        results.append({**check_trajectory(entry, out["decoded_turns"]), **out})
    return results
