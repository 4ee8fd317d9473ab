"""Batched, cached generation against plain loops without cache or padding; the draw of a token."""

import pytest
import torch
import transformers

from shiq_eval.generate import HFPolicy, SamplingConfig, draw, sample_next


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
    for p, g in zip(prompts, got, strict=True):
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


SHARED = [3, 1, 4, 1, 5, 9, 2, 6]  # leading tokens of every prompt of a batch (a system turn, say)


@pytest.mark.parametrize(
    "prompts, share_prefix",
    [
        ([[1, 2, 3], [5], [7, 8, 9, 10, 11], [4, 4], [6, 2]], True),  # nothing shared
        # shared leading tokens, rows of other lengths, a row that is only its batch's shared tokens + 1
        ([SHARED + [1, 2], SHARED + [7], SHARED + [8, 8, 8, 2], SHARED[:5] + [9], SHARED[:5] + [1, 1]], True),
        ([SHARED + [1, 2], SHARED + [7], SHARED + [8, 8, 8, 2], SHARED[:5] + [9], SHARED[:5] + [1, 1]], False),
        # repeated prompts (several completions of one prompt): a batch of two distinct prompts, one of one
        ([SHARED + [1, 2], SHARED + [7], SHARED + [1, 2], [5, 5], [5, 5], [5, 5]], True),
    ],
)
def test_sampling_equals_a_loop_without_cache_or_padding(prompts, share_prefix):
    """Sampled completions, batched and left-padded through the KV cache, equal a loop that reruns each
    row's whole unpadded sequence and draws the batch's tokens with ``sample_next`` under the seed of the
    batch (the seeding ``generate_in_batches`` promises): the cache, padding and positions change no draw,
    nor does reading the batch's shared leading tokens and its repeated prompts once (``share_prefix``)."""
    model, eos = tiny_lm(2), 39
    cfg = SamplingConfig(max_new_tokens=7, temperature=0.9, top_p=0.95, batch_size=3, seed=5)
    got = HFPolicy(model, eos_id=eos, pad_id=0, share_prefix=share_prefix).generate(prompts, cfg)
    want = []
    with torch.no_grad():
        for i, start in enumerate(range(0, len(prompts), cfg.batch_size)):
            rows = [list(p) for p in prompts[start : start + cfg.batch_size]]
            out, done = [[] for _ in rows], [False] * len(rows)
            g = torch.Generator().manual_seed(cfg.seed + i)
            for _ in range(cfg.max_new_tokens):
                logits = torch.stack([model(torch.tensor([r])).logits[0, -1] for r in rows])
                for j, t in enumerate(sample_next(logits, cfg, g).tolist()):
                    if not done[j]:
                        out[j].append(t)
                        rows[j].append(t)
                        done[j] = t == eos
                    else:
                        rows[j].append(0)
                if all(done):
                    break
            want.extend(out)
    assert got == want
    assert len(set(map(tuple, got))) == len(prompts)  # distinct draws: a test of more than one row


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "qwen2"])
def test_a_model_with_a_sliding_window_samples_as_its_own_unpadded_passes(arch):
    """A model whose attention sees a sliding window of the keys (Mistral v0.1, Gemma 2, Qwen with
    use_sliding_window) read the batch's shared leading tokens once, laid out ``[shared | padding | own]``; its
    window is counted in cache positions, padding included, so a shorter row's prompt, and every token drawn after
    it, saw other keys than the model does: its greedy completions were not the model's. They are now those of
    its own plain forward passes, row by row without cache or padding."""
    shape = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    shape.update(num_key_value_heads=2, max_position_embeddings=64, sliding_window=5)
    torch.manual_seed(3)
    if arch == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**shape))
    elif arch == "gemma2":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**shape, head_dim=8))
    else:
        config = transformers.Qwen2Config(**shape, use_sliding_window=True, max_window_layers=0)
        model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():  # sharper distributions: a window that moves changes the greedy token
        for param in model.parameters():
            param.mul_(3.0 if param.dim() > 1 else 1.0)
    model.eval()
    prompts = [SHARED + [1, 2], SHARED[:3] + [7], SHARED + [8, 8, 8, 2], SHARED[:3] + [7]]
    got = HFPolicy(model, eos_id=39, pad_id=0).generate(prompts, SamplingConfig(max_new_tokens=6, temperature=0))
    assert got == [greedy_reference(model, p, 6, 39) for p in prompts]


