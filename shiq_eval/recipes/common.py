"""What every recipe shares: its YAML config with a ``quick`` block and ``key=value`` overrides, the
``method@β`` arms of ``train.methods``, the per-stage bookkeeping that makes a run resumable
(``DIR/config.json`` refuses a changed configuration, ``DIR/stages.json`` records finished stages), the
megatron policy and Trainer of a training stage (and whether its checkpoint is kept), and the end of the
command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch.distributed as dist
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from shiq_data.buffer import open_buffer
from shiq_data.cli_common import (
    add_log_level_option,
    hide_library_progress_bars,
    progress_bars_shown,
    quiet_optional_dependencies,
    run_command,
    setup_logging,
)
from shiq_data.io import atomic_write_json, atomic_write_texts, exclusive_lock, json_loads, one_line, type_name
from shiq_eval.checkpoints import NO_KL_WEIGHT
from shiq_eval.optimum import error_text, null_as_undefined, undefined_as_null
from shiq_eval.suite import check_no_resolvers
from shiq_train import parallel
from shiq_train.hf_convert import import_llama, model_config_from_llama
from shiq_train.model import build_model
from shiq_train.objectives import LossConfig
from shiq_train.prefix_cache import PrefixCache
from shiq_train.train_step import OptimizerConfig
from shiq_train.trainer import TrainConfig, Trainer


def load_yaml_config(
    path: str | Path,
    quick: bool = False,
    overrides: list[str] | None = None,
    keep=(),
    like: Path | None = None,
    check: Callable[[dict], None] | None = None,
) -> dict:
    """The YAML file ``path`` merged with its ``quick`` block when ``quick`` (refused if it has none), then
    ``key=value`` overrides (OmegaConf dot-list syntax; only existing keys, each with a value of the default's kind; a
    section stays a section). Top-level blocks other than ``quick`` named in ``keep`` are kept; ``full`` is
    dropped unless kept. ``like``: the recipe's shipped configuration, whose top-level sections ``path``
    must have (another recipe's file, or a file of other YAML, is refused naming what it lacks), with no key and
    no kind of value the shipped file does not have (:func:`_check_like`). ``check(cfg)``: the recipe's own
    check of the result; a key it cannot find (a file from before the key, which it reads with ``[]``) is named
    as one the file lacks."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config {path} not found")
    import yaml  # OmegaConf's own parser: its errors

    cfg = _yaml_mapping(path)
    if like is not None and Path(like).resolve() != path.resolve():
        shipped = _yaml_mapping(Path(like))
        lacks = [k for k in shipped if k not in cfg and k not in ("quick", "full")]
        if lacks:
            raise ValueError(f"{path}: lacks the sections {lacks} of {Path(like).name}: not a config of this recipe")
        _check_like(OmegaConf.to_container(cfg), OmegaConf.to_container(shipped), path, Path(like).name)
    quick_block = cfg.pop("quick", None)
    if "full" not in keep:
        cfg.pop("full", None)
    if quick and quick_block is None:  # (it ran the file's full sizes, hours where a quick run takes minutes)
        shipped = f"add one like {Path(like).name}'s" if like is not None else "add one"
        raise ValueError(
            f"--quick: {path} has no quick block, the sizes of a quick run: {shipped}, or leave out --quick"
        )
    if quick:
        cfg = OmegaConf.merge(cfg, quick_block)
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"overrides must look like key=value, got {bad}")
        for o in overrides:
            key = o.split("=", 1)[0]
            if not re.fullmatch(rf"{KEY_PART}(\.{KEY_PART})*", key):
                entry = " (an entry of a list: set the whole list, KEY=[a,b])" if re.search(r"\[|\.\d", key) else ""
                raise ValueError(f"override {o!r}: {key!r} is not a config key{entry}; keys look like train.steps")
            if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
                raise ValueError(f"unknown config key {key!r} in override {o!r} (see {path})")
        try:
            given = OmegaConf.from_dotlist(overrides)
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            raise ValueError(f"overrides {overrides}: not valid YAML values ({one_line(e, 160)})") from None
        for key in (o.split("=", 1)[0] for o in overrides):
            old, new = OmegaConf.select(cfg, key), OmegaConf.select(given, key)
            if OmegaConf.is_dict(old) and not OmegaConf.is_dict(new):
                raise ValueError(f"override {key}={new!r}: {key} is a section: set its keys ({key}.NAME=...)")
            if OmegaConf.is_dict(new):  # its keys would reach the run unchecked (a typo saved as a new key)
                raise ValueError(
                    f"override {key}={OmegaConf.to_container(new)!r}: set each key on its own ({key}.NAME=...)"
                )
            if not same_kind(old, new):
                raise ValueError(f"override {key}={new!r}: expected a value like {old!r} (see {path})")
        cfg = OmegaConf.merge(cfg, given)
    cfg = OmegaConf.to_container(cfg, resolve=True)
    if check is not None:
        try:
            check(cfg)
        except KeyError as e:
            shipped = f"that {Path(like).name} has" if like is not None else "the recipe needs"
            raise ValueError(f"{path}: lacks the key {e} {shipped}: add it from there") from None
    return cfg


