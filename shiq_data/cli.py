"""``shiq-data``: build, extend, check and describe replay buffers (also ``python -m shiq_data``).

Input formats are the registry :data:`shiq_data.readers.FORMATS` (name -> reader and the ``--option``
names it takes). Reference statistics are added by ``shiq-train ref-stats``, which runs a model.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

from shiq_data.buffer import (
    DEFAULT_SHARD_BYTES,
    DEFAULT_SHARD_ROWS,
    MANIFEST,
    MIB,
    append_buffer,
    has_text_columns,
    read_manifest,
    refuse_inside_buffer,
    shard_bytes_of,
    shard_rows_of,
    write_buffer,
)
from shiq_data.chat import SYSTEM_PROMPT_SETTINGS, set_system_prompt
from shiq_data.cli_common import (
    PROCESSES_MAX,
    ArgumentParser,
    add_log_level_option,
    folder_path,
    int_at_least,
    log_level,
    on_sigterm,
    plural,
    run_command,
    setup_logging,
)
from shiq_data.curate.cli import add_commands as add_curate_commands
from shiq_data.export import DATA_FILE, EXPORT_FORMATS, export_buffer
from shiq_data.io import one_line, printable
from shiq_data.readers import FORMATS, get_format
from shiq_data.readers.parallel import parallel_rows
from shiq_data.retokenize import retokenize_buffer
from shiq_data.tokenizers import CHAT_TEMPLATE_FIELD, PIPELINE_FIELD, load_tokenizer, template_mismatch
from shiq_data.validate import validate_buffer

log = logging.getLogger(__name__)

EPILOG = """examples:
  shiq-data build jsonl rows.jsonl --tokenizer gpt2 --out buffers/demo
  shiq-data build jsonl big.jsonl --tokenizer gpt2 --workers 4 --out buffers/big
  shiq-data append buffers/demo parquet more.parquet
  shiq-data validate buffers/demo
  shiq-data info buffers/demo
  shiq-data filter buffers/demo --where "reward > 0" --out buffers/positive
  shiq-data retokenize buffers/demo --tokenizer smollm2 --out buffers/demo-smollm2
  shiq-data export buffers/demo --format parquet --out shared/demo

a generic input record is {"prompt": str, "completion": str, "reward": number, "group": optional};
records with the same prompt text (or the same "group") are completions of one prompt. A completion
may be chat messages [{"role": ..., "content": ...}, ...] (the prompt a string or messages): the row
then goes through the tokenizer's chat template (e.g. --tokenizer smollm2), the completion's assistant
turns are the actions and the reward sits on the last one. Also read: TRL's {"prompt", "chosen",
"rejected"} pairs (rewards +1/-1 in one group) and {"prompt", "completion", "label"} (label true/false
gives +1/-1), other field names with --option prompt_field=... completion_field=... reward_field=...,
and the files shiq-data export writes. Rows keep their text (prompt, completion, reward, turn_rewards,
extra columns) unless --no-text."""


def _parse_options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings -> dict; values are parsed as JSON when they can be (numbers, true, lists)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {pair!r}: expected KEY=VALUE")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def _key_value(text: str) -> str:
    """An ``--option`` value: ``KEY=VALUE``, else a one-line argparse error. ``--option`` takes several values,
    so the input file written after them is read as one; the error says so."""
    if not text.partition("=")[0] or "=" not in text:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not KEY=VALUE (--option reads every value up to the next flag: write FORMAT and INPUT "
            "before --option)"
        )
    return text


def _source(text: str) -> str:
    """A ``--source`` value: a name that curation verbs can select by, so not empty."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name the rows' source, got an empty string")
    return text


def _input_format(text: str) -> str:
    """An argparse ``type`` for FORMAT: a registered input format. A path in its place (FORMAT left out: argparse
    took the input for it and asked for INPUT) is named with the order the command takes."""
    if text not in FORMATS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an input format ({', '.join(sorted(FORMATS))}): give FORMAT, then INPUT "
            "(e.g. jsonl data.jsonl)"
        )
    return text


