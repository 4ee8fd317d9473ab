"""Shared leading tokens run once (``train.share_prefixes``): the trie against the rows' own prefixes, the
model's statistics and gradients against a plain run of the rows, and training against training without it."""

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_prefix_cache import TOK, TOL, assert_same_run, assert_same_value_runs, train, value_runs

from shiq_data.buffer import write_buffer
from shiq_data.sampler import BufferSampler
from shiq_train import model as M
from shiq_train import parallel, prefix_tree
from shiq_train import trainer as trainer_module
from shiq_train.objectives import LossConfig
from shiq_train.prefix_cache import PrefixCache, suffix_only
from shiq_train.train_step import OptimizerConfig
from shiq_train.trainer import TrainConfig, Trainer, add_prefix_trees

VOCAB, LAYERS, TRAINABLE, SEQ = 128, 4, 2, 16


@st.composite
def rows(draw):
    """Rows over a 3-token alphabet (many shared prefixes), right-padded with token 0."""
    B, T = draw(st.integers(1, 6)), draw(st.integers(1, 7))
    lengths = [draw(st.integers(1, T)) for _ in range(B)]
    tokens = [[draw(st.integers(1, 3)) for _ in range(n)] + [0] * (T - n) for n in lengths]
    return torch.tensor(tokens), torch.tensor(lengths)


@settings(max_examples=200, deadline=None)
@given(rows())
def test_the_trie_has_one_node_per_distinct_prefix(data):
    tokens, lengths = data
    B, T = tokens.shape
    tree = prefix_tree.build(tokens, lengths)
    rows_ = tokens.tolist()
    prefix_of = [tuple(rows_[s // T][: s % T + 1]) for s in tree.source.tolist()]  # each node's token path
    distinct = {tuple(r[: t + 1]) for r, n in zip(rows_, lengths.tolist()) for t in range(n)}
    assert len(prefix_of) == tree.num_nodes == len(distinct) and set(prefix_of) == distinct
    assert tree.depth.tolist() == [len(p) - 1 for p in prefix_of]
    for b, n in enumerate(lengths.tolist()):
        for t in range(T):
            node = int(tree.node_of[b, t])
            assert prefix_of[node] == (tuple(rows_[b][: t + 1]) if t < n else prefix_of[0])
    allowed = (~tree.mask[0, 0]).tolist()
    for i, p in enumerate(prefix_of):
        assert [j for j in range(len(prefix_of)) if allowed[i][j]] == [
            j for j, q in enumerate(prefix_of) if p[: len(q)] == q
        ]  # ancestors and itself, each numbered before it


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError, match="row 1 has length 4, outside"):
        prefix_tree.build(torch.ones(2, 3, dtype=torch.long), torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="lengths"):
        prefix_tree.build(torch.ones(2, 3, dtype=torch.long), torch.tensor([3]))
    with pytest.raises(ValueError, match="packed rows"):
        add_prefix_trees([{"tokens": torch.ones(1, 2), "segment_ids": torch.zeros(1, 2), "lengths": torch.ones(1)}])
    with pytest.raises(ValueError, match="share_prefixes must be true or false"):
        TrainConfig(share_prefixes=1)


@pytest.fixture
def dist1():
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=5):
        yield


def model_cfg(**kw):
    return M.ModelConfig(
        num_layers=LAYERS, hidden_size=64, num_attention_heads=4, vocab_size=VOCAB, max_sequence_length=SEQ, **kw
    )


def shared_rows(seed=0):
    """Six rows: a system prefix of 5 tokens, three prompts of 2-4 more, two completions each of 3-6."""
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(1, VOCAB, (5,), generator=g)
    rows = []
    for p in range(3):
        prompt = torch.cat([system, torch.randint(1, VOCAB, (2 + p,), generator=g)])
        for c in range(2):
            rows.append(torch.cat([prompt, torch.randint(1, VOCAB, (3 + 2 * c + p % 2,), generator=g)]))
    T = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = r
    return tokens, torch.tensor([len(r) for r in rows])


@pytest.mark.parametrize("position", ["rope", "learned_absolute"])
@pytest.mark.parametrize("backend", ["sdpa", "megatron"])
def test_statistics_and_gradients_equal_the_rows_own(dist1, position, backend):
    model = M.build_model(model_cfg(position_embedding_type=position, attention_backend=backend))
    tokens, lengths = shared_rows()
    tree = prefix_tree.build(tokens, lengths)
    assert tree.num_nodes < int(lengths.sum()) * 0.8  # the rows share a fifth of their tokens or more
    actions = (torch.arange(tokens.shape[1])[None] < lengths[:, None]) & (torch.arange(tokens.shape[1])[None] > 0)
    weights = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(1))

    def run(**kw):
        model.zero_grad()
        out = model(**M.stats_inputs(tokens, None, actions), **kw)
        s = M.output_stats(model, out, tokens, actions)
        ((s.chosen_logits - s.logz) * weights).sum().backward()  # a loss that weighs every position
        return s, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, plain_grads = run()
    shared, shared_grads = run(prefix_tree=tree)
    torch.testing.assert_close(shared.chosen_logits, plain.chosen_logits, rtol=TOL, atol=TOL)
    torch.testing.assert_close(shared.logz, plain.logz, rtol=TOL, atol=TOL)
    assert plain_grads.keys() == shared_grads.keys() and len(plain_grads) > 10
    for name, g in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=name)


