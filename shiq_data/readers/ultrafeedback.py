"""UltraFeedback: the public file or its binarized form; every scored completion of a prompt is a row of its group.

The public file: ``{"instruction"|"prompt", "completions": [{"response", "overall_score" |
"fine-grained_score" | "ratings" | "annotations"}]}``. The binarized form: ``{"prompt", "chosen":
[messages], "rejected": [messages], "score_chosen", "score_rejected"}``. The score is the reward, on
the completion's last action token.

Text columns: the public file keeps the prompt string in ``prompt`` and ``[{"role": "assistant",
"content": response}]`` as JSON in ``completion``, and in ``extra`` the line's other fields together
with the completion's other fields (``model``, ``annotations``, ...; a completion's field wins over
the line's of the same name). The binarized form keeps the messages before the final assistant turn
in ``prompt`` and the rest in ``completion`` (JSON), and in ``extra`` the line's fields other than
the prompt, ``chosen``, ``rejected``, their scores and ``messages`` (a copy of ``chosen``).
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
    string_field,
    text_columns,
    text_option,
)

SCORE_FIELDS = ("overall_score", "fine-grained_score", "ratings", "annotations")


def completion_score(c: dict, path, line, field: str, score_field: str | None = None) -> float:
    """A completion's score: ``score_field`` if given, else the first of :data:`SCORE_FIELDS` present.

    ``ratings`` is a list of numbers (or an aspect -> number object) and ``annotations`` the public
    file's aspect -> ``{"Rating": "4", ...}`` object; both give the mean of their numeric ratings
    (``"N/A"`` ignored).
    """
    key = score_field or next((k for k in SCORE_FIELDS if c.get(k) is not None), None)
    if key is None or c.get(key) is None:
        raise row_error(
            path, line, f"{field}.{score_field or '|'.join(SCORE_FIELDS)}", "missing: no score for this completion"
        )
    value, where = c[key], f"{field}.{key}"
    if key in ("ratings", "annotations"):
        items = list(value.values()) if isinstance(value, dict) else value
        if not isinstance(items, list):
            raise row_error(path, line, where, f"expected a list or an object of ratings, got {type_name(value)}")
        numbers = []
        for item in items:
            rating = item.get("Rating") if isinstance(item, dict) else item
            if isinstance(rating, str):
                if rating.strip().upper() == "N/A":
                    continue
                try:
                    rating = float(rating)
                except ValueError:
                    raise row_error(path, line, where, f"rating {rating!r} is not a number") from None
            numbers.append(finite_number(rating, path, line, where))
        if not numbers:
            raise row_error(path, line, where, "no numeric rating")
        return sum(numbers) / len(numbers)
    return finite_number(value, path, line, where)


def _messages_field(obj, key, prompt: str | None, path, line) -> list[dict]:
    """``chosen``/``rejected`` of the binarized file: a message list, or a response string after ``prompt``."""
    value = obj.get(key)
    if isinstance(value, str) and prompt is not None:
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": value}]
    if not isinstance(value, list):
        raise row_error(path, line, key, f"expected a list of messages, got {type_name(value)}")
    try:
        check_messages(value, key)
    except ValueError as e:
        raise row_error(path, line, key, str(e)) from None
    return value


def read_ultrafeedback(
    path,
    tokenizer,
    *,
    score_field: str | None = None,
    source: str | None = None,
    records: Iterable[tuple[int, dict]] | None = None,
) -> Iterator[dict]:
    """Rows of an UltraFeedback JSONL file: each scored completion of a prompt is a row of its group.

    Accepts the public file's ``completions`` shape and the binarized ``chosen``/``rejected`` shape
    (line by line, so one file may mix them). The reward, on the completion's last action token, is
    its score (:func:`completion_score`; ``score_chosen``/``score_rejected`` when binarized). ``records``: the
    file's ``(line, record)`` pairs when read already (a parallel build gives each worker a chunk of them).
    """
    text_option("score_field", score_field)
    text_option("source", source)
    path = Path(path)
    source = source or f"ultrafeedback:{path.name}"
    for group, (line, obj) in enumerate(iter_jsonl(path) if records is None else records):
        prompt_key = "instruction" if "instruction" in obj else "prompt"
        if "completions" in obj:
            prompt = string_field(obj, prompt_key, path, line)
            completions = obj["completions"]
            if not isinstance(completions, list) or not completions:
                raise row_error(path, line, "completions", "expected a non-empty list")
            for k, c in enumerate(completions):
                field = f"completions[{k}]"
                if not isinstance(c, dict):
                    raise row_error(path, line, field, f"expected an object, got {type_name(c)}")
                response = c.get("response")
                if not isinstance(response, str):
                    raise row_error(
                        path,
                        line,
                        f"{field}.response",
                        "missing" if response is None else f"expected a string, got {type_name(response)}",
                    )
                score = completion_score(c, path, line, field, score_field)
                messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
                encoded = encode_messages(
                    tokenizer,
                    messages,
                    path,
                    line,
                    field,
                    completion_reward=score,
                    field_of=lambda i: f"{field}.response" if i else prompt_key,
                )
                extra = extra_text({**obj, **c}, (prompt_key, "completions", "response"))
                text = text_columns(prompt, messages[1:], reward=score, extra=extra)
                yield input_row(path, line, str(k), source, (group, line), encoded, field, text)
        elif "chosen" in obj and "rejected" in obj:
            prompt = obj.get(prompt_key) if isinstance(obj.get(prompt_key), str) else None
            for key in ("chosen", "rejected"):
                messages = _messages_field(obj, key, prompt, path, line)
                score_key = f"score_{key}"
                if score_key not in obj:
                    raise row_error(path, line, score_key, "missing")
                score = finite_number(obj[score_key], path, line, score_key)
                field_of = (
                    (lambda i: key if i else prompt_key)
                    if isinstance(obj[key], str)
                    else (lambda i: f"{key}[{i}].content")
                )
                encoded = encode_messages(
                    tokenizer, messages, path, line, key, completion_reward=score, actions="last", field_of=field_of
                )
                consumed = (prompt_key, "chosen", "rejected", "score_chosen", "score_rejected", "messages")
                text = conversation_columns(messages, actions="last", reward=score, extra=extra_text(obj, consumed))
                yield input_row(path, line, key, source, (group, line), encoded, score_key, text)
        else:
            raise row_error(path, line, "completions", "missing (nor 'chosen' and 'rejected' of the binarized form)")
