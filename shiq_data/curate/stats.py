"""``shiq-data stats``: counts, lengths and rewards per source and overall, group sizes, reference share.

Memory is bounded, not proportional to the buffer: each shard's derived scalar columns (source, group,
lengths, reward, reference flag) are appended to a temporary Parquet table next to the buffer
(:class:`shiq_data.spill.Spill`, removed afterwards), and DuckDB, with a fixed memory limit and spilling to
disk beyond it, computes the counts, means, standard deviations, extremes and group sizes; the exact
percentiles are read off each column sorted by DuckDB (an out-of-core sort, streamed), the histograms of
``--plot`` are counted over a streamed pass. Percentiles are numpy's (linear interpolation); the standard
deviation is the sample one (``ddof=1``). A ``row_id`` the buffer holds twice is refused as ``validate`` refuses it:
every row's id goes to a second table of the same spill, in the same pass over the shards. The rows summarised are
``filter``'s selection (:class:`shiq_data.curate.filter.Selection`: ``--where``, ``--ids``, ``--exclude-ids``),
which holds no more than the list of ids and the shards (memory-mapped) of one id lookup.
"""

from __future__ import annotations

import json
import math
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa

from shiq_data.curate.filter import Selection, row_ids
from shiq_data.curate.rows import CurationSource
from shiq_data.curate.where import Where
from shiq_data.io import atomic_write, files_together
from shiq_data.spill import Spill
from shiq_data.validate import ID_SCHEMA, id_rows, refuse_repeated_ids

COLUMNS = ("source", "group_id", "tokens", "prompt_tokens", "completion_tokens", "reward", "has_ref")
LENGTHS = ("tokens", "prompt_tokens", "completion_tokens")
DESCRIBED = (*LENGTHS, "reward")
PLOTTED = (("tokens", "tokens per row"), ("completion_tokens", "action tokens per row"), ("reward", "reward"))
BINS = 30
_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("group_id", pa.int64()),
        *((name, pa.int64()) for name in LENGTHS),
        ("reward", pa.float64()),
        ("has_ref", pa.bool_()),
    ]
)


def _percentile(a: float, b: float, t: float) -> float:
    """numpy's linear interpolation between the order statistics ``a <= b`` at fraction ``t``."""
    diff = b - a
    return float(b - diff * (1 - t)) if t >= 0.5 else float(a + diff * t)


def _spill_rows(chosen: Selection, spill: Spill) -> None:
    """The derived scalar columns of the rows ``chosen`` selects (every row without ``--where`` or a list) to table
    ``rows``, and every row's id (selected or not) to table ``ids``, for :func:`refuse_repeated_ids`."""
    spill.declare("rows", _SCHEMA)
    spill.declare("ids", ID_SCHEMA)
    source = chosen.source
    if chosen.where is not None:
        source.warn_of_shadowed_keys(chosen.where.columns)
    pos = 0
    for k, (table, keep) in enumerate(chosen):
        n = table.num_rows
        spill.append("ids", id_rows(pos, k, table.column("row_id")))
        pos += n
        view = source.view(table, extra_keys=False).select(list(COLUMNS))
        spill.append("rows", view if len(keep) == n else view.take(pa.array(keep, pa.int64())))