SHARD_MIB_MAX = 2**43  # 2**63 bytes: what a manifest's count may hold
SHARD_ROWS_MAX = 2**63 - 1  # what a manifest's count may hold (a larger one wrote a buffer no command could read)


def _shard_mib(text: str) -> int:
    """A ``--shard-mib`` value: a number of MiB > 0 (fractions allowed), as bytes (rounded up)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of MiB, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number > 0 (MiB; fractions allowed), got {text}")
    if value >= SHARD_MIB_MAX:
        raise argparse.ArgumentTypeError(f"must be below 2**43 MiB (2**63 bytes), got {text}")
    return math.ceil(value * MIB)


def _shard_size_options(p, default_rows: int | None) -> None:
    """``--shard-rows`` and ``--shard-mib`` on ``p``: defaults for a new buffer, or (None) the buffer's own."""
    new = default_rows is not None
    theirs = "default: the buffer's, as it was built"
    p.add_argument(
        "--shard-rows",
        type=int_at_least(1, SHARD_ROWS_MAX),
        default=default_rows,
        metavar="N",
        help=f"rows a shard holds at most ({f'default {default_rows}' if new else theirs})",
    )
    p.add_argument(
        "--shard-mib",
        type=_shard_mib,
        dest="shard_bytes",
        default=DEFAULT_SHARD_BYTES if new else None,
        metavar="N",
        help="a shard ends at --shard-rows rows or at N MiB of Arrow data (its file's size), whichever comes first; "
        "a row larger than that is a shard alone. Curation commands read a shard at a time, so this bounds their "
        f"memory on long rows ({f'default {DEFAULT_SHARD_BYTES // MIB}' if new else theirs}; fractions allowed, "
        "e.g. 0.5)",
    )


def _rows(fmt: str, path: str, tokenizer, info: dict, args) -> Iterator[dict]:
    form = get_format(fmt)
    options = _parse_options(args.option)
    form.check_options(options)
    if args.source is not None:
        options["source"] = args.source
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if args.workers > PROCESSES_MAX:  # (a number past a C int ended in Python's OverflowError, naming no option)
        raise ValueError(f"--workers must be at most {PROCESSES_MAX} (processes started at once), got {args.workers}")
    if args.workers > 1:
        return parallel_rows(form, path, tokenizer, options, args.workers, vocab_size=info["vocab_size"])
    return form.read(path, tokenizer, **options)


def _summary(buf) -> str:
    m = buf.manifest
    return (
        f"{plural(m['rows'], 'row')}, {plural(m['tokens'], 'token')} ({plural(m['action_tokens'], 'action token')}), "
        f"{plural(len(m['shards']), 'shard')}"
    )


def _system_prompt(tokenizer, info: dict, setting: str) -> None:
    """Apply ``--system-prompt`` to ``tokenizer`` and record it in the manifest's tokenizer entry."""
    info["system_prompt"] = {"setting": setting, "text": set_system_prompt(tokenizer, setting)}


def cmd_build(args) -> int:
    if Path(args.out).exists():
        raise FileExistsError(f"--out {args.out} already exists; choose a new folder or use 'shiq-data append'")
    refuse_inside_buffer(args.out)
    tokenizer, info = load_tokenizer(args.tokenizer)
    _system_prompt(tokenizer, info, args.system_prompt)
    rows = _rows(args.format, args.input, tokenizer, info, args)
    buf = write_buffer(
        rows,
        args.out,
        tokenizer_info=info,
        command=args.argv,
        shard_rows=args.shard_rows,
        shard_bytes=args.shard_bytes,
        progress=not args.no_progress,
        input_name=args.input,
        text_columns=False if args.no_text else None,
    )
    print(f"shiq-data: built {args.out}: {_summary(buf)}")
    return 0


