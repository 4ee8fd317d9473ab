"""Anthropic HH-RLHF: ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}`` per line.

The final assistant turn is the action; earlier assistant turns are context unless
``all_assistant_turns``. ``mode="pairs"`` (default) gives the chosen row reward +1 and the rejected
row −1 in one group: the absolute values carry no meaning, only the order does, which is what DPO
and CoPG use (SHIQ_MATH §5). ``mode="scored"`` calls ``reward_fn(messages) -> float`` instead, or a
saved regression reward head (:mod:`shiq_data.reward_head`) with ``reward_model``.

Text columns: ``prompt`` holds the dialogue's messages before its first action turn (the final
assistant turn, or the first one with ``all_assistant_turns``) as JSON, ``completion`` the rest,
``reward`` the row's reward, ``extra`` the line's fields other than ``chosen`` and ``rejected``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from shiq_data.io import iter_jsonl
from shiq_data.readers.encode import (
    conversation_columns,
    encode_messages,
    extra_text,
    finite_number,
    input_row,
    row_error,
    string_field,
    text_option,
)
from shiq_data.reward_head import RegressionRewardModel

_HH_TURN = re.compile(r"(?:\r?\n){2}(Human|Assistant):")  # (a transcript saved with Windows line ends: \r\n)


def parse_hh_dialogue(text: str, path="<text>", line: int = 0, field: str = "chosen") -> list[dict]:
    """Messages of an HH transcript ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` (user/assistant alternating,
    first user, last assistant; a turn marker may follow ``"\\r\\n\\r\\n"`` too, as in a file saved with Windows
    line ends); content is stripped of surrounding whitespace, and kept as written inside."""
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise row_error(path, line, field, f"text before the first '\\n\\nHuman:' turn: {parts[0][:40]!r}")
    messages = []
    for k in range(1, len(parts), 2):
        role = "user" if parts[k] == "Human" else "assistant"
        want = "user" if not messages or messages[-1]["role"] == "assistant" else "assistant"
        if role != want:
            raise row_error(
                path,
                line,
                field,
                f"turn {len(messages) + 1} is {parts[k]!r} but the dialogue must "
                "alternate Human/Assistant starting with Human",
            )
        messages.append({"role": role, "content": parts[k + 1].strip()})
    if not messages or messages[-1]["role"] != "assistant":
        raise row_error(path, line, field, "the dialogue must end with an '\\n\\nAssistant:' turn")
    return messages


def hh_text(messages: list[dict]) -> str:
    """A dialogue in the HH transcript form (``"\n\nHuman: ...\n\nAssistant: ..."``)."""
    return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages)


@functools.lru_cache(maxsize=2)  # loaded once per process (a parallel build's worker reads many chunks)
def regression_reward_fn(head_path) -> Callable[[list], float]:
    """``reward_fn(messages)`` of a saved regression reward head on MiniLM (the encoder saved with it when it
    was fine-tuned, else the packaged one; :class:`shiq_data.reward_head.RegressionRewardModel`), reading
    the dialogue as :func:`hh_text` writes it."""
    head_path = Path(head_path)
    if not head_path.is_file():
        raise FileNotFoundError(
            f"--option reward_model={head_path}: no such file (a head saved by "
            "shiq_data.reward_head.RegressionRewardModel.save)"
        )
    head = RegressionRewardModel.load(head_path)
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
    records: Iterable[tuple[int, dict]] | None = None,
) -> Iterator[dict]:
    """Rows of an Anthropic HH JSONL file: chosen and rejected of one line form one group.

    ``mode="pairs"``: rewards +1 (chosen) / −1 (rejected) on the last action token. ``mode="scored"``:
    ``reward_fn(messages)`` scores each dialogue; ``reward_model`` (a saved regression head, the form
    the command line can give: ``--option reward_model=PATH``) is such a function and implies
    ``scored``. ``all_assistant_turns``: every assistant turn is an action (the reward still goes on
    the last one) instead of only the final turn. ``records``: the file's ``(line, record)`` pairs when read
    already (a parallel build gives each worker a chunk of them).
    """
    text_option("reward_model", reward_model)
    text_option("source", source)
    if reward_model is not None:
        if reward_fn is not None:
            raise ValueError("hh: give reward_fn or reward_model, not both")
        reward_fn, mode = regression_reward_fn(reward_model), "scored"
    if not isinstance(all_assistant_turns, bool):
        raise ValueError(f"hh: all_assistant_turns = {all_assistant_turns!r:.40}: expected true or false")
    if mode not in ("pairs", "scored"):
        raise ValueError(f"hh: mode = {mode!r}: expected 'pairs' or 'scored'")
    if (mode == "scored") != (reward_fn is not None):
        raise ValueError("hh: mode='scored' needs a reward_fn, and reward_fn is only used with mode='scored'")
    path = Path(path)
    source = source or f"hh:{path.name}"
    actions = "all" if all_assistant_turns else "last"
    for group, (line, obj) in enumerate(iter_jsonl(path) if records is None else records):
        extra = extra_text(obj, ("chosen", "rejected"))
        for field, pair_reward in (("chosen", 1.0), ("rejected", -1.0)):
            messages = parse_hh_dialogue(string_field(obj, field, path, line), path, line, field)
            reward = (
                pair_reward
                if mode == "pairs"
                else finite_number(reward_fn(messages), path, line, f"{field} (reward_fn)")
            )
            encoded = encode_messages(tokenizer, messages, path, line, field, completion_reward=reward, actions=actions)
            reward_field = field if mode == "pairs" else f"{field} (reward_fn)"
            text = conversation_columns(messages, actions=actions, reward=reward, extra=extra)
            yield input_row(path, line, field, source, (group, line), encoded, reward_field, text)
