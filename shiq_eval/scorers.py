"""Scorers: reward models, verifiers and the BFCL checker behind one call,
``scorer(prompts, completions) -> rewards``.

The reward of SHIQ_MATH §6 ("mean reward-model / verifier score of generations on held-out prompts")
is computed by one of these. The reward-model head (:class:`RegressionRewardModel`, stored as safetensors)
and its encoder live in :mod:`shiq_data.reward_head`, since building a dataset uses them too.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from shiq_data.io import check_weight_map, one_line
from shiq_eval.bfcl.checker import check_entry, check_trajectory, decode_trajectory_json
from shiq_eval.bfcl.data import entry_category, ground_truth_decoded, load_entry
from shiq_eval.bfcl.parse import decode_calls


class Scorer(Protocol):
    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]: ...


class FunctionScorer:
    """A verifier: any ``fn(prompt, completion) -> float``, applied row by row."""

    def __init__(self, fn: Callable[[str, str], float]):
        self.fn = fn

    def __call__(self, prompts, completions):
        return [float(self.fn(p, c)) for p, c in zip(prompts, completions, strict=True)]


class BFCLScorer:
    """The BFCL-V3 multi-turn checker as a scorer: ``prompts`` are entry ids (``"multi_turn_base_15"``),
    ``completions`` the model's decoded calls of each entry as JSON (turn -> step -> call strings,
    the ``decoded_turns`` of :func:`shiq_eval.bfcl.checker.check_entry`). The reward is 1.0 when the official
    verdict is valid, else 0.0; with ``per_turn=True``, the mean cumulative turn reward instead.
    A completion that is not such JSON (also one too long or nested too deep) scores 0.0 (a model's
    malformed output is data, not an error).
    """

    def __init__(self, per_turn: bool = False):
        self.per_turn = per_turn

    def __call__(self, prompts, completions):
        out = []
        for entry_id, text in zip(prompts, completions, strict=True):
            decoded = decode_trajectory_json(text)
            if decoded is None:
                out.append(0.0)
                continue
            verdict = check_entry(entry_category(entry_id), entry_id, decoded)
            rewards = verdict["turn_rewards"]
            out.append(sum(rewards) / len(rewards) if self.per_turn else float(verdict["valid"]))
        return out


def parse_turn_ref(text: str) -> tuple[str, int]:
    """``(entry_id, turn)`` of a BFCL turn reference ``"multi_turn_base_15:2"``; ValueError naming it otherwise."""
    entry_id, sep, turn = str(text).rpartition(":")
    if not sep or not (turn.isascii() and turn.isdigit()):  # ("²" and "٣" are digits to str.isdigit)
        raise ValueError(f"{text!r} is not a BFCL turn reference ENTRY_ID:TURN (e.g. multi_turn_base_15:2)")
    try:
        entry = load_entry(entry_category(entry_id), entry_id)
    except (KeyError, ValueError, IndexError) as e:
        raise ValueError(f"{text!r}: no BFCL multi-turn entry {entry_id!r} ({one_line(e)})") from None
    if int(turn) >= len(entry["ground_truth"]):
        raise ValueError(f"{text!r}: entry {entry_id} has turns 0..{len(entry['ground_truth']) - 1}")
    return entry_id, int(turn)


class BFCLTurnScorer:
    """One assistant turn of a BFCL-V3 multi-turn entry, scored by the checker: ``prompts`` are turn
    references ``"ENTRY_ID:TURN"`` (the scorer prompts written by ``shiq-eval bfcl prompts``), ``completions``
    the model's answer at that turn given the ground-truth history. The answer is parsed as a list of calls
    (``[f(a=1), g(b='x')]``; anything else is an empty turn) and the reward is the checker's reset turn
    reward of that turn (1.0 or 0.0) with the ground truth's calls in every other turn: the turn's calls run
    from the ground-truth state before it, and the state and results must match the ground truth's after it.
    """

    def __call__(self, prompts, completions):
        out = []
        for ref, text in zip(prompts, completions, strict=True):
            entry_id, turn = parse_turn_ref(ref)
            entry = load_entry(entry_category(entry_id), entry_id)
            decoded = ground_truth_decoded(entry)
            calls = decode_calls(text)
            decoded[turn] = [calls] if calls else []
            out.append(float(check_trajectory(entry, decoded)["turn_rewards_reset"][turn]))
        return out


PYTHON_PREFIX = "python:"


class PythonFunctionScorer:
    """A scorer written as a Python function, named ``python:MODULE:FUNCTION`` (``MODULE`` a dotted module
    path importable from the current directory or the Python path, e.g. ``python:my_rewards:length_bonus``).
    The function is called once per batch as ``fn(prompts: list[str], completions: list[str]) -> list[float]``
    (the scorer prompts and the decoded completions, in order) and must return one finite float per
    completion (a list, tuple or 1-D array; ints are accepted); anything else is refused in one error
    naming the function."""

    def __init__(self, spec: str):
        self.spec = spec
        self.module_name, self.function_name = parse_python_scorer(spec)
        if os.getcwd() not in sys.path and "" not in sys.path:  # a console script's path lacks it; python -m has it
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(self.module_name)
        except Exception as e:  # the user's module: a SyntaxError or any error of its own code at import
            raise ValueError(
                f"scorer {spec}: cannot import module {self.module_name!r} ({type(e).__name__}: {one_line(e, 200)})"
            ) from e
        self.fn = getattr(module, self.function_name, None)
        if not callable(self.fn):
            raise ValueError(f"scorer {spec}: module {self.module_name!r} has no function {self.function_name!r}")
        try:
            inspect.signature(self.fn).bind([], [])
        except TypeError:
            raise ValueError(
                f"scorer {spec}: {self.function_name} must take two arguments, "
                "fn(prompts: list[str], completions: list[str]) -> list[float]"
            ) from None
        except ValueError:  # no signature to inspect (some built-ins): the call will tell
            pass
        try:
            self.source = inspect.getsourcefile(module)
        except TypeError:  # a built-in module has no source file
            self.source = None

    def source_sha256(self) -> str | None:
        """SHA-256 of the module's source file (None when it has none, e.g. a compiled module)."""
        if self.source is None or not Path(self.source).is_file():
            return None
        return hashlib.sha256(Path(self.source).read_bytes()).hexdigest()

    def __call__(self, prompts, completions):
        try:
            out = self.fn(list(prompts), list(completions))
        except Exception as e:  # the user's function failed: named in one line (SHIQ_VERBOSE=1 shows where)
            raise ValueError(f"scorer {self.spec}: the function raised {type(e).__name__}: {one_line(e, 200)}") from e
        n = len(completions)
        huge = False
        try:
            values = [float(x) for x in out] if not isinstance(out, (str, bytes, dict)) else None
        except (TypeError, ValueError):
            values = None
        except OverflowError:  # an int beyond a float's range
            values, huge = None, True
        if values is None or len(values) != n or not all(math.isfinite(v) for v in values):
            got = f"{type(out).__name__}" + (f" of length {len(out)}" if hasattr(out, "__len__") else "")
            got += " holding a number beyond a float's range" if huge else ""
            if values is not None and len(values) == n:
                got = f"a non-finite value {next(v for v in values if not math.isfinite(v))}"
            raise ValueError(
                f"scorer {self.spec}: the function returned {got}; expected a list of {n} finite floats, one per "
                "completion: fn(prompts: list[str], completions: list[str]) -> list[float]"
            )
        return values


