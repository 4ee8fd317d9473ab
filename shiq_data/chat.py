"""Tokenising conversations with a tokenizer's chat template into token-aligned rows.

The action tokens of a row are exactly the tokens the template lets the model generate in an
assistant turn: the assistant's content and its end-of-turn token (``<|im_end|>`` for SmolLM2),
never the ``<|im_start|>assistant\\n`` header the template inserts, nor any separator the template
writes after the end-of-turn token. Everything else (system, user and tool turns, headers) is
environment (``action_mask`` False).

The masks are found by rendering prefixes of the conversation: for assistant turn ``i``,
``render(messages[:i], add_generation_prompt=True)`` is what the model is shown before it
generates, and ``render(messages[:i + 1])`` contains what it generated. Both must be token-prefixes
of the full rendering; a template for which that fails (one that rewrites earlier turns depending
on later ones) raises :class:`ChatTemplateError` rather than producing wrong masks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from shiq_data.io import type_name

ROLES = ("system", "user", "assistant", "tool")


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered into prefix-stable, correctly delimited turns. ``message``: the
    index of the message at fault, when one is (its text is then ``detail``)."""

    def __init__(self, text: str, message: int | None = None, detail: str | None = None):
        super().__init__(text)
        self.message, self.detail = message, detail


def _render_ids(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> list[int]:
    from jinja2.exceptions import TemplateError  # transformers' template engine

    # Render to text, then tokenise without extra specials: the template writes its own.
    try:
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as e:  # the template refused these messages (raise_exception) or failed on them
        raise ChatTemplateError(f"chat template: {e}") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def user_prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a one-turn chat prompt: the template's default system turn (if any), ``text`` as the user
    turn, and the assistant header that a completion follows."""
    return prompt_ids(tokenizer, [{"role": "user", "content": text}])


def prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of ``messages`` rendered as a prompt: then the assistant header that a completion follows."""
    return _render_ids(tokenizer, messages, add_generation_prompt=True)


def end_of_turn_id(tokenizer) -> int:
    """Id of the token that ends an assistant turn (the tokenizer's EOS, ``<|im_end|>`` for SmolLM2)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ChatTemplateError("the tokenizer has no eos_token; cannot tell where an assistant turn ends")
    return int(eos)


class MessageError(ValueError):
    """A malformed message list: ``field`` names the part (``messages[1].role``), ``problem`` what is wrong."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{field}: {problem}")


