"""The hidden states of a frozen prefix of the model, computed once per replay buffer.

When only the last ``k`` of ``L`` decoder layers train (``train.trainable_last_layers = k``, embeddings
frozen), the hidden states entering layer ``L − k + 1`` are a fixed function of each row's tokens: the
embedding and the first ``L − k`` layers never change and have no dropout. :class:`PrefixCache` runs
them once for every row of a buffer and keeps the result; each training step then runs only the last
``k`` layers (and the output layer) on the cached states.

- Building (:meth:`PrefixCache.build`): megatron's own forward of the whole model over batches of rows
  under ``torch.no_grad()``, stopped by a forward hook on the last frozen layer that records its output:
  rows in token order, each batch as the trie of its rows (``shiq_train.prefix_tree``: the leading tokens
  rows share run once), or length-sorted right-padded rows. Attention is causal, so a real position's
  state does not depend on the padding or on the other rows of the batch.
- Using it (:meth:`PrefixCache.gather` and :func:`suffix_only`): the states of a micro-batch's rows
  ``[T, B, H]`` (zeros at padding positions) are passed to ``GPTModel.forward`` as ``decoder_input``
  while the decoder's layer list is narrowed to the trainable suffix. The parameters, their names and
  the state dict of the full model are untouched outside :func:`suffix_only`.

- Keeping it (:meth:`PrefixCache.save`, :meth:`PrefixCache.load`): a safetensors file with a digest of its
  tensors, so another process (a resumed run, an arm added later) reads what it would otherwise
  recompute; :meth:`PrefixCache.fits` says whether a loaded cache is that of a given buffer and model.

A micro-batch finds its rows' states through ``buffer_rows`` ``[B]`` (the rows' indices in the buffer,
which ``shiq_data.sampler.BufferSampler`` adds in ``padded`` and ``groups`` modes). Packed rows
(``segment_ids``) are refused. The cache is exact up to float rounding (the same sums in another batch
shape); it refuses what would make it inexact: tensor or pipeline parallelism, dropout, a trainable
embedding or prefix layer, and a model whose prefix weights differ from those it was built with.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from shiq_data.io import atomic_write
from shiq_data.ref_stats import common_prefix
from shiq_train import prefix_tree
from shiq_train.model import FP8_WIDTH, model_chunks, model_inputs, unwrap

log = logging.getLogger(__name__)

FORMAT = "shiq-prefix-cache/1"  # the metadata tag of a saved cache
ROWS_KEY = "buffer_rows"  # micro-batch key: the rows' indices in the buffer, [B] int64
HIDDEN_KEY = "prefix_hidden"  # micro-batch key: the cached states of its rows, [T, B, H]


class _PrefixDone(Exception):
    """Raised by the hook on the last frozen layer: the rest of the forward is not needed."""


def _check_model(model, trainable_last_layers: int, frozen: bool = True) -> int:
    """The number of frozen layers ``L − k`` after checking the model can use a prefix cache exactly
    (with ``frozen``: also that no prefix parameter trains). A list of chunks (virtual pipeline stages) is
    refused by the pipeline check."""
    inner = unwrap(model_chunks(model)[0])
    c = inner.config
    L, k = c.num_layers, trainable_last_layers
    if not (isinstance(k, int) and 0 <= k < L):
        raise ValueError(
            f"a frozen-prefix cache needs 0 <= train.trainable_last_layers < num_layers={L}, got {k!r} "
            "(set train.cache_frozen_prefix=false to train every layer)"
        )
    if c.tensor_model_parallel_size > 1 or c.pipeline_model_parallel_size > 1:
        raise ValueError(
            f"a frozen-prefix cache runs with tensor and pipeline parallel size 1 (got tp="
            f"{c.tensor_model_parallel_size}, pp={c.pipeline_model_parallel_size}); set train.cache_frozen_prefix=false"
        )
    if c.hidden_dropout > 0 or c.attention_dropout > 0:
        raise ValueError(
            f"a frozen-prefix cache needs model.hidden_dropout = model.attention_dropout = 0 (got "
            f"{c.hidden_dropout}, {c.attention_dropout}): with dropout the prefix is not a fixed function of the tokens"
        )
    if len(inner.decoder.layers) != L or not inner.pre_process:
        raise ValueError("a frozen-prefix cache needs the whole model in one stage (embedding and every layer)")
    trainable = [n for n, p in _prefix_parameters(inner, L - k) if p.requires_grad and frozen]
    if trainable:
        raise ValueError(
            f"a frozen-prefix cache needs the embedding and the first {L - k} layers frozen, but {trainable[0]} "
            f"trains ({len(trainable)} such parameters); use train.trainable_last_layers={k} or set "
            "train.cache_frozen_prefix=false"
        )
    return L - k


def _prefix_parameters(inner, n_frozen: int):
    """``(name, parameter)`` of the embedding and the first ``n_frozen`` decoder layers."""
    for name, p in inner.named_parameters():
        if name.startswith("embedding."):
            yield name, p
        elif name.startswith("decoder.layers.") and int(name.split(".")[2]) < n_frozen:
            yield name, p


def prefix_fingerprint(model, n_frozen: int) -> str:
    """blake2b of the names, shapes, dtypes and bytes of the prefix's parameters."""
    h = hashlib.blake2b(digest_size=16)
    for name, p in _prefix_parameters(unwrap(model), n_frozen):
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_setting(model) -> str:
    """What the cached states depend on besides the tokens and the prefix's weights: blake2b of the model
    config's plain fields (numbers, strings, dtypes: shapes, norms, rotary settings, precision), of the name of
    its activation function (a function, not a plain field), of its rotary frequencies (``rotary_base``, ``rope_scaling_factor``: megatron keeps them outside the config) and
    of the torch and megatron-core versions that compute them."""
    from importlib.metadata import version

    inner = unwrap(model)
    fields = {
        k: v for k, v in sorted(vars(inner.config).items()) if isinstance(v, (bool, int, float, str, torch.dtype))
    }
    fields |= {k: getattr(inner, k) for k in ("position_embedding_type", "rotary_percent") if hasattr(inner, k)}
    activation = inner.config.activation_func  # (shiq_train.model.ACTIVATIONS: torch functions)
    fields["activation_func"] = f"{activation.__module__}.{activation.__qualname__}"
    # the rotary frequencies (GPTModel arguments, not config fields: rope_theta, Llama 3's scaling and factor)
    inv_freq = getattr(getattr(inner, "rotary_pos_emb", None), "inv_freq", None)
    rotary = inv_freq.detach().cpu().double().tolist() if torch.is_tensor(inv_freq) else None
    text = repr((sorted(fields.items()), rotary, torch.__version__, version("megatron-core")))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@contextlib.contextmanager
