"""The safe executor of BFCL-V3 multi-turn calls: fresh simulators per entry, a dispatcher over their
public methods, bounded work, results as strings.

The simulators come from the installed ``bfcl-eval`` package. The official executor runs call
strings with ``eval()`` and caches simulator instances in module globals. Here instead:

* a call string is parsed with :mod:`ast` and accepted only as ``name(literal, ..., key=literal)``
  (:mod:`shiq_eval.bfcl.parse`): the arguments go through :func:`ast.literal_eval`, so no name,
  attribute, nested call or operator is ever evaluated; anything else becomes an error *result
  string* returned to the model;
* the work one call can do is bounded (see :data:`shiq_eval.bfcl.parse.MAX_INT_LITERAL` and
  :data:`MAX_DIGITS`): an integer argument beyond the int64 range is refused, and so are the few
  ``MathAPI`` calls whose cost grows with an argument's *value* (an int power of more than
  ``MAX_DIGITS`` digits, a ``precision`` or ``decimal_places`` beyond ``MAX_DIGITS``); the refusal
  is an error result;
* every call runs within the work budget of its entry (:mod:`shiq_eval.bfcl.budget`: profiler
  steps, CPU time and memory, whatever the call sequence builds up; the length of every call and
  result is charged too); a call that uses it up, and
  every later call of the entry, is an error result, and so is a result longer than
  :data:`shiq_eval.bfcl.budget.MAX_RESULT_CHARS` characters;
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

Deliberate differences from the official executor, none of which changes a verdict on calls of the
form ``name(key=literal, ...)`` (what models write and the ground truth holds): names that are not
methods of the involved classes (Python builtins such as ``len``) are reported as undefined instead of
being run, and string arguments are never rewritten (the official executor prefixes every
``identifier(`` it finds, even inside string literals). On other raw call strings the verdicts can
differ, because arguments are literals here and code there: ``cd(folder='docu' + 'ment')``,
``cd(folder=str('document'))`` and ``cd(folder=f'document')`` are errors here and run there;
``ｃd(...)`` (a full-width letter, which Python's parser folds to ``cd``) and ``(cd)(...)`` run here
and fail there. Rollouts decode model text to the plain form first (``decode_calls``), so these reach the
checker only from raw input (``check_entry``, a scorer's JSON). The work budget
(``shiq_eval.bfcl.budget``) also ends a scenario whose thousands of harmless calls the official
executor would run to the end (about 1,100 ``du`` or 8,000 ``ls`` calls on one entry).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import math
from collections.abc import Sequence
from typing import Any

from shiq_eval.bfcl.budget import (
    CHARS_PER_STEP,
    MAX_RESULT_CHARS,
    MODULE_STATE,
    Budget,
    BudgetExceeded,
    bounded_call,
    call_cost,
)
from shiq_eval.bfcl.data import entry_category
from shiq_eval.bfcl.parse import ParsedCall, UnsafeCallError, parse_call

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
    from bfcl_eval.constants.executable_backend_config import CLASS_FILE_PATH_MAPPING  # heavy: the simulators

    if class_name not in MULTI_TURN_CLASSES:
        raise ValueError(f"involved class {class_name!r} is not a multi-turn simulator ({sorted(MULTI_TURN_CLASSES)})")
    module = importlib.import_module(CLASS_FILE_PATH_MAPPING[class_name])
    MODULE_STATE.add(module)
    return getattr(module, class_name)


def is_long_context(entry_id: str) -> bool:
    """Whether the official checker loads this entry's scenarios with ``long_context=True``."""
    category = entry_category(entry_id)
    return "long_context" in category or "composite" in category


def _run_and_stringify(method, parsed: ParsedCall) -> str:
    return stringify_result(method(*parsed.args, **parsed.kwargs))


class Environment:
    """Fresh simulator instances of one entry and the safe dispatcher over their public methods.

    ``budget`` bounds the work of the calls run here (:class:`shiq_eval.bfcl.budget.Budget`; None:
    unbounded, for trusted calls such as the ground truth); copies share it.
    """

    def __init__(self, entry: dict, budget: Budget | None = None):
        self.entry_id = entry["id"]
        self.budget = budget
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
        (:data:`shiq_eval.bfcl.parse.MAX_INT_LITERAL`, :data:`MAX_DIGITS`), a call once the
        environment's budget is used up (or that uses it up), a result longer than
        :data:`shiq_eval.bfcl.budget.MAX_RESULT_CHARS` and any exception while running the call or
        stringifying its result all come back as ``"Error during execution: <message>"``.
        """
        if self.budget is not None and self.budget.charge(call_cost(call)):
            return f"{ERROR_PREFIX}{self.budget.exhausted}"
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
            result = bounded_call(self.budget, _run_and_stringify, method, parsed)
        except (Exception, BudgetExceeded) as e:  # the simulator's own errors are results for the model
            return _error_result(e)
        if len(result) > MAX_RESULT_CHARS:
            return f"{ERROR_PREFIX}result of {len(result)} characters is longer than {MAX_RESULT_CHARS}"
        if self.budget is not None:
            self.budget.charge(len(result) // CHARS_PER_STEP)  # this result is kept; later calls are refused
        return result

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