def test_cached_states_in_a_tree_equal_the_rows_own(dist1):
    """From the frozen-prefix cache's states (``decoder_input``) through the last layers only."""
    model = M.build_model(model_cfg())
    tokens, lengths = shared_rows(seed=2)
    rows = [tokens[b, :n].tolist() for b, n in enumerate(lengths.tolist())]
    cache = PrefixCache.build(model, rows, TRAINABLE, progress=False)
    mb = {"tokens": tokens, "buffer_rows": torch.arange(len(rows))}
    hidden = cache.gather(mb)
    actions = torch.arange(tokens.shape[1])[None] < lengths[:, None]
    with torch.no_grad(), suffix_only(model, cache.n_frozen):
        plain = model(**M.stats_inputs(tokens, None, actions), decoder_input=hidden)
        shared = model(
            **M.stats_inputs(tokens, None, actions),
            decoder_input=hidden,
            prefix_tree=prefix_tree.build(tokens, lengths),
        )
    torch.testing.assert_close(shared, plain, rtol=TOL, atol=TOL)
    assert float(plain.abs().max()) > 1


def buffer_rows_shared(n_prompts=6, per_prompt=2, seed=3):
    """Groups of completions of prompts that all begin with the same 4 tokens; a reward on the last action."""
    rng = np.random.default_rng(seed)
    system = [int(t) for t in rng.integers(1, VOCAB, 4)]
    rows = []
    for g in range(n_prompts):
        prompt = system + [int(t) for t in rng.integers(1, VOCAB, int(rng.integers(2, 5)))]
        for c in range(per_prompt):
            completion = [int(t) for t in rng.integers(1, VOCAB, int(rng.integers(2, 8)))]
            n = len(prompt) + len(completion)
            rewards = [0.0] * n
            rewards[-1] = float(np.float32(rng.normal()))
            rows.append(
                {
                    "row_id": f"r{g}-{c}",
                    "source": "t",
                    "group_id": g,
                    "prompt_len": len(prompt),
                    "tokens": prompt + completion,
                    "action_mask": [False] * len(prompt) + [True] * len(completion),
                    "rewards": rewards,
                    "ref_chosen_logits": [0.0] + [float(np.float32(x)) for x in rng.normal(0, 0.1, n - 1)],
                    "ref_logz": [0.0] + [float(np.float32(x)) for x in np.log(VOCAB) + rng.normal(0, 0.1, n - 1)],
                }
            )
    return rows


@pytest.fixture(scope="module")
def buffer(tmp_path_factory):
    out = tmp_path_factory.mktemp("buf") / "b"
    return write_buffer(
        buffer_rows_shared(),
        out,
        tokenizer_info=TOK,
        command=["t"],
        shard_rows=5,
        progress=False,
        ref_model={"name": "t"},
    )


def test_sampler_gives_each_rows_length(buffer):
    for mode in ("groups", "padded"):
        mb = BufferSampler(buffer, rows_per_micro_batch=4, seed=2, mode=mode).next_micro_batches()[0]
        want = [len(buffer.row(r)["tokens"]) for r in mb["buffer_rows"].tolist()]
        assert mb["lengths"].tolist() == want and mb["lengths"].dtype == torch.int64


