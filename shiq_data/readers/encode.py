"""Row fields from text, shared by every reader, with errors naming the input file, line (or row) and field.

- :func:`encode_messages` — a conversation through the tokenizer's chat template
  (:func:`shiq_data.chat.encode_chat`): ``tokens``, ``action_mask``, ``rewards``, ``prompt_len``.
- :func:`encode_record` — a ``{"prompt", "completion", "reward"}`` record: string prompt and completion
  are tokenised on their own (prompt ids + completion ids + eos); a completion of chat messages goes
  through :func:`encode_messages`. The reward sits on the last action token (SHIQ_MATH §1).
- :func:`input_row` — a buffer row of the chat formats, named by file, line and tag and carrying its
  input location (:data:`shiq_data.schema.INPUT_KEY`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from shiq_data.chat import encode_chat
from shiq_data.io import RowError
from shiq_data.schema import INPUT_KEY, input_location, is_finite_number

MESSAGES = "a list of chat messages"


def row_error(path, line, field, problem, row_label: str = "line") -> RowError:
    return RowError(path, line, field, problem, row_label=row_label)


def finite_number(value, path, line, field) -> float:
    """``value`` as a float, or a :class:`RowError` unless it is a finite number (not a bool)."""
    if not isinstance(value, (int, float)) or not is_finite_number(value):
        raise row_error(path, line, field, f"expected a finite number, got {repr(value)[:40]}")
    return float(value)


def string_field(obj, key, path, line) -> str:
    """``obj[key]``, or a :class:`RowError` if it is missing or not a string."""
    if key not in obj:
        raise row_error(path, line, key, "missing")
    if not isinstance(obj[key], str):
        raise row_error(path, line, key, f"expected a string, got {type(obj[key]).__name__}")
    return obj[key]


def _check_actions_not_empty(
    messages, actions: str, path, line, field_of: Callable[[int], str], *, context: int = 0, row_label: str = "line"
) -> None:
    """Raise naming the field (``field_of(message index)``) if an assistant turn that is an action
    (every one after the first ``context`` messages, or with ``actions="last"`` the final one) has no
    text: only its end-of-turn token would be an action, an empty completion."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= context]
    for i in turns[-1:] if actions == "last" else turns:
        if not messages[i]["content"].strip():
            raise row_error(path, line, field_of(i), "empty completion (the assistant turn has no text)", row_label)


def encode_messages(
    tokenizer,
    messages: Sequence[dict],
    path,
    line,
    field,
    *,
    field_of: Callable[[int], str] | None = None,
    actions: str = "all",
    context: int = 0,
    row_label: str = "line",
    **kwargs,
) -> dict:
    """:func:`encode_chat` with its errors re-raised naming the file, line (or ``row_label``) and field;
    empty action turns are refused first, named by ``field_of(message index)`` (default ``field``)."""
    _check_actions_not_empty(
        messages, actions, path, line, field_of or (lambda i: field), context=context, row_label=row_label
    )
    try:
        return encode_chat(tokenizer, messages, actions=actions, context=context, **kwargs)
    except ValueError as e:
        raise row_error(path, line, field, str(e), row_label) from None


def is_chat(record: dict) -> bool:
    """True if the record's completion is a list of chat messages (encoded with the chat template)."""
    return isinstance(record.get("completion"), list)


def _encode_chat_record(record: dict, tokenizer, *, file: str, row: int, row_label: str) -> dict:
    if not getattr(tokenizer, "chat_template", None):
        raise RowError(
            file,
            row,
            "completion",
            f"{MESSAGES} needs a tokenizer with a chat template (e.g. --tokenizer smollm2); this tokenizer has none",
            row_label=row_label,
        )
    prompt = record["prompt"]
    context = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    k = len(context)
    return encode_messages(
        tokenizer,
        context + list(record["completion"]),
        file,
        row,
        "completion",
        context=k,
        row_label=row_label,
        field_of=lambda i: f"completion[{i - k}].content",
        completion_reward=float(record["reward"]),
    )


def _encode_text(prompt_ids, completion_ids, reward, *, eos, file: str, row: int, row_label: str) -> dict:
    a = list(completion_ids) + ([] if eos is None else [eos])
    if not prompt_ids:
        raise RowError(file, row, "prompt", "tokenises to no token", row_label=row_label)
    if not a:
        raise RowError(file, row, "completion", "tokenises to no token (empty completion)", row_label=row_label)
    rewards = [0.0] * (len(prompt_ids) + len(a))
    rewards[-1] = float(reward)
    return {
        "prompt_len": len(prompt_ids),
        "tokens": list(prompt_ids) + a,
        "action_mask": [False] * len(prompt_ids) + [True] * len(a),
        "rewards": rewards,
    }


def encode_record(
    record: dict,
    tokenizer,
    *,
    file: str,
    row: int,
    row_label: str = "line",
    eos: int | None = None,
    ids: tuple[list[int], list[int]] | None = None,
) -> dict:
    """``tokens``, ``action_mask``, ``rewards`` and ``prompt_len`` of a checked (prompt, completion, reward)
    record; errors name the file, line or row, and field.

    A string completion gives ``prompt ids + completion ids (+ eos unless None)``, the completion (and
    eos) the actions; ``ids`` are the two tokenisations when the caller batched them already. A
    completion of chat messages is rendered after the prompt (one user message, or messages) by the
    chat template: its assistant turns are the actions (the prompt's are context).
    """
    if is_chat(record):
        return _encode_chat_record(record, tokenizer, file=file, row=row, row_label=row_label)
    if ids is None:
        ids = tuple(tokenizer([record["prompt"], record["completion"]], add_special_tokens=False)["input_ids"])
    return _encode_text(ids[0], ids[1], record["reward"], eos=eos, file=file, row=row, row_label=row_label)


def input_row(path: Path, line: int, tag: str, source: str, group_id: int, encoded: dict, reward_field: str) -> dict:
    """A buffer row named ``row_key`` ``<file name>:<line>:<tag>``, carrying its input location (errors the
    buffer finds in its ``rewards`` name ``reward_field``)."""
    return {
        "row_key": f"{path.name}:{line}:{tag}",
        "source": source,
        "group_id": group_id,
        **encoded,
        INPUT_KEY: input_location(path, line, fields={"rewards": reward_field}),
    }
