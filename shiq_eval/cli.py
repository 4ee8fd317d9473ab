"""shiq-eval run: reward and KL (SHIQ_MATH §6) of training checkpoints and Hugging Face models, as a table and plots.

Each CHECKPOINT is a shiq-train run directory (every saved step in RUN/checkpoints/; RUN/checkpoints
itself reads alike), one step directory (RUN/checkpoints/step_00000040), or a Hugging Face model folder (one written by shiq-train
export keeps its run's loss, beta and step). Every row carries a run label (default: the run folder's
name; --label, once per CHECKPOINT, in order), the checkpoint step, the SHA-256 of the weight files read,
the suite's name and fingerprint and the SHA-256 of the prompts: two runs of one loss are two rows and
two curves.

What is measured is a suite: --suite NAME reads configs/eval/NAME.yaml (or --suite FILE.yaml): prompts,
scorer, sampling settings (temperature, completion length, samples per prompt, seed, batch size) and the
KL estimator. Scorers: reward_model, hf_reward_model, vader, bfcl (one BFCL turn per prompt, prompts
written by shiq-eval bfcl prompts) and python:MODULE:FUNCTION, a function called as
fn(prompts: list[str], completions: list[str]) -> list[float] (one finite float per completion).
Flags (--prompts, --reward-model, --max-new-tokens, ...) override single settings, or make an unnamed
suite without --suite. The suite's fingerprint (SHA-256 of its resolved settings with the
prompts and scorer as content hashes) is in every row; results are comparable only when fingerprints
agree. Every policy is sampled on the same prompts with the same seed, scored, and compared with the
reference (the runs' initial model) by both KL estimators. Means come with their standard error over prompts
(a prompt's samples averaged first: they are not independent draws). Outputs in --out: results.csv, results.json
(every completion's reward and KL, a few sample completions; with the bfcl scorer also each prompt's scenario,
its BFCL entry id, for standard errors clustered by scenario), suite.json, reward_vs_kl.png,
reward_vs_step.png.

With --guide VALUE_DIR --beta B, the reference guided by a Q♯ value model (trained by shiq-train
loss=qsharp_value; SHIQ_MATH §8) is evaluated the same way, as one more row, method qsharp: sampled
from the reference's top-k tokens reweighted by the value model, its KL the exact per-token KL of the
guided distribution to the reference at the visited states. The checkpoints may then be omitted.

An interrupted run resumes: each row (the reference's, each checkpoint's, the Q♯ row) is saved in
--out/.rows/ as soon as it is computed, and the same command run again reuses the saved rows whose inputs are
unchanged (suite fingerprint, weights SHA-256 and config, reference, tokenizer, engine, label, step, method, beta, top-k;
said in one line) and evaluates only the rest; a row whose inputs changed is evaluated again, as is one whose
saved file is damaged (said on stderr). A row stopped part-way resumes at its first batch not finished: each
finished batch of it (its completions' token ids and both KLs) is saved in --out/.rows/ too, under the row's inputs
and the batch's index, size and prompts, and taken again with the same bits (said in one line; a damaged one is
said on stderr and sampled again); the scorer reads every completion once the row's batches are done. A row's
batches are removed once the row is saved, the saved rows once the results are written. --overwrite discards
them before it evaluates, unless a run given --overwrite saved rows there (the folder records it): the same
command, interrupted, then resumes too (rm -r OUT/.rows evaluates everything again). A run that fails (one line, exit 2) after rows or a row's batches were saved (a scorer that fails once
they are sampled) keeps them, and its line says so: the same command resumes once the cause is fixed.

shiq-eval leaderboard RESULT_DIR... --out DIR merges the results of several runs (see its --help).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

from shiq_data.assets import VADER_SDIST
from shiq_data.buffer import refuse_inside_buffer
from shiq_data.chat import check_messages, control_texts
from shiq_data.cli_common import (
    ArgumentParser,
    add_log_level_option,
    error_message,
    folder_path,
    hide_library_progress_bars,
    int_at_least,
    is_user_error,
    on_sigterm,
    plural,
    progress_bars_shown,
    quiet_optional_dependencies,
    rank_zero,
    run_command,
    setup_logging,
)
from shiq_data.io import (
    STEP_FOLDER,
    RowError,
    atomic_write,
    atomic_write_json,
    check_sha256,
    files_together,
    json_loads,
    make_parents,
    one_line,
    printable,
    read_json_file,
    recorded_folder,
    remove_created_dirs,
    unencodable_field,
    utf8_lines,
    weight_files,
)
from shiq_data.tokenizers import PIPELINE_FIELD, TOKENIZER_FILES, fingerprint, pipeline_fingerprint
from shiq_eval import leaderboard
from shiq_eval.bfcl import cli as bfcl_cli
from shiq_eval.checkpoints import (
    EXPORT_RECORD,
    EvalInputError,
    check_tokenizer_record,
    hf_policy,
    model_sha256,
    policy_infos,
    unsaved_steps,
)
from shiq_eval.moviereviews import movie_prompts
from shiq_eval.optimum import clustered_mean_stderr, error_text, is_error_key, per_prompt, undefined_as_null
from shiq_eval.report import COLUMNS, plot_curves, write_table
from shiq_eval.scorers import (
    PYTHON_PREFIX,
    BFCLTurnScorer,
    PythonFunctionScorer,
    SequenceClassifierScorer,
    VaderScorer,
    parse_turn_ref,
)
from shiq_eval.suite import Suite, content_sha256, load_suite
from shiq_eval.suite import fingerprint as suite_fingerprint

log = logging.getLogger(__name__)
DEFAULT_TOP_K = 20  # Q♯ candidates per token

# results.csv of shiq-eval run: who (run, loss, beta, step), what was measured, on which suite, which weights
RUN_COLUMNS = [
    "run",
    "method",
    "beta",
    "top_k",
    "step",
    *COLUMNS[2:],
    "stderr_note",  # how the standard errors were computed, when not over independent prompts (BFCL turns)
    "n_scenarios",  # the clusters of those standard errors (BFCL turns), empty otherwise
    "samples_per_prompt",
    "temperature",
    "suite",
    "suite_sha256",
    "prompt_ids_sha256",  # the prompts' token ids (tokenizer and chat template), which the fingerprint does not cover
    "kl_estimator",
    "model_sha256",
    "checkpoint",
]


ROWS_FOLDER = ".rows"  # in --out: the rows of a run not finished yet, one JSON file each
# in ROWS_FOLDER: its rows were saved by a run given --overwrite (which discarded the older ones first), so the same
# command run again takes them rather than discarding its own work
OVERWRITING = "overwriting"
ROW_FORMAT = "shiq-eval-row"
BATCH_FORMAT = "shiq-eval-batch"  # a finished batch of a row not finished yet, in the folder named as the row's file
SAVED_BATCH_FIELDS = {"format", "row", "index", "batch_size", "prompts_sha256", "completions", "kl_sample", "kl_exact"}
# the fields cluster_by_scenario adds to an evaluation's result (shiq_eval.evaluate.EvalResult)
CLUSTER_FIELDS = ("stderr_note", "n_scenarios")
SAVED_ROW_FIELDS = {"format", "key", "row", "sha256"}  # a saved row's file


class SavedRows:
    """The rows of a ``shiq-eval run`` saved one by one in ``--out/.rows/`` as each is computed, so that the
    same command run again after an interruption reuses them. A row's file is named by the SHA-256 of its key:
    everything the row depends on (:func:`row_key`); it holds the key, the row and a checksum of both. A file
    that cannot be read, or whose key, checksum or fields do not fit, is said on stderr in one line and the row
    evaluated again (it is data: nothing of it is run). ``read``: whether saved rows may be used (not with
    --overwrite, unless they were saved by a run given it: :meth:`for_run`); ``write``: whether rows are saved
    (rank 0 only); ``overwriting``: the run was given --overwrite, which the folder records (:data:`OVERWRITING`)
    with its first saved row or batch."""

    def __init__(
        self, out: Path, *, read: bool, write: bool, scenarios: bool, batch_size: int = 1, overwriting: bool = False
    ):
        self.folder = Path(out) / ROWS_FOLDER
        self.read, self.write, self.overwriting = read, write, overwriting
        self.scenarios = scenarios  # the rows carry clustered standard errors' fields (BFCL)
        self.batch_size = batch_size  # the evaluation's (the suite's): a saved batch's must be it
        self.reused = 0
        self.saved = 0  # rows saved by this run
        self.batches_reused = 0  # batches of unfinished rows
        self.pending = 0  # the batches of the row being evaluated in the folder: saved by this run or reused

    @classmethod
    def for_run(cls, out: Path, *, overwrite: bool, write: bool, **options) -> SavedRows:
        """The saved rows of a run into ``out``: read unless ``overwrite``, which discards them first (rank 0), but
        for those an interrupted run given --overwrite saved (the same command run again: its own work). Rank 0
        alone discards the folder, and its ``read`` is the one every rank follows (its answer to each look-up is
        taken by all: :meth:`get`), so a rank whose view of the folder differs (another node's stale view) still
        skips what rank 0 skips."""
        resumed = overwrite and (Path(out) / ROWS_FOLDER / OVERWRITING).is_file()
        saved = cls(out, read=not overwrite or resumed, write=write, overwriting=overwrite, **options)
        if overwrite and not resumed:
            saved.discard()
        return saved

    def note_overwriting(self) -> None:
        """Before a row or batch is saved by a run given --overwrite: record it in the folder (:data:`OVERWRITING`)."""
        mark = self.folder / OVERWRITING
        if self.overwriting and not mark.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(mark, lambda p: p.write_text("rows saved by shiq-eval run --overwrite\n"))

    def row(self, key: dict, make, *args) -> dict:
        """The saved row of ``key``, else ``make(*args, journal=...)``'s, saved as soon as it is made; the journal
        (:class:`SavedBatches`) keeps its finished batches until then, so an interrupted row resumes at its first
        batch not saved."""
        row = self.get(key)
        if row is None:
            batches = SavedBatches(self, key)
            row = make(*args, journal=batches)
            self.put(key, row)
            batches.discard()
            self.pending = 0
        return row

    def rank_0s(self, read):
        """``read()`` on rank 0, its answer taken by every rank of the process group (if any), so all skip the same
        evaluations (a rank that saw another answer, a file damaged or not seen there, would wait in another
        collective)."""
        import torch.distributed as dist  # heavy: torch (loaded by then)

        shared = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        found = read() if not shared or dist.get_rank() == 0 else None
        if shared:
            box = [found]
            dist.broadcast_object_list(box, src=0)
            found = box[0]
        return found

    @contextlib.contextmanager
    def said_on_failure(self):
        """Within the block, a user error (:func:`shiq_data.cli_common.is_user_error`, one line and exit 2) says
        too that the rows finished, reused or saved by this run, are kept in :attr:`folder` and the same command
        resumes with them: a folder left beside a failure is otherwise taken for a half-written one."""
        try:
            yield
        except Exception as e:
            kept, batches = self.reused + self.saved, self.pending
            if not (kept or batches) or not is_user_error(e):
                raise
            what = [f"the {kept} rows finished" if kept != 1 else "the row finished"] if kept else []
            what += [f"{plural(batches, 'batch', 'batches')} of an unfinished row"] if batches else []
            verb = "is" if kept + batches == 1 else "are"
            raise EvalInputError(
                f"{error_message(e)}; {' and '.join(what)} {verb} kept in {self.folder}/: the same command resumes "
                "once this is fixed"
            ) from e

    def path(self, key: dict) -> Path:
        return self.folder / f"{content_sha256(key)}.json"

    def get(self, key: dict) -> dict | None:
        """The saved row of ``key``, or None (none saved, or one that cannot be used, said on stderr). Under a
        process group, rank 0's: it reads the file and every rank takes its answer, so all evaluate the same rows
        (a rank that saw another answer would wait in another collective). Whether saved rows may be used at all
        (``read``) is rank 0's too: under --overwrite it rests on the folder as rank 0 saw it (:meth:`for_run`)."""
        row = self.rank_0s(lambda: self._read(key) if self.read else None)
        if row is not None:
            self.reused += 1
        return row

    def _read(self, key: dict) -> dict | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return read_saved_row(path, key, self.scenarios)
        except (ValueError, OSError) as e:
            warn(f"{one_line(e, 300)}; the row is evaluated again")
            return None

    def put(self, key: dict, row: dict) -> None:
        if self.write:
            self.note_overwriting()
            stored = undefined_as_null(row)  # an undefined standard error (NaN) as null, as results.json has it
            atomic_write_json(
                self.path(key), {"format": ROW_FORMAT, "key": key, "row": stored, "sha256": _row_sha256(key, stored)}
            )
            self.saved += 1

    def discard(self) -> None:
        if self.write and self.folder.is_dir():
            shutil.rmtree(self.folder)


class SavedBatches:
    """The finished batches of one row not finished yet (:class:`SavedRows`), the journal its evaluation gives
    each batch to (:func:`shiq_eval.evaluate.evaluate_samples`): batch ``i`` in ``--out/.rows/ROW/batch_i.json``,
    ``ROW`` the name of the row's own file (the SHA-256 of its key, so other inputs find no batches), holding the
    batch's index, size and prompts' SHA-256, its completions' token ids and both KL estimators (float64, exact
    in JSON), and a checksum of it all. The same command run again takes those batches instead of sampling them
    again, with the same bits; a file that cannot be used is said on stderr and its batch evaluated again. Rank
    0 reads and every rank takes its answer, as for rows; only rank 0 writes. Removed once the row is saved."""

    def __init__(self, rows: SavedRows, key: dict):
        self.rows = rows
        self.name = content_sha256(key)
        self.folder = rows.folder / self.name

    def path(self, i: int) -> Path:
        return self.folder / f"batch_{int(i)}.json"  # (an integer: the path stays inside the folder)

    def record(self, i: int, batch: list[list[int]]) -> dict:
        """What batch ``i`` of prompts ``batch`` is saved under: its file's fields other than its results."""
        return {
            "format": BATCH_FORMAT,
            "row": self.name,
            "index": int(i),
            "batch_size": self.rows.batch_size,
            "prompts_sha256": hashlib.sha256(json.dumps(batch).encode()).hexdigest(),
        }

    def get(self, i: int, batch: list[list[int]]):
        """Batch ``i``'s saved :class:`shiq_eval.evaluate.SampledBatch`, or None (none saved, or one that cannot
        be used, said on stderr): rank 0's answer on every rank (whether saved batches may be used at all too)."""
        found = self.rows.rank_0s(lambda: self._read(i, batch) if self.rows.read else None)
        if found is not None:
            from shiq_eval.evaluate import SampledBatch  # heavy: torch (loaded by then)

            found = SampledBatch(*found)
            self.rows.batches_reused += 1
            self.rows.pending += 1
        return found

    def _read(self, i: int, batch: list[list[int]]):
        path = self.path(i)
        if not path.is_file():
            return None
        try:
            return read_saved_batch(path, self.record(i, batch), len(batch))
        except (ValueError, OSError) as e:
            warn(f"{one_line(e, 300)}; the batch is evaluated again")
            return None

    def put(self, i: int, batch: list[list[int]], result) -> None:
        if self.rows.write:
            completions, kl_sample, kl_exact = result
            saved = {**self.record(i, batch), "completions": completions, "kl_sample": kl_sample, "kl_exact": kl_exact}
            self.rows.note_overwriting()
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path(i), {**saved, "sha256": content_sha256(saved)}, indent=None)
            self.rows.pending += 1

    def discard(self) -> None:
        if self.rows.write and self.folder.is_dir():
            shutil.rmtree(self.folder)