@pytest.mark.parametrize(
    "loss, mode, kw",
    [
        ("dpo", "groups", {"cache_frozen_prefix": True}),
        ("shiq", "padded", {}),
        ("copg", "groups", {"reference": "online"}),  # the online reference reads the trees too
    ],
)
def test_training_with_shared_prefixes_equals_training_without(dist1, buffer, tmp_path, monkeypatch, loss, mode, kw):
    init = {k: v.clone() for k, v in M.build_model(model_cfg()).state_dict().items() if torch.is_tensor(v)}
    trees = []
    add = trainer_module.add_prefix_trees

    def counting_add(mbs, cost_ratio):
        assert cost_ratio == prefix_tree.cost_ratio(M.build_model(model_cfg()).config)
        trees.extend((mb["prefix_tree"].num_nodes, int(mb["lengths"].sum())) for mb in add(mbs, cost_ratio))
        return mbs

    plain = train(buffer, init, tmp_path / "plain", loss, mode, **kw)
    monkeypatch.setattr(trainer_module, "add_prefix_trees", counting_add)
    shared = train(buffer, init, tmp_path / "shared", loss, mode, share_prefixes=True, **kw)
    assert len(trees) == 6 and all(nodes < real for nodes, real in trees)  # 2 micro-batches a step, each shared
    assert_same_run(plain, shared, init)


def test_what_a_trie_cannot_run_exactly_is_refused(dist1):
    """A model split over ranks, dropout, multi-token prediction and Transformer Engine layers (whose attention
    is causal over the packed order whatever the mask): refused in one line by the trainer and the forward."""
    tokens, lengths = shared_rows()
    tree = prefix_tree.build(tokens, lengths)
    split = M.build_model(model_cfg())
    split.config.tensor_model_parallel_size = 2
    dropout = M.build_model(model_cfg(hidden_dropout=0.1))
    mtp = M.build_model(model_cfg())
    mtp.config.mtp_num_layers = 1
    te = M.build_model(model_cfg())
    te.decoder.layers[0].add_module("te_attention", type("TEDotProductAttention", (torch.nn.Module,), {})())
    type(te.decoder.layers[0].te_attention).__module__ = "megatron.core.extensions.transformer_engine"
    for model, why in [
        (split, "tensor and pipeline parallel size 1"),
        (dropout, r"model.hidden_dropout = model.attention_dropout = 0 \(got 0.1, 0.0\)"),
        (mtp, "no multi-token prediction"),
        (te, r"megatron's local layers \(model.transformer_impl=local\): Transformer Engine's attention ignores"),
    ]:
        with pytest.raises(ValueError, match=why):
            Trainer(model, LossConfig(), OptimizerConfig(), TrainConfig(share_prefixes=True), "unused")
        with pytest.raises(ValueError, match=f"shared prefixes \\(train.share_prefixes\\) need {why}"):
            model(**M.stats_inputs(tokens, None, None), prefix_tree=tree)
    plain = M.build_model(model_cfg())
    prefix_tree.check_model(plain)  # the local layers, no dropout: accepted
    with pytest.raises(ValueError, match="by keyword"):
        plain(tokens, None, None, prefix_tree=tree)


