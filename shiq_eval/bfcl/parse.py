"""Safe parsing of model-written calls: ``name(literal, ..., key=literal)`` and nothing else.

A call string is parsed with :mod:`ast`; its arguments go through :func:`ast.literal_eval`, so no
name, attribute, nested call or operator is ever evaluated. Integers beyond the int64 range are
refused (hex literals of any length would bypass Python's 4300-digit limit on decimal literals).

Text is measured before :mod:`ast` sees it (:data:`MAX_CALL_CHARS`, :data:`MAX_STEP_CHARS`), and
every error the parser or :func:`ast.literal_eval` can raise on hostile text (``SyntaxError``,
``ValueError``, ``RecursionError``, ``MemoryError``, also from deeply nested brackets or operators)
ends as a refusal, never as an exception out of :func:`parse_call` or :func:`decode_calls`. A
repeated keyword argument is refused, as Python refuses ``f(a=1, a=2)``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

# Bounds on the work one model-written call can do; a call beyond them is an error result.
# An integer literal argument must fit in int64. The largest in the ground truth of the 800
# multi-turn entries is 987654 (a ticket id), so every ground-truth call is accepted, and so are
# ids, amounts or card numbers a model writes as ints; hex literals of any length are not (they
# bypass Python's 4300-digit limit on decimal literals).
MAX_INT_LITERAL = 2**63 - 1
# Longest call string accepted (the longest of the 800 ground truths has 6,839 characters: an
# ``echo`` of a long text) and longest model step decoded (a list of calls); longer text is refused
# before it is parsed, since parsing takes time and memory in proportion to it.
MAX_CALL_CHARS = 100_000
MAX_STEP_CHARS = 1_000_000
# What ast can raise on hostile text (deep nesting: RecursionError or MemoryError).
_PARSE_ERRORS = (SyntaxError, ValueError, TypeError, RecursionError, MemoryError)


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
    sign, ``*args``/``**kwargs``, a repeated keyword argument, anything that is not one call
    expression, integers (also inside containers) beyond :data:`MAX_INT_LITERAL` in magnitude, and
    text longer than :data:`MAX_CALL_CHARS`.
    """
    if not isinstance(text, str):
        raise UnsafeCallError(f"expected a call string, got {type(text).__name__}")
    if len(text) > MAX_CALL_CHARS:
        raise UnsafeCallError(f"call of {len(text)} characters is longer than {MAX_CALL_CHARS}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except _PARSE_ERRORS as e:
        raise UnsafeCallError(f"not a Python call expression: {_message(e)}") from None
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
        if k.arg in kwargs:
            raise UnsafeCallError(f"keyword argument repeated: {k.arg}")
        kwargs[k.arg] = _literal(k.value, f"{node.func.id}: argument {k.arg!r}")
    return ParsedCall(node.func.id, tuple(args), kwargs)


def _literal(node: ast.AST, where: str) -> Any:
    try:
        value = ast.literal_eval(node)
    except _PARSE_ERRORS:
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


def _message(e: BaseException) -> str:
    try:
        return str(e)
    except Exception:
        return type(e).__name__


def decode_calls(text: str) -> list[str] | None:
    """Decode a model step: ``[f(a=1), g(b='x')]`` (or one bare call) -> call strings, else None.

    ``None`` means the text is not a list of calls (plain text: the model ends its turn). An empty
    list ``[]`` decodes to ``[]``. Each call is returned as its normalised source
    (``ast.unparse``); it is not checked for safety here (the executor rejects unsafe ones).
    Surrounding whitespace and a Markdown code fence are ignored. Text longer than
    :data:`MAX_STEP_CHARS`, or that Python cannot parse (also nesting too deep for its parser),
    decodes to ``None``.

    This is the rollouts' own decoder, as each model handler of BFCL has its own; it is not
    ``bfcl_eval``'s default prompting decoder (``default_decode_execute_prompting``), which keeps only
    keyword arguments (``cd('document')`` runs as ``cd()``, and fails), strips backticks from both ends
    (so a fenced ```` ```python ```` answer does not parse there) and adds a missing ``[`` or ``]``. Here
    positional arguments are kept and run, a fence is accepted, and a bracket is never added. The verdict on
    decoded calls is the official checker's (:mod:`shiq_eval.bfcl.checker`).
    """
    if not isinstance(text, str) or len(text) > MAX_STEP_CHARS:
        return None
    s = text.strip()
    if s.startswith("```"):
        s = s.strip("`")
        if s.startswith(("python", "json")):
            s = s.split("\n", 1)[1] if "\n" in s else ""
        s = s.strip()
    try:
        node = ast.parse(s, mode="eval").body
    except _PARSE_ERRORS:
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
