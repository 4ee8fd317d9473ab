"""Result tables round-trip; plots are written as PNG files."""

import csv
import json

from shiq_eval.report import plot_curves, write_table

ROWS = [
    {
        "method": "shiq",
        "step": 10,
        "reward_mean": 0.5,
        "reward_stderr": 0.1,
        "kl_sample": 1.0,
        "kl_sample_stderr": 0.3,
        "kl_exact": 0.9,
        "kl_exact_stderr": 0.1,
        "n": 64,
    },
    {
        "method": "shiq",
        "step": 20,
        "reward_mean": 0.8,
        "reward_stderr": 0.1,
        "kl_sample": 2.0,
        "kl_sample_stderr": 0.3,
        "kl_exact": 1.9,
        "kl_exact_stderr": 0.1,
        "n": 64,
    },
    {
        "method": "dpo",
        "step": 10,
        "reward_mean": 0.4,
        "reward_stderr": 0.1,
        "kl_sample": 0.5,
        "kl_sample_stderr": 0.2,
        "kl_exact": 0.6,
        "kl_exact_stderr": 0.1,
        "n": 64,
    },
]


def test_table_and_plots(tmp_path):
    csv_path, json_path = write_table(ROWS, tmp_path)
    back = list(csv.DictReader(csv_path.open()))
    assert [(r["method"], int(r["step"]), float(r["reward_mean"])) for r in back] == [
        (r["method"], r["step"], r["reward_mean"]) for r in ROWS
    ]
    assert json.loads(json_path.read_text()) == ROWS
    paths = plot_curves(ROWS, tmp_path, reference={"reward_mean": 0.1, "reward_stderr": 0.05})
    assert [p.name for p in paths] == ["reward_vs_kl.png", "reward_vs_step.png"]  # the documented two plots
    assert all(p.parent == tmp_path for p in paths)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["reward_vs_kl.png", "reward_vs_step.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))