def cmd_append(args) -> int:
    manifest = read_manifest(args.buffer)
    name = args.tokenizer or manifest["tokenizer"]["name"]
    try:
        tokenizer, info = load_tokenizer(name)
    except (OSError, ValueError) as e:  # a missing folder, or one transformers cannot read
        where = (
            f"--tokenizer {name}"
            if args.tokenizer
            else f"{Path(args.buffer) / MANIFEST}: field 'tokenizer.name' {name!r}"
        )
        hint = "" if args.tokenizer else ": pass --tokenizer"
        raise ValueError(f"{where}: cannot be loaded ({one_line(e, 160)}){hint}") from None
    if info["fingerprint"] != manifest["tokenizer"]["fingerprint"]:  # before its settings are compared
        raise ValueError(
            f"{Path(args.buffer) / MANIFEST}: tokenizer mismatch: the buffer was built with "
            f"{manifest['tokenizer']['name']!r}, --tokenizer {name!r} has another vocabulary (fingerprint "
            f"{info['fingerprint'][:12]}… against {manifest['tokenizer']['fingerprint'][:12]}…)"
        )
    if info["vocab_size"] != manifest["tokenizer"]["vocab_size"]:  # the same tokenizer: the manifest was edited
        raise ValueError(
            f"{Path(args.buffer) / MANIFEST}: field 'tokenizer.vocab_size' is {manifest['tokenizer']['vocab_size']}, but "
            f"its tokenizer {name!r} (the same fingerprint) has {info['vocab_size']} tokens: the manifest was edited"
        )
    # Buffers from before the setting was recorded were rendered with the template's default.
    recorded = manifest["tokenizer"].get("system_prompt") or info["system_prompt"]
    _system_prompt(tokenizer, info, recorded["setting"] if args.system_prompt is None else args.system_prompt)
    if info["system_prompt"]["text"] != recorded.get("text"):
        raise ValueError(
            f"--system-prompt: the buffer's rows were rendered with system prompt {recorded.get('text')!r}, "
            f"these would get {info['system_prompt']['text']!r}; omit --system-prompt to use the buffer's"
        )
    _guard_chat_template(tokenizer, info, manifest, args.buffer)
    rows = _rows(args.format, args.input, tokenizer, info, args)
    buf = append_buffer(
        args.buffer,
        rows,
        command=args.argv,
        tokenizer_info=info,
        shard_rows=args.shard_rows,
        shard_bytes=args.shard_bytes,
        progress=not args.no_progress,
        input_name=args.input,
        text_columns=not args.no_text,
        refuse_duplicates=args.no_duplicates,
    )
    print(f"shiq-data: appended {args.input} to {args.buffer}: now {_summary(buf)}")
    repeated = buf.manifest["commands"][-1].get("duplicates", 0)
    if repeated:
        log.warning(
            f"shiq-data: warning: {repeated} appended row(s) repeat the prompt and completion text of rows already "
            f"in {args.buffer} (was this input appended before? --no-duplicates refuses them)"
        )
    return 0


def _guard_chat_template(tokenizer, info: dict, manifest: dict, buffer) -> None:
    """Refuse, at the first row rendered through the chat template, a tokenizer whose template differs from the
    one the buffer's rows were rendered with (``tokenizer.chat_template_fingerprint``; rows of plain text
    never go through it, and buffers written before the field existed record none)."""
    have = manifest["tokenizer"]
    if not template_mismatch(have, info):
        return
    where = f"{Path(buffer) / MANIFEST}: field 'tokenizer.{CHAT_TEMPLATE_FIELD}': "
    if have[CHAT_TEMPLATE_FIELD] is None:  # a buffer of plain text rows: none went through a template
        message = (
            f"{where}the buffer's tokenizer {have['name']!r} has no chat template, so its rows are plain text; "
            f"these would go through {info['name']!r}'s ({_short(info[CHAT_TEMPLATE_FIELD])}); build a new buffer"
        )
    else:
        message = (
            f"{where}the buffer's rows were rendered through the chat template of {have['name']!r} "
            f"({_short(have[CHAT_TEMPLATE_FIELD])}), these would go through {info['name']!r}'s "
            f"({_short(info[CHAT_TEMPLATE_FIELD])}): the same vocabulary, another layout of the turns; append with "
            "the buffer's tokenizer, or build a new buffer"
        )

    # a template that refuses to render (a string: it reaches --workers processes with the tokenizer)
    tokenizer.chat_template = "{{ raise_exception(" + json.dumps(message, ensure_ascii=False) + ") }}"


