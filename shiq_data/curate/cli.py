"""The curation subcommands of ``shiq-data``: show, stats, filter, dedup, decontaminate, split, mix."""

from __future__ import annotations

import sys
from pathlib import Path

from shiq_data.buffer import refuse_inside_buffer
from shiq_data.cli_common import folder_path, int_at_least, plural
from shiq_data.curate.decontaminate import BY as DECON_BY
from shiq_data.curate.decontaminate import MIN_WORDS, NGRAM, decontaminate_buffer
from shiq_data.curate.dedup import BY as DEDUP_BY
from shiq_data.curate.dedup import dedup_buffer
from shiq_data.curate.filter import filter_buffer
from shiq_data.curate.mix import SEED_LIMIT, mix_buffers, parse_spec
from shiq_data.curate.show import show_rows
from shiq_data.curate.split import BY as SPLIT_BY
from shiq_data.curate.split import split_buffer
from shiq_data.curate.stats import buffer_stats, format_stats, plot_stats
from shiq_data.curate.where import shown

IDS_FILE_HELP = (
    "FILE: UTF-8 text, one row_id a line ('-': standard input); a line's end (\\n, \\r\\n or \\r) is not part of "
    "the id, nor a byte-order mark opening the file, nothing else is stripped; a duplicate line is harmless; a blank "
    "line, a line that is not UTF-8 and a file that lists no id are refused, naming the file and line. Listed ids "
    "that no row of BUFFER has are counted in a warning."
)
WHERE_HELP = (
    "SQL boolean expression over the row's columns, evaluated by DuckDB (no subqueries, no file access): "
    "row_id, source, group_id, tokens (count), prompt_tokens, completion_tokens (action tokens), reward "
    "(the scalar reward as given, else the sum of the per-token rewards), has_ref, prompt, completion "
    "(text as given, else decoded), turn_rewards, extra and the top-level keys of extra (a key whose values "
    "are of mixed kinds, or nested, reads as JSON text: the string 4 is '\"4\"'); "
    "e.g. \"reward > 0 AND source = 'hh'\""
)


