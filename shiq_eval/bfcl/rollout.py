"""Multi-turn rollouts of a chat policy on BFCL entries, and their conversion into buffer rows.

A policy is any callable ``policy(messages: list[dict]) -> str`` over chat messages
(``{"role": "system"|"user"|"assistant"|"tool", "content": str}``). Each turn of an entry:

1. the turn's user message(s) are appended (for ``multi_turn_miss_func``, the turn whose question is
   empty instead gets a user message listing the newly available function docs);
2. the policy answers; an answer that decodes to a list of calls, ``[f(a=1), g(b='x')]``, is one
   step: the calls run on the entry's simulators through the safe executor of
   :mod:`shiq_eval.bfcl.executor` and each result comes back as one ``tool`` message; any other answer
   (plain text, or ``[]``) ends the turn;
3. a policy still calling after ``MAX_STEPS_PER_TURN`` steps is force-quit: the over-limit step is
   recorded but not run here (the checker runs it, as the official inference loop does), and the entry
   stops there, as the official loop stops it (in the last turn, the entry is then checked as any other).

The trajectory is then checked from scratch by :func:`shiq_eval.bfcl.checker.check_trajectory` (verdict,
cumulative and reset turn rewards).

What the model writes and what the simulators answer are data (:func:`as_text`): a lone surrogate (a call's
``'\\ud800'`` string echoed in a tool result) becomes U+FFFD, and text spelling a control token
(``<|im_end|>`` written as plain characters, or echoed by a tool; with a model policy, any of its tokenizer's
control texts) has a zero-width space put after its first character, so that the chat template renders it as
text and never as a turn boundary or another control token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from shiq_data.chat import control_texts, encode_chat
from shiq_data.io import atomic_write_jsonl, iter_jsonl
from shiq_data.schema import is_finite_number
from shiq_eval.bfcl.budget import Budget, entry_scope
from shiq_eval.bfcl.checker import check_trajectory
from shiq_eval.bfcl.data import MAX_STEPS_PER_TURN, bfcl_version, entry_category, function_docs, ground_truth_decoded
from shiq_eval.bfcl.executor import Environment
from shiq_eval.bfcl.parse import decode_calls

Policy = Callable[[list], str]
_SURROGATE = re.compile("[\ud800-\udfff]")


def as_text(text: str, controls: Sequence[str] = ()) -> str:
    """``text`` as the conversation stores and renders it: lone surrogates (which UTF-8 cannot hold, nor a
    tokenizer read) replaced by U+FFFD, ``<|`` (how ChatML's and Llama's control tokens begin) written
    ``<\u200b|``, and each of ``controls`` (a tokenizer's other control texts, SmolLM2's ``<file_sep>``, say)
    with a zero-width space after its first character, so no model answer or tool result can spell a control
    token into the next prompt."""
    text = _SURROGATE.sub("\ufffd", text).replace("<|", "<\u200b|")
    for control in controls:
        if len(control) > 1:
            text = text.replace(control, control[0] + "\u200b" + control[1:])
    return text


SYSTEM_PROMPT = """You are an expert in composing functions. You are given a question and a set of possible functions. Based on the question, you will need to make one or more function/tool calls to achieve the purpose.
If none of the functions can be used, point it out. If the given question lacks the parameters required by the function, also point it out.

If you decide to invoke any of the function(s), you MUST put it in the format of [func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]
You SHOULD NOT include any other text in a response that calls functions. Each result comes back as a tool message.

At each turn, you should try your best to complete the tasks requested by the user within the current turn. Continue to output functions to call until you have fulfilled the user's request to the best of your ability. Once you have no more functions to call, answer in plain text: the system will consider the current turn complete and proceed to the next turn or task.

