"""Per-token statistics over vocabulary shards, and chunked over tokens (SHIQ_MATH §2).

The chosen logit ``c_t = ℓ(s_t, y_t)`` and the log-partition ``z_t = log Σ_a exp ℓ(s_t, a)`` of
SHIQ_MATH §2, computed without gathering the vocabulary and, on the chunked path, without ever
holding the ``[tokens, V]`` logits:

- :class:`VocabParallelTokenStats` — from vocab-parallel logits ``[N, V/tp]`` (rank ``r`` of the
  tensor-parallel group holds vocabulary ids ``[r·V/tp, (r+1)·V/tp)``, megatron's layout).
  ``z``: max all-reduce, then sum-exp all-reduce; ``c``: masked gather, then sum all-reduce.
  Backward is analytic: ``∂c/∂ℓ = onehot(y)``, ``∂z/∂ℓ = softmax(ℓ)``, each scaled by its incoming
  gradient; no communication is needed (each rank owns the gradient of its own shard).
- :class:`ChunkedTokenStats` — from final hidden states ``[N, H]`` and the (vocab-parallel) output
  weight ``[V/tp, H]``, a chunk of tokens at a time; the backward recomputes each chunk's logits and
  accumulates the weight gradient chunk by chunk. Peak extra memory is ``chunk × V/tp`` floats.

Both agree with :func:`shiq_train.stats.token_stats` on the gathered logits (values and gradients;
``tests/test_stats_parallel.py``). Statistics are float32 whatever the logits' dtype.
The ``causal_*`` wrappers align the result with the tokens as :func:`~shiq_train.stats.causal_lm_stats`
does: position ``t`` holds the statistics of token ``t`` predicted from position ``t − 1``.

``group=None`` means no tensor parallelism (one shard holding the whole vocabulary).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from shiq_train.stats import TokenStats


def tensor_parallel_group():
    """megatron's tensor-parallel group, or None if model parallelism is not initialised or TP = 1."""
    try:
        from megatron.core import parallel_state  # heavy: megatron
    except ImportError:  # pragma: no cover - megatron is a dependency
        return None
    if not parallel_state.model_parallel_is_initialized():
        return None
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_tensor_model_parallel_group()


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(x, op=op, group=group)
    return x


def _valid_columns(vocab_start: int, vp: int, vocab_size: int | None, device):
    """Bool ``[Vp]`` of the shard's real vocabulary columns, or None when none is padding."""
    if vocab_size is None or vocab_start + vp <= vocab_size:
        return None
    return torch.arange(vocab_start, vocab_start + vp, device=device) < vocab_size


def _local_targets(targets, vocab_start: int, vp: int):
    """``(local, in_shard)``: shard-local column of each target (clamped) and whether it is here."""
    local = targets - vocab_start
    in_shard = (local >= 0) & (local < vp)
    return local.clamp(0, vp - 1), in_shard


def _shard_stats(
    x: torch.Tensor, targets: torch.Tensor, vocab_start: int, vocab_size: int | None, group, keep_softmax: bool = False
):
    """``(c, z, p)`` from shard logits ``x`` ``[n, Vp]`` (any float dtype; statistics in float32).

    ``p`` is the shard's float32 softmax ``[n, Vp]`` when ``keep_softmax`` (else None). One
    ``[n, Vp]`` float32 buffer is allocated, and it is the softmax: ``exp(x − m)`` is formed in it,
    summed, then normalised in place.
    """
    vp = x.shape[-1]
    valid = _valid_columns(vocab_start, vp, vocab_size, x.device)
    m = (x if valid is None else x.masked_fill(~valid, float("-inf"))).max(-1).values.float()
    _all_reduce(m, dist.ReduceOp.MAX, group)
    e = torch.sub(x, m.unsqueeze(-1), out=torch.empty(x.shape, dtype=torch.float32, device=x.device))
    if valid is not None:  # padded vocabulary entries: exp(-inf) = 0, out of z and of the softmax
        e.masked_fill_(~valid, float("-inf"))
    s = e.exp_().sum(-1)
    _all_reduce(s, dist.ReduceOp.SUM, group)
    z = m + torch.log(s)
    local, in_shard = _local_targets(targets, vocab_start, vp)
    c = x.gather(-1, local.unsqueeze(-1)).squeeze(-1).float().masked_fill(~in_shard, 0.0)
    _all_reduce(c, dist.ReduceOp.SUM, group)
    return c, z, (e.div_(s.unsqueeze(-1)) if keep_softmax else None)