def _summaries(spill: Spill) -> dict:
    """``{None: summary of all rows, source: summary}`` (see :func:`summarise`). Sums are compensated
    (DuckDB's ``fsum``, ``favg``) and the standard deviation is taken about the mean in a second step, as
    numpy does."""
    rows = spill.table("rows")
    found = {}
    for by_source in (False, True):
        key, group = ("source", "GROUP BY source") if by_source else ("NULL::VARCHAR AS source", "")
        firsts = ", ".join(f"favg({c}::DOUBLE) AS m_{c}, min({c}) AS lo_{c}, max({c}) AS hi_{c}" for c in DESCRIBED)
        devs = ", ".join(f"fsum(({c}::DOUBLE - s.m_{c}) * ({c}::DOUBLE - s.m_{c})) AS d_{c}" for c in DESCRIBED)
        # the first pass's results (one row per source) are kept in a small table, and the second pass groups by
        # source alone: grouping the joined rows by every column of the first pass (GROUP BY ALL) ran out of
        # DuckDB's memory limit on a million rows of one source
        spill.con.execute(
            f"CREATE OR REPLACE TEMP TABLE s AS SELECT {key}, count(*) AS n, favg(has_ref::DOUBLE) AS ref, {firsts} "
            f"FROM {rows} {group}"
        )
        join = "JOIN s USING (source) GROUP BY r.source" if by_source else "CROSS JOIN s"
        cursor = spill.con.execute(
            f"SELECT {'r.source' if by_source else 'NULL'} AS source, {devs} FROM {rows} r {join}"
        )
        names = [d[0] for d in cursor.description]
        dev = {record[0]: dict(zip(names, record)) for record in cursor.fetchall()}
        cursor = spill.con.execute("SELECT * FROM s")
        names = [d[0] for d in cursor.description]
        for record in cursor.fetchall():
            r = dict(zip(names, record))
            if not r["n"]:  # no rows (an empty filter): no summary, as no group came out of the rows before
                continue
            r.update(dev[r["source"]])
            n = r["n"]
            summary = {"rows": n, "groups": 0, "ref_share": float(r["ref"])}
            for c in DESCRIBED:
                std = math.sqrt(r[f"d_{c}"] / (n - 1)) if n > 1 else None  # (ddof 1: undefined for one row)
                summary[c] = {"mean": float(r[f"m_{c}"]), "std": std, "min": float(r[f"lo_{c}"])}
                summary[c].update(p50=None, p95=None, max=float(r[f"hi_{c}"]))
            found[r["source"] if by_source else None] = summary
    groups = f"SELECT source, group_id FROM {rows} GROUP BY source, group_id"
    for name, n in spill.con.execute(f"SELECT source, count(*) FROM ({groups}) GROUP BY source").fetchall():
        found[name]["groups"] = n
    if None in found:
        found[None]["groups"] = spill.one(f"SELECT count(*) FROM (SELECT group_id FROM {rows} GROUP BY group_id)")[0]
    _percentiles(spill, found)
    return found


def _percentiles(spill: Spill, found: dict) -> None:
    """Fill p50 and p95 of every summary in ``found`` from each column sorted by DuckDB (out of core)."""
    for c in DESCRIBED:
        wanted = {}  # summary name -> {rank: value}
        for name, s in found.items():
            for q in (0.5, 0.95):
                h = (s["rows"] - 1) * q
                lo = math.floor(h)
                wanted.setdefault(name, {}).update({lo: None, min(lo + 1, s["rows"] - 1): None})
        seen = dict.fromkeys(found, 0)
        for batch in spill.query(f"SELECT source, {c}::DOUBLE FROM {spill.table('rows')} ORDER BY {c}"):
            sources = np.asarray(batch.column(0).to_pylist(), dtype=object)
            x = batch.column(1).to_numpy()
            for name in found:
                xs = x if name is None else x[sources == name]
                for rank in wanted[name]:
                    if seen[name] <= rank < seen[name] + len(xs):
                        wanted[name][rank] = float(xs[rank - seen[name]])
                seen[name] += len(xs)
        for name, s in found.items():
            for q, key in ((0.5, "p50"), (0.95, "p95")):
                h = (s["rows"] - 1) * q
                lo = math.floor(h)
                s[c][key] = _percentile(wanted[name][lo], wanted[name][min(lo + 1, s["rows"] - 1)], h - lo)


