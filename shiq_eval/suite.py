"""Evaluation suites: what ``shiq-eval run`` measures, as a config file with a fingerprint (SHIQ_MATH §6, §9).

A suite (``configs/eval/NAME.yaml``, or any YAML file of the same shape) fixes the prompts, the scorer,
the sampling settings (temperature, completion length, samples per prompt, seed, batch size: batch ``i``
is seeded with ``seed + i``, so the batch size is part of the draw) and the KL estimator the leaderboard
reports. Command-line flags override single settings. Its fingerprint is the SHA-256 of the resolved
settings, with the prompts and the scorer replaced by the SHA-256 of their content, so two result rows are
comparable when, and only when, their fingerprints agree.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from importlib.metadata import version
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from shiq_data.assets import config_dir
from shiq_data.io import sha256_files
from shiq_eval.bfcl.data import bfcl_version
from shiq_eval.scorers import PYTHON_PREFIX, PythonFunctionScorer, parse_python_scorer

SCORERS = ("reward_model", "hf_reward_model", "vader", "bfcl", "python:MODULE:FUNCTION")
KL_ESTIMATORS = ("exact", "sample")
SEED_MAX = 10**9  # a seed, with small offsets added (per batch, per stage), seeds numpy's and torch's generators
# the largest sampling settings taken: beyond them a typo (an extra zero or three) would run for days or
# allocate without end rather than be refused
SAMPLING_MAX = {"max_new_tokens": 1_000_000, "samples_per_prompt": 10_000, "batch_size": 65_536}
TEMPERATURE_MIN = 1e-30  # logits / T overflow float32 below about 1e-37 (1e-320: every probability NaN)


@dataclass
class Sampling:
    temperature: float = 1.0
    max_new_tokens: int = 32
    samples_per_prompt: int = 1
    seed: int = 0
    batch_size: int = 16


@dataclass
class Suite:
    """One evaluation protocol; ``prompts`` is a JSONL file (relative paths: to the suite file's folder) or
    ``movie_prompts`` the number of the demo's held-out movie-review openings (one of the two)."""

    name: str = "custom"
    prompts: str | None = None
    movie_prompts: int | None = None
    # reward_model (a regression head file: reward_model=PATH) | hf_reward_model (a Hugging Face
    # sequence-classification folder: reward_model=FOLDER) | vader (the packaged lexicon) | bfcl (the BFCL
    # checker's turn reward; scorer prompts ENTRY_ID:TURN) | python:MODULE:FUNCTION (a Python function)
    scorer: str = "reward_model"
    reward_model: str | None = None
    chat: bool = False
    sampling: Sampling = field(default_factory=Sampling)
    kl_estimator: str = "exact"  # which KL the leaderboard reports and J uses: exact (per-token sum) | sample


class SuiteError(ValueError):
    """A suite file or setting that cannot work; the message names the file or key."""


def suite_path(spec: str) -> Path:
    """The YAML file ``spec`` names: ``configs/eval/<spec>.yaml`` for a name, else the path itself."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        if not path.is_file():
            raise SuiteError(f"--suite {spec}: no such file")
        return path
    path = config_dir() / "eval" / f"{spec}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (config_dir() / "eval").glob("*.yaml"))
        raise SuiteError(f"--suite {spec}: no suite of that name (known: {known}; or give a YAML file)")
    return path


def check_no_resolvers(cfg, path: Path, prefix: str = "") -> None:
    """Refuse a value of the configuration file ``path`` (its OmegaConf config or container, unresolved) that calls
    a resolver (``${oc.env:HOME}``, ``${oc.decode:...}``): resolved, a shared file would copy what it names (an
    environment variable, a secret) into results. A reference to another key (``${data.seed}``) stays, and so
    does an escaped ``\\${`` (text, for OmegaConf too); ``\\\\${`` is an escaped backslash before a call."""
    node = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else cfg
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        dotted = f"{prefix}{key}" if isinstance(node, dict) else f"{prefix.rstrip('.')}[{key}]"
        if isinstance(value, (dict, list)):
            check_no_resolvers(value, path, f"{dotted}.")
        elif isinstance(value, str) and "${" in value:
            if any(
                not re.fullmatch(r"[\w.\[\]-]+", inner)
                for inner in re.findall(r"(?<!\\)(?:\\\\)*\$\{([^}]*)\}?", value)
            ):
                raise ValueError(
                    f"{path}: {dotted} is {value!r}: a file's values are data, never a resolver call (${{NAME:...}}); "
                    "an interpolation may only name another key (${section.key})"
                )


def load_suite(spec: str | None, overrides: dict | None = None) -> tuple[Suite, Path | None]:
    """``(suite, file)``: the suite ``spec`` names (None: an unnamed ``custom`` suite of defaults) with
    ``overrides`` (``{key or sampling.key: value}``, None values skipped) applied, checked; relative paths in
    the file resolve against its folder. A ``reward_model`` given without a ``scorer`` makes the scorer
    ``reward_model``, unless the suite's scorer already reads one (``reward_model``, ``hf_reward_model``)."""
    path = suite_path(spec) if spec is not None else None
    base = OmegaConf.structured(Suite)
    try:
        given = OmegaConf.load(path) if path is not None else None
        if given is not None:
            try:
                check_no_resolvers(given, path)
            except ValueError as e:
                raise SuiteError(str(e)) from None
            base = OmegaConf.merge(base, given)
        suite = OmegaConf.to_object(base)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise SuiteError(f"{path}: not valid YAML ({problem}{where})") from None
    except SuiteError:
        raise
    except UnicodeDecodeError as e:  # (a ValueError: it was answered with the suite's keys)
        raise SuiteError(f"{path}: not valid UTF-8 (byte 0x{e.object[e.start]:02x} at byte {e.start})") from None
    except (OmegaConfBaseException, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        key = str(getattr(e, "full_key", None) or "")
        first = f"field {key!r}: {first}" if key else first  # (a value of the wrong type named no field)
        if key.startswith("sampling."):  # a key of the sampling block
            raise SuiteError(f"{path}: {first} (sampling has the keys {[f.name for f in fields(Sampling)]})") from None
        raise SuiteError(f"{path}: {first} (a suite has the keys {[f.name for f in fields(Suite)]})") from None
    if path is not None:
        _check_file_settings(suite, path, overrides or {})
    for key in ("prompts", "reward_model"):
        value = getattr(suite, key)
        if value is not None and path is not None:
            setattr(suite, key, str(path.parent / value))
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key.startswith("sampling."):
            suite.sampling = replace(suite.sampling, **{key.split(".", 1)[1]: value})
        else:
            setattr(suite, key, value)
    if overrides and overrides.get("prompts") is not None:
        suite.movie_prompts = None
    if overrides and overrides.get("movie_prompts") is not None:
        suite.prompts = None
    given = {k for k, v in (overrides or {}).items() if v is not None}
    if "reward_model" in given and "scorer" not in given and suite.scorer not in ("reward_model", "hf_reward_model"):
        suite.scorer = "reward_model"  # --reward-model alone: a head file, unless the suite's scorer reads a model
        given.add("scorer")
    check_suite(suite, path, given)
    return suite, path


def _check_file_settings(suite: Suite, path: Path, overrides: dict) -> None:
    """A suite file is data: its ``prompts`` and ``reward_model`` must name files inside its folder (a
    suite passed on would otherwise read whatever its paths point at; the flags may name any file), and a
    ``python:MODULE:FUNCTION`` scorer, which imports and runs code, runs only when ``--scorer`` names the
    same function on the command line."""
    for key in ("prompts", "reward_model"):
        value = getattr(suite, key)
        if value is None or overrides.get(key) is not None:
            continue
        folder = path.parent.resolve()
        if "\0" in value:  # (os calls refuse it with "embedded null byte", naming no file)
            raise SuiteError(f"{path}: {key} {value!r} holds a NUL character: not a file name")
        if Path(value).is_absolute() or not (folder / value).resolve().is_relative_to(folder):
            flag = "--" + key.replace("_", "-")
            raise SuiteError(
                f"{path}: {key} {value!r} is outside the suite's folder {folder}: a suite file names files beside "
                f"it; give another file with {flag}"
            )
    if suite.scorer.startswith(PYTHON_PREFIX) and overrides.get("scorer") != suite.scorer:
        raise SuiteError(
            f"{path}: scorer {suite.scorer} imports and runs Python code, which a suite file alone may not start: "
            f"name it on the command line too (--scorer {suite.scorer})"
        )


def check_suite(suite: Suite, path: Path | None, flags: set[str] = frozenset()) -> None:
    """Refuse a suite that cannot work, naming where the bad value came from: the file ``path``, or, for the
    keys in ``flags`` (``sampling.max_new_tokens``), the command line's flag (``--max-new-tokens``)."""
    file = f"{path}: " if path is not None else ""

    def where(key: str) -> str:
        return f"--{key.split('.')[-1].replace('_', '-')}: " if key in flags else file

    if (suite.prompts is None) == (suite.movie_prompts is None):
        raise SuiteError(
            f"{file}give exactly one of prompts (a JSONL file, --prompts) and movie_prompts (--movie-prompts)"
        )
    if suite.scorer.startswith(PYTHON_PREFIX):
        try:
            parse_python_scorer(suite.scorer)
        except ValueError as e:
            raise SuiteError(f"{where('scorer')}{e}") from None
    elif suite.scorer not in SCORERS:
        raise SuiteError(f"{where('scorer')}scorer must be one of {list(SCORERS)}, got {suite.scorer!r}")
    if suite.scorer == "bfcl" and suite.prompts is None:
        raise SuiteError(
            f"{file}scorer bfcl needs prompts: a JSONL file of BFCL turns (write one with shiq-eval bfcl prompts)"
        )
    if "reward_model" in flags and suite.scorer not in ("reward_model", "hf_reward_model"):
        # (--reward-model alone makes the scorer reward_model: this is --scorer naming another one beside it)
        raise SuiteError(
            f"--reward-model: scorer {suite.scorer} reads no reward model (only reward_model and hf_reward_model "
            "do), so the file would be left unused: leave out --reward-model or --scorer"
        )
    if suite.scorer in ("reward_model", "hf_reward_model") and suite.reward_model is None:
        raise SuiteError(
            f"{file}scorer {suite.scorer} needs reward_model: a head file or a Hugging Face folder (--reward-model)"
        )
    if suite.kl_estimator not in KL_ESTIMATORS:
        raise SuiteError(
            f"{where('kl_estimator')}kl_estimator must be one of {list(KL_ESTIMATORS)}, got {suite.kl_estimator!r}"
        )
    if suite.movie_prompts is not None and suite.movie_prompts < 1:
        raise SuiteError(f"{where('movie_prompts')}movie_prompts must be >= 1, got {suite.movie_prompts}")
    s = suite.sampling
    for key, high in SAMPLING_MAX.items():
        if not 1 <= getattr(s, key) <= high:
            raise SuiteError(f"{where('sampling.' + key)}sampling.{key} must be in 1..{high:,}, got {getattr(s, key)}")
    if not 0 <= s.seed <= SEED_MAX:
        raise SuiteError(f"{where('sampling.seed')}sampling.seed must be in 0..{SEED_MAX:,}, got {s.seed}")
    if not TEMPERATURE_MIN <= s.temperature < math.inf:  # written into every result row: JSON has no Infinity
        raise SuiteError(
            f"{where('sampling.temperature')}sampling.temperature must be a finite number >= {TEMPERATURE_MIN:g}, got {s.temperature}"
        )


# what AutoTokenizer reads from a model folder (those present are hashed with the weights)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)


def scorer_sha256(suite: Suite, scorer=None) -> str:
    """What identifies the scorer's content: the head file's SHA-256, the folder's weight, config and tokenizer files',
    the VADER or bfcl-eval package's version, or for ``python:MODULE:FUNCTION`` the SHA-256 of that name and
    of the module's source file (``scorer``: the loaded :class:`PythonFunctionScorer`, else it is imported)."""
    if suite.scorer.startswith(PYTHON_PREFIX):
        scorer = scorer if scorer is not None else PythonFunctionScorer(suite.scorer)
        return hashlib.sha256(f"{suite.scorer}\n{scorer.source_sha256()}".encode()).hexdigest()
    if suite.scorer == "bfcl":
        return hashlib.sha256(f"bfcl-eval=={bfcl_version()}".encode()).hexdigest()
    if suite.scorer == "reward_model":
        return sha256_files([suite.reward_model])
    if suite.scorer == "hf_reward_model":
        folder = Path(suite.reward_model)
        weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        # the tokenizer scores as much as the weights: the same weights read other token ids under another one
        tokenizer = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
        return sha256_files([folder / "config.json", *weights, *tokenizer])
    return hashlib.sha256(f"vaderSentiment=={version('vaderSentiment')}".encode()).hexdigest()


def fingerprint(suite: Suite, prompt_set_sha256: str, scorer=None) -> tuple[dict, str]:
    """``(content, sha256)``: the resolved suite with its prompts and scorer as content hashes (no paths, so
    the same suite on another machine has the same fingerprint), and the SHA-256 of that content
    (``scorer``: the loaded scorer, for a Python function scorer's source file)."""
    content = asdict(suite)
    content.pop("prompts")
    content.pop("movie_prompts")
    content.pop("reward_model")
    content["prompt_set_sha256"] = prompt_set_sha256
    content["scorer_sha256"] = scorer_sha256(suite, scorer)
    return content, content_sha256(content)


def content_sha256(content: dict) -> str:
    """The fingerprint of a suite's resolved ``content`` (:func:`fingerprint`): the SHA-256 of its JSON, keys
    sorted; what ``suite.json`` records beside the content, so that a reader can check the one against the other."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
