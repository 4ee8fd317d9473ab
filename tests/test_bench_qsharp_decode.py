"""tools/bench_qsharp_decode.py: the methods' order is reversed every other pass (fakes, no model)."""

from __future__ import annotations

import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import bench_qsharp_decode as B  # noqa: E402


def test_order_is_reversed_every_other_pass(monkeypatch, capsys):
    """Plain sampling used to run first in every pass (A B C A B C): the order itself could favour it."""
    import shiq_eval.cli
    import shiq_eval.generate
    import shiq_eval.qsharp
    import shiq_train.hf_convert
    import shiq_train.qsharp_value

    calls = []

    class Tok:
        eos_token_id = 0

    class Fake:
        def __init__(self, *a, share_prefix=True, **k):
            self.tag = type(self).__name__ + ("" if share_prefix else "-whole")

        def generate(self, ids, cfg):
            calls.append(self.tag)
            return [[5, 6] for _ in ids]

    class Value:
        @staticmethod
        def from_causal_lm(hf, atoms):
            return Value()

        def eval(self):
            return self

    monkeypatch.setattr(shiq_train.hf_convert, "load_smollm2", lambda *a: (object(), Tok()))
    monkeypatch.setattr(shiq_eval.cli, "movie_prompts", lambda n: (["p"] * n, None))
    monkeypatch.setattr(shiq_eval.cli, "encode_prompts", lambda tok, prompts, chat: [[1, 2, 3] for _ in prompts])
    monkeypatch.setattr(shiq_train.qsharp_value, "HFValueModel", Value)
    monkeypatch.setattr(shiq_eval.generate, "HFPolicy", type("Plain", (Fake,), {}))
    monkeypatch.setattr(shiq_eval.qsharp, "GuidedPolicy", type("Guided", (Fake,), {}))
    B.main(["--prompts", "2", "--batch", "2", "--new-tokens", "2", "--reps", "3", "--threads", "1"])
    order = ["Plain", "Guided", "Guided-whole"]
    assert calls == order + order + order[::-1] + order  # warm-up, then passes 0, 1 (reversed), 2
    assert "the same completions for 2 of 2 prompts" in capsys.readouterr().out
