"""BufferSampler: coverage per epoch across ranks, batch contents vs plain rows, packing, groups, resume, memory."""

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from data_cli_runs import rewrite_shard
from hypothesis import HealthCheck, example, given, reject, settings
from hypothesis import strategies as st

from shiq_data.buffer import add_ref_columns, open_buffer, write_buffer
from shiq_data.sampler import BufferSampler

TOK = {"name": "toy", "fingerprint": "f" * 64, "vocab_size": 1000}
REPO = Path(__file__).resolve().parents[1]


def make_rows(n, seed=0, group_sizes=(1, 2, 3)):
    """Rows whose first token is the row's index (so batches can be traced back), random lengths,
    groups of varying sizes."""
    rng = np.random.default_rng(seed)
    rows, g, left = [], 0, int(rng.choice(group_sizes))
    for i in range(n):
        p, c = int(rng.integers(1, 5)), int(rng.integers(1, 8))
        mask = [False] * p + [bool(x) for x in rng.integers(0, 2, c)]
        mask[-1] = True
        rewards = [float(np.float32(rng.normal())) if m and rng.random() < 0.5 else 0.0 for m in mask]
        rows.append(
            {
                "row_id": f"r{i}",
                "source": "t",
                "group_id": g,
                "prompt_len": p,
                "tokens": [i] + [int(t) for t in rng.integers(500, 990, p + c - 1)],
                "action_mask": mask,
                "rewards": rewards,
            }
        )
        left -= 1
        if left == 0:
            g, left = g + 1, int(rng.choice(group_sizes))
    return rows


@pytest.fixture
def rows_and_buffer(tmp_path):
    rows = make_rows(23)
    return rows, write_buffer(rows, tmp_path / "b", tokenizer_info=TOK, command=["t"], shard_rows=5, progress=False)


PAD = 999  # never a row token (rows use 0..22 for the first token and 500..989 for the rest)


def first_tokens_by_segment(mb):
    """Row indices (first token of each trajectory) of a micro-batch, in order."""
    out = []
    for b in range(mb["tokens"].shape[0]):
        if "segment_ids" in mb:
            seg = mb["segment_ids"][b].tolist()
            starts = [t for t in range(len(seg)) if t == 0 or seg[t] != seg[t - 1]]
            out += [int(mb["tokens"][b, t]) for t in starts if int(mb["tokens"][b, t]) != PAD]
        else:
            out.append(int(mb["tokens"][b, 0]))
    return out


def stream(samplers, steps):
    """Row indices in stream order: per step, rank 0's micro-batches, then rank 1's, ..."""
    out = []
    for _ in range(steps):
        for s in samplers:
            for mb in s.next_micro_batches():
                out += first_tokens_by_segment(mb)
    return out


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_every_row_once_per_epoch_across_ranks(rows_and_buffer, mode):
    rows, buf = rows_and_buffer
    samplers = [
        BufferSampler(
            buf,
            rows_per_micro_batch=2,
            micro_batches_per_step=2,
            seed=3,
            dp_rank=r,
            dp_world=3,
            mode=mode,
            max_tokens_per_row=24,
            pad_id=PAD,
        )
        for r in range(3)
    ]
    seen = stream(samplers, 8)
    assert len(seen) >= 46
    assert sorted(seen[:23]) == list(range(23)) and sorted(seen[23:46]) == list(range(23))
    assert seen[:23] != seen[23:46]  # reshuffled per epoch
    assert samplers[0].epoch >= 1


def test_a_seed_of_2_to_the_32_or_more_is_refused_for_it_would_repeat_a_smaller_seeds_order(rows_and_buffer):
    """numpy reads the list seed ``[5 + 2**32, 0]`` as the 32-bit words ``[5, 1]``: the order of seed 5 + 2**32's
    epoch 0 was seed 5's epoch 1 (the permutation numpy draws from ``[5, 1]``, computed here directly)."""
    rows, buf = rows_and_buffer
    assert np.array_equal(
        np.random.default_rng([5 + 2**32, 0]).permutation(10), np.random.default_rng([5, 1]).permutation(10)
    )  # (why the bound exists)
    for seed in (2**32, 5 + 2**32, -1):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32\), got " + str(seed)):
            BufferSampler(buf, rows_per_micro_batch=2, seed=seed, pad_id=PAD)
    s = BufferSampler(buf, rows_per_micro_batch=len(rows), seed=2**32 - 1, pad_id=PAD)  # the largest: accepted
    expected = np.random.default_rng([2**32 - 1, 0]).permutation(len(rows))
    assert s.next_micro_batches()[0]["buffer_rows"].tolist() == expected.tolist()