def test_shared_prefix_reads_the_prompts_as_one_pass_does():
    """``_read_prompts`` with the shared leading tokens read once: the last position's logits equal one plain
    pass over the left-padded batch, and so does every cached key and value of each row's real tokens."""
    model = tiny_lm(3)
    batch = [SHARED + [1, 2], SHARED + [7], SHARED[:6] + [8, 8, 8, 2]]
    with torch.no_grad():
        cache, logits, attn, pos = HFPolicy(model, eos_id=39, pad_id=0)._read_prompts(batch)
        plain, plain_logits, plain_attn, _ = HFPolicy(model, eos_id=39, pad_id=0, share_prefix=False)._read_prompts(
            batch
        )
    torch.testing.assert_close(logits, plain_logits, rtol=1e-5, atol=1e-5)
    assert attn.shape[1] == 6 + 4 and int(attn.sum()) == sum(map(len, batch))  # 6 shared, then up to 4 each
    for j, p in enumerate(batch):
        assert pos[j, attn[j, 6:].bool()].tolist() == list(range(6, len(p)))  # the positions of its own tokens
        for layer, ref in zip(cache.layers, plain.layers, strict=True):
            torch.testing.assert_close(
                layer.keys[j][:, attn[j].bool()], ref.keys[j][:, plain_attn[j].bool()], rtol=1e-5, atol=1e-5
            )
            torch.testing.assert_close(
                layer.values[j][:, attn[j].bool()], ref.values[j][:, plain_attn[j].bool()], rtol=1e-5, atol=1e-5
            )


@pytest.mark.parametrize(
    "batch, passes",
    [
        # 2 distinct prompts: their shared tokens as a batch of one, then the 2 prompts' own tokens
        ([SHARED + [1, 2], SHARED[:6] + [8, 8, 8, 2], SHARED + [1, 2], SHARED + [1, 2]], [1, 2]),
        ([[4, 5, 6]] * 3, [1]),  # one prompt, 3 completions: one pass over one row
    ],
)
def test_repeated_prompts_are_read_once_as_one_pass_reads_them(batch, passes):
    """A prompt repeated in a batch is run once (the model sees each distinct prompt once) and its logits, keys
    and values, mask and positions reach every row that repeats it: what one plain pass over the whole batch
    gives for every row's real tokens."""
    model = tiny_lm(3)
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        cache, logits, attn, pos = HFPolicy(model, eos_id=39, pad_id=0)._read_prompts(batch)
        hook.remove()
        plain, plain_logits, plain_attn, plain_pos = HFPolicy(
            model, eos_id=39, pad_id=0, share_prefix=False
        )._read_prompts(batch)
    assert seen == passes  # the rows of each forward pass
    assert logits.shape[0] == attn.shape[0] == pos.shape[0] == len(batch)
    torch.testing.assert_close(logits, plain_logits, rtol=1e-5, atol=1e-5)
    for j, p in enumerate(batch):
        real, plain_real = attn[j].bool(), plain_attn[j].bool()
        assert int(real.sum()) == len(p)
        assert pos[j, -1].item() == plain_pos[j, -1].item() == len(p) - 1
        for layer, ref in zip(cache.layers, plain.layers, strict=True):
            torch.testing.assert_close(layer.keys[j][:, real], ref.keys[j][:, plain_real], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer.values[j][:, real], ref.values[j][:, plain_real], rtol=1e-5, atol=1e-5)


