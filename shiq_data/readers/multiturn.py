"""Multi-turn conversations: ``{"messages": [{"role", "content", ("reward")}...], ("reward"), ("group")}``.

Assistant messages are actions and carry their turn reward on their end-of-turn token; user, tool
and system turns are environment tokens. A top-level ``reward`` is a single completion reward.

Text columns: ``prompt`` holds the messages before the first assistant turn as JSON, ``completion``
the rest (the messages as given, their ``reward`` fields included), ``reward`` the top-level reward,
``turn_rewards`` the assistant turns' rewards (null for a turn without one) when any turn has one,
``extra`` the line's fields other than ``messages``, ``reward`` and ``group``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from shiq_data.chat import check_messages
from shiq_data.io import iter_jsonl, type_name
from shiq_data.readers.encode import (
    conversation_columns,
    encode_messages,
    extra_text,
    finite_number,
    input_row,
    row_error,
    text_option,
)
from shiq_data.schema import GroupIds


def read_multiturn(
    path, tokenizer, *, source: str | None = None, records: Iterable[tuple[int, dict]] | None = None
) -> Iterator[dict]:
    """Rows of a multi-turn JSONL file ``{"messages": [...], ("reward"), ("group")}``.

    Assistant messages may carry ``"reward"`` (their turn reward); a top-level ``"reward"`` is one
    completion reward instead (not both). Rows with equal ``"group"`` values share a group id; without
    it every row is its own group. ``records``: the file's ``(line, record)`` pairs when read already (a
    parallel build gives each worker a chunk of them).
    """
    text_option("source", source)
    path = Path(path)
    source = source or f"multiturn:{path.name}"
    group_id = GroupIds()  # group -> consecutive group id
    for line, obj in iter_jsonl(path) if records is None else records:
        messages = obj.get("messages")
        if messages is None:
            raise row_error(path, line, "messages", "missing")
        try:
            check_messages(messages, "messages")
        except ValueError as e:
            raise row_error(path, line, "messages", str(e)) from None
        turn_rewards, has_turn_reward = [], False
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                r = m.get("reward")
                has_turn_reward |= r is not None
                turn_rewards.append(None if r is None else finite_number(r, path, line, f"messages[{i}].reward"))
            elif m.get("reward") is not None:
                raise row_error(
                    path,
                    line,
                    f"messages[{i}].reward",
                    f"only assistant turns can carry a reward, this is a {m['role']!r} turn",
                )
        kwargs = {}
        if obj.get("reward") is not None:
            if has_turn_reward:
                raise row_error(path, line, "reward", "give either a top-level reward or per-turn rewards, not both")
            kwargs["completion_reward"] = finite_number(obj["reward"], path, line, "reward")
        elif has_turn_reward:
            kwargs["turn_rewards"] = turn_rewards
        key = obj.get("group")
        if key is None:
            key = ("line", line)
        elif not isinstance(key, (str, int)) or isinstance(key, bool):
            raise row_error(path, line, "group", f"expected a string or an integer, got {type_name(key)}")
        group = group_id(key)
        encoded = encode_messages(
            tokenizer, messages, path, line, "messages", field_of=lambda i: f"messages[{i}].content", **kwargs
        )
        reward_field = "reward" if "completion_reward" in kwargs else "messages"
        text = conversation_columns(
            messages,
            reward=kwargs.get("completion_reward"),
            turn_rewards=kwargs.get("turn_rewards"),
            extra=extra_text(obj, ("messages", "reward", "group")),
        )
        yield input_row(path, line, "0", source, (group, key), encoded, reward_field, text)