def read_saved_batch(path: Path, record: dict, size: int) -> tuple[list[list[int]], list[float], list[float]]:
    """``(completions [size], kl_sample [size], kl_exact [size])`` of the batch saved in ``path``
    (:class:`SavedBatches`), checked as data: its fields other than the results are ``record``'s, its checksum
    fits, its completions are ``size`` lists of token ids (integers >= 0) and its KLs ``size`` finite numbers
    each; a ``ValueError`` naming ``path`` otherwise."""
    saved = read_json_file(path, ValueError)
    if (
        not isinstance(saved, dict)
        or saved.get("format") != BATCH_FORMAT
        or set(saved) != SAVED_BATCH_FIELDS | {"sha256"}
    ):
        raise ValueError(
            f"{path}: not a saved batch of shiq-eval run (fields {', '.join(sorted(SAVED_BATCH_FIELDS))}, sha256)"
        )
    if any(saved[name] != value for name, value in record.items()):
        raise ValueError(f"{path}: saved for other inputs than this batch's")
    content = {name: saved[name] for name in SAVED_BATCH_FIELDS}
    if saved["sha256"] != content_sha256(content):
        raise ValueError(f"{path}: its checksum does not fit its contents (changed or damaged)")
    completions = saved["completions"]
    if not (
        isinstance(completions, list)
        and len(completions) == size
        and all(
            isinstance(c, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in c)
            for c in completions
        )
    ):
        raise ValueError(f"{path}: field 'completions' is damaged")
    kls = []
    for name in ("kl_sample", "kl_exact"):
        values = saved[name]
        if not (isinstance(values, list) and len(values) == size and all(_number(v) for v in values)):
            raise ValueError(f"{path}: field {name!r} is damaged")
        kls.append([float(v) for v in values])
    return completions, *kls


