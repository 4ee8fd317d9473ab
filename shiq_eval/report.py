"""Tables and plots of evaluation results: reward vs KL and reward vs step, one curve per method.

Input rows are dicts with at least ``method``, ``step``, ``reward_mean``, ``reward_stderr`` and
``kl_exact`` (SHIQ_MATH §6). Files are written atomically.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from shiq_data.io import atomic_write_bytes, atomic_write_json

COLUMNS = [
    "method",
    "step",
    "reward_mean",
    "reward_stderr",
    "kl_sample",
    "kl_sample_stderr",
    "kl_exact",
    "kl_exact_stderr",
    "n",
    "prompt_set_sha256",
]


def write_table(rows: list[dict], out_dir) -> tuple[Path, Path]:
    """``results.csv`` and ``results.json`` in ``out_dir``."""
    out_dir = Path(out_dir)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_bytes(out_dir / "results.csv", buf.getvalue().encode())
    atomic_write_json(out_dir / "results.json", rows)
    return out_dir / "results.csv", out_dir / "results.json"


def _savefig(fig, path):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_curves(rows: list[dict], out_dir, reference: dict | None = None) -> list[Path]:
    """``reward_vs_kl.png`` and ``reward_vs_step.png``: one line per method (points in step order),
    error bars of one standard error; the reference policy as a dashed line / a point at KL 0."""
    import matplotlib  # heavy: only plotting needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib

    out_dir = Path(out_dir)
    methods = sorted({r["method"] for r in rows})
    paths = []
    for x_key, name, xlabel in [
        ("kl_exact", "reward_vs_kl.png", "KL(π ‖ π_ref) per completion (exact per-token sum)"),
        ("step", "reward_vs_step.png", "training step"),
    ]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in methods:
            pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["step"])
            ax.errorbar(
                [r[x_key] for r in pts],
                [r["reward_mean"] for r in pts],
                yerr=[r["reward_stderr"] for r in pts],
                marker="o",
                capsize=3,
                label=m,
            )
        if reference is not None:
            if x_key == "step":
                ax.axhline(reference["reward_mean"], color="grey", ls="--", label="reference")
            else:
                ax.errorbar(
                    [0.0],
                    [reference["reward_mean"]],
                    yerr=[reference["reward_stderr"]],
                    color="grey",
                    marker="s",
                    capsize=3,
                    label="reference",
                )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean reward on held-out prompts (± 1 s.e.)")
        ax.grid(alpha=0.3)
        ax.legend()
        _savefig(fig, out_dir / name)
        plt.close(fig)
        paths.append(out_dir / name)
    return paths