def test_padded_batches_equal_the_rows(rows_and_buffer):
    rows, buf = rows_and_buffer
    s = BufferSampler(buf, rows_per_micro_batch=4, micro_batches_per_step=3, seed=1, pad_id=7)
    seen = []
    for _ in range(3):
        mbs = s.next_micro_batches()
        assert len(mbs) == 3
        for mb in mbs:
            B, T = mb["tokens"].shape
            assert mb["tokens"].dtype.is_floating_point is False and str(mb["tokens"].dtype) == "torch.int64"
            assert str(mb["rewards"].dtype) == "torch.float32" and str(mb["action_mask"].dtype) == "torch.bool"
            assert B == 4 and T == max(len(rows[int(i)]["tokens"]) for i in mb["tokens"][:, 0])
            for b in range(B):
                r = rows[int(mb["tokens"][b, 0])]
                n = len(r["tokens"])
                assert mb["tokens"][b].tolist() == r["tokens"] + [7] * (T - n)
                assert int(mb["lengths"][b]) == n
                assert mb["action_mask"][b].tolist() == r["action_mask"] + [False] * (T - n)
                assert mb["rewards"][b].tolist() == r["rewards"] + [0.0] * (T - n)
                assert int(mb["group_ids"][b]) == r["group_id"]
            seen += mb["tokens"][:, 0].tolist()
    # 36 rows of a 23-row buffer: the first epoch's 23 are every row once
    assert len(seen) == 36 and sorted(seen[:23]) == list(range(23))


@pytest.mark.parametrize("mode", ["padded", "packed", "groups"])
def test_width_multiple_only_adds_padding(rows_and_buffer, mode):
    """Sequence parallelism pads widths to a multiple of tp: same batches as without, plus padding
    columns (token pad_id, no action, reward 0, a segment id of its own when packed)."""
    _, buf = rows_and_buffer
    kw = dict(rows_per_micro_batch=4, micro_batches_per_step=2, seed=3, mode=mode, max_tokens_per_row=20, pad_id=PAD)
    plain, wide = BufferSampler(buf, **kw), BufferSampler(buf, width_multiple=3, **kw)
    widths = set()
    for _ in range(4):
        for a, b in zip(plain.next_micro_batches(), wide.next_micro_batches()):
            T, W = a["tokens"].shape[1], b["tokens"].shape[1]
            assert W % 3 == 0 and T <= W < T + 3
            widths.add(T % 3)
            assert sorted(a) == sorted(b)
            for k in a:
                if a[k].dim() < 2:
                    assert a[k].tolist() == b[k].tolist(), k
                    continue
                assert b[k][:, :T].tolist() == a[k].tolist(), k
                # packed: padding has its own segment id (one past the last trajectory's if the row was full)
                trailing = a["segment_ids"][:, -1:] + (a["tokens"][:, -1:] != PAD) if k == "segment_ids" else None
                pad = {"tokens": PAD, "segment_ids": trailing}.get(k, 0)
                assert (b[k][:, T:] == pad).all(), k
    assert widths != {0}  # some batches did need the extra padding
    with pytest.raises(ValueError, match="width_multiple must be an integer >= 1"):
        BufferSampler(buf, rows_per_micro_batch=4, width_multiple=0)


def test_packed_rows_hold_whole_trajectories_with_segment_ids(rows_and_buffer):
    rows, buf = rows_and_buffer
    s = BufferSampler(
        buf, rows_per_micro_batch=3, micro_batches_per_step=2, seed=0, mode="packed", max_tokens_per_row=20, pad_id=PAD
    )
    n_multi = 0
    for _ in range(4):
        for mb in s.next_micro_batches():
            assert "group_ids" not in mb
            seg = mb["segment_ids"]
            assert (seg[:, 1:] >= seg[:, :-1]).all()
            for b in range(seg.shape[0]):
                ids = seg[b].tolist()
                pos = 0
                n_segments = 0
                while pos < len(ids) and int(mb["tokens"][b, pos]) < 500:
                    r = rows[int(mb["tokens"][b, pos])]
                    n = len(r["tokens"])
                    assert ids[pos : pos + n] == [n_segments] * n
                    assert mb["tokens"][b, pos : pos + n].tolist() == r["tokens"]
                    assert mb["action_mask"][b, pos : pos + n].tolist() == r["action_mask"]
                    assert mb["rewards"][b, pos : pos + n].tolist() == r["rewards"]
                    pos += n
                    n_segments += 1
                assert pos <= 20 and n_segments >= 1
                n_multi += n_segments > 1
                # the rest is padding with its own trailing id
                assert ids[pos:] == [n_segments] * (len(ids) - pos)
                assert not mb["action_mask"][b, pos:].any() and not mb["rewards"][b, pos:].any()
                assert (mb["tokens"][b, pos:] == PAD).all()
                assert int(mb["lengths"][b]) == pos  # the packed row's real tokens
    assert n_multi > 0


