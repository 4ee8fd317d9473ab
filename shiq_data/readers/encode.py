"""Row fields from text, shared by every reader, with errors naming the input file, line (or row) and field.

- :func:`encode_messages` — a conversation through the tokenizer's chat template
  (:func:`shiq_data.chat.encode_chat`): ``tokens``, ``action_mask``, ``rewards``, ``prompt_len``.
- :func:`encode_record` — a ``{"prompt", "completion", "reward"}`` record: string prompt and completion
  are tokenised on their own (prompt ids + completion ids + eos); a completion of chat messages goes
  through :func:`encode_messages`. The reward sits on the last action token (SHIQ_MATH §1).
- :func:`input_row` — a buffer row of the chat formats, named by file, line and tag and carrying its
  input location (:data:`shiq_data.schema.INPUT_KEY`).
- :func:`text_columns`, :func:`conversation_columns`, :func:`extra_text` — the text columns a reader
  keeps (:mod:`shiq_data.schema`); :func:`decode_text` reads a prompt or completion back
  (:func:`shiq_data.readers.generic.encode_kept` tokenises a row's kept text again, ``shiq-data retokenize``,
  exactly as its reader did, after the generic reader's check of the record).
"""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from shiq_data.chat import ChatTemplateError, MessageError, check_messages, control_texts, encode_chat, prompt_ids
from shiq_data.io import RowError, type_name
from shiq_data.schema import INPUT_KEY, fits_float32, input_location, is_finite_number

MESSAGES = "a list of chat messages"
NO_TEMPLATE = "{what} needs a tokenizer with a chat template (e.g. --tokenizer smollm2); this tokenizer has none"


def row_error(path, line, field, problem, row_label: str = "line") -> RowError:
    return RowError(path, line, field, problem, row_label=row_label)


def text_option(name: str, value) -> None:
    """Raise ``ValueError`` naming ``--option name`` unless ``value`` is None or a string (the command line reads an
    option's value as JSON when it can: ``source=2024`` gives a number, ``score_field=[1]`` a list)."""
    if value is not None and not isinstance(value, str):
        raise ValueError(f"--option {name}: expected text, got {type_name(value)} {value!r:.40}")


def finite_number(value, path, line, field) -> float:
    """``value`` as a float, or a :class:`RowError` unless it is a finite number (not a bool)."""
    if not isinstance(value, (int, float)) or not is_finite_number(value):
        raise row_error(path, line, field, f"expected a finite number, got {repr(value)[:40]}")
    if not fits_float32(value):  # (named here: the buffer's own check names the row's reward column only)
        raise row_error(path, line, field, f"{float(value):.4g} does not fit in float32, which rewards are stored as")
    return float(value)


def string_field(obj, key, path, line) -> str:
    """``obj[key]``, or a :class:`RowError` if it is missing or not a string."""
    if key not in obj:
        raise row_error(path, line, key, "missing")
    if not isinstance(obj[key], str):
        raise row_error(path, line, key, f"expected a string, got {type_name(obj[key])}")
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
    context_field: str | None = None,
    row_label: str = "line",
    **kwargs,
) -> dict:
    """:func:`encode_chat` with its errors re-raised naming the file, line (or ``row_label``) and field;
    malformed messages (a buffer's text column written by hand) and empty action turns are refused first, named
    by ``field_of(message index)`` (default ``field``). A chat template that fails on the first ``context``
    messages alone is named as ``context_field`` (the prompt's), when given. A tokenizer without a chat template
    is refused as for a generic record's chat completion (not with transformers' paragraph and link)."""
    if not getattr(tokenizer, "chat_template", None):
        raise row_error(path, line, field, NO_TEMPLATE.format(what="a conversation"), row_label)
    try:
        check_messages(messages)
    except MessageError as e:
        raise row_error(path, line, field, str(e), row_label) from None
    _check_actions_not_empty(
        messages, actions, path, line, field_of or (lambda i: field), context=context, row_label=row_label
    )
    try:
        return encode_chat(tokenizer, messages, actions=actions, context=context, **kwargs)
    except ChatTemplateError as e:
        if context_field is not None and e.message is None and _fails_alone(tokenizer, messages[:context]):
            raise row_error(path, line, context_field, str(e), row_label) from None  # the prompt's fault
        if field_of is None or e.message is None:
            raise row_error(path, line, field, str(e), row_label) from None
        raise row_error(path, line, field_of(e.message), e.detail, row_label) from None  # the message at fault
    except ValueError as e:
        raise row_error(path, line, field, str(e), row_label) from None


