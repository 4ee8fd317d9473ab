"""Tables and plots of evaluation results: reward vs KL and reward vs step, one curve per run.

Input rows are dicts with at least ``method``, ``step``, ``reward_mean``, ``reward_stderr`` and
``kl_exact`` (SHIQ_MATH §6); a row's curve is its ``run`` label when it has one, else its ``method``
(two runs of one loss are two curves). Files are written atomically.
"""

from __future__ import annotations

import csv
import html
import io
import re
from pathlib import Path

from shiq_data.io import atomic_write_bytes, atomic_write_json, printable
from shiq_eval.optimum import undefined_as_null

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


def write_table(rows: list[dict], out_dir, columns: list[str] | None = None) -> tuple[Path, Path]:
    """``results.csv`` (the ``columns``, default :data:`COLUMNS`) and ``results.json`` in ``out_dir``. An
    undefined (NaN) standard error, of one prompt or scenario, is null in the JSON and empty in the CSV
    (:func:`shiq_eval.optimum.undefined_as_null`)."""
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "results.json", undefined_as_null(rows))  # first: it refuses a NaN the CSV takes
    atomic_write_bytes(out_dir / "results.csv", csv_text(rows, columns or COLUMNS).encode())
    return out_dir / "results.csv", out_dir / "results.json"


def csv_text(rows: list[dict], columns: list[str]) -> str:
    """The ``columns`` of ``rows`` as CSV; an undefined (NaN) standard error an empty cell, as null is
    (:func:`shiq_eval.optimum.undefined_as_null`)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in undefined_as_null(rows):
        w.writerow(r)
    return buf.getvalue()


def _savefig(fig, path):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _pyplot():
    import matplotlib  # heavy: only plotting needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib

    return plt


def curve_of(row: dict) -> str:
    """The curve a row belongs to: its run label, else its method."""
    return str(row.get("run") or row["method"])


def _curve_label(pts: list[dict]) -> str:
    name, method = curve_of(pts[0]), pts[0]["method"]
    return name if name == method else f"{name} ({method})"


def plot_curves(
    rows: list[dict],
    out_dir,
    reference: dict | None = None,
    kl_key: str = "kl_exact",
    kl_name: str = "exact",
    spread: tuple[str, str] = ("stderr", "1 s.e."),
) -> list[Path]:
    """``reward_vs_kl.png`` and ``reward_vs_step.png``: one line per run (:func:`curve_of`; points in step
    order), error bars of one standard error; the reference policy as a dashed line / a point at KL 0.
    ``kl_key``: the rows' KL column (``kl_name`` its estimator, for the axis label). ``spread`` = (suffix,
    words): the error bars are the rows' (and the reference's) ``reward_<suffix>``, e.g. ``("sd", "1 s.d.
    over seeds")`` for means over seeds."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    kl_label = "exact per-token sum" if kl_name == "exact" else f"{kl_name} estimate"
    paths = []
    for x_key, name, xlabel in [
        (kl_key, "reward_vs_kl.png", f"KL(π ‖ π_ref) per completion ({kl_label})"),
        ("step", "reward_vs_step.png", "training step"),
    ]:
        fig, ax = plt.subplots(figsize=(6, 4))
        _run_lines(ax, rows, x_key, "reward_mean", f"reward_{spread[0]}", _curve_label)
        if reference is not None:
            if x_key == "step":
                ax.axhline(reference["reward_mean"], color="grey", ls="--", label="reference")
            else:
                ax.errorbar(
                    [0.0],
                    [reference["reward_mean"]],
                    yerr=[reference[f"reward_{spread[0]}"]],
                    color="grey",
                    marker="s",
                    capsize=3,
                    label="reference",
                )
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"mean reward on held-out prompts (± {spread[1]})")
        paths.append(_finish(plt, fig, ax, out_dir / name, legend_size=None))
    return paths