def test_groups_mode_keeps_groups_whole(rows_and_buffer):
    rows, buf = rows_and_buffer
    size = Counter(r["group_id"] for r in rows)
    samplers = [
        BufferSampler(
            buf, rows_per_micro_batch=4, micro_batches_per_step=2, seed=5, dp_rank=r, dp_world=2, mode="groups"
        )
        for r in range(2)
    ]
    groups_seen = []
    for _ in range(6):
        for s in samplers:
            for mb in s.next_micro_batches():
                ids = mb["group_ids"].tolist()
                assert len(ids) <= 4 and ids == sorted(ids) and sorted(set(ids)) == list(range(len(set(ids))))
                for g in set(ids):
                    members = [rows[int(mb["tokens"][b, 0])] for b in range(len(ids)) if ids[b] == g]
                    buffer_group = {m["group_id"] for m in members}
                    assert len(buffer_group) == 1 and len(members) == size[buffer_group.pop()]
                    groups_seen.append(members[0]["group_id"])
    n_groups = len(size)
    assert sorted(groups_seen[:n_groups]) == sorted(size)  # every group once in the first epoch


@pytest.mark.parametrize("mode", ["padded", "packed", "groups"])
def test_resume_reproduces_the_following_batches(rows_and_buffer, mode):
    _, buf = rows_and_buffer
    kw = dict(rows_per_micro_batch=4, micro_batches_per_step=2, seed=11, dp_rank=1, dp_world=2, mode=mode)
    a = BufferSampler(buf, **kw)
    for _ in range(5):
        a.next_micro_batches()
    state = json.loads(json.dumps(a.state_dict()))
    expected = [a.next_micro_batches() for _ in range(6)]
    b = BufferSampler(open_buffer(buf.path), **kw)
    b.load_state_dict(state)
    got = [b.next_micro_batches() for _ in range(6)]
    assert len(got) == len(expected) == 6
    for e_step, g_step in zip(expected, got, strict=True):
        assert len(g_step) == len(e_step) == 2, (len(e_step), len(g_step))  # micro_batches_per_step
        for e, g in zip(e_step, g_step, strict=True):
            assert e.keys() == g.keys() and "tokens" in e
            for k in e:  # (== alone broadcasts: a batch of another shape could compare equal)
                assert (g[k].shape, g[k].dtype) == (e[k].shape, e[k].dtype) and (e[k] == g[k]).all(), k
    with pytest.raises(ValueError, match="seed"):
        BufferSampler(buf, **{**kw, "seed": 12}).load_state_dict(state)


def test_a_state_is_refused_by_another_buffer_of_as_many_rows(rows_and_buffer, tmp_path):
    """A buffer rewritten at the same path with other rows of the same count and grouping passed every check of
    the state (mode, seed, units, rows): a resumed run went on over other data. The state now keeps the buffer's
    fingerprint; a state saved before it was kept still loads."""
    rows, buf = rows_and_buffer
    kw = dict(rows_per_micro_batch=4, micro_batches_per_step=1, seed=3, mode="padded")
    state = BufferSampler(buf, **kw).state_dict()
    other = [{**r, "tokens": [t + 1 for t in r["tokens"]]} for r in rows]
    other_buf = write_buffer(other, tmp_path / "o", tokenizer_info=TOK, command=["t"], shard_rows=5, progress=False)
    with pytest.raises(ValueError, match=r"holds other shards than when the state was saved"):
        BufferSampler(other_buf, **kw).load_state_dict(state)
    BufferSampler(other_buf, **kw).load_state_dict({k: v for k, v in state.items() if k != "buffer"})
    BufferSampler(open_buffer(buf.path), **kw).load_state_dict(state)
    # one of fewer rows is named as another buffer too, not as a count that differs ("units is 26 ..., 14 here")
    fewer = write_buffer(other[:-2], tmp_path / "f", tokenizer_info=TOK, command=["t"], shard_rows=5, progress=False)
    with pytest.raises(ValueError, match=r"holds other shards than when the state was saved"):
        BufferSampler(fewer, **kw).load_state_dict(state)


def test_reference_columns_are_batched(tmp_path):
    rows = make_rows(6)
    write_buffer(rows, tmp_path / "b", tokenizer_info=TOK, command=["t"], shard_rows=6, progress=False)
    ref_c = [[0.0] + [float(i) + 0.5] * (len(r["tokens"]) - 1) for i, r in enumerate(rows)]
    ref_z = [[0.0] + [-float(i)] * (len(r["tokens"]) - 1) for i, r in enumerate(rows)]
    add_ref_columns(tmp_path / "b", 0, ref_c, ref_z, ref_model={"name": "m"})
    s = BufferSampler(open_buffer(tmp_path / "b"), rows_per_micro_batch=3)
    mb = s.next_micro_batches()[0]
    for b in range(3):
        i = int(mb["tokens"][b, 0])
        n = len(rows[i]["tokens"])
        T = mb["tokens"].shape[1]
        assert mb["ref_chosen_logits"][b].tolist() == ref_c[i] + [0.0] * (T - n)
        assert mb["ref_logz"][b].tolist() == ref_z[i] + [0.0] * (T - n)