def _kind(v) -> str:
    """What kind of value a config file holds: a number (int or float alike: the bounds say which is needed,
    in their own words), a flag, a string, a list or a section."""
    if isinstance(v, bool):
        return "flag"
    return "number" if isinstance(v, (int, float)) else type(v).__name__


KEY_PART = r"[A-Za-z_][A-Za-z0-9_-]*"  # one part of a dotted config key (no list index)


def _check_like(cfg: dict, shipped: dict, path: Path, name: str, prefix: str = "") -> None:
    """A ``--config`` file against the recipe's shipped one ``name``: no key the shipped file lacks (a misspelt
    key would be ignored), each value of the shipped value's kind (:func:`_kind`; a section a section, never
    empty), so that a stage never meets a list where a section stands. A file may lack keys: one written before
    they existed reads as the code of its day did (the recipe's own check names a key it cannot do without).
    Its ``quick`` block holds keys of the file's sections; ``full``'s grids have the arms as keys."""
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if key not in shipped:
            raise ValueError(f"{path}: unknown key {dotted!r} (not in {name})")
        old = shipped[key]
        if (None not in (old, value) or isinstance(old, dict)) and _kind(old) != _kind(value):
            raise ValueError(
                f"{path}: {dotted} is {value!r}; {name} has {old!r} there (a value of that kind is needed)"
            )
        if isinstance(old, dict) and not (prefix == "full." and key == "betas"):
            inner = shipped if (not prefix and key == "quick") else old
            _check_like(value, inner, path, name, f"{dotted}.")


def _yaml_mapping(path: Path):
    """The YAML mapping in ``path`` as an OmegaConf config, or a ``ValueError`` naming the file."""
    import yaml  # OmegaConf's own parser: its errors

    try:
        cfg = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError, ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable YAML configuration ({one_line(e, 160)})") from None
    if not OmegaConf.is_dict(cfg):
        raise ValueError(f"{path}: expected a mapping of sections (data:, train:, ...), got {type_name(cfg)}")
    check_no_resolvers(cfg, path)
    return cfg


def same_kind(old, new) -> bool:
    """Whether an override ``new`` has the kind of value of the default ``old`` (an int for a float is fine)."""
    if old is None or new is None:
        return True
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, float):
        return isinstance(new, (int, float))
    if isinstance(old, (int, str)):
        return type(new) is type(old)
    return OmegaConf.is_list(old) == OmegaConf.is_list(new) and OmegaConf.is_dict(old) == OmegaConf.is_dict(new)


SEED_WHY = "seeds, with small offsets added per stage, seed numpy's and torch's generators"


@dataclass(frozen=True)
class Bounds:
    """What a number of a recipe's configuration may be, checked by :func:`check_bounds` before any work
    starts (a bad value found only when a stage reads it would cost the minutes of the stages before)."""

    integer: bool = True
    """An int (never a bool); False: any finite int or float."""
    low: float | None = None
    """The smallest value allowed (None: no lower bound)."""
    high: float | None = None
    """The largest value allowed (None: no upper bound)."""
    above: bool = False
    """``low`` itself is excluded: the value must exceed it."""
    below: bool = False
    """``high`` itself is excluded."""
    null: bool = False
    """None (YAML ``null``) is allowed too: a setting's "all" or "none"."""
    also: tuple = ()
    """Values allowed outside the range (``-1``: every layer)."""
    each: bool = False
    """The value is a non-empty list, each entry such a number."""
    why: str = ""
    """What the bound protects, said in the refusal."""

    def __post_init__(self):
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"Bounds: low {self.low} > high {self.high}")

    def admits(self, v) -> bool:
        """Whether one value (one entry, with ``each``) is allowed."""
        if v is None:
            return self.null
        if isinstance(v, bool) or not isinstance(v, int if self.integer else (int, float)):
            return False
        if v in self.also:
            return True
        if not math.isfinite(v):
            return False
        if self.low is not None and (v <= self.low if self.above else v < self.low):
            return False
        return self.high is None or (v < self.high if self.below else v <= self.high)

    def describe(self) -> str:
        """The rule in words: "an integer >= 1", "a number in (0, 1)", "null or an integer in 1..6"."""
        text = "an integer" if self.integer else "a number"
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            if self.integer and not (self.above or self.below):
                text += f" in {lo:g}..{int(hi)}"  # an integer written out: 1000000000, not 1e+09
            else:
                text += f" in {'(' if self.above else '['}{lo:g}, {hi:g}{')' if self.below else ']'}"
        elif lo is not None:
            text += f" {'>' if self.above else '>='} {lo:g}"
        elif hi is not None:
            text += f" {'<' if self.below else '<='} {hi:g}"
        text += "".join(f" or {v!r}" for v in self.also)
        text = f"null or {text}" if self.null else text
        text = f"a non-empty list of entries each {text}" if self.each else text
        return f"{text} ({self.why})" if self.why else text


SMOLLM2_LAYERS = 30  # the transformer layers of SmolLM2-135M-Instruct, every recipe's model

# The optimiser and trainer keys every recipe's train block shares (recipe_optimizer, recipe_trainer)
TRAIN_BOUNDS = {
    "train.steps": Bounds(low=1),
    "train.groups_per_step": Bounds(low=1),
    "train.lr": Bounds(integer=False, low=0, above=True),
    "train.warmup_steps": Bounds(low=0),
    "train.clip_grad": Bounds(integer=False, low=0, why="0: no clipping"),
}


