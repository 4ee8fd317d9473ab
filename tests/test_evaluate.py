"""KL of a policy against itself is zero; against another model both estimators agree in expectation."""

import numpy as np
import pytest
import torch
import transformers

from shiq_eval.evaluate import evaluate_policy, sequence_kls
from shiq_eval.scorers import FunctionScorer


class Tok:
    eos_token_id, pad_token_id = 39, 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i == 39))


def tiny(seed, layers=1):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def test_sequence_kls_refuses_an_empty_prompt():
    """Its first completion token has no position to be predicted from (it was dropped from the KL)."""
    m = tiny(0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sequence_kls(m, tiny(1), [[1, 2], []], [[3], [3, 4]])


def test_sequence_kls_of_no_prompts_is_empty_and_unequal_lists_are_refused():
    """No prompts ended in torch.cat's error; more prompts than completions gave fewer KLs than prompts."""
    m = tiny(0)
    sample, exact = sequence_kls(m, m, [], [])
    assert sample.shape == exact.shape == (0,)
    with pytest.raises(ValueError, match="^3 prompts but 2 completions$"):
        sequence_kls(m, tiny(1), [[1], [2], [3]], [[3], [4]])


def test_self_kl_is_zero_and_rewards_are_scored():
    m = tiny(0)
    prompts = [[1, 2, 3], [4, 5]] * 4
    res = evaluate_policy(
        m, m, Tok(), prompts, ["p"] * 8, FunctionScorer(lambda p, c: len(c.split())), max_new_tokens=5, progress=False
    )
    assert res.kl_sample == pytest.approx(0.0, abs=1e-12) and res.kl_exact == pytest.approx(0.0, abs=1e-12)
    assert res.n == 8 and 0 < res.reward_mean <= 5
    assert res.samples[0][0] == "p"


@pytest.mark.parametrize("batch_size", [3, 4, 16])
def test_the_reference_against_itself_has_a_kl_of_exactly_zero(batch_size):
    """The reference row of shiq-eval run (the model against itself) went through the one-pass path, whose
    reference logits come from another matmul shape than sampling's: in batches of 3 or 4 its sample KL was
    about 1e-8 either side of 0 and its exact one -1e-17 (a KL below 0), where it is 0 by definition (SHIQ_MATH §6,
    §9: J(π_ref) = E[R]). The same completions and rewards as sampling it alone."""
    from shiq_eval.generate import HFPolicy

    m = tiny(0)
    prompts = [p for p in [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]] for _ in range(2)]
    scorer = FunctionScorer(lambda p, c: len(c.split()))
    kw = dict(max_new_tokens=6, batch_size=batch_size, samples_per_prompt=2, progress=False)
    res = evaluate_policy(m, m, Tok(), prompts, ["p"] * 6, scorer, **kw)
    assert res.kls_sample == [0.0] * 6 and res.kls_exact == [0.0] * 6
    assert res.kl_sample == 0.0 and res.kl_exact == 0.0
    alone = evaluate_policy(
        m, tiny(1), Tok(), prompts, ["p"] * 6, scorer, sampler=HFPolicy(m, eos_id=39, pad_id=0), **kw
    )
    assert res.rewards == alone.rewards


def test_padding_does_not_change_the_kl_of_a_sequence():
    a, b = tiny(1), tiny(2)
    prompts, comps = [[1, 2, 3], [4]], [[5, 6], [7, 8, 9, 10]]
    together = sequence_kls(a, b, prompts, comps, batch_size=2)
    alone = [sequence_kls(a, b, [p], [c], batch_size=1) for p, c in zip(prompts, comps)]
    for k in range(2):
        assert torch.allclose(together[k], torch.cat([x[k] for x in alone]), atol=1e-9)