def parse_python_scorer(spec: str) -> tuple[str, str]:
    """``(module, function)`` of ``python:MODULE:FUNCTION``; ValueError saying the right shape otherwise."""
    body = spec[len(PYTHON_PREFIX) :] if spec.startswith(PYTHON_PREFIX) else ""
    module, sep, function = body.rpartition(":")
    if not sep or not module or not function.isidentifier() or not all(p.isidentifier() for p in module.split(".")):
        raise ValueError(f"scorer {spec!r}: expected python:MODULE:FUNCTION, e.g. python:my_rewards:score")
    return module, function


class VaderScorer:
    """The VADER sentiment lexicon's compound score of each completion, in [-1, 1]: a hand-built rule
    scorer that no reward model here is trained on, used as the "gold" second opinion on movie-review
    continuations (a completion that fools the learned reward model but reads as negative or
    meaningless shows up as a gap between the two). ``prompts`` are ignored."""

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # heavy: loads the lexicon

        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts, completions):
        return [float(self._analyzer.polarity_scores(c)["compound"]) for c in completions]


class _Holding(logging.Handler):
    """A logging handler that keeps the records it is given (:func:`transformers_log_held`)."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def transformers_log_held() -> Iterator[list[logging.LogRecord]]:
    """Within the block, what transformers logs (through its library logger's handlers, at its own verbosity) is
    held back, then printed at the block's end, however it ends, but for the records the block removes from the
    yielded list (one it replaces by a line of its own)."""
    root = logging.getLogger("transformers")
    holding, handlers = _Holding(), list(root.handlers)
    for handler in handlers:
        root.removeHandler(handler)
    root.addHandler(holding)
    try:
        yield holding.records
    finally:
        root.removeHandler(holding)
        for handler in handlers:
            root.addHandler(handler)
        for record in holding.records:
            root.handle(record)


class SequenceClassifierScorer:
    """Any Hugging Face sequence-classification reward model folder (``AutoModelForSequenceClassification``
    with one output, ``num_labels=1``): the reward of a completion is the model's score of
    ``prompt + joiner + completion``, batched with padding (the model's config must name its pad token, as
    transformers needs to find each row's last token). A folder whose weight files lack a weight of the classifier
    (a causal LM's: no score head) is refused, not scored with the weights transformers would draw for it."""

    def __init__(self, folder, batch_size: int = 16, joiner: str = " "):
        import torch  # heavy: only scoring with a model needs it
        from transformers import AutoModelForSequenceClassification, AutoTokenizer  # heavy: transformers

        check_weight_map(Path(folder))
        # its load report (a table of weights the files lack or hold beyond the model's) is held back: a missing
        # weight is refused below in one line, which the report's 10 lines came before; any other report (weights
        # the model does not read, a weight of another shape: the error transformers raises points to it) is printed
        with transformers_log_held() as held:
            self.model, loading = AutoModelForSequenceClassification.from_pretrained(
                str(folder), dtype=torch.float32, output_loading_info=True
            )
            # transformers draws a weight the files lack at random and only logs it: a causal LM's folder (no score
            # head) would score every completion with a head of noise, a new one in each process
            if missing := sorted(loading.get("missing_keys") or ()):
                held.clear()  # (the refusal says it)
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                raise ValueError(
                    f"{folder}: its weight files lack {', '.join(missing[:3])}{more}, which a sequence classifier of "
                    "its config.json has: not a reward model (a causal LM's folder?), its scores would be of random "
                    "weights"
                )
        self.model.eval()
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"{folder}: a reward model has one output (num_labels 1), this classifier has "
                f"{self.model.config.num_labels}"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.joiner = batch_size, joiner

    def __call__(self, prompts, completions):
        import torch  # heavy: only scoring with a model needs it

        texts = [p + self.joiner + c for p, c in zip(prompts, completions, strict=True)]
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[i : i + self.batch_size], return_tensors="pt", padding=True)
                out += self.model(**batch).logits[:, 0].double().tolist()
        return out