def _row_sha256(key: dict, row: dict) -> str:
    return hashlib.sha256(json.dumps([key, row], sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_saved_row(path: Path, key: dict, scenarios: bool) -> dict:
    """The row saved in ``path`` under ``key`` (:class:`SavedRows`), checked as data: its key is ``key``, its
    checksum fits, it has exactly a row's fields (``scenarios``: with those of clustered standard errors), its
    identity fields are the key's and its results are finite numbers (a standard error null: undefined, NaN
    again), lists of them, and the sample triples; a ``ValueError`` naming ``path`` otherwise."""
    saved = read_json_file(path, ValueError)
    if not isinstance(saved, dict) or saved.get("format") != ROW_FORMAT or set(saved) != SAVED_ROW_FIELDS:
        raise ValueError(f"{path}: not a saved row of shiq-eval run (fields format, key, row, sha256)")
    if saved["key"] != key:
        raise ValueError(f"{path}: saved for other inputs than this row's")
    row = saved["row"]
    if not isinstance(row, dict) or saved["sha256"] != _row_sha256(key, row):
        raise ValueError(f"{path}: its checksum does not fit its contents (changed or damaged)")
    identity = key["row"]
    from shiq_eval.evaluate import EvalResult  # heavy: torch (loaded by then)

    result_fields = [f.name for f in dataclasses.fields(EvalResult)]
    want = set(identity) | set(result_fields) | (set(CLUSTER_FIELDS) if scenarios else set())
    if set(row) != want:
        raise ValueError(f"{path}: field{'s' * (len(set(row) ^ want) != 1)} {sorted(set(row) ^ want)} missing or extra")
    for name, value in identity.items():
        if row[name] != value:
            raise ValueError(f"{path}: field {name!r} is not this row's")
    out = dict(row)
    for name in result_fields:
        value = row[name]
        if is_error_key(name) and value is None:
            out[name] = float("nan")  # undefined (one prompt or scenario), as evaluated
        elif name == "n":
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        elif name == "samples":
            ok = isinstance(value, list) and all(
                isinstance(t, list)
                and len(t) == 3
                and isinstance(t[0], str)
                and isinstance(t[1], str)
                and _number(t[2])
                for t in value
            )
        elif name in ("rewards", "kls_exact", "kls_sample"):
            ok = value is None or (isinstance(value, list) and all(_number(v) for v in value))
        else:
            ok = _number(value)
        if not (is_error_key(name) and value is None) and not ok:
            raise ValueError(f"{path}: field {name!r} is damaged")
    return out


def row_summary(row: dict) -> str:
    """A result row's reward and KLs, for its log line."""
    return (
        f"reward {row['reward_mean']:.4g} ± {error_text(row['reward_stderr'], '.2g')}, KL {row['kl_exact']:.4g} "
        f"(sample estimate {row['kl_sample']:.4g})"
    )


def row_key(identity: dict, context: dict) -> dict:
    """What a row depends on: its ``identity`` (label, method, beta, top-k, step, checkpoint, weights SHA-256 and
    the suite's fields) and the ``context`` every row of a run shares beyond the suite fingerprint (reference,
    tokenizer, engine, library versions)."""
    return {"format": ROW_FORMAT, "row": identity, **context}


def config_sha256(config: dict) -> str:
    """SHA-256 of a model's Hugging Face config (a dict, keys sorted): the same weights under another config
    (rotary base or scaling, norm epsilon) give other logits, so a saved row of the weights under another config
    is not reused."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    """SHA-256 of everything of ``tokenizer`` that encodes the prompts and decodes the completions."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else [fingerprint(tokenizer), pipeline_fingerprint(tokenizer)]
    ids = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    return hashlib.sha256(json.dumps([spec, ids, type(tokenizer).__name__]).encode()).hexdigest()


def check_tokenizers(infos: list[dict], tokenizer, ref_model) -> None:
    """Refuse, before any sampling, an evaluation tokenizer that is not the one the runs' buffers were built
    with, or a reference or policy whose vocabulary is smaller than that tokenizer's."""
    from shiq_train.reference import check_tokenizer_matches  # heavy: torch

    mine = {
        "name": getattr(tokenizer, "name_or_path", "") or "?",
        "fingerprint": fingerprint(tokenizer),
        PIPELINE_FIELD: pipeline_fingerprint(tokenizer),
    }
    for info in infos:
        record, field = {"checkpoint": ("meta.json", "meta.tokenizer"), "hf": (EXPORT_RECORD, "tokenizer")}.get(
            info.get("kind"), ("value_model.json", "tokenizer")
        )
        check_tokenizer_record(info["tokenizer"], Path(info["path"]) / record, field)  # (else a KeyError below)
        if info["tokenizer"] is None:
            if info["kind"] == "checkpoint":  # (a release that did not record it; its buffer's path is not followed)
                warn(
                    f"{info['path'] / 'meta.json'} records no tokenizer (an older checkpoint): "
                    "its buffer's tokenizer cannot be compared with the evaluation's"
                )
            continue
        vocab = [v for v in (info["hf_config"].get("vocab_size"), ref_model.config.vocab_size) if isinstance(v, int)]
        check_tokenizer_matches(
            info["tokenizer"],
            mine,
            min(vocab) if vocab else None,
            f"the buffer of {info['path']}",
            role="evaluation model (--reference, --tokenizer)",
        )


def check_folder_tokenizer(folder: Path, mine: str, name) -> None:
    """Refuse a Hugging Face policy folder holding a tokenizer of other token ids (:func:`fingerprint`) than the
    evaluation's (``mine``, its fingerprint; named ``name``): its samples are read and its KL taken in the evaluation
    tokenizer's ids, so the same vocabulary size with other ids (another model's tokenizer) gave a KL between
    different tokens, silently. A folder without tokenizer files has nothing to compare."""
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return
    from transformers import AutoTokenizer  # heavy: transformers

    try:
        theirs = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as e:
        raise EvalInputError(f"{folder}: its tokenizer cannot be read ({one_line(e, 200)})") from None
    if (theirs := fingerprint(theirs)) != mine:
        raise EvalInputError(
            f"{folder}: its tokenizer (fingerprint {theirs[:12]}…) is not the evaluation's, {name}'s "
            f"(fingerprint {mine[:12]}…, --reference or --tokenizer): the same token "
            "ids would name other tokens, and the KL compare different ones; evaluate it against the model it was "
            "trained from (--reference)"
        )


def check_vocabulary(tokenizer, name, ref_model, infos: list[dict]) -> None:
    """Refuse, before any sampling, a policy whose vocabulary is not the reference's (the KL compares distributions
    over the same tokens; an id past the reference's embedding would fail its pass with an IndexError), and an
    evaluation tokenizer (named ``name``) with more tokens than the models' vocabulary (whether or not a checkpoint
    recorded its buffer's tokenizer): its ids past the embedding would fail the first forward pass."""
    ref_vocab = ref_model.config.vocab_size
    for info in infos:
        vocab = info["hf_config"].get("vocab_size")
        if isinstance(vocab, int) and isinstance(ref_vocab, int) and vocab != ref_vocab:
            raise EvalInputError(
                f"{info['path']}: its vocabulary has {vocab} token ids but the reference's {ref_vocab}: the KL "
                "compares distributions over the same tokens; evaluate it against the model it was trained from "
                "(--reference)"
            )
    sizes = [ref_vocab, *(i["hf_config"].get("vocab_size") for i in infos)]
    sizes = [v for v in sizes if isinstance(v, int) and not isinstance(v, bool)]
    if sizes and len(tokenizer) > min(sizes):
        raise EvalInputError(
            f"the tokenizer {name} has {len(tokenizer)} tokens but the models' vocabulary has only {min(sizes)}: "
            "give the models' own tokenizer (--tokenizer FOLDER)"
        )


SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


def check_reference_shape(reference: str, ref_model, infos: list[dict], given: bool) -> None:
    """A policy of another shape than the reference (layers, widths, heads: its ``hf_config``) was not trained from
    it, so KL and J against it are not the run's (SHIQ_MATH §9): refused when the reference was taken from the runs'
    record (a recipe's cut of SmolLM2, ``model.layers``, records SmolLM2, and was measured against the whole), said
    in a warning when ``--reference`` was ``given`` (a comparison that may be meant, as :func:`warn_other_reference`)."""
    ref = {f: getattr(ref_model.config, f, None) for f in SHAPE_FIELDS}
    for info in infos:
        differ = [f for f in SHAPE_FIELDS if info["hf_config"].get(f, ref[f]) != ref[f]]
        if not differ:
            continue
        what = ", ".join(f"{f} {info['hf_config'][f]} against {ref[f]}" for f in differ)
        if not given:
            raise EvalInputError(
                f"{info['path']}: its model is not of the shape of {reference}, the model its run records as its "
                f"start ({what}; a cut of it?): KL and J against it would not be the run's; give --reference a "
                "Hugging Face folder of the model it started from (a recipe's arm of a cut model, model.layers: its "
                "recipe's report measures it against its start)"
            )
        warn(
            f"{info['path']} is not of the shape of --reference {reference} ({what}): it was "
            "not trained from it; KL and J are measured against it"
        )


def warn(message: str) -> None:
    """``shiq-eval: warning: MESSAGE`` on stderr, from rank 0 alone under torchrun (:func:`rank_zero`): every rank
    reads the same inputs and said it once each."""
    if rank_zero():
        print(f"shiq-eval: warning: {message}", file=sys.stderr)


def check_reward_model_file(path) -> None:
    """Refuse, before any model is loaded, a ``--reward-model`` file that is not safetensors."""
    from safetensors import SafetensorError, safe_open  # heavy: only shiq-eval run reads a head

    try:
        with safe_open(str(path), "np") as f:
            keys = set(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise EvalInputError(
            f"--reward-model {path}: not a safetensors file ({one_line(e, 120)}); expected a head "
            "saved by RegressionRewardModel.save"
        ) from None
    if not {"weight", "bias"} <= keys:
        raise EvalInputError(
            f"--reward-model {path}: holds tensors {sorted(keys)}, not the 'weight' and 'bias' of a head saved by "
            "RegressionRewardModel.save"
        )


def read_prompts_jsonl(path) -> tuple[list, list[str]]:
    """``(policy_prompts, scorer_prompts)`` from a JSONL file: one object per line with ``prompt`` (the text
    the policy continues) or ``messages`` (a chat conversation, ``[{"role", "content"}, ...]``, which the
    policy answers as the next assistant message, always through the chat template) and optionally
    ``scorer_prompt`` (what the scorer reads before the completion; default: ``prompt``, or the last
    message's content)."""
    path = Path(path)
    if path.is_dir():
        raise EvalInputError(f"--prompts {path}: is a folder, not a JSONL file of prompts")
    if not path.exists():  # (a pipe, --prompts <(...) or /dev/stdin, is read as a file is: once)
        raise EvalInputError(f"--prompts {path}: no such file")
    prompts, shown = [], []
    try:
        with open(path, "rb") as f:  # lines end at "\n", "\r\n" or "\r" only (U+2028 may be inside a string)
            lines = list(utf8_lines(f, path))
    except RowError as e:  # a byte that is not UTF-8, named with its line
        raise EvalInputError(str(e)) from None
    except OSError as e:
        raise EvalInputError(f"--prompts {path}: cannot be read ({e.strerror or e})") from None
    for i, line in lines:
        if not line.strip():
            continue
        try:
            row = json_loads(line)
        except (ValueError, RecursionError) as e:  # (also a number of over 4,300 digits, nesting too deep)
            raise EvalInputError(f"{path}, line {i}: not valid JSON ({getattr(e, 'msg', e)})") from None
        if isinstance(row, dict) and "\\u" in line:  # (only an escape makes a lone surrogate: the line is UTF-8)
            read = {k: row[k] for k in ("prompt", "messages", "scorer_prompt") if k in row}
            if (field := unencodable_field(read)) is not None:  # (it failed later, hashing the prompts, naming none)
                raise EvalInputError(
                    f"{path}, line {i}: field '{field}': not Unicode text (a lone surrogate \\u escape)"
                )
        if isinstance(row, dict) and "messages" in row and "prompt" not in row:
            try:
                check_messages(row["messages"], "field 'messages'")
            except ValueError as e:
                raise EvalInputError(f"{path}, line {i}: {e}") from None
            prompt = row["messages"]
            default_shown = prompt[-1]["content"]
        elif not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise EvalInputError(  # (blank text encodes to no token: a prompt of nothing to continue)
                f"{path}, line {i}: field 'prompt' must be a string that is not blank (or give 'messages', a chat)"
            )
        else:
            prompt = default_shown = row["prompt"]
        shown_text = row.get("scorer_prompt", default_shown)
        if not isinstance(shown_text, str):
            raise EvalInputError(f"{path}, line {i}: field 'scorer_prompt' must be a string")
        prompts.append(prompt)
        shown.append(shown_text)
    if not prompts:
        raise EvalInputError(f"{path}: no prompts")
    return prompts, shown


def prompt_set_sha256(prompts: list, shown: list[str]) -> str:
    """SHA-256 of the exact prompt set (policy prompt and scorer prompt of every item, in order), so
    two result tables can be checked to come from the same prompts."""
    return hashlib.sha256(json.dumps([[p, s] for p, s in zip(prompts, shown)], ensure_ascii=False).encode()).hexdigest()


def encode_prompts(tokenizer, prompts: list, chat: bool, source="the prompts") -> list[list[int]]:
    """Token ids of each prompt, through the tokenizer's chat template (user turn + generation
    prompt) when ``chat``; a prompt given as chat messages always goes through the template. A conversation
    the template refuses (``raise_exception``: a system role it has none of) is an :class:`EvalInputError`
    naming ``source`` (the prompts file) and the prompt, as is a prompt whose text spells one of the tokenizer's
    control tokens (``<|im_end|>``: encoded, it would be that token; the data pipeline refuses such rows too)."""
    from jinja2.exceptions import TemplateError  # transformers' template engine

    as_messages = any(isinstance(p, list) for p in prompts)
    if (chat or as_messages) and not getattr(tokenizer, "chat_template", None):
        # a suite's chat: true (movie_vader_small's) asks for it too: a model without a template reads plain text
        plain = "" if as_messages else ", or read the prompts as plain text (--no-chat)"
        raise EvalInputError(
            "the prompts need the tokenizer's chat template (--chat or the suite's chat: true, or prompts given as "
            f"messages), but the tokenizer has none: give one that has (--tokenizer){plain}"
        )
    controls = control_texts(tokenizer)
    out = []
    for i, p in enumerate(prompts):
        texts = [m.get("content") for m in p if isinstance(m, dict)] if isinstance(p, list) else [p]
        found = [t for t in controls for text in texts if isinstance(text, str) and t in text]
        if found:  # as the data pipeline refuses it: encoded, it would be that control token, not text
            raise EvalInputError(
                f"{source}, prompt {i + 1}: contains {found[0]!r}, the text of one of the tokenizer's control "
                "tokens; it would be read as that token, not as text: remove it from the prompt"
            )
        if isinstance(p, list) or chat:
            messages = p if isinstance(p, list) else [{"role": "user", "content": p}]
            try:
                ids = tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=False
                )
            except TemplateError as e:
                raise EvalInputError(
                    f"{source}, prompt {i + 1}: the tokenizer's chat template refuses it ({one_line(e, 200)})"
                ) from None
            out.append(list(ids))
        else:
            out.append(tokenizer(p, add_special_tokens=False)["input_ids"])
    return out


def check_prompt_lengths(prompt_ids: list[list[int]], max_new_tokens: int, limits: list, source) -> None:
    """Refuse, before any sampling, a prompt :func:`shiq_eval.generate.overlong_prompt` finds for ``limits``,
    naming ``source`` (the prompts file) and the prompt's place in it, not its index among the repeated samples."""
    from shiq_eval.generate import overlong_prompt  # heavy: torch

    found = overlong_prompt(prompt_ids, max_new_tokens, limits)
    if found is not None:
        i, limit = found
        raise EvalInputError(
            f"{source}, prompt {i + 1}: {len(prompt_ids[i])} tokens + max_new_tokens {max_new_tokens} exceed the "
            f"models' max_position_embeddings {limit}: shorten the prompt or lower max_new_tokens"
        )


def load_reference(spec: str):
    """``(model, tokenizer)`` for ``smollm2`` or a Hugging Face folder (tokenizer None if it has none), checked
    by :func:`check_reference` first."""
    import torch  # heavy: only shiq-eval run needs torch

    from shiq_train.hf_convert import load_causal_lm  # heavy: torch

    return load_causal_lm(spec, torch.float32)


def check_reference(spec: str) -> None:
    """Refuse a ``--reference`` that is neither ``smollm2`` nor a Hugging Face model folder."""
    folder = Path(spec)
    if spec != "smollm2" and not (folder / "config.json").is_file():
        raise EvalInputError(
            f"--reference {spec}: expected smollm2 or a Hugging Face model folder "
            f"({folder / 'config.json'} does not exist)"
        )


class HFEngine:
    """Checkpoints as transformers models (exported from the saved megatron shards)."""

    def __init__(self, ref_model, tokenizer):
        self.ref_model = ref_model

    def reference(self):
        """``(logits model, sampler)`` of the reference (sampler None: ``HFPolicy`` of the model)."""
        return self.ref_model, None

    def policy(self, info: dict):
        return hf_policy(info), None


class MegatronEngine:
    """Checkpoints as megatron-core models, sampled with :class:`shiq_eval.generate.MegatronPolicy`
    and scored with :class:`shiq_eval.generate.MegatronLogits`, in the tensor-parallel layout of the
    process group (``--tp``); the reference is imported from its Hugging Face weights. Call inside
    ``shiq_train.parallel.distributed``."""

    def __init__(self, ref_model, tokenizer):
        from shiq_eval.generate import MegatronLogits, MegatronPolicy  # heavy: torch
        from shiq_train import hf_convert as H  # heavy: torch

        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        ref = self._build(ref_model.config, ref_model.config.name_or_path)
        H.import_llama(ref, ref_model.state_dict(), ref_model.config)
        self._ref = (MegatronLogits(ref), MegatronPolicy(ref, eos_id=self.eos, pad_id=self.pad))
        self._policy = (None, None)  # (architecture, model): reloaded per checkpoint, rebuilt per architecture

    @staticmethod
    def _build(hf_config, where):
        """The megatron model of ``hf_config``; what it would not compute (a sliding window that acts, another
        architecture) or split over ``--tp`` ranks (heads, key-value heads, vocabulary or MLP width that the size
        does not divide) is an :class:`EvalInputError` naming ``where``, the model's folder or step directory."""
        from megatron.core import parallel_state as ps  # heavy: megatron

        from shiq_train.model import build_model  # heavy: torch

        return build_model(MegatronEngine.model_config(hf_config, where, ps.get_tensor_model_parallel_world_size()))

    @staticmethod
    def model_config(hf_config, where, tp: int):
        """The megatron ``ModelConfig`` of ``hf_config`` split over ``tp`` ranks, or the :class:`EvalInputError`
        of :meth:`_build` naming ``where``; needs no process group, so :func:`run` checks every model with it
        before any is evaluated."""
        from shiq_train import hf_convert as H  # heavy: torch
        from shiq_train.model import check_layout  # heavy: torch

        try:
            config = H.model_config_from_llama(hf_config, params_dtype="float32", logits_chunk_tokens=0)
            check_layout(config, tp, 1, 1, tp_option="--tp")
        except ValueError as e:
            raise EvalInputError(f"{where}: {e}") from None
        return config

    def reference(self):
        return self._ref

    def policy(self, info: dict):
        from shiq_eval.generate import MegatronLogits, MegatronPolicy  # heavy: torch
        from shiq_train.export import fitting_parameters  # heavy: torch
        from shiq_train.hf_convert import LlamaShape, hf_config_from_dict, import_llama  # heavy: torch
        from shiq_train.model import load_full_parameters  # heavy: torch

        hf_config = info["hf_config"]
        config = hf_config_from_dict(hf_config)  # (a Qwen2 model's, with its biases; a Qwen3 one's, its q/k norms)
        if self._policy[0] != hf_config:
            self._policy = (hf_config, self._build(config, info["path"]))
        model = self._policy[1]
        if info["kind"] == "hf":  # a Hugging Face folder: its weights imported into the megatron layout
            hf = hf_policy(info)
            import_llama(model, hf.state_dict(), hf.config)
        else:
            shape = LlamaShape.from_hf_config(config)
            try:  # (weights the config lacks would be dropped; ones it names and they lack, a KeyError)
                full = fitting_parameters(info["path"], shape)
            except ValueError as e:
                raise EvalInputError(str(e)) from None
            load_full_parameters(model, full)
        return MegatronLogits(model), MegatronPolicy(model, eos_id=self.eos, pad_id=self.pad)


def engine_context(args, seed: int = 0):
    """The process group the engine needs: none for ``hf``; for ``megatron`` one tensor-parallel group
    of ``--tp`` ranks (a lone process for 1, else torchrun with ``--nproc_per_node`` equal to it)."""
    if args.engine == "hf":
        if args.tp != 1:
            raise EvalInputError(f"--tp {args.tp} needs --engine megatron")
        return contextlib.nullcontext()
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world != args.tp:
        raise EvalInputError(
            f"--engine megatron --tp {args.tp} runs on exactly {args.tp} processes, got "
            f"{world}: launch with torchrun --nproc_per_node {args.tp}"
        )
    from shiq_train import parallel  # heavy: torch

    return parallel.distributed(parallel.ParallelConfig(args.tp, 1), seed=seed)


def guide_info(path) -> dict:
    """``{steps, init, reference_sha256, tokenizer}`` of a Q♯ value-model folder written by ``shiq-train
    loss=qsharp_value`` (read from its value_model.json, its checksum checked, without loading the weights;
    the last two None for a folder written before they were recorded)."""
    path = Path(path)
    config = path / "value_model.json"
    if not config.is_file():
        raise EvalInputError(
            f"--guide {path}: {config} does not exist (a folder written by shiq-train loss=qsharp_value)"
        )
    check_sha256(config)  # it decides the model's shape, the reference and the row's step
    info = read_json_file(config, EvalInputError)
    if not isinstance(info, dict) or info.get("format") != "shiq-qsharp-value":
        raise EvalInputError(f"{config}: field 'format' must be 'shiq-qsharp-value'")
    steps, run_config = info.get("steps", 0), info.get("config", {})
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0):
        raise EvalInputError(f"{config}: field 'steps' must be an integer >= 0, got {steps!r}")
    init = run_config.get("init", "none") if isinstance(run_config, dict) else None
    if not isinstance(run_config, dict) or not (init is None or isinstance(init, str)):
        raise EvalInputError(f"{config}: field 'config' must be an object whose 'init' is a string or null")
    ref_sha, tok = info.get("reference_sha256"), info.get("tokenizer")
    if not (ref_sha is None or isinstance(ref_sha, str)) or not (tok is None or isinstance(tok, dict)):
        raise EvalInputError(f"{config}: fields 'reference_sha256' (a string) and 'tokenizer' (an object) are damaged")
    return {"steps": steps, "init": init, "reference_sha256": ref_sha, "tokenizer": tok}


def check_guide_args(args, temperature: float = 1.0) -> None:
    """--guide needs --beta > 0 and --top-k >= 1, the hf engine and temperature 1; --beta and --top-k need
    --guide."""
    if args.guide is None:
        if args.beta is not None:
            raise EvalInputError("--beta is the KL weight of Q♯ guidance: give it with --guide VALUE_DIR")
        if args.top_k is not None:
            raise EvalInputError("--top-k is the number of Q♯ candidates per token: give it with --guide VALUE_DIR")
        if not args.checkpoints:
            raise EvalInputError("nothing to evaluate: give CHECKPOINT directories and/or --guide VALUE_DIR --beta B")
        return
    if args.beta is None or not (0 < args.beta < float("inf")):
        raise EvalInputError(f"--guide needs --beta B, a finite KL weight > 0 (got {args.beta})")
    if Path(os.path.abspath(args.guide)).name == "reference":  # its row is labelled by its folder's name
        raise EvalInputError(
            f"--guide {args.guide}: its row would be labelled 'reference', the reference model's label; rename the folder"
        )
    if args.top_k is None:
        args.top_k = DEFAULT_TOP_K
    if args.top_k < 1:
        raise EvalInputError(f"--top-k must be >= 1, got {args.top_k}")
    if args.engine != "hf":
        raise EvalInputError("--guide decodes with transformers models: use --engine hf")
    if temperature != 1.0:
        raise EvalInputError(f"--guide samples at temperature 1, but the suite's sampling.temperature is {temperature}")


def load_guide(args, ref_model, reference: str, tokenizer, info: dict, reference_sha256: str | None):
    """The value model of ``args.guide``, checked against the reference ``ref_model`` (named ``reference``)
    and the evaluation ``tokenizer``: loaded once the reference is, before any policy is evaluated, so a damaged
    folder, another reference (guidance reweights the reference it learnt the returns of: SHIQ_MATH §8), another
    tokenizer or vocabulary, or a β its atoms overflow at, is refused at once instead of after the
    checkpoints' evaluations."""
    from shiq_train.qsharp_value import load_value_model  # heavy: torch

    value = load_value_model(args.guide)
    if value.config.vocab_size != ref_model.config.vocab_size:
        raise EvalInputError(
            f"--guide {args.guide}: the value model has {value.config.vocab_size} token ids but the reference "
            f"{ref_model.config.vocab_size}; train it from this reference (shiq-train loss=qsharp_value init=...)"
        )
    want = info["reference_sha256"]
    if want is not None and (got := reference_sha256) != want:
        raise EvalInputError(
            f"--guide {args.guide} learnt the returns of the reference {info['init']} (weights {want[:12]}…), but "
            f"the reference here is {reference} ({(got or 'no weights')[:12]}…): guided decoding reweights the "
            "reference it was trained from; give that one (--reference), or train a value model from this one"
        )
    if info["tokenizer"] is not None:
        check_tokenizers(
            [{"tokenizer": info["tokenizer"], "hf_config": value.config.to_dict(), "path": args.guide}],
            tokenizer,
            ref_model,
        )
    largest = float(value.atoms.abs().max())
    if not math.isfinite(largest / args.beta):
        raise EvalInputError(
            f"--beta {args.beta!r} is too small for the value model's atoms (|z| up to {largest:g}): z/β overflows"
        )
    vocab = int(ref_model.config.vocab_size)
    if args.top_k > vocab:  # what decoding uses, and the row records
        warn(
            f"--top-k {args.top_k} is more than the reference's vocabulary ({vocab} tokens): every token is a "
            f"candidate, and the results record top-k {vocab}"
        )
        args.top_k = vocab
    return value


def evaluate_guide(args, value, ref_model, tokenizer, prompt_ids, shown, scorer, kw):
    """Reward and KL (an ``EvalResult``) of the reference guided by ``value`` (:func:`load_guide`)."""
    from shiq_eval.qsharp import GuidedPolicy, evaluate_guided_policy  # heavy: torch

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    policy = GuidedPolicy(ref_model, value, value.atoms, args.beta, top_k=args.top_k, eos_id=eos, pad_id=pad)
    return evaluate_guided_policy(policy, tokenizer, prompt_ids, shown, scorer, **kw)


def suite_overrides(args) -> dict:
    """The suite settings the command line sets (None: not given, the suite's value stands)."""
    return {
        "prompts": args.prompts,
        "movie_prompts": args.movie_prompts,
        "scorer": args.scorer,  # (--reward-model alone: see load_suite)
        "reward_model": args.reward_model,
        "chat": args.chat,
        "kl_estimator": args.kl_estimator,
        "sampling.temperature": args.temperature,
        "sampling.max_new_tokens": args.max_new_tokens,
        "sampling.samples_per_prompt": args.samples_per_prompt,
        "sampling.seed": args.seed,
        "sampling.batch_size": args.batch_size,
    }


def suite_prompts(suite: Suite) -> tuple[list[str], list[str], str]:
    """``(policy prompts, scorer prompts, source)`` of a suite."""
    if suite.prompts is not None:
        prompts, shown = read_prompts_jsonl(suite.prompts)
        path = Path(suite.prompts)  # (a pipe by the name it was given, /dev/fd/63, the same in a resumed run)
        return prompts, shown, str(path.resolve() if path.is_file() else os.path.abspath(path))
    prompts, shown = movie_prompts(suite.movie_prompts)
    if len(prompts) < suite.movie_prompts:
        raise EvalInputError(f"--movie-prompts {suite.movie_prompts}: there are {len(prompts)} held-out openings")
    return prompts, shown, f"movie-held-out ({VADER_SDIST}, seed 0, first {len(prompts)})"


def suite_scorer(suite: Suite):
    """The scorer a suite names: a regression head on MiniLM, a Hugging Face sequence-classification reward
    model, the VADER lexicon, the BFCL checker's turn reward or a Python function."""
    if suite.scorer.startswith(PYTHON_PREFIX):
        return PythonFunctionScorer(suite.scorer)
    if suite.scorer == "bfcl":
        return BFCLTurnScorer()
    if suite.scorer == "vader":
        return VaderScorer()
    if suite.scorer == "hf_reward_model":
        return SequenceClassifierScorer(suite.reward_model)
    from shiq_data.reward_head import RegressionRewardModel  # heavy: torch

    return RegressionRewardModel.load(suite.reward_model)


def cluster_by_scenario(row: dict, scenarios: list[str] | None) -> dict:
    """``row`` (an evaluation's result) with the standard errors of reward and both KL estimators clustered by
    scenario, given each prompt's scenario (``scenarios [P]``: BFCL turns, whose scenario's turns share its
    state; SHIQ_MATH §9, the estimator of the leaderboard and of ``shiq-bfcl``), and a ``stderr_note`` saying
    so, and the number of scenarios (``n_scenarios``); ``row`` unchanged without scenarios."""
    if scenarios is None:
        return row
    scenarios = [leaderboard.scenario_of(i) for i in scenarios]  # an entry's scenario, in every category
    k = int(row["samples_per_prompt"])
    out = dict(row)
    for key, values in (("reward", "rewards"), ("kl_exact", "kls_exact"), ("kl_sample", "kls_sample")):
        out[f"{key}_stderr"] = clustered_mean_stderr(per_prompt(row[values], k), scenarios)[1]
    out["stderr_note"] = leaderboard.stderr_note(row, scenarios)
    out["n_scenarios"] = len(set(scenarios))  # the clusters: a t quantile's G − 1 degrees of freedom
    return out


def run(args) -> list[dict]:
    """Evaluate the reference and every checkpoint; write the table and plots; returns the rows."""
    from shiq_eval.evaluate import evaluate_policy  # heavy: torch

    if args.quiet:  # transformers' own bars too ("Loading weights")
        hide_library_progress_bars()
    check_results_folder(Path(args.out))
    if (earlier := Path(args.out) / "results.json").exists() and not args.overwrite:
        raise EvalInputError(
            f"--out {args.out} holds an earlier run's results ({earlier.name}): give --overwrite to replace them, "
            "or another folder"
        )
    suite, suite_file = load_suite(args.suite, suite_overrides(args))
    sampling = suite.sampling
    check_guide_args(args, sampling.temperature)
    infos = policy_infos(args.checkpoints, args.label)
    for step in (s for arg in args.checkpoints for s in unsaved_steps(arg)):
        warn(f"{step} holds no meta.json (a save under way or cut short): not evaluated")
    guide = guide_info(args.guide) if args.guide is not None else None  # (read once)
    # (a null init names no model, as a policy's: it counts for nothing)
    guide_inits = {guide["init"]} if guide is not None and guide["init"] is not None else set()
    reference = args.reference
    if reference is None:
        inits = sorted({i["init"] for i in infos if i["init"] is not None} | guide_inits)
        if len(inits) != 1 or inits[0] in (None, "none"):
            raise EvalInputError(
                f"the runs were initialised from {inits}: give the reference model with "
                "--reference (smollm2 or a Hugging Face folder)"
            )
        reference = inits[0]
        if reference != "smollm2":  # a folder: named on the command line
            where = Path(next((i["path"] for i in infos if i["init"] == reference), args.guide))
            record = next(
                (where / f for f in ("meta.json", EXPORT_RECORD, "value_model.json") if (where / f).is_file()), where
            )
            raise EvalInputError(recorded_folder(record, "runs' initial model", reference, "--reference"))
    if suite.scorer == "reward_model":
        if (Path(suite.reward_model) / "config.json").is_file():  # (it was said to be no such file)
            raise EvalInputError(
                f"--reward-model {suite.reward_model}: a Hugging Face model folder, not a regression head file: "
                "give --scorer hf_reward_model to score with it"
            )
        if not Path(suite.reward_model).is_file():
            raise EvalInputError(
                f"--reward-model {suite.reward_model}: no such file (a head saved by "
                "shiq_data.reward_head.RegressionRewardModel.save)"
            )
    if suite.scorer == "hf_reward_model" and not (Path(suite.reward_model) / "config.json").is_file():
        raise EvalInputError(
            f"--reward-model {suite.reward_model}: not a Hugging Face model folder (no config.json) for "
            "--scorer hf_reward_model"
        )
    prompts, shown, source = suite_prompts(suite)  # every input checked before a model is loaded
    if args.tokenizer is not None and not any((Path(args.tokenizer) / f).is_file() for f in TOKENIZER_FILES):
        raise EvalInputError(
            f"--tokenizer {args.tokenizer}: not a Hugging Face tokenizer folder (none of {', '.join(TOKENIZER_FILES)})"
        )
    if suite.scorer == "reward_model":
        check_reward_model_file(suite.reward_model)
    scenarios = None  # BFCL: each prompt's (turn's) scenario, its entry id, so standard errors can be clustered
    if suite.scorer == "bfcl":
        scenarios = []
        for i, ref in enumerate(shown):
            try:
                scenarios.append(parse_turn_ref(ref)[0])
            except ValueError as e:
                raise EvalInputError(f"{suite.prompts}, prompt {i + 1}: scorer_prompt {e}") from None
    scorer = suite_scorer(suite)
    prompt_sha = prompt_set_sha256(prompts, shown)
    content, suite_sha = suite_fingerprint(suite, prompt_sha, scorer)
    log.debug(f"shiq-eval: suite {suite.name} ({suite_sha}): {json.dumps(content, sort_keys=True)}")
    context = engine_context(args, sampling.seed)
    from shiq_train.reference import model_weight_files  # heavy: torch

    check_reference(reference)
    # hashed before loading, so the reference row (and the guide's check) name the weights evaluated
    ref_sha = model_sha256(model_weight_files(reference))
    ref_model, tokenizer = load_reference(reference)
    own_tokenizer = tokenizer  # the reference's own (None: its folder holds none)
    if args.tokenizer is not None:
        from transformers import AutoTokenizer  # heavy: transformers

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        except (OSError, ValueError, TypeError) as e:
            raise EvalInputError(f"--tokenizer {args.tokenizer}: {one_line(e, 200)}") from None
    if tokenizer is None:
        raise EvalInputError(f"the reference {reference} has no tokenizer: give one with --tokenizer FOLDER")
    if tokenizer.eos_token_id is None:  # (HFPolicy, MegatronPolicy: int(None), a TypeError, once sampling began)
        raise EvalInputError(
            f"the tokenizer {args.tokenizer or reference} has no end-of-sequence token (eos_token), which ends "
            "every completion: give a tokenizer that has one (--tokenizer FOLDER)"
        )
    check_tokenizers(infos, tokenizer, ref_model)
    check_vocabulary(tokenizer, args.tokenizer or reference, ref_model, infos)
    check_reference_shape(reference, ref_model, infos, given=args.reference is not None)
    mine = fingerprint(tokenizer)  # (each costs about 0.2 s: taken once here)
    own = mine if own_tokenizer is None or own_tokenizer is tokenizer else fingerprint(own_tokenizer)
    if own != mine:
        raise EvalInputError(  # (the reference's logits are over its own tokenizer's ids)
            f"--tokenizer {args.tokenizer}: its token ids (fingerprint {mine[:12]}…) are not those "
            f"of the reference {reference}'s own tokenizer (fingerprint {own[:12]}…): the "
            "prompts would be encoded, and the models' tokens read, as other tokens; leave --tokenizer out, or give "
            "a folder of the reference's tokenizer"
        )
    for info in (i for i in infos if i["kind"] == "hf"):
        from shiq_train.hf_convert import read_hf_config  # heavy: torch

        try:  # its config as transformers reads it (an unknown model_type), before any sampling
            read_hf_config(info["path"])
        except ValueError as e:
            raise EvalInputError(str(e)) from None
        if info["tokenizer"] is None:  # a folder shiq-train did not export records none: the one it holds, if any
            check_folder_tokenizer(Path(info["path"]), mine, args.tokenizer or reference)
    if args.reference is not None:
        warn_other_reference(reference, {i["init"] for i in infos} - {None, "none"})
    # hashed before loading too, so the Q♯ row names the weights evaluated (a missing file: load_value_model's error)
    files = guide_files(args.guide) if guide is not None else []
    guide_sha = model_sha256(files) if files and all(f.is_file() for f in files) else None
    value = load_guide(args, ref_model, reference, tokenizer, guide, ref_sha) if guide is not None else None
    from huggingface_hub.errors import StrictDataclassError  # (transformers' config validation)

    from shiq_train.hf_convert import hf_config_from_dict, model_config_from_llama  # heavy: torch

    if args.engine == "megatron":  # an architecture it does not compute, refused before the reference is evaluated
        MegatronEngine.model_config(ref_model.config, reference, args.tp)
    # each policy's config as transformers reads it, before any model is evaluated: a checkpoint's meta.hf_config
    # whatever the engine (an hf folder's config.json was read above by transformers' own classes)
    for info in (i for i in infos if args.engine == "megatron" or i["kind"] == "checkpoint"):
        record = Path(info["path"]) / ("meta.json" if info["kind"] == "checkpoint" else "config.json")
        try:  # (a field of the wrong type: a traceback, or a refusal once the reference was evaluated)
            config = hf_config_from_dict(info["hf_config"])
            if args.engine == "hf":  # (a checkpoint) its weights become a Llama-family model (export.llama_config)
                model_config_from_llama(config)  # another model_type: refused here, not once the reference ran
        except (StrictDataclassError, ValueError, TypeError, ArithmeticError) as e:
            field = " field meta.hf_config:" if info["kind"] == "checkpoint" else ""
            raise EvalInputError(f"{record}:{field} {one_line(e, 300)}") from None
        if args.engine == "megatron":
            MegatronEngine.model_config(config, info["path"], args.tp)
    k = sampling.samples_per_prompt  # prompt i's samples are completions i*k .. i*k+k-1
    source_name = suite.prompts or "the movie prompts"
    encoded = encode_prompts(tokenizer, prompts, suite.chat, source_name)
    limits = [ref_model.config.max_position_embeddings, *(i["hf_config"].get("max_position_embeddings") for i in infos)]
    check_prompt_lengths(encoded, sampling.max_new_tokens, limits, source_name)
    prompt_ids = [ids for ids in encoded for _ in range(k)]
    shown_k = [text for text in shown for _ in range(k)]
    common = {
        "engine": args.engine,
        "suite": suite.name,
        "suite_sha256": suite_sha,
        "prompt_set": source,
        "prompt_set_sha256": prompt_sha,
        # the prompts' token ids: the same texts encoded by another tokenizer or chat template are other prompts
        "prompt_ids_sha256": hashlib.sha256(json.dumps(encoded).encode()).hexdigest(),
        "samples_per_prompt": k,
        "temperature": sampling.temperature,  # J (SHIQ_MATH §9) is a policy's only at temperature 1
        "kl_estimator": suite.kl_estimator,
    }
    if scenarios is not None:  # [P], prompt order: the leaderboard clusters by scenario (SHIQ_MATH §9)
        common[leaderboard.SCENARIO_IDS] = scenarios
    lead = rank_zero()  # under torchrun, rank 0 reports and writes
    # rank 0 reads the saved rows and every rank takes its answer (so all skip the same evaluations); with
    # --overwrite none does, and rank 0 removes them before any evaluation, but for those of an interrupted run
    # given --overwrite (this command's own)
    saved = SavedRows.for_run(
        Path(args.out),
        overwrite=args.overwrite,
        write=lead,
        scenarios=scenarios is not None,
        batch_size=sampling.batch_size,
    )
    import torch  # heavy: torch
    import transformers  # heavy: transformers

    shared = {  # what every row depends on beyond the suite's fingerprint and its own identity
        "reference_sha256": ref_sha,
        "reference_config_sha256": config_sha256(ref_model.config.to_dict()),
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "tp": args.tp,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    kw = dict(
        max_new_tokens=sampling.max_new_tokens,
        batch_size=sampling.batch_size,
        seed=sampling.seed,
        samples_per_prompt=k,  # standard errors over prompts (SHIQ_MATH §9)
        progress=lead and not args.quiet,
    )
    with context, saved.said_on_failure():  # (a failure after rows were saved says they are kept)
        engine = (HFEngine if args.engine == "hf" else MegatronEngine)(ref_model, tokenizer)
        ref_logits, ref_sampler = engine.reference()

        def evaluated(identity: dict, res, after: dict | None = None) -> dict:  # a result row, with its scenarios'
            return cluster_by_scenario({**identity, **res.as_dict(), **(after or {})}, scenarios)

        # a checkpoint's row, or the reference's
        def evaluate_model(identity: dict, info: dict | None = None, *, journal) -> dict:
            logits, sampler = engine.policy(info) if info is not None else (ref_logits, ref_sampler)
            res = evaluate_policy(
                logits,
                ref_logits,
                tokenizer,
                prompt_ids,
                shown_k,
                scorer,
                sampler=sampler,
                temperature=sampling.temperature,
                journal=journal,
                **kw,
            )
            return evaluated(identity, res)

        def evaluate_guided(identity: dict, after: dict, *, journal) -> dict:
            res = evaluate_guide(
                args, value, ref_model, tokenizer, prompt_ids, shown_k, scorer, {**kw, "journal": journal}
            )
            return evaluated(identity, res, after)  # (beta and top_k after the results: the columns' order)

        identity = {
            "run": "reference",
            "method": "reference",
            "beta": None,
            "step": 0,
            # a folder by its absolute path, as a checkpoint's: rows of one reference agree, whatever the cwd was
            "checkpoint": reference if reference == "smollm2" else os.path.abspath(reference),
            "model_sha256": ref_sha,
            **common,
        }

        ref_row = saved.row(row_key(identity, shared), evaluate_model, identity)
        rows = []
        for info in infos:
            weights_sha = model_sha256(info["files"])  # before loading: the row names the weights evaluated
            identity = {
                "run": info["run"],
                "method": info["method"],
                "beta": info["beta"],
                "step": info["step"],
                "checkpoint": os.path.abspath(info["path"]),  # one run's rows agree, whatever the cwd was
                "model_sha256": weights_sha,
                **common,
            }
            # (its config too: the weights' SHA-256 is not the model's, a config.json edited since gives other logits)
            key = row_key(identity, {**shared, "config_sha256": config_sha256(info["hf_config"])})
            rows.append(saved.row(key, evaluate_model, identity, info))
            if lead and not args.quiet:  # (a reused row's too: the run's lines are every row's)
                run = printable(info["run"])  # (a label's escape sequences are not sent to the terminal)
                log.info(f"{run} ({info['method']}) step {info['step']}: {row_summary(rows[-1])}")
        if args.guide is not None:  # Q♯: the reference guided by a value model (SHIQ_MATH §8)
            identity = {
                "run": Path(os.path.abspath(args.guide)).name,
                "method": "qsharp",
                "step": guide["steps"],
                "checkpoint": os.path.abspath(args.guide),
                "model_sha256": guide_sha,  # the weights and value_model.json, which shapes the model
                **common,
            }
            after = {"beta": args.beta, "top_k": args.top_k}
            rows.append(saved.row(row_key({**identity, **after}, shared), evaluate_guided, identity, after))
            if lead and not args.quiet:
                log.info(f"qsharp (beta {args.beta}, top-k {args.top_k}): {row_summary(rows[-1])}")
    if not lead:
        return [ref_row] + rows
    if saved.reused:
        print(
            f"shiq-eval: {saved.reused} of {plural(len(rows) + 1, 'row')} reused from {saved.folder} (saved by an interrupted "
            "run of this command); the others evaluated",
            file=sys.stderr,
        )
    if saved.batches_reused:
        print(
            f"shiq-eval: {plural(saved.batches_reused, 'batch', 'batches')} of unfinished rows reused from {saved.folder} (saved by "
            "an interrupted run of this command)",
            file=sys.stderr,
        )
    out = Path(args.out)
    owns = ("results.csv", "results.json", "suite.json", "reward_vs_kl.png", "reward_vs_step.png")
    # all of them or none: never new results beside old plots (a failure: the rows saved are kept, and said)
    with saved.said_on_failure(), files_together(out, owns=owns) as stage:
        write_table([ref_row] + rows, stage, RUN_COLUMNS)
        suite_json = {"name": suite.name, "file": str(suite_file) if suite_file else None, "sha256": suite_sha}
        atomic_write_json(stage / "suite.json", {**suite_json, "content": content})
        plots = [out / p.name for p in plot_curves(rows, stage, reference=ref_row)]
    saved.discard()  # the results are written: the rows saved on the way are no longer needed
    csv_path, json_path, suite_path = out / "results.csv", out / "results.json", out / "suite.json"
    print(
        f"shiq-eval: {len(rows)} model{'s' * (len(rows) != 1)} and the reference on {len(prompts)} prompt{'s' * (len(prompts) != 1)} x "
        f"{k} sample{'s' * (k != 1)} ({args.engine} engine), suite "
        f"{suite.name} ({suite_sha[:12]}); wrote {csv_path}, {json_path}, {suite_path}, "
        + ", ".join(str(p) for p in plots)
    )
    return [ref_row] + rows


# what marks a folder as another command's: an --out holding one of these files is refused
_FOLDER_MARKS = {
    "meta.json": "a checkpoint step",
    "checkpoints": "a shiq-train run",
    "latest": "a shiq-train run's checkpoints folder",
    "stages.json": "a recipe's run",
    "value_model.json": "a Q♯ value model",
    "config.json": "a model folder or a recipe's run",
    "results.json": "a shiq-eval run's results",
    "leaderboard.csv": "a leaderboard's folder",
    "full_report.json": "a shiq-demo --full study",
    "seeds_report.json": "a shiq-bfcl --seeds study",
}


def _holds_mark(out: Path, name: str) -> bool:
    """Whether ``out`` holds the mark ``name`` of :data:`_FOLDER_MARKS`: a file or folder of that name, but
    ``latest`` only as shiq-train writes it, a file naming a step folder (``step_N``): a ``latest`` link to the
    newest of a folder's results, say, marks no run's checkpoints."""
    path = out / name
    if name != "latest":
        return path.exists()
    if path.is_symlink() or not path.is_file():
        return False
    with open(path, "rb") as f:
        return STEP_FOLDER.fullmatch(f.read(64).decode("utf-8", "replace").rstrip()) is not None


def check_results_folder(out: Path, own: str = "results.json", what: str = "the results") -> None:
    """Refuse an ``--out`` that is a file, a buffer or inside one, or the folder of a model, a run or another
    command's output (a checkpoint step, a shiq-train or recipe run, a shiq-train run's checkpoints folder, a
    Hugging Face or value-model folder, a study; :data:`_FOLDER_MARKS`), among whose files ``what`` would be
    written (and a file of the same name replaced). ``own``: the mark of the command's own earlier output, which may be written again."""
    if out.exists() and not out.is_dir():
        raise EvalInputError(f"--out {out} is a file: give a folder for {what}")
    try:
        refuse_inside_buffer(out, "--out", itself=True)
    except ValueError as e:
        raise EvalInputError(str(e)) from None
    refuse_inside_model(out)
    for name, kind in _FOLDER_MARKS.items():
        if name != own and _holds_mark(out, name):
            raise EvalInputError(f"--out {out} is {kind} (it holds {name}): use another folder for {what}")
    if rank_zero():  # (under torchrun rank 0 writes)
        check_out_writable(out)


def model_folder_kind(folder: Path) -> str | None:
    """What model ``folder`` is, by the files that make one: a checkpoint step (``meta.json`` and a rank file), a
    Q♯ value model (``value_model.json`` and ``value_model.pt``) or a Hugging Face model (a ``config.json`` naming
    a ``model_type``, and weight files); None for any other folder (a project's own ``config.json`` included)."""
    if (folder / "meta.json").is_file() and any(folder.glob("rank_tp*_pp*_dp*.pt")):
        return "the checkpoint step"
    if all((folder / f).is_file() for f in ("value_model.json", "value_model.pt")):
        return "the Q♯ value model"
    if (folder / "config.json").is_file() and weight_files(folder):
        try:
            config = json_loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return None
        if isinstance(config, dict) and isinstance(config.get("model_type"), str):
            return "the model folder"
    return None


def refuse_inside_model(out: Path) -> None:
    """Refuse an ``--out`` inside a model's folder (:func:`model_folder_kind`), as one inside a buffer is: results
    written there become files of the model (hashed with it, shipped with it, removed with a step folder shiq-train
    no longer keeps), and the model's own folder is refused by its marks (:data:`_FOLDER_MARKS`)."""
    for folder in Path(out).resolve().parents:
        if (kind := model_folder_kind(folder)) is not None:
            raise EvalInputError(f"--out {out} is inside {kind} {folder}: choose a folder outside it")


def check_out_writable(out: Path) -> None:
    """Refuse, before any work, an ``--out`` the system will not make or write into (no permission, a read-only
    file system, a folder under ``/proc``) in one line naming ``--out``: it ended with the bare OS error, once
    the reference had been sampled (shiq-eval run). The folders made to find out are removed again."""
    made: list[Path] = []
    existed = out.is_dir()
    try:
        made = make_parents(out)
        if not existed:
            try:
                out.mkdir()
                made.append(out)
            except FileExistsError:  # made meanwhile by another process
                pass
        tempfile.TemporaryDirectory(dir=out, prefix=".writable-").cleanup()
    except OSError as e:
        doing = "write into" if existed else "make"
        raise EvalInputError(f"--out {out}: cannot {doing} the folder ({e.strerror or e})") from None
    finally:
        remove_created_dirs(made)


def warn_other_reference(reference: str, inits: set[str]) -> None:
    """Warn when ``--reference`` is not the model the runs started from (their recorded ``init``s, by name or by
    the folder a path leads to; a recorded path's files are not read): KL and J then measure the distance to a
    model the policies were never pulled towards (SHIQ_MATH §9), which may be meant, but is said."""

    def same(init: str) -> bool:
        if init == reference or "smollm2" in (init, reference):
            return init == reference
        return os.path.realpath(init) == os.path.realpath(reference)

    if others := sorted(i for i in inits if not same(i)):
        warn(
            f"--reference {reference} is not the model the runs started from ({', '.join(others)}) "
            "unless it is a copy of it: KL and J are measured against it"
        )


def guide_files(guide) -> list[Path]:
    """The files that make a Q♯ value model: its weights and its ``value_model.json``."""
    return [Path(guide) / "value_model.pt", Path(guide) / "value_model.json"]


def leaderboard_command(args) -> None:
    """shiq-eval leaderboard: merge result folders into one table (CSV, Markdown, HTML with plots)."""
    out = Path(args.out)
    for folder in args.results:  # its plots have the same names as the leaderboard's: they would be replaced
        if out.resolve() == Path(folder).resolve():
            raise EvalInputError(f"--out {out} is one of the result folders read: give the leaderboard its own folder")
    check_results_folder(out, own="leaderboard.csv", what="the leaderboard")
    rows = leaderboard.read_results(args.results)
    # (files of another tool under a leaderboard's names, or a leaderboard of other results, are not replaced unasked)
    replaced = leaderboard.check_replaced(out, rows, args.overwrite)
    written = leaderboard.write_leaderboard(rows, out, allow_mixed=args.allow_mixed, against=args.against)
    # a folder named twice, or by its results file too, is read once
    folders = len({(p if p.is_file() else p / leaderboard.RESULTS).resolve() for p in map(Path, args.results)})
    print(
        f"shiq-eval: leaderboard of {plural(folders, 'result folder')}; {'replaced the earlier one: ' * replaced}wrote "
        + ", ".join(map(str, written))
    )


LEADERBOARD_HELP = """shiq-eval leaderboard: merge the result folders of shiq-eval run into one table.

One row per run and step (the reference once), sorted and grouped by suite, loss and beta, with the
mean reward, the KL (the suite's estimator) and J = reward - beta * KL (SHIQ_MATH §9, at the run's own
beta; the reference's J is its reward), each with its standard error over prompts (a prompt's samples
averaged first). J is left out, with a note, for results sampled at a temperature other than 1 (the
reward is then the tempered policy's, the KL the model's own). For each pair of runs on the same prompts
(same prompts SHA-256), at each run's last step: the paired difference of reward and of J, a - b, with
its standard error over prompts; the J difference only when both runs have the same beta (or one is the
reference): at two betas J is two objectives. --against RUN (repeatable) keeps only the pairs with those
runs (n runs make n(n-1)/2 pairs: 320,000 for 800). BFCL turns (scorer bfcl) are not independent: the standard
errors, and those of the differences, are clustered by scenario (SHIQ_MATH §9) from the scenario ids that
results.json keeps per turn; BFCL results written before these were recorded get the plain per-turn
standard error, marked "not clustered" (column stderr_note and in the Markdown and HTML). Rows with the
same run label and step from several folders must be the same model (same weights SHA-256); they appear
once, the first folder's results if they differ (said on stderr: another engine or machine). A label on rows
of two methods or betas is refused (two runs); one on checkpoints of two run folders is drawn as one run,
said on stderr. A Q♯ row (--guide) is labelled with its decoding
beta and top-k, so a sweep over them keeps one row per setting.

Results of different suites (fingerprints) are not comparable and are refused, naming both files,
unless --allow-mixed (then one section per suite; suites of one name, a suite file run with other settings,
are headed with the settings that tell them apart, read from the suite.json beside their results).
Writes to --out: leaderboard.csv, pairs.csv, leaderboard.md, leaderboard.html
(one self-contained page with the plots embedded), reward_vs_kl.png, reward_vs_step.png, j_vs_step.png.
A leaderboard already in --out is replaced (said in the closing line) when it was built from these result
files or some of them (regenerated as results come in); one built from other result files only with
--overwrite. An --out holding files of those names but no leaderboard of this command, or another command's
output (a run's results, a model, a training run), is refused; the folder's other files are never touched.
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="shiq-eval", description="Evaluate shiq-train checkpoints (SHIQ_MATH §6).")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run",
        help="reward and KL of a series of checkpoints: table and plots",
        description=__doc__,  # plain text: it is the --help text
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument(
        "checkpoints",
        nargs="*",
        metavar="CHECKPOINT",
        help="shiq-train run directories (or their checkpoints folders), step directories or Hugging Face model "
        "folders (one curve per run)",
    )
    r.add_argument(
        "--label",
        action="append",
        help="run label of the rows of one CHECKPOINT (repeat once per CHECKPOINT, in order; default: the run "
        "folder's name)",
    )
    r.add_argument("--guide", metavar="VALUE_DIR", help="also evaluate Q♯ guided decoding with this value model")
    r.add_argument("--beta", type=float, help="KL weight of the Q♯ guidance (with --guide)")
    r.add_argument("--top-k", type=int, help=f"Q♯ candidates per token (with --guide; default {DEFAULT_TOP_K})")
    r.add_argument(
        "--out",
        required=True,
        type=folder_path,
        help="output folder for results.csv/json, suite.json and the plots (its other files are left alone); not a "
        "model's, a run's or a buffer's folder, nor one inside a buffer or a model's",
    )
    r.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of an earlier run in --out (refused otherwise: they may have taken hours), and "
        "evaluate every row again, discarding the rows and batches an interrupted run saved in --out/.rows/ (but for "
        "those of an interrupted run given --overwrite: the same command resumes)",
    )
    r.add_argument(
        "--suite",
        help="evaluation suite: a name in the configs' eval folder (e.g. movie_vader_small) or a YAML file; "
        "the flags below override its settings",
    )
    src = r.add_mutually_exclusive_group()
    src.add_argument("--prompts", help='JSONL of prompts: {"prompt": ..., "scorer_prompt": ... (optional)}')
    src.add_argument(
        "--movie-prompts",
        type=int,
        metavar="N",
        help="the first N (>= 1) held-out movie-review openings of the demo's split under seed 0 (snippets longer "
        "than their six-word opening; vaderSentiment archive), not the demo's sample of evaluation prompts",
    )
    r.add_argument(
        "--scorer",
        metavar="SCORER",
        help="reward_model (a regression head file), hf_reward_model (a Hugging Face sequence-classification "
        "folder with one output), vader (the lexicon), bfcl (the BFCL checker's reward of one assistant turn: "
        "prompts written by shiq-eval bfcl prompts, whose scorer prompts are ENTRY_ID:TURN) or "
        "python:MODULE:FUNCTION (a function fn(prompts: list[str], completions: list[str]) -> list[float], "
        "one finite float per completion, imported from MODULE); default: reward_model when --reward-model "
        "is given (hf_reward_model when the suite names it)",
    )
    r.add_argument(
        "--reward-model",
        help="regression reward-model head (safetensors from RegressionRewardModel.save, on MiniLM), or the "
        "folder of --scorer hf_reward_model (refused beside a --scorer that reads none, such as vader)",
    )
    r.add_argument(
        "--reference",
        help="reference model for the KL: smollm2 or a Hugging Face folder (default: the runs' init when it is "
        "smollm2; a folder they started from is named here, as a path read from a file is not followed)",
    )
    r.add_argument("--tokenizer", help="Hugging Face tokenizer folder (default: the reference's)")
    r.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        help="wrap each prompt in the tokenizer's chat template (--no-chat: plain text; default: the suite's, else "
        "plain)",
    )
    r.add_argument("--max-new-tokens", type=int, help="completion length limit (default: the suite's, else 32)")
    r.add_argument(
        "--samples-per-prompt", type=int, help="completions per prompt, 1..10000 (default: the suite's, else 1)"
    )
    r.add_argument(
        "--temperature", type=float, help="sampling temperature (default: the suite's, else 1: the policy itself)"
    )
    r.add_argument("--batch-size", type=int, help="generation batch size, 1..65536 (default: the suite's, else 16)")
    r.add_argument(
        "--seed", type=int, help="sampling seed, 0..10^9, the same for every policy (default: the suite's, else 0)"
    )
    r.add_argument(
        "--kl-estimator",
        choices=["exact", "sample"],
        help="the KL the leaderboard reports and J uses (default exact; both are in every row)",
    )
    r.add_argument(
        "--engine",
        choices=["hf", "megatron"],
        default="hf",
        help="hf: checkpoints exported to transformers (default, fastest on CPU); megatron: the "
        "trained megatron-core model itself, with its static KV cache",
    )
    r.add_argument(
        "--tp",
        type=int_at_least(1),
        default=1,
        help="tensor-parallel size of --engine megatron (run under torchrun --nproc_per_node TP)",
    )
    r.add_argument("--quiet", action="store_true", help="no progress bars or per-checkpoint lines")
    lb = sub.add_parser(
        "leaderboard",
        help="merge result folders of shiq-eval run into one table (CSV, Markdown, HTML with plots)",
        description=LEADERBOARD_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lb.add_argument("results", nargs="+", metavar="RESULT_DIR", help="--out folders of shiq-eval run")
    lb.add_argument("--out", required=True, type=folder_path, help="output folder of the leaderboard")
    lb.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a leaderboard in --out built from result files not among these (one built from these, "
        "or from some of them, is replaced without it)",
    )
    lb.add_argument(
        "--allow-mixed", action="store_true", help="merge results of different suites (not comparable) anyway"
    )
    lb.add_argument(
        "--against",
        action="append",
        metavar="RUN",
        help="pair every run only with this run (a label as in the table, e.g. reference; repeat for several); "
        "default: every pair (n runs make n(n-1)/2 pairs)",
    )
    sub.add_parser(
        "bfcl",
        add_help=False,
        help="BFCL-V3 multi-turn: check-ground-truth, rollout, prompts, report, to-buffer (see shiq-eval bfcl --help)",
    )
    add_log_level_option(p)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bfcl"]:  # the BFCL commands parse their own arguments
        return bfcl_cli.main(argv[1:], prog="shiq-eval bfcl")
    args = build_parser().parse_args(argv)
    quiet_optional_dependencies()
    # (under torchrun, ranks other than 0 log errors only: every rank reads the same inputs, and warned once each)
    setup_logging(getattr(args, "log_level", "INFO") if rank_zero() else "ERROR")
    if args.command == "run" and not progress_bars_shown(getattr(args, "log_level", "INFO")):
        args.quiet = True  # WARNING or ERROR: warnings only, no bars (its per-checkpoint lines are INFO)
    # (a stop between rows: the rows finished are saved; SIGTERM, a scheduler's stop, ends as Ctrl-C does)
    hint = " (the same command resumes, reusing the rows and batches it finished)" if args.command == "run" else ""
    with on_sigterm():
        return run_command("shiq-eval", _run_command, args, hint=hint)


def _run_command(args) -> int:
    if args.command == "leaderboard":
        leaderboard_command(args)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
