"""``shiq-data stats``: counts, lengths and rewards per source and overall, group sizes, reference share.

Only the derived scalar columns of each row are kept in memory (not its tokens or ids; about 50 bytes a row,
since exact percentiles need every value), read one shard at a time.
Percentiles are numpy's (linear interpolation); the standard deviation is the sample one (``ddof=1``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from shiq_data.curate.rows import TEXT_COLUMNS, CurationSource
from shiq_data.curate.where import Where
from shiq_data.io import atomic_write

COLUMNS = ("source", "group_id", "tokens", "prompt_tokens", "completion_tokens", "reward", "has_ref")
LENGTHS = ("tokens", "prompt_tokens", "completion_tokens")


def _describe(x: np.ndarray) -> dict:
    x = np.asarray(x, dtype=np.float64)
    if not len(x):
        return {}
    return {
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
        "min": float(x.min()),
        "p50": float(np.percentile(x, 50)),
        "p95": float(np.percentile(x, 95)),
        "max": float(x.max()),
    }


def _summary(t: dict) -> dict:
    return {
        "rows": len(t["group_id"]),
        "groups": len(np.unique(t["group_id"])),
        **{name: _describe(t[name]) for name in (*LENGTHS, "reward")},
        "ref_share": float(np.mean(t["has_ref"])) if len(t["has_ref"]) else 0.0,
    }


def selected_view(source: CurationSource, where: Where | None) -> dict[str, np.ndarray]:
    """The derived scalar columns of the rows where ``where`` holds (all rows without it), as numpy arrays:
    numbers, and the sources as one fixed-width string array (not a Python string a row)."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in COLUMNS}
    names: dict[str, int] = {}  # source -> code
    for table in source.shards():
        view = source.view(
            table,
            text=where is not None and where.needs(TEXT_COLUMNS),
            extra_keys=where is not None and where.needs_extra_keys(),
        )
        if where is not None:
            view = view.filter(pa.array(where.mask(view)))
        for name in COLUMNS:
            column = view.column(name).combine_chunks()
            if name == "source":
                codes = column.dictionary_encode()
                to_code = [names.setdefault(s, len(names)) for s in codes.dictionary.to_pylist()]
                parts[name].append(np.asarray(to_code, dtype=np.int64)[codes.indices.to_numpy()])
            else:
                parts[name].append(column.to_numpy(zero_copy_only=False))
    values = {name: np.concatenate(parts.pop(name)) for name in COLUMNS}  # each column's parts freed in turn
    values["source"] = np.asarray(list(names), dtype=str)[values["source"]]
    return values


def summarise(values: dict[str, np.ndarray]) -> dict:
    """Statistics of the rows in ``values`` (:func:`selected_view`): ``{"rows", "all": summary, "sources":
    {source: summary}, "group_sizes": {size: groups}}``, a summary holding ``rows``, ``groups``, the
    ``tokens``/``prompt_tokens``/``completion_tokens``/``reward`` distributions (mean, std, min, p50, p95,
    max) and ``ref_share``, the share of rows with reference statistics."""
    sources = {}
    for name in sorted(set(values["source"].tolist())):
        sel = values["source"] == name
        sources[name] = _summary({k: v[sel] for k, v in values.items()})
    sizes = Counter(np.unique(values["group_id"], return_counts=True)[1].tolist())
    return {
        "rows": len(values["group_id"]),
        "all": _summary(values),
        "sources": sources,
        "group_sizes": dict(sorted(sizes.items())),
    }


def buffer_stats(path, where: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """``(statistics, per-row values)`` of the buffer at ``path``, or of its rows where ``where`` holds
    (:func:`summarise`, :func:`selected_view`)."""
    values = selected_view(CurationSource(path), Where(where) if where else None)
    return summarise(values), values


def format_stats(stats: dict, title: str) -> str:
    """The table ``shiq-data stats`` prints."""
    head = (
        f"{'source':<20} {'rows':>7} {'groups':>7} {'tokens mean/p50/max':>22} {'prompt mean':>12} "
        f"{'actions mean/max':>17} {'reward mean':>12} {'std':>8} {'min':>8} {'max':>8} {'ref':>5}"
    )
    lines = [title, head]

    def line(name, s):
        tk, pr, ac, rw = s["tokens"], s["prompt_tokens"], s["completion_tokens"], s["reward"]
        tokens = f"{tk['mean']:.1f}/{tk['p50']:.0f}/{tk['max']:.0f}"
        actions = f"{ac['mean']:.1f}/{ac['max']:.0f}"
        lines.append(
            f"{name[:20]:<20} {s['rows']:>7} {s['groups']:>7} {tokens:>22} {pr['mean']:>12.1f} {actions:>17} "
            f"{rw['mean']:>12.4g} {rw['std']:>8.3g} {rw['min']:>8.3g} {rw['max']:>8.3g} {s['ref_share']:>5.0%}"
        )

    if stats["rows"]:
        line("all", stats["all"])
        for name, s in stats["sources"].items():
            line(name, s)
    sizes = ", ".join(f"{k}: {v}" for k, v in stats["group_sizes"].items())
    lines.append(f"group sizes (rows: groups)  {sizes or 'none'}")
    return "\n".join(lines)


def plot_stats(stats: dict, values: dict[str, np.ndarray], folder) -> list[Path]:
    """Histograms of the lengths and rewards per source (``values``) and of the group sizes (``stats``) as
    PNG files in ``folder`` (written atomically); their paths."""
    import matplotlib  # heavy: only --plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: only --plot needs it

    t = values
    folder = Path(folder)
    written = []

    def save(fig, name):
        path = folder / name
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)
        written.append(path)

    for column, label in (
        ("tokens", "tokens per row"),
        ("completion_tokens", "action tokens per row"),
        ("reward", "reward"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in stats["sources"]:
            ax.hist(t[column][t["source"] == name], bins=30, alpha=0.6, label=name)
        ax.set_xlabel(label)
        ax.set_ylabel("rows")
        ax.legend(fontsize=8)
        save(fig, f"{column}.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([str(k) for k in stats["group_sizes"]], list(stats["group_sizes"].values()))
    ax.set_xlabel("rows per group")
    ax.set_ylabel("groups")
    save(fig, "group_sizes.png")
    return written
