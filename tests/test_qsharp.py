"""Q♯ (SHIQ_MATH §8): guidance, C51 projection, the distributional value loss and guided decoding.

References are independent of the code under test: an mpmath computation for the guided logits,
backward induction on the soft Bellman equation of a tabular tree MDP (``test_losses_tabular.Tree``)
for the optimal policy, a plain-loop projection and suffix sum, counted frequencies of sampled
returns, and full forward passes without a KV cache for decoding.
"""

import itertools
import json
import math
import re
import warnings

import mpmath
import numpy as np
import pytest
import torch
import transformers
from test_losses_tabular import Tree, V  # (the tree MDPs and their backward-induction optimum)

from shiq_eval.qsharp import GuidedPolicy, guided_log_probs, guided_logits
from shiq_train.qsharp_value import (
    atom_support,
    distributional_value_loss,
    project_returns,
    returns_to_go,
)

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# (a) guided_logits


def mp_guided(ref, atom_logits, atoms, beta):
    """``ref + log Σ softmax(atom_logits) exp(atoms/β)`` in 60-digit arithmetic, for one candidate."""
    mpmath.mp.dps = 60
    w = [mpmath.exp(mpmath.mpf(float(x))) for x in atom_logits]
    total = sum(w)
    s = sum(wi / total * mpmath.exp(mpmath.mpf(float(z)) / mpmath.mpf(beta)) for wi, z in zip(w, atoms))
    return float(mpmath.mpf(float(ref)) + mpmath.log(s))


def test_guided_logits_match_direct_float64():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 5, generator=g, dtype=F64) * 3
    atom_logits = torch.randn(3, 5, 7, generator=g, dtype=F64) * 2
    atoms = torch.linspace(-2, 3, 7, dtype=F64)
    for beta in (0.3, 1.0, 10.0):
        direct = ref + torch.log((torch.softmax(atom_logits, -1) * torch.exp(atoms / beta)).sum(-1))
        got = guided_logits(ref, atom_logits, atoms, beta=beta)
        assert got.dtype == F64 and got.shape == (3, 5)
        assert torch.allclose(got, direct, rtol=0, atol=1e-12)
        got32 = guided_logits(ref.float(), atom_logits.float(), atoms.float(), beta=beta)
        assert got32.dtype == torch.float32
        assert torch.allclose(got32.double(), direct, rtol=1e-6, atol=1e-5)


def test_guided_logits_extreme_atoms_over_beta():
    g = torch.Generator().manual_seed(1)
    atoms = torch.linspace(-1000.0, 1000.0, 11, dtype=F64)
    ref = torch.randn(2, 4, generator=g, dtype=F64)
    atom_logits = torch.randn(2, 4, 11, generator=g, dtype=F64) * 5
    atom_logits[0, 0] = torch.linspace(10, -10, 11)  # most mass on the lowest atoms
    beta = 1e-2
    naive = ref + torch.log((torch.softmax(atom_logits, -1) * torch.exp(atoms / beta)).sum(-1))
    assert not torch.isfinite(naive).any()  # the naive formula overflows
    got = guided_logits(ref, atom_logits, atoms, beta=beta)
    got32 = guided_logits(ref.float(), atom_logits.float(), atoms.float(), beta=beta)
    assert torch.isfinite(got).all() and torch.isfinite(got32).all()
    for b, k in itertools.product(range(2), range(4)):
        want = mp_guided(ref[b, k], atom_logits[b, k], atoms, beta)
        assert abs(float(got[b, k]) - want) <= 1e-9 * abs(want)
        assert abs(float(got32[b, k]) - want) <= 1e-6 * abs(want)  # float32 rounding of a ~1e5 number
    # the same value with a tiny beta on small atoms: guidance becomes the max over atoms with mass
    tiny = guided_logits(ref, atom_logits, atoms / 1e6, beta=1e-300)
    assert torch.isfinite(tiny).all()


def test_guided_logits_errors_name_the_argument():
    ref, al, atoms = torch.zeros(2, 3), torch.zeros(2, 3, 4), torch.zeros(4)
    cases = [
        ((torch.zeros(2, 4), al, atoms, 1.0), "atom_logits"),
        ((ref, torch.zeros(2, 3, 5), atoms, 1.0), "atoms"),
        ((torch.zeros(6), al, atoms, 1.0), "ref_logits"),
        ((ref, torch.zeros(2, 3), atoms, 1.0), "atom_logits"),
        ((ref, al, torch.zeros(1, 4), 1.0), "atoms"),
        ((ref, al, atoms, 0.0), "beta"),
        ((ref, al, atoms, -1.0), "beta"),
        ((ref, al, atoms, float("nan")), "beta"),
        ((ref, al, atoms, float("inf")), "beta"),
    ]
    for bad, name in (("ref_logits", 0), ("atom_logits", 1), ("atoms", 2)):
        for value in (float("nan"), float("inf"), -float("inf")):
            args = [ref.clone(), al.clone(), atoms.clone(), 1.0]
            args[name].view(-1)[1] = value
            cases.append((tuple(args), bad))
    cases.append(((ref, al, atoms, True), "beta"))
    cases.append(((ref, al, atoms, "1"), "beta"))
    cases.append(((ref, torch.zeros(2, 3, 0), torch.zeros(0), 1.0), "atoms is empty"))  # was -inf logits
    for (r, a, z, beta), name in cases:
        with pytest.raises(ValueError, match=name):
            guided_logits(r, a, z, beta=beta)
    # any positive real number is a valid beta
    for beta in (np.float32(0.5), 2, torch.tensor(0.5)):
        assert torch.isfinite(guided_logits(ref, al, atoms, beta=beta)).all()


# ----------------------------------------------------------------------------------------------
# (b) exact return distribution -> the optimal policy


def exact_return_distributions(tree):
    """``{(state, action): {return: probability}}`` of the reference's return-to-go, by enumeration."""
    pi_ref = torch.softmax(tree.ref_logits, -1)
    dist = {}
    for s in sorted(tree.states, key=len, reverse=True):
        i = tree.index[s]
        for a in range(V):
            r = float(tree.r[i, a])
            if len(s) == tree.depth - 1:
                dist[s, a] = {r: 1.0}
                continue
            nxt = s + (a,)
            d = {}
            for b in range(V):
                for z, p in dist[nxt, b].items():
                    d[r + z] = d.get(r + z, 0.0) + float(pi_ref[tree.index[nxt], b]) * p
            dist[s, a] = d
    return dist


def intermediate_tree(seed):
    """Rewards only on the first action and on the last one (an intermediate plus a final reward)."""
    tree = Tree(depth=3, seed=seed)
    for s in tree.states:
        if len(s) == 1:
            tree.r[tree.index[s]] = 0.0
    return tree


@pytest.mark.parametrize("kind", ["token", "sequence", "intermediate"])
def test_exact_distribution_guidance_is_the_optimal_policy(kind):
    tree = intermediate_tree(21) if kind == "intermediate" else Tree(depth=3, seed=20, reward=kind)
    dist = exact_return_distributions(tree)
    atoms = torch.tensor(sorted({z for d in dist.values() for z in d}), dtype=F64)
    col = {float(z): j for j, z in enumerate(atoms)}
    for beta in (0.2, 1.0, 5.0):
        pi_star = tree.optimal_policy(beta, 1.0)
        for s in tree.states:
            logits = torch.full((1, V, len(atoms)), -1e30, dtype=F64)  # zero mass: a finite floor
            for a in range(V):
                for z, p in dist[s, a].items():
                    logits[0, a, col[z]] = math.log(p)
            guided = guided_logits(tree.ref_logits[tree.index[s]][None], logits, atoms, beta=beta)
            pi = torch.softmax(guided[0], -1)
            assert torch.allclose(pi, pi_star[s], rtol=0, atol=1e-10)
            # the policy's next-token distribution with top_k = V, candidates in the reference's top-k order
            ref = tree.ref_logits[tree.index[s]][None]
            cand = ref.topk(V, dim=-1).indices
            guided_c = guided_logits(ref.gather(-1, cand), logits[:, cand[0]], atoms, beta=beta)
            for restrict in (False, True):
                logp = guided_log_probs(ref, cand, guided_c, restrict_to_top_k=restrict)
                assert logp.shape == (1, V) and logp.dtype == F64
                assert torch.allclose(logp[0].exp(), pi_star[s], rtol=0, atol=1e-10), restrict
        # the reference is not already optimal, so the check is not vacuous
        gap = max(
            float((torch.softmax(tree.ref_logits[tree.index[s]], -1) - pi_star[s]).abs().max()) for s in tree.states
        )
        assert gap > 0.05, beta


# ----------------------------------------------------------------------------------------------
# (c) atoms, C51 projection, returns-to-go