Here is a list of functions in JSON format that you can invoke.
{functions}
"""
NEW_FUNCTIONS_PROMPT = "{functions}\nI have updated some more functions you can choose from. What about now?"
END_OF_TURN_TEXT = "I have completed the request."
ERR_CONTEXT = "multi_turn:context_overflow"


def system_message(docs: Sequence[dict]) -> dict:
    """The system message listing the function docs (JSON) and the call format."""
    return {"role": "system", "content": SYSTEM_PROMPT.format(functions=json.dumps(list(docs)))}


def new_functions_message(docs: Sequence[dict]) -> dict:
    """User message of a ``miss_func`` turn that reveals withheld function docs."""
    return {"role": "user", "content": NEW_FUNCTIONS_PROMPT.format(functions=json.dumps(list(docs)))}


def compact_docs(docs: Sequence[dict]) -> list[dict]:
    """Shorter function docs of the same JSON shape: each function's name, its description without the
    class preamble (the text after ``Tool description:``), and its parameters with their types,
    defaults and enums and the required ones; parameter descriptions and the response schema dropped.
    Every function and parameter stays listed. A prompt with these is about a third as long."""
    out = []
    for d in docs:
        desc = d.get("description", "")
        desc = desc.split("Tool description:", 1)[-1].strip()
        params = d.get("parameters") or {}
        props = {
            name: {k: v for k, v in spec.items() if k in ("type", "default", "enum", "items")}
            for name, spec in (params.get("properties") or {}).items()
        }
        out.append(
            {
                "name": d["name"],
                "description": desc,
                "parameters": {
                    "type": params.get("type", "dict"),
                    "properties": props,
                    "required": params.get("required", []),
                },
            }
        )
    return out


def format_calls(calls: Sequence[str]) -> str:
    """``["f(a=1)", "g()"]`` -> ``"[f(a=1), g()]"``, the answer format of :data:`SYSTEM_PROMPT`."""
    return "[" + ", ".join(calls) + "]"


class ScriptedPolicy:
    """Replays decoded turns (turn -> step -> call strings), then ends each turn with plain text.

    It keeps its own cursor, so use one instance per entry and per rollout.
    """

    def __init__(self, decoded_turns: Sequence[Sequence[Sequence[str]]], end_text: str = END_OF_TURN_TEXT):
        self.turns = [list(steps) for steps in decoded_turns]
        self.end_text = end_text
        self.turn, self.step = 0, 0

    @classmethod
    def ground_truth(cls, entry: dict) -> ScriptedPolicy:
        """The entry's ground truth: all calls of a turn in one step."""
        return cls(ground_truth_decoded(entry))

    def __call__(self, messages: list) -> str:
        steps = self.turns[self.turn] if self.turn < len(self.turns) else []
        if self.step < len(steps):
            self.step += 1
            return format_calls(steps[self.step - 1])
        self.turn, self.step = self.turn + 1, 0
        return self.end_text


class ContextOverflow(RuntimeError):
    """The conversation no longer fits the model's context; the rollout of the entry stops."""


class CutAnswer(str):
    """An answer the token limit cut: the model drew ``max_new_tokens`` tokens and no end-of-turn token. The
    rollout records it (``truncated``); a buffer row made from its text would end the turn with a template
    end-of-turn token the model never drew, marked as its action (:func:`trajectories_to_rows` refuses it
    unless told otherwise)."""