def test_kls_equal_a_direct_float64_computation_per_sequence():
    """Each sequence alone, full logits, a plain float64 sum over its completion tokens: the independent
    reference for the batched path (which asks the models for the last positions only)."""
    a, b = tiny(5), tiny(6)
    prompts = [[1, 2, 3, 4, 5], [6], [7, 8], [9, 10, 11]]
    comps = [[12, 13], [14, 15, 16, 17], [18], [19, 20, 21]]
    got_sample, got_exact = sequence_kls(a, b, prompts, comps, batch_size=4)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            lp = torch.log_softmax(a(input_ids=ids).logits[0].double(), -1)
            lq = torch.log_softmax(b(input_ids=ids).logits[0].double(), -1)
        positions = range(len(p) - 1, len(p) + len(c) - 1)  # the logits that predict each completion token
        want_sample = sum(float(lp[t, ids[0, t + 1]] - lq[t, ids[0, t + 1]]) for t in positions)
        want_exact = sum(float((lp[t].exp() * (lp[t] - lq[t])).sum()) for t in positions)
        assert float(got_sample[i]) == pytest.approx(want_sample, abs=1e-6)
        assert float(got_exact[i]) == pytest.approx(want_exact, abs=1e-6)
    assert float(got_exact.abs().sum()) > 1e-3  # different models: a zero KL would prove nothing


def test_estimators_agree_on_average():
    a, b = tiny(3), tiny(4)
    prompts = [[1, 2]] * 200
    res = evaluate_policy(
        a,
        b,
        Tok(),
        prompts,
        ["p"] * 200,
        FunctionScorer(lambda p, c: 0.0),
        max_new_tokens=4,
        batch_size=50,
        progress=False,
    )
    assert res.kl_exact > 0
    # one exact KL per completion, in prompt order, averaging to kl_exact
    assert len(res.kls_exact) == 200 and res.kl_exact == pytest.approx(sum(res.kls_exact) / 200, abs=1e-12)
    assert abs(res.kl_sample - res.kl_exact) < 4 * (res.kl_sample_stderr + res.kl_exact_stderr)
    assert res.kl_exact_stderr < res.kl_sample_stderr


def fine_tune_of(ref, trained_from: int, seed: int):
    """A copy of ``ref`` whose decoder layers from ``trained_from`` on and output layer are perturbed (what
    training the last layers does); the embeddings and earlier layers stay bit for bit the reference's."""
    import copy

    m = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in m.model.layers[trained_from:]:
            for p in layer.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        m.lm_head.weight.add_(0.3 * torch.randn(m.lm_head.weight.shape, generator=g))
    return m


def test_shared_prefix_layers_counts_the_layers_held_alike():
    from shiq_eval.shared_layers import shared_prefix_layers

    ref = tiny(7, layers=3)
    assert shared_prefix_layers(ref, ref) == 3
    for k in range(3):
        assert shared_prefix_layers(fine_tune_of(ref, k, seed=k), ref) == k
    other = fine_tune_of(ref, 3, seed=1)
    with torch.no_grad():
        other.model.embed_tokens.weight[5, 0] += 1e-3  # embeddings differ: nothing is shared
    assert shared_prefix_layers(other, ref) == 0
    assert shared_prefix_layers(tiny(0), ref) == 0  # another shape
    assert shared_prefix_layers(object(), ref) == 0


