"""Leaderboard: the result folders of ``shiq-eval run`` merged into one table (SHIQ_MATH §6, §9).

One row per (suite, run, step): mean reward, KL (the suite's estimator) and ``J = R − β·KL`` at the run's
own ``β`` (the reference's ``J`` is its reward), each with its standard error over prompts, recomputed
from every completion's values in ``results.json`` (a prompt's samples averaged first, so samples of one
prompt are not counted as independent). ``J`` is a policy's only when the samples are that policy's: rows
sampled at a temperature other than 1 (the reward of the tempered policy, the KL of the model itself) get
none, with a note (rows without a ``temperature`` were sampled at 1, the default). A Q♯ row (method
``qsharp``: a value model guiding the reference) is one policy per decoding ``β`` and top-k, so those are part
of its run label (:func:`run_label`). For each pair of runs on the same prompts, at each run's last step, the
paired difference ``a − b`` of reward and of ``J`` with its standard error
(:func:`shiq_eval.optimum.paired_difference`); the ``J`` difference only at one ``β`` (or against the
reference, whose ``J`` is its reward at any ``β``): ``J`` at two ``β`` is two objectives (SHIQ_MATH §9).
Rows of different suites (fingerprints) are refused unless mixing is asked for.

BFCL turns (scorer ``bfcl``, one prompt per turn of a multi-turn scenario) are not independent: a scenario's
turns share its functions and state. When the results keep each turn's scenario (``scenario_ids``, one BFCL
entry id per prompt, written by ``shiq-eval run`` for the ``bfcl`` scorer), every standard error, of the
table and of the paired differences, is clustered by scenario (SHIQ_MATH §9,
:func:`shiq_eval.optimum.clustered_mean_stderr`, the estimator of ``shiq-bfcl``'s report). Results of one
suite and prompt set name the same turns, so their scenario ids are shared by every row of that prompt set.
BFCL results written before the ids were recorded keep the plain per-turn standard error, and their
``stderr_note`` (and the Markdown/HTML) says it is not clustered.

Outputs: ``leaderboard.csv``, ``pairs.csv``, ``leaderboard.md``, ``leaderboard.html`` (self-contained:
the plots are embedded as PNG), ``reward_vs_kl.png``, ``reward_vs_step.png``, ``j_vs_step.png``.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np

from shiq_data.cli_common import plural
from shiq_data.io import atomic_write_text, files_together, json_loads, one_line, read_json_file
from shiq_data.schema import VALUE_MAX, is_bounded_number
from shiq_eval.optimum import (
    clustered_mean_stderr,
    j_per_prompt,
    mean_stderr,
    paired_difference,
    per_prompt,
    t_quantile,
)
from shiq_eval.report import csv_text, markdown_cell, plot_curves, plot_j_vs_step
from shiq_eval.suite import content_sha256

RESULTS = "results.json"
SUITE = "suite.json"  # written beside results.json by shiq-eval run: the suite's content (its scorer)
# optional results.json field: the scenario (BFCL entry id) of each prompt (turn), in prompt order
SCENARIO_IDS = "scenario_ids"
NOT_CLUSTERED = (
    "not clustered: these BFCL results keep no scenario ids (written before they were recorded), so the "
    "standard errors treat every turn as independent and are too small if a scenario's turns are correlated"
)
# what a results.json row must hold to be ranked (shiq-eval run writes all of them)
REQUIRED = (
    "run",
    "method",
    "beta",
    "step",
    "suite",
    "suite_sha256",
    "prompt_set_sha256",
    "samples_per_prompt",
    "kl_estimator",
    "model_sha256",
    "rewards",
    "kls_exact",
    "kls_sample",
)
COLUMNS = [
    "suite",
    "run",
    "method",
    "beta",
    "top_k",
    "step",
    "prompts",
    "units",  # what the standard errors are over: prompts, or scenarios (one: no standard error)
    "samples_per_prompt",
    "temperature",
    "reward_mean",
    "reward_stderr",
    "kl_estimator",
    "kl",
    "kl_stderr",
    "J",
    "J_stderr",
    "J_note",
    "stderr_note",
    "model_sha256",
    "prompt_set_sha256",
    "suite_sha256",
    "source",
]
PAIR_COLUMNS = [
    "suite",
    "run_a",
    "step_a",
    "run_b",
    "step_b",
    "prompts",
    "units",
    "reward_diff",
    "reward_diff_stderr",
    "J_diff",
    "J_diff_stderr",
    "J_note",
    "stderr_note",
    "prompt_set_sha256",
    "suite_sha256",
]


def read_suite_json(path: Path) -> dict | None:
    """The ``suite.json`` at ``path`` (``{"sha256", "content", ...}``, as ``shiq-eval run`` writes it), or None when
    there is none or it cannot be read; a ``ValueError`` naming it when its content is not the one its ``sha256``
    fingerprints (:func:`shiq_eval.suite.content_sha256`): an edited file, whose scorer or settings would be
    taken for those of the results' suite."""
    try:
        suite = json_loads(path.read_text(encoding="utf-8"))
        sha, content = suite["sha256"], suite["content"]
        if not isinstance(content, dict):
            return None
        matches = content_sha256(content) == sha
    except (OSError, ValueError, TypeError, KeyError, RecursionError):  # (nested past Python's limit)
        return None
    if not matches:
        raise ValueError(
            f"{path}: its content does not hash to its field 'sha256' ({one_line(str(sha), 64)}): the file was "
            "edited, so its scorer and settings cannot be taken for the suite's; restore it or delete it"
        )
    return suite