def _short(template_fingerprint: str | None) -> str:
    return "no template" if template_fingerprint is None else f"fingerprint {template_fingerprint[:12]}…"


def cmd_retokenize(args) -> int:
    if Path(args.out).exists():
        raise FileExistsError(f"--out {args.out} already exists; choose a new folder")
    refuse_inside_buffer(args.out)
    parent = read_manifest(args.buffer)  # a clear error before loading a tokenizer
    tokenizer, info = load_tokenizer(args.tokenizer)
    setting = (parent["tokenizer"].get("system_prompt") or {}).get("setting", "template")
    _system_prompt(tokenizer, info, setting if args.system_prompt is None else args.system_prompt)
    buf = retokenize_buffer(
        args.buffer,
        args.out,
        tokenizer,
        info,
        command=args.argv,
        shard_rows=args.shard_rows,
        shard_bytes=args.shard_bytes,
        progress=not args.no_progress,
    )
    print(f"shiq-data: retokenized {args.buffer} with {info['name']} into {args.out}: {_summary(buf)}")
    return 0


def cmd_export(args) -> int:
    buf = export_buffer(args.buffer, args.out, args.format, progress=not args.no_progress)
    where = Path(args.out) / DATA_FILE[args.format] if args.format in DATA_FILE else Path(args.out)
    print(
        f"shiq-data: exported {args.buffer} ({_summary(buf)}) as {args.format} to {where}, card {Path(args.out) / 'README.md'}"
    )
    return 0


def cmd_validate(args) -> int:
    report = validate_buffer(args.buffer, cleanup=not args.no_cleanup, progress=not args.no_progress)
    removed = f"; removed {plural(len(report['removed_files']), 'unlisted file')}" if report["removed_files"] else ""
    if report["cleanup_skipped"]:
        removed = f"; cleanup skipped: {report['cleanup_skipped']}"
    print(
        f"shiq-data: {args.buffer} is valid: {plural(report['rows'], 'row')}, {plural(report['tokens'], 'token')}, "
        f"{plural(report['groups'], 'group')}, {plural(report['shards'], 'shard')}, reference statistics: "
        f"{'yes' if report['has_ref_stats'] else 'no'}{removed}"
    )
    return 0


def _template_summary(tok: dict) -> str:
    if CHAT_TEMPLATE_FIELD not in tok:
        return "not recorded"
    return "none" if tok[CHAT_TEMPLATE_FIELD] is None else tok[CHAT_TEMPLATE_FIELD][:16]


def _system_summary(tok: dict) -> str:
    system = tok.get("system_prompt")
    if system is None:
        return "not recorded (the chat template's default)"
    text = "no system turn" if system.get("text") is None else repr(system["text"])
    return f"{text}  (--system-prompt {system['setting'] if system['setting'] in SYSTEM_PROMPT_SETTINGS else 'TEXT'})"


def _shard_bound(m: dict) -> str:
    """The rows and bytes a shard of the buffer holds at most, as an append or a curated buffer takes them
    (:func:`shard_rows_of`, :func:`shard_bytes_of`), for ``info``'s summary; a bound the manifest does not record
    (a buffer written before it was kept) is said to be inferred."""
    rows, size = shard_rows_of(m), shard_bytes_of(m)
    mib = f"{size // MIB:,}" if size % MIB == 0 else f"{size / MIB:.6g}"
    missing = [k for k in ("shard_rows", "shard_bytes") if k not in m]
    return f"bound {rows:,} rows or {mib} MiB" + (
        f", {' and '.join(missing)} not recorded: inferred" if missing else ""
    )