def test_draw_follows_the_probabilities_and_never_draws_an_impossible_index():
    """``draw`` against the given probabilities (zeros at both ends and inside): frequencies within 4.5
    standard errors over 200,000 draws, and no index of probability 0 ever drawn."""
    p = torch.tensor([0.0, 0.1, 0.0, 0.25, 0.6, 0.05, 0.0])
    n = 200_000
    got = draw(p.expand(n, -1), torch.Generator().manual_seed(0))
    freq = torch.bincount(got, minlength=len(p)).double() / n
    se = (p.double() * (1 - p.double()) / n).sqrt()
    assert bool((freq[p == 0] == 0).all())
    assert bool(((freq - p).abs() <= 4.5 * se + 1e-12).all())


def test_draw_refuses_bad_rows_and_never_returns_an_impossible_index_at_the_edge(monkeypatch):
    """A uniform number at the very top (``u · total`` rounding up to ``total``) still picks the last index of
    positive probability, not a trailing impossible one; NaN or all-zero rows are refused."""
    p = torch.tensor([[0.2, 0.5, 0.3, 0.0, 0.0]])
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(1, 1, dtype=torch.float64))
    assert draw(p, None).tolist() == [2]
    monkeypatch.undo()
    for bad in ([[float("nan"), 1.0]], [[0.0, 0.0]]):
        with pytest.raises(ValueError, match="NaN, infinite or all zero"):
            draw(torch.tensor(bad), torch.Generator())


def test_an_empty_prompt_is_refused_before_any_batch_is_sampled():
    """An empty prompt was found when its batch was reached, after the batches before it had been sampled."""
    from shiq_eval.generate import generate_in_batches

    sampled = []

    def batch(prompts, first, seed):
        sampled.append(first)
        return [[5] for _ in prompts]

    with pytest.raises(ValueError, match="^prompt 3 is empty$"):
        generate_in_batches([[1], [2], [3], []], SamplingConfig(batch_size=1), False, 9, batch)
    assert sampled == []
    assert generate_in_batches([[1], [2]], SamplingConfig(batch_size=1), False, 9, batch) == [[5], [5]]


def test_bad_sampling_config():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    # NaN, infinity and a temperature whose logits / T overflow were taken (a NaN draw, or one unclear error later)
    for t in (float("nan"), float("inf"), 1e-40, -1.0):
        with pytest.raises(ValueError, match="temperature must be 0 \\(greedy\\) or a finite number >= 1e-30"):
            SamplingConfig(temperature=t)
    assert SamplingConfig(temperature=0).temperature == 0 and SamplingConfig(temperature=1e-30).temperature == 1e-30


def test_the_position_limit_is_the_smallest_known_one():
    """The one rule both the command's early check and every sampler use: the smallest integer limit counts;
    unknown limits (None, a string, a boolean from an edited config.json) do not, and with none known nothing is
    refused; the first prompt past the limit is named."""
    from shiq_eval.generate import overlong_prompt

    prompts = [[1] * 10, [1] * 13, [1] * 20]
    assert overlong_prompt(prompts, 4, [64, None, "16", True]) is None  # 20 + 4 <= 64: True is not a limit of 1
    assert overlong_prompt(prompts, 4, [64, 16, 20]) == (1, 16)  # 13 + 4 > 16, the first past the smallest
    assert overlong_prompt(prompts, 0, [16]) == (2, 16)  # 20 > 16
    assert overlong_prompt(prompts, 4, [None, False]) is None


def test_a_prompt_that_would_run_past_the_models_positions_is_refused():
    """A prompt whose tokens plus max_new_tokens pass max_position_embeddings was sampled at positions the
    model never learnt, without a word (the megatron engine refused it already)."""
    policy = HFPolicy(tiny_lm(), eos_id=39, pad_id=0)
    fits = [[1] * 56, [2, 3]]  # 56 + 8 = 64: the last position the model has
    assert [len(c) <= 8 for c in policy.generate(fits, SamplingConfig(max_new_tokens=8))] == [True, True]
    with pytest.raises(
        ValueError,
        match="prompt 1 of the 2 sampled .*: 57 tokens \\+ max_new_tokens 8 exceed the model's max_position_",
    ):
        policy.generate([[2, 3], [1] * 57], SamplingConfig(max_new_tokens=8))
