"""Sampling the trainer's megatron model (``MegatronPolicy``) against independent references.

The references are transformers itself (a Llama imported into megatron must generate, greedily, what
the transformers model generates, with and without its KV cache), an exact nucleus distribution
computed here in numpy, and the TP=1 run for tensor parallelism (two gloo processes).
"""

import os
import warnings

import numpy as np
import pytest
import torch
import transformers
from ranks import spawn
from test_generate import greedy_reference as greedy_without_cache  # (one full forward per token)

from shiq_eval.evaluate import evaluate_samples
from shiq_eval.generate import HFPolicy, MegatronPolicy, SamplingConfig, sample_next
from shiq_train import hf_convert as H
from shiq_train import model as M
from shiq_train import parallel

EOS, PAD = 0, 47
PROMPTS = [[1, 2, 3], [5], [7, 8, 9, 10, 11], [4, 4], [9] * 7, [30, 31]]


LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192, "rope_theta": 500000.0,
}  # fmt: skip
PLAIN_ROPE = {"rope_type": "default", "rope_theta": 500000.0}


def peaked_llama(arch="llama", rope=None):
    """A tiny Llama with large weights, so greedy paths vary and some rows stop at EOS (``arch="qwen3"``: a Qwen3,
    its heads 24 wide, not hidden_size / heads = 16, its query and key norms random; ``arch="llama3"``: a Llama
    with Llama 3.2's rope_type llama3, factor 32, or the same weights with ``rope``)."""
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    }[arch]
    cfg = config_class(
        **({"head_dim": 24} if arch == "qwen3" else {}),
        **({"rope_parameters": rope or LLAMA3_ROPE} if arch == "llama3" else {}),
        vocab_size=48,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        initializer_range=0.3,
        tie_word_embeddings=True,
    )
    torch.manual_seed(
        {"llama": 0, "qwen3": 10, "llama3": 31}[arch]
    )  # (a draw whose greedy paths stop some rows at EOS)
    model = model_class(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    return model


def imported(hf):
    mg = M.build_model(H.model_config_from_llama(hf.config, params_dtype="float32", logits_chunk_tokens=0)).eval()
    H.import_llama(mg, hf.state_dict(), hf.config)
    return mg


@pytest.fixture
def dist1():
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=0):
        yield


@pytest.mark.parametrize("arch", ["llama", "qwen3", "llama3"])
def test_greedy_equals_transformers_with_and_without_cache(dist1, arch):
    hf = peaked_llama(arch)
    want = [greedy_without_cache(hf, p, 10, EOS) for p in PROMPTS]
    assert sum(w[-1] == EOS for w in want) >= 2, "the fixture should stop some rows early"
    if arch == "llama3":  # the scaled rotary frequencies change a greedy path (so plain RoPE would not pass)
        plain = peaked_llama(arch, rope=PLAIN_ROPE)
        assert want != [greedy_without_cache(plain, p, 10, EOS) for p in PROMPTS]
    cfg = SamplingConfig(max_new_tokens=10, temperature=0, batch_size=4)  # batches mix prompt lengths
    assert HFPolicy(hf, eos_id=EOS, pad_id=PAD).generate(PROMPTS, cfg) == want
    mg = imported(hf).train()
    assert MegatronPolicy(mg, eos_id=EOS, pad_id=PAD).generate(PROMPTS, cfg) == want
    assert mg.training, "generate restores the training mode"
    # one prompt at a time gives the same: batching and right-padding change nothing
    one = SamplingConfig(max_new_tokens=10, temperature=0, batch_size=1)
    assert MegatronPolicy(mg, eos_id=EOS, pad_id=PAD).generate(PROMPTS, one) == want


