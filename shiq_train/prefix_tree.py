"""Rows that begin with the same tokens, packed as one sequence of their distinct prefixes (a trie).

The rows of a training micro-batch often share their first tokens: the completions of one prompt share
the whole prompt, and chat prompts share the system turn. Under causal attention the hidden state of a
position depends only on the tokens up to it, so every row that starts with the same ``t + 1`` tokens has
the same state at position ``t``. :func:`build` turns the rows ``tokens`` ``[B, T]`` into the trie of their
token sequences: a node for each distinct prefix, numbered in order of first appearance (row by row, so a
node's parent always comes before it). The model then runs once over the ``N`` nodes as a single sequence
``[N]``, in which node ``i`` attends to its ancestors and itself only (``mask``) at the position of its
depth (``depth``: rotary or learned position embeddings see each row's own positions), and the rows'
states are read back with ``node_of`` ``[B, T]``. The result is each row's own forward up to float
rounding (the same sums over other operands), and so is the gradient: a state shared by several rows
receives the sum of their gradients through the gather.

Cost: the layers see ``N`` positions instead of ``B × T`` (padding included), but attention is dense over the
``N × N`` mask where each row's is ``T × T``. Rows that share little can therefore cost more as a trie
(four unrelated rows of 2,500 tokens: ``N`` = 10,000, four times each row's attention, and a 100 MB mask):
with ``cost_ratio`` (:func:`cost_ratio` of the model) :func:`build` estimates both and returns None where the
trie is not the cheaper. Padding positions (``t >= lengths[b]``) are no node: ``node_of`` points them at node
0, whose state a loss never reads there (padding is never an action).

What a trie cannot run exactly is refused (:func:`check_model`): dropout (a shared state would get one mask
for all its rows), Transformer Engine layers (their attention is causal over the packed order and ignores
the tree's mask), multi-token prediction, tensor and pipeline parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrefixTree:
    """The trie of a micro-batch's rows (:func:`build`), every tensor on the rows' device.

    - ``node_of`` ``[B, T]`` int64: the node of row ``b``'s position ``t`` (0 at padding).
    - ``source`` ``[N]`` int64: ``b * T + t`` of one row position holding each node (where its input is read).
    - ``depth`` ``[N]`` int64: each node's position in its rows (the position ids of the packed sequence).
    - ``mask`` ``[1, 1, N, N]`` bool: megatron's attention mask, True where blocked (not an ancestor or self).
    """

    node_of: torch.Tensor
    source: torch.Tensor
    depth: torch.Tensor
    mask: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return int(self.source.shape[0])

    def pack(self, rows: torch.Tensor) -> torch.Tensor:
        """``[B, T, ...]`` per-position values -> ``[N, ...]``, one per node (read at its ``source``)."""
        B, T = self.node_of.shape
        return rows.reshape(B * T, *rows.shape[2:])[self.source]

    def unpack(self, nodes: torch.Tensor) -> torch.Tensor:
        """``[N, ...]`` per-node values -> ``[B, T, ...]`` per row position (node 0's value at padding)."""
        return nodes[self.node_of]


def cost_ratio(config) -> float:
    """A transformer layer's work per position over its attention's work per pair of positions, for
    :func:`build`, in multiply-adds: ``(H (a + 2g) d + a d H + m H F) / 2 a d``, the query, key and value
    projections, the output projection and the MLP (``m`` = 3 gated, else 2) against the scores and their
    weighted sum, from a megatron ``TransformerConfig`` (``hidden_size`` ``H``, ``num_attention_heads`` ``a``,
    ``num_query_groups`` ``g``, ``kv_channels`` ``d``, ``ffn_hidden_size`` ``F``, ``gated_linear_unit``). With
    ``a = g`` heads ``H / a`` wide and a gated MLP: ``2 H + 1.5 F``."""
    H, a, F = config.hidden_size, config.num_attention_heads, config.ffn_hidden_size
    g = config.num_query_groups or a
    d = config.kv_channels or H // a
    mlp = 3 if config.gated_linear_unit else 2
    return (H * (a + 2 * g) * d + a * d * H + mlp * H * F) / (2 * a * d)


def check_model(inner) -> None:
    """Raise ValueError (one line, naming the setting) unless the megatron ``GPTModel`` ``inner`` (unwrapped:
    ``shiq_train.model.unwrap``) runs a :class:`PrefixTree` exactly, its rows' own forwards up to float rounding."""
    why = unsupported(inner)
    if why:
        raise ValueError(f"shared prefixes (train.share_prefixes) need {why}")


def unsupported(inner) -> str | None:
    """What the megatron ``GPTModel`` ``inner`` lacks to run a :class:`PrefixTree` exactly (the setting it
    needs, one phrase), or None when it can (:func:`check_model`)."""
    c = inner.config
    why = None
    if c.tensor_model_parallel_size > 1 or c.pipeline_model_parallel_size > 1:
        why = "tensor and pipeline parallel size 1 (the whole model in one process)"
    elif not (inner.pre_process and inner.post_process):
        why = "the whole model in one process (pipeline parallel size 1)"
    elif c.hidden_dropout > 0 or c.attention_dropout > 0:
        why = f"model.hidden_dropout = model.attention_dropout = 0 (got {c.hidden_dropout}, {c.attention_dropout})"
    elif getattr(c, "mtp_num_layers", None):
        why = "no multi-token prediction layers"
    elif any(type(m).__module__.startswith("megatron.core.extensions.transformer_engine") for m in inner.modules()):
        why = "megatron's local layers (model.transformer_impl=local): Transformer Engine's attention ignores its mask"
    return why


def build(tokens: torch.Tensor, lengths: torch.Tensor, *, cost_ratio: float | None = None) -> PrefixTree | None:
    """The trie of rows ``tokens`` ``[B, T]`` whose first ``lengths`` ``[B]`` tokens are real (the rest padding).

    With ``cost_ratio`` (:func:`cost_ratio` of the model that will run it): None, and no mask built, unless the
    trie's estimated work ``N (r + N)`` is below the padded rows' ``B T (r + T)``, where ``r`` is the ratio,
    ``N`` the trie's nodes (so also None when the rows share nothing).

    Raises:
        ValueError: on a shape mismatch or a length outside ``[1, T]``.
    """
    if tokens.dim() != 2 or lengths.shape != tokens.shape[:1]:
        raise ValueError(f"tokens must be [B, T] and lengths [B], got {tuple(tokens.shape)} and {tuple(lengths.shape)}")
    B, T = tokens.shape
    lens = lengths.tolist()
    bad = [(b, n) for b, n in enumerate(lens) if not 1 <= n <= T]
    if bad:
        raise ValueError(f"row {bad[0][0]} has length {bad[0][1]}, outside [1, {T}] (the width of its tokens)")
    rows = tokens.tolist()
    node_of = [[0] * T for _ in range(B)]
    child: dict[tuple[int, int], int] = {}  # (parent node or -1, token) -> node
    source, depth = [], []
    for b, (row, n) in enumerate(zip(rows, lens)):
        parent, nodes = -1, node_of[b]
        for t in range(n):
            key = (parent, row[t])
            node = child.get(key)
            if node is None:
                node = child[key] = len(source)
                source.append(b * T + t)
                depth.append(t)
            nodes[t] = parent = node
    N = len(source)
    if cost_ratio is not None and N * (cost_ratio + N) >= B * T * (cost_ratio + T):
        return None
    device = tokens.device
    node_t = torch.tensor(node_of, dtype=torch.long)
    source_t = torch.tensor(source, dtype=torch.long)
    depth_t = torch.tensor(depth, dtype=torch.long)
    # node i's ancestors are the nodes of its source row at positions 0 .. depth(i)
    path = node_t[source_t // T]  # [N, T]: the nodes of each node's source row
    on_path = torch.arange(T)[None, :] <= depth_t[:, None]  # [N, T]
    allowed = torch.zeros(N, N, dtype=torch.bool)
    allowed.scatter_(1, torch.where(on_path, path, torch.arange(N)[:, None]), True)
    return PrefixTree(
        node_of=node_t.to(device),
        source=source_t.to(device),
        depth=depth_t.to(device),
        mask=(~allowed)[None, None].to(device),
    )