def _run_lines(ax, rows: list[dict], x_key: str, y_key: str, err_key: str, label) -> None:
    """One line with error bars per run (:func:`curve_of`), its points in step order: ``y_key`` ± ``err_key``
    against ``x_key``, labelled ``label(points)``."""
    for c in sorted({curve_of(r) for r in rows}):
        pts = sorted((r for r in rows if curve_of(r) == c), key=lambda r: r["step"])
        ax.errorbar(
            [r[x_key] for r in pts],
            [r[y_key] for r in pts],
            yerr=[r[err_key] for r in pts],
            marker="o",
            capsize=3,
            label=legend_text(label(pts)),
        )
    if x_key == "step":  # steps are whole numbers
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def markdown_cell(text: str) -> str:
    """``text`` (a run label, a suite or model name) shown as written in a Markdown table cell or heading: on one
    line, HTML escaped (``<i>``), Markdown's marks escaped (``*x*``, ``_x_``, backticks, ``[l](u)``, ``|``; an
    ``_`` between two letters or digits, which CommonMark never reads as a mark, is left as it is)."""
    text = html.escape(" ".join(str(text).splitlines()), quote=False)
    return re.sub(r"([\\`*\[\]~|]|(?<![^\W_])_|_(?![^\W_]))", r"\\\1", text)


def legend_text(text: str) -> str:
    """A run's label as matplotlib shows it as written: ``$`` escaped (it starts math text: ``cost $5 and $6``
    read as math), a label beginning with ``_`` (which matplotlib leaves out of legends) shown after a
    thin space, and control characters but line breaks and tabs written as ``\\x1b`` (the font has no glyph
    for them: matplotlib drew nothing and warned)."""
    text = printable(str(text), keep="\n\t").replace("$", r"\$")
    return "\u2009" + text if text.startswith("_") else text