def test_bad_settings_are_explained(rows_and_buffer):
    rows, buf = rows_and_buffer
    with pytest.raises(ValueError, match="max_tokens_per_row=3"):
        BufferSampler(buf, rows_per_micro_batch=2, max_tokens_per_row=3)
    with pytest.raises(ValueError, match="group .* rows, more than rows_per_micro_batch=1"):
        BufferSampler(buf, rows_per_micro_batch=1, mode="groups")
    with pytest.raises(ValueError, match="mode"):
        BufferSampler(buf, rows_per_micro_batch=1, mode="bucketed")


RSS_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from shiq_data.buffer import open_buffer
    from shiq_data.sampler import BufferSampler

    def rss_anon_kb():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

    buf = open_buffer(sys.argv[1])
    s = BufferSampler(buf, rows_per_micro_batch=8, micro_batches_per_step=4, mode=sys.argv[2])
    s.next_micro_batches()
    base = peak = rss_anon_kb()
    while s.epoch == 0:
        s.next_micro_batches()
        peak = max(peak, rss_anon_kb())
    growth = peak - base
    rows = buf.table.column("tokens").to_pylist()  # control: what materialising the data costs
    print(growth, rss_anon_kb() - base)
""")


def big_rows(n_rows, length=200):
    rng = np.random.default_rng(0)
    for i in range(n_rows):
        mask = np.zeros(length, bool)
        mask[20:] = True
        rewards = np.zeros(length, np.float32)
        rewards[-1] = 1.0
        yield {
            "row_id": str(i),
            "source": "big",
            "group_id": i,
            "prompt_len": 20,
            "tokens": rng.integers(0, 1000, length, dtype=np.int32),
            "action_mask": mask,
            "rewards": rewards,
        }


def test_reader_memory_does_not_grow_with_buffer_size(tmp_path):
    """RssAnon growth while reading one epoch of a 0.1M- and a 1M-token buffer (file pages excluded)."""
    script = tmp_path / "rss.py"
    script.write_text(RSS_CHILD.format(repo=str(REPO)))
    result = {}
    for n_rows in (500, 5000):
        folder = tmp_path / f"b{n_rows}"
        write_buffer(big_rows(n_rows), folder, tokenizer_info=TOK, command=["t"], shard_rows=1000, progress=False)
        out = subprocess.run(
            [sys.executable, str(script), str(folder), "padded"], capture_output=True, text=True, check=True
        ).stdout.split()
        result[n_rows] = (int(out[0]), int(out[1]))
    small, large = result[500][0], result[5000][0]
    # 1M tokens as Python lists cost tens of MB: the control shows the measurement would see growth
    assert result[5000][1] > 20_000
    assert large < small + 4_000, result


def test_groups_mode_holds_no_object_per_group(tmp_path):
    """Groups mode kept one numpy array per prompt group (about 110 bytes each, and seconds per million groups to
    make on every rank): what a groups sampler keeps beyond a padded one's is now its row order and group starts,
    8 bytes per row and 16 per group (20,000 rows in pairs: 16 bytes per row, where an array per group kept 72)."""
    import tracemalloc

    n = 20_000
    rows = (
        {
            "row_id": f"r{i}",
            "source": "t",
            "group_id": i // 2,
            "prompt_len": 2,
            "tokens": [1, 2, 3, 4],
            "action_mask": [False, False, True, True],
            "rewards": [0.0, 0.0, 0.0, float(i % 2)],
        }
        for i in range(n)
    )
    buf = write_buffer(rows, tmp_path / "b", tokenizer_info=TOK, command=["t"], shard_rows=n, progress=False)
    kept = {}
    for mode in ("padded", "groups"):
        tracemalloc.start()
        sampler = BufferSampler(buf, rows_per_micro_batch=4, mode=mode)
        kept[mode] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del sampler
    assert kept["groups"] - kept["padded"] < 24 * n, kept
    s = BufferSampler(buf, rows_per_micro_batch=4, micro_batches_per_step=n // 4, mode="groups", seed=2)
    seen = [int(r) for mb in s.next_micro_batches() for r in mb["buffer_rows"]]
    assert sorted(seen) == list(range(n))  # one epoch: every row once,
    pairs = [seen[j : j + 2] for j in range(0, n, 2)]
    assert all(b == a + 1 and a % 2 == 0 for a, b in pairs)  # each pair whole and in buffer order


@pytest.mark.parametrize(
    "edit,needle",
    [
        (
            lambda rows: rows[3]["tokens"].__setitem__(1, 1000),
            r"row 3: field 'tokens': token id 1000 outside \[0, 1000\)",
        ),
        (lambda rows: rows[2]["tokens"].__setitem__(0, -5), r"row 2: field 'tokens': token id -5 outside"),
        (lambda rows: rows[4]["action_mask"].pop(), r"row 4: field 'action_mask': \d+ values for \d+ tokens"),
        (lambda rows: rows[0]["rewards"].append(0.0), r"row 0: field 'rewards': \d+ values for \d+ tokens"),
        (
            lambda rows: rows[2].update(tokens=[], action_mask=[], rewards=[]),
            r"row 2: field 'tokens': fewer than 2 tokens",
        ),
        (lambda rows: rows[4].update(action_mask=[False] * len(rows[4]["tokens"])), r"row 4: field 'action_mask': no"),
        (lambda rows: rows[1]["action_mask"].__setitem__(0, True), r"row 1: field 'action_mask': action token at"),
        (lambda rows: rows[3]["rewards"].__setitem__(-1, float("nan")), r"row 3: field 'rewards': non-finite"),
        (lambda rows: rows[4]["rewards"].__setitem__(-1, float("-inf")), r"row 4: field 'rewards': non-finite"),
    ],
)
def test_a_hand_edited_row_is_refused_naming_shard_row_and_field(tmp_path, edit, needle):
    """A row that passed the checksum (edited with it) but cannot be a row of this buffer: refused when the
    sampler opens the buffer, not met later as an embedding lookup's IndexError or a broadcast error."""
    write_buffer(make_rows(23), tmp_path / "b", tokenizer_info=TOK, command=["t"], shard_rows=5, progress=False)
    rewrite_shard(tmp_path / "b", 1, edit)
    with pytest.raises(ValueError, match="shard-00001.arrow: " + needle):
        BufferSampler(open_buffer(tmp_path / "b"), rows_per_micro_batch=4)