def check_messages(messages: Sequence[dict], where: str = "messages") -> None:
    """Raise :class:`MessageError` (a ``ValueError``) naming ``where`` and the message index if a message is
    malformed."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise MessageError(where, f"expected a non-empty list of messages, got {type_name(messages)}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise MessageError(f"{where}[{i}]", f"expected an object with 'role' and 'content', got {type_name(m)}")
        if "role" not in m:  # (it read "got None", as for a role of null)
            raise MessageError(f"{where}[{i}].role", f"missing (one of {ROLES})")
        if m["role"] not in ROLES:
            raise MessageError(f"{where}[{i}].role", f"expected one of {ROLES}, got {m['role']!r}")
        if "content" not in m:
            raise MessageError(f"{where}[{i}].content", "missing")
        if not isinstance(m["content"], str):
            raise MessageError(f"{where}[{i}].content", f"expected a string, got {type_name(m['content'])}")


def control_texts(tokenizer) -> list[str]:
    """The text of every special token of ``tokenizer`` (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``, ...),
    and of every added token its chat template writes (Qwen's ``<tool_call>``, not special; or those its
    ``chat_control_tokens`` lists), as transformers counts control tokens: the strings a rendered conversation
    would turn into control tokens."""
    texts = set(tokenizer.all_special_tokens)
    chosen = getattr(tokenizer, "chat_control_tokens", None)
    template = getattr(tokenizer, "chat_template", None) or ""
    template = template if isinstance(template, str) else "".join(template.values())
    for t in getattr(tokenizer, "added_tokens_decoder", {}).values():
        written = t.content in chosen if chosen is not None else t.content in template and not t.content.isspace()
        if t.special or written:
            texts.add(t.content)
    return sorted(t for t in texts if t)


def _refuse_control_text(tokenizer, messages: Sequence[dict]) -> None:
    """Raise :class:`ChatTemplateError` if a message's text spells a special token. Rendered and tokenised,
    it would become that control token: a user turn could open a fake assistant turn, or mark its own text
    as actions. Such rows are refused rather than silently re-encoded."""
    texts = control_texts(tokenizer)
    eot_text = tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer))
    whole = []  # the whole conversation rendered, once, when a field other than a content needs it
    for i, m in enumerate(messages):
        for key, where, text in _message_texts(m):  # the content first, then any other field a template may render
            found = [t for t in texts if t in text]
            if not found or (key != "content" and not _renders_field(tokenizer, messages, i, key, whole)):
                continue
            what = (
                "this tokenizer's end-of-turn token (the turn would end early)"
                if found[0] == eot_text
                else "one of this tokenizer's control tokens"
            )
            detail = (
                f"contains {found[0]!r}, the text of {what}; it would be read as that control token, not as text: "
                "remove it from the data"
            )
            text = f"messages[{i}].{where} {detail}"
            if where != "content":  # (a reader names the message's content: say which field holds it)
                detail = f"the message's field {where!r} {detail}"
            raise ChatTemplateError(text, message=i, detail=detail)


def _renders_field(tokenizer, messages: Sequence[dict], i: int, key: str, whole: list) -> bool:
    """Whether the chat template renders the field ``key`` of message ``i``: the conversation renders otherwise
    without it (SmolLM2's renders no ``tool_calls``). ``whole`` keeps the whole conversation's rendering between
    calls (empty until it is first needed)."""
    without = [*messages[:i], {k: v for k, v in messages[i].items() if k != key}, *messages[i + 1 :]]
    try:
        if not whole:
            whole.append(tokenizer.apply_chat_template(list(messages), tokenize=False))
        return tokenizer.apply_chat_template(list(without), tokenize=False) != whole[0]
    except Exception:  # the template needs the field (or fails on it): it is read
        return True


def _message_texts(message: dict):
    """``(key, path, text)`` of every string in ``message`` but its role (checked apart): its content, then
    the other fields a chat template may render (``name``, a tool call's name and arguments), keys included;
    ``key`` is the message's field it lies in, ``path`` names it (``tool_calls[0].function.arguments``)."""
    yield "content", "content", message["content"]
    for key, value in message.items():
        stack = [] if key in ("role", "content") else [(key, value)]
        while stack:
            where, value = stack.pop(0)
            if isinstance(value, str):
                yield key, where, value
            elif isinstance(value, dict):
                for k, v in value.items():
                    if isinstance(k, str):
                        yield key, f"{where} (a key)", k
                    stack.append((f"{where}.{k}", v))
            elif isinstance(value, (list, tuple)):
                stack.extend((f"{where}[{j}]", v) for j, v in enumerate(value))


SYSTEM_PROMPT_SETTINGS = ("template", "off")


def template_system_prompt(tokenizer) -> str | None:
    """The system text the chat template writes when a conversation has no system turn (SmolLM2's:
    ``"You are a helpful AI assistant named SmolLM, trained by Hugging Face"``), ``None`` if it writes none.

    Found by rendering one user turn with and without a system turn of a marker text: what the rendering
    without one holds where the marker sits is the default text, checked by rendering it back. (Comparing
    with an empty system turn took a template that shows its default for an empty one to write ``""``.)
    """
    from jinja2.exceptions import TemplateError  # transformers' template engine

    if not getattr(tokenizer, "chat_template", None):
        return None
    user = [{"role": "user", "content": "x"}]
    mark = "shiq system prompt marker"
    try:
        bare = tokenizer.apply_chat_template(user, tokenize=False)
        marked = tokenizer.apply_chat_template([{"role": "system", "content": mark}, *user], tokenize=False)
    except TemplateError:  # a template that refuses a system turn (Gemma's raise_exception) writes none
        return None
    at = marked.find(mark)
    if at < 0:  # the template does not show a system turn's text: "" as before when it drops one altogether
        return "" if marked == bare else None
    before, after = marked[:at], marked[at + len(mark) :]
    if len(bare) < len(before) + len(after) or not (bare.startswith(before) and bare.endswith(after)):
        return None  # no system turn without one in the data
    text = bare[len(before) : len(bare) - len(after)]
    if tokenizer.apply_chat_template([{"role": "system", "content": text}, *user], tokenize=False) == bare:
        return text
    return None


def set_system_prompt(tokenizer, setting: str) -> str | None:
    """Choose the system turn that conversations without one get, by wrapping ``tokenizer.chat_template``.

    ``setting`` is ``"template"`` (keep the template's default text, if it has one), ``"off"`` (an empty
    system turn, so no default text is shown; a template that writes none is left alone) or any other
    string (that text). Conversations that start with a system turn are never changed. Returns the system
    text conversations without one are now rendered with (``None``: no system turn), which the buffer's
    manifest records.
    """
    default = template_system_prompt(tokenizer)
    if setting == "template" or (setting == "off" and default is None):
        return default
    text = "" if setting == "off" else setting
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(f"system prompt {setting!r}: this tokenizer has no chat template to put it in")
    found = [t for t in control_texts(tokenizer) if t in text]
    if found:
        raise ChatTemplateError(f"system prompt {setting!r} contains {found[0]!r}, the text of a control token")
    # A Jinja string literal is read with Python's unicode-escape rules, which JSON's escapes satisfy.
    literal = json.dumps(text, ensure_ascii=False)
    tokenizer.chat_template = (
        "{%- if messages and messages[0]['role'] != 'system' %}"
        f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}"
        "{%- endif %}" + tokenizer.chat_template
    )
    got = template_system_prompt(tokenizer)
    if got is None:
        raise ChatTemplateError(f"system prompt {setting!r}: the chat template shows no system turn (it refuses one)")
    if got != text:
        raise ChatTemplateError(f"system prompt {setting!r}: the chat template renders {got!r} instead")
    return text


def assistant_spans(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[tuple[int, int]]]:
    """Full token ids and, per assistant message, the half-open span ``[start, end)`` of its action tokens.

    Returns ``(ids [T], spans)`` with one ``(start, end)`` per assistant message in order; ``end - 1``
    is the end-of-turn token. Raises :class:`ChatTemplateError` if the template is not prefix-stable
    or an assistant turn does not end with the end-of-turn token.
    """
    check_messages(messages)
    eot = end_of_turn_id(tokenizer)
    eot_text = tokenizer.convert_ids_to_tokens(eot)
    _refuse_control_text(tokenizer, messages)
    full = _render_ids(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise ChatTemplateError(
                "messages[0] is an assistant turn: there is no prompt for the template to render before it"
            )
        before = _render_ids(tokenizer, messages[:i], add_generation_prompt=True)
        # through the last message is the whole conversation, rendered already (one render less per row)
        through = (
            full if i == len(messages) - 1 else _render_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
        )
        for name, ids in (("the generation prompt before", before), ("the rendering through", through)):
            if full[: len(ids)] != ids and ids is before and _white_space_joins(tokenizer, messages, i):
                lead = m["content"][: len(m["content"]) - len(m["content"].lstrip())]
                raise ChatTemplateError(  # the data, not the template: a token would be both prompt and action
                    f"messages[{i}] (assistant) starts with white space ({', '.join(map(repr, lead[:8]))}) that the "
                    "tokenizer joins with the end of the generation prompt into one token, which would be both "
                    "prompt and action: strip the reply's leading white space"
                )
            if full[: len(ids)] != ids:
                raise ChatTemplateError(
                    f"the chat template is not prefix-stable: {name} messages[{i}] is not a token-prefix "
                    "of the whole conversation, so action tokens cannot be located"
                )
        turn = through[len(before) :]
        if eot not in turn:
            raise ChatTemplateError(
                f"messages[{i}] (assistant) does not end with the end-of-turn token {eot_text!r} in this template"
            )
        last = len(turn) - 1 - turn[::-1].index(eot)
        spans.append((len(before), len(before) + last + 1))
    return full, spans


def _white_space_joins(tokenizer, messages: Sequence[dict], i: int) -> bool:
    """Whether the assistant message ``i``'s leading white space, and only it, makes the generation prompt
    before it not a token-prefix of the conversation: the same conversation with that white space stripped is
    prefix-stable there (else the template itself is at fault, whatever the reply starts with)."""
    content = messages[i]["content"]
    if not content[:1].isspace():
        return False
    stripped = [*messages[:i], {**messages[i], "content": content.lstrip()}, *messages[i + 1 :]]
    full = _render_ids(tokenizer, stripped, add_generation_prompt=False)
    before = _render_ids(tokenizer, stripped[:i], add_generation_prompt=True)
    return full[: len(before)] == before


def encode_chat(
    tokenizer,
    messages: Sequence[dict],
    *,
    turn_rewards: Sequence[float | None] | None = None,
    completion_reward: float | None = None,
    actions: str = "all",
    context: int = 0,
) -> dict:
    """Tokenise ``messages`` with the chat template into a row's token-aligned fields.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template and an EOS (end-of-turn) token.
        messages: ``[{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]``.
        turn_rewards: one reward per assistant message that is an action (``None`` counts as 0),
            placed on the last action token (the end-of-turn token) of that turn.
        completion_reward: a single reward placed on the last action token of the last action turn.
            At most one of ``turn_rewards`` and ``completion_reward`` may be given.
        actions: ``"all"`` (every assistant turn is an action) or ``"last"`` (only the final
            assistant turn; earlier ones are context, as in single-turn preference data).
        context: the number of leading messages that are context whatever ``actions`` says: their
            assistant turns are never actions (a prompt given as messages, then its completion).
    Returns:
        ``{"tokens": list[int] [T], "action_mask": list[bool] [T], "rewards": list[float] [T],
        "prompt_len": int}`` where ``prompt_len`` is the index of the first action token.
    """
    if actions not in ("all", "last"):
        raise ValueError(f"actions = {actions!r}: expected 'all' or 'last'")
    if turn_rewards is not None and completion_reward is not None:
        raise ValueError("give either turn_rewards or completion_reward, not both")
    tokens, spans = assistant_spans(tokenizer, messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans = [span for i, span in zip(turns, spans) if i >= context]
    if not spans:
        after = f" after the first {context} (context) messages" if context else ""
        raise ValueError(f"messages: no assistant turn{after}, so the row would have no action tokens")
    if actions == "last":
        spans = spans[-1:]
    mask = [False] * len(tokens)
    rewards = [0.0] * len(tokens)
    for start, end in spans:
        mask[start:end] = [True] * (end - start)
    if turn_rewards is not None:
        if len(turn_rewards) != len(spans):
            raise ValueError(
                f"turn_rewards has {len(turn_rewards)} entr{'y' if len(turn_rewards) == 1 else 'ies'} but there "
                f"{'is 1 action turn' if len(spans) == 1 else f'are {len(spans)} action turns'}"
            )
        for (_, end), r in zip(spans, turn_rewards):
            rewards[end - 1] = float(r or 0.0)
    elif completion_reward is not None:
        rewards[spans[-1][1] - 1] = float(completion_reward)
    return {"tokens": tokens, "action_mask": mask, "rewards": rewards, "prompt_len": spans[0][0]}