def suite_scorer(path: Path) -> tuple[str, str] | None:
    """``(suite_sha256, scorer)`` of the ``suite.json`` at ``path`` (None when there is none or it cannot be
    read; a ``ValueError`` when its content is not what its ``sha256`` fingerprints, :func:`read_suite_json`):
    how a BFCL result row written before rows kept their scenario ids is told from results whose prompts are
    independent."""
    suite = read_suite_json(path)
    if suite is None or "scorer" not in suite["content"]:
        return None
    return str(suite["sha256"]), str(suite["content"]["scorer"])


def read_results(folders) -> list[dict]:
    """Every row of ``FOLDER/results.json`` (or of the JSON file itself) of each folder, with its ``source``
    file and, when the row does not name it, its ``scorer`` from the ``suite.json`` beside it if that is the
    row's suite (:func:`suite_scorer`; else None); a row without the fields of :data:`REQUIRED` is refused
    naming the file and row."""
    rows = []
    for folder in folders:
        path = Path(folder)
        path = path if path.is_file() else path / RESULTS
        if not path.is_file():
            raise ValueError(f"{folder}: no {RESULTS} (expected an --out folder of shiq-eval run)")
        try:
            data = read_json_file(path)
        except ValueError as e:  # a file given by name: a shell glob over result folders catches their plots too
            if path.name == RESULTS:
                raise
            raise ValueError(
                f"{folder}: not an --out folder of shiq-eval run nor a results file ({one_line(e, 120)})"
            ) from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError(f"{path}: expected a list of result rows (objects)")
        if not data:
            raise ValueError(f"{path}: no result rows (an empty list)")
        suite = suite_scorer(path.parent / SUITE)
        for i, row in enumerate(data):
            missing = [k for k in REQUIRED if k not in row]
            if missing:
                raise ValueError(
                    f"{path}: row {i} has no {missing} (written before runs had labels and suites?): rerun "
                    "shiq-eval run on its checkpoints"
                )
            _check_row(path, i, row)
            scorer = suite[1] if suite is not None and suite[0] == row["suite_sha256"] else None
            rows.append({"scorer": scorer, **row, "source": str(path)})
    return rows


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _text(v) -> bool:
    """A string that can be written as UTF-8 (no lone surrogate)."""
    if not isinstance(v, str):
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def bounded_numbers(values: list) -> bool:
    """Whether every item of ``values`` is a number in ``[-1e100, 1e100]`` (:func:`is_bounded_number`). A list of
    floats only, what ``results.json`` holds (every reward and KL is written with a fraction or an exponent), is
    checked as one numpy array: a leaderboard reads every completion's values of every folder, millions of them
    for a hundred folders of a few thousand prompts, and one call per value was most of its time. Any other
    list is checked item by item, with the same answer."""
    if all(type(x) is float for x in values):
        a = np.fromiter(values, dtype=np.float64, count=len(values))
        return bool(np.all(np.abs(a) <= VALUE_MAX))  # (NaN compares False, as infinity fails the bound)
    return all(is_bounded_number(x) for x in values)


# what each field of a result row must be, as shiq-eval run writes it (a hand-edited or foreign file otherwise)
ROW_FIELDS = {
    "run": ("a non-empty string", lambda v: _text(v) and v != ""),
    "method": ("a non-empty string", lambda v: _text(v) and v != ""),
    "beta": ("null or a number in (0, 1e100]", lambda v: v is None or (is_bounded_number(v) and v > 0)),
    "step": ("an integer >= 0", lambda v: _int(v) and v >= 0),
    "suite": ("a string", _text),
    "suite_sha256": ("a string", _text),
    "prompt_set_sha256": ("a string", _text),
    "prompt_ids_sha256": ("a string or null", lambda v: v is None or _text(v)),
    "model_sha256": ("a string or null", lambda v: v is None or _text(v)),
    "samples_per_prompt": ("an integer >= 1", lambda v: _int(v) and v >= 1),
    "kl_estimator": ("'exact' or 'sample'", lambda v: v in ("exact", "sample")),
    "rewards": (  # (an empty one had no mean: numpy's shape error, naming no row or field)
        "a non-empty list of numbers in [-1e100, 1e100]",
        lambda v: isinstance(v, list) and v != [] and bounded_numbers(v),
    ),
    "temperature": ("null or a number in (0, 1e100]", lambda v: v is None or (is_bounded_number(v) and v > 0)),
    "top_k": ("null or an integer >= 1", lambda v: v is None or (_int(v) and v >= 1)),
    SCENARIO_IDS: ("null or a list of strings", lambda v: v is None or (isinstance(v, list) and all(map(_text, v)))),
}


def _check_row(path: Path, i: int, row: dict) -> None:
    """Refuse, naming the file, row and field, a result row whose fields are not of the kind
    :data:`ROW_FIELDS` gives (and whose KL list for its estimator is not a list)."""
    for field, (kind, ok) in ROW_FIELDS.items():
        if field in row and not ok(row[field]):
            raise ValueError(f"{path}: row {i}: field {field!r}: must be {kind}, got {json.dumps(row[field])[:60]}")
    kls = "kls_exact" if row["kl_estimator"] == "exact" else "kls_sample"
    if not isinstance(row.get(kls), list) or not bounded_numbers(row[kls]):
        raise ValueError(
            f"{path}: row {i}: field {kls!r}: must be a list of numbers in [-1e100, 1e100] (the suite's KL estimator)"
        )
    if len(row[kls]) != len(row["rewards"]):
        raise ValueError(f"{path}: row {i}: field {kls!r}: {len(row[kls])} values for {len(row['rewards'])} rewards")
    ids = row.get(SCENARIO_IDS)
    if isinstance(ids, list) and len(ids) * row["samples_per_prompt"] != len(row["rewards"]):
        raise ValueError(
            f"{path}: row {i}: field {SCENARIO_IDS!r}: {len(ids)} scenarios for {len(row['rewards'])} rewards, "
            f"{row['samples_per_prompt']} per prompt (one scenario per prompt)"
        )