def _grad_from_softmax_(p, targets, vocab_start: int, grad_c, grad_z):
    """``grad_z · softmax(ℓ) + grad_c · onehot(y)`` on one shard, written over ``p`` ``[n, Vp]``."""
    local, in_shard = _local_targets(targets, vocab_start, p.shape[-1])
    p.mul_(grad_z.unsqueeze(-1))
    p.scatter_add_(-1, local.unsqueeze(-1), (grad_c * in_shard).unsqueeze(-1))
    return p


def _check(targets, tokens_dim: int, what: str, shard_width: int, group, vocab_size: int | None):
    """Refuse ``targets`` of another shape than ``[N]``, or holding ids outside the vocabulary (``vocab_size``,
    else every shard's columns): a gather masked per shard would read 0, or a padding column, for them, where
    ``shiq_train.stats.token_stats`` refuses them. On a GPU the ids are checked on the device (an assertion
    there, no wait for the host)."""
    if targets.dim() != 1 or targets.shape[0] != tokens_dim:
        raise ValueError(
            f"targets must be [N] matching {what}'s first dimension {tokens_dim}, got {tuple(targets.shape)}"
        )
    vocab = vocab_size if vocab_size is not None else shard_width * (1 if group is None else dist.get_world_size(group))
    inside = ((targets >= 0) & (targets < vocab)).all()
    message = f"targets hold token ids outside [0, {vocab})"
    if targets.device.type == "cpu":
        if not bool(inside):
            raise ValueError(message)
    else:
        torch._assert_async(inside, message)


class VocabParallelTokenStats(torch.autograd.Function):
    """``(c, z)`` ``[N]`` float32 from vocab-parallel logits ``[N, V/tp]`` (SHIQ_MATH §2).

    ``apply(logits, targets, group=None, vocab_size=None)``: ``targets`` ``[N]`` int64 global token
    ids; ``vocab_size`` the true vocabulary size when the sharded vocabulary is padded (padded
    columns are excluded from ``z``). The gradient w.r.t. ``logits`` has the logits' dtype.

    Like megatron's ``vocab_parallel_cross_entropy``, the forward keeps the float32 softmax (not the
    logits) and the backward turns it into the gradient in place: one ``[N, V/tp]`` buffer for
    forward and backward together. The backward can therefore run only once per forward.
    """

    @staticmethod
    def forward(ctx, logits, targets, group=None, vocab_size=None):
        _check(targets, logits.shape[0], "logits", logits.shape[-1], group, vocab_size)
        vocab_start = _rank(group) * logits.shape[-1]
        c, z, p = _shard_stats(logits, targets, vocab_start, vocab_size, group, keep_softmax=True)
        ctx.save_for_backward(p, targets)
        ctx.vocab_start, ctx.dtype, ctx.used = vocab_start, logits.dtype, False
        return c, z

    @staticmethod
    def backward(ctx, grad_c, grad_z):
        if ctx.used:
            raise RuntimeError(
                "VocabParallelTokenStats: backward ran twice over one forward (its softmax buffer "
                "became the first gradient); recompute the statistics instead of retain_graph=True"
            )
        ctx.used = True
        p, targets = ctx.saved_tensors
        g = _grad_from_softmax_(p, targets, ctx.vocab_start, grad_c.float(), grad_z.float())
        return g.to(ctx.dtype), None, None, None


