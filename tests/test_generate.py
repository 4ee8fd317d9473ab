"""Batched, cached generation against a plain per-prompt argmax loop without cache."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from shiq_eval.generate import HFPolicy, SamplingConfig  # noqa: E402


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def greedy_reference(model, prompt, n, eos):
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            tok = int(logits.argmax())
            out.append(tok)
            ids.append(tok)
            if tok == eos:
                break
    return out


def test_batched_left_padded_greedy_equals_unbatched_no_cache():
    model = tiny_lm()
    prompts = [[1, 2, 3], [5], [7, 8, 9, 10, 11], [4, 4]]
    eos = 39
    got = HFPolicy(model, eos_id=eos, pad_id=0).generate(
        prompts, SamplingConfig(max_new_tokens=8, temperature=0, batch_size=3)
    )
    for p, g in zip(prompts, got):
        assert g == greedy_reference(model, p, 8, eos)


def test_sampling_is_seeded_and_top_p_tiny_is_greedy():
    model = tiny_lm(1)
    policy = HFPolicy(model, eos_id=39, pad_id=0)
    prompts = [[1, 2], [3, 4, 5]] * 3
    a = policy.generate(prompts, SamplingConfig(max_new_tokens=6, temperature=1.0, seed=3))
    b = policy.generate(prompts, SamplingConfig(max_new_tokens=6, temperature=1.0, seed=3))
    c = policy.generate(prompts, SamplingConfig(max_new_tokens=6, temperature=1.0, seed=4))
    assert a == b and a != c
    nucleus = policy.generate(prompts, SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=1e-6))
    greedy = policy.generate(prompts, SamplingConfig(max_new_tokens=6, temperature=0))
    assert nucleus == greedy


def test_bad_sampling_config():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