def loop_projection(g, atoms):
    """Plain-loop C51 projection of one return onto sorted atoms (the test's own)."""
    z = [float(a) for a in atoms]
    out = [0.0] * len(z)
    g = min(max(g, z[0]), z[-1])
    for i in range(len(z) - 1):
        if z[i] <= g <= z[i + 1]:
            w = (g - z[i]) / (z[i + 1] - z[i])
            out[i] += 1 - w
            out[i + 1] += w
            return out
    out[-1] = 1.0
    return out


def test_atom_support():
    atoms = atom_support(-2.0, 3.0, 11)
    assert atoms.shape == (11,) and atoms.dtype == torch.float32
    assert np.allclose(atoms.numpy(), np.linspace(-2.0, 3.0, 11), atol=1e-7)
    assert float(atoms[0]) == -2.0 and float(atoms[-1]) == 3.0
    assert atom_support(0, 1).shape == (11,)  # the default of 11 atoms
    for bad, message in (
        ((1.0, 1.0, 11), "need finite v_min < v_max"),
        ((2.0, 1.0, 11), "need finite v_min < v_max"),
        ((0.0, 1.0, 1), "num_atoms must be an integer >= 2"),
        ((0.0, float("inf"), 11), "need finite v_min < v_max"),
    ):
        with pytest.raises(ValueError, match=message):
            atom_support(*bad)


@pytest.mark.parametrize("even", [True, False])
def test_projection_mass_expectation_clipping(even):
    g = torch.Generator().manual_seed(3)
    atoms = (
        atom_support(-1.0, 2.0, 11, dtype=F64) if even else torch.tensor([-1.0, -0.7, 0.0, 0.1, 1.5, 2.0], dtype=F64)
    )
    returns = torch.rand(4, 50, generator=g, dtype=F64) * 5 - 2  # inside and outside [-1, 2]
    p = project_returns(returns, atoms)
    assert p.shape == (4, 50, len(atoms)) and p.dtype == F64
    assert (p >= 0).all()
    assert torch.allclose(p.sum(-1), torch.ones(4, 50, dtype=F64), atol=1e-12)
    clipped = returns.clamp(-1.0, 2.0)
    assert torch.allclose((p * atoms).sum(-1), clipped, atol=1e-12)
    for b, t in itertools.product(range(4), range(50)):
        assert np.allclose(p[b, t].numpy(), loop_projection(float(returns[b, t]), atoms), atol=1e-12)
    assert (p[returns < -1.0][:, 0] == 1).all() and (p[returns > 2.0][:, -1] == 1).all()
    # a return equal to an atom is one-hot on it
    assert torch.equal(project_returns(atoms, atoms), torch.eye(len(atoms), dtype=F64))
    # float32 returns give float32 rows
    assert project_returns(returns.float(), atoms).dtype == torch.float32


