"""Edited ground truths: decoded turns derived from an entry's ground truth by one checker-scored edit.

Six families, each ``edit(entry, rng) -> decoded turns`` (turn -> step -> call strings) with a
``random.Random``: a dropped call, a wrong argument, an extra call, an empty turn, the calls split
into one step each and shuffled within their turn (often still valid), and a call moved to the end
of the previous turn. They are what the checker's parity tests score against ``bfcl_eval``'s own
checker, and what the multi-turn recipe mixes with the ground truth as offline data: the checker,
not the edit, decides each turn's reward.
"""

from __future__ import annotations

import ast

from shiq_eval.bfcl.data import MAX_STEPS_PER_TURN, ground_truth_decoded


def nonempty_turns(entry: dict) -> list[int]:
    """Indices of the turns whose ground truth has calls."""
    return [k for k, calls in enumerate(entry["ground_truth"]) if calls]


def corrupt_drop_call(entry, rng):
    """One call of a turn with calls removed."""
    d = ground_truth_decoded(entry)
    k = rng.choice(nonempty_turns(entry))
    calls = d[k][0]
    del calls[rng.randrange(len(calls))]
    d[k] = [calls] if calls else []
    return d


def change_argument(call: str, rng) -> str | None:
    """``call`` with one string argument suffixed ``_x`` (else one number plus 7); None if it has neither."""
    tree = ast.parse(call, mode="eval")
    consts = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    nums = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and type(n.value) in (int, float)]
    if consts:
        rng.choice(consts).value += "_x"
    elif nums:
        n = rng.choice(nums)
        n.value = n.value + 7
    else:
        return None
    return ast.unparse(tree)


def corrupt_wrong_args(entry, rng):
    """One argument of one call of a turn changed (see :func:`change_argument`)."""
    d = ground_truth_decoded(entry)
    k = rng.choice(nonempty_turns(entry))
    calls = d[k][0]
    order = list(range(len(calls)))
    rng.shuffle(order)
    for i in order:
        new = change_argument(calls[i], rng)
        if new is not None:
            calls[i] = new
            break
    return d


def corrupt_extra_call(entry, rng):
    """A call of the entry's ground truth repeated as an extra step of a random turn."""
    d = ground_truth_decoded(entry)
    every = [c for calls in entry["ground_truth"] for c in calls]
    k = rng.randrange(len(d))
    d[k] = d[k] + [[rng.choice(every)]]
    return d


def corrupt_empty_turn(entry, rng):
    """No call in a turn whose ground truth has calls."""
    d = ground_truth_decoded(entry)
    d[rng.choice(nonempty_turns(entry))] = []
    return d


def corrupt_split_steps(entry, rng):
    """Same calls, one call per step and shuffled within each turn (often still valid)."""
    d = []
    for calls in entry["ground_truth"]:
        calls = list(calls)
        rng.shuffle(calls)
        # Past MAX_STEPS_PER_TURN steps the entry is force-terminated, which the official
        # multi_turn_checker leaves to the inference loop: keep long turns in one step.
        d.append([[c] for c in calls] if len(calls) <= MAX_STEPS_PER_TURN else [calls] if calls else [])
    return d


def corrupt_shift_call(entry, rng):
    """Move the first call of a turn to the end of the previous turn; on an entry with no call after its
    first turn, :func:`corrupt_drop_call` instead (:func:`edit_name` names it so)."""
    d = ground_truth_decoded(entry)
    ks = [k for k in nonempty_turns(entry) if k > 0]
    if not ks:
        return corrupt_drop_call(entry, rng)
    k = rng.choice(ks)
    first = d[k][0].pop(0)
    if not d[k][0]:
        d[k] = []
    d[k - 1] = d[k - 1] + [[first]]
    return d


CORRUPTIONS = [
    corrupt_drop_call,
    corrupt_wrong_args,
    corrupt_extra_call,
    corrupt_empty_turn,
    corrupt_split_steps,
    corrupt_shift_call,
]


def edit_name(edit, entry: dict) -> str:
    """The name of what ``edit`` does to ``entry``: its family's (``corrupt_`` removed), except ``drop_call`` for
    :func:`corrupt_shift_call` on an entry with no call after its first turn (nothing to shift: it drops one)."""
    if edit is corrupt_shift_call and not [k for k in nonempty_turns(entry) if k > 0]:
        edit = corrupt_drop_call
    return edit.__name__.removeprefix("corrupt_")