def test_a_row_longer_than_max_tokens_per_row_is_named_with_its_shard(tmp_path):
    """The max_tokens_per_row refusal named the row by its index across the whole buffer, which no shard file
    shows; it now names the shard file and the row within it, as the sampler's other row errors do."""
    rows = make_rows(23)  # 5 rows a shard: row 7 is shard 1's row 2
    rows[7].update(prompt_len=3, tokens=[7] + [600] * 39, action_mask=[False] * 3 + [True] * 37, rewards=[0.0] * 40)
    buf = write_buffer(rows, tmp_path / "b", tokenizer_info=TOK, command=["t"], shard_rows=5, progress=False)
    needle = r"shard-00001.arrow: row 2: field 'tokens': 40 tokens, more than max_tokens_per_row=20 \(1 such rows"
    with pytest.raises(ValueError, match=needle):
        BufferSampler(buf, rows_per_micro_batch=2, max_tokens_per_row=20)


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda rows: rows[2]["tokens"].__setitem__(1, None), r"row 2: field 'tokens': null"),
        (lambda rows: rows[3]["rewards"].__setitem__(-1, None), r"row 3: field 'rewards': null"),
        (lambda rows: rows[4]["action_mask"].__setitem__(-1, None), r"row 4: field 'action_mask': null"),
        (lambda rows: rows[1].update(tokens=None), r"row 1: field 'tokens': null"),
        (lambda rows: rows[0].update(group_id=None), r"row 0: field 'group_id': null"),
    ],
)
def test_a_hand_edited_null_is_refused_naming_shard_row_and_field(tmp_path, edit, needle):
    """A null (a shard edited with its checksum) in a column training reads failed with pyarrow's own error
    ("zero_copy_only", "list columns must not hold nulls") naming no shard, row or field, or (a null action
    flag) was read as whatever bit lay under it."""
    write_buffer(make_rows(23), tmp_path / "b", tokenizer_info=TOK, command=["t"], shard_rows=5, progress=False)
    rewrite_shard(tmp_path / "b", 1, edit)
    with pytest.raises(ValueError, match="shard-00001.arrow: " + needle):
        BufferSampler(open_buffer(tmp_path / "b"), rows_per_micro_batch=4)


@pytest.mark.parametrize("field,value", [("ref_logz", float("nan")), ("ref_chosen_logits", float("-inf"))])
def test_a_hand_edited_non_finite_reference_statistic_is_refused_naming_shard_row_and_field(tmp_path, field, value):
    """A NaN in ref_logz (a shard edited with its checksum) passed the sampler's checks, as a NaN reward does
    not: train.reference=precomputed met it at whichever step drew the row, as a loss error naming a batch
    position, not the shard and row."""
    rows = [
        {**r, "ref_chosen_logits": [0.0] * len(r["tokens"]), "ref_logz": [0.0] + [1.0] * (len(r["tokens"]) - 1)}
        for r in make_rows(23)
    ]
    write_buffer(rows, tmp_path / "b", tokenizer_info=TOK, command=["t"], shard_rows=5, progress=False)
    rewrite_shard(tmp_path / "b", 1, lambda rows: rows[2][field].__setitem__(-1, value))
    with pytest.raises(ValueError, match=f"shard-00001.arrow: row 2: field '{field}': non-finite"):
        BufferSampler(open_buffer(tmp_path / "b"), rows_per_micro_batch=4)