def nucleus(logits, temperature, top_p):
    """The exact distribution ``sample_next`` should draw from, computed independently in numpy."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    keep, mass = np.zeros_like(p, dtype=bool), 0.0
    for i in np.argsort(-p, kind="stable"):
        keep[i] = True
        mass += p[i]
        if mass >= top_p:
            break
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8), (1.5, 0.5)])
def test_sample_next_draws_from_the_tempered_nucleus(temperature, top_p):
    logits = torch.randn(12, generator=torch.Generator().manual_seed(3)) * 2
    n = 40_000
    drawn = sample_next(
        logits.expand(n, -1), SamplingConfig(temperature=temperature, top_p=top_p), torch.Generator().manual_seed(0)
    )
    freq = np.bincount(drawn.numpy(), minlength=12) / n
    want = nucleus(logits.numpy(), temperature, top_p)
    assert np.all(freq[want == 0] == 0), "a token outside the nucleus was drawn"
    assert np.abs(freq - want).max() < 5 * np.sqrt(0.25 / n)
    assert torch.equal(
        sample_next(logits.expand(3, -1), SamplingConfig(temperature=0), None), logits.argmax().expand(3)
    )


def test_first_token_frequencies_follow_the_transformers_distribution(dist1):
    hf = peaked_llama()
    prompt = [5, 9, 2]
    with torch.no_grad():
        want = nucleus(hf(torch.tensor([prompt])).logits[0, -1].numpy(), 1.0, 0.9)
    n = 6000
    cfg = SamplingConfig(max_new_tokens=1, temperature=1.0, top_p=0.9, batch_size=n, seed=5)
    got = MegatronPolicy(imported(hf), eos_id=EOS, pad_id=PAD).generate([prompt] * n, cfg)
    freq = np.bincount([g[0] for g in got], minlength=48) / n
    assert np.all(freq[want == 0] == 0)
    assert np.abs(freq - want).max() < 5 * np.sqrt(0.25 / n)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampling_draws_the_transformers_engines_completions_in_batches_of_mixed_prompt_lengths(
    dist1, temperature, top_p
):
    """Each row's t-th token at the uniform number HFPolicy draws it at: the same completions as transformers
    for every row of a batch whose prompts differ in length (a row whose prompt was longer than its batch's
    shortest drew with a later row of numbers, so only the shortest prompts' rows matched), EOS stops included."""
    hf = peaked_llama()
    prompts = PROMPTS * 3  # 18 rows in batches of 7, 7 and 4, each of mixed lengths
    cfg = SamplingConfig(max_new_tokens=8, temperature=temperature, top_p=top_p, batch_size=7, seed=3)
    want = HFPolicy(hf, eos_id=EOS, pad_id=PAD).generate(prompts, cfg)
    assert len(set(map(tuple, want))) > 6 and any(w[-1] == EOS and len(w) < 8 for w in want)  # varied, some stop
    assert MegatronPolicy(imported(hf), eos_id=EOS, pad_id=PAD).generate(prompts, cfg) == want


def test_bad_inputs_and_pipeline_parallelism_are_refused(dist1, monkeypatch):
    hf = peaked_llama()
    policy = MegatronPolicy(imported(hf), eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        policy.generate([[1], []], SamplingConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="prompt 0: 30 tokens .* exceed the model's max_sequence_length 32"):
        policy.generate([[1] * 30], SamplingConfig(max_new_tokens=3))
    with pytest.raises(ValueError, match="prompt 2: 30 tokens"):  # named among all the prompts, not in its batch
        policy.generate([[1], [2], [1] * 30], SamplingConfig(max_new_tokens=3, batch_size=2))
    with pytest.raises(ValueError, match="prompt 2: 30 tokens"):  # an evaluation checks them all before sampling
        evaluate_samples(
            policy,
            lambda p, c: (None, None),
            None,
            [[1], [2], [1] * 30],
            list("abc"),
            None,
            max_new_tokens=3,
            batch_size=1,
            progress=False,
        )
    from megatron.core import parallel_state

    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_world_size", lambda: 2)
    with pytest.raises(ValueError, match="pipeline parallelism is not supported"):
        policy.generate([[1]], SamplingConfig(max_new_tokens=2))


SAMPLED = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, batch_size=4, seed=11)


def _tp2_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    hf = peaked_llama()
    with parallel.distributed(
        parallel.ParallelConfig(2, 1), rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}", seed=0
    ):
        got = MegatronPolicy(imported(hf), eos_id=EOS, pad_id=PAD).generate(PROMPTS, SAMPLED)
        greedy = MegatronPolicy(imported(hf), eos_id=EOS, pad_id=PAD).generate(
            PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0, batch_size=4)
        )
    torch.save({"sampled": got, "greedy": greedy}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_tensor_parallel_sampling_equals_single_process(tmp_path):
    warnings.filterwarnings("ignore")
    hf = peaked_llama()
    with parallel.distributed(seed=0):
        want = MegatronPolicy(imported(hf), eos_id=EOS, pad_id=PAD).generate(PROMPTS, SAMPLED)
    spawn(_tp2_worker, args=(parallel.free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0] == ranks[1], "both tensor-parallel ranks return the same completions"
    assert ranks[0]["sampled"] == want
    assert ranks[0]["greedy"] == [greedy_without_cache(hf, p, 10, EOS) for p in PROMPTS]