def check_suites(rows: list[dict], allow_mixed: bool) -> None:
    """Refuse rows of different suite fingerprints (naming the two files), unless ``allow_mixed``."""
    if allow_mixed or not rows:
        return
    first = rows[0]
    for row in rows[1:]:
        if row["suite_sha256"] != first["suite_sha256"]:
            raise ValueError(
                f"{first['source']} (suite {first['suite']}, fingerprint {first['suite_sha256'][:12]}) and "
                f"{row['source']} (suite {row['suite']}, fingerprint {row['suite_sha256'][:12]}) measure different "
                "suites, so their numbers are not comparable: leave one out, or merge anyway with --allow-mixed"
            )


def run_label(row: dict) -> str:
    """The run a result row belongs to in the leaderboard: its ``run``, and for a Q♯ row (method ``qsharp``)
    also its decoding ``β`` and top-k, the settings that make the guided policy (one value model at two ``β``
    is two policies, under one folder name and one weights SHA-256)."""
    if row["method"] != "qsharp":
        return row["run"]
    settings = [f"β {row['beta']:.15g}" if row.get("beta") is not None else "β ?"]  # (every digit that tells two apart)
    if row.get("top_k") is not None:
        settings.append(f"top-k {row['top_k']}")
    return f"{row['run']} [{', '.join(settings)}]"


def temperature_of(row: dict) -> float:
    """The sampling temperature of a result row (1, the default, for rows written before it was recorded)."""
    t = row.get("temperature")
    return 1.0 if t is None else float(t)


def scenario_of(entry_id: str) -> str:
    """The scenario of a BFCL entry id (``multi_turn_miss_func_12`` -> ``12``), what standard errors cluster by: a
    scenario's entries in the four multi-turn categories share its functions, initial state and (almost always)
    questions, so their turns are no more independent than one entry's (SHIQ_MATH §9). An id without an index is
    its own scenario."""
    _, sep, index = entry_id.rpartition("_")
    return index if sep and index.isascii() and index.isdigit() else entry_id


def scenario_ids(rows: list[dict]) -> dict[tuple[str, str], list[str]]:
    """The scenario of each prompt (``scenario_ids``, ``[P]``) per ``(suite_sha256, prompt_set_sha256)``, from
    the rows that keep them: one suite's prompt set is one list of turns (the prompts' SHA-256 covers the
    ``ENTRY_ID:TURN`` scorer prompts), so rows of it that keep no ids (older files) share them; the clusters of
    the standard errors (SHIQ_MATH §9). Two rows of one prompt set naming different scenarios are refused naming
    the files (ids that are not a list of strings, by :func:`read_results`, naming the row and field). Each id
    is returned as its scenario (:func:`scenario_of`)."""
    out, where = {}, {}
    for row in rows:
        ids = row.get(SCENARIO_IDS)
        if ids is None:
            continue
        key = (row["suite_sha256"], row["prompt_set_sha256"])
        if key in out and out[key] != ids:
            raise ValueError(
                f"{where[key]} and {row['source']}: the same prompts (SHA-256 {key[1][:12]}) with different "
                f"{SCENARIO_IDS}: one of the files was edited"
            )
        out[key], where[key] = ids, row["source"]
    return {key: [scenario_of(i) for i in ids] for key, ids in out.items()}


def mean_se(values, scenarios: list[str] | None) -> tuple[float, float]:
    """Mean of per-prompt values ``[P]`` and its standard error (SHIQ_MATH §9): over prompts
    (:func:`shiq_eval.optimum.mean_stderr`) or, given each prompt's scenario (``[P]``), clustered by scenario
    (:func:`shiq_eval.optimum.clustered_mean_stderr`)."""
    return mean_stderr(values) if scenarios is None else clustered_mean_stderr(values, scenarios)


def stderr_note(row: dict, scenarios: list[str] | None) -> str:
    """How a row's standard errors were computed, when not simply over independent prompts (SHIQ_MATH §9):
    clustered by scenario, with the number of scenarios ``G`` and the 95% interval's Student t quantile for
    ``G − 1`` degrees of freedom (:func:`shiq_eval.optimum.t_quantile`: with few scenarios ±1.96 standard errors
    covers far less than 95%), or, for BFCL turns without scenario ids, :data:`NOT_CLUSTERED`; "" otherwise."""
    if scenarios is not None:
        g = len(set(scenarios))
        if g < 2:
            return "clustered by scenario (1 scenario: no standard error)"
        return (
            f"clustered by scenario ({g} scenarios; 95% interval ± {t_quantile(g - 1):.2f} standard errors, "
            f"Student's t with {g - 1} degree{'s' if g > 2 else ''} of freedom)"
        )
    return NOT_CLUSTERED if row.get("scorer") == "bfcl" else ""