def _fails_alone(tokenizer, context: Sequence[dict]) -> bool:
    """Whether the chat template fails on the context messages alone (then the fault is the prompt's)."""
    try:
        prompt_ids(tokenizer, context)
    except ChatTemplateError:
        return True
    return False


def is_chat(record: dict) -> bool:
    """True if the record's completion is a list of chat messages (encoded with the chat template)."""
    return isinstance(record.get("completion"), list)


def _encode_chat_record(record: dict, tokenizer, *, file: str, row: int, row_label: str) -> dict:
    if not getattr(tokenizer, "chat_template", None):
        raise RowError(
            file,
            row,
            "completion",
            NO_TEMPLATE.format(what=MESSAGES),
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
        context_field="prompt",
        row_label=row_label,
        field_of=lambda i: (
            f"completion[{i - k}].content"
            if i >= k
            else ("prompt" if isinstance(prompt, str) else f"prompt[{i}].content")
        ),
        **_chat_rewards(record),
    )


def _chat_rewards(record: dict) -> dict:
    """The reward keyword of :func:`encode_chat` for a record: its ``turn_rewards`` (one per assistant turn of
    the completion), else its ``reward`` on the last one, else none."""
    if record.get("turn_rewards") is not None:
        return {"turn_rewards": list(record["turn_rewards"])}
    if record.get("reward") is not None:
        return {"completion_reward": float(record["reward"])}
    return {}


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
    chat template: its assistant turns are the actions (the prompt's are context), each carrying its
    entry of ``turn_rewards`` when the record has them, else the last one ``reward``.
    """
    if is_chat(record):
        return _encode_chat_record(record, tokenizer, file=file, row=row, row_label=row_label)
    for field in ("prompt", "completion"):  # as chat rows: text that would become a control token is refused
        found = [t for t in _control_texts(tokenizer) if t in record[field]]
        if found:
            raise row_error(
                file,
                row,
                field,
                f"contains {found[0]!r}, the text of one of this tokenizer's control tokens; it would be read as that "
                "token, not as text: remove it from the data",
                row_label,
            )
    if ids is None:
        ids = tuple(tokenizer([record["prompt"], record["completion"]], add_special_tokens=False)["input_ids"])
    return _encode_text(ids[0], ids[1], record["reward"], eos=eos, file=file, row=row, row_label=row_label)


_CONTROL_TEXTS: dict[int, tuple[object, list[str]]] = {}


def _control_texts(tokenizer) -> list[str]:
    """:func:`shiq_data.chat.control_texts` of ``tokenizer``, computed once per tokenizer object."""
    kept = _CONTROL_TEXTS.get(id(tokenizer))
    if kept is None or kept[0] is not tokenizer:
        kept = _CONTROL_TEXTS[id(tokenizer)] = (tokenizer, control_texts(tokenizer))
    return kept[1]


def input_row(
    path: Path,
    line: int,
    tag: str,
    source: str,
    group: tuple[int, object],
    encoded: dict,
    reward_field: str,
    text: dict,
) -> dict:
    """A buffer row named ``row_key`` ``<file name>:<line>:<tag>`` with its ``text`` columns
    (:func:`text_columns`), carrying its input location (errors the buffer finds in its ``rewards`` name
    ``reward_field``). ``group``: the group id and the key that makes the group in the whole input
    (:func:`shiq_data.schema.input_location`)."""
    return {
        "row_key": f"{path.name}:{line}:{tag}",
        "source": source,
        "group_id": group[0],
        **encoded,
        **text,
        INPUT_KEY: input_location(path, line, fields={"rewards": reward_field}, group=group[1]),
    }


def text_of(value) -> str:
    """A prompt or completion as a text column keeps it: a message list its JSON text; a string itself, unless
    :func:`decode_text` would read it as something else (a completion that is the JSON text of a message list,
    as a model answering in JSON writes): then its JSON string literal, which reads back as the string."""
    if not isinstance(value, str):
        return json.dumps(list(value), ensure_ascii=False)
    return value if decode_text(value) == value else json.dumps(value, ensure_ascii=False)


def decode_text(text: str):
    """The prompt or completion a text column holds (:func:`text_of`): the message list whose JSON text it is
    (a non-empty list of objects with ``role`` and ``content``); the string a JSON string literal holds when
    that string would itself read as something else (how :func:`text_of` keeps one); else the text itself."""
    if text.startswith("["):
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):  # (not JSON; a number of 4,301 digits; nesting too deep): text
            return text
        if (
            isinstance(value, list)
            and value
            and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in value)
        ):
            return value
    elif text.startswith('"'):
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):  # (not JSON; a number of 4,301 digits; nesting too deep): text
            return text
        if isinstance(value, str) and decode_text(value) != value:
            return value
    return text


def given_text(text: str | None) -> str | None:
    """A text column's value as the input gave it: a message list's JSON text as it is stored, a string kept
    as its JSON string literal (:func:`text_of`) as that string. What curation compares and hashes, so that a
    row written before strings were kept so equals the same row written after."""
    if text is None or not text.startswith('"'):  # only a string literal is kept otherwise: no JSON to parse
        return text
    value = decode_text(text)
    return value if isinstance(value, str) else text


def _json_value(value):
    """A value JSON has no type for, as text: binary data (a Parquet or Arrow binary column) in base64 (its Python
    repr, ``b'...'``, was kept before), a date or time in ISO 8601, anything else (a decimal) as ``str`` gives it."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return str(value)


def extra_text(record: dict, consumed: Iterable[str]) -> str | None:
    """The ``extra`` column: the JSON object text of ``record``'s fields other than ``consumed``, or None (values
    JSON has no type for as :func:`_json_value` writes them)."""
    consumed = set(consumed)
    rest = {k: v for k, v in record.items() if k not in consumed}
    return json.dumps(rest, ensure_ascii=False, default=_json_value) if rest else None


def text_columns(prompt, completion, *, reward=None, turn_rewards=None, extra: str | None = None) -> dict:
    """The five text columns of a row (:mod:`shiq_data.schema`): prompt and completion as :func:`text_of`
    keeps them, the scalar ``reward`` or the per-turn ``turn_rewards`` as given, ``extra`` JSON text."""
    return {
        "prompt": text_of(prompt),
        "completion": text_of(completion),
        "reward": None if reward is None else float(reward),
        "turn_rewards": None if turn_rewards is None else [None if r is None else float(r) for r in turn_rewards],
        "extra": extra,
    }


def first_action_turn(messages: Sequence[dict], actions: str = "all", context: int = 0) -> int:
    """Index of the first assistant message that is an action (``actions`` and ``context`` as in
    :func:`shiq_data.chat.encode_chat`); ``len(messages)`` when there is none."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= context]
    return (turns[-1] if actions == "last" else turns[0]) if turns else len(messages)


def conversation_columns(messages: Sequence[dict], *, actions: str = "all", **kwargs) -> dict:
    """Text columns of a conversation: the messages before its first action turn in ``prompt`` and the rest
    in ``completion`` (whose assistant turns are then exactly the actions); ``kwargs`` as :func:`text_columns`."""
    k = first_action_turn(messages, actions)
    return text_columns(list(messages[:k]), list(messages[k:]), **kwargs)
