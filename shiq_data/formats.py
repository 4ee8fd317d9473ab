"""Readers for public preference and conversation formats, producing buffer rows via the chat template.

Each reader is ``reader(path, tokenizer, **options) -> Iterator[row dict]`` (rows as in
:mod:`shiq_data.schema`, without reference statistics) and reads local JSONL files (``.jsonl`` or
``.jsonl.gz``); nothing is downloaded. Errors are :class:`shiq_data.schema.RowError` naming the file,
the line and the field; an assistant turn that is an action must have text (an empty completion is
refused, as in the generic readers).

Rows carry no ``row_id`` but a ``row_key`` ``"<file name>:<line>:<tag>"``; the buffer makes it the
``row_id`` ``b<k>-<row_key>`` for its k-th command (:func:`shiq_data.buffer.write_buffer`), so appending
another file of the same name does not clash. They also carry their input location
(:data:`shiq_data.schema.INPUT_KEY`), so a problem the buffer's row check finds (a reward beyond
float32) names the file, line and field too, although one line may give several rows.

- ``hh`` — Anthropic HH-RLHF: ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}``.
  The final assistant turn is the action; earlier assistant turns are context unless
  ``all_assistant_turns``. ``mode="pairs"`` (default) gives the chosen row reward +1 and the rejected
  row −1 in one group: the absolute values carry no meaning, only the order does, which is what
  DPO and CoPG use (SHIQ_MATH §5). ``mode="scored"`` calls ``reward_fn(messages) -> float`` instead.
- ``ultrafeedback`` — the UltraFeedback file (``{"instruction"|"prompt", "completions": [{"response",
  "overall_score" | "fine-grained_score" | "ratings" | "annotations"}]}``) or its binarized form
  (``{"prompt", "chosen": [messages], "rejected": [messages], "score_chosen", "score_rejected"}``):
  every scored completion of a prompt is a row of that prompt's group, its score the reward.
- ``multiturn`` — ``{"messages": [{"role", "content", ("reward")}...], ("reward"), ("group")}``:
  assistant messages are actions and carry their turn reward on their end-of-turn token; user, tool
  and system turns are environment tokens. A top-level ``reward`` is a single completion reward.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from shiq_data.chat import check_messages, encode_chat
from shiq_data.io import RowError, iter_jsonl
from shiq_data.schema import INPUT_KEY, input_location


def _err(path, line, field, problem, row_label: str = "line") -> RowError:
    return RowError(path, line, field, problem, row_label=row_label)


def _number(value, path, line, field) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _err(path, line, field, f"expected a finite number, got {value!r}")
    return float(value)


def _string(obj, key, path, line) -> str:
    if key not in obj:
        raise _err(path, line, key, "missing")
    if not isinstance(obj[key], str):
        raise _err(path, line, key, f"expected a string, got {type(obj[key]).__name__}")
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
            raise _err(path, line, field_of(i), "empty completion (the assistant turn has no text)", row_label)


def _encode(
    tokenizer,
    messages,
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
        raise _err(path, line, field, str(e), row_label) from None


def _row(path: Path, line: int, tag: str, source: str, group_id: int, encoded: dict, reward_field: str) -> dict:
    """A buffer row named ``row_key`` ``<file name>:<line>:<tag>``, carrying its input location (errors the
    buffer finds in its ``rewards`` name ``reward_field``)."""
    return {
        "row_key": f"{path.name}:{line}:{tag}",
        "source": source,
        "group_id": group_id,
        **encoded,
        INPUT_KEY: input_location(path, line, fields={"rewards": reward_field}),
    }


# ----------------------------------------------------------------------------------------------
# Anthropic HH

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_dialogue(text: str, path="<text>", line: int = 0, field: str = "chosen") -> list[dict]:
    """Messages of an HH transcript ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` (user/assistant alternating,
    first user, last assistant); content is stripped of surrounding whitespace."""
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise _err(path, line, field, f"text before the first '\\n\\nHuman:' turn: {parts[0][:40]!r}")
    messages = []
    for k in range(1, len(parts), 2):
        role = "user" if parts[k] == "Human" else "assistant"
        want = "user" if not messages or messages[-1]["role"] == "assistant" else "assistant"
        if role != want:
            raise _err(
                path,
                line,
                field,
                f"turn {len(messages) + 1} is {parts[k]!r} but the dialogue must "
                "alternate Human/Assistant starting with Human",
            )
        messages.append({"role": role, "content": parts[k + 1].strip()})
    if not messages or messages[-1]["role"] != "assistant":
        raise _err(path, line, field, "the dialogue must end with an '\\n\\nAssistant:' turn")
    return messages


def hh_text(messages: list[dict]) -> str:
    """A dialogue in the HH transcript form (``"\n\nHuman: ...\n\nAssistant: ..."``)."""
    return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages)


def regression_reward_fn(head_path) -> Callable[[list], float]:
    """``reward_fn(messages)`` of a saved regression reward head on the packaged MiniLM encoder
    (``shiq_eval.scorers.RegressionRewardModel``), reading the dialogue as :func:`hh_text` writes it."""
    head_path = Path(head_path)
    if not head_path.is_file():
        raise FileNotFoundError(
            f"--option reward_model={head_path}: no such file (a head saved by "
            "shiq_eval.scorers.RegressionRewardModel.save)"
        )
    from shiq_eval.scorers import RegressionRewardModel, minilm_encoder

    head = RegressionRewardModel.load(head_path, minilm_encoder())
    return lambda messages: head.score_texts([hh_text(messages).strip()])[0]


def read_hh(
    path,
    tokenizer,
    *,
    mode: str = "pairs",
    reward_fn: Callable[[list], float] | None = None,
    reward_model: str | None = None,
    all_assistant_turns: bool = False,
    source: str | None = None,
) -> Iterator[dict]:
    """Rows of an Anthropic HH JSONL file: chosen and rejected of one line form one group.

    ``mode="pairs"``: rewards +1 (chosen) / −1 (rejected) on the last action token. ``mode="scored"``:
    ``reward_fn(messages)`` scores each dialogue; ``reward_model`` (a saved regression head, the form
    the command line can give: ``--option reward_model=PATH``) is such a function and implies
    ``scored``. ``all_assistant_turns``: every assistant turn is an action (the reward still goes on
    the last one) instead of only the final turn.
    """
    if reward_model is not None:
        if reward_fn is not None:
            raise ValueError("hh: give reward_fn or reward_model, not both")
        reward_fn, mode = regression_reward_fn(reward_model), "scored"
    if mode not in ("pairs", "scored"):
        raise ValueError(f"hh: mode = {mode!r}: expected 'pairs' or 'scored'")
    if (mode == "scored") != (reward_fn is not None):
        raise ValueError("hh: mode='scored' needs a reward_fn, and reward_fn is only used with mode='scored'")
    path = Path(path)
    source = source or f"hh:{path.name}"
    actions = "all" if all_assistant_turns else "last"
    for group, (line, obj) in enumerate(iter_jsonl(path)):
        for field, pair_reward in (("chosen", 1.0), ("rejected", -1.0)):
            messages = parse_hh_dialogue(_string(obj, field, path, line), path, line, field)
            reward = (
                pair_reward if mode == "pairs" else _number(reward_fn(messages), path, line, f"{field} (reward_fn)")
            )
            encoded = _encode(tokenizer, messages, path, line, field, completion_reward=reward, actions=actions)
            reward_field = field if mode == "pairs" else f"{field} (reward_fn)"
            yield _row(path, line, field, source, group, encoded, reward_field)


# ----------------------------------------------------------------------------------------------
# UltraFeedback

SCORE_FIELDS = ("overall_score", "fine-grained_score", "ratings", "annotations")


def completion_score(c: dict, path, line, field: str, score_field: str | None = None) -> float:
    """A completion's score: ``score_field`` if given, else the first of :data:`SCORE_FIELDS` present.

    ``ratings`` is a list of numbers (or an aspect -> number object) and ``annotations`` the public
    file's aspect -> ``{"Rating": "4", ...}`` object; both give the mean of their numeric ratings
    (``"N/A"`` ignored).
    """
    key = score_field or next((k for k in SCORE_FIELDS if c.get(k) is not None), None)
    if key is None or c.get(key) is None:
        raise _err(
            path, line, f"{field}.{score_field or '|'.join(SCORE_FIELDS)}", "missing: no score for this completion"
        )
    value, where = c[key], f"{field}.{key}"
    if key in ("ratings", "annotations"):
        items = list(value.values()) if isinstance(value, dict) else value
        if not isinstance(items, list):
            raise _err(path, line, where, f"expected a list or an object of ratings, got {type(value).__name__}")
        numbers = []
        for item in items:
            rating = item.get("Rating") if isinstance(item, dict) else item
            if isinstance(rating, str):
                if rating.strip().upper() == "N/A":
                    continue
                try:
                    rating = float(rating)
                except ValueError:
                    raise _err(path, line, where, f"rating {rating!r} is not a number") from None
            numbers.append(_number(rating, path, line, where))
        if not numbers:
            raise _err(path, line, where, "no numeric rating")
        return sum(numbers) / len(numbers)
    return _number(value, path, line, where)


def _messages_field(obj, key, prompt: str | None, path, line) -> list[dict]:
    """``chosen``/``rejected`` of the binarized file: a message list, or a response string after ``prompt``."""
    value = obj.get(key)
    if isinstance(value, str) and prompt is not None:
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": value}]
    if not isinstance(value, list):
        raise _err(path, line, key, f"expected a list of messages, got {type(value).__name__}")
    try:
        check_messages(value, key)
    except ValueError as e:
        raise _err(path, line, key, str(e)) from None
    return value


def read_ultrafeedback(path, tokenizer, *, score_field: str | None = None, source: str | None = None) -> Iterator[dict]:
    """Rows of an UltraFeedback JSONL file: each scored completion of a prompt is a row of its group.

    Accepts the public file's ``completions`` shape and the binarized ``chosen``/``rejected`` shape
    (line by line, so one file may mix them). The reward, on the completion's last action token, is
    its score (:func:`completion_score`; ``score_chosen``/``score_rejected`` when binarized).
    """
    path = Path(path)
    source = source or f"ultrafeedback:{path.name}"
    for group, (line, obj) in enumerate(iter_jsonl(path)):
        prompt_key = "instruction" if "instruction" in obj else "prompt"
        if "completions" in obj:
            prompt = _string(obj, prompt_key, path, line)
            completions = obj["completions"]
            if not isinstance(completions, list) or not completions:
                raise _err(path, line, "completions", "expected a non-empty list")
            for k, c in enumerate(completions):
                field = f"completions[{k}]"
                if not isinstance(c, dict):
                    raise _err(path, line, field, f"expected an object, got {type(c).__name__}")
                response = c.get("response")
                if not isinstance(response, str):
                    raise _err(
                        path,
                        line,
                        f"{field}.response",
                        "missing" if response is None else f"expected a string, got {type(response).__name__}",
                    )
                score = completion_score(c, path, line, field, score_field)
                messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
                encoded = _encode(
                    tokenizer,
                    messages,
                    path,
                    line,
                    field,
                    completion_reward=score,
                    field_of=lambda i: f"{field}.response",
                )
                yield _row(path, line, str(k), source, group, encoded, field)
        elif "chosen" in obj and "rejected" in obj:
            prompt = obj.get(prompt_key) if isinstance(obj.get(prompt_key), str) else None
            for key in ("chosen", "rejected"):
                messages = _messages_field(obj, key, prompt, path, line)
                score_key = f"score_{key}"
                if score_key not in obj:
                    raise _err(path, line, score_key, "missing")
                score = _number(obj[score_key], path, line, score_key)
                field_of = (lambda i: key) if isinstance(obj[key], str) else (lambda i: f"{key}[{i}].content")
                encoded = _encode(
                    tokenizer, messages, path, line, key, completion_reward=score, actions="last", field_of=field_of
                )
                yield _row(path, line, key, source, group, encoded, score_key)
        else:
            raise _err(path, line, "completions", "missing (nor 'chosen' and 'rejected' of the binarized form)")


# ----------------------------------------------------------------------------------------------
# multi-turn conversations


def read_multiturn(path, tokenizer, *, source: str | None = None) -> Iterator[dict]:
    """Rows of a multi-turn JSONL file ``{"messages": [...], ("reward"), ("group")}``.

    Assistant messages may carry ``"reward"`` (their turn reward); a top-level ``"reward"`` is one
    completion reward instead (not both). Rows with equal ``"group"`` values share a group id; without
    it every row is its own group.
    """
    path = Path(path)
    source = source or f"multiturn:{path.name}"
    groups: dict = {}
    for n, (line, obj) in enumerate(iter_jsonl(path)):
        messages = obj.get("messages")
        if messages is None:
            raise _err(path, line, "messages", "missing")
        try:
            check_messages(messages, "messages")
        except ValueError as e:
            raise _err(path, line, "messages", str(e)) from None
        turn_rewards, has_turn_reward = [], False
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                r = m.get("reward")
                has_turn_reward |= r is not None
                turn_rewards.append(None if r is None else _number(r, path, line, f"messages[{i}].reward"))
            elif m.get("reward") is not None:
                raise _err(
                    path,
                    line,
                    f"messages[{i}].reward",
                    f"only assistant turns can carry a reward, this is a {m['role']!r} turn",
                )
        kwargs = {}
        if obj.get("reward") is not None:
            if has_turn_reward:
                raise _err(path, line, "reward", "give either a top-level reward or per-turn rewards, not both")
            kwargs["completion_reward"] = _number(obj["reward"], path, line, "reward")
        elif has_turn_reward:
            kwargs["turn_rewards"] = turn_rewards
        key = obj.get("group")
        if key is None:
            key = ("line", n)
        elif not isinstance(key, (str, int)) or isinstance(key, bool):
            raise _err(path, line, "group", f"expected a string or an integer, got {type(key).__name__}")
        group = groups.setdefault(key, len(groups))
        encoded = _encode(
            tokenizer, messages, path, line, "messages", field_of=lambda i: f"messages[{i}].content", **kwargs
        )
        reward_field = "reward" if "completion_reward" in kwargs else "messages"
        yield _row(path, line, "0", source, group, encoded, reward_field)


FORMATS = {"hh": read_hh, "ultrafeedback": read_ultrafeedback, "multiturn": read_multiturn}
