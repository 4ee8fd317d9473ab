"""Scorers: reward models, verifiers and the BFCL checker behind one call,
``scorer(prompts, completions) -> rewards``.

The reward of SHIQ_MATH §6 ("mean reward-model / verifier score of generations on held-out prompts")
is computed by one of these. The reward-model head (:class:`RegressionRewardModel`, stored as safetensors)
and its encoder live in :mod:`shiq_data.reward_head`, since building a dataset uses them too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from shiq_eval.bfcl.checker import check_entry, decode_trajectory_json
from shiq_eval.bfcl.data import entry_category


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


class SequenceClassifierScorer:
    """Any Hugging Face sequence-classification reward model folder (``AutoModelForSequenceClassification``
    with one output, ``num_labels=1``): the reward of a completion is the model's score of
    ``prompt + joiner + completion``, batched with padding (the model's config must name its pad token, as
    transformers needs to find each row's last token)."""

    def __init__(self, folder, batch_size: int = 16, joiner: str = " "):
        import torch  # heavy: only scoring with a model needs it
        from transformers import AutoModelForSequenceClassification, AutoTokenizer  # heavy: transformers

        self.model = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=torch.float32).eval()
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