def _histograms(spill: Spill, stats: dict) -> dict:
    """``{column: {source: (counts [BINS], edges [BINS + 1])}}`` of the plotted columns, counted over a
    streamed pass (the edges span each source's minimum to maximum, as ``numpy.histogram`` picks them)."""
    hists = {}
    for c, _ in PLOTTED:
        hists[c] = {}
        for name, s in stats["sources"].items():
            edges = np.histogram_bin_edges(np.array([s[c]["min"], s[c]["max"]]), bins=BINS)
            hists[c][name] = (np.zeros(BINS, dtype=np.int64), edges)
    columns = ", ".join(c for c, _ in PLOTTED)
    for batch in spill.query(f"SELECT source, {columns} FROM {spill.table('rows')}"):
        sources = np.asarray(batch.column(0).to_pylist(), dtype=object)
        for k, (c, _) in enumerate(PLOTTED):
            x = batch.column(k + 1).to_numpy(zero_copy_only=False)
            for name, (counts, edges) in hists[c].items():
                counts += np.histogram(x[sources == name], bins=edges)[0]
    return hists


def _ordered(s: dict | None) -> dict:
    """A summary in the order ``rows, groups, tokens, prompt_tokens, completion_tokens, reward, ref_share``
    (empty distributions for no rows)."""
    if s is None:
        return {"rows": 0, "groups": 0, **{c: {} for c in DESCRIBED}, "ref_share": 0.0}
    return {"rows": s["rows"], "groups": s["groups"], **{c: s[c] for c in DESCRIBED}, "ref_share": s["ref_share"]}


def summarise(spill: Spill) -> dict:
    """Statistics of the rows in the spill's table ``rows`` (:func:`buffer_stats`): ``{"rows", "all": summary,
    "sources": {source: summary}, "group_sizes": {size: groups}}``, a summary holding ``rows``, ``groups``,
    the ``tokens``/``prompt_tokens``/``completion_tokens``/``reward`` distributions (mean, std with ddof 1 and
    None for one row, min, p50, p95 (linear), max) and ``ref_share``, the share of rows with reference
    statistics."""
    found = _summaries(spill)
    sizes = spill.con.execute(
        f"SELECT size, count(*) FROM (SELECT count(*) AS size FROM {spill.table('rows')} GROUP BY group_id) "
        "GROUP BY size ORDER BY size"
    ).fetchall()
    return {
        "rows": found[None]["rows"] if None in found else 0,
        "all": _ordered(found.get(None)),
        "sources": {name: _ordered(found[name]) for name in sorted(n for n in found if n is not None)},
        "group_sizes": {int(k): int(v) for k, v in sizes},
    }


def buffer_stats(
    path,
    where: str | None = None,
    histograms: bool = False,
    *,
    ids: str | None = None,
    exclude_ids: str | None = None,
) -> tuple[dict, dict | None]:
    """``(statistics, histograms)`` of the buffer at ``path``, or of its rows where ``where`` holds and whose
    ``row_id`` the file ``ids`` lists or ``exclude_ids`` does not list (each condition only when given; the lists as
    ``filter`` reads them, :class:`Selection`, and its warning of the listed ids the buffer lacks) (:func:`summarise`;
    the histograms of :func:`plot_stats`, only with ``histograms``)."""
    listed = row_ids(ids, exclude_ids)
    source = CurationSource(path)
    chosen = Selection(source, Where(where) if where is not None else None, listed)
    with Spill(source.path) as spill:
        _spill_rows(chosen, spill)
        refuse_repeated_ids(spill, "ids", source.path, source.manifest["shards"])  # as validate refuses the buffer
        chosen.warn_of_missing(path)
        stats = summarise(spill)
        return stats, _histograms(spill, stats) if histograms else None


OVERALL = "(all sources)"  # the first column of the table's overall row; no source's label begins with "("


def source_label(name: str) -> str:
    """A source's name in the table of ``shiq-data stats``: as it is, or as a JSON string (quoted, escaped)
    when it could be read as something else: the overall row's label (:data:`OVERALL`, so a source named
    ``(all sources)`` is not the overall row), a quoted name, an empty one, one with space at either end
    (which the column would not show), or one with a character that does not print as itself: a control
    character (which a terminal would act on), a zero-width or direction mark (``web\u200b`` would read as
    ``web``), any space but the ASCII one; those characters are escaped (``\u200b``)."""
    if not name.isprintable():
        return json.dumps(name)
    if not name or name[0] in '("' or name != name.strip():
        return json.dumps(name, ensure_ascii=False)
    return name


