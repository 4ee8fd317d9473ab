"""KL of a policy against itself is zero; against another model both estimators agree in expectation."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from shiq_eval.evaluate import evaluate_policy, sequence_kls  # noqa: E402
from shiq_eval.scorers import FunctionScorer  # noqa: E402


class Tok:
    eos_token_id, pad_token_id = 39, 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i == 39))


def tiny(seed):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def test_self_kl_is_zero_and_rewards_are_scored():
    m = tiny(0)
    prompts = [[1, 2, 3], [4, 5]] * 4
    res = evaluate_policy(
        m, m, Tok(), prompts, ["p"] * 8, FunctionScorer(lambda p, c: len(c.split())), max_new_tokens=5, progress=False
    )
    assert res.kl_sample == pytest.approx(0.0, abs=1e-12) and res.kl_exact == pytest.approx(0.0, abs=1e-12)
    assert res.n == 8 and 0 < res.reward_mean <= 5
    assert res.samples[0][0] == "p"


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