def test_a_trie_costlier_than_its_rows_is_not_built():
    """``build(cost_ratio=r)`` builds the trie only when ``N (r + N) < B T (r + T)``, ``N`` counted here as the
    rows' distinct prefixes: rows that share nothing, or little next to their length, stay rows."""
    g = torch.Generator().manual_seed(3)
    unrelated = torch.randint(1, VOCAB, (4, 50), generator=g)  # N = 200 = B T: never cheaper
    grouped, lengths = shared_rows()
    for tokens, lens in [(unrelated, torch.full((4,), 50)), (grouped, lengths)]:
        B, T = tokens.shape
        N = len({tuple(tokens[b, : t + 1].tolist()) for b in range(B) for t in range(int(lens[b]))})
        for r in (0.0, 10.0, 3456.0, 1e9):
            tree = prefix_tree.build(tokens, lens, cost_ratio=r)
            assert (tree is not None) == (N * (r + N) < B * T * (r + T)), (N, r)
            assert tree is None or tree.num_nodes == N
    assert prefix_tree.build(unrelated, torch.full((4,), 50), cost_ratio=1e9) is None
    assert prefix_tree.build(grouped, lengths, cost_ratio=3072.0) is not None  # SmolLM2-135M's ratio
    smollm2 = dict(hidden_size=576, num_attention_heads=9, num_query_groups=3, kv_channels=64, ffn_hidden_size=1536)
    assert prefix_tree.cost_ratio(SimpleNamespace(**smollm2, gated_linear_unit=True)) == 3072.0


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"num_query_groups": 2},  # grouped-query attention: smaller key and value projections
        {"num_query_groups": 2, "kv_channels": 24, "qk_layernorm": True},  # heads wider than hidden_size / heads
        {"gated_linear_unit": False, "activation": "gelu"},  # two MLP matrices, not three
    ],
)
def test_the_cost_ratio_is_the_layers_flops_per_position_over_per_pair(dist1, kw):
    """cost_ratio against torch's FLOP counter on one built layer (megatron's attention, which computes every
    pair of positions): its FLOPs at T positions are ``c1 T + c2 T²``, and the ratio is ``c1 / c2``. The
    formula ``2 H + 1.5 F`` it replaced held for the first case only (512 against 480, 352 and 384)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = M.ModelConfig(attention_backend="megatron", **kw)
    model = M.build_model(cfg)
    layer = model.decoder.layers[0]

    def flops(T: int) -> int:
        with FlopCounterMode(display=False) as counter:
            layer(
                torch.randn(T, 1, cfg.hidden_size),
                attention_mask=M.causal_mask(T),
                rotary_pos_emb=model.rotary_pos_emb(T),
            )
        return counter.get_total_flops()

    f8, f16 = flops(8), flops(16)
    c2 = (f16 - 2 * f8) / (16 * 16 - 2 * 8 * 8)
    c1 = (f8 - c2 * 8 * 8) / 8
    assert prefix_tree.cost_ratio(model.config) == pytest.approx(c1 / c2, rel=1e-12)


def test_value_model_training_with_shared_prefixes_equals_training_without(tmp_path, buffer, monkeypatch):
    """Q♯'s value model, its prefix cached: the same metrics and saved weights with ``share_prefixes`` as without."""
    from shiq_train.qsharp_train import ValueTrainConfig

    built, build = [], prefix_tree.build
    monkeypatch.setattr(prefix_tree, "build", lambda *a, **k: built.append(1) or build(*a, **k))
    cached = {"cache_frozen_prefix": True}
    rows = value_runs(buffer, tmp_path, {"rows": cached})["rows"]
    trees_of_the_cache = len(built)
    shared = value_runs(buffer, tmp_path, {"shared": {**cached, "share_prefixes": True}})["shared"]
    assert len(built) == 2 * trees_of_the_cache + 3  # and one tree a step
    assert_same_value_runs(rows, shared)
    with pytest.raises(ValueError, match="value.share_prefixes must be true or false"):
        ValueTrainConfig(share_prefixes="yes")


def test_the_frozen_prefix_cache_built_as_tries_equals_the_rows_own(dist1, buffer):
    """The layer-2 states of every buffer row, built as tries of token-sorted rows, equal those of padded rows
    (a batch of one row each: no other row near it), while the first layer reads fewer positions."""
    model = M.build_model(model_cfg())
    rows = [buffer.row(i)["tokens"] for i in range(len(buffer))]
    seen = []

    def count(module, args, out):  # positions the first layer read: T * B, or N * 1 for a trie
        h = out[0] if isinstance(out, tuple) else out
        seen.append(int(h.shape[0] * h.shape[1]))

    model.decoder.layers[0].register_forward_hook(count)
    alone = PrefixCache.build(model, rows, TRAINABLE, tokens_per_batch=1, share_prefixes=False, progress=False)
    read_alone, seen[:] = sum(seen), []
    shared = PrefixCache.build(model, rows, TRAINABLE, tokens_per_batch=200, progress=False)  # tries of <= 50
    assert sum(seen) < 0.8 * read_alone and len(seen) > 1  # several tries, sharing the prompts' tokens
    assert torch.equal(shared.offsets, alone.offsets) and torch.equal(shared.tokens, alone.tokens)
    scale = float(alone.hidden.abs().max())
    assert scale > 0.01
    torch.testing.assert_close(shared.hidden, alone.hidden, rtol=TOL, atol=TOL * scale)
    seen[:] = []
    longer = PrefixCache.build(model, rows, TRAINABLE, tokens_per_batch=4, progress=False)  # every row > 1 position
    assert sum(seen) == read_alone  # each row alone, as plain rows
    torch.testing.assert_close(longer.hidden, alone.hidden, rtol=TOL, atol=TOL * scale)
