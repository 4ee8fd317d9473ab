"""Vocab-parallel and chunked per-token statistics equal the full-logits reference (SHIQ_MATH §2).

Reference: :func:`shiq_train.stats.token_stats` on the gathered ``[B, T, V]`` logits. Checked: values
and gradients (w.r.t. logits, hidden states and output weight) under random upstream gradients for
``c`` and ``z``, at TP=1 in this process and at TP=2 with gloo (2 spawned processes).
"""

import os

import pytest
import torch
import torch.distributed as dist
from ranks import spawn

from shiq_train.parallel import free_port
from shiq_train.stats import causal_lm_stats, token_stats
from shiq_train.vocab_parallel import (
    chunked_causal_stats,
    chunked_token_stats,
    seq_first_causal_stats,
    vocab_parallel_causal_stats,
    vocab_parallel_token_stats,
)

B, T, V, H = 3, 7, 64, 16


def _inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    wc = torch.randn(B, T, generator=g)
    wz = torch.randn(B, T, generator=g)
    return logits, hidden, weight, targets, wc, wz


def _objective(st, wc, wz):
    return (st.chosen_logits * wc + st.logz * wz).sum()


def _reference(logits, hidden, weight, targets, wc, wz, vocab_size=V):
    """Values and gradients from full logits (the logits path and the hidden/weight path)."""
    lg = logits.detach().clone().requires_grad_(True)
    st = token_stats(lg[..., :vocab_size], targets)
    _objective(st, wc, wz).backward()
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    st2 = token_stats((h @ w.t())[..., :vocab_size], targets)
    _objective(st2, wc, wz).backward()
    return {
        "c": st.chosen_logits.detach(),
        "z": st.logz.detach(),
        "g_logits": lg.grad,
        "c2": st2.chosen_logits.detach(),
        "z2": st2.logz.detach(),
        "g_h": h.grad,
        "g_w": w.grad,
    }


