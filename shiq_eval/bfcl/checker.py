"""The state-based checker of BFCL-V3 multi-turn trajectories (the official verdict, cumulative and
reset turn rewards) and the leaderboard-style summary of checked trajectories.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from fractions import Fraction

from shiq_eval.bfcl.budget import MODULE_STATE, Budget, entry_scope
from shiq_eval.bfcl.data import CATEGORIES, MAX_STEPS_PER_TURN, bfcl_version, entry_category, load_entry
from shiq_eval.bfcl.executor import Environment
from shiq_eval.report import markdown_cell

# Official error types (bfcl_eval multi_turn_checker / eval_runner), reused verbatim.
ERR_EMPTY = "multi_turn:empty_turn_model_response"
ERR_STATE = "multi_turn:instance_state_mismatch"
ERR_RESPONSE = "multi_turn:execution_response_mismatch"
ERR_FORCE_QUIT = "multi_turn:force_terminated"
# Longest decoded-trajectory JSON read by :func:`decode_trajectory_json`.
MAX_TRAJECTORY_CHARS = 10_000_000


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


def _validate_decoded(entry_id: str, decoded_turns) -> None:
    if not isinstance(decoded_turns, (list, tuple)):
        raise ValueError(f"{entry_id}: decoded_turns must be a list of turns, got {type(decoded_turns).__name__}")
    for t, steps in enumerate(decoded_turns):
        if not isinstance(steps, (list, tuple)):
            raise ValueError(f"{entry_id}: decoded_turns[{t}] must be a list of steps, got {type(steps).__name__}")
        for s, calls in enumerate(steps):
            if not isinstance(calls, (list, tuple)) or not all(isinstance(c, str) for c in calls):
                raise ValueError(f"{entry_id}: decoded_turns[{t}][{s}] must be a list of call strings")


def decode_trajectory_json(text: str) -> list | None:
    """Decoded turns (turn -> step -> call strings) from JSON text, or None when the text is not
    such JSON, is longer than :data:`MAX_TRAJECTORY_CHARS` or nests too deep for the parser."""
    if not isinstance(text, (str, bytes)) or len(text) > MAX_TRAJECTORY_CHARS:
        return None
    try:
        decoded = json.loads(text)
    except (ValueError, RecursionError, MemoryError):  # JSONDecodeError is a ValueError
        return None
    ok = isinstance(decoded, list) and all(
        isinstance(turn, list)
        and all(isinstance(step, list) and all(isinstance(c, str) for c in step) for step in turn)
        for turn in decoded
    )
    return decoded if ok else None


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


def check_trajectory(
    entry: dict, decoded_turns: Sequence[Sequence[Sequence[str]]], budget: Budget | None = None
) -> dict:
    """Verdict and per-turn rewards of decoded model calls on one entry (see :func:`check_entry`).

    The model's calls (cumulative and reset runs together) share one work ``budget`` (default:
    a fresh :class:`shiq_eval.bfcl.budget.Budget`); past it, each further call is an error result.
    The ground truth runs unbounded. The simulator modules' data is restored before and after.

    Order: the ground truth first runs alone through every turn (deep copies of its state before
    each turn and its results: the reset rewards' reference); then the cumulative run, where per
    turn the model's steps run first and the ground truth's calls second, as in the official
    checker. The order matters only through simulator data shared between instances: the
    long-context ``TravelAPI`` puts the same module-level card dicts into every instance, so the
    model's balance changes show in the cumulative ground truth too (as in the official checker,
    where they never count as a state difference), but never in the reset reference.
    """
    entry_id = entry["id"]
    _validate_decoded(entry_id, decoded_turns)
    with entry_scope():
        return _check(entry, decoded_turns, Budget() if budget is None else budget)


def _check(entry: dict, decoded_turns, budget: Budget) -> dict:
    entry_id, truth = entry["id"], entry["ground_truth"]
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
    # The official inference loop runs the step that goes past MAX_STEPS_PER_TURN, then stops the entry:
    # before the last turn, the later turns are missing (force-terminated by the eval runner); in the last
    # turn, every turn is there and the eval runner checks the entry as any other.
    too_long = [t for t, steps in enumerate(decoded_turns) if len(steps) > MAX_STEPS_PER_TURN + (t == n - 1)]
    if len(decoded_turns) != n or too_long:
        result.update(
            valid=False,
            error_type=ERR_FORCE_QUIT,
            error_message=(
                f"model result has {len(decoded_turns)} turns for {n} ground-truth turns"
                if len(decoded_turns) != n
                else f"turn {too_long[0]} has {len(decoded_turns[too_long[0]])} steps, more than the "
                f"{MAX_STEPS_PER_TURN + (too_long[0] == n - 1)} the official inference loop records"
            ),
        )

    # The ground truth alone, first: its state before each turn and its results, for the reset
    # rewards. The long-context TravelAPI puts the same module-level card dicts
    # (long_context.CREDIT_CARD_EXTENSION) into every instance, so the cumulative ground truth
    # below sees the model's balance changes; these snapshots (deep copies) must not.
    truth_alone = Environment(entry)
    truth_before = [truth_alone.copy()]  # ground-truth state before turn k (k = n: after the last)
    truth_results_per_turn = []
    for k in range(n):
        truth_results_per_turn.append(truth_alone.execute(truth[k]))
        truth_before.append(truth_alone.copy())
    MODULE_STATE.restore()  # the shared module-level data as at the start, for the cumulative run

    # Cumulative: model and ground truth each run through all turns from the initial state; per
    # turn, the model's steps first and the ground truth's calls second, as the official checker.
    model_env, truth_env = Environment(entry, budget), Environment(entry)
    model_results: list[str] = []
    rewards = []
    for k in range(n):
        steps = decoded_turns[k] if k < len(decoded_turns) else None
        for calls in steps or ():
            model_results.extend(model_env.execute(calls))
        truth_results = truth_env.execute(truth[k])
        if steps is None:
            rewards.append(0.0)
            continue
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
        env.budget = budget
        for calls in steps:
            reset_results.extend(env.execute(calls))
        err, _ = _judge_turn(truth[k], steps, env, truth_before[k + 1], reset_results, truth_results_per_turn[k])
        rewards_reset.append(0.0 if err else 1.0)

    result["turn_rewards"] = rewards
    result["turn_rewards_reset"] = rewards_reset
    return result


def check_entry(category: str, entry_id: str | int, decoded_turns: Sequence[Sequence[Sequence[str]]]) -> dict:
    """Check a model's decoded calls on one BFCL multi-turn entry, with per-turn rewards (the verifier's
    score of SHIQ_MATH §6, one per turn).

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
            with fewer or more turns than the ground truth, a turn before the last with more than
            ``MAX_STEPS_PER_TURN`` steps, or a last turn with more than ``MAX_STEPS_PER_TURN + 1``, is
            force-terminated (invalid): the official inference loop runs the step that goes past the
            limit and then stops the entry, so only the last turn of a complete result holds that step.
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