def test_projection_errors():
    with pytest.raises(ValueError, match="increasing"):
        project_returns(torch.zeros(3), torch.tensor([0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="finite"):
        project_returns(torch.tensor([float("nan")]), torch.tensor([0.0, 1.0]))


def test_returns_to_go_against_a_loop():
    g = torch.Generator().manual_seed(4)
    B, T = 5, 12
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[:, 0] = False  # a prompt token
    rewards = torch.randn(B, T, generator=g, dtype=F64) * mask
    for gamma in (1.0, 0.7):
        got = returns_to_go(rewards, mask, gamma)
        for b in range(B):
            acts = [t for t in range(T) if mask[b, t]]
            for n, t in enumerate(acts):
                want = sum(gamma**k * float(rewards[b, u]) for k, u in enumerate(acts[n:]))
                assert abs(float(got[b, t]) - want) < 1e-12


# ----------------------------------------------------------------------------------------------
# (d) the value loss learns the return distribution


def test_value_loss_minimiser_is_the_projected_return_distribution():
    tree = Tree(depth=3, seed=30, gap_after=(0,))  # a non-action token after the first action
    tree.ref_logits *= 0.4  # a flatter reference, so that N samples visit every (state, action)
    dist = exact_return_distributions(tree)
    all_returns = [z for d in dist.values() for z in d]
    atoms = atom_support(min(all_returns), max(all_returns), 11, dtype=F64)
    A = len(atoms)
    # sample N reference trajectories; rows: prompt token, a0, env token, a1, a2
    N = 2000
    gen = torch.Generator().manual_seed(31)
    pi_ref = torch.softmax(tree.ref_logits, -1)
    T = 1 + tree.depth + 1
    mask = torch.zeros(N, T, dtype=torch.bool)
    rewards = torch.zeros(N, T, dtype=F64)
    sa_at = torch.zeros(N, T, dtype=torch.long)  # flat (state, action) index of each action position
    visits = {}
    for n in range(N):
        s, t = (), 1
        for d in range(tree.depth):
            i = tree.index[s]
            a = int(torch.multinomial(pi_ref[i], 1, generator=gen))
            mask[n, t], rewards[n, t], sa_at[n, t] = True, tree.r[i, a], i * V + a
            visits.setdefault((s, a), []).append(n)
            s, t = s + (a,), t + 1 + (d == 0)
    # observed returns-to-go counted with a loop, per visit of (s, a)
    observed = {}
    for (s, a), rows in visits.items():
        depth = len(s)
        pos = 1 + depth + (depth >= 1)
        observed[s, a] = [float(rewards[n, pos:].sum()) for n in rows]
    theta = torch.zeros(len(tree.states) * V, A, dtype=F64, requires_grad=True)
    junk = torch.randn(N, T, A, generator=torch.Generator().manual_seed(0), dtype=F64) * 10
    z = returns_to_go(rewards, mask)
    opt = torch.optim.LBFGS(
        [theta], lr=1, max_iter=150, tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        logits = torch.where(
            mask[..., None], torch.nn.functional.embedding(sa_at, theta), junk
        )  # non-actions carry arbitrary outputs
        loss = distributional_value_loss(logits, z, mask, atoms)
        loss.backward()
        return loss

    opt.step(closure)
    learned = torch.softmax(theta.detach(), -1)
    checked = 0
    for (s, a), obs in observed.items():
        n = len(obs)
        p_hat = learned[tree.index[s] * V + a].numpy()
        empirical = np.mean([loop_projection(g, atoms) for g in obs], axis=0)
        exact = np.sum([p * np.array(loop_projection(g, atoms)) for g, p in dist[s, a].items()], axis=0)
        # the minimiser is the projected empirical distribution of the observed returns ...
        assert np.abs(p_hat - empirical).max() < 2e-3, (s, a, n)
        # ... which converges to the projected exact distribution: each sample adds a mass in [0, 1]
        # with mean p_j to atom j, so p̂_j has standard error at most sqrt(p_j (1 - p_j) / n); the
        # floor 1/n keeps rare atoms (one count) from being over-tested. 4 standard errors + optimiser slack.
        se = np.sqrt(np.maximum(exact * (1 - exact), 1.0 / n) / n)
        assert (np.abs(p_hat - exact) <= 4 * se + 2e-3).all(), (s, a, n, p_hat, exact)
        checked += 1
    assert checked == len(dist)  # every (state, action) was visited


# ----------------------------------------------------------------------------------------------
# (e) guided decoding with a tiny Llama on CPU


LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192, "rope_theta": 500000.0,
}  # fmt: skip


def tiny_llama(seed, vocab=64, arch="llama", rope=None):
    """A tiny Llama (or, ``arch="qwen2"``, Qwen2: Llama with query/key/value biases; ``arch="qwen3"``, Qwen3: Llama
    with query and key norms, random, and heads 12 wide, not hidden_size / heads = 8; ``arch="llama3"``: Llama 3.2's
    rope_type llama3, factor 32, or the same weights with ``rope``) with varied weights."""
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[arch]
    cfg = config_class(
        **({"head_dim": 12} if arch == "qwen3" else {}),
        **({"rope_parameters": rope or LLAMA3_ROPE} if arch == "llama3" else {}),
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = model_class(cfg).eval()
    with torch.no_grad():  # larger weights than the default init (biases too), so logits and values vary
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    return model


ATOMS = torch.linspace(-1.0, 2.0, 11)
PROMPTS = [[3, 7, 9, 11], [5], [12, 2, 40], [8, 8, 1, 60, 33, 2]]


def value_model(seed, constant=False):
    from shiq_train.qsharp_value import HFValueModel

    trunk_src = tiny_llama(seed)
    head = torch.nn.Linear(32, len(ATOMS))
    with torch.no_grad():
        head.weight.normal_(0, 0.0 if constant else 1.0, generator=torch.Generator().manual_seed(seed))
        head.bias.normal_(0, 1.0, generator=torch.Generator().manual_seed(seed + 1))
    return HFValueModel.from_causal_lm(trunk_src, ATOMS, head).eval()


def full_forward_reference(ref, value, prompt, completion, top_k, beta, restrict=True):
    """Per step, without any cache: the reference's top-k, each candidate's atom logits from a full
    forward pass of prefix + candidate, the guided logits in float64, the policy's log-probabilities
    over the vocabulary (``restrict``: softmax over the candidates only; else the full reference softmax
    with the guidance added to the candidates' logits) and the exact KL over the vocabulary."""
    steps = []
    with torch.no_grad():
        for t in range(len(completion)):
            prefix = prompt + completion[:t]
            ref_logits = ref(torch.tensor([prefix])).logits[0, -1].double()
            top, cand = ref_logits.topk(top_k)
            rows = torch.tensor([prefix + [int(c)] for c in cand])
            atom_logits = value.head(value.trunk(input_ids=rows).last_hidden_state[:, -1]).double()
            weights = torch.softmax(atom_logits, -1) * torch.exp(ATOMS.double() / beta)
            guided = top + torch.log(weights.sum(-1))
            logq = torch.log_softmax(ref_logits, -1)
            if restrict:
                logp_c = torch.log_softmax(guided, -1)
                kl = float((logp_c.exp() * (logp_c - logq[cand])).sum())
                logp = torch.full_like(logq, -math.inf)
                logp[cand] = logp_c
            else:
                full = ref_logits.clone()
                full[cand] = guided
                logp = torch.log_softmax(full, -1)
                kl = float((logp.exp() * (logp - logq)).sum())
            steps.append(
                dict(
                    top=top,
                    cand=cand,
                    atoms=atom_logits,
                    guided=guided,
                    weights=weights.sum(-1),
                    logp=logp,
                    logq=logq,
                    kl=kl,
                    rho=float(logp[completion[t]] - logq[completion[t]]),
                )
            )
    return steps


@pytest.mark.parametrize("restrict", [True, False])
def test_guided_policy_generates_and_scores_candidates_like_full_passes(restrict):
    from shiq_eval.generate import SamplingConfig

    warnings.filterwarnings("ignore")
    ref, value = tiny_llama(0), value_model(1)
    beta, k = 0.5, 5
    policy = GuidedPolicy(ref, value, ATOMS, beta, top_k=k, eos_id=63, pad_id=0, restrict_to_top_k=restrict)
    cfg = SamplingConfig(max_new_tokens=6, batch_size=3, seed=7)
    out = policy.generate(PROMPTS, cfg)
    assert len(out) == len(PROMPTS) and all(1 <= len(c) <= 6 for c in out)
    assert all(0 <= t < 64 for c in out for t in c)
    assert policy.generate(PROMPTS, cfg) == out  # seeded
    # the KL read off the sampling pass equals teacher-forcing the samples (also for tempered sampling)
    for c in (cfg, SamplingConfig(max_new_tokens=6, batch_size=2, seed=3, temperature=0.7)):
        samples, ks_g, ke_g = policy.generate_with_kls(PROMPTS, c)
        ks_f, ke_f = policy.sequence_kls(PROMPTS, samples, batch_size=c.batch_size)
        assert samples == policy.generate(PROMPTS, c)
        assert torch.allclose(ks_g, ks_f, atol=1e-9) and torch.allclose(ke_g, ke_f, atol=1e-9)
        assert float(ke_g.abs().sum()) > 1e-3
    # one batch recorded: cached candidate scoring equals full forward passes of prefix + candidate
    gen = torch.Generator().manual_seed(11)
    steps = policy.decode(PROMPTS, SamplingConfig(max_new_tokens=5), generator=gen, record=True)
    outside = 0  # completion tokens outside the candidates
    for b, prompt in enumerate(PROMPTS):
        completion = steps.tokens[b][steps.active[b]].tolist()
        want = full_forward_reference(ref, value, prompt, completion, k, beta, restrict)
        for t, w in enumerate(want):
            assert torch.equal(steps.candidates[b, t], w["cand"])
            assert (steps.ref_top[b, t].double() - w["top"]).abs().max() < 1e-5
            # float32 logits of size ~15 through a different order of summation: a relative bound
            assert (steps.atom_logits[b, t].double() - w["atoms"]).abs().max() < 1e-5 * max(1.0, w["atoms"].abs().max())
            assert (steps.guided[b, t] - w["guided"]).abs().max() < 1e-5 * max(1.0, w["guided"].abs().max())
            # the per-step distribution over the vocabulary equals the direct float64 computation
            got = steps.policy_logp[b, t]
            assert got.shape == (64,) and got.dtype == F64
            assert torch.equal(torch.isinf(got), torch.isinf(w["logp"]))
            finite = torch.isfinite(got)
            # float32 guided logits of size up to ~8 in its normalisation: the same relative bound
            assert (got[finite] - w["logp"][finite]).abs().max() < 1e-5 * max(1.0, w["guided"].abs().max())
            rest = torch.ones(64, dtype=torch.bool)
            rest[w["cand"]] = False
            if restrict:
                assert torch.isinf(got[rest]).all()  # nothing outside the candidates
            else:
                # outside the top-k: reference-proportional mass, p_g / p_ref = 1 / Σ_a p_ref(a) w(a),
                # with w(a) = Σ_j p(z_j|s,a) exp(z_j/β) on the candidates and 1 elsewhere
                q = w["logq"].exp()
                norm = float((q[w["cand"]] * w["weights"]).sum() + q[rest].sum())
                assert (got[rest] - w["logq"][rest] + math.log(norm)).abs().max() < 1e-5
                assert abs(math.log(norm)) > 1e-2  # the guidance does move mass
            outside += completion[t] not in w["cand"].tolist()
    assert (outside > 0) == (not restrict)  # the default policy does sample outside the top-k
    # exact and sample KL of the guided policy against the reference, teacher-forced
    ks, ke = policy.sequence_kls(PROMPTS, out, batch_size=3)
    for b, prompt in enumerate(PROMPTS):
        want = full_forward_reference(ref, value, prompt, out[b], k, beta, restrict)
        assert abs(float(ke[b]) - sum(w["kl"] for w in want)) < 1e-5
        assert abs(float(ks[b]) - sum(w["rho"] for w in want)) < 1e-5
        assert float(ke[b]) > 0
    # a one-token completion outside the first step's candidates: impossible under the restricted
    # policy (sample log-ratio -inf), an ordinary token under the default one
    with torch.no_grad():
        top = ref(torch.tensor([PROMPTS[0]])).logits[0, -1].topk(k).indices.tolist()
    other = next(t for t in range(64) if t not in top)
    ks_out, ke_out = policy.sequence_kls(PROMPTS[:1], [[other]])
    want = full_forward_reference(ref, value, PROMPTS[0], [other], k, beta, restrict)[0]
    assert abs(float(ke_out[0]) - want["kl"]) < 1e-5
    if restrict:
        assert ks_out.tolist() == [-math.inf]
    else:
        assert math.isfinite(want["rho"]) and abs(float(ks_out[0]) - want["rho"]) < 1e-5


@pytest.mark.parametrize("restrict", [True, False])
def test_prompts_sharing_leading_tokens_or_repeated_are_read_once_and_score_like_full_passes(restrict):
    """Prompts with 3 leading tokens in common, one of them twice: with ``share_prefix`` (the default) both
    models read those tokens once and the repeated prompt once; every step's candidates, atom logits, guided
    logits and policy over the vocabulary still equal full forward passes of prefix + candidate, and the draws
    equal those of reading every prompt whole."""
    from shiq_eval.generate import SamplingConfig

    warnings.filterwarnings("ignore")
    ref, value = tiny_llama(0), value_model(1)
    prompts = [[3, 7, 9, 11, 4], [3, 7, 9, 2], [3, 7, 9, 11, 4], [3, 7, 9, 11, 60, 33]]
    kw = dict(top_k=5, eos_id=63, pad_id=0, restrict_to_top_k=restrict)
    shared, whole = (GuidedPolicy(ref, value, ATOMS, 0.5, share_prefix=s, **kw) for s in (True, False))
    read = []  # the tokens each model pass reads: the shared ones once, the repeated prompt once
    hook = value.trunk.register_forward_pre_hook(lambda m, a, k: read.append(k["input_ids"].shape), with_kwargs=True)
    cfg = SamplingConfig(max_new_tokens=5)
    steps = shared.decode(prompts, cfg, generator=torch.Generator().manual_seed(11), record=True)
    hook.remove()
    # [3, 7, 9] once, then the 3 distinct prompts' rests (up to 3 tokens), then step 0's 5 candidates of the 4 rows
    assert read[:3] == [(1, 3), (3, 3), (4, 5)]
    again = whole.decode(prompts, cfg, generator=torch.Generator().manual_seed(11), record=True)
    assert torch.equal(steps.tokens, again.tokens) and torch.equal(steps.active, again.active)
    for b, prompt in enumerate(prompts):
        completion = steps.tokens[b][steps.active[b]].tolist()
        for t, w in enumerate(full_forward_reference(ref, value, prompt, completion, 5, 0.5, restrict)):
            assert torch.equal(steps.candidates[b, t], w["cand"])
            scale = max(1.0, w["atoms"].abs().max(), w["guided"].abs().max())
            assert (steps.atom_logits[b, t].double() - w["atoms"]).abs().max() < 1e-5 * scale
            assert (steps.guided[b, t] - w["guided"]).abs().max() < 1e-5 * scale
            got = steps.policy_logp[b, t]
            finite = torch.isfinite(got)
            assert torch.equal(finite, torch.isfinite(w["logp"]))
            assert (got[finite] - w["logp"][finite]).abs().max() < 1e-5 * scale


def test_constant_values_give_the_renormalised_reference_top_k():
    from shiq_eval.generate import SamplingConfig

    warnings.filterwarnings("ignore")
    ref, value = tiny_llama(0), value_model(2, constant=True)
    k = 7
    policy = GuidedPolicy(ref, value, ATOMS, 0.3, top_k=k, eos_id=63, restrict_to_top_k=True)
    steps = policy.decode(
        PROMPTS, SamplingConfig(max_new_tokens=4), generator=torch.Generator().manual_seed(0), record=True
    )
    with torch.no_grad():
        for b, prompt in enumerate(PROMPTS):
            completion = steps.tokens[b][steps.active[b]].tolist()
            for t in range(len(completion)):
                probs = torch.softmax(ref(torch.tensor([prompt + completion[:t]])).logits[0, -1].double(), -1)
                top, cand = probs.topk(k)
                assert torch.equal(steps.candidates[b, t], cand)
                got = torch.softmax(steps.guided[b, t], -1)
                assert (got - top / top.sum()).abs().max() < 1e-6
                assert (steps.policy_logp[b, t, cand].exp() - top / top.sum()).abs().max() < 1e-6


def test_a_beta_so_large_the_guidance_vanishes_reports_an_exact_kl_of_zero_never_negative():
    """β = 1e308: ``atoms / β`` rounds to 0, the guided policy is the reference itself (not restricted to its top-k)
    and its exact KL to it 0 (SHIQ_MATH §6); the rounded sum over the vocabulary was reported as -3e-17. Each step's
    KL is ``>= 0`` now. (The sample estimate ``Σ log π_g − log π_ref`` may be negative: it is an estimate.)"""
    from shiq_eval.generate import SamplingConfig

    warnings.filterwarnings("ignore")
    policy = GuidedPolicy(tiny_llama(1), value_model(2), ATOMS, 1e308, top_k=64, eos_id=63)
    _, _, exact = policy.generate_with_kls(PROMPTS, SamplingConfig(max_new_tokens=6, seed=0))
    assert (exact >= 0).all() and exact.max() < 1e-12, exact


def test_zero_guidance_default_is_the_reference_restricted_pays_the_top_k_mass():
    from shiq_eval.generate import SamplingConfig

    warnings.filterwarnings("ignore")
    ref, value = tiny_llama(0), value_model(6)
    zero = torch.zeros(len(ATOMS))  # log Σ_j p_j exp(0/β) = 0 for every candidate, whatever the head says
    value.atoms = zero.clone()  # (a policy's atoms must be its value model's)
    k = 4
    kw = dict(top_k=k, eos_id=63, pad_id=0)
    default = GuidedPolicy(ref, value, zero, 0.5, **kw)
    restricted = GuidedPolicy(ref, value, zero, 0.5, restrict_to_top_k=True, **kw)
    completions = restricted.generate(PROMPTS, SamplingConfig(max_new_tokens=5, batch_size=4, seed=1))
    steps = default.decode(PROMPTS, SamplingConfig(max_new_tokens=5), forced=completions, record=True)
    ks_d, ke_d = default.sequence_kls(PROMPTS, completions, batch_size=2)
    ks_r, ke_r = restricted.sequence_kls(PROMPTS, completions, batch_size=2)
    with torch.no_grad():
        for b, prompt in enumerate(PROMPTS):
            lost = 0.0  # -Σ_t log(top-k reference mass), from uncached forward passes
            for t in range(len(completions[b])):
                logq = torch.log_softmax(ref(torch.tensor([prompt + completions[b][:t]])).logits[0, -1].double(), -1)
                assert (steps.policy_logp[b, t] - logq).abs().max() < 1e-5  # the reference itself
                lost -= float(torch.logsumexp(logq.topk(k).values, -1))
            assert abs(float(ke_d[b])) < 1e-12 and abs(float(ks_d[b])) < 1e-12
            assert lost > 0.1
            assert abs(float(ke_r[b]) - lost) < 1e-5
            assert abs(float(ks_r[b]) - lost) < 1e-5  # every candidate's log-ratio is -log(top-k mass)


# ----------------------------------------------------------------------------------------------
# the megatron value model: save, load as a Hugging Face trunk, train from a buffer


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "llama3"])
def test_megatron_value_model_loads_as_hugging_face_trunk(tmp_path, arch):
    """A value model's megatron trunk saved and loaded as transformers' decoder gives the same values, for a
    Llama reference, a Qwen2 one (its query/key/value biases: a Qwen2Model trunk) and a Qwen3 one (its query and
    key norms and head width: a Qwen3Model trunk)."""
    from shiq_train import model as M
    from shiq_train import parallel
    from shiq_train.hf_convert import import_llama, model_config_from_llama
    from shiq_train.qsharp_value import MegatronValueModel, load_value_model, save_value_model

    warnings.filterwarnings("ignore")
    hf = tiny_llama(3, arch=arch)
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with parallel.distributed(seed=0):
        mv = MegatronValueModel(M.build_model(model_config_from_llama(hf.config)), len(ATOMS))
        import_llama(mv.trunk, hf.state_dict(), hf.config)
        with torch.no_grad():
            mv.head.weight.normal_(0, 1.0)
            mv.head.bias.normal_(0, 1.0)
            want = mv.eval()(tokens)
        save_value_model(tmp_path / "v", mv, ATOMS, hf.config, meta={"steps": 0})
    loaded = load_value_model(tmp_path / "v")
    with torch.no_grad():
        got = loaded(tokens)
        from_hf_trunk = loaded.head(hf.model(tokens).last_hidden_state)
    scale = float(want.abs().max())  # float32 rounding of megatron vs transformers kernels, relative to the outputs
    assert (got - want).abs().max() < 1e-5 * scale
    assert (from_hf_trunk - want).abs().max() < 1e-5 * scale  # the trunk is the reference's decoder
    if arch == "llama3":  # Llama 3's scaled rotary frequencies, kept by value_model.json's hf_config
        assert loaded.config.rope_parameters == LLAMA3_ROPE
        plain = tiny_llama(3, arch=arch, rope={"rope_type": "default", "rope_theta": 500000.0})
        with torch.no_grad():
            assert (loaded.head(plain.model(tokens).last_hidden_state) - want).abs().max() > 1e-3 * scale
    assert torch.equal(loaded.atoms, ATOMS)
    torch.load(tmp_path / "v" / "value_model.pt", weights_only=True)
    meta = json.loads((tmp_path / "v" / "value_model.json").read_text())
    assert meta["num_atoms"] == 11 and "beta" not in meta


def test_a_value_model_with_an_undefined_number_in_its_meta_loads(tmp_path):
    """value_model.json was written with ``json.dumps``' default: a diverged loss in its ``last`` metrics
    became ``NaN``, which its reader (standard JSON only) refuses. It is written as null: the model loads."""
    import math

    from shiq_train import model as M
    from shiq_train import parallel
    from shiq_train.hf_convert import model_config_from_llama
    from shiq_train.qsharp_value import MegatronValueModel, load_value_model, save_value_model

    warnings.filterwarnings("ignore")
    hf = tiny_llama(3)
    with parallel.distributed(seed=0):
        mv = MegatronValueModel(M.build_model(model_config_from_llama(hf.config)), len(ATOMS))
        last = {"step": 2, "value_ce": math.nan, "reward": math.inf}
        save_value_model(tmp_path / "v", mv, ATOMS, hf.config, meta={"steps": 2, "last": last})
    text = (tmp_path / "v" / "value_model.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["last"] == {"step": 2, "value_ce": None, "reward": None}
    assert torch.equal(load_value_model(tmp_path / "v").atoms, ATOMS)


def test_train_value_model_from_a_buffer(tmp_path):
    from shiq_data.buffer import write_buffer
    from shiq_train.qsharp_train import ValueTrainConfig, train_value_model
    from shiq_train.qsharp_value import load_value_model

    warnings.filterwarnings("ignore")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        p, c = int(rng.integers(1, 4)), int(rng.integers(2, 6))
        rewards = [0.0] * p + [float(np.float32(x)) for x in rng.normal(0, 1, c)]
        rows.append(
            dict(
                row_id=f"r{i}",
                source="t",
                group_id=i,
                prompt_len=p,
                tokens=[int(t) for t in rng.integers(0, 64, p + c)],
                action_mask=[False] * p + [True] * c,
                rewards=rewards,
            )
        )
    tok = {"name": "toy", "fingerprint": "f" * 64, "vocab_size": 64}
    write_buffer(rows, tmp_path / "buf", tokenizer_info=tok, command=["test"], progress=False)
    suffix = [sum(r["rewards"][t:]) for r in rows for t in range(r["prompt_len"], len(r["tokens"]))]
    hf = tiny_llama(4)
    cfg = ValueTrainConfig(steps=30, rows_per_micro_batch=4, lr=1e-3, head_lr=3e-2, progress=False)
    out = train_value_model(tmp_path / "buf", tmp_path / "value", hf.state_dict(), hf.config, cfg)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 30
    first, last = np.mean([h["value_ce"] for h in history[:5]]), np.mean([h["value_ce"] for h in history[-5:]])
    assert last < first - 0.1  # it learns
    loaded = load_value_model(out)
    assert abs(float(loaded.atoms[0]) - min(suffix)) < 1e-5 and abs(float(loaded.atoms[-1]) - max(suffix)) < 1e-5
    assert float(np.log(11)) > history[0]["value_ce"] - 1e-4  # starts from the uniform categorical
    # a buffer tokenised with a larger vocabulary than the reference's is refused, naming the buffer
    write_buffer(rows, tmp_path / "wide", tokenizer_info={**tok, "vocab_size": 100}, command=["t"], progress=False)
    with pytest.raises(ValueError, match="wide.*100 token ids"):
        train_value_model(tmp_path / "wide", tmp_path / "v2", hf.state_dict(), hf.config, cfg)
    assert not (tmp_path / "v2").exists()


def test_evaluate_guided_policy_reports_reward_and_kl():
    from shiq_eval.generate import SamplingConfig
    from shiq_eval.qsharp import evaluate_guided_policy

    class Tok:  # decodes ids as space-separated numbers
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    warnings.filterwarnings("ignore")
    policy = GuidedPolicy(tiny_llama(0), value_model(5), ATOMS, 0.7, top_k=4, eos_id=63)
    texts = [f"p{i}" for i in range(len(PROMPTS))]
    res = evaluate_guided_policy(
        policy, Tok(), PROMPTS, texts, lambda p, c: [len(x.split()) for x in c], max_new_tokens=5, batch_size=2, seed=3
    )
    completions = policy.generate(PROMPTS, SamplingConfig(max_new_tokens=5, batch_size=2, seed=3))
    ks, ke = policy.sequence_kls(PROMPTS, completions, batch_size=2)
    assert res.n == len(PROMPTS)
    assert res.rewards == [float(len(c)) for c in completions]
    assert res.kl_exact == pytest.approx(float(ke.mean()), abs=1e-12)
    assert res.kls_exact == pytest.approx(ke.tolist(), abs=1e-12)
    assert res.kl_sample == pytest.approx(float(ks.mean()), abs=1e-12)


def test_guided_policy_refuses_bad_atoms_and_top_k():
    ref, value = tiny_llama(0), value_model(1)
    for atoms in ([], [0.0, float("nan")], [[0.0, 1.0]]):
        with pytest.raises(ValueError, match="atoms must be a finite, non-empty 1-D tensor"):
            GuidedPolicy(ref, value, atoms, 0.5, eos_id=63)
    with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
        GuidedPolicy(ref, value, ATOMS, 0.5, top_k=0, eos_id=63)
    # atoms other than the value model's own: its outputs would be read as probabilities of other returns
    for atoms in (ATOMS.flip(0), torch.zeros(len(ATOMS)), ATOMS + 1):
        with pytest.raises(ValueError, match=r"are not the value model's own \[-1.0, -0.69"):
            GuidedPolicy(ref, value, atoms, 0.5, eos_id=63)
    GuidedPolicy(ref, value, ATOMS.double(), 0.5, eos_id=63)  # the same returns in another dtype
    from shiq_train.qsharp_value import atom_support

    # the same returns computed in float64, or written out, and a value model kept in bfloat16: all its own
    GuidedPolicy(ref, value, atom_support(-1.0, 2.0, 11, dtype=torch.float64), 0.5, eos_id=63)
    GuidedPolicy(ref, value, [-1 + 0.3 * i for i in range(11)], 0.5, eos_id=63)
    GuidedPolicy(ref, value_model(1).to(torch.bfloat16), ATOMS, 0.5, eos_id=63)


def test_guided_logits_that_overflow_their_dtype_name_beta():
    """float32 inputs at β = 1e-300 returned inf, though the log-sum-exp is taken in float64: refused naming β;
    float64 inputs hold the result."""
    args = (torch.zeros(1, 2), torch.zeros(1, 2, 2), torch.tensor([0.0, 1.0]))
    with pytest.raises(
        ValueError, match=r"beta=1e-300 is too small for atoms up to 1: the guided logits overflow float32"
    ):
        guided_logits(*args, beta=1e-300)
    out = guided_logits(*(a.double() for a in args), beta=1e-300)
    assert out.dtype == F64 and torch.isfinite(out).all() and float(out[0, 0]) == pytest.approx(1e300 - math.log(2))


def test_teacher_forced_kls_need_one_completion_per_prompt_and_take_none():
    """sequence_kls of 2 prompts and 1 completion scored the second prompt with its completion broadcast (pad
    tokens); of none it ended in torch.cat's error."""
    policy = GuidedPolicy(tiny_llama(0), value_model(1), ATOMS, 0.5, top_k=4, eos_id=63, pad_id=0)
    with pytest.raises(ValueError, match="2 prompts but 1 completions: one completion per prompt"):
        policy.sequence_kls([[1, 2], [3]], [[4]])
    sample, exact = policy.sequence_kls([], [])
    assert sample.shape == exact.shape == (0,) and sample.dtype == exact.dtype == F64


def test_candidates_beyond_a_chunk_score_as_in_one_pass(monkeypatch):
    """Every candidate scored in one value pass held a [L + K, P + L + K] mask: --top-k 49152 (every token, the
    setting that recovers π*) asked for 38 GB. In chunks, each candidate still sees the prefix and itself only:
    chunks of 3 give the one pass's steps (float rounding apart)."""
    import shiq_eval.qsharp as Q
    from shiq_eval.generate import SamplingConfig

    policy = GuidedPolicy(tiny_llama(0), value_model(1), ATOMS, 0.5, top_k=8, eos_id=63, pad_id=0)
    cfg = SamplingConfig(max_new_tokens=5)
    whole = policy.decode(PROMPTS, cfg, generator=torch.Generator().manual_seed(3), record=True)
    monkeypatch.setattr(Q, "CANDIDATE_CHUNK", 3)
    chunks = policy.decode(PROMPTS, cfg, generator=torch.Generator().manual_seed(3), record=True)
    assert torch.equal(chunks.tokens, whole.tokens) and torch.equal(chunks.candidates, whole.candidates)
    assert (chunks.atom_logits - whole.atom_logits).abs().max() < 1e-4
    assert (chunks.kl - whole.kl).abs().max() < 1e-9 + 1e-5 * whole.kl.abs().max()


class _RunsACommand:
    """A pickled object whose unpickling would run a shell command (what a file written by anyone may hold)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_file_of_pickled_objects_is_refused_without_advice_to_unpickle_it(tmp_path):
    """A value model or checkpoint file holding other objects than tensors was refused (nothing ran), but the
    message passed on torch's advice to re-run torch.load with weights_only=False, which would run it."""
    import hashlib

    from shiq_train.checkpoint import read_rank_file
    from shiq_train.qsharp_value import _read_tensors

    marker = tmp_path / "ran"
    for name in ("value_model.pt", "rank_00.pt"):
        path = tmp_path / name
        torch.save({"model": {"w": _RunsACommand(marker)}, "x": 1}, path)
        (tmp_path / f"{name}.sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest() + f"  {name}\n")
        read = _read_tensors if name == "value_model.pt" else read_rank_file
        with pytest.raises(ValueError) as e:
            read(path)
        message = str(e.value)
        assert "holds objects other than tensors and plain containers, which are never unpickled" in message
        assert "weights_only" not in message and str(path) in message and "\n" not in message
        assert "unsupported GLOBAL posix.system" in message  # torch's reason, without its advice
    # a Hugging Face folder's pytorch_model.bin (transformers loads it with weights_only=True): the folder and
    # file named, torch's advice left out
    from transformers import LlamaConfig

    from shiq_train.hf_convert import load_causal_lm

    folder = tmp_path / "hf"
    folder.mkdir()
    LlamaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(folder)
    torch.save({"model.embed_tokens.weight": _RunsACommand(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError) as e:
        load_causal_lm(str(folder))
    message = str(e.value)
    assert (
        message.startswith(f"{folder} (pytorch_model.bin): it holds objects other than tensors") and "\n" not in message
    )
    assert "weights_only" not in message and not marker.exists()


def test_a_prompt_that_would_run_past_the_models_positions_is_refused():
    """A prompt whose tokens plus max_new_tokens pass max_position_embeddings was sampled by the guided policy at
    positions neither model learnt, without a word (plain sampling refused it already); the reference's and the
    value trunk's limits both count."""
    from shiq_eval.generate import SamplingConfig

    warnings.filterwarnings("ignore")
    policy = GuidedPolicy(tiny_llama(0), value_model(1), ATOMS, 0.5, top_k=4, eos_id=63, pad_id=0)
    fits = [[1] * 56, [2, 3]]  # 56 + 8 = 64: the last position both models have
    assert [len(c) <= 8 for c in policy.generate(fits, SamplingConfig(max_new_tokens=8))] == [True, True]
    with pytest.raises(
        ValueError,
        match="prompt 1 of the 2 sampled .*: 57 tokens \\+ max_new_tokens 8 exceed the models' max_position_",
    ):
        policy.generate([[2, 3], [1] * 57], SamplingConfig(max_new_tokens=8))
    policy.value_model.config.max_position_embeddings = 32  # a value trunk with fewer positions than the reference
    with pytest.raises(ValueError, match="prompt 0 of the 1 sampled .*: 30 tokens \\+ max_new_tokens 4 exceed"):
        policy.generate_with_kls([[1] * 30], SamplingConfig(max_new_tokens=4))


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("loss", "num_atoms", 2.5),  # was int(2.5): a model of 2 atoms
        ("train", "steps", 2.5),  # was 2 steps
        ("loss", "head_lr", [1]),  # was a TypeError traceback
        ("loss", "v_min", "abc"),  # was "could not convert string to float: 'abc'", no key named
        ("optimizer", "lr", "x"),
        ("data", "micro_batches_per_step", True),
        ("train", "share_prefixes", "yes"),
    ],
)
def test_value_run_settings_of_the_wrong_type_are_refused_naming_the_key(section, key, value):
    import pathlib

    from omegaconf import OmegaConf

    from shiq_train.qsharp_train import value_config_from_run

    root = pathlib.Path(__file__).resolve().parents[1] / "configs"
    cfg = OmegaConf.to_container(OmegaConf.load(root / "train.yaml"))
    cfg.update(loss={"name": "qsharp_value"}, seed=0)
    cfg["data"]["seed"] = 0
    value_config_from_run(cfg, 64)  # the defaults are fine
    cfg[section][key] = value
    with pytest.raises(ValueError, match=rf"^{section}\.{key}={re.escape(repr(value))}: expected"):
        value_config_from_run(cfg, 64)


def test_a_value_model_of_another_vocabulary_is_refused():
    """The value model scores the reference's candidate ids: a value model of 32 token ids under a reference of
    64 ended in ``IndexError: index out of range in self`` at the first step; one of more ids than the reference
    (another tokenizer) guided it silently."""
    from shiq_train.qsharp_value import HFValueModel

    warnings.filterwarnings("ignore")
    ref = tiny_llama(0)
    for other in (32, 80):
        value = HFValueModel.from_causal_lm(tiny_llama(1, vocab=other), ATOMS)
        with pytest.raises(ValueError, match=rf"^the value model has {other} token ids but the reference 64"):
            GuidedPolicy(ref, value, ATOMS, 0.5, top_k=5, eos_id=63)


def write_toy_buffer(path, rows: int, tokenizer: str = "toy", offset: float = 0.0, step: float = 1.0) -> None:
    """A buffer of ``rows`` rows ``[3, 4, 5]`` (prompt ``[3]``), row ``i`` of return ``offset + step * i``, under
    a 64-id tokenizer named ``tokenizer``."""
    from shiq_data.buffer import write_buffer

    made = [
        dict(
            row_id=f"r{i}",
            source="t",
            group_id=i,
            prompt_len=1,
            tokens=[3, 4, 5],
            action_mask=[False, True, True],
            rewards=[0.0, 0.0, offset + step * i],
        )
        for i in range(rows)
    ]
    tok = {"name": tokenizer, "fingerprint": "f" * 64, "vocab_size": 64}
    write_buffer(made, path, tokenizer_info=tok, command=["test"], progress=False)


def test_a_v_min_or_v_max_beyond_the_buffers_returns_names_where_the_other_came_from(tmp_path):
    """With only ``v_min`` given, ``v_max`` is the buffer's largest return-to-go (and the other way round): a
    ``v_min`` above it said ``need finite v_min < v_max, got v_min=5.0, v_max=1.0``, a ``v_max`` nobody gave."""
    from shiq_train.qsharp_train import ValueTrainConfig, train_value_model

    warnings.filterwarnings("ignore")
    write_toy_buffer(tmp_path / "buf", rows=2)
    hf = tiny_llama(4)
    for given, match in (
        (dict(v_min=5.0), r"^value\.v_min=5 is not below value\.v_max=1, the largest return-to-go in buffer .*buf"),
        (dict(v_max=-3.0), r"^value\.v_max=-3 is not above value\.v_min=0, the smallest return-to-go in buffer .*buf"),
    ):
        cfg = ValueTrainConfig(steps=1, rows_per_micro_batch=2, progress=False, **given)
        with pytest.raises(ValueError, match=match):
            train_value_model(tmp_path / "buf", tmp_path / "value", hf.state_dict(), hf.config, cfg)
        assert not (tmp_path / "value").exists()


def test_a_constant_return_buffer_with_one_bound_given_uses_the_buffers_own_return(tmp_path):
    """Every return 0 (no reward, or all rewards equal): the buffer's range was widened to [-1, 1] before a
    given bound was checked against it, so ``v_min=0.5`` trained on atoms 0.5..1, a v_max from no return, and
    ``v_min=1`` said ``the largest return-to-go in buffer`` was 1. Now the other bound is the buffer's return, 0;
    with neither given the support is still [-1, 1] around it."""
    import shutil

    from shiq_train.qsharp_train import ValueTrainConfig, train_value_model

    warnings.filterwarnings("ignore")
    write_toy_buffer(tmp_path / "buf", rows=1)  # one row of return 0
    hf = tiny_llama(4)

    def atoms(**given):
        cfg = ValueTrainConfig(steps=1, rows_per_micro_batch=1, num_atoms=3, progress=False, **given)
        out = train_value_model(tmp_path / "buf", tmp_path / "value", hf.state_dict(), hf.config, cfg)
        return json.loads((out / "value_model.json").read_text())["atoms"]

    assert atoms() == [-1.0, 0.0, 1.0]
    assert atoms(v_min=-4.0) == [-4.0, -2.0, 0.0]
    assert atoms(v_max=2.0) == [0.0, 1.0, 2.0]
    shutil.rmtree(tmp_path / "value")
    for given, match in (
        (dict(v_min=0.5), r"^value\.v_min=0\.5 is not below value\.v_max=0, the largest return-to-go in buffer .*buf"),
        (dict(v_max=-1.0), r"^value\.v_max=-1 is not above value\.v_min=0, the smallest return-to-go in buffer .*buf"),
    ):
        cfg = ValueTrainConfig(steps=1, rows_per_micro_batch=1, progress=False, **given)
        with pytest.raises(ValueError, match=match):
            train_value_model(tmp_path / "buf", tmp_path / "value", hf.state_dict(), hf.config, cfg)
        assert not (tmp_path / "value").exists()


def test_a_support_float32_cannot_hold_says_where_its_bounds_came_from(tmp_path):
    """Returns too large for float32's spacing: the message printed both bounds with 6 digits (``from
    v_min=1e+09 to v_max=1e+09``) and named no key; now the bounds are whole and the line says which came from
    the buffer, and that a constant return was widened by 1 (only then: returns 4e6 and 4e6 + 2, two of them, are
    not said to be widened, though their range is 2 as well)."""
    from shiq_train.qsharp_train import ValueTrainConfig, train_value_model

    warnings.filterwarnings("ignore")
    hf = tiny_llama(4)
    cfg = ValueTrainConfig(steps=1, rows_per_micro_batch=1, progress=False)
    for rows, offset, step, source in (
        (1, 1e9, 0.0, "buf1, widened by 1 either side of its one return)"),
        (2, 4e6, 2.0, "buf2)"),  # (float32 holds both returns, not 11 atoms between them)
    ):
        buf = tmp_path / f"buf{rows}"
        write_toy_buffer(buf, rows=rows, offset=offset, step=step)
        with pytest.raises(ValueError) as e:
            train_value_model(buf, tmp_path / "value", hf.state_dict(), hf.config, cfg)
        lo, hi = (offset - 1, offset + 1) if rows == 1 else (offset, offset + step)
        assert str(e.value).startswith(
            f"float32 cannot hold 11 finite distinct atoms from v_min={lo!r} to v_max={hi!r}"
        )
        assert f"(value.v_min and value.v_max from the returns-to-go of buffer {buf}" in str(e.value)
        assert str(e.value).endswith(source)
        assert not (tmp_path / "value").exists()


@pytest.mark.parametrize(
    "field, value",
    [("clip_grad", -1.0), ("clip_grad", math.inf), ("adam_beta1", 1.5), ("adam_eps", -1.0), ("weight_decay", -1.0)],
)
def test_value_optimizer_settings_out_of_range_are_refused_naming_them(field, value):
    """``clip_grad=-1`` trained without clipping (``if clip_grad > 0``), ``adam_beta1=1.5`` reached torch's
    ``Invalid beta parameter at index 0`` after the buffer was read and the trunk built: they are refused as a
    policy run refuses them (``OptimizerConfig``), naming the setting."""
    from shiq_train.qsharp_train import ValueTrainConfig

    with pytest.raises(ValueError, match=rf"^optimizer\.{field} must be"):
        ValueTrainConfig(**{field: value})


def test_the_value_models_weight_decay_spares_norms_and_biases():
    """The value model's AdamW put weight decay on every parameter, norms and biases too, unlike a policy run's
    optimizer (1-D parameters get none). One step with a zero gradient and decay 0.5 at lr 0.1 now shrinks the
    matrices by 1 - 0.05 and leaves the vectors as they were, by AdamW's own rule."""
    from shiq_train.qsharp_train import ValueTrainConfig, value_optimizer

    head = torch.nn.Linear(4, 3)  # a matrix and a bias
    norm = torch.nn.LayerNorm(4)  # two vectors
    trunk = torch.nn.Linear(4, 4, bias=False)
    before = {
        n: p.detach().clone()
        for n, p in [*head.named_parameters("h"), *norm.named_parameters("n"), *trunk.named_parameters("t")]
    }
    cfg = ValueTrainConfig(lr=0.1, head_lr=0.1, weight_decay=0.5)
    opt = value_optimizer(list(head.parameters()), [*norm.parameters(), *trunk.parameters()], cfg)
    for p in [*head.parameters(), *norm.parameters(), *trunk.parameters()]:
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict([*head.named_parameters("h"), *norm.named_parameters("n"), *trunk.named_parameters("t")])
    for name, p in after.items():
        want = before[name] * (1 - 0.1 * 0.5) if p.dim() > 1 else before[name]
        assert torch.allclose(p.detach(), want, rtol=0, atol=1e-7), name
    assert sum(len(g["params"]) for g in opt.param_groups) == 5  # every parameter, once


def test_an_out_folder_that_is_a_link_is_refused_before_training(tmp_path, monkeypatch):
    """out= a symbolic link (to an empty folder, or to a value model's folder) cannot be replaced atomically: it
    was refused by the save, after every training step had run; it is now refused before the reference is built."""
    import shiq_train.qsharp_train as qsharp_train
    from shiq_train.qsharp_train import ValueTrainConfig, train_value_model

    warnings.filterwarnings("ignore")
    write_toy_buffer(tmp_path / "buf", rows=2)
    hf = tiny_llama(4)
    cfg = ValueTrainConfig(steps=1, rows_per_micro_batch=2, progress=False)
    train_value_model(tmp_path / "buf", tmp_path / "value", hf.state_dict(), hf.config, cfg)
    (tmp_path / "empty").mkdir()
    built = []
    monkeypatch.setattr(qsharp_train, "build_model", lambda *a, **k: built.append(1) or pytest.fail("trained"))
    for target in ("empty", "value"):
        (tmp_path / f"to_{target}").symlink_to(tmp_path / target, target_is_directory=True)
        with pytest.raises(ValueError, match=rf"to_{target} is a link"):
            train_value_model(tmp_path / "buf", tmp_path / f"to_{target}", hf.state_dict(), hf.config, cfg)
    assert not built and sorted(p.name for p in (tmp_path / "empty").iterdir()) == []


def test_the_run_folders_lock_is_still_held_once_the_value_model_replaces_the_folder(tmp_path, monkeypatch):
    """The run holds ``out/.lock`` (shiq_train.cli.run_value) while the value model's folder replaces ``out`` at the
    end: the lock stayed with the folder set aside, and a second run started then found an unlocked ``out`` while
    the first still finished. The new folder now keeps the same lock file: flock still refuses a second holder."""
    import shiq_train.qsharp_value as qsharp_value
    from shiq_data.io import exclusive_lock
    from shiq_train.qsharp_train import LOCK_FILE, ValueTrainConfig, train_value_model
    from shiq_train.qsharp_value import load_value_model

    warnings.filterwarnings("ignore")
    write_toy_buffer(tmp_path / "buf", rows=2)
    hf = tiny_llama(4)
    cfg = ValueTrainConfig(steps=1, rows_per_micro_batch=2, progress=False)
    out = tmp_path / "value"
    out.mkdir()
    seen = []
    atomic_dir = qsharp_value.atomic_dir

    def replacing(folder, fill, **kw):  # what a second run finds just after the replacement, while the first holds
        atomic_dir(folder, fill, **kw)
        with exclusive_lock(folder / LOCK_FILE, wait=False, holder="the first run") as why:
            seen.append(why)

    monkeypatch.setattr(qsharp_value, "atomic_dir", replacing)
    with exclusive_lock(out / LOCK_FILE, wait=False) as first:  # what run_value holds
        assert first is None
        train_value_model(tmp_path / "buf", out, hf.state_dict(), hf.config, cfg)
    assert seen == [f"{out / LOCK_FILE} is held by the first run"]
    assert load_value_model(out).atoms.numel() == 11  # the folder, its lock file beside the model, reads as one


def test_an_atom_support_its_dtype_cannot_hold_is_refused_naming_the_dtype():
    """v_max = 1e39 (finite, beyond float32) was refused as 'need finite v_min < v_max'; v_min = 1, v_max = 1 + 1e-9
    (distinct, the same float32) gave 11 equal atoms, refused only at the first training step as atoms that are
    not increasing. Both are refused by atom_support, naming the dtype; float64 holds them."""
    for v_min, v_max in ((0.0, 1e39), (1.0, 1.0 + 1e-9), (-1e39, 0.0)):
        with pytest.raises(ValueError, match=r"float32 cannot hold .* distinct atoms"):
            atom_support(v_min, v_max, 11)
        atoms = atom_support(v_min, v_max, 11, dtype=torch.float64)
        assert torch.isfinite(atoms).all() and (atoms[1:] > atoms[:-1]).all()
    assert float(atom_support(0.0, 1e38, 3)[-1]) == pytest.approx(1e38, rel=1e-6)  # (within float32: as before)


def test_a_value_run_stopped_by_sigterm_or_killed_resumes_as_one_run(tmp_path, monkeypatch):
    """A value run (Q♯) saved only at its end: a SIGTERM (a scheduler's stop) or a kill lost every step. Now
    SIGTERM saves the step under way (resume.pt, SHA-256 checked) and raises SavedOnSigterm, ``save_every`` saves
    every N steps, and the same call resumes: the value model and metrics equal an uninterrupted run's. A SIGTERM
    during the last step saves the value model itself; a state of other settings is refused, naming it."""
    import os
    import signal

    import shiq_train.qsharp_train as qsharp_train
    from shiq_train.qsharp_train import PROGRESS_FILE, RESUME_FILE, ValueTrainConfig, train_value_model
    from shiq_train.trainer import SavedOnSigterm

    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        pytest.skip("SIGTERM is handled by the test runner")
    warnings.filterwarnings("ignore")
    write_toy_buffer(tmp_path / "buf", rows=6)
    hf = tiny_llama(4)
    cfg = ValueTrainConfig(steps=6, rows_per_micro_batch=2, lr=1e-3, progress=False, trainable_last_layers=1)

    def train(name, **kw):
        return train_value_model(
            tmp_path / "buf", tmp_path / name, hf.state_dict(), hf.config, cfg.__class__(**{**cfg.__dict__, **kw})
        )

    def weights(name):
        return torch.load(tmp_path / name / "value_model.pt", weights_only=True)

    def metrics(name):
        return (tmp_path / name / "metrics.jsonl").read_text()

    train("straight")
    real = qsharp_train.qsharp_value_loss  # once a step: one micro-batch a step

    def stop_at(n, how):
        calls = []

        def loss(*args):
            calls.append(1)
            if len(calls) == n:
                if how == "sigterm":
                    os.kill(os.getpid(), signal.SIGTERM)
                else:
                    raise KeyboardInterrupt  # a kill: nothing saved of this step
            return real(*args)

        monkeypatch.setattr(qsharp_train, "qsharp_value_loss", loss)

    stop_at(3, "sigterm")
    with pytest.raises(SavedOnSigterm) as stopped:
        train("stopped")
    assert stopped.value.step == 3 and not stopped.value.complete
    assert sorted(p.name for p in (tmp_path / "stopped").iterdir()) == [
        PROGRESS_FILE,  # the steps so far, a line each, to follow the run
        RESUME_FILE,
        RESUME_FILE + ".sha256",
    ]
    progress = (tmp_path / "stopped" / PROGRESS_FILE).read_text()
    assert progress.splitlines() == metrics("straight").splitlines()[:3]
    monkeypatch.setattr(qsharp_train, "qsharp_value_loss", real)
    train("stopped")
    assert metrics("stopped") == metrics("straight") and not (tmp_path / "stopped" / RESUME_FILE).exists()
    want = weights("straight")
    for k, v in weights("stopped").items():
        assert torch.equal(v, want[k]), k

    stop_at(6, "kill")  # save_every=2: steps 2 and 4 saved, the kill in step 6 loses step 5
    with pytest.raises(KeyboardInterrupt):
        train("killed", save_every=2)
    progress = (tmp_path / "killed" / PROGRESS_FILE).read_text().splitlines()
    assert progress == metrics("straight").splitlines()[:5]  # step 5 was logged, not saved
    monkeypatch.setattr(qsharp_train, "qsharp_value_loss", real)
    # (it names what changed: it said only "other settings, atoms or reference")
    with pytest.raises(
        ValueError,
        match=rf"killed/{RESUME_FILE}: the value run saved there trained with other.*"
        r"\(value\.lr: 0\.001 saved, 0\.002 now\); rerun",
    ):
        train("killed", lr=2e-3)
    with pytest.raises(ValueError, match=r"\(value\.num_atoms: 11 saved, 5 now; the atoms\)"):
        train("killed", num_atoms=5)
    other = tiny_llama(4)
    other.config.rms_norm_eps = 1e-3  # the same weights under another config: another model
    with pytest.raises(
        ValueError,
        match=rf"killed/{RESUME_FILE}: the value run saved there trained with other.*"
        r"\(the trunk\)",
    ):
        train_value_model(tmp_path / "buf", tmp_path / "killed", other.state_dict(), other.config, cfg)
    train("killed", save_every=3)  # (when to save does not change the model)
    assert metrics("killed") == metrics("straight") and not (tmp_path / "killed" / PROGRESS_FILE).exists()

    stop_at(6, "sigterm")  # the last step: the value model is saved, the run is complete
    with pytest.raises(SavedOnSigterm) as stopped:
        train("last")
    assert stopped.value.step == 6 and stopped.value.complete and metrics("last") == metrics("straight")

    # a SIGTERM during the final save (after the last step's check) killed the process, losing every step since
    # the last save_every: it now waits for the save's end
    monkeypatch.setattr(qsharp_train, "qsharp_value_loss", real)
    saving = qsharp_train.save_value_model

    def save_value_model(*args, **kw):
        assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL, "a SIGTERM now would end the process"
        os.kill(os.getpid(), signal.SIGTERM)
        return saving(*args, **kw)

    monkeypatch.setattr(qsharp_train, "save_value_model", save_value_model)
    with pytest.raises(SavedOnSigterm) as stopped:
        train("saving")
    assert stopped.value.step == 6 and stopped.value.complete and metrics("saving") == metrics("straight")


def test_a_value_run_reads_when_to_save_from_the_run_config():
    """shiq-train loss=qsharp_value refused train.save_every (it saved only at the end); it now reads it and
    train.save_on_sigterm, named as the run's keys when wrong."""
    import pathlib

    from omegaconf import OmegaConf

    from shiq_train.qsharp_train import value_config_from_run

    root = pathlib.Path(__file__).resolve().parents[1] / "configs"
    cfg = OmegaConf.to_container(OmegaConf.load(root / "train.yaml"))
    cfg.update(loss={"name": "qsharp_value"}, seed=0)
    cfg["data"]["seed"] = 0
    got = value_config_from_run(cfg, 64)
    assert (got.save_every, got.save_on_sigterm) == (0, True)
    cfg["train"].update(save_every=25, save_on_sigterm=False)
    got = value_config_from_run(cfg, 64)
    assert (got.save_every, got.save_on_sigterm) == (25, False)
    cfg["train"]["save_every"] = -1
    with pytest.raises(ValueError, match=r"train.save_every must be an integer >= 0"):
        value_config_from_run(cfg, 64)


@pytest.mark.parametrize("how", ["cache_frozen_prefix", "prefix_cache"])
def test_a_value_run_on_a_frozen_prefix_cache_resumes_after_sigterm(tmp_path, monkeypatch, how):
    """With a frozen-prefix cache (``cache_frozen_prefix``, or one given as shiq-demo's Q♯ stage does) the steps
    run inside ``suffix_only``, which renumbers the decoder's layers: the state saved there named the trained
    layers decoder.layers.0.*, the resume (outside it) looked for decoder.layers.1.*, and refused the state
    ("its parameters are not this value model's"). It now resumes as one run, equal to an uninterrupted one."""
    import os
    import signal

    import shiq_train.qsharp_train as qsharp_train
    from shiq_train.prefix_cache import PrefixCache
    from shiq_train.qsharp_train import ValueTrainConfig, train_value_model
    from shiq_train.trainer import SavedOnSigterm

    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        pytest.skip("SIGTERM is handled by the test runner")
    warnings.filterwarnings("ignore")
    write_toy_buffer(tmp_path / "buf", rows=6)
    hf = tiny_llama(4)
    cfg = ValueTrainConfig(
        steps=5, rows_per_micro_batch=2, lr=1e-3, progress=False, trainable_last_layers=1,
        cache_frozen_prefix=how == "cache_frozen_prefix",
    )  # fmt: skip

    def train(name):
        cache = None
        if how == "prefix_cache":  # built by the caller from the reference, as shiq-demo does
            from shiq_data.buffer import open_buffer
            from shiq_train import parallel
            from shiq_train.hf_convert import import_llama, model_config_from_llama
            from shiq_train.model import build_model

            with parallel.distributed(seed=0):
                trunk = build_model(model_config_from_llama(hf.config))
                import_llama(trunk, hf.state_dict(), hf.config)
                cache = PrefixCache.from_buffer(trunk, open_buffer(tmp_path / "buf"), 1, progress=False)
        return train_value_model(tmp_path / "buf", tmp_path / name, hf.state_dict(), hf.config, cfg, prefix_cache=cache)

    train("straight")
    real = qsharp_train.qsharp_value_loss
    calls = []

    def loss(*args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(qsharp_train, "qsharp_value_loss", loss)
    with pytest.raises(SavedOnSigterm):
        train("stopped")
    monkeypatch.setattr(qsharp_train, "qsharp_value_loss", real)
    train("stopped")
    read = lambda name: torch.load(tmp_path / name / "value_model.pt", weights_only=True)  # noqa: E731
    want, got = read("straight"), read("stopped")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert (tmp_path / "stopped" / "metrics.jsonl").read_text() == (tmp_path / "straight" / "metrics.jsonl").read_text()


def test_a_finished_value_runs_progress_bar_counts_its_last_step(tmp_path, capsys):
    """The bar of a 3-step run ends at 3/3 (it stopped at 2/3: the loop left before the bar counted the last step)."""
    from shiq_data.buffer import write_buffer
    from shiq_train.qsharp_train import ValueTrainConfig, train_value_model

    warnings.filterwarnings("ignore")
    rows = [
        dict(
            row_id=f"r{i}",
            source="t",
            group_id=i,
            prompt_len=2,
            tokens=[1, 2, 3, 4],
            action_mask=[False, False, True, True],
            rewards=[0.0, 0.0, 0.0, float(i)],
        )
        for i in range(4)
    ]
    tok = {"name": "toy", "fingerprint": "f" * 64, "vocab_size": 64}
    write_buffer(rows, tmp_path / "buf", tokenizer_info=tok, command=["test"], progress=False)
    hf = tiny_llama(4)
    cfg = ValueTrainConfig(steps=3, rows_per_micro_batch=2, progress=True)
    train_value_model(tmp_path / "buf", tmp_path / "value", hf.state_dict(), hf.config, cfg)
    bar = capsys.readouterr().err
    assert "train value" in bar and "3/3" in bar, bar