class ChunkedTokenStats(torch.autograd.Function):
    """``(c, z)`` ``[N]`` float32 from hidden states ``[N, H]`` and output weight ``[V/tp, H]``.

    ``apply(hidden, weight, targets, chunk_tokens, group=None, vocab_size=None)``. Logits are
    ``hidden @ weight.T`` (megatron's output layer without bias), formed ``chunk_tokens`` rows at a
    time in the inputs' dtype and upcast to float32. Backward recomputes each chunk; the hidden-state
    gradient is all-reduced over ``group`` (each rank's shard contributes a partial sum, as in
    megatron's column-parallel output layer), the weight gradient stays local to the shard.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens, group=None, vocab_size=None):
        _check(targets, hidden.shape[0], "hidden", weight.shape[0], group, vocab_size)
        if hidden.shape[-1] != weight.shape[-1]:
            raise ValueError(
                f"hidden [N, H] and weight [V/tp, H] disagree on H: {tuple(hidden.shape)} vs {tuple(weight.shape)}"
            )
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        vocab_start = _rank(group) * weight.shape[0]
        cs, zs = [], []
        for i in range(0, hidden.shape[0], chunk_tokens):
            x = hidden[i : i + chunk_tokens] @ weight.t()
            c, z, _ = _shard_stats(x, targets[i : i + chunk_tokens], vocab_start, vocab_size, group)
            cs.append(c)
            zs.append(z)
        c = torch.cat(cs) if cs else hidden.new_zeros(0, dtype=torch.float32)
        z = torch.cat(zs) if zs else hidden.new_zeros(0, dtype=torch.float32)
        ctx.save_for_backward(hidden, weight, targets, z)
        ctx.chunk_tokens, ctx.group, ctx.vocab_size, ctx.vocab_start = chunk_tokens, group, vocab_size, vocab_start
        return c, z

    @staticmethod
    def backward(ctx, grad_c, grad_z):
        hidden, weight, targets, z = ctx.saved_tensors
        n, vp = hidden.shape[0], weight.shape[0]
        valid = _valid_columns(ctx.vocab_start, vp, ctx.vocab_size, hidden.device)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for i in range(0, n, ctx.chunk_tokens):
            sl = slice(i, i + ctx.chunk_tokens)
            h = hidden[sl]
            p = (h @ weight.t()).float().sub_(z[sl].unsqueeze(-1))  # fresh chunk buffer: in place from here
            if valid is not None:
                p.masked_fill_(~valid, float("-inf"))
            g = _grad_from_softmax_(p.exp_(), targets[sl], ctx.vocab_start, grad_c[sl].float(), grad_z[sl].float())
            g = g.to(hidden.dtype)
            if need_h:
                grad_h[sl] = g @ weight
            if need_w:
                grad_w.addmm_(g.t().float(), h.float())  # in place: no [V/tp, H] temporary per chunk
        if need_h:
            _all_reduce(grad_h, dist.ReduceOp.SUM, ctx.group)
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over ``group`` (the input of a column-parallel
    layer: each rank's vocabulary shard contributes a partial gradient)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        _all_reduce(grad, dist.ReduceOp.SUM, ctx.group)
        return grad, None


def hidden_token_stats(hidden, weight, targets, group=None, vocab_size=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c, z)`` ``[N]`` float32 of ``targets`` ``[N]`` from hidden states ``[N, H]`` through the output
    layer's weight ``[V/tp, H]`` (megatron's column-parallel output layer without bias: the logits
    ``[N, V/tp]`` are this rank's shard, the hidden-state gradient is summed over ``group``)."""
    if group is not None:
        hidden = _SumGradOverGroup.apply(hidden, group)
    return VocabParallelTokenStats.apply(hidden @ weight.t(), targets.long(), group, vocab_size)


def position_causal_stats(hidden, weight, tokens, positions, chunk_tokens=0, group=None, vocab_size=None):
    """Statistics ``[B, T, 2]`` float32 (chosen logit, log-partition) of the tokens where ``positions``
    ``[B, T]`` (bool) is True, zero elsewhere, from hidden states ``[B, T, H]`` (position ``t − 1``
    predicts token ``t``): the output weight ``[V/tp, H]`` meets only the hidden states that predict
    them, all at once, or ``chunk_tokens`` at a time (recomputed in the backward) if ``chunk_tokens > 0``."""
    want = positions[:, 1:]  # [B, T-1]: the token after each hidden state
    h, targets = hidden[:, :-1][want], tokens[:, 1:][want]  # [N, H], [N], row-major over (b, t)
    if chunk_tokens:
        c, z = ChunkedTokenStats.apply(h, weight, targets.long(), int(chunk_tokens), group, vocab_size)
    else:
        c, z = hidden_token_stats(h, weight, targets, group, vocab_size)
    stats = torch.zeros(*tokens.shape, 2, dtype=torch.float32, device=hidden.device)
    stats[:, 1:] = stats[:, 1:].masked_scatter(want.unsqueeze(-1), torch.stack([c, z], -1))
    return stats