def _close(a, b, tol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    rel = (a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-12)
    assert rel < tol, f"relative difference {rel:.3g} >= {tol}"


# ----------------------------------------------------------------------------------------------
# TP = 1


@pytest.mark.parametrize("vocab_size", [V, V - 5])
def test_vocab_parallel_tp1_matches_full_logits(vocab_size):
    logits, hidden, weight, targets, wc, wz = _inputs()
    targets = targets.clamp(max=vocab_size - 1)
    ref = _reference(logits, hidden, weight, targets, wc, wz, vocab_size)
    lg = logits.clone().requires_grad_(True)
    st = vocab_parallel_token_stats(lg, targets, vocab_size=vocab_size)
    _objective(st, wc, wz).backward()
    _close(st.chosen_logits, ref["c"])
    _close(st.logz, ref["z"])
    _close(lg.grad, ref["g_logits"])


@pytest.mark.parametrize("chunk", [1, 4, 5, 1000])
def test_chunked_tp1_matches_full_logits(chunk):
    logits, hidden, weight, targets, wc, wz = _inputs(1)
    ref = _reference(logits, hidden, weight, targets, wc, wz)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    st = chunked_token_stats(h, w, targets, chunk_tokens=chunk)
    _objective(st, wc, wz).backward()
    _close(st.chosen_logits, ref["c2"])
    _close(st.logz, ref["z2"])
    _close(h.grad, ref["g_h"])
    _close(w.grad, ref["g_w"])


def test_causal_alignment_matches_causal_lm_stats():
    logits, hidden, weight, targets, wc, wz = _inputs(2)
    lg_ref, lg = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ref = causal_lm_stats(lg_ref, targets)
    st = vocab_parallel_causal_stats(lg, targets)
    _close(st.chosen_logits, ref.chosen_logits)
    _close(st.logz, ref.logz)
    _objective(ref, wc, wz).backward()
    _objective(st, wc, wz).backward()
    _close(lg.grad, lg_ref.grad)
    assert lg.grad[:, -1].abs().max() == 0  # the last position predicts nothing
    ref2 = causal_lm_stats(hidden @ weight.t(), targets)
    st2 = chunked_causal_stats(hidden, weight, targets, chunk_tokens=3)
    _close(st2.chosen_logits, ref2.chosen_logits)
    _close(st2.logz, ref2.logz)


def test_bf16_logits_give_float32_stats_and_bf16_grads():
    logits, hidden, weight, targets, wc, wz = _inputs(3, torch.bfloat16)
    lg = logits.clone().requires_grad_(True)
    st = vocab_parallel_token_stats(lg, targets)
    assert st.logz.dtype == torch.float32
    ref = token_stats(logits, targets)  # upcasts too
    _close(st.logz, ref.logz)
    _objective(st, wc, wz).backward()
    assert lg.grad.dtype == torch.bfloat16
    lg_ref = logits.clone().requires_grad_(True)
    _objective(token_stats(lg_ref, targets), wc, wz).backward()
    _close(lg.grad.float(), lg_ref.grad.float(), tol=1e-2)  # bf16 rounding of the gradient


def test_backward_twice_is_refused():
    logits, _, _, targets, wc, wz = _inputs(5)
    lg = logits.clone().requires_grad_(True)
    loss = _objective(vocab_parallel_token_stats(lg, targets), wc, wz)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_large_logits_are_stable():
    logits, _, _, targets, wc, wz = _inputs(4)
    logits = logits + 1e4
    st = vocab_parallel_token_stats(logits, targets)
    assert torch.isfinite(st.logz).all()
    # absolute, against float64: relative to |logz| ~ 1e4 the old tolerance let 0.1 through (float32 spacing
    # at 1e4 is 1e-3)
    assert float((st.logz.double() - torch.logsumexp(logits.double(), -1)).abs().max()) < 4e-3


def test_bad_shapes_are_reported():
    logits, hidden, weight, targets, _, _ = _inputs()
    with pytest.raises(ValueError, match="disagree on H"):
        chunked_token_stats(hidden, weight[:, :-1], targets)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_token_stats(hidden, weight, targets, chunk_tokens=0)


# ----------------------------------------------------------------------------------------------
# TP = 2 (gloo, 2 processes): each rank holds V/2 vocabulary rows


def _tp_worker(rank, world, port, out_dir, vocab_size):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))
        logits, hidden, weight, targets, wc, wz = _inputs()
        targets = targets.clamp(max=vocab_size - 1)
        vp = V // world
        sl = slice(rank * vp, (rank + 1) * vp)
        lg = logits[..., sl].clone().requires_grad_(True)
        st = vocab_parallel_token_stats(lg, targets, group=group, vocab_size=vocab_size)
        _objective(st, wc, wz).backward()
        h = hidden.clone().requires_grad_(True)
        w = weight[sl].clone().requires_grad_(True)
        st2 = chunked_token_stats(h, w, targets, chunk_tokens=4, group=group, vocab_size=vocab_size)
        _objective(st2, wc, wz).backward()
        torch.save(
            {
                "c": st.chosen_logits.detach(),
                "z": st.logz.detach(),
                "g_logits": lg.grad,
                "c2": st2.chosen_logits.detach(),
                "z2": st2.logz.detach(),
                "g_h": h.grad,
                "g_w": w.grad,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("vocab_size", [V, V - 40])  # V - 40: rank 1's shard is mostly padding
def test_tp2_matches_full_logits(tmp_path, vocab_size):
    spawn(_tp_worker, args=(2, free_port(), str(tmp_path), vocab_size), nprocs=2)
    logits, hidden, weight, targets, wc, wz = _inputs()
    targets = targets.clamp(max=vocab_size - 1)
    ref = _reference(logits, hidden, weight, targets, wc, wz, vocab_size)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r in range(2):  # c, z and the hidden-state gradient are replicated on every rank
        for k in ("c", "z", "c2", "z2", "g_h"):
            _close(got[r][k], ref[k])
    g_logits = torch.cat([g["g_logits"] for g in got], -1)[..., :vocab_size]
    _close(g_logits, ref["g_logits"][..., :vocab_size])
    _close(torch.cat([g["g_w"] for g in got], 0), ref["g_w"])


# ----------------------------------------------------------------------------------------------
# the chunked path never materialises [tokens, V]


def _largest_tensor_created(fn):
    """Largest ``numel`` of any tensor an aten op returns while ``fn()`` runs (forward + backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Track(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Track.largest = max(Track.largest, t.numel())
            return out

    with Track():
        fn()
    return Track.largest


def test_chunked_never_holds_token_by_vocab_logits():
    n, h, v, chunk = 64, 8, 512, 8
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (1, n), generator=g)

    def chunked():
        st = chunked_token_stats(hidden, weight, targets, chunk_tokens=chunk)
        (st.logz - st.chosen_logits).sum().backward()

    def full():
        st = token_stats(hidden @ weight.t(), targets)
        (st.logz - st.chosen_logits).sum().backward()

    assert _largest_tensor_created(full) >= n * v
    # the largest tensors are now one chunk of logits and the weight's gradient
    assert _largest_tensor_created(chunked) <= max(chunk * v, v * h)


def test_sequence_first_logits_match_causal_lm_stats():
    """megatron's ``[T, B, V]`` layout, read without a batch-first copy, gives the same values and gradients."""
    logits, _, _, targets, wc, wz = _inputs(6)
    lg_ref = logits.clone().requires_grad_(True)
    ref = causal_lm_stats(lg_ref, targets)
    seq_first = logits.transpose(0, 1).contiguous().requires_grad_(True)
    st = seq_first_causal_stats(seq_first, targets)
    _close(st.chosen_logits, ref.chosen_logits)
    _close(st.logz, ref.logz)
    _objective(ref, wc, wz).backward()
    _objective(st, wc, wz).backward()
    _close(seq_first.grad.transpose(0, 1), lg_ref.grad)
    with pytest.raises(ValueError, match="tokens must be"):
        seq_first_causal_stats(seq_first, targets[:, :-1])


def test_targets_outside_the_vocabulary_are_refused_as_token_stats_refuses_them():
    """The per-shard gathers read 0 for a token id beyond every shard, or a padding column's logit for one in
    [vocab_size, padded width) (a log-probability of +0.92 here), where token_stats refuses both; now every path
    refuses them, naming the vocabulary."""
    from shiq_train.vocab_parallel import chunked_causal_stats, seq_first_causal_stats, vocab_parallel_token_stats

    torch.manual_seed(0)
    logits = torch.randn(1, 2, 12)
    for targets, vocab, width in (([[0, 10]], 9, 9), ([[0, 12]], None, 12), ([[0, -1]], None, 12)):
        with pytest.raises(ValueError, match=rf"targets hold token ids outside \[0, {width}\)"):
            token_stats(logits[..., :width], torch.tensor(targets))  # the reference
        with pytest.raises(ValueError, match=rf"targets hold token ids outside \[0, {width}\)"):
            vocab_parallel_token_stats(logits, torch.tensor(targets), vocab_size=vocab)
    hidden, weight = torch.randn(1, 3, 4), torch.randn(12, 4)
    with pytest.raises(ValueError, match=r"outside \[0, 12\)"):
        chunked_causal_stats(hidden, weight, torch.tensor([[1, 2, 12]]))
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        chunked_causal_stats(hidden, weight, torch.tensor([[1, 2, 11]]), vocab_size=10)
    with pytest.raises(ValueError, match=r"outside \[0, 12\)"):
        seq_first_causal_stats(torch.randn(3, 1, 12), torch.tensor([[1, 2, 12]]))
    st = vocab_parallel_token_stats(logits, torch.tensor([[0, 11]]))  # the last id of the vocabulary: fine
    assert torch.allclose(st.chosen_logits, token_stats(logits, torch.tensor([[0, 11]])).chosen_logits)