def cmd_info(args) -> int:
    m = read_manifest(args.buffer)
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    tok = m["tokenizer"]
    with_ref = sum(s["has_ref"] for s in m["shards"])
    # the manifest's texts are data: their control characters are printed escaped (printable), not sent to the
    # terminal (an escape sequence in a tokenizer name or a recorded argument could rewrite the screen)
    print(
        f"buffer      {args.buffer}\n"
        f"rows        {m['rows']}  (groups: next id {m['next_group_id']})\n"
        f"tokens      {m['tokens']}  (action tokens {m.get('action_tokens', '?')})\n"
        f"shards      {len(m['shards'])}  ({sum(s.get('bytes', 0) for s in m['shards']) / 1e6:.1f} MB; {_shard_bound(m)})\n"
        f"tokenizer   {printable(tok['name'])}  vocab {tok['vocab_size']}  fingerprint {tok['fingerprint'][:16]}"
        f"  pipeline {(tok.get(PIPELINE_FIELD) or 'not recorded')[:16]}"
        f"  chat template {printable(_template_summary(tok))}\n"
        f"system      {printable(_system_summary(tok))}\n"
        f"schema      version {m['schema_version']}, text columns {'yes' if has_text_columns(m) else 'no'}\n"
        f"ref stats   {with_ref}/{len(m['shards'])} shards"
        + (f"  ({printable(m['ref_model'])})" if m.get("ref_model") else "")
        + f"\ncreated     {printable(m.get('created'))}  updated {printable(m.get('updated'))}"
    )
    for c in m.get("commands", []):
        argv = c.get("argv", [])  # quoted as a shell reads it, so the line can be run again
        print(printable(f"command     {c.get('time')}  +{c.get('rows')} rows  {shlex.join(map(str, argv))}"))
    parents = m.get("parents")
    for p in parents if isinstance(parents, list) else []:  # a curated buffer's inputs, when it was written
        if isinstance(p, dict):
            p = f"{p.get('path')}  ({p.get('rows')} rows, manifest sha256 {str(p.get('manifest_sha256'))[:16]})"
        print(printable(f"parent      {p}"))
    if m.get("curation") is not None:  # what the curating verb did (its own keys: see the verb's --help)
        print(printable(f"curation    {json.dumps(m['curation'], ensure_ascii=False)}"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="shiq-data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Token-aligned replay buffers for ShiQ: Arrow stream shards plus a JSON manifest, "
        "written atomically (a failed build leaves nothing; a failed append leaves the old buffer).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    formats = sorted(FORMATS)

    def input_options(p):
        p.add_argument(
            "--source",
            default=None,
            type=_source,
            help="value of the 'source' column (default: a generic record's own 'source' field, else the input's "
            "file name, as 'FORMAT:NAME' for hh, ultrafeedback and multiturn)",
        )
        p.add_argument(
            "--option",
            action="extend",
            nargs="+",
            type=_key_value,
            default=[],
            metavar="KEY=VALUE",
            help="options passed to a format reader: one or more after each --option, which may be repeated "
            "(values parsed as JSON when possible)",
        )
        p.add_argument(
            "--workers",
            type=int,
            default=1,
            metavar="N",
            help=f"tokenise with N processes (default %(default)s, at most {PROCESSES_MAX}); the buffer is the same as with one",
        )
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument(
            "--no-text",
            action="store_true",
            help="write the token columns only, not the text columns (prompt, completion, reward, turn_rewards, "
            "extra); such a buffer cannot be retokenized or exported as JSONL",
        )

    system_help = (
        "the system turn given to chat conversations that have none: 'template' keeps the chat template's own "
        "default (SmolLM2's template adds 'You are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face'), 'off' gives an empty system turn instead, any other text is used as the system prompt; "
        "conversations with a system turn are unchanged; the manifest records the setting and the text"
    )

    b = sub.add_parser(
        "build",
        help="build a new buffer from an input file",
        description="Tokenise INPUT and write a new buffer at --out (refuses an existing folder).",
    )
    b.add_argument("format", metavar="FORMAT", type=_input_format, help=f"input format: {', '.join(formats)}")
    b.add_argument("input", metavar="INPUT", help="input file or folder")
    b.add_argument("--tokenizer", required=True, help="gpt2, smollm2, or a local Hugging Face tokenizer folder")
    b.add_argument("--out", required=True, type=folder_path, metavar="DIR", help="buffer folder to create")
    _shard_size_options(b, DEFAULT_SHARD_ROWS)
    b.add_argument("--system-prompt", default="template", metavar="template|off|TEXT", help=system_help)
    input_options(b)
    b.set_defaults(func=cmd_build)

    a = sub.add_parser(
        "append",
        help="add the rows of an input file to a buffer as new shards",
        description="Tokenise INPUT with the buffer's tokenizer and add it as new shards; the old "
        "shards are not touched and the manifest is replaced atomically at the end.",
    )
    a.add_argument("buffer", metavar="BUFFER", help="existing buffer folder")
    a.add_argument("format", metavar="FORMAT", type=_input_format, help=f"input format: {', '.join(formats)}")
    a.add_argument("input", metavar="INPUT", help="input file or folder")
    a.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer to load (default: the one the manifest names); its fingerprint (and pipeline fingerprint, "
        "when the manifest records one) must match the buffer's, and so must its chat template for rows that "
        "go through one",
    )
    _shard_size_options(a, None)
    a.add_argument(
        "--system-prompt",
        default=None,
        metavar="template|off|TEXT",
        help="as for build (default: the setting the manifest records); must give the buffer's system text",
    )
    a.add_argument(
        "--no-duplicates",
        action="store_true",
        help="refuse rows whose prompt and completion text a row of the buffer has already (default: warn)",
    )
    input_options(a)
    a.set_defaults(func=cmd_append)

    r = sub.add_parser(
        "retokenize",
        help="the same rows for another tokenizer, from the buffer's text columns",
        description="Tokenise the text columns of BUFFER again with --tokenizer into a new buffer at --out: "
        "row ids, groups, sources and text are kept, reference statistics dropped; the manifest records "
        "the parent buffer (retokenized_from).",
    )
    r.add_argument("buffer", metavar="BUFFER", help="buffer folder with text columns")
    r.add_argument("--tokenizer", required=True, help="gpt2, smollm2, or a local Hugging Face tokenizer folder")
    r.add_argument("--out", required=True, type=folder_path, metavar="DIR", help="buffer folder to create")
    _shard_size_options(r, None)
    r.add_argument(
        "--system-prompt",
        default=None,
        metavar="template|off|TEXT",
        help="as for build (default: the setting the buffer's manifest records)",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_retokenize)

    e = sub.add_parser(
        "export",
        help="write a buffer as a shareable dataset folder (hf, parquet or jsonl)",
        description="Write BUFFER's rows to a new folder --out with a dataset card README.md: hf is a "
        "datasets folder (datasets.load_from_disk), parquet a data.parquet file, jsonl a data.jsonl of "
        "prompt, completion, reward, group, source and the input's other fields. shiq-data build reads "
        "each back (formats datasets, parquet, jsonl). Reference statistics are not exported.",
    )
    e.add_argument("buffer", metavar="BUFFER")
    e.add_argument("--out", required=True, type=folder_path, metavar="DIR", help="folder to create")
    e.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="hf, parquet or jsonl")
    e.add_argument("--no-progress", action="store_true", help="no progress bar (the hf format's)")
    e.set_defaults(func=cmd_export)

    v = sub.add_parser(
        "validate",
        help="check manifest, checksums, schema and every row",
        description="Check BUFFER completely; exits non-zero naming the file, row and field of the "
        "first problem. Removes files the manifest does not list (left by a killed "
        "append), unless another process holds the buffer's lock (then it only checks).",
    )
    v.add_argument("buffer", metavar="BUFFER")
    v.add_argument("--no-cleanup", action="store_true", help="do not remove unlisted files")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    v.set_defaults(func=cmd_validate)

    i = sub.add_parser("info", help="summarise a buffer's manifest", description="Print the manifest's summary.")
    i.add_argument("buffer", metavar="BUFFER")
    i.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    i.set_defaults(func=cmd_info)

    add_curate_commands(sub)  # show, stats, filter, dedup, decontaminate, split, mix
    add_log_level_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = ["shiq-data", *argv]
    setup_logging(getattr(args, "log_level", "INFO"))
    if log_level(getattr(args, "log_level", "INFO")) > logging.INFO:  # WARNING or ERROR: no progress bars either
        args.no_progress = True
    with on_sigterm():  # a kill (SIGTERM) removes the temporary files, as Ctrl-C does, then ends with status 143
        return run_command("shiq-data", args.func, args)  # RowError names the file, row and field


if __name__ == "__main__":
    sys.exit(main())