def display_width(text: str) -> int:
    """The terminal columns ``text`` takes: two for a wide character (Chinese, Japanese, an emoji), none for a
    mark drawn on the character before it (a combining accent, a Thai vowel or tone mark: categories Mn and
    Me), a format character or an emoji skin-tone modifier (U+1F3FB-U+1F3FF, drawn into the emoji before it),
    one for any other."""

    def width(c: str) -> int:
        if unicodedata.category(c) in ("Mn", "Me", "Cf") or "\U0001f3fb" <= c <= "\U0001f3ff":
            return 0
        return 2 if unicodedata.east_asian_width(c) in "WF" else 1

    return sum(map(width, text))


def format_stats(stats: dict, title: str) -> str:
    """The table ``shiq-data stats`` prints: the overall row (:data:`OVERALL`), then a row per source
    (:func:`source_label`), the first column as wide as the longest label, at least 20, and every other column
    at least as wide as its heading, wider where a value needs it (a buffer of long rows), so columns stay aligned."""
    labels = {name: source_label(name) for name in stats["sources"]}
    heads = ("rows", "groups", "tokens mean/p50/max", "prompt mean", "actions mean/max", "reward mean", "std")
    heads += ("min", "max", "ref")
    widths = [7, 7, 22, 12, 17, 12, 8, 8, 8, 5]

    def cells(s) -> list[str]:
        tk, pr, ac, rw = s["tokens"], s["prompt_tokens"], s["completion_tokens"], s["reward"]
        # a median may fall between two lengths; never in exponent form (1e+06)
        tokens = f"{tk['mean']:.1f}/{tk['p50']:.15g}/{tk['max']:.0f}"
        std = "-" if rw["std"] is None else format(rw["std"], ".3g")
        return [
            *(str(s["rows"]), str(s["groups"]), tokens, f"{pr['mean']:.1f}", f"{ac['mean']:.1f}/{ac['max']:.0f}"),
            *(f"{rw['mean']:.4g}", std, f"{rw['min']:.3g}", f"{rw['max']:.3g}", f"{s['ref_share']:.0%}"),
        ]

    rows = [(OVERALL, cells(stats["all"]))] if stats["rows"] else []
    rows += [(labels[name], cells(s)) for name, s in stats["sources"].items()] if stats["rows"] else []
    widths = [max([wd, *(len(c[i]) for _, c in rows)]) for i, wd in enumerate(widths)]
    w = max([20, *map(display_width, labels.values())])
    lines = [title, f"{'source':<{w}} " + " ".join(f"{h:>{wd}}" for h, wd in zip(heads, widths))]
    for name, c in rows:
        lines.append(f"{name}{' ' * (w - display_width(name))} " + " ".join(f"{x:>{wd}}" for x, wd in zip(c, widths)))
    sizes = ", ".join(f"{k}: {v}" for k, v in stats["group_sizes"].items())
    lines.append(f"group sizes (rows: groups)  {sizes or 'none'}")
    return "\n".join(lines)


def plot_stats(stats: dict, hists: dict, folder) -> list[Path]:
    """Histograms of the lengths and rewards per source (``hists``, :func:`_histograms`) and of the group
    sizes (``stats``) as PNG files in ``folder`` (written atomically); their paths."""
    import matplotlib  # heavy: only --plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: only --plot needs it

    folder = Path(folder)
    written = []
    with files_together(folder) as stage:  # all of them or none: never new histograms beside old ones

        def save(fig, name):
            path = stage / name
            atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
            plt.close(fig)
            written.append(folder / name)

        for column, label in PLOTTED:
            fig, ax = plt.subplots(figsize=(6, 4))
            for name, (counts, edges) in hists[column].items():
                ax.hist(edges[:-1], bins=edges, weights=counts, alpha=0.6, label=name)
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