def plot_j_vs_step(
    rows: list[dict],
    out_dir,
    reference_j: tuple[float, float] | None,
    j_star: dict[float, float],
    spread: tuple[str, str] = ("stderr", "1 s.e."),
) -> Path:
    """``j_vs_step.png``: ``J = reward − β·KL`` (SHIQ_MATH §9) of each run (:func:`curve_of`) against the
    training step (rows with ``method``, ``step``, ``beta``, ``J``, ``J_stderr``; error bars of one s.e.), the
    reference's ``J`` (``(mean, s.e.)``, or None) and the ``J*`` estimate at each ``β`` (``{β: J*}``) as
    horizontal lines. ``spread`` as in :func:`plot_curves` (error bars from ``J_<suffix>``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    _run_lines(ax, rows, "step", "J", f"J_{spread[0]}", lambda pts: f"{_curve_label(pts)} (β = {pts[0]['beta']:g})")
    if reference_j is not None:
        ax.axhline(reference_j[0], color="grey", ls="--", label="reference (J = reward)")
    for i, (beta, value) in enumerate(sorted(j_star.items())):  # a line style per β
        ax.axhline(
            value, color="black", ls=(":", "-.", (0, (5, 5)), (0, (1, 4)))[i % 4], label=f"J* estimate, β = {beta:g}"
        )
    ax.set_xlabel("training step")
    ax.set_ylabel(f"J = reward − β·KL on held-out prompts (± {spread[1]})")
    return _finish(plt, fig, ax, Path(out_dir) / "j_vs_step.png", legend_size=8)


def plot_j_star_curve(curves: dict[float, list[dict]], out_dir) -> Path:
    """``j_star_curve.png``: the ``J*`` estimate (mean over prompts, ± 1 s.e.) against the number of
    reference samples per prompt, one line per ``β`` (``{β: shiq_eval.optimum.j_star_curve(...)}``);
    a line still rising at its last point says the estimate is biased low (SHIQ_MATH §9)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for beta, curve in sorted(curves.items()):
        ax.errorbar(
            [c["samples"] for c in curve],
            [c["j_star"] for c in curve],
            yerr=[c["j_star_stderr"] for c in curve],
            marker="o",
            capsize=3,
            label=f"β = {beta:g}",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("reference samples per prompt (N)")
    ax.set_ylabel("J* estimate, β log mean exp(R/β)")
    return _finish(plt, fig, ax, Path(out_dir) / "j_star_curve.png", legend_size=None)


def plot_frontier(
    points: list[dict],
    out_path,
    reference: tuple[float, float] | None = None,
    ylabel: str = "mean reward on held-out prompts",
    title: str = "final checkpoints, mean over seeds ± 1 s.d. of the seeds",
    xlabel: str = "KL(π ‖ π_ref) per completion (exact per-token sum)",
) -> Path:
    """A reward–KL frontier across seeds: one line per method through its β grid (points sorted by KL),
    each point ``{method, beta, kl, kl_sd, reward, reward_sd}`` (seed means, error bars of one seed
    standard deviation on both axes) labelled with its β (unless None); ``reference`` = (mean, s.d.) reward at KL 0.
    ``reward`` may hold another score (say so in ``ylabel``), e.g. the gold scorer's; other error bars
    (standard errors, say) go in the same fields, with a ``title`` that says what they are."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in sorted({p["method"] for p in points}):
        pts = sorted((p for p in points if p["method"] == m), key=lambda p: p["kl"])
        bar = ax.errorbar(
            [p["kl"] for p in pts],
            [p["reward"] for p in pts],
            xerr=[p["kl_sd"] for p in pts],
            yerr=[p["reward_sd"] for p in pts],
            marker="o",
            capsize=3,
            label=m,
        )
        for p in (p for p in pts if p["beta"] is not None):
            ax.annotate(f"β={p['beta']:g}", (p["kl"], p["reward"]), fontsize=6, color=bar[0].get_color())
    if reference is not None:
        ax.errorbar([0.0], [reference[0]], yerr=[reference[1]], color="grey", marker="s", capsize=3, label="reference")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8)
    return _finish(plt, fig, ax, out_path)


def plot_val_loss(curves: dict[str, list[dict]], out_path) -> Path:
    """``curves[arm]`` = ``[{step, loss}, ...]``: each arm's own training loss on a held-out buffer against
    the step (the losses differ between arms, so compare shapes and starting points, not levels across
    different objectives); a log scale when every loss is positive."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (arm, pts) in enumerate(sorted(curves.items())):
        pts = sorted(pts, key=lambda p: p["step"])
        style = {"color": plt.cm.tab10(i % 10), "linestyle": ("-", "--", ":", "-.")[i // 10 % 4]}  # no two alike
        ax.plot([p["step"] for p in pts], [p["loss"] for p in pts], marker="o", label=arm, **style)
    if all(p["loss"] > 0 for pts in curves.values() for p in pts):
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss on the validation buffer")
    return _finish(plt, fig, ax, out_path, legend_outside=True)  # many arms: the legend beside the axes


LEGEND_MAX = 30  # legend entries drawn; beyond, the legend would be taller than the plot (a leaderboard of 400 runs)


def _finish(plt, fig, ax, out_path, legend_size: float | None = 7, legend_outside: bool = False) -> Path:
    """Grid, a legend (font size ``legend_size``; None: matplotlib's default; right of the axes with
    ``legend_outside``), the figure written atomically to ``out_path`` and closed. Over :data:`LEGEND_MAX`
    entries in the axes (a legend beside them, for many arms, has room), no legend: a note in the corner says how
    many lines there are (their labels are in the tables)."""
    ax.grid(alpha=0.3)
    entries = len(ax.get_legend_handles_labels()[1])
    if entries > LEGEND_MAX and not legend_outside:
        ax.text(
            0.01,
            0.99,
            f"{entries} lines: too many to label (see the tables)",
            transform=ax.transAxes,
            va="top",
            fontsize=7,
            color="grey",
        )
    elif legend_outside:
        ax.legend(fontsize=legend_size, handlelength=3.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
    else:
        ax.legend(fontsize=legend_size)
    out_path = Path(out_path)
    _savefig(fig, out_path)
    plt.close(fig)
    return out_path
