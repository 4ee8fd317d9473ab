"""tools/bench_vs_trl.py: every contestant trains on the same real tokens per step (tiny model, in-process)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import bench_vs_trl as B  # noqa: E402


class Collect:
    """The worker's reporter, keeping the messages instead of writing them."""

    def __init__(self):
        self.msgs = []

    def send(self, **msg):
        self.msgs.append(msg)

    reset_peak = staticmethod(B.Reporter.reset_peak)
    peak_mib = staticmethod(B.Reporter.peak_mib)


def expected_tokens(pairs, per_step, steps):
    """Real tokens of each step straight from the pairs: prompt + completion, twice per pair."""
    out = []
    for s in range(steps):
        chosen = [pairs[(s * per_step + i) % len(pairs)] for i in range(per_step)]
        out.append(sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in chosen))
    return out


def test_missing_trl_is_one_line_naming_the_extra(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    assert B.main(["--contestants", "trl dpo (online ref)"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shiq[bench]" in err and "trl==1.16.0" in err


def test_hh_pairs_shape():
    """As the help says: n pairs, 64-192 prompt tokens, two completions of 16-128 tokens of different lengths;
    2,000 pairs reach each end of the ranges (a draw missing one has odds below 1e-6)."""
    pairs = B.hh_pairs(2000)
    assert len(pairs) == 2000 and B.hh_pairs(0) == []
    prompts = [len(p["prompt"]) for p in pairs]
    completions = [len(p[k]) for p in pairs for k in ("chosen", "rejected")]
    assert (min(prompts), max(prompts)) == (64, 192) and (min(completions), max(completions)) == (16, 128)
    assert all(len(p["chosen"]) != len(p["rejected"]) for p in pairs)
    ids = np.concatenate([p[k] for p in pairs for k in ("prompt", "chosen", "rejected")])
    assert 0 <= ids.min() and ids.max() < B.VOCAB


def test_packed_batch_holds_the_same_trajectories():
    pairs = B.synthetic_pairs(3, 10) + B.hh_pairs(2)
    padded, n_padded = B.megatron_batch(pairs, None)
    packed, n_packed = B.megatron_batch(pairs, 256)
    rows = [p["prompt"] + p[k] for p in pairs for k in ("chosen", "rejected")]
    assert n_padded == n_packed == sum(len(r) for r in rows)
    assert packed["tokens"].shape[0] < padded["tokens"].shape[0]
    # every trajectory appears whole, in order, in one packed row; actions = its completion
    # (a row's trailing padding is one more segment, of pad id 0; the trajectories' ids are >= 100)
    got = []
    for b in range(packed["tokens"].shape[0]):
        seg = packed["segment_ids"][b]
        for k in range(int(seg.max()) + 1):
            at = (seg == k).nonzero().flatten()
            if packed["tokens"][b, at].min() > 0:
                got.append((packed["tokens"][b, at].tolist(), int(packed["action_mask"][b, at].sum())))
    assert [t for t, _ in got] == rows
    assert [a for _, a in got] == [len(p[k]) for p in pairs for k in ("chosen", "rejected")]


NON_TRL = (
    "shiq padded",
    "shiq packed",
    "megatron sft",
    "megatron dpo",
    "transformers sft",
    "shiq padded, megatron attention",
    "shiq padded, all positions",
)
TRL = ("trl dpo (online ref)", "trl dpo (precomputed ref)")


def test_contestants_are_split_between_the_two_tests():
    """The default contestants and the two opt-ins below are run by exactly one of the tests underneath."""
    run = (*B.DEFAULT_CONTESTANTS, "shiq padded, megatron attention", "shiq padded, all positions")
    assert sorted(NON_TRL + TRL) == sorted(run)
    assert not any(name.startswith("trl") for name in NON_TRL) and all(name.startswith("trl") for name in TRL)


def run_contestants(names, tmp_path) -> dict:
    """Each contestant for two steps of two pairs of real tokens; checks the steps and the tokens each reports
    against :func:`expected_tokens`. Returns the steps' reports of each (loss and gradient norm; none for the
    transformers SFT baseline)."""
    import torch

    B.build_hf("tiny").save_pretrained(tmp_path / "model")
    g = np.random.default_rng(0)
    ids = lambda n: g.integers(100, 40000, n).tolist()
    pairs = [{"prompt": ids(p), "chosen": ids(c), "rejected": ids(r)} for p, c, r in [(5, 3, 7), (9, 2, 1), (4, 6, 5)]]
    args = B.parse_args(["--pairs", "2", "--steps", "1", "--threads", "1"])
    args.model_dir = str(tmp_path / "model")
    want = expected_tokens(pairs, 2, 2)
    threads, steps = torch.get_num_threads(), {}
    try:
        for name in names:
            rep = Collect()
            if name.startswith("trl"):
                B.run_trl(name, {"pairs": pairs}, args, rep, tmp_path / name.replace(" ", "_"))
            elif name == "transformers sft":
                B.run_transformers_sft({"pairs": pairs}, args, rep)
            else:
                B.run_megatron(name, {"pairs": pairs}, args, rep)
            assert [m["step"] for m in rep.msgs] == [0, 1], name
            assert [m["tokens"] for m in rep.msgs] == want, name
            assert all(m["seconds"] > 0 for m in rep.msgs), name
            assert all(m["fused"] for m in rep.msgs), name  # every contestant steps the same AdamW kernel
            steps[name] = rep.msgs
    finally:
        torch.set_num_threads(threads)
    return steps


def test_every_contestant_without_trl_trains_on_the_same_real_tokens(tmp_path):
    """Each ShiQ contestant computes the same steps. The first loss alone could not tell (the policy is its own
    reference then: the loss is the rewards' alone, whatever the model computes); the gradient norms can."""
    steps = run_contestants(NON_TRL, tmp_path)
    assert all(np.isfinite(steps[name][0]["loss"]) for name in NON_TRL)
    want = steps["shiq padded"]
    for name in (
        "shiq packed",  # packed rows are the same trajectories as padded ones
        "shiq padded, megatron attention",  # megatron's own core attention, as scaled_dot_product_attention
        "shiq padded, all positions",  # the statistics of every position, as of the action positions only
    ):
        for key in ("loss", "grad_norm"):
            assert [m[key] for m in steps[name]] == pytest.approx([m[key] for m in want], rel=1e-5), (name, key)


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL (the optional extra bench) is not installed")
def test_every_trl_contestant_trains_on_the_same_real_tokens(tmp_path):
    """TRL's DPOTrainer, the benchmark's baseline, computes the same steps as this project's DPO on megatron-core:
    the same losses and gradient norms (an independent implementation of the loss, its reference and its
    gradient), so the throughput ratios compare like with like."""
    steps = run_contestants([*TRL, "megatron dpo"], tmp_path)
    want = steps["megatron dpo"]
    for name in TRL:
        for key in ("loss", "grad_norm"):
            assert [m[key] for m in steps[name]] == pytest.approx([m[key] for m in want], rel=1e-5), (name, key)


def test_table_prints_the_range_over_rounds_and_the_ratio_to_compiled_trl(capsys):
    """README quotes each contestant's tokens/s with its range over the rounds, and ShiQ against TRL compiled:
    the table prints both (no division by hand, no reading of the per-round progress lines)."""

    def run(rates):  # one process per round: a warm-up step, then one timed step of 100 tokens
        return [
            {
                "steps": [{"step": 0, "seconds": 9.0, "tokens": 100}, {"step": 1, "seconds": 100 / r, "tokens": 100}],
                "peak_rss_mib": 1.0,
            }
            for r in rates
        ]

    results = {
        "shiq padded": run([200, 220, 210]),
        "trl dpo (online ref)": run([100, 120, 110]),
        "trl dpo (precomputed ref)": run([150, 160, 155]),
        "trl dpo (precomputed ref), compiled": run([170, 180, 175]),
    }
    rows = B.summarize(results)
    B.print_table("buffer", "rows", rows, B.parse_args(["--pairs", "2"]))
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert "range over rounds" in table[0] and "/ dpo (precomputed ref), compiled |" in table[0]
    shiq = next(line for line in table if line.startswith("| shiq padded |"))
    rate = 300 / sum(100 / r for r in (200, 220, 210))
    compiled = 300 / sum(100 / r for r in (170, 180, 175))
    assert f"| {rate:.0f} (200-220) |" in shiq
    assert shiq.split("|")[-5].strip() == f"{rate / compiled:.2f}x"