def suffix_only(model, n_frozen: int):
    """Within the block, the model's decoder runs only its layers after the first ``n_frozen``: give it
    their input as ``decoder_input`` ``[T, B, H]``. The layers keep their megatron numbers; the full
    layer list (and so the state dict) is back on exit, also on an error."""
    decoder = unwrap(model).decoder
    layers, count = decoder.layers, decoder.num_layers_per_pipeline_rank
    decoder.layers = torch.nn.ModuleList(list(layers)[n_frozen:])
    decoder.num_layers_per_pipeline_rank = len(decoder.layers)  # read by recomputation
    try:
        yield
    finally:
        decoder.layers, decoder.num_layers_per_pipeline_rank = layers, count


def _buffer_tokens(buffer) -> list[torch.Tensor]:
    """Every row's ``tokens`` as an int64 tensor, in buffer order (the sampler's row indices)."""
    out = []
    for table in buffer.shard_tables:
        for chunk in table.column("tokens").chunks:
            offsets = np.asarray(chunk.offsets)
            values = torch.from_numpy(chunk.values.to_numpy(zero_copy_only=False).astype(np.int64))
            out += [values[int(s) : int(e)] for s, e in zip(offsets[:-1], offsets[1:])]
    return out


class PrefixCache:
    """The hidden states after the last frozen layer for every row of a buffer (see the module doc).

    ``hidden`` ``[N_tokens, H]`` (the model's dtype) holds row ``i``'s states at
    ``offsets[i]:offsets[i + 1]``; ``tokens`` ``[N_tokens]`` its tokens (checked against each batch).
    ``n_frozen`` layers of ``num_layers`` are cached; ``fingerprint`` identifies their weights.
    """

    def __init__(self, hidden, offsets, tokens, n_frozen: int, num_layers: int, fingerprint: str, setting: str = ""):
        self.hidden, self.offsets, self.tokens = hidden, offsets, tokens
        self.n_frozen, self.num_layers, self.fingerprint = n_frozen, num_layers, fingerprint
        self.setting = setting  # :func:`model_setting` of the model it was built with

    @property
    def trainable_last_layers(self) -> int:
        return self.num_layers - self.n_frozen

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hidden, self.offsets, self.tokens))

    @classmethod
    def from_buffer(cls, model, buffer, trainable_last_layers: int, **kw) -> PrefixCache:
        """:meth:`build` over every row of an opened ``shiq_data.buffer.Buffer``."""
        return cls.build(model, _buffer_tokens(buffer), trainable_last_layers, **kw)

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model,
        rows: list,
        trainable_last_layers: int,
        *,
        tokens_per_batch: int = 4096,
        pad_id: int = 0,
        progress: bool = True,
        share_prefixes: bool | None = None,
    ) -> PrefixCache:
        """Run the model's embedding and first ``L − k`` layers (``k = trainable_last_layers``) on every row
        of ``rows`` (token id sequences, row ``i`` = buffer row ``i``): rows sorted by length, batches of
        at most ``tokens_per_batch`` padded tokens, megatron's forward stopped after the last frozen layer.
        With ``share_prefixes`` rows are sorted by their tokens instead, so that rows with the
        same leading tokens (a prompt's completions, a shared system turn) share a batch, and each batch runs
        as the trie of its rows (``shiq_train.prefix_tree``: those tokens once), of at most a quarter of
        ``tokens_per_batch`` positions (its attention is dense over them); a longer row, and a batch whose
        trie would cost more than its rows (:func:`shiq_train.prefix_tree.build`), run as plain rows.
        ``share_prefixes=None`` (the default): tries where the model runs them exactly (megatron's local layers,
        :func:`shiq_train.prefix_tree.unsupported`), plain rows elsewhere (Transformer Engine's layers).
        With FP8 (Transformer Engine's FP8 GEMMs) each batch's width is padded to a multiple of 16.
        The prefix need not be frozen yet (a trainer freezes it and checks it with :meth:`check_model`)."""
        n_frozen = _check_model(model, trainable_last_layers, frozen=False)
        inner = unwrap(model)
        why = prefix_tree.unsupported(inner)
        if share_prefixes and why:
            raise ValueError(
                f"PrefixCache.build(share_prefixes=True) runs batches of rows as tries, which need {why}; "
                "pass share_prefixes=None (tries where the model allows them) or False"
            )
        share_prefixes = why is None if share_prefixes is None else share_prefixes
        multiple = FP8_WIDTH if getattr(inner.config, "fp8", None) else 1
        rows = [torch.as_tensor(r, dtype=torch.int64).reshape(-1) for r in rows]
        if not rows or min(len(r) for r in rows) == 0:
            raise ValueError("a frozen-prefix cache needs at least one row, and no empty row")
        lengths = torch.tensor([len(r) for r in rows])
        offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
        offsets[1:] = lengths.cumsum(0)
        device = next(inner.parameters()).device
        hidden = torch.empty(int(offsets[-1]), inner.config.hidden_size, dtype=inner.config.params_dtype)
        batches, at = [], 0
        if share_prefixes:  # rows in token order, a batch's trie of at most a quarter of the budget
            ratio = prefix_tree.cost_ratio(inner.config)
            lists = [r.tolist() for r in rows]
            order = sorted(range(len(rows)), key=lists.__getitem__)
            budget, prev = tokens_per_batch // 4, []
            for i in order:  # in token order a row adds its length less its common prefix with the row before
                new = len(lists[i]) - common_prefix([prev, lists[i]])
                if batches and at + new <= budget:
                    batches[-1].append(i)
                    at += new
                else:
                    batches.append([i])
                    at = len(lists[i])
                prev = lists[i]
        else:
            order = torch.argsort(lengths, descending=True, stable=True).tolist()
            while at < len(order):  # the longest row first: a batch holds rows no longer than its first
                per = max(1, tokens_per_batch // int(lengths[order[at]]))
                batches.append(order[at : at + per])
                at += per
        seen = {}

        def record(module, args, output):
            seen["h"] = output[0] if isinstance(output, tuple) else output
            raise _PrefixDone

        hook = inner.decoder.layers[n_frozen - 1].register_forward_hook(record)
        size = f"{hidden.numel() * hidden.element_size() / 2**20:.1f} MiB"
        bar = tqdm(total=len(rows), desc=f"cache frozen prefix ({size})", disable=not progress, dynamic_ncols=True)
        try:
            for batch in batches:
                T = -(-int(lengths[batch].max()) // multiple) * multiple
                tokens = torch.full((len(batch), T), pad_id, dtype=torch.int64)
                for b, i in enumerate(batch):
                    tokens[b, : len(rows[i])] = rows[i]
                tokens = tokens.to(device)
                tree = prefix_tree.build(tokens, lengths[batch], cost_ratio=ratio) if share_prefixes else None
                try:
                    model(**model_inputs(tokens), **({"prefix_tree": tree} if tree else {}))
                except _PrefixDone:
                    pass
                else:
                    raise RuntimeError("the forward hook on the last frozen layer did not run")
                h = seen.pop("h")  # [T, B, H], or the trie's [N, 1, H]
                h = (tree.unpack(h[:, 0]) if tree else h.transpose(0, 1)).cpu()  # [B, T, H]
                for b, i in enumerate(batch):
                    hidden[int(offsets[i]) : int(offsets[i + 1])] = h[b, : len(rows[i])]
                bar.update(len(batch))
        finally:
            bar.close()
            hook.remove()
        cache = cls(hidden, offsets, torch.cat(rows), n_frozen, inner.config.num_layers, "")
        cache.fingerprint, cache.setting = prefix_fingerprint(model, n_frozen), model_setting(model)
        log.info(
            "frozen-prefix cache: %d rows, %d tokens, layers 1-%d of %d, %.1f MiB",
            len(rows),
            len(cache.tokens),
            n_frozen,
            cache.num_layers,
            cache.nbytes / 2**20,
        )
        return cache

    def digest(self) -> str:
        """blake2b of the tensors' shapes and bytes (what :meth:`load` checks a file against)."""
        h = hashlib.blake2b(digest_size=16)
        for t in (self.hidden, self.offsets, self.tokens):
            t = t.contiguous()
            h.update(f"{tuple(t.shape)}:{t.dtype};".encode())
            h.update(t.view(torch.uint8).numpy())  # the tensor's own memory, not a copy
        return h.hexdigest()

    def save(self, path) -> None:
        """Write the cache as a safetensors file at ``path``, atomically (``atomic_write``): its three tensors,
        and as metadata the layer counts, the prefix fingerprint and :meth:`digest`. Temporary files of earlier
        saves to ``path`` cut short by a kill are removed."""
        from safetensors.torch import save_file

        path = Path(path)
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            stale.unlink(missing_ok=True)
        meta = {
            "format": FORMAT,
            "n_frozen": str(self.n_frozen),
            "num_layers": str(self.num_layers),
            "fingerprint": self.fingerprint,
            "setting": self.setting,
            "digest": self.digest(),
        }
        tensors = {"hidden": self.hidden, "offsets": self.offsets, "tokens": self.tokens}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path) -> PrefixCache:
        """A cache written by :meth:`save`. Raises ``ValueError`` naming the file when it is not one, or when
        its tensors do not match the digest saved with them."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a readable frozen-prefix cache ({e})") from None
        keys = {"n_frozen", "num_layers", "fingerprint", "setting", "digest"}
        if meta.get("format") != FORMAT or set(tensors) != {"hidden", "offsets", "tokens"} or not keys <= set(meta):
            raise ValueError(f"{path}: not a frozen-prefix cache of format {FORMAT}")
        try:
            n_frozen, num_layers = int(meta["n_frozen"]), int(meta["num_layers"])
        except ValueError:
            raise ValueError(f"{path}: its layer counts are not integers") from None
        cache = cls(
            tensors["hidden"],
            tensors["offsets"],
            tensors["tokens"],
            n_frozen,
            num_layers,
            meta["fingerprint"],
            meta["setting"],
        )
        if cache.digest() != meta["digest"]:
            raise ValueError(f"{path}: the frozen-prefix cache's tensors do not match their saved digest")
        return cache

    def fits(self, buffer, model, trainable_last_layers: int) -> str | None:
        """Why this cache is not that of ``buffer`` (an opened ``shiq_data.buffer.Buffer``) and ``model`` with
        ``trainable_last_layers`` trainable (another row count, other tokens, other frozen layers or
        weights), or None when it is."""
        if trainable_last_layers != self.trainable_last_layers:
            return f"built for trainable_last_layers={self.trainable_last_layers}, not {trainable_last_layers}"
        if unwrap(model).config.num_layers != self.num_layers:
            return f"built for {self.num_layers} layers, the model has {unwrap(model).config.num_layers}"
        if (setting := model_setting(model)) != self.setting:
            return f"built with another model configuration or package versions ({self.setting} against {setting})"
        rows = _buffer_tokens(buffer)
        if len(rows) != len(self):
            return f"built for {len(self)} rows; the buffer has {len(rows)}"
        if not torch.equal(torch.tensor([len(r) for r in rows], dtype=torch.int64), self.offsets.diff()):
            return "built for rows of other lengths than the buffer's"
        if not torch.equal(torch.cat(rows), self.tokens):
            return "built from other tokens than the buffer's"
        if prefix_fingerprint(model, self.n_frozen) != self.fingerprint:
            return "built from other weights of the embedding or the frozen layers"
        return None

    def check_model(self, model, trainable_last_layers: int | None = None) -> None:
        """Refuse a model this cache was not built for: another number of frozen layers, a trainable
        prefix parameter, other prefix weights, or a setting that makes the cache inexact."""
        k = self.trainable_last_layers if trainable_last_layers is None else trainable_last_layers
        if k != self.trainable_last_layers:
            raise ValueError(
                f"the frozen-prefix cache holds the states after layer {self.n_frozen} "
                f"(trainable_last_layers={self.trainable_last_layers}), not trainable_last_layers={k}"
            )
        if unwrap(model).config.num_layers != self.num_layers:
            raise ValueError(
                f"the frozen-prefix cache was built for {self.num_layers} layers, the model has "
                f"{unwrap(model).config.num_layers}"
            )
        _check_model(model, k)
        if prefix_fingerprint(model, self.n_frozen) != self.fingerprint:
            raise ValueError(
                "the model's embedding or first layers differ from those the frozen-prefix cache was built "
                "with; build the cache from this model"
            )

    def gather(self, micro_batch: dict) -> torch.Tensor:
        """The cached states of a micro-batch's rows as ``decoder_input`` ``[T, B, H]`` (zeros at padding),
        on the device of its ``tokens`` ``[B, T]``; its ``buffer_rows`` ``[B]`` name the rows. With ``lengths``
        ``[B]`` (the sampler's), a row of another length than its cached one is refused (zeros would stand for
        the states of its tokens after the cached ones)."""
        if micro_batch.get("segment_ids") is not None:
            raise ValueError(
                "the frozen-prefix cache does not support packed rows (data.mode=packed); use padded or "
                "groups, or set train.cache_frozen_prefix=false"
            )
        if ROWS_KEY not in micro_batch:
            raise ValueError(
                f"a micro-batch has no {ROWS_KEY!r} (the rows' buffer indices, given by BufferSampler): "
                "the frozen-prefix cache cannot find its rows"
            )
        tokens = micro_batch["tokens"]
        B, T = tokens.shape
        rows = micro_batch[ROWS_KEY].tolist()
        if len(rows) != B:
            raise ValueError(f"{ROWS_KEY} has {len(rows)} entries for {B} rows of tokens")
        out = torch.zeros(B, T, self.hidden.shape[1], dtype=self.hidden.dtype)
        cpu_tokens = tokens.cpu()
        lengths = micro_batch["lengths"].tolist() if "lengths" in micro_batch else [None] * B
        for b, r in enumerate(rows):
            if not 0 <= r < len(self):
                raise ValueError(f"buffer row {r} is not in the frozen-prefix cache ({len(self)} rows)")
            s, e = int(self.offsets[r]), int(self.offsets[r + 1])
            if e - s > T or not torch.equal(cpu_tokens[b, : e - s], self.tokens[s:e]):
                raise ValueError(
                    f"buffer row {r}: the micro-batch's tokens are not those the frozen-prefix cache was built "
                    "from (another buffer?)"
                )
            if lengths[b] is not None and lengths[b] != e - s:
                raise ValueError(
                    f"buffer row {r}: the micro-batch's {lengths[b]} tokens are not the {e - s} the frozen-prefix "
                    "cache was built from (another buffer?)"
                )
            out[b, : e - s] = self.hidden[s:e]
        return out.transpose(0, 1).contiguous().to(tokens.device)

    def add_to(self, micro_batches: list[dict]) -> list[dict]:
        """Put each micro-batch's :meth:`gather` under ``prefix_hidden`` (in place); returns them."""
        for mb in micro_batches:
            mb[HIDDEN_KEY] = self.gather(mb)
        return micro_batches
