"""BFCL-V3 multi-turn data: the four categories, their entries and ids, function docs, the
train/test split.

The four multi-turn categories (``multi_turn_base``, ``multi_turn_miss_func``,
``multi_turn_miss_param``, ``multi_turn_long_context``; 200 entries each) come from the installed
``bfcl-eval`` package; every report records its version.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import random
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from shiq_data.assets import config_dir
from shiq_data.io import iter_jsonl, json_loads, one_line, type_name

CATEGORIES = (
    "multi_turn_base",
    "multi_turn_miss_func",
    "multi_turn_miss_param",
    "multi_turn_long_context",
)
# The official inference loop force-quits an entry once a turn runs past this many steps.
MAX_STEPS_PER_TURN = 20
SPLIT_PATH = config_dir() / "eval" / "bfcl_split.json"


def bfcl_version() -> str:
    """Version string of the installed ``bfcl-eval`` package (recorded in every report)."""
    return importlib.metadata.version("bfcl-eval")


def _package_dir() -> Path:
    try:
        import bfcl_eval  # heavy: the benchmark package, only when its data is read
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
    from bfcl_eval.constants.executable_backend_config import (  # heavy: the benchmark package
        MULTI_TURN_FUNC_DOC_FILE_MAPPING,
    )

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


def ground_truth_decoded(entry: dict) -> list[list[list[str]]]:
    """The ground truth as decoded turns: one step per turn holding all its calls (none if empty)."""
    return [[list(calls)] if calls else [] for calls in entry["ground_truth"]]


# --------------------------------------------------------------------------------------------
# Train/test split

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
        split = json_loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # (and a number of over 4,300 digits, nesting too deep)
        raise ValueError(f"{path}: cannot read the split ({one_line(e, 200)})") from None
    if not isinstance(split, dict):
        raise ValueError(f"{path}: expected an object with fields n, train and test, got {type_name(split)}")
    for field in ("n", "train", "test"):
        if field not in split:
            raise ValueError(f"{path}: missing field {field!r}")
    n = split["n"]
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 1_000_000:
        raise ValueError(f"{path}: field 'n' must be the number of scenarios (an integer >= 1), got {json.dumps(n)}")
    for field in ("train", "test"):
        if not isinstance(split[field], list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in split[field]
        ):
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