def summarize(row: dict, scenarios: list[str] | None = None) -> tuple[dict, dict]:
    """``(table row, per-prompt values)`` of one result row: reward, KL (its suite's estimator) and ``J``
    (SHIQ_MATH §9) with standard errors over prompts, or clustered by scenario given each prompt's scenario
    (``scenarios [P]``: BFCL turns, SHIQ_MATH §9; :func:`mean_se`); per-prompt arrays ``[P]`` and the
    ``scenarios``. ``J`` is None, with a ``J_note`` saying why, without a ``β`` or when the samples were drawn at
    a temperature other than 1; ``stderr_note`` says how the standard errors were computed (:func:`stderr_note`)."""
    k = int(row["samples_per_prompt"])
    kls = row["kls_exact"] if row["kl_estimator"] == "exact" else row["kls_sample"]
    where = f"{row['source']}: run {row['run']!r} step {row['step']}"
    try:
        reward, kl = per_prompt(row["rewards"], k), per_prompt(kls, k)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if scenarios is not None and len(scenarios) != reward.size:
        raise ValueError(f"{where}: {len(scenarios)} {SCENARIO_IDS} for {reward.size} prompts")
    temperature = temperature_of(row)
    note = ""
    if temperature != 1.0:  # the reward of the tempered policy, the KL of the untempered one: no policy's J
        j, note = None, f"no J: sampled at temperature {temperature:g}, not 1"
    elif row["method"] == "reference":
        j = reward  # J(π_ref) = E[R]: its KL is 0 at any β
    elif row["beta"] is not None:
        j = j_per_prompt(reward, kl, row["beta"])
    else:
        j, note = None, "no J: no β"
    out = {key: row[key] for key in COLUMNS if key in row}
    out["run"] = run_label(row)
    out["temperature"] = temperature
    out["J_note"] = note
    out["prompts"] = int(reward.size)
    out["units"] = len(set(scenarios)) if scenarios is not None else int(reward.size)  # what a s.e. is over
    out["stderr_note"] = stderr_note(row, scenarios)
    out["reward_mean"], out["reward_stderr"] = mean_se(reward, scenarios)
    out["kl"], out["kl_stderr"] = mean_se(kl, scenarios)
    out["J"], out["J_stderr"] = mean_se(j, scenarios) if j is not None else (None, None)
    return out, {"reward": reward, "J": j, "scenarios": scenarios}