def answer_seed(seed: int, stream: str, k: int) -> int:
    """The sampling seed of answer ``k`` of ``stream`` under ``seed``: 62 bits of a sha256 of the three (seeds
    ``s`` and ``s + 1`` would share all but one answer's draws, were the answers numbered from the seed)."""
    digest = hashlib.sha256(json.dumps([seed, stream, k]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


class ChatModelPolicy:
    """A chat model as a policy: chat template -> token ids -> ``generate`` -> text.

    ``token_policy`` is a :class:`shiq_eval.generate.HFPolicy` or ``MegatronPolicy``; ``cfg`` its
    ``SamplingConfig``.
    Special tokens are dropped from the answer text, and nothing else (its spaces and newlines are tokens the
    model drew, a buffer row's actions); an answer that ends without the policy's end token after
    ``cfg.max_new_tokens`` tokens is returned as a :class:`CutAnswer`. Raises :class:`ContextOverflow` when the
    prompt plus ``cfg.max_new_tokens`` exceeds ``max_context`` (default: the model config's
    ``max_position_embeddings``, or the megatron model's ``max_sequence_length``).

    Each answer is drawn under its own seed, :func:`answer_seed` of ``cfg.seed``, ``stream`` (an entry's id: a
    fresh policy per entry) and the answer's number: answers are not drawn from one random stream again and
    again, and an entry's answers do not depend on which entries ran before it.
    """

    def __init__(self, token_policy, tokenizer, cfg, max_context: int | None = None, stream: str = ""):
        self.token_policy, self.tokenizer, self.cfg = token_policy, tokenizer, cfg
        self.stream, self.answers = stream, 0
        self.control_texts = control_texts(tokenizer)  # what as_text breaks in its answers and the tool results
        if max_context is None:
            max_context = getattr(token_policy, "max_context", None) or getattr(
                getattr(token_policy.model, "config", None), "max_position_embeddings", None
            )
        self.max_context = max_context

    def __call__(self, messages: list) -> str:
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.max_context is not None and len(ids) + self.cfg.max_new_tokens > self.max_context:
            raise ContextOverflow(
                f"prompt of {len(ids)} tokens + {self.cfg.max_new_tokens} new tokens "
                f"exceeds the context of {self.max_context}"
            )
        cfg = dataclasses.replace(self.cfg, seed=answer_seed(self.cfg.seed, self.stream, self.answers))
        self.answers += 1
        out = self.token_policy.generate([ids], cfg)[0]
        text = self.tokenizer.decode(out, skip_special_tokens=True)  # as drawn: its tokens are the row's actions
        eos = getattr(self.token_policy, "eos_id", None)
        cut = len(out) >= self.cfg.max_new_tokens and (not out or eos is None or out[-1] != eos)
        return CutAnswer(text) if cut else text


def rollout_entry(
    entry: dict,
    policy: Policy,
    max_steps: int = MAX_STEPS_PER_TURN,
    budget: Budget | None = None,
    compact: bool = False,
) -> dict:
    """Run ``policy`` through every turn of ``entry`` and check the result.

    Returns a trajectory: ``id``, ``category``, ``bfcl_eval_version``, ``messages`` (the whole
    conversation), ``assistant_turns`` (turn index of each assistant message, in order),
    ``decoded_turns`` (turn -> step -> call strings, only steps with calls), ``truncated`` (the indices,
    among the assistant messages, of the answers the token limit cut: :class:`CutAnswer`), ``force_terminated``
    (step limit, or :class:`ContextOverflow` from the policy: then ``valid`` is False with
    ``error_type`` ``multi_turn:context_overflow``), and the fields of
    :func:`shiq_eval.bfcl.checker.check_trajectory` (``valid``, ``error_type``, ``turn_rewards``,
    ``turn_rewards_reset``, ...).

    The calls run within a work ``budget`` (default: a fresh :class:`shiq_eval.bfcl.budget.Budget`);
    past it each call is an error result and the rollout goes on. The simulator modules' data is
    restored before and after. ``compact``: the function docs are shown as :func:`compact_docs`.
    """
    with entry_scope():
        return _rollout(entry, policy, max_steps, Budget() if budget is None else budget, compact)


def _rollout(entry: dict, policy: Policy, max_steps: int, budget: Budget, compact: bool = False) -> dict:
    docs, withheld = function_docs(entry)
    if compact:
        docs, withheld = compact_docs(docs), {k: compact_docs(v) for k, v in withheld.items()}
    env = Environment(entry, budget)
    controls = getattr(policy, "control_texts", ())  # (a model policy's tokenizer's)
    messages = [system_message(docs)]
    assistant_turns: list[int] = []
    truncated: list[int] = []  # assistant messages (their index among them) the token limit cut
    decoded_turns: list[list[list[str]]] = []
    force_terminated, overflow = False, None
    for k, question in enumerate(entry["question"]):
        if k in withheld:
            messages.append(new_functions_message(withheld[k]))
        messages.extend({"role": m["role"], "content": m["content"]} for m in question)
        steps: list[list[str]] = []
        while True:
            try:
                answer = policy(list(messages))
            except ContextOverflow as e:
                force_terminated, overflow = True, f"turn {k}: {e}"
                break
            if not isinstance(answer, str):
                raise TypeError(f"{entry['id']}: turn {k}: the policy returned {type(answer).__name__}, expected str")
            if isinstance(answer, CutAnswer):
                truncated.append(len(assistant_turns))
            messages.append({"role": "assistant", "content": as_text(answer, controls)})
            assistant_turns.append(k)
            calls = decode_calls(answer)  # from the answer as written: the checker sees the calls made
            if not calls:
                break
            steps.append(calls)
            if len(steps) > max_steps:
                force_terminated = True
                break
            for result in env.execute(calls):
                messages.append({"role": "tool", "content": as_text(result, controls)})
        decoded_turns.append(steps)
        if force_terminated:
            break
    verdict = check_trajectory(entry, decoded_turns)
    if overflow:  # the entry was cut short however far it got
        verdict.update(valid=False, error_type=ERR_CONTEXT, error_message=overflow)
    return {
        **verdict,
        "bfcl_eval_version": bfcl_version(),
        "messages": messages,
        "assistant_turns": assistant_turns,
        "truncated": truncated,
        "decoded_turns": decoded_turns,
        "force_terminated": force_terminated,
    }


def rollout_entries(
    entries: Iterable[dict], make_policy: Callable[[dict], Policy], progress: bool = True
) -> list[dict]:
    """Trajectories of ``make_policy(entry)`` on each entry (a fresh policy per entry)."""
    entries = list(entries)
    return [rollout_entry(e, make_policy(e)) for e in tqdm(entries, desc="bfcl rollout", disable=not progress)]


def write_trajectories(path: str | Path, trajectories: Iterable[dict]) -> Path:
    """Write trajectories as JSON lines, atomically (temp file in the same folder, then rename)."""
    return atomic_write_jsonl(path, trajectories)


TRAJECTORY_FIELDS = (
    "id",
    "valid",
    "turn_rewards",
    "turn_rewards_reset",
    "messages",
    "assistant_turns",
    "decoded_turns",
)


def read_trajectories(path: str | Path, fields: Sequence[str] = TRAJECTORY_FIELDS) -> list[dict]:
    """Read a trajectory JSONL file, requiring ``fields`` on every line; errors name the file,
    line and missing field."""
    out = []
    for line, t in iter_jsonl(path):
        for field in fields:
            if field not in t:
                named = f" ({t['id']})" if isinstance(t.get("id"), str) else ""
                raise ValueError(f"{path}: line {line}{named}: missing field {field!r}")
        out.append(t)
    return out


def assistant_turn_rewards(traj: dict, reward: str = "cumulative") -> list[float | None]:
    """One entry per assistant message: the turn's reward on the last assistant message of each
    turn, ``None`` (no reward) on the others. ``reward`` is ``"cumulative"`` or ``"reset"``."""
    if reward not in ("cumulative", "reset"):
        raise ValueError(f"reward = {reward!r}: expected 'cumulative' or 'reset'")
    per_turn = traj["turn_rewards"] if reward == "cumulative" else traj["turn_rewards_reset"]
    turns = traj["assistant_turns"]
    out: list[float | None] = []
    for i, k in enumerate(turns):
        last_of_turn = i + 1 == len(turns) or turns[i + 1] != k
        out.append(float(per_turn[k]) if last_of_turn else None)
    return out


def _check_trajectory_fields(traj: dict, reward: str) -> None:
    """The fields a buffer row is made of, each of its kind (a hand-edited trajectory file): ``ValueError``
    naming the field otherwise, never a TypeError or IndexError further in."""
    messages, turns = traj.get("messages"), traj.get("assistant_turns")
    field = "turn_rewards" if reward == "cumulative" else "turn_rewards_reset"
    per_turn = traj.get(field)
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise ValueError("field 'messages': must be a list of {role, content} objects with string values")
    if not isinstance(per_turn, list) or not all(r is None or is_finite_number(r) for r in per_turn):
        raise ValueError(f"field {field!r}: must be a list of finite numbers (or null), got {str(per_turn)[:60]}")
    if not isinstance(turns, list) or not all(
        isinstance(k, int) and not isinstance(k, bool) and 0 <= k < len(per_turn) for k in turns
    ):
        raise ValueError(
            f"field 'assistant_turns': must be a list of turn indices, each with a reward in {field} (of "
            f"{len(per_turn)} turns), got {str(turns)[:60]}"
        )
    if any(per_turn[k] is None for k in set(turns)):
        raise ValueError(f"field {field!r}: a turn with an assistant message has no reward")
    derived, k = [], -1  # each turn begins with its user message(s): the turn of every assistant message
    for before, m in zip([None, *messages], messages):
        k += m["role"] == "user" and (before is None or before["role"] != "user")
        if m["role"] == "assistant":
            derived.append(k)
    if turns != derived:
        raise ValueError(
            f"field 'assistant_turns': {str(turns)[:60]} is not the turns its messages begin (each with a user "
            f"message): {str(derived)[:60]} (a reward would sit on another turn's message, or be lost)"
        )
    if "decoded_turns" in traj:
        _check_calls_written(messages, traj["decoded_turns"])


def _as_stored(call: str) -> str:
    """A decoded call (``ast.unparse``, which writes a zero-width space in a string as ``\\u200b``) without the
    zero-width spaces :func:`as_text` puts into the control texts a stored message spells."""
    return call.replace("\\u200b", "")


def _check_calls_written(messages: list[dict], decoded_turns) -> None:
    """Refuse ``messages`` whose assistant messages do not decode (:func:`decode_calls`, as the rollout decoded
    each answer) to ``decoded_turns``, the calls the verdict and turn rewards were checked on: a row's actions are
    the messages, so an answer edited by hand would be written with the rewards of calls it does not make."""
    written: list[list[list[str]]] = []
    for before, m in zip([None, *messages], messages):
        if m["role"] == "user" and (before is None or before["role"] != "user"):
            written.append([])
        if m["role"] == "assistant" and written and (calls := decode_calls(m["content"])):
            written[-1].append([_as_stored(c) for c in calls])
    ok = isinstance(decoded_turns, list) and all(
        isinstance(steps, list) and all(isinstance(s, list) and all(isinstance(c, str) for c in s) for s in steps)
        for steps in decoded_turns
    )
    checked = [[[_as_stored(c) for c in s] for s in steps] for steps in decoded_turns] if ok else None
    if written != checked:
        k = next((k for k, w in enumerate(written) if checked is None or k >= len(checked) or w != checked[k]), None)
        said = "turns" if k is None else f"turn {k}: {json.dumps(written[k])[:60]}"
        raise ValueError(
            f"field 'messages': its assistant messages do not make the calls of its decoded_turns ({said}), which its "
            "verdict and rewards were checked on: a trajectory edited by hand (its rows' actions would be written "
            "with the rewards of other calls)"
        )


def trajectory_to_row(traj: dict, tokenizer, reward: str = "cumulative") -> dict:
    """Buffer-row fields of one trajectory via the tokenizer's chat template.

    Assistant tokens are actions; system, user and tool tokens are environment. Each turn's reward
    (``turn_rewards`` or ``turn_rewards_reset``) sits on the last token (end-of-turn) of that turn's
    last assistant message. Returns ``shiq_data.chat.encode_chat``'s
    ``{"tokens" [T], "action_mask" [T], "rewards" [T], "prompt_len"}`` plus ``row_id``.
    """
    _check_trajectory_fields(traj, reward)
    n_assistant = sum(m["role"] == "assistant" for m in traj["messages"])
    if n_assistant != len(traj["assistant_turns"]):
        raise ValueError(
            f"trajectory {traj.get('id', '?')}: field assistant_turns has {len(traj['assistant_turns'])} "
            f"entries for {n_assistant} assistant messages"
        )
    row = encode_chat(tokenizer, traj["messages"], turn_rewards=assistant_turn_rewards(traj, reward))
    return {"row_id": traj["id"], **row}


TRUNCATED = ("refuse", "drop", "keep")  # what trajectories_to_rows does with a trajectory holding a cut answer


def cut_answers(traj: dict) -> list[int]:
    """The assistant messages (indices among them) of ``traj`` the token limit cut (``truncated``, recorded by
    :func:`rollout_entry`; none for a trajectory written before it was); ``ValueError`` if it is not such a list
    (an ``assistant_turns`` that is no list has no index: :func:`trajectory_to_row` names that field)."""
    cut = traj.get("truncated", [])
    turns = traj.get("assistant_turns")
    n = len(turns) if isinstance(turns, list) else 0
    if not isinstance(cut, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in cut):
        raise ValueError(
            f"field 'truncated': must be a list of assistant message indices (of {n}), got {str(cut)[:60]}"
        )
    return cut


def trajectories_to_rows(
    trajectories: Iterable[dict], tokenizer, reward: str = "cumulative", truncated: str = "refuse"
) -> Iterator[dict]:
    """Replay-buffer rows (:mod:`shiq_data.schema`) of checked trajectories.

    Each row is :func:`trajectory_to_row` with ``row_id`` ``"<entry id>:<n>"`` (the ``n``-th
    trajectory of that entry among the inputs), ``group_id`` shared by every trajectory of one entry
    (several rollouts of an entry are completions of one prompt, as DPO and CoPG pair them) and
    ``source`` ``"bfcl:<category>"``.

    A trajectory with an answer the token limit cut (:func:`cut_answers`) would end that answer with the
    template's end-of-turn token, an action the model never drew (SHIQ_MATH §2: actions are the tokens the
    policy chose). ``truncated``: ``refuse`` (a ``ValueError`` naming it), ``drop`` (left out; the caller
    counts them with :func:`cut_answers`) or ``keep`` (written as they are).
    """
    if truncated not in TRUNCATED:
        raise ValueError(f"truncated = {truncated!r}: expected one of {', '.join(TRUNCATED)}")
    groups: dict[str, int] = {}
    counts: dict[str, int] = {}
    for t in trajectories:
        where = t.get("_where") or "trajectory " + repr(t["id"])
        try:
            cut = cut_answers(t)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if cut and truncated == "drop":
            continue
        if cut and truncated == "refuse":
            raise ValueError(
                f"{where}: assistant message {cut[0]} was cut by the token limit (no end-of-turn token drawn): "
                "as a row its end-of-turn token would be recorded as the model's action; --truncated drop leaves "
                "such trajectories out, --truncated keep writes them as they are"
            )
        group = groups.setdefault(t["id"], len(groups))
        n = counts[t["id"]] = counts.get(t["id"], -1) + 1
        try:
            row = trajectory_to_row(t, tokenizer, reward)
        except ValueError as e:  # name where the trajectory came from (to-buffer sets _where: file, record)
            raise ValueError(f"{where}: {e}") from None
        category = t.get("category") or entry_category(t["id"])
        yield {**row, "row_id": f"{t['id']}:{n}", "group_id": group, "source": f"bfcl:{category}"}