@pytest.mark.parametrize("trained_from", [1, 2, 3])
def test_shared_prefix_evaluation_equals_sampling_then_two_full_passes(trained_from):
    """The one-pass evaluation of a policy that shares the reference's first layers gives the completions
    ``HFPolicy`` samples under the same seeds, and for them the KL estimators of ``sequence_kls`` (both
    models over prompt + completion from the first layer, right-padded): the independent reference.
    Prompts of several lengths (left padding in sampling) and an end token that stops some rows early."""
    from shiq_eval.evaluate import SharedPrefixPolicy
    from shiq_eval.generate import HFPolicy, SamplingConfig
    from shiq_eval.shared_layers import shared_prefix_layers

    ref = tiny(11, layers=3)
    policy = fine_tune_of(ref, trained_from, seed=3)
    assert shared_prefix_layers(policy, ref) == trained_from
    tok = Tok()
    with torch.no_grad():  # make the end token likely, so that rows end at different lengths
        policy.lm_head.weight[tok.eos_token_id] += 0.5 * policy.lm_head.weight.mean(0)
    prompts = [[1, 2, 3, 4, 5, 6], [7], [8, 9], [10, 11, 12]] * 3
    cfg = SamplingConfig(max_new_tokens=7, batch_size=5, seed=6)
    fused = SharedPrefixPolicy(policy, ref, trained_from, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    comps, got_sample, got_exact = fused.generate_with_kls(prompts, cfg)
    want_comps = HFPolicy(policy, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id).generate(prompts, cfg)
    assert comps == want_comps
    assert len({len(c) for c in comps}) > 1  # some rows stopped early
    want_sample, want_exact = sequence_kls(policy, ref, prompts, comps, batch_size=4, pad_id=tok.pad_token_id)
    assert torch.allclose(got_exact, want_exact, atol=1e-5, rtol=1e-5)
    assert torch.allclose(got_sample, want_sample, atol=1e-5, rtol=1e-5)
    assert float(want_exact.min()) > 1e-3  # the models differ: equal zeros would prove nothing


def test_evaluate_policy_takes_the_shared_prefix_path_with_the_same_result(monkeypatch):
    """``evaluate_policy`` on a fine-tune of the reference's last layer: the same rewards and KLs as
    sampling with ``HFPolicy`` and scoring with ``sequence_kls`` (the two-pass path it replaces)."""
    import shiq_eval.evaluate as ev

    ref = tiny(13, layers=3)
    policy = fine_tune_of(ref, 2, seed=5)
    prompts = [[1, 2, 3], [4, 5], [6]] * 4
    scorer = FunctionScorer(lambda p, c: len(c.split()))
    kw = dict(max_new_tokens=5, batch_size=4, seed=2, progress=False)
    calls = []
    real = ev.SharedPrefixPolicy.generate_with_kls
    monkeypatch.setattr(
        ev.SharedPrefixPolicy, "generate_with_kls", lambda self, *a, **k: calls.append(self.k) or real(self, *a, **k)
    )
    got = ev.evaluate_policy(policy, ref, Tok(), prompts, ["p"] * 12, scorer, **kw)
    assert calls == [2, 2, 2]  # one call per batch of 4
    want = ev.evaluate_samples(
        ev.HFPolicy(policy, eos_id=39, pad_id=0),
        lambda p, c: sequence_kls(policy, ref, p, c, 4, 0),
        Tok(),
        prompts,
        ["p"] * 12,
        scorer,
        **kw,
    )
    assert got.rewards == want.rewards
    assert got.kls_exact == pytest.approx(want.kls_exact, abs=1e-5)
    assert got.kls_sample == pytest.approx(want.kls_sample, abs=1e-5)


def test_prompt_prefixes_kept_for_the_next_policy_change_nothing():
    """Two fine-tunes of the same reference evaluated with one :class:`PromptPrefixes`: the completions and
    both KL estimators of each equal, bit for bit, those of its own full prompt pass; the reference reads each
    batch of prompts once; a store of another reference is refused."""
    from shiq_eval.evaluate import PromptPrefixes, SharedPrefixPolicy
    from shiq_eval.generate import SamplingConfig

    ref = tiny(17, layers=3)
    policies = [fine_tune_of(ref, 2, seed=s) for s in (1, 2)]
    prompts = [[1, 2, 3, 4], [5], [6, 7]] * 3
    cfg = SamplingConfig(max_new_tokens=6, batch_size=4, seed=9)
    store = PromptPrefixes(ref)
    reads = []
    hook = ref.model.layers[0].register_forward_pre_hook(lambda m, a: reads.append(1))
    for policy in policies:
        plain = SharedPrefixPolicy(policy, ref, 2, eos_id=39, pad_id=0).generate_with_kls(prompts, cfg)
        before = len(reads)
        kept = SharedPrefixPolicy(policy, ref, 2, eos_id=39, pad_id=0, prompt_prefixes=store).generate_with_kls(
            prompts, cfg
        )
        assert kept[0] == plain[0]
        assert torch.equal(kept[1], plain[1]) and torch.equal(kept[2], plain[2])
        assert len(reads) - before == (3 if policy is policies[0] else 0)  # 3 batches, read by the first only
    hook.remove()
    # the first token drawn for the last prompt (alone in its batch) as the end token: that batch ends after one
    # step, before its last (the first draw does not depend on the end token), and other rows end early too
    eos = plain[0][-1][0]
    plain = SharedPrefixPolicy(policies[1], ref, 2, eos_id=eos, pad_id=0).generate_with_kls(prompts, cfg)
    kept = SharedPrefixPolicy(policies[1], ref, 2, eos_id=eos, pad_id=0, prompt_prefixes=store).generate_with_kls(
        prompts, cfg
    )
    assert kept[0] == plain[0] and torch.equal(kept[1], plain[1]) and torch.equal(kept[2], plain[2])
    batches = [plain[0][i : i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
    assert any(max(map(len, b)) < cfg.max_new_tokens for b in batches)
    # the reference as its own policy: every layer shared, the reference's pass and the policy's one module
    plain = SharedPrefixPolicy(ref, ref, 3, eos_id=39, pad_id=0).generate_with_kls(prompts, cfg)
    kept = SharedPrefixPolicy(ref, ref, 3, eos_id=39, pad_id=0, prompt_prefixes=store).generate_with_kls(prompts, cfg)
    # zero up to float rounding: the policy's logits come from sampling's steps, the reference's from one pass
    assert kept[0] == plain[0] and torch.equal(kept[2], plain[2]) and float(plain[2].abs().max()) < 1e-12
    with pytest.raises(ValueError, match="another reference"):
        SharedPrefixPolicy(policies[0], tiny(17, layers=3), 2, eos_id=39, prompt_prefixes=store)


def test_after_sampling_only_the_reference_runs_and_only_over_the_completions():
    """The KL of a policy evaluated with a :class:`PromptPrefixes` costs the reference's last layers over the
    completion tokens alone: the policy's layers never run again after sampling (the logits each token was
    drawn from are the policy's), and the reference's pass over the prompts is kept for the next policy."""
    from shiq_eval.evaluate import PromptPrefixes, SharedPrefixPolicy
    from shiq_eval.generate import SamplingConfig

    ref = tiny(19, layers=3)
    policies = [fine_tune_of(ref, 2, seed=s) for s in (4, 5)]
    prompts = [[1, 2, 3, 4], [5], [6, 7]] * 3  # batches of 4, 4 and 1 prompts, 4 tokens wide at most
    cfg = SamplingConfig(max_new_tokens=6, batch_size=4, seed=9)
    store = PromptPrefixes(ref)
    for i, policy in enumerate(policies):
        seen = {"policy": [], "ref": []}
        hooks = [
            net.model.layers[2].register_forward_pre_hook(lambda m, a, kw, who=who: seen[who].append(
                (a[0] if a else kw["hidden_states"]).shape[:2]), with_kwargs=True)
            for net, who in ((policy, "policy"), (ref, "ref"))
        ]  # fmt: skip
        comps = SharedPrefixPolicy(policy, ref, 2, eos_id=39, pad_id=0, prompt_prefixes=store).generate_with_kls(
            prompts, cfg
        )[0]
        for h in hooks:
            h.remove()
        batches = [comps[j : j + 4] for j in range(0, len(comps), 4)]
        widths = [max(len(p) for p in prompts[j : j + 4]) for j in range(0, len(prompts), 4)]
        want_policy = [s for b, w in zip(batches, widths) for s in [(len(b), w)] + [(len(b), 1)] * (len(b[0]) - 1)]
        assert seen["policy"] == want_policy  # the prompt once, then one token a step: nothing after sampling
        # the first policy: each batch's prompts reach layer 2 twice (where the shared layers' pass stops, then
        # the reference's own pass from there), then the completions; the second: the completions alone
        want_ref = [((len(b), w),) * 2 * (i == 0) + ((len(b), len(b[0]) - 1),) * (len(b[0]) > 1) for b, w in zip(
            batches, widths)]  # fmt: skip
        assert seen["ref"] == [s for t in want_ref for s in t]


def test_inputs_of_layer_can_stop_the_pass_there():
    """With ``stop``, the hook keeps the input of layer ``k`` (that of a plain pass) and only the layers before it
    finish."""
    from shiq_eval.shared_layers import inputs_of_layer

    model = tiny(19, layers=3)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad(), inputs_of_layer(model, 1) as want:
        model(input_ids=ids)
    ran = []
    hooks = [
        layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad(), inputs_of_layer(model, 1, stop=True) as got:
        model(input_ids=ids)
        raise AssertionError("the pass should have stopped at layer 1")  # never reached
    for h in hooks:
        h.remove()
    assert ran == [0] and len(got) == 1 and torch.equal(got[0], want[0])


def _numpy_se(x):
    x = np.asarray(x, dtype=np.float64)
    return x.std(ddof=1) / np.sqrt(x.size)


def test_standard_errors_are_over_prompts_when_prompts_have_several_samples():
    """Two samples per prompt whose rewards and KLs share a per-prompt level (correlated within a prompt): each
    mean's standard error is that of the per-prompt means over prompts (numpy here, from the raw values), wider
    than the completions-as-independent one; with one sample per prompt it is the plain one over completions."""
    from types import SimpleNamespace

    from shiq_eval.evaluate import evaluate_samples

    P, S = 7, 2
    rng = np.random.default_rng(4)
    rewards = np.repeat(rng.normal(0.0, 1.0, P), S) + rng.normal(0.0, 0.1, P * S)  # [P*S], prompt-major
    kl_sample = np.repeat(rng.exponential(1.0, P), S) + rng.normal(0.0, 0.05, P * S)
    kl_exact = np.repeat(rng.exponential(1.0, P), S) + rng.normal(0.0, 0.02, P * S)
    # completion j is the token 100 + j (decoded "100+j"); the scorer reads that index back
    policy = SimpleNamespace(generate=lambda ids, cfg, progress=False: [[100 + j] for j in range(len(ids))])
    scorer = FunctionScorer(lambda p, c: float(rewards[int(c) - 100]))

    def kls(prompts, completions):
        return torch.tensor(kl_sample), torch.tensor(kl_exact)

    prompts = [[i + 1, i + 2] for i in range(P) for _ in range(S)]
    texts = [f"p{i}" for i in range(P) for _ in range(S)]
    res = evaluate_samples(policy, kls, Tok(), prompts, texts, scorer, samples_per_prompt=S, progress=False)
    for values, mean, se in (
        (rewards, res.reward_mean, res.reward_stderr),
        (kl_sample, res.kl_sample, res.kl_sample_stderr),
        (kl_exact, res.kl_exact, res.kl_exact_stderr),
    ):
        by_prompt = values.reshape(P, S).mean(axis=1)
        assert mean == pytest.approx(values.mean(), rel=1e-12, abs=1e-12)
        assert se == pytest.approx(_numpy_se(by_prompt), rel=1e-12)
        assert se > 1.2 * _numpy_se(values)  # treating a prompt's samples as independent understates it
    assert res.n == P * S and res.rewards == pytest.approx(rewards.tolist(), abs=1e-12)

    # one sample per prompt: the plain mean and standard error over completions, as before
    single = [[j + 1] for j in range(P * S)]
    one = evaluate_samples(policy, kls, Tok(), single, texts, scorer, progress=False)
    assert one.reward_stderr == pytest.approx(_numpy_se(rewards), rel=1e-12)
    assert one.kl_exact_stderr == pytest.approx(_numpy_se(kl_exact), rel=1e-12)
    from shiq_eval.kl import mean_stderr

    assert (one.reward_mean, one.reward_stderr) == mean_stderr(torch.tensor(rewards))  # bit for bit unchanged

    # the samples of one prompt must be consecutive copies of it
    with pytest.raises(ValueError, match="prompt-major"):
        evaluate_samples(policy, kls, Tok(), single, texts, scorer, samples_per_prompt=S, progress=False)
    with pytest.raises(ValueError, match="do not split"):
        evaluate_samples(policy, kls, Tok(), prompts[:-1], texts[:-1], scorer, samples_per_prompt=S, progress=False)


@pytest.mark.parametrize("trained_from", [0, 2])
def test_evaluate_policy_reports_standard_errors_over_prompts(trained_from):
    """Through ``evaluate_policy`` (two passes, and the one-pass shared-layers path): with two samples per
    prompt the reported standard errors are numpy's over the per-prompt means of the returned per-completion
    values."""
    ref = tiny(21, layers=3)
    policy = fine_tune_of(ref, trained_from, seed=7)
    S = 2
    prompts = [p for p in ([1, 2, 3], [4, 5], [6], [7, 8], [9, 10, 11]) for _ in range(S)]
    scorer = FunctionScorer(lambda p, c: sum(int(t) for t in c.split()) / 40.0)
    res = evaluate_policy(
        policy, ref, Tok(), prompts, ["p"] * len(prompts), scorer,
        max_new_tokens=4, batch_size=4, seed=1, progress=False, samples_per_prompt=S,
    )  # fmt: skip
    for values, mean, se in (
        (res.rewards, res.reward_mean, res.reward_stderr),
        (res.kls_exact, res.kl_exact, res.kl_exact_stderr),
        (res.kls_sample, res.kl_sample, res.kl_sample_stderr),
    ):
        v = np.asarray(values, dtype=np.float64)
        assert mean == pytest.approx(v.mean(), rel=1e-9, abs=1e-12)
        assert se == pytest.approx(_numpy_se(v.reshape(-1, S).mean(axis=1)), rel=1e-9, abs=1e-12)
    assert res.kl_exact > 1e-4 and np.std(res.rewards) > 0  # something to estimate


@pytest.mark.parametrize(
    "rewards, kl, message",
    [
        ([1.0, 3.0], None, r"the scorer's rewards hold \(2,\) values for 4 completions"),
        ([1.0, float("nan"), 0.0, 0.0], None, r"the scorer's rewards hold a non-finite value \(nan\) for completion 1"),
        ([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0], r"the sample KL estimates hold \(3,\) values for 4 completions"),
        ([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, float("inf"), 0.0], r"the sample KL estimates hold a non-finite value"),
        (["a", "b", "c", "d"], None, r"the scorer's rewards are not a list of numbers"),
    ],
)
def test_a_scorer_or_kl_that_miscounts_completions_is_refused(rewards, kl, message):
    """A scorer that returns two rewards for four completions used to be reported as a mean over four; a NaN
    reward or KL ended as a NaN mean. Each is a ValueError naming what is wrong."""
    from types import SimpleNamespace

    from shiq_eval.evaluate import evaluate_samples

    policy = SimpleNamespace(generate=lambda ids, cfg, progress=False: [[10, 11]] * len(ids))
    kl = [0.0] * 4 if kl is None else kl
    kls = lambda p, c: (torch.tensor(kl, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))  # noqa: E731
    with pytest.raises(ValueError, match=message):
        evaluate_samples(policy, kls, Tok(), [[1], [2], [3], [4]], list("abcd"), lambda p, t: rewards, progress=False)


def test_a_non_finite_kl_is_named_among_all_completions():
    """The KLs are checked batch by batch, as each batch is sampled: a NaN at the second completion of the
    second batch (batches of two) was said to be completion 1; it is completion 3 of the four."""
    from types import SimpleNamespace

    from shiq_eval.evaluate import evaluate_samples

    policy = SimpleNamespace(generate=lambda ids, cfg, progress=False: [[10, 11]] * len(ids))

    def kls(prompts, completions):  # [B] each; NaN for the prompt [4], the fourth
        sample = torch.tensor([float("nan") if p == [4] else 0.0 for p in prompts], dtype=torch.float64)
        return sample, torch.zeros(len(prompts), dtype=torch.float64)

    with pytest.raises(ValueError, match=r"the sample KL estimates hold a non-finite value \(nan\) for completion 3"):
        evaluate_samples(
            policy, kls, Tok(), [[1], [2], [3], [4]], list("abcd"), lambda p, t: [0.0] * 4, batch_size=2, progress=False
        )


@pytest.mark.parametrize("batch_size", [4, 1])
def test_a_prompt_past_the_models_positions_is_refused_on_the_shared_prefix_path(batch_size):
    """A policy sharing the reference's first layers is sampled by ``SharedPrefixPolicy``, which sampled a prompt
    whose tokens plus max_new_tokens pass max_position_embeddings without a word; ``HFPolicy`` (the path of a
    policy sharing nothing) refused it already. Both paths now refuse it alike, naming the prompt by its index
    among all those sampled, also when the evaluation samples them one batch at a time."""
    ref = tiny(13, layers=3)
    policy = fine_tune_of(ref, 2, seed=5)
    scorer = FunctionScorer(lambda p, c: len(c.split()))
    kw = dict(max_new_tokens=8, batch_size=batch_size, seed=2, progress=False)
    fits = evaluate_policy(policy, ref, Tok(), [[1] * 56, [2, 3]], ["p"] * 2, scorer, **kw)  # 56 + 8 = 64
    assert fits.n == 2
    for other in (policy, fine_tune_of(ref, 0, seed=5)):  # the shared prefix path, then the plain one
        with pytest.raises(
            ValueError,
            match="prompt 1 of the 2 sampled .*: 57 tokens \\+ max_new_tokens 8 exceed the model's max_position_",
        ):
            evaluate_policy(other, ref, Tok(), [[2, 3], [1] * 57], ["p"] * 2, scorer, **kw)


def test_shared_prefix_layers_are_found_in_models_loaded_from_two_folders(tmp_path):
    """A policy and its reference loaded from two folders (as ``shiq-eval run`` loads them) differ in their
    configs' ``_name_or_path`` (and may in ``transformers_version``), which say where a model was read from, not
    what it computes: they were counted as another configuration, so no layer was shared and the evaluation
    ran both models whole."""
    from shiq_eval.shared_layers import shared_prefix_layers

    ref = tiny(7, layers=3)
    ref.save_pretrained(tmp_path / "ref")
    fine_tune_of(ref, 2, seed=0).save_pretrained(tmp_path / "policy")
    a, b = (transformers.LlamaForCausalLM.from_pretrained(tmp_path / d) for d in ("policy", "ref"))
    assert a.config.name_or_path != b.config.name_or_path
    assert shared_prefix_layers(a, b) == 2
    b.config.rms_norm_eps = 1e-3  # a field that changes the logits still counts
    assert shared_prefix_layers(a, b) == 0


@pytest.mark.parametrize("trained_from", [0, 2])
def test_an_evaluation_resumes_from_the_batches_its_journal_kept(trained_from):
    """Each batch's completions and KLs go to the journal (``put``) as soon as they are computed; an evaluation
    whose journal hands back the first batches (``get``) samples only the others and gives every completion's
    reward and KLs bit for bit (two passes, and the one-pass shared-layers path)."""
    from shiq_eval.evaluate import SampledBatch

    ref = tiny(23, layers=3)
    policy = fine_tune_of(ref, trained_from, seed=3)
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8], [9, 10, 11]]
    scorer = FunctionScorer(lambda p, c: len(c.split()))
    kw = dict(max_new_tokens=4, batch_size=2, seed=5, progress=False)

    class Journal(dict):
        def get(self, i, batch):
            return super().get((i, tuple(map(tuple, batch))))

        def put(self, i, batch, result):
            assert (i, tuple(map(tuple, batch))) not in self
            self[i, tuple(map(tuple, batch))] = result

    kept = Journal()
    whole = evaluate_policy(policy, ref, Tok(), prompts, ["p"] * 5, scorer, journal=kept, **kw)
    assert sorted(i for i, _ in kept) == [0, 1, 2] and all(isinstance(b, SampledBatch) for b in kept.values())
    assert whole.kls_exact == [v for _, b in sorted(kept.items()) for v in b.kl_exact]
    resumed = Journal({key: b for key, b in kept.items() if key[0] < 2})  # the third batch not saved
    # (a batch run again would be put again: refused above)
    got = evaluate_policy(policy, ref, Tok(), prompts, ["p"] * 5, scorer, journal=resumed, **kw)
    assert got == whole and sorted(i for i, _ in resumed) == [0, 1, 2]
    assert resumed[max(resumed)] == kept[max(kept)]