def _natural(text: str) -> list:
    """A sort key that reads the numbers in ``text`` as numbers (``run2`` before ``run10``, ``lr0.25`` before
    ``lr0.3``); text at even places, numbers at odd ones, so two keys always compare."""
    return [float(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+(?:\.\d+)?)", text))]


def _order(row: dict) -> tuple:
    beta = row["beta"] if row["beta"] is not None else float("-inf")
    return (
        row["suite"],
        row["suite_sha256"],
        row["method"] != "reference",
        row["method"],
        beta,
        _natural(row["run"]),
        row["run"],  # (two labels of one number, run1 and run01, are two runs: never interleaved)
        row["step"],
    )


def _measured(row: dict) -> str:
    """What an evaluation measured (its per-sample rewards and KLs), to tell a folder given twice, which
    agrees, from a second evaluation of the same model (the reference of every results folder, a checkpoint
    evaluated on another engine or machine), which may differ."""
    return json.dumps([row.get(k) for k in ("rewards", "kls_exact", "kls_sample")])


def check_runs(rows: list[dict]) -> None:
    """Refuse one run label (:func:`run_label`) on rows of different methods or ``β``: two training runs, whose
    checkpoints would be drawn as one curve and the later one's last step paired as the run's. Rows of one
    label from checkpoints of different run folders (their recorded paths, absolute since evaluations record them
    so) are drawn as one run, said on stderr.
    """
    first: dict = {}
    folders: dict = {}
    for row in rows:
        key = (row["suite_sha256"], run_label(row))
        a = first.setdefault(key, row)
        for field in ("method", "beta"):
            if a.get(field) != row.get(field) and a["source"] == row["source"]:  # one evaluation, one label
                raise ValueError(
                    f"{row['source']}: run {run_label(row)!r} has {field} {a.get(field)} at step {a.get('step')} "
                    f"and {row.get(field)} at step {row.get('step')} (a run resumed with another {field}?): two "
                    "settings under one label; evaluate the step folders apart, each with a label of its own "
                    "(shiq-eval run RUN/checkpoints/step_N --label NAME)"
                )
            if a.get(field) != row.get(field):
                raise ValueError(
                    f"{a['source']} and {row['source']}: run {run_label(row)!r} has {field} {a.get(field)} in one "
                    f"and {row.get(field)} in the other: two runs under one label; give one of them another label "
                    "(shiq-eval run --label)"
                )
        if row["method"] not in ("reference", "qsharp") and isinstance(row.get("checkpoint"), str):
            step = Path(row["checkpoint"])  # RUN/checkpoints/step_N, else a model folder of its own
            folders.setdefault(key[1], set()).add(
                str(step.parent.parent if step.parent.name == "checkpoints" else step)
            )
    for label, where in folders.items():
        if len(where) > 1:
            print(
                f"shiq-eval: run {label!r} has checkpoints of {len(where)} run folders ({', '.join(sorted(where))}): "
                "drawn as one run; if they are several, give each its own label (shiq-eval run --label)",
                file=sys.stderr,
            )


# what every row of one suite fingerprint shares, as the fingerprint covers it (the count of its completions: the
# prompts times the samples per prompt), and how a message names it
SUITE_WIDE = (
    ("samples_per_prompt", "samples per prompt"),
    ("rewards", "completions"),
    ("kl_estimator", "KL estimators"),
    ("temperature", "temperatures"),
)


def check_prompt_sets(rows: list[dict]) -> None:
    """Refuse rows of one suite fingerprint with different prompt sets, or other settings (:data:`SUITE_WIDE`):
    the fingerprint covers the prompt set and the settings, so only a hand-edited file has them, and its rows
    would be listed and drawn as one suite's (a row's prompts averaged over another grouping of its completions,
    their standard error over another count, a KL of the other estimator under the suite's heading). Refuse too rows
    whose prompts were encoded into different token ids (``prompt_ids_sha256``: the reference's tokenizer or chat
    template, or ``--tokenizer``, which the fingerprint does not cover); rows without the field are not checked."""
    first: dict = {}
    encoded: dict = {}
    for row in rows:
        a = first.setdefault(row["suite_sha256"], row)
        if a["prompt_set_sha256"] != row["prompt_set_sha256"]:
            raise ValueError(
                f"{a['source']} and {row['source']}: one suite fingerprint ({row['suite_sha256'][:12]}…) with two "
                "prompt sets (field 'prompt_set_sha256'): the suite's fingerprint covers its prompts, so one of "
                "the files was edited"
            )
        for field, shown in SUITE_WIDE:
            x, y = (len(r[field]) if field == "rewards" else r.get(field) for r in (a, row))
            if x != y and None not in (x, y):  # (a temperature is null in results written before it was recorded)
                raise ValueError(
                    f"{a['source']} and {row['source']}: one suite fingerprint ({row['suite_sha256'][:12]}…) with "
                    f"{x} and {y} {shown} (field {field!r}, run {row['run']!r} step {row['step']}): the suite's "
                    "fingerprint covers its prompts and settings, so one of the files was edited"
                )
        if row.get("prompt_ids_sha256") is None:  # (written before the token ids were recorded)
            continue
        b = encoded.setdefault(row["suite_sha256"], row)
        if b["prompt_ids_sha256"] != row["prompt_ids_sha256"]:
            raise ValueError(
                f"{b['source']} and {row['source']}: the suite's prompts (fingerprint {row['suite_sha256'][:12]}…) "
                "were encoded into other token ids (field 'prompt_ids_sha256': another tokenizer or chat template), "
                "so the models saw other prompts and their numbers are not comparable: make one leaderboard per "
                "tokenizer"
            )


def build(
    rows: list[dict], allow_mixed: bool = False, against: list[str] | None = None
) -> tuple[list[dict], list[dict]]:
    """``(table, pairs)`` from result rows (:func:`read_results`): the table one row per (suite, run, step)
    in suite, loss, β, run, step order (the run as :func:`run_label` gives it: a Q♯ row's with its β and
    top-k); the pairs every two runs of one suite on the same prompts, each at its last step, ``a − b`` with
    ``b`` the earlier in table order, the ``J`` difference only at one ``β`` (:func:`j_comparable`). Standard
    errors, and those of the differences (paired by prompt), are clustered by scenario where the prompt set's
    scenario ids are known (:func:`scenario_ids`; SHIQ_MATH §9). ``against``: run labels (e.g. ``reference``);
    only the pairs with one of them are formed (every pair of ``n`` runs is ``n (n − 1) / 2`` of them)."""
    check_suites(rows, allow_mixed)
    check_prompt_sets(rows)
    check_runs(rows)
    ids = scenario_ids(rows)
    seen, table, values = {}, [], []
    measured: dict[tuple, str] = {}  # _measured of seen[key], made once: every folder repeats the reference's row
    other_refs: dict[tuple, dict] = {}  # the reference evaluated again with other results: said once, below
    for row in rows:
        label = run_label(row)
        key = (row["suite_sha256"], label, row["step"])
        if key in seen:
            if seen[key]["model_sha256"] != row["model_sha256"]:
                if row["method"] == "qsharp":  # (labelled by its folder: --label does not apply)
                    raise ValueError(
                        f"{seen[key]['source']} and {row['source']}: the Q♯ value model {label!r} step {row['step']} "
                        "has two hashes: another value model in that folder, or one evaluation made before its "
                        "value_model.json was hashed with its weights; evaluate the older one again"
                    )
                if row["method"] == "reference":  # (its label is fixed: --label cannot tell two references apart)
                    raise ValueError(
                        f"{seen[key]['source']} and {row['source']}: evaluated against two different reference "
                        "models (different weights SHA-256), whose runs' KLs and J are not comparable: make one "
                        "leaderboard per reference"
                    )
                raise ValueError(
                    f"{seen[key]['source']} and {row['source']}: run {label!r} step {row['step']} names two "
                    "different models (different weights SHA-256): give one of them another label (shiq-eval run "
                    "--label)"
                )
            if key not in measured:
                measured[key] = _measured(seen[key])
            differs = measured[key] != _measured(row)
            if differs and row["method"] == "reference":
                other_refs.setdefault(key, {})[row["source"]] = None  # (a folder given twice: once)
            elif differs:  # one model, two evaluations: say which is shown
                print(
                    f"shiq-eval: run {label!r} step {row['step']} is one model evaluated twice with other results "
                    f"(another engine, seed or machine): {seen[key]['source']} is shown, {row['source']} left out "
                    "(the folder given first wins; leave one out to choose)",
                    file=sys.stderr,
                )
            continue
        seen[key] = row
        t, v = summarize(row, ids.get((row["suite_sha256"], row["prompt_set_sha256"])))
        table.append(t)
        values.append(v)
    for key, sources in other_refs.items():  # each result folder holds the reference's evaluation: one line
        first = seen[key]
        print(
            f"shiq-eval: the reference (suite {first['suite']}, fingerprint {first['suite_sha256'][:12]}) is evaluated "
            f"with other results in {len(sources)} more folder(s) (another engine, seed or machine; the first: "
            f"{next(iter(sources))}): {first['source']}'s is shown, with every folder's runs",
            file=sys.stderr,
        )
    if against:
        runs = {t["run"] for t in table}
        if unknown := [a for a in against if a not in runs]:
            raise ValueError(
                f"--against {unknown[0]!r} names no run of these results (runs: {', '.join(sorted(runs)[:8])}"
                f"{', ...' if len(runs) > 8 else ''})"
            )
        for sha in dict.fromkeys(t["suite_sha256"] for t in table):  # (mixed suites: one may hold none of them)
            rows_of = [t for t in table if t["suite_sha256"] == sha]
            if not any(t["run"] in against for t in rows_of):
                print(
                    f"shiq-eval: suite {rows_of[0]['suite']} (fingerprint {sha[:12]}) holds none of the --against "
                    "runs: no paired differences for it",
                    file=sys.stderr,
                )
    order = sorted(range(len(table)), key=lambda i: _order(table[i]))
    table, values = [table[i] for i in order], [values[i] for i in order]
    last = {}
    for i, t in enumerate(table):  # each run's last step, per suite and prompt set
        key = (t["suite_sha256"], t["prompt_set_sha256"], t["run"])
        if key not in last or t["step"] > table[last[key]]["step"]:
            last[key] = i
    finals = sorted(last.values())
    pairs = []
    for x, b in enumerate(finals):
        for a in finals[x + 1 :]:
            ta, tb = table[a], table[b]
            if (ta["suite_sha256"], ta["prompt_set_sha256"]) != (tb["suite_sha256"], tb["prompt_set_sha256"]):
                continue
            if against and ta["run"] not in against and tb["run"] not in against:
                continue
            pair = {
                "suite": ta["suite"],
                "run_a": ta["run"],
                "step_a": ta["step"],
                "run_b": tb["run"],
                "step_b": tb["step"],
                "prompts": ta["prompts"],
                "units": ta["units"],
                "prompt_set_sha256": ta["prompt_set_sha256"],
                "suite_sha256": ta["suite_sha256"],
                "stderr_note": ta["stderr_note"],  # one prompt set: the same scenarios (or none) for a and b
            }
            clusters = values[a]["scenarios"]
            try:
                pair["reward_diff"], pair["reward_diff_stderr"] = paired_difference(
                    values[a]["reward"], values[b]["reward"], clusters
                )
            except ValueError as e:  # one prompt set's SHA-256, another number of prompts: a hand-edited file
                raise ValueError(
                    f"runs {ta['run']!r} ({ta['source']}) and {tb['run']!r} ({tb['source']}) name one prompt set "
                    f"({ta['prompt_set_sha256'][:12]}) but differ in its prompts: {e}"
                ) from None
            note = j_comparable(ta, tb)
            if not note:
                pair["J_diff"], pair["J_diff_stderr"] = paired_difference(values[a]["J"], values[b]["J"], clusters)
            else:
                pair["J_diff"], pair["J_diff_stderr"] = None, None
            pair["J_note"] = note
            pairs.append(pair)
    return table, pairs


def j_comparable(a: dict, b: dict) -> str:
    """Why the ``J`` of two table rows may not be subtracted ("" when it may): a row without ``J``, or two
    ``β``. ``J`` at two ``β`` is two objectives (SHIQ_MATH §9); the reference's ``J`` (its reward, KL 0) is its
    ``J`` at every ``β``, so it compares with any run."""
    for t in (a, b):
        if t["J"] is None:
            return f"no J difference: {t['run']} has no J"
    if "reference" in (a["method"], b["method"]):
        return ""
    if not math.isclose(a["beta"], b["beta"], rel_tol=1e-12, abs_tol=0.0):
        return f"no J difference: β {a['beta']!r} ≠ {b['beta']!r}, two objectives"
    return ""


def _pm(mean, se, note: str = "", units: int = 2) -> str:
    """``mean ± se``; ``± –`` over one prompt or scenario, which measures no spread (its s.e. NaN, undefined)."""
    if mean is None:
        return f"– ({note})" if note else ""
    return f"{mean:.4g} ± {se:.2g}" if units > 1 else f"{mean:.4g} ± –"


def _cells(t: dict) -> list[str]:
    beta = "" if t["beta"] is None else f"{t['beta']:g}"
    weights = (t["model_sha256"] or "")[:12]
    n = t["units"]
    return [t["run"], t["method"], beta, str(t["step"]), _pm(t["reward_mean"], t["reward_stderr"], units=n)] + [
        _pm(t["kl"], t["kl_stderr"], units=n),
        _pm(t["J"], t["J_stderr"], t.get("J_note", ""), n),
        weights,
    ]


HEADER = ["run", "loss", "β", "step", "reward ± s.e.", "KL ± s.e.", "J ± s.e.", "weights sha256"]
PAIR_HEADER = ["a", "b", "reward a − b ± s.e.", "J a − b ± s.e."]


def _pair_cells(p: dict) -> list[str]:
    return [
        f"{p['run_a']} @ {p['step_a']}",
        f"{p['run_b']} @ {p['step_b']}",
        _pm(p["reward_diff"], p["reward_diff_stderr"], units=p["units"]),
        _pm(p["J_diff"], p["J_diff_stderr"], p.get("J_note", ""), p["units"]),
    ]


def _stderr_line(rows: list[dict]) -> str:
    """What the standard errors of a suite's rows are (SHIQ_MATH §9), when not simply over prompts."""
    notes = [n for n in dict.fromkeys(t["stderr_note"] for t in rows) if n]
    if any(t["units"] < 2 for t in rows):
        notes.append("none (–) over a single prompt or scenario")
    return f"Standard errors (and those of the differences): {'; '.join(notes)}." if notes else ""


def _pairing(rows: list[dict]) -> str:
    """How a suite's paired differences are formed and their standard errors computed (SHIQ_MATH §9)."""
    clustered = all(t["stderr_note"].startswith("clustered") for t in rows)
    return "paired by turn, clustered by scenario" if clustered else "paired by prompt"


def _flat(content, prefix: str = "") -> dict:
    """A suite's settings as ``{dotted key: value}`` (``sampling.max_new_tokens``)."""
    if not isinstance(content, dict):
        return {prefix[:-1]: content} if prefix else {}
    return {k: v for key, value in content.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def _suite_settings(table: list[dict]) -> dict[str, dict]:
    """``{fingerprint: settings}`` (:func:`_flat` of the ``suite.json`` beside a row's results file, where it is
    that suite's) of the suites whose name another suite of the table has: what tells them apart."""
    names: dict[str, set] = {}
    for t in table:
        names.setdefault(t["suite"], set()).add(t["suite_sha256"])
    settings = {}
    for t in table:
        sha = t["suite_sha256"]
        if len(names[t["suite"]]) < 2 or sha in settings or t.get("source") is None:
            continue
        try:  # (an edited file, whose content is not its fingerprint's, is unknown settings too)
            suite = read_suite_json(Path(t["source"]).parent / SUITE)
        except ValueError:
            continue
        if suite is not None and suite["sha256"] == sha:
            settings[sha] = _flat(suite["content"])
    return settings


def _differing(sha: str, name: str, table: list[dict], settings: dict[str, dict]) -> str:
    """The settings of suite ``sha`` that differ in another suite named ``name`` (``key=value, ...``)."""
    mine = settings.get(sha)
    others = [
        settings.get(o) for o in dict.fromkeys(t["suite_sha256"] for t in table if t["suite"] == name) if o != sha
    ]
    if mine is None or not others or any(o is None for o in others):
        return ""
    keys = sorted(k for k in mine.keys() | set().union(*others) if any(o.get(k) != mine.get(k) for o in others))
    return ", ".join(f"{k}={mine.get(k)}" for k in keys if k != "name")


def _groups(table: list[dict], pairs: list[dict]):
    """``(title, table rows, pairs)`` per suite fingerprint, in table order. Suites of one name (one run with
    other settings than the suite file's) name the settings that tell them apart."""
    out = []
    settings = _suite_settings(table)
    for sha in dict.fromkeys(t["suite_sha256"] for t in table):
        rows = [t for t in table if t["suite_sha256"] == sha]
        first = rows[0]
        temperature = temperature_of(first)  # (part of the fingerprint: one per suite)
        differing = _differing(sha, first["suite"], table, settings)
        title = (
            f"suite {first['suite']} (fingerprint {sha[:12]}; {first['prompts']} prompt{'s' * (first['prompts'] != 1)} x "
            f"{first['samples_per_prompt']} sample{'s' * (first['samples_per_prompt'] != 1)}; KL: {first['kl_estimator']}"
            f"{'' if temperature == 1.0 else f'; temperature {temperature:g}'}"
            f"{f'; {differing}' if differing else ''})"
        )
        out.append((title, rows, [p for p in pairs if p["suite_sha256"] == sha]))
    return out


def markdown(table: list[dict], pairs: list[dict]) -> str:
    """The leaderboard as Markdown: per suite, the table and the paired differences."""

    def md_table(header, lines):
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return out + ["| " + " | ".join(markdown_cell(c) for c in cells) + " |" for cells in lines]

    lines = ["# Leaderboard", ""]
    for title, rows, group_pairs in _groups(table, pairs):
        lines += [f"## {markdown_cell(title)}", ""]  # (a suite name as written)
        if _stderr_line(rows):
            lines += [_stderr_line(rows), ""]
        lines += md_table(HEADER, [_cells(t) for t in rows]) + [""]
        if group_pairs:
            lines += [f"Paired differences (each run's last step; a − b {_pairing(rows)}):", ""]
            lines += md_table(PAIR_HEADER, [_pair_cells(p) for p in group_pairs]) + [""]
    return "\n".join(lines)


def html_page(table: list[dict], pairs: list[dict], images: dict[str, bytes]) -> str:
    """The leaderboard as one self-contained HTML page: the tables and the plots as embedded PNG."""

    def html_table(header, lines):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in lines)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>shiq leaderboard</title>',
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#f4f4f4}</style>",
        "</head><body><h1>Leaderboard</h1>",
    ]
    for title, rows, group_pairs in _groups(table, pairs):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if _stderr_line(rows):
            parts.append(f"<p>{html.escape(_stderr_line(rows))}</p>")
        parts.append(html_table(HEADER, [_cells(t) for t in rows]))
        if group_pairs:
            parts.append(f"<p>Paired differences (each run's last step; a − b {html.escape(_pairing(rows))}):</p>")
            parts.append(html_table(PAIR_HEADER, [_pair_cells(p) for p in group_pairs]))
    for name, data in images.items():
        encoded = base64.b64encode(data).decode("ascii")
        parts.append(
            f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" src="data:image/png;base64,{encoded}">'
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def plots(table: list[dict], out: Path) -> list[Path]:
    """Reward vs KL, reward vs step and J vs step, one curve per run (per run and suite when mixed), the
    first reference row as the reference."""
    mixed = len({t["suite_sha256"] for t in table}) > 1
    # mixed: a curve per run and suite fingerprint (two suites may share a name: one run with an override);
    # no reference (each suite has its own), and the KL axis names every estimator drawn
    rows = [
        {**t, "run": f"{t['run']} [{t['suite']} {t['suite_sha256'][:8]}]" if mixed else t["run"]}
        for t in table
        if t["method"] != "reference"
    ]
    refs = [t for t in table if t["method"] == "reference"]
    if not rows:
        return []
    ref = refs[0] if refs and not mixed else None
    estimators = " / ".join(sorted({t["kl_estimator"] for t in rows}))
    paths = plot_curves(rows, out, reference=ref, kl_key="kl", kl_name=estimators)
    with_j = [r for r in rows if r["J"] is not None]
    if with_j:
        ref_j = (ref["J"], ref["J_stderr"]) if ref is not None and ref["J"] is not None else None
        paths.append(plot_j_vs_step(with_j, out, ref_j, {}))
    return paths


# every file a leaderboard folder may hold (plots only where the rows have such numbers)
LEADERBOARD_FILES = (
    "leaderboard.csv",
    "pairs.csv",
    "leaderboard.md",
    "leaderboard.html",
    "reward_vs_kl.png",
    "reward_vs_step.png",
    "j_vs_step.png",
)


def earlier_sources(out: Path) -> set[str] | None:
    """The result files (``source``, as real paths) an earlier leaderboard in ``out`` was built from; None when
    ``out`` holds none of :data:`LEADERBOARD_FILES`. A ``ValueError`` when it holds some of them but no
    ``leaderboard.csv`` of this command (one with columns ``run`` and ``source``): another tool's files of those
    names, which a leaderboard written there would replace."""
    out = Path(out)
    present = [name for name in LEADERBOARD_FILES if (out / name).exists()]
    if not present:
        return None
    what = "use another folder for the leaderboard"
    table = out / "leaderboard.csv"
    if not table.is_file():
        raise ValueError(f"--out {out} holds {present[0]} but no leaderboard.csv: not a leaderboard's folder; {what}")
    try:
        with open(table, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
            fields = set(rows[0]) if rows else set()
    except (OSError, ValueError, csv.Error) as e:
        raise ValueError(f"--out {out}: its leaderboard.csv cannot be read ({one_line(e, 120)}); {what}") from None
    if not rows or not {"run", "source"} <= fields or any(not r.get("source") for r in rows):
        raise ValueError(
            f"--out {out} holds a leaderboard.csv that is not one of shiq-eval leaderboard (rows with columns run "
            f"and source); {what}"
        )
    return {os.path.realpath(r["source"]) for r in rows}


def check_replaced(out: Path, rows: list[dict], overwrite: bool) -> bool:
    """Whether ``out`` holds an earlier leaderboard (:func:`earlier_sources`), which the one of ``rows`` may
    replace when it was built from none but these rows' result files (the same leaderboard regenerated, or
    one with more results), or with ``overwrite``; a ``ValueError`` otherwise, naming a result file it would
    lose."""
    before = earlier_sources(out)
    if before is None:
        return False
    lost = sorted(before - {os.path.realpath(r["source"]) for r in rows})
    if lost and not overwrite:
        raise ValueError(
            f"--out {out} holds a leaderboard of other results ({plural(len(lost), 'result file')} "
            f"not among these, e.g. {lost[0]}): give --overwrite to replace it, or another folder"
        )
    return True


def absolute_source(row: dict) -> dict:
    """``row`` with its ``source`` (a result file, as given) as an absolute path, as ``leaderboard.csv`` holds it."""
    return {**row, "source": os.path.abspath(row["source"])} if row.get("source") else row


def write_leaderboard(
    rows: list[dict], out: Path, allow_mixed: bool = False, against: list[str] | None = None
) -> list[Path]:
    """Build the leaderboard of result rows (:func:`build`) and write it to ``out``; returns the files."""
    table, pairs = build(rows, allow_mixed, against)
    out = Path(out)
    with files_together(out, owns=LEADERBOARD_FILES) as stage:  # all or none: never new tables beside old plots
        written = [
            # each source as an absolute path: the next leaderboard into ``out`` (check_replaced) may be built
            # from another working folder, where a relative one would name other files, or none
            atomic_write_text(stage / "leaderboard.csv", csv_text([absolute_source(t) for t in table], COLUMNS)),
            atomic_write_text(stage / "pairs.csv", csv_text(pairs, PAIR_COLUMNS)),
            atomic_write_text(stage / "leaderboard.md", markdown(table, pairs)),
        ]
        images = plots(table, stage)
        page = html_page(table, pairs, {p.name: p.read_bytes() for p in images})
        written.append(atomic_write_text(stage / "leaderboard.html", page))
    return [out / p.name for p in written + images]