def test_a_micro_batch_larger_than_the_buffer_is_refused(rows_and_buffer, tmp_path):
    """rows_per_micro_batch=100000 on 8 rows ran, each micro-batch repeating every row thousands of times."""
    rows, buf = rows_and_buffer
    for mode in ("padded", "packed"):
        with pytest.raises(
            ValueError, match=r"rows_per_micro_batch=24 \(shiq-train's data.rows_per_micro_batch\) is more"
        ):
            BufferSampler(buf, rows_per_micro_batch=24, mode=mode)
    BufferSampler(buf, rows_per_micro_batch=23)
    # groups mode: a bound on the rows of whole groups; with groups of one row, every row and one more group
    # fit in 24, so a group would come twice; 23 never repeats a row within a micro-batch
    with pytest.raises(ValueError, match=r"rows_per_micro_batch=24 .* is more than the 23 rows of buffer"):
        BufferSampler(buf, rows_per_micro_batch=24, mode="groups")
    groups = BufferSampler(buf, rows_per_micro_batch=23, mode="groups")
    for _ in range(5):
        firsts = [t for mb in groups.next_micro_batches() for t in first_tokens_by_segment(mb)]
        assert len(firsts) == len(set(firsts))
    pairs = [{**r, "group_id": i // 2} for i, r in enumerate(rows[:8])]  # four groups of two rows
    paired = write_buffer(pairs, tmp_path / "pairs", tokenizer_info=TOK, command=["t"], progress=False)
    BufferSampler(paired, rows_per_micro_batch=9, mode="groups")  # 8 rows and less than one more group
    with pytest.raises(ValueError, match=r"and its smallest group less one \(9\)"):
        BufferSampler(paired, rows_per_micro_batch=10, mode="groups")


def test_packed_rows_wider_than_the_buffer_are_refused(rows_and_buffer, tmp_path):
    """Packed rows of model.max_sequence_length tokens over a buffer of fewer tokens ran, each packed row holding
    every trajectory many times over (3 rows of 17 tokens, 2 rows of 256: each trajectory 15 times a row)."""
    rows, _ = rows_and_buffer
    small = write_buffer(rows[:3], tmp_path / "small", tokenizer_info=TOK, command=["t"], progress=False)
    lengths = [len(r["tokens"]) for r in rows[:3]]
    total, longest = sum(lengths), max(lengths)
    with pytest.raises(ValueError, match=rf"hold more than the {total} tokens of buffer .*more than once"):
        BufferSampler(small, rows_per_micro_batch=2, mode="packed", max_tokens_per_row=256)
    # the widest packed row that may still stop within the buffer's tokens (a row stops when the next trajectory,
    # at most the longest, does not fit): it never holds every trajectory twice
    cap = total + longest - 1
    s = BufferSampler(small, rows_per_micro_batch=1, mode="packed", max_tokens_per_row=cap, pad_id=PAD)
    for _ in range(5):
        counts = Counter(first_tokens_by_segment(s.next_micro_batches()[0]))
        assert min(counts.get(i, 0) for i in range(3)) <= 1
    with pytest.raises(ValueError, match=r"rows_per_micro_batch=1 packed rows of max_tokens_per_row="):
        BufferSampler(small, rows_per_micro_batch=1, mode="packed", max_tokens_per_row=cap + 1)


def test_a_buffer_of_unequal_shards_cut_by_size_is_sampled_row_for_row(tmp_path):
    """Shards cut by size (``shard_bytes``) hold different numbers of rows: the sampler's row positions come from
    the shards' own row counts, never from ``shard_rows``. Every row once per epoch, each batch row equal to its
    input row, each row's (shard, row within it) as pyarrow reads the shards, and a row too long for
    max_tokens_per_row named at its own shard and row."""
    rng = np.random.default_rng(4)
    rows = []
    for i, n in enumerate([int(rng.integers(3, 400)) for _ in range(40)]):
        p = int(rng.integers(1, n))
        rows.append(
            {
                "row_id": f"r{i}",
                "source": "t",
                "group_id": i // 2,
                "prompt_len": p,
                "tokens": [i] + [int(t) for t in rng.integers(500, 990, n - 1)],
                "action_mask": [False] * p + [True] * (n - p),
                "rewards": [0.0] * (n - 1) + [float(np.float32(rng.normal()))],
            }
        )
    buf = write_buffer(
        rows, tmp_path / "b", tokenizer_info=TOK, command=["t"], shard_rows=64, shard_bytes=8192, progress=False
    )
    counts = [s["rows"] for s in buf.manifest["shards"]]
    assert len(counts) >= 5 and len(set(counts)) > 1 and max(counts) < 64, counts
    where = {}  # row_id -> (shard file, row within it), by plain pyarrow
    for s in buf.manifest["shards"]:
        with pa.ipc.open_stream(pa.memory_map(str(buf.path / s["file"]))) as r:
            for j, rid in enumerate(r.read_all().column("row_id").to_pylist()):
                where[rid] = (s["file"], j)
    sampler = BufferSampler(buf, rows_per_micro_batch=3, micro_batches_per_step=2, seed=5, pad_id=PAD)
    for i, r in enumerate(rows):
        path, j = sampler._reader.where(i)
        assert (path.name, j) == where[r["row_id"]]
    seen = []
    while len(seen) < 2 * len(rows):
        for mb in sampler.next_micro_batches():
            T = mb["tokens"].shape[1]
            for b in range(mb["tokens"].shape[0]):
                r = rows[int(mb["tokens"][b, 0])]
                n = len(r["tokens"])
                assert mb["tokens"][b].tolist() == r["tokens"] + [PAD] * (T - n)
                assert mb["action_mask"][b].tolist() == r["action_mask"] + [False] * (T - n)
                assert mb["rewards"][b].tolist() == r["rewards"] + [0.0] * (T - n)
                assert int(mb["group_ids"][b]) == r["group_id"] and int(mb["buffer_rows"][b]) == rows.index(r)
                seen.append(int(mb["tokens"][b, 0]))
    assert sorted(seen[: len(rows)]) == list(range(len(rows)))
    assert sorted(seen[len(rows) : 2 * len(rows)]) == list(range(len(rows)))
    longest = max(range(len(rows)), key=lambda i: len(rows[i]["tokens"]))
    file, j = where[rows[longest]["row_id"]]
    with pytest.raises(ValueError, match=rf"{file}: row {j}: field 'tokens': {len(rows[longest]['tokens'])} tokens"):
        BufferSampler(buf, rows_per_micro_batch=3, max_tokens_per_row=len(rows[longest]["tokens"]) - 1)


def reference_step_layouts(lengths, group_ids, mode, seed, steps, W, M, B, cap):
    """The sampler's contract written out item by item, independently of its code: the stream is the epoch
    permutations ``default_rng([seed, e])`` of the rows (of the groups, numbered in increasing group id, in
    groups mode) one after another; each step takes, for rank 0, then rank 1, ..., ``M`` micro-batches: ``B``
    rows (padded), ``B`` packed rows each taking the next rows while their tokens fit in ``cap`` (packed), or
    the next whole groups while their rows fit in ``B`` (groups). Returns ``[step][rank][micro-batch]`` lists
    of buffer rows (packed: a list of rows per packed row)."""
    ids = sorted(set(group_ids))
    members = {g: [r for r, x in enumerate(group_ids) if x == g] for g in ids}
    units = len(ids) if mode == "groups" else len(lengths)
    size = [len(members[g]) for g in ids] if mode == "groups" else list(lengths)
    cap = B if mode == "groups" else cap

    def items():
        e = 0
        while True:
            yield from np.random.default_rng([seed, e]).permutation(units).tolist()
            e += 1

    it = items()
    nxt = [next(it)]

    def take():
        item = nxt.pop()
        nxt.append(next(it))
        return item

    def fill():  # the next items while their sizes fit in cap (at least one)
        out, used = [], 0
        while not out or used + size[nxt[0]] <= cap:
            used += size[nxt[0]]
            out.append(take())
        return out

    out = []
    for _ in range(steps):
        ranks = []
        for _ in range(W):
            mbs = []
            for _ in range(M):
                if mode == "padded":
                    mbs.append([take() for _ in range(B)])
                elif mode == "packed":
                    mbs.append([fill() for _ in range(B)])
                else:
                    mbs.append([r for g in fill() for r in members[ids[g]]])
            ranks.append(mbs)
        out.append(ranks)
    return out


def skewed_rows(n_short, long_every, long_len=200):
    """Rows of 2 tokens, one of ``long_len`` every ``long_every`` rows: packed rows of up to ``long_len / 2`` short
    rows, where the mean length predicts far fewer."""
    rows = []
    for i in range(n_short):
        n = long_len if i % long_every == 0 else 2
        rows.append(
            {
                "row_id": f"r{i}",
                "source": "t",
                "group_id": i // 3,
                "prompt_len": 1,
                "tokens": [i] + [600] * (n - 1),
                "action_mask": [False] + [True] * (n - 1),
                "rewards": [0.0] * (n - 1) + [1.0],
            }
        )
    return rows


@pytest.fixture(scope="module")
def reference_buffers(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    out = {}
    for name, rows in (("mixed", make_rows(47, seed=3, group_sizes=(1, 2, 3, 4))), ("skewed", skewed_rows(300, 75))):
        buf = write_buffer(rows, root / name, tokenizer_info=TOK, command=["t"], shard_rows=9, progress=False)
        out[name] = (buf, [len(r["tokens"]) for r in rows], [r["group_id"] for r in rows])
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(["mixed", "skewed"]),
    mode=st.sampled_from(["padded", "packed", "groups"]),
    seed=st.integers(0, 2**32 - 1),
    world=st.integers(1, 4),
    micro=st.integers(1, 3),
    rows=st.integers(1, 5),
    extra=st.integers(0, 90),
    steps=st.integers(1, 6),
)
@example(name="skewed", mode="packed", seed=4, world=1, micro=1, rows=1, extra=0, steps=6)  # windows extended
def test_every_rank_takes_the_items_the_stream_contract_gives(
    reference_buffers, name, mode, seed, world, micro, rows, extra, steps
):
    """Each rank's micro-batches, over steps that cross epochs, against the contract of the module doc taken item
    by item (``reference_step_layouts``): the sampler cuts a step's packed rows and groups for all ranks in one
    pass over a window of the stream, extending the window when a bin does not end in it (the skewed buffer's
    packed rows hold up to 100 rows of 2 tokens where the mean length predicts 40)."""
    buf, lengths, group_ids = reference_buffers[name]
    cap = max(lengths) + extra
    if mode == "groups":
        rows = max(rows, 4)  # the largest group
    if mode == "packed" and rows * (cap - max(lengths) + 1) > sum(lengths):
        reject()  # refused: a micro-batch would hold rows more than once (test_packed_rows_wider_than_the_buffer...)
    check_against_the_contract(buf, lengths, group_ids, mode, seed, steps, world, micro, rows, cap)


def check_against_the_contract(buf, lengths, group_ids, mode, seed, steps, world, micro, rows, cap):
    """Every rank's micro-batches of ``steps`` steps against :func:`reference_step_layouts`."""
    want = reference_step_layouts(lengths, group_ids, mode, seed, steps, world, micro, rows, cap)
    for rank in range(world):
        s = BufferSampler(
            buf, rows_per_micro_batch=rows, micro_batches_per_step=micro, seed=seed, dp_rank=rank, dp_world=world,
            mode=mode, max_tokens_per_row=cap if mode == "packed" else None, pad_id=PAD,
        )  # fmt: skip
        for step in range(steps):
            got = s.next_micro_batches()
            for mb, expected in zip(got, want[step][rank], strict=True):
                assert (packed_layout(mb) if mode == "packed" else mb["buffer_rows"].tolist()) == expected


def packed_layout(mb):
    """The rows of each packed row of a micro-batch (their first tokens), as ``reference_step_layouts`` gives them."""
    seg, tok, out = mb["segment_ids"], mb["tokens"], []
    for b in range(tok.shape[0]):
        n = int(mb["lengths"][b])
        out.append([int(tok[b, t]) for t in range(n) if t == 0 or seg[b, t] != seg[b, t - 1]])
    return out


def test_a_step_is_cut_in_windows_of_bounded_size(reference_buffers, monkeypatch):
    """Every rank cuts the whole step's packed rows or groups, all ranks', from the stream: in windows of at most
    ``WINDOW_ITEMS`` items (a window of the step's whole share held about 1.5 GiB on every rank at 1,024 ranks of
    short rows in wide packed rows), grown only to hold a bin longer than that (the skewed buffer's packed rows of
    up to 100 rows), item for item the same batches."""
    from shiq_data import sampler as sampler_module

    monkeypatch.setattr(sampler_module, "WINDOW_ITEMS", 16, raising=False)
    asked = []
    stream = BufferSampler._stream

    def recorded(self, n):
        asked.append(n)
        return stream(self, n)

    monkeypatch.setattr(BufferSampler, "_stream", recorded)
    for name, mode, rows, extra in (("skewed", "packed", 2, 0), ("mixed", "packed", 3, 30), ("mixed", "groups", 5, 0)):
        buf, lengths, group_ids = reference_buffers[name]
        cap = max(lengths) + extra
        want = reference_step_layouts(lengths, group_ids, mode, 7, 3, 6, 2, rows, cap)
        for rank in (0, 5):
            s = BufferSampler(
                buf, rows_per_micro_batch=rows, micro_batches_per_step=2, seed=7, dp_rank=rank, dp_world=6,
                mode=mode, max_tokens_per_row=cap if mode == "packed" else None, pad_id=PAD,
            )  # fmt: skip
            for step in range(3):
                asked.clear()
                mbs = s.next_micro_batches()
                got = [packed_layout(mb) if mode == "packed" else mb["buffer_rows"].tolist() for mb in mbs]
                assert got == want[step][rank], (name, mode, rank, step)
                # a window grows past 16 items only to hold a bin of up to 100 rows: to 128 (16 doubled thrice)
                assert max(asked) <= (128 if name == "skewed" else 16), (name, mode, asked)