# --------------------------------------------------------------------------------------------
# Leaderboard-style report


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(results: Sequence[dict]) -> dict:
    """Leaderboard-style numbers from checked trajectories (each with ``id``, ``valid``,
    ``turn_rewards``, ``turn_rewards_reset``): mean verifier scores (SHIQ_MATH §6).

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


# Columns of BFCL's multi-turn leaderboard, one per category.
LEADERBOARD_COLUMNS = {
    "multi_turn_base": "Base",
    "multi_turn_miss_func": "Miss Func",
    "multi_turn_miss_param": "Miss Param",
    "multi_turn_long_context": "Long Context",
}
LEADERBOARD_HEADER = ["Rank", "Model", "Multi Turn Overall Acc", *LEADERBOARD_COLUMNS.values(), "Entries"]


def _percent(x: float | None) -> str:
    return "N/A" if x is None else f"{100 * x:.2f}%"


def _rank_key(summary: dict) -> Fraction:
    """A model's overall accuracy (:func:`summarize`) as ranked: exactly, the mean of its categories' fractions
    ``valid / n`` (0 with no category). Its float, the same fractions summed in another order, may differ in the
    last bit, and no rounding of it merges every pair of equal means (two may round to either side of a digit)."""
    cats = list(summary["categories"].values())
    if not cats:
        return Fraction(0)
    return sum(Fraction(round(c["accuracy"] * c["n"]), c["n"]) for c in cats) / len(cats)


def leaderboard_rows(summaries: Mapping[str, dict]) -> list[dict]:
    """One row per model ({name: :func:`summarize` output}) in the shape of BFCL's multi-turn
    leaderboard: rank, model, overall accuracy (the mean of the category accuracies), the accuracy
    of each category (percent with two decimals, ``N/A`` for a category without entries) and the
    number of entries; best overall first. Models of one accuracy share its rank (``1, 1, 3``) and are listed by
    name, ranked by their exact accuracy (:func:`_rank_key`): the mean of the same category accuracies summed in
    another order may differ in its last bit, which ranked them by rounding and, when equal, by the order of the
    files."""
    accuracy = {name: _rank_key(s) for name, s in summaries.items()}
    order = sorted(summaries.items(), key=lambda kv: (-accuracy[kv[0]], kv[0]))
    rows = []
    for name, s in order:
        rank = 1 + sum(a > accuracy[name] for a in accuracy.values())
        row = {"Rank": rank, "Model": name, "Multi Turn Overall Acc": _percent(s["overall"]["accuracy"])}
        for cat, column in LEADERBOARD_COLUMNS.items():
            row[column] = _percent(s["categories"][cat]["accuracy"]) if cat in s["categories"] else "N/A"
        row["Entries"] = s["overall"]["n"]
        rows.append(row)
    return rows


def leaderboard_csv(rows: Sequence[dict]) -> str:
    """:func:`leaderboard_rows` as CSV text (header first)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=LEADERBOARD_HEADER, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def leaderboard_markdown(rows: Sequence[dict]) -> str:
    """:func:`leaderboard_rows` as a Markdown table, each cell shown as written (``shiq_eval.report.markdown_cell``:
    one line, no HTML or Markdown marks)."""
    lines = ["| " + " | ".join(LEADERBOARD_HEADER) + " |", "|" + "---|" * len(LEADERBOARD_HEADER)]
    for row in rows:
        cells = [markdown_cell(row[c]) for c in LEADERBOARD_HEADER]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