def _removed(counts: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "none"


def _which(args, before_where: str = " ") -> str:
    """The rows a verb's --ids, --exclude-ids and --where chose, as its summary names them (``before_where``: what
    goes before "where")."""
    which = f" listed in {args.ids}" if args.ids is not None else ""
    which += f" not listed in {args.exclude_ids}" if args.exclude_ids is not None else ""
    return which + (f"{before_where}where {shown(args.where)}" if args.where is not None else "")


def cmd_show(args) -> int:
    blocks = show_rows(
        args.buffer, rows=args.rows, row_id=args.id, where=args.where, ids=args.ids, exclude_ids=args.exclude_ids
    )
    for block in blocks:
        print(block + "\n")
    if not blocks:
        print(f"shiq-data: no row of {args.buffer} to show{_which(args)}")
    return 0


def cmd_stats(args) -> int:
    if args.plot:
        refuse_inside_buffer(args.plot, "--plot", itself=True)
        if Path(args.plot).exists() and not Path(args.plot).is_dir():
            raise ValueError(f"--plot {args.plot} is a file: give a folder for the histograms")
    stats, hists = buffer_stats(
        args.buffer, args.where, histograms=bool(args.plot), ids=args.ids, exclude_ids=args.exclude_ids
    )
    where = _which(args, before_where=", ")
    print(format_stats(stats, f"shiq-data: stats of {args.buffer} ({plural(stats['rows'], 'row')}{where})"))
    if args.plot and not stats["rows"]:  # empty histograms (and matplotlib's warnings about them): none written
        print(f"shiq-data: no rows{where}: no histograms written to {args.plot}")
    elif args.plot:
        try:
            paths = plot_stats(stats, hists, args.plot)
        except OSError as e:  # (no permission, a read-only file system, a full disk): named, not the bare OS error
            raise ValueError(f"--plot {args.plot}: cannot write the histograms ({e.strerror or e})") from None
        print(f"shiq-data: wrote {', '.join(str(p) for p in paths)}")
    return 0


def cmd_filter(args) -> int:
    _, kept, read = filter_buffer(
        args.buffer,
        args.out,
        args.where,
        ids=args.ids,
        exclude_ids=args.exclude_ids,
        command=args.argv,
        progress=not args.no_progress,
    )
    print(f"shiq-data: filtered {args.buffer} into {args.out}: kept {kept} of {plural(read, 'row')}{_which(args)}")
    return 0


DEDUP_THRESHOLD = 0.8  # --near's default Jaccard threshold


def cmd_dedup(args) -> int:
    if args.threshold is not None and not args.near:  # it would be ignored: exact deduplication has none
        raise ValueError(f"--threshold {args.threshold:g} applies to near duplicates: add --near, or leave it out")
    if args.threshold is None:
        args.threshold = DEDUP_THRESHOLD
    _, c = dedup_buffer(
        args.buffer,
        args.out,
        by=args.by,
        near=args.near,
        threshold=args.threshold,
        command=args.argv,
        progress=not args.no_progress,
    )
    mode = f"near duplicates (threshold {args.threshold})" if args.near else "exact duplicates"
    print(
        f"shiq-data: deduplicated {args.buffer} into {args.out} by {args.by}, {mode}: kept {c['rows_kept']} of "
        f"{plural(c['rows_read'], 'row')}; removed per source: {_removed(c['removed'])}"
    )
    return 0


def cmd_decontaminate(args) -> int:
    _, c = decontaminate_buffer(
        args.buffer,
        args.out,
        args.against,
        by=args.by,
        field=args.field,
        against_by=args.against_by,
        ngram=args.ngram,
        min_words=args.min_words,
        dropped=args.dropped,
        command=args.argv,
        progress=not args.no_progress,
    )
    short = c["evaluation_texts_too_short"]
    skipped = f"; {plural(short, 'text')} under {plural(c['min_words'], 'word')} skipped" if short else ""
    listed = f"; the dropped rows are listed in {args.dropped}" if args.dropped else ""
    print(
        f"shiq-data: decontaminated {args.buffer} into {args.out} by {args.by} against "
        f"{plural(c['evaluation_texts'], 'evaluation text')} (runs of {plural(args.ngram, 'word')}{skipped}): kept "
        f"{c['rows_kept']} of {plural(c['rows_read'], 'row')}; removed per source: {_removed(c['removed'])}; "
        f"{c['evaluation_texts_matched']} of the evaluation texts found in the buffer{listed}"
    )
    return 0


def cmd_split(args) -> int:
    r = split_buffer(
        args.buffer,
        args.out,
        test_fraction=args.test_fraction,
        by=args.by,
        seed=args.seed,
        command=args.argv,
        progress=not args.no_progress,
    )
    print(
        f"shiq-data: split {args.buffer} by {args.by} (seed {args.seed}): {args.out}/train {plural(r['train'], 'row')} "
        f"({plural(r['units']['train'], args.by)}), {args.out}/test {plural(r['test'], 'row')} "
        f"({plural(r['units']['test'], args.by)})"
    )
    return 0


MIX_INPUTS_INLINE = 4  # mix's summary names up to this many inputs in its line, more on a line each


def cmd_mix(args) -> int:
    buf, c = mix_buffers(
        args.inputs,
        args.out,
        rows=args.rows,
        replacement=args.replacement,
        seed=args.seed,
        command=args.argv,
        progress=not args.no_progress,
    )
    parts = [
        f"{path} x{weight:g}: {plural(r, 'row')} ({plural(g, 'group')})"
        for (path, weight), r, g in zip(map(parse_spec, args.inputs), c["rows_per_input"], c["groups_per_input"])
    ]
    note = "; reference statistics dropped (not every input has them from one model)" if c["ref_stats_dropped"] else ""
    if len(parts) <= MIX_INPUTS_INLINE:
        print(f"shiq-data: mixed into {args.out}: {plural(len(buf), 'row')} ({', '.join(parts)}){note}")
    else:  # one line each rather than a line of every input
        print(f"shiq-data: mixed into {args.out}: {plural(len(buf), 'row')} from {len(parts)} inputs{note}:")
        print("".join(f"  {part}\n" for part in parts), end="")
    if pairs := c["pairs_in_several_inputs"]:
        print(
            f"shiq-data: warning: {pairs} prompt-completion pair{'' if pairs == 1 else 's'} came from more than one "
            "input (inputs that share rows: one curated from another, or a buffer given twice), so the mix holds "
            "them more than once",
            file=sys.stderr,
        )
    return 0


def add_commands(sub) -> None:
    """Add show, stats, filter, dedup, decontaminate, split and mix to the ``shiq-data`` subparsers ``sub``."""

    def out_options(p, what="new buffer folder (must not exist)"):
        p.add_argument("--out", required=True, type=folder_path, metavar="DIR", help=what)
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def ids_options(p):
        p.add_argument("--ids", default=None, metavar="FILE", help="keep only the rows whose row_id FILE lists")
        p.add_argument("--exclude-ids", default=None, metavar="FILE", help="drop the rows whose row_id FILE lists")

    s = sub.add_parser(
        "show",
        help="print rows decoded, action spans and rewards marked",
        description="Print rows decoded with the buffer's tokenizer: action tokens inside ⟦ ⟧, each nonzero "
        "per-token reward as ⟨r=...⟩ after the token it sits on. The data's control characters and bidirectional "
        "marks, embeddings, overrides and isolates are printed escaped (\\x1b, \\u202e); line breaks and tabs are kept. "
        "The rows shown are those where EXPR is true and whose row_id FILE lists (--ids) or does not list "
        "(--exclude-ids), each condition only when given (--ids and --exclude-ids not together, nor with --id), in "
        f"buffer order. {IDS_FILE_HELP}",
    )
    s.add_argument("buffer", metavar="BUFFER")
    which = s.add_mutually_exclusive_group()
    which.add_argument(
        "--rows", type=int_at_least(1), default=5, metavar="N", help="how many rows (default %(default)s)"
    )
    which.add_argument(
        "--id", default=None, metavar="ID", help="the row with this row_id (refused when the buffer holds it twice)"
    )
    s.add_argument("--where", default=None, metavar="EXPR", help=WHERE_HELP)
    ids_options(s)
    s.set_defaults(func=cmd_show)

    st = sub.add_parser(
        "stats",
        help="counts, length and reward distributions, group sizes",
        description="Counts, length and reward distributions per source and overall, group sizes and the "
        "share of rows with reference statistics: of every row, or of the rows where EXPR is true and whose row_id "
        "FILE lists (--ids) or does not list (--exclude-ids), each condition only when given (--ids and "
        f"--exclude-ids not together). {IDS_FILE_HELP}",
    )
    st.add_argument("buffer", metavar="BUFFER")
    st.add_argument("--where", default=None, metavar="EXPR", help=WHERE_HELP)
    ids_options(st)
    st.add_argument(
        "--plot", type=folder_path, default=None, metavar="DIR", help="also write histograms as PNG files into DIR"
    )
    st.set_defaults(func=cmd_stats)

    f = sub.add_parser(
        "filter",
        help="keep the rows where an expression holds, or whose row ids a file lists",
        description="Write the rows of BUFFER where EXPR is true (NULL counts as false), whose row_id FILE lists "
        "(--ids) or does not list (--exclude-ids), as a new buffer: a row is kept when every condition given holds "
        f"(at least one given; --ids and --exclude-ids not together). {IDS_FILE_HELP} The manifest records the file's "
        "name, SHA-256 and id count under curation, not the ids.",
    )
    f.add_argument("buffer", metavar="BUFFER")
    f.add_argument("--where", default=None, metavar="EXPR", help=WHERE_HELP)
    ids_options(f)
    out_options(f)
    f.set_defaults(func=cmd_filter)

    d = sub.add_parser(
        "dedup",
        help="drop duplicate rows (exact or near)",
        description="Drop rows whose text (prompt, completion or both; Unicode NFKC, lower-cased, white space "
        "collapsed) "
        "repeats an earlier row's, keeping the first. The text is the row's text as given, else its decoded "
        "prompt and action tokens. --near also drops rows whose character 5-grams have an estimated "
        "Jaccard similarity of at least --threshold with a kept row (MinHash LSH).",
    )
    d.add_argument("buffer", metavar="BUFFER")
    d.add_argument("--by", choices=DEDUP_BY, default="row", help="text compared (default %(default)s)")
    d.add_argument("--near", action="store_true", help="also drop near duplicates (MinHash LSH)")
    d.add_argument(
        "--threshold",
        type=float,
        default=None,
        metavar="T",
        help=f"Jaccard threshold, with --near only (default {DEDUP_THRESHOLD})",
    )
    out_options(d)
    d.set_defaults(func=cmd_dedup)

    dc = sub.add_parser(
        "decontaminate",
        help="drop rows that share a run of words with an evaluation set",
        description="Drop the rows of BUFFER whose text (--by) holds a run of --ngram consecutive words that also "
        "stands in an evaluation text (words: Unicode NFKC, case-folded, so Straße matches strasse; runs of letters, "
        "digits and _ with their combining "
        "marks; other characters only "
        "separate them; chat messages by their text). An evaluation text shorter than --ngram words counts whole "
        "from --min-words words; shorter ones are skipped. Evaluation texts: JSON lines (a string or an object "
        "whose --field holds a string or chat messages, such as BFCL's question), a JSON list of them, a .txt "
        "file (a text a line) or a buffer folder (its --against-by text).",
        epilog="example: shiq-data decontaminate buffers/train --against eval/prompts.jsonl buffers/test "
        "--dropped dropped.jsonl --out buffers/train-clean",
    )
    dc.add_argument("buffer", metavar="BUFFER")
    dc.add_argument(
        "--against", nargs="+", required=True, metavar="FILE", help="evaluation texts: files or buffer folders"
    )
    dc.add_argument("--by", choices=DECON_BY, default="row", help="the buffer's text searched (default %(default)s)")
    dc.add_argument(
        "--field",
        default="prompt",
        metavar="KEY",
        help="the key of a JSON object holding its text (default %(default)s)",
    )
    dc.add_argument(
        "--against-by", choices=DECON_BY, default="prompt", help="an evaluation buffer's text (default %(default)s)"
    )
    dc.add_argument(
        "--ngram", type=int_at_least(1), default=NGRAM, metavar="N", help="words in a run (default %(default)s)"
    )
    dc.add_argument(
        "--min-words",
        type=int_at_least(1),
        default=None,
        metavar="M",
        help=f"shortest evaluation text that counts, in words (default {MIN_WORDS}, or --ngram when that is fewer)",
    )
    dc.add_argument(
        "--dropped", default=None, metavar="FILE", help="write each dropped row's id, source and matching words here"
    )
    out_options(dc)
    dc.set_defaults(func=cmd_decontaminate)

    sp = sub.add_parser(
        "split",
        help="split into train and test buffers with no shared group or prompt",
        description="Write DIR/train and DIR/test. Groups (or prompts) are shuffled with the seed and the test "
        "side takes them until it holds the test fraction of the rows; none is on both sides.",
    )
    sp.add_argument("buffer", metavar="BUFFER")
    sp.add_argument("--test-fraction", type=float, required=True, metavar="F", help="share of rows for test")
    sp.add_argument("--by", choices=SPLIT_BY, default="group", help="unit kept on one side (default %(default)s)")
    sp.add_argument("--seed", type=int_at_least(0), default=0, metavar="S", help="shuffle seed (default %(default)s)")
    out_options(sp, "new folder for the train and test buffers (must not exist)")
    sp.set_defaults(func=cmd_split)

    m = sub.add_parser(
        "mix",
        help="sample whole groups from several buffers by weight",
        description="Sample whole prompt groups from each BUFFER in proportion to its WEIGHT into a new buffer; "
        "group ids are made unique across inputs. The buffers must share a tokenizer. Without --rows the "
        "mix is as large as the inputs allow without replacement.",
    )
    m.add_argument("inputs", nargs="+", metavar="BUFFER:WEIGHT")
    m.add_argument(
        "--rows", type=int_at_least(1), default=None, metavar="N", help="rows in the mix (about: groups stay whole)"
    )
    m.add_argument("--replacement", action="store_true", help="draw groups with replacement")
    m.add_argument(
        "--seed",
        type=int_at_least(0, SEED_LIMIT - 1),
        default=0,
        metavar="S",
        help="sampling seed (default %(default)s)",
    )
    out_options(m)
    m.set_defaults(func=cmd_mix)