def check_bounds(cfg: dict, bounds: dict[str, Bounds]) -> None:
    """Each dotted key of ``bounds`` (``*`` matching any key at its level) that ``cfg`` has, against its
    :class:`Bounds`: ``ValueError("<key> must be <rule>, got <value>")`` at the first that breaks it. Keys a
    configuration lacks are skipped (a file from before they existed)."""
    for pattern, rule in bounds.items():
        for key, v in _select_all(cfg, pattern.split("."), ""):
            ok = isinstance(v, list) and v and all(map(rule.admits, v)) if rule.each else rule.admits(v)
            if not ok:
                raise ValueError(f"{key} must be {rule.describe()}, got {v!r}")


def check_frozen_prefix(trainable: dict[str, int], layers: int) -> None:
    """With ``train.cache_frozen_prefix``, each of the ``trainable`` layer counts (dotted key: value) must leave
    at least one of the model's ``layers`` frozen to cache (the cache refuses it only once a stage builds it)."""
    for key, k in trainable.items():
        if k == -1 or k >= layers:
            raise ValueError(
                f"{key}={k} trains every layer of {layers}, so train.cache_frozen_prefix=true has no frozen layers "
                f"to cache: "
                + (f"train at most {layers - 1}, or " if layers > 1 else "a model of one layer has none: ")
                + "set train.cache_frozen_prefix=false"
            )


def _select_all(node, parts: list[str], prefix: str):
    """``(dotted key, value)`` of every leaf of ``node`` that the key ``parts`` (``*``: any) names."""
    if not parts:
        yield prefix, node
        return
    if not isinstance(node, dict):
        return
    head, rest = parts[0], parts[1:]
    for k in node if head == "*" else [head] if head in node else []:
        yield from _select_all(node[k], rest, f"{prefix}.{k}" if prefix else str(k))


def check_warmup(t: dict) -> None:
    """``train.warmup_steps`` at most ``train.steps``: a longer warm-up ends the run before the learning rate
    reaches ``train.lr`` (its cosine decay never starts), which no one asks for on purpose."""
    if t["warmup_steps"] > t["steps"]:
        raise ValueError(
            f"train.warmup_steps ({t['warmup_steps']}) must not exceed train.steps ({t['steps']}): "
            f"the learning rate would never reach train.lr (give train.warmup_steps={t['steps']} or fewer)"
        )


def check_flags(cfg: dict, keys) -> None:
    """Each dotted key of ``keys`` that ``cfg`` has is true or false."""
    for key in keys:
        for name, v in _select_all(cfg, key.split("."), ""):
            if not isinstance(v, bool):
                raise ValueError(f"{name} must be true or false, got {v!r}")


SINGLE = "-single"  # arm suffix: the method trained on one completion per prompt (the demo's information arm)


def arm_method(arm: str) -> str:
    """The method of a ``train.methods`` entry: ``"shiq"``, ``"shiq@0.1"`` (the method at β = 0.1), or
    ``"shiq-single@0.1"`` (trained on single-completion data, see :func:`arm_is_single`)."""
    return arm.partition("@")[0].removesuffix(SINGLE)


def arm_is_single(arm: str) -> bool:
    """Whether the entry trains on one completion per prompt over as many completions in all (the
    information-controlled arm: ShiQ needs no second completion of a prompt, DPO and CoPG do)."""
    return arm.partition("@")[0].endswith(SINGLE)


def arm_beta(cfg: dict, arm: str) -> float:
    """The β of a ``train.methods`` entry: the one after ``@``, else ``methods.<method>.beta``."""
    _, _, beta = arm.partition("@")
    return float(beta) if beta else float(cfg["methods"][arm_method(arm)]["beta"])