def vocab_parallel_token_stats(logits, targets, group=None, vocab_size=None) -> TokenStats:
    """:class:`TokenStats` ``[B, T]`` from vocab-parallel logits ``[B, T, V/tp]`` and targets ``[B, T]``.

    ``logits[b, t]`` scores ``targets[b, t]`` (no shift; see :func:`vocab_parallel_causal_stats`).
    """
    B, T, vp = logits.shape
    c, z = VocabParallelTokenStats.apply(logits.reshape(B * T, vp), targets.reshape(B * T).long(), group, vocab_size)
    return TokenStats(c.view(B, T), z.view(B, T))


def chunked_token_stats(hidden, weight, targets, chunk_tokens=1024, group=None, vocab_size=None) -> TokenStats:
    """:class:`TokenStats` ``[B, T]`` from hidden states ``[B, T, H]``, weight ``[V/tp, H]``, targets ``[B, T]``."""
    B, T, H = hidden.shape
    c, z = ChunkedTokenStats.apply(
        hidden.reshape(B * T, H), weight, targets.reshape(B * T).long(), int(chunk_tokens), group, vocab_size
    )
    return TokenStats(c.view(B, T), z.view(B, T))


def _shift(st: TokenStats) -> TokenStats:
    pad = st.chosen_logits.new_zeros(st.chosen_logits.shape[0], 1)
    return TokenStats(torch.cat([pad, st.chosen_logits], 1), torch.cat([pad, st.logz], 1))


def _next_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` targets of every position: token ``t + 1``, and token 0 at the last position (which
    predicts nothing; its statistics are dropped), so the logits need no slicing copy."""
    return torch.cat([tokens[:, 1:], tokens.new_zeros(tokens.shape[0], 1)], 1)


def vocab_parallel_causal_stats(logits, tokens, group=None, vocab_size=None) -> TokenStats:
    """Causal-LM statistics aligned with ``tokens`` ``[B, T]`` from vocab-parallel logits ``[B, T, V/tp]``.

    Same alignment as :func:`shiq_train.stats.causal_lm_stats` (position 0 is zero). The statistics
    are computed at all ``T`` positions (the last one, which predicts nothing, against token 0 and
    then dropped) so that ``logits`` is used as a view: slicing ``logits[:, :-1]`` would copy it.
    """
    st = vocab_parallel_token_stats(logits, _next_tokens(tokens), group, vocab_size)
    return _shift(TokenStats(st.chosen_logits[:, :-1], st.logz[:, :-1]))


def seq_first_causal_stats(logits, tokens, group=None, vocab_size=None) -> TokenStats:
    """Causal-LM statistics aligned with ``tokens`` ``[B, T]`` from sequence-first logits ``[T, B, V/tp]``.

    megatron's output layer produces this layout; reading it directly saves the ``[B, T, V/tp]`` copy
    that ``GPTModel`` makes when it returns logits (see ``ShiQGPTModel.compute_language_model_loss``).
    Same alignment as :func:`vocab_parallel_causal_stats`.
    """
    T, B, vp = logits.shape
    if tokens.shape != (B, T):
        raise ValueError(
            f"tokens must be [B, T] = {(B, T)} for logits [T, B, V/tp] {tuple(logits.shape)}, got {tuple(tokens.shape)}"
        )
    targets = _next_tokens(tokens).t()  # [T, B]
    c, z = VocabParallelTokenStats.apply(logits.reshape(T * B, vp), targets.reshape(T * B).long(), group, vocab_size)
    return _shift(TokenStats(c.view(T, B).t()[:, :-1], z.view(T, B).t()[:, :-1]))


def chunked_causal_stats(hidden, weight, tokens, chunk_tokens=1024, group=None, vocab_size=None) -> TokenStats:
    """Causal-LM statistics aligned with ``tokens`` ``[B, T]`` from hidden states ``[B, T, H]``."""
    return _shift(chunked_token_stats(hidden[:, :-1], weight, tokens[:, 1:], chunk_tokens, group, vocab_size))
