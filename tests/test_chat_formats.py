"""Chat-template tokenisation with the real SmolLM2 tokenizer, and the public-format readers."""

import pytest

from shiq_data.chat import ChatTemplateError, encode_chat

SYSTEM_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from shiq_eval.assets import AssetMissing, smollm2_gguf

    try:
        path = smollm2_gguf()
    except AssetMissing as e:
        pytest.skip(str(e))
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def spans_of(mask):
    """Maximal runs of True as half-open (start, end) pairs (a plain loop, independent of the code)."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        if not m and start is not None:
            out.append((start, i))
            start = None
    return out


MULTI = [
    {"role": "system", "content": "You call tools."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "add(2, 3)"},
    {"role": "tool", "content": "5"},
    {"role": "assistant", "content": "It is 5."},
    {"role": "user", "content": "And 2*3?"},
    {"role": "assistant", "content": "Six, since 2 × 3 = 6 — done!"},
]


def test_action_spans_decode_to_assistant_text(tok):
    row = encode_chat(tok, MULTI, turn_rewards=[0.5, None, -1.0])
    tokens, mask = row["tokens"], row["action_mask"]
    assert len(tokens) == len(mask) == len(row["rewards"])
    spans = spans_of(mask)
    assistant = [m["content"] for m in MULTI if m["role"] == "assistant"]
    assert [tok.decode(tokens[a:b]) for a, b in spans] == [c + "<|im_end|>" for c in assistant]
    assert row["prompt_len"] == spans[0][0]
    # Environment tokens are exactly the template's other parts (written out by hand).
    env = "".join(tok.decode([t]) for t, m in zip(tokens, mask) if not m)
    assert env == (
        "<|im_start|>system\nYou call tools.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
        "<|im_start|>assistant\n\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n\n"
        "<|im_start|>user\nAnd 2*3?<|im_end|>\n<|im_start|>assistant\n\n"
    )
    # Rewards sit on each turn's end-of-turn token only.
    expected = [0.0] * len(tokens)
    expected[spans[0][1] - 1], expected[spans[2][1] - 1] = 0.5, -1.0
    assert row["rewards"] == expected
    assert all(tokens[b - 1] == tok.convert_tokens_to_ids("<|im_end|>") for _, b in spans)


def test_default_system_prompt_is_environment_and_completion_reward(tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    row = encode_chat(tok, msgs, completion_reward=2.0)
    spans = spans_of(row["action_mask"])
    assert len(spans) == 1 and spans[0][1] == len(row["tokens"]) - 1  # the trailing "\n" is the template's
    assert tok.decode(row["tokens"][: row["prompt_len"]]) == (
        f"<|im_start|>system\n{SYSTEM_DEFAULT}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert row["rewards"][spans[0][1] - 1] == 2.0 and sum(row["rewards"]) == 2.0


def test_last_only_makes_earlier_assistant_turns_context(tok):
    row = encode_chat(tok, MULTI, completion_reward=1.0, actions="last")
    spans = spans_of(row["action_mask"])
    assert len(spans) == 1 and tok.decode(row["tokens"][slice(*spans[0])]) == MULTI[-1]["content"] + "<|im_end|>"


def test_bad_inputs(tok):
    with pytest.raises(ValueError, match=r"messages\[1\].role"):
        encode_chat(tok, [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}])
    with pytest.raises(ValueError, match="no assistant turn"):
        encode_chat(tok, [{"role": "user", "content": "a"}])
    with pytest.raises(ValueError, match="turn_rewards has 1 entries"):
        encode_chat(tok, MULTI, turn_rewards=[1.0])
    with pytest.raises(ChatTemplateError, match="end-of-turn"):
        encode_chat(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x<|im_end|>y"}])


def test_template_that_is_not_prefix_stable_is_refused(tok):
    # Marks the last message specially, so earlier renderings are not prefixes of the full one.
    unstable = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
        "{% if loop.last %}{{ '!' }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    saved = tok.chat_template
    tok.chat_template = unstable
    try:
        with pytest.raises(ChatTemplateError, match="not prefix-stable"):
            encode_chat(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    finally:
        tok.chat_template = saved