def check_arms(cfg: dict, known, single=()) -> None:
    """``train.methods``: names only, no entry twice, every method in ``known`` (``-single`` arms only of methods in
    ``single``), every β a number > 0, none after ``@`` for a loss that reads no β (SFT) and none missing after an ``@``."""
    methods = cfg["train"]["methods"]
    if not methods:  # every stage would run, then a report of no method
        raise ValueError("train.methods is empty: name at least one method to train")
    if bad := [arm for arm in methods if not isinstance(arm, str)]:  # (a list or mapping: unhashable, a TypeError)
        raise ValueError(f"train.methods: each entry must be a method's name, such as shiq or shiq@0.1, got {bad[0]!r}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"train.methods lists an entry twice: {methods}")
    seen = {}
    for arm in methods:
        m, at, b = str(arm).partition("@")
        if at and not b:  # (it was read as the method's default β)
            raise ValueError(f"train.methods: {arm!r}: nothing after @: give the β ({m}@0.1) or leave the @ out")
        if b and arm_method(m) in NO_KL_WEIGHT:  # (the same run as without it, under another name)
            raise ValueError(f"train.methods: {arm!r}: {arm_method(m)} reads no β (no KL to the reference): write {m}")
        if b and not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", b):  # float() also reads 1_0 (10), nan, inf
            raise ValueError(f"train.methods: {arm!r}: the β after @ must be a plain number, such as {m}@0.1")
        if arm_is_single(m):
            m = arm_method(m)
            if m not in single:
                raise ValueError(
                    f"train.methods: {arm!r}: {m} cannot train on one completion per prompt "
                    f"({SINGLE} arms: {', '.join(single) or 'none in this recipe'})"
                )
        if m not in known:
            raise ValueError(f"train.methods: unknown method {m!r} (one of {', '.join(known)})")
        beta = cfg.get("methods", {}).get(m, {}).get("beta")
        if not b and m not in cfg.get("methods", {}):  # (methods.<m>.beta would be an unknown key)
            raise ValueError(
                f"train.methods: {arm!r}: the configuration gives {m} no β (it has no methods.{m}): name it in "
                f"the arm, such as {arm}@0.1"
            )
        if b:
            try:
                beta = float(b)
            except ValueError:
                beta = b
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < math.inf:
            raise ValueError(
                f"methods.{m}.beta (or {m}@BETA in train.methods) must be a finite number > 0, got {beta!r}"
            )
        same = seen.setdefault((str(arm).partition("@")[0], float(beta)), arm)
        if same != arm:  # shiq@0.1 and shiq@0.10 (or shiq at its default β): one arm trained twice
            raise ValueError(f"train.methods: {same!r} and {arm!r} are the same arm (β {float(beta):g})")


LOCK = ".lock"  # held (flock) by the process running the recipe in the folder


class ConfigChanged(ValueError):
    """A run folder holds a run of another configuration (:class:`Stages`): a recipe may say more of why."""


STAGING = ".building"  # in a run folder: where a stage builds a folder before it replaces the old one
# a run folder with no stage's output in it (a staging folder a stop left is removed before the next build)
BARE_RUN = {"config.json", "stages.json", "run.log", LOCK, STAGING}


def build_staged(out: Path, name: str, build: Callable[[Path], None]) -> Path:
    """``out / name`` made whole: ``build(folder)`` fills a staging folder named as it (``out/.building/name``,
    so that the progress bars name what they build), which then replaces ``out / name``. A staging folder a stop
    left is removed first, as is ``out/NAME.building``, where earlier versions built it."""
    final, tmp = out / name, out / STAGING / name
    for old in (tmp, out / f"{name}.building"):
        if old.exists():
            shutil.rmtree(old)
    tmp.parent.mkdir(exist_ok=True)
    build(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if not any(tmp.parent.iterdir()):
        tmp.parent.rmdir()
    return final


def check_run_folder(out: Path, prog: str) -> None:
    """Refuse an ``out`` that is not a recipe's run folder: a file, a folder of other files (a home folder,
    a buffer: the stages would write among them and replace their ``buffer/`` or ``report.md``), the inside of
    a buffer, or a run whose ``config.json`` is gone (its finished stages could not be checked against the
    configuration given now, and the report would claim it for them)."""
    from shiq_data.buffer import refuse_inside_buffer

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder for the run")
    refuse_inside_buffer(out, "--out", itself=True)
    if not out.is_dir() or (out / "config.json").exists():
        return
    if (out / "stages.json").exists():
        raise ValueError(
            f"{out} holds stages.json but no config.json: the configuration its finished stages were made with is "
            "gone, so this one cannot be checked against it; use another --out (or put config.json back)"
        )
    others = sorted(p.name for p in out.iterdir() if p.name not in ("run.log", LOCK))  # (--jobs opens run.log first)
    if others:
        shown = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
        raise ValueError(
            f"--out {out} holds files ({shown}) but is not a {prog} run folder (no config.json): give a new or "
            "empty folder"
        )


_LOCKED: dict[Path, contextlib.ExitStack] = {}  # the run folders this process holds the lock of


def lock_run_folder(out: Path, prog: str) -> None:
    """Make ``out`` and hold the lock ``out/.lock`` until this process ends (again for the same folder: held
    already), or refuse the folder: two processes in one run folder would run the same stages side by side and
    write each other's files. The lock goes with the process however it ends (a kill too)."""
    out.mkdir(parents=True, exist_ok=True)
    key = out.resolve()
    if key in _LOCKED:
        return
    held = contextlib.ExitStack()
    why = held.enter_context(exclusive_lock(out / LOCK, wait=False, holder=f"another {prog} run"))
    if why is not None:
        held.close()
        raise ValueError(f"--out {out}: {why}: wait for it to end, or use another --out")
    _LOCKED[key] = held


def check_study_folder(out: Path, owns: set[str]) -> None:
    """Refuse an ``out`` for a study of several seeds (``--seeds``, ``--full``: a run per seed in ``out/seed<N>``,
    reports and figures beside them) that holds anything but such seed folders and the files ``owns`` names
    (those the study writes, replaced when it is run again, and a write of one cut short): a file, a folder of
    other files (the study would write among them and replace a file of the same name), one run of the recipe
    (its stages and the seeds' runs would be mixed), or the inside of a buffer. Each seed's folder is then
    checked by its run when that starts (:func:`check_run_folder`)."""
    from shiq_data.buffer import refuse_inside_buffer

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder for the study")
    refuse_inside_buffer(out, "--out", itself=True)
    if not out.is_dir():
        return
    if (out / "config.json").exists() or (out / "stages.json").exists():
        raise ValueError(
            f"--out {out} holds one run (config.json, stages.json), not a study of seeds: use another --out"
        )

    def ours(p: Path) -> bool:
        if p.is_dir():
            return re.fullmatch(r"seed\d+", p.name) is not None
        return p.name in owns or any(p.name.startswith(f".{name}.") and p.name.endswith(".tmp") for name in owns)

    others = sorted(p.name for p in out.iterdir() if not ours(p))
    if others:
        shown = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
        raise ValueError(
            f"--out {out} holds files ({shown}) that a study of seeds does not write (seed<N> folders and its "
            "reports): give a new or empty folder, or an earlier study's"
        )


def read_json(path: Path, hint: str | None = None, keys: tuple[str, ...] = (), records: bool = False):
    """A recipe's JSON file, or a ``ValueError`` naming it and saying what to do (``hint``, default: how to
    make a stage's output again) when it is cut short, not UTF-8 or gone, or, given ``keys``, not an object
    holding them (with ``records``: not a list of such objects). A null standard error or deviation (an
    undefined one, :func:`shiq_eval.optimum.undefined_as_null`) is read as NaN."""
    redo = REDO if hint is None else hint
    try:
        data = null_as_undefined(json_loads(path.read_text(encoding="utf-8")))  # an undefined error: NaN
    except (ValueError, RecursionError, FileNotFoundError) as e:  # (JSONDecodeError, UnicodeDecodeError: ValueErrors)
        raise ValueError(f"{path}: {_json_problem(e)}{redo}") from None
    if records and (not isinstance(data, list) or not data):  # (written only with a record in it)
        raise ValueError(f"{path}: expected a list of records, got {json.dumps(data)[:60]}{redo}")
    for i, record in enumerate(data if records else [data] if keys else []):
        if not isinstance(record, dict) or not set(keys) <= set(record):
            where = f"record {i + 1}: " if records else ""
            raise ValueError(
                f"{path}: {where}expected a JSON object with {', '.join(map(repr, keys))}, got "
                f"{json.dumps(record)[:60]}{redo}"
            )
    return data


def write_results_json(path: Path, obj) -> Path:
    """``atomic_write_json`` of a recipe's results: an undefined (NaN) standard error or deviation written as
    null (:func:`shiq_eval.optimum.undefined_as_null`; :func:`read_json` reads it back as NaN)."""
    return atomic_write_json(path, undefined_as_null(obj))


def field_problem(kind: str, v) -> str | None:
    """What a value of kind ``kind`` must be when ``v`` is not that, else None: ``text``, ``count`` (an
    integer >= 1), ``index`` (an integer >= 0), ``number`` (finite), ``numbers`` (a non-empty list of finite
    numbers), ``error`` (a standard error: finite, or NaN where it is undefined, null in the file and read as
    NaN by :func:`read_json`), ``flag`` (a bool) or ``any``."""
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    ok = {
        "error": number and not math.isinf(v),
        "text": isinstance(v, str),
        "count": number and isinstance(v, int) and v >= 1,
        "index": number and isinstance(v, int) and v >= 0,
        "number": number and math.isfinite(v),
        "numbers": isinstance(v, list) and bool(v) and all(field_problem("number", x) is None for x in v),
        "flag": isinstance(v, bool),
        "any": True,
    }[kind]
    wanted = {"count": "an integer >= 1", "index": "an integer >= 0", "number": "a finite number", "text": "text"}
    wanted["numbers"] = "a non-empty list of finite numbers"
    wanted["error"] = "a finite number or null"
    return None if ok else wanted.get(kind, "true or false")


def read_jsonl(path: Path) -> list:
    """The records of a recipe's JSONL file (blank lines skipped), or a ``ValueError`` naming file and line."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # (U+2028 may be inside a string)
    except (UnicodeDecodeError, FileNotFoundError) as e:
        raise ValueError(f"{path}: {_json_problem(e)}{REDO}") from None
    records = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json_loads(line))
            except (ValueError, RecursionError) as e:
                raise ValueError(f"{path}: line {i}: {_json_problem(e)}{REDO}") from None
    return records


REDO = (  # what a message about a stage's file says to do (shiq_eval.recipes.bfcl's too)
    " (a stage's output, damaged or removed: delete it, and the stage that made it from the run's stages.json, "
    "to make it again; a file of a trained arm, its whole folder runs/ARM: its checkpoints would resume past the "
    "steps the file recorded; or use another --out)"
)


def _json_problem(e: Exception) -> str:
    if isinstance(e, FileNotFoundError):
        return "missing"
    if isinstance(e, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    return f"not valid JSON ({e})"  # a number of over 4,300 digits, nesting too deep


class Stages:
    """``DIR/stages.json``: which stages are finished and how long each took (seconds).

    ``DIR/config.json`` holds the run's configuration; a different one is refused (``prog`` names the
    command in that message) rather than mixed into old results, except in the dotted keys ``free`` (a key
    frees everything below it too): keys that no finished stage's result depends on (a recipe's list of
    arms, each arm its own stage), whose new values are saved. ``absent`` maps dotted keys added to the
    configuration after runs were made to the value that stands for the code before them: a saved
    configuration without such a key reads as holding that value (so an older run resumes with it given).
    A run none of whose stages finished or left any file (one refused by its first stage) takes the new
    configuration. ``check()``, if given, runs once the configuration is accepted and before it is saved: a
    recipe's own refusal (a free key's new value that a finished stage contradicts) leaves the run as it was.
    ``DIR`` must be a run folder, new or empty (:func:`check_run_folder`)."""

    def __init__(
        self,
        out: Path,
        cfg: dict,
        prog: str = "shiq-demo",
        free: tuple[str, ...] = (),
        absent: dict[str, object] | None = None,
        check: Callable[[], None] | None = None,
    ):
        self.out, self.path = out, out / "stages.json"
        saved = out / "config.json"
        check_run_folder(out, prog)
        self.state = self._read_state()
        if saved.exists():
            old = read_json(saved, " (the run's configuration: put it back whole, or use another --out)")
            if not isinstance(old, dict):
                raise ValueError(f"{saved}: expected the run's configuration (a JSON object), got {type_name(old)}")
            if set(old) != set(cfg) and not set(old) ^ set(cfg) <= {k.split(".")[0] for k in absent or {}}:
                raise ValueError(
                    f"{out} holds a run with other sections ({', '.join(sorted(set(old) ^ set(cfg)))} in one of the two "
                    f"configurations only): a run of another recipe than {prog}, or of another version; use another --out"
                )
        # no stage finished nor left anything: nothing holds the old configuration, and the new one is saved
        write = not saved.exists() or (not self.state["done"] and set(p.name for p in out.iterdir()) <= BARE_RUN)
        if not write:
            filled = [k for k, v in (absent or {}).items() if _fill_absent(old, k, v)]
            diff = sorted(diff_keys(old, cfg))
            if refused := [k for k in diff if not any(k == f or k.startswith(f + ".") for f in free)]:
                older = [k for k in refused if k in filled]
                hint = (
                    f"; made before {', '.join(older)} existed: give {' '.join(f'{k}={absent[k]}' for k in older)} "
                    "to resume it"
                    if older
                    else ""
                )
                changes = "; ".join(f"{k}: {_shown(old, k)} saved, {_shown(cfg, k)} now" for k in refused)
                raise ConfigChanged(
                    f"{out} holds a run with a different configuration ({changes}{hint}); "
                    "use another --out or remove it"
                )
            write = bool(diff or filled)
        lock_run_folder(out, prog)  # (a folder refused above is left as it was, without a lock file)
        if check is not None:
            check()
        if write:
            atomic_write_json(saved, cfg)

    def _read_state(self) -> dict:
        hint = " (delete it and every stage runs again, resuming what it can; or use another --out)"
        state = read_json(self.path, hint) if self.path.exists() else {"done": {}}
        done = state.get("done") if isinstance(state, dict) else None
        if not isinstance(done, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e300  # (not NaN, nor 10**400)
            for v in done.values()
        ):
            raise ValueError(
                f'{self.path}: expected {{"done": {{stage: seconds, ...}}}}, got {json.dumps(state)[:80]} '
                "(delete the file to run every stage again)"
            )
        return state

    def done(self, name: str) -> bool:
        return name in self.state["done"]

    def finish(self, name: str, seconds: float) -> None:
        self.state["done"][name] = round(seconds, 2)
        atomic_write_json(self.path, self.state)

    def timings(self) -> dict:
        return dict(self.state["done"])

    def run(self, plan: list[tuple[str, Callable[[], None]]], log, build_report, report_markdown, after=None) -> dict:
        """Each ``(name, fn)`` of ``plan`` in turn, skipped when finished earlier, then ``after(name)`` (work no
        result depends on, such as deleting a finished arm's checkpoint); then, every time, the stage
        ``report``: ``build_report(timings)`` (the report dict, from the stages' outputs) written as
        ``DIR/report.json`` and ``DIR/report.md`` (``report_markdown(report)``), and written again once
        its ``timings`` include the report's own time. Returns the report."""
        for name, fn in plan:
            if self.done(name):
                log(f"{name}: done earlier, skipped")
            else:
                log(f"{name}: running")
                t0 = time.perf_counter()
                try:
                    fn()
                except FileNotFoundError as e:
                    finished = [n for n in self.state["done"] if n != "report"]
                    inside = [Path(e.filename).resolve()] if e.filename else []
                    inside = any(p.is_relative_to(self.out.resolve()) for p in inside) or str(self.out) in str(e)
                    if not finished or not inside:
                        raise
                    # in the run folder, where the stages recorded finished in stages.json write
                    raise ValueError(
                        f"{name}: {e} (the output of a finished stage, gone since: delete the stage that made it, one "
                        f"of {', '.join(finished)}, from {self.path} to make it again, or use another --out)"
                    ) from e
                self.finish(name, time.perf_counter() - t0)
            if after is not None:
                after(name)
        t0 = time.perf_counter()
        rep = build_report(self.timings())
        self._write_report(rep, report_markdown)
        self.finish("report", time.perf_counter() - t0)
        rep["timings"] = self.timings()
        self._write_report(rep, report_markdown)
        return rep

    def _write_report(self, rep: dict, report_markdown) -> None:
        md = report_markdown(rep)  # (both written only when both are made, and renamed in together)
        text = json.dumps(undefined_as_null(rep), indent=2) + "\n"  # an undefined error: null
        atomic_write_texts({self.out / "report.json": text, self.out / "report.md": md})


def seed_stats(values: list[float]) -> tuple[float, float]:
    """Mean over seeds and the seeds' standard deviation (ddof 1; NaN for one seed, which measures no spread:
    null in the reports, :func:`shiq_eval.optimum.undefined_as_null`)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def sd_cell(sd: float, seeds: int, fmt: str = ".3f") -> str:
    """The seeds' standard deviation as a table cell: ``–`` from one seed, which measures no spread (its
    :func:`seed_stats` value is NaN; an older report's 0 was a placeholder, not a finding)."""
    return error_text(sd, fmt) if seeds > 1 else "–"


def across_seeds(per_seed: list[tuple[float, float]]) -> tuple[float, float, float]:
    """One quantity measured in each of ``S`` seeds as ``(mean, standard error)`` (a paired difference, say), each
    seed trained and evaluated apart: ``(mean over seeds, standard error of that mean, the seeds' standard
    deviation of the per-seed means)``. The standard error is ``sqrt(max(sd², mean se_s²) / S)``: the spread of
    the seeds measures training and evaluation noise together, and is never taken below the evaluation noise
    alone (three seeds' sd can fall below it by chance). The within-seed errors alone (``sqrt(Σ se_s²) / S``)
    left the training noise out: an interval of ±1.96 of them held a true difference of 0 in 53% of studies
    of three seeds with a training sd 2.5 times the within-seed error. With one seed it is that seed's error
    (the sd NaN, :func:`seed_stats`); with undefined within-seed errors (one prompt: NaN), the seeds' spread
    alone; NaN when neither is defined."""
    mean, sd = seed_stats([m for m, _ in per_seed])
    within = float(np.mean([se**2 for _, se in per_seed]))
    return mean, float(np.sqrt(np.fmax(sd**2, within) / len(per_seed))), sd  # (fmax: a NaN side is left out)


def _fill_absent(cfg: dict, key: str, value) -> bool:
    """Set the dotted ``key`` of ``cfg`` to ``value`` if it is missing (its parent present); whether it was."""
    *parents, last = key.split(".")
    for k in parents:
        cfg = cfg.get(k)
        if not isinstance(cfg, dict):
            return False
    if last in cfg:
        return False
    cfg[last] = value
    return True


def _shown(cfg: dict, key: str, width: int = 60) -> str:
    """The value of the dotted ``key`` in ``cfg`` as JSON (``absent`` if a section lacks it), cut at ``width``
    characters."""
    value = cfg
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return "absent"
        value = value[part]
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def diff_keys(a, b, prefix=""):
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            yield from diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")


def logger(prog: str, name: str):
    """``log(msg)``: the progress line ``[prog] msg`` at level INFO of the logger ``name`` (the calling
    module's ``__name__``), on stderr once the command has called ``shiq_data.cli_common.setup_logging``."""
    module_log = logging.getLogger(name)

    def log(msg: str) -> None:
        module_log.info(f"[{prog}] {msg}")

    return log


def recipe_optimizer(t: dict) -> OptimizerConfig:
    """The recipes' AdamW schedule from their ``train`` block: ``lr`` after ``warmup_steps``, then cosine to
    a tenth of it over the remaining ``steps``, gradients clipped at ``clip_grad``."""
    return OptimizerConfig(
        lr=t["lr"],
        warmup_steps=t["warmup_steps"],
        decay_steps=max(0, t["steps"] - t["warmup_steps"]),
        clip_grad=t["clip_grad"],
        min_lr=t["lr"] * 0.1,
    )


def package_versions(names) -> dict:
    """The installed version of each distribution in ``names`` (None when it is not installed)."""
    out = {}
    for p in names:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def megatron_policy(hf_model, **overrides):
    """A megatron model of this process group with the shape and weights of the Hugging Face Llama
    ``hf_model`` (``overrides`` of its :func:`shiq_train.hf_convert.model_config_from_llama` config)."""
    model = build_model(model_config_from_llama(hf_model.config, **overrides))
    import_llama(model, hf_model.state_dict(), hf_model.config)
    return model


class PrefixCaches:
    """The frozen-prefix caches (:class:`shiq_train.prefix_cache.PrefixCache`) of a run's buffers, each built
    on first use and shared by every later stage of the process: the arms of a recipe train on the same
    buffer from the same frozen layers, so those layers run once per row, not once per row and arm. Each
    is also saved as ``DIR/prefix_cache/<buffer>-k<trainable layers>.safetensors`` and read back by a later
    process (a resumed run, arms added to a finished one) when it fits the buffer and the model's frozen
    weights; otherwise it is built again and the file replaced.

    ``reference``: a callable giving the Hugging Face reference model; ``log``: the recipe's logger;
    ``progress``: whether a build draws its bar; ``overrides``: :func:`megatron_policy` overrides of the model
    built when a stage gives none."""

    def __init__(self, cfg: dict, out: Path, reference: Callable[[], object], log, progress: bool = True, **overrides):
        self.cfg, self.out, self._reference, self._log, self._overrides = cfg, out, reference, log, overrides
        self._progress = progress
        self._caches: dict[tuple[str, int], PrefixCache] = {}

    def get(self, buffer: str, trainable_last_layers: int, model=None) -> PrefixCache | None:
        """The cache of ``DIR/<buffer>`` for that many trainable layers (None when ``train.cache_frozen_prefix``
        is off): read from its file when that fits, else built from ``model`` (the reference imported into
        megatron) or else from a megatron copy of the reference (in a process group of its own when none
        is set up), and saved."""
        if not self.cfg["train"].get("cache_frozen_prefix", False):
            return None
        key = (buffer, trainable_last_layers)
        if key not in self._caches:
            t0 = time.perf_counter()
            path = self.out / "prefix_cache" / f"{buffer}-k{trainable_last_layers}.safetensors"
            rows = open_buffer(self.out / buffer)
            group = parallel.distributed(seed=self.cfg["seed"]) if not dist.is_initialized() else nullcontext()
            with group:
                if model is None:
                    model = megatron_policy(self._reference(), **self._overrides)
                cache = self._saved(path, rows, model, trainable_last_layers)
                if cache is None:
                    cache = PrefixCache.from_buffer(model, rows, trainable_last_layers, progress=self._progress)
                    cache.save(path)
                    how = "cached for"
                else:
                    how = f"read from {path.name} for"
            self._log(
                f"{buffer}: hidden states after layer {cache.n_frozen} of {cache.num_layers} {how} "
                f"{len(cache)} rows ({cache.nbytes / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s)"
            )
            self._caches[key] = cache
        return self._caches[key]

    def _saved(self, path: Path, rows, model, trainable_last_layers: int) -> PrefixCache | None:
        """The cache saved at ``path`` if there is one and it fits; else None (saying why it is rebuilt)."""
        if not path.exists():
            return None
        try:
            cache = PrefixCache.load(path)
            why = cache.fits(rows, model, trainable_last_layers)
        except ValueError as e:
            why = str(e)
        if why is None:
            return cache
        self._log(f"{path}: {why}; building it again")
        return None


def recipe_trainer(model, cfg: dict, arm: str, run: Path, hf_config, run_meta: dict, prefix_cache=None, **train):
    """The :class:`shiq_train.trainer.Trainer` of the arm ``arm`` in ``run``: its method at its β, the
    schedule of :func:`recipe_optimizer`, ``train.steps`` steps on the last ``train.trainable_last_layers``
    layers (their shared leading tokens once with ``train.share_prefixes``), no TensorBoard, ``train`` more
    :class:`TrainConfig` fields; its run metadata records the
    method, ``run_meta``, the Hugging Face config and an init from SmolLM2 (what ``shiq-eval run`` reads back)."""
    t, method = cfg["train"], arm_method(arm)
    return Trainer(
        model,
        LossConfig(method, beta=arm_beta(cfg, arm)),
        recipe_optimizer(t),
        TrainConfig(
            steps=t["steps"],
            trainable_last_layers=t["trainable_last_layers"],
            tensorboard=False,
            share_prefixes=t.get("share_prefixes", False),
            **train,
        ),
        run,
        run_meta={"method": method, **run_meta, "hf_config": hf_config.to_dict(), "config": {"init": "smollm2"}},
        prefix_cache=prefix_cache,
    )


def drop_checkpoints(cfg: dict, out: Path, stage: str, log) -> None:
    """Unless ``train.keep_checkpoints``: delete ``DIR/runs/<arm>/checkpoints`` once the stage ``train_<arm>``
    is recorded finished (:meth:`Stages.run` calls this after each stage, finished now or earlier), when
    the checkpoint is no longer needed to resume, only to export or train on. The folder is renamed first,
    so a deletion cut short leaves no half checkpoint for a resume to read; what is left is deleted the
    next time. A folder that cannot be deleted is kept, and the log says why."""
    if cfg["train"].get("keep_checkpoints", True) or not stage.startswith("train_"):
        return
    run = out / "runs" / stage.removeprefix("train_")
    ckpt, trash = run / "checkpoints", run / "checkpoints.deleting"
    try:
        if ckpt.exists():
            if trash.exists():
                shutil.rmtree(trash)
            ckpt.rename(trash)
        if trash.exists():
            shutil.rmtree(trash)
    except OSError as e:
        log(f"{stage}: could not delete {ckpt} ({e}); it is kept")


# what the line of a stopped recipe adds (Ctrl-C, SIGTERM): its stages and trainers' checkpoints are kept
RESUMES = " (the same command resumes after the last finished stage)"


def run_recipe(ap: argparse.ArgumentParser, argv: list[str] | None, fn, hint: str = "") -> int:
    """The end of a recipe's ``main``: the ``KEY=VALUE`` overrides and ``--log-level`` added to ``ap``, the
    command line parsed, megatron's import notices hidden, logging set up, ``args.progress`` set (a log level
    above INFO draws no progress bar, the libraries' included), then ``fn(args)`` with a user error ending in
    one line (:func:`shiq_data.cli_common.run_command`; ``hint`` follows its line for a stop)."""
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    add_log_level_option(ap)
    args = ap.parse_args(argv)
    quiet_optional_dependencies()
    level = getattr(args, "log_level", "INFO")
    setup_logging(level)
    args.progress = progress_bars_shown(level)
    if not args.progress:
        hide_library_progress_bars()
    return run_command(ap.prog, fn, args, hint=hint)
